"""Corpus files → batches of document texts, streamed, with bad input named by file and line.

Conventions (also shown by `kdpipe prepare-data --help`):

- `.txt`: the whole file is one document (row 0).
- `.jsonl` / `.json`: JSON Lines, one object per line, the text in `text_field`; blank
  lines are ignored and `row` counts the non-blank lines from 0 (errors quote the 1-based
  line number an editor shows).
- `.parquet`: the text is the string column `text_field`; `row` is the 0-based row.

JSON Lines and Parquet are read in record batches with `pyarrow.dataset`, so memory
holds a batch, never the corpus. JSON Lines use Arrow's parser while the file is clean;
at the first irregular record (invalid JSON, missing field, non-UTF-8) reading of that
file continues with a line-by-line reader from that record on, which names the exact line
and, with `skip_bad_rows`, skips and counts bad records. Empty texts are skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.json as pa_json

from kdpipe.schemas.errors import KdpipeError

SUFFIX_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SUPPORTED = ".txt, .jsonl/.json or .parquet"
JSON_BLOCK_BYTES = 16 << 20  # Arrow parses JSON in blocks; a line longer than this goes to the line reader


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path
    kind: str  # "txt" | "jsonl" | "parquet"
    num_bytes: int


@dataclass(slots=True)
class DocumentBatch:
    texts: list[str]
    sources: np.ndarray  # (N,) int32 index into the input file list
    rows: np.ndarray  # (N,) int64 record index within the file
    bytes_read: int  # corpus bytes consumed so far (estimated inside a file; for progress only)


def expand_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Files, directories (recursive, sorted) and globs → the ordered, de-duplicated list of corpus files."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            if path.suffix.lower() not in SUFFIX_KINDS:
                raise KdpipeError(f"input {spec}: unsupported file type '{path.suffix}'; kdpipe reads {SUPPORTED}")
            found.append(path)
        elif path.is_dir():
            files = _files_under(path)
            if not files:
                raise KdpipeError(f"input directory {spec} holds no {SUPPORTED} files")
            found.extend(files)
        elif glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            files = [f for m in matches for f in (_files_under(m) if m.is_dir() else [m]) if f.suffix.lower() in SUFFIX_KINDS]
            if not files:
                raise KdpipeError(f"input pattern {spec} matches no {SUPPORTED} files")
            found.extend(files)
        else:
            raise KdpipeError(f"input {spec} does not exist; pass corpus files, directories or glob patterns")
    seen: set[Path] = set()
    unique = []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(InputFile(path, SUFFIX_KINDS[path.suffix.lower()], path.stat().st_size))
    return unique


def _files_under(directory: Path) -> list[Path]:
    """Supported files below `directory`, sorted, skipping hidden files and directories."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in SUFFIX_KINDS and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def file_digest(path: Path) -> str:
    """blake2b-128 of a file's bytes: inputs enter the store fingerprint by content, not by name or date."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


class CorpusReader:
    """Iterates the documents of a list of input files in order, in batches of `batch_docs`."""

    def __init__(self, files: Sequence[InputFile], *, text_field: str, batch_docs: int, skip_bad_rows: bool) -> None:
        self.files = list(files)
        self.text_field = text_field
        self.batch_docs = batch_docs
        self.skip_bad_rows = skip_bad_rows
        self.num_bad_rows = 0
        self.num_empty = 0

    def __iter__(self) -> Iterator[DocumentBatch]:
        texts: list[str] = []
        sources: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        bytes_done = 0
        for index, file in enumerate(self.files):
            for chunk_texts, chunk_rows, file_bytes in self._read(file):
                keep = [i for i, t in enumerate(chunk_texts) if t]
                self.num_empty += len(chunk_texts) - len(keep)
                if len(keep) < len(chunk_texts):
                    chunk_texts, chunk_rows = [chunk_texts[i] for i in keep], chunk_rows[keep]
                texts.extend(chunk_texts)
                sources.append(np.full(len(chunk_texts), index, dtype=np.int32))
                rows.append(chunk_rows)
                while len(texts) >= self.batch_docs:
                    all_sources, all_rows = np.concatenate(sources), np.concatenate(rows)
                    n = self.batch_docs
                    yield DocumentBatch(texts[:n], all_sources[:n], all_rows[:n], bytes_done + min(file_bytes, file.num_bytes))
                    texts, sources, rows = texts[n:], [all_sources[n:]], [all_rows[n:]]
            bytes_done += file.num_bytes
        if texts:
            yield DocumentBatch(texts, np.concatenate(sources), np.concatenate(rows), bytes_done)

    def _read(self, file: InputFile) -> Iterator[tuple[list[str], np.ndarray, int]]:
        """(texts, rows (n,) int64, bytes of the file consumed) chunks of one file."""
        try:
            if file.kind == "txt":
                yield from self._read_txt(file)
            elif file.kind == "jsonl":
                yield from self._read_jsonl(file)
            else:
                yield from self._read_parquet(file)
        except OSError as err:
            raise KdpipeError(f"cannot read {file.path} ({err.strerror or err}); check the file and its permissions") from None

    def _bad(self, where: str, problem: str) -> None:
        """Count a bad record, or stop with a line that says where and what to do."""
        if not self.skip_bad_rows:
            raise KdpipeError(f"{where}: {problem}; fix it or pass --skip-bad-rows to skip bad records")
        self.num_bad_rows += 1

    def _read_txt(self, file: InputFile) -> Iterator[tuple[list[str], np.ndarray, int]]:
        data = file.path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            self._bad(str(file.path), f"not valid UTF-8 (byte {err.start}); convert it to UTF-8")
            return
        yield [text], np.zeros(1, dtype=np.int64), file.num_bytes

    def _read_parquet(self, file: InputFile) -> Iterator[tuple[list[str], np.ndarray, int]]:
        try:
            dataset = ds.dataset(str(file.path), format="parquet")
            total_rows = max(dataset.count_rows(), 1)
        except pa.ArrowException as err:
            raise KdpipeError(f"{file.path} is not a readable Parquet file ({_first_line(err)})") from None
        field = dataset.schema.field(self.text_field) if self.text_field in dataset.schema.names else None
        if field is None:
            columns = ", ".join(dataset.schema.names)
            raise KdpipeError(f"{file.path} has no column '{self.text_field}' (columns: {columns}); pass --text-field NAME")
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_string_view(field.type)):
            raise KdpipeError(f"{file.path}: column '{self.text_field}' has type {field.type}; --text-field must name a string column")
        row = 0
        for batch in dataset.to_batches(columns=[self.text_field], batch_size=self.batch_docs):
            column = batch.column(0)
            if column.null_count or not _valid_utf8(column):
                texts, rows = self._check_each(column, row, lambda i: f"{file.path} row {i}")
            else:
                texts, rows = column.to_pylist(), np.arange(row, row + len(column), dtype=np.int64)
            row += len(column)
            yield texts, rows, file.num_bytes * row // total_rows

    def _check_each(self, column: pa.Array, first_row: int, where: Callable[[int], str]) -> tuple[list[str], np.ndarray]:
        """Slow path for a batch with nulls or bad UTF-8: keep good values, report or count the rest."""
        texts, rows = [], []
        for offset, value in enumerate(column):
            try:
                text = value.as_py()
            except UnicodeDecodeError:
                self._bad(where(first_row + offset), f"'{self.text_field}' is not valid UTF-8")
                continue
            if text is None:
                self._bad(where(first_row + offset), f"'{self.text_field}' is null")
                continue
            texts.append(text)
            rows.append(first_row + offset)
        return texts, np.asarray(rows, dtype=np.int64)

    def _read_jsonl(self, file: InputFile) -> Iterator[tuple[list[str], np.ndarray, int]]:
        schema = pa.schema([(self.text_field, pa.string())])
        parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        fmt = ds.JsonFileFormat(parse_options=parse, read_options=pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES))
        record, text_bytes = 0, 0
        try:
            dataset = ds.dataset(str(file.path), format=fmt, schema=schema)
            for batch in dataset.to_batches(columns=[self.text_field], batch_size=self.batch_docs):
                column = batch.column(0)
                if column.null_count or not _valid_utf8(column):
                    break
                text_bytes += pc.sum(pc.binary_length(column)).as_py() or 0
                yield column.to_pylist(), np.arange(record, record + len(column), dtype=np.int64), text_bytes
                record += len(column)
            else:
                return
        except pa.ArrowInvalid:
            pass
        yield from self._read_jsonl_lines(file, first_record=record)

    def _read_jsonl_lines(self, file: InputFile, first_record: int) -> Iterator[tuple[list[str], np.ndarray, int]]:
        """Line-by-line JSON Lines reader from record `first_record` on; names the line of each bad record."""
        texts: list[str] = []
        rows: list[int] = []
        record, bytes_read = -1, 0
        with open(file.path, "rb") as fh:
            for line_number, raw in enumerate(fh, start=1):
                bytes_read += len(raw)
                if not raw.strip():
                    continue
                record += 1
                if record < first_record:
                    continue
                text = self._parse_line(raw, f"{file.path} line {line_number}")
                if text is None:
                    continue
                texts.append(text)
                rows.append(record)
                if len(texts) >= self.batch_docs:
                    yield texts, np.asarray(rows, dtype=np.int64), bytes_read
                    texts, rows = [], []
        if texts:
            yield texts, np.asarray(rows, dtype=np.int64), bytes_read

    def _parse_line(self, raw: bytes, where: str) -> str | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self._bad(where, f"not valid UTF-8 (byte {err.start} of the line)")
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            self._bad(where, f"not valid JSON ({err.msg} at column {err.colno})")
            return None
        if not isinstance(obj, dict):
            self._bad(where, f"a JSON {type(obj).__name__}, not an object (kdpipe reads JSON Lines: one object per line)")
            return None
        if self.text_field not in obj:
            fields = ", ".join(list(obj)[:10])
            self._bad(where, f"no '{self.text_field}' field (fields: {fields}); pass --text-field NAME if the text is elsewhere")
            return None
        text = obj[self.text_field]
        if not isinstance(text, str):
            self._bad(where, f"'{self.text_field}' is {type(text).__name__}, not a string")
            return None
        return text


def _valid_utf8(column: pa.Array) -> bool:
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
