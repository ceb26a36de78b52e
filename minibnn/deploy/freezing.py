"""The freeze math: a trained model's BN + sign as integer thresholds on exact integers.

``freeze`` comes first; the helpers below it follow the order in which it uses them:
the model's blocks, the batch norm's affine, the thresholds (negated rows for negative
slopes), and the float32 matching that makes each threshold agree with the model.
"""

from __future__ import annotations

import numpy as np

from kernels.reference import pack_rows

from .. import backend, nn
from ..tensor import Tensor, no_grad
from .runtime import PIXEL_MAX, PLANES, FrozenBNN, FrozenLayer

__all__ = ["freeze", "PIXEL_SCALE"]

PIXEL_SCALE = 256  # first layer: z = PIXEL_SCALE * (x_f . w), x_f = (2x - 255) / 256
_WINDOW = 3  # integers either side of a float64 threshold checked against the float32 model


def freeze(model, match_float32=True):
    """Freeze a trained binarized MLP for inference with bits, XNOR and popcount only.

    ``model`` is a ``Sequential`` of the form of ``models.mnist_mlp``:
    [Dropout] -> [BinaryLinear -> [BN] -> Sign -> [Dropout]] x L -> BinaryLinear -> [BN]
    (BN = BatchNorm or ShiftBatchNorm; BinaryLinear with or without bias; Dropout is the
    identity at inference and is dropped). Its input must be ``(2x - 255) / 256`` of uint8
    pixels ``x`` (``data.to_pm1``); the frozen net takes the uint8 pixels themselves.

    Every hidden BN + sign becomes ``z >= tau`` on the exact integer ``z`` (weights of
    units with negative BN slope negated), the output BN a float64 affine. With
    ``match_float32`` (default) each threshold is checked against the model's own float32
    batch norm at the neighbouring integers and follows it where rounding moves the
    decision; without it every threshold is the exact float64 one.
    Raises TypeError / ValueError for a model of another shape.
    """
    blocks = _blocks(model)
    layers, adjusted = [], []
    for j, (lin, bn, sign) in enumerate(blocks):
        first = j == 0
        d = PIXEL_SCALE if first else 1  # the model's pre-activation is z / d (+ bias)
        planes = PLANES if first else 1
        k, n = lin.in_features, lin.out_features
        packed = pack_rows(_host(lin.weight) >= 0)  # sign(W), sign(0) = +1: the binary weight
        bias = None if lin.bias is None else _host(lin.bias).astype(np.float32)
        a, c = _bn_affine(bn, n)
        z_max = k * (PIXEL_MAX if first else 1)
        _check_affine(bn, a, c, d, bias, z_max)
        if sign:
            tau, flip, moved = _thresholds(bn, a, c, d, bias, z_max, match_float32)
            layers.append(FrozenLayer(_flip_rows(packed, k, flip), k, planes, threshold=tau))
            adjusted.append(moved)
        else:  # the output layer: scores = a (z / d + b) + c
            b = np.zeros(n) if bias is None else bias.astype(np.float64)
            layers.append(FrozenLayer(packed, k, planes, scale=a / d, offset=a * b + c))
    info = dict(source=getattr(model, "config", None), float32_adjusted=adjusted,
                match_float32=bool(match_float32))
    return FrozenBNN(layers, info)


# ----------------------------------------------------------------------- the model's blocks

def _blocks(model):
    """Split the layers into blocks (BinaryLinear, batch norm or None, has_sign)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected a minibnn.nn.Sequential (e.g. models.mnist_mlp), got "
                        f"{type(model).__name__}")
    layers = _flatten(model)
    blocks, i = [], 0
    while i < len(layers):
        lin = layers[i]
        if not isinstance(lin, nn.BinaryLinear):
            raise ValueError(f"cannot freeze: layer {i} ({type(lin).__name__}) where a "
                             "BinaryLinear was expected; freeze understands [Dropout] -> "
                             "[BinaryLinear -> [BatchNorm|ShiftBatchNorm] -> Sign -> [Dropout]] "
                             "x L -> BinaryLinear -> [BatchNorm|ShiftBatchNorm]")
        i += 1
        bn = None
        if i < len(layers) and isinstance(layers[i], (nn.BatchNorm, nn.ShiftBatchNorm)):
            if type(layers[i]) not in (nn.BatchNorm, nn.ShiftBatchNorm):
                raise ValueError(f"cannot freeze: layer {i} is {type(layers[i]).__name__}, a "
                                 "subclass of a batch norm whose eval formula is unknown")
            bn = layers[i]
            i += 1
        sign = i < len(layers) and isinstance(layers[i], nn.Sign)
        if sign:
            i += 1
        elif i < len(layers):
            raise ValueError(f"cannot freeze: layer {i} ({type(layers[i]).__name__}) follows a "
                             "BinaryLinear [-> batch norm]; only Sign (or the end of the "
                             "network) can follow there")
        blocks.append((lin, bn, sign))
    if not blocks:
        raise ValueError("cannot freeze: the model has no BinaryLinear layer")
    if blocks[-1][2]:
        raise ValueError("cannot freeze: the last layer ends in Sign; freeze expects the last "
                         "BinaryLinear [-> batch norm] to produce class scores")
    for j in range(1, len(blocks)):
        if blocks[j][0].in_features != blocks[j - 1][0].out_features:
            raise ValueError(f"cannot freeze: BinaryLinear {j} takes {blocks[j][0].in_features} "
                             f"inputs but the layer before gives {blocks[j - 1][0].out_features}")
    for j, (lin, bn, _) in enumerate(blocks):
        if bn is not None and bn.num_features != lin.out_features:
            raise ValueError(f"cannot freeze: block {j}'s batch norm has {bn.num_features} "
                             f"features, its BinaryLinear {lin.out_features} outputs")
    return blocks


def _flatten(model):
    """The layers of a (possibly nested) Sequential, Dropout removed (identity in eval)."""
    if isinstance(model, nn.Sequential):
        out = []
        for layer in model.layers:
            out += _flatten(layer)
        return out
    if isinstance(model, nn.Dropout):
        return []
    return [model]


def _host(x):
    return backend.to_numpy(x.data if isinstance(x, Tensor) else x)


# ------------------------------------------------------------------- batch norm as an affine

def _bn_affine(bn, n):
    """Per-unit (a, c) in float64 with eval-mode BN(s) = a s + c (``eval_affine``: the
    float32 values the layer's own forward uses)."""
    if bn is None:
        return np.ones(n), np.zeros(n)
    with no_grad():
        a, c = (_host(t).astype(np.float64) for t in bn.eval_affine())
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c))):
        raise ValueError("cannot freeze: a batch norm has non-finite parameters or statistics")
    return a, c


