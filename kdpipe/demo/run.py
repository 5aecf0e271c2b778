"""`kdpipe demo`: the whole pipeline on one corpus, and four students compared at one token budget.

Stages, each skipped when its output is already complete (so a killed demo resumes):

    OUT/corpus/        train.jsonl + val.jsonl: the embedded stdlib corpus, or --corpus split the same way
    OUT/tokenizer/     BPE tokenizer trained on train.jsonl           } only without --teacher:
    OUT/tokens/        token store of the whole corpus                } the demo trains its own
    OUT/teacher/       small Llama trained on it for --teacher-minutes } teacher
    OUT/student_tokens/  token store of the first documents holding --student-tokens, + the same val
    OUT/teacher_val_loss.json  only with --teacher: its held-out LM loss on that val split (the floor)
    OUT/cache_rs_kd/   rs-kd cache of student_tokens, with FFN snapshots (every layer of the demo teacher)
    OUT/cache_top_k/   top-k cache, k = rs-kd's mean unique ids per position (comparable logit storage)
    OUT/runs/{lm_only, top_k_kd, rs_kd_kd, lrc_clone_rs_kd}
    OUT/report/        report.md, loss_curves.png, calibration.png

The students see only `student_tokens`, a small slice of what the teacher trained on, so
the teacher knows more than they can learn alone. Students (a)-(c) are plain models of the
same shape an LRC student exports to (student width, teacher depth, heads and FFN width),
randomly initialised; (d) is an LRC student built from the frozen teacher with the clone
loss. KL to teacher is measured against each run's own cache: (a), (c) and (d) share the
rs-kd cache and are comparable; (b) is measured against its top-k targets.

`--teacher` takes a Hugging Face directory or a packaged teacher's name (`smollm2`,
converted once by `kdpipe.pipeline.gguf_teacher`); the students' width, budget and learning
rates then follow `GIVEN_TEACHER` in `kdpipe.schemas.demo_config`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, PretrainedConfig

from kdpipe.demo.corpus import read_stdlib_sources, write_jsonl
from kdpipe.demo.teacher import SUMMARY_FILE, DemoTeacherConfig, evaluate_loss, load_split, train_demo_teacher, train_demo_tokenizer
from kdpipe.pipeline.corpus import CorpusReader, expand_inputs
from kdpipe.pipeline.gguf_teacher import GGUF_TEACHERS, gguf_teacher_dir
from kdpipe.pipeline.packing import assign_val
from kdpipe.pipeline.prepare import prepare_data
from kdpipe.pipeline.report import RunMetrics, load_run, write_report
from kdpipe.pipeline.status import run_status
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.config import to_dict
from kdpipe.schemas.demo_config import RESUMABLE_CHANGES, DemoConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import check_writable_dir
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.run_dir import RUN_MANIFEST
from kdpipe.schemas.token_store import TokenStore
from kdpipe.schemas.tokenizer import load_tokenizer
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.run import train_student
from kdpipe.student_train.validate import check_lrc_width, half_lrc_width
from kdpipe.teacher_cache.inspect import CacheStats, cache_stats
from kdpipe.teacher_cache.run import cache_teacher

CONFIG_FILE = "demo_config.yaml"
TEACHER_LOSS_FILE = "teacher_val_loss.json"
_EVALS_PER_RUN = 8


@dataclass(frozen=True, slots=True)
class StudentResult:
    """One row of the results table."""

    name: str
    description: str
    cache: str
    lm_loss: float
    kl: float
    ece: float
    tokens_per_s: float
    cache_logits_bytes_per_token: float
    cache_bytes_per_token: float


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the demo produced."""

    out: Path
    report: Path
    teacher_val_loss: float | None
    """Held-out loss of the demo teacher (None for a --teacher given by the user)."""
    results: list[StudentResult]
    seconds: float

    def table(self) -> Table:
        """The results as a rich table."""
        table = Table(title="kdpipe demo: four students at an equal token budget", title_justify="left")
        for header in ("student", "cache", "LM loss", "KL", "ECE", "tok/s", "logit B/tok", "cache B/tok"):
            table.add_column(header, justify="left" if header in ("student", "cache") else "right", no_wrap=True)
        for r in self.results:
            table.add_row(
                r.description, r.cache, f"{r.lm_loss:.4f}", f"{r.kl:.4f}", f"{r.ece:.4f}",
                f"{r.tokens_per_s:,.0f}", f"{r.cache_logits_bytes_per_token:.1f}", f"{r.cache_bytes_per_token:.1f}",
            )  # fmt: skip
        return table

    def text(self) -> str:
        """The closing lines under the table."""
        teacher = "" if self.teacher_val_loss is None else f"Teacher held-out LM loss {self.teacher_val_loss:.4f}. "
        return (
            "LM loss: held-out next-token cross-entropy (nats). KL: to the teacher's cached targets, measured against "
            "each run's own cache (top-k's against its truncated targets). ECE: calibration error of the top-1 token. "
            "logit B/tok: cache bytes per token of the sparse logits alone; cache B/tok: every file (snapshots, token ids). "
            f"{teacher}Report and plots: {self.report.parent}; demo took {self.seconds / 60:.1f} min."
        )


