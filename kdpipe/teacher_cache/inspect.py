"""Check and describe a teacher cache: `verify_cache` (checksums), `scan_cache` (cheap) and `cache_stats` (sizes, targets).

`verify_cache` re-reads every file of every complete shard and compares it with the crc32c in
its `complete.json`; it reports each shard as ok, missing, partial (a tmp dir is left from an
interrupted writer: the shard will be redone) or bad (with the reason). Given a token store
instead of a cache, it verifies the store (`kdpipe verify TOKEN_STORE`). `scan_cache` makes the
same report from directory listings alone (every file a completion record lists exists and is
not empty, no file it does not list), which is what `cache_stats` refuses a damaged cache on:
`kdpipe inspect` never prints bytes per token of a shard that lost a file. `cache_stats` measures
what the cache costs and holds: bytes per token from the files on disk, split into the sparse
logits arrays, the snapshot arrays and the token ids; unique ids per position; covered mass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import zarr
from rich.table import Table

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_format import CacheManifest, ShardRecord
from kdpipe.schemas.checksums import file_crc32c
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.token_store import TokenStoreVerifyReport, is_token_store, verify_token_store
from kdpipe.teacher_cache.reader import TeacherCache, open_cache

_LOGITS_ARRAYS = (cf.NUM_ENTRIES, cf.SEQ_ENTRY_OFFSETS, cf.ENTRIES, cf.GHOST)
_SNAPSHOT_ARRAYS = (cf.SNAP_POSITIONS, cf.SNAP_GROUP)


class ShardVerdict(NamedTuple):
    """The state of one shard on disk."""

    split: str
    index: int
    status: Literal["ok", "missing", "partial", "bad"]
    reason: str  # why it is bad, or what happens to a missing/partial shard

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:05d}"


class VerifyReport(NamedTuple):
    """Verdicts of every shard of a cache, in global shard order."""

    path: Path
    shards: list[ShardVerdict]

    @property
    def bad(self) -> list[ShardVerdict]:
        return [v for v in self.shards if v.status == "bad"]

    def count(self, status: str) -> int:
        return sum(v.status == status for v in self.shards)

    def summary(self) -> str:
        """One line: the number of shards in each state."""
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("ok", "bad", "partial", "missing"))
        return f"{self.path}: {len(self.shards)} shards: {counts}"


def verify_cache(path: Path | str) -> VerifyReport | TokenStoreVerifyReport:
    """Re-check the checksum of every file of every complete shard (or of a token store, which raises on damage)."""
    if is_token_store(path):
        return verify_token_store(path)
    return _report(open_cache(path), checksums=True)


def scan_cache(path: Path | str) -> VerifyReport:
    """`verify_cache` without reading file contents: listed files present and non-empty, no unlisted ones."""
    return _report(open_cache(path), checksums=False)


def _report(cache: TeacherCache, *, checksums: bool) -> VerifyReport:
    verdicts = []
    for split, index in cache.manifest.global_shards():
        final = cf.shard_dir(cache.path, split, index)
        if (final / cf.COMPLETE_FILE).is_file():
            reason = shard_problem(final, cache.manifest, split, index, checksums=checksums)
            verdicts.append(ShardVerdict(split, index, "bad", reason) if reason else ShardVerdict(split, index, "ok", ""))
        elif final.exists():
            verdicts.append(ShardVerdict(split, index, "missing", f"{cf.COMPLETE_FILE} is gone; will be redone"))
        elif _tmp_dirs(cache.path, split, index):
            verdicts.append(ShardVerdict(split, index, "partial", "partial, will be redone"))
        else:
            verdicts.append(ShardVerdict(split, index, "missing", "not written yet"))
    return VerifyReport(cache.path, verdicts)


def _tmp_dirs(cache_dir: Path, split: str, index: int) -> list[Path]:
    root = cf.shards_root(cache_dir, split)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if cf.tmp_shard_index(p.name) == index]


def shard_problem(directory: Path, manifest: CacheManifest, split: str, index: int, *, checksums: bool) -> str | None:
    """Why a shard with a completion record is not what its writer wrote, or None.

    Without `checksums` only the directory listing is read (a missing, empty, unlisted or
    resized file); with them every file's crc32c is compared too.
    """
    record_path = directory / cf.COMPLETE_FILE
    try:
        record = ShardRecord.from_json(record_path.read_text(encoding="utf-8"), where=str(record_path))
    except KdpipeError:
        return f"{cf.COMPLETE_FILE} is unreadable"
    if (record.split, record.index, (record.row_start, record.row_stop)) != (split, index, manifest.shard_rows(split, index)):
        return f"{cf.COMPLETE_FILE} describes another shard ({record.split}/{record.index} rows {record.row_start}-{record.row_stop})"
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {cf.COMPLETE_FILE}
    for name in sorted(record.files):
        if name not in on_disk:
            return f"file {name} is missing"
        size = (directory / name).stat().st_size
        if size == 0:  # zarr never writes an empty file: a torn write
            return f"file {name} is empty"
        if record.sizes is not None and size != record.sizes.get(name):
            return f"file {name} has {size} bytes, {record.sizes.get(name)} were written"
        if checksums and file_crc32c(directory / name) != record.files[name]:
            return f"file {name} fails its checksum"
    unexpected = sorted(on_disk - record.files.keys())
    if unexpected:
        return f"file {unexpected[0]} is not in {cf.COMPLETE_FILE}"
    return None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CacheStats:
    """What a cache holds and costs; sizes are counted over complete shards only."""

    path: Path
    mode: str
    sequences: int
    tokens: int
    shards_complete: int
    shards_missing: int
    logits_bytes_per_token: float  # num_entries, seq_entry_offsets, entries, ghost
    snapshot_bytes_per_token: float  # snap_positions and snap/*
    snapshot_terms: str  # what each snapshotted layer stores: "ffn_in", "ffn_in/ffn_out", ...; "none"
    token_ids_bytes_per_token: float  # the tokens array
    total_bytes: int  # every file of the complete shards, metadata included
    mean_ids_per_position: float
    p99_ids_per_position: int
    mean_covered_mass: float


def cache_stats(path: Path | str) -> CacheStats:
    """Sizes from the files on disk, unique ids per position from `num_entries`, mass from complete.json.

    Refuses a cache with a damaged complete shard (`scan_cache`), naming it: its sizes would be wrong.
    """
    cache = open_cache(path)
    damaged = _report(cache, checksums=False).bad
    if damaged:
        more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
        raise KdpipeError(
            f"cache {cache.path}: shard {damaged[0].name} is damaged ({damaged[0].reason}){more}; "
            f"run `kdpipe verify {cache.path}` and redo it with `kdpipe cache-teacher --repair`"
        )
    missing = set(cache.missing_shards())
    complete = [key for key in cache.manifest.global_shards() if key not in missing]
    sequences = positions = 0
    logits_bytes = snapshot_bytes = token_bytes = total_bytes = 0
    mass_sum = 0.0
    histogram = np.zeros(1, dtype=np.int64)  # histogram[k] = positions holding k entries
    for split, index in complete:
        directory = cf.shard_dir(cache.path, split, index)
        record_path = directory / cf.COMPLETE_FILE
        record = ShardRecord.from_json(record_path.read_text(encoding="utf-8"), where=str(record_path))
        sequences += record.row_stop - record.row_start
        positions += record.num_positions
        mass_sum += record.covered_mass_sum
        for file in directory.rglob("*"):
            if not file.is_file():
                continue
            size = file.stat().st_size
            top = file.relative_to(directory).parts[0]
            total_bytes += size
            logits_bytes += size * (top in _LOGITS_ARRAYS)
            snapshot_bytes += size * (top in _SNAPSHOT_ARRAYS)
            token_bytes += size * (top == cf.TOKENS)
        try:
            counts = np.asarray(zarr.open_array(directory / cf.NUM_ENTRIES, mode="r")[:]).reshape(-1)  # (n*T,)
        except Exception as err:  # zarr/numcodecs raise many types; name the shard instead
            raise KdpipeError(f"cache shard {directory} is damaged ({type(err).__name__}); run `kdpipe verify {cache.path}`") from None
        shard_hist = np.bincount(counts)
        if shard_hist.size > histogram.size:
            histogram = np.pad(histogram, (0, shard_hist.size - histogram.size))
        histogram[: shard_hist.size] += shard_hist
    tokens = max(positions, 1)
    num_positions = int(histogram.sum())
    if num_positions:
        mean_ids = float((histogram * np.arange(histogram.size)).sum() / num_positions)
        p99_ids = int(np.searchsorted(np.cumsum(histogram), 0.99 * num_positions))
    else:
        mean_ids, p99_ids = 0.0, 0
    return CacheStats(
        path=cache.path,
        mode=cache.mode,
        sequences=sequences,
        tokens=positions,
        shards_complete=len(complete),
        shards_missing=len(missing),
        logits_bytes_per_token=logits_bytes / tokens,
        snapshot_bytes_per_token=snapshot_bytes / tokens,
        snapshot_terms="/".join(cache.manifest.snapshot.terms) if cache.manifest.snapshot.layers else "none",
        token_ids_bytes_per_token=token_bytes / tokens,
        total_bytes=total_bytes,
        mean_ids_per_position=mean_ids,
        p99_ids_per_position=p99_ids,
        mean_covered_mass=mass_sum / tokens,
    )


def stats_table(stats: CacheStats) -> Table:
    """The `kdpipe inspect` table."""
    table = Table(title=f"teacher cache {stats.path} ({stats.mode})", show_header=False)
    table.add_column("stat")
    table.add_column("value", justify="right")
    rows = [
        ("sequences cached", f"{stats.sequences:,}"),
        ("tokens cached", f"{stats.tokens:,}"),
        ("shards complete / missing", f"{stats.shards_complete} / {stats.shards_missing}"),
        ("bytes per token, logits", f"{stats.logits_bytes_per_token:.2f}"),
        ("bytes per token, snapshots", f"{stats.snapshot_bytes_per_token:.2f}"),
        ("snapshot terms per layer", stats.snapshot_terms),
        ("bytes per token, token ids", f"{stats.token_ids_bytes_per_token:.2f}"),
        ("total bytes", f"{stats.total_bytes:,}"),
        ("unique ids per position, mean", f"{stats.mean_ids_per_position:.2f}"),
        ("unique ids per position, p99", f"{stats.p99_ids_per_position}"),
        ("teacher mass covered, mean", f"{stats.mean_covered_mass:.4f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def verify_table(report: VerifyReport) -> Table | None:
    """The `kdpipe verify` table: one row per shard that is not ok (None when all are)."""
    if all(verdict.status == "ok" for verdict in report.shards):
        return None
    table = Table(title=f"verify {report.path}")
    table.add_column("shard")
    table.add_column("status")
    table.add_column("detail")
    for verdict in report.shards:
        if verdict.status != "ok":
            table.add_row(verdict.name, verdict.status, verdict.reason)
    return table
