"""The demo's stdlib corpus: what is taken, how files become documents, determinism, the split."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from kdpipe.demo.corpus import (
    MIN_DOCUMENT_BYTES,
    WHOLE_FILE_BYTES,
    _source_files,
    build_stdlib_corpus,
    split_source,
)
from kdpipe.pipeline.packing import assign_val
from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.prepare_config import PrepareDataConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MAX_BYTES = 250_000


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def header_file(document: str) -> str:
    first = document.split("\n", 1)[0]
    assert first.startswith("# ")
    return first[2:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return build_stdlib_corpus(out, max_bytes=MAX_BYTES, val_fraction=0.2), out


def test_output_is_deterministic(corpus, tmp_path):
    info, out = corpus
    again = build_stdlib_corpus(tmp_path, max_bytes=MAX_BYTES, val_fraction=0.2)
    assert (tmp_path / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (tmp_path / "val.jsonl").read_bytes() == (out / "val.jsonl").read_bytes()
    assert again.train_documents == info.train_documents and again.val_documents == info.val_documents


def test_split_is_prepare_datas_split_and_counts_are_right(corpus):
    info, out = corpus
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert len(train) == info.train_documents and len(val) == info.val_documents
    assert len(val) > 0 and len(train) > 2 * len(val)
    assert not assign_val(train, 0.2).any() and assign_val(val, 0.2).all()
    assert not set(train) & set(val)
    assert info.train_bytes == sum(len(t.encode()) for t in train)
    assert info.val_bytes == sum(len(t.encode()) for t in val)


def test_documents_rebuild_the_chosen_files_within_the_budget(corpus):
    info, out = corpus
    by_file: dict[str, list[str]] = {}
    for text in read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl"):
        by_file.setdefault(header_file(text), []).append(text)
    assert len(by_file) == info.num_files > 3
    assert sum((STDLIB / name).stat().st_size for name in by_file) <= MAX_BYTES
    for name in by_file:
        assert not {"test", "tests", "idle_test", "site-packages", "encodings"} & set(Path(name).parts)
        source = (STDLIB / name).read_text(encoding="utf-8")
        # every document of the file is in the corpus; stripped of headers they concatenate to the file
        expected = split_source(name, source)
        assert sorted(by_file[name]) == sorted(expected)
        assert "".join(d.split("\n", 1)[1] for d in expected) == source


def test_source_files_skips_tests_packages_tables_and_build_files(tmp_path):
    for relative in [
        "json/decoder.py", "os.py", "test/test_os.py", "idlelib/idle_test/htest.py", "lib2to3/tests/data/bom.py",
        "site-packages/pkg/mod.py", "encodings/cp1252.py", "pydoc_data/topics.py", "config-3.11-x86_64/python-config.py",
        "_sysconfigdata__linux.py", "json/README.txt",
    ]:  # fmt: skip
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n")
    assert _source_files(tmp_path) == ["json/decoder.py", "os.py"]


def test_large_files_split_at_top_level_definitions():
    body = "\n".join(f"    total += {i}" for i in range(60))
    parts = ['"""Module docstring."""\nimport os\n\n']
    for i in range(40):
        parts.append(f"# comment about f{i}\n@decorator\ndef f{i}(total):\n{body}\n    return total\n\n")
    source = "".join(parts)
    assert len(source) > WHOLE_FILE_BYTES
    documents = split_source("pkg/big.py", source)
    assert len(documents) > 5
    assert all(d.startswith("# pkg/big.py\n") for d in documents)
    bodies = [d.removeprefix("# pkg/big.py\n") for d in documents]
    assert "".join(bodies) == source
    assert all(len(b) >= MIN_DOCUMENT_BYTES for b in bodies)
    # every cut falls just before a definition's leading comment, never inside a function
    assert all(b.startswith("# comment about f") for b in bodies[1:])
    assert split_source("small.py", "x = 1\n") == ["# small.py\nx = 1\n"]
    assert split_source("empty.py", "\n") == []


def test_prepare_data_with_the_same_fraction_reproduces_the_split(corpus, tokenizer_dir, tmp_path):
    info, out = corpus
    config = PrepareDataConfig(
        inputs=[str(out / "train.jsonl"), str(out / "val.jsonl")], tokenizer=tokenizer_dir, out=tmp_path / "store",
        seq_len=64, val_fraction=0.2,
    )  # fmt: skip
    summary = prepare_data(config)
    assert summary.splits["val"]["num_documents"] == info.val_documents
    assert summary.splits["train"]["num_documents"] == info.train_documents


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(KdpipeError, match="val_fraction"):
        build_stdlib_corpus(tmp_path, max_bytes=1000, val_fraction=0.0)
    with pytest.raises(KdpipeError, match="max_bytes"):
        build_stdlib_corpus(tmp_path, max_bytes=0, val_fraction=0.1)
