"""Slurm job scripts for cache-teacher (a job array plus a finalize job) and train-student (srun torchrun).

The scripts are meant to be read: each says what it runs, how to submit it, and why each
less common directive is there. They embed the exact `kdpipe` command line and the user's
environment set-up line, and `#SBATCH --chdir` pins the directory the command was rendered
in, so relative paths in the command mean what they meant when it was typed.

cache-teacher: task i of an N-task array caches global shards i, i+N, i+2N, ... (the
command reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT). Shards are written
atomically and complete ones are skipped, so the same array can be re-submitted after a
failure or cancellation and only the missing shards are computed. A finalize job that
depends on the whole array (`afterany`, so it also runs when tasks failed) re-checks every
checksum with `kdpipe verify` and fails, naming them, if shards are still missing. With
`--backend vllm --tensor-parallel-size N` each task gets N GPUs (one vLLM teacher per task).

train-student: `srun` starts one torchrun agent per node; the agents meet at the first node
of the allocation (`scontrol show hostnames`) and start the training processes. Preemption:
see `render_train`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kdpipe import __version__
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.slurm_config import SlurmCacheConfig, SlurmJobConfig, SlurmTrainConfig

PREEMPT_SIGNAL = "USR1"
"""Sent by Slurm `signal_seconds` before the time limit; the trainer checkpoints on it and the job requeues."""

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun's agent forwards to its workers. USR1 is not in torchrun's default list,
and an agent that does not handle it dies of it (the default action) and takes its workers
down before they have saved."""

RDZV_PORT_BASE = 20000
"""The rendezvous port is RDZV_PORT_BASE + job id mod 20000, so two jobs sharing a node rarely collide."""


@dataclass(frozen=True, slots=True)
class JobScript:
    """A rendered sbatch script and the directory its `--output` files go to (which must exist at submit)."""

    name: str
    text: str
    log_dir: Path


