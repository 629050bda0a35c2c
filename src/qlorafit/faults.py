"""Named points where a test can have this process killed: crash safety checked deterministically.

`QLORAFIT_KILL_AT=point:n` (e.g. `checkpoint-write:2`) makes the n-th arrival of this process at
`reached("point")` end it with SIGKILL, as a power cut or the OOM killer would: no handler, no
cleanup. Unset (always, outside tests) `reached` only reads one environment variable.
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "QLORAFIT_KILL_AT"
POINTS = ("step", "checkpoint-write", "final-save")
_arrivals: collections.Counter = collections.Counter()


def reached(point: str) -> None:
    """Mark an arrival at `point`; SIGKILL this process if QLORAFIT_KILL_AT names this arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _arrivals[point] += 1
    if _arrivals[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
