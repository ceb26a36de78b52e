"""Optimizers (SGD, Adam, AdaMax, shift-based AdaMax) and learning-rate schedules.

Each optimizer's docstring gives the update it implements, formula by formula, and the
source it follows. The code computes the same lines in place (for speed, and so that no
parameter-sized array is allocated per step); each in-place block is preceded by a comment
giving the formula line it computes. ``lr`` in those formulas is the optimizer's rate times
the parameter's ``Parameter.lr_scale``, and after the update a parameter with
``Parameter.clip`` set is clipped to ``[-clip, clip]``: that is how the latent weights of
binary layers get Glorot's step scale and stay in [-1, 1].
"""

from __future__ import annotations

import numpy as np

from . import backend
from .binary import ap2


def _graph_recorder():
    """The CUDA-graph recorder while a training step is being captured, else None."""
    from . import stepvalues
    return stepvalues.recording()


class Optimizer:
    """Base class: holds the parameters, per-parameter state, and the step count ``t``.

    A subclass writes ``_delta(g, state, lr)``, the step to subtract, into the scratch array
    ``state["_scratch"]``. State arrays whose names start with "_" are scratch: they are not
    saved in ``state_dict()``.
    """

    defaults = {}

    def state_keys(self):
        """The names of the moment arrays a step keeps per parameter (what ``state_dict``
        saves once the parameter has had a gradient)."""
        return ()

    def __init__(self, params, lr, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        for i, p in enumerate(self.params):
            if not getattr(p, "requires_grad", False):
                raise TypeError(f"{type(self).__name__}: parameter {i} does not require grad")
        if not lr > 0:  # also rejects nan
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr = float(lr)
        self.hyper = {**self.defaults, **hyper}
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown options {sorted(unknown)}")
        self.t = 0
        self.state = [{} for _ in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        """t = t + 1, then for every parameter w that has a gradient g:

            w = w - delta(g)              (delta: the subclass's update, with lr * lr_scale)
            w = clip(w, -clip, clip)      (when the parameter's clip is set)

        Updates run in place on the moment arrays and one scratch array per parameter, all
        created on the first step: after that no parameter-sized array is allocated per
        step, which matters where fresh memory is slow to fault in.
        """
        self.t += 1
        recorder = _graph_recorder()
        if recorder is not None:  # a CUDA graph replays this step: repeat t += 1 before it
            recorder.effect(self._advance)
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            lr = self.lr * getattr(p, "lr_scale", 1.0)
            if self._fused_step(p, state, lr):  # the same lines in one GPU kernel
                continue
            # w = w - delta
            p.data -= self._delta(p.grad, state, lr)
            clip = getattr(p, "clip", None)
            if clip is not None:
                # w = clip(w, -clip, clip)
                backend.get_array_module(p.data).clip(p.data, -clip, clip, out=p.data)

    def _delta(self, g, state, lr):
        """The step to subtract, written into ``self._buffer(state, "_scratch", g)``."""
        raise NotImplementedError

    def _advance(self):
        self.t += 1

    def _fused_step(self, p, state, lr):
        """Update ``p`` in one fused GPU kernel and return True, or return False to take the
        array code. A subclass with a kernel in ``kernels.cupy_fused`` overrides this; the
        kernel computes the array code's lines in their order, to the same floats."""
        return False

    def _buffer(self, state, name, like):
        """A persistent zero-initialised array of ``like``'s shape and dtype in ``state``."""
        if name not in state:
            state[name] = backend.get_array_module(like).zeros_like(like)
        return state[name]

    def state_dict(self):
        """Step count, learning rate and moment arrays (as NumPy), for checkpoints."""
        return {"t": self.t, "lr": self.lr,
                "state": [{k: backend.to_numpy(v).copy() for k, v in s.items() if not k.startswith("_")}
                          for s in self.state]}

    def load_state_dict(self, sd):
        if len(sd["state"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(sd['state'])} parameters, "
                             f"this optimizer has {len(self.params)}")
        for i, (p, s) in enumerate(zip(self.params, sd["state"])):
            for k, v in s.items():
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}")
            # after a step every parameter has its moments: a state without them would
            # silently restart the optimizer from scratch
            if int(sd["t"]) > 0 and sorted(s) != sorted(self.state_keys()):
                raise ValueError(f"optimizer state of parameter {i} holds {sorted(s)}, "
                                 f"{type(self).__name__} after {int(sd['t'])} steps needs "
                                 f"{sorted(self.state_keys())}")
        self.t, self.lr = int(sd["t"]), float(sd["lr"])
        xp = backend.get_array_module(self.params[0].data)
        self.state = [{k: xp.array(v, dtype=p.dtype, copy=True) for k, v in s.items()}
                      for p, s in zip(self.params, sd["state"])]


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum in the form of
    ``torch.optim.SGD`` (no dampening, no Nesterov):

        v = momentum * v + g      (only when momentum > 0; otherwise v is g)
        w = w - lr * v

    With a constant lr this is Polyak's heavy ball. v accumulates gradients, not steps, so
    after a change of lr it differs from the form v = momentum * v - lr * g; w = w + v.
    """

    defaults = {"momentum": 0.0}

    def state_keys(self):
        return ("v",) if self.hyper["momentum"] else ()

    def _delta(self, g, state, lr):
        xp = backend.get_array_module(g)
        delta = self._buffer(state, "_scratch", g)
        v = g
        if self.hyper["momentum"]:
            v = self._buffer(state, "v", g)
            # v = momentum * v + g
            v *= self.hyper["momentum"]
            v += g
        # delta = lr * v
        return xp.multiply(v, lr, out=delta)


class Adam(Optimizer):
    """Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980) in
    the form of the last paragraph of their Section 2, which folds both bias corrections
    into the step size alpha_t:

        m       = beta1 * m + (1 - beta1) * g
        v       = beta2 * v + (1 - beta2) * g^2
        alpha_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        w       = w - alpha_t * m / (sqrt(v) + eps)

    eps is added to sqrt(v) after the bias correction has moved into alpha_t, so it plays
    the role of that paragraph's eps-hat: this is Algorithm 1 run with eps / sqrt(1 - beta2^t)
    in place of its eps. It is what Lasagne's ``lasagne.updates.adam`` computes, the
    optimizer the BNN paper's Theano code calls. Defaults are Kingma & Ba's.
    """

    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def state_keys(self):
        return ("m", "v")

    def _fused_step(self, p, state, lr):
        if not backend.is_cupy_array(p.data):
            return self._compiled_step(p, state, lr)
        from .kernels import cupy_fused
        if not cupy_fused.enabled() or p.grad.dtype != p.data.dtype:
            return False
        b1, b2, eps = self.hyper["beta1"], self.hyper["beta2"], self.hyper["eps"]
        m, v = (self._buffer(state, k, p.grad) for k in ("m", "v"))
        scale = getattr(p, "lr_scale", 1.0)

        def alpha_t():  # as in _delta, with the rate and step count of the step it serves
            lr = self.lr * scale
            return lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)

        recorder = _graph_recorder()
        slot = None if recorder is None else recorder.value(alpha_t, alpha_t(), "f64")
        cupy_fused.adam_update(p.data, p.grad, m, v, b1, b2, eps, alpha_t(),
                               clip=getattr(p, "clip", None), slot=slot)
        return True

    def _compiled_step(self, p, state, lr):
        """On the numba backend: the lines of ``_delta`` and ``step`` (update, clip) in one
        pass (``kernels.numba_conv.adam_update``, the same floats), for C-contiguous float
        NumPy arrays of one dtype and Python-float hyperparameters (what the array code
        rounds to the arrays' dtype); returns False to take the array code otherwise."""
        from .functional import compiled_glue
        glue = compiled_glue(p.data)
        w, g = p.data, p.grad
        clip = getattr(p, "clip", None)
        if (glue is None or not hasattr(glue, "adam_update") or w.dtype.kind != "f"
                or not isinstance(g, np.ndarray) or g.dtype != w.dtype or g.shape != w.shape
                or not (w.flags.c_contiguous and g.flags.c_contiguous)
                or not all(type(h) is float for h in self.hyper.values())
                or not (clip is None or type(clip) is float)):
            return False
        b1, b2, eps = self.hyper["beta1"], self.hyper["beta2"], self.hyper["eps"]
        m, v = (self._buffer(state, k, g) for k in ("m", "v"))
        if not all(a.dtype == w.dtype and a.shape == w.shape and a.flags.c_contiguous
                   for a in (m, v)):
            return False
        alpha_t = lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)  # as in _delta
        glue.adam_update(w.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), b1, b2,
                         eps, alpha_t, clip)
        return True

    def _delta(self, g, state, lr):
        b1, b2, eps = self.hyper["beta1"], self.hyper["beta2"], self.hyper["eps"]
        xp = backend.get_array_module(g)
        m, v, delta = (self._buffer(state, k, g) for k in ("m", "v", "_scratch"))
        # alpha_t is a NumPy float64: NumPy multiplies a float32 delta by it in float64 and
        # rounds once (through a small casting buffer, not a parameter-sized array).
        alpha_t = lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        # m = beta1 * m + (1 - beta1) * g
        m *= b1
        m += xp.multiply(g, 1 - b1, out=delta)
        # v = beta2 * v + (1 - beta2) * g^2
        v *= b2
        xp.multiply(g, g, out=delta)
        delta *= 1 - b2
        v += delta
        # delta = alpha_t * m / (sqrt(v) + eps)
        xp.sqrt(v, out=delta)
        delta += eps
        xp.divide(m, delta, out=delta)
        delta *= alpha_t
        return delta


