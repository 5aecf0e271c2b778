"""Fixtures of the vLLM backend's tests: vLLM-servable tiny teachers and the skip/fail rule.

These tests need vLLM (its CPU build here: `make install-vllm` builds `.venv-vllm`, and
`make test` runs them there). Where vLLM cannot be imported they skip, except under CI=true,
where a missing vLLM is a broken install and fails them.

vLLM's CPU attention kernels take head_dim 32 and up, so these teachers are the families of
tests/conftest.py widened to hidden 128, head_dim 32, FFN 256 (the shared tiny teachers use
head_dim 16).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.conftest import _HEAD_ROWS, _SEEDS, EOS_TOKEN, _family_config, build_tiny_tokenizer
from tests.unit.teacher_cache.test_run import build_token_store

VLLM_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(autouse=True, scope="session")
def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        message = "vllm is not importable; run `make test-vllm`, which builds .venv-vllm with vLLM's CPU build"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def vllm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, PreTrainedModel]]:
    """Factory: `vllm_teacher(family)` → (saved directory, the float32 model), built once per session."""
    built: dict[str, tuple[Path, PreTrainedModel]] = {}
    tokenizer = build_tiny_tokenizer()

    def get(family: str) -> tuple[Path, PreTrainedModel]:
        if family not in built:
            config = _family_config(family, _HEAD_ROWS[family], tokenizer.convert_tokens_to_ids(EOS_TOKEN))
            config.hidden_size, config.head_dim, config.intermediate_size = 128, 32, 256
            torch.manual_seed(_SEEDS[family])
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
            path = tmp_path_factory.mktemp(f"vllm-{family}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[family] = (path, model)
        return built[family]

    return get


@pytest.fixture(scope="session")
def vllm_store(tmp_path_factory: pytest.TempPathFactory, vllm_teacher) -> Callable[[str], Path]:
    """Factory: `vllm_store(family)` → a token store built with that teacher's tokenizer, once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_token_store(tmp_path_factory.mktemp(f"vllm-store-{family}"), vllm_teacher(family)[0])
        return built[family]

    return get
