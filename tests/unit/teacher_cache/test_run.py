"""The cache-teacher run loop end to end on tiny teachers: alignment, references, determinism, resume.

Every check compares the cache with something computed independently: a direct Hugging Face
forward of the saved teacher (softmax over its full logits), or another run of the loop with
other batching or sharding (same bytes), or an uninterrupted run (a killed and resumed run
must give the same bytes).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.token_store import TokenStore
from kdpipe.teacher_cache import open_cache, verify_cache
from kdpipe.teacher_cache.run import CacheSummary, cache_teacher

SEQ_LEN = 16
FLOAT16_RTOL = 2.0**-11  # float16 round-to-nearest relative error
FLOAT16_ATOL = 2.0**-24  # below float16's smallest subnormal, values are flushed toward 0

_SENTENCES = (
    "The teacher runs once over the corpus and the student trains many times from the cache.",
    "Sparse logits are sampled with replacement; snapshots keep the FFN input and output.",
    "A quick brown fox jumps over the lazy dog while the distillation pipeline streams shards.",
    "Offline distillation stores what every later student run needs, and nothing more.",
)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: OpenMP's spinning threads only slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(directory: Path, num_documents: int = 10) -> Path:
    """Deterministic English documents, one .txt file each."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_documents):
        text = " ".join(_SENTENCES[(i + j) % len(_SENTENCES)] for j in range(2 + i % 3))
        (directory / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}", encoding="utf-8")
    return directory


def build_token_store(root: Path, tokenizer_dir: Path, seq_len: int = SEQ_LEN) -> Path:
    """A real token store (prepare-data) with train and val sequences, tokenized by `tokenizer_dir`."""
    corpus = write_corpus(root / "corpus")
    out = root / "store"
    prepare_data(PrepareDataConfig(inputs=[str(corpus)], tokenizer=tokenizer_dir, out=out, seq_len=seq_len, val_fraction=0.3))
    store = TokenStore.open(out)
    assert store.split("train").num_sequences > 8 and store.split("val").num_sequences > 0, store.manifest["splits"]
    return out


def run_cache(teacher: Path, tokens: Path, out: Path, **options) -> CacheSummary:
    """cache_teacher with small shards and chunks (several shards, several chunks per shard), output captured."""
    settings = dict(sequences_per_shard=8, sequences_per_chunk=4, batch_size=3, snapshot_layers="none") | options
    config = CacheTeacherConfig(teacher=teacher, tokens=tokens, out=out, **settings)
    return cache_teacher(config, console=Console(file=io.StringIO(), width=200))


def shard_files(cache_dir: Path) -> dict[str, bytes]:
    """Every file of every complete shard, plus the manifest, by relative path."""
    files = {cf.MANIFEST_FILE: (cache_dir / cf.MANIFEST_FILE).read_bytes()}
    for path in sorted((cache_dir / cf.SHARDS_DIR).rglob("*")):
        if path.is_file():
            files[path.relative_to(cache_dir).as_posix()] = path.read_bytes()
    return files


def hf_probs(model: torch.nn.Module, tokens_T: np.ndarray) -> np.ndarray:
    """softmax of the saved model's own full forward → (T, V) float64."""
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(tokens_T.astype(np.int64))[None]).logits[0]  # (T, V)
    return torch.softmax(logits.double(), dim=-1).numpy()


def dense_targets(batch, vocab_size: int) -> np.ndarray:
    """Stored sparse targets of a CachedBatch as a dense (n*T, V) array (absent ids = 0)."""
    num_positions = batch.target_offsets.size - 1
    dense = np.zeros((num_positions, vocab_size))
    rows = np.repeat(np.arange(num_positions), np.diff(batch.target_offsets))
    dense[rows, batch.target_ids] = batch.target_weights
    return dense


@pytest.fixture(scope="module")
def llama(tiny_teacher):
    return tiny_teacher("llama")


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory, llama) -> Path:
    return build_token_store(tmp_path_factory.mktemp("llama-store"), llama.path)


