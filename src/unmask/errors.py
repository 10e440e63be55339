"""The one exception base that marks a user's mistake rather than a bug.

A wrong config field, a path that cannot be written, a truncated weights file: the message
says everything the user needs, and a traceback into this package would only bury it. Code
raises a :class:`UserError` (or a subclass) for such input; the CLI prints it as one line and
exits with status 2, and keeps tracebacks for everything else (``--debug`` shows them all).
This module imports nothing, so every layer can use it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, path, data, checkpoint, model), never a bug: its
    message names the file or field and is all the CLI shows."""
