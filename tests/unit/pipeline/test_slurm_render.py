"""Slurm job scripts without a cluster: directives, bash syntax, and the scripts' behaviour run by bash
against stand-ins for kdpipe, srun, torchrun, scontrol and sbatch that record what they were given.

The real-cluster tests are in tests/slurm; these run everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.pipeline.slurm import (
    TORCHRUN_SIGNALS,
    cache_teacher_jobs,
    render_cache_array,
    render_cache_finalize,
    render_train,
    submit,
)
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.slurm_config import SlurmCacheConfig, SlurmTrainConfig

CACHE_ARGS = ["--teacher", "/models/teacher dir", "--tokens", "tokens", "--out", "cache", "--seed", "7"]
TRAIN_ARGS = ["--cache", "cache", "--out", "run's dir", "--steps", "100"]

# Python stand-ins (the shebang, this interpreter, is added on install).
# Records its argv (one JSON list per line) to $CALLS; exits with $KDPIPE_EXIT (default 0).
FAKE_KDPIPE = """import json, os, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "task": os.environ.get("SLURM_ARRAY_TASK_ID")}) + "\\n")
sys.exit(int(os.environ.get("KDPIPE_EXIT", "0")))
"""

# A trainer stand-in: announces itself, then waits for USR1 (checkpoint, exit 75) or finishes after 20 s.
FAKE_TRAINER = """import json, os, signal, sys, time
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:]}) + "\\n")
open(os.environ["READY"], "w").close()
deadline = time.time() + 20
while not stop and time.time() < deadline:
    time.sleep(0.05)
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({"event": "preempted" if stop else "finished"}) + "\\n")
sys.exit(75 if stop else 0)
"""

# srun and torchrun stand-ins: drop their own options and exec the command (so signals reach it).
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_TORCHRUN = """#!/bin/bash
echo "torchrun $*" >> "$LAUNCHES"
while [[ "$1" != --no-python ]]; do shift; done
shift
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; exit 0; fi
echo "$*" >> "$SCONTROL_CALLS"
"""
FAKE_SBATCH = """#!/bin/bash
n=$(( $(ls "$SBATCH_DIR" | grep -c "^script-") + 1 ))
cat > "$SBATCH_DIR/script-$n.sh"
echo "$*" > "$SBATCH_DIR/args-$n.txt"
if [ -n "${SBATCH_FAIL:-}" ]; then echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; fi
echo "$(( 100 + n ));cluster"
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A directory of stand-in programs; prepend it to PATH through env_setup or the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("kdpipe", _python_program(FAKE_KDPIPE)), ("srun", FAKE_SRUN), ("torchrun", FAKE_TORCHRUN),
                       ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _python_program(body: str) -> str:
    return f"#!{sys.executable}\n{body}"


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _env_setup(bin_dir: Path) -> str:
    return f"export PATH={shlex.quote(str(bin_dir))}:$PATH"


