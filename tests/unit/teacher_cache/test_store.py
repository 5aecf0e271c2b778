"""Teacher-cache store: writer → reader round trips, determinism, atomic completion, damage.

No teacher runs here: shards are written from synthetic but valid encoded batches (unique
ascending ids per position, rs-kd counts summing to N, top-k probabilities), and the reader's
output is compared with those inputs.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_format import (
    CacheManifest, EntryFormat, LayoutInfo, SamplerInfo, SnapshotInfo, TeacherInfo, TokenStoreInfo,
)  # fmt: skip
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache import open_cache, verify_cache
from kdpipe.teacher_cache.packing import count_dtype, entry_layout
from kdpipe.teacher_cache.snapshots import decode_bf16, decode_fp8, encode_bf16, encode_fp8
from kdpipe.teacher_cache.writer import (
    BackgroundShardWriter, EncodedBatch, ShardWriter, fixed_point_mass_sum, write_manifest,
)  # fmt: skip

VOCAB, HIDDEN, SEQ_LEN, K = 300, 8, 16, 3


def make_manifest(
    *, mode: str = "rs-kd", ghost: bool = False, layers: tuple[int, ...] = (1,), snap_dtype: str = "bf16",
    attention: bool = False, ffn_output: bool = True, splits: dict[str, int] | None = None, seed: int = 0,
    teacher_path: str = "/teacher",
) -> CacheManifest:  # fmt: skip
    splits = splits or {"train": 20, "val": 5}
    num_draws, top_k, sps = 50, 6, 8
    layout = entry_layout(mode, VOCAB, num_draws)
    return CacheManifest(
        teacher=TeacherInfo(
            model_type="llama", config_hash="c", weights_hash="w", tokenizer_fingerprint="t", vocab_size=VOCAB,
            num_layers=2, hidden_size=HIDDEN, intermediate_size=16, path=teacher_path,
        ),  # fmt: skip
        token_store=TokenStoreInfo(fingerprint="store", seq_len=SEQ_LEN, splits=splits),
        sampler=SamplerInfo(mode=mode, num_draws=num_draws, temperature=1.0, top_k=top_k, top_p=0.9, ghost=ghost, seed=seed),
        snapshot=SnapshotInfo(layers=list(layers), fraction=K / SEQ_LEN, positions_per_sequence=K, dtype=snap_dtype, attention=attention,
                              ffn_output=ffn_output),
        layout=LayoutInfo(
            sequences_per_shard=sps, sequences_per_chunk=4,
            entry=EntryFormat(id_bits=layout.id_bits, value_bits=layout.value_bits, value_kind=layout.value_kind, bytes_per_entry=layout.bytes_per_entry),
            count_dtype=str(count_dtype(num_draws if mode == "rs-kd" else top_k)),
            shards={name: math.ceil(n / sps) for name, n in splits.items()},
        ),  # fmt: skip
    )


class ShardContent(NamedTuple):
    """The inputs of one shard, with the float snapshots before encoding."""

    tokens: np.ndarray  # (n, T) int32
    num_entries: np.ndarray  # (n, T)
    ids: np.ndarray  # (E,) int64
    values: np.ndarray  # (E,) int32 counts | float32 probs
    ghost: np.ndarray | None  # (n, T) float16
    mass: np.ndarray  # (n, T) float32
    snap_positions: np.ndarray | None  # (n, K) int32
    snap_floats: dict[int, dict[str, np.ndarray]]  # (n, K, d) float32
    snap_bits: dict[int, dict[str, np.ndarray]]
    snap_scales: dict[int, dict[str, np.ndarray]]


def make_content(manifest: CacheManifest, n: int, rng: np.random.Generator) -> ShardContent:
    """Random valid shard content: skewed teacher-like draws, so positions hold 1..N unique ids."""
    m, T = manifest, SEQ_LEN
    num_entries = np.zeros((n, T), dtype=np.dtype(m.layout.count_dtype))
    ids, values = [], []
    for flat in range(n * T):
        if m.sampler.mode == "rs-kd":
            draws = np.minimum(rng.geometric(rng.uniform(0.05, 0.9), m.sampler.num_draws) * 7, VOCAB - 1)
            unique, counts = np.unique(draws, return_counts=True)
            values.append(counts.astype(np.int32))
        else:
            unique = np.sort(rng.choice(VOCAB, size=rng.integers(1, m.sampler.top_k + 1), replace=False))
            values.append((rng.dirichlet(np.ones(unique.size)) * rng.uniform(0.5, 1.0)).astype(np.float32))
        ids.append(unique.astype(np.int64))
        num_entries.flat[flat] = unique.size
    ghost = rng.uniform(0, 0.5, (n, T)).astype(np.float16) if m.sampler.ghost and m.sampler.mode != "rs-kd" else None
    snap_positions = None
    snap_floats: dict[int, dict[str, np.ndarray]] = {}
    snap_bits: dict[int, dict[str, np.ndarray]] = {}
    snap_scales: dict[int, dict[str, np.ndarray]] = {}
    if m.snapshot.layers:
        snap_positions = np.sort(np.stack([rng.choice(T, K, replace=False) for _ in range(n)]), axis=1).astype(np.int32)
        for layer in m.snapshot.layers:
            snap_floats[layer], snap_bits[layer] = {}, {}
            for term in m.snapshot.terms:
                x = rng.standard_normal((n, K, HIDDEN)).astype(np.float32) * rng.uniform(0.1, 10.0)
                snap_floats[layer][term] = x
                if m.snapshot.dtype == "bf16":
                    snap_bits[layer][term] = encode_bf16(torch.from_numpy(x))
                else:
                    snap_bits[layer][term], scale = encode_fp8(torch.from_numpy(x))
                    snap_scales.setdefault(layer, {})[term] = scale
    return ShardContent(
        tokens=rng.integers(0, VOCAB, (n, T)).astype(np.int32), num_entries=num_entries,
        ids=np.concatenate(ids), values=np.concatenate(values), ghost=ghost,
        mass=rng.uniform(0.2, 1.0, (n, T)).astype(np.float32), snap_positions=snap_positions,
        snap_floats=snap_floats, snap_bits=snap_bits, snap_scales=snap_scales,
    )  # fmt: skip


def batch_of(content: ShardContent, start: int, stop: int) -> EncodedBatch:
    """Rows [start, stop) of a shard's content as the writer receives them."""
    offsets = np.concatenate([[0], np.cumsum(content.num_entries.sum(axis=1, dtype=np.int64))])
    first, last = offsets[start], offsets[stop]

    def rows(arrays: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
        return {layer: {term: a[start:stop] for term, a in terms.items()} for layer, terms in arrays.items()}

    return EncodedBatch(
        tokens=content.tokens[start:stop], num_entries=content.num_entries[start:stop],
        entry_ids=content.ids[first:last], entry_values=content.values[first:last],
        ghost=None if content.ghost is None else content.ghost[start:stop],
        covered_mass_sum=fixed_point_mass_sum(content.mass[start:stop]),
        snap_positions=None if content.snap_positions is None else content.snap_positions[start:stop],
        snapshots=rows(content.snap_bits), snapshot_scales=rows(content.snap_scales),
    )  # fmt: skip


def write_shard(cache_dir: Path, m: CacheManifest, split: str, index: int, content: ShardContent,
                batch_size: int, writer_cls: type = ShardWriter) -> bool:  # fmt: skip
    start, stop = m.shard_rows(split, index)
    writer = writer_cls(cache_dir, m, split, index, start, stop)
    for row in range(0, stop - start, batch_size):
        writer.append(batch_of(content, row, min(row + batch_size, stop - start)))
    return writer.finalize()


def write_cache(cache_dir: Path, m: CacheManifest, seed: int = 0, batch_size: int = 3) -> dict[tuple[str, int], ShardContent]:
    """A complete cache; returns the content of every shard."""
    write_manifest(cache_dir, m)
    rng = np.random.default_rng(seed)
    contents = {}
    for split, index in m.global_shards():
        start, stop = m.shard_rows(split, index)
        contents[split, index] = make_content(m, stop - start, rng)
        assert write_shard(cache_dir, m, split, index, contents[split, index], batch_size)
    return contents


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_batch_equals(batch, content: ShardContent, m: CacheManifest, start: int, stop: int) -> None:
    """Reader output of rows [start, stop) against the writer's inputs."""
    expected = batch_of(content, start, stop)
    np.testing.assert_array_equal(batch.tokens, expected.tokens)
    np.testing.assert_array_equal(batch.target_ids, expected.entry_ids)
    counts = expected.num_entries.reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(batch.target_offsets, np.concatenate([[0], np.cumsum(counts)]))
    if m.sampler.mode == "rs-kd":
        np.testing.assert_array_equal(batch.target_weights, (expected.entry_values / np.float32(50)).astype(np.float32))
        per_position = np.add.reduceat(batch.target_weights.astype(np.float64), batch.target_offsets[:-1])
        np.testing.assert_allclose(per_position, 1.0, atol=1e-6)
    else:  # probabilities are stored as float16
        np.testing.assert_array_equal(batch.target_weights, expected.entry_values.astype(np.float16).astype(np.float32))
    if expected.ghost is None:
        assert batch.ghost is None
    else:
        np.testing.assert_array_equal(batch.ghost, expected.ghost.astype(np.float32))
    np.testing.assert_array_equal(batch.snap_positions, expected.snap_positions)
    assert batch.snapshots.keys() == content.snap_floats.keys()
    for layer, terms in batch.snapshots.items():
        assert terms.keys() == set(m.snapshot.terms)
        for term, got in terms.items():
            x = content.snap_floats[layer][term][start:stop]
            bits = expected.snapshots[layer][term]
            if m.snapshot.dtype == "bf16":
                np.testing.assert_array_equal(got, decode_bf16(bits).numpy())
                assert np.all(np.abs(got - x) <= 2.0**-8 * np.abs(x))
            else:
                scale = expected.snapshot_scales[layer][term]
                np.testing.assert_array_equal(got, decode_fp8(bits, scale).numpy())
                assert np.all(np.abs(got - x) <= 2.0**-4 * np.abs(x) + 2.0**-10 * scale[..., None] + 1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="rs-kd", snap_dtype="bf16"),
        dict(mode="top-p-k", ghost=True, snap_dtype="fp8", attention=True, layers=(0, 1)),
        dict(mode="top-k", ghost=False, layers=()),
        dict(mode="rs-kd", snap_dtype="bf16", ffn_output=False, layers=(0, 1)),
        dict(mode="rs-kd", snap_dtype="fp8", ffn_output=False, attention=True),
    ],
    ids=["rs-kd-bf16", "top-p-k-ghost-fp8-attn", "top-k-no-snapshots", "rs-kd-ffn-input-only", "fp8-no-ffn-output-attn"],
)
def test_round_trip(tmp_path, options):
    m = make_manifest(**options)
    contents = write_cache(tmp_path, m)
    cache = open_cache(tmp_path)
    cache.require_complete()
    assert cache.missing_shards() == []
    assert [s.row_stop for s in cache.shards("train")] == [8, 16, 20]
    for (split, index), content in contents.items():
        shard = cache.open_shard(split, index)
        assert_batch_equals(shard.read(0, shard.num_sequences), content, m, 0, shard.num_sequences)
        for chunk in range(shard.num_chunks):  # the loader's unit
            start, stop = shard.chunk_rows(chunk)
            assert_batch_equals(shard.read(start, stop), content, m, start, stop)
    leftovers = [p for p in (tmp_path / cf.SHARDS_DIR).rglob("*") if p.name.startswith(cf.TMP_PREFIX)]
    assert leftovers == [] and sorted(p.name for p in (tmp_path / "shards" / "train").iterdir()) == ["00000", "00001", "00002"]


