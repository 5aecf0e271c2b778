"""`kdpipe prepare-data`: corpus → tokenized, packed token store.

Order of work: expand the inputs, load the tokenizer, fingerprint (tokenizer + input bytes +
the options that shape the content); if `--out` already holds a store with that fingerprint
there is nothing to do, if it holds another one the run is refused unless `--overwrite`.
The store is then built in a temporary directory beside `--out` and renamed into place
when complete, so an interrupted run leaves no half-written store behind. An `--out` that
cannot be written is refused before tokenizing starts; a full disk ends the run with one line
and removes the temporary directory.

Throughput: tokenization (the tokenizers library's Rust batch encoder, parallel over the
cores, GIL released) runs in a worker thread one batch ahead, while the main thread reads
the next batch and packs and writes the previous one, so Python-side work overlaps with
tokenization instead of adding to it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdpipe.pipeline.corpus import CorpusReader, DocumentBatch, InputFile, expand_inputs, file_digest
from kdpipe.pipeline.packing import PackedSequences, PlacedDocuments, SequencePacker, assign_val
from kdpipe.schemas.config import to_dict, write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import check_writable_dir, free_bytes, is_disk_full
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.token_store import FORMAT, SCHEMA_VERSION, SPLIT_NAMES, TokenStore, TokenStoreWriter
from kdpipe.schemas.tokenizer import load_tokenizer, tokenizer_fingerprint

# Options that decide what the store holds; `out`, `overwrite` and `batch_docs` do not.
CONTENT_FIELDS = ("seq_len", "text_field", "val_fraction", "tail", "skip_bad_rows")
PREFETCH_BATCHES = 2


@dataclass(slots=True)
class PrepareSummary:
    """What a prepare-data run produced (or found already in place)."""

    out: Path
    fingerprint: str
    up_to_date: bool
    seq_len: int
    splits: dict[str, dict[str, int]]  # manifest["splits"]
    skipped_rows: int
    empty_documents: int
    bytes_on_disk: int
    seconds: float
    tokens_per_second: float  # tokenized tokens (separators included) per wall-clock second

    def text(self) -> str:
        """The one-paragraph summary printed at the end of the command."""
        parts = []
        for name in SPLIT_NAMES:
            s = self.splits[name]
            detail = f"{s['num_tokens']:,} tokens from {s['num_documents']:,} documents"
            if s["num_padding"]:
                detail += f", {s['num_padding']:,} padding"
            if s["num_dropped_tokens"]:
                detail += f", {s['num_dropped_tokens']:,} tail tokens dropped"
            plural = "" if s["num_sequences"] == 1 else "s"
            parts.append(f"{name} {s['num_sequences']:,} sequence{plural} ({detail})")
        held = f"{'; '.join(parts)}; sequences of {self.seq_len:,} tokens"
        if self.up_to_date:
            return (
                f"Token store {self.out} is up to date (fingerprint {self.fingerprint}: same tokenizer, inputs and "
                f"options); nothing to do. It holds {held}; {_size(self.bytes_on_disk)} on disk."
            )
        skipped = ""
        if self.skipped_rows:
            skipped += f"; {self.skipped_rows:,} bad rows skipped"
        if self.empty_documents:
            skipped += f"; {self.empty_documents:,} empty documents skipped"
        return (
            f"Wrote token store {self.out} (fingerprint {self.fingerprint}): {held}{skipped}; "
            f"{_size(self.bytes_on_disk)} on disk; {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s."
        )


def prepare_data(config: PrepareDataConfig) -> PrepareSummary:
    """Build (or confirm) the token store described by `config`."""
    started = time.perf_counter()
    files = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    encoder = _batch_encoder(tokenizer, config.tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise KdpipeError(f"tokenizer {config.tokenizer} has no EOS token, which separates documents; set eos_token in its tokenizer_config.json")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id != eos_id else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    inputs = [{"path": str(f.path), "bytes": f.num_bytes, "blake2b": file_digest(f.path)} for f in files]
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "seq_len": config.seq_len,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "tail": config.tail,
        "inputs": inputs,
        "config": {k: v for k, v in to_dict(config).items() if k not in ("out", "overwrite")},
    }
    manifest["fingerprint"] = _fingerprint(manifest, config)

    out = Path(config.out)
    existing = _existing_store(out, manifest, config.overwrite)
    if existing is not None:
        return _summary(out, existing.manifest, up_to_date=True, started=started)

    check_writable_dir(out, "--out", beside=True)  # the store is built beside --out, then renamed
    out.parent.mkdir(parents=True, exist_ok=True)
    build_dir = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(build_dir, ignore_errors=True)  # left by a killed run that had this process id
    build_dir.mkdir()
    try:
        _build(build_dir, files, encoder, manifest, config)
        write_resolved(config, build_dir / "config.yaml")
        tokenizer.save_pretrained(str(build_dir / "tokenizer"))
        _move_into_place(build_dir, out)
    except BaseException as err:
        shutil.rmtree(build_dir, ignore_errors=True)
        if is_disk_full(err):
            raise KdpipeError(
                f"out of disk space (or quota) writing token store {out}: {free_bytes(out):,} bytes free; "
                "free space and re-run the same command"
            ) from None
        raise
    return _summary(out, manifest, up_to_date=False, started=started)


def _batch_encoder(tokenizer: Any, path: Path) -> Any:
    """The Rust tokenizer behind a fast HF tokenizer, with truncation and padding switched off.

    A tokenizer.json may carry a truncation or padding setting; applied here it would cut
    documents silently, so encoding uses a copy with both disabled.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KdpipeError(f"tokenizer {path} has no fast (tokenizers) backend; kdpipe needs a directory with tokenizer.json")
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(backend.to_str())
    encoder.no_truncation()
    encoder.no_padding()
    return encoder