def _check_affine(bn, a, c, d, bias, z_max):
    """Guard: the folded affine must reproduce the layer's own forward (to float32 rounding)."""
    n = a.shape[0]
    z = np.stack([np.zeros(n), np.full(n, z_max), np.full(n, -z_max)])
    s32 = _pre_activation32(z, d, bias)
    got = _float32_model(bn, s32)
    want = a * s32.astype(np.float64) + c
    tol = 1e-4 * (np.abs(a * s32) + np.abs(c)) + 1e-6
    if not np.all(np.abs(got - want) <= tol):
        raise ValueError("cannot freeze: a batch norm's eval output is not the affine a*s + c "
                         "that freeze derives from its parameters")


# ------------------------------------------------------------------------ integer thresholds

def _thresholds(bn, a, c, d, bias, z_max, match_float32):
    """Integer thresholds and the units whose weights are negated.

    Unit fires iff a (z/d + b) + c >= 0. With t = d (-c/a - b): a > 0 -> z >= ceil(t);
    a < 0 -> z <= floor(t), i.e. -z >= -floor(t) after negating the unit's weights;
    a = 0 -> constant sign(c). Returns (tau int32, flip bool, adjusted count).
    """
    n = a.shape[0]
    b = np.zeros(n) if bias is None else bias.astype(np.float64)
    pos, neg, zero = a > 0, a < 0, a == 0
    big = z_max + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d * (-c / np.where(zero, 1.0, a) - b)
    t = np.clip(t, -big - 1, big + 1)
    edge = np.zeros(n, np.int64)  # pos: first firing z; neg: last firing z
    edge[pos] = np.ceil(t[pos])
    edge[neg] = np.floor(t[neg])
    edge = np.clip(edge, -big, big)
    adjusted = 0
    if match_float32:
        edge, adjusted = _match_float32(bn, edge, pos, neg, d, bias, big)
    tau = np.where(neg, -edge, edge)
    tau[zero] = np.where(c[zero] >= 0, -big, big)
    return tau.astype(np.int32), neg, adjusted


def _flip_rows(packed, k, rows):
    """Negate the +-1 rows ``rows`` of a packed matrix: flip their valid bits, keep padding 0."""
    out = packed.copy()
    if not rows.any():
        return out
    full = np.full(packed.shape[1], np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    if k % 64:
        full[-1] = np.uint64((1 << (k % 64)) - 1)
    out[rows] ^= full
    return out


# ------------------------------------------------------------------ agreement with float32

def _match_float32(bn, edge, pos, neg, d, bias, big):
    """Move each unit's edge (pos: first firing z; neg: last firing z) to where the layer's
    own float32 batch norm switches, looking ``_WINDOW`` integers either side.
    Returns (new edge, number of units moved)."""
    n = edge.shape[0]
    offs = np.arange(-_WINDOW, _WINDOW + 1)
    cand = edge[None, :] + offs[:, None]  # (R, n)
    fire = _float32_model(bn, _pre_activation32(cand, d, bias)) >= 0
    first_true = cand[np.argmax(fire, axis=0), np.arange(n)]
    last_true = cand[len(offs) - 1 - np.argmax(fire[::-1], axis=0), np.arange(n)]
    rise = pos & ~fire[0] & fire[-1]
    fall = neg & fire[0] & ~fire[-1]
    new = edge.copy()
    new[rise] = first_true[rise]
    new[fall] = last_true[fall]
    new = np.clip(new, -big, big)
    return new, int(np.sum(new != edge))


def _pre_activation32(z, d, bias):
    """The float32 value the model feeds its batch norm for integer z: z / d (+ bias)."""
    s = (np.asarray(z, np.float64) / d).astype(np.float32)
    return s if bias is None else (s + bias).astype(np.float32)


def _float32_model(bn, s32):
    """The layer's own eval-mode batch norm applied to float32 pre-activations (R, n)."""
    if bn is None:
        return np.asarray(s32, np.float64)
    xp = backend.get_array_module(bn.running_mean)
    was = bn.training
    bn.training = False
    try:
        with no_grad():
            y = bn(Tensor(xp.asarray(s32)))
    finally:
        bn.training = was
    return backend.to_numpy(y.data).astype(np.float64)
