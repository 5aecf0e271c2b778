"""The test cluster itself, and kdpipe's rendered job scripts run on it with stand-in commands.

The stand-ins (a `kdpipe` first on PATH) record what the scripts made them do, so these
tests check the Slurm mechanics — array slots, the finalize dependency, srun torchrun's
rendezvous, USR1 forwarding, requeue and --resume — independently of the stages' own work,
which the stage tests on this cluster cover.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from kdpipe.pipeline.slurm import render_cache_array, render_cache_finalize, render_train, submit
from kdpipe.schemas.slurm_config import DEFAULT_ENV_SETUP, SlurmCacheConfig, SlurmTrainConfig
from tests.slurm.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

# Each task records its slot and when it ran (PYTHON: replaced by this interpreter).
ARRAY_TASK = """#!/bin/bash
#SBATCH --array=0-3
#SBATCH --output=task-%a.out
PYTHON - <<'EOF'
import json, os, time
start = time.time()
time.sleep(3)
record = {"task": os.environ["SLURM_ARRAY_TASK_ID"], "count": os.environ["SLURM_ARRAY_TASK_COUNT"], "start": start, "end": time.time()}
with open(f"task-{record['task']}.json", "w") as f:
    json.dump(record, f)
EOF
"""

# Records argv, the array slot and the time to $CALLS; array task $FAIL_TASK exits 1.
FAKE_CACHE_KDPIPE = """import json, os, sys, time
task = os.environ.get("SLURM_ARRAY_TASK_ID")
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "task": task, "count": os.environ.get("SLURM_ARRAY_TASK_COUNT"), "time": time.time()}) + "\\n")
time.sleep(1)
sys.exit(1 if task is not None and task == os.environ.get("FAIL_TASK") else 0)
"""

# A trainer stand-in under torchrun: joins the gloo group, checks the world, then waits for USR1
# (records "preempted", exits 75 like train-student) unless it runs with --resume (finishes at once).
FAKE_TRAINER = """import json, os, signal, sys, time
import torch
import torch.distributed as dist
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
rank, world = dist.get_rank(), dist.get_world_size()
def record(**fields):
    with open(os.environ["CALLS"], "a") as f:
        f.write(json.dumps(dict(rank=rank, world=world, restart=os.environ.get("SLURM_RESTART_COUNT", "0"), **fields)) + "\\n")
record(argv=sys.argv[1:], rank_sum=total.item())
if "--resume" not in sys.argv:
    open(os.environ["READY"] + str(rank), "w").close()
    deadline = time.time() + 120
    while not stop and time.time() < deadline:
        time.sleep(0.1)
