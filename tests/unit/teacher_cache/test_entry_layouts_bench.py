"""bench/entry_layouts.py runs on a cache, checks every layout decodes losslessly, and reports sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.teacher_cache.test_store import make_manifest, write_cache

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("mode", ["rs-kd", "top-k"])
def test_entry_layouts_bench_reports_every_layout(tmp_path, mode):
    write_cache(tmp_path / "cache", make_manifest(mode=mode, layers=()))
    out = tmp_path / "layouts.json"
    done = subprocess.run(
        [sys.executable, "bench/entry_layouts.py", tmp_path / "cache", "--repeats", "1", "--json", out],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    names = [row["layout"] for row in rows]
    assert "records, absolute ids, zstd 3 (schema 1)" in names and "records, delta ids, byte planes, zstd 12" in names
    for row in rows:
        assert 0 < row["entry_bytes_per_token"] <= row["logits_bytes_per_token"] and row["decode_M_entries_per_s"] > 0
        assert row["layout"] in done.stdout
