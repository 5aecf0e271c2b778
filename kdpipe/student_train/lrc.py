"""The Low-Rank-Clone (LRC) student (Hao et al. 2025).

The student is computed from frozen teacher weights through trainable projections
P_m (d_T, d_S): W_S = W_T @ P for q, k, v, gate, up (HF Linear weights are (out, in), so
this shrinks the input side); W_S = P^T @ W_T for o and down (the output side, which
writes into the residual stream); E_S = E_T @ P_emb. Heads, head_dim, FFN width, vocab and
depth stay the teacher's; only the residual width shrinks. The RMSNorms are new, of width
d_S. Init "random" (the paper's) draws every P at random and sets the norms to 1; init
"shared" uses one orthonormal basis U of the teacher's residual stream for every P, with
the teacher's norm weights folded into the projections that read through them, so the
student starts as the teacher restricted to span(U) (lrc_init computes U from the cache).
Per-matrix SVD bases are not offered: each matrix then reads in a basis other layers did
not write in, and on SmolLM2-135M that starts worse than random (13.1 vs 11.1).

Parity with the exported model holds by construction: the forward runs the Hugging Face
module of the teacher's own architecture, built for `hidden_size = d_S` on the meta device
(no memory), through `torch.func.functional_call` with the computed weights. Export
writes the same weights into the same module class.

Teacher tensors are non-persistent buffers that share storage with the teacher (a 3B
teacher is not held twice): checkpoints of the student hold only the trainable state.
The trainable projections and norms are fp32 (master weights); the student computes in
the teacher's dtype, casting P rather than W so that autograd saves the teacher buffers
themselves, not fp32 copies of the whole teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.lrc_init import SharedBasis

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# term -> (HF module path inside a decoder layer, which side of the weight P replaces).
# "in": W_S = W_T @ P (reads the residual stream); "out": W_S = P^T @ W_T (writes it).
PROJECTED_LINEARS: dict[str, tuple[str, Literal["in", "out"]]] = {
    "q": ("self_attn.q_proj", "in"),
    "k": ("self_attn.k_proj", "in"),
    "v": ("self_attn.v_proj", "in"),
    "o": ("self_attn.o_proj", "out"),
    "gate": ("mlp.gate_proj", "in"),
    "up": ("mlp.up_proj", "in"),
    "down": ("mlp.down_proj", "out"),
}

# clone-loss term -> the projected linear whose output it is.
CLONE_TERMS: dict[str, str] = {
    "q": "q",
    "k": "k",
    "v": "v",
    "gate": "gate",
    "up": "up",
    "attn_out": "o",
    "ffn_out": "down",
}

# Per-head norms (Qwen3) live in head space: copied from the teacher and frozen.
HEAD_NORMS = ("q_norm", "k_norm")


@dataclass(kw_only=True, slots=True)
class LRCSpec:
    """How to build an LRC student from a teacher."""

    hidden_size: int
    """Student residual width d_S; must be smaller than the teacher's d_T."""
    init: Literal["random", "shared"] = "random"
    """Projection init: "random" = normal(0, init_std) as in the LRC paper; "shared" = one basis for all
    projections with the teacher's norm weights folded in (`basis` required; see lrc_init)."""
    init_std: float = 0.02
    """Standard deviation of the random projection init."""
    tie_embeddings: bool | None = None
    """Tie the student's LM head to its embedding; None follows the teacher."""
    basis: SharedBasis | None = None
    """The shared basis of init "shared" (computed from cached FFN inputs by lrc_init)."""


@dataclass(slots=True)
class LRCOutput:
    """What one student forward returns."""

    hidden: Tensor
    """(B, T, d_S) after the final norm; no LM head (the loss computes logits in chunks)."""
    activations: dict[int, dict[str, Tensor]]
    """layer -> clone term -> (B, K, width) at the capture positions; empty without positions."""


def _init_projection(spec: LRCSpec, d_T: int, *, device: torch.device, norm_weight: Tensor | None = None) -> nn.Parameter:
    """A (d_T, d_S) projection.

    random: normal(0, init_std), as in the LRC paper. shared: the shared basis U; a
    projection that reads the residual through a teacher RMSNorm of weight γ (q, k, v
    through the input norm, gate and up through the post-attention norm, an untied head
    through the final norm) is diag(γ)·U, so the student's own norms start as scaled
    identities. A tied head is the embedding, E·U: it cannot carry the final norm.
    """
    if spec.init == "random":
        return nn.Parameter(torch.randn(d_T, spec.hidden_size, device=device) * spec.init_std)
    assert spec.basis is not None
    u_TS = spec.basis.vectors.to(device)  # (d_T, d_S)
    if norm_weight is not None:
        u_TS = norm_weight.detach().float().to(device).unsqueeze(-1) * u_TS
    return nn.Parameter(u_TS.clone())