@pytest.fixture(scope="module")
def qwen2_store(tmp_path_factory, tiny_teacher) -> Path:
    return build_token_store(tmp_path_factory.mktemp("qwen2-store"), tiny_teacher("qwen2").path)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, llama, llama_store) -> Path:
    """rs-kd with snapshots of every layer, one task, batch size 1: the reference for byte comparisons."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = run_cache(llama.path, llama_store, out, batch_size=1, snapshot_layers="all", snapshot_fraction=0.25)
    assert summary.shards_written == len(open_cache(out).manifest.global_shards()) > 2
    return out


def test_position_t_stores_the_teacher_prediction_of_token_t_plus_1(tmp_path, llama, llama_store):
    """top-k with k = vocab and no ghost stores the whole distribution: it must be the HF softmax at t."""
    out = tmp_path / "cache"
    run_cache(llama.path, llama_store, out, mode="top-k", top_k=llama.model.config.vocab_size, ghost=False, position_chunk=5)
    cache = open_cache(out)
    for split in ("train", "val"):
        shard = cache.open_shard(split, 0)
        batch = shard.read(0, shard.num_sequences)
        stored = dense_targets(batch, cache.vocab_size).reshape(shard.num_sequences, SEQ_LEN, -1)
        for i, tokens_T in enumerate(batch.tokens):
            reference = hf_probs(llama.model, tokens_T)  # (T, V): row t predicts token t+1
            np.testing.assert_allclose(stored[i], reference, rtol=FLOAT16_RTOL, atol=FLOAT16_ATOL)
            # A one-position shift is off by far more than float16 rounding (~1e-5 here).
            assert np.abs(stored[i, 1:] - reference[:-1]).max() > 1e-3


@pytest.mark.parametrize(("mode", "top_p", "k"), [("top-k", 1.0, 5), ("top-p-k", 0.6, 20)])
def test_top_k_modes_match_a_dense_reference_with_ghost_mass(tmp_path, tiny_teacher, qwen2_store, mode, top_p, k):
    """Qwen2's LM head has 320 rows for a 300-token tokenizer: the padded head is sampled as is."""
    qwen = tiny_teacher("qwen2")
    out = tmp_path / "cache"
    run_cache(qwen.path, qwen2_store, out, mode=mode, top_k=k, top_p=top_p, ghost=True)
    cache = open_cache(out)
    assert cache.vocab_size == 320
    shard = cache.open_shard("train", 1)
    batch = shard.read(0, shard.num_sequences)
    counts = np.diff(batch.target_offsets)
    for i, tokens_T in enumerate(batch.tokens):
        reference = hf_probs(qwen.model, tokens_T)  # (T, 320)
        for t in range(SEQ_LEN):
            order = np.argsort(-reference[t], kind="stable")
            if mode == "top-k":
                kept = order[:k]
            else:  # smallest prefix reaching p, at most k ids
                reach = int(np.searchsorted(np.cumsum(reference[t, order]), top_p))
                kept = order[: min(reach + 1, k)]
            p = i * SEQ_LEN + t
            lo, hi = batch.target_offsets[p], batch.target_offsets[p + 1]
            assert counts[p] == len(kept)
            np.testing.assert_array_equal(batch.target_ids[lo:hi], np.sort(kept))
            np.testing.assert_allclose(batch.target_weights[lo:hi], reference[t, np.sort(kept)], rtol=FLOAT16_RTOL, atol=FLOAT16_ATOL)
            ghost = 1.0 - reference[t, kept].sum()
            assert batch.ghost[i, t] == pytest.approx(ghost, rel=2 * FLOAT16_RTOL, abs=1e-6)


def test_snapshots_hold_the_teachers_ffn_input_and_output(tmp_path, llama, llama_store, reference_cache):
    """Stored bf16 snapshots equal the HF model's own MLP input (and, when asked, output) at the stored positions."""
    with_output = tmp_path / "with-output"
    run_cache(llama.path, llama_store, with_output, snapshot_layers="all", snapshot_fraction=0.25, snapshot_ffn_output=True)
    for cache_dir, terms in ((reference_cache, {"ffn_in"}), (with_output, {"ffn_in", "ffn_out"})):
        batch = open_cache(cache_dir).open_shard("val", 0).read(0, 2)
        assert all(set(stored) == terms for stored in batch.snapshots.values()), cache_dir
        _check_snapshots_against_the_hf_mlp(llama, batch)