# (run name, description, cache it reads, student kind); the loss weights follow in `_student_config`.
_STUDENTS = (
    ("lm_only", "LM-only baseline", "rs-kd", "plain"),
    ("top_k_kd", "top-k KD", "top-k", "plain"),
    ("rs_kd_kd", "rs-kd KD", "rs-kd", "plain"),
    ("lrc_clone_rs_kd", "LRC + clone + rs-kd KD", "rs-kd", "lrc"),
)


def run_demo(config: DemoConfig, *, console: Console | None = None) -> DemoSummary:
    """Run (or resume) every demo stage and return the comparison of the four students."""
    console = console or Console()
    started = time.perf_counter()
    out = Path(config.out)
    check_writable_dir(out, "--out")
    _claim_out_dir(config, out)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_stages(config, out, console, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run_stages(config: DemoConfig, out: Path, console: Console, started: float) -> DemoSummary:
    """corpus → teacher → student token store → the two caches → four students → report, in this order."""
    train_path, val_path = _corpus(config, out / "corpus", console)
    teacher_dir, teacher_val_loss = _teacher(config, out, train_path, val_path, console)
    teacher_config = AutoConfig.from_pretrained(str(teacher_dir)).get_text_config()
    width = _student_width(config, teacher_config, console)
    student_train_path = _student_documents(config, teacher_dir, train_path, out / "corpus" / "student_train.jsonl", console)
    student_tokens = out / "student_tokens"
    _prepare(config, [student_train_path, val_path], teacher_dir, student_tokens, console)
    if teacher_val_loss is None:
        teacher_val_loss = _given_teacher_loss(teacher_dir, student_tokens, out / TEACHER_LOSS_FILE, console)

    rs_kd = out / "cache_rs_kd"
    _cache(config, teacher_dir, student_tokens, rs_kd, mode="rs-kd", top_k=None, console=console)
    rs_kd_stats = cache_stats(rs_kd)
    top_k = max(1, round(rs_kd_stats.mean_ids_per_position))
    top_k_cache = out / "cache_top_k"
    _cache(config, teacher_dir, student_tokens, top_k_cache, mode="top-k", top_k=top_k, console=console)
    caches = {"rs-kd": rs_kd, "top-k": top_k_cache}
    stats = {"rs-kd": rs_kd_stats, "top-k": cache_stats(top_k_cache)}

    plain_config = _plain_student_config(teacher_config, width, out / "runs" / "plain_student_config.json")
    run_dirs = []
    for name, _, cache_mode, kind in _STUDENTS:
        run_dir = out / "runs" / name
        _train(_student_config(config, name, kind, width, caches[cache_mode], run_dir, plain_config), console)
        run_dirs.append(run_dir)

    report = write_report(run_dirs, out / "report")
    results = [
        _result(load_run(run_dir), description, stats[cache_mode])
        for run_dir, (_, description, cache_mode, _) in zip(run_dirs, _STUDENTS)
    ]
    return DemoSummary(out=out, report=report, teacher_val_loss=teacher_val_loss, results=results, seconds=time.perf_counter() - started)


def _claim_out_dir(config: DemoConfig, out: Path) -> None:
    """Record the options in OUT; refuse to resume a demo directory made with other options."""
    path = out / CONFIG_FILE
    current = {k: v for k, v in to_dict(config).items() if k not in RESUMABLE_CHANGES}
    if path.is_file():
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for name, value in current.items():
            if recorded.get(name) != value:
                raise KdpipeError(
                    f"demo directory {out} was made with {name}={recorded.get(name)!r}, this run gives {value!r}; "
                    "use the same options to resume, or another --out"
                )
        return
    if out.exists() and any(out.iterdir()):
        raise KdpipeError(f"--out {out} exists and is not a kdpipe demo directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(current, sort_keys=False), encoding="utf-8")


def _corpus(config: DemoConfig, corpus_dir: Path, console: Console) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl: the embedded stdlib corpus, or the user's corpus split by the same text hash."""
    train_path, val_path = corpus_dir / "train.jsonl", corpus_dir / "val.jsonl"
    if train_path.is_file() and val_path.is_file():
        console.print(f"corpus: kept {corpus_dir}", highlight=False)
        return train_path, val_path
    if config.corpus is None:
        source, more = "the embedded stdlib corpus", "raise --corpus-bytes"
        documents = read_stdlib_sources(config.corpus_bytes).documents
    else:
        source, more = f"corpus {config.corpus}", "give more documents"
        reader = CorpusReader(expand_inputs([config.corpus]), text_field=config.text_field, batch_docs=1024, skip_bad_rows=False)
        documents = [text for batch in reader for text in batch.texts if text]
    is_val = assign_val(documents, config.val_fraction)  # (N,) bool
    if is_val.all() or not is_val.any():
        raise KdpipeError(
            f"{source} gives {len(documents)} documents, too few to split into train and val at val_fraction "
            f"{config.val_fraction}; {more} or raise --val-fraction (with a new --out)"
        )
    corpus_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(val_path, [d for d, v in zip(documents, is_val) if v])
    write_jsonl(train_path, [d for d, v in zip(documents, is_val) if not v])  # written last: marks the stage complete
    console.print(f"corpus: {int((~is_val).sum()):,} train and {int(is_val.sum()):,} val documents from {source}", highlight=False)
    return train_path, val_path


def _teacher(config: DemoConfig, out: Path, train_path: Path, val_path: Path, console: Console) -> tuple[Path, float | None]:
    """The user's teacher, or the demo's: tokenizer, whole-corpus token store, then a few minutes of training."""
    if config.teacher is not None:
        teacher = Path(config.teacher)
        if not teacher.exists() and str(teacher) in GGUF_TEACHERS:
            name, teacher = str(teacher), gguf_teacher_dir(str(teacher))  # converted once (~30 s), then reused
            console.print(f"teacher: {name}, packaged, at {teacher}", highlight=False)
        if not (teacher / "config.json").is_file():
            raise KdpipeError(
                f"--teacher {config.teacher} is not a Hugging Face model directory (no config.json) nor a packaged "
                f"teacher ({', '.join(GGUF_TEACHERS)})"
            )
        return teacher, None
    teacher_dir = out / "teacher"
    if (teacher_dir / SUMMARY_FILE).is_file():
        summary = json.loads((teacher_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        console.print(f"teacher: kept {teacher_dir} (val loss {summary['val_loss']:.3f})", highlight=False)
        return teacher_dir, float(summary["val_loss"])
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        building = out / f".tokenizer.tmp-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        train_demo_tokenizer([train_path], building, vocab_size=config.vocab_size)  # val stays unseen
        building.rename(tokenizer_dir)
    _prepare(config, [train_path, val_path], tokenizer_dir, out / "tokens", console)
    teacher_config = DemoTeacherConfig(
        hidden_size=config.teacher_hidden_size, num_layers=config.teacher_layers,
        intermediate_size=4 * config.teacher_hidden_size, seed=config.seed, num_threads=torch.get_num_threads(),
    )  # fmt: skip
    summary = train_demo_teacher(
        out / "tokens", teacher_dir, config=teacher_config, minutes=config.teacher_minutes, steps=config.teacher_max_steps
    )
    console.print(summary.text(), highlight=False, soft_wrap=True)
    return teacher_dir, summary.val_loss


def _student_width(config: DemoConfig, teacher_config: PretrainedConfig, console: Console) -> int:
    """--student-hidden-size, or half the teacher's width; refused now, before any caching, if the family rejects it."""
    width = config.student_hidden_size or half_lrc_width(teacher_config)
    check_lrc_width(teacher_config, width, None, option="--student-hidden-size")
    if config.student_hidden_size is None:
        console.print(f"students: width {width}, half the teacher's {teacher_config.hidden_size}", highlight=False)
    return width


def _given_teacher_loss(teacher: Path, tokens: Path, path: Path, console: Console) -> float:
    """A given teacher's held-out LM loss on the students' val split (float32), computed once and kept in `path`."""
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["val_loss"])
    from transformers import AutoModelForCausalLM

    val = TokenStore.open(tokens).split("val")
    tokens_ST, labels_ST = load_split(val, val.num_sequences)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        loss, count = evaluate_loss(model, tokens_ST, labels_ST, batch_size=4)
    del model
    path.write_text(json.dumps({"val_loss": loss, "val_tokens": count}) + "\n", encoding="utf-8")
    console.print(f"teacher: held-out LM loss {loss:.3f} on {count:,} val tokens", highlight=False)
    return loss


def _student_documents(config: DemoConfig, tokenizer_dir: Path, train_path: Path, out_path: Path, console: Console) -> Path:
    """The first train documents that hold the students' token budget (with separators), as JSONL."""
    if out_path.is_file():
        return out_path
    tokenizer = load_tokenizer(tokenizer_dir)
    needed = config.student_tokens + config.seq_len  # a spare sequence: the packed tail is dropped
    chosen: list[str] = []
    tokens = 0
    with train_path.open(encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            chosen.append(text)
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the EOS separator
            if tokens >= needed:
                break
    if tokens < needed:
        console.print(
            f"students: the corpus has {tokens:,} train tokens, fewer than --student-tokens {config.student_tokens:,}; "
            "students will repeat it", highlight=False,
        )  # fmt: skip
    write_jsonl(out_path, chosen)
    return out_path


def _prepare(config: DemoConfig, inputs: list[Path], tokenizer: Path, out: Path, console: Console) -> None:
    """A token store; the same val_fraction as the corpus split, so val documents land in val again."""
    prepare_config = PrepareDataConfig(
        inputs=[str(p) for p in inputs], tokenizer=tokenizer, out=out, seq_len=config.seq_len,
        val_fraction=config.val_fraction, tail="pad",
    )  # fmt: skip
    console.print(prepare_data(prepare_config).text(), highlight=False, soft_wrap=True)


def _cache(
    config: DemoConfig, teacher: Path, tokens: Path, out: Path, *, mode: str, top_k: int | None, console: Console
) -> None:
    """rs-kd with FFN snapshots of every layer (LRC clone targets), or top-k without snapshots; resumes by shard."""
    rs_kd = mode == "rs-kd"
    sampler = {"num_draws": config.num_draws} if rs_kd else {"top_k": top_k, "ghost": True}
    # rs-kd: all 4 layers of the demo teacher; of a given teacher cache-teacher's default (8 of SmolLM2's 30 layers),
    # as each snapshotted layer costs the LRC student a clone-loss term.
    layers = ({"snapshot_layers": "all"} if config.teacher is None else {}) if rs_kd else {"snapshot_layers": "none"}
    cache_config = CacheTeacherConfig(
        teacher=teacher, tokens=tokens, out=out, mode=mode, **sampler, **layers,  # type: ignore[arg-type]
        snapshot_fraction=config.snapshot_fraction, seed=config.seed, device="cpu", sequences_per_shard=128,
    )  # fmt: skip
    cache_teacher(cache_config, console=console)


def _plain_student_config(teacher_config: PretrainedConfig, width: int, path: Path) -> Path:
    """The teacher's config at the student width: the shape an LRC student exports to (explicit head_dim)."""
    student = teacher_config.to_dict()
    student["head_dim"] = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    student["hidden_size"] = width
    student["model_type"] = teacher_config.model_type
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(student, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _student_config(
    config: DemoConfig, name: str, kind: str, width: int, cache: Path, run_dir: Path, plain_config: Path
) -> TrainStudentConfig:
    """One student's run: same tokens, batch, schedule and seed for all; only the losses and the student differ."""
    tokens_per_step = config.student_batch_size * config.seq_len
    steps = max(1, math.ceil(config.student_tokens / tokens_per_step))
    kd = 0.0 if name == "lm_only" else config.kd_alpha
    return TrainStudentConfig(
        cache=cache, out=run_dir, student=kind,  # type: ignore[arg-type]
        hidden_size=width if kind == "lrc" else None,
        student_config=plain_config if kind == "plain" else None,
        steps=steps, batch_size=config.student_batch_size, lr=config.lrc_lr if kind == "lrc" else config.student_lr, lr_schedule="wsd",
        warmup_steps=max(1, steps // 20), lm_weight=1.0 if name == "lm_only" else 1.0 - config.kd_alpha, kd_weight=kd,
        clone_weight=config.clone_weight if kind == "lrc" else 0.0,
        eval_every=max(1, steps // _EVALS_PER_RUN), eval_batches=config.eval_batches, log_every=max(1, steps // 100),
        checkpoint_every=max(1, steps // 4), keep_checkpoints=1, seed=config.seed, num_workers=1, device="cpu", resume=True,
    )  # fmt: skip


def _train(config: TrainStudentConfig, console: Console) -> None:
    """Train a student unless its run has already reached its planned steps."""
    if (Path(config.out) / RUN_MANIFEST).is_file():
        progress = run_status(config.out)
        if progress.steps_done >= progress.planned_steps:
            console.print(f"student {config.out.name}: kept (complete)", highlight=False)
            return
    console.print(f"student {config.out.name}: training", highlight=False)
    summary = train_student(config)
    if summary.preempted:
        raise KdpipeError(f"student run {config.out} was interrupted; re-run the demo to resume it")
    console.print(summary.describe(), highlight=False, soft_wrap=True)


def _result(run: RunMetrics, description: str, stats: CacheStats) -> StudentResult:
    evaluated = run.last_eval
    if evaluated.get("lm_loss") is None:
        raise KdpipeError(f"student run {run.path} has no evaluation in its metrics; delete it and re-run the demo")
    return StudentResult(
        name=run.name, description=description, cache=stats.mode,
        lm_loss=float(evaluated["lm_loss"]), kl=float(evaluated.get("kl") or math.nan), ece=float(evaluated.get("ece") or math.nan),
        tokens_per_s=run.tokens_per_s or math.nan,
        cache_logits_bytes_per_token=stats.logits_bytes_per_token,
        cache_bytes_per_token=stats.total_bytes / max(stats.tokens, 1),
    )  # fmt: skip
