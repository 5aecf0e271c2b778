"""The shared-basis init (`--lrc-init shared`): the folding of the teacher's norms, the basis
from cached FFN inputs, and what a cache without snapshots says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.builders import build_student
from kdpipe.student_train.lrc import PROJECTED_LINEARS, LRCSpec, LRCStudent
from kdpipe.student_train.lrc_init import best_logit_scale, residual_samples, shared_basis
from kdpipe.teacher_cache import open_cache
from tests.unit.student_train.test_trainer import build_cache, lrc_config
from tests.unit.student_train.tiny_teachers import D_T, VOCAB, teacher_snapshot, tiny_teacher

HEAD_WIDTH = 16  # the tiny teachers' head_dim (64 / 4 heads)


def _ids(seed: int, B: int = 8, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _basis_from_teacher(teacher: PreTrainedModel, hidden_size: int):
    """The shared basis from the teacher's FFN inputs at every position of a few sequences (what a cache stores)."""
    ids_BT = _ids(seed=10)
    T = ids_BT.shape[1]
    snapshot = teacher_snapshot(teacher, ids_BT, torch.arange(T).expand(ids_BT.shape[0], T))
    samples = [
        residual_samples(snapshot[i]["ffn_in"].reshape(-1, D_T), layer.post_attention_layernorm.weight)
        for i, layer in enumerate(teacher.model.layers)
    ]
    return shared_basis(torch.cat(samples), hidden_size)


def _confine_residual(teacher: PreTrainedModel, width: int) -> None:
    """Make every write into the residual stream (embedding, o, down, their biases) lie in one width-dim subspace."""
    g = torch.Generator().manual_seed(5)
    q_TW, _ = torch.linalg.qr(torch.randn(D_T, width, generator=g))
    keep_TT = q_TW @ q_TW.T
    with torch.no_grad():
        teacher.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight @ keep_TT)
        for layer in teacher.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.copy_(keep_TT @ linear.weight)
                if linear.bias is not None:
                    linear.bias.copy_(keep_TT @ linear.bias)


def _logits(student: LRCStudent, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(ids_BT).hidden @ student.lm_head_weight().T  # (B, T, V)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean KL(teacher || student) per position."""
    return float(F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "qwen3", "mistral"])
def test_shared_init_reproduces_a_teacher_whose_residual_fits_in_d_S(family: str) -> None:
    """Every norm weight folded where it belongs: the student computes the teacher's logits."""
    d_S = D_T - HEAD_WIDTH
    teacher = tiny_teacher(family)
    _confine_residual(teacher, d_S)
    basis = _basis_from_teacher(teacher, d_S)
    assert basis.energy == pytest.approx(1.0, abs=1e-5)
    student = LRCStudent(teacher, LRCSpec(hidden_size=d_S, init="shared", basis=basis, tie_embeddings=False))
    ids_BT = _ids(seed=11)
    with torch.no_grad():
        expected_BTV = teacher(ids_BT).logits
    torch.testing.assert_close(_logits(student, ids_BT), expected_BTV, atol=2e-3, rtol=2e-3)


def test_shared_init_of_a_full_rank_teacher_starts_near_it_and_random_does_not() -> None:
    d_S = D_T - HEAD_WIDTH
    teacher = tiny_teacher("qwen2")
    ids_BT = _ids(seed=12)
    with torch.no_grad():
        teacher_BTV = teacher(ids_BT).logits
    basis = _basis_from_teacher(teacher, d_S)
    assert d_S / D_T < basis.energy < 1.0
    shared = LRCStudent(teacher, LRCSpec(hidden_size=d_S, init="shared", basis=basis))
    torch.manual_seed(0)
    random = LRCStudent(teacher, LRCSpec(hidden_size=d_S))
    kl_shared, kl_random = _kl(teacher_BTV, _logits(shared, ids_BT)), _kl(teacher_BTV, _logits(random, ids_BT))
    assert kl_shared < 0.2 * kl_random, (kl_shared, kl_random)


