"""The transformers teacher backend: load a local causal LM and run it for caching.

`cache-teacher` needs four things from the teacher: the final hidden states (B, T, d), the
LM head applied to a chunk of positions at a time (never the full (B, T, V) logits), the
decoder blocks' FFN and attention modules to hook for snapshots, and a fingerprint
(config and weights hashes, `fingerprint.py`) that ties a cache to exactly this teacher. Modules are found
by structure rather than by model name, so any decoder-only model that transformers loads
with dense gated-MLP blocks works (Llama, Qwen2, Qwen3, Mistral, Gemma2, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.fingerprint import config_hash, weights_hash

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TeacherInfo:
    """What a cache records about its teacher; enough to refuse a mismatched teacher or tokenizer."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    """FFN width from the config; 0 when the config declares none (then no snapshots)."""
    vocab_size: int
    """Rows of the LM head; may exceed the tokenizer's vocabulary (padded heads, e.g. Qwen)."""
    max_positions: int
    config_hash: str
    weights_hash: str


class TeacherModel:
    """A frozen Hugging Face causal LM with the handful of entry points caching needs."""

    def __init__(self, model: PreTrainedModel, info: TeacherInfo, blocks: list[nn.Module]) -> None:
        self.model = model
        """The underlying transformers model (eval mode, no grads). Read-only by convention."""
        self.info = info
        self._blocks = blocks

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto") -> TeacherModel:
        """Load a local model directory. `device` "auto" = cuda if available else cpu;
        `dtype` "auto" = bfloat16 on GPU, float32 on CPU. Never reaches the Hugging Face hub."""
        root = Path(path)
        config = _load_causal_lm_config(root)
        weight_files = _weight_files(root)
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        # sdpa everywhere it exists; architectures whose attention it cannot express
        # (Gemma2's attention-logit softcapping) declare so and get the eager kernel.
        attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
        model = AutoModelForCausalLM.from_pretrained(
            root,
            config=config,
            local_files_only=True,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
        )
        # Loaded on CPU then moved: transformers' device_map would need `accelerate`.
        model.to(torch_device).eval().requires_grad_(False)
        text_config = config.get_text_config()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise KdpipeError(
                f"teacher {root}: its output embedding is {type(head).__name__}, not a linear LM head; use a standard causal LM"
            )
        blocks = _decoder_blocks(model)
        info = TeacherInfo(
            model_type=text_config.model_type,
            num_layers=len(blocks),
            hidden_size=text_config.hidden_size,
            intermediate_size=getattr(text_config, "intermediate_size", 0),
            vocab_size=head.weight.shape[0],
            max_positions=text_config.max_position_embeddings,
            config_hash=config_hash(config),
            weights_hash=weights_hash(weight_files),
        )
        return cls(model, info, blocks)

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def layers(self) -> list[nn.Module]:
        """The decoder blocks, in order (see `_decoder_blocks`)."""
        return list(self._blocks)

    def ffn(self, layer: int) -> nn.Module:
        """The block's dense MLP: the child holding a hidden→intermediate and an intermediate→hidden linear.

        Fused gate/up projections (hidden→2·intermediate) count as hidden→intermediate.
        """
        d, f = self.info.hidden_size, self.info.intermediate_size
        block = self._block(layer)
        found = [
            child
            for child in block.children()
            if any(lin.in_features == d and lin.out_features in (f, 2 * f) for lin in _linears(child))
            and any(lin.in_features == f and lin.out_features == d for lin in _linears(child))
        ]
        if len(found) != 1:
            raise KdpipeError(
                f"teacher {self.info.model_type} layer {layer}: found {len(found)} dense FFN modules "
                f"(hidden {d} <-> intermediate {f}), need exactly 1; snapshots need dense-MLP blocks, use snapshot layers 'none'"
            )
        return found[0]

    def attention(self, layer: int) -> nn.Module:
        """The block's self-attention: the non-FFN child with linears reading and writing the residual width."""
        d = self.info.hidden_size
        ffn = self.ffn(layer)
        found = [
            child
            for child in self._block(layer).children()
            if child is not ffn
            and any(lin.in_features == d for lin in _linears(child))
            and any(lin.out_features == d for lin in _linears(child))
        ]
        if len(found) != 1:
            raise KdpipeError(
                f"teacher {self.info.model_type} layer {layer}: found {len(found)} attention modules, need exactly 1; "
                "disable attention snapshots for this teacher"
            )
        return found[0]

    @torch.inference_mode()
    def final_hidden(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, d) in the model dtype, without the LM head.

        Runs the decoder alone so that the full (B, T, V) logits never exist; `logits`
        applies the head to chunks of positions instead.
        """
        out = self.model.get_decoder()(input_ids=input_ids_BT.to(self.device), use_cache=False)
        return out.last_hidden_state  # (B, T, d)

    @torch.inference_mode()
    def logits(self, hidden_PD: torch.Tensor) -> torch.Tensor:
        """Float32 logits (P, V) for a chunk of final hidden states (P, d): the model's own head and softcap, kept in fp32."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return head_logits(hidden_PD, head.weight, head.bias, cap)

    def _block(self, layer: int) -> nn.Module:
        if not 0 <= layer < len(self._blocks):
            last = len(self._blocks) - 1
            raise KdpipeError(f"layer {layer} is out of range: teacher {self.info.model_type} has layers 0..{last}")
        return self._blocks[layer]


