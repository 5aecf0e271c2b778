"""The cache loader against a synthetic cache written with the real writer.

Every row's content is generated here first (tokens that name the row, random sparse
targets, bf16-exact snapshots), written with `ShardWriter`, and each batch the loader
yields is compared with those arrays, so order, coverage and decoding are all checked
against an independent reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from kdpipe.schemas.cache_format import (
    CacheManifest,
    EntryFormat,
    LayoutInfo,
    SamplerInfo,
    SnapshotInfo,
    TeacherInfo,
    TokenStoreInfo,
)
from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.losses import IGNORE_INDEX
from kdpipe.student_train.loader import StudentBatch, StudentLoader
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.packing import entry_layout
from kdpipe.teacher_cache.writer import EncodedBatch, ShardWriter, write_manifest

T, VOCAB, NUM_DRAWS, K, D = 6, 64, 8, 2, 4
SPLITS = {"train": 75, "val": 9}
SEQUENCES_PER_SHARD, SEQUENCES_PER_CHUNK = 32, 8  # train: shards of 32, 32, 11 rows → 4 + 4 + 2 = 10 units


class Row(NamedTuple):
    """What the cache holds for one sequence."""

    tokens: np.ndarray  # (T,)
    ids: list[np.ndarray]  # per position
    values: list[np.ndarray]  # per position: counts (rs-kd) or probabilities (top-k)
    ghost: np.ndarray | None  # (T,)
    snap_positions: np.ndarray  # (K,)
    snapshot: np.ndarray  # (K, D), bf16-exact


def _manifest(mode: str, *, seed: int, ghost: bool) -> CacheManifest:
    layout = entry_layout(mode, VOCAB, NUM_DRAWS)
    return CacheManifest(
        teacher=TeacherInfo(
            model_type="llama", config_hash="c0", weights_hash="w0", tokenizer_fingerprint="t0", vocab_size=VOCAB,
            num_layers=2, hidden_size=D, intermediate_size=8, path="/nowhere",
        ),
        token_store=TokenStoreInfo(fingerprint="store0", seq_len=T, splits=SPLITS),
        sampler=SamplerInfo(mode=mode, num_draws=NUM_DRAWS, temperature=1.0, top_k=5, top_p=0.95, ghost=ghost, seed=seed),
        snapshot=SnapshotInfo(layers=[1], fraction=0.3, positions_per_sequence=K, dtype="bf16", attention=False),
        layout=LayoutInfo(
            sequences_per_shard=SEQUENCES_PER_SHARD, sequences_per_chunk=SEQUENCES_PER_CHUNK,
            entry=EntryFormat(id_bits=layout.id_bits, value_bits=layout.value_bits, value_kind=layout.value_kind,
                              bytes_per_entry=layout.bytes_per_entry),
            count_dtype="uint8",
            shards={split: -(-n // SEQUENCES_PER_SHARD) for split, n in SPLITS.items()},
        ),
    )  # fmt: skip


def _make_rows(split: str, mode: str, ghost: bool) -> list[Row]:
    rng = np.random.default_rng(hash((split, mode)) % 2**32)
    rows = []
    for row in range(SPLITS[split]):
        tokens = rng.integers(0, VOCAB, size=T)
        tokens[:2] = (row % VOCAB, row // VOCAB)  # the first two tokens name the row
        ids, values = [], []
        for _ in range(T):
            k = int(rng.integers(1, 5))
            ids.append(rng.choice(VOCAB, size=k, replace=False))
            if mode == "rs-kd":
                values.append(rng.multinomial(NUM_DRAWS - k, np.ones(k) / k) + 1)
            else:
                values.append(np.float16(rng.uniform(0.05, 0.2, size=k)).astype(np.float32))  # float16-exact
        g = np.float16(rng.uniform(0, 0.3, size=T)).astype(np.float32) if ghost else None
        snapshot = torch.randn(K, D, generator=torch.Generator().manual_seed(row)).bfloat16().float().numpy()
        rows.append(Row(tokens, ids, values, g, np.sort(rng.choice(T, size=K, replace=False)), snapshot))
    return rows


def _encode(rows: list[Row]) -> EncodedBatch:
    counts = np.array([[len(i) for i in r.ids] for r in rows], dtype=np.uint8)
    values = np.concatenate([v for r in rows for v in r.values])
    return EncodedBatch(
        tokens=np.stack([r.tokens for r in rows]).astype(np.int32),
        num_entries=counts,
        entry_ids=np.concatenate([i for r in rows for i in r.ids]).astype(np.int64),
        entry_values=values.astype(np.int32 if values.dtype.kind == "i" else np.float32),
        ghost=None if rows[0].ghost is None else np.stack([r.ghost for r in rows]).astype(np.float16),
        covered_mass_sum=0.0,
        snap_positions=np.stack([r.snap_positions for r in rows]).astype(np.int32),
        snapshots={1: {term: torch.from_numpy(np.stack([r.snapshot * s for r in rows])).bfloat16().view(torch.int16)
                       .numpy().view(np.uint16) for term, s in (("ffn_in", 1.0), ("ffn_out", -2.0))}},
        snapshot_scales={},
    )  # fmt: skip


def _write_cache(path: Path, mode: str = "rs-kd", *, seed: int = 0, ghost: bool = False, skip_shard: int | None = None):
    manifest = _manifest(mode, seed=seed, ghost=ghost)
    write_manifest(path, manifest)
    rows = {split: _make_rows(split, mode, ghost) for split in SPLITS}
    for split, index in manifest.global_shards():
        if (split, index) == ("train", skip_shard):
            continue
        start, stop = manifest.shard_rows(split, index)
        writer = ShardWriter(path, manifest, split, index, start, stop)
        for batch_start in range(start, stop, 5):  # batches unaligned with chunks on purpose
            writer.append(_encode(rows[split][batch_start : min(batch_start + 5, stop)]))
        assert writer.finalize()
    return rows


@pytest.fixture(scope="module")
def cache_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    return path, _write_cache(path)


def _row_id(tokens: torch.Tensor) -> int:
    return int(tokens[0]) + VOCAB * int(tokens[1])


def _take(loader: StudentLoader, count: int) -> list[StudentBatch]:
    return [batch for _, batch in zip(range(count), loader)]  # range first: no batch is drawn and dropped


def _assert_batches_equal(a: list[StudentBatch], b: list[StudentBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.step, x.epoch) == (y.step, y.epoch)
        for name in ("input_ids", "labels", "snap_positions"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        for tx, ty in zip(x.targets, y.targets):
            assert (tx is None and ty is None) or torch.equal(tx, ty)
        for layer in x.snapshots:
            for term in x.snapshots[layer]:
                assert torch.equal(x.snapshots[layer][term], y.snapshots[layer][term])


def test_batches_hold_exactly_the_cached_rows(cache_rows):
    path, rows = cache_rows
    loader = StudentLoader(open_cache(path), split="train", batch_size=5, seed=3)
    assert loader.tokens_per_batch == 5 * T
    for batch in _take(loader, loader.batches_per_epoch + 2):
        B = batch.input_ids.shape[0]
        assert batch.input_ids.dtype == batch.labels.dtype == torch.int64 and batch.input_ids.shape == (5, T)
        assert batch.targets.offsets.shape == (B * T + 1,) and batch.targets.ghost is None
        for i in range(B):
            row = rows["train"][_row_id(batch.input_ids[i])]
            assert batch.input_ids[i].tolist() == row.tokens.tolist()
            assert batch.labels[i].tolist() == row.tokens[1:].tolist() + [IGNORE_INDEX]
            for t in range(T):
                p = i * T + t
                lo, hi = batch.targets.offsets[p], batch.targets.offsets[p + 1]
                assert batch.targets.ids[lo:hi].tolist() == row.ids[t].tolist()
                np.testing.assert_allclose(batch.targets.weights[lo:hi].numpy(), row.values[t] / NUM_DRAWS, rtol=1e-7)
            assert batch.snap_positions[i].tolist() == row.snap_positions.tolist()
            assert torch.equal(batch.snapshots[1]["ffn_in"][i], torch.from_numpy(row.snapshot))
            assert torch.equal(batch.snapshots[1]["ffn_out"][i], torch.from_numpy(row.snapshot * -2.0))


def test_ghost_of_top_k_caches_is_flattened_per_position(tmp_path):
    rows = _write_cache(tmp_path, "top-p-k", ghost=True)
    (batch,) = _take(StudentLoader(open_cache(tmp_path), split="val", batch_size=4, seed=0), 1)
    assert batch.targets.ghost.shape == (4 * T,)
    for i in range(4):
        row = rows["val"][_row_id(batch.input_ids[i])]
        assert batch.targets.ghost[i * T : (i + 1) * T].tolist() == row.ghost.tolist()
        lo, hi = batch.targets.offsets[i * T], batch.targets.offsets[i * T + 1]
        assert batch.targets.weights[lo:hi].tolist() == row.values[0].tolist()


def test_two_ranks_cover_every_row_once_per_epoch_except_the_remainder(cache_rows):
    path, _ = cache_rows
    cache = open_cache(path)
    B, world = 4, 2
    # 10 units of 8, 8, 8, 8 | 8, 8, 8, 8 | 8, 3 rows: each rank gets 5 units; the 5 smallest hold 35 rows.
    seen = []
    for rank in range(world):
        loader = StudentLoader(cache, split="train", batch_size=B, seed=11, rank=rank, world_size=world)
        assert loader.batches_per_epoch == 35 // B
        batches = _take(loader, loader.batches_per_epoch)
        assert {b.epoch for b in batches} == {0}
        seen += [_row_id(ids) for b in batches for ids in b.input_ids]
    assert len(seen) == len(set(seen)) == world * 8 * B  # no row twice, across ranks too
    assert set(seen) <= set(range(SPLITS["train"]))

    # One rank, batch 5: everything but the last partial batch (75 = 15 · 5) is seen.
    loader = StudentLoader(cache, split="train", batch_size=5, seed=11)
    assert loader.batches_per_epoch == 15
    rows = [_row_id(ids) for b in _take(loader, 15) for ids in b.input_ids]
    assert sorted(rows) == list(range(SPLITS["train"]))


def test_order_is_a_function_of_seed_and_epoch(cache_rows):
    path, _ = cache_rows
    cache = open_cache(path)

    def order(seed: int) -> list[list[int]]:
        loader = StudentLoader(cache, split="train", batch_size=15, seed=seed)
        batches = _take(loader, 2 * loader.batches_per_epoch)
        ids = [_row_id(ids) for b in batches for ids in b.input_ids]
        return [ids[:75], ids[75:]]

    first = order(1)
    assert first == order(1)
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]  # epoch 1 re-permutes
    assert order(2)[0] != first[0]


def test_resume_from_state_yields_the_same_batches(cache_rows):
    path, _ = cache_rows
    cache = open_cache(path)
    options = dict(split="train", batch_size=4, seed=5, rank=1, world_size=2)
    uninterrupted = _take(StudentLoader(cache, **options), 20)  # 8 batches per epoch: crosses two epoch boundaries

    first = StudentLoader(cache, **options)
    assert [b.step for b in _take(first, 7)] == list(range(7))
    state = first.state_dict()
    assert state["step"] == 7 and state["rank"] == 1
    resumed = StudentLoader(cache, **options)
    resumed.load_state_dict(state)
    _assert_batches_equal(_take(resumed, 13), uninterrupted[7:])
    assert resumed.state_dict()["step"] == 20 and resumed.epoch == 2


def test_worker_processes_yield_the_same_batches(cache_rows):
    path, _ = cache_rows
    cache = open_cache(path)
    options = dict(split="train", batch_size=6, seed=9)
    serial = _take(StudentLoader(cache, **options), 16)
    parallel = StudentLoader(cache, **options, num_workers=2, prefetch_factor=2, persistent_workers=True)
    head = _take(parallel, 5)
    tail = _take(parallel, 11)  # re-iterating (persistent workers) continues at step 5
    _assert_batches_equal(head + tail, serial)


def test_resume_refuses_another_cache_or_layout(cache_rows, tmp_path):
    path, _ = cache_rows
    state = StudentLoader(open_cache(path), split="train", batch_size=4, seed=1).state_dict()
    _write_cache(tmp_path, seed=123)  # same shapes, another sampler seed: another fingerprint
    other = StudentLoader(open_cache(tmp_path), split="train", batch_size=4, seed=1)
    with pytest.raises(KdpipeError, match="run was started on cache with fingerprint .*resume with the original cache"):
        other.load_state_dict(state)
    for key, value in (("batch_size", 2), ("world_size", 2), ("seed", 2)):
        with pytest.raises(KdpipeError, match=f"loader {key}"):
            StudentLoader(open_cache(path), split="train", batch_size=4, seed=1).load_state_dict({**state, key: value})


def test_refuses_missing_split_missing_shards_and_too_little_data(cache_rows, tmp_path):
    path, _ = cache_rows
    with pytest.raises(KdpipeError, match="has no split 'test'"):
        StudentLoader(open_cache(path), split="test", batch_size=4, seed=0)
    with pytest.raises(KdpipeError, match="too few for 2 rank"):
        StudentLoader(open_cache(path), split="val", batch_size=4, seed=0, world_size=2, rank=1)
    _write_cache(tmp_path, skip_shard=1)
    with pytest.raises(KdpipeError, match=r"incomplete: 1 of 4 shards missing \(train/00001\)"):
        StudentLoader(open_cache(tmp_path), split="train", batch_size=4, seed=0)


def test_batches_own_their_memory(cache_rows):
    """Batches smaller than a chunk are sliced from one cached read; changing a batch in place
    must not change what the loader yields when it needs those rows again."""
    path, _ = cache_rows
    dataset = StudentLoader(open_cache(path), split="train", batch_size=2, seed=4).dataset
    want = StudentLoader(open_cache(path), split="train", batch_size=2, seed=4).dataset[1]
    for step in (1, 0, 1):  # the unit stays cached across these reads
        batch = dataset[step]
        for tensor in (batch.input_ids, batch.targets.ids, batch.targets.weights, batch.snapshots[1]["ffn_in"]):
            tensor.zero_()
    again = dataset[1]
    assert torch.equal(again.input_ids, want.input_ids)
    assert torch.equal(again.targets.ids, want.targets.ids)
    assert torch.equal(again.targets.weights, want.targets.weights)
    assert torch.equal(again.snapshots[1]["ffn_in"], want.snapshots[1]["ffn_in"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, num_workers):
    _write_cache(tmp_path)
    for chunk in (tmp_path / "shards" / "train").glob("*/tokens/c/**/*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a zstd frame")
    loader = StudentLoader(open_cache(tmp_path), split="train", batch_size=4, seed=0, num_workers=num_workers)
    with pytest.raises(KdpipeError, match=r"cache shard .*train/0000\d is damaged") as err:
        _take(loader, 1)
    assert "\n" not in str(err.value)
