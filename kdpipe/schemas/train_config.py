"""Configs of `kdpipe train-student` and `kdpipe export-student`.

The learning rate and each loss weight follow a `Schedule` (linear warm-up, then constant,
linear, cosine or warm-up–stable–decay); their options are flat fields here (`lr`,
`lr_schedule`, `kd_weight`, `kd_schedule`, ...) so that every one is a CLI flag and a
top-level key of a `--config` file. The trainer builds the schedules once the step count
is known (`--tokens` needs the cache's sequence length).

Options that change what is trained (student, data order, losses, optimiser) must stay the
same when a run is resumed; `RESUMABLE_CHANGES` lists the ones that may differ.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from kdpipe.schemas.config import option, required
from kdpipe.schemas.errors import KdpipeError

StudentKind = Literal["lrc", "plain"]
ScheduleKind = Literal["constant", "linear", "cosine", "wsd"]

STUDENT_KINDS = ("lrc", "plain")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "wsd")

DEFAULT_LR = 3e-4
SHARED_INIT_LR = 3e-5
INIT_SEQUENCES = 256
"""Training sequences whose cached FFN inputs `--lrc-init shared` reads (fewer if the split is smaller)."""

RESUMABLE_CHANGES = frozenset(
    {"resume", "out", "cache", "num_workers", "checkpoint_every", "keep_checkpoints", "lr", "warmup_steps", "grad_clip"}
)
"""Options a resumed run may give differently. The first six change no trained weight
(`cache` may move: the run is tied to the cache's fingerprint, not to its path); `lr`,
`warmup_steps` and `grad_clip` change the steps still to train: they are how a diverged
run continues from its last good checkpoint."""


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainStudentConfig:
    """Options of `kdpipe train-student`."""

    cache: Path = required("Teacher cache directory written by `kdpipe cache-teacher`.")
    out: Path = required("Run directory to create (or to continue with --resume).")
    student: StudentKind = option(
        "lrc", "Student type: lrc (Low-Rank Clone of the cache's teacher) or plain (any causal-LM config, random init)."
    )
    hidden_size: int | None = option(
        None,
        "lrc: the student's residual width d_S, below the teacher's; some families also need a multiple of the "
        "teacher's attention heads (Llama does), and a refused width is answered with the nearest valid ones.",
    )
    lrc_init: Literal["random", "shared"] = option(
        "shared",
        "lrc: projection init. shared: one basis for every projection, the top-d_S principal directions of the teacher's "
        "rms-normalised residual stream, with the teacher's norm weights folded in, so the student starts near the "
        "teacher; computed from the cache alone: at the snapshot positions of its first "
        f"{INIT_SEQUENCES} training sequences, each snapshotted layer's FFN input over its norm weight plus the token's "
        "embedding row (36K samples with the default snapshots at seq-len 512), then the final norm is scaled to the "
        "logit temperature that best predicts 2 training sequences. Needs a cache made with snapshots (the default). "
        "random: normal(0, --init-std), as in the LRC paper.",
    )
    init_std: float = option(0.02, "lrc: standard deviation of the random projection init.")
    tie_embeddings: bool | None = option(None, "lrc: tie the student's LM head to its embedding (default: as the teacher).")
    student_config: Path | None = option(
        None, "plain: a Hugging Face config.json (with model_type) of the student; its vocabulary must cover the teacher's."
    )
    steps: int | None = option(None, "Optimizer steps to train (give this or --tokens).")
    tokens: int | None = option(None, "Tokens to train on, rounded up to whole optimizer steps (give this or --steps).")
    batch_size: int = option(8, "Sequences per micro-batch on each rank.")
    grad_accum: int = option(1, "Micro-batches per optimizer step (global batch = batch_size x grad_accum x ranks).")
    lr: float | None = option(
        None,
        f"Peak learning rate of AdamW (default: {SHARED_INIT_LR:g} with --lrc-init shared, whose start larger steps "
        f"undo, else {DEFAULT_LR:g}).",
    )
    lr_schedule: ScheduleKind = option("wsd", "Learning-rate shape after warm-up: constant, linear, cosine or wsd.")
    warmup_steps: int = option(0, "Learning-rate warm-up steps.")
    decay_fraction: float = option(0.2, "wsd schedules: fraction of the run, at its end, spent decaying.")
    min_lr_fraction: float = option(0.0, "End learning rate of linear, cosine and wsd schedules, as a fraction of --lr.")
    weight_decay: float = option(0.1, "AdamW weight decay of matrices (norms and biases get none).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged).")
    lm_weight: float = option(1.0, "Weight of the LM cross-entropy on the next token (w_lm).")
    lm_schedule: ScheduleKind = option("constant", "Schedule of the LM weight.")
    kd_weight: float = option(1.0, "Weight of the KD loss against the cached teacher targets (w_kd).")
    kd_schedule: ScheduleKind = option("constant", "Schedule of the KD weight (PD finds wsd best).")
    clone_weight: float = option(
        0.0, "lrc: weight of the clone loss at the cached snapshot positions (alpha); needs a cache with snapshots."
    )
    clone_scale: Literal["relative", "absolute"] = option(
        "relative",
        "lrc: scale of the clone loss. relative: the mean over terms (snapshot layer x gate/up/ffn_out) and positions of "
        "|student - teacher|^2 / |teacher|^2, 1 for a silent student and 0 for a perfect clone, so alpha "
        "means the same on any teacher; absolute: the LRC paper's sum of plain MSEs, whose size follows the teacher's "
        "activation magnitudes and the number of snapshot layers (~77 on SmolLM2-135M at the start, 4x its KD term).",
    )
    clone_schedule: ScheduleKind = option("constant", "Schedule of the clone weight.")
    weight_warmup_steps: int = option(0, "Warm-up steps of the loss-weight schedules (they decay, if at all, to 0).")
    kd_temperature: float = option(1.0, "Temperature of the student softmax in the KD term.")
    loss_chunk_size: int = option(1024, "Positions per LM-head chunk in the losses and eval (bounds logits memory).")
    checkpoint_every: int = option(1000, "Checkpoint every N optimizer steps (and always at the end and on SIGTERM/SIGUSR1).")
    keep_checkpoints: int = option(3, "Complete checkpoints kept in RUN/checkpoints (the oldest are removed).")
    eval_every: int = option(0, "Evaluate on the cache's val split every N steps and at the end; 0 disables eval.")
    eval_batches: int = option(8, "Batches per rank in one evaluation (at most one epoch of the val split).")
    log_every: int = option(10, "Write a metrics line every N steps (and at the last step).")
    seed: int = option(0, "Seed of the student's init and of the data order.")
    num_workers: int = option(2, "Data-loader worker processes per rank (0 reads in the training process).")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "auto: cuda if available (one GPU per rank, by LOCAL_RANK), else cpu."
    )
    parallelism: Literal["ddp", "fsdp"] = option(
        "ddp", "Under torchrun: ddp, or fsdp (FSDP2 fully_shard) to shard weights, gradients and optimizer state."
    )
    resume: bool = option(False, "Continue the run in --out from its latest complete checkpoint (starts afresh if it has none).")

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = SHARED_INIT_LR if self.student == "lrc" and self.lrc_init == "shared" else DEFAULT_LR
        if self.student not in STUDENT_KINDS:
            raise KdpipeError(f"unknown student type {self.student!r}: use --student lrc or --student plain")
        if self.student == "lrc":
            if self.hidden_size is None:
                raise KdpipeError("--student lrc needs --hidden-size D (the student's width, smaller than the teacher's)")
            if self.student_config is not None:
                raise KdpipeError("--student-config is for --student plain; an lrc student takes its shape from the teacher")
        else:
            if self.student_config is None:
                raise KdpipeError("--student plain needs --student-config FILE (a Hugging Face config.json)")
            if self.clone_weight > 0:
                raise KdpipeError("--clone-weight > 0 needs --student lrc: a plain student has no teacher activations to clone")
        if (self.steps is None) == (self.tokens is None):
            raise KdpipeError("give exactly one of --steps N or --tokens T")
        positive = {
            "steps": self.steps,
            "tokens": self.tokens,
            "hidden_size": self.hidden_size,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "loss_chunk_size": self.loss_chunk_size,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "eval_batches": self.eval_batches,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise KdpipeError(f"train-student option {name}={value} must be >= 1")
        non_negative = {
            "warmup_steps": self.warmup_steps,
            "weight_warmup_steps": self.weight_warmup_steps,
            "eval_every": self.eval_every,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "lm_weight": self.lm_weight,
            "kd_weight": self.kd_weight,
            "clone_weight": self.clone_weight,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise KdpipeError(f"train-student option {name}={value} must be >= 0")
        if self.lm_weight == 0 and self.kd_weight == 0 and self.clone_weight == 0:
            raise KdpipeError("all loss weights are 0: set --lm-weight, --kd-weight or --clone-weight above 0")
        for name, value in {"lr": self.lr, "kd_temperature": self.kd_temperature, "init_std": self.init_std, "adam_eps": self.adam_eps}.items():
            if not 0 < value < math.inf:
                raise KdpipeError(f"train-student option {name}={value} must be > 0 and finite")
        for name, value in {"adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2}.items():
            if not 0.0 <= value < 1.0:
                raise KdpipeError(f"train-student option {name}={value} must be in [0, 1)")


@dataclasses.dataclass(kw_only=True, slots=True)
class ExportConfig:
    """Options of `kdpipe export-student`."""

    run: Path = required("Run directory written by `kdpipe train-student`; its latest complete checkpoint is exported.")
    out: Path = required("Directory to write the Hugging Face model to (must not exist).")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "Storage dtype of the exported weights.")