def test_bytes_do_not_depend_on_batch_size(tmp_path, monkeypatch):
    monkeypatch.setattr(cf, "ENTRY_CHUNK_BYTES", 100)  # several entry chunks, batch edges inside them
    m = make_manifest(mode="rs-kd", snap_dtype="fp8")
    content = make_content(m, 8, np.random.default_rng(1))
    written = []
    for batch_size, writer_cls in [(1, ShardWriter), (7, ShardWriter), (3, BackgroundShardWriter)]:
        cache_dir = tmp_path / f"b{batch_size}"
        assert write_shard(cache_dir, m, "train", 0, content, batch_size, writer_cls)
        written.append(shard_files(cf.shard_dir(cache_dir, "train", 0)))
    assert len([name for name in written[0] if name.startswith("entries/c/")]) > 3
    assert written[0] == written[1] == written[2]


def test_two_writers_of_one_shard_exactly_one_wins(tmp_path):
    m = make_manifest()
    content = make_content(m, 8, np.random.default_rng(2))
    first, second = (ShardWriter(tmp_path, m, "train", 0, 0, 8) for _ in range(2))
    assert first.tmp_dir != second.tmp_dir
    for row in range(0, 8, 2):  # interleaved, as two Slurm tasks would
        first.append(batch_of(content, row, row + 2))
        second.append(batch_of(content, row, row + 2))
    assert [first.finalize(), second.finalize()] == [True, False]
    assert not first.tmp_dir.exists() and not second.tmp_dir.exists()
    write_manifest(tmp_path, m)
    assert [v.status for v in verify_cache(tmp_path).shards] == ["ok", "missing", "missing", "missing"]
    shard = open_cache(tmp_path).open_shard("train", 0)
    assert_batch_equals(shard.read(0, 8), content, m, 0, 8)


