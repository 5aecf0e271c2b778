"""The real stages on the test cluster: cache-teacher as a job array, train-student under srun torchrun.

Unlike test_cluster.py, nothing here is a stand-in: the scripts kdpipe renders run the real
`kdpipe cache-teacher` / `kdpipe train-student` of this virtualenv (the default --env-setup
activates it) on the tiny Llama teacher and a token store made by prepare-data. Each result
is compared with an independent reference: the array's cache with a single-process cache
(byte for byte), the preempted and resumed training run with an uninterrupted one (every
metrics line and every weight, bit for bit).

A cancellation or a preemption must land while the work is under way, whatever the
machine's speed: the test freezes the processes concerned (SIGSTOP) once they have done
some of their work, signals the job, and lets them go only when Slurm's signal has reached
them. The stages are neither slowed down nor patched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdpipe.pipeline.slurm import render_cache_array, submit
from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.run_dir import METRICS_FILE, latest_checkpoint
from kdpipe.schemas.slurm_config import SlurmCacheConfig
from kdpipe.teacher_cache import open_cache
from tests.slurm.conftest import SlurmCluster
from tests.unit.teacher_cache.test_run import build_token_store, run_cache, shard_files

pytestmark = pytest.mark.slurm

SEQ_LEN = 32
TASKS = 4
CACHE_OPTIONS = dict(sequences_per_shard=4, sequences_per_chunk=4, batch_size=4, snapshot_layers="all")
"""13 shards of 4 sequences (10 train, 3 val): tasks 0 to 3 of the array take 4, 3, 3 and 3 of them."""

RANKS = 2
BATCH = 2
TRAIN_STEPS = 16
"""Enough steps that a preemption seen after step 2 stops the run well before its end."""


def _cache_args(teacher: Path, tokens: Path, out: Path) -> list[str]:
    """The cache-teacher command line of CACHE_OPTIONS (what `run_cache` gets as keywords)."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in CACHE_OPTIONS.items()]
    return ["--teacher", str(teacher), "--tokens", str(tokens), "--out", str(out), *options]


