"""The teacher cache's on-disk contract: manifest, completion record, layout and paths.

A cache is `CACHE/manifest.json` (what was cached and how: `CacheManifest`) plus one Zarr v3
group per shard under `CACHE/shards/{split}/{index:05d}/`. A shard is written under
`shards/{split}/.tmp-{index:05d}-{pid}-{rand}/` and renamed into place once its completion
record `complete.json` (`ShardRecord`: row range, entry counts, crc32c of every file) is
written, so a shard directory under its final name is always whole. Writer, reader, verify
and the run loop all take names and paths from here so that they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Literal

from kdpipe.schemas.config import from_dict, to_dict
from kdpipe.schemas.errors import KdpipeError, parse_json

FORMAT_NAME = "kdpipe.teacher_cache"
# Schema 2 (this writer): `entries` is (E, bytes_per_entry) uint8, stored byte-plane-major per
# chunk, with ids delta-coded within each position (see kdpipe.teacher_cache.packing).
# Schema 1: `entries` is a flat (E * bytes_per_entry,) uint8 array of records holding the ids
# themselves; still read.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
SHARDS_DIR = "shards"
COMPLETE_FILE = "complete.json"
TMP_PREFIX = ".tmp-"

# RNG stream of each split (the Philox key's second word); also the global shard order.
SPLIT_STREAMS: dict[str, int] = {"train": 0, "val": 1}

# Shard group arrays (see the module docstring of kdpipe.teacher_cache.writer for shapes).
TOKENS = "tokens"
NUM_ENTRIES = "num_entries"
SEQ_ENTRY_OFFSETS = "seq_entry_offsets"
ENTRIES = "entries"
GHOST = "ghost"
SNAP_POSITIONS = "snap_positions"
SNAP_GROUP = "snap"
SCALE_SUFFIX = "_scale"
# Zarr has no bf16/fp8 dtype: raw-bit arrays carry their logical dtype in this attribute.
LOGICAL_DTYPE_ATTR = "logical_dtype"
LOGICAL_DTYPES = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
# The `entries` array is chunked at about 1 MiB: large enough for zstd to work
# well, small enough that a (shard, chunk of sequences) read touches only a few chunks.
ENTRY_CHUNK_BYTES = 1 << 20

_TMP_NAME = re.compile(r"^\.tmp-(\d{5})-\d+-[0-9a-f]+$")
_SHARD_NAME = re.compile(r"^\d{5}$")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TeacherInfo:
    """Identity of the teacher whose outputs are cached."""

    model_type: str
    config_hash: str
    weights_hash: str
    tokenizer_fingerprint: str
    vocab_size: int  # rows of the LM head: stored ids are < vocab_size
    num_layers: int
    hidden_size: int
    intermediate_size: int
    path: str  # informational: a moved teacher is the same teacher


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TokenStoreInfo:
    """The token store the sequences came from."""

    fingerprint: str
    seq_len: int
    splits: dict[str, int]  # split name -> number of sequences


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SamplerInfo:
    """How sparse targets were drawn (see kdpipe.teacher_cache.sampling)."""

    mode: Literal["rs-kd", "top-k", "top-p-k"]
    num_draws: int
    temperature: float
    top_k: int
    top_p: float
    ghost: bool
    seed: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SnapshotInfo:
    """Which activations were snapshotted, where, and in which storage dtype."""

    layers: list[int]
    fraction: float
    positions_per_sequence: int  # K
    dtype: Literal["bf16", "fp8"]
    attention: bool
    ffn_output: bool = True
    """Whether the FFN output is stored next to the FFN input. Without it the trainer recomputes
    it from the FFN input and the frozen teacher weights. Manifests written before this field
    existed stored it; True is left out of the fingerprint so that they keep theirs."""

    @property
    def terms(self) -> tuple[str, ...]:
        """Snapshot terms stored per layer, in storage order."""
        ffn = ("ffn_in", "ffn_out") if self.ffn_output else ("ffn_in",)
        return (*ffn, "attn_in", "attn_out") if self.attention else ffn


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class EntryFormat:
    """Bit layout of one packed (id, value) record of the `entries` array (schema 2: the id field
    holds the gap to the previous id of the position; see kdpipe.teacher_cache.packing)."""

    id_bits: int
    value_bits: int
    value_kind: str
    bytes_per_entry: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LayoutInfo:
    """Shard geometry and array encodings."""

    sequences_per_shard: int
    sequences_per_chunk: int
    entry: EntryFormat
    count_dtype: Literal["uint8", "uint16"]
    shards: dict[str, int]  # split name -> number of shards


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CacheManifest:
    """`manifest.json`: everything that decides a cache's content, written once per cache."""

    teacher: TeacherInfo
    token_store: TokenStoreInfo
    sampler: SamplerInfo
    snapshot: SnapshotInfo
    layout: LayoutInfo
    producer: dict[str, str] = dataclasses.field(default_factory=dict)
    """Informational, outside the fingerprint: the backend that created the cache and package
    versions ({"backend": "vllm", "vllm": "0.32.0", ...}). Caches written before it existed have none."""
    format: str = FORMAT_NAME
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # A manifest is also read from disk: these checks are validation, not asserts (`python -O` keeps them).
        unknown = sorted(set(self.token_store.splits) - set(SPLIT_STREAMS))
        if unknown:
            raise ValueError(f"splits {unknown} have no RNG stream; known: {sorted(SPLIT_STREAMS)}")
        if self.layout.sequences_per_shard < 1 or self.layout.sequences_per_chunk < 1:
            raise ValueError("layout.sequences_per_shard and layout.sequences_per_chunk must be >= 1")
        for split, num_sequences in self.token_store.splits.items():
            expected = -(-num_sequences // self.layout.sequences_per_shard)
            if self.layout.shards.get(split) != expected:
                raise ValueError(f"layout.shards[{split!r}] must be {expected}")

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the content-deciding fields (not the teacher's path, nor the producer;
        `snapshot.ffn_output` only when False)."""
        data = to_dict(self)
        del data["teacher"]["path"]
        del data["producer"]
        if self.snapshot.ffn_output:  # the content of every cache written before the field existed
            del data["snapshot"]["ffn_output"]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        """Canonical text (sorted keys, no timestamps): every task writes the same bytes."""
        data = to_dict(self)
        data["fingerprint"] = self.fingerprint
        return json.dumps(data, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> CacheManifest:
        """Parse and validate `manifest.json` text; `where` names the file in errors."""
        data = parse_json(text, where, "the cache is damaged, rebuild it")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise KdpipeError(f"{where} is not a kdpipe teacher-cache manifest; point to a directory written by `kdpipe cache-teacher`")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
            raise KdpipeError(
                f"cache schema version {version}, this kdpipe reads {readable}; "
                "rebuild the cache with this kdpipe or read it with the kdpipe version that wrote it"
            )
        stored = data.pop("fingerprint", None)
        try:
            manifest = from_dict(cls, data, where=where)
        except ValueError as err:
            raise KdpipeError(f"{where} is inconsistent ({err}); the cache is damaged, rebuild it") from None
        if stored != manifest.fingerprint:
            raise KdpipeError(f"{where} was modified after it was written (fingerprint mismatch); restore it or rebuild the cache")
        return manifest

    def num_shards(self, split: str) -> int:
        """Shards of one split."""
        return self.layout.shards[split]

    def shard_rows(self, split: str, index: int) -> tuple[int, int]:
        """Row range [start, stop) of shard `index` within its split."""
        assert 0 <= index < self.layout.shards[split], f"shard {split}/{index} out of range"
        start = index * self.layout.sequences_per_shard
        return start, min(start + self.layout.sequences_per_shard, self.token_store.splits[split])

    def global_shards(self) -> list[tuple[str, int]]:
        """(split, index) of every shard in global order: all train shards, then all val shards."""
        splits = sorted(self.token_store.splits, key=SPLIT_STREAMS.__getitem__)
        return [(split, index) for split in splits for index in range(self.layout.shards[split])]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ShardRecord:
    """`complete.json`: written last inside the tmp dir, just before the rename."""

    split: str
    index: int
    row_start: int
    row_stop: int
    num_positions: int  # sequences x seq_len
    num_entries: int  # sparse entries in the shard (records in `entries`)
    covered_mass_sum: float  # sum over positions of the teacher mass of the stored ids
    files: dict[str, str]  # path relative to the shard dir -> crc32c of its bytes, 8 hex digits
    # path -> size in bytes, so a cheap scan (inspect, status) sees a truncated file without reading it;
    # None in records written before sizes were recorded (then only existence and non-emptiness are checked)
    sizes: dict[str, int] | None = None

    def to_json(self) -> str:
        """Canonical text (sorted keys): the same shard content gives the same bytes."""
        return json.dumps(to_dict(self), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardRecord:
        """Parse `complete.json` text; `where` names the file in errors."""
        data = parse_json(text, where, "run `kdpipe verify` and redo the shard")
        if not isinstance(data, dict):
            raise KdpipeError(f"{where} is not a shard completion record; run `kdpipe verify` and redo the shard")
        return from_dict(cls, data, where=where)


def shards_root(cache_dir: Path, split: str) -> Path:
    """Directory holding the shard groups (and tmp dirs) of one split."""
    return Path(cache_dir) / SHARDS_DIR / split


def shard_dir(cache_dir: Path, split: str, index: int) -> Path:
    """Final directory of a complete shard."""
    return shards_root(cache_dir, split) / f"{index:05d}"


def new_tmp_shard_dir(cache_dir: Path, split: str, index: int) -> Path:
    """A fresh, unique in-progress directory name for a shard (pid + random: no two writers share one)."""
    return shards_root(cache_dir, split) / f"{TMP_PREFIX}{index:05d}-{os.getpid()}-{secrets.token_hex(4)}"


def tmp_shard_index(name: str) -> int | None:
    """Shard index of an in-progress directory name, or None if `name` is not one."""
    match = _TMP_NAME.match(name)
    return int(match.group(1)) if match else None


def is_shard_name(name: str) -> bool:
    """Whether `name` is a final shard directory name (`{index:05d}`)."""
    return _SHARD_NAME.match(name) is not None


def entries_per_chunk(bytes_per_entry: int) -> int:
    """Records per chunk of a schema-2 `entries` array (about `ENTRY_CHUNK_BYTES` of records)."""
    return ENTRY_CHUNK_BYTES // bytes_per_entry


def snapshot_array(layer: int, term: str) -> str:
    """Path of a snapshot array inside a shard group."""
    return f"{SNAP_GROUP}/{layer}/{term}"


def snapshot_scale_array(layer: int, term: str) -> str:
    """Path of the per-vector fp8 scales of a snapshot array."""
    return f"{SNAP_GROUP}/{layer}/{term}{SCALE_SUFFIX}"
