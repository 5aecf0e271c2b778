"""Cheap structural check of a teacher's safetensors files, before transformers loads them.

A truncated or overwritten `model.safetensors` (an interrupted copy, a full disk) otherwise
fails deep inside transformers or safetensors with a traceback, after the run has started.
The format makes the check cheap: 8 bytes of little-endian header length, a JSON header
listing every tensor's byte range, then the data. A whole file is exactly as long as its
header says, so reading the header and one stat finds a truncated or garbled file; flipped
bits inside the tensor data are not found (the teacher's weights hash in the cache manifest
pins the bytes that were used).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kdpipe.schemas.errors import KdpipeError

# safetensors itself refuses headers above 100 MB; a larger length is garbage, not a header.
_MAX_HEADER_BYTES = 100_000_000


def check_safetensors_files(model_dir: Path) -> None:
    """Raise a one-line `KdpipeError` naming the first `*.safetensors` file of `model_dir` that is not whole."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        problem = _problem(path)
        if problem:
            raise KdpipeError(f"teacher weights {path} are damaged ({problem}); copy or save the teacher's weights again")


def _problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length: truncated"
    with path.open("rb") as fh:
        (header_bytes,) = struct.unpack("<Q", fh.read(8))
        if header_bytes > _MAX_HEADER_BYTES:
            return f"its header length {header_bytes:,} is not plausible: not a safetensors file or overwritten"
        if 8 + header_bytes > size:
            return f"{size:,} bytes, shorter than its {header_bytes:,}-byte header: truncated"
        raw = fh.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON: not a safetensors file or overwritten"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {name!r} has no valid data_offsets in the header"
        ends.append(offsets[1])
    expected = 8 + header_bytes + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "has trailing bytes"
        return f"{size:,} bytes, its header describes {expected:,}: {state}"
    return None
