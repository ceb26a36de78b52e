"""Layers: Module, Parameter, and the pieces of the paper's networks.

A ``Module`` finds its parameters and sub-modules by looking at its attributes, so a
layer is written as plainly as ``self.weight = Parameter(...)``. Binary layers keep a
real-valued latent weight, binarize it in every forward pass, and carry the learning-rate
scale and clipping bound that the optimizers honour.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import backend
from . import functional as F
from .binary import ap2, ap2_ste, binarize, binary_conv2d, binary_linear, sign_ste
from .rng import get_rng
from .tensor import Tensor


class Parameter(Tensor):
    """A trainable tensor. ``lr_scale`` multiplies the optimizer's step for it; after
    every update the optimizer clips it to ``[-clip, clip]`` when ``clip`` is set."""

    def __init__(self, data, lr_scale=1.0, clip=None):
        super().__init__(data, requires_grad=True)
        self.lr_scale = float(lr_scale)
        self.clip = None if clip is None else float(clip)


class Module:
    """Base class: parameters, buffers, train/eval mode and state dicts, found by attribute."""

    def __init__(self):
        self.training = True
        self._buffers = []

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def register_buffer(self, name, array):
        """A non-trainable array (e.g. BN running statistics) kept in ``state_dict``."""
        setattr(self, name, array)
        if name not in self._buffers:
            self._buffers.append(name)

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def modules(self):
        """This module and every module below it, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name in self._buffers:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def state_dict(self):
        """Name -> NumPy copy of every parameter and buffer."""
        state = OrderedDict((n, backend.to_numpy(p.data).copy()) for n, p in self.named_parameters())
        state.update((n, backend.to_numpy(b).copy()) for n, b in self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays from ``state`` into this module; keys and shapes must match exactly."""
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        expected = set(params) | set(buffers)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        for name in expected:
            current = params[name].data if name in params else buffers[name]
            value = np.asarray(state[name]) if not backend.is_cupy_array(state[name]) else state[name]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"state dict entry {name!r} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(current.shape)}")
        for name in expected:
            current = params[name].data if name in params else buffers[name]
            xp = backend.get_array_module(current)
            current[...] = xp.asarray(state[name], dtype=current.dtype)

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        body = "".join(f"\n  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in children)
        return head + body + "\n)"


def _check_features(x, n, layer):
    if x.ndim < 2 or x.shape[-1] != n:
        raise ValueError(f"{layer}: input of shape {tuple(x.shape)} does not fit; expected "
                         f"(batch, {n})")


class Linear(Module):
    """Real-valued y = x W^T + b, Glorot-uniform initialised; W has shape (out, in)."""

    def __init__(self, in_features, out_features, bias=True, rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        limit = math.sqrt(6.0 / (in_features + out_features))
        w = get_rng(rng).uniform(-limit, limit, (out_features, in_features)).astype(np.float32)
        self.weight = Parameter(backend.asarray(w))
        self.bias = Parameter(backend.xp().zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        _check_features(x, self.in_features, type(self).__name__)
        out = F.linear(x, self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class _BinaryLayer(Module):
    """What the binary layers share: a latent weight U(-1, 1) clipped to [-1, 1], its
    Glorot learning-rate scale 1 / sqrt(1.5 / (fan_in + fan_out)) (the paper's Theano code,
    ``binary_net.py``), binarization in every forward pass (stochastic in training only),
    and the ``binary_input`` flag that picks the float or the XNOR product."""

    def __init__(self, weight_shape, fan_in, fan_out, stochastic, binary_input, rng):
        super().__init__()
        if not (isinstance(binary_input, bool) or binary_input == "eval"):
            raise ValueError(f"{type(self).__name__}: binary_input must be False, True or "
                             f"'eval', got {binary_input!r}")
        self.stochastic = bool(stochastic)
        self.binary_input = binary_input
        self.rng = get_rng(rng)
        w = self.rng.uniform(-1.0, 1.0, weight_shape).astype(np.float32)
        scale = 1.0 / math.sqrt(1.5 / (fan_in + fan_out))
        self.weight = Parameter(backend.asarray(w), lr_scale=scale, clip=1.0)

    def binary_weight(self):
        """The +-1 weight this forward pass uses (a Tensor on the tape)."""
        return binarize(self.weight, stochastic=self.stochastic and self.training, rng=self.rng)

    def uses_xnor(self):
        """True when this forward pass runs on the XNOR-popcount kernel."""
        return self.binary_input is True or (self.binary_input == "eval" and not self.training)


class BinaryLinear(_BinaryLayer):
    """y = x W_b^T with W_b = binarize(W): the paper's binary fully connected layer.

    The latent weight W (shape (out, in)) starts U(-1, 1), is clipped to [-1, 1] after each
    update, and its step is scaled by Glorot's factor 1 / sqrt(1.5 / (fan_in + fan_out))
    (the paper's Theano code, ``binary_net.py``). Stochastic binarization applies in training
    only; evaluation always uses sign(W).

    ``binary_input`` says what the layer receives, as the model recipe knows it:

    * ``False``: real values (the first layer, on pixels): a float product;
    * ``True``: +-1 values (a Sign right before it): the active backend's XNOR-popcount
      kernel, in training and in eval;
    * ``"eval"``: +-1 in eval mode only (a Dropout sits between the Sign and this layer, and
      scales its input in training): float product in training, XNOR kernel in eval.

    Both products give the same numbers on +-1 input; the flag only picks the faster one.
    Nothing checks the values: a layer marked binary treats any x >= 0 as +1.
    """

    def __init__(self, in_features, out_features, bias=False, stochastic=False,
                 binary_input=False, rng=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        super().__init__((out_features, in_features), in_features, out_features,
                         stochastic, binary_input, rng)
        self.bias = Parameter(backend.xp().zeros(out_features, np.float32)) if bias else None

    def forward(self, x):
        _check_features(x, self.in_features, type(self).__name__)
        wb = self.binary_weight()
        if self.uses_xnor():
            lead = x.shape[:-1]
            out = binary_linear(x if x.ndim == 2 else x.reshape(-1, self.in_features), wb)
            out = out if x.ndim == 2 else out.reshape(*lead, self.out_features)
        else:
            out = F.linear(x, wb)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"stochastic={self.stochastic}, binary_input={self.binary_input!r}")


def _kernel_pair(kernel_size, layer):
    """kernel_size as (kh, kw): an integer >= 1 or a pair of them."""
    pair = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
    if len(pair) != 2 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                             for k in pair):
        raise ValueError(f"{layer}: kernel_size must be an integer >= 1 or a pair of them, "
                         f"got {kernel_size!r}")
    return int(pair[0]), int(pair[1])


def _conv_args(layer, in_channels, out_channels, kernel_size, stride, padding):
    """Validated (in_channels, out_channels, (kh, kw), stride, padding) of a conv layer."""
    kh, kw = _kernel_pair(kernel_size, layer)
    return (F._check_int(in_channels, "in_channels", layer, 1),
            F._check_int(out_channels, "out_channels", layer, 1), (kh, kw),
            F._check_int(stride, "stride", layer, 1), F._check_int(padding, "padding", layer, 0))


class _ConvMixin:
    """Shape checks and repr shared by Conv2d and BinaryConv2d."""

    def _check_input(self, x):
        F.conv_output_shape(x.shape, self.weight.shape, self.stride, self.padding,
                            op=type(self).__name__)

    def _add_bias(self, out):
        return out + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else out

    def extra_repr(self):
        k = self.kernel_size[0] if self.kernel_size[0] == self.kernel_size[1] else self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={k}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class Conv2d(_ConvMixin, Module):
    """Real-valued 2-D convolution, NCHW: x (N, C_in, H, W) -> (N, C_out, Ho, Wo), zero
    padding, Ho = (H + 2*padding - k) // stride + 1; weight (C_out, C_in, kh, kw),
    Glorot-uniform with fan_in = C_in*kh*kw and fan_out = C_out*kh*kw; bias per channel."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None):
        super().__init__()
        (self.in_channels, self.out_channels, self.kernel_size, self.stride,
         self.padding) = _conv_args(type(self).__name__, in_channels, out_channels,
                                    kernel_size, stride, padding)
        kh, kw = self.kernel_size
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = get_rng(rng).uniform(-limit, limit, (self.out_channels, self.in_channels, kh, kw))
        self.weight = Parameter(backend.asarray(w.astype(np.float32)))
        self.bias = Parameter(backend.xp().zeros(self.out_channels, np.float32)) if bias else None

    def forward(self, x):
        self._check_input(x)
        return self._add_bias(F.conv2d(x, self.weight, self.stride, self.padding))


class BinaryConv2d(_ConvMixin, _BinaryLayer):
    """2-D convolution with W_b = binarize(W), NCHW: the paper's binary convolution layer.

    The latent weight W (C_out, C_in, kh, kw) starts U(-1, 1), is clipped to [-1, 1] after
    each update, and its step is scaled by 1 / sqrt(1.5 / (fan_in + fan_out)) with
    fan_in = kh*kw*C_in and fan_out = kh*kw*C_out (the authors' code). Zero padding.
    ``binary_input`` as in ``BinaryLinear``: False, a float convolution; True, the XNOR
    convolution (``binary.binary_conv2d``) in training and eval; "eval", XNOR in eval only.
    Both give the same numbers on +-1 input; a layer marked binary treats x >= 0 as +1.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False,
                 stochastic=False, binary_input=False, rng=None):
        (self.in_channels, self.out_channels, self.kernel_size, self.stride,
         self.padding) = _conv_args(type(self).__name__, in_channels, out_channels,
                                    kernel_size, stride, padding)
        kh, kw = self.kernel_size
        super().__init__((self.out_channels, self.in_channels, kh, kw),
                         kh * kw * self.in_channels, kh * kw * self.out_channels,
                         stochastic, binary_input, rng)
        self.bias = Parameter(backend.xp().zeros(self.out_channels, np.float32)) if bias else None

    def forward(self, x):
        self._check_input(x)
        wb = self.binary_weight()
        conv = binary_conv2d if self.uses_xnor() else F.conv2d
        return self._add_bias(conv(x, wb, self.stride, self.padding))

    def extra_repr(self):
        return (super().extra_repr() + f", stochastic={self.stochastic}, "
                f"binary_input={self.binary_input!r}")


class MaxPool2d(Module):
    """Max over kernel_size x kernel_size windows, stride kernel_size by default, no padding,
    floor mode. A window's gradient goes to its first maximal element (row-major)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        for name, value in (("kernel_size", kernel_size), ("stride", stride)):
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"MaxPool2d: {name} must be an integer >= 1, got {value!r}")
        self.kernel_size = int(kernel_size)
        self.stride = self.kernel_size if stride is None else int(stride)

    def forward(self, x):
        F.pool_output_shape(x.shape, self.kernel_size, self.stride, op=type(self).__name__)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class _BatchNormBase(Module):
    def __init__(self, num_features, momentum=0.1, eps=1e-4):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_features, self.momentum, self.eps = int(num_features), float(momentum), float(eps)
        xp = backend.xp()
        self.gamma = Parameter(xp.ones(num_features, np.float32))
        self.beta = Parameter(xp.zeros(num_features, np.float32))
        self.register_buffer("running_mean", xp.zeros(num_features, np.float32))
        self.register_buffer("running_var", xp.ones(num_features, np.float32))
        # synchronised batch norm: None, or a function that adds a float64 array over the
        # data-parallel ranks in place (set by minibnn.distributed.DataParallel); then the
        # training statistics, and their gradients, are those of the batch over all ranks
        self.sync = None

    def _synced_moments(self, x, axes):
        """(mean, biased variance, count) per channel of the batch over every rank: one
        message of this rank's float64 sums of x and x^2 and its count. The float64 sums
        keep E[x^2] - E[x]^2 free of float32 cancellation."""
        xp = backend.get_array_module(x)
        x64 = x.astype(np.float64)
        local = xp.concatenate([x64.sum(axis=axes), (x64 * x64).sum(axis=axes),
                                xp.asarray([x.size // self.num_features], np.float64)])
        total = self.sync(local)
        count = float(total[-1])
        mean = total[:self.num_features] / count
        var = xp.maximum(total[self.num_features:-1] / count - mean * mean, 0.0)
        return mean.astype(x.dtype), var.astype(x.dtype), count

    def _axes(self, x):
        if x.ndim not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} does not fit;"
                             f" expected (batch, {self.num_features}) or "
                             f"(batch, {self.num_features}, height, width)")
        return (0,) if x.ndim == 2 else (0, 2, 3)

    def _shape(self, x):
        return (1, -1) if x.ndim == 2 else (1, -1, 1, 1)

    def _train_axes(self, x):
        """``_axes``, refusing a batch whose statistics rest on one value per feature: its
        variance is 0, so training would normalise every output to beta (zeros). With
        synchronised statistics (``sync``) a rank's shard may hold one image: the batch
        whose statistics count is that of every rank together."""
        axes = self._axes(x)
        if self.sync is not None:
            return axes
        n = int(np.prod([x.shape[a] for a in axes]))
        if n < 2:
            raise ValueError(f"{type(self).__name__} in training mode got a batch of "
                             f"{x.shape[0]} (input shape {tuple(x.shape)}): a batch of one has "
                             "no batch variance; train with batches of 2 or more, or call "
                             ".eval() to use the running statistics")
        return axes

    def _update_running(self, mean, var):
        m = self.momentum
        if backend.is_cupy_array(self.running_mean):
            from .kernels import cupy_fused
            if cupy_fused.enabled():  # the two lines below, one launch each
                cupy_fused.ema_update(self.running_mean, mean, m)
                cupy_fused.ema_update(self.running_var, var, m)
                return
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean.astype(np.float32)
        self.running_var[...] = (1 - m) * self.running_var + m * var.astype(np.float32)

    def _inv_std(self):
        """1 / sqrt(running_var + eps) as a raw array (no gradient flows to the statistics)."""
        xp = backend.get_array_module(self.running_var)
        return 1.0 / xp.sqrt(self.running_var + self.eps)

    def eval_affine(self):
        """(a, c) with ``BN(x) = a * x + c`` per channel in eval mode, as Tensors."""
        raise NotImplementedError

    def _eval_forward(self, x):
        self._axes(x)  # validates the shape
        a, c = self.eval_affine()
        shape = self._shape(x)
        return x * a.reshape(shape) + c.reshape(shape)

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


class BatchNorm(_BatchNormBase):
    """Batch normalisation (Ioffe & Szegedy 2015): batch statistics in training, running
    statistics in eval; momentum 0.1 and eps 1e-4 as in the paper's Theano code.

    running = (1 - momentum) * running + momentum * batch (biased batch variance).
    """

    def forward(self, x):
        if self.training:
            axes = self._train_axes(x)
            if self.sync is None:  # the batch's mean and var, computed with the forward
                stats = []
                out = F.BatchNormTrain.apply(x, self.gamma, self.beta, mean=None, var=None,
                                             eps=self.eps, axes=axes, stats=stats)
                self._update_running(*stats[0])
                return out
            mean, var, count = self._synced_moments(x.data, axes)
            self._update_running(mean, var)
            return F.BatchNormTrain.apply(x, self.gamma, self.beta, mean=mean, var=var,
                                          eps=self.eps, axes=axes, sync=self.sync, count=count)
        return self._eval_forward(x)

    def eval_affine(self):
        """The eval-mode layer as one affine per channel, ``BN(x) = a * x + c``:

            a = gamma / sqrt(running_var + eps),   c = beta - a * running_mean

        Returned as Tensors (gamma and beta stay on the tape). This is the one place the fold
        is written: the eval forward applies it, and ``deploy.freeze`` turns it into integer
        thresholds."""
        a = self.gamma * self._inv_std()
        return a, self.beta - a * self.running_mean


class ShiftBatchNorm(_BatchNormBase):
    """Shift-based batch normalisation (paper Algorithm 3): every multiplication is by an
    AP2 value, i.e. a bit shift. With C = x - mean(x):

        var  = mean(C * AP2(C))
        xhat = C * AP2(1 / sqrt(var + eps))
        y    = AP2(gamma) * xhat + beta

    AP2 passes gradients straight through. Eval uses the running mean and running var.
    """

    def forward(self, x):
        if not self.training:
            return self._eval_forward(x)
        axes = self._train_axes(x)
        shape = self._shape(x)
        gamma = ap2_ste(self.gamma).reshape(shape)
        if self.sync is None:
            mean = F.mean(x, axis=axes, keepdims=True)
            centred = x - mean
            var = F.mean(centred * ap2_ste(centred), axis=axes, keepdims=True)
            self._update_running(x.data.mean(axis=axes), var.data.reshape(-1))
        else:  # both means over the batch of every rank (synchronised batch norm)
            mean = F.sync_mean(x, axes, self.sync)
            centred = x - mean
            var = F.sync_mean(centred * ap2_ste(centred), axes, self.sync)
            self._update_running(mean.data.reshape(-1), var.data.reshape(-1))
        inv = ap2_ste((var + self.eps) ** -0.5)
        return centred * inv * gamma + self.beta.reshape(shape)

    def eval_affine(self):
        """``BN(x) = a * x + c`` in eval mode, every factor a power of two:

            a = AP2(gamma) * AP2(1 / sqrt(running_var + eps)),   c = beta - a * running_mean
        """
        a = ap2_ste(self.gamma) * ap2(self._inv_std())
        return a, self.beta - a * self.running_mean


class _Require4D:
    """Mixin for the 2-D batch norms: the input must be (batch, C, height, width)."""

    def _axes(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input of shape {tuple(x.shape)} does not "
                             f"fit; expected (batch, {self.num_features}, height, width)")
        return (0, 2, 3)


class BatchNorm2d(_Require4D, BatchNorm):
    """``BatchNorm`` over the channels of NCHW input: statistics per channel over the batch
    and every position (axes 0, 2, 3). Anything but 4-D input is refused."""


class ShiftBatchNorm2d(_Require4D, ShiftBatchNorm):
    """``ShiftBatchNorm`` over the channels of NCHW input (statistics over axes 0, 2, 3).
    Anything but 4-D input is refused."""


class Sign(Module):
    """The BNN activation: sign(x) forward (sign(0) = +1), g * 1{|x| <= 1} backward."""

    def forward(self, x):
        return sign_ste(x)


class HardTanh(Module):
    """Htanh(x) = clip(x, -1, 1)."""

    def forward(self, x):
        return F.hardtanh(x)


class Dropout(Module):
    """Inverted dropout with drop probability ``p``; identity in eval mode."""

    def __init__(self, p=0.5, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = get_rng(rng)
        # None, or (start, total): the input is rows start:start+len of a batch of total rows
        # (set per step by minibnn.distributed.DataParallel; see functional.Dropout)
        self.rows = None

    def forward(self, x):
        return F.dropout(x, self.p, self.rng, training=self.training, rows=self.rows)

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    """(batch, ...) -> (batch, prod(...)); (N, C, H, W) becomes (N, C*H*W) in C, H, W order."""

    def forward(self, x):
        return F.reshape(x, (x.shape[0], -1))


class Sequential(Module):
    """Applies its layers in order."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} is a {type(layer).__name__}, not a Module")
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)
