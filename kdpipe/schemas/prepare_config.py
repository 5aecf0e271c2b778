"""Config of `kdpipe prepare-data`: which corpus, which tokenizer, how to pack it.

The fields that decide the store's content (inputs, tokenizer, seq_len, text_field,
val_fraction, tail, skip_bad_rows) enter the store fingerprint; `out`, `overwrite` and
`batch_docs` only steer the run (batching never changes a single stored byte).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdpipe.schemas.config import option, required
from kdpipe.schemas.errors import KdpipeError


@dataclass(kw_only=True, slots=True)
class PrepareDataConfig:
    """Corpus → packed token store."""

    inputs: list[str] = required(
        "Corpus files, directories (searched recursively, in sorted order) or glob patterns: "
        ".txt (each file is one document), .jsonl/.json (one JSON object per line, text in "
        "--text-field), .parquet (text in column --text-field)."
    )
    tokenizer: Path = required("Local Hugging Face tokenizer (or model) directory; use the teacher's.")
    out: Path = required("Directory of the token store to write.")
    seq_len: int = required("Tokens per packed sequence (at least 2).")
    text_field: str = option("text", "JSON field or Parquet column holding the document text.")
    val_fraction: float = option(
        0.0, "Fraction of documents put in the validation split, chosen by a hash of each document's text."
    )
    tail: Literal["drop", "pad"] = option(
        "drop", "What to do with the last, incomplete sequence of a split: drop it or pad it with the pad token."
    )
    skip_bad_rows: bool = option(
        False,
        "Skip (and count) records that are not valid JSON, lack the text field or are not UTF-8, instead of stopping.",
    )
    overwrite: bool = option(False, "Rebuild the store even if one already exists at --out.")
    batch_docs: int = option(1024, "Documents tokenized per batch (memory vs. overhead; never changes the output).")

    def __post_init__(self) -> None:
        if not self.inputs:
            raise KdpipeError("prepare-data needs at least one INPUT (a corpus file, directory or glob)")
        if self.seq_len < 2:
            raise KdpipeError(f"--seq-len must be at least 2 (got {self.seq_len}): a sequence needs an input and a target")
        if not 0.0 <= self.val_fraction < 1.0:
            raise KdpipeError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.batch_docs < 1:
            raise KdpipeError(f"--batch-docs must be at least 1 (got {self.batch_docs})")
        if not self.text_field:
            raise KdpipeError("--text-field must not be empty")
