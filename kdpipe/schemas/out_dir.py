"""Output directories: refuse one that cannot be written before a stage writes anything.

Without this check a read-only `--out` (permissions, a read-only mount) surfaces as a
PermissionError traceback from whichever write comes first, sometimes after hours of work
or after a half-made directory already blocks the corrected re-run.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from kdpipe.schemas.errors import KdpipeError


def check_writable_dir(path: Path, flag: str, *, beside: bool = False) -> None:
    """Raise a one-line `KdpipeError` unless this process can create (or write into) directory `path`.

    Judged on `path` if it exists, else on its nearest existing parent, which the stage would
    create it in; `beside`: the stage builds next to `path` and renames, so judge its parent.
    `os.access` also reports a read-only file system.
    """
    path = Path(path)
    start = path.absolute().parent if beside else path.absolute()
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise KdpipeError(f"{flag} {path}: {existing} is a file, not a directory; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KdpipeError(
            f"{flag} {path}: cannot write into {existing} (permissions or a read-only file system); choose a writable {flag}"
        )


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota: an `OSError`, or a library error wrapping one (safetensors says `os error 28`)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
