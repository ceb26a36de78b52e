"""The whole training step as one CUDA graph on the cupy backend: capture once, replay per batch.

Why: at the paper's sizes a GPU training step is bound by the host, not the GPU. Every CuPy
call costs 20-35 us of Python and driver time, and the 3x4096 MLP's step makes well over a
hundred of them, while the GPU needs a fraction of that for the arithmetic. A CUDA graph
records the step's kernels once; replaying it is one launch (NVIDIA, "CUDA C++ Programming
Guide", section CUDA Graphs).

What a replay must not miss, and how it is kept:

* **Inputs**: each batch is copied into fixed device arrays that the graph reads.
* **Per-step host values**: dropout's key (one draw per call from the layer's generator) and
  Adam's step size alpha_t (which depends on the step count and the learning rate) would be
  frozen into a graph as kernel arguments. During capture they are registered instead
  (``minibnn.stepvalues``): the kernels read them from a device buffer, and before every replay
  the host computes them in the eager step's order (draws, then t += 1, then each alpha_t)
  and uploads the buffer in one copy. So a replayed step consumes the generator and the step
  count exactly as an eager step does, and computes the same floats.
* **No host synchronisation and no cuBLAS through CuPy** inside the step: the loss's label
  range check is done once per data set (``losses.labels_checked``), the binary layers' NaN
  checks are deferred (``binary.deferred_nan_checks``), and float products go through
  ``kernels.cupy_blas`` (CuPy refuses cuBLAS calls during capture).
* **Memory**: the captured step allocates from a memory pool of its own, which nothing
  outside the graph uses, so no array of the graph is ever handed to other work.

The first ``warmup`` calls of each batch shape run eagerly (they compile kernels, create
optimizer state and settle the XNOR-or-float choice of every product, which is timed); the
next call of that shape is captured, and later ones replay it. A capture that fails leaves
its shape to run eagerly, with the same results, and keeps the reason (``reason``,
``failed``); ``train.train`` logs it. What a graph cannot hold is refused up front with the
reason (:func:`unsupported`): stochastic binarization (host random numbers per weight), an
optimizer without a fused GPU update (only Adam has one), synchronised batch norm, the fused
kernels switched off, or the direct cuBLAS path unavailable.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .stepvalues import MAX_SLOTS, Recorder, recording  # noqa: F401  (recording: re-exported)

__all__ = ["GraphedStep", "unsupported", "recording"]


def unsupported(model, opt):
    """Why ``model`` trained by ``opt`` cannot be captured as a CUDA graph here, or None."""
    from .kernels import cupy_fused
    from .optim import Adam
    if backend.active() != "cupy":
        return f"CUDA graphs need the cupy backend (active: {backend.active()})"
    if type(opt) is not Adam:
        return f"{type(opt).__name__} has no fused GPU update (only Adam has)"
    if not cupy_fused.enabled():
        return "the fused GPU kernels are switched off (MINIBNN_CUPY_FUSED=0)"
    if not backend._direct_blas[0]:
        return "direct cuBLAS is switched off (MINIBNN_CUPY_BLAS=0)"
    from .kernels import cupy_blas
    why = cupy_blas.available()
    if why is not None:
        return why
    for m in model.modules():
        if getattr(m, "stochastic", False):
            return "stochastic binarization draws host random numbers for every weight"
        if getattr(m, "sync", None) is not None:
            return "synchronised batch norm exchanges statistics between ranks"
    return None


class GraphedStep:
    """``train.train_step(model, opt, loss_fn, x, y)`` replayed as one CUDA graph.

    ``step(x, y)`` returns (loss, scores) as ``train_step`` does; after capture these are
    the same Tensors every call, overwritten by each replay (read them before the next
    call, as the stream order guarantees for any GPU work queued in between). Raises
    ValueError with the reason when the step cannot be captured (:func:`unsupported`).
    ``graphed`` tells whether the last call ran a graph; ``reason`` says why the last failed
    capture failed.
    """

    def __init__(self, model, opt, loss_fn, warmup=1):
        why = unsupported(model, opt)
        if why is not None:
            raise ValueError(f"cannot capture the training step as a CUDA graph: {why}")
        self.model, self.opt, self.loss_fn, self.warmup = model, opt, loss_fn, int(warmup)
        self.stream = backend.capture_stream()
        self.graphs = {}  # (x shape, dtype, y shape, dtype) -> _Captured
        self.calls = {}   # batch shape -> eager calls so far (each shape warms up first)
        self.failed = {}  # batch shape -> why its capture failed (it then runs eagerly)
        self.eager_calls = 0
        self.graphed = False
        self.reason = None     # the last capture failure, if any
        self.reported = False  # whether a caller has logged ``reason``

    def _eager(self, x, y):
        from . import binary, losses, train
        self.graphed = False
        with binary.deferring_nan_checks():
            if self.eager_calls == 0:  # the loss checks the labels of the first batch
                out = train.train_step(self.model, self.opt, self.loss_fn, x, y)
            else:
                with losses.labels_checked():
                    out = train.train_step(self.model, self.opt, self.loss_fn, x, y)
        self.eager_calls += 1
        return out

    def __call__(self, x, y):
        key = (tuple(x.shape), x.dtype.str, tuple(y.shape), y.dtype.str)
        captured = self.graphs.get(key)
        if captured is None:
            # a new shape runs eagerly first: that settles its XNOR-or-float choices (timed,
            # which a capture could not do) and compiles its kernels
            if key in self.failed or self.calls.get(key, 0) < self.warmup:
                self.calls[key] = self.calls.get(key, 0) + 1
                return self._eager(x, y)
            return self._capture(x, y, key)
        with self.stream:
            captured.x[...] = x
            captured.y[...] = y
            captured.recorder.refresh()
            captured.recorder.upload()
            captured.graph.launch(self.stream)
        self.graphed = True
        return captured.out

    def _host_state(self):
        rngs = {id(m.rng): m.rng for m in self.model.modules() if hasattr(m, "rng")}
        return self.opt.t, {k: r.bit_generator.state for k, r in rngs.items()}, rngs

    def _capture(self, x, y, key):
        from . import binary, losses, stepvalues, train
        t, states, rngs = self._host_state()
        with self.stream:
            xs, ys = x.copy(), y.copy()
            recorder = Recorder(backend.xp().zeros(MAX_SLOTS, dtype=np.uint64))

        def step():
            with binary.deferring_nan_checks(), losses.labels_checked():
                return train.train_step(self.model, self.opt, self.loss_fn, xs, ys)

        with stepvalues.recording_into(recorder):
            graph, pool, out, error = backend.capture_graph(self.stream, step)
        if error is not None:  # nothing ran on the GPU: undo the host side, run eagerly
            self.opt.t = t
            for k, state in states.items():
                rngs[k].bit_generator.state = state
            self.reason = self.failed[key] = f"{type(error).__name__}: {error}"
            self.reported = False
            return self._eager(x, y)
        self.graphs[key] = _Captured(graph, pool, recorder, xs, ys, out)
        with self.stream:
            recorder.upload()  # the values of this step, registered during capture
            graph.launch(self.stream)
        self.graphed = True
        return out


class _Captured:
    """One captured step: its graph, memory pool, per-step values and fixed arrays."""

    def __init__(self, graph, pool, recorder, x, y, out):
        self.graph, self.pool, self.recorder = graph, pool, recorder
        self.x, self.y, self.out = x, y, out
