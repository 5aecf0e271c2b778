"""The `kdpipe` command line: one thin command per stage.

Each command parses its flags, resolves its config (defaults < `--config FILE` < flags) and
calls one library function. User mistakes surface as one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.config import field_help, resolve
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.train_config import ExportConfig, TrainStudentConfig
from kdpipe.schemas.slurm_config import SlurmCacheConfig, SlurmJobConfig, SlurmTrainConfig

app = typer.Typer(
    name="kdpipe",
    help=(
        "Offline distillation for language models. Run the teacher once (cache-teacher), "
        "store importance-sampled sparse logits and FFN snapshots, then train any number of "
        "Low-Rank-Clone students from that cache (train-student)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

ConfigOption = typer.Option(None, "--config", help="YAML or TOML file with any of this command's options; flags override it.")


def main() -> None:
    """Console entry point: run the app, turning user mistakes into one line and exit code 2."""
    try:
        app()
    except KdpipeError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; complete outputs are kept and a re-run resumes")
        sys.exit(130)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the kdpipe version and exit.", is_eager=True),
) -> None:
    if version:
        from kdpipe import __version__

        print(f"kdpipe {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit()


@app.command("prepare-data")
def prepare_data_command(
    inputs: Optional[list[str]] = typer.Argument(None, help=field_help(PrepareDataConfig, "inputs"), metavar="INPUT", show_default=False),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=field_help(PrepareDataConfig, "tokenizer")),
    out: Optional[Path] = typer.Option(None, "--out", help=field_help(PrepareDataConfig, "out")),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help=field_help(PrepareDataConfig, "seq_len")),
    text_field: Optional[str] = typer.Option(None, "--text-field", help=field_help(PrepareDataConfig, "text_field") + " [default: text]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help=field_help(PrepareDataConfig, "val_fraction") + " [default: 0.0]"),
    tail: Optional[str] = typer.Option(None, "--tail", help=field_help(PrepareDataConfig, "tail") + " [drop|pad, default: drop]"),
    skip_bad_rows: Optional[bool] = typer.Option(None, "--skip-bad-rows/--no-skip-bad-rows", help=field_help(PrepareDataConfig, "skip_bad_rows")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help=field_help(PrepareDataConfig, "overwrite")),
    batch_docs: Optional[int] = typer.Option(None, "--batch-docs", help=field_help(PrepareDataConfig, "batch_docs") + " [default: 1024]"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Tokenize a corpus with the teacher's tokenizer and pack it into a token store of fixed-length sequences."""
    from kdpipe.pipeline.prepare import prepare_data

    flags = dict(
        inputs=inputs or None, tokenizer=tokenizer, out=out, seq_len=seq_len, text_field=text_field,
        val_fraction=val_fraction, tail=tail, skip_bad_rows=skip_bad_rows, overwrite=overwrite, batch_docs=batch_docs,
    )
    cfg = resolve(PrepareDataConfig, config_file=config, flags=flags, section="prepare-data")
    print(prepare_data(cfg).text())


@app.command("inspect")
def inspect_command(
    cache: Path = typer.Argument(..., help="Teacher cache directory written by `kdpipe cache-teacher`."),
) -> None:
    """Print a teacher cache's stats: sequences, shards, bytes per token, unique ids per position, mass covered."""
    from kdpipe.teacher_cache.inspect import cache_stats, stats_table

    Console().print(stats_table(cache_stats(cache)))


@app.command("verify")
def verify_command(
    cache: Path = typer.Argument(..., help="Teacher cache directory written by `kdpipe cache-teacher`."),
) -> None:
    """Re-check every file checksum of a teacher cache; exit 2 naming each bad shard."""
    from kdpipe.teacher_cache.inspect import verify_cache, verify_table

    report = verify_cache(cache)
    console = Console()
    table = verify_table(report)
    if table is not None:
        console.print(table)
    console.print(report.summary(), highlight=False, soft_wrap=True)
    if report.bad:
        names = ", ".join(f"{v.name} ({v.reason})" for v in report.bad)
        raise KdpipeError(f"{len(report.bad)} bad shard(s) in {cache}: {names}; redo them with `kdpipe cache-teacher --repair`")


