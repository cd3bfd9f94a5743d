"""Progress bars for the long steps (tokenizing, BPE training, memory fill, evaluations), on stderr.

One rule for every bar memtrain draws and for the bars of the libraries it drives (``datasets``, ``tokenizers``):
a bar is drawn only when stderr is a terminal and the environment variable ``CI`` is not set. Logs, pipes, Ray
workers (whose stderr is a file) and CI jobs get nothing extra. A bar appears only once its step has run for
``DELAY_S`` seconds, so quick steps stay silent in a terminal too.

Example::

    >>> for doc in progress(["a", "b"], desc="tokenizing", unit="doc"):   # a bar only in a terminal
    ...     pass
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# seconds a step runs before its bar is drawn
DELAY_S = 2.0


def progress_enabled() -> bool:
    """True when bars are drawn: stderr is a terminal and CI is not set."""
    return "CI" not in os.environ and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None,
             unit: str = "it") -> tqdm:
    """A tqdm bar on stderr following the rule above: iterate over it, or (with ``iterable=None``) use it as a
    context manager and call ``update(n)``."""
    # disable=None lets tqdm turn the bar off when stderr is not a terminal; leave=None keeps a finished bar on
    # screen unless it was nested in another
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, delay=DELAY_S, dynamic_ncols=True,
                leave=None, disable=True if "CI" in os.environ else None)
