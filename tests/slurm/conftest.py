"""A real single-node Slurm cluster for the tests in this directory.

`slurm_cluster` (session-scoped) starts a private munged, slurmctld and slurmd from
Debian's `munge`, `slurmctld`, `slurmd` and `slurm-client` packages, with a slurm.conf
generated for this host, and stops them after the session. Everything it owns lives in
one temporary directory: its own munge key and socket, free TCP ports, state and spool
directories, logs. Nothing system-wide is touched, so several sessions (other engineers'
test runs, CI jobs) can each run a cluster on one machine at once. Client commands find
the cluster through `SLURM_CONF`, which `cluster.env` and `cluster.run` set.

Locally the tests skip with the reason when the packages are absent (or when not root:
slurmd must start job steps as the submitting user); with `CI=true` that is a failure,
since CI installs the packages (`.ci/run`) and a silent skip would hide the Slurm tests.

Usage::

    pytestmark = pytest.mark.slurm

    def test_array(slurm_cluster, tmp_path):
        job = slurm_cluster.run_sbatch("#!/bin/bash\\n#SBATCH --array=0-3\\necho $SLURM_ARRAY_TASK_ID\\n",
                                       cwd=tmp_path)
        states = slurm_cluster.wait(job, timeout=60)        # {"12_0": "COMPLETED", ...}
        assert set(states.values()) == {"COMPLETED"}, slurm_cluster.diagnostics(job)

The node declares `NODE_CPUS` CPUs whatever the machine has (`SlurmdParameters=
config_overrides`), so a 4-task array runs its tasks at once even on 2 cores; tests are
small, the oversubscription only costs wall time.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODE_CPUS = max(8, os.cpu_count() or 1)
"""CPUs the test node offers to jobs (more than the machine has: see the module docstring)."""

STARTUP_TIMEOUT_S = 60.0
"""How long the daemons may take until `sinfo` shows the node idle."""

STARTUP_ATTEMPTS = 3
"""Fresh directory and ports per attempt: another process may take a port between choosing and binding it."""

REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
"""Job states after which a job (or array task) never runs again; REQUEUED and PENDING are not."""

_JOB_FIELD = re.compile(r"(\w+)=(\S*)")


class SlurmTimeout(AssertionError):
    """A job did not reach a terminal state in time; the message carries the cluster's diagnostics."""


