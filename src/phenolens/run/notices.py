"""One-line warnings on stderr: `warn` for a single message, `Notices` for per-file messages (the
first few of each kind in full, then a count)."""

from __future__ import annotations

import sys
from collections import Counter


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


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
            print(prefix + line, file=sys.stderr)

    def close(self) -> None:
        for kind, n in self.counts.items():
            if n > self.limit:
                print(self.summaries[kind].replace("{n}", str(n)), file=sys.stderr)
