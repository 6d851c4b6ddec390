"""The one place a line for the user is written: `say(line)`. A line goes to the current sink,
`print` unless a run routes it: `to(sink, main)` for the length of a run sends its lines to `sink`
from the main process only (the other ranks' lines go nowhere), so no function takes a `say`
parameter to be quiet on the other ranks. Tests and the Python API route the lines the same way.
"""

from __future__ import annotations

import contextlib

_sink = [print]


def say(*args, **kwargs) -> None:
    """A line for the user (print's arguments)."""
    _sink[-1](*args, **kwargs)


def _nowhere(*args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def to(sink, main: bool = True):
    """Within the block, lines go to `sink` on the main process and nowhere on the others."""
    _sink.append(sink if main else _nowhere)
    try:
        yield
    finally:
        _sink.pop()