def test_interrupted_shard_is_ignored_then_redone(tmp_path):
    m = make_manifest(splits={"train": 8})
    write_manifest(tmp_path, m)
    content = make_content(m, 8, np.random.default_rng(3))
    crashed = ShardWriter(tmp_path, m, "train", 0, 0, 8)
    crashed.append(batch_of(content, 0, 5))  # killed here: tmp dir stays
    cache = open_cache(tmp_path)
    assert cache.missing_shards() == [("train", 0)]
    with pytest.raises(KdpipeError, match=r"shards/train/00000 is not complete"):
        cache.open_shard("train", 0)
    with pytest.raises(KdpipeError, match=r"1 of 1 shards missing \(train/00000\)"):
        cache.require_complete()
    assert write_shard(tmp_path, m, "train", 0, content, 4)
    assert_batch_equals(open_cache(tmp_path).open_shard("train", 0).read(0, 8), content, m, 0, 8)


def test_background_writer_reraises_and_leaves_no_shard(tmp_path):
    m = make_manifest(splits={"train": 8})
    content = make_content(m, 8, np.random.default_rng(4))
    bad = batch_of(content, 0, 1)
    bad = bad._replace(entry_ids=bad.entry_ids + VOCAB * 4)  # ids beyond the packed width: the writer thread fails

    at_finalize = BackgroundShardWriter(tmp_path, m, "train", 0, 0, 8)
    at_finalize.append(bad)
    with pytest.raises(ValueError, match="token ids must lie in"):
        at_finalize.finalize()
    at_next_append = BackgroundShardWriter(tmp_path, m, "train", 0, 0, 8, max_pending_batches=1)
    at_next_append.append(bad)
    with pytest.raises(ValueError, match="token ids must lie in"):
        for row in range(1, 8):  # raised once the thread has met the bad batch, before the shard is full
            at_next_append.append(batch_of(content, row, row + 1))
    for writer in (at_finalize, at_next_append):
        assert not writer.tmp_dir.exists()
    assert list(cf.shards_root(tmp_path, "train").iterdir()) == []


