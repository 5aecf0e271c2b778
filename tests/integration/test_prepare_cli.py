"""The real `kdpipe prepare-data` command on a small corpus of .txt, .jsonl and .parquet files.

Checks that the stored tokens decode back to the corpus text, that a re-run is a no-op, that
another config is refused and `--overwrite` rebuilds, and that two runs into two
directories give byte-identical arrays, document tables and manifests (the manifest leaves
out `--out`; only `config.yaml`, the resolved run config, names the output directory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from kdpipe.schemas.token_store import TokenStore
from tests.unit.pipeline.tiny_tokenizer import train_tiny_tokenizer

TEXTS = [f"Text {i}: distillation packs documents into sequences, über {i * i} times.\n" * (1 + i % 5) for i in range(30)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A corpus directory with one file of each format, and a tokenizer, under one root."""
    root = tmp_path_factory.mktemp("prepare-cli")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[1:15]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": TEXTS[15:]}), corpus / "c.parquet")
    train_tiny_tokenizer(root / "tokenizer")
    return root


def kdpipe(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", "prepare-data", *args], cwd=workdir, capture_output=True, text=True, timeout=300
    )


def prepare(workdir: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    """Run on all three files (the .txt by glob); options from a TOML config section, `--text-field` overriding it."""
    config = workdir / "prepare.toml"
    config.write_text('[prepare-data]\ntext_field = "body"\nval_fraction = 0.25\n')
    flags = ["--tokenizer", "tokenizer", "--out", out, "--seq-len", "32", "--text-field", "text", "--config", str(config)]
    return kdpipe(workdir, "corpus/*.txt", "corpus/b.jsonl", "corpus/c.parquet", *flags, *extra)


def test_prepare_data_cli_end_to_end(workdir):
    first = prepare(workdir, "store")
    assert first.returncode == 0, first.stderr
    assert "Wrote token store store" in first.stdout and "tokens/s" in first.stdout
    store = TokenStore.open(workdir / "store")
    decoder = Tokenizer.from_file(str(store.tokenizer_dir / "tokenizer.json"))
    texts = {}
    for name in store.splits:
        split = store.split(name)
        stream = split.tokens(0, split.num_sequences).reshape(-1)
        for doc in split.documents().to_pylist():
            if doc["first_sequence"] >= 0:
                start = doc["first_sequence"] * store.seq_len + doc["first_position"]
                tokens = stream[start : start + doc["num_tokens"]].tolist()
                if len(tokens) == doc["num_tokens"]:  # not cut by the dropped tail
                    assert tokens[0] == store.bos_id and tokens[-1] == store.eos_id
                    texts[(doc["source"], doc["row"])] = decoder.decode(tokens[1:-1])
    expected = {("corpus/a.txt", 0): TEXTS[0]} | {("corpus/b.jsonl", i): t for i, t in enumerate(TEXTS[1:15])}
    expected |= {("corpus/c.parquet", i): t for i, t in enumerate(TEXTS[15:])}
    assert len(texts) >= len(expected) - 2  # at most the last document of each split is cut by its dropped tail
    assert all(expected[key] == text for key, text in texts.items())
    assert set(store.splits) == {"train", "val"}

    again = prepare(workdir, "store")
    assert again.returncode == 0 and "is up to date" in again.stdout and "nothing to do" in again.stdout

    twin = prepare(workdir, "twin")
    assert twin.returncode == 0, twin.stderr
    assert_identical_stores(workdir / "store", workdir / "twin")

    refused = prepare(workdir, "store", "--seq-len", "16")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: token store store was built differently (seq_len 32, now 16); pass --overwrite to rebuild it, or choose another --out"
    )

    rebuilt = prepare(workdir, "store", "--seq-len", "16", "--overwrite")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert TokenStore.open(workdir / "store").seq_len == 16
    assert not [p for p in workdir.iterdir() if p.name.startswith(".store")]  # no temporary or replaced directories left


def assert_identical_stores(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.parts[:2] == ("train", "tokens") and p.parts[-1] != "zarr.json" for p in files_a)  # chunk files exist
    differing = [p for p in files_a if (a / p).read_bytes() != (b / p).read_bytes()]
    assert differing == [Path("config.yaml")]  # it records --out; everything else, manifest included, is identical
