"""Check the student of a train-student run against the cache's teacher before any work.

A student that the exported family's transformers config rejects, or whose shapes cannot
meet, would otherwise fail late: after the teacher's weights are loaded, or at the first
step with a traceback from deep inside attention, and after the run directory has been
written. These checks read config files only (the teacher's config.json, the student's),
so they cost milliseconds; `build_trainer` runs them before it touches the run directory.

LRC widths: the student keeps the teacher's heads and head_dim and is exported with an
explicit `head_dim`, so any residual width below the teacher's makes a working model, but
some families' configs still insist on `hidden_size % num_attention_heads == 0` (Llama
and Gemma2 in transformers 5: SmolLM2's 9 heads refuse d_S = 192). What a family accepts
is asked of its own config class, never re-encoded here, and a refused width is answered
with the nearest accepted ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from kdpipe.schemas.cache_format import CacheManifest
from kdpipe.schemas.errors import KdpipeError, parse_json
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.lrc import SUPPORTED_MODEL_TYPES, student_config

# What transformers raises for a config it refuses (its strict dataclass validators raise
# StrictDataclassError, which is not a ValueError).
_CONFIG_ERRORS = (ValueError, KeyError, TypeError, StrictDataclassError)


def check_student(config: TrainStudentConfig, manifest: CacheManifest) -> None:
    """Refuse, with one line, a student that cannot be built, trained or exported from this cache."""
    if config.student == "lrc":
        assert config.hidden_size is not None
        check_lrc_width(read_teacher_config(manifest), config.hidden_size, config.tie_embeddings)
    else:
        assert config.student_config is not None
        check_plain_config(read_student_config(config.student_config), manifest, where=f"student config {config.student_config}")


def teacher_dir(manifest: CacheManifest) -> Path:
    """The directory of the cache's teacher; refused if it is gone."""
    path = Path(manifest.teacher.path)
    if not path.is_dir():
        raise KdpipeError(
            f"teacher directory {path} named in the cache manifest does not exist; put the teacher back there "
            "(or train a plain student)"
        )
    return path


def read_teacher_config(manifest: CacheManifest) -> PretrainedConfig:
    """The Hugging Face config of the cache's teacher (its config.json only, no weights)."""
    path = teacher_dir(manifest)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, *_CONFIG_ERRORS) as err:
        raise KdpipeError(f"teacher {path}: its config.json cannot be read ({_problem(err)}); restore the teacher") from None


def check_lrc_width(
    teacher_config: PretrainedConfig, hidden_size: int, tie_embeddings: bool | None, *, option: str = "--hidden-size"
) -> None:
    """Refuse an LRC width d_S that is not below d_T or that the teacher family's config rejects (naming `option`)."""
    model_type = teacher_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KdpipeError(
            f"LRC student: teacher architecture '{model_type}' is not supported; "
            f"use a {', '.join(SUPPORTED_MODEL_TYPES)} teacher or a plain student"
        )
    d_T = teacher_config.hidden_size

    def problem(width: int) -> str | None:
        return lrc_width_problem(teacher_config, width, tie_embeddings)

    if not 1 <= hidden_size < d_T:
        widest = nearest_accepted(lambda w: problem(w) is None, d_T - 1, low=1, high=d_T - 1)
        raise KdpipeError(
            f"{option} {hidden_size}: an LRC student must be narrower than its teacher (hidden size {d_T}); "
            f"the widest valid one is {widest[0]}"
        )
    refused = problem(hidden_size)
    if refused is not None:
        near = nearest_accepted(lambda w: problem(w) is None, hidden_size, low=1, high=d_T - 1)
        raise KdpipeError(
            f"{option} {hidden_size}: transformers refuses a {model_type} student of that width ({refused}); "
            f"nearest valid widths: {', '.join(map(str, near))}"
        )


def lrc_width_problem(teacher_config: PretrainedConfig, hidden_size: int, tie_embeddings: bool | None) -> str | None:
    """Why the teacher family's config refuses an LRC student of width `hidden_size`, or None if it accepts it."""
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    tie = bool(teacher_config.tie_word_embeddings) if tie_embeddings is None else tie_embeddings
    try:
        student_config(teacher_config, hidden_size, head_dim, tie)
    except _CONFIG_ERRORS as err:
        return _problem(err)
    return None


