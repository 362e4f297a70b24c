"""Named regions of a training step's code: what the simulated rank (train/simulate.py) files the
storages they allocate under. The ring, its kernel calls, Ulysses' all-to-all, the chunked loss and
the offload's copies to the host each run inside their region; the innermost region open when a
storage appears names it. Outside every region the simulator's scope (forward, a recompute, the
loss's backward) names it.

A region is a thread-local stack push and pop: nothing else happens at run time.
"""

from __future__ import annotations

import enum
import functools
import threading


class Region(enum.Enum):
    RING = "ring buffers"
    KERNEL = "kernel outputs"
    ALL_TO_ALL = "all-to-all copies"
    LOSS = "loss chunk"
    OFFLOAD = "offloaded activations"

    def __str__(self) -> str:
        return self.value


_open = threading.local()


def current() -> Region | None:
    """The innermost region open on this thread, or None."""
    stack = getattr(_open, "stack", None)
    return stack[-1] if stack else None


class region:
    """`with region(Region.RING):` opens a region on this thread until the block ends."""

    __slots__ = ("name",)

    def __init__(self, name: Region):
        self.name = name

    def __enter__(self) -> None:
        stack = getattr(_open, "stack", None)
        if stack is None:
            stack = _open.stack = []
        stack.append(self.name)

    def __exit__(self, *exc) -> None:
        _open.stack.pop()


def within(name: Region):
    """Decorator: the function runs inside region `name`."""

    def wrap(function):
        @functools.wraps(function)
        def inside(*args, **kwargs):
            with region(name):
                return function(*args, **kwargs)

        return inside

    return wrap