class AdaMax(Optimizer):
    """AdaMax (Kingma & Ba, arXiv:1412.6980, Section 7.1, Algorithm 2), Adam with the
    infinity norm in place of the second moment:

        m       = beta1 * m + (1 - beta1) * g
        u       = max(beta2 * u, |g|)
        alpha_t = lr / (1 - beta1^t)
        w       = w - alpha_t * m / (u + eps)

    Algorithm 2 divides by u alone; eps (as in Lasagne's ``adamax``) keeps a coordinate that
    has seen only zero gradients (m = u = 0) from becoming 0/0. Defaults are Kingma & Ba's
    (who suggest lr = 0.002).
    """

    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def state_keys(self):
        return ("m", "u")

    def _moments(self, g, state):
        """Update m and u in place; return them with the scratch array and array module."""
        b1, b2 = self.hyper["beta1"], self.hyper["beta2"]
        xp = backend.get_array_module(g)
        m, u, scratch = (self._buffer(state, k, g) for k in ("m", "u", "_scratch"))
        # m = beta1 * m + (1 - beta1) * g
        m *= b1
        m += xp.multiply(g, 1 - b1, out=scratch)
        # u = max(beta2 * u, |g|)
        u *= b2
        xp.maximum(u, xp.abs(g, out=scratch), out=u)
        return m, u, scratch, xp

    def _delta(self, g, state, lr):
        m, u, delta, xp = self._moments(g, state)
        alpha_t = lr / (1 - self.hyper["beta1"] ** self.t)
        # delta = alpha_t * m / (u + eps)
        xp.add(u, self.hyper["eps"], out=delta)
        xp.divide(m, delta, out=delta)
        delta *= alpha_t
        return delta


