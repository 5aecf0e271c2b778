"""One row of the README's LRC-init table: a student's held-out LM loss before and after an equal budget.

    python bench/lrc_init.py --cache caches/smol --name shared288u --hidden-size 288 --set tie_embeddings=false
    python bench/lrc_init.py --cache caches/smol --name random288 --hidden-size 288 --set lrc_init=random
    python bench/lrc_init.py --cache caches/smol --name clone1 --hidden-size 288 --set tie_embeddings=false \
        --set clone_weight=1

The student is built exactly as `train-student` builds it (`build_trainer`: init, learning
rate defaults, losses, schedule), trained `--steps` optimizer steps of `--batch-size`
sequences (the table: 30 x 4 x 512 = 61,440 tokens, KD + LM, WSD), and scored before and
after on the first `--held-out` sequences of the cache's val split: next-token
cross-entropy of its own LM head, in float32. `--set FIELD=VALUE` sets any other
`TrainStudentConfig` field (`lrc_init`, `lr`, `tie_embeddings`, `clone_weight`,
`lm_weight`, `lr_schedule`, ...). Each run appends one JSON line to `--out`, which the table
is written from; runs of one table must share the cache, budget and held-out sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.schemas.config import from_dict
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.parallelize import init_distributed
from kdpipe.student_train.run import build_trainer
from kdpipe.teacher_cache import open_cache


def parse_value(text: str) -> object:
    """A --set value: int, float, true/false/none, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@torch.no_grad()
def held_out_loss(student: torch.nn.Module, tokens_NT: torch.Tensor) -> float:
    """Mean next-token cross-entropy of the LRC student on `tokens_NT`, one sequence at a time."""
    was_training = student.training
    student.eval()
    total = 0.0
    for row_T in tokens_NT:
        hidden_TD = student(row_T[None]).hidden[0, :-1].float()
        total += F.cross_entropy(hidden_TD @ student.lm_head_weight().float().T, row_T[1:], reduction="sum").item()
    student.train(was_training)
    return total / (tokens_NT.shape[0] * (tokens_NT.shape[1] - 1))


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    cache = open_cache(args.cache)
    val = cache.splits.get("val", 0)
    if val == 0:
        raise SystemExit(f"cache {args.cache} has no val sequences to score on")
    tokens_NT = torch.from_numpy(cache.open_shard("val", 0).read(0, min(args.held_out, val)).tokens).long()
    fields = {name: parse_value(value) for name, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory(prefix="kdpipe-lrc-init-") as tmp:
        # from_dict, as for a --config file: an unknown field or a wrong type is one line naming it.
        config = from_dict(TrainStudentConfig, {
            "cache": args.cache, "out": Path(tmp) / "run", "student": "lrc", "hidden_size": args.hidden_size, "steps": args.steps,
            "batch_size": args.batch_size, "eval_every": 0, "log_every": 10, "num_workers": 0, "device": "cpu", "seed": args.seed,
            **fields,
        }, where="--set")  # fmt: skip
        started = time.perf_counter()
        trainer = build_trainer(config, init_distributed("cpu"))
        build_s = time.perf_counter() - started
        student = trainer.module.student
        before = held_out_loss(student, tokens_NT)
        summary = trainer.fit()
        after = held_out_loss(student, tokens_NT)
    row = {
        "name": args.name,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k in ("lrc_init", "hidden_size", "tie_embeddings", "lr",
                                                                                "clone_weight", "clone_scale", "lm_weight", "kd_weight",
                                                                                "lr_schedule", "warmup_steps")},
        "head": "tied" if student.tied else "untied",
        "held_out_sequences": int(tokens_NT.shape[0]),
        "before": round(before, 3),
        "after": round(after, 3),
        "tokens": summary.tokens,
        "tokens_per_s": round(summary.tokens / summary.wall_s, 1),
        "build_s": round(build_s, 1),
    }  # fmt: skip
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache with snapshots and a val split")
    parser.add_argument("--name", required=True, help="the row's name in --out")
    parser.add_argument("--hidden-size", type=int, default=288, help="the student's width d_S")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=8, help="val sequences scored before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any other train-student field")
    parser.add_argument("--out", type=Path, default=Path("bench-out/lrc_init.jsonl"))
    return parser


if __name__ == "__main__":
    run(build_parser().parse_args())
