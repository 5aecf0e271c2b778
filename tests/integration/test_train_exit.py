"""A run that dies of a genuine bug exits with its traceback: it never hangs on its loader workers.

The loader's workers have SIGTERM/SIGUSR1 blocked (so a job-wide signal stops only the
trainer), and an uncaught exception keeps the run's frames, and so the loader, alive until
the interpreter exits, where multiprocessing terminates its children with SIGTERM and joins
them. Unless `train_student` shuts the workers down on its way out, that join waits forever:
on Slurm, a crashed job would hold its nodes until its time limit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.integration.test_train_cli import REPO, train_args, work  # noqa: F401  (work: fixture)

# The real CLI in a child process, with one step of the trainer replaced by a bug.
CHILD = textwrap.dedent(
    """
    import sys
    from kdpipe import cli
    from kdpipe.student_train import trainer

    calls = []
    original = trainer.Trainer._train_step

    def buggy_step(self, micro_batches):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected bug in step 2")
        return original(self, micro_batches)

    trainer.Trainer._train_step = buggy_step
    sys.argv = ["kdpipe", *sys.argv[1:]]
    cli.main()
    """
)


def test_a_bug_mid_run_exits_with_its_traceback_instead_of_hanging(work, tmp_path):
    args = train_args(work, tmp_path / "run", "--steps", 5, "--num-workers", 2)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" in result.stderr and "RuntimeError: injected bug in step 2" in result.stderr