def _bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _sbatch_directives(text: str) -> list[str]:
    return [shlex.split(line)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_cache_array_directives_and_syntax(tmp_path: Path) -> None:
    config = SlurmCacheConfig(
        tasks=4, max_parallel=2, gpus_per_task=1, partition="gpu", account="proj", time="04:00:00",
        cpus_per_task=8, mem="64G", log_dir=tmp_path / "logs",
    )
    job = render_cache_array(config, CACHE_ARGS, tmp_path)
    directives = _sbatch_directives(job.text)
    for expected in ("--array=0-3%2", "--ntasks=1", "--gpus-per-task=1", "--partition=gpu", "--account=proj",
                     "--time=04:00:00", "--cpus-per-task=8", "--mem=64G", "--job-name=kdpipe-cache",
                     f"--chdir={tmp_path}", f"--output={tmp_path / 'logs'}/%x-%A_%a.out"):
        assert expected in directives, (expected, directives)
    assert job.text.startswith("#!/bin/bash\n")
    # Directives must precede the first command, or sbatch ignores them.
    first_command = next(i for i, line in enumerate(job.text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(job.text.splitlines()) if line.startswith("#SBATCH"))
    assert shlex.join(["kdpipe", "cache-teacher", *CACHE_ARGS]) in job.text
    _bash_syntax_ok(job.text, tmp_path)


def test_cache_array_without_gpus_or_limits_has_no_such_directives(tmp_path: Path) -> None:
    job = render_cache_array(SlurmCacheConfig(tasks=3), CACHE_ARGS, tmp_path)
    directives = _sbatch_directives(job.text)
    assert "--array=0-2" in directives
    assert not [d for d in directives if d.startswith(("--gpus", "--partition", "--account", "--time", "--mem"))]
    assert f"--output={Path('slurm-logs').absolute()}/%x-%A_%a.out" in directives


def test_cache_array_task_runs_the_exact_command_in_the_environment(tmp_path: Path, fake_bin: Path) -> None:
    config = SlurmCacheConfig(tasks=4, env_setup=_env_setup(fake_bin))
    job = render_cache_array(config, CACHE_ARGS, tmp_path)
    script = tmp_path / job.name
    script.write_text(job.text)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "CALLS": str(calls), "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _calls(calls) == [{"argv": ["cache-teacher", *CACHE_ARGS], "task": "2"}]
    assert "array task 2 of 4" in result.stdout


def test_finalize_verifies_then_requires_complete(tmp_path: Path, fake_bin: Path) -> None:
    config = SlurmCacheConfig(tasks=4, env_setup=_env_setup(fake_bin))
    job = render_cache_finalize(config, Path("my cache"), tmp_path)
    _bash_syntax_ok(job.text, tmp_path)
    assert "--dependency" not in job.text.split("set -euo")[1]  # given at submission, once the array id is known
    script = tmp_path / job.name
    script.write_text(job.text)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "CALLS": str(calls)}
    assert subprocess.run(["bash", str(script)], env=env, cwd=tmp_path).returncode == 0
    assert [c["argv"] for c in _calls(calls)] == [["verify", "my cache"], ["status", "my cache", "--check"]]
    # A failing verify fails the job before the completeness check.
    calls.unlink()
    failed = subprocess.run(["bash", str(script)], env={**env, "KDPIPE_EXIT": "2"}, cwd=tmp_path)
    assert failed.returncode == 2
    assert [c["argv"] for c in _calls(calls)] == [["verify", "my cache"]]


def test_train_directives_and_syntax(tmp_path: Path) -> None:
    config = SlurmTrainConfig(nodes=4, gpus_per_node=8, signal_seconds=180, time="2-00:00:00", cpus_per_task=64,
                              partition="gpu", log_dir=tmp_path / "logs")
    job = render_train(config, TRAIN_ARGS, tmp_path)
    directives = _sbatch_directives(job.text)
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@180",
                     "--open-mode=append", "--time=2-00:00:00", "--partition=gpu", "--cpus-per-task=64",
                     f"--output={tmp_path / 'logs'}/%x-%j.out", "--job-name=kdpipe-train"):
        assert expected in directives, (expected, directives)
    assert "--nproc-per-node=8" in job.text
    assert f"--signals-to-handle={TORCHRUN_SIGNALS}" in job.text and "SIGUSR1" in TORCHRUN_SIGNALS
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in job.text
    assert "--cpus-per-task=64 --kill-on-bad-exit=1" in job.text  # srun does not inherit it since 22.05
    assert shlex.join(["kdpipe", "train-student", *TRAIN_ARGS]) in job.text
    _bash_syntax_ok(job.text, tmp_path)


