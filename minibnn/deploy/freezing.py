"""The freeze math: a trained model's BN + sign as integer thresholds on exact integers.

``freeze`` comes first; the helpers below it follow the order in which it uses them:
the model's blocks, the layers (dense and convolutional), the batch norm's affine, the
thresholds (negated filters for negative slopes), and the float32 matching that makes
each threshold agree with the model.

A ConvNet block is ``BinaryConv2d -> [MaxPool2d] -> [BN] -> Sign`` (the paper's order
conv -> pool -> BN -> sign). Its integer pre-activation is exact:

* **Hidden convolutions.** ``z = xnor(patches with +1 padding, w) - corr``, ``corr[o, ho,
  wo]`` the sum of ``w_b[o, tap]`` over the taps in the padding
  (``binary.padding_correction``): exactly the model's zero-padded convolution of +-1
  values.
* **The first convolution, on uint8 pixels.** The model sees ``x_f = (2x - 255) / 256``
  (``data.to_pm1``). With bit planes, ``sum_n 2^n (y^n . w) = (2x - 255) . w = 256 (x_f .
  w)`` on interior taps. A padded tap must add 0, as the model's zero padding: the pixels
  are padded with 255 (every plane bit 1, adding +255 w per padded tap) and ``255 corr``
  is subtracted, so ``z = 256 * (float conv of x_f)``, an exact integer (|z| <= 255 K).
* **Pool, then BN and sign.** The unit is ``sign(BN(max_window z / d + b))`` (d = 256 for
  the first layer, 1 after; b the conv's bias if any). BN is monotone in z (also in
  float32, rounding is monotone): with slope a > 0 it fires iff ``max z >= tau`` iff the
  OR over the window of ``z >= tau``; with a < 0 iff ``max z <= t`` iff the AND over the
  window of ``z <= t`` = AND of ``-z >= -t``. The filter of such a channel is negated (its
  valid bits flipped) so every test reads ``z' >= tau``, and its bits are pooled with AND
  instead of OR. a = 0 is a constant channel. Max-pool ties do not matter: the forward
  path uses the maximum's value, not its index. The thresholds come from the same code as
  the dense layers' (``_thresholds``, float32 matching on the neighbouring integers), per
  channel, on the BN input ``max z / d (+ b)``.
* **Flatten.** The runtime keeps activations packed as (H, W, C) bits; the model flattens
  (C, H, W). The first dense layer's weight columns are permuted to (H, W, C) here, once.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from ..kernels.reference import pack_rows

from .. import backend, nn
from ..binary import conv_weight_rows
from ..functional import conv_output_shape, pool_output_shape
from ..tensor import Tensor, no_grad
from .runtime import PIXEL_MAX, PLANES, FrozenBNN, FrozenConv, FrozenLayer, pack_slots

__all__ = ["freeze", "PIXEL_SCALE", "INPUT_SHAPES", "model_input_shape"]

PIXEL_SCALE = 256  # first layer: z = PIXEL_SCALE * (x_f . w), x_f = (2x - 255) / 256
_WINDOW = 3  # integers either side of a float64 threshold checked against the float32 model
#: (C, H, W) of the images of the recipes in ``models`` (model.config["arch"])
INPUT_SHAPES = {"mnist_convnet": (1, 28, 28), "cifar10_convnet": (3, 32, 32),
                "svhn_convnet": (3, 32, 32)}
_BATCH_NORMS = (nn.BatchNorm, nn.ShiftBatchNorm, nn.BatchNorm2d, nn.ShiftBatchNorm2d)
_LAYOUT = ("[Dropout] -> [BinaryConv2d -> [MaxPool2d] -> [BN] -> Sign] x M -> [Flatten] -> "
           "[BinaryLinear -> [BN] -> Sign -> [Dropout]] x L -> BinaryLinear -> [BN]")

Block = namedtuple("Block", "kind layer pool bn sign")


def freeze(model, match_float32=True, input_shape=None):
    """Freeze a trained binarized MLP or ConvNet for inference with bits, XNOR and popcount.

    ``model`` is a ``Sequential`` of the form of ``models.mnist_mlp`` or
    ``models.binary_convnet``::

        [Dropout] -> [BinaryConv2d -> [MaxPool2d] -> [BN] -> Sign] x M -> Flatten
          -> [BinaryLinear -> [BN] -> Sign -> [Dropout]] x L -> BinaryLinear -> [BN]

    (BN = BatchNorm or ShiftBatchNorm, 1-D or 2-D; binary layers with or without bias;
    Dropout is the identity at inference and is dropped; any stride, padding and pool
    geometry). Its input must be ``(2x - 255) / 256`` of uint8 pixels ``x``
    (``data.to_pm1``); the frozen net takes the uint8 pixels themselves. A ConvNet's frozen
    form depends on the image size: ``input_shape`` = (C, H, W), or taken from the recipe
    named by ``model.config["arch"]`` (``INPUT_SHAPES``).

    Every hidden BN + sign becomes ``z >= tau`` on the exact integer ``z`` (weights of
    units with negative BN slope negated; their pooled bits ANDed), the output BN a float64
    affine. With ``match_float32`` (default) each threshold is checked against the model's
    own float32 batch norm at the neighbouring integers and follows it where rounding moves
    the decision; without it every threshold is the exact float64 one.
    Raises TypeError / ValueError for a model of another shape.
    """
    blocks = _blocks(model)
    shape = None  # (C, H, W) of a conv block's input; None for a dense one
    if blocks[0].kind == "conv":
        shape = model_input_shape(model, input_shape)
        if shape[0] != blocks[0].layer.in_channels:
            raise ValueError(f"input_shape: {shape} has {shape[0]} channels, the first "
                             f"BinaryConv2d takes {blocks[0].layer.in_channels}")
    elif input_shape is not None and math.prod(input_shape) != blocks[0].layer.in_features:
        raise ValueError(f"input_shape: {tuple(input_shape)} holds {math.prod(input_shape)} "
                         f"values, the first BinaryLinear takes {blocks[0].layer.in_features}")
    layers, adjusted = [], []
    for j, block in enumerate(blocks):
        first = j == 0
        if block.kind == "conv":
            layer, moved, shape = _conv_layer(block, shape, first, match_float32)
        else:
            layer, moved = _dense_layer(block, shape, first, match_float32)
            shape = None
        layers.append(layer)
        if moved is not None:
            adjusted.append(moved)
    info = dict(source=getattr(model, "config", None), float32_adjusted=adjusted,
                match_float32=bool(match_float32))
    return FrozenBNN(layers, info)


def model_input_shape(model, input_shape=None):
    """(C, H, W) of a ConvNet's images: ``input_shape`` checked, or the recipe's
    (``model.config``'s ``in_channels`` and ``image_size`` when it records them, else
    ``INPUT_SHAPES[model.config["arch"]]``); ValueError when none says."""
    if input_shape is None:
        config = getattr(model, "config", None) or {}
        if "in_channels" in config and "image_size" in config:
            return (int(config["in_channels"]),) + (int(config["image_size"]),) * 2
        arch = config.get("arch")
        if arch not in INPUT_SHAPES:
            raise ValueError("input_shape: a ConvNet's frozen form depends on the image size; "
                             "pass input_shape=(C, H, W) (known only for the recipes "
                             f"{sorted(INPUT_SHAPES)}, and this model's config names "
                             f"{arch!r})")
        return INPUT_SHAPES[arch]
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in shape):
        raise ValueError(f"input_shape: expected (C, H, W), three positive integers, got "
                         f"{input_shape!r}")
    return tuple(int(v) for v in shape)


# ----------------------------------------------------------------------- the model's blocks

def _blocks(model):
    """Split the layers into ``Block``s: kind "conv" (BinaryConv2d, MaxPool2d or None, batch
    norm or None, True) or "dense" (BinaryLinear, None, batch norm or None, has_sign)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected a minibnn.nn.Sequential (e.g. models.mnist_mlp), got "
                        f"{type(model).__name__}")
    layers = _flatten(model)
    blocks, i, flattened = [], 0, False

    def name(k):
        return f"layer {k} ({type(layers[k]).__name__})"

    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Flatten):
            if blocks and (blocks[-1].kind != "conv" or flattened):
                raise ValueError(f"cannot freeze: {name(i)} after a dense layer; freeze "
                                 f"understands {_LAYOUT}")
            flattened = bool(blocks)  # a leading Flatten is the identity on flat input
            i += 1
            continue
        if isinstance(layer, nn.MaxPool2d):
            raise ValueError(f"cannot freeze: {name(i)} does not follow a BinaryConv2d; a "
                             "MaxPool2d must come right after its convolution, in the paper's "
                             "order BinaryConv2d -> MaxPool2d -> [BN] -> Sign")
        conv = isinstance(layer, nn.BinaryConv2d)
        if not conv and not isinstance(layer, nn.BinaryLinear):
            raise ValueError(f"cannot freeze: {name(i)} where a BinaryConv2d or BinaryLinear "
                             f"was expected; freeze understands {_LAYOUT}")
        if conv and (flattened or (blocks and blocks[-1].kind == "dense")):
            raise ValueError(f"cannot freeze: {name(i)} after the Flatten / a dense layer")
        if not conv and blocks and blocks[-1].kind == "conv" and not flattened:
            raise ValueError(f"cannot freeze: {name(i)} follows a convolution without a "
                             "Flatten in between")
        i += 1
        pool = None
        if conv and i < len(layers) and isinstance(layers[i], nn.MaxPool2d):
            pool = layers[i]
            i += 1
        bn = None
        if i < len(layers) and isinstance(layers[i], _BATCH_NORMS):
            if type(layers[i]) not in _BATCH_NORMS:
                raise ValueError(f"cannot freeze: layer {i} is {type(layers[i]).__name__}, a "
                                 "subclass of a batch norm whose eval formula is unknown")
            if not conv and isinstance(layers[i], (nn.BatchNorm2d, nn.ShiftBatchNorm2d)):
                raise ValueError(f"cannot freeze: {name(i)} after a BinaryLinear (a 2-D batch "
                                 "norm takes (N, C, H, W) input)")
            bn = layers[i]
            i += 1
        if conv and i < len(layers) and isinstance(layers[i], nn.MaxPool2d):
            raise ValueError(f"cannot freeze: {name(i)} after the batch norm; freeze "
                             "understands the paper's order BinaryConv2d -> MaxPool2d -> BN "
                             "-> Sign")
        sign = i < len(layers) and isinstance(layers[i], nn.Sign)
        if sign:
            i += 1
        elif conv:
            what = name(i) if i < len(layers) else "the end of the network"
            raise ValueError(f"cannot freeze: {what} follows a BinaryConv2d [-> MaxPool2d] "
                             "[-> batch norm] where Sign was expected (the output layer must "
                             "be a BinaryLinear after Flatten)")
        elif i < len(layers):
            raise ValueError(f"cannot freeze: {name(i)} follows a "
                             "BinaryLinear [-> batch norm]; only Sign (or the end of the "
                             "network) can follow there")
        blocks.append(Block("conv" if conv else "dense", layer, pool, bn, sign))
    if not blocks:
        raise ValueError("cannot freeze: the model has no BinaryLinear layer")
    if blocks[-1].kind == "conv" or blocks[-1].sign:
        raise ValueError("cannot freeze: the last layer ends in Sign; freeze expects the last "
                         "BinaryLinear [-> batch norm] to produce class scores")
    if blocks[0].layer.binary_input in (True, "eval"):
        raise ValueError(f"cannot freeze: the first {type(blocks[0].layer).__name__} is marked "
                         f"binary_input={blocks[0].layer.binary_input!r} (in eval it takes "
                         "sign(x) of its input); freeze feeds it the 8-bit pixels, which the "
                         "model does not")
    for j in range(1, len(blocks)):
        prev, cur = blocks[j - 1].layer, blocks[j].layer
        if blocks[j].kind == "conv" and cur.in_channels != prev.out_channels:
            raise ValueError(f"cannot freeze: BinaryConv2d {j} takes {cur.in_channels} "
                             f"channels but the layer before gives {prev.out_channels}")
        if blocks[j - 1].kind == "dense" and cur.in_features != prev.out_features:
            raise ValueError(f"cannot freeze: BinaryLinear {j} takes {cur.in_features} "
                             f"inputs but the layer before gives {prev.out_features}")
    for j, block in enumerate(blocks):
        n = block.layer.out_channels if block.kind == "conv" else block.layer.out_features
        if block.bn is not None and block.bn.num_features != n:
            raise ValueError(f"cannot freeze: block {j}'s batch norm has "
                             f"{block.bn.num_features} features, its "
                             f"{type(block.layer).__name__} {n} outputs")
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


