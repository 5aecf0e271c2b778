"""Tiny in-memory teachers and a reference snapshot capture for the LRC tests.

The snapshot is taken with forward hooks on the real teacher modules, independently of
kdpipe's cache writer, so the clone-target tests compare against what the teacher
actually computed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedModel, Qwen2Config, Qwen3Config

VOCAB = 300
D_T = 64
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=D_T,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

FAMILIES = ("llama", "llama-bias", "qwen2", "qwen3", "mistral")


def tiny_teacher(family: str, *, seed: int = 0) -> PreTrainedModel:
    """A seeded fp32 teacher of `family`.

    llama: tied head. llama-bias: attention and MLP biases (o/down biases must be
    projected). qwen2: q/k/v biases, untied head. qwen3: q_norm/k_norm, head_dim 24
    (heads*head_dim != hidden). mistral: untied head, sliding window.
    """
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(**SIZES, tie_word_embeddings=True)
    elif family == "llama-bias":
        config = LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True)
    elif family == "qwen2":
        config = Qwen2Config(**SIZES, tie_word_embeddings=False)
    elif family == "qwen3":
        config = Qwen3Config(**SIZES, head_dim=24, tie_word_embeddings=False)
    elif family == "mistral":
        config = MistralConfig(**SIZES, sliding_window=8, tie_word_embeddings=False)
    else:
        raise AssertionError(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        # Non-trivial norms and biases so that copying them wrongly shows up.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def teacher_snapshot(teacher: PreTrainedModel, input_ids_BT: Tensor, positions_BK: Tensor) -> dict[int, dict[str, Tensor]]:
    """Per layer: the teacher's attention input/output and FFN input/output at the positions, (B, K, d_T)."""
    snapshot: dict[int, dict[str, Tensor]] = {}
    hooks = []

    def keep(layer: int, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            index = positions_BK.unsqueeze(-1).expand(-1, -1, out.shape[-1])
            snapshot.setdefault(layer, {})[name] = out.gather(1, index).detach()

        return hook

    for i, layer in enumerate(teacher.model.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(keep(i, "attn_in")))
        hooks.append(layer.self_attn.register_forward_hook(keep(i, "attn_out")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep(i, "ffn_in")))
        hooks.append(layer.mlp.register_forward_hook(keep(i, "ffn_out")))
    try:
        with torch.no_grad():
            teacher(input_ids_BT)
    finally:
        for hook in hooks:
            hook.remove()
    return snapshot
