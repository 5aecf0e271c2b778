"""Check the inputs of `cache-teacher` and work out what this task has to write.

Everything that can be wrong with the user's inputs is found here, before the teacher runs
and before anything is written (so `--dry-run` finds it too, and a refused run leaves nothing
that blocks the corrected one): a missing, non-causal or truncated teacher, a token store
built with another tokenizer or with a damaged file, a vocabulary or sequence length the
teacher cannot serve, a top-k beyond the vocabulary, an unknown snapshot layer, an output
directory that holds something else or cannot be written. The plan also carries the manifest
(what decides the cache's content), this task's shards, with `--repair` the complete shards
that fail verification, and the size estimates `--dry-run` prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers.utils import logging as hf_logging

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.cache_format import (
    CacheManifest, EntryFormat, LayoutInfo, SamplerInfo, SnapshotInfo, TeacherInfo, TokenStoreInfo,
)  # fmt: skip
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import check_writable_dir, free_bytes
from kdpipe.schemas.token_store import TokenStore
from kdpipe.schemas.tokenizer import load_tokenizer, tokenizer_fingerprint
from kdpipe.teacher_cache.backend import TeacherModel, check_tokenizer_compat
from kdpipe.teacher_cache.inspect import shard_problem
from kdpipe.teacher_cache.packing import count_dtype, entry_layout
from kdpipe.teacher_cache.snapshot_positions import parse_layer_spec, snapshot_positions
from kdpipe.teacher_cache.teacher_backend import TeacherBackend, TransformersBackend
from kdpipe.teacher_cache.weight_files import check_safetensors_files

# Anshumann et al. 2025 report about 12 unique ids per position at N=50 on real teachers;
# the dry run uses it as the typical entry count (the real number follows the teacher's entropy).
TYPICAL_RS_KD_UNIQUE_IDS = 12
_TOKEN_ID_BYTES = 4  # the int32 `tokens` array stored in every shard
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TaskShard(NamedTuple):
    """One shard this task is responsible for."""

    split: str
    index: int
    row_start: int
    row_stop: int

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:05d}"


@dataclasses.dataclass(kw_only=True)
class CachePlan:
    """Checked inputs and this task's share of the work; `cache_teacher` runs it."""

    config: CacheTeacherConfig
    teacher: TeacherBackend  # close() it when done (vLLM holds worker processes)
    store: TokenStore
    manifest: CacheManifest
    task_index: int
    num_tasks: int
    all_shards: list[TaskShard]  # every shard of the selected splits, in global order
    task_shards: list[TaskShard]  # this task's: global shards i, i+n, i+2n, ...
    complete: set[tuple[str, int]]  # (split, index) of this task's shards already complete on disk
    repairs: list[tuple[TaskShard, str]]  # --repair: this task's complete shards failing verification, and why
    out_state: Literal["new", "resume", "replace"]  # replace: another cache is there and --overwrite was given
    logits_bytes_per_token: float  # estimate, uncompressed (see `describe`)
    snapshot_bytes_per_token: float  # exact before compression

    @property
    def pending(self) -> list[TaskShard]:
        """This task's shards that are not complete yet (before any --repair check)."""
        return [s for s in self.task_shards if (s.split, s.index) not in self.complete]

    @property
    def device(self) -> str:
        return f"{self.teacher.device} ({str(self.teacher.dtype).removeprefix('torch.')})"

    def describe(self) -> str:
        """The plan as printed by `--dry-run` and at the start of every run."""
        m, c = self.manifest, self.config
        seq_len = m.token_store.seq_len
        bytes_per_token = self.logits_bytes_per_token + self.snapshot_bytes_per_token + _TOKEN_ID_BYTES
        all_tokens = sum(s.row_stop - s.row_start for s in self.all_shards) * seq_len
        task_tokens = sum(s.row_stop - s.row_start for s in self.pending + [s for s, _ in self.repairs]) * seq_len
        per_split = ", ".join(f"{split} {n}" for split, n in m.layout.shards.items() if n and split in _selected(c, self.store))
        if m.sampler.mode == "rs-kd":
            sampler = f"rs-kd, N={m.sampler.num_draws} draws at temperature {m.sampler.temperature}, seed {m.sampler.seed}"
            typical = min(m.sampler.num_draws, TYPICAL_RS_KD_UNIQUE_IDS)
            basis = f"assuming ~{typical} unique ids per position, the figure of Anshumann et al. at N=50"
        else:
            top_p = f"top-p {m.sampler.top_p} then " if m.sampler.mode == "top-p-k" else ""
            ghost = ", with ghost mass" if m.sampler.ghost else ""
            sampler = f"{m.sampler.mode}, {top_p}k={m.sampler.top_k} at temperature {m.sampler.temperature}{ghost}"
            basis = f"assuming {m.sampler.top_k} ids per position" + (", an upper bound" if m.sampler.mode == "top-p-k" else "")
        if m.snapshot.layers:
            terms = "/".join(m.snapshot.terms)
            snapshots = (
                f"layers {','.join(map(str, m.snapshot.layers))}: {terms} at {m.snapshot.positions_per_sequence} of {seq_len} "
                f"positions per sequence, {m.snapshot.dtype}"
            )
        else:
            snapshots = "none"
        state = {
            "new": "new cache",
            "resume": f"resuming: {len(self.complete)} of this task's {len(self.task_shards)} shards already complete",
            "replace": "holds a cache of another teacher/config, which --overwrite will delete",
        }[self.out_state]
        lines = [
            f"cache-teacher plan for {c.out} ({state})",
            f"  teacher    {c.teacher}: {m.teacher.model_type}, {m.teacher.num_layers} layers, hidden {m.teacher.hidden_size}, "
            f"LM head {m.teacher.vocab_size} rows",
            f"  device     {self.device}, {self.teacher.name} backend",
            f"  tokens     {c.tokens}: {', '.join(f'{s} {n:,}' for s, n in m.token_store.splits.items())} sequences of {seq_len}",
            f"  sampler    {sampler}",
            f"  snapshots  {snapshots}",
            f"  shards     {len(self.all_shards)} in total ({per_split or 'none'}), {m.layout.sequences_per_shard} sequences each; "
            f"task {self.task_index} of {self.num_tasks} takes {len(self.task_shards)}, {len(self.pending) + len(self.repairs)} to write"
            + (f" ({len(self.repairs)} of them redone by --repair)" if self.repairs else ""),
            f"  bytes/token logits ~{self.logits_bytes_per_token:.1f} (estimated before compression, "
            f"{m.layout.entry.bytes_per_entry} B per entry {basis}), snapshots {self.snapshot_bytes_per_token:.1f}, "
            f"token ids {_TOKEN_ID_BYTES}",
            f"  total      ~{_size(bytes_per_token * all_tokens)} for {all_tokens:,} tokens; "
            f"this task ~{_size(bytes_per_token * task_tokens)} for {task_tokens:,} tokens",
        ]
        free, task_bytes = free_bytes(c.out), bytes_per_token * task_tokens
        disk = f"  disk       {_size(free)} free where {c.out} is"
        if free < task_bytes:
            # The estimate is before compression (logits shrink ~1.5-2x with zstd): a warning, not a refusal.
            disk += ": less than this task's estimate before compression; free space if the run stops on a full disk"
        lines.append(disk)
        if self.config.repair and self.out_state == "resume":
            if self.repairs:
                shown = ", ".join(f"{shard.name} ({why})" for shard, why in self.repairs[:5]) + (", ..." if len(self.repairs) > 5 else "")
                lines.append(f"  repair     {len(self.repairs)} complete shards fail verification and will be redone: {shown}")
            else:
                lines.append(f"  repair     all {len(self.complete)} complete shards of this task pass verification")
        if self.store.checksum_note:
            lines.append(f"  note       {self.store.checksum_note}")
        return "\n".join(lines)


