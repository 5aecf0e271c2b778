"""Caches without stored FFN outputs: the LRC student recomputes the FFN-output clone target
from the cached FFN input and the frozen teacher weights, to the precision of the stored one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.lrc import LRCSpec, LRCStudent
from kdpipe.student_train.run import train_student
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.inspect import cache_stats
from kdpipe.teacher_cache.run import cache_teacher
from tests.unit.student_train.tiny_teachers import FAMILIES, teacher_snapshot, tiny_teacher

SEQ_LEN, D_S = 32, 32
BF16_UNIT_ROUNDOFF = 2.0**-8  # relative rounding of one bf16 value (8 significant bits)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_ffn_output_is_the_teacher_mlps_and_gives_the_same_targets(family: str) -> None:
    teacher = tiny_teacher(family)
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    g = torch.Generator().manual_seed(3)
    ids_BT = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=g)
    positions_BK = torch.stack([torch.randperm(12, generator=g)[:4].sort().values for _ in range(2)])
    snapshot = teacher_snapshot(teacher, ids_BT, positions_BK)
    for i, layer in enumerate(student.layers):
        recomputed_BKD = layer.teacher_ffn_output(snapshot[i]["ffn_in"])
        assert recomputed_BKD.dtype == torch.float32 and not recomputed_BKD.requires_grad
        torch.testing.assert_close(recomputed_BKD, snapshot[i]["ffn_out"], rtol=1e-5, atol=1e-6)
        stored = student.clone_targets(i, {k: snapshot[i][k] for k in ("ffn_in", "ffn_out")})
        rebuilt = student.clone_targets(i, {"ffn_in": snapshot[i]["ffn_in"]})
        assert rebuilt.keys() == stored.keys() == {"gate", "up", "ffn_out"}
        for term in stored:
            torch.testing.assert_close(rebuilt[term], stored[term], rtol=1e-5, atol=1e-6)
        # The rebuilt target still carries P_down's gradient, as the stored one does.
        grads = []
        for targets in (stored, rebuilt):
            layer.proj["down"].grad = None
            targets["ffn_out"].square().sum().backward()
            grads.append(layer.proj["down"].grad.clone())
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _store(root: Path, teacher_dir: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"line {i}: snapshots keep the FFN input of {i * 3} positions. " * 2}) for i in range(16)]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_data(PrepareDataConfig(inputs=[str(corpus)], tokenizer=teacher_dir, out=root / "tokens", seq_len=SEQ_LEN, val_fraction=0.25))
    return root / "tokens"


@pytest.fixture(scope="module")
def caches(tiny_teacher, tmp_path_factory) -> dict[str, Path]:
    """Two caches of one store by the tiny Llama, every layer snapshotted: the default (FFN input only) and with outputs."""
    root = tmp_path_factory.mktemp("ffn-recompute")
    teacher_dir = tiny_teacher("llama").path
    store = _store(root, teacher_dir)
    built = {}
    for name, ffn_output in (("input-only", False), ("with-output", True)):
        built[name] = root / name
        cache_teacher(
            CacheTeacherConfig(
                teacher=teacher_dir, tokens=store, out=built[name], snapshot_layers="all", snapshot_fraction=0.25,
                snapshot_ffn_output=ffn_output, sequences_per_shard=16, sequences_per_chunk=4,
            )  # fmt: skip
        )
    return built


def test_default_cache_stores_the_ffn_input_only_in_about_half_the_bytes(caches):
    bare, full = open_cache(caches["input-only"]), open_cache(caches["with-output"])
    assert (bare.manifest.snapshot.ffn_output, full.manifest.snapshot.ffn_output) == (False, True)
    assert bare.manifest.fingerprint != full.manifest.fingerprint
    shard = cf.shard_dir(caches["input-only"], "train", 0)
    assert (shard / cf.snapshot_array(0, "ffn_in")).is_dir() and not (shard / cf.snapshot_array(0, "ffn_out")).exists()
    a, b = bare.open_shard("train", 0).read(0, 4), full.open_shard("train", 0).read(0, 4)
    assert np.array_equal(a.snap_positions, b.snap_positions)
    for layer in a.snapshots:
        assert set(a.snapshots[layer]) == {"ffn_in"} and set(b.snapshots[layer]) == {"ffn_in", "ffn_out"}
        assert np.array_equal(a.snapshots[layer]["ffn_in"], b.snapshots[layer]["ffn_in"])
    stats = {name: cache_stats(path) for name, path in caches.items()}
    assert (stats["input-only"].snapshot_terms, stats["with-output"].snapshot_terms) == ("ffn_in", "ffn_in/ffn_out")
    ratio = stats["input-only"].snapshot_bytes_per_token / stats["with-output"].snapshot_bytes_per_token
    assert 0.4 < ratio < 0.6, ratio


def test_recomputed_target_equals_the_stored_output_within_bf16_precision(caches, tiny_teacher):
    """From the stored bf16 input, the float32 recompute lands within bf16 rounding of the stored bf16 output."""
    student = LRCStudent(tiny_teacher("llama").model, LRCSpec(hidden_size=D_S))
    full = open_cache(caches["with-output"])
    checked = 0
    for split, index in full.manifest.global_shards():
        shard = full.open_shard(split, index)
        batch = shard.read(0, shard.num_sequences)
        for layer, terms in batch.snapshots.items():
            stored_NKD = torch.from_numpy(terms["ffn_out"])
            recomputed_NKD = student.layers[layer].teacher_ffn_output(torch.from_numpy(terms["ffn_in"]))
            # Rounding the input (≤ 2^-8 relative per element) and the output (≤ 2^-8) to bf16, per vector.
            relative_NK = (recomputed_NKD - stored_NKD).norm(dim=-1) / stored_NKD.norm(dim=-1)
            assert float(relative_NK.max()) < 4 * BF16_UNIT_ROUNDOFF, (split, index, layer, float(relative_NK.max()))
            assert float(relative_NK.max()) > 0  # the stored output was rounded: these are not the same numbers
            print(f"layer {layer}: max relative {float(relative_NK.max()):.2e}")
            checked += relative_NK.numel()
    assert checked > 50


def test_lrc_with_the_clone_loss_trains_on_a_cache_without_outputs_as_on_one_with(caches, tmp_path):
    """Same seed, same positions and inputs: the FFN-output clone loss differs by bf16 rounding only."""
    logged = {}
    for name, cache in caches.items():
        config = TrainStudentConfig(
            cache=cache, out=tmp_path / name, student="lrc", hidden_size=D_S, steps=3, batch_size=2, lr=1e-2,
            kd_weight=1.0, lm_weight=0.0, clone_weight=1.0, log_every=1, eval_every=0, num_workers=0,
        )  # fmt: skip
        train_student(config)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logged[name] = [r for r in map(json.loads, lines) if r["type"] == "train"]
    assert len(logged["input-only"]) == 3
    first_bare, first_full = logged["input-only"][0], logged["with-output"][0]
    assert first_bare["loss/clone/gate"] == pytest.approx(first_full["loss/clone/gate"], rel=1e-6)  # same inputs
    for bare, full in zip(logged["input-only"], logged["with-output"], strict=True):
        assert np.isfinite(bare["loss/clone/ffn_out"]) and bare["loss/clone/ffn_out"] > 0
        assert bare["loss/clone/ffn_out"] == pytest.approx(full["loss/clone/ffn_out"], rel=2e-2)
        assert bare["loss"] == pytest.approx(full["loss"], rel=1e-2)
