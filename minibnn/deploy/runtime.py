"""The frozen runtime: run a frozen network on a backend with bits, XNOR and popcount.

A ``FrozenBNN`` holds ``FrozenLayer``s: packed weights, int32 thresholds for hidden layers,
a float64 affine for the output layer. Running it needs only the backend's kernels
(``pack_bitplanes``, ``bitplane_gemm``, ``xnor_gemm``, ``pack_rows``) and its array module;
which backend runs is named by ``backend=`` or is the active one.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend as _backend  # the methods' ``backend=`` argument shadows the name

__all__ = ["PLANES", "PIXEL_MAX", "FrozenLayer", "FrozenBNN", "first_layer"]

PLANES = 8  # bits per input pixel
PIXEL_MAX = 255  # |sum_n 2^n y^n| <= 255: the first layer's |z| is at most 255 k
_DEFAULT_BATCH = {"numpy": 256, "numba": 1024, "cupy": 8192}


def first_layer(x, weight, k, kern):
    """z = sum_{n=0..7} 2^n (y^n . w) = 256 (x_f . w) for uint8 rows x (B, k): the backend
    packs the eight bit planes and runs its bit-plane XNOR GEMM (``kernels.*.bitplane_gemm``:
    one XNOR-popcount product per plane, combined by shift-add), int32 (|z| <= 255 k)."""
    return kern.bitplane_gemm(kern.pack_bitplanes(x), weight, k)


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

    def save(self, path):
        """Write this network to one ``.npz`` (atomically: temporary file, then rename);
        the format is ``deploy.fileformat``'s."""
        from .fileformat import save  # fileformat builds FrozenBNNs: it imports this module
        return save(self, path)

    # ----------------------------------------------------------------------------- running

    def scores(self, x, backend=None, batch_size=None):
        """Class scores ``scale * z + offset`` (float64, NumPy (n, classes)); they equal the
        trained model's eval-mode scores up to float32 rounding."""
        return self._run(x, backend, batch_size, final="scores")

    def predict(self, x, backend=None, batch_size=None):
        """Predicted classes (int64, NumPy (n,)): argmax of the scores, first index on a tie."""
        return self._run(x, backend, batch_size, final="predict")

    def integer_scores(self, x, backend=None, batch_size=None):
        """The output layer's exact integer pre-activations z, int32 (n, classes), NumPy."""
        return self._run(x, backend, batch_size, final=None)

    def trace(self, x, backend=None):
        """Every layer's integer pre-activation z for uint8 images ``x`` (one batch), as a list
        of NumPy int32 (n, n_out): hidden unit j is +1 iff ``z[:, j] >= layer.threshold[j]``.
        (For a unit frozen with a negative BN slope, z is minus the model's pre-activation.)"""
        x = self._check_input(x)
        name = _backend_name(backend)
        out = []
        _forward_batch(_backend.array_module(name).asarray(x), self.layers_on(name),
                       _backend.kernel_module(name), trace=out)
        return [_backend.to_numpy(z) for z in out]

    def layers_on(self, name):
        """``[(layer, weight, threshold)]`` with the arrays in backend ``name``'s array module:
        the layers' own NumPy arrays, or copies on the GPU made once and cached."""
        xp = _backend.array_module(name)
        if xp is np:
            return [(l, l.weight, l.threshold) for l in self.layers]
        if name not in self._device_cache:
            self._device_cache[name] = [
                (l, xp.asarray(l.weight), None if l.is_output else xp.asarray(l.threshold))
                for l in self.layers]
        return self._device_cache[name]

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

    def _run(self, x, name, batch_size, final):
        x = self._check_input(x)
        name = _backend_name(name)
        kern = _backend.kernel_module(name)
        xp = _backend.array_module(name)
        batch = _DEFAULT_BATCH[name] if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        layers = self.layers_on(name)
        out = self.layers[-1]
        scale = xp.asarray(out.scale)
        offset = xp.asarray(out.offset)
        results = []
        for i in range(0, x.shape[0], batch):
            z = _forward_batch(xp.asarray(x[i:i + batch]), layers, kern)
            if final is None:
                r = z
            else:
                s = z * scale + offset
                r = s if final == "scores" else xp.argmax(s, axis=1)
            results.append(_backend.to_numpy(r))
        if results:
            return np.concatenate(results)
        width = () if final == "predict" else (self.classes,)
        dtype = {None: np.int32, "scores": np.float64, "predict": np.int64}[final]
        return np.zeros((0,) + width, dtype)


def _forward_batch(x, layers, kern, trace=None):
    """Integer z of the output layer for one batch of uint8 rows ``x`` (B, k), the arrays of
    ``layers`` (``FrozenBNN.layers_on``) on the backend whose kernels are ``kern``."""
    h = None
    for layer, weight, threshold in layers:
        if layer.planes == PLANES:
            z = first_layer(x, weight, layer.k, kern)
        else:
            z = kern.xnor_gemm(h, weight, layer.k)
        if trace is not None:
            trace.append(z)
        if threshold is None:
            return z
        h = kern.pack_rows(z >= threshold)  # bit 1 (+1) iff z >= tau
    raise AssertionError("unreachable: the last layer is an output layer")


def _backend_name(name):
    """``name`` checked (BackendUnavailable says why it cannot run), or the active backend."""
    if name is None:
        return _backend.active()
    with _backend.use(name):
        return name
