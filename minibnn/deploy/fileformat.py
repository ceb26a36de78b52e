"""The frozen network's file: one uncompressed ``.npz``, read without pickle.

Entries (format version 1, the MLPs; ``save`` still writes it for a network without
convolutions, so older minibnn versions read those files):

* ``format``: the string ``"minibnn.frozen-bnn"``; ``format_version``: the integer 1;
* ``meta``: JSON with ``in_features``, ``classes``, ``layers`` (per layer ``k``, ``n_out``,
  ``planes``, ``kind`` = "threshold" | "output") and ``info`` (``FrozenBNN.info``);
* ``layer{i}/weight``: uint64 (n_out, ceil(k/64)), padding bits 0;
* hidden layers ``layer{i}/threshold``: int32 (n_out,); the output layer
  ``layer{i}/scale`` and ``layer{i}/offset``: float64 (n_out,).

Format version 2 (written for a ConvNet) adds, to the above:

* ``meta``: ``input_shape`` ([C, H, W], or [in_features]; required), and per layer
  ``in_hwc`` ([H, W, C] of the conv output a dense layer reads, else null);
* conv layers, ``kind`` = "conv", with ``n_out``, ``planes``, ``in_hwc``, ``kernel``
  [kh, kw], ``stride``, ``padding`` and ``pool`` ([kernel, stride] or null), and the arrays
  ``layer{i}/weight`` uint64 (n_out, words) (``runtime.FrozenConv``: dense (i, j, c) rows
  for 8-bit input, channel slots otherwise; every padding bit 0), ``layer{i}/threshold``
  int32 (n_out,) with |threshold| <= z_max + 1, ``layer{i}/negated`` bool (n_out,).
  The padding correction is not stored: it is a function of the filters and the
  geometry (``runtime.border_correction``), computed when the layer is built.

``load`` reads versions 1 and 2, checks all of it and says what is wrong with a file
(``FrozenFormatError``); another version is refused with its number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..kernels.reference import n_words, pad_mask

from ..io import atomic_savez, json_array, open_npz
from .runtime import PLANES, FrozenBNN, FrozenConv, FrozenLayer, slot_mask

__all__ = ["FORMAT", "FORMAT_VERSION", "FrozenFormatError", "save", "load", "is_frozen_file"]

FORMAT = "minibnn.frozen-bnn"
FORMAT_VERSION = 2  # the newest this minibnn writes (for a ConvNet; an MLP is written as 1)
VERSIONS = (1, 2)  # the versions it reads


class FrozenFormatError(ValueError):
    """A file is not a frozen minibnn network, has another format version, or is damaged."""


def save(frozen, path):
    """Write ``frozen`` (a FrozenBNN) to ``path`` atomically (temporary file, then rename):
    format version 1 for an MLP, 2 for a network with convolutions."""
    version = 2 if any(isinstance(l, FrozenConv) or l.in_hwc is not None
                       for l in frozen.layers) else 1
    specs = []
    for l in frozen.layers:
        if isinstance(l, FrozenConv):
            specs.append(dict(kind="conv", n_out=l.n_out, planes=l.planes,
                              in_hwc=list(l.in_hwc), kernel=list(l.kernel), stride=l.stride,
                              padding=l.padding, pool=None if l.pool is None else list(l.pool)))
            continue
        spec = dict(k=l.k, n_out=l.n_out, planes=l.planes,
                    kind="output" if l.is_output else "threshold")
        if version == 2:
            spec["in_hwc"] = None if l.in_hwc is None else list(l.in_hwc)
        specs.append(spec)
    meta = dict(in_features=frozen.in_features, classes=frozen.classes, layers=specs,
                info=frozen.info)
    if version == 2:
        meta["input_shape"] = list(frozen.input_shape)
    arrays = {"format": np.array(FORMAT), "format_version": np.array(version),
              "meta": json_array(meta)}
    for i, l in enumerate(frozen.layers):
        arrays[f"layer{i}/weight"] = l.weight
        if l.is_output:
            arrays[f"layer{i}/scale"] = l.scale
            arrays[f"layer{i}/offset"] = l.offset
        else:
            arrays[f"layer{i}/threshold"] = l.threshold
        if isinstance(l, FrozenConv):
            arrays[f"layer{i}/negated"] = l.negated
    atomic_savez(path, arrays)
    return Path(path)


def load(path):
    """Read a network written by ``FrozenBNN.save``; checks format, version and every array.

    Raises FileNotFoundError for a missing file and FrozenFormatError (a ValueError) for
    anything that is not a frozen network of this format version, or is truncated/damaged.
    """
    version, meta, arrays = _read(path)
    where = f"{path}: damaged frozen network (format version {version})"
    try:
        specs = meta["layers"]
        info = meta.get("info", {})
        _expect(isinstance(specs, list) and specs, where, "no layers in its metadata")
        if version >= 2:
            _expect("input_shape" in meta, where, "no 'input_shape' in its metadata")
            input_shape = _ints(meta["input_shape"], None, where, "input_shape")
    except (KeyError, TypeError, AttributeError) as exc:
        raise FrozenFormatError(f"{where}: bad metadata ({exc})") from exc
    layers = []
    prev = None
    for i, spec in enumerate(specs):
        last = i == len(specs) - 1
        if version >= 2 and isinstance(spec, dict) and spec.get("kind") == "conv":
            layers.append(_conv_layer(where, i, spec, arrays))
        else:
            layers.append(_layer(where, i, spec, arrays, prev, last, version))
        prev = layers[-1].n_out if isinstance(layers[-1], FrozenLayer) else None
    try:
        net = FrozenBNN(layers, info)
    except ValueError as exc:
        raise FrozenFormatError(f"{where}: {exc}") from exc
    if version >= 2:
        _expect(tuple(input_shape) == net.input_shape, where,
                f"input_shape {input_shape} but the first layer takes {net.input_shape}")
    return net


def is_frozen_file(path):
    """True if ``path`` is an .npz whose 'format' entry names a frozen minibnn network."""
    try:
        with _open(path) as z:
            return "format" in z.files and str(z["format"]) == FORMAT
    except Exception:
        return False


def _open(path):
    return open_npz(path, "frozen minibnn network", FrozenFormatError)


def _read(path):
    """(version, meta, {name: array} of the ``layer*`` entries) once format and version
    check out."""
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
            if int(version) not in VERSIONS:
                raise FrozenFormatError(f"{path}: frozen network format version {int(version)}; "
                                        f"this minibnn reads versions "
                                        f"{', '.join(map(str, VERSIONS))} (a newer minibnn "
                                        "may have written it)")
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in files if name.startswith("layer")}
        except FrozenFormatError:
            raise
        except Exception as exc:  # truncated members, bad JSON, missing keys
            raise FrozenFormatError(f"{path}: damaged or truncated frozen network file "
                                    f"({type(exc).__name__}: {exc})") from exc
    return int(version), meta, arrays


def _layer(path, i, spec, arrays, prev, last, version=1):
    """Dense layer ``i`` from its metadata ``spec`` and arrays, every shape and dtype checked
    (``path`` is the error messages' prefix)."""
    try:
        k, n_out, planes, kind = (int(spec["k"]), int(spec["n_out"]), int(spec["planes"]),
                                  spec["kind"])
        in_hwc = spec.get("in_hwc") if version >= 2 else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FrozenFormatError(f"{path}: layer {i} metadata ({exc})") from exc
    _expect(kind == ("output" if last else "threshold"), path, f"layer {i} kind {kind!r}")
    _expect(planes == (PLANES if i == 0 else 1), path, f"layer {i} planes {planes}")
    _expect(k >= 1 and n_out >= 1, path, f"layer {i} has k {k}, n_out {n_out}")
    if in_hwc is None:
        _expect(prev is None or k == prev, path, f"layer {i} takes {k} inputs, layer before "
                                                 f"gives {prev}")
        bits = k
        mask = np.full(n_words(k), np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
        mask[-1] = pad_mask(k)
    else:
        h, w_, c = _ints(in_hwc, 3, path, f"layer {i} in_hwc")
        _expect(h * w_ * c == k, path, f"layer {i} in_hwc {in_hwc} does not hold k = {k}")
        mask = slot_mask(h * w_, c)
        bits = 64 * mask.shape[0]
    words = n_words(bits)
    w = arrays.get(f"layer{i}/weight")
    _expect(w is not None and w.dtype == np.uint64 and w.shape == (n_out, words),
            path, f"layer{i}/weight missing or not uint64 ({n_out}, {words})")
    _expect(not np.any(w & ~mask), path, f"layer{i}/weight has nonzero padding bits")
    if in_hwc is not None:
        w_layer = dict(in_hwc=(h, w_, c))
    else:
        w_layer = {}
    if last:
        s, o = arrays.get(f"layer{i}/scale"), arrays.get(f"layer{i}/offset")
        for name, v in (("scale", s), ("offset", o)):
            _expect(v is not None and v.dtype == np.float64 and v.shape == (n_out,), path,
                    f"layer{i}/{name} missing or not float64 ({n_out},)")
            _expect(np.isfinite(v).all(), path, f"layer{i}/{name} holds NaN or infinity")
        return FrozenLayer(w, k, planes, scale=s, offset=o, **w_layer)
    t = arrays.get(f"layer{i}/threshold")
    _expect(t is not None and t.dtype == np.int32 and t.shape == (n_out,), path,
            f"layer{i}/threshold missing or not int32 ({n_out},)")
    return FrozenLayer(w, k, planes, threshold=t, **w_layer)


def _conv_layer(path, i, spec, arrays):
    """Conv layer ``i`` (format version 2) from ``spec`` and arrays, everything checked."""
    try:
        n_out, planes = int(spec["n_out"]), int(spec["planes"])
        h, w_, c = _ints(spec["in_hwc"], 3, path, f"layer {i} in_hwc")
        kernel = _ints(spec["kernel"], 2, path, f"layer {i} kernel")
        stride, padding = int(spec["stride"]), int(spec["padding"])
        pool = None if spec["pool"] is None else _ints(spec["pool"], 2, path, f"layer {i} pool")
    except (KeyError, TypeError, ValueError) as exc:
        raise FrozenFormatError(f"{path}: layer {i} metadata ({exc})") from exc
    _expect(planes == (PLANES if i == 0 else 1), path, f"layer {i} planes {planes}")
    _expect(n_out >= 1 and stride >= 1 and padding >= 0, path,
            f"layer {i} has n_out {n_out}, stride {stride}, padding {padding}")
    k = kernel[0] * kernel[1] * c
    if planes == PLANES:
        mask = np.full(n_words(k), np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
        mask[-1] = pad_mask(k)
    else:
        mask = slot_mask(kernel[0] * kernel[1], c)
    w = arrays.get(f"layer{i}/weight")
    _expect(w is not None and w.dtype == np.uint64 and w.shape == (n_out, mask.shape[0]),
            path, f"layer{i}/weight missing or not uint64 ({n_out}, {mask.shape[0]})")
    _expect(not np.any(w & ~mask), path, f"layer{i}/weight has nonzero padding bits")
    t = arrays.get(f"layer{i}/threshold")
    _expect(t is not None and t.dtype == np.int32 and t.shape == (n_out,), path,
            f"layer{i}/threshold missing or not int32 ({n_out},)")
    neg = arrays.get(f"layer{i}/negated")
    _expect(neg is not None and neg.dtype == np.bool_ and neg.shape == (n_out,), path,
            f"layer{i}/negated missing or not bool ({n_out},)")
    try:
        layer = FrozenConv(w, (h, w_, c), kernel, stride, padding, planes, t, neg, pool)
    except ValueError as exc:
        raise FrozenFormatError(f"{path}: layer {i} geometry ({exc})") from exc
    _expect(np.all(np.abs(t.astype(np.int64)) <= layer.z_max + 1), path,
            f"layer{i}/threshold beyond +-(z_max + 1) = +-{layer.z_max + 1}")
    return layer


def _ints(value, n, path, what):
    """``value`` as a tuple of positive ints (of length ``n`` unless None)."""
    ok = isinstance(value, list) and (n is None or len(value) == n) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    _expect(ok, path, f"{what} {value!r} is not a list of {n or 'some'} positive integers")
    return tuple(value)


def _expect(cond, where, what):
    """FrozenFormatError ``"{where}: {what}"`` unless ``cond``; ``where`` is the path and
    "damaged frozen network (format version v)"."""
    if not cond:
        raise FrozenFormatError(f"{where}: {what}")
