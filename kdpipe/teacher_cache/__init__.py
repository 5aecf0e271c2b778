"""Teacher backends, samplers, snapshot capture, and the teacher-cache writer and reader.

The public reader API (what student training may import) is re-exported here: open a cache
with `open_cache`, list shards, read decoded rows; `verify_cache` and `cache_stats` check
and describe a cache. `TeacherModel` loads the teacher a cache names the way the cache did
(same hashes), for students built from its frozen weights; it is imported on first use,
so reading or verifying a cache does not pay for importing transformers. The teacher
fingerprint both stages compute (`config_hash`, `weights_hash`, `check_same_teacher`) is
`fingerprint.py`.
"""

from typing import Any

from kdpipe.teacher_cache.fingerprint import check_same_teacher, config_hash, weights_hash
from kdpipe.teacher_cache.inspect import cache_stats, scan_cache, verify_cache
from kdpipe.teacher_cache.reader import CachedBatch, CacheShard, ShardInfo, TeacherCache, open_cache

__all__ = [
    "CacheShard",
    "CachedBatch",
    "ShardInfo",
    "TeacherCache",
    "TeacherModel",
    "cache_stats",
    "check_same_teacher",
    "config_hash",
    "open_cache",
    "scan_cache",
    "verify_cache",
    "weights_hash",
]


def __getattr__(name: str) -> Any:
    if name == "TeacherModel":
        from kdpipe.teacher_cache.backend import TeacherModel

        return TeacherModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
