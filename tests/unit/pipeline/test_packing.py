"""Packing documents into fixed-length sequences, against a plain-Python reference."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kdpipe.pipeline.packing import SequencePacker, assign_val

BOS, EOS, PAD = 0, 1, 2


def reference_pack(docs: list[list[int]], seq_len: int, bos: int | None, tail: str) -> dict:
    """Token by token: the stream, its cut into sequences, and where each document begins."""
    stream: list[int] = []
    doc_offsets = []
    for doc in docs:
        doc_offsets.append(len(stream))
        stream += ([bos] if bos is not None else []) + doc + [EOS]
    num_full = len(stream) // seq_len
    rest = len(stream) - num_full * seq_len
    num_sequences = num_full + (1 if tail == "pad" and rest else 0)
    padded = stream + [PAD] * (num_sequences * seq_len - len(stream))
    sequences = [padded[i * seq_len : (i + 1) * seq_len] for i in range(num_sequences)]
    starts: list[list[int]] = [[] for _ in range(num_sequences)]
    placements = []
    for offset in doc_offsets:
        if offset // seq_len < num_sequences:
            starts[offset // seq_len].append(offset % seq_len)
            placements.append((offset // seq_len, offset % seq_len))
        else:
            placements.append((-1, -1))
    return {"sequences": sequences, "starts": starts, "placements": placements, "num_padding": len(padded) - len(stream)}


def run_packer(docs: list[list[int]], seq_len: int, bos: int | None, tail: str, batch_sizes: list[int]) -> dict:
    """Feed `docs` to SequencePacker in batches of the given sizes, collect everything it hands out."""
    packer = SequencePacker(seq_len, EOS, bos)
    tokens, starts, counts, placements, rows = [], [], [], [], []
    index = 0
    for size in batch_sizes + [len(docs)]:
        batch = docs[index : index + size]
        index += len(batch)
        lengths = np.array([len(d) for d in batch], dtype=np.int64)
        flat = np.array([t for d in batch for t in d], dtype=np.int32)
        doc_rows = np.arange(index - len(batch), index, dtype=np.int64)
        outputs = [packer.add(flat, lengths, np.zeros(len(batch), np.int32), doc_rows)]
        if index == len(docs):
            outputs.append(packer.finish(tail, PAD))
        for packed, placed in outputs:
            tokens.append(packed.tokens)
            starts.append(packed.doc_starts)
            counts.append(packed.starts_per_sequence)
            placements += list(zip(placed.first_sequence.tolist(), placed.first_position.tolist()))
            rows += placed.rows.tolist()
        if index == len(docs):
            break
    counts_all = np.concatenate(counts)
    offsets = np.concatenate([[0], np.cumsum(counts_all)])
    starts_all = np.concatenate(starts)
    return {
        "sequences": np.concatenate(tokens).tolist(),
        "starts": [starts_all[offsets[i] : offsets[i + 1]].tolist() for i in range(len(counts_all))],
        "placements": placements,
        "rows": rows,
        "num_padding": packer.num_padding,
        "packer": packer,
    }


def test_small_case_by_hand():
    # stream: <s> 5 6 </s> <s> 7 </s> | seq_len 4 → [0 5 6 1] [0 7 1 (pad|dropped)]
    for tail, expected in (("drop", [[0, 5, 6, 1]]), ("pad", [[0, 5, 6, 1], [0, 7, 1, PAD]])):
        out = run_packer([[5, 6], [7]], 4, BOS, tail, [])
        assert out["sequences"] == expected
        assert out["starts"] == [[0], [0]][: len(expected)]
    dropped = run_packer([[5, 6], [7]], 4, BOS, "drop", [])
    assert dropped["placements"] == [(0, 0), (-1, -1)]
    assert dropped["packer"].num_dropped_tokens == 3
    padded = run_packer([[5, 6], [7]], 4, BOS, "pad", [])
    assert padded["placements"] == [(0, 0), (1, 0)] and padded["num_padding"] == 1


def test_document_spanning_sequences_has_no_start_in_continuation():
    # one long document over three sequences of 4: <s> 10..18 </s> = 11 tokens
    out = run_packer([list(range(10, 19)), [20]], 4, BOS, "pad", [])
    assert out["sequences"][0] == [BOS, 10, 11, 12]
    assert out["starts"][0] == [0] and out["starts"][1] == []
    assert out["sequences"][2] == [17, 18, EOS, BOS]  # second document begins at the last position
    assert out["starts"][2] == [3]
    assert out["placements"] == [(0, 0), (2, 3)]


@pytest.mark.parametrize("bos", [BOS, None])
@pytest.mark.parametrize("tail", ["drop", "pad"])
@pytest.mark.parametrize("seq_len", [2, 5, 16])
def test_matches_reference_for_random_documents(bos, tail, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(3, 300, size=rng.integers(0, 40)).tolist() for _ in range(60)]
    expected = reference_pack(docs, seq_len, bos, tail)
    got = run_packer(docs, seq_len, bos, tail, [7, 1, 13, 0, 20])
    assert got["sequences"] == expected["sequences"]
    assert got["starts"] == expected["starts"]
    assert got["placements"] == expected["placements"]
    assert got["rows"] == list(range(len(docs)))
    assert got["num_padding"] == expected["num_padding"]


def test_output_does_not_depend_on_batching():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 300, size=rng.integers(1, 30)).tolist() for _ in range(50)]
    one = run_packer(docs, 8, BOS, "pad", [])
    many = run_packer(docs, 8, BOS, "pad", [1] * 49)
    assert one["sequences"] == many["sequences"] and one["starts"] == many["starts"]
    assert one["placements"] == many["placements"]


def test_bos_equal_to_eos_is_not_doubled():
    packer = SequencePacker(4, EOS, bos_id=EOS)
    packed, _ = packer.add(np.array([5, 6, 7], np.int32), np.array([3]), np.zeros(1, np.int32), np.zeros(1, np.int64))
    assert packed.tokens.tolist() == [[5, 6, 7, EOS]]


def test_counts():
    docs = [[5] * 10, [6] * 3]
    packer = SequencePacker(4, EOS, BOS)
    packer.add(np.array(sum(docs, []), np.int32), np.array([10, 3]), np.zeros(2, np.int32), np.arange(2))
    packer.finish("pad", PAD)
    stream_len = 12 + 5
    assert packer.num_sequences == 5 and packer.num_padding == 20 - stream_len
    assert packer.num_tokens == stream_len and packer.num_documents == 2


def test_assign_val_is_a_deterministic_hash_of_the_text():
    texts = [f"document number {i}" for i in range(20000)]
    is_val = assign_val(texts, 0.2)
    assert 0.18 < is_val.mean() < 0.22
    assert np.array_equal(is_val, assign_val(list(reversed(texts)), 0.2)[::-1])  # order does not matter
    key = int.from_bytes(hashlib.blake2b(texts[7].encode(), digest_size=8).digest(), "little") / 2**64
    assert bool(is_val[7]) == (key < 0.2)
    assert not assign_val(texts, 0.0).any()
    assert assign_val(["same", "same"], 0.5).tolist() in ([True, True], [False, False])
