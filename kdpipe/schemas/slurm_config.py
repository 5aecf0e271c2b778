"""Configs of `kdpipe slurm cache-teacher` and `kdpipe slurm train-student`: the Slurm side only.

The stage's own options (teacher, cache, steps, ...) are not repeated here: they are passed
through verbatim to the `kdpipe` command line inside the job script. These configs hold what
Slurm needs to place the job (partition, account, time, resources), how the job script sets
up its environment, and where the job logs go.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from kdpipe.schemas.config import option, required
from kdpipe.schemas.errors import KdpipeError

DEFAULT_ENV_SETUP = f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
"""Activate the virtual environment this kdpipe runs from, so the job finds the same kdpipe."""

# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")
# Slurm's memory format: a number with an optional K/M/G/T unit.
_MEM = re.compile(r"^\d+[KMGT]?$")


def time_limit_seconds(time: str) -> int:
    """Seconds in a Slurm time limit (already matched by `_TIME`), read as sbatch reads it.

    Without a day part: M, M:S or H:M:S. With one: D-H, D-H:M or D-H:M:S.
    """
    days, _, clock = time.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(kw_only=True, slots=True)
class SlurmJobConfig:
    """Options every kdpipe Slurm job has."""

    partition: str | None = option(None, "Slurm partition (sbatch --partition); default: the cluster's default partition.")
    account: str | None = option(None, "Slurm account to charge (sbatch --account).")
    time: str | None = option(None, "Time limit per job or array task, e.g. 04:00:00 or 2-00:00:00 (sbatch --time).")
    cpus_per_task: int | None = option(None, "CPUs per Slurm task (sbatch --cpus-per-task).")
    mem: str | None = option(None, "Memory per node, e.g. 64G (sbatch --mem); default: the cluster's default.")
    job_name: str | None = option(None, "Slurm job name; default kdpipe-cache or kdpipe-train.")
    log_dir: Path = option(Path("slurm-logs"), "Directory for the jobs' output files (created on --submit).")
    env_setup: str = option(
        DEFAULT_ENV_SETUP,
        "Shell line(s) that set up the job's environment, run before kdpipe (default: activate the virtualenv "
        "this kdpipe runs from), e.g. 'module load cuda/12.4 && source ~/venvs/kd/bin/activate'.",
    )
    submit: bool = option(False, "Submit with sbatch and print the job ids; without it, print the script(s).")

    def __post_init__(self) -> None:
        if self.time is not None and not _TIME.match(self.time):
            raise KdpipeError(f"slurm option time={self.time!r} is not a Slurm time: use MM, HH:MM:SS or D-HH:MM:SS")
        if self.mem is not None and not _MEM.match(self.mem):
            raise KdpipeError(f"slurm option mem={self.mem!r} is not a Slurm memory size: use e.g. 64G or 16000M")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise KdpipeError(f"slurm option cpus_per_task={self.cpus_per_task} must be >= 1")
        if not self.env_setup.strip():
            raise KdpipeError("slurm option env_setup is empty: give the line that activates kdpipe's environment")


@dataclass(kw_only=True, slots=True)
class SlurmCacheConfig(SlurmJobConfig):
    """`kdpipe slurm cache-teacher`: a job array over the cache's shards plus a finalize job."""

    tasks: int = required("Array tasks N: task i caches shards i, i+N, i+2N, ... (sbatch --array=0-(N-1)).")
    max_parallel: int | None = option(None, "At most this many array tasks run at once (sbatch --array=...%M).")
    gpus_per_task: int = option(0, "GPUs per array task (sbatch --gpus-per-task); 0 for CPU teachers.")

    def __post_init__(self) -> None:
        SlurmJobConfig.__post_init__(self)
        if self.tasks < 1:
            raise KdpipeError(f"slurm option tasks={self.tasks} must be >= 1")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise KdpipeError(f"slurm option max_parallel={self.max_parallel} must be >= 1")
        if self.gpus_per_task < 0:
            raise KdpipeError(f"slurm option gpus_per_task={self.gpus_per_task} must be >= 0")


@dataclass(kw_only=True, slots=True)
class SlurmTrainConfig(SlurmJobConfig):
    """`kdpipe slurm train-student`: one `srun torchrun` job, requeued on preemption."""

    nodes: int = option(1, "Nodes (sbatch --nodes); torchrun runs once per node, rendezvous on the first one.")
    gpus_per_node: int = option(0, "GPUs per node (sbatch --gpus-per-node); 0 trains on CPU (gloo).")
    procs_per_node: int | None = option(
        None, "Training processes per node (torchrun --nproc-per-node); default gpus_per_node, required on CPU."
    )
    after: str | None = option(
        None,
        "Start only once this job id has completed successfully (sbatch --dependency=afterok:ID), e.g. the "
        "finalize job `kdpipe slurm cache-teacher --submit` printed, so students start on a verified cache.",
    )
    signal_seconds: int = option(
        300,
        "Seconds before the time limit at which Slurm sends USR1: the trainer checkpoints, the job requeues "
        "itself and resumes. Must cover one checkpoint save.",
    )

    def __post_init__(self) -> None:
        SlurmJobConfig.__post_init__(self)
        if self.nodes < 1:
            raise KdpipeError(f"slurm option nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 0:
            raise KdpipeError(f"slurm option gpus_per_node={self.gpus_per_node} must be >= 0")
        if self.procs_per_node is None and self.gpus_per_node == 0:
            raise KdpipeError("slurm train-student without GPUs needs --procs-per-node (training processes per node)")
        if self.after is not None and not re.fullmatch(r"\d+(_\d+)?", self.after):
            raise KdpipeError(f"slurm option after={self.after!r} is not a Slurm job id: give the number sbatch printed")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise KdpipeError(f"slurm option procs_per_node={self.procs_per_node} must be >= 1")
        if self.signal_seconds < 1:
            raise KdpipeError(f"slurm option signal_seconds={self.signal_seconds} must be >= 1")
        if self.time is not None and self.signal_seconds >= (limit := time_limit_seconds(self.time)):
            raise KdpipeError(
                f"slurm option signal_seconds={self.signal_seconds} is not shorter than time={self.time!r} "
                f"({limit} s): the job would be signalled at once and requeue forever; give a longer --time "
                "or a smaller --signal-seconds"
            )

    @property
    def nproc_per_node(self) -> int:
        """torchrun processes per node: procs_per_node, else one per GPU."""
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node
