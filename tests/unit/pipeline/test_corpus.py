"""Reading corpus files: input expansion, formats, and bad input named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.pipeline.corpus import CorpusReader, expand_inputs
from kdpipe.schemas.errors import KdpipeError


def read_all(paths, *, text_field="text", batch_docs=3, skip_bad_rows=False):
    """(texts, [(file name, row)], reader) of every document, in order."""
    files = expand_inputs([str(p) for p in paths])
    reader = CorpusReader(files, text_field=text_field, batch_docs=batch_docs, skip_bad_rows=skip_bad_rows)
    texts, where = [], []
    for batch in reader:
        assert len(batch.texts) <= batch_docs
        texts += batch.texts
        where += [(files[s].path.name, int(r)) for s, r in zip(batch.sources, batch.rows)]
    return texts, where, reader


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def test_expand_inputs_dirs_globs_dedup_and_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/b.txt", "d/a.jsonl", "d/sub/c.parquet", "d/.hidden/x.txt", "d/notes.md", "e.txt"):
        (tmp_path / name).write_text("x")
    files = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.txt"), str(tmp_path / "d" / "b.txt")])
    assert [f.path.relative_to(tmp_path).as_posix() for f in files] == ["d/a.jsonl", "d/b.txt", "d/sub/c.parquet", "e.txt"]
    assert [f.kind for f in files] == ["jsonl", "txt", "parquet", "txt"]


@pytest.mark.parametrize(
    "spec, message",
    [("missing.txt", "does not exist"), ("notes.md", "unsupported file type '.md'"), ("*.csv", "matches no"), ("empty", "holds no")],
)
def test_expand_inputs_errors_name_the_input(tmp_path, spec, message):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdpipeError, match=message) as err:
        expand_inputs([str(tmp_path / spec)])
    assert spec in str(err.value)


def test_jsonl_rows_skip_blank_lines_and_cross_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"doc {i}", "id": i}) for i in range(5)] + ["", "  "])
    b = write_jsonl(tmp_path / "b.json", ["", json.dumps({"text": "héllo ∑"}), json.dumps({"text": ""})])
    texts, where, reader = read_all([a, b])
    assert texts == [f"doc {i}" for i in range(5)] + ["héllo ∑"]
    assert where == [("a.jsonl", i) for i in range(5)] + [("b.json", 0)]
    assert reader.num_empty == 1


def test_txt_is_one_document(tmp_path):
    (tmp_path / "one.txt").write_text("line one\nline two\n")
    texts, where, _ = read_all([tmp_path / "one.txt"])
    assert texts == ["line one\nline two\n"] and where == [("one.txt", 0)]


def test_parquet_column(tmp_path):
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(7)], "n": list(range(7))}), tmp_path / "p.parquet")
    texts, where, _ = read_all([tmp_path / "p.parquet"], text_field="body")
    assert texts == [f"row {i}" for i in range(7)] and where == [("p.parquet", i) for i in range(7)]


@pytest.mark.parametrize(
    "lines, line_number, message",
    [
        (['{"text": "a"}', '{"text": "b"}', "", '{"text": bad}'], 4, "not valid JSON"),
        (['{"text": "a"}', '{"body": "b", "id": 1}'], 2, "no 'text' field (fields: body, id)"),
        (['{"text": "a"}', b'{"text": "caf\xe9"}'], 2, "not valid UTF-8"),
        (['{"text": "a"}', '{"text": 5}'], 2, "'text' is int, not a string"),
        (['{"text": "a"}', '{"text": null}'], 2, "'text' is NoneType, not a string"),
        (['[{"text": "a"},', '{"text": "b"}]'], 1, "not valid JSON"),
        (['"just a string"'], 1, "not an object"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, lines, line_number, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(KdpipeError) as err:
        read_all([path])
    text = str(err.value)
    assert f"bad.jsonl line {line_number}:" in text and message in text and "--skip-bad-rows" in text
    assert "\n" not in text


def test_bad_line_after_clean_batches_keeps_every_good_record_once(tmp_path):
    # The first batches go through Arrow; the bad line sends the rest of the file to the line reader.
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(10)]
    lines[8] = "{broken"
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    texts, where, reader = read_all([path], batch_docs=2, skip_bad_rows=True)
    assert texts == [f"doc {i}" for i in range(10) if i != 8]
    assert [row for _, row in where] == [i for i in range(10) if i != 8]
    assert reader.num_bad_rows == 1


def test_skip_bad_rows_counts_every_kind(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        ['{"text": "ok 1"}', "{nope", '{"body": "x"}', b'{"text": "\xff"}', '{"text": 3}', '{"text": "ok 2"}'],
    )
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    texts, where, reader = read_all([path, tmp_path / "bad.txt"], skip_bad_rows=True)
    assert texts == ["ok 1", "ok 2"] and where == [("a.jsonl", 0), ("a.jsonl", 5)]
    assert reader.num_bad_rows == 5


def test_undecodable_txt_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(KdpipeError, match=r"latin1\.txt: not valid UTF-8 \(byte 3\)"):
        read_all([tmp_path / "latin1.txt"])


def test_parquet_missing_column_and_wrong_type(tmp_path):
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "p.parquet")
    with pytest.raises(KdpipeError, match=r"p\.parquet has no column 'text' \(columns: body, n\); pass --text-field"):
        read_all([tmp_path / "p.parquet"])
    with pytest.raises(KdpipeError, match="column 'n' has type int64"):
        read_all([tmp_path / "p.parquet"], text_field="n")


def test_parquet_null_and_invalid_utf8_rows_are_named(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(KdpipeError, match=r"nulls\.parquet row 1: 'text' is null"):
        read_all([tmp_path / "nulls.parquet"])
    texts, where, reader = read_all([tmp_path / "nulls.parquet"], skip_bad_rows=True)
    assert texts == ["a", "c"] and where == [("nulls.parquet", 0), ("nulls.parquet", 2)] and reader.num_bad_rows == 1
    binary = pa.array([b"ok", b"\xff\xfe", b"fine"], type=pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": binary}), tmp_path / "bytes.parquet")
    with pytest.raises(KdpipeError, match=r"bytes\.parquet row 1: 'text' is not valid UTF-8"):
        read_all([tmp_path / "bytes.parquet"])


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "fake.parquet").write_text("hello")
    with pytest.raises(KdpipeError, match=r"fake\.parquet is not a readable Parquet file"):
        read_all([tmp_path / "fake.parquet"])
