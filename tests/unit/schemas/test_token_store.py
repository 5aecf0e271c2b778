"""Token store contract: what the writer writes the reader returns; incomplete or foreign stores are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.token_store import FORMAT, ROWS_PER_CHUNK, TokenStore, TokenStoreWriter, verify_token_store

SEQ_LEN = 8


def write_store(path: Path, num_train: int, num_val: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """A store of random tokens; each sequence i has doc starts [0, ..., i % 3 entries]. Returns train tokens and starts."""
    rng = np.random.default_rng(num_train)
    writer = TokenStoreWriter(path, SEQ_LEN)
    train = rng.integers(0, 300, size=(num_train, SEQ_LEN), dtype=np.int32)
    starts = [sorted(rng.choice(SEQ_LEN, size=i % 3, replace=False).tolist()) for i in range(num_train)]
    # Append in uneven pieces to exercise chunk buffering.
    for lo, hi in ((0, 5), (5, 5), (5, 300), (300, num_train)):
        flat = np.array([s for st in starts[lo:hi] for s in st], dtype=np.int32)
        counts = np.array([len(st) for st in starts[lo:hi]], dtype=np.int64)
        writer.append_sequences("train", train[lo:hi], flat, counts)
    writer.append_sequences("val", np.ones((num_val, SEQ_LEN), np.int32), np.zeros(num_val, np.int32), np.ones(num_val, np.int64))
    writer.append_documents(
        "train", {"source": ["a.txt", "b.jsonl"], "row": [0, 3], "num_tokens": [5, 9], "first_sequence": [0, -1], "first_position": [0, -1]}
    )
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    counts = lambda n: {"num_sequences": n, "num_tokens": n * SEQ_LEN, "num_documents": n, "num_padding": 0}  # noqa: E731
    manifest = {
        "format": FORMAT,
        "schema_version": 1,
        "fingerprint": "f" * 16,
        "tokenizer_fingerprint": "t" * 16,
        "vocab_size": 300,
        "seq_len": SEQ_LEN,
        "bos_id": None,
        "eos_id": 1,
        "pad_id": 1,
        "tail": "drop",
        "inputs": [],
        "config": {},
        "splits": {"train": counts(num_train), "val": counts(num_val)},
    }
    writer.finish(manifest)
    return train, starts


def test_round_trip(tmp_path):
    train, starts = write_store(tmp_path / "s", num_train=600)
    store = TokenStore.open(tmp_path / "s")
    assert store.splits == ["train"] and store.seq_len == SEQ_LEN and store.eos_id == 1 and store.bos_id is None
    split = store.split("train")
    assert split.num_sequences == 600
    assert np.array_equal(split.tokens(0, 600), train) and np.array_equal(split.tokens(250, 260), train[250:260])
    assert [split.doc_starts(i).tolist() for i in range(600)] == starts
    assert split.documents().to_pylist()[1] == {
        "source": "b.jsonl", "row": 3, "num_tokens": 9, "first_sequence": -1, "first_position": -1
    }
    assert zarr.open_array(tmp_path / "s" / "train" / "tokens", mode="r").chunks == (ROWS_PER_CHUNK, SEQ_LEN)
    assert store.split("val").num_sequences == 0
    with pytest.raises(IndexError):
        split.tokens(599, 601)
    with pytest.raises(KdpipeError, match="has no split 'test'"):
        store.split("test")


def test_empty_val_is_listed_only_when_it_has_sequences(tmp_path):
    write_store(tmp_path / "s", num_train=3, num_val=2)
    assert TokenStore.open(tmp_path / "s").splits == ["train", "val"]


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: shutil.rmtree(p), "does not exist; create it with `kdpipe prepare-data"),
        (lambda p: (p / "manifest.json").unlink(), "not a complete kdpipe token store (no manifest.json)"),
        (lambda p: (p / "manifest.json").write_text("{"), "is not valid JSON"),
        (lambda p: edit_manifest(p, format="other"), "is not a kdpipe token store"),
        (lambda p: edit_manifest(p, schema_version=99), "has schema version 99, this kdpipe reads 1"),
        (lambda p: shutil.rmtree(p / "train" / "tokens"), "split 'train' is missing or unreadable"),
        (lambda p: zarr.open_array(p / "train" / "tokens", mode="r+").resize((5, SEQ_LEN)), "incomplete or corrupt"),
        (lambda p: (p / "documents-train.arrow").unlink(), "documents-train.arrow is missing"),
        (lambda p: shutil.rmtree(p / "tokenizer"), "lacks its tokenizer/ copy"),
    ],
)
def test_open_refuses_damaged_stores(tmp_path, damage, message):
    write_store(tmp_path / "s", num_train=10)
    damage(tmp_path / "s")
    with pytest.raises(KdpipeError) as err:
        TokenStore.open(tmp_path / "s")
    assert message in str(err.value) and str(tmp_path / "s") in str(err.value)


def test_manifest_records_size_and_crc32c_of_every_data_file(tmp_path):
    write_store(tmp_path / "s", num_train=600)
    files = TokenStore.open(tmp_path / "s").files
    assert files is not None and {"train/tokens/c/0/0", "train/tokens/c/2/0", "documents-train.arrow"} <= files.keys()
    assert not any(name.startswith(("tokenizer/", "manifest")) for name in files)
    for name, recorded in files.items():
        assert recorded["bytes"] == (tmp_path / "s" / name).stat().st_size
    assert verify_token_store(tmp_path / "s").summary() == f"token store {tmp_path / 's'}: {len(files)} files ok (sizes and crc32c checksums)"


def test_flipped_bit_in_a_token_chunk_fails_its_first_read_naming_the_chunk(tmp_path):
    write_store(tmp_path / "s", num_train=600)
    chunk = tmp_path / "s" / "train" / "tokens" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    split = TokenStore.open(tmp_path / "s").split("train")  # same size: opens
    split.tokens(0, 256)  # chunk 0 is whole
    with pytest.raises(KdpipeError, match=r"chunk train/tokens/c/1/0 \(split 'train' sequences 256\.\.511\) fails its checksum.*--overwrite"):
        split.tokens(250, 260)
    with pytest.raises(KdpipeError, match=r"file train/tokens/c/1/0 fails its checksum"):
        verify_token_store(tmp_path / "s")


def test_truncated_or_missing_file_fails_open(tmp_path):
    write_store(tmp_path / "s", num_train=600)
    chunk = tmp_path / "s" / "train" / "tokens" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(KdpipeError, match=r"file train/tokens/c/2/0 holds [\d,]+ bytes, the manifest records [\d,]+ \(truncated"):
        TokenStore.open(tmp_path / "s")
    chunk.unlink()
    with pytest.raises(KdpipeError, match=r"file train/tokens/c/2/0 is missing"):
        TokenStore.open(tmp_path / "s")


def test_store_without_checksums_opens_and_says_so(tmp_path):
    train, _ = write_store(tmp_path / "s", num_train=300)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]
    manifest_path.write_text(json.dumps(manifest))
    store = TokenStore.open(tmp_path / "s")
    assert store.checksum_note is not None and "records no checksums" in store.checksum_note and "\n" not in store.checksum_note
    np.testing.assert_array_equal(store.split("train").tokens(0, 300), train)
    assert verify_token_store(tmp_path / "s").summary() == store.checksum_note
