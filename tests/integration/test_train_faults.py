"""`kdpipe train-student` under kill -9: `--resume` continues from the last complete checkpoint
and ends on the uninterrupted run's loss curve, weights and optimizer state, bit for bit.

The run: 7 steps, a checkpoint every 2 (steps 2, 4, 6 and the last, 7), 2 kept. Most kill
points cut the save of step 6 (`save_checkpoint`, checkpoint.py), whose steps are, in order:

  tmp dir     mkdir checkpoints/.tmp-step-00000006-{pid}
  tensors     save_file model.safetensors                 kill before it, and half-way through it
  optimizer   torch.save optimizer.pt                     half-way through it
  rng         torch.save rng.pt                           kill before it
  state       write_text trainer_state.json               half-way through it
  fsync       every file, then the tmp dir
  rename      os.rename to step-00000006: now complete    kill before and just after it
  prune       os.rename of step-00000002 to .tmp-delete-…, then rmtree
                                                          kill between the two
and in the save of the last step, 7: just after its rename, and between the halves of its prune
of step-00000004 (the resume then has no step to train, and must still finish the prune).

Between saves the trainer appends one line per step to metrics.jsonl; the checkpoint records
the file's length and a resume truncates it there: kill after step 5's line is written and
half-way through it. One more kill comes from outside, at whatever the run is doing once 5
steps are logged.

No hook in kdpipe: the command runs in a forked child that wraps the function of the step
(torch.save, safetensors' save_file, Path.write_text, os.rename, MetricsLog.write) and
SIGKILLs itself in the chosen call. The resume and the reference run are the plain CLI; a
spy records which checkpoint the resume loads and how many steps it trains. Forks of one
server process that has imported torch and transformers once save ~10 s per command on the
shared test machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from kdpipe.student_train import checkpoint as ckpt
from kdpipe.schemas.run_dir import METRICS_FILE
from kdpipe.student_train.callbacks import MetricsLog
from tests.integration.test_train_cli import REPO, train_args, work  # noqa: F401  (work: fixture)

STEPS = 7
RUN_OPTIONS = ("--steps", STEPS, "--checkpoint-every", 2, "--keep-checkpoints", 2, "--num-workers", 0)
FINAL_CHECKPOINTS = ["step-00000006", "step-00000007"]  # what keep=2 leaves at the end
EXTERNAL_KILL_AFTER = 5  # train lines logged before the outside kill


# ---------------------------------------------------------------- kill points (run in the child)


def _in_save_of(path: Any, step: int) -> bool:
    """Whether `path` is (in) the tmp dir of the save of `step`."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = Path(path)
    return any(p.name.startswith(f"{ckpt.TMP_PREFIX}{ckpt.checkpoint_name(step)}-") for p in (path, path.parent))


class KillPoint(NamedTuple):
    """Where the child SIGKILLs itself: in the first call of `owner.function` that `hit` accepts."""

    owner: Any
    function: str
    hit: Callable[..., bool]  # the call's first two positional arguments -> whether this is the call
    when: str  # "before" the call, "after" it, or "torn": after it, with the second half of what it wrote cut off
    complete: list[int]  # steps of the complete checkpoints right after the kill
    resume_from: int
    logged: int  # whole lines in metrics.jsonl at the kill ("torn-metrics-line" leaves half of one more)
    leftover: str | None = None  # prefix of the one `.tmp-*` entry the kill leaves in checkpoints/
    cut_files: int = 0  # for a cut save of step 6: how many of its files (in write order) its tmp dir holds
    written: Callable[..., Any] | None = None  # for "torn": the file the call writes


