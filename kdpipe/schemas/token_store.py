"""The token store: packed token sequences on disk, written by prepare-data, read by every later stage.

A store is a directory:

- `manifest.json` — format, schema version, fingerprint, tokenizer fingerprint, vocab size,
  seq_len, the BOS/EOS/pad ids used, tail mode, inputs (path, bytes, blake2b), the config,
  per-split counts and `files`: every file of the split groups and document tables, by path
  relative to the store, with its size and crc32c (`kdpipe.schemas.checksums`). Written last;
  sorted keys, no timestamps, so equal builds give equal bytes.
- `config.yaml` — the resolved run config; `tokenizer/` — a copy of the tokenizer.
- one Zarr v3 group per split (`train/`, `val/`; a split may hold 0 sequences):
  `tokens` int32 `(num_sequences, seq_len)` chunked by 256 rows; `doc_starts` int32, flat,
  the positions within each sequence where a document's first token (BOS if the tokenizer
  has one, else its first text token) lies; `doc_start_offsets` int64
  `(num_sequences + 1,)`, so sequence i's starts are `doc_starts[offsets[i]:offsets[i+1]]`.
  A sequence whose first tokens continue the previous sequence's document has no start at 0.
  Padding (tail="pad") only ever fills the end of a split's last sequence (`num_padding`).
- `documents-{split}.arrow` — Arrow IPC file, one row per document of the split in stream
  order: `source` (input path as given), `row` (record index in that file: 0-based index of
  the non-empty line for .jsonl/.json, 0-based row for .parquet, always 0 for .txt where the
  file is the document), `num_tokens` (tokens the document occupies, separators included),
  `first_sequence`/`first_position` (where its first token landed; -1 when it fell in a
  dropped tail; a document may run past the last stored sequence when the tail was dropped).

Damage never reaches a later stage as wrong tokens: `TokenStore.open` checks that every file
`files` lists exists with its recorded size (a stat per file: a truncated or deleted chunk
fails even a dry run), `TokenSplit.tokens` checks each chunk's crc32c before its first read
(a flipped bit fails cache-teacher, naming the chunk), and `verify_token_store` checks every
file. A store written before `files` existed opens without these checks; `checksum_note`
says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import zarr
from zarr.codecs import ZstdCodec

from kdpipe.schemas.checksums import file_crc32c
from kdpipe.schemas.errors import KdpipeError, parse_json

FORMAT = "kdpipe.token_store"
SCHEMA_VERSION = 1
SPLIT_NAMES = ("train", "val")
ROWS_PER_CHUNK = 256
FLAT_CHUNK = 65536

DOCUMENTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("num_tokens", pa.int64()),
        ("first_sequence", pa.int64()),
        ("first_position", pa.int32()),
    ]
)


class _ChunkAppender:
    """Appends along axis 0 of a Zarr array in whole chunks, so each chunk file is written exactly once."""

    def __init__(self, array: zarr.Array, chunk_rows: int) -> None:
        self._array = array
        self._chunk_rows = chunk_rows
        self._pending: list[np.ndarray] = []
        self._num_pending = 0
        self.num_written = 0

    def append(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self._pending.append(rows)
        self._num_pending += len(rows)
        if self._num_pending >= self._chunk_rows:
            data = np.concatenate(self._pending)
            whole = len(data) - len(data) % self._chunk_rows
            self._write(data[:whole])
            self._pending = [data[whole:]] if whole < len(data) else []
            self._num_pending = len(data) - whole

    def flush(self) -> None:
        if self._pending:
            self._write(np.concatenate(self._pending))
        self._pending, self._num_pending = [], 0

    def _write(self, data: np.ndarray) -> None:
        start, stop = self.num_written, self.num_written + len(data)
        self._array.resize((stop, *self._array.shape[1:]))
        self._array[start:stop] = data
        self.num_written = stop


class TokenStoreWriter:
    """Writes the arrays and document tables of a store into a (temporary) directory."""

    def __init__(self, path: Path, seq_len: int) -> None:
        self.path = Path(path)
        self.seq_len = seq_len
        self._tokens: dict[str, _ChunkAppender] = {}
        self._starts: dict[str, _ChunkAppender] = {}
        self._offsets: dict[str, _ChunkAppender] = {}
        self._num_starts = {name: 0 for name in SPLIT_NAMES}
        self._documents: dict[str, pa.ipc.RecordBatchFileWriter] = {}
        compressors = ZstdCodec(level=3)
        for name in SPLIT_NAMES:
            group = zarr.open_group(self.path / name, mode="w", zarr_format=3)
            tokens = group.create_array(
                "tokens", shape=(0, seq_len), chunks=(ROWS_PER_CHUNK, seq_len), dtype="int32", compressors=compressors
            )
            starts = group.create_array("doc_starts", shape=(0,), chunks=(FLAT_CHUNK,), dtype="int32", compressors=compressors)
            offsets = group.create_array(
                "doc_start_offsets", shape=(0,), chunks=(FLAT_CHUNK,), dtype="int64", compressors=compressors
            )
            self._tokens[name] = _ChunkAppender(tokens, ROWS_PER_CHUNK)
            self._starts[name] = _ChunkAppender(starts, FLAT_CHUNK)
            self._offsets[name] = _ChunkAppender(offsets, FLAT_CHUNK)
            self._offsets[name].append(np.zeros(1, dtype=np.int64))
            options = pa.ipc.IpcWriteOptions(compression="zstd")
            self._documents[name] = pa.ipc.new_file(str(self.path / f"documents-{name}.arrow"), DOCUMENTS_SCHEMA, options=options)

    def append_sequences(
        self, split: str, tokens: np.ndarray, doc_starts: np.ndarray, starts_per_sequence: np.ndarray
    ) -> None:
        """Append complete sequences `(S, seq_len)`, their document starts `(D,)` and counts `(S,)`."""
        assert tokens.ndim == 2 and tokens.shape[1] == self.seq_len and tokens.dtype == np.int32
        assert len(starts_per_sequence) == len(tokens) and int(starts_per_sequence.sum()) == len(doc_starts)
        self._tokens[split].append(tokens)
        self._starts[split].append(doc_starts.astype(np.int32, copy=False))
        self._offsets[split].append(self._num_starts[split] + np.cumsum(starts_per_sequence, dtype=np.int64))
        self._num_starts[split] += len(doc_starts)

    def append_documents(self, split: str, columns: dict[str, Any]) -> None:
        """Append document rows (columns named as in `DOCUMENTS_SCHEMA`)."""
        batch = pa.record_batch([pa.array(columns[f.name], type=f.type) for f in DOCUMENTS_SCHEMA], schema=DOCUMENTS_SCHEMA)
        if batch.num_rows:
            self._documents[split].write_batch(batch)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Flush every array, close the tables and write the manifest last (it marks the store complete)."""
        for name in SPLIT_NAMES:
            for appender in (self._tokens[name], self._starts[name], self._offsets[name]):
                appender.flush()
            expected = manifest["splits"][name]["num_sequences"]
            assert self._tokens[name].num_written == expected, (name, self._tokens[name].num_written, expected)
        self.close()
        manifest["files"] = {
            name: {"bytes": (self.path / name).stat().st_size, "crc32c": file_crc32c(self.path / name)}
            for name in _data_files(self.path)
        }
        text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        (self.path / "manifest.json").write_text(text, encoding="utf-8")

    def close(self) -> None:
        """Close the document tables (also on abort, before the temporary directory is removed)."""
        for writer in self._documents.values():
            writer.close()
        self._documents = {}


