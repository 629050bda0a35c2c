"""Building a model with parameters on the meta device touches only the thread that asked for it."""

from __future__ import annotations

import threading

from torch import nn

from qlorafit.models.meta import parameters_on_meta


def test_meta_parameters_only_for_the_thread_inside_the_block():
    inside, built, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def loader() -> None:
        with parameters_on_meta():
            inside.set()
            built.wait(10)  # another thread builds a module while this block is open
            seen["loader"] = nn.Linear(4, 4).weight.device.type
        done.set()

    thread = threading.Thread(target=loader)
    thread.start()
    assert inside.wait(10)
    seen["other"] = nn.Linear(4, 4).weight.device.type
    built.set()
    assert done.wait(10)
    thread.join()
    assert seen == {"loader": "meta", "other": "cpu"}
    assert nn.Module.register_parameter.__name__ == "register_parameter"  # the original is back
    assert nn.Linear(2, 2).weight.device.type == "cpu"
