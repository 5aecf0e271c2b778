"""`kdpipe cache-teacher` under faults: kill -9 at every step that completes a shard, and a full disk.

DESIGN.md: a crash leaves complete shards intact and the next run resumes. Here a re-run of
the same command must give, byte for byte, the cache of an uninterrupted run, and
`kdpipe verify` must pass.

The steps of a run (run.py, writer.py) and where the kill points cut them:

  write_manifest  tmp file, os.link to manifest.json                "manifest": before the link
  _write_config   tmp file, os.replace to config.yaml               "config": before the replace
  then per shard, in its private dir shards/{split}/.tmp-{index}-{pid}-{rand}/ (train/00001 here):
  append          zarr writes a chunk to *.partial, os.replace      "chunk": before the first data chunk lands
                  to its name (on the writer thread)
  finalize        last chunks, then complete.json (checksums)       "record": before it, "torn-record": half of it
  rename          os.rename to shards/{split}/{index}: complete     "rename": before it, "after-rename": just after

No hook in kdpipe: the command runs in a child process that wraps the os/pathlib function of
the step and SIGKILLs itself in the chosen call. Re-runs, `verify` and the reference run are
the plain CLI. Every command runs in a fork of one process that has imported kdpipe, torch
and transformers once (~10 s on the shared test machine).

The full-disk test mounts a tmpfs too small for the cache (root only; skipped where mount is
refused): the command must stop with one line and exit 2, leave only whole complete shards,
and resume once the file system has room.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.token_store import TokenStore
from kdpipe.teacher_cache import open_cache, verify_cache
from tests.integration.test_cache_cli import SMALL_SHARDS, assert_one_line_error, teacher  # noqa: F401  (teacher: fixture)
from tests.unit.teacher_cache.test_run import write_corpus

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
NUM_SEQUENCES = 19  # 4 documents of the test corpus, all train: 3 shards of 8, 8 and 3 sequences
CACHE_ARGS = ("--snapshot-layers", "all", "--snapshot-fraction", "0.25", *SMALL_SHARDS)
NUM_SHARDS = 3
KILLED_SHARD = ("train", 1)  # train/00000 is complete by then, train/00002 not begun
PAGE = 4096  # tmpfs counts whole pages per file


# ---------------------------------------------------------------- kill points (run in the child)


def _tmp_shard_dir_of(path: Any, shard: tuple[str, int]) -> Path | None:
    """The in-progress dir of `shard` that `path` is or lies in, or None."""
    split, index = shard
    for candidate in (Path(path), *Path(path).parents):
        if candidate.parent.name == split and cf.tmp_shard_index(candidate.name) == index:
            return candidate
    return None




class KillPoint(NamedTuple):
    """Where the child SIGKILLs itself: in the first call of `owner.function` that `hit` accepts."""

    owner: Any  # the os module or pathlib.Path
    function: str
    hit: Callable[..., bool]  # the call's first two positional arguments -> whether this is the call
    when: str  # "before" the call, "after" it, or "half": with half the text written (write_text)
    complete: set[tuple[str, int]] | None  # shards complete after the kill; None: no manifest yet
    cut: str | None  # what is left of KILLED_SHARD's tmp dir: None (none), "no record", "torn record", "record"
    leftover: str | None  # the top-level tmp file the kill leaves for good (see the test)


def _is_data_chunk(src: Any, dst: Any) -> bool:
    """zarr moving a written chunk (not metadata) into place inside the killed shard's tmp dir."""
    tmp_dir = _tmp_shard_dir_of(dst, KILLED_SHARD)
    return str(src).endswith(".partial") and tmp_dir is not None and "c" in Path(dst).relative_to(tmp_dir).parts


def _is_record(path: Path, text: str) -> bool:
    return path.name == cf.COMPLETE_FILE and _tmp_shard_dir_of(path, KILLED_SHARD) is not None


def _is_move_into_place(src: Any, dst: Any) -> bool:
    return _tmp_shard_dir_of(src, KILLED_SHARD) == Path(src)