record(event="preempted" if stop else "finished")
dist.barrier()
dist.destroy_process_group()  # leaving with the group alive can abort a rank still in gloo's threads
sys.exit(75 if stop else 0)
"""


def test_array_tasks_run_in_parallel(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.run_sbatch(ARRAY_TASK.replace("PYTHON", sys.executable), cwd=tmp_path)
    states = slurm_cluster.wait(job, timeout=120)
    assert sorted(states.values()) == ["COMPLETED"] * 4, slurm_cluster.diagnostics(job)
    records = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in range(4)]
    assert [(r["task"], r["count"]) for r in records] == [(str(i), "4") for i in range(4)]
    # All four were running at once: every task started before any task ended.
    assert max(r["start"] for r in records) < min(r["end"] for r in records), records


@pytest.fixture
def fake_kdpipe(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return bin_dir


def _install(bin_dir: Path, python_body: str) -> None:
    (bin_dir / "kdpipe").write_text(f"#!{sys.executable}\n{python_body}")
    (bin_dir / "kdpipe").chmod(0o755)


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_cache_array_and_finalize_after_every_task(
    slurm_cluster: SlurmCluster, tmp_path: Path, fake_kdpipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(fake_kdpipe, FAKE_CACHE_KDPIPE)
    calls = tmp_path / "calls.jsonl"
    for name, value in {**slurm_cluster.env, "CALLS": str(calls), "FAIL_TASK": "1"}.items():
        monkeypatch.setenv(name, value)  # sbatch exports the submitting environment to the jobs
    config = SlurmCacheConfig(tasks=3, max_parallel=3, log_dir=tmp_path / "logs",
                              env_setup=f"export PATH={shlex.quote(str(fake_kdpipe))}:$PATH")
    cache_args = ["--teacher", "t", "--tokens", "s", "--out", "the cache"]
    array = submit(render_cache_array(config, cache_args, tmp_path))
    finalize = submit(render_cache_finalize(config, Path("the cache"), tmp_path), dependency=f"afterany:{array}")
    array_states = slurm_cluster.wait(array, timeout=120)
    assert sorted(array_states.values()) == ["COMPLETED", "COMPLETED", "FAILED"], slurm_cluster.diagnostics(array)
    # afterany: the finalize job runs although task 1 failed.
    assert slurm_cluster.wait(finalize, timeout=60) == {finalize: "COMPLETED"}, slurm_cluster.diagnostics(finalize)
    records = _calls(calls)
    tasks = sorted((r["task"], r["count"], r["argv"][0], r["argv"][1:]) for r in records if r["task"] is not None)
    assert tasks == [(str(i), "3", "cache-teacher", cache_args) for i in range(3)]
    final = [r for r in records if r["task"] is None]
    assert [r["argv"] for r in final] == [["verify", "the cache"], ["status", "the cache", "--check"]]
    assert min(r["time"] for r in final) > max(r["time"] for r in records if r["task"] is not None)


def test_train_job_preempted_requeued_and_resumed(
    slurm_cluster: SlurmCluster, tmp_path: Path, fake_kdpipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(fake_kdpipe, FAKE_TRAINER)
    calls, ready = tmp_path / "calls.jsonl", tmp_path / "ready-rank"
    for name, value in {**slurm_cluster.env, "CALLS": str(calls), "READY": str(ready)}.items():
        monkeypatch.setenv(name, value)
    config = SlurmTrainConfig(nodes=1, procs_per_node=2, cpus_per_task=2, signal_seconds=60, log_dir=tmp_path / "logs",
                              env_setup=f"{DEFAULT_ENV_SETUP}\nexport PATH={shlex.quote(str(fake_kdpipe))}:$PATH")
    train_args = ["--cache", "c", "--out", "run", "--steps", "10"]
    job = submit(render_train(config, train_args, tmp_path))
    slurm_cluster.wait_running(job, timeout=60)
    _wait_for_files([Path(f"{ready}{rank}") for rank in range(2)], slurm_cluster, job)
    # What Slurm does signal_seconds before the time limit (--signal=B:USR1@...): signal the batch shell only.
    slurm_cluster.scancel(job, "--batch", "--signal=USR1")
    assert slurm_cluster.wait(job, timeout=180) == {job: "COMPLETED"}, slurm_cluster.diagnostics(job)
    records = _calls(calls)
    by_run = {restart: sorted((r for r in records if r["restart"] == restart), key=lambda r: (r["rank"], "event" in r))
              for restart in ("0", "1")}
    for restart, resume, event in (("0", [], "preempted"), ("1", ["--resume"], "finished")):
        run = by_run[restart]
        assert [(r["rank"], r["world"]) for r in run] == [(0, 2), (0, 2), (1, 2), (1, 2)], records
        assert [r["argv"] for r in run if "argv" in r] == [["train-student", *train_args, *resume]] * 2
        assert {r["rank_sum"] for r in run if "argv" in r} == {1.0}  # gloo all_reduce over ranks 0 and 1
        assert [r["event"] for r in run if "event" in r] == [event] * 2, records
    log = (tmp_path / "logs" / f"kdpipe-train-{job}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log  # --open-mode=append kept both runs' output


def _wait_for_files(paths: list[Path], cluster: SlurmCluster, job: str, timeout: float = 120.0) -> None:
    """Wait until the job has written `paths` (failing early, with diagnostics, if it ends first)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline or all(s not in ("RUNNING", "PENDING") for s in cluster.job_states(job).values()):
            raise AssertionError(f"{[p.name for p in paths if not p.exists()]} never appeared\n{cluster.diagnostics(job)}")
        time.sleep(0.2)
