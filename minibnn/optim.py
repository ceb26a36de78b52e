"""Optimizers (SGD, Adam, AdaMax, shift-based AdaMax) and learning-rate schedules.

Every optimizer scales its step for a parameter by ``Parameter.lr_scale`` and clips the
parameter to ``[-clip, clip]`` after the update when ``Parameter.clip`` is set: that is how
the latent weights of binary layers get Glorot's step scale and stay in [-1, 1].
"""

from __future__ import annotations

import numpy as np

from . import backend
from .binary import ap2


class Optimizer:
    """Base class: holds the parameters, per-parameter state, and the step count ``t``."""

    defaults = {}

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
        """Apply one update to every parameter that has a gradient, then clip.

        Updates run in place through a per-parameter scratch buffer: no array is allocated
        per step, which matters on machines where fresh memory is slow to fault in.
        """
        self.t += 1
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            lr = self.lr * getattr(p, "lr_scale", 1.0)
            p.data -= self._delta(p.grad, state, lr)
            clip = getattr(p, "clip", None)
            if clip is not None:
                xp = backend.get_array_module(p.data)
                xp.clip(p.data, -clip, clip, out=p.data)

    def _delta(self, g, state, lr):
        """The step to subtract, written into a scratch array (``self._buffer(state, ...)``)."""
        raise NotImplementedError

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
        self.t, self.lr = int(sd["t"]), float(sd["lr"])
        xp = backend.get_array_module(self.params[0].data)
        self.state = [{k: xp.array(v, dtype=p.dtype, copy=True) for k, v in s.items()}
                      for p, s in zip(self.params, sd["state"])]


class SGD(Optimizer):
    """v = momentum * v + g;  w -= lr * v."""

    defaults = {"momentum": 0.0}

    def _delta(self, g, state, lr):
        out = self._buffer(state, "_scratch", g)
        if self.hyper["momentum"]:
            v = self._buffer(state, "v", g)
            v *= self.hyper["momentum"]
            v += g
            g = v
        return backend.get_array_module(g).multiply(g, lr, out=out)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2014, arXiv:1412.6980, Algorithm 1), the paper's Theano optimizer."""

    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def _delta(self, g, state, lr):
        b1, b2, eps = self.hyper["beta1"], self.hyper["beta2"], self.hyper["eps"]
        xp = backend.get_array_module(g)
        m, v, tmp = (self._buffer(state, k, g) for k in ("m", "v", "_scratch"))
        m *= b1
        m += xp.multiply(g, 1 - b1, out=tmp)
        v *= b2
        xp.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        v += tmp
        step = lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        xp.sqrt(v, out=tmp)
        tmp += eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step
        return tmp


class AdaMax(Optimizer):
    """AdaMax (Kingma & Ba 2014, Section 7.1): u = max(beta2 * u, |g|);
    w -= lr / (1 - beta1^t) * m / u."""

    defaults = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def _moments(self, g, state):
        """Update m and u in place; return them with the scratch array and array module."""
        b1, b2 = self.hyper["beta1"], self.hyper["beta2"]
        xp = backend.get_array_module(g)
        m, u, tmp = (self._buffer(state, k, g) for k in ("m", "u", "_scratch"))
        m *= b1
        m += xp.multiply(g, 1 - b1, out=tmp)
        u *= b2
        xp.maximum(u, xp.abs(g, out=tmp), out=u)
        return m, u, tmp, xp

    def _delta(self, g, state, lr):
        m, u, tmp, xp = self._moments(g, state)
        xp.add(u, self.hyper["eps"], out=tmp)
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / (1 - self.hyper["beta1"] ** self.t)
        return tmp


class ShiftAdaMax(AdaMax):
    """Shift-based AdaMax (paper Algorithm 4): AdaMax with the step size and the 1/u factor
    rounded to powers of two, so the update needs only shifts:

        w -= AP2(lr / (1 - beta1^t)) * m * AP2(1 / u)

    The paper's defaults are lr = 2^-10, 1 - beta1 = 2^-3, 1 - beta2 = 2^-10.
    """

    defaults = {"beta1": 1 - 2.0 ** -3, "beta2": 1 - 2.0 ** -10, "eps": 1e-8}

    def _delta(self, g, state, lr):
        m, u, tmp, xp = self._moments(g, state)
        step = float(ap2(np.float64(lr / (1 - self.hyper["beta1"] ** self.t))))
        xp.add(u, self.hyper["eps"], out=tmp)
        xp.reciprocal(tmp, out=tmp)
        tmp[...] = ap2(tmp)
        tmp *= m
        tmp *= step
        return tmp


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamax": AdaMax, "shift-adamax": ShiftAdaMax}


class ExponentialDecay:
    """lr(epoch) = lr_start * (lr_end / lr_start) ** (epoch / epochs): the paper's Theano
    recipe, which multiplies the rate by a constant factor after every epoch."""

    def __init__(self, lr_start, lr_end, epochs):
        if lr_start <= 0 or lr_end <= 0 or epochs < 1:
            raise ValueError(f"need lr_start > 0, lr_end > 0, epochs >= 1; got "
                             f"{lr_start}, {lr_end}, {epochs}")
        self.lr_start, self.lr_end, self.epochs = lr_start, lr_end, epochs

    def __call__(self, epoch):
        return self.lr_start * (self.lr_end / self.lr_start) ** (epoch / self.epochs)


class StepHalving:
    """lr(epoch) = lr_start * 0.5 ** (epoch // every): the paper's Torch recipe."""

    def __init__(self, lr_start, every):
        if lr_start <= 0 or every < 1:
            raise ValueError(f"need lr_start > 0 and every >= 1; got {lr_start}, {every}")
        self.lr_start, self.every = lr_start, every

    def __call__(self, epoch):
        return self.lr_start * 0.5 ** (epoch // self.every)