def plan_cache(config: CacheTeacherConfig) -> CachePlan:
    """Open and cross-check the token store and the teacher, and list this task's shards."""
    store = TokenStore.open(config.tokens)
    selected = _selected(config, store)
    check_safetensors_files(config.teacher)  # a truncated file would fail deep inside transformers
    teacher = _load_teacher_quietly(config, store.seq_len)
    try:
        return _plan(config, store, selected, teacher)
    except BaseException:
        teacher.close()
        raise


def _plan(config: CacheTeacherConfig, store: TokenStore, selected: list[str], teacher: TeacherBackend) -> CachePlan:
    teacher_tokenizer = _teacher_tokenizer_fingerprint(config.teacher)
    if teacher_tokenizer != store.tokenizer_fingerprint:
        raise KdpipeError(
            f"tokenizer mismatch: token store {config.tokens} was built with tokenizer {store.tokenizer_fingerprint}, "
            f"teacher {config.teacher} has tokenizer {teacher_tokenizer}; re-run prepare-data with the teacher's tokenizer"
        )
    # prepare-data only writes ids of its tokenizer, so the vocabulary bounds the ids; each
    # batch is checked again before it reaches the embedding.
    check_tokenizer_compat(teacher.info, store.vocab_size, store.vocab_size - 1, store.seq_len)
    if config.mode != "rs-kd" and config.top_k > teacher.info.vocab_size:
        raise KdpipeError(
            f"--top-k {config.top_k} is larger than the vocabulary of teacher {config.teacher} "
            f"({teacher.info.vocab_size} LM-head rows); use --top-k {teacher.info.vocab_size} or less"
        )
    layers = parse_layer_spec(config.snapshot_layers, teacher.info.num_layers)
    teacher.check_snapshot_layers(layers, config.snapshot_attention)  # now, not after the first forward
    manifest = build_manifest(config, teacher, store, teacher_tokenizer, layers)
    out_state = _check_out_dir(config, manifest)
    task_index, num_tasks = config.task_slot()
    all_shards = [
        TaskShard(split, index, *manifest.shard_rows(split, index))
        for split, index in manifest.global_shards()
        if split in selected
    ]
    task_shards = all_shards[task_index::num_tasks]
    complete = set()
    if out_state == "resume":
        complete = {(s.split, s.index) for s in task_shards if (cf.shard_dir(config.out, s.split, s.index) / cf.COMPLETE_FILE).is_file()}
    repairs = []
    if config.repair:  # the same full check `kdpipe verify` makes, on this task's complete shards only
        for shard in task_shards:
            if (shard.split, shard.index) in complete:
                why = shard_problem(cf.shard_dir(config.out, shard.split, shard.index), manifest, shard.split, shard.index, checksums=True)
                if why:
                    repairs.append((shard, why))
    return CachePlan(
        config=config,
        teacher=teacher,
        store=store,
        manifest=manifest,
        task_index=task_index,
        num_tasks=num_tasks,
        all_shards=all_shards,
        task_shards=task_shards,
        complete=complete,
        repairs=repairs,
        out_state=out_state,
        logits_bytes_per_token=_logits_bytes_per_token(manifest),
        snapshot_bytes_per_token=_snapshot_bytes_per_token(manifest),
    )