WRITE_ORDER = (ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE, ckpt.TRAINER_STATE_FILE)
_CUT = f"{ckpt.TMP_PREFIX}step-00000006-"
_CUT_SAVE = dict(complete=[2, 4], resume_from=4, logged=6, leftover=_CUT)
_save_file_of_6 = lambda tensors, path: _in_save_of(path, 6)  # noqa: E731
_torch_save_of_6 = lambda name: lambda obj, path: _in_save_of(path, 6) and Path(path).name == name  # noqa: E731
_rename_of = lambda name: lambda src, dst: Path(src).name == name  # noqa: E731
_log_of_step_5 = lambda log, record: record["step"] == 5  # noqa: E731
KILL_POINTS = {
    "tensors-absent": KillPoint(ckpt, "save_file", _save_file_of_6, "before", **_CUT_SAVE, cut_files=0),
    "tensors-torn": KillPoint(
        ckpt, "save_file", _save_file_of_6, "torn", **_CUT_SAVE, cut_files=1, written=lambda tensors, path: path
    ),
    "optimizer-torn": KillPoint(
        torch, "save", _torch_save_of_6(ckpt.OPTIMIZER_FILE), "torn", **_CUT_SAVE, cut_files=2, written=lambda obj, path: path
    ),
    "rng-absent": KillPoint(torch, "save", _torch_save_of_6(ckpt.RNG_FILE), "before", **_CUT_SAVE, cut_files=2),
    "state-torn": KillPoint(
        pathlib.Path, "write_text", lambda path, text: path.name == ckpt.TRAINER_STATE_FILE and _in_save_of(path, 6), "torn",
        **_CUT_SAVE, cut_files=4, written=lambda path, text: path,
    ),  # fmt: skip
    "rename": KillPoint(os, "rename", lambda src, dst: _in_save_of(src, 6), "before", **_CUT_SAVE, cut_files=4),
    "after-rename": KillPoint(os, "rename", lambda src, dst: _in_save_of(src, 6), "after", [2, 4, 6], resume_from=6, logged=6),
    "mid-prune": KillPoint(
        os, "rename", _rename_of("step-00000002"), "after", [4, 6], resume_from=6, logged=6,
        leftover=f"{ckpt.TMP_PREFIX}delete-step-00000002-",
    ),  # fmt: skip
    "after-last-rename": KillPoint(os, "rename", lambda src, dst: _in_save_of(src, 7), "after", [4, 6, 7], resume_from=7, logged=7),
    "mid-last-prune": KillPoint(
        os, "rename", _rename_of("step-00000004"), "after", [6, 7], resume_from=7, logged=7,
        leftover=f"{ckpt.TMP_PREFIX}delete-step-00000004-",
    ),  # fmt: skip
    "metrics-line": KillPoint(MetricsLog, "write", _log_of_step_5, "after", [2, 4], resume_from=4, logged=5),
    "torn-metrics-line": KillPoint(
        MetricsLog, "write", _log_of_step_5, "torn", [2, 4], resume_from=4, logged=4, written=lambda log, record: log.path
    ),
}


