"""User-facing errors.

A `PhenolensError` is a problem with the user's input (a path, a file, an option). The CLI prints
its message as one line and exits non-zero without a traceback; anything else is a bug.
"""


class PhenolensError(Exception):
    """Bad input: the message names the file or option and says what is wrong."""
