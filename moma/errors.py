"""The one error type the pack raises for bad input: it says what is wrong and what to do."""


class MomaError(Exception):
    """A user-facing error: wrong file, key, shape or setting, with the fix in the message."""
