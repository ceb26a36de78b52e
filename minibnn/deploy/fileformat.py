"""The frozen network's file: one uncompressed ``.npz``, read without pickle.

Entries (format version 1):

* ``format``: the string ``"minibnn.frozen-bnn"``; ``format_version``: the integer 1;
* ``meta``: JSON with ``in_features``, ``classes``, ``layers`` (per layer ``k``, ``n_out``,
  ``planes``, ``kind`` = "threshold" | "output") and ``info`` (``FrozenBNN.info``);
* ``layer{i}/weight``: uint64 (n_out, ceil(k/64)), padding bits 0;
* hidden layers ``layer{i}/threshold``: int32 (n_out,); the output layer
  ``layer{i}/scale`` and ``layer{i}/offset``: float64 (n_out,).

``load`` checks all of it and says what is wrong with a file (``FrozenFormatError``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import atomic_savez, json_array
from .runtime import PLANES, FrozenBNN, FrozenLayer

__all__ = ["FORMAT", "FORMAT_VERSION", "FrozenFormatError", "save", "load", "is_frozen_file"]

FORMAT = "minibnn.frozen-bnn"
FORMAT_VERSION = 1


class FrozenFormatError(ValueError):
    """A file is not a frozen minibnn network, has another format version, or is damaged."""


def save(frozen, path):
    """Write ``frozen`` (a FrozenBNN) to ``path`` atomically (temporary file, then rename)."""
    meta = dict(in_features=frozen.in_features, classes=frozen.classes,
                layers=[dict(k=l.k, n_out=l.n_out, planes=l.planes,
                             kind="output" if l.is_output else "threshold")
                        for l in frozen.layers],
                info=frozen.info)
    arrays = {"format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION),
              "meta": json_array(meta)}
    for i, l in enumerate(frozen.layers):
        arrays[f"layer{i}/weight"] = l.weight
        if l.is_output:
            arrays[f"layer{i}/scale"] = l.scale
            arrays[f"layer{i}/offset"] = l.offset
        else:
            arrays[f"layer{i}/threshold"] = l.threshold
    atomic_savez(path, arrays)
    return Path(path)


def load(path):
    """Read a network written by ``FrozenBNN.save``; checks format, version and every array.

    Raises FileNotFoundError for a missing file and FrozenFormatError (a ValueError) for
    anything that is not a frozen network of this format version, or is truncated/damaged.
    """
    meta, arrays = _read(path)
    try:
        specs = meta["layers"]
        info = meta.get("info", {})
        _expect(isinstance(specs, list) and specs, path, "no layers in its metadata")
    except (KeyError, TypeError) as exc:
        raise FrozenFormatError(f"{path}: damaged frozen network: bad metadata ({exc})") from exc
    layers = []
    prev = None
    for i, spec in enumerate(specs):
        layers.append(_layer(path, i, spec, arrays, prev, last=i == len(specs) - 1))
        prev = layers[-1].n_out
    return FrozenBNN(layers, info)


def is_frozen_file(path):
    """True if ``path`` is an .npz whose 'format' entry names a frozen minibnn network."""
    try:
        with _open(path) as z:
            return "format" in z.files and str(z["format"]) == FORMAT
    except Exception:
        return False


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


def _read(path):
    """(meta, {name: array} of the ``layer*`` entries) once format and version check out."""
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
    return meta, arrays


def _layer(path, i, spec, arrays, prev, last):
    """Layer ``i`` from its metadata ``spec`` and arrays, every shape and dtype checked."""
    try:
        k, n_out, planes, kind = (int(spec["k"]), int(spec["n_out"]), int(spec["planes"]),
                                  spec["kind"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FrozenFormatError(f"{path}: damaged frozen network: layer {i} metadata "
                                f"({exc})") from exc
    _expect(kind == ("output" if last else "threshold"), path, f"layer {i} kind {kind!r}")
    _expect(planes == (PLANES if i == 0 else 1), path, f"layer {i} planes {planes}")
    _expect(prev is None or k == prev, path, f"layer {i} takes {k} inputs, layer before "
                                             f"gives {prev}")
    words = (k + 63) // 64
    w = arrays.get(f"layer{i}/weight")
    _expect(w is not None and w.dtype == np.uint64 and w.shape == (n_out, words),
            path, f"layer{i}/weight missing or not uint64 ({n_out}, {words})")
    if k % 64 and w.size:
        pad = ~np.uint64((1 << (k % 64)) - 1)
        _expect(not np.any(w[:, -1] & pad), path, f"layer{i}/weight has nonzero padding bits")
    if last:
        s, o = arrays.get(f"layer{i}/scale"), arrays.get(f"layer{i}/offset")
        for name, v in (("scale", s), ("offset", o)):
            _expect(v is not None and v.dtype == np.float64 and v.shape == (n_out,), path,
                    f"layer{i}/{name} missing or not float64 ({n_out},)")
        return FrozenLayer(w, k, planes, scale=s, offset=o)
    t = arrays.get(f"layer{i}/threshold")
    _expect(t is not None and t.dtype == np.int32 and t.shape == (n_out,), path,
            f"layer{i}/threshold missing or not int32 ({n_out},)")
    return FrozenLayer(w, k, planes, threshold=t)


def _expect(cond, path, what):
    if not cond:
        raise FrozenFormatError(f"{path}: damaged frozen network: {what}")