def _train_args(cache: Path, out: Path) -> list[str]:
    return [
        "--cache", str(cache), "--out", str(out), "--student", "lrc", "--hidden-size", "24", "--steps", str(TRAIN_STEPS),
        "--batch-size", str(BATCH), "--lr", "1e-2", "--clone-weight", "0.5", "--log-every", "1", "--num-workers", "0",
        "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def job_env(slurm_cluster: SlurmCluster) -> dict[str, str]:
    """The environment jobs are submitted from (sbatch exports it): the cluster's, one thread per process."""
    return slurm_cluster.env | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Path:
    return tiny_teacher("llama").path


@pytest.fixture(scope="module")
def tokens(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_token_store(tmp_path_factory.mktemp("slurm-stages-tokens"), teacher, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def reference_cache(teacher: Path, tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same cache written by one process, here (one thread, as in the jobs)."""
    out = tmp_path_factory.mktemp("slurm-stages-reference") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cache(teacher, tokens, out, **CACHE_OPTIONS)
    finally:
        torch.set_num_threads(threads)
    return out


def _task_shards(cache: Path, tasks: int) -> list[list[tuple[str, int]]]:
    """(split, index) of the shards each array task takes: task i of n takes global shards i, i+n, ..."""
    shards = open_cache(cache).manifest.global_shards()
    return [shards[task::tasks] for task in range(tasks)]


def _complete(cache: Path, shards: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [s for s in shards if (cf.shard_dir(cache, *s) / cf.COMPLETE_FILE).is_file()]


def assert_same_cache(got: Path, want: Path) -> None:
    """Every shard file and the manifest byte for byte; config.yaml too, but for the `out:` line (each cache's own path)."""
    got_files, want_files = shard_files(got), shard_files(want)
    assert sorted(got_files) == sorted(want_files)
    assert [name for name in want_files if got_files[name] != want_files[name]] == []
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    assert _config_without_out(got) == _config_without_out(want)


def _config_without_out(cache: Path) -> str:
    text = (cache / cf.CONFIG_FILE).read_text()
    assert f"out: {cache}\n" in text, text
    return text.replace(f"out: {cache}\n", "out: CACHE\n")


def _kdpipe(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (here, on the submitting side)."""
    done = subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _processes(env: dict[str, str | None], argv: str) -> list[int]:
    """Pids of processes with `argv` among their arguments and every NAME=value of `env` (None: any value) in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            if argv.encode() not in arguments:
                continue
            names = dict(var.partition(b"=")[::2] for var in (entry / "environ").read_bytes().split(b"\0") if var)
            if all(name.encode() in names and value in (None, names[name.encode()].decode()) for name, value in env.items()):
                found.append(int(entry.name))
    return found


def _wait_until(what: str, check: Callable[[], object], cluster: SlurmCluster, job: str, timeout: float = 120.0) -> object:
    """Poll `check` (every 10 ms: the tests freeze processes as soon as it holds) until it returns something truthy.

    Fails early, with the job's diagnostics, if the job is no longer running or pending.
    """
    deadline = time.monotonic() + timeout
    polls = 0
    while not (result := check()):
        polls += 1
        ended = polls % 50 == 0 and all(s not in ("RUNNING", "PENDING", "CONFIGURING") for s in cluster.job_states(job).values())
        if ended or time.monotonic() > deadline:
            raise AssertionError(f"job {job}: {what} never happened\n{cluster.diagnostics(job)}")
        time.sleep(0.01)
    return result


@contextlib.contextmanager
def _frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes for the block (signals sent to them meanwhile stay pending), SIGCONT after it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _signal_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits for delivery to the process (SIGSTOPped processes keep it pending)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:  # it has died: the wait fails on its timeout, with the job's output
        return False
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    mask = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return bool(mask & (1 << (signum - 1)))


def _summary(log: Path) -> str:
    """cache-teacher's closing line in an array task's log."""
    match = re.search(r"cache-teacher wrote \d+ shards to \S+ and skipped \d+ already complete", log.read_text())
    assert match, log.read_text()
    return match.group(0)


def test_array_of_four_tasks_and_finalize_write_the_single_process_cache(
    slurm_cluster: SlurmCluster, tmp_path: Path, job_env: dict[str, str], teacher: Path, tokens: Path, reference_cache: Path
) -> None:
    out, logs = tmp_path / "cache", tmp_path / "logs"
    submitted = _kdpipe("slurm", "cache-teacher", "--tasks", TASKS, "--log-dir", logs, "--submit", "--",
                        *_cache_args(teacher, tokens, out), cwd=tmp_path, env=job_env)  # fmt: skip
    ids = re.search(rf"array job (\d+) \({TASKS} tasks\) and finalize job (\d+)", submitted.stdout)
    assert ids, submitted.stdout
    array, finalize = ids.groups()
    states = slurm_cluster.wait(array, timeout=180)
    assert sorted(states.values()) == ["COMPLETED"] * TASKS, slurm_cluster.diagnostics(array)
    assert slurm_cluster.wait(finalize, timeout=120) == {finalize: "COMPLETED"}, slurm_cluster.diagnostics(finalize)

    # Each task wrote its own share and nothing else; the finalize job re-checked every shard.
    for task, shards in enumerate(_task_shards(reference_cache, TASKS)):
        expected = f"cache-teacher wrote {len(shards)} shards to {out} and skipped 0 already complete"
        assert _summary(logs / f"kdpipe-cache-{array}_{task}.out") == expected
    num_shards = len(open_cache(reference_cache).manifest.global_shards())
    assert f"{num_shards} ok, 0 bad" in (logs / f"kdpipe-cache-finalize-{finalize}.out").read_text()
    assert_same_cache(out, reference_cache)


def test_a_cancelled_task_is_all_a_resubmitted_array_recomputes(
    slurm_cluster: SlurmCluster, tmp_path: Path, job_env: dict[str, str], teacher: Path, tokens: Path,
    reference_cache: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in job_env.items():
        monkeypatch.setenv(name, value)  # `submit` runs sbatch in this process's environment
    out, logs = tmp_path / "cache", tmp_path / "logs"
    # Two tasks (fewer processes on this small machine): task 0 takes global shards 0, 2, 4, ..., task 1 the others.
    array_script = render_cache_array(SlurmCacheConfig(tasks=2, log_dir=logs), _cache_args(teacher, tokens, out), tmp_path)
    array = submit(array_script)
    task_shards = _task_shards(reference_cache, 2)

    # Task 0, frozen once it has completed one of its shards, is cancelled while frozen.
    find = lambda: _processes({"SLURM_ARRAY_JOB_ID": array, "SLURM_ARRAY_TASK_ID": "0"}, "cache-teacher")  # noqa: E731
    pids = _wait_until("task 0's cache-teacher process started", find, slurm_cluster, array)
    _wait_until("task 0 completed a shard", lambda: _complete(out, task_shards[0]), slurm_cluster, array)
    with _frozen(pids):
        assert len(_complete(out, task_shards[0])) < len(task_shards[0]), "task 0 wrote all its shards before it was frozen"
        slurm_cluster.scancel(f"{array}_0")
        states = slurm_cluster.wait(array, timeout=240)
    assert states == {f"{array}_0": "CANCELLED", f"{array}_1": "COMPLETED"}, slurm_cluster.diagnostics(array)
    kept = _complete(out, task_shards[0])
    assert 1 <= len(kept) < len(task_shards[0]), kept
    complete_files = [p for s in kept + task_shards[1] for p in cf.shard_dir(out, *s).rglob("*") if p.is_file()]
    stats_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in complete_files}

    # The same array again: task 0 computes its missing shards only, task 1 nothing.
    again = submit(array_script)
    states = slurm_cluster.wait(again, timeout=240)
    assert sorted(states.values()) == ["COMPLETED"] * 2, slurm_cluster.diagnostics(again)
    for task, wrote, skipped in ((0, len(task_shards[0]) - len(kept), len(kept)), (1, 0, len(task_shards[1]))):
        expected = f"cache-teacher wrote {wrote} shards to {out} and skipped {skipped} already complete"
        assert _summary(logs / f"kdpipe-cache-{again}_{task}.out") == expected
    # Complete shards were not rewritten: the same files (inodes), untouched since (mtimes).
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in complete_files} == stats_before
    # The cancelled shard's partial tmp dir is gone too (assert_same_cache compares every path under shards/).
    assert_same_cache(out, reference_cache)


def _submit_train(cluster: SlurmCluster, root: Path, cache: Path, env: dict[str, str]) -> tuple[str, Path, Path]:
    """`kdpipe slurm train-student` on one node with RANKS CPU processes; returns (job id, run dir, job log)."""
    run, logs = root / "run", root / "logs"
    submitted = _kdpipe("slurm", "train-student", "--nodes", 1, "--procs-per-node", RANKS, "--cpus-per-task", RANKS,
                        "--signal-seconds", 60, "--log-dir", logs, "--submit", "--", *_train_args(cache, run),
                        cwd=root, env=env)  # fmt: skip
    job = re.search(r"submitted train-student job (\d+)", submitted.stdout)
    assert job, submitted.stdout
    return job.group(1), run, logs / f"kdpipe-train-{job.group(1)}.out"


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock field."""
    lines = (run / METRICS_FILE).read_text().splitlines() if (run / METRICS_FILE).is_file() else []
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in _records(run) if r["type"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted_run(
    slurm_cluster: SlurmCluster, reference_cache: Path, job_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """A training job run to its end: (job id, run dir, job log). The preemption test's reference."""
    job, run, log = _submit_train(slurm_cluster, tmp_path_factory.mktemp("slurm-train"), reference_cache, job_env)
    assert slurm_cluster.wait(job, timeout=240) == {job: "COMPLETED"}, slurm_cluster.diagnostics(job)
    return job, run, log


def test_srun_torchrun_trains_on_two_ranks_to_the_last_step(uninterrupted_run: tuple[str, Path, Path]) -> None:
    job, run, log = uninterrupted_run
    train = [r for r in _records(run) if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TRAIN_STEPS + 1)), log.read_text()
    # Each step took BATCH sequences on each of the two ranks.
    assert [r["tokens"] for r in train] == [step * RANKS * BATCH * SEQ_LEN for step in range(1, TRAIN_STEPS + 1)]
    assert all(r["loss"] > 0 for r in train)
    manifest = json.loads((run / "run.json").read_text())
    assert (manifest["world_size"], manifest["global_batch_size"]) == (RANKS, RANKS * BATCH)
    assert latest_checkpoint(run).name == f"step-{TRAIN_STEPS:08d}"
    text = log.read_text()
    assert f"job {job}, restart 0" in text and f"trained {TRAIN_STEPS} steps" in text and "requeueing" not in text, text


def test_preempted_training_requeues_resumes_and_ends_on_the_uninterrupted_curve(
    slurm_cluster: SlurmCluster, tmp_path: Path, job_env: dict[str, str], reference_cache: Path,
    uninterrupted_run: tuple[str, Path, Path],
) -> None:  # fmt: skip
    job, run, log = _submit_train(slurm_cluster, tmp_path, reference_cache, job_env)
    find = lambda: _processes({"SLURM_JOB_ID": job, "LOCAL_RANK": None}, "train-student")  # noqa: E731
    ranks = _wait_until("two training processes started", lambda: len(pids := find()) == RANKS and pids, slurm_cluster, job)
    _wait_until("step 2 logged", lambda: len(_train_steps(run)) >= 2, slurm_cluster, job)
    # What Slurm does signal_seconds before the time limit: USR1 to the batch shell, which forwards it
    # through srun and torchrun. The ranks are frozen until it has reached both, so they stop a step or two later.
    with _frozen(ranks):
        assert len(_train_steps(run)) < TRAIN_STEPS - 2
        slurm_cluster.scancel(job, "--batch", "--signal=USR1")
        delivered = lambda: all(_signal_pending(pid, signal.SIGUSR1) for pid in ranks)  # noqa: E731
        _wait_until("USR1 reached both ranks", delivered, slurm_cluster, job, timeout=60)
    assert slurm_cluster.wait(job, timeout=300) == {job: "COMPLETED"}, slurm_cluster.diagnostics(job)

    text = log.read_text()
    # The trainer reports the stop and its checkpoint, then the command exits with status 75, which torchrun
    # (itself stopping on USR1) does not pass on: the script requeues on the signal, not on the status.
    stop_line = rf"stopped by SIGUSR1 at step (\d+)/{TRAIN_STEPS}, loss \S+; checkpoint written, continue with --resume \(exit status 75\)"
    stopped = re.search(stop_line, text)
    assert stopped and 2 <= int(stopped.group(1)) < TRAIN_STEPS, text
    assert f"requeueing job {job}" in text and f"job {job}, restart 1" in text and f"trained {TRAIN_STEPS} steps" in text, text
    # The second run started from the preemption's checkpoint and ran to the end.
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    assert {f"step-{int(stopped.group(1)):08d}", f"step-{TRAIN_STEPS:08d}"} <= checkpoints, checkpoints

    _, reference, _ = uninterrupted_run
    assert _records(run) == _records(reference)  # every step's losses, bit for bit
    final, want = load_file(latest_checkpoint(run) / "model.safetensors"), load_file(latest_checkpoint(reference) / "model.safetensors")
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