def _encode(encoder: Any, texts: list[str]) -> list[Any]:
    """Tokenize a batch (worker thread; the Rust encoder releases the GIL and uses every core)."""
    return encoder.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster, same ids


def _token_arrays(encodings: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """`(flat_ids (T,) int32, lengths (N,) int64)` of a batch's encodings.

    Runs on the main thread while the worker already encodes the next batch: this is the
    one per-token Python step (each `ids` is a list), so it overlaps tokenization.
    """
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _fingerprint(manifest: dict[str, Any], config: PrepareDataConfig) -> str:
    """Hash of everything that decides the store's bytes: tokenizer, special ids, input contents, content options."""
    blob = {
        "format": manifest["format"],
        "schema_version": manifest["schema_version"],
        "tokenizer": manifest["tokenizer_fingerprint"],
        "special": [manifest["bos_id"], manifest["eos_id"], manifest["pad_id"]],
        "inputs": [i["blake2b"] for i in manifest["inputs"]],
        "options": {name: getattr(config, name) for name in CONTENT_FIELDS},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _existing_store(out: Path, manifest: dict[str, Any], overwrite: bool) -> TokenStore | None:
    """The store at `out` if it is up to date; None if a new one should be built; refuse otherwise."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "manifest.json").is_file():
        raise KdpipeError(f"--out {out} exists and is not a kdpipe token store; refusing to replace it, choose another --out")
    try:
        store = TokenStore.open(out)
    except KdpipeError as err:
        if overwrite:
            return None
        raise KdpipeError(f"{err} (or pass --overwrite to replace it)") from None
    if overwrite:
        return None
    if store.fingerprint == manifest["fingerprint"]:
        return store
    raise KdpipeError(
        f"token store {out} was built differently ({_difference(store.manifest, manifest)}); "
        "pass --overwrite to rebuild it, or choose another --out"
    )


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first difference between two manifests that changes the fingerprint, in words."""
    if old.get("tokenizer_fingerprint") != new["tokenizer_fingerprint"]:
        return "another tokenizer"
    for name in CONTENT_FIELDS:
        before, after = old.get("config", {}).get(name), new["config"][name]
        if before != after:
            return f"{name} {before!r}, now {after!r}"
    if [i["blake2b"] for i in old.get("inputs", [])] != [i["blake2b"] for i in new["inputs"]]:
        return "other input files or contents"
    return f"fingerprint {old.get('fingerprint')}, now {new['fingerprint']}"


def _build(
    build_dir: Path, files: list[InputFile], encoder: Any, manifest: dict[str, Any], config: PrepareDataConfig
) -> None:
    """Read, tokenize, pack and write every split into `build_dir`; fill in the manifest's counts."""
    writer = TokenStoreWriter(build_dir, config.seq_len)
    try:
        packers = {name: SequencePacker(config.seq_len, manifest["eos_id"], manifest["bos_id"]) for name in SPLIT_NAMES}
        reader = CorpusReader(
            files, text_field=config.text_field, batch_docs=config.batch_docs, skip_bad_rows=config.skip_bad_rows
        )
        sources = pa.array([str(f.path) for f in files], type=pa.string())
        total_bytes = sum(f.num_bytes for f in files)
        console = Console(stderr=True)
        progress = Progress(
            TextColumn("tokenizing"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[docs]:,} docs"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,  # a log file gets the summary, not bar redraws
        )
        with progress, ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdpipe-tokenize") as pool:
            task = progress.add_task("tokenizing", total=max(total_bytes, 1), docs=0)
            queue: deque[tuple[DocumentBatch, Future]] = deque()
            num_docs = 0
            for batch in reader:
                queue.append((batch, pool.submit(_encode, encoder, batch.texts)))
                if len(queue) > PREFETCH_BATCHES:
                    _pack_batch(*queue.popleft(), packers, writer, sources, config.val_fraction)
                num_docs += len(batch.texts)
                progress.update(task, completed=batch.bytes_read, docs=num_docs)
            while queue:
                _pack_batch(*queue.popleft(), packers, writer, sources, config.val_fraction)
            progress.update(task, completed=max(total_bytes, 1))
        if num_docs == 0:
            raise KdpipeError(
                f"no documents in the {len(files)} input file(s) ({reader.num_bad_rows} bad rows skipped, "
                f"{reader.num_empty} empty); check the inputs and --text-field"
            )
        for name, packer in packers.items():
            _write(writer, name, sources, *packer.finish(config.tail, manifest["pad_id"]))
        train = packers["train"]
        if train.num_sequences == 0:
            raise KdpipeError(
                f"the train split has {train.num_dropped_tokens} tokens, fewer than --seq-len {config.seq_len}: "
                "no complete sequence; lower --seq-len, pass --tail pad or add text"
            )
        manifest["splits"] = {
            name: {
                "num_sequences": p.num_sequences,
                "num_tokens": p.num_tokens,
                "num_documents": p.num_documents,
                "num_padding": p.num_padding,
                "num_dropped_tokens": p.num_dropped_tokens,
            }
            for name, p in packers.items()
        }
        manifest["skipped_rows"] = reader.num_bad_rows
        manifest["empty_documents"] = reader.num_empty
        writer.finish(manifest)
    finally:
        writer.close()


def _pack_batch(
    batch: DocumentBatch,
    encoded: Future,
    packers: dict[str, SequencePacker],
    writer: TokenStoreWriter,
    sources: pa.Array,
    val_fraction: float,
) -> None:
    """Split a tokenized batch by document hash and feed each part to its split's packer."""
    is_val = assign_val(batch.texts, val_fraction)  # (N,) bool
    flat, lengths = _token_arrays(encoded.result())  # (T,) int32, (N,) int64
    for name, keep in (("train", ~is_val), ("val", is_val)):
        if not keep.any():
            continue
        if keep.all():
            part = packers[name].add(flat, lengths, batch.sources, batch.rows)
        else:
            token_keep = np.repeat(keep, lengths)  # (T,) bool
            part = packers[name].add(flat[token_keep], lengths[keep], batch.sources[keep], batch.rows[keep])
        _write(writer, name, sources, *part)


def _write(
    writer: TokenStoreWriter, split: str, sources: pa.Array, packed: PackedSequences, placed: PlacedDocuments
) -> None:
    writer.append_sequences(split, packed.tokens, packed.doc_starts, packed.starts_per_sequence)
    writer.append_documents(
        split,
        {
            "source": sources.take(pa.array(placed.sources)),
            "row": placed.rows,
            "num_tokens": placed.num_tokens,
            "first_sequence": placed.first_sequence,
            "first_position": placed.first_position,
        },
    )


def _move_into_place(build_dir: Path, out: Path) -> None:
    """Rename the finished store to `out`, replacing an old one (moved aside first, deleted last)."""
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(aside)
        build_dir.rename(out)
        shutil.rmtree(aside)
    else:
        build_dir.rename(out)


def _summary(out: Path, manifest: dict[str, Any], *, up_to_date: bool, started: float) -> PrepareSummary:
    seconds = time.perf_counter() - started
    splits = manifest["splits"]
    tokenized = sum(s["num_tokens"] + s["num_dropped_tokens"] for s in splits.values())
    return PrepareSummary(
        out=out,
        fingerprint=manifest["fingerprint"],
        up_to_date=up_to_date,
        seq_len=manifest["seq_len"],
        splits=splits,
        skipped_rows=manifest["skipped_rows"],
        empty_documents=manifest["empty_documents"],
        bytes_on_disk=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        seconds=seconds,
        tokens_per_second=0.0 if up_to_date else tokenized / max(seconds, 1e-9),
    )


def _size(num_bytes: int) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    value, unit = float(num_bytes), 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{value:,.0f} B" if unit == 0 else f"{value:,.1f} {units[unit]}"
