"""Export an LRC student as a standard Hugging Face model directory.

The projections are multiplied out into plain weights of the teacher's own architecture
with `hidden_size = d_S` and an explicit `head_dim`, so the directory loads with
`AutoModelForCausalLM.from_pretrained` and serves with vLLM; kdpipe is not needed to
use it. The directory is written under a temporary name and renamed into place, so a
crash never leaves a half-written export behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.lrc import LRCStudent

# Files that make up a Hugging Face tokenizer; a model directory holds them next to weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# At least one of these must exist: without them there is no vocabulary.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise KdpipeError(f"tokenizer directory {tokenizer_dir} does not exist; pass the teacher's model or tokenizer directory")
    if not any((tokenizer_dir / name).is_file() for name in VOCAB_FILES):
        raise KdpipeError(f"tokenizer directory {tokenizer_dir} has none of {', '.join(VOCAB_FILES)}; pass a Hugging Face tokenizer directory")
    return [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]


def export_student(
    student: LRCStudent, out_dir: Path, *, tokenizer_dir: Path | None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write `student` as a standard *ForCausalLM directory (safetensors) at `out_dir`; return it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise KdpipeError(f"export directory {out_dir} already exists; remove it or choose another")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []

    config = copy.deepcopy(student.config)
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = {name: tensor.to(device="cpu", dtype=dtype) for name, tensor in student.student_weights().items()}
    # assign=True adopts the computed tensors instead of copying into meta storage.
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if student.tied else set())
    assert not missing and not result.unexpected_keys, f"export weights do not fit {type(model).__name__}: {missing} {result.unexpected_keys}"
    if student.tied:
        model.tie_weights()
    # The rotary buffers are not part of the weights: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    try:
        model.save_pretrained(tmp_dir)
        assert (tmp_dir / "model.safetensors").is_file() or (tmp_dir / "model.safetensors.index.json").is_file()
        for path in tokenizer_files:
            shutil.copy2(path, tmp_dir / path.name)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
