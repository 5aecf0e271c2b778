"""Config of `kdpipe demo`: the whole pipeline on one small corpus, four students compared.

Defaults are sized for 2 CPU cores and under 15 minutes end to end: a 4-minute teacher,
two caches, and four students at the same token budget of 150K tokens each. Every field that decides an
output is recorded in `OUT/demo_config.yaml`; a re-run with other such options is refused
(`RESUMABLE_CHANGES` may differ), so a resumed demo never mixes outputs of two settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdpipe.schemas.config import option
from kdpipe.schemas.errors import KdpipeError

RESUMABLE_CHANGES = frozenset({"out", "teacher_minutes", "threads"})
"""Options a re-run may give differently: `teacher_minutes` only matters until the teacher is saved, `threads` is speed."""


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    """Options of `kdpipe demo`."""

    out: Path = option(Path("demo_out"), "Directory of every demo output; a re-run resumes, skipping complete stages.")
    teacher: Path | None = option(
        None, "Local Hugging Face teacher directory (with its tokenizer); skips training the demo tokenizer and teacher."
    )
    corpus: str | None = option(
        None, "Corpus file, directory or glob (.txt/.jsonl/.parquet) instead of the embedded Python-stdlib corpus."
    )
    text_field: str = option("text", "JSON field or Parquet column holding the text of --corpus documents.")
    corpus_bytes: int = option(6_000_000, "Embedded corpus: bytes of standard-library source taken.")
    val_fraction: float = option(0.03, "Fraction of documents held out for validation (chosen by a hash of the text).")
    vocab_size: int = option(4096, "Demo tokenizer: BPE vocabulary size, specials included.")
    seq_len: int = option(256, "Tokens per packed sequence, for the teacher and the students.")
    teacher_minutes: float = option(4.0, "Demo teacher: training time budget in minutes.")
    teacher_max_steps: int = option(1_000_000, "Demo teacher: most optimizer steps (the minutes usually decide).")
    teacher_hidden_size: int = option(256, "Demo teacher: residual width (FFN width is 4x, 4 attention heads).")
    teacher_layers: int = option(4, "Demo teacher: decoder blocks.")
    num_draws: int = option(50, "rs-kd cache: draws per position (the top-k cache keeps about as many ids as rs-kd stores).")
    snapshot_fraction: float = option(0.03125, "rs-kd cache: fraction of positions with FFN snapshots of every layer (LRC clone targets).")
    student_tokens: int = option(150_000, "Training tokens of each student (the same for all four).")
    student_hidden_size: int = option(128, "Students' residual width (smaller than the teacher's).")
    student_batch_size: int = option(8, "Students: sequences per optimizer step.")
    student_lr: float = option(2e-3, "Students: peak learning rate (warm-up-stable-decay schedule).")
    kd_alpha: float = option(0.7, "KD students: loss = (1 - alpha) * LM + alpha * KD.")
    clone_weight: float = option(0.5, "LRC student: weight of the clone loss on the cached FFN snapshots.")
    eval_batches: int = option(8, "Students: held-out batches per evaluation (8 evaluations per run).")
    seed: int = option(0, "Seed of the teacher, the samplers and the students.")
    threads: int | None = option(
        None, "CPU threads torch may use (default: all cores); 1 is faster on a machine shared with other busy jobs."
    )

    def __post_init__(self) -> None:
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
        if not self.teacher_minutes > 0 or not self.student_lr > 0:
            raise KdpipeError("demo options teacher_minutes and student_lr must be > 0")
        if self.teacher_hidden_size % 4:
            raise KdpipeError(f"demo option teacher_hidden_size={self.teacher_hidden_size} must divide by its 4 attention heads")
        if not 0.0 < self.kd_alpha <= 1.0:
            raise KdpipeError(f"demo option kd_alpha={self.kd_alpha} must be in (0, 1]")
        if not self.clone_weight > 0:
            raise KdpipeError(f"demo option clone_weight={self.clone_weight} must be > 0: the LRC student clones the teacher")
        if not 0.0 < self.snapshot_fraction <= 1.0:
            raise KdpipeError(f"demo option snapshot_fraction={self.snapshot_fraction} must be in (0, 1]")
