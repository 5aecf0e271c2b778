"""The real `kdpipe cache-teacher` command: a full run, inspect/verify of its cache, dry run, bad inputs.

Every bad input must end with exit code 2 and exactly one line on stderr that names the
thing that is wrong, never a traceback, and must leave complete outputs alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, PreTrainedTokenizerFast

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.token_store import TokenStore
from kdpipe.teacher_cache import open_cache
from tests.unit.teacher_cache.test_run import build_token_store

SMALL_SHARDS = ("--sequences-per-shard", "8", "--sequences-per-chunk", "4", "--batch-size", "4")


def kdpipe(*args: str | Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny matmuls on a shared machine
    return subprocess.run([sys.executable, "-m", "kdpipe", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Path:
    return tiny_teacher("llama").path


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher) -> Path:
    return build_token_store(tmp_path_factory.mktemp("cache-cli-store"), teacher)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher, store) -> Path:
    """A complete cache written by the command (rs-kd, FFN snapshots of every layer)."""
    out = tmp_path_factory.mktemp("cache-cli") / "cache"
    result = kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", out, "--snapshot-layers", "all",
                    "--snapshot-fraction", "0.25", *SMALL_SHARDS)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"cache-teacher wrote \d+ shards to .* and skipped 0 already complete", result.stdout), result.stdout
    return out


def test_cache_teacher_then_inspect_and_verify(cache, teacher, store):
    num_shards = len(open_cache(cache).manifest.global_shards())
    open_cache(cache).require_complete()
    inspect = kdpipe("inspect", cache)
    assert inspect.returncode == 0, inspect.stderr
    assert re.search(rf"shards complete / missing\s*│\s*{num_shards} / 0", inspect.stdout), inspect.stdout
    verify = kdpipe("verify", cache)
    assert verify.returncode == 0, verify.stderr
    assert f"{num_shards} ok, 0 bad" in verify.stdout
    # CACHE/config.yaml re-loads with --config and resumes the same cache: nothing left to do.
    again = kdpipe("cache-teacher", "--config", cache / cf.CONFIG_FILE)
    assert again.returncode == 0, again.stderr
    assert f"wrote 0 shards to {cache} and skipped {num_shards} already complete" in again.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, teacher, store):
    out = tmp_path / "cache"
    result = kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", out, "--dry-run", "--num-shards", "2",
                    "--shard-index", "1", *SMALL_SHARDS)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    tokens = TokenStore.open(store)
    shards = [-(-tokens.split(split).num_sequences // 8) for split in ("train", "val")]
    total = sum(shards)
    text = " ".join(result.stdout.split())  # undo the console's line wrapping
    assert f"shards {total} in total (train {shards[0]}, val {shards[1]})" in text
    assert f"task 1 of 2 takes {total // 2}, {total // 2} to write" in text
    assert "device cpu (float32)" in text
    # every:4 on a 2-layer teacher is layer 0: ffn_in, 64 bf16 values, at 1 of 16 positions (plus its int32 position).
    assert "snapshots layers 0: ffn_in at 1 of 16 positions per sequence, bf16" in text
    assert f"snapshots {(4 + 64 * 2) / 16:.1f}" in text
    assert re.search(r"bytes/token logits ~\d+\.\d .*estimated", text)
    assert re.search(r"total ~[\d.]+ [KMG]?B for [\d,]+ tokens; this task ~[\d.]+ [KMG]?B", text)
    with_output = kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", out, "--dry-run",
                         "--snapshot-ffn-output", *SMALL_SHARDS)  # fmt: skip
    assert with_output.returncode == 0, with_output.stderr
    text = " ".join(with_output.stdout.split())
    assert "snapshots layers 0: ffn_in/ffn_out at 1 of 16 positions per sequence, bf16" in text
    assert f"snapshots {(4 + 2 * 64 * 2) / 16:.1f}" in text


def test_missing_teacher_directory(tmp_path, store):
    result = kdpipe("cache-teacher", "--teacher", tmp_path / "nope", "--tokens", store, "--out", tmp_path / "cache")
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")


def test_teacher_that_is_not_a_causal_lm(tmp_path, store, teacher):
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher / name, bert / name)
    result = kdpipe("cache-teacher", "--teacher", bert, "--tokens", store, "--out", tmp_path / "cache")
    assert_one_line_error(result, str(bert), "not a causal language model")


def test_tokenizer_mismatch_with_the_token_store(tmp_path, store, teacher):
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    result = kdpipe("cache-teacher", "--teacher", other, "--tokens", store, "--out", tmp_path / "cache")
    assert_one_line_error(result, "tokenizer mismatch", str(store), str(other))


def test_teacher_without_tokenizer(tmp_path, store, teacher):
    bare = tmp_path / "bare-teacher"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher / name, bare / name)
    result = kdpipe("cache-teacher", "--teacher", bare, "--tokens", store, "--out", tmp_path / "cache")
    assert_one_line_error(result, str(bare), "has no tokenizer files")


def test_unknown_snapshot_layer(tmp_path, store, teacher):
    result = kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", tmp_path / "cache", "--snapshot-layers", "0,7")
    assert_one_line_error(result, "snapshot layer 7 does not exist", "0..1")
    assert not (tmp_path / "cache").exists()


def test_out_dir_holding_a_cache_of_another_config(cache, teacher, store):
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    result = kdpipe("cache-teacher", "--teacher", teacher, "--tokens", store, "--out", cache, "--seed", "3", *SMALL_SHARDS)
    assert_one_line_error(result, str(cache), "holds a cache of another teacher/config", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before  # nothing touched
