"""How phenolens' library messages reach a person: through `logging`, so that a caller controls them.

Library code logs (`logging.getLogger(__name__)`) and never prints. The `phenolens` command installs one
handler on the "phenolens" logger: information to standard output, warnings and errors to standard
error, each as the bare message. A script that imports phenolens sees nothing unless it configures
logging itself (`logging.basicConfig(level=logging.INFO)`).
"""

from __future__ import annotations

import logging
import sys


class _ConsoleHandler(logging.Handler):
    """INFO to the current sys.stdout, WARNING and above to the current sys.stderr (looked up at each
    message, so redirections made after set-up are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # never let a message break a run
            self.handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Install the console handler on the "phenolens" logger (once)."""
    logger = logging.getLogger("phenolens")
    logger.setLevel(level)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
