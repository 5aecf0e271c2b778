"""The demo's own teacher: a BPE tokenizer and a small Llama trained on the embedded corpus.

`make demo` must run offline, so there is no pretrained teacher to download; instead it
trains one here, briefly but on many more tokens than each student will see, so that
distilling from it has something to give. The result is an ordinary Hugging Face model
directory (safetensors weights, config, tokenizer) that `kdpipe cache-teacher` loads like
any other teacher.

Time budgets and determinism: a run is a pure function of (token store, config, number of
steps); `minutes` only chooses that number. It times a few throw-away steps (the weights
are restored afterwards), then plans `steps = min(steps, what fits in the budget)` before
training starts, so the learning-rate schedule is complete (warm-up, cosine decay to the
end) whatever the machine's speed, and the summary records the step count that
reproduces the run exactly with `minutes=None`. The budget is also a hard limit on
training: if the machine slows down (other jobs on a shared CPU), the loop stops when the
minutes are up, before the planned last step, and the summary says so (`steps` <
`planned_steps`); evaluation and saving then add a few seconds.

The optimisation is the student trainer's: its AdamW set-up (`student_train.optim`), its
cosine `Schedule` with linear warm-up, and its ignore index for masked labels.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdpipe.pipeline.corpus import CorpusReader, expand_inputs
from kdpipe.schemas.config import option, to_dict
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.token_store import TokenSplit, TokenStore
from kdpipe.student_train.losses import IGNORE_INDEX
from kdpipe.student_train.optim import adamw
from kdpipe.student_train.schedules import Schedule

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
"""BOS, EOS and pad, ids 0, 1, 2."""

SUMMARY_FILE = "teacher_summary.json"
"""Written into the teacher directory; its presence marks a directory this module may replace."""

# Throw-away steps run to size a run to its time budget; the first few are slower
# (allocation, optimizer state creation) and are left out of the timing.
_CALIBRATION_STEPS = 8
_UNTIMED_STEPS = 3


def train_demo_tokenizer(corpus_files: list[Path], out_dir: Path, vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer on JSONL/text corpus files; save it as a Hugging Face directory.

    Byte-level, so any text (code, Unicode) round-trips exactly and nothing is ever unknown.
    Ids 0, 1, 2 are `<s>` (BOS), `</s>` (EOS) and `<pad>`; `vocab_size` includes them.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        minimum = len(SPECIAL_TOKENS) + 256
        raise KdpipeError(f"tokenizer vocab_size must be at least {minimum} (the 256 bytes and the specials); got {vocab_size}")
    reader = CorpusReader(expand_inputs([str(p) for p in corpus_files]), text_field="text", batch_docs=1024, skip_bad_rows=False)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for batch in reader for text in batch.texts), trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, clean_up_tokenization_spaces=False
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


@dataclass(kw_only=True, slots=True)
class DemoTeacherConfig:
    """Shape and optimisation of the demo teacher (defaults measured on 2 CPU cores)."""

    hidden_size: int = option(256, "Residual width.")
    num_layers: int = option(4, "Decoder blocks.")
    num_heads: int = option(4, "Attention heads (head_dim = hidden_size / num_heads).")
    num_kv_heads: int = option(4, "Key/value heads (fewer than num_heads = grouped-query attention).")
    intermediate_size: int = option(1024, "Gated-MLP width.")
    batch_size: int = option(8, "Sequences per step (small batches, many steps: what learns fastest in minutes on a CPU).")
    lr: float = option(3e-3, "Peak AdamW learning rate.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak (cosine decay).")
    warmup_fraction: float = option(0.05, "Fraction of the steps spent warming the learning rate up linearly.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only, not norms).")
    grad_clip: float = option(1.0, "Gradient-norm clipping threshold.")
    eval_sequences: int = option(128, "Validation sequences evaluated at the end (the first ones of the val split).")
    seed: int = option(0, "Seed of the initial weights and the data order.")
    num_threads: int = option(2, "CPU threads torch may use while training.")

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise KdpipeError(
                f"demo teacher: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"and num_heads by num_kv_heads {self.num_kv_heads}"
            )
        for name in ("hidden_size", "num_layers", "intermediate_size", "batch_size", "eval_sequences", "num_threads"):
            if getattr(self, name) < 1:
                raise KdpipeError(f"demo teacher: {name} must be at least 1 (got {getattr(self, name)})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_fraction < 1:
            raise KdpipeError("demo teacher: lr must be > 0, min_lr_ratio in [0, 1] and warmup_fraction in [0, 1)")


@dataclass(frozen=True, slots=True)
class TeacherSummary:
    """What a teacher run did and reached."""

    out: Path
    steps: int
    """Optimizer steps taken."""
    planned_steps: int
    """Length of the learning-rate schedule; when it equals `steps`,
    `train_demo_teacher(..., minutes=None, steps=steps)` reproduces the run exactly."""
    tokens: int
    """Training tokens seen (steps × batch × seq_len)."""
    train_loss: float
    """Mean training loss over the last tenth of the steps."""
    val_loss: float
    """Mean next-token cross-entropy (nats) on the evaluated validation tokens."""
    val_tokens: int
    seconds: float
    """Wall time of the whole call (calibration, training, eval, saving)."""
    tokens_per_second: float
    """Training tokens per second of training-loop time."""
    num_parameters: int
    minutes: float | None

    def text(self) -> str:
        """The summary printed at the end of a run."""
        return (
            f"Teacher {self.out}: {self.num_parameters / 1e6:.2f}M parameters, {self.steps:,} steps, "
            f"{self.tokens:,} tokens ({self.tokens_per_second:,.0f} tokens/s){self._cut_short()}; "
            f"train loss {self.train_loss:.3f}, "
            f"val loss {self.val_loss:.3f} on {self.val_tokens:,} tokens; {self.seconds / 60:.1f} min."
        )

    def _cut_short(self) -> str:
        if self.steps == self.planned_steps:
            return ""
        return (
            f", stopped by the {self.minutes:g}-minute budget before planned step {self.planned_steps:,} "
            "(the machine slowed down)"
        )


def train_demo_teacher(
    token_store_dir: Path, out_dir: Path, *, config: DemoTeacherConfig, minutes: float | None, steps: int
) -> TeacherSummary:
    """Train a small Llama on a token store's train split; evaluate on val; save a complete teacher directory.

    `steps` is the run length, or its upper bound when `minutes` is given (see the module doc).
    """
    started = time.perf_counter()
    if steps < 1:
        raise KdpipeError(f"demo teacher steps must be at least 1 (got {steps})")
    if minutes is not None and minutes <= 0:
        raise KdpipeError(f"demo teacher minutes must be positive (got {minutes})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMMARY_FILE).is_file():
        raise KdpipeError(f"{out_dir} exists and is not a demo teacher; refusing to replace it, choose another directory")
    store = TokenStore.open(token_store_dir)
    train_split, val_split = store.split("train"), store.split("val")
    if val_split.num_sequences == 0:
        raise KdpipeError(
            f"token store {store.path} has no validation sequences; rebuild it with `prepare-data --val-fraction 0.05`"
        )
    train_ST, train_labels_ST = load_split(train_split, train_split.num_sequences)  # demo stores are small: all in memory
    val_ST, val_labels_ST = load_split(val_split, min(config.eval_sequences, val_split.num_sequences))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(_model_config(store, config))
        deadline = None if minutes is None else started + minutes * 60
        if deadline is not None:
            steps = _steps_in_budget(model, train_ST, train_labels_ST, len(val_ST), config, deadline - time.perf_counter(), steps)
        losses, train_seconds = _train(model, train_ST, train_labels_ST, config, steps, deadline)
        val_loss, val_tokens = evaluate_loss(model, val_ST, val_labels_ST, config.batch_size)
        summary = TeacherSummary(
            out=out_dir,
            steps=len(losses),
            planned_steps=steps,
            tokens=len(losses) * config.batch_size * store.seq_len,
            train_loss=float(np.mean(losses[-max(1, len(losses) // 10) :])),
            val_loss=val_loss,
            val_tokens=val_tokens,
            seconds=0.0,
            tokens_per_second=len(losses) * config.batch_size * store.seq_len / max(train_seconds, 1e-9),
            num_parameters=sum(p.numel() for p in model.parameters()),
            minutes=minutes,
        )
        summary = _save(model, store, config, summary, out_dir, started)
    finally:
        torch.set_num_threads(previous_threads)
    return summary


def _model_config(store: TokenStore, config: DemoTeacherConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=store.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=store.seq_len,
        bos_token_id=store.bos_id,
        eos_token_id=store.eos_id,
        pad_token_id=store.pad_id,
        tie_word_embeddings=True,
    )


def load_split(split: TokenSplit, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` sequences of a split and their labels `(S, T)` (the model shifts labels itself).

    Padding only ever fills the end of a split's last sequence (`num_padding`), so exactly
    those positions are masked: never by token id, which may equal EOS.
    """
    tokens_ST = torch.from_numpy(split.tokens(0, count).astype(np.int64))
    labels_ST = tokens_ST.clone()
    if split.num_padding and count == split.num_sequences:
        labels_ST[-1, -split.num_padding :] = IGNORE_INDEX
    return tokens_ST, labels_ST


