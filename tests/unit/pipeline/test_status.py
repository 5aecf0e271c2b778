"""`kdpipe status` (kdpipe.pipeline.status) on real caches and run directories: progress, damage, bad paths.

Caches are written by the real shard writer from synthetic content (no teacher); run
directories get real checkpoints from `save_checkpoint`, a run manifest with the format
train-student writes, and a metrics.jsonl whose last line was torn by a crash.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.status import CacheStatus, RunStatus, cache_status, run_status, status
from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    RUN_FORMAT,
    RUN_MANIFEST,
    TRAINER_STATE_FILE,
    checkpoint_damage,
)
from kdpipe.student_train.checkpoint import save_checkpoint
from tests.unit.teacher_cache.test_store import make_manifest, write_cache

ALL_SHARDS = ["train/00000", "train/00001", "train/00002", "val/00000"]  # make_manifest: 20 train + 5 val, 8 per shard


@pytest.fixture
def cache(tmp_path) -> Path:
    out = tmp_path / "cache"
    write_cache(out, make_manifest())
    return out


def damage(cache: Path) -> None:
    """train/00001 never written, val/00000 interrupted (only its tmp dir), one chunk of train/00002 flipped."""
    shutil.rmtree(cf.shard_dir(cache, "train", 1))
    cf.shard_dir(cache, "val", 0).rename(cf.new_tmp_shard_dir(cache, "val", 0))
    chunk = cf.shard_dir(cache, "train", 2) / cf.ENTRIES / "c" / "0" / "0"
    flipped = bytearray(chunk.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    chunk.write_bytes(bytes(flipped))


def test_complete_cache(cache):
    for verify in (False, True):
        result = status(cache, verify=verify)
        assert isinstance(result, CacheStatus)
        assert (result.num_shards, result.complete, result.missing) == (4, ALL_SHARDS, [])
        assert result.bad == []
        assert result.problem() is None
    assert status(cache).text() == f"cache {cache}: 4 shards: 4 complete, 0 missing, bad: 0 (file sizes checked; checksums with --verify)"
    assert status(cache, verify=True).text() == f"cache {cache}: 4 shards: 4 complete, 0 missing, bad: 0"


def test_missing_and_interrupted_shards_without_verify(cache):
    damage(cache)
    result = cache_status(cache)
    # Without --verify only completion records and file sizes are read: the flipped chunk goes unnoticed.
    assert result.complete == ["train/00000", "train/00002"]
    assert result.missing == ["train/00001", "val/00000"]
    assert result.bad == []
    assert result.problem() == (
        f"cache {cache} is not complete: 2 missing (train/00001, val/00000) of 4 shards; "
        "re-run cache-teacher (or re-submit the array) to finish it, with --repair for bad shards"
    )
    assert result.text().splitlines() == [
        f"cache {cache}: 4 shards: 2 complete, 2 missing, bad: 0 (file sizes checked; checksums with --verify)",
        "  missing: train/00001, val/00000",
    ]


def test_verify_finds_the_bad_shard(cache):
    damage(cache)
    result = cache_status(cache, verify=True)
    assert result.complete == ["train/00000"]
    assert result.missing == ["train/00001", "val/00000"]  # the interrupted one counts as missing
    assert result.bad == ["train/00002 (file entries/c/0/0 fails its checksum)"]
    problem = result.problem()
    assert problem is not None and "2 missing (train/00001, val/00000) and 1 bad (train/00002 (file entries/c/0" in problem
    assert result.text().splitlines()[0] == f"cache {cache}: 4 shards: 1 complete, 2 missing, bad: 1"
    assert result.text().splitlines()[2] == "  bad: train/00002 (file entries/c/0/0 fails its checksum)"


def test_many_missing_shards_are_listed_up_to_a_limit(tmp_path):
    out = tmp_path / "cache"
    manifest = make_manifest(splits={"train": 8 * 25})
    write_cache(out, manifest)
    for index in range(24):
        shutil.rmtree(cf.shard_dir(out, "train", index))
    result = cache_status(out)
    assert result.complete == ["train/00024"] and len(result.missing) == 24
    problem = result.problem()
    assert problem is not None and "24 missing (train/00000, train/00001, train/00002, train/00003, train/00004, ... (19 more))" in problem
    assert result.text().splitlines()[1].endswith("train/00019, ... (4 more)")


# ---------------------------------------------------------------- training runs


def write_run_dir(directory: Path, total_steps: int, checkpoint_steps: tuple[int, ...] = (), metrics: Sequence[str] = ()) -> Path:
    """A run directory as train-student leaves it: run.json, complete checkpoints, metrics lines."""
    directory.mkdir(parents=True)
    (directory / RUN_MANIFEST).write_text(json.dumps({"format": RUN_FORMAT, "schema_version": 1, "total_steps": total_steps}))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in checkpoint_steps:
        save_checkpoint(
            directory, step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
            trainer_state={"step": step}, rng_state={"torch": torch.get_rng_state()},
        )  # fmt: skip
    if metrics:
        (directory / METRICS_FILE).write_text("".join(metrics), encoding="utf-8")
    return directory


def metrics_line(step: int) -> str:
    return json.dumps({"step": step, "loss": round(10.0 / step, 4)}) + "\n"


def test_run_in_progress(tmp_path):
    lines = [metrics_line(step) for step in range(1, 10)]
    run = write_run_dir(tmp_path / "run", 12, checkpoint_steps=(4, 8), metrics=[*lines, '{"step": 10, "lo'])  # torn by a kill
    (run / CHECKPOINTS_DIR / ".tmp-step-00000012-999").mkdir()  # a save that was interrupted
    result = status(run)
    assert isinstance(result, RunStatus)
    assert result.checkpoint == run / CHECKPOINTS_DIR / "step-00000008"
    assert (result.steps_done, result.planned_steps) == (8, 12)
    assert result.last_metrics == {"step": 9, "loss": round(10.0 / 9, 4)}
    assert result.problem() == f"run {run} is not finished: 8 of 12 steps checkpointed; resume it with --resume"
    assert result.text().splitlines() == [
        f"run {run}",
        "  last checkpoint: step 8 (checkpoints/step-00000008)",
        "  progress: 8 of 12 steps checkpointed (66.7%)",
        f"  last metrics: {json.dumps(result.last_metrics, sort_keys=True)}",
    ]


def test_run_not_started_and_run_finished(tmp_path):
    fresh = run_status(write_run_dir(tmp_path / "fresh", 5))
    assert (fresh.checkpoint, fresh.steps_done, fresh.last_metrics) == (None, 0, None)
    assert fresh.problem() == f"run {tmp_path / 'fresh'} is not finished: 0 of 5 steps checkpointed; resume it with --resume"
    assert "  last checkpoint: none yet" in fresh.text() and "  last metrics: none yet" in fresh.text()

    done = run_status(write_run_dir(tmp_path / "done", 5, checkpoint_steps=(5,), metrics=[metrics_line(5), "[1, 2]\n"]))
    assert (done.steps_done, done.problem()) == (5, None)
    assert done.last_metrics == {"step": 5, "loss": 2.0}  # a line that is JSON but not a record is skipped
    assert "(100.0%)" in done.text()


def test_last_metrics_line_of_a_long_file(tmp_path):
    lines = [metrics_line(step) for step in range(1, 5001)]  # ~150 KB: more than the tail that is read
    assert sum(map(len, lines)) > 2 * (1 << 16)
    run = write_run_dir(tmp_path / "run", 5000, metrics=lines)
    assert run_status(run).last_metrics == {"step": 5000, "loss": 0.002}


def _truncate(path: Path) -> None:
    """Cut the last bytes off, as a copy or a write interrupted near its end does."""
    path.write_bytes(path.read_bytes()[:-4])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda ckpt: _truncate(ckpt / MODEL_FILE), "model.safetensors holds"),
        (lambda ckpt: _truncate(ckpt / OPTIMIZER_FILE), "optimizer.pt is truncated"),
        (lambda ckpt: (ckpt / RNG_FILE).unlink(), "rng.pt is missing"),
        (lambda ckpt: (ckpt / TRAINER_STATE_FILE).write_text("{"), "trainer_state.json is not valid JSON"),
    ],
)
def test_damaged_checkpoints_are_reported_and_not_counted(tmp_path, damage, reason):
    only = write_run_dir(tmp_path / "only", 5, checkpoint_steps=(5,))
    damage(only / CHECKPOINTS_DIR / "step-00000005")
    result = run_status(only)
    assert (result.checkpoint, result.steps_done) == (None, 0)
    assert len(result.damaged) == 1 and result.damaged[0].startswith("step-00000005 (" + reason), result.damaged
    assert result.problem().startswith(f"run {only} has a damaged checkpoint: step-00000005")
    assert "delete it to resume from step 0" in result.problem()
    assert f"  damaged checkpoints: {result.damaged[0]}" in result.text().splitlines()

    newest = write_run_dir(tmp_path / "newest", 8, checkpoint_steps=(4, 8))
    damage(newest / CHECKPOINTS_DIR / "step-00000008")
    result = run_status(newest)
    assert (result.checkpoint.name, result.steps_done) == ("step-00000004", 4)
    assert "delete it to resume from step-00000004" in result.problem()


def test_whole_checkpoints_are_not_damaged(tmp_path):
    run = write_run_dir(tmp_path / "run", 2, checkpoint_steps=(1, 2))
    assert all(checkpoint_damage(path) is None for path in (run / CHECKPOINTS_DIR).iterdir())
    assert run_status(run).damaged == []


# ---------------------------------------------------------------- bad paths


def test_path_that_is_neither_a_cache_nor_a_run(tmp_path):
    with pytest.raises(KdpipeError, match=f"{tmp_path / 'nope'} does not exist"):
        status(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdpipeError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        status(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdpipeError, match=r"empty is neither a teacher cache \(no manifest.json\) nor a train-student run \(no run.json\)"):
        status(tmp_path / "empty")


@pytest.mark.parametrize("verify", [False, True])
def test_manifest_that_is_not_a_cache_manifest(tmp_path, cache, verify):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / cf.MANIFEST_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(KdpipeError, match="is not a kdpipe teacher-cache manifest"):
        status(tmp_path / "other", verify=verify)
    manifest = json.loads((cache / cf.MANIFEST_FILE).read_text())
    manifest["sampler"]["seed"] += 1
    (cache / cf.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(KdpipeError, match="modified after it was written"):
        status(cache, verify=verify)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"format": "other", "total_steps": 3}), "is not a kdpipe run manifest"),
        (json.dumps({"format": RUN_FORMAT}), "has no valid total_steps"),
        (json.dumps({"format": RUN_FORMAT, "total_steps": 0}), "has no valid total_steps"),
    ],
)
def test_run_manifest_that_is_not_one(tmp_path, text, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_MANIFEST).write_text(text)
    with pytest.raises(KdpipeError, match=message):
        status(tmp_path / "run")