def test_shared_projections_are_the_basis_with_the_reading_norms_folded_in() -> None:
    teacher = tiny_teacher("qwen2")
    basis = _basis_from_teacher(teacher, 32)
    u_TS = basis.vectors
    torch.testing.assert_close(u_TS.T @ u_TS, torch.eye(32), atol=1e-5, rtol=0)
    student = LRCStudent(teacher, LRCSpec(hidden_size=32, init="shared", basis=basis))
    torch.testing.assert_close(student.embed_proj.data, u_TS)
    torch.testing.assert_close(student.head_proj.data, teacher.model.norm.weight[:, None] * u_TS)
    for clone, layer in zip(student.layers, teacher.model.layers, strict=True):
        reads = {"q": layer.input_layernorm, "k": layer.input_layernorm, "v": layer.input_layernorm,
                 "gate": layer.post_attention_layernorm, "up": layer.post_attention_layernorm}  # fmt: skip
        for name in PROJECTED_LINEARS:
            scale = reads[name].weight[:, None] if name in reads else 1.0
            torch.testing.assert_close(clone.proj[name].data, scale * u_TS)
        norm = (D_T * basis.energy / 32) ** 0.5
        torch.testing.assert_close(clone.input_norm.data, torch.full((32,), norm))


def test_residual_samples_undo_the_post_attention_norm() -> None:
    teacher = tiny_teacher("llama")
    norm = teacher.model.layers[0].post_attention_layernorm
    h_ND = 3.0 * torch.randn(40, D_T, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        samples_ND = residual_samples(norm(h_ND), norm.weight)
    expected_ND = h_ND / h_ND.square().mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(samples_ND, expected_ND, atol=1e-4, rtol=1e-4)
    # A padding position (all zeros) carries no direction and is dropped.
    assert residual_samples(torch.zeros(3, D_T), norm.weight).shape == (0, D_T)


def _build(cache: Path, tmp_path: Path, **changes):
    config = lrc_config(cache, tmp_path / "run", lrc_init="shared", **changes)
    opened = open_cache(cache)
    return build_student(config, opened.manifest, device=torch.device("cpu"), cache=opened), config


def test_shared_init_from_a_cache_reads_its_ffn_inputs(tiny_teacher, tmp_path: Path) -> None:
    cache = build_cache(tmp_path, tiny_teacher("llama").path)
    student, config = _build(cache, tmp_path, clone_weight=0.0, lr=None)
    assert student.spec.init == "shared" and student.spec.basis.num_samples > 0
    assert config.lr == pytest.approx(3e-5)  # the shared start's default learning rate
    assert lrc_config(cache, tmp_path / "r", lr=None, lrc_init="random").lr == pytest.approx(3e-4)


def test_shared_init_on_a_cache_without_snapshots_is_one_line(tiny_teacher, tmp_path: Path) -> None:
    cache = build_cache(tmp_path, tiny_teacher("llama").path, snapshot_layers="none")
    with pytest.raises(KdpipeError, match="no FFN-input snapshots, which --lrc-init shared reads") as info:
        _build(cache, tmp_path, clone_weight=0.0)
    assert "\n" not in str(info.value)


def test_best_logit_scale_finds_the_temperature_of_overconfident_logits() -> None:
    g = torch.Generator().manual_seed(4)
    head_VD = torch.randn(VOCAB, 16, generator=g)
    hidden_ND = torch.randn(4000, 16, generator=g)
    true_ND = hidden_ND @ head_VD.T  # the distribution the labels come from
    labels_N = torch.multinomial(true_ND.softmax(-1), 1, generator=g).squeeze(-1)
    assert best_logit_scale(hidden_ND / 0.7, head_VD, labels_N) == pytest.approx(0.7)
    assert best_logit_scale(hidden_ND, head_VD, labels_N) == pytest.approx(1.0)
