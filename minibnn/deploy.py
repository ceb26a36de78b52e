"""Deploy: freeze a trained BNN into packed bits and integer thresholds, and run it.

Once trained, a BNN needs only bits, XNOR and popcount at run time (Courbariaux et al.,
"Binarized Neural Networks", arXiv:1602.02830, Section 3). ``freeze(model)`` keeps just
that:

* **Packed weights.** Each layer's ``sign(W)`` (sign(0) = +1) packed 64 to a uint64 word
  along the input axis, bit 1 = +1 (``kernels.reference.pack_rows``).
* **Integer thresholds.** In eval mode a batch norm is a per-unit affine
  ``y = a s + c`` (BatchNorm: ``a = gamma / sqrt(var + eps)``; ShiftBatchNorm:
  ``a = AP2(gamma) AP2(1 / sqrt(var + eps))``; both ``c = beta - a mean``), so for an
  integer pre-activation ``z``, ``sign(BN(z)) = +1`` iff ``z >= ceil(-c / a)`` when
  ``a > 0`` and iff ``z <= floor(-c / a)`` when ``a < 0``. A unit with ``a < 0`` has its
  weight row negated at freeze time (``-z`` is the dot product with ``-w``), so every
  hidden unit runs as one test: ``bit = z >= tau``.
* **First layer on 8-bit input** (the paper's first-layer method). The model sees
  ``x_f = (2 x - 255) / 256`` for uint8 pixels ``x`` (``data.to_pm1``). With the bit
  planes ``x^n`` of ``x`` and their signs ``y^n = 2 x^n - 1``, ``2 x - 255 = sum_n 2^n y^n``,
  hence

      x_f . w = (1 / 256) sum_{n=0..7} 2^n (y^n . w)        (y^n, w in {-1, +1})

  i.e. the paper's ``sum_n 2^(n-1) (x^n . w)`` written for +-1 planes: eight XNOR-popcount
  products of the packed planes, shifted and added into the exact integer
  ``z = 256 (x_f . w)``, which is thresholded like any other layer.
* **Packed activations.** A hidden layer's bits are packed straight into the next layer's
  operand; nothing is unpacked in between.
* **Output layer.** Its batch norm folds into ``scores = scale * z + offset`` (float64),
  the only floating-point arithmetic left; ``predict`` is its argmax (ties go to the first
  index, as ``numpy.argmax``).

Agreement with the float32 model. Thresholds are computed in float64. Every pre-activation
is exact in the float32 model too: a hidden layer's is a sum of +-1 products, and the first
layer's is z / 256 with z an integer below 2^18, because its inputs are multiples of 1/256.
So each threshold is also checked against the layer's own float32 batch norm on the
integers next to it, and follows the model where float32 rounding of the batch norm moves
its decision by one integer (``FrozenBNN.info['float32_adjusted']`` counts those units per
layer): every layer agrees with the float32 model bit for bit.

``frozen.save(path)`` / ``load(path)`` use one ``.npz`` with a format version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import backend
from . import nn

__all__ = ["FORMAT", "FORMAT_VERSION", "FrozenFormatError", "FrozenLayer", "FrozenBNN",
           "freeze", "load", "is_frozen_file"]

FORMAT = "minibnn.frozen-bnn"
FORMAT_VERSION = 1
PLANES = 8  # bits per input pixel
PIXEL_SCALE = 256  # first layer: z = PIXEL_SCALE * (x_f . w), x_f = (2x - 255) / 256
PIXEL_MAX = 255  # |sum_n 2^n y^n| <= 255: the first layer's |z| is at most 255 k
_WINDOW = 3  # integers either side of a float64 threshold checked against the float32 model
_DEFAULT_BATCH = {"numpy": 256, "numba": 1024, "cupy": 8192}


class FrozenFormatError(ValueError):
    """A file is not a frozen minibnn network, has another format version, or is damaged."""


def _n_words(k):
    return (int(k) + 63) // 64


class FrozenLayer:
    """One frozen binary layer: ``z = w . input`` as an exact integer, then either

    * hidden: ``bit = z >= threshold`` (int32 per unit), packed for the next layer, or
    * output: ``score = scale * z + offset`` (float64 per unit).

    ``weight`` is uint64 (n_out, ceil(k/64)), rows packed along the k inputs.
    ``planes`` is 8 when the input is uint8 pixels (first layer: ``z = 256 x_f . w``) and
    1 when it is the previous layer's packed bits.
    """

    def __init__(self, weight, k, planes, threshold=None, scale=None, offset=None):
        self.weight = weight
        self.k = int(k)
        self.planes = int(planes)
        self.threshold = threshold
        self.scale = scale
        self.offset = offset

    @property
    def n_out(self):
        return int(self.weight.shape[0])

    @property
    def is_output(self):
        return self.threshold is None

    @property
    def z_max(self):
        """Largest |z| this layer can produce: k for bits, 255 k for 8-bit input."""
        return self.k * (PIXEL_MAX if self.planes == PLANES else 1)

    def __repr__(self):
        kind = "output affine" if self.is_output else "threshold"
        src = "uint8 bit planes" if self.planes == PLANES else "packed bits"
        return f"FrozenLayer({self.k} -> {self.n_out}, input {src}, {kind})"


class FrozenBNN:
    """A frozen binarized MLP: packed weights, integer thresholds, a float64 output affine.

    ``scores(x)`` and ``predict(x)`` take raw uint8 images (n, in_features) or
    (n, H, W) with H * W = in_features: the pixels that ``data.to_pm1`` would have scaled.
    They run on the active backend (or the one named by ``backend=``) and return NumPy.
    """

    def __init__(self, layers, info=None):
        if not layers or not layers[-1].is_output or any(l.is_output for l in layers[:-1]):
            raise ValueError("layers: expected threshold layers followed by one output layer")
        self.layers = list(layers)
        self.info = dict(info or {})
        self._device_cache = {}

    @property
    def in_features(self):
        return self.layers[0].k

    @property
    def classes(self):
        return self.layers[-1].n_out

    def __repr__(self):
        widths = " -> ".join([str(self.in_features)] + [str(l.n_out) for l in self.layers])
        return f"FrozenBNN({widths}, {len(self.layers) - 1} threshold layers + output affine)"

    # ----------------------------------------------------------------------------- running

    def _check_input(self, x):
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = np.asarray(x)
        if x.dtype != np.uint8:
            raise TypeError(f"x: expected uint8 pixels (0..255) of shape (n, {self.in_features}),"
                            f" got dtype {x.dtype}; a frozen net takes the raw 8-bit images, not "
                            "the [-1, 1] floats of data.to_pm1")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"x: expected shape (n, {self.in_features}) (or (n, H, W) with "
                             f"H*W = {self.in_features}), got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.in_features)

    def _layers_on(self, name):
        """The layers' arrays as the backend's array module holds them (cached on the GPU)."""
        if name != "cupy":
            return [(l, l.weight, l.threshold) for l in self.layers]
        if "cupy" not in self._device_cache:
            import cupy
            self._device_cache["cupy"] = [
                (l, cupy.asarray(l.weight), None if l.is_output else cupy.asarray(l.threshold))
                for l in self.layers]
        return self._device_cache["cupy"]

    def _forward_batch(self, x, layers, kern, xp, trace=None):
        """Integer z of the output layer for one batch of uint8 rows ``x`` (B, k)."""
        h = None
        for layer, weight, threshold in layers:
            if layer.planes == PLANES:
                z = _first_layer(x, weight, layer.k, kern)
            else:
                z = kern.xnor_gemm(h, weight, layer.k)
            if trace is not None:
                trace.append(z)
            if threshold is None:
                return z
            h = kern.pack_rows(z >= threshold)  # bit 1 (+1) iff z >= tau
        raise AssertionError("unreachable: the last layer is an output layer")

    def trace(self, x, backend=None):
        """Every layer's integer pre-activation z for uint8 images ``x`` (one batch), as a list
        of NumPy int32 (n, n_out): hidden unit j is +1 iff ``z[:, j] >= layer.threshold[j]``.
        (For a unit frozen with a negative BN slope, z is minus the model's pre-activation.)"""
        x = self._check_input(x)
        name = _backend_name(backend)
        out = []
        self._forward_batch(_array_module(name).asarray(x), self._layers_on(name),
                            _kernels(name), _array_module(name), trace=out)
        return [_to_host(z) for z in out]

    def integer_scores(self, x, backend=None, batch_size=None):
        """The output layer's exact integer pre-activations z, int32 (n, classes), NumPy."""
        return self._run(x, backend, batch_size, final=None)

    def scores(self, x, backend=None, batch_size=None):
        """Class scores ``scale * z + offset`` (float64, NumPy (n, classes)); they equal the
        trained model's eval-mode scores up to float32 rounding."""
        return self._run(x, backend, batch_size, final="scores")

    def predict(self, x, backend=None, batch_size=None):
        """Predicted classes (int64, NumPy (n,)): argmax of the scores, first index on a tie."""
        return self._run(x, backend, batch_size, final="predict")

    def _run(self, x, name, batch_size, final):
        x = self._check_input(x)
        name = _backend_name(name)
        kern = _kernels(name)
        xp = _array_module(name)
        batch = _DEFAULT_BATCH[name] if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        layers = self._layers_on(name)
        out = self.layers[-1]
        scale = xp.asarray(out.scale)
        offset = xp.asarray(out.offset)
        results = []
        for i in range(0, x.shape[0], batch):
            z = self._forward_batch(xp.asarray(x[i:i + batch]), layers, kern, xp)
            if final is None:
                r = z
            else:
                s = z * scale + offset
                r = s if final == "scores" else xp.argmax(s, axis=1)
            results.append(_to_host(r))
        if results:
            return np.concatenate(results)
        width = () if final == "predict" else (self.classes,)
        dtype = {None: np.int32, "scores": np.float64, "predict": np.int64}[final]
        return np.zeros((0,) + width, dtype)

    # ----------------------------------------------------------------------------- saving

    def save(self, path):
        """Write this network to one ``.npz`` (atomically: temporary file, then rename)."""
        from .train import atomic_savez
        meta = dict(in_features=self.in_features, classes=self.classes,
                    layers=[dict(k=l.k, n_out=l.n_out, planes=l.planes,
                                 kind="output" if l.is_output else "threshold")
                            for l in self.layers],
                    info=self.info)
        arrays = {"format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION),
                  "meta": np.array(json.dumps(meta))}
        for i, l in enumerate(self.layers):
            arrays[f"layer{i}/weight"] = l.weight
            if l.is_output:
                arrays[f"layer{i}/scale"] = l.scale
                arrays[f"layer{i}/offset"] = l.offset
            else:
                arrays[f"layer{i}/threshold"] = l.threshold
        atomic_savez(path, arrays)
        return Path(path)


def _backend_name(name):
    """``name`` checked (BackendUnavailable says why it cannot run), or the active backend."""
    if name is None:
        return backend.active()
    with backend.use(name):
        return name


# The two helpers below exist because the public methods take a ``backend=`` argument,
# which shadows the module of that name inside them.
def _kernels(name):
    return backend.kernel_module(name)


def _to_host(x):
    return backend.to_numpy(x)


def _array_module(name):
    if name == "cupy":
        import cupy
        return cupy
    return np


def _first_layer(x, weight, k, kern):
    """z = sum_{n=0..7} 2^n (y^n . w) = 256 (x_f . w) for uint8 rows x (B, k): the backend
    packs the eight bit planes and runs its bit-plane XNOR GEMM (``kernels.*.bitplane_gemm``:
    one XNOR-popcount product per plane, combined by shift-add), int32 (|z| <= 255 k)."""
    return kern.bitplane_gemm(kern.pack_bitplanes(x), weight, k)


# --------------------------------------------------------------------------------- freezing

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


def _host(x):
    from .tensor import Tensor
    return backend.to_numpy(x.data if isinstance(x, Tensor) else x)


def _bn_affine(bn, n):
    """Per-unit (a, c) in float64 with eval-mode BN(s) = a s + c (``eval_affine``: the
    float32 values the layer's own forward uses)."""
    from .tensor import no_grad
    if bn is None:
        return np.ones(n), np.zeros(n)
    with no_grad():
        a, c = (_host(t).astype(np.float64) for t in bn.eval_affine())
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c))):
        raise ValueError("cannot freeze: a batch norm has non-finite parameters or statistics")
    return a, c