# ------------------------------------------------------------------------------- the layers

def _dense_layer(block, chw, first, match_float32):
    """A FrozenLayer for a BinaryLinear block; ``chw`` = (C, H, W) of the conv output that
    the model flattens into it, or None. Returns (layer, float32-adjusted count or None)."""
    lin, bn, sign = block.layer, block.bn, block.sign
    d = PIXEL_SCALE if first else 1  # the model's pre-activation is z / d (+ bias)
    planes = PLANES if first else 1
    k, n = lin.in_features, lin.out_features
    bits = _host(lin.weight) >= 0  # sign(W), sign(0) = +1: the binary weight
    in_hwc = None
    if chw is not None:
        c, h, w = chw
        if k != c * h * w:
            raise ValueError(f"cannot freeze: the first BinaryLinear takes {k} inputs but the "
                             f"convolutions give C*H*W = {c}*{h}*{w} = {c * h * w} for this "
                             "input_shape")
        in_hwc = (h, w, c)
        bits = bits.reshape(n, c, h, w).transpose(0, 2, 3, 1).reshape(n, h * w, c)
    bias = None if lin.bias is None else _host(lin.bias).astype(np.float32)
    a, c_ = _bn_affine(bn, n)
    z_max = k * (PIXEL_MAX if first else 1)
    _check_affine(bn, a, c_, d, bias, z_max)

    def pack(b):
        return pack_rows(b) if in_hwc is None else pack_slots(b, in_hwc[2])

    if sign:
        tau, flip, moved = _thresholds(bn, a, c_, d, bias, z_max, match_float32)
        flipped = bits ^ flip.reshape((n,) + (1,) * (bits.ndim - 1))
        return FrozenLayer(pack(flipped), k, planes, threshold=tau, in_hwc=in_hwc), moved
    b = np.zeros(n) if bias is None else bias.astype(np.float64)  # scores = a (z/d + b) + c
    return FrozenLayer(pack(bits), k, planes, scale=a / d, offset=a * b + c_,
                       in_hwc=in_hwc), None


