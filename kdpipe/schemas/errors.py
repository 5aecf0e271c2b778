"""The one exception type for user mistakes.

A `KdpipeError` carries a single line that names the thing that is wrong and what to do
about it. The CLI prints it without a traceback and exits with code 2. Internal
invariants use `assert`; everything a user can cause raises this.
"""

import json
from typing import Any


class KdpipeError(ValueError):
    """A user mistake: bad input, mismatched artefacts, a corrupt store."""

    exit_code = 2


def describe_json_error(err: json.JSONDecodeError) -> str:
    """What is wrong with a JSON file, in words: where it breaks, or that it ends early (a cut-off write)."""
    text = err.doc.rstrip()
    if not text:
        return "it is empty"
    if err.pos >= len(text) or text[-1] not in "}]\"0123456789el":  # not the end of any JSON value: cut off
        return f"it ends early, at line {text.count(chr(10)) + 1}: truncated"
    msg = err.msg.removesuffix(" starting at")
    return f"{msg} at line {err.lineno}, column {err.colno}"


def parse_json(text: str, where: object, remedy: str) -> Any:
    """`json.loads(text)`, or a one-line `KdpipeError`: "`where` is not valid JSON (what is wrong); `remedy`"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise KdpipeError(f"{where} is not valid JSON ({describe_json_error(err)}); {remedy}") from None