def _arm(point: KillPoint) -> None:
    """Replace `point.owner.function` by a wrapper that kills this process at the chosen call."""
    real = getattr(point.owner, point.function)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not point.hit(*args[:2]):
            return real(*args, **kwargs)
        if point.when == "torn":
            path = Path(point.written(*args[:2]))
            before = path.stat().st_size if path.exists() else 0
            real(*args, **kwargs)
            os.truncate(path, before + (path.stat().st_size - before) // 2)
        elif point.when == "after":
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL sent to self")

    setattr(point.owner, point.function, wrapper)


def _spy(report: dict[str, Any]) -> None:
    """Record in `report` the checkpoints the trainer loads, the step it starts at and the steps it trains."""
    from kdpipe.student_train import trainer

    load, restore, train_step = trainer.load_checkpoint, trainer.Trainer._restore, trainer.Trainer._train_step
    report.update(loaded=[], start_step=None, steps_run=0)

    def load_checkpoint(path: Path) -> Any:
        report["loaded"].append(Path(path).name)
        return load(path)

    def _restore(self: trainer.Trainer) -> None:
        restore(self)
        report["start_step"] = self.step

    def _train_step(self: trainer.Trainer, micro_batches: list[Any]) -> Any:
        report["steps_run"] += 1
        return train_step(self, micro_batches)

    trainer.load_checkpoint, trainer.Trainer._restore, trainer.Trainer._train_step = load_checkpoint, _restore, _train_step


# ---------------------------------------------------------------- the fork server


def serve_forks() -> None:
    """Read one JSON request per line on stdin, run it in a fork, answer on stdout.

    A request: {"args": [...], "kill": name or null, "kill_after_lines": n or null, "metrics": path,
    "stdout": path, "stderr": path, "report": path, "timeout": s}. With `kill_after_lines` this
    process SIGKILLs the child once the metrics file holds that many lines.
    The answer: {"returncode": int, negative for a signal, or null when it ran past its timeout}.
    """
    # torch, transformers, zarr and what the tiny Qwen2 student pulls in lazily: imported once, before any fork.
    import kdpipe.student_train.run  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import transformers.tokenization_utils_base  # noqa: F401
    from kdpipe.cli import main

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request, main)
        deadline = time.monotonic() + request["timeout"]
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            if request["kill_after_lines"] is not None and _lines(Path(request["metrics"])) >= request["kill_after_lines"]:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            returncode = None
        else:
            returncode = os.waitstatus_to_exitcode(done[1])
        print(json.dumps({"returncode": returncode}), flush=True)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _run_child(request: dict[str, Any], main: Callable[[], None]) -> None:
    """`kdpipe ARGS` in this forked child, output to files, killed at `request["kill"]` if given; never returns."""
    code = 1
    report: dict[str, Any] = {}
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        _spy(report)
        if request["kill"] is not None:
            _arm(KILL_POINTS[request["kill"]])
        sys.argv = ["kdpipe", *request["args"]]
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        Path(request["report"]).write_text(json.dumps(report), encoding="utf-8")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Finished(NamedTuple):
    """A forked command's outcome: exit status (negative: the signal), output, and the spy's report."""

    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]


class ForkedTrainer:
    """Runs `kdpipe train-student ARGS` in forks of a server process (see `serve_forks`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.calls = 0
        command = [sys.executable, "-c", "from tests.integration.test_train_faults import serve_forks; serve_forks()"]
        env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny matmuls on a shared machine; every run alike
        self.server = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(
        self, work: Path, out: Path, *extra: object, kill: str | None = None, kill_after_lines: int | None = None
    ) -> Finished:
        self.calls += 1
        files = {name: self.workdir / f"{self.calls}.{name}" for name in ("stdout", "stderr", "report")}
        request = {
            "args": list(map(str, train_args(work, out, *RUN_OPTIONS, *extra))), "kill": kill,
            "kill_after_lines": kill_after_lines, "metrics": str(out / METRICS_FILE), "timeout": 300,
            **{name: str(path) for name, path in files.items()},
        }  # fmt: skip
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        assert answer, f"the fork server died (exit {self.server.poll()})"
        returncode = json.loads(answer)["returncode"]
        assert returncode is not None, f"train-student {out} still running after {request['timeout']} s: it hangs"
        report = json.loads(files["report"].read_text()) if files["report"].is_file() else {}
        return Finished(returncode, files["stdout"].read_text(), files["stderr"].read_text(), report)

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=60)


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """The `work` fixture's prepare-data and cache-teacher single-threaded too: ~3× faster on a loaded 2-core machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def forks(tmp_path_factory) -> Iterator[ForkedTrainer]:
    server = ForkedTrainer(tmp_path_factory.mktemp("train-forks"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forks, work) -> Path:  # noqa: F811  (work: the imported fixture)
    """The run directory of one uninterrupted run."""
    out = tmp_path_factory.mktemp("train-reference") / "run"
    done = forks(work, out)
    assert done.returncode == 0, done.stderr
    assert done.report == {"loaded": [], "start_step": 0, "steps_run": STEPS}
    assert sorted(p.name for p in (out / ckpt.CHECKPOINTS_DIR).iterdir()) == FINAL_CHECKPOINTS
    return out


def listing(run: Path) -> tuple[list[int], list[str]]:
    """Steps of the `step-*` checkpoints, and the names of the other entries, of a run's checkpoints dir."""
    names = sorted(p.name for p in (run / ckpt.CHECKPOINTS_DIR).iterdir())
    return [int(n.removeprefix("step-")) for n in names if n.startswith("step-")], [n for n in names if not n.startswith("step-")]


def metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records without the wall-clock rate; every line must be whole JSON."""
    text = (run / METRICS_FILE).read_text(encoding="utf-8")
    assert text.endswith("\n"), "metrics.jsonl ends in a torn line"
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in text.splitlines()]


def assert_same(got: Any, want: Any) -> None:
    """Nested dicts/lists of tensors and primitives, equal to the bit."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):  # a loaded optimizer's betas come back as a list (torch.distributed.checkpoint)
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def assert_resumes_to_the_reference(
    forks: ForkedTrainer, work: Path, run: Path, reference: Path, resume_from: int  # noqa: F811  (work: a path here)
) -> None:
    """`--resume` loads step `resume_from` only, trains the rest, and the run equals the reference run."""
    done = forks(work, run, "--resume")
    assert done.returncode == 0, done.stderr
    assert done.report == {"loaded": [ckpt.checkpoint_name(resume_from)], "start_step": resume_from, "steps_run": STEPS - resume_from}
    records = metrics(run)
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, STEPS + 1))  # one record per step
    assert records == metrics(reference)
    final, want = run / ckpt.CHECKPOINTS_DIR / FINAL_CHECKPOINTS[-1], reference / ckpt.CHECKPOINTS_DIR / FINAL_CHECKPOINTS[-1]
    got_model, want_model = load_file(final / ckpt.MODEL_FILE), load_file(want / ckpt.MODEL_FILE)
    assert got_model.keys() == want_model.keys() and all(torch.equal(got_model[k], want_model[k]) for k in want_model)
    load_optimizer = lambda path: torch.load(path / ckpt.OPTIMIZER_FILE, weights_only=True)  # noqa: E731
    assert_same(load_optimizer(final), load_optimizer(want))
    # The run directory as the uninterrupted run left it: the last `keep` checkpoints, no leftovers.
    assert listing(run) == listing(reference)


