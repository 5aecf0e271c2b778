"""Export a student (LRC or plain) as a standard Hugging Face model directory.

`export_run` reads a run directory's latest complete checkpoint; `export_student` writes
any student. A plain student is saved as it is. For an LRC student the projections are multiplied out into plain weights of the teacher's own architecture
with `hidden_size = d_S` and an explicit `head_dim`, so the directory loads with
`AutoModelForCausalLM.from_pretrained` and serves with vLLM; kdpipe is not needed to
use it. The directory is written under a temporary name and renamed into place, so a
crash never leaves a half-written export behind.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from kdpipe.schemas.cache_format import CacheManifest
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import check_writable_dir
from kdpipe.schemas.run_dir import RUN_MANIFEST, latest_checkpoint, read_run_config, read_run_manifest
from kdpipe.student_train.builders import PlainStudent, Student, build_plain, build_student
from kdpipe.student_train.checkpoint import load_checkpoint
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


def export_run(run_dir: Path, out: Path, *, dtype: str = "float32") -> Path:
    """Write the run's latest complete checkpoint as a Hugging Face model directory with the teacher's tokenizer."""
    run_dir = Path(run_dir)
    run = read_run_manifest(run_dir)
    config = read_run_config(run_dir)
    if Path(out).exists():
        raise KdpipeError(f"export directory {out} already exists; remove it or choose another --out")
    check_writable_dir(Path(out), "--out", beside=True)  # built next to `out`, then renamed into place
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise KdpipeError(f"run {run_dir} has no complete checkpoint yet; train it until it writes one, then export")
    manifest = CacheManifest.from_json(json.dumps(run["cache"]["manifest"]), where=f"{run_dir / RUN_MANIFEST}")
    teacher_dir = Path(manifest.teacher.path)
    cpu = torch.device("cpu")
    if config.student == "lrc":
        student: Student = build_student(config, manifest, device=cpu)
    else:
        stored = dict(run["student"]["config"])
        student = build_plain(AutoConfig.for_model(stored.pop("model_type"), **stored), manifest)
    student.load_state_dict(load_checkpoint(checkpoint).model_state, strict=True)
    student.eval()
    if not any((teacher_dir / name).is_file() for name in VOCAB_FILES):
        raise KdpipeError(f"teacher directory {teacher_dir} holds no tokenizer ({', '.join(VOCAB_FILES)}); put it back")
    return export_student(student, Path(out), tokenizer_dir=teacher_dir, dtype=getattr(torch, dtype))


def export_student(student: Student, out_dir: Path, *, tokenizer_dir: Path | None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `student` as a standard *ForCausalLM directory (safetensors) at `out_dir`; return it."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise KdpipeError(f"export directory {out_dir} already exists; remove it or choose another")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    model = student.model.to(dtype) if isinstance(student, PlainStudent) else _multiplied_out(student, dtype)
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


def _multiplied_out(student: LRCStudent, dtype: torch.dtype) -> PreTrainedModel:
    """The LRC student as a model of the teacher's architecture with plain weights."""
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
    return model
