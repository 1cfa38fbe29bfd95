"""User-facing errors. Every message names the file (or field) at fault and what to do about it.

The CLI prints these as one paragraph and exits with status 2; anything else is a bug and keeps its traceback.
"""


class MeteoraInputError(ValueError):
    """Bad input from the user: a path, a checkpoint, an adapter, a config or a data file."""