def _conv_layer(block, chw, first, match_float32):
    """A FrozenConv for a BinaryConv2d [-> MaxPool2d] [-> BN] -> Sign block on (C, H, W)
    input; returns (layer, float32-adjusted count, (C, H, W) of its output)."""
    conv, pool, bn = block.layer, block.pool, block.bn
    c, h, w = chw
    o, (kh, kw) = conv.out_channels, conv.kernel_size
    try:
        _, _, ho, wo = conv_output_shape((1, c, h, w), (o, c, kh, kw), conv.stride,
                                         conv.padding, op="BinaryConv2d")
        if pool is not None:
            pool_output_shape((1, o, ho, wo), pool.kernel_size, pool.stride, op="MaxPool2d")
    except ValueError as exc:
        raise ValueError(f"cannot freeze: {exc}") from exc
    d = PIXEL_SCALE if first else 1
    k = c * kh * kw
    z_max = k * (PIXEL_MAX if first else 1)
    bias = None if conv.bias is None else _host(conv.bias).astype(np.float32)
    a, c_ = _bn_affine(bn, o)
    _check_affine(bn, a, c_, d, bias, z_max)
    tau, flip, moved = _thresholds(bn, a, c_, d, bias, z_max, match_float32)
    rows = conv_weight_rows(_host(conv.weight) >= 0) ^ flip[:, None]  # (O, K), (i, j, c)
    packed = pack_rows(rows) if first else pack_slots(rows.reshape(o, kh * kw, c), c)
    layer = FrozenConv(packed, (h, w, c), (kh, kw), conv.stride, conv.padding,
                       PLANES if first else 1, tau, flip,
                       None if pool is None else (pool.kernel_size, pool.stride))
    return layer, moved, layer.out_shape


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
    s32 = np.asarray(s32)
    x = s32[:, :, None, None] if isinstance(bn, (nn.BatchNorm2d, nn.ShiftBatchNorm2d)) else s32
    was = bn.training
    bn.training = False
    try:
        with no_grad():
            y = bn(Tensor(xp.asarray(x)))
    finally:
        bn.training = was
    return backend.to_numpy(y.data).reshape(s32.shape).astype(np.float64)
