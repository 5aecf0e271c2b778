"""The command line is generated from the config dataclasses: every command's flags are exactly
its config's fields (name, default, help), and options resolve as defaults < --config FILE < flags."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import pytest
import typer
import yaml
from typer.testing import CliRunner

from kdpipe import cli
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.config import option, required
from kdpipe.schemas.demo_config import DemoConfig
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.slurm_config import SlurmCacheConfig, SlurmTrainConfig
from kdpipe.schemas.train_config import ExportConfig, TrainStudentConfig

CONFIG_COMMANDS = {
    ("prepare-data",): PrepareDataConfig,
    ("cache-teacher",): CacheTeacherConfig,
    ("train-student",): TrainStudentConfig,
    ("export-student",): ExportConfig,
    ("demo",): DemoConfig,
    ("slurm", "cache-teacher"): SlurmCacheConfig,
    ("slurm", "train-student"): SlurmTrainConfig,
}
POSITIONAL = {("prepare-data",): {"inputs"}, ("export-student",): {"run"}}
PASS_THROUGH = {("slurm", "cache-teacher"): "cache_args", ("slurm", "train-student"): "train_args"}
NO_CONFIG_FILE = {("export-student",), ("slurm", "cache-teacher"), ("slurm", "train-student")}
PLAIN_COMMANDS = {("inspect",), ("verify",), ("report",), ("status",), ("real-teacher",)}  # no config dataclass: hand-written arguments


def command(path: tuple[str, ...]):
    group = typer.main.get_command(cli.app)
    for name in path:
        group = group.commands[name]  # type: ignore[attr-defined]
    return group


def field_default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def test_every_command_is_classified():
    group = typer.main.get_command(cli.app)
    paths = {(name,) for name in group.commands if name != "slurm"}  # type: ignore[attr-defined]
    paths |= {("slurm", name) for name in group.commands["slurm"].commands}  # type: ignore[attr-defined]
    assert paths == set(CONFIG_COMMANDS) | PLAIN_COMMANDS


@pytest.mark.parametrize("path", list(CONFIG_COMMANDS), ids=" ".join)
def test_flags_are_the_config_fields(path):
    cls = CONFIG_COMMANDS[path]
    params = {p.name: p for p in command(path).params if not getattr(p, "hidden", False)}
    expected = {f.name for f in dataclasses.fields(cls)}
    extra = {"config"} if path not in NO_CONFIG_FILE else set()
    extra |= {PASS_THROUGH[path]} if path in PASS_THROUGH else set()
    assert set(params) - {"help"} == expected | extra
    for field in dataclasses.fields(cls):
        param = params[field.name]
        assert param.help and param.help.startswith(field.metadata["help"]), field.name
        if field.name in POSITIONAL.get(path, ()):
            assert param.param_type_name == "argument"
            continue
        assert param.param_type_name == "option"
        flag = "--" + field.name.replace("_", "-")
        assert param.opts == [flag], (field.name, param.opts)
        if param.is_flag and param.secondary_opts:  # type: ignore[attr-defined]
            assert param.secondary_opts == ["--no-" + flag[2:]]  # type: ignore[attr-defined]
        default = field_default(field)
        assert param.default == default or (param.default in ((), None) and default is None), field.name
        if isinstance(default, bool) or default is None:
            continue
        assert param.show_default, field.name  # shown from the field, not restated in the help text


def test_literal_fields_are_choices_and_lists_repeat():
    help_text = CliRunner().invoke(cli.app, ["train-student", "--help"], env={"COLUMNS": "200"}).output
    assert "--lr-schedule <constant|linear|cosine|wsd>" in help_text
    with pytest.raises(typer.TyperException, match="'cosin' is not one of 'constant', 'linear', 'cosine', 'wsd'"):
        command(("train-student",)).make_context("kdpipe train-student", ["--lr-schedule", "cosin"])
    splits = {p.name: p for p in command(("cache-teacher",)).params}["splits"]
    assert splits.multiple and "Repeat" in splits.help


@pytest.mark.parametrize("path", list(CONFIG_COMMANDS) + sorted(PLAIN_COMMANDS), ids=" ".join)
def test_help_works(path):
    result = CliRunner().invoke(cli.app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    if path in CONFIG_COMMANDS:
        for field in dataclasses.fields(CONFIG_COMMANDS[path]):
            if field.name not in POSITIONAL.get(path, ()):
                assert "--" + field.name.replace("_", "-") in result.output


def resolved(path: tuple[str, ...], args: list[str]):
    """Parse `kdpipe PATH ARGS` with the real command's parser and resolve its config (nothing runs)."""
    ctx = command(path).make_context("kdpipe " + " ".join(path), list(args))  # click consumes the list
    parent = cli.app if len(path) == 1 else cli.slurm_app
    return cli._RESOLVERS[parent, path[-1]](ctx)


