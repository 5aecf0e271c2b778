"""Exported students are servable by vLLM: the real commands (cache-teacher, train-student,
export-student) on a tiny teacher, then vLLM's greedy tokens equal transformers' for a few prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdpipe.teacher_cache.vllm_backend import import_vllm
from tests.integration.test_train_cli import in_process  # the CLI's main() in this process

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 11, 64], [1, 2, 3]]
NEW_TOKENS = 8


def kdpipe(*args: object) -> None:
    """The real CLI entry point in this process; it must succeed."""
    assert in_process(*args) == 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory, vllm_teacher, vllm_store) -> Path:
    out = tmp_path_factory.mktemp("serving") / "cache"
    kdpipe("cache-teacher", "--teacher", vllm_teacher("llama")[0], "--tokens", vllm_store("llama"), "--out", out,
           "--snapshot-layers", "all", "--snapshot-fraction", "0.25", "--sequences-per-shard", "32")  # fmt: skip
    return out


def transformers_greedy(model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


def vllm_greedy(model_dir: Path) -> list[list[int]]:
    vllm = import_vllm()
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=64, skip_tokenizer_init=True,
                   kv_cache_memory_bytes=64 << 20, seed=0)  # fmt: skip
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, detokenize=False, ignore_eos=True)
        results = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in results]
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("student", ["lrc", "plain"])
def test_an_exported_student_generates_the_same_greedy_tokens_in_vllm(tmp_path, cache, student):
    if student == "lrc":
        options = ["--student", "lrc", "--hidden-size", "64"]  # heads and head_dim (32) stay the teacher's
    else:
        config = tmp_path / "student.json"
        config.write_text(json.dumps(dict(
            model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        )))  # fmt: skip
        options = ["--student", "plain", "--student-config", config, "--clone-weight", "0"]
    kdpipe("train-student", "--cache", cache, "--out", tmp_path / "run", *options, "--steps", "2", "--batch-size", "2",
           "--lr", "1e-2", "--num-workers", "0")  # fmt: skip
    kdpipe("export-student", tmp_path / "run", "--out", tmp_path / "export")
    expected = transformers_greedy(tmp_path / "export")
    assert vllm_greedy(tmp_path / "export") == expected
