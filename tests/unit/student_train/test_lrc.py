"""The LRC student: shapes, frozen teacher, clone targets and loss scales, and that it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.clone_loss import clone_loss, clone_loss_breakdown
from kdpipe.student_train.lrc import PROJECTED_LINEARS, LRCSpec, LRCStudent
from tests.unit.student_train.tiny_teachers import D_T, FAMILIES, VOCAB, teacher_snapshot, tiny_teacher

D_S = 32


def _batch(seed: int = 1, B: int = 2, T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, VOCAB, (B, T), generator=g)
    positions_BK = torch.stack([torch.randperm(T, generator=g)[:4].sort().values for _ in range(B)])
    return ids_BT, positions_BK


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_have_the_shapes_of_the_student_architecture(family: str) -> None:
    teacher = tiny_teacher(family)
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    for layer in student.layers:
        for name in PROJECTED_LINEARS:
            assert layer.proj[name].shape == (D_T, D_S)
    assert student.embed_proj.shape == (D_T, D_S)
    assert (student.head_proj is None) == bool(teacher.config.tie_word_embeddings)
    assert student.lm_head_weight().shape == (VOCAB, D_S)

    reference = AutoModelForCausalLM.from_config(student.config).state_dict()
    if student.tied:
        reference.pop("lm_head.weight")
    weights = student.student_weights()
    assert weights.keys() == reference.keys()
    for name, tensor in weights.items():
        assert tensor.shape == reference[name].shape, name
    assert student.config.hidden_size == D_S
    assert student.config.head_dim == teacher.model.layers[0].self_attn.head_dim


@pytest.mark.parametrize(
    ("family", "tie", "has_head"), [("llama", None, False), ("qwen2", None, True), ("llama", False, True), ("qwen2", True, False)]
)
def test_parameters_are_projections_and_norms_only(family: str, tie: bool | None, has_head: bool) -> None:
    student = LRCStudent(tiny_teacher(family), LRCSpec(hidden_size=D_S, tie_embeddings=tie))
    expected = {"embed_proj", "final_norm"} | ({"head_proj"} if has_head else set())
    for i in range(2):
        expected |= {f"layers.{i}.proj.{m}" for m in PROJECTED_LINEARS}
        expected |= {f"layers.{i}.input_norm", f"layers.{i}.post_attention_norm"}
    assert {name for name, _ in student.named_parameters()} == expected
    # A checkpoint of the student holds the trainable state only, no teacher tensor.
    assert set(student.state_dict().keys()) == expected
    for name in ("final_norm", "layers.0.input_norm"):
        assert torch.equal(student.get_parameter(name), torch.ones(D_S))


def test_teacher_stays_frozen_through_backward_and_optimizer_step() -> None:
    teacher = tiny_teacher("qwen3")
    before = {name: t.detach().clone() for name, t in teacher.state_dict().items()}
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    ids_BT, positions_BK = _batch()
    snapshot = teacher_snapshot(teacher, ids_BT, positions_BK)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    projections_before = {n: p.detach().clone() for n, p in student.named_parameters()}

    out = student(ids_BT, capture_positions_BK=positions_BK)
    targets = {layer: student.clone_targets(layer, snapshot[layer]) for layer in out.activations}
    logits_BTV = out.hidden @ student.lm_head_weight().T
    loss = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, VOCAB), ids_BT[:, 1:].reshape(-1)) + clone_loss(out.activations, targets)
    loss.backward()
    optimizer.step()

    for name, tensor in list(teacher.named_parameters()) + list(student.named_buffers()):
        assert tensor.grad is None, name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is not None for p in student.parameters())
    assert all(not torch.equal(p, projections_before[n]) for n, p in student.named_parameters())


def test_bad_specs_and_architectures_are_one_line_errors() -> None:
    teacher = tiny_teacher("llama")
    for width in (D_T, D_T + 8, 0):
        with pytest.raises(KdpipeError, match="hidden_size") as info:
            LRCStudent(teacher, LRCSpec(hidden_size=width))
        assert "\n" not in str(info.value)
    with pytest.raises(KdpipeError, match="init_std"):
        LRCStudent(teacher, LRCSpec(hidden_size=D_S, init_std=0.0))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB))
    with pytest.raises(KdpipeError, match="'gpt2' is not supported"):
        LRCStudent(gpt2, LRCSpec(hidden_size=D_S))
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    with pytest.raises(KdpipeError, match="capture layer 5"):
        student.capture_layers = [0, 5]


@pytest.mark.parametrize("family", ["qwen2", "llama-bias", "qwen3"])
def test_captured_activations_are_the_exported_models_at_the_positions(family: str) -> None:
    student = LRCStudent(tiny_teacher(family), LRCSpec(hidden_size=D_S))
    student.capture_layers = [1]
    ids_BT, positions_BK = _batch()
    with torch.no_grad():
        out = student(ids_BT, capture_positions_BK=positions_BK)
    assert list(out.activations) == [1]

    reference = AutoModelForCausalLM.from_config(student.config, attn_implementation="eager")
    reference.load_state_dict(student.student_weights(), strict=not student.tied)
    layer = reference.model.layers[1]
    modules = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
               "attn_out": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj, "ffn_out": layer.mlp}
    full: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, term=term: full.__setitem__(term, o)) for term, m in modules.items()]
    with torch.no_grad():
        reference(ids_BT)
    for hook in hooks:
        hook.remove()
    assert out.activations[1].keys() == modules.keys()
    for term, full_BTW in full.items():
        for b in range(ids_BT.shape[0]):
            torch.testing.assert_close(out.activations[1][term][b], full_BTW[b, positions_BK[b]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama-bias"])
def test_clone_targets_are_the_teachers_own_outputs(family: str) -> None:
    teacher = tiny_teacher(family)
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    ids_BT, positions_BK = _batch()
    snapshot = teacher_snapshot(teacher, ids_BT, positions_BK)

    real: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(teacher.model.layers):
        for term, module in {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
                             "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj}.items():
            hooks.append(module.register_forward_hook(lambda mod, a, o, key=(i, term): real.__setitem__(key, o)))
    with torch.no_grad():
        teacher(ids_BT)
    for hook in hooks:
        hook.remove()

    for i in range(2):
        targets = student.clone_targets(i, snapshot[i])
        assert targets.keys() == {"q", "k", "v", "gate", "up", "ffn_out", "attn_out"}
        for term in ("q", "k", "v", "gate", "up"):
            expected = torch.stack([real[(i, term)][b, positions_BK[b]] for b in range(2)])
            torch.testing.assert_close(targets[term], expected, rtol=1e-5, atol=1e-5)
            assert not targets[term].requires_grad
        # Only the FFN snapshot (the default cache content): no attention targets.
        ffn_only = student.clone_targets(i, {k: snapshot[i][k] for k in ("ffn_in", "ffn_out")})
        assert ffn_only.keys() == {"gate", "up", "ffn_out"}


def test_projected_targets_follow_the_formula_and_carry_the_projection_gradient() -> None:
    teacher = tiny_teacher("llama")
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    ids_BT, positions_BK = _batch()
    snapshot = teacher_snapshot(teacher, ids_BT, positions_BK)[0]
    # With P = the first d_S columns of the identity, the target is the teacher output's first d_S dims.
    with torch.no_grad():
        student.layers[0].proj["down"].copy_(torch.eye(D_T)[:, :D_S])
        student.layers[0].proj["o"].copy_(torch.eye(D_T)[:, D_S:])
    targets = student.clone_targets(0, snapshot)
    torch.testing.assert_close(targets["ffn_out"], snapshot["ffn_out"][..., :D_S])
    torch.testing.assert_close(targets["attn_out"], snapshot["attn_out"][..., D_S:])
    (targets["ffn_out"].sum() + targets["attn_out"].sum()).backward()
    torch.testing.assert_close(student.layers[0].proj["down"].grad, snapshot["ffn_out"].sum((0, 1))[:, None].expand(D_T, D_S))
    assert student.layers[0].proj["o"].grad is not None


def test_clone_loss_is_summed_mse_over_shared_terms() -> None:
    g = torch.Generator().manual_seed(0)

    def rand(width: int) -> torch.Tensor:
        return torch.randn(2, 3, width, generator=g)

    acts = {0: {"gate": rand(8), "ffn_out": rand(4)}, 1: {"q": rand(8)}}
    targets = {0: {"gate": rand(8), "ffn_out": rand(4), "up": rand(8)}, 2: {"q": rand(8)}}
    gate = ((acts[0]["gate"] - targets[0]["gate"]) ** 2).mean()
    ffn = ((acts[0]["ffn_out"] - targets[0]["ffn_out"]) ** 2).mean()
    torch.testing.assert_close(clone_loss(acts, targets), gate + ffn)
    breakdown = clone_loss_breakdown(acts, targets)
    assert breakdown.keys() == {"clone/gate", "clone/ffn_out"}
    assert breakdown["clone/gate"] == pytest.approx(gate.item())
    assert clone_loss({}, targets).item() == 0.0


def test_relative_clone_scale_is_the_mean_relative_error_per_position() -> None:
    g = torch.Generator().manual_seed(0)
    acts = {0: {"gate": torch.randn(2, 3, 8, generator=g)}, 1: {"gate": torch.randn(2, 3, 8, generator=g, requires_grad=True)}}
    targets = {0: {"gate": 10 * torch.randn(2, 3, 8, generator=g)}, 1: {"gate": 0.1 * torch.randn(2, 3, 8, generator=g)}}
    expected = sum((((acts[i]["gate"] - targets[i]["gate"]) ** 2).sum(-1) / (targets[i]["gate"] ** 2).sum(-1)).mean() for i in (0, 1)) / 2
    torch.testing.assert_close(clone_loss(acts, targets, scale="relative"), expected)
    # A student that outputs nothing scores 1, whatever the teacher's scale.
    silent = {i: {"gate": torch.zeros(2, 3, 8)} for i in (0, 1)}
    assert clone_loss(silent, targets, scale="relative").item() == pytest.approx(1.0)
    assert clone_loss(silent, targets, scale="absolute").item() > 50


def test_an_lrc_student_trains_on_clone_and_cross_entropy() -> None:
    teacher = tiny_teacher("llama")
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    ids_BT, positions_BK = _batch(B=4, T=16)
    snapshot = teacher_snapshot(teacher, ids_BT, positions_BK)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    ces, clones = [], []
    for _ in range(30):
        optimizer.zero_grad()
        out = student(ids_BT, capture_positions_BK=positions_BK)
        targets = {layer: student.clone_targets(layer, snapshot[layer]) for layer in out.activations}
        logits_BTV = out.hidden @ student.lm_head_weight().T
        ce = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, VOCAB), ids_BT[:, 1:].reshape(-1))
        clone = clone_loss(out.activations, targets)
        (ce + clone).backward()
        optimizer.step()
        ces.append(ce.item())
        clones.append(clone.item())
    assert ces[-1] < ces[0] - 0.5, ces
    assert clones[-1] < 0.5 * clones[0], clones


def test_a_bf16_teacher_gives_a_bf16_forward_with_fp32_trainable_weights() -> None:
    teacher = tiny_teacher("qwen2").to(torch.bfloat16)
    student = LRCStudent(teacher, LRCSpec(hidden_size=D_S))
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert student.teacher_embed.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()  # shared, not copied
    ids_BT, _ = _batch()
    out = student(ids_BT)
    assert out.hidden.dtype == torch.bfloat16
    (out.hidden.float() @ student.lm_head_weight().float().T).logsumexp(-1).mean().backward()
    assert student.embed_proj.grad is not None and student.embed_proj.grad.dtype == torch.float32
