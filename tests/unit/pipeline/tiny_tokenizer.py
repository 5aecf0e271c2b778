"""A tiny byte-level BPE tokenizer trained in memory, saved as a Hugging Face directory.

Byte-level, so any UTF-8 text round-trips exactly through encode → decode, which lets the
tests compare the token store's contents with the corpus text itself.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Packing documents into sequences of tokens.",
    "Distillation trains a small student from a large teacher; the corpus is tokenized once.",
    "def main():\n    return [i * i for i in range(10)]  # numbers, punctuation: 0123456789",
] * 30


def train_tiny_tokenizer(directory: Path, *, with_bos: bool = True) -> Path:
    """Train (~300 tokens, specials "<s>", "</s>", "<pad>") and save into `directory`; returns it.

    `with_bos=False` declares no BOS token, like tokenizers that only end documents with EOS.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    specials = {"eos_token": "</s>", "pad_token": "<pad>"}
    if with_bos:
        specials["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(str(directory))
    return Path(directory)
