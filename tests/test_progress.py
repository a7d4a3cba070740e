"""Progress bars redraw freely on a terminal and at most every 30 s into a log."""

from __future__ import annotations

import io

from askexpert.progress import QUIET_INTERVAL_S, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_throttled_only_where_nobody_watches() -> None:
    log, terminal = io.StringIO(), _Terminal()
    quiet = progress(range(5000), file=log, desc="log")
    assert quiet.mininterval == QUIET_INTERVAL_S
    for _ in quiet:
        quiet.set_postfix(loss="1.0", refresh=False)
    quiet.close()
    live = progress(range(3), file=terminal)
    assert live.mininterval < 1.0  # tqdm's own default
    live.close()
    # 5000 steps into a file: the first draw and the last, not one line per step
    assert log.getvalue().count("\r") <= 4 and "5000/5000" in log.getvalue()
