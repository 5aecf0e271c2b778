"""Malformed on-disk records (manifest, shard arrays) are `KdpipeError`s naming the file and what to
do, also under `python -O` (which strips asserts): validation of data read from disk never uses assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.writer import write_manifest
from tests.unit.teacher_cache.test_store import make_manifest, write_cache


def damaged_manifest(directory: Path, **layout: object) -> Path:
    """A manifest whose layout is edited (and its fingerprint left as written)."""
    write_manifest(directory, make_manifest())
    path = directory / cf.MANIFEST_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "layout": {**data["layout"], **layout}}))
    return path


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        (dict(shards={"train": 2, "val": 1}), r"layout.shards\['train'\] must be 3"),
        (dict(shards={"train": 3}), r"layout.shards\['val'\] must be 1"),
        (dict(sequences_per_shard=0), "sequences_per_shard and layout.sequences_per_chunk must be >= 1"),
    ],
)
def test_inconsistent_manifest_is_a_kdpipe_error(tmp_path, layout, problem):
    path = damaged_manifest(tmp_path, **layout)
    with pytest.raises(KdpipeError, match=rf"{path} is inconsistent \(.*{problem}.*\); the cache is damaged, rebuild it"):
        open_cache(tmp_path)


def test_unknown_split_in_manifest_is_a_kdpipe_error(tmp_path):
    write_manifest(tmp_path, make_manifest())
    path = tmp_path / cf.MANIFEST_FILE
    data = json.loads(path.read_text())
    data["token_store"]["splits"]["test"] = 4
    data["layout"]["shards"]["test"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(KdpipeError, match=r"splits \['test'\] have no RNG stream"):
        open_cache(tmp_path)


def test_manifest_validation_survives_python_O(tmp_path):
    damaged_manifest(tmp_path, shards={"train": 2, "val": 1})
    code = "import sys; from kdpipe.schemas.cache_format import CacheManifest as M; from pathlib import Path; p = Path(sys.argv[1])\n"
    code += "try: M.from_json(p.read_text(), str(p))\nexcept Exception as e: print(type(e).__name__, e)"
    result = subprocess.run(
        [sys.executable, "-O", "-c", code, str(tmp_path / cf.MANIFEST_FILE)], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.startswith("KdpipeError") and "must be 3" in result.stdout, (result.stdout, result.stderr)


def test_shard_array_that_is_a_group_is_named(tmp_path):
    write_cache(tmp_path, make_manifest(splits={"train": 8}))
    directory = cf.shard_dir(tmp_path, "train", 0)
    (directory / cf.TOKENS / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(KdpipeError, match=rf"cache shard {directory} is damaged \(tokens is a group, not an array\); run `kdpipe verify"):
        open_cache(tmp_path).open_shard("train", 0).read(0, 4)