def _directives(config: SlurmJobConfig, job_name: str, workdir: Path, output: str) -> list[str]:
    """The #SBATCH lines every kdpipe job has."""
    lines = [f"--job-name={config.job_name or job_name}"]
    for flag, value in (("partition", config.partition), ("account", config.account), ("time", config.time)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if config.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={config.cpus_per_task}")
    if config.mem is not None:
        lines.append(f"--mem={config.mem}")
    lines.append(f"--chdir={workdir}")
    lines.append(f"--output={config.log_dir.absolute() / output}")
    return [f"#SBATCH {shlex.quote(line)}" for line in lines]


def _kdpipe_command(stage: str, args: Sequence[str]) -> str:
    return shlex.join(["kdpipe", stage, *args])


def _environment(config: SlurmJobConfig) -> str:
    return f"# The environment kdpipe runs in (--env-setup).\n{config.env_setup}\n"


def render_cache_array(config: SlurmCacheConfig, cache_args: Sequence[str], workdir: Path) -> JobScript:
    """The job array: `config.tasks` tasks, each running `kdpipe cache-teacher CACHE_ARGS` on its share of the shards."""
    array = f"0-{config.tasks - 1}" + (f"%{config.max_parallel}" if config.max_parallel is not None else "")
    directives = _directives(config, "kdpipe-cache", workdir, "%x-%A_%a.out")
    directives.insert(1, f"#SBATCH --array={array}")
    directives.insert(2, "#SBATCH --ntasks=1")
    if config.gpus_per_task:
        directives.insert(3, f"#SBATCH --gpus-per-task={config.gpus_per_task}")
    command = _kdpipe_command("cache-teacher", cache_args)
    text = f"""#!/bin/bash
# kdpipe cache-teacher as a Slurm job array of {config.tasks} tasks (rendered by kdpipe {__version__}).
#
# Task i caches the global shards i, i+{config.tasks}, i+{2 * config.tasks}, ...: cache-teacher reads its
# slot from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT. Shards are written to a temporary name and
# renamed when complete, so tasks need no lock, and complete shards are skipped: re-submitting this
# script after a failed or cancelled task computes only the missing shards.
#
# Submit together with the finalize job (kdpipe slurm cache-teacher --submit does this):
#   array=$(sbatch --parsable THIS_SCRIPT) && sbatch --dependency=afterany:$array FINALIZE_SCRIPT
{chr(10).join(directives)}
set -euo pipefail

{_environment(config)}
echo "kdpipe cache-teacher: array task ${{SLURM_ARRAY_TASK_ID}} of ${{SLURM_ARRAY_TASK_COUNT}} on $(hostname)"
{command}
"""
    return JobScript("kdpipe-cache-array.sh", text, config.log_dir.absolute())


def render_cache_finalize(config: SlurmCacheConfig, cache: Path, workdir: Path) -> JobScript:
    """The finalize job: after the whole array, verify every checksum and require every shard complete."""
    directives = _directives(config, "kdpipe-cache", workdir, "%x-finalize-%j.out")
    directives.insert(1, "#SBATCH --ntasks=1")
    quoted = shlex.quote(str(cache))
    text = f"""#!/bin/bash
# Finalize a kdpipe cache built by a job array (rendered by kdpipe {__version__}).
#
# Submitted with --dependency=afterany:ARRAY_JOB_ID: it runs once every array task has ended, however
# it ended, so a failed or cancelled task shows up here as missing shards rather than as a finalize
# job that never starts. It fails (exit 2) naming every bad or missing shard; re-submit the array
# (complete shards are skipped), or redo bad shards with `kdpipe cache-teacher --repair`.
{chr(10).join(directives)}
set -euo pipefail

{_environment(config)}
# Re-read every file of every complete shard and compare it with its recorded checksum.
kdpipe verify {quoted}
# Every shard of the cache must be complete.
kdpipe status {quoted} --check
"""
    return JobScript("kdpipe-cache-finalize.sh", text, config.log_dir.absolute())


def render_train(config: SlurmTrainConfig, train_args: Sequence[str], workdir: Path) -> JobScript:
    """`srun torchrun ... kdpipe train-student TRAIN_ARGS`, requeued after a preemption signal.

    Preemption: `--signal=B:USR1@S` sends USR1 to the batch shell only, S seconds before the
    time limit. Sent to the job steps instead (no `B:`), the signal would reach the training
    processes, but the script could not tell a preemption from a crash and would not know to
    requeue. The shell's trap records the preemption and forwards USR1 to srun, which
    forwards it to every task; torchrun's agent (told to handle USR1) passes it on to its
    workers, which save a checkpoint and exit. The shell then requeues the job
    (`scontrol requeue`, allowed by `--requeue`); Slurm sets SLURM_RESTART_COUNT in the new
    run, and the script adds `--resume` so training continues from that checkpoint.
    """
    nproc = config.nproc_per_node
    directives = _directives(config, "kdpipe-train", workdir, "%x-%j.out")
    extra = [f"#SBATCH --nodes={config.nodes}", "#SBATCH --ntasks-per-node=1"]
    if config.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={config.gpus_per_node}")
    if config.after is not None:
        extra.append(f"#SBATCH --dependency=afterok:{config.after}")
    extra += ["#SBATCH --requeue", f"#SBATCH --signal=B:{PREEMPT_SIGNAL}@{config.signal_seconds}", "#SBATCH --open-mode=append"]
    directives[1:1] = extra
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch allocation.
    srun_cpus = f" --cpus-per-task={config.cpus_per_task}" if config.cpus_per_task is not None else ""
    command = _kdpipe_command("train-student", train_args)
    if "--resume" in train_args:
        resume_block = "# The command resumes on every run (--resume was given).\nresume=()"
    else:
        resume_block = (
            "# A requeued run (SLURM_RESTART_COUNT > 0) continues from the run's last complete checkpoint.\n"
            'resume=()\nif [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then\n    resume=(--resume)\nfi'
        )
    text = f"""#!/bin/bash
# kdpipe train-student on {config.nodes} node(s) x {nproc} process(es) with srun torchrun (rendered by kdpipe {__version__}).
#
# Submit: sbatch THIS_SCRIPT   (or kdpipe slurm train-student ... --submit)
#
# Preemption and time limits: {config.signal_seconds} s before the time limit, Slurm sends {PREEMPT_SIGNAL} to this batch
# shell only (the B: of --signal). The trap below records it and forwards it through srun and torchrun
# to the training processes, which save a checkpoint and exit; the script then requeues the job
# (--requeue) and the requeued run continues from that checkpoint with --resume. Signalling the job
# steps directly (no B:) would stop the trainer too, but this script could not tell a preemption from
# a crash and would not requeue. --open-mode=append keeps the log of every run.
{chr(10).join(directives)}
set -euo pipefail

{_environment(config)}
# torchrun rendezvous: the first node of the allocation hosts it, on a port derived from the job id.
# (sed reads the whole list: `head -n 1` could end the pipe early, and pipefail would fail on SIGPIPE.)
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
rdzv_port=$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 20000 ))

{resume_block}
echo "kdpipe train-student: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, nodes $SLURM_JOB_NODELIST, rendezvous $head_node:$rdzv_port"

preempted=0
on_preempt() {{
    preempted=1
    echo "$(date -Is) {PREEMPT_SIGNAL}: the job is about to end; the trainer checkpoints, then the job requeues"
    kill -{PREEMPT_SIGNAL} "$srun_pid" 2>/dev/null || true
}}
trap on_preempt {PREEMPT_SIGNAL}
# A cancellation or a preemption by Slurm itself sends SIGTERM to every process: srun and the trainer
# get it too (the trainer checkpoints on it). Wait for them instead of dying first; no requeue here,
# Slurm requeues a preempted job itself and a cancelled one must stay cancelled.
trap 'echo "$(date -Is) SIGTERM: waiting for the trainer to stop"' TERM

# The command, as given to kdpipe slurm train-student:
#   {command}
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1{srun_cpus} --kill-on-bad-exit=1 \\
    torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={nproc} \\
        --rdzv-backend=c10d --rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \\
        --signals-to-handle={TORCHRUN_SIGNALS} --shutdown-timeout={config.signal_seconds} \\
        --no-python {command} "${{resume[@]}}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun itself has ended.
status=0
while :; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$preempted" = 1 ]; then
    echo "$(date -Is) requeueing job $SLURM_JOB_ID (training exited with $status)"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""
    return JobScript("kdpipe-train.sh", text, config.log_dir.absolute())


def submit(job: JobScript, *, dependency: str | None = None) -> str:
    """`sbatch --parsable` the script (fed on stdin; Slurm keeps its own copy); returns the job id."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    argv = ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else [])
    try:
        result = subprocess.run(argv, input=job.text, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise KdpipeError("sbatch not found: submit from a Slurm login node, or drop --submit to print the script") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        raise KdpipeError(f"sbatch refused {job.name}: {lines[-1]}")
    return result.stdout.strip().split(";")[0]  # "jobid" or "jobid;cluster"


def cache_teacher_jobs(
    config: SlurmCacheConfig, cache_args: Sequence[str], cache_config: CacheTeacherConfig, workdir: Path
) -> str:
    """Render the array and finalize scripts; submit both when `config.submit`. Returns what to print.

    `cache_args` is the cache-teacher command line as the user gave it, `cache_config` what it
    resolves to (the finalize job needs the cache directory).
    """
    if cache_config.shard_index is not None or cache_config.num_shards is not None:
        raise KdpipeError(
            "kdpipe slurm cache-teacher sets each task's shards from the array (--tasks); drop --shard-index/--num-shards"
        )
    cache = cache_config.out
    array = render_cache_array(replace(config, gpus_per_task=_cache_task_gpus(config, cache_config)), cache_args, workdir)
    finalize = render_cache_finalize(config, cache, workdir)
    if not config.submit:
        return f"{array.text}\n# ----- {finalize.name} -----\n{finalize.text}"
    array_id = submit(array)
    finalize_id = submit(finalize, dependency=f"afterany:{array_id}")
    return (
        f"submitted cache-teacher array job {array_id} ({config.tasks} tasks) and finalize job {finalize_id}\n"
        f"logs: {array.log_dir}; progress: kdpipe status {shlex.quote(str(cache))}"
    )


def _cache_task_gpus(config: SlurmCacheConfig, cache_config: CacheTeacherConfig) -> int:
    """GPUs each array task gets: --gpus-per-task, or for the vLLM backend its tensor-parallel size."""
    if cache_config.backend != "vllm":
        return config.gpus_per_task
    tp = cache_config.tensor_parallel_size
    if config.gpus_per_task and config.gpus_per_task < tp:
        raise KdpipeError(
            f"--gpus-per-task {config.gpus_per_task} is fewer than cache-teacher's --tensor-parallel-size {tp}; "
            "give each task at least as many GPUs, or drop --gpus-per-task"
        )
    return config.gpus_per_task or tp


def train_student_job(config: SlurmTrainConfig, train_args: Sequence[str], workdir: Path) -> str:
    """Render the training script; submit it when `config.submit`. Returns what to print."""
    job = render_train(config, train_args, workdir)
    if not config.submit:
        return job.text
    job_id = submit(job)
    return f"submitted train-student job {job_id} ({config.nodes} node(s) x {config.nproc_per_node} process(es))\nlogs: {job.log_dir}"