class TokenSplit:
    """One split of a store. Zarr arrays open on first access, so a split can be pickled into loader workers."""

    def __init__(
        self, store_path: Path, name: str, num_sequences: int, seq_len: int, num_padding: int,
        files: dict[str, dict[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        self.store_path = Path(store_path)
        self.path = Path(store_path) / name
        self.documents_path = Path(store_path) / f"documents-{name}.arrow"
        self.name = name
        self.num_sequences = num_sequences
        self.seq_len = seq_len
        self.num_padding = num_padding
        self._files = files  # the manifest's `files`; None for a store written before checksums
        self._verified_chunks: set[int] = set()  # token chunks whose crc32c matched, checked once each
        self._arrays: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # never carry open Zarr handles across a pickle or fork
        return state

    def _open(self) -> dict[str, Any]:
        if self._arrays is None:
            group = zarr.open_group(self.path, mode="r")
            self._arrays = {
                "tokens": group["tokens"],
                "doc_starts": group["doc_starts"],
                "doc_start_offsets": group["doc_start_offsets"][:],  # (S + 1,) int64, small: kept in memory
            }
        return self._arrays

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Sequences `[start, stop)` as `(stop - start, seq_len)` int32."""
        if not 0 <= start <= stop <= self.num_sequences:
            raise IndexError(f"sequences [{start}, {stop}) out of range for split '{self.name}' of {self.num_sequences}")
        tokens = self._open()["tokens"]
        if self._files is not None and stop > start:
            for chunk in range(start // ROWS_PER_CHUNK, (stop - 1) // ROWS_PER_CHUNK + 1):
                if chunk not in self._verified_chunks:
                    self._verify_chunk(tokens, chunk)
                    self._verified_chunks.add(chunk)
        return tokens[start:stop]

    def _verify_chunk(self, tokens: Any, chunk: int) -> None:
        """Compare one `tokens` chunk file with its recorded crc32c (an unlisted chunk is all fill value, never stored)."""
        assert self._files is not None
        name = f"{self.name}/tokens/{tokens.metadata.encode_chunk_key((chunk, 0))}"
        first, last = chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, self.num_sequences) - 1
        what = f"chunk {name} (split '{self.name}' sequences {first}..{last})"
        recorded, path = self._files.get(name), self.store_path / name
        if recorded is None:
            if path.exists():
                raise damaged_store_error(self.store_path, f"{what} is not in the manifest")
        elif not path.is_file():
            raise damaged_store_error(self.store_path, f"{what} is missing")
        elif file_crc32c(path) != recorded["crc32c"]:
            raise damaged_store_error(self.store_path, f"{what} fails its checksum")

    def doc_starts(self, index: int) -> np.ndarray:
        """Positions in sequence `index` where a document begins, int32, ascending."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range for split '{self.name}' of {self.num_sequences}")
        arrays = self._open()
        lo, hi = arrays["doc_start_offsets"][index : index + 2]
        return arrays["doc_starts"][int(lo) : int(hi)]

    def documents(self) -> pa.Table:
        """The split's document index (columns of `DOCUMENTS_SCHEMA`)."""
        with pa.memory_map(str(self.documents_path)) as source:
            return pa.ipc.open_file(source).read_all()


class TokenStore:
    """A validated, complete token store."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["vocab_size"]
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_fingerprint: str = manifest["tokenizer_fingerprint"]
        self.eos_id: int | None = manifest["eos_id"]
        self.bos_id: int | None = manifest["bos_id"]
        self.pad_id: int | None = manifest["pad_id"]
        self.tokenizer_dir = self.path / "tokenizer"
        self.files: dict[str, dict[str, Any]] | None = manifest.get("files")  # None: written before checksums
        counts = manifest["splits"]
        self.splits: list[str] = [n for n in sorted(counts, key=lambda n: (n != "train", n)) if counts[n]["num_sequences"] > 0]

    @classmethod
    def open(cls, path: Path) -> "TokenStore":
        """Open and validate a store: format, schema version and that every listed array is complete."""
        path = Path(path)
        rebuild = "rebuild it with `kdpipe prepare-data`"
        if not path.is_dir():
            raise KdpipeError(f"token store {path} does not exist; create it with `kdpipe prepare-data ... --out {path}`")
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise KdpipeError(f"{path} is not a complete kdpipe token store (no manifest.json); {rebuild}")
        try:
            manifest = parse_json(manifest_path.read_text(encoding="utf-8"), manifest_path, rebuild)
        except UnicodeDecodeError:
            raise KdpipeError(f"{manifest_path} is not UTF-8 text; {rebuild}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise KdpipeError(f"{path} is not a kdpipe token store (manifest format is not '{FORMAT}')")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise KdpipeError(
                f"token store {path} has schema version {version}, this kdpipe reads {SCHEMA_VERSION}; {rebuild} or use the kdpipe that wrote it"
            )
        store = cls(path, manifest)
        if not (store.tokenizer_dir / "tokenizer_config.json").is_file():
            raise KdpipeError(f"token store {path} lacks its tokenizer/ copy; {rebuild}")
        for name, counts in manifest["splits"].items():
            store._check_split(name, counts["num_sequences"], rebuild)
        for name, recorded in (store.files or {}).items():
            problem = _size_problem(path / name, recorded["bytes"])
            if problem:
                raise damaged_store_error(path, f"file {name} {problem}")
        return store

    @property
    def checksum_note(self) -> str | None:
        """One line for a store written before checksums were recorded (None when they are)."""
        if self.files is not None:
            return None
        return (
            f"token store {self.path} records no checksums (written by an older kdpipe), so damage to it goes unnoticed; "
            "rebuild it with `kdpipe prepare-data ... --overwrite` to add them"
        )

    def _check_split(self, name: str, num_sequences: int, rebuild: str) -> None:
        try:
            group = zarr.open_group(self.path / name, mode="r")
            tokens_shape = group["tokens"].shape
            num_offsets = group["doc_start_offsets"].shape[0]
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise KdpipeError(f"token store {self.path}: split '{name}' is missing or unreadable ({err}); {rebuild}") from None
        if tokens_shape != (num_sequences, self.seq_len) or num_offsets != num_sequences + 1:
            raise KdpipeError(
                f"token store {self.path}: split '{name}' holds {tokens_shape} tokens, manifest says "
                f"({num_sequences}, {self.seq_len}); the store is incomplete or corrupt, {rebuild}"
            )
        if not (self.path / f"documents-{name}.arrow").is_file():
            raise KdpipeError(f"token store {self.path}: documents-{name}.arrow is missing; {rebuild}")

    def split(self, name: str) -> TokenSplit:
        """A split by name ("train" or "val"); the val split may hold 0 sequences."""
        counts = self.manifest["splits"].get(name)
        if counts is None:
            raise KdpipeError(f"token store {self.path} has no split '{name}' (it has: {', '.join(self.manifest['splits'])})")
        return TokenSplit(self.path, name, counts["num_sequences"], self.seq_len, counts["num_padding"], self.files)


def damaged_store_error(path: Path, what: str) -> KdpipeError:
    """The one-line error for a damaged file of the token store at `path`."""
    return KdpipeError(f"token store {path}: {what}; the store is damaged, rebuild it with `kdpipe prepare-data ... --out {path} --overwrite`")


def _data_files(root: Path) -> list[str]:
    """Every file of the split groups and document tables, relative to the store root, sorted (not the manifest, config or tokenizer)."""
    names = []
    for split in SPLIT_NAMES:
        names += [p.relative_to(root).as_posix() for p in (root / split).rglob("*") if p.is_file()]
        if (root / f"documents-{split}.arrow").is_file():
            names.append(f"documents-{split}.arrow")
    return sorted(names)


def _size_problem(path: Path, size: int) -> str | None:
    """Why a listed file cannot be what the writer wrote, judged by a stat alone, or None."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    return None if actual == size else f"holds {actual:,} bytes, the manifest records {size:,} (truncated or overwritten)"


class TokenStoreVerifyReport(NamedTuple):
    """What `verify_token_store` found: every recorded file matched (damage raises instead)."""

    path: Path
    num_files: int
    note: str | None  # set when the store records no checksums, so nothing could be checked

    @property
    def shards(self) -> list[Any]:
        return []  # a token store has no cache shards; read alike with a cache's VerifyReport

    @property
    def bad(self) -> list[Any]:
        return []

    def summary(self) -> str:
        """One line: what was checked."""
        if self.note:
            return self.note
        return f"token store {self.path}: {self.num_files} files ok (sizes and crc32c checksums)"


def verify_token_store(path: Path | str) -> TokenStoreVerifyReport:
    """Re-read every file the manifest lists and compare its crc32c; raise naming the first damaged or unexpected file."""
    store = TokenStore.open(Path(path))  # sizes of every listed file are checked here
    if store.files is None:
        return TokenStoreVerifyReport(store.path, 0, store.checksum_note)
    for name, recorded in store.files.items():
        if file_crc32c(store.path / name) != recorded["crc32c"]:
            raise damaged_store_error(store.path, f"file {name} fails its checksum")
    unexpected = sorted(set(_data_files(store.path)) - store.files.keys())
    if unexpected:
        raise damaged_store_error(store.path, f"file {unexpected[0]} is not in the manifest")
    return TokenStoreVerifyReport(store.path, len(store.files), None)


def is_token_store(path: Path | str) -> bool:
    """Whether `path` is a directory whose manifest says it is a token store (damaged or not)."""
    manifest_path = Path(path) / "manifest.json"
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