def test_config_file_and_flags_resolve_in_order(tmp_path: Path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"cache": "c", "out": "o", "steps": 5, "lr": 0.01, "lr_schedule": "cosine", "resume": True}))
    base = ["--config", str(config)]
    cfg = resolved(("train-student",), [*base, "--hidden-size", "16"])
    assert (cfg.steps, cfg.lr, cfg.lr_schedule, cfg.resume) == (5, 0.01, "cosine", True)  # file beats default
    assert cfg.batch_size == 8 and cfg.hidden_size == 16  # a flag not given (shown default 8) does not override
    cfg = resolved(("train-student",), [*base, "--hidden-size", "16", "--lr", "3e-4", "--no-resume", "--lr-schedule", "wsd"])
    assert (cfg.lr, cfg.resume, cfg.lr_schedule) == (3e-4, False, "wsd")  # a flag beats the file, even at its default value
    # Sections: the file may hold several commands' options.
    config.write_text(yaml.safe_dump({"cache-teacher": {"teacher": "t", "tokens": "s", "out": "c", "ghost": False, "splits": ["val"]}}))
    cfg = resolved(("cache-teacher",), [*base, "--num-draws", "7"])
    assert (cfg.ghost, cfg.splits, cfg.num_draws, cfg.mode) == (False, ["val"], 7, "rs-kd")
    cfg = resolved(("cache-teacher",), [*base, "--splits", "train", "--splits", "val", "--ghost"])
    assert (cfg.ghost, cfg.splits) == (True, ["train", "val"])
    config.write_text(yaml.safe_dump({"inputs": ["a.txt"], "tokenizer": "tok", "out": "o", "seq_len": 8}))
    assert resolved(("prepare-data",), base).inputs == ["a.txt"]  # no positional given: the file's
    assert resolved(("prepare-data",), [*base, "b.txt", "c.txt"]).inputs == ["b.txt", "c.txt"]


def test_commands_without_config_file_take_flags_only():
    cfg = resolved(("export-student",), ["run", "--out", "hf"])
    assert (cfg.run, cfg.out, cfg.dtype) == (Path("run"), Path("hf"), "float32")
    cfg = resolved(("slurm", "train-student"), ["--procs-per-node", "2", "--submit", "--", "--cache", "c"])
    assert (cfg.procs_per_node, cfg.submit, cfg.nodes) == (2, True, 1)


def test_deprecated_schedule_flag_sets_lr_schedule(capsys):
    base = ["--cache", "c", "--out", "o", "--steps", "1", "--hidden-size", "8"]
    assert resolved(("train-student",), [*base, "--schedule", "cosine"]).lr_schedule == "cosine"
    assert "--schedule is deprecated; use --lr-schedule" in capsys.readouterr().err
    assert "--schedule" not in CliRunner().invoke(cli.app, ["train-student", "--help"]).output


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["kdpipe", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_usage_errors_are_one_line_naming_the_flag(monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "train-student", "--cache", "c", "--out", "o", "--steps", "1", "--lr-schedule", "cosin")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "'--lr-schedule'" in err, err
    code, err = run_main(monkeypatch, capsys, "export-student")
    assert code == 2 and err.count("\n") == 1 and "Missing argument 'RUN'" in err, err


@dataclasses.dataclass(kw_only=True, slots=True)
class Toy:
    out: Path = required("Where to write.")
    steps: int = option(10, "Number of steps.")
    mode: Literal["fast", "slow"] = option("fast", "Speed.")
    tags: list[str] = option([], "Free-form tags.")
    fresh_field: bool = option(False, "A field added later.")


def test_a_new_field_is_a_flag_with_no_cli_edit(tmp_path: Path):
    toy_app = typer.Typer()
    seen = []
    cli.config_command(toy_app, "toy", Toy)(lambda config: seen.append(config))
    cli.config_command(toy_app, "other", Toy)(lambda config: None)  # two commands: typer keeps a group
    (tmp_path / "toy.yaml").write_text("out: x\nsteps: 3\ntags: [a]\n")
    result = CliRunner().invoke(toy_app, ["toy", "--config", str(tmp_path / "toy.yaml"), "--fresh-field", "--mode", "slow"])
    assert result.exit_code == 0, result.output
    assert seen == [Toy(out=Path("x"), steps=3, mode="slow", tags=["a"], fresh_field=True)]