def _norm_init(spec: LRCSpec) -> float:
    """The student's RMSNorm weights at init: 1, or sqrt(d_T·e/d_S) for the shared basis.

    The student's residual is U^T·h; its rms is rms(h)·sqrt(d_T·e/d_S) on average (e the
    energy U keeps), so this weight makes W_S·norm_S(U^T·h) equal W_T·norm_T(h) on span(U).
    """
    if spec.basis is None:
        return 1.0
    return math.sqrt(spec.basis.kept_mean_square / spec.hidden_size)


class _CloneLayer(nn.Module):
    """One decoder layer: trainable projections and norms, frozen teacher tensors."""

    def __init__(self, teacher_layer: nn.Module, spec: LRCSpec) -> None:
        super().__init__()
        self.proj = nn.ParameterDict()
        # The teacher norm each reading projection sits behind (folded into P by the shared init).
        gamma_in, gamma_post = teacher_layer.input_layernorm.weight, teacher_layer.post_attention_layernorm.weight
        reading_norms = {"q": gamma_in, "k": gamma_in, "v": gamma_in, "gate": gamma_post, "up": gamma_post}
        for name, (path, side) in PROJECTED_LINEARS.items():
            linear = teacher_layer.get_submodule(path)
            self.register_buffer(f"teacher_{name}_weight", linear.weight.detach(), persistent=False)
            bias = linear.bias.detach() if linear.bias is not None else None
            self.register_buffer(f"teacher_{name}_bias", bias, persistent=False)
            d_T = linear.weight.shape[1] if side == "in" else linear.weight.shape[0]
            self.proj[name] = _init_projection(spec, d_T, device=linear.weight.device, norm_weight=reading_norms.get(name))
        for name in HEAD_NORMS:
            norm = getattr(teacher_layer.self_attn, name, None)
            self.register_buffer(name, None if norm is None else norm.weight.detach(), persistent=False)
        # The teacher FFN's activation (SiLU for these families), kept out of the module tree like the skeleton.
        self.__dict__["teacher_act"] = teacher_layer.mlp.act_fn
        device = teacher_layer.self_attn.q_proj.weight.device
        self.input_norm = nn.Parameter(torch.full((spec.hidden_size,), _norm_init(spec), device=device))
        self.post_attention_norm = nn.Parameter(torch.full((spec.hidden_size,), _norm_init(spec), device=device))

    def teacher_weight(self, name: str) -> Tensor:
        return getattr(self, f"teacher_{name}_weight")

    def teacher_bias(self, name: str) -> Tensor | None:
        return getattr(self, f"teacher_{name}_bias")

    @torch.no_grad()
    def teacher_ffn_output(self, ffn_in_BKD: Tensor) -> Tensor:
        """The teacher FFN's output (B, K, d_T) float32 for its input: W_down·(act(W_gate·x) ⊙ W_up·x), in float32.

        What a cache without stored FFN outputs leaves to the trainer: a few positions per
        sequence, three matmuls each, no gradient.
        """
        x = ffn_in_BKD.float()

        def linear(name: str, x: Tensor) -> Tensor:
            bias = self.teacher_bias(name)
            return F.linear(x, self.teacher_weight(name).float(), None if bias is None else bias.float())

        return linear("down", self.__dict__["teacher_act"](linear("gate", x)) * linear("up", x))

    def weights(self) -> dict[str, Tensor]:
        """This layer's student weights in the teacher's dtype, keyed by HF names relative to the decoder layer."""
        dtype = self.teacher_q_weight.dtype
        out: dict[str, Tensor] = {
            "input_layernorm.weight": self.input_norm.to(dtype),
            "post_attention_layernorm.weight": self.post_attention_norm.to(dtype),
        }
        for name, (path, side) in PROJECTED_LINEARS.items():
            # Cast P, not W: autograd then saves the teacher buffer itself, not a copy of it.
            p = self.proj[name].to(dtype)  # (d_T, d_S)
            w = self.teacher_weight(name)
            bias = self.teacher_bias(name)
            if side == "in":
                out[f"{path}.weight"] = w @ p  # (out, d_T) @ (d_T, d_S)
                if bias is not None:
                    out[f"{path}.bias"] = bias  # head/FFN space: unchanged
            else:
                out[f"{path}.weight"] = p.T @ w  # (d_S, d_T) @ (d_T, in)
                if bias is not None:
                    out[f"{path}.bias"] = bias @ p  # the bias is written into the residual too
        for name in HEAD_NORMS:
            norm = getattr(self, name)
            if norm is not None:
                out[f"self_attn.{name}.weight"] = norm
        return out


