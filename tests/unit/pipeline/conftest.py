"""Fixtures for the prepare-data tests: tiny tokenizers saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.pipeline.tiny_tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer with BOS "<s>" (0), EOS "</s>" (1) and pad "<pad>" (2)."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_dir_no_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer with EOS and pad but no BOS."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer-no-bos"), with_bos=False)
