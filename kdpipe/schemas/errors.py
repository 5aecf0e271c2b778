"""The one exception type for user mistakes.

A `KdpipeError` carries a single line that names the thing that is wrong and what to do
about it. The CLI prints it without a traceback and exits with code 2. Internal
invariants use `assert`; everything a user can cause raises this.
"""


class KdpipeError(ValueError):
    """A user mistake: bad input, mismatched artefacts, a corrupt store."""

    exit_code = 2
