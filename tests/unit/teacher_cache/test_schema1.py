"""Caches written by schema 1 (flat records of absolute ids) still open and read identically.

The schema-1 shards are made here the way the schema-1 writer made them: a cache is written
by today's writer, then each shard's `entries` array is replaced by the flat packed records
of the absolute ids (zstd level 3, 1 MiB chunks), its `complete.json` checksums are redone (without sizes)
and the manifest says schema 1.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_format import CacheManifest, ShardRecord
from kdpipe.teacher_cache import open_cache, verify_cache
from kdpipe.teacher_cache.packing import pack_entries
from kdpipe.schemas.checksums import file_checksums
from kdpipe.teacher_cache.writer import entry_layout_of
from tests.unit.teacher_cache.test_store import assert_batch_equals, make_manifest, write_cache


def rewrite_as_schema_1(cache_dir, m: CacheManifest, contents) -> CacheManifest:
    old = dataclasses.replace(m, schema_version=1)
    (cache_dir / cf.MANIFEST_FILE).write_text(old.to_json(), encoding="utf-8")
    layout = entry_layout_of(m)
    for (split, index), content in contents.items():
        directory = cf.shard_dir(cache_dir, split, index)
        shutil.rmtree(directory / cf.ENTRIES)
        records = pack_entries(content.ids, content.values, layout)  # (E * bytes_per_entry,) absolute ids
        group = zarr.open_group(directory, mode="a")
        group.create_array(
            cf.ENTRIES, shape=records.shape, dtype=np.uint8, chunks=(cf.ENTRY_CHUNK_BYTES,),
            compressors=ZstdCodec(level=3, checksum=True), fill_value=0, config={"write_empty_chunks": True},
        )[:] = records  # fmt: skip
        path = directory / cf.COMPLETE_FILE
        record = ShardRecord.from_json(path.read_text(encoding="utf-8"), where=str(path))
        path.write_text(dataclasses.replace(record, files=file_checksums(directory, exclude={cf.COMPLETE_FILE}), sizes=None).to_json(), encoding="utf-8")
    return old


@pytest.mark.parametrize("mode", ["rs-kd", "top-p-k"])
def test_schema_1_cache_reads_like_the_schema_2_one(tmp_path, mode):
    m = make_manifest(mode=mode, ghost=mode != "rs-kd", layers=())
    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    contents = write_cache(new_dir, m)
    shutil.copytree(new_dir, old_dir)
    old = rewrite_as_schema_1(old_dir, m, contents)
    assert (cf.shard_dir(old_dir, "train", 0) / cf.ENTRIES / "c" / "0").is_file()  # flat, not (E, bpe)
    new_cache, old_cache = open_cache(new_dir), open_cache(old_dir)
    assert (old_cache.manifest.schema_version, new_cache.manifest.schema_version) == (1, cf.SCHEMA_VERSION)
    assert all(v.status == "ok" for v in verify_cache(old_dir).shards)
    for (split, index), content in contents.items():
        new_shard, old_shard = new_cache.open_shard(split, index), old_cache.open_shard(split, index)
        for start, stop in [(0, new_shard.num_sequences), (1, min(3, new_shard.num_sequences))]:
            got_old, got_new = old_shard.read(start, stop), new_shard.read(start, stop)
            assert_batch_equals(got_old, content, old, start, stop)
            for a, b in zip(got_old, got_new, strict=True):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b)