def _run_train_script(tmp_path: Path, fake_bin: Path, restart_count: int, preempt: bool) -> tuple[int, list[dict], str, str]:
    (fake_bin / "kdpipe").write_text(_python_program(FAKE_TRAINER))
    job = render_train(SlurmTrainConfig(nodes=2, procs_per_node=3, env_setup=_env_setup(fake_bin)), TRAIN_ARGS, tmp_path)
    script = tmp_path / job.name
    script.write_text(job.text)
    calls, ready, launches, scontrol = (tmp_path / n for n in ("calls.jsonl", "ready", "launches.txt", "scontrol.txt"))
    env = {**os.environ, "CALLS": str(calls), "READY": str(ready), "LAUNCHES": str(launches), "SCONTROL_CALLS": str(scontrol),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_RESTART_COUNT": str(restart_count)}
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    if preempt:
        proc.send_signal(signal.SIGUSR1)  # what Slurm does signal_seconds before the limit (--signal=B:USR1)
    output = proc.communicate(timeout=30)[0]
    return proc.returncode, _calls(calls), launches.read_text(), scontrol.read_text() if scontrol.exists() else ""


def test_train_after_a_job_waits_for_its_success(tmp_path: Path) -> None:
    directives = _sbatch_directives(render_train(SlurmTrainConfig(procs_per_node=2, after="4242"), TRAIN_ARGS, tmp_path).text)
    assert "--dependency=afterok:4242" in directives
    assert not any("--dependency" in d for d in _sbatch_directives(render_train(SlurmTrainConfig(procs_per_node=2), TRAIN_ARGS, tmp_path).text))


def test_train_preemption_forwards_usr1_and_requeues(tmp_path: Path, fake_bin: Path) -> None:
    status, calls, launches, scontrol = _run_train_script(tmp_path, fake_bin, restart_count=0, preempt=True)
    assert calls == [{"argv": ["train-student", *TRAIN_ARGS]}, {"event": "preempted"}]  # no --resume on the first run
    assert scontrol == "requeue 4242\n"
    assert status == 75  # the trainer's status is passed on (the real scontrol requeue ends the job first)
    assert "--nnodes=2 --nproc-per-node=3" in launches and "--rdzv-endpoint=node-a:24242" in launches


def test_train_requeued_run_resumes_and_is_not_requeued_again(tmp_path: Path, fake_bin: Path) -> None:
    status, calls, _, scontrol = _run_train_script(tmp_path, fake_bin, restart_count=1, preempt=False)
    assert calls == [{"argv": ["train-student", *TRAIN_ARGS, "--resume"]}, {"event": "finished"}]
    assert scontrol == "" and status == 0


def test_train_with_resume_given_does_not_repeat_it(tmp_path: Path) -> None:
    job = render_train(SlurmTrainConfig(procs_per_node=2), [*TRAIN_ARGS, "--resume"], tmp_path)
    assert "SLURM_RESTART_COUNT:-0}\" -gt 0" not in job.text
    _bash_syntax_ok(job.text, tmp_path)


def test_submit_pipes_the_script_to_sbatch(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sbatch_dir = tmp_path / "sbatch"
    sbatch_dir.mkdir()
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_DIR", str(sbatch_dir))
    config = SlurmCacheConfig(tasks=2, submit=True, log_dir=tmp_path / "logs")
    cache_config = CacheTeacherConfig(teacher=Path("t"), tokens=Path("s"), out=Path("c"))
    printed = cache_teacher_jobs(config, CACHE_ARGS, cache_config, tmp_path)
    # Scripts are numbered by submission: the array first, then the finalize job depending on it.
    assert "array job 101" in printed and "finalize job 102" in printed
    assert (sbatch_dir / "args-1.txt").read_text().split() == ["--parsable"]
    assert (sbatch_dir / "args-2.txt").read_text().split() == ["--parsable", "--dependency=afterany:101"]
    assert "--array=0-1" in (sbatch_dir / "script-1.sh").read_text()
    assert "kdpipe status c --check" in (sbatch_dir / "script-2.sh").read_text()
    assert (tmp_path / "logs").is_dir()  # sbatch does not create --output directories
    monkeypatch.setenv("SBATCH_FAIL", "1")
    with pytest.raises(KdpipeError, match="sbatch refused kdpipe-cache-array.sh: .*Invalid account"):
        submit(render_cache_array(config, CACHE_ARGS, tmp_path))


def test_cli_prints_both_scripts_and_checks_stage_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "4", "--time", "1:00:00", "--", *CACHE_ARGS])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --array=0-3" in result.output and "kdpipe verify cache" in result.output
    assert shlex.join(["kdpipe", "cache-teacher", *CACHE_ARGS]) in result.output
    typo = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "4", "--", "--teacher", "t", "--tokns", "s"])
    assert isinstance(typo.exception, KdpipeError) and "--tokns" in str(typo.exception)
    missing = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "4", "--", "--teacher", "t", "--tokens", "s"])
    assert isinstance(missing.exception, KdpipeError) and "'out'" in str(missing.exception)
    slot = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "4", "--", *CACHE_ARGS, "--shard-index", "1"])
    assert isinstance(slot.exception, KdpipeError) and "--shard-index" in str(slot.exception)


def test_cli_vllm_tasks_get_the_tensor_parallel_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    vllm = [*CACHE_ARGS, "--backend", "vllm", "--tensor-parallel-size", "4"]
    result = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "8", "--", *vllm])
    assert result.exit_code == 0, result.output
    array = result.output.split("# ----- ")[0]
    assert "--gpus-per-task=4" in _sbatch_directives(array) and "--array=0-7" in _sbatch_directives(array)
    assert shlex.join(["kdpipe", "cache-teacher", *vllm]) in array
    single = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "2", "--", *CACHE_ARGS, "--backend", "vllm"])
    assert "--gpus-per-task=1" in _sbatch_directives(single.output.split("# ----- ")[0])
    more = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "2", "--gpus-per-task", "8", "--", *vllm])
    assert "--gpus-per-task=8" in _sbatch_directives(more.output.split("# ----- ")[0])
    fewer = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "2", "--gpus-per-task", "2", "--", *vllm])
    assert isinstance(fewer.exception, KdpipeError) and "--tensor-parallel-size 4" in str(fewer.exception)
    transformers = runner.invoke(app, ["slurm", "cache-teacher", "--tasks", "2", "--", *CACHE_ARGS])
    assert not [d for d in _sbatch_directives(transformers.output.split("# ----- ")[0]) if d.startswith("--gpus")]


def test_cli_train_student_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["slurm", "train-student", "--nodes", "2", "--gpus-per-node", "4", "--", *TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=2" in result.output and "--nproc-per-node=4" in result.output


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (SlurmCacheConfig, dict(tasks=0), "tasks=0"),
        (SlurmCacheConfig, dict(tasks=2, max_parallel=0), "max_parallel"),
        (SlurmCacheConfig, dict(tasks=2, time="4 hours"), "not a Slurm time"),
        (SlurmCacheConfig, dict(tasks=2, mem="lots"), "not a Slurm memory size"),
        (SlurmTrainConfig, dict(), "--procs-per-node"),
        (SlurmTrainConfig, dict(gpus_per_node=8, nodes=0), "nodes=0"),
        (SlurmTrainConfig, dict(procs_per_node=2, after="afterok:12"), "not a Slurm job id"),
    ],
)
def test_config_mistakes_are_named(cls: type, options: dict, message: str) -> None:
    with pytest.raises(KdpipeError, match=message):
        cls(**options)
