"""crc32c file checksums: the one form every kdpipe store records them in.

A teacher-cache shard's `complete.json` and a token store's manifest both map each file's
path (relative, `/`-separated) to the crc32c of its bytes as 8 hex digits. crc32c runs at
several GB/s, so `kdpipe verify` is bound by the disk, and one helper keeps writers and
checkers from drifting apart in how they hash or name a file.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import crc32c

_BLOCK_BYTES = 16 << 20  # files are streamed: a token store's document table can be large


def file_crc32c(path: Path) -> str:
    """crc32c of a file's bytes, 8 hex digits."""
    value = 0
    with Path(path).open("rb") as fh:
        while block := fh.read(_BLOCK_BYTES):
            value = crc32c.crc32c(block, value=value)
    return f"{value:08x}"


def file_checksums(directory: Path, *, exclude: Collection[str] = ()) -> dict[str, str]:
    """crc32c of every file under `directory`, by path relative to it, in sorted order; `exclude` names relative paths to skip."""
    directory = Path(directory)
    sums = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative not in exclude:
            sums[relative] = file_crc32c(path)
    return sums
