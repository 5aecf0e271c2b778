"""The teacher fingerprint: the config and weights hashes that tie a cache to exactly one teacher.

`cache-teacher` records them in the cache manifest (`manifest.teacher.config_hash` and
`weights_hash`); `train-student` computes them again when it loads the teacher for an LRC
student and refuses a different one. Both stages use these functions, so what counts
(which config keys do not, which bytes are hashed and in what order) is written once.
Nothing here imports torch or transformers: a config is anything with `to_dict()`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from kdpipe.schemas.errors import KdpipeError

# Keys of config.to_dict() that change with how a model was saved or loaded, not with
# what it computes: they must not change the teacher fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype"})

_HASH_BLOCK_BYTES = 16 * 1024 * 1024


class Fingerprinted(Protocol):
    """Anything that carries a teacher fingerprint (a loaded teacher's info, a cache manifest's teacher)."""

    config_hash: str
    weights_hash: str


def config_hash(config: Any) -> str:
    """sha256 (first 16 hex chars) of the canonical JSON config, minus save/load-only keys."""
    canonical = json.dumps(_strip_volatile(config.to_dict()), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def weights_hash(files: list[Path]) -> str:
    """blake2b (16 hex chars) over the weight files' bytes in sorted-name order, streamed in 16 MiB blocks."""
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted(files, key=lambda p: p.name):
        with file.open("rb") as fh:
            while block := fh.read(_HASH_BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()


def check_same_teacher(path: Path, found: Fingerprinted, recorded: Fingerprinted) -> None:
    """Refuse the teacher at `path` (fingerprint `found`) unless it is the one a cache recorded."""
    for what, now, then in (
        ("weights", found.weights_hash, recorded.weights_hash),
        ("config", found.config_hash, recorded.config_hash),
    ):
        if now != then:
            raise KdpipeError(
                f"teacher {path} is not the teacher of this cache (its {what} hash is {now}, the cache records "
                f"{then}); restore that teacher or cache this one with `kdpipe cache-teacher`"
            )


def _strip_volatile(value: Any) -> Any:
    """Drop `_VOLATILE_CONFIG_KEYS` at every nesting level (sub-configs carry their own dtype)."""
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    return value
