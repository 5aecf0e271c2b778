"""Tokenized documents → fixed-length sequences, with document boundaries and placements.

Each split is one token stream: every document contributes `[BOS] text [EOS]` (BOS only
when the tokenizer has one distinct from EOS), and the stream is cut into sequences of
exactly `seq_len` tokens, so documents span sequence boundaries freely and no token is
wasted on padding except at the very end. The output depends only on the order of the
documents, never on how they were batched: batch boundaries carry over as a partial
sequence (`carry`) and the documents whose first token lies in it.

Which split a document goes to is decided by a hash of its text alone, so duplicates land
together and the split is stable whatever else changes in the corpus.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np


def assign_val(texts: Sequence[str], val_fraction: float) -> np.ndarray:
    """`(N,)` bool: True for documents of the validation split (blake2b of the UTF-8 text, uniform in [0, 1))."""
    if val_fraction <= 0.0:
        return np.zeros(len(texts), dtype=bool)
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") for t in texts),
        dtype=np.uint64,
        count=len(texts),
    )
    return keys < np.uint64(int(val_fraction * 2**64))


@dataclass(slots=True)
class PackedSequences:
    """Complete sequences and where documents begin in them."""

    tokens: np.ndarray  # (S, seq_len) int32
    doc_starts: np.ndarray  # (D,) int32 positions within their sequence
    starts_per_sequence: np.ndarray  # (S,) int64, sums to D


@dataclass(slots=True)
class PlacedDocuments:
    """Documents whose placement is final, in stream order."""

    sources: np.ndarray  # (N,) int32 index of the input file
    rows: np.ndarray  # (N,) int64 record index within that file
    num_tokens: np.ndarray  # (N,) int64 tokens in the stream, separators included
    first_sequence: np.ndarray  # (N,) int64, -1 when the first token fell in a dropped tail
    first_position: np.ndarray  # (N,) int32, -1 likewise


class SequencePacker:
    """Packs one split's documents into sequences of `seq_len` tokens."""

    def __init__(self, seq_len: int, eos_id: int, bos_id: int | None = None) -> None:
        assert seq_len >= 2
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.bos_id = bos_id if bos_id != eos_id else None
        self.num_sequences = 0
        self.num_documents = 0
        self.num_padding = 0
        self.num_dropped_tokens = 0
        self._stream_len = 0  # tokens fed so far, separators included
        self._carry = np.zeros(0, dtype=np.int32)  # (< seq_len,) the incomplete last sequence
        # Documents whose first token is in the carry: offsets (global stream positions) and metadata.
        self._pending = {
            "offsets": np.zeros(0, np.int64),
            "sources": np.zeros(0, np.int32),
            "rows": np.zeros(0, np.int64),
            "num_tokens": np.zeros(0, np.int64),
        }

    def add(
        self, flat_ids: np.ndarray, lengths: np.ndarray, sources: np.ndarray, rows: np.ndarray
    ) -> tuple[PackedSequences, PlacedDocuments]:
        """Add documents (their text tokens concatenated in `flat_ids`, `lengths` per document)."""
        num_docs = len(lengths)
        assert int(lengths.sum()) == len(flat_ids) and len(sources) == len(rows) == num_docs
        has_bos = self.bos_id is not None
        doc_tokens = lengths.astype(np.int64) + 1 + int(has_bos)  # (N,)
        local_starts = np.zeros(num_docs, dtype=np.int64)
        np.cumsum(doc_tokens[:-1], out=local_starts[1:])
        body = np.empty(int(doc_tokens.sum()), dtype=np.int32)
        is_text = np.ones(len(body), dtype=bool)
        if has_bos:
            body[local_starts] = self.bos_id
            is_text[local_starts] = False
        ends = local_starts + doc_tokens - 1
        body[ends] = self.eos_id
        is_text[ends] = False
        body[is_text] = flat_ids

        first_offset = self._stream_len
        self._stream_len += len(body)
        self.num_documents += num_docs
        stream = np.concatenate([self._carry, body])
        num_new = len(stream) // self.seq_len
        tokens = stream[: num_new * self.seq_len].reshape(num_new, self.seq_len)
        self._carry = stream[num_new * self.seq_len :].copy()

        for key, value in (
            ("offsets", first_offset + local_starts),
            ("sources", sources.astype(np.int32, copy=False)),
            ("rows", rows.astype(np.int64, copy=False)),
            ("num_tokens", doc_tokens),
        ):
            self._pending[key] = np.concatenate([self._pending[key], value])
        first_new = self.num_sequences
        self.num_sequences += num_new
        num_placed = int(np.searchsorted(self._pending["offsets"], self.num_sequences * self.seq_len))
        return self._emit(tokens, first_new, num_placed, dropped=False)

    def finish(self, tail: Literal["drop", "pad"], pad_id: int) -> tuple[PackedSequences, PlacedDocuments]:
        """Close the split: pad the incomplete last sequence with `pad_id`, or drop it."""
        carry, self._carry = self._carry, np.zeros(0, dtype=np.int32)
        num_pending = len(self._pending["offsets"])
        if tail == "pad" and len(carry):
            self.num_padding = self.seq_len - len(carry)
            tokens = np.concatenate([carry, np.full(self.num_padding, pad_id, dtype=np.int32)])[None, :]
            self.num_sequences += 1
            return self._emit(tokens, self.num_sequences - 1, num_pending, dropped=False)
        self.num_dropped_tokens = len(carry)
        return self._emit(np.zeros((0, self.seq_len), dtype=np.int32), self.num_sequences, num_pending, dropped=True)

    @property
    def num_tokens(self) -> int:
        """Stored tokens that are not padding."""
        return self.num_sequences * self.seq_len - self.num_padding

    def _emit(
        self, tokens: np.ndarray, first_sequence: int, num_placed: int, *, dropped: bool
    ) -> tuple[PackedSequences, PlacedDocuments]:
        """Hand out `tokens` and the first `num_placed` pending documents (which all begin in them, or were dropped)."""
        placed = {key: value[:num_placed] for key, value in self._pending.items()}
        self._pending = {key: value[num_placed:] for key, value in self._pending.items()}
        offsets = placed["offsets"]
        if dropped:
            sequence = np.full(num_placed, -1, dtype=np.int64)
            position = np.full(num_placed, -1, dtype=np.int32)
            packed = PackedSequences(tokens, np.zeros(0, np.int32), np.zeros(0, np.int64))
        else:
            sequence = offsets // self.seq_len
            position = (offsets % self.seq_len).astype(np.int32)
            starts_per_sequence = np.bincount(sequence - first_sequence, minlength=len(tokens)).astype(np.int64)
            assert len(starts_per_sequence) == len(tokens)
            packed = PackedSequences(tokens, position, starts_per_sequence)
        documents = PlacedDocuments(placed["sources"], placed["rows"], placed["num_tokens"], sequence, position)
        return packed, documents
