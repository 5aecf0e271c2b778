"""The demo tests use the prepare-data tests' tiny tokenizer."""

from tests.unit.pipeline.conftest import tokenizer_dir  # noqa: F401
