"""Progress bars that stay quiet where nobody watches.

On a terminal a bar redraws as tqdm does. Written to a file or a pipe (a log, CI), every
redraw is another line of output: a demo used to leave 650 kB of them. There a bar
redraws at most every 30 s (and once at its end), so a long stage leaves a few lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

QUIET_INTERVAL_S = 30.0  # seconds between redraws when the output is not a terminal

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm[T]:
    """tqdm, throttled to one redraw per `QUIET_INTERVAL_S` unless its output is a terminal."""
    out = kwargs.get("file") or sys.stderr
    isatty = getattr(out, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", QUIET_INTERVAL_S)
        kwargs.setdefault("maxinterval", QUIET_INTERVAL_S)
    return tqdm(iterable, **kwargs)