def build_manifest(
    config: CacheTeacherConfig, teacher: TeacherBackend, store: TokenStore, tokenizer: str, layers: list[int]
) -> CacheManifest:
    """The manifest of the cache `config` describes.

    Options a mode does not use are recorded as neutral values (rs-kd: no k, p or ghost;
    top-k modes: no draws; no snapshot layers: no fraction, no attention, the FFN-output
    flag's default), so that a stray flag does not make an identical cache look like another one.
    """
    info, seq_len = teacher.info, store.seq_len
    rs_kd = config.mode == "rs-kd"
    sampler = SamplerInfo(
        mode=config.mode,
        num_draws=config.num_draws if rs_kd else 0,
        temperature=config.temperature,
        top_k=0 if rs_kd else config.top_k,
        top_p=config.top_p if config.mode == "top-p-k" else 1.0,
        ghost=config.ghost and not rs_kd,
        seed=config.seed,
    )
    if layers:
        one_sequence = torch.zeros(1, dtype=torch.int64)
        positions = snapshot_positions(seed=config.seed, stream=0, seq_index=one_sequence, seq_len=seq_len, fraction=config.snapshot_fraction)
        snapshot = SnapshotInfo(
            layers=layers,
            fraction=config.snapshot_fraction,
            positions_per_sequence=positions.shape[1],
            dtype=config.snapshot_dtype,
            attention=config.snapshot_attention,
            ffn_output=config.snapshot_ffn_output,
        )
    else:
        snapshot = SnapshotInfo(layers=[], fraction=0.0, positions_per_sequence=0, dtype="bf16", attention=False)
    layout = entry_layout(config.mode, info.vocab_size, config.num_draws)
    max_entries = min(config.num_draws if rs_kd else config.top_k, info.vocab_size)
    splits = {name: counts["num_sequences"] for name, counts in store.manifest["splits"].items()}
    per_shard = config.sequences_per_shard
    return CacheManifest(
        teacher=TeacherInfo(
            model_type=info.model_type,
            config_hash=info.config_hash,
            weights_hash=info.weights_hash,
            tokenizer_fingerprint=tokenizer,
            vocab_size=info.vocab_size,
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
            intermediate_size=info.intermediate_size,
            path=str(Path(config.teacher).resolve()),
        ),
        token_store=TokenStoreInfo(fingerprint=store.fingerprint, seq_len=seq_len, splits=splits),
        sampler=sampler,
        snapshot=snapshot,
        layout=LayoutInfo(
            sequences_per_shard=per_shard,
            sequences_per_chunk=config.sequences_per_chunk,
            entry=EntryFormat(**dataclasses.asdict(layout)),
            count_dtype=str(count_dtype(max_entries)),  # type: ignore[arg-type]
            shards={name: -(-n // per_shard) for name, n in splits.items()},
        ),
        producer={"backend": teacher.name, **teacher.versions()},
    )


def _selected(config: CacheTeacherConfig, store: TokenStore) -> list[str]:
    """The splits to cache: --splits (checked against the store) or every split of the store."""
    if config.splits is None:
        return list(store.manifest["splits"])
    for name in config.splits:
        store.split(name)  # names the store's splits if `name` is not one
    return list(config.splits)


def _load_teacher_quietly(config: CacheTeacherConfig, seq_len: int) -> TeacherBackend:
    """Load without transformers' "Loading weights" bar: kdpipe shows its own progress, and a
    stray tqdm line on stderr would break the one-line error of a check that fails after loading.
    vLLM is imported only here, when asked for."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if config.backend == "vllm":
            from kdpipe.teacher_cache.vllm_backend import VllmBackend

            return VllmBackend.load(config, seq_len=seq_len)
        return TransformersBackend(TeacherModel.load(config.teacher, device=config.device, dtype=config.dtype))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _teacher_tokenizer_fingerprint(teacher_dir: Path) -> str:
    if not any((Path(teacher_dir) / name).is_file() for name in _TOKENIZER_FILES):
        raise KdpipeError(
            f"teacher {teacher_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "copy the teacher's tokenizer into it so it can be checked against the token store"
        )
    return tokenizer_fingerprint(load_tokenizer(teacher_dir))


def _check_out_dir(config: CacheTeacherConfig, manifest: CacheManifest) -> Literal["new", "resume", "replace"]:
    """What --out holds: nothing yet, this very cache (resume), or another cache (refused without --overwrite)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise KdpipeError(f"--out {out} is a file, not a directory; use another --out")
    check_writable_dir(out, "--out")
    manifest_path = out / cf.MANIFEST_FILE
    if not manifest_path.is_file():
        leftovers = [name for name in os.listdir(out) if not name.startswith(cf.TMP_PREFIX)] if out.is_dir() else []
        if leftovers:
            raise KdpipeError(f"--out {out} is not empty and holds no teacher cache (no {cf.MANIFEST_FILE}); use another --out")
        return "new"
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        existing = None
    if not isinstance(existing, dict) or existing.get("format") != cf.FORMAT_NAME:
        raise KdpipeError(f"{manifest_path} is not a teacher-cache manifest; use another --out")
    if existing.get("fingerprint") == manifest.fingerprint:
        return "resume"
    if config.overwrite:
        return "replace"
    ours = json.loads(manifest.to_json())
    for data in (existing, ours):
        if isinstance(data.get("teacher"), dict):
            data["teacher"].pop("path", None)  # informational, never a difference
    differing = [key for key in sorted(ours) if key not in ("fingerprint", "producer") and existing.get(key) != ours[key]]
    raise KdpipeError(
        f"--out {out} holds a cache of another teacher/config ({', '.join(differing) or 'fingerprint'} differ); "
        "use another --out, or --overwrite to delete it"
    )


def _logits_bytes_per_token(manifest: CacheManifest) -> float:
    """Per position: its entry count, the typical entries, ghost mass, and the per-sequence offset."""
    m = manifest
    if m.sampler.mode == "rs-kd":
        entries = min(m.sampler.num_draws, TYPICAL_RS_KD_UNIQUE_IDS)
    else:
        entries = m.sampler.top_k
    count_bytes = 1 if m.layout.count_dtype == "uint8" else 2
    ghost_bytes = 2 if m.sampler.ghost else 0  # float16
    offsets_bytes = 8 / m.token_store.seq_len  # one int64 per sequence
    return count_bytes + entries * m.layout.entry.bytes_per_entry + ghost_bytes + offsets_bytes


def _snapshot_bytes_per_token(manifest: CacheManifest) -> float:
    """K positions per sequence: an int32 position plus, per layer and term, d values (and an fp8 scale)."""
    s = manifest.snapshot
    if not s.layers:
        return 0.0
    value_bytes = manifest.teacher.hidden_size * (2 if s.dtype == "bf16" else 1) + (4 if s.dtype == "fp8" else 0)
    per_position = 4 + len(s.layers) * len(s.terms) * value_bytes
    return s.positions_per_sequence * per_position / manifest.token_store.seq_len


def _size(num_bytes: float) -> str:
    """Decimal units, as disk sizes are quoted."""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"

