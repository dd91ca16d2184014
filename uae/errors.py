"""User-facing errors: each message names what is wrong and how to fix it."""


class UAEError(Exception):
    """An error caused by the user's input or files. Scripts print its message without a
    traceback and exit non-zero; anything else is a bug and keeps its traceback."""
