"""One-line warnings (logged; the command line shows them on stderr): `warn` for a single message, `Notices` for per-file messages (the
first few of each kind in full, then a count)."""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)


def warn(line: str) -> None:
    logger.warning(f"warning: {line}")


class Notices:
    """Per-file messages: the first few of each kind in full, then a count (thousands of identical
    lines would bury the one that matters)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.summaries: dict[str, str] = {}

    def add(self, kind: str, line: str, summary: str, prefix: str = "warning: ") -> None:
        self.counts[kind] += 1
        self.summaries[kind] = prefix + summary
        if self.counts[kind] <= self.limit:
            logger.warning(prefix + line)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > self.limit:
                logger.warning(self.summaries[kind].replace("{n}", str(n)))