_SHARD_0 = {("train", 0)}
KILL_POINTS = {
    "manifest": KillPoint(os, "link", lambda src, dst: Path(dst).name == cf.MANIFEST_FILE, "before", None, None, cf.MANIFEST_FILE),
    "config": KillPoint(os, "replace", lambda src, dst: Path(dst).name == cf.CONFIG_FILE, "before", set(), None, cf.CONFIG_FILE),
    "chunk": KillPoint(os, "replace", _is_data_chunk, "before", _SHARD_0, "no record", None),
    "record": KillPoint(pathlib.Path, "write_text", _is_record, "before", _SHARD_0, "no record", None),
    "torn-record": KillPoint(pathlib.Path, "write_text", _is_record, "half", _SHARD_0, "torn record", None),
    "rename": KillPoint(os, "rename", _is_move_into_place, "before", _SHARD_0, "record", None),
    "after-rename": KillPoint(os, "rename", _is_move_into_place, "after", _SHARD_0 | {KILLED_SHARD}, None, None),
}


def _arm(point: KillPoint) -> None:
    """Replace `point.owner.function` by a wrapper that kills this process at the chosen call."""
    real = getattr(point.owner, point.function)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not point.hit(*args[:2]):
            return real(*args, **kwargs)
        if point.when == "half":
            path, text = args[0], args[1]
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text[: len(text) // 2])
        elif point.when == "after":
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL sent to self")

    setattr(point.owner, point.function, wrapper)


# ---------------------------------------------------------------- the fork server


def serve_forks() -> None:
    """Read one JSON request per line on stdin, run it in a fork, answer its exit status on stdout.

    A request: {"args": [...], "kill": name or null, "stdout": path, "stderr": path, "timeout": s}.
    The answer: {"returncode": int, negative for a signal, or null when it ran past its timeout}.
    Nothing runs in this process itself: forking after torch or numba have run parallel code
    (OpenMP) can deadlock the child.
    """
    import kdpipe.teacher_cache.inspect
    import kdpipe.teacher_cache.run  # noqa: F401  (torch, transformers, zarr, numba: imported once, before any fork)
    from kdpipe.cli import main

    for line in sys.stdin:
        print(json.dumps({"returncode": _run_in_fork(json.loads(line), main)}), flush=True)


def _redirect(request: dict[str, Any]) -> None:
    """Point file descriptors 1 and 2 at the request's output files."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)


def _kdpipe_exit_code(main: Callable[[], None], args: list[str]) -> int:
    """`kdpipe ARGS` through the CLI's entry point; its exit status (1 and a traceback on stderr for a crash)."""
    sys.argv = ["kdpipe", *args]
    try:
        main()
        return 0
    except SystemExit as exit:
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _run_in_fork(request: dict[str, Any], main: Callable[[], None]) -> int | None:
    """The command in a forked child, killed at `request["kill"]` if given; None if it ran past its timeout."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            _redirect(request)
            if request["kill"] is not None:
                _arm(KILL_POINTS[request["kill"]])
            code = _kdpipe_exit_code(main, request["args"])
        finally:
            os._exit(code)
    deadline = time.monotonic() + request["timeout"]
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(done[1])


class ForkedKdpipe:
    """Runs `kdpipe ARGS` in forks of a server process (see `serve_forks`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.calls = 0
        command = [sys.executable, "-c", "from tests.integration.test_cache_faults import serve_forks; serve_forks()"]
        # One thread for tiny matmuls on a shared machine; no tokenizers thread pool to warn about after a fork.
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.server = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, *args: object, kill: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        """`kdpipe ARGS`, killed at the kill point named `kill` if given."""
        self.calls += 1
        stdout, stderr = self.workdir / f"{self.calls}.out", self.workdir / f"{self.calls}.err"
        request = dict(args=list(map(str, args)), kill=kill, stdout=str(stdout), stderr=str(stderr), timeout=timeout)
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        assert answer, f"the fork server died (exit {self.server.poll()})"
        returncode = json.loads(answer)["returncode"]
        assert returncode is not None, f"kdpipe {' '.join(map(str, args))} still running after {timeout} s: it hangs"
        return subprocess.CompletedProcess(args, returncode, stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def kdpipe(tmp_path_factory) -> Iterator[ForkedKdpipe]:
    forks = ForkedKdpipe(tmp_path_factory.mktemp("forks"))
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher) -> Path:  # noqa: F811  (teacher: the imported fixture)
    """A small token store: every command computes its few sequences in about a second."""
    root = tmp_path_factory.mktemp("faults-store")
    corpus = write_corpus(root / "corpus", num_documents=4)
    prepare_data(PrepareDataConfig(inputs=[str(corpus)], tokenizer=teacher, out=root / "store", seq_len=SEQ_LEN, val_fraction=0.0))
    assert TokenStore.open(root / "store").split("train").num_sequences == NUM_SEQUENCES
    return root / "store"


def cache_teacher(kdpipe: ForkedKdpipe, teacher: Path, store: Path, out: Path, **how: Any) -> subprocess.CompletedProcess:
    return kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", out, *CACHE_ARGS, **how)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, kdpipe, teacher, store) -> Path:  # noqa: F811
    """The cache of one uninterrupted run."""
    out = tmp_path_factory.mktemp("faults-reference") / "cache"
    result = cache_teacher(kdpipe, teacher, store, out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {NUM_SHARDS} shards" in result.stdout, result.stdout
    return out


def cache_files(out: Path) -> dict[str, bytes]:
    """Every file of a cache by relative path; config.yaml's absolute --out path made relative."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if cf.CONFIG_FILE in files:
        files[cf.CONFIG_FILE] = files[cf.CONFIG_FILE].replace(str(out.resolve()).encode(), b"<out>")
    return files


def assert_resumes_to_the_reference(
    kdpipe: ForkedKdpipe, teacher: Path, store: Path, out: Path, reference: Path, complete: int, leftover: str | None = None
) -> None:  # fmt: skip
    """Re-run the plain command: it skips the `complete` shards, writes the rest, and the cache equals the reference.

    `leftover`: a top-level tmp file a kill left, which must stay the only extra file.
    """
    again = cache_teacher(kdpipe, teacher, store, out)
    assert again.returncode == 0, again.stderr
    assert f"wrote {NUM_SHARDS - complete} shards to {out} and skipped {complete} already complete" in again.stdout, again.stdout
    files = cache_files(out)
    extra = sorted(name for name in files if name.startswith(cf.TMP_PREFIX))
    assert extra == ([leftover] if leftover else [])
    assert {name: data for name, data in files.items() if name not in extra} == cache_files(reference)
    verify = kdpipe("verify", out)
    assert verify.returncode == 0, verify.stderr
    assert f"{NUM_SHARDS} shards: {NUM_SHARDS} ok, 0 bad, 0 partial, 0 missing" in verify.stdout, verify.stdout


# ---------------------------------------------------------------- kill -9


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_rerun_gives_the_uninterrupted_cache(tmp_path, kdpipe, teacher, store, reference, point):  # noqa: F811
    expected = KILL_POINTS[point]
    out = tmp_path / "cache"
    killed = cache_teacher(kdpipe, teacher, store, out, kill=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)

    # What the kill left: the shards completed before it, whole; the cut one at most as a tmp dir.
    if expected.complete is None:
        assert not (out / cf.MANIFEST_FILE).exists()
    else:
        cache = open_cache(out)
        assert {key for key in cache.manifest.global_shards() if key not in cache.missing_shards()} == expected.complete
        verdicts = {(v.split, v.index): v.status for v in verify_cache(out).shards}
        assert {key for key, status in verdicts.items() if status == "ok"} == expected.complete
        assert "bad" not in verdicts.values()
        for split, index in expected.complete:
            shard = cache.open_shard(split, index)
            shard.read(0, shard.num_sequences)
    root = cf.shards_root(out, KILLED_SHARD[0])
    cut = sorted(root.glob(f"{cf.TMP_PREFIX}*")) if root.is_dir() else []
    assert len(cut) == (expected.cut is not None), cut
    if expected.cut is not None:
        assert verdicts[KILLED_SHARD] == "partial"
        with pytest.raises(KdpipeError, match="is not complete"):
            cache.open_shard(*KILLED_SHARD)
        record = cut[0] / cf.COMPLETE_FILE
        assert record.exists() == (expected.cut != "no record")
        if expected.cut == "torn record":
            with pytest.raises(json.JSONDecodeError):
                json.loads(record.read_text())
    # A kill between a top-level tmp file's write and its link/replace leaves that file for good:
    # no later run may delete such a file, which could be another array task's, mid-write.
    # Readers and the out-dir check ignore `.tmp-*` names.
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(cf.TMP_PREFIX)]
    assert [name.removeprefix(cf.TMP_PREFIX).split("-")[0] for name in leftovers] == ([expected.leftover] if expected.leftover else [])

    complete = len(expected.complete or ())
    assert_resumes_to_the_reference(kdpipe, teacher, store, out, reference, complete, leftover=leftovers[0] if leftovers else None)


# ---------------------------------------------------------------- full disk


@contextmanager
def tmpfs(directory: Path, size: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of `size` bytes at `directory`; yields a function that resizes it (content kept)."""
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs, which needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the full-disk test needs mount permission")

    def resize(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(directory)], check=True, capture_output=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True)


def tmpfs_bytes(directory: Path) -> int:
    """What a directory takes on a tmpfs: whole pages per file."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in directory.rglob("*") if p.is_file())


# Room on the tmpfs for the cache, and where the disk filled up when this was written (it moves
# if compressed sizes change; the checks hold wherever it is). A share is of the pages the
# whole cache takes.
ROOMS = [
    pytest.param("none", id="manifest-write"),  # a filler file takes the only page
    pytest.param("one page", id="config-write"),  # manifest.json takes it
    pytest.param(0.45, id="second-shard-metadata"),  # main thread, creating the shard's arrays
    pytest.param(0.6, id="second-shard-writer-thread"),  # the writer thread, appending a batch
]


@pytest.mark.parametrize("room", ROOMS)
def test_full_disk_fails_in_one_line_then_resumes(tmp_path, kdpipe, teacher, store, reference, room):  # noqa: F811
    size = int(tmpfs_bytes(reference) * room) // PAGE * PAGE if isinstance(room, float) else PAGE
    disk = tmp_path / "disk"
    with tmpfs(disk, size) as resize:
        filler = disk / "filler"
        if room == "none":
            filler.write_bytes(bytes(PAGE))
        out = disk / "cache"
        full = cache_teacher(kdpipe, teacher, store, out, timeout=120)  # the writer thread's error must not hang the run
        assert_one_line_error(full, "out of disk space", str(out), "shards still to write", "re-run the same command")
        # Nothing unfinished is left (the writers removed their tmp files and dirs)...
        assert [p.name for p in out.rglob("*") if p.name.startswith(cf.TMP_PREFIX) or p.name.endswith(".partial")] == []
        assert (out / cf.MANIFEST_FILE).exists() == (room != "none")
        assert (out / cf.CONFIG_FILE).exists() == isinstance(room, float)
        complete: list[tuple[str, int]] = []
        if room != "none":  # ...and the complete shards are whole: verified, readable, the reference's bytes
            report = verify_cache(out)
            assert report.bad == [] and report.count("partial") == 0
            complete = [(v.split, v.index) for v in report.shards if v.status == "ok"]
            assert len(complete) < NUM_SHARDS, report.summary()
            cache = open_cache(out)
            for split, index in cache.manifest.global_shards():
                if (split, index) in complete:
                    shard = cache.open_shard(split, index)
                    shard.read(0, shard.num_sequences)
                    prefix = cf.shard_dir(out, split, index).relative_to(out).as_posix() + "/"
                    assert {k: v for k, v in cache_files(out).items() if k.startswith(prefix)} == {
                        k: v for k, v in cache_files(reference).items() if k.startswith(prefix)
                    }
                else:
                    with pytest.raises(KdpipeError, match="is not complete"):
                        cache.open_shard(split, index)

        filler.unlink(missing_ok=True)
        resize(2 * tmpfs_bytes(reference) + 64 * PAGE)
        assert_resumes_to_the_reference(kdpipe, teacher, store, out, reference, len(complete))
