"""prepare-data end to end in process: store contents against the corpus, bad input via the CLI entry point."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from kdpipe.cli import main
from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas.prepare_config import PrepareDataConfig
from kdpipe.schemas.token_store import TokenStore

TEXTS = [f"Document {i}: the quick brown fox jumps over {i * 7} lazy dogs." * (1 + i % 4) for i in range(40)]


def make_corpus(root: Path) -> dict[tuple[str, int], str]:
    """A txt, a jsonl and a parquet file; returns {(source path, row): text}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(TEXTS[0])
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[1:20])) + "\n")
    pq.write_table(pa.table({"text": TEXTS[20:]}), root / "c.parquet")
    expected = {(str(root / "a.txt"), 0): TEXTS[0]}
    expected |= {(str(root / "b.jsonl"), i): t for i, t in enumerate(TEXTS[1:20])}
    expected |= {(str(root / "c.parquet"), i): t for i, t in enumerate(TEXTS[20:])}
    return expected


def config(inputs, tokenizer, out, **options) -> PrepareDataConfig:
    return PrepareDataConfig(inputs=[str(i) for i in inputs], tokenizer=tokenizer, out=out, **{"seq_len": 16, **options})


def document_tokens(store: TokenStore, split_name: str) -> dict[tuple[str, int], np.ndarray]:
    """Each placed document's tokens, cut out of the stored sequences by its table entry."""
    split = store.split(split_name)
    stream = split.tokens(0, split.num_sequences).reshape(-1)
    docs = split.documents().to_pylist()
    out = {}
    for doc in docs:
        if doc["first_sequence"] >= 0:
            start = doc["first_sequence"] * store.seq_len + doc["first_position"]
            out[(doc["source"], doc["row"])] = stream[start : start + doc["num_tokens"]]
    return out


def test_store_holds_the_corpus(tmp_path, tokenizer_dir):
    expected = make_corpus(tmp_path / "corpus")
    summary = prepare_data(config([tmp_path / "corpus"], tokenizer_dir, tmp_path / "store", val_fraction=0.3, tail="pad"))
    store = TokenStore.open(tmp_path / "store")
    decoder = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))
    assert store.splits == ["train", "val"] and store.bos_id == 0 and store.eos_id == 1 and store.pad_id == 2
    seen = {}
    for name in store.splits:
        split = store.split(name)
        for key, tokens in document_tokens(store, name).items():
            assert tokens[0] == store.bos_id and tokens[-1] == store.eos_id
            seen[key] = decoder.decode(tokens[1:-1].tolist(), skip_special_tokens=False)
        # Every sequence's document starts match the table, and a BOS sits at each one.
        table = split.documents().to_pylist()
        for index in range(split.num_sequences):
            starts = split.doc_starts(index).tolist()
            assert starts == [d["first_position"] for d in table if d["first_sequence"] == index]
            assert all(split.tokens(index, index + 1)[0, s] == store.bos_id for s in starts)
        last = split.tokens(split.num_sequences - 1, split.num_sequences)[0]
        assert split.num_padding == summary.splits[name]["num_padding"]
        assert (last[store.seq_len - split.num_padding :] == store.pad_id).all()
    assert seen == expected
    assert summary.splits["val"]["num_documents"] > 0 and not summary.up_to_date
    assert "Wrote token store" in summary.text() and "tokens/s" in summary.text()


def test_batching_does_not_change_a_byte(tmp_path, tokenizer_dir):
    make_corpus(tmp_path / "corpus")
    for name, batch_docs in (("one", 1), ("many", 1000)):
        prepare_data(config([tmp_path / "corpus"], tokenizer_dir, tmp_path / name, batch_docs=batch_docs, val_fraction=0.2))
    for split in ("train", "val"):
        for array in ("tokens", "doc_starts", "doc_start_offsets"):
            one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / split / array).rglob("*") if p.is_file())
            assert one, array
            for rel in one:
                assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "many" / rel).read_bytes(), rel


def test_without_bos_documents_start_at_their_first_token(tmp_path, tokenizer_dir_no_bos):
    make_corpus(tmp_path / "corpus")
    prepare_data(config([tmp_path / "corpus" / "b.jsonl"], tokenizer_dir_no_bos, tmp_path / "store", tail="pad"))
    store = TokenStore.open(tmp_path / "store")
    assert store.bos_id is None
    decoder = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))
    docs = document_tokens(store, "train")
    assert [decoder.decode(t[:-1].tolist()) for t in docs.values()] == TEXTS[1:20]
    assert not np.isin(store.split("train").tokens(0, store.split("train").num_sequences), [0]).any()