def half_lrc_width(teacher_config: PretrainedConfig, tie_embeddings: bool | None = None) -> int:
    """Half the teacher's width, or the nearest width below it that the family accepts (SmolLM2: 288)."""
    half = max(1, teacher_config.hidden_size // 2)

    def accepts(width: int) -> bool:
        return lrc_width_problem(teacher_config, width, tie_embeddings) is None

    return nearest_accepted(accepts, half, low=1, high=teacher_config.hidden_size - 1)[0]


def nearest_accepted(accepts: Callable[[int], bool], width: int, *, low: int, high: int) -> list[int]:
    """The closest accepted value at or below `width` and the closest above it, within [low, high]."""
    below = next((w for w in range(min(width, high), low - 1, -1) if accepts(w)), None)
    above = next((w for w in range(max(width + 1, low), high + 1) if accepts(w)), None)
    return [w for w in (below, above) if w is not None]


def read_student_config(path: Path) -> PretrainedConfig:
    """A Hugging Face causal-LM config from a config.json file (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise KdpipeError(f"student config {path} does not exist; pass a Hugging Face config.json")
    data = parse_json(path.read_text(encoding="utf-8"), f"student config {path}", "fix the file")
    if not isinstance(data, dict) or "model_type" not in data:
        raise KdpipeError(f"student config {path} has no model_type; write a Hugging Face config.json such as a model's own")
    model_type = data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except _CONFIG_ERRORS as err:
        hint = ""
        if isinstance(data.get("hidden_size"), int) and data["hidden_size"] > 0:
            near = nearest_accepted(lambda w: _builds(model_type, {**data, "hidden_size": w}), data["hidden_size"],
                                    low=1, high=2 * data["hidden_size"])  # fmt: skip
            if near:
                hint = f"; nearest valid hidden_size: {', '.join(map(str, near))}"
        raise KdpipeError(f"student config {path}: transformers cannot build a {model_type!r} config ({_problem(err)}){hint}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise KdpipeError(f"student config {path}: {model_type!r} is not a causal language model; use a decoder-only architecture")
    return config


def check_plain_config(config: PretrainedConfig, manifest: CacheManifest, *, where: str) -> None:
    """Refuse a plain student config that would fail to train on this cache, or train on the wrong thing."""
    text = config.get_text_config()
    if getattr(text, "final_logit_softcapping", None):
        raise KdpipeError(
            f"{where} ({config.model_type}) caps its logits (final_logit_softcapping), which the chunked "
            "KD/LM loss does not apply; set final_logit_softcapping to null in the student config"
        )
    seq_len = manifest.token_store.seq_len
    max_positions = getattr(text, "max_position_embeddings", None)
    if max_positions is not None and max_positions < seq_len:
        raise KdpipeError(
            f"{where}: max_position_embeddings {max_positions} is below the cache's sequence length {seq_len}; raise it"
        )
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and vocab < manifest.teacher.vocab_size:
        raise KdpipeError(
            f"{where}: vocabulary has {vocab} ids but the cache's teacher has {manifest.teacher.vocab_size} "
            "(cached targets use them all); set vocab_size >= that in the student config and use the teacher's tokenizer"
        )
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise KdpipeError(
            f"{where}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads} (each KV head serves "
            f"a whole group of query heads); use one of {', '.join(map(str, divisors))}"
        )


def _builds(model_type: str, data: dict) -> bool:
    try:
        AutoConfig.for_model(model_type, **data)
    except _CONFIG_ERRORS:
        return False
    return True


def _problem(err: BaseException) -> str:
    """The line of a transformers error that says what is wrong (its config validators put it last, under a header)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[-1] if isinstance(err, StrictDataclassError) else lines[0]
    return (line.split(": ", 1)[1] if line.startswith(("ValueError: ", "TypeError: ")) else line).rstrip(".")
