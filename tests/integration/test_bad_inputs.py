"""Bad input, command by command: one line on stderr, exit 2, no traceback, nothing pre-existing changed.

DESIGN.md: a user mistake or a damaged file ends with a clear one-line error naming the thing
and what to do, never a traceback from deep inside zarr or torch and never a silently wrong
result. Each case below runs the real CLI (`python -m kdpipe ...`) in a child process against
tiny artefacts (a 2-layer teacher, a token store of a few dozen sequences, a cache of its
shards) or a damaged copy of them, and checks:

- exit code 2, exactly one line on stderr, no "Traceback", and the words the line must hold;
- every file that existed before the command (the shared artefacts and everything the case
  set up) has the same bytes after it;
- the paths the case lists as `absent` do not exist (nothing left behind that blocks the
  corrected re-run).

Adding a case: write a function `(ws: Workspace) -> Scenario` that sets up what it needs
under `ws.tmp` (copies of the shared artefacts, damaged as wanted) and returns the command's
arguments and the words its error must name, then list it in `CASES`. Commands that need a
trained run or a Slurm config add an artefact to `Artifacts` the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.run_dir import latest_checkpoint
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.callbacks import Callback
from kdpipe.student_train.run import train_student
from kdpipe.student_train.trainer import Trainer
from kdpipe.teacher_cache.run import cache_teacher
from tests.unit.pipeline.test_status import write_run_dir
from tests.unit.teacher_cache.test_run import build_token_store

# The cache's shape; `CACHE_FLAGS` are the same options on the command line (a re-run resumes it).
CACHE_OPTIONS = dict(sequences_per_shard=8, sequences_per_chunk=4, batch_size=4, snapshot_layers="none")
CACHE_FLAGS = ("--sequences-per-shard", "8", "--sequences-per-chunk", "4", "--batch-size", "4", "--snapshot-layers", "none")
TOKEN_CHUNK = "train/tokens/c/0/0"  # the store holds fewer than 256 train sequences: one chunk


@dataclass(frozen=True)
class Artifacts:
    """Good artefacts, built once per module; cases damage copies, never these."""

    teacher: Path
    corpus: Path
    store: Path
    cache: Path
    run: Path  # a run directory as `kdpipe report` reads it (metrics.jsonl, config.yaml)


@dataclass
class Workspace:
    """What a case may use: the shared artefacts and a private directory."""

    art: Artifacts
    tmp: Path
    _mounts: list[Path] = field(default_factory=list)

    def copy(self, source: Path, name: str) -> Path:
        """A private copy of a directory (shared artefacts stay whole)."""
        return Path(shutil.copytree(source, self.tmp / name))

    def read_only_dir(self) -> Path:
        """An existing directory this process cannot write into: a read-only tmpfs as root, mode 0555 otherwise."""
        path = self.tmp / "read-only"
        path.mkdir()
        if os.geteuid() == 0:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
            if mounted.returncode != 0:
                pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
            self._mounts.append(path)
        else:
            path.chmod(0o555)
        return path

    def cleanup(self) -> None:
        for path in self._mounts:
            subprocess.run(["umount", str(path)], check=True)
        for path in self.tmp.rglob("*"):
            if path.is_dir() and not os.access(path, os.W_OK):
                path.chmod(0o755)


@dataclass(frozen=True)
class Scenario:
    """A command to run and what its one-line error must say."""

    args: list[str | Path]
    needles: tuple[str | Path, ...]
    absent: tuple[Path, ...] = ()


def flip_bit(path: Path, offset: int | None = None) -> None:
    """Flip the lowest bit of one byte (the middle one by default)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 1
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def cache_args(ws: Workspace, *extra: str | Path, teacher: Path | None = None, tokens: Path | None = None, out: Path | None = None) -> list[str | Path]:
    return [
        "cache-teacher", "--teacher", teacher or ws.art.teacher, "--tokens", tokens or ws.art.store,
        "--out", out or ws.tmp / "cache", *CACHE_FLAGS, *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- prepare-data


def prepare_missing_input(ws: Workspace) -> Scenario:
    out = ws.tmp / "store"
    missing = ws.tmp / "nope.txt"
    return Scenario(["prepare-data", missing, "--tokenizer", ws.art.teacher, "--out", out, "--seq-len", "16"], (missing,), (out,))


def prepare_wrong_text_field(ws: Workspace) -> Scenario:
    corpus = ws.tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    out = ws.tmp / "store"
    args = ["prepare-data", corpus, "--tokenizer", ws.art.teacher, "--out", out, "--seq-len", "16", "--text-field", "text"]
    return Scenario(args, (corpus, "text"), (out,))


def prepare_read_only_out(ws: Workspace) -> Scenario:
    read_only = ws.read_only_dir()
    out = read_only / "store"
    args = ["prepare-data", ws.art.corpus, "--tokenizer", ws.art.teacher, "--out", out, "--seq-len", "16"]
    return Scenario(args, (out, "cannot write into", read_only), (out,))


def prepare_out_is_a_file(ws: Workspace) -> Scenario:
    out = ws.tmp / "store"
    out.write_text("not a store\n")
    return Scenario(["prepare-data", ws.art.corpus, "--tokenizer", ws.art.teacher, "--out", out, "--seq-len", "16"], (out,))


def prepare_over_a_damaged_store(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    truncate(store / TOKEN_CHUNK)
    args = ["prepare-data", ws.art.corpus, "--tokenizer", ws.art.teacher, "--out", store, "--seq-len", "16", "--val-fraction", "0.3"]
    return Scenario(args, (store, TOKEN_CHUNK, "--overwrite"))


# ---------------------------------------------------------------- cache-teacher


def cache_flipped_token_bit(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    flip_bit(store / TOKEN_CHUNK)
    return Scenario(cache_args(ws, tokens=store), (store, TOKEN_CHUNK, "fails its checksum", "prepare-data", "--overwrite"))


def cache_truncated_token_chunk_dry_run(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    truncate(store / TOKEN_CHUNK)
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--dry-run", tokens=store), (store, TOKEN_CHUNK, "truncated", "--overwrite"), (out,))


def cache_truncated_token_chunk(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    truncate(store / TOKEN_CHUNK)
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, tokens=store), (store, TOKEN_CHUNK, "truncated", "--overwrite"), (out,))


def cache_top_k_above_vocab_dry_run(ws: Workspace) -> Scenario:
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--mode", "top-k", "--top-k", "100000", "--dry-run"), ("--top-k 100000", "300"), (out,))


def cache_top_k_above_vocab(ws: Workspace) -> Scenario:
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--mode", "top-k", "--top-k", "100000"), ("--top-k 100000", "300"), (out,))


def cache_infinite_temperature(ws: Workspace) -> Scenario:
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--temperature", "inf"), ("temperature=inf", "finite"), (out,))


def cache_nan_temperature(ws: Workspace) -> Scenario:
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--temperature", "nan"), ("temperature=nan",), (out,))


def cache_truncated_safetensors(ws: Workspace) -> Scenario:
    teacher = ws.copy(ws.art.teacher, "teacher")
    truncate(teacher / "model.safetensors")
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, "--dry-run", teacher=teacher), (teacher / "model.safetensors", "truncated"), (out,))


def cache_garbage_safetensors(ws: Workspace) -> Scenario:
    teacher = ws.copy(ws.art.teacher, "teacher")
    weights = teacher / "model.safetensors"
    weights.write_bytes(b"\x00" * 3 + weights.read_bytes()[3:])  # the header length becomes implausible
    out = ws.tmp / "cache"
    return Scenario(cache_args(ws, teacher=teacher), (weights, "damaged"), (out,))


def cache_read_only_out(ws: Workspace) -> Scenario:
    read_only = ws.read_only_dir()
    out = read_only / "cache"
    return Scenario(cache_args(ws, out=out), (out, "cannot write into", read_only), (out,))


def cache_missing_teacher(ws: Workspace) -> Scenario:
    teacher, out = ws.tmp / "no-teacher", ws.tmp / "cache"
    return Scenario(cache_args(ws, teacher=teacher), (teacher, "does not exist"), (out,))


def cache_of_another_config_at_out(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    return Scenario(cache_args(ws, "--seed", "7", out=cache), (cache, "another teacher/config", "sampler"))


def cache_missing_token_store(ws: Workspace) -> Scenario:
    store, out = ws.tmp / "no-store", ws.tmp / "cache"
    return Scenario(cache_args(ws, tokens=store), (store, "prepare-data"), (out,))


# ---------------------------------------------------------------- verify / inspect


def verify_token_store_flipped_bit(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    flip_bit(store / TOKEN_CHUNK)
    return Scenario(["verify", store], (store, TOKEN_CHUNK, "fails its checksum", "--overwrite"))


def verify_token_store_flipped_document_bit(ws: Workspace) -> Scenario:
    store = ws.copy(ws.art.store, "store")
    flip_bit(store / "documents-train.arrow")
    return Scenario(["verify", store], (store, "documents-train.arrow", "fails its checksum"))


def verify_cache_flipped_bit(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    flip_bit(cf.shard_dir(cache, "train", 1) / "entries" / "c" / "0" / "0")
    return Scenario(["verify", cache], ("train/00001", "fails its checksum", "--repair"))


def verify_not_a_cache(ws: Workspace) -> Scenario:
    return Scenario(["verify", ws.art.corpus], (ws.art.corpus, "not a teacher cache"))


def inspect_deleted_data_file(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    (cf.shard_dir(cache, "train", 0) / "entries" / "c" / "0" / "0").unlink()
    return Scenario(["inspect", cache], ("train/00000", "damaged", "entries/c/0/0 is missing", "--repair"))


def inspect_emptied_data_file(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    (cf.shard_dir(cache, "train", 0) / "tokens" / "c" / "0" / "0").write_bytes(b"")
    return Scenario(["inspect", cache], ("train/00000", "damaged", "is empty"))


def inspect_truncated_data_file(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    truncate(cf.shard_dir(cache, "train", 0) / "entries" / "c" / "0" / "0")
    return Scenario(["inspect", cache], ("train/00000", "damaged", "entries/c/0/0 has", "were written", "--repair"))


def status_check_truncated_data_file(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    truncate(cf.shard_dir(cache, "val", 0) / "tokens" / "c" / "0" / "0")
    return Scenario(["status", cache, "--check"], ("val/00000", "tokens/c/0/0 has", "were written"))


def inspect_manifest_cut_off(ws: Workspace) -> Scenario:
    cache = ws.copy(ws.art.cache, "cache")
    truncate(cache / cf.MANIFEST_FILE, keep=0.3)
    return Scenario(["inspect", cache], (cache / cf.MANIFEST_FILE, "not valid JSON", "ends early", "truncated"))


# ---------------------------------------------------------------- slurm


def slurm_signal_not_before_time_limit(ws: Workspace) -> Scenario:
    args = ["slurm", "train-student", "--procs-per-node", "1", "--time", "0:10:00", "--signal-seconds", "3600", "--",
            "--cache", ws.art.cache, "--out", ws.tmp / "run"]  # fmt: skip
    return Scenario(args, ("signal_seconds=3600", "time='0:10:00'", "600 s", "requeue"), (ws.tmp / "run",))


# ---------------------------------------------------------------- report


def report_out_is_a_file(ws: Workspace) -> Scenario:
    out = ws.tmp / "report.md"
    out.write_text("an earlier report\n")
    return Scenario(["report", ws.art.run, "--out", out], (out, "is a file"))


def report_read_only_out(ws: Workspace) -> Scenario:
    read_only = ws.read_only_dir()
    out = read_only / "report"
    return Scenario(["report", ws.art.run, "--out", out], (out, "cannot write into"), (out,))


def report_binary_metrics(ws: Workspace) -> Scenario:
    run = ws.copy(ws.art.run, "run")
    (run / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    out = ws.tmp / "report"
    return Scenario(["report", run, "--out", out], (run / "metrics.jsonl", "not UTF-8"), (out,))


def report_non_numeric_metrics(ws: Workspace) -> Scenario:
    run = ws.copy(ws.art.run, "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": "many", "loss/lm": 2.0}\n{"step": 2}\n', encoding="utf-8")
    out = ws.tmp / "report"
    return Scenario(["report", run, "--out", out], (run / "metrics.jsonl", "line 1", "not a number"), (out,))


def report_not_a_run(ws: Workspace) -> Scenario:
    out = ws.tmp / "report"
    return Scenario(["report", ws.art.corpus, "--out", out], (ws.art.corpus, "metrics.jsonl"), (out,))


# ---------------------------------------------------------------- train-student


def train_not_a_cache(ws: Workspace) -> Scenario:
    out = ws.tmp / "run"
    return Scenario(["train-student", "--cache", ws.art.store, "--out", out, "--steps", "1", "--hidden-size", "32"], (ws.art.store,), (out,))


def train_infinite_lr(ws: Workspace) -> Scenario:
    out = ws.tmp / "run"
    args = ["train-student", "--cache", ws.art.cache, "--out", out, "--steps", "1", "--hidden-size", "32", "--lr", "inf"]
    return Scenario(args, ("lr=inf", "finite"), (out,))


def status_check_truncated_only_checkpoint(ws: Workspace) -> Scenario:
    run = write_run_dir(ws.tmp / "run", 3, checkpoint_steps=(3,))
    truncate(run / "checkpoints" / "step-00000003" / "model.safetensors")
    return Scenario(["status", run, "--check"], (run, "damaged checkpoint", "step-00000003", "model.safetensors"))


def train_read_only_out(ws: Workspace) -> Scenario:
    read_only = ws.read_only_dir()
    out = read_only / "run"
    args = ["train-student", "--cache", ws.art.cache, "--out", out, "--steps", "1", "--hidden-size", "32", "--num-workers", "0"]
    return Scenario(args, (out, "cannot write into", read_only), (out,))


def demo_read_only_out(ws: Workspace) -> Scenario:
    read_only = ws.read_only_dir()
    out = read_only / "demo"
    return Scenario(["demo", "--out", out], (out, "cannot write into", read_only), (out,))


CASES: dict[str, Callable[[Workspace], Scenario]] = {
    case.__name__: case
    for case in (
        prepare_missing_input,
        prepare_wrong_text_field,
        prepare_read_only_out,
        prepare_out_is_a_file,
        prepare_over_a_damaged_store,
        cache_flipped_token_bit,
        cache_truncated_token_chunk_dry_run,
        cache_truncated_token_chunk,
        cache_top_k_above_vocab_dry_run,
        cache_top_k_above_vocab,
        cache_infinite_temperature,
        cache_nan_temperature,
        cache_truncated_safetensors,
        cache_garbage_safetensors,
        cache_read_only_out,
        cache_missing_teacher,
        cache_of_another_config_at_out,
        cache_missing_token_store,
        verify_token_store_flipped_bit,
        verify_token_store_flipped_document_bit,
        verify_cache_flipped_bit,
        verify_not_a_cache,
        inspect_deleted_data_file,
        inspect_emptied_data_file,
        inspect_truncated_data_file,
        status_check_truncated_data_file,
        inspect_manifest_cut_off,
        slurm_signal_not_before_time_limit,
        report_out_is_a_file,
        report_read_only_out,
        report_binary_metrics,
        report_non_numeric_metrics,
        report_not_a_run,
        train_not_a_cache,
        train_read_only_out,
        demo_read_only_out,
        train_infinite_lr,
        status_check_truncated_only_checkpoint,
    )
}


# ---------------------------------------------------------------- harness


def kdpipe(*args: str | Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny matmuls on a shared machine
    return subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def file_hashes(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under the roots (a root may be a file)."""
    hashes = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory, tiny_teacher) -> Artifacts:
    teacher = tiny_teacher("llama").path
    root = tmp_path_factory.mktemp("bad-inputs")
    store = build_token_store(root, teacher)  # 16-token sequences, train and val
    cache = root / "cache"
    cache_teacher(CacheTeacherConfig(teacher=teacher, tokens=store, out=cache, **CACHE_OPTIONS), console=Console(file=io.StringIO()))
    run = root / "run"
    run.mkdir()
    records = [{"step": s, "tokens": 64 * s, "loss/lm": 5.0 - s, "lr": 1e-3, "tokens_per_s": 100.0} for s in (1, 2)]
    records.append({"step": 2, "tokens": 128, "eval/lm_loss": 3.5, "eval/kl": 0.5, "eval/ece": 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run / "config.yaml").write_text(f"cache: {cache}\n", encoding="utf-8")
    return Artifacts(teacher=teacher, corpus=root / "corpus", store=store, cache=cache, run=run)


@pytest.fixture
def ws(art: Artifacts, tmp_path: Path) -> Iterator[Workspace]:
    workspace = Workspace(art=art, tmp=tmp_path)
    yield workspace
    workspace.cleanup()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, ws: Workspace) -> None:
    scenario = CASES[case](ws)
    shared = (ws.art.teacher, ws.art.corpus, ws.art.store, ws.art.cache, ws.art.run)
    before = file_hashes(*shared, ws.tmp)
    result = kdpipe(*scenario.args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in scenario.needles:
        assert str(needle) in lines[0], (needle, lines[0])
    after = file_hashes(*shared, ws.tmp)
    changed = sorted(str(path) for path, digest in before.items() if after.get(path) != digest)
    assert not changed, f"changed or removed by the failed command: {changed}"
    left = [str(path) for path in scenario.absent if path.exists()]
    assert not left, f"left behind by the failed command: {left}"


# ---------------------------------------------------------------- not errors, but part of the same fixes


def test_repair_dry_run_lists_the_shard_repair_would_redo(ws: Workspace) -> None:
    cache = ws.copy(ws.art.cache, "cache")
    flip_bit(cf.shard_dir(cache, "train", 1) / "entries" / "c" / "0" / "0")
    before = file_hashes(cache)
    result = kdpipe(*cache_args(ws, "--repair", "--dry-run", out=cache))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # undo the console's wrapping
    num_shards = sum(1 for split in ("train", "val") for _ in cf.shards_root(cache, split).iterdir())
    assert f"takes {num_shards}, 1 to write (1 of them redone by --repair)" in text, text
    assert "1 complete shards fail verification and will be redone: train/00001 (file entries/c/0/0 fails its checksum)" in text
    assert file_hashes(cache) == before


def test_token_store_without_checksums_opens_with_a_note(ws: Workspace) -> None:
    store = ws.copy(ws.art.store, "store")
    manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"]  # as written before checksums were recorded
    (store / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    plan = kdpipe(*cache_args(ws, "--dry-run", tokens=store))
    assert plan.returncode == 0, plan.stderr
    assert "records no checksums" in " ".join(plan.stdout.split())
    verify = kdpipe("verify", store)
    assert verify.returncode == 0, verify.stderr
    assert "records no checksums" in " ".join(verify.stdout.split())


def test_verify_a_good_token_store(art: Artifacts) -> None:
    result = kdpipe("verify", art.store)
    assert result.returncode == 0, result.stderr
    num_files = len(json.loads((art.store / "manifest.json").read_text(encoding="utf-8"))["files"])
    assert f"token store {art.store}: {num_files} files ok" in " ".join(result.stdout.split())


def test_shard_records_without_sizes_still_open(ws: Workspace) -> None:
    cache = ws.copy(ws.art.cache, "cache")
    for record_path in cache.rglob(cf.COMPLETE_FILE):  # as written before sizes were recorded
        record = json.loads(record_path.read_text(encoding="utf-8"))
        del record["sizes"]
        record_path.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    result = kdpipe("inspect", cache)
    assert result.returncode == 0, result.stderr
    assert kdpipe("verify", cache).returncode == 0


def _strict_json(line: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"metrics line holds {token}, which is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


def test_divergence_is_one_line_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(ws: Workspace) -> None:
    run = ws.tmp / "run"
    base = ["train-student", "--cache", ws.art.cache, "--out", run, "--steps", "8", "--hidden-size", "32", "--num-workers", "0", "--lrc-init", "random", "--log-every", "1"]

    class StopAt(Callback):  # what SIGTERM does, at a known step
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 2:
                trainer.request_stop("the test")

    config = TrainStudentConfig(cache=ws.art.cache, out=run, steps=8, hidden_size=32, num_workers=0, lrc_init="random", log_every=1)
    assert train_student(config, callbacks=[StopAt()]).preempted
    assert latest_checkpoint(run).name == "step-00000002"

    diverged = kdpipe(*base, "--resume", "--lr", "1e30", "--grad-clip", "0", "--checkpoint-every", "1")
    assert diverged.returncode == 2, diverged.stderr
    assert "Traceback" not in diverged.stderr, diverged.stderr
    lines = diverged.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged at step" in lines[0], diverged.stderr
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = records[-1]
    assert last["type"] == "train" and (last["loss"] is None or last["grad_norm"] is None), last
    step = last["step"]
    # The checkpoint the diverged step started from is set aside; the one before it is the run's latest.
    kept = latest_checkpoint(run)
    assert kept is not None and kept.name in lines[0] and int(kept.name.split("-")[1]) < step - 1
    assert not (run / "checkpoints" / f"step-{step - 1:08d}").exists()

    assert kdpipe(*base, "--resume").returncode == 0
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in train)
    assert latest_checkpoint(run).name == "step-00000008"
