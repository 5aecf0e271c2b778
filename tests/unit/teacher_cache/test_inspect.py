"""`verify_cache` / `kdpipe verify` and `cache_stats` / `kdpipe inspect` on synthetic caches."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from kdpipe import cli
from kdpipe.schemas import cache_format as cf
from kdpipe.teacher_cache import cache_stats, verify_cache
from kdpipe.teacher_cache.writer import ShardWriter
from tests.unit.teacher_cache.test_store import batch_of, make_content, make_manifest, write_cache


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point as a user would; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["kdpipe", *args])
    monkeypatch.setenv("COLUMNS", "250")  # keep rich from wrapping paths
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def statuses(report) -> dict[str, str]:
    return {verdict.name: verdict.status for verdict in report.shards}


def test_verify_clean_cache(tmp_path, monkeypatch, capsys):
    write_cache(tmp_path, make_manifest())
    report = verify_cache(tmp_path)
    assert set(statuses(report).values()) == {"ok"} and len(report.shards) == 4
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(tmp_path))
    assert code == 0 and "4 shards: 4 ok, 0 bad, 0 partial, 0 missing" in out


def test_verify_names_every_bad_shard(tmp_path, monkeypatch, capsys):
    write_cache(tmp_path, make_manifest(mode="top-k", ghost=True, snap_dtype="fp8"))
    flipped = cf.shard_dir(tmp_path, "train", 0) / "tokens" / "c" / "1" / "0"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in one chunk
    flipped.write_bytes(bytes(data))
    truncated = cf.shard_dir(tmp_path, "train", 2) / "snap" / "1" / "ffn_in" / "zarr.json"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (cf.shard_dir(tmp_path, "val", 0) / "ghost" / "c" / "0" / "0").unlink()

    report = verify_cache(tmp_path)
    assert statuses(report) == {"train/00000": "bad", "train/00001": "ok", "train/00002": "bad", "val/00000": "bad"}
    reasons = {v.name: v.reason for v in report.bad}
    assert reasons == {
        "train/00000": "file tokens/c/1/0 fails its checksum",
        "train/00002": f"file snap/1/ffn_in/zarr.json has {truncated.stat().st_size} bytes, {truncated.stat().st_size + 10} were written",
        "val/00000": "file ghost/c/0/0 is missing",
    }
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert "3 bad shard(s)" in err and all(name in err for name in reasons) and "train/00001" not in err


def test_verify_reports_partial_and_missing_shards_without_failing(tmp_path, monkeypatch, capsys):
    m = make_manifest()
    write_cache(tmp_path, m)
    (cf.shard_dir(tmp_path, "train", 1) / cf.COMPLETE_FILE).unlink()
    shutil.rmtree(cf.shard_dir(tmp_path, "train", 2))
    shutil.rmtree(cf.shard_dir(tmp_path, "val", 0))
    crashed = ShardWriter(tmp_path, m, "train", 2, 16, 20)  # an interrupted writer's leftovers
    crashed.append(batch_of(make_content(m, 4, np.random.default_rng(0)), 0, 2))
    stray = cf.shard_dir(tmp_path, "train", 0) / "stray.bin"
    report = verify_cache(tmp_path)
    assert statuses(report) == {"train/00000": "ok", "train/00001": "missing", "train/00002": "partial", "val/00000": "missing"}
    assert report.shards[2].reason == "partial, will be redone" and report.bad == []
    code, out, _ = run_cli(monkeypatch, capsys, "verify", str(tmp_path))
    assert code == 0 and "partial, will be redone" in out

    stray.write_bytes(b"x")  # a file nobody checksummed is not what the writer left
    assert verify_cache(tmp_path).bad[0].reason == "file stray.bin is not in complete.json"


def test_cache_stats_against_independent_counts(tmp_path):
    m = make_manifest(mode="rs-kd", snap_dtype="bf16")
    contents = write_cache(tmp_path, m)
    (cf.shard_dir(tmp_path, "val", 0) / cf.COMPLETE_FILE).unlink()  # val/00000 no longer counts
    complete = {key: c for key, c in contents.items() if key != ("val", 0)}
    stats = cache_stats(tmp_path)

    tokens = sum(c.tokens.size for c in complete.values())
    assert (stats.sequences, stats.tokens, stats.shards_complete, stats.shards_missing) == (20, tokens, 3, 1)
    sizes: dict[str, int] = {"logits": 0, "snapshots": 0, "tokens": 0, "all": 0}
    for split, index in complete:
        for file in cf.shard_dir(tmp_path, split, index).rglob("*"):
            if file.is_file():
                top = file.relative_to(cf.shard_dir(tmp_path, split, index)).parts[0]
                kind = {"num_entries": "logits", "seq_entry_offsets": "logits", "entries": "logits",
                        "snap_positions": "snapshots", "snap": "snapshots", "tokens": "tokens"}.get(top)  # fmt: skip
                sizes["all"] += file.stat().st_size
                if kind:
                    sizes[kind] += file.stat().st_size
    assert stats.logits_bytes_per_token == pytest.approx(sizes["logits"] / tokens)
    assert stats.snapshot_bytes_per_token == pytest.approx(sizes["snapshots"] / tokens)
    assert stats.token_ids_bytes_per_token == pytest.approx(sizes["tokens"] / tokens)
    assert stats.total_bytes == sizes["all"]
    assert stats.snapshot_terms == "ffn_in/ffn_out"

    counts = np.concatenate([c.num_entries.reshape(-1) for c in complete.values()]).astype(np.int64)
    assert stats.mean_ids_per_position == pytest.approx(counts.mean())
    assert stats.p99_ids_per_position == int(np.percentile(counts, 99, method="inverted_cdf"))
    mass = np.concatenate([c.mass.reshape(-1) for c in complete.values()]).astype(np.float64)
    assert stats.mean_covered_mass == pytest.approx(mass.mean(), abs=1e-6)


def test_inspect_prints_the_stats_table(tmp_path, monkeypatch, capsys):
    write_cache(tmp_path, make_manifest(mode="top-p-k", ghost=True, layers=()))
    stats = cache_stats(tmp_path)
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", str(tmp_path))
    assert code == 0
    for label, value in [
        ("tokens cached", f"{stats.tokens:,}"),
        ("shards complete / missing", "4 / 0"),
        ("bytes per token, logits", f"{stats.logits_bytes_per_token:.2f}"),
        ("bytes per token, snapshots", "0.00"),
        ("snapshot terms per layer", "none"),
        ("unique ids per position, p99", str(stats.p99_ids_per_position)),
        ("teacher mass covered, mean", f"{stats.mean_covered_mass:.4f}"),
    ]:
        line = next(line for line in out.splitlines() if label in line)
        assert value in line
    code, _, err = run_cli(monkeypatch, capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "is not a teacher cache" in err
