"""Per-step host values of a captured GPU training step (see ``minibnn.graphs``).

A CUDA graph replays kernels with the arguments they had at capture, so a value the host
computes anew for every step (dropout's key, Adam's alpha_t) cannot be a kernel argument in
a replayed step. While a step is captured, the ops that use such a value register it here
(:func:`recording` returns the recorder): a function computing it for the next step, and a
slot of a device buffer the kernel reads it from. Before each replay the recorder runs the
functions (and the registered side effects, such as the optimizer's ``t += 1``) in the order
the eager step would, and uploads the buffer in one copy. This module is the low-level half
that ``functional`` and ``optim`` use; ``graphs`` holds the capture itself.
"""

from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["MAX_SLOTS", "Recorder", "recording", "recording_into"]

MAX_SLOTS = 4096  # per-step host values one captured step may register

_recorder = [None]


class Recorder:
    """Per-step host values and effects registered while a step is captured, in order."""

    def __init__(self, vals):
        self.vals = vals                   # device uint64 buffer the kernels read
        self.host = np.zeros(MAX_SLOTS, np.uint64)
        self.items = []                    # (slot or None, fn)

    def value(self, fn, now, kind):
        """Register ``fn`` (the value for the next replay) and return its (vals, slot) for a
        kernel; ``now`` is the value of the step being captured. kind: "u64" or "f64"."""
        slot = sum(1 for s, _ in self.items if s is not None)
        if slot >= MAX_SLOTS:
            raise ValueError(f"a captured step may use at most {MAX_SLOTS} per-step values")
        self.items.append((slot, (fn, kind)))
        self._store(slot, now, kind)
        return self.vals, slot

    def effect(self, fn):
        """Register a host side effect to repeat before each replay, in order."""
        self.items.append((None, fn))

    def _store(self, slot, value, kind):
        if kind == "f64":
            self.host.view(np.float64)[slot] = value
        else:
            self.host[slot] = np.uint64(value)

    def refresh(self):
        """Run the registered effects and compute the values for the next replay, in order."""
        for slot, item in self.items:
            if slot is None:
                item()
            else:
                fn, kind = item
                self._store(slot, fn(), kind)

    def upload(self):
        """Copy the values to the device buffer (one copy, queued on the current stream)."""
        self.vals.set(self.host)


def recording():
    """The recorder of the step being captured, or None outside a capture."""
    return _recorder[0]


@contextlib.contextmanager
def recording_into(recorder):
    """Register the per-step values of the code run in this block with ``recorder``."""
    previous = _recorder[0]
    _recorder[0] = recorder
    try:
        yield recorder
    finally:
        _recorder[0] = previous