def test_tokenizer_truncation_setting_is_ignored(tmp_path, tokenizer_dir):
    truncating = tmp_path / "truncating"
    truncating.mkdir()
    for f in tokenizer_dir.iterdir():
        (truncating / f.name).write_bytes(f.read_bytes())
    backend = Tokenizer.from_file(str(truncating / "tokenizer.json"))
    backend.enable_truncation(max_length=3)
    backend.save(str(truncating / "tokenizer.json"))
    make_corpus(tmp_path / "corpus")
    a = prepare_data(config([tmp_path / "corpus" / "a.txt"], truncating, tmp_path / "a", tail="pad"))
    b = prepare_data(config([tmp_path / "corpus" / "a.txt"], tokenizer_dir, tmp_path / "b", tail="pad"))
    assert a.splits["train"]["num_tokens"] == b.splits["train"]["num_tokens"] > 10


def test_token_split_pickles_after_use(tmp_path, tokenizer_dir):
    make_corpus(tmp_path / "corpus")
    prepare_data(config([tmp_path / "corpus"], tokenizer_dir, tmp_path / "store"))
    split = TokenStore.open(tmp_path / "store").split("train")
    first = split.tokens(0, 2)
    clone = pickle.loads(pickle.dumps(split))
    assert clone._arrays is None and np.array_equal(clone.tokens(0, 2), first)


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `kdpipe ARGS` in process through the console entry point; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["kdpipe", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


BAD_INPUTS = {
    "missing input": (lambda d: [d / "nope.jsonl"], {}, "nope.jsonl does not exist"),
    "no documents": (lambda d: [write(d / "e.jsonl", '{"text": ""}\n')], {}, "no documents in the 1 input file"),
    "invalid json": (lambda d: [write(d / "j.jsonl", '{"text": "a"}\n{"text": \n')], {}, "j.jsonl line 2: not valid JSON"),
    "missing field": (lambda d: [write(d / "f.jsonl", '{"body": "a"}\n')], {}, "f.jsonl line 1: no 'text' field"),
    "missing column": (lambda d: [parquet(d / "p.parquet", body=["a"])], {}, "p.parquet has no column 'text'"),
    "undecodable": (lambda d: [write(d / "u.jsonl", b'{"text": "\xc3\x28"}\n')], {}, "u.jsonl line 1: not valid UTF-8"),
    "unreadable tokenizer": (lambda d: [write(d / "ok.txt", "hi")], {"--tokenizer": "junk"}, "cannot read a tokenizer from"),
    "missing tokenizer": (lambda d: [write(d / "ok.txt", "hi")], {"--tokenizer": "absent"}, "absent does not exist"),
    "seq-len 1": (lambda d: [write(d / "ok.txt", "hi")], {"--seq-len": "1"}, "--seq-len must be at least 2"),
    "too little text": (lambda d: [write(d / "ok.txt", "hi")], {"--seq-len": "4096"}, "no complete sequence"),
}


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, tokenizer_dir, capsys, monkeypatch):
    make_inputs, overrides, message = BAD_INPUTS[case]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{ not json")
    inputs = make_inputs(tmp_path)
    options = {"--tokenizer": str(tokenizer_dir), "--out": str(tmp_path / "store"), "--seq-len": "16", **overrides}
    options["--tokenizer"] = str(tmp_path / options["--tokenizer"]) if overrides.get("--tokenizer") else options["--tokenizer"]
    args = ["prepare-data", *inputs] + [x for kv in options.items() for x in kv]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, (out, err)
    assert message in err and err.startswith("error:") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".store")) == []  # no half-built store
    assert not (tmp_path / "store").exists()


def test_skip_bad_rows_reports_the_count(tmp_path, tokenizer_dir, capsys, monkeypatch):
    path = write(tmp_path / "c.jsonl", "\n".join([json.dumps({"text": t}) for t in TEXTS[:10]] + ["{bad", "[1]"]) + "\n")
    args = ["prepare-data", path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "store", "--seq-len", "8", "--skip-bad-rows"]
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0 and "2 bad rows skipped" in out
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["skipped_rows"] == 2


def test_out_that_is_not_a_store_is_never_replaced(tmp_path, tokenizer_dir, capsys, monkeypatch):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    path = write(tmp_path / "a.txt", TEXTS[3])
    args = ["prepare-data", path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "precious", "--seq-len", "4", "--overwrite"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "is not a kdpipe token store; refusing to replace it" in err
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_help_explains_the_input_conventions(capsys, monkeypatch):
    code, out, _ = run_cli(["prepare-data", "--help"], capsys, monkeypatch)
    text = " ".join(out.split())
    assert code == 0
    for phrase in ("each file is one document", "--text-field", "--seq-len", "--val-fraction", "--tail", "--skip-bad-rows", "--overwrite"):
        assert phrase in text, phrase