# ---------------------------------------------------------------- kill -9


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_in_a_checkpoint_or_a_metrics_write_then_resume_gives_the_uninterrupted_run(
    tmp_path, forks, work, reference, point  # noqa: F811
):
    expected = KILL_POINTS[point]
    run = tmp_path / "run"
    killed = forks(work, run, kill=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)

    complete, others = listing(run)
    assert complete == expected.complete
    assert [name.startswith(expected.leftover) for name in others] == ([True] if expected.leftover else [])
    if expected.leftover == _CUT:  # the cut save: the files written so far, the last one half-written if torn
        (cut,) = (run / ckpt.CHECKPOINTS_DIR).glob(f"{_CUT}*")
        files = WRITE_ORDER[: expected.cut_files]
        assert sorted(p.name for p in cut.iterdir()) == sorted(files)
        if expected.when == "torn":
            whole = reference / ckpt.CHECKPOINTS_DIR / "step-00000006" / files[-1]
            assert 0 < (cut / files[-1]).stat().st_size < whole.stat().st_size
    lines = (run / METRICS_FILE).read_bytes().split(b"\n")
    assert len(lines) - 1 == expected.logged
    assert (lines[-1] != b"") == (point == "torn-metrics-line")  # a torn last line, or none

    assert_resumes_to_the_reference(forks, work, run, reference, expected.resume_from)


def test_kill_9_from_outside_between_checkpoints_then_resume_gives_the_uninterrupted_run(
    tmp_path, forks, work, reference  # noqa: F811
):
    run = tmp_path / "run"
    killed = forks(work, run, kill_after_lines=EXTERNAL_KILL_AFTER)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    complete, _ = listing(run)
    # Killed at step 5 or a little later: by then the checkpoint of step 4 was complete, that of 7 never.
    assert complete and 4 <= max(complete) < STEPS, complete
    assert_resumes_to_the_reference(forks, work, run, reference, max(complete))