def test_damaged_shards_are_named_by_the_reader(tmp_path):
    m = make_manifest(mode="top-p-k", ghost=True)
    write_cache(tmp_path, m)
    directory = cf.shard_dir(tmp_path, "train", 1)
    name = str(directory)
    cache = open_cache(tmp_path)

    def read_fails(match: str) -> None:
        with pytest.raises(KdpipeError, match=match) as info:
            cache.open_shard("train", 1).read(0, 8)
        assert name in str(info.value) and "kdpipe verify" in str(info.value)

    chunk = directory / "entries" / "c" / "0" / "0"
    original = chunk.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x04
    chunk.write_bytes(bytes(flipped))
    read_fails("Zstd decompression error")
    chunk.write_bytes(original[: len(original) // 2])
    read_fails("Zstd decompression error")
    chunk.unlink()
    read_fails("file entries/c/0/0 is missing")
    chunk.write_bytes(original)
    cache.open_shard("train", 1).read(0, 8)  # repaired by hand: readable again

    record_path = directory / cf.COMPLETE_FILE
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "num_entries": record["num_entries"] + 1}))
    read_fails(r"array entries is uint8\(\d+, \d+\), complete.json implies")
    record_path.unlink()
    assert open_cache(tmp_path).missing_shards() == [("train", 1)]
    assert open_cache(tmp_path).shards("train")[1].complete is False