@app.command("cache-teacher")
def cache_teacher_command(
    teacher: Optional[Path] = typer.Option(None, "--teacher", help=field_help(CacheTeacherConfig, "teacher")),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help=field_help(CacheTeacherConfig, "tokens")),
    out: Optional[Path] = typer.Option(None, "--out", help=field_help(CacheTeacherConfig, "out")),
    mode: Optional[str] = typer.Option(None, "--mode", help=field_help(CacheTeacherConfig, "mode") + " [default: rs-kd]"),
    num_draws: Optional[int] = typer.Option(None, "--num-draws", help=field_help(CacheTeacherConfig, "num_draws") + " [default: 50]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=field_help(CacheTeacherConfig, "temperature") + " [default: 1.0]"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help=field_help(CacheTeacherConfig, "top_k") + " [default: 50]"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=field_help(CacheTeacherConfig, "top_p") + " [default: 0.95]"),
    ghost: Optional[bool] = typer.Option(None, "--ghost/--no-ghost", help=field_help(CacheTeacherConfig, "ghost") + " [default: ghost]"),
    snapshot_layers: Optional[str] = typer.Option(None, "--snapshot-layers", help=field_help(CacheTeacherConfig, "snapshot_layers") + " [default: every:4]"),
    snapshot_fraction: Optional[float] = typer.Option(None, "--snapshot-fraction", help=field_help(CacheTeacherConfig, "snapshot_fraction") + " [default: 0.03125]"),
    snapshot_dtype: Optional[str] = typer.Option(None, "--snapshot-dtype", help=field_help(CacheTeacherConfig, "snapshot_dtype") + " [default: bf16]"),
    snapshot_attention: Optional[bool] = typer.Option(None, "--snapshot-attention/--no-snapshot-attention", help=field_help(CacheTeacherConfig, "snapshot_attention")),
    seed: Optional[int] = typer.Option(None, "--seed", help=field_help(CacheTeacherConfig, "seed") + " [default: 0]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=field_help(CacheTeacherConfig, "batch_size") + " [default: 8]"),
    position_chunk: Optional[int] = typer.Option(None, "--position-chunk", help=field_help(CacheTeacherConfig, "position_chunk") + " [default: 1024]"),
    sequences_per_shard: Optional[int] = typer.Option(None, "--sequences-per-shard", help=field_help(CacheTeacherConfig, "sequences_per_shard") + " [default: 256]"),
    sequences_per_chunk: Optional[int] = typer.Option(None, "--sequences-per-chunk", help=field_help(CacheTeacherConfig, "sequences_per_chunk") + " [default: 32]"),
    shard_index: Optional[int] = typer.Option(None, "--shard-index", help=field_help(CacheTeacherConfig, "shard_index")),
    num_shards: Optional[int] = typer.Option(None, "--num-shards", help=field_help(CacheTeacherConfig, "num_shards")),
    device: Optional[str] = typer.Option(None, "--device", help=field_help(CacheTeacherConfig, "device")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=field_help(CacheTeacherConfig, "dtype")),
    backend: Optional[str] = typer.Option(None, "--backend", help=field_help(CacheTeacherConfig, "backend") + " [default: transformers]"),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size", help=field_help(CacheTeacherConfig, "tensor_parallel_size") + " [default: 1]"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help=field_help(CacheTeacherConfig, "gpu_memory_utilization") + " [default: 0.85]"),
    splits: Optional[list[str]] = typer.Option(None, "--split", help=field_help(CacheTeacherConfig, "splits") + " Repeat for several."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help=field_help(CacheTeacherConfig, "overwrite")),
    repair: Optional[bool] = typer.Option(None, "--repair/--no-repair", help=field_help(CacheTeacherConfig, "repair")),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run/--no-dry-run", help=field_help(CacheTeacherConfig, "dry_run")),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run the teacher once over a token store; write sparse logits and FFN snapshots into a sharded cache."""
    from kdpipe.teacher_cache.run import cache_teacher

    flags = dict(
        teacher=teacher, tokens=tokens, out=out, mode=mode, num_draws=num_draws, temperature=temperature, top_k=top_k,
        top_p=top_p, ghost=ghost, snapshot_layers=snapshot_layers, snapshot_fraction=snapshot_fraction,
        snapshot_dtype=snapshot_dtype, snapshot_attention=snapshot_attention, seed=seed, batch_size=batch_size,
        position_chunk=position_chunk, sequences_per_shard=sequences_per_shard, sequences_per_chunk=sequences_per_chunk,
        shard_index=shard_index, num_shards=num_shards, device=device, dtype=dtype, backend=backend,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, splits=splits or None,
        overwrite=overwrite, repair=repair, dry_run=dry_run,
    )
    cache_teacher(resolve(CacheTeacherConfig, config_file=config, flags=flags, section="cache-teacher"))


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run directories written by `kdpipe train-student` (each holds metrics.jsonl).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Directory for report.md, loss_curves.png and calibration.png."),
) -> None:
    """Draw the loss curves and calibration of student runs and write a Markdown table of their results."""
    from kdpipe.pipeline.report import write_report

    path = write_report(runs, out)
    print(path.read_text(encoding="utf-8"), end="")
    print(f"Wrote {path} and its plots.")


# ----- kdpipe slurm: render or submit the stages as Slurm jobs -----

slurm_app = typer.Typer(
    name="slurm",
    help=(
        "Render (print) or --submit Slurm jobs for cache-teacher (a job array plus a finalize job) and "
        "train-student (srun torchrun, requeued on preemption). Slurm options first, then `--`, then the "
        "stage's own options, which are checked now and passed through verbatim: "
        "kdpipe slurm cache-teacher --tasks 8 --time 4:00:00 -- --teacher T --tokens S --out CACHE"
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(slurm_app, name="slurm")

# Options after `--` (and options `kdpipe slurm` does not know) are collected for the stage.
_PASS_THROUGH = {"ignore_unknown_options": True}
_Partition = typer.Option(None, "--partition", help=field_help(SlurmJobConfig, "partition"))
_Account = typer.Option(None, "--account", help=field_help(SlurmJobConfig, "account"))
_Time = typer.Option(None, "--time", help=field_help(SlurmJobConfig, "time"))
_CpusPerTask = typer.Option(None, "--cpus-per-task", help=field_help(SlurmJobConfig, "cpus_per_task"))
_Mem = typer.Option(None, "--mem", help=field_help(SlurmJobConfig, "mem"))
_JobName = typer.Option(None, "--job-name", help=field_help(SlurmJobConfig, "job_name"))
_LogDir = typer.Option(None, "--log-dir", help=field_help(SlurmJobConfig, "log_dir") + " [default: slurm-logs]")
_EnvSetup = typer.Option(None, "--env-setup", help=field_help(SlurmJobConfig, "env_setup"))
_Submit = typer.Option(None, "--submit/--print", help=field_help(SlurmJobConfig, "submit"))


def _stage_params(stage: str, args: list[str]) -> dict:
    """Parse pass-through options with the plain `kdpipe STAGE` command's own parser, so a typo fails here, not in the queue."""
    command = typer.main.get_command(app).commands[stage]  # type: ignore[attr-defined]
    try:
        context = command.make_context(f"kdpipe {stage}", list(args))
    except typer.TyperException as err:  # typer's (vendored) click errors: unknown option, bad value
        raise KdpipeError(f"kdpipe {stage} options after `--`: {err.format_message()}") from None
    # A repeatable option that was not given parses as an empty tuple; configs read "not given" as None.
    return {name: (None if value == () else value) for name, value in context.params.items()}


@slurm_app.command("cache-teacher", context_settings=_PASS_THROUGH)
def slurm_cache_teacher_command(
    cache_args: Optional[list[str]] = typer.Argument(None, metavar="-- CACHE-TEACHER-OPTIONS", help="Options of `kdpipe cache-teacher`, passed through."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help=field_help(SlurmCacheConfig, "tasks")),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help=field_help(SlurmCacheConfig, "max_parallel")),
    gpus_per_task: Optional[int] = typer.Option(None, "--gpus-per-task", help=field_help(SlurmCacheConfig, "gpus_per_task") + " [default: 0]"),
    partition: Optional[str] = _Partition,
    account: Optional[str] = _Account,
    time: Optional[str] = _Time,
    cpus_per_task: Optional[int] = _CpusPerTask,
    mem: Optional[str] = _Mem,
    job_name: Optional[str] = _JobName,
    log_dir: Optional[Path] = _LogDir,
    env_setup: Optional[str] = _EnvSetup,
    submit: Optional[bool] = _Submit,
) -> None:
    """Cache the teacher with a Slurm job array (task i takes shards i, i+N, ...) and a finalize job that verifies the cache."""
    from kdpipe.pipeline.slurm import cache_teacher_jobs

    args = list(cache_args or [])
    params = _stage_params("cache-teacher", args)
    cache_config = resolve(CacheTeacherConfig, config_file=params.pop("config"), flags=params, section="cache-teacher")
    flags = dict(
        tasks=tasks, max_parallel=max_parallel, gpus_per_task=gpus_per_task, partition=partition, account=account,
        time=time, cpus_per_task=cpus_per_task, mem=mem, job_name=job_name, log_dir=log_dir, env_setup=env_setup, submit=submit,
    )
    config = resolve(SlurmCacheConfig, config_file=None, flags=flags, section="slurm")
    print(cache_teacher_jobs(config, args, cache_config, Path.cwd()))


@slurm_app.command("train-student", context_settings=_PASS_THROUGH)
def slurm_train_student_command(
    train_args: Optional[list[str]] = typer.Argument(None, metavar="-- TRAIN-STUDENT-OPTIONS", help="Options of `kdpipe train-student`, passed through."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help=field_help(SlurmTrainConfig, "nodes") + " [default: 1]"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help=field_help(SlurmTrainConfig, "gpus_per_node") + " [default: 0]"),
    procs_per_node: Optional[int] = typer.Option(None, "--procs-per-node", help=field_help(SlurmTrainConfig, "procs_per_node")),
    after: Optional[str] = typer.Option(None, "--after", help=field_help(SlurmTrainConfig, "after")),
    signal_seconds: Optional[int] = typer.Option(None, "--signal-seconds", help=field_help(SlurmTrainConfig, "signal_seconds") + " [default: 300]"),
    partition: Optional[str] = _Partition,
    account: Optional[str] = _Account,
    time: Optional[str] = _Time,
    cpus_per_task: Optional[int] = _CpusPerTask,
    mem: Optional[str] = _Mem,
    job_name: Optional[str] = _JobName,
    log_dir: Optional[Path] = _LogDir,
    env_setup: Optional[str] = _EnvSetup,
    submit: Optional[bool] = _Submit,
) -> None:
    """Train a student with `srun torchrun` on K nodes; the job checkpoints on USR1, requeues itself and resumes."""
    from kdpipe.pipeline.slurm import train_student_job

    args = list(train_args or [])
    _stage_params("train-student", args)
    flags = dict(
        nodes=nodes, gpus_per_node=gpus_per_node, procs_per_node=procs_per_node, after=after, signal_seconds=signal_seconds,
        partition=partition, account=account, time=time, cpus_per_task=cpus_per_task, mem=mem, job_name=job_name,
        log_dir=log_dir, env_setup=env_setup, submit=submit,
    )
    config = resolve(SlurmTrainConfig, config_file=None, flags=flags, section="slurm")
    print(train_student_job(config, args, Path.cwd()))


@app.command("status")
def status_command(
    path: Path = typer.Argument(..., help="A teacher cache directory or a train-student run directory."),
    verify: bool = typer.Option(False, "--verify", help="Caches: also re-check every checksum to find bad shards (reads every byte)."),
    check: bool = typer.Option(False, "--check", help="Exit 2 unless the cache is complete (and verified) or the run has reached its planned steps."),
) -> None:
    """Show a cache's shards complete/missing/bad, or a run's last checkpoint and progress."""
    from kdpipe.pipeline.status import status

    result = status(path, verify=verify)
    print(result.text())
    problem = result.problem() if check else None
    if problem is not None:
        raise KdpipeError(problem)


def _train_option(name: str, flag: str, default: str = "") -> typer.models.OptionInfo:
    """A train-student flag whose help is the config field's help (plus its default)."""
    suffix = f" [default: {default}]" if default else ""
    return typer.Option(None, flag, help=field_help(TrainStudentConfig, name) + suffix)


@app.command("train-student")
def train_student_command(
    cache: Optional[Path] = _train_option("cache", "--cache"),
    out: Optional[Path] = _train_option("out", "--out"),
    student: Optional[str] = _train_option("student", "--student", "lrc"),
    hidden_size: Optional[int] = _train_option("hidden_size", "--hidden-size"),
    lrc_init: Optional[str] = _train_option("lrc_init", "--lrc-init", "random"),
    init_std: Optional[float] = _train_option("init_std", "--init-std", "0.02"),
    tie_embeddings: Optional[bool] = typer.Option(None, "--tie-embeddings/--untie-embeddings", help=field_help(TrainStudentConfig, "tie_embeddings")),
    student_config: Optional[Path] = _train_option("student_config", "--student-config"),
    steps: Optional[int] = _train_option("steps", "--steps"),
    tokens: Optional[int] = _train_option("tokens", "--tokens"),
    batch_size: Optional[int] = _train_option("batch_size", "--batch-size", "8"),
    grad_accum: Optional[int] = _train_option("grad_accum", "--grad-accum", "1"),
    lr: Optional[float] = _train_option("lr", "--lr", "3e-4"),
    schedule: Optional[str] = _train_option("lr_schedule", "--schedule", "wsd"),
    warmup_steps: Optional[int] = _train_option("warmup_steps", "--warmup-steps", "0"),
    decay_fraction: Optional[float] = _train_option("decay_fraction", "--decay-fraction", "0.2"),
    min_lr_fraction: Optional[float] = _train_option("min_lr_fraction", "--min-lr-fraction", "0.0"),
    weight_decay: Optional[float] = _train_option("weight_decay", "--weight-decay", "0.1"),
    adam_beta1: Optional[float] = _train_option("adam_beta1", "--adam-beta1", "0.9"),
    adam_beta2: Optional[float] = _train_option("adam_beta2", "--adam-beta2", "0.95"),
    adam_eps: Optional[float] = _train_option("adam_eps", "--adam-eps", "1e-8"),
    grad_clip: Optional[float] = _train_option("grad_clip", "--grad-clip", "1.0"),
    lm_weight: Optional[float] = _train_option("lm_weight", "--lm-weight", "1.0"),
    lm_schedule: Optional[str] = _train_option("lm_schedule", "--lm-schedule", "constant"),
    kd_weight: Optional[float] = _train_option("kd_weight", "--kd-weight", "1.0"),
    kd_schedule: Optional[str] = _train_option("kd_schedule", "--kd-schedule", "constant"),
    clone_weight: Optional[float] = _train_option("clone_weight", "--clone-weight", "0.0"),
    clone_schedule: Optional[str] = _train_option("clone_schedule", "--clone-schedule", "constant"),
    weight_warmup_steps: Optional[int] = _train_option("weight_warmup_steps", "--weight-warmup-steps", "0"),
    kd_temperature: Optional[float] = _train_option("kd_temperature", "--kd-temperature", "1.0"),
    loss_chunk_size: Optional[int] = _train_option("loss_chunk_size", "--loss-chunk-size", "1024"),
    checkpoint_every: Optional[int] = _train_option("checkpoint_every", "--checkpoint-every", "1000"),
    keep_checkpoints: Optional[int] = _train_option("keep_checkpoints", "--keep-checkpoints", "3"),
    eval_every: Optional[int] = _train_option("eval_every", "--eval-every", "0"),
    eval_batches: Optional[int] = _train_option("eval_batches", "--eval-batches", "8"),
    log_every: Optional[int] = _train_option("log_every", "--log-every", "10"),
    seed: Optional[int] = _train_option("seed", "--seed", "0"),
    num_workers: Optional[int] = _train_option("num_workers", "--num-workers", "2"),
    device: Optional[str] = _train_option("device", "--device", "auto"),
    parallelism: Optional[str] = _train_option("parallelism", "--parallelism", "ddp"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help=field_help(TrainStudentConfig, "resume")),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train a student from a teacher cache (the teacher never runs); run under torchrun for DDP/FSDP.

    After a checkpoint on SIGTERM/SIGUSR1 the command exits with status 75 (EX_TEMPFAIL):
    re-run it with --resume to continue.
    """
    from kdpipe.student_train.run import train_student
    from kdpipe.student_train.trainer import PREEMPTED_EXIT_CODE

    flags = dict(
        cache=cache, out=out, student=student, hidden_size=hidden_size, lrc_init=lrc_init, init_std=init_std,
        tie_embeddings=tie_embeddings, student_config=student_config, steps=steps, tokens=tokens, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, lr_schedule=schedule, warmup_steps=warmup_steps, decay_fraction=decay_fraction,
        min_lr_fraction=min_lr_fraction, weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        adam_eps=adam_eps, grad_clip=grad_clip, lm_weight=lm_weight,
        lm_schedule=lm_schedule, kd_weight=kd_weight, kd_schedule=kd_schedule, clone_weight=clone_weight,
        clone_schedule=clone_schedule, weight_warmup_steps=weight_warmup_steps, kd_temperature=kd_temperature,
        loss_chunk_size=loss_chunk_size, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        eval_every=eval_every, eval_batches=eval_batches, log_every=log_every,
        seed=seed, num_workers=num_workers, device=device, parallelism=parallelism, resume=resume,
    )
    summary = train_student(resolve(TrainStudentConfig, config_file=config, flags=flags, section="train-student"))
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same summary
        Console(stderr=summary.preempted).print(summary.describe(), highlight=False, soft_wrap=True)
    if summary.preempted:
        raise typer.Exit(PREEMPTED_EXIT_CODE)


@app.command("export-student")
def export_student_command(
    run: Path = typer.Argument(..., help=field_help(ExportConfig, "run")),
    out: Optional[Path] = typer.Option(None, "--out", help=field_help(ExportConfig, "out")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=field_help(ExportConfig, "dtype") + " [default: float32]"),
) -> None:
    """Export a trained student as a standard Hugging Face model directory with the teacher's tokenizer."""
    from kdpipe.student_train.run import export_run

    cfg = resolve(ExportConfig, config_file=None, flags=dict(run=run, out=out, dtype=dtype), section="export-student")
    path = export_run(cfg.run, cfg.out, dtype=cfg.dtype)
    print(f"Exported {cfg.run} to {path}: load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")


def _demo_option(name: str, flag: str) -> typer.models.OptionInfo:
    """A demo flag whose help is the DemoConfig field's help (plus its default)."""
    from kdpipe.schemas.demo_config import DemoConfig

    default = DemoConfig.__dataclass_fields__[name].default
    suffix = "" if default is None else f" [default: {default}]"
    return typer.Option(None, flag, help=field_help(DemoConfig, name) + suffix)


@app.command("demo")
def demo_command(
    out: Optional[Path] = _demo_option("out", "--out"),
    teacher: Optional[Path] = _demo_option("teacher", "--teacher"),
    corpus: Optional[str] = _demo_option("corpus", "--corpus"),
    text_field: Optional[str] = _demo_option("text_field", "--text-field"),
    corpus_bytes: Optional[int] = _demo_option("corpus_bytes", "--corpus-bytes"),
    val_fraction: Optional[float] = _demo_option("val_fraction", "--val-fraction"),
    vocab_size: Optional[int] = _demo_option("vocab_size", "--vocab-size"),
    seq_len: Optional[int] = _demo_option("seq_len", "--seq-len"),
    teacher_minutes: Optional[float] = _demo_option("teacher_minutes", "--teacher-minutes"),
    teacher_max_steps: Optional[int] = _demo_option("teacher_max_steps", "--teacher-max-steps"),
    teacher_hidden_size: Optional[int] = _demo_option("teacher_hidden_size", "--teacher-hidden-size"),
    teacher_layers: Optional[int] = _demo_option("teacher_layers", "--teacher-layers"),
    num_draws: Optional[int] = _demo_option("num_draws", "--num-draws"),
    snapshot_fraction: Optional[float] = _demo_option("snapshot_fraction", "--snapshot-fraction"),
    student_tokens: Optional[int] = _demo_option("student_tokens", "--student-tokens"),
    student_hidden_size: Optional[int] = _demo_option("student_hidden_size", "--student-hidden-size"),
    student_batch_size: Optional[int] = _demo_option("student_batch_size", "--student-batch-size"),
    student_lr: Optional[float] = _demo_option("student_lr", "--student-lr"),
    kd_alpha: Optional[float] = _demo_option("kd_alpha", "--kd-alpha"),
    clone_weight: Optional[float] = _demo_option("clone_weight", "--clone-weight"),
    eval_batches: Optional[int] = _demo_option("eval_batches", "--eval-batches"),
    seed: Optional[int] = _demo_option("seed", "--seed"),
    threads: Optional[int] = _demo_option("threads", "--threads"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run the whole pipeline offline and compare LM-only, top-k KD, rs-kd KD and LRC students (a re-run resumes)."""
    from kdpipe.pipeline.demo import run_demo
    from kdpipe.schemas.demo_config import DemoConfig

    flags = dict(
        out=out, teacher=teacher, corpus=corpus, text_field=text_field, corpus_bytes=corpus_bytes, val_fraction=val_fraction,
        vocab_size=vocab_size, seq_len=seq_len, teacher_minutes=teacher_minutes, teacher_max_steps=teacher_max_steps,
        teacher_hidden_size=teacher_hidden_size, teacher_layers=teacher_layers, num_draws=num_draws,
        snapshot_fraction=snapshot_fraction, student_tokens=student_tokens, student_hidden_size=student_hidden_size,
        student_batch_size=student_batch_size, student_lr=student_lr, kd_alpha=kd_alpha, clone_weight=clone_weight,
        eval_batches=eval_batches, seed=seed, threads=threads,
    )
    console = Console() if sys.stdout.isatty() else Console(width=120)  # a log file gets the whole table
    summary = run_demo(resolve(DemoConfig, config_file=config, flags=flags, section="demo"), console=console)
    console.print(summary.table())
    console.print(summary.text(), highlight=False, soft_wrap=True)
