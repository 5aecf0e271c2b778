"""The vLLM backend's parts that need no vLLM: flat-token → (sequence, position) mapping, module
search, tensor transport, options and the missing-vLLM error (these run in every environment).

vLLM hands its hooks one flat token axis per scheduler step, sequences in an order of its
choosing (and, with tensor parallelism, on every rank alike: the mapping is per rank and only
rank 0 returns its result). The tests flatten known (B, T, d) activations the way vLLM does —
whole sequences in any order, split over steps, with padding and duplicates — and check that
the capture rebuilds exactly the activations at each sequence's own positions.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.vllm_worker import CaptureExtension, _Capture, block_starts, find_modules, match_blocks, pack_tensor, unpack_tensor

B, T, D, K = 5, 6, 4, 3


def _flat_step(tokens_BT: torch.Tensor, x_BTD: torch.Tensor, rows: list[int], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scheduler step as vLLM hands it to the model: rows' tokens concatenated, then `pad` padding tokens."""
    ids = torch.cat([tokens_BT[r] for r in rows] + [torch.zeros(pad, dtype=torch.int64)])
    positions = torch.cat([torch.arange(T) for _ in rows] + [torch.zeros(pad, dtype=torch.int64)])
    x = torch.cat([x_BTD[r] for r in rows] + [torch.zeros(pad, D)])
    return ids, positions, x


def test_capture_rebuilds_each_sequence_from_shuffled_split_steps():
    g = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(1, 50, (B, T), generator=g)
    tokens_BT[3] = tokens_BT[1]  # duplicate sequences: either match is right, both rows must be filled
    x_BTD = torch.randn(B, T, D, generator=g)
    x_BTD[3] = x_BTD[1]
    positions_BK = torch.stack([torch.randperm(T, generator=g)[:K].sort().values for _ in range(B)])
    capture = _Capture(tokens_BT, positions_BK)
    for rows, pad in (([4, 1], 3), ([0, 3, 2], 0)):  # vLLM's order, over two steps, with padding
        ids, positions, x = _flat_step(tokens_BT, x_BTD, rows, pad)
        capture.start_step(ids, positions)
        capture.keep_hidden(x)
        capture.keep_snapshot("0/ffn_in", x)
    assert sorted(capture.hidden) == list(range(B))
    hidden = torch.stack([capture.hidden[r] for r in range(B)])
    torch.testing.assert_close(hidden, x_BTD, rtol=0, atol=0)
    snaps = torch.stack([capture.snaps["0/ffn_in"][r] for r in range(B)])  # (B, K, D)
    torch.testing.assert_close(snaps, x_BTD[torch.arange(B)[:, None], positions_BK], rtol=0, atol=0)


def test_partial_sequences_and_other_requests_are_not_matched():
    tokens_BT = torch.arange(2 * T).reshape(2, T) + 1
    # A chunk of row 0 (positions 0..3 only), then row 1 whole, then a sequence that is not in the batch.
    ids = torch.cat([tokens_BT[0, :4], tokens_BT[1], tokens_BT[1] + 100])
    positions = torch.cat([torch.arange(4), torch.arange(T), torch.arange(T)])
    assert block_starts(positions, T) == [4, 4 + T]
    taken = torch.zeros(2, dtype=torch.bool)
    assert match_blocks(ids, positions, tokens_BT, taken) == [(1, 4)]
    assert taken.tolist() == [False, True]


class _Worker(CaptureExtension):
    """A host for the extension's methods, as vLLM's worker is: a rank and the model to hook."""

    def __init__(self, rank: int, model: torch.nn.Module) -> None:
        self.rank = rank
        self._model = model

    def get_model(self) -> torch.nn.Module:
        return self._model


def test_only_rank_0_returns_the_batch_and_a_missing_sequence_is_named():
    tokens_BT = torch.arange(2 * T).reshape(2, T)
    x = torch.randn(2 * T, D)
    for rank, want in ((1, None), (0, "sequences [1]")):
        worker = _Worker(rank, torch.nn.Module())
        worker.kdpipe_set_batch(tokens_BT.tolist(), None)
        worker._kdpipe_capture.start_step(tokens_BT[0], torch.arange(T))  # row 1 never computed
        worker._kdpipe_capture.keep_hidden(x[:T])
        result = worker.kdpipe_take_batch()
        assert result is None if want is None else want in result


def test_module_search_names_an_architecture_without_llama_style_blocks(tiny_teacher):
    llama = tiny_teacher("llama").model  # vLLM's Llama/Qwen/Mistral use the same attribute names
    assert find_modules(llama, [0, 1], attention=True)[2] is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    error = find_modules(gpt2, [0], attention=False)[2]
    assert error is not None and "GPT2LMHeadModel" in error and "--backend transformers" in error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_cross_the_process_boundary_bit_for_bit(dtype):
    x = torch.randn(2, 3, 5).to(dtype)
    y = unpack_tensor(pack_tensor(x))
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)


def test_tensor_parallel_needs_the_vllm_backend(tmp_path):
    with pytest.raises(KdpipeError, match="needs backend 'vllm'"):
        CacheTeacherConfig(teacher=tmp_path, tokens=tmp_path, out=tmp_path, tensor_parallel_size=2)
    with pytest.raises(KdpipeError, match="gpu_memory_utilization"):
        CacheTeacherConfig(teacher=tmp_path, tokens=tmp_path, out=tmp_path, backend="vllm", gpu_memory_utilization=0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_one_line_saying_how_to_install(tiny_teacher, tmp_path):
    from tests.unit.teacher_cache.test_run import build_token_store

    teacher = tiny_teacher("llama").path
    store = build_token_store(tmp_path, teacher)
    done = subprocess.run(
        [sys.executable, "-m", "kdpipe", "cache-teacher", "--teacher", str(teacher), "--tokens", str(store), "--out", str(tmp_path / "c"),
         "--backend", "vllm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the vllm package" in lines[0] and "pip install vllm" in lines[0], done.stderr
    assert not (tmp_path / "c").exists()