def _check_snapshots_against_the_hf_mlp(llama, batch) -> None:
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda mod, args, out, i=i: captured.update({(i, "ffn_in"): args[0], (i, "ffn_out"): out}))
        for i, layer in enumerate(llama.model.model.layers)
    ]
    try:
        for row, tokens_T in enumerate(batch.tokens):
            hf_probs(llama.model, tokens_T)
            positions = batch.snap_positions[row]
            assert len(positions) == SEQ_LEN // 4 and np.all(np.diff(positions) > 0)
            for (layer, term), full_1TD in captured.items():
                if term not in batch.snapshots[layer]:
                    continue
                expected = full_1TD[0, positions].to(torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(batch.snapshots[layer][term][row], expected)
    finally:
        for hook in hooks:
            hook.remove()


def test_bytes_do_not_depend_on_batch_size_or_task_count(tmp_path, llama, llama_store, reference_cache):
    expected = shard_files(reference_cache)
    snapshots = dict(snapshot_layers="all", snapshot_fraction=0.25)
    batched = tmp_path / "batched"
    run_cache(llama.path, llama_store, batched, batch_size=3, **snapshots)
    assert shard_files(batched) == expected
    two_tasks = tmp_path / "two-tasks"
    first = run_cache(llama.path, llama_store, two_tasks, batch_size=2, shard_index=0, num_shards=2, **snapshots)
    assert open_cache(two_tasks).missing_shards(), "task 0 of 2 must leave task 1's shards alone"
    second = run_cache(llama.path, llama_store, two_tasks, batch_size=2, shard_index=1, num_shards=2, **snapshots)
    assert first.shards_written + second.shards_written == len(open_cache(two_tasks).manifest.global_shards())
    assert shard_files(two_tasks) == expected


def test_slurm_array_environment_picks_the_task(tmp_path, llama, llama_store, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    out = tmp_path / "cache"
    run_cache(llama.path, llama_store, out)
    written = sorted((s, i) for s, i in open_cache(out).manifest.global_shards() if (cf.shard_dir(out, s, i) / cf.COMPLETE_FILE).exists())
    assert written == open_cache(out).manifest.global_shards()[1::3]
    assert "shard_index: null" in (out / cf.CONFIG_FILE).read_text()


def test_rerun_skips_complete_shards(tmp_path, llama, llama_store):
    out = tmp_path / "cache"
    first = run_cache(llama.path, llama_store, out)
    again = run_cache(llama.path, llama_store, out, batch_size=5)  # batch size is not part of the cache
    assert (again.shards_written, again.shards_skipped) == (0, first.shards_written)


def test_killed_run_resumes_to_the_same_bytes(tmp_path, llama, llama_store, reference_cache):
    """SIGKILL right after the first shard completes (a tmp dir is mid-write), then re-run."""
    out = tmp_path / "cache"
    command = [
        sys.executable, "-m", "kdpipe", "cache-teacher", "--teacher", str(llama.path), "--tokens", str(llama_store),
        "--out", str(out), "--sequences-per-shard", "8", "--sequences-per-chunk", "4", "--batch-size", "1",
        "--snapshot-layers", "all", "--snapshot-fraction", "0.25",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard = cf.shard_dir(out, "train", 0) / cf.COMPLETE_FILE

    def in_progress() -> list[str]:
        root = cf.shards_root(out, "train")
        return [p.name for p in root.iterdir() if cf.tmp_shard_index(p.name) is not None] if root.is_dir() else []

    deadline = time.monotonic() + 120
    while not (first_shard.exists() and in_progress()):  # shard 0 complete, a later one being written
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never got past its first shard"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert in_progress(), "the killed writer leaves its tmp dir behind"
    assert open_cache(out).missing_shards()

    resumed = run_cache(llama.path, llama_store, out, batch_size=1, snapshot_layers="all", snapshot_fraction=0.25)
    assert resumed.shards_skipped >= 1 and resumed.shards_written >= 1
    assert not any(cf.tmp_shard_index(p.name) is not None for p in cf.shards_root(out, "train").iterdir())
    assert shard_files(out) == shard_files(reference_cache)


def test_repair_redoes_a_corrupt_shard(tmp_path, llama, llama_store, reference_cache):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    damaged = next((cf.shard_dir(out, "train", 1) / cf.ENTRIES).rglob("c/*/*"))
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    assert [v.name for v in verify_cache(out).bad] == ["train/00001"]
    skipped = run_cache(llama.path, llama_store, out, snapshot_layers="all", snapshot_fraction=0.25)
    assert skipped.shards_written == 0  # without --repair, complete shards are trusted
    repaired = run_cache(llama.path, llama_store, out, snapshot_layers="all", snapshot_fraction=0.25, repair=True)
    assert (repaired.shards_repaired, repaired.shards_written) == (1, 1)
    assert shard_files(out) == shard_files(reference_cache)


def test_dry_run_computes_and_writes_nothing(tmp_path, llama, llama_store):
    out = tmp_path / "cache"
    console = Console(file=io.StringIO(), width=400)
    config = CacheTeacherConfig(teacher=llama.path, tokens=llama_store, out=out, sequences_per_shard=8, dry_run=True)
    summary = cache_teacher(config, console=console)
    assert summary.dry_run and summary.shards_written == 0 and summary.tokens == 0
    assert not out.exists()
    text = console.file.getvalue()
    store = TokenStore.open(llama_store)
    num_shards = sum(-(-store.split(s).num_sequences // 8) for s in ("train", "val"))
    assert f"shards     {num_shards} in total" in text and "device     cpu (float32)" in text


def test_another_config_at_out_is_refused_unless_overwrite(tmp_path, llama, llama_store):
    out = tmp_path / "cache"
    run_cache(llama.path, llama_store, out, splits=["val"])
    with pytest.raises(KdpipeError, match=r"holds a cache of another teacher/config \(sampler differ\).*--overwrite"):
        run_cache(llama.path, llama_store, out, splits=["val"], seed=7)
    replaced = run_cache(llama.path, llama_store, out, splits=["val"], seed=7, overwrite=True)
    assert replaced.shards_written == open_cache(out).manifest.num_shards("val")
    assert open_cache(out).manifest.sampler.seed == 7


def test_out_dir_holding_other_files_is_refused(tmp_path, llama, llama_store):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KdpipeError, match="is not empty and holds no teacher cache"):
        run_cache(llama.path, llama_store, out)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_draws=0), "num_draws=0 must be >= 1"),
        (dict(sequences_per_chunk=0), "sequences_per_chunk=0 must be >= 1"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(snapshot_fraction=0.0), "snapshot_fraction=0.0 must be in"),
        (dict(shard_index=2, num_shards=2), "shard index 2 of 2 tasks is out of range"),
    ],
)
def test_bad_options_are_named(tmp_path, options, message):
    with pytest.raises(KdpipeError, match=message):
        CacheTeacherConfig(teacher=tmp_path, tokens=tmp_path, out=tmp_path, **options).task_slot()
