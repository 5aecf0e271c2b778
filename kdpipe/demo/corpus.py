"""The demo's embedded corpus: the Python standard library's own sources, as JSONL.

Every Python installation ships a few megabytes of well-written English and code — the
standard library's `.py` files with their docstrings and comments — so the demo needs no
download and no data of ours. What is taken (`_source_files`): every `.py` file under
`sysconfig.get_paths()["stdlib"]` except test suites (directories `test`, `tests`,
`idle_test`), third-party packages (`site-packages`), generated tables (`encodings`, the
`pydoc_data` topic dump) and build-specific files (`config-*`, `_sysconfigdata*`, which
differ between machines with the same Python version).

Documents: a file up to `WHOLE_FILE_BYTES` is one document. A larger file is cut at its
top-level `def`/`class` statements (decorators and the comment lines just above them go with
them) and consecutive pieces are merged until each holds at least `MIN_DOCUMENT_BYTES`, so
a big module such as `_pydecimal.py` becomes a few dozen function- and class-level
documents instead of one 230 KB block that would land wholly in train or in validation.
Each document starts with a comment naming its file (`# json/decoder.py`), which is still
valid Python and tells the model where it is.

Selection and split: when the files exceed `max_bytes`, whole files are taken in the order
of a hash of their path until the budget is spent, so a small corpus samples the whole
library rather than its alphabetical head; output is in sorted path order. Documents go to
`val.jsonl` or `train.jsonl` by `kdpipe.pipeline.packing.assign_val`, the same text hash
`prepare-data --val-fraction` uses: preparing both files with the same fraction reproduces
this split exactly. Output depends only on the Python version's stdlib files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kdpipe.pipeline.packing import assign_val
from kdpipe.schemas.errors import KdpipeError

WHOLE_FILE_BYTES = 16_000
"""Files up to this size are one document; larger ones are split at top-level definitions."""

MIN_DOCUMENT_BYTES = 2_000
"""Pieces of a split file are merged until a document holds at least this many bytes."""

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"})


@dataclass(frozen=True, slots=True)
class CorpusInfo:
    """What `build_stdlib_corpus` wrote."""

    train_path: Path
    val_path: Path
    python_version: str
    num_files: int
    """Source files that gave documents (after the exclusions and the byte budget; empty files give none)."""
    num_files_skipped: int
    """Files left out: not UTF-8, or over the byte budget."""
    train_documents: int
    val_documents: int
    train_bytes: int
    """UTF-8 bytes of document text (not of the JSONL encoding)."""
    val_bytes: int

    def text(self) -> str:
        """One line for the demo's log."""
        return (
            f"Python {self.python_version} stdlib corpus: {self.num_files:,} files -> "
            f"train {self.train_documents:,} documents ({self.train_bytes / 1e6:.2f} MB), "
            f"val {self.val_documents:,} documents ({self.val_bytes / 1e6:.2f} MB) in {self.train_path.parent}"
        )


class StdlibSources(NamedTuple):
    """The stdlib corpus's documents, before any split, and how many files went into them."""

    documents: list[str]
    num_files: int
    """Files that gave at least one document."""
    num_skipped: int
    """Files left out: not UTF-8, or over the byte budget."""


def read_stdlib_sources(max_bytes: int) -> StdlibSources:
    """The standard library's sources within `max_bytes`, cut into documents (deterministic order)."""
    if max_bytes < 1:
        raise KdpipeError(f"corpus max_bytes must be positive (got {max_bytes})")
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = _source_files(root)
    if not candidates:
        raise KdpipeError(f"no Python sources found under the standard library directory {root}; is this a full Python install?")
    chosen, over_budget = _within_budget(root, candidates, max_bytes)
    documents: list[str] = []
    num_files = not_utf8 = 0
    for relative in chosen:
        try:
            source = (root / relative).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            not_utf8 += 1
            continue
        pieces = split_source(relative, source)
        documents.extend(pieces)
        num_files += bool(pieces)
    return StdlibSources(documents, num_files, over_budget + not_utf8)


def build_stdlib_corpus(out_dir: Path, *, max_bytes: int, val_fraction: float) -> CorpusInfo:
    """Write `train.jsonl` and `val.jsonl` (`{"text": ...}` per line) into `out_dir` from the stdlib sources."""
    if not 0.0 < val_fraction < 1.0:
        raise KdpipeError(f"corpus val_fraction must be in (0, 1) (got {val_fraction}): the demo needs a held-out split")
    documents, num_files, num_skipped = read_stdlib_sources(max_bytes)
    is_val = assign_val(documents, val_fraction)  # (N,) bool

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    write_jsonl(train_path, [d for d, v in zip(documents, is_val) if not v])
    write_jsonl(val_path, [d for d, v in zip(documents, is_val) if v])
    sizes = [len(d.encode("utf-8")) for d in documents]
    return CorpusInfo(
        train_path=train_path,
        val_path=val_path,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
        num_files=num_files,
        num_files_skipped=num_skipped,
        train_documents=int((~is_val).sum()),
        val_documents=int(is_val.sum()),
        train_bytes=sum(s for s, v in zip(sizes, is_val) if not v),
        val_bytes=sum(s for s, v in zip(sizes, is_val) if v),
    )


def _source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib `.py` files kept, sorted."""
    kept = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                kept.append((Path(directory) / name).relative_to(root).as_posix())
    return sorted(kept)


def _within_budget(root: Path, relatives: list[str], max_bytes: int) -> tuple[list[str], int]:
    """Files that fit in `max_bytes`, taken in path-hash order; returned sorted, with the number left out."""

    def rank(relative: str) -> bytes:
        return hashlib.blake2b(relative.encode("utf-8"), digest_size=8).digest()

    chosen, used = [], 0
    for relative in sorted(relatives, key=rank):
        size = (root / relative).stat().st_size
        if used + size <= max_bytes:
            chosen.append(relative)
            used += size
    return sorted(chosen), len(relatives) - len(chosen)


def split_source(relative: str, source: str) -> list[str]:
    """The documents of one source file, each headed by `# {relative}`: whole, or cut at top-level definitions."""
    header = f"# {relative}\n"
    if len(source.encode("utf-8")) <= WHOLE_FILE_BYTES:
        return [header + source] if source.strip() else []
    lines = source.splitlines(keepends=True)
    cuts = _definition_starts(source, lines)
    pieces = ["".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)]) if a < b]
    documents, current = [], ""
    for piece in pieces:
        current += piece
        if len(current.encode("utf-8")) >= MIN_DOCUMENT_BYTES:
            documents.append(current)
            current = ""
    if current.strip():
        if documents:
            documents[-1] += current  # a short tail joins the previous document
        else:
            documents.append(current)
    return [header + d for d in documents]


def _definition_starts(source: str, lines: list[str]) -> list[int]:
    """0-based line indices where a top-level def/class begins, moved up over its decorators and comments."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # not parseable by this Python: keep the file whole
    starts = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        while start > 0 and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        if start > 0 and (not starts or start > starts[-1]):
            starts.append(start)
    return starts


def write_jsonl(path: Path, documents: list[str]) -> None:
    """One `{"text": ...}` object per line, written to a temporary name and renamed (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for text in documents:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tmp.replace(path)