def student_config(teacher_config: PretrainedConfig, hidden_size: int, head_dim: int, tie: bool) -> PretrainedConfig:
    """The HF config of the student: the teacher's, with residual width d_S and an explicit head_dim."""
    data = teacher_config.to_dict()
    data.update(hidden_size=hidden_size, head_dim=head_dim, tie_word_embeddings=tie)
    for key in ("_name_or_path", "quantization_config"):
        data.pop(key, None)
    return type(teacher_config).from_dict(data)


class LRCStudent(nn.Module):
    """A student whose weights are products of frozen teacher weights and trainable projections."""

    def __init__(self, teacher: PreTrainedModel, spec: LRCSpec) -> None:
        super().__init__()
        config = teacher.config
        model_type = getattr(config, "model_type", type(teacher).__name__)
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise KdpipeError(
                f"LRC student: teacher architecture '{model_type}' is not supported; "
                f"use a {supported} teacher or a plain student"
            )
        head = teacher.get_output_embeddings()
        if head is None:
            raise KdpipeError(f"LRC student: teacher {type(teacher).__name__} has no LM head; load it with AutoModelForCausalLM")
        d_T = config.hidden_size
        if spec.hidden_size < 1 or spec.hidden_size >= d_T:
            raise KdpipeError(
                f"LRC student hidden_size {spec.hidden_size} must be between 1 and {d_T - 1} (the teacher's hidden size is {d_T})"
            )
        if spec.init_std <= 0:
            raise KdpipeError(f"LRC student init_std {spec.init_std} must be positive")
        if spec.init not in ("random", "shared"):
            raise KdpipeError(f"LRC student init '{spec.init}' is not one of 'random', 'shared'")
        assert (spec.basis is not None) == (spec.init == "shared"), "the shared init needs a basis, and only it"
        self.spec = spec
        teacher_tied = bool(config.tie_word_embeddings)
        self.tied = teacher_tied if spec.tie_embeddings is None else spec.tie_embeddings

        decoder = teacher.get_decoder()
        self.head_dim = int(decoder.layers[0].self_attn.head_dim)
        self.config = student_config(config, spec.hidden_size, self.head_dim, self.tied)

        embed = teacher.get_input_embeddings().weight.detach()  # (V, d_T)
        self.register_buffer("teacher_embed", embed, persistent=False)
        d_T, device = embed.shape[1], embed.device
        self.embed_proj = _init_projection(spec, d_T, device=device)
        final_norm_weight = decoder.norm.weight.detach()  # (d_T,) the teacher's final norm
        if self.tied:
            self.register_buffer("teacher_head", None, persistent=False)
            self.head_proj = None
        else:
            head_weight = head.weight.detach()  # (V, d_T); equals the embedding for a tied teacher
            self.register_buffer("teacher_head", head_weight, persistent=False)
            self.head_proj = _init_projection(spec, d_T, device=device, norm_weight=final_norm_weight)
        self.layers = nn.ModuleList(_CloneLayer(layer, spec) for layer in decoder.layers)
        self.final_norm = nn.Parameter(torch.full((spec.hidden_size,), _norm_init(spec), device=device))

        # The HF module skeleton lives on the meta device and holds no weights; it is kept
        # out of the module tree so .to()/state_dict()/parameters() never see it. Its rotary
        # embedding is real and registered here so it follows the student's device.
        with torch.device("meta"):
            skeleton = AutoModel.from_config(self.config, attn_implementation=config._attn_implementation)
        self.rotary_emb = type(skeleton.rotary_emb)(config=self.config).to(embed.device)
        skeleton.rotary_emb = self.rotary_emb
        self.__dict__["_skeleton"] = skeleton
        self._capture_layers: tuple[int, ...] = tuple(range(len(self.layers)))

    @property
    def capture_layers(self) -> tuple[int, ...]:
        """Layers whose activations the forward returns for the clone loss (default: all)."""
        return self._capture_layers

    @capture_layers.setter
    def capture_layers(self, layers: tuple[int, ...] | list[int]) -> None:
        bad = [i for i in layers if not 0 <= i < len(self.layers)]
        if bad:
            raise KdpipeError(
                f"LRC student: capture layer {bad[0]} does not exist; the student has layers 0..{len(self.layers) - 1}"
            )
        self._capture_layers = tuple(sorted(set(layers)))

    def _base_weights(self) -> dict[str, Tensor]:
        """Differentiable student weights of the base model (HF names without the "model." prefix), minus the embedding."""
        weights: dict[str, Tensor] = {"norm.weight": self.final_norm.to(self.teacher_embed.dtype)}
        for i, layer in enumerate(self.layers):
            weights.update({f"layers.{i}.{k}": v for k, v in layer.weights().items()})
        return weights

    def embed_weight(self) -> Tensor:
        """(V, d_S) student embedding E_T @ P_emb, differentiable."""
        return self.teacher_embed @ self.embed_proj.to(self.teacher_embed.dtype)

    def lm_head_weight(self) -> Tensor:
        """(V, d_S) student LM head, differentiable: the embedding if tied, else H_T @ P_head."""
        if self.head_proj is None:
            return self.embed_weight()
        return self.teacher_head @ self.head_proj.to(self.teacher_head.dtype)

    @torch.no_grad()
    def student_weights(self) -> dict[str, Tensor]:
        """The exported model's full state dict (HF *ForCausalLM names), detached."""
        weights = {f"model.{k}": v.detach().clone() for k, v in self._base_weights().items()}
        weights["model.embed_tokens.weight"] = self.embed_weight()
        if not self.tied:
            weights["lm_head.weight"] = self.lm_head_weight()
        return weights

    def forward(
        self,
        input_ids_BT: Tensor,
        *,
        capture_positions_BK: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> LRCOutput:
        # Gather the teacher rows before projecting: B*T*d_T*d_S instead of V*d_T*d_S.
        embeds_BTS = F.embedding(input_ids_BT, self.teacher_embed) @ self.embed_proj.to(self.teacher_embed.dtype)
        skeleton = self.__dict__["_skeleton"]
        skeleton.train(self.training)
        activations: dict[int, dict[str, Tensor]] = {}
        hooks = []
        if capture_positions_BK is not None:
            for layer in self.capture_layers:
                activations[layer] = {}
                for term, linear in CLONE_TERMS.items():
                    module = skeleton.layers[layer].get_submodule(PROJECTED_LINEARS[linear][0])
                    hooks.append(module.register_forward_hook(_gather_hook(activations[layer], term, capture_positions_BK)))
        try:
            out = functional_call(
                skeleton,
                self._base_weights(),
                args=(),
                kwargs={"inputs_embeds": embeds_BTS, "attention_mask": attention_mask, "use_cache": False},
                strict=False,
            )
        finally:
            for hook in hooks:
                hook.remove()
        return LRCOutput(hidden=out.last_hidden_state, activations=activations)

    def clone_targets(self, layer: int, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        """Clone-loss targets of one layer from the teacher cache's snapshot at the capture positions.

        `snapshot` holds (B, K, d_T) teacher tensors: "ffn_in" (post-attention-norm hidden
        state), optionally "ffn_out" (down-projection output), "attn_in" (post-input-norm
        hidden state) and "attn_out" (o-projection output). gate/up (and q/k/v) targets are
        rebuilt exactly from the frozen teacher weights, without gradient, and so is the FFN
        output (in float32) when the cache did not store it; the ffn_out and attn_out targets
        are the teacher outputs mapped into the student space by P_down and P_o, and keep P's
        gradient (LRC trains P through both sides of those terms).
        """
        clone = self.layers[layer]
        dtype = clone.teacher_down_weight.dtype
        targets: dict[str, Tensor] = {}
        with torch.no_grad():
            sources = {"gate": "ffn_in", "up": "ffn_in", "q": "attn_in", "k": "attn_in", "v": "attn_in"}
            for term, source in sources.items():
                if source in snapshot:
                    targets[term] = F.linear(
                        snapshot[source].to(dtype),
                        clone.teacher_weight(term),
                        clone.teacher_bias(term),
                    )  # (B, K, out)
        ffn_out = snapshot.get("ffn_out")
        if ffn_out is None and "ffn_in" in snapshot:
            ffn_out = clone.teacher_ffn_output(snapshot["ffn_in"])  # (B, K, d_T)
        if ffn_out is not None:
            targets["ffn_out"] = ffn_out.to(dtype) @ clone.proj["down"].to(dtype)  # (B, K, d_S)
        if "attn_out" in snapshot:
            targets["attn_out"] = snapshot["attn_out"].to(dtype) @ clone.proj["o"].to(dtype)  # (B, K, d_S)
        return targets


def _gather_hook(store: dict[str, Tensor], term: str, positions_BK: Tensor):
    """A forward hook that keeps a module's output at the capture positions only."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        index = positions_BK.unsqueeze(-1).expand(-1, -1, output.shape[-1])  # (B, K, W)
        store[term] = output.gather(1, index)

    return hook