def check_tokenizer_compat(info: TeacherInfo, tokenizer_vocab_size: int, max_token_id: int, seq_len: int) -> None:
    """Refuse a tokenizer or sequence length this teacher cannot serve.

    The LM head may have MORE rows than the tokenizer has tokens: vocabularies are padded
    to a multiple of 64 or 128 for fast matmuls (Qwen2.5: 151,936 or 152,064 head rows for
    a 151,665-token tokenizer). The extra rows are never the target of a real token and
    are fine. Fewer rows than tokens would leave token ids without a logit.
    """
    if info.vocab_size < tokenizer_vocab_size:
        raise KdpipeError(
            f"tokenizer has {tokenizer_vocab_size} tokens but teacher {info.model_type}'s LM head has only "
            f"{info.vocab_size} rows; tokenize with the teacher's own tokenizer"
        )
    if max_token_id >= info.vocab_size:
        raise KdpipeError(
            f"token store contains token id {max_token_id} but teacher {info.model_type}'s LM head has "
            f"{info.vocab_size} rows; re-run prepare-data with the teacher's tokenizer"
        )
    if seq_len > info.max_positions:
        raise KdpipeError(
            f"sequence length {seq_len} exceeds teacher {info.model_type}'s max positions {info.max_positions}; "
            "re-run prepare-data with a shorter seq_len"
        )


def head_logits(hidden_PD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """Float32 logits (P, V): `hidden @ weightᵀ + bias`, then the final-logit softcap if the teacher has one.

    Shared by every backend, so that caches of one teacher get the same logits whatever ran its decoder.
    """
    logits_PV = _matmul_fp32(hidden_PD.to(weight_VD.device), weight_VD)  # (P, V)
    if bias_V is not None:
        logits_PV = logits_PV + bias_V.float()
    if softcap:
        logits_PV = torch.tanh(logits_PV / softcap) * softcap
    return logits_PV


def _load_causal_lm_config(root: Path) -> PreTrainedConfig:
    if not root.exists():
        raise KdpipeError(
            f"teacher path {root} does not exist; pass a local model directory (hub ids are not downloaded)"
        )
    if not (root / "config.json").is_file():
        raise KdpipeError(
            f"teacher path {root} is not a model directory (no config.json); pass a directory saved with save_pretrained"
        )
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdpipeError(
            f"teacher config {root / 'config.json'} cannot be read by transformers ({first_line}); check the file"
        ) from err
    if config.is_encoder_decoder:
        raise KdpipeError(f"teacher {root} is an encoder-decoder model ({config.model_type}); use a decoder-only causal LM")
    # BERT-style configs map to a causal-LM class but attend bidirectionally unless is_decoder is set.
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_decoder", True) is False:
        raise KdpipeError(
            f"teacher {root} ({config.model_type}) is not a causal language model; use a decoder-only causal LM"
        )
    return config


def _weight_files(root: Path) -> list[Path]:
    """The weight files transformers will load: safetensors if any, else PyTorch .bin files."""
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise KdpipeError(
            f"teacher {root} has no weight files (*.safetensors or pytorch_model*.bin); copy the weights into it"
        )
    for index_file in root.glob("*.index.json"):
        shards = set(json.loads(index_file.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise KdpipeError(
                f"teacher {root}: weight shards listed in {index_file.name} are missing ({', '.join(missing)}); copy them in"
            )
    return files


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise KdpipeError(f"teacher device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KdpipeError(
            f"teacher device {device!r} requested but CUDA is not available; use device 'cpu' or 'auto'"
        )
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise KdpipeError(f"teacher dtype {dtype!r} is not supported; use 'auto' or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _decoder_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """The longest `nn.ModuleList` under the decoder: its blocks, whatever the attribute is called."""
    lists = [m for m in model.get_decoder().modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise KdpipeError(
            f"teacher {model.config.model_type}: no list of decoder blocks found; use a standard decoder-only model"
        )
    return list(max(lists, key=len))


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _matmul_fp32(hidden_PD: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    """hidden @ weightᵀ with float32 output, without a float32 copy of a low-precision head.

    On CUDA a bf16/fp16 matmul accumulates in fp32 and `out_dtype` keeps that result
    instead of rounding logits to 8 bits of mantissa; elsewhere we upcast.
    """
    if weight_VD.dtype != torch.float32 and weight_VD.is_cuda:
        return torch.mm(hidden_PD.to(weight_VD.dtype), weight_VD.T, out_dtype=torch.float32)
    return hidden_PD.float() @ weight_VD.float().T
