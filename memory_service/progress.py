"""Progress bars for the memory's long steps (IVF training, bulk adds, log replay), with memtrain's one rule: drawn
on stderr only when stderr is a terminal and the environment variable CI is not set, and only once a step has run
for two seconds. (The same rule as orchestration.progress, which this package may not import.) A memory inside a
Ray actor writes to a log file, so it draws none."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(*, desc: str, total: int, unit: str) -> tqdm:
    """A bar to ``update(n)`` (use it as a context manager)."""
    # disable=None lets tqdm turn the bar off when stderr is not a terminal
    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, delay=2.0, dynamic_ncols=True, leave=None,
                disable=True if "CI" in os.environ else None)