class ShiftAdaMax(AdaMax):
    """Shift-based AdaMax (Courbariaux et al., arXiv:1602.02830, Algorithm 4): AdaMax with
    the step size and the 1/u factor each rounded to a power of two, so that applying them
    is a bit shift:

        m       = beta1 * m + (1 - beta1) * g
        u       = max(beta2 * u, |g|)
        alpha_t = AP2(lr / (1 - beta1^t))
        w       = w - alpha_t * m * AP2(1 / (u + eps))

    where AP2(y) = 2^round(log2 y) for y > 0 (the paper's Section 1.4, ``binary.ap2``; round
    is half to even). The paper writes the last line with shift operators applied to the
    bias-corrected step size and to u^-1; eps is AdaMax's guard against u = 0.
    The paper's defaults: 1 - beta1 = 2^-3 and 1 - beta2 = 2^-10 (set here), lr = 2^-10
    (pass it).
    """

    defaults = {"beta1": 1 - 2.0 ** -3, "beta2": 1 - 2.0 ** -10, "eps": 1e-8}

    def _delta(self, g, state, lr):
        m, u, delta, xp = self._moments(g, state)
        alpha_t = float(ap2(np.float64(lr / (1 - self.hyper["beta1"] ** self.t))))
        # delta = AP2(1 / (u + eps))
        xp.add(u, self.hyper["eps"], out=delta)
        xp.reciprocal(delta, out=delta)
        _ap2_positive_inplace(delta)
        # delta = alpha_t * m * delta
        delta *= m
        delta *= alpha_t
        return delta


def _ap2_positive_inplace(y):
    """y = AP2(y) = 2^round(log2 y) in place, for y >= 0: ``binary.ap2`` without its sign
    and its temporaries (same values; rint rounds half to even, as np.round does)."""
    xp = backend.get_array_module(y)
    with np.errstate(divide="ignore"):  # log2(0) = -inf, and AP2(0) = 2^-inf = 0
        xp.log2(y, out=y)
    xp.rint(y, out=y)
    xp.exp2(y, out=y)
    return y


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamax": AdaMax, "shift-adamax": ShiftAdaMax}


class ExponentialDecay:
    """lr(epoch) = lr_start * (lr_end / lr_start) ** (epoch / (epochs - 1)) for epochs
    0 .. epochs - 1: the first epoch runs at ``lr_start``, the last at exactly ``lr_end``,
    and the rate shrinks by a constant factor after every epoch in between. A one-epoch
    schedule runs at ``lr_start``; epochs past the last continue the decay.

    The paper's Theano code multiplies by (lr_end / lr_start) ** (1 / epochs) after each
    epoch, so its last epoch runs one factor above lr_end; here ``lr_end`` is the rate of
    the last epoch, as the command line's ``--lr-end`` says.
    """

    def __init__(self, lr_start, lr_end, epochs):
        if not (0 < lr_start < float("inf") and 0 < lr_end < float("inf")) or epochs < 1:
            raise ValueError(f"need finite lr_start > 0, lr_end > 0, epochs >= 1; got "
                             f"{lr_start}, {lr_end}, {epochs}")
        self.lr_start, self.lr_end, self.epochs = lr_start, lr_end, epochs

    def __call__(self, epoch):
        if self.epochs == 1:
            return self.lr_start * (self.lr_end / self.lr_start) ** epoch
        if epoch == self.epochs - 1:
            return self.lr_end  # exactly, not up to rounding
        return self.lr_start * (self.lr_end / self.lr_start) ** (epoch / (self.epochs - 1))


class StepHalving:
    """lr(epoch) = lr_start * 0.5 ** (epoch // every): the paper's Torch recipe."""

    def __init__(self, lr_start, every):
        if lr_start <= 0 or every < 1:
            raise ValueError(f"need lr_start > 0 and every >= 1; got {lr_start}, {every}")
        self.lr_start, self.every = lr_start, every

    def __call__(self, epoch):
        return self.lr_start * 0.5 ** (epoch // self.every)