def test_shard_damaged_after_completion_is_replaced_by_a_new_writer(tmp_path):
    m = make_manifest(splits={"train": 8})
    contents = write_cache(tmp_path, m)
    (cf.shard_dir(tmp_path, "train", 0) / cf.COMPLETE_FILE).unlink()
    assert write_shard(tmp_path, m, "train", 0, contents["train", 0], 8)
    assert_batch_equals(open_cache(tmp_path).open_shard("train", 0).read(0, 8), contents["train", 0], m, 0, 8)


def test_shard_reopens_lazily_after_pickle_and_fork(tmp_path):
    m = make_manifest(splits={"train": 8})
    contents = write_cache(tmp_path, m)
    shard = open_cache(tmp_path).open_shard("train", 0)
    expected = shard.read(0, 4).target_ids  # zarr is now open in this process
    clone = pickle.loads(pickle.dumps(shard))
    assert clone._open is None
    np.testing.assert_array_equal(clone.read(0, 4).target_ids, expected)
    # A forked loader worker inherits the parent's open zarr objects (no pickling) and must reopen.
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=lambda: send.send((shard.read(0, 4).target_ids, shard._opened_in_pid == os.getpid())))
    assert shard._open is not None
    worker.start()
    ids, reopened = receive.recv()
    worker.join()
    assert reopened and worker.exitcode == 0
    np.testing.assert_array_equal(ids, expected)
    assert expected.size == contents["train", 0].num_entries[:4].sum()


def test_manifest_is_written_once_and_another_config_is_refused(tmp_path):
    m = make_manifest()
    write_manifest(tmp_path, m)
    first = (tmp_path / cf.MANIFEST_FILE).read_bytes()
    write_manifest(tmp_path, make_manifest(teacher_path="/moved/teacher"))  # informational field only
    assert (tmp_path / cf.MANIFEST_FILE).read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == [cf.MANIFEST_FILE]
    with pytest.raises(KdpipeError, match=r"holds a cache of another teacher/config \(sampler differ\); use --out elsewhere or --overwrite"):
        write_manifest(tmp_path, make_manifest(seed=1))
    assert CacheManifest.from_json(first.decode(), "m") == m


def test_reader_refuses_bad_manifests(tmp_path):
    with pytest.raises(KdpipeError, match="is not a teacher cache"):
        open_cache(tmp_path)
    write_manifest(tmp_path, make_manifest())
    path = tmp_path / cf.MANIFEST_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 3}))
    with pytest.raises(KdpipeError, match="cache schema version 3, this kdpipe reads 1, 2"):
        open_cache(tmp_path)
    path.write_text(json.dumps({**data, "sampler": {**data["sampler"], "seed": 7}}))
    with pytest.raises(KdpipeError, match="modified after it was written"):
        open_cache(tmp_path)
    path.write_text(json.dumps({**data, "format": "other"}))
    with pytest.raises(KdpipeError, match="not a kdpipe teacher-cache manifest"):
        open_cache(tmp_path)
    path.write_text(json.dumps(data))
    assert open_cache(tmp_path).manifest == make_manifest()


def test_ffn_output_flag_is_in_the_fingerprint_only_when_false(tmp_path):
    """Manifests written before `snapshot.ffn_output` existed stored the output and keep their fingerprint."""
    with_output, input_only = make_manifest(), make_manifest(ffn_output=False)
    assert with_output.snapshot.terms == ("ffn_in", "ffn_out") and input_only.snapshot.terms == ("ffn_in",)
    assert make_manifest(attention=True, ffn_output=False).snapshot.terms == ("ffn_in", "attn_in", "attn_out")
    assert with_output.fingerprint != input_only.fingerprint
    data = json.loads(with_output.to_json())
    del data["snapshot"]["ffn_output"]  # what an older kdpipe wrote, fingerprint included
    assert CacheManifest.from_json(json.dumps(data), "old").snapshot.terms == ("ffn_in", "ffn_out")
    data = json.loads(input_only.to_json())
    data["snapshot"]["ffn_output"] = True  # a reader would look for arrays that are not there
    with pytest.raises(KdpipeError, match="modified after it was written"):
        CacheManifest.from_json(json.dumps(data), "m")