def _float32_model(bn, s32):
    """The layer's own eval-mode batch norm applied to float32 pre-activations (R, n)."""
    from .tensor import Tensor, no_grad
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


def _pre_activation32(z, d, bias):
    """The float32 value the model feeds its batch norm for integer z: z / d (+ bias)."""
    s = (np.asarray(z, np.float64) / d).astype(np.float32)
    return s if bias is None else (s + bias).astype(np.float32)


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
        adjusted = int(np.sum(new != edge))
        edge = new
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
    from kernels.reference import pack_rows
    blocks = _blocks(model)
    layers, adjusted = [], []
    for j, (lin, bn, sign) in enumerate(blocks):
        first = j == 0
        d = PIXEL_SCALE if first else 1
        planes = PLANES if first else 1
        k, n = lin.in_features, lin.out_features
        w = _host(lin.weight)
        packed = pack_rows(w >= 0)  # sign(W), sign(0) = +1: the eval-mode binary weight
        bias = None if lin.bias is None else _host(lin.bias).astype(np.float32)
        a, c = _bn_affine(bn, n)
        z_max = k * (PIXEL_MAX if first else 1)
        _check_affine(bn, a, c, d, bias, z_max)
        if sign:
            tau, flip, moved = _thresholds(bn, a, c, d, bias, z_max,
                                           match_float32)
            layers.append(FrozenLayer(_flip_rows(packed, k, flip), k, planes, threshold=tau))
            adjusted.append(moved)
        else:
            b = np.zeros(n) if bias is None else bias.astype(np.float64)
            layers.append(FrozenLayer(packed, k, planes, scale=a / d, offset=a * b + c))
    info = dict(source=getattr(model, "config", None), float32_adjusted=adjusted,
                match_float32=bool(match_float32))
    return FrozenBNN(layers, info)


