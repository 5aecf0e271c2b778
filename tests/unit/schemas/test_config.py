"""The config layer: defaults < config file (YAML/TOML, optional section) < flags; typos and wrong types refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from kdpipe.schemas.config import config_hash, field_help, option, required, resolve, write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig


@dataclass(kw_only=True, slots=True)
class Sample:
    out: Path = required("Where to write.")
    steps: int = option(10, "Number of steps.")
    lr: float = option(1e-3, "Learning rate.")
    mode: Literal["fast", "slow"] = option("fast", "Speed.")
    tags: list[str] = option([], "Free-form tags.")
    resume: bool = option(False, "Resume if possible.")


def test_defaults_and_required():
    cfg = resolve(Sample, config_file=None, flags={"out": "x"}, section="sample")
    assert cfg == Sample(out=Path("x")) and cfg.steps == 10 and isinstance(cfg.out, Path)
    with pytest.raises(KdpipeError, match=r"missing required option 'out' \(Where to write\.\)"):
        resolve(Sample, config_file=None, flags={}, section="sample")


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: x\nstpes: 5\n")
    with pytest.raises(KdpipeError, match=rf"config {path}: unknown key 'stpes'; did you mean 'steps'\?"):
        resolve(Sample, config_file=path, flags={}, section="sample")
    with pytest.raises(KdpipeError, match="unknown key 'zzz'; valid keys: lr, mode, out, resume, steps, tags"):
        resolve(Sample, config_file=None, flags={"out": "x", "zzz": 1}, section="sample")


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: ten", "steps: expected an integer, got 'ten'"),
        ("steps: 2.5", "steps: expected an integer, got 2.5"),
        ("resume: 1", "resume: expected true or false, got 1"),
        ("mode: medium", "mode: 'medium' is not one of 'fast', 'slow'"),
        ("tags: solo", "tags: expected a list, got 'solo'"),
        ("lr: true", "lr: expected a number, got True"),
    ],
)
def test_wrong_types_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"out: x\n{text}\n")
    with pytest.raises(KdpipeError) as err:
        resolve(Sample, config_file=path, flags={}, section="sample")
    assert message in str(err.value) and str(path) in str(err.value)


def test_int_is_accepted_for_float():
    assert resolve(Sample, config_file=None, flags={"out": "x", "lr": 1}, section="s").lr == 1.0


def test_yaml_and_toml_files_with_and_without_section(tmp_path):
    yaml_path = tmp_path / "c.yml"
    yaml_path.write_text("sample:\n  out: y\n  steps: 3\n  tags: [a, b]\nother:\n  steps: 99\n")
    toml_path = tmp_path / "c.toml"
    toml_path.write_text('out = "t"\nsteps = 4\nmode = "slow"\n')
    from_yaml = resolve(Sample, config_file=yaml_path, flags={}, section="sample")
    from_toml = resolve(Sample, config_file=toml_path, flags={}, section="sample")
    assert (from_yaml.out, from_yaml.steps, from_yaml.tags) == (Path("y"), 3, ["a", "b"])
    assert (from_toml.out, from_toml.steps, from_toml.mode) == (Path("t"), 4, "slow")


def test_flags_override_the_file_and_none_means_not_given(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('out = "file"\nsteps = 4\nresume = true\n')
    cfg = resolve(Sample, config_file=path, flags={"steps": 7, "out": None, "resume": False}, section="sample")
    assert (cfg.out, cfg.steps, cfg.resume) == (Path("file"), 7, False)


def test_bad_config_files(tmp_path):
    with pytest.raises(KdpipeError, match="does not exist"):
        resolve(Sample, config_file=tmp_path / "none.yaml", flags={}, section="s")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(KdpipeError, match="use a .yaml, .yml or .toml file"):
        resolve(Sample, config_file=tmp_path / "c.ini", flags={}, section="s")
    (tmp_path / "broken.toml").write_text("out = \n")
    with pytest.raises(KdpipeError, match="is not valid TOML"):
        resolve(Sample, config_file=tmp_path / "broken.toml", flags={}, section="s")
    (tmp_path / "latin1.yaml").write_bytes("out: caf\xe9\n".encode("latin-1"))
    with pytest.raises(KdpipeError, match="is not UTF-8 text"):
        resolve(Sample, config_file=tmp_path / "latin1.yaml", flags={}, section="s")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(KdpipeError, match="is a directory"):
        resolve(Sample, config_file=tmp_path / "dir.yaml", flags={}, section="s")


def test_write_resolved_round_trips_and_hash_is_stable(tmp_path):
    cfg = Sample(out=Path("o"), steps=3, tags=["x"])
    write_resolved(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["out"] == "o"
    assert resolve(Sample, config_file=tmp_path / "config.yaml", flags={}, section="s") == cfg
    assert config_hash(cfg) == config_hash(Sample(out=Path("o"), steps=3, tags=["x"])) != config_hash(Sample(out=Path("o")))


def test_prepare_config_validation_and_help():
    base = dict(inputs=["c"], tokenizer=Path("t"), out=Path("o"))
    with pytest.raises(KdpipeError, match="--seq-len must be at least 2"):
        PrepareDataConfig(**base, seq_len=1)
    with pytest.raises(KdpipeError, match=r"--val-fraction must be in \[0, 1\)"):
        PrepareDataConfig(**base, seq_len=8, val_fraction=1.0)
    with pytest.raises(KdpipeError, match="'middle' is not one of 'drop', 'pad'"):
        resolve(PrepareDataConfig, config_file=None, flags={**base, "seq_len": 8, "tail": "middle"}, section="prepare-data")
    with pytest.raises(AttributeError):
        PrepareDataConfig(**base, seq_len=8).seq_lenght = 3  # slots: a misspelt attribute cannot be set
    assert "each file is one document" in field_help(PrepareDataConfig, "inputs")