def _batch_indices(num_sequences: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Sequence indices of each batch: one seeded permutation per epoch, read as a stream."""
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(num_sequences), 0
    while True:
        batch = []
        while len(batch) < batch_size:
            take = order[cursor : cursor + batch_size - len(batch)]
            batch.extend(take.tolist())
            cursor += len(take)
            if cursor == num_sequences:
                order, cursor = rng.permutation(num_sequences), 0
        yield np.asarray(batch)


def _optimizer(model: torch.nn.Module, config: DemoTeacherConfig) -> torch.optim.AdamW:
    return adamw(model, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95), eps=1e-8)


def lr_schedule(config: DemoTeacherConfig, total_steps: int) -> Schedule:
    """Linear warm-up over `warmup_fraction` of the steps (at least one), then cosine to `min_lr_ratio` of the peak."""
    warmup = min(total_steps, max(1, round(config.warmup_fraction * total_steps)))
    return Schedule(kind="cosine", peak=config.lr, total_steps=total_steps, warmup_steps=warmup, final_fraction=config.min_lr_ratio)


def _step(
    model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, grad_clip: float
) -> float:
    loss = model(input_ids=tokens_BT, labels=labels_BT).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _steps_in_budget(
    model: LlamaForCausalLM,
    train_ST: torch.Tensor,
    labels_ST: torch.Tensor,
    num_val: int,
    config: DemoTeacherConfig,
    seconds: float,
    max_steps: int,
) -> int:
    """How many steps fit in `seconds`, timed on throw-away steps; the model's weights are restored after."""
    calibration_started = time.perf_counter()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = _optimizer(model, config)
    batches = _batch_indices(len(train_ST), config.batch_size, config.seed)
    model.train()
    durations = []
    for _ in range(_CALIBRATION_STEPS):
        rows = next(batches)
        step_started = time.perf_counter()
        _step(model, optimizer, train_ST[rows], labels_ST[rows], config.grad_clip)
        durations.append(time.perf_counter() - step_started)
    seconds_per_step = float(np.median(durations[_UNTIMED_STEPS:]))  # the median shrugs off a stall on a shared CPU
    model.load_state_dict(initial)
    eval_batches = math.ceil(num_val / config.batch_size)
    eval_seconds = eval_batches * seconds_per_step / 3  # a forward pass is about a third of a training step
    remaining = seconds - (time.perf_counter() - calibration_started) - eval_seconds
    return int(min(max_steps, max(1, remaining // seconds_per_step)))


def _train(
    model: LlamaForCausalLM,
    train_ST: torch.Tensor,
    labels_ST: torch.Tensor,
    config: DemoTeacherConfig,
    steps: int,
    deadline: float | None,
) -> tuple[list[float], float]:
    """The training loop, stopped early at `deadline` (perf_counter time); returns every step's loss and the wall time."""
    optimizer = _optimizer(model, config)
    schedule = lr_schedule(config, steps)
    batches = _batch_indices(len(train_ST), config.batch_size, config.seed)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("training teacher"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tokens_per_s]:,.0f} tokens/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )  # fmt: skip
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    with progress:
        task = progress.add_task("teacher", total=steps, loss=float("nan"), tokens_per_s=0.0)
        for step in range(steps):
            rows = next(batches)
            tokens_BT = train_ST[rows]  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = schedule.value(step)
            losses.append(_step(model, optimizer, tokens_BT, labels_ST[rows], config.grad_clip))
            elapsed = time.perf_counter() - started
            progress.update(task, advance=1, loss=losses[-1], tokens_per_s=(step + 1) * tokens_BT.numel() / elapsed)
            if deadline is not None and time.perf_counter() > deadline:
                break
    return losses, time.perf_counter() - started


@torch.no_grad()
def evaluate_loss(
    model: LlamaForCausalLM, tokens_ST: torch.Tensor, labels_ST: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """Mean next-token cross-entropy over all labelled positions, and their number."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(tokens_ST), batch_size):
        tokens_BT = tokens_ST[start : start + batch_size]
        logits_BTV = model(input_ids=tokens_BT).logits
        labels_BT = labels_ST[start : start + batch_size, 1:]  # position t predicts t + 1
        total += torch.nn.functional.cross_entropy(
            logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels_BT != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1), count


def _save(
    model: LlamaForCausalLM, store: TokenStore, config: DemoTeacherConfig, summary: TeacherSummary, out: Path, started: float
) -> TeacherSummary:
    """Write weights (safetensors), config, tokenizer and summary to a temporary directory, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    try:
        model.save_pretrained(str(build))
        for item in store.tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, build / item.name)
        finished = replace(summary, seconds=time.perf_counter() - started)
        record = {**asdict(finished), "out": str(out), "config": to_dict(config), "token_store": store.fingerprint}
        (build / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(aside)
            build.rename(out)
            shutil.rmtree(aside)
        else:
            build.rename(out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return finished