# --------------------------------------------------------------------------------- loading

def _open(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise FrozenFormatError(f"{path}: not a frozen minibnn network: not a readable .npz file "
                                f"(truncated, damaged or another kind of file; "
                                f"{type(exc).__name__}: {exc})") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FrozenFormatError(f"{path}: not a frozen minibnn network: a single .npy array, "
                                "not an .npz archive")
    return z


def is_frozen_file(path):
    """True if ``path`` is an .npz whose 'format' entry names a frozen minibnn network."""
    try:
        with _open(path) as z:
            return "format" in z.files and str(z["format"]) == FORMAT
    except Exception:
        return False


def _expect(cond, path, what):
    if not cond:
        raise FrozenFormatError(f"{path}: damaged frozen network: {what}")


def load(path):
    """Read a network written by ``FrozenBNN.save``; checks format, version and every array.

    Raises FileNotFoundError for a missing file and FrozenFormatError (a ValueError) for
    anything that is not a frozen network of this format version, or is truncated/damaged.
    """
    with _open(path) as z:
        files = set(z.files)
        if "format" not in files:
            hint = (" (it looks like a trained model: freeze it with minibnn.deploy.freeze)"
                    if "config" in files else "")
            raise FrozenFormatError(f"{path}: not a frozen minibnn network (no 'format' "
                                    f"entry){hint}")
        try:
            fmt = str(z["format"])
            version = z["format_version"] if "format_version" in files else None
            if fmt != FORMAT:
                raise FrozenFormatError(f"{path}: not a frozen minibnn network (format {fmt!r}, "
                                        f"expected {FORMAT!r})")
            if version is None or version.shape != () or version.dtype.kind not in "iu":
                raise FrozenFormatError(f"{path}: no valid 'format_version' entry")
            if int(version) != FORMAT_VERSION:
                raise FrozenFormatError(f"{path}: frozen network format version {int(version)}; "
                                        f"this minibnn reads version {FORMAT_VERSION} only")
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in files if name.startswith("layer")}
        except FrozenFormatError:
            raise
        except Exception as exc:  # truncated members, bad JSON, missing keys
            raise FrozenFormatError(f"{path}: damaged or truncated frozen network file "
                                    f"({type(exc).__name__}: {exc})") from exc
    try:
        specs = meta["layers"]
        info = meta.get("info", {})
        _expect(isinstance(specs, list) and specs, path, "no layers in its metadata")
    except (KeyError, TypeError) as exc:
        raise FrozenFormatError(f"{path}: damaged frozen network: bad metadata ({exc})") from exc
    layers = []
    prev = None
    for i, spec in enumerate(specs):
        try:
            k, n_out, planes, kind = (int(spec["k"]), int(spec["n_out"]), int(spec["planes"]),
                                      spec["kind"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FrozenFormatError(f"{path}: damaged frozen network: layer {i} metadata "
                                    f"({exc})") from exc
        last = i == len(specs) - 1
        _expect(kind == ("output" if last else "threshold"), path, f"layer {i} kind {kind!r}")
        _expect(planes == (PLANES if i == 0 else 1), path, f"layer {i} planes {planes}")
        _expect(prev is None or k == prev, path, f"layer {i} takes {k} inputs, layer before "
                                                 f"gives {prev}")
        w = arrays.get(f"layer{i}/weight")
        _expect(w is not None and w.dtype == np.uint64 and w.shape == (n_out, _n_words(k)),
                path, f"layer{i}/weight missing or not uint64 ({n_out}, {_n_words(k)})")
        if k % 64 and w.size:
            pad = ~np.uint64((1 << (k % 64)) - 1)
            _expect(not np.any(w[:, -1] & pad), path, f"layer{i}/weight has nonzero padding bits")
        if last:
            s, o = arrays.get(f"layer{i}/scale"), arrays.get(f"layer{i}/offset")
            for name, v in (("scale", s), ("offset", o)):
                _expect(v is not None and v.dtype == np.float64 and v.shape == (n_out,), path,
                        f"layer{i}/{name} missing or not float64 ({n_out},)")
            layers.append(FrozenLayer(w, k, planes, scale=s, offset=o))
        else:
            t = arrays.get(f"layer{i}/threshold")
            _expect(t is not None and t.dtype == np.int32 and t.shape == (n_out,), path,
                    f"layer{i}/threshold missing or not int32 ({n_out},)")
            layers.append(FrozenLayer(w, k, planes, threshold=t))
        prev = n_out
    return FrozenBNN(layers, info)
