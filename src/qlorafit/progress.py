"""Progress of long steps (loading, tokenizing, evaluating, merging, exporting) on stderr.

Library code marks a long step with `task(description, total, unit)` and calls `update()` as
it goes; nothing is shown unless the caller turned reporting on with `reporting()` (the
command line does, unless `--quiet`). On a terminal each task is a tqdm bar with counts and an
ETA; in a log (stderr not a terminal) a task writes one line each time it passes another
`LOG_STEP` percent, and one when it ends, so logs stay short. The switch is a context
variable: threads and callers that did not ask for progress never see any.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterator

LOG_STEP = 10  # percent between lines in a log

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("qlorafit_progress", default=False)


@contextlib.contextmanager
def reporting(enabled: bool = True) -> Iterator[None]:
    """Show the progress of the tasks run inside the block (on stderr)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether progress is being shown here."""
    return _ENABLED.get()


def on_terminal() -> bool:
    """Whether stderr is a terminal (bars) rather than a log (a line now and then)."""
    return sys.stderr.isatty()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar on a terminal."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class _Lines:
    """One line per LOG_STEP percent (and one at the end) when stderr is a log, not a terminal."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, _plural(unit)
        self.done, self.shown, self.start = 0, 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.total:
            percent = min(100, 100 * self.done // self.total)
            if percent >= self.shown + LOG_STEP and percent < 100:
                self.shown = percent - percent % LOG_STEP
                elapsed = time.perf_counter() - self.start
                eta = elapsed * (self.total - self.done) / max(self.done, 1)
                print(f"{self.description}: {self.done}/{self.total} {self.unit} ({percent}%, "
                      f"{elapsed:.0f} s, about {eta:.0f} s left)", file=sys.stderr, flush=True)

    def close(self) -> None:
        of = f"/{self.total}" if self.total else ""
        print(f"{self.description}: {self.done}{of} {self.unit} in {time.perf_counter() - self.start:.1f} s",
              file=sys.stderr, flush=True)


def display(description: str, total: int | None, unit: str):
    """A bar on a terminal, log lines otherwise: `update(n)` and `close()` (shown even if not reporting)."""
    return _Bar(description, total, unit) if on_terminal() else _Lines(description, total, unit)


@contextlib.contextmanager
def task(description: str, total: int | None = None, unit: str = "item"):
    """A long step of `total` `unit`s: yields an object whose `update(n=1)` counts progress."""
    if not _ENABLED.get():
        yield _Silent()
        return
    shown = display(description, total, unit)
    try:
        yield shown
    finally:
        shown.close()
