"""How kdpipe loads and identifies a tokenizer.

The token store, the teacher cache and the student all record the tokenizer's fingerprint;
stages refuse to combine artefacts whose fingerprints differ. The fingerprint hashes what
decides token ids — the vocabulary and the special-token ids — not file bytes, so an
equivalent tokenizer saved by another library version still matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kdpipe.schemas.errors import KdpipeError


def load_tokenizer(path: Path) -> Any:
    """Load a Hugging Face tokenizer from a local directory (never from a hub)."""
    path = Path(path)
    if not path.is_dir():
        raise KdpipeError(f"tokenizer directory {path} does not exist; pass a local Hugging Face tokenizer or model directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types here; one line is what the user needs
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KdpipeError(
            f"cannot read a tokenizer from {path} ({first}); it needs tokenizer.json or the files of a Hugging Face tokenizer"
        ) from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special-token ids of a loaded tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    blob = json.dumps({"vocab": vocab, "special": special}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