@dataclass
class SlurmCluster:
    """A running single-node cluster: its configuration, client environment and helpers."""

    root: Path
    """Temporary directory holding slurm.conf, the munge key and socket, state, spool and logs."""
    node: str
    """The node's name: `localhost`, so that torchrun's rendezvous on it resolves in any container."""
    cpus: int
    env: dict[str, str]
    """os.environ plus SLURM_CONF: pass to subprocesses that run Slurm client commands."""
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    _scripts: int = 0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def logs(self) -> dict[str, Path]:
        """The daemons' log files, for debugging a failed test."""
        return {name: self.root / "log" / f"{name}.log" for name in ("munged", "slurmctld", "slurmd")}

    def run(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster; on failure the error names the command and its output."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def submit(self, script: Path, *sbatch_args: str, cwd: Path | None = None) -> str:
        """`sbatch --parsable` a script file; returns the job id (the array's id for an array)."""
        result = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script)],
            env=self.env, capture_output=True, text=True, timeout=60, cwd=cwd or script.parent,
        )
        if result.returncode != 0:
            raise AssertionError(f"sbatch {script} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]  # "id" or "id;cluster"

    def run_sbatch(self, script_text: str, *sbatch_args: str, cwd: Path | None = None) -> str:
        """Write `script_text` to a file under root/jobs and submit it; the job runs in `cwd` (default root/jobs)."""
        jobs = self.root / "jobs"
        jobs.mkdir(exist_ok=True)
        self._scripts += 1
        script = jobs / f"job-{self._scripts:03d}.sh"
        script.write_text(script_text, encoding="utf-8")
        return self.submit(script, *sbatch_args, cwd=cwd or jobs)

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` of a job or array, one dict per record (array tasks apart, pending ranges as one)."""
        result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if result.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {result.stderr.strip()}")
        return [dict(_JOB_FIELD.findall(line)) for line in result.stdout.splitlines() if line.strip()]

    def job_states(self, job_id: str) -> dict[str, str]:
        """State of each record: {"12": "COMPLETED"} for a job, {"12_0": ..., "12_[2-3]": "PENDING"} for an array."""
        states = {}
        for record in self.job_records(job_id):
            task = record.get("ArrayTaskId")
            key = f"{record['ArrayJobId']}_{task}" if task else record["JobId"]
            states[key] = record["JobState"]
        return states

    def wait(self, job_id: str, timeout: float = 120.0, *, poll_s: float = 0.5) -> dict[str, str]:
        """Wait until the job (every task of an array) is in a terminal state; returns `job_states`.

        A requeued job counts as running until its last run ends. On timeout raises
        `SlurmTimeout` with the job records, the job output and the daemons' log tails.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_id)
            if states and all(state in TERMINAL_STATES for state in states.values()):
                return states
            if time.monotonic() > deadline:
                raise SlurmTimeout(f"job {job_id} not finished after {timeout:.0f}s: {states}\n{self.diagnostics(job_id)}")
            time.sleep(poll_s)

    def wait_running(self, job_id: str, timeout: float = 60.0, *, count: int = 1) -> dict[str, str]:
        """Wait until at least `count` records of the job are RUNNING (to signal or cancel a job mid-run)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_id)
            if sum(state == "RUNNING" for state in states.values()) >= count:
                return states
            if time.monotonic() > deadline:
                raise SlurmTimeout(f"job {job_id}: fewer than {count} running after {timeout:.0f}s: {states}\n{self.diagnostics(job_id)}")
            time.sleep(0.2)

    def scancel(self, job_id: str, *args: str) -> None:
        """`scancel [args] job_id`, e.g. `scancel("12_1")` or `scancel("12", "--signal=USR1", "--batch")`."""
        self.run("scancel", *args, job_id)

    def job_output(self, job_id: str) -> str:
        """The stdout/stderr files of every record of the job, labelled (for assertion messages)."""
        parts = []
        for record in self.job_records(job_id):
            for key in ("StdOut", "StdErr"):
                path = Path(record.get(key, ""))
                if path.is_file() and (key == "StdOut" or record.get("StdErr") != record.get("StdOut")):
                    parts.append(f"--- {record['JobId']} {key} {path}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def diagnostics(self, job_id: str | None = None) -> str:
        """Job records and output (when given a job) and the tail of each daemon log."""
        parts = []
        if job_id is not None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                for record in self.job_records(job_id):
                    parts.append(" ".join(f"{k}={record.get(k, '')}" for k in ("JobId", "JobState", "Reason", "ExitCode", "Restarts")))
                parts.append(self.job_output(job_id))
        parts.append(_log_tails(self.logs))
        return "\n".join(parts)


def _log_tails(logs: dict[str, Path], lines: int = 30) -> str:
    tails = []
    for name, path in logs.items():
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
        tails.append(f"--- {name} log {path}\n" + "\n".join(text))
    return "\n".join(tails)


def _free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now (all bound at once, so they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _node_line(node: str) -> tuple[str, int]:
    """The NodeName line (this host's memory from `slurmd -C`, `NODE_CPUS` CPUs) and the memory in MB."""
    detected = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    memory = re.search(r"RealMemory=(\d+)", detected)
    assert memory, f"slurmd -C printed no RealMemory: {detected!r}"
    real_memory = int(memory.group(1))
    return f"NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={real_memory} State=UNKNOWN", real_memory


def _slurm_conf(root: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    node_line, real_memory = _node_line(node)
    return textwrap.dedent(
        f"""\
        # Generated by tests/slurm/conftest.py for one test session; see its docstring.
        ClusterName=kdpipe-test-{ctld_port}
        # Job ids differ between clusters running at once, and so do ports derived from them.
        FirstJobId={random.randint(1_000, 1_000_000)}
        SlurmctldHost={node}(127.0.0.1)
        SlurmctldPort={ctld_port}
        SlurmdPort={slurmd_port}
        # A private munged: its socket is named here for daemons and clients alike. A requeued
        # job may start again only once its credential has expired (default 120 s): 5 s here.
        AuthType=auth/munge
        CredType=cred/munge
        AuthInfo=socket={root}/munge/socket,cred_expire=5
        SlurmUser=root
        SlurmdUser=root
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool
        SlurmctldPidFile={root}/run/slurmctld.pid
        SlurmdPidFile={root}/run/slurmd.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.log
        SlurmctldDebug=info
        SlurmdDebug=info
        # No cgroups in containers: track processes through /proc, bind nothing.
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        MpiDefault=none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU_Memory
        # Without a default memory per CPU every job asks for the whole node and array tasks serialise.
        DefMemPerCPU={max(1, real_memory // NODE_CPUS)}
        # Use the CPUs declared below even where the machine has fewer.
        SlurmdParameters=config_overrides
        ReturnToService=2
        MailProg=/bin/true
        JobRequeue=1
        # Keep finished jobs visible to `scontrol show job` for the whole session (there is no accounting).
        MinJobAge=86400
        # Quick scancel/requeue: SIGKILL 5 s after SIGTERM; start pending jobs within a second.
        KillWait=5
        SchedulerType=sched/backfill
        SchedulerParameters=sched_interval=1,bf_interval=1
        InactiveLimit=0
        SlurmctldTimeout=30
        SlurmdTimeout=30
        {node_line}
        PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
        """
    )


def _start_daemon(cluster: SlurmCluster, name: str, argv: list[str]) -> None:
    # A session of its own, so that stopping the daemon can signal its whole process group.
    log = open(cluster.root / "log" / f"{name}.out", "wb")
    cluster.daemons[name] = subprocess.Popen(argv, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()


def _wait_until(what: str, check: Callable[[], bool], cluster: SlurmCluster, deadline: float) -> None:
    """Poll `check` until true; fail at once, with its output, if a daemon exits meanwhile."""
    while not _check_quietly(check):
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                out = (cluster.root / "log" / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{out}\n{_log_tails(cluster.logs)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{_log_tails(cluster.logs)}")
        time.sleep(0.2)


def _check_quietly(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except subprocess.TimeoutExpired:  # a daemon that has bound its port but does not answer yet
        return False


def _node_idle(cluster: SlurmCluster) -> bool:
    result = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, timeout=5)
    return result.returncode == 0 and f"{cluster.node} idle" in result.stdout


def start_cluster(root: Path) -> SlurmCluster:
    """Write the configuration under `root` and start munged, slurmctld and slurmd; wait until the node is idle."""
    # The node is this machine (memory from `slurmd -C`), named localhost rather than by its hostname:
    # jobs reach the first node by name (torchrun's rendezvous), and not every container resolves its hostname.
    node = "localhost"
    ctld_port, slurmd_port = _free_ports(2)
    # munged refuses a socket whose directories are not traversable by all, and a key readable by others.
    root.chmod(0o755)
    for sub, mode in (("munge", 0o755), ("munge-key", 0o700), ("state", 0o755), ("spool", 0o755), ("run", 0o755), ("log", 0o755)):
        (root / sub).mkdir(mode=mode)
    key = root / "munge-key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (root / "slurm.conf").write_text(_slurm_conf(root, node, ctld_port, slurmd_port), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    cluster = SlurmCluster(root=root, node=node, cpus=NODE_CPUS, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        socket_path = root / "munge" / "socket"
        _start_daemon(cluster, "munged", [
            "munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
            f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid", f"--seed-file={root}/munge-key/seed",
        ])
        _wait_until("the munge socket", socket_path.exists, cluster, deadline)
        _start_daemon(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
        _wait_until("slurmctld", lambda: cluster.run("scontrol", "ping", check=False, timeout=5).returncode == 0, cluster, deadline)
        _start_daemon(cluster, "slurmd", ["slurmd", "-D", "-N", node, "-f", str(cluster.conf)])
        _wait_until(f"node {node} idle in sinfo", lambda: _node_idle(cluster), cluster, deadline)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM, SIGKILL after 15 s)."""
    if "slurmctld" in cluster.daemons and cluster.daemons["slurmctld"].poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
            cluster.run("scancel", "--full", f"--user={os.getuid()}", check=False, timeout=10)
            deadline = time.monotonic() + 15
            while cluster.run("squeue", "--noheader", check=False, timeout=10).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.pop(name, None)
        if proc is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    # Job processes and slurmstepds the cancellation did not end in time would outlive their daemons:
    # they all carry this cluster's SLURM_CONF (from slurmd's or the submitter's environment).
    for pid in _processes_with_env(f"SLURM_CONF={cluster.conf}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _processes_with_env(assignment: str) -> list[int]:
    """Pids of other processes started with `NAME=value` in their environment."""
    needle = b"\0" + assignment.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in b"\0" + (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found


def _why_unavailable() -> str | None:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found); apt-get install munge slurmctld slurmd slurm-client"
    if os.geteuid() != 0:
        return "the Slurm test cluster must run as root (slurmd starts job steps as the submitting user)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node Slurm cluster, shared by the session and stopped at its end."""
    reason = _why_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Slurm cluster can run: {reason}", pytrace=False)
        pytest.skip(reason)
    started = time.monotonic()
    failures = []
    for _ in range(STARTUP_ATTEMPTS):
        # Not under pytest's tmp_path: munged needs every directory above its socket to be world-traversable.
        root = Path(tempfile.mkdtemp(prefix="kdpipe-slurm-"))
        try:
            cluster = start_cluster(root)
            break
        except RuntimeError as err:
            failures.append(str(err))
            shutil.rmtree(root, ignore_errors=True)
    else:
        raise RuntimeError(f"the Slurm test cluster did not start in {STARTUP_ATTEMPTS} attempts:\n" + "\n\n".join(failures))
    print(f"\nslurm cluster up in {time.monotonic() - started:.1f}s at {root}")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)
