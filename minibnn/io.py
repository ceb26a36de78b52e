"""Persistence shared by training, deployment and the data readers.

Two rules keep a user's work safe:

* **Atomic writes.** A file is written to a temporary name in its own folder, flushed to
  disk, then renamed over the target: a crash at any moment leaves the old file or the
  new one, never half of either.
* **The user's permissions.** The temporary file (created 0600 by ``tempfile.mkstemp``)
  gets the mode that the user's umask gives any new file (``0666 & ~umask``) before the
  rename, so checkpoints, models and frozen nets read like the run's other files.
* **No code from files.** ``.npz`` archives are opened with ``allow_pickle=False``;
  structured metadata travels as a JSON string inside the archive.

Only NumPy and the standard library: every other minibnn module may import this one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_savez", "json_array", "read_json", "open_npz",
           "read_prefixed", "check_finite"]


def current_umask():
    """The process's umask, read without changing it where the system says it
    (``/proc/self/status`` on Linux 4.7+); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, give it the mode a new file
    gets from the umask, fsync it, rename it over ``path``; on any failure the temporary
    file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> what open() would have created
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_savez(path, arrays):
    """Write the dict ``arrays`` as an uncompressed ``.npz`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: np.savez(f, **arrays))


def json_array(obj):
    """``obj`` as a 0-d string array holding its JSON text (for an ``.npz`` entry)."""
    return np.array(json.dumps(obj))


def read_json(npz, key, path):
    """The JSON object stored under ``key`` by :func:`json_array`; ValueError naming ``path``
    when it is missing or unreadable."""
    if key not in npz.files:
        raise ValueError(f"{path}: no {key!r} entry")
    try:
        return json.loads(str(npz[key]))
    except Exception as exc:
        raise ValueError(f"{path}: damaged {key!r} entry ({type(exc).__name__}: {exc})") from exc


def open_npz(path, what, error=ValueError):
    """Open the ``.npz`` at ``path`` without pickle support.

    FileNotFoundError when it does not exist; ``error`` (a ValueError subclass) naming the
    file and ``what`` was expected (e.g. "model") when it is not a readable archive.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise error(f"{path}: not a {what} file: a single .npy array, not an .npz archive")
    if not head.startswith(b"PK"):  # every .npz is a zip archive
        raise error(f"{path}: not a {what} file: not a readable .npz archive (no zip "
                    "header: damaged or another kind of file)")
    try:
        z = np.load(path, allow_pickle=False)
        z.files  # noqa: B018  (a damaged zip directory shows here)
    except Exception as exc:
        # NumPy's own message may advise allow_pickle=True: never repeat that advice
        raise error(f"{path}: not a {what} file: not a readable .npz archive (truncated "
                    f"or damaged; {type(exc).__name__})") from None
    return z


def read_prefixed(npz, prefix, path):
    """``{name: array}`` for every entry ``prefix + name`` of an open archive.

    A truncated member only shows when it is read: that raises ValueError naming ``path``.
    """
    try:
        return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}
    except Exception as exc:
        raise ValueError(f"{path}: damaged file ({type(exc).__name__}: {exc})") from exc


def check_finite(arrays, path, prefix=""):
    """ValueError naming ``path`` and the entry ``prefix + name`` when a floating array of
    the dict ``arrays`` holds NaN or infinity: such a file would load and then compute
    nothing but NaN (a model trained into divergence, or a damaged file)."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{path}: array {prefix + name!r} holds {bad} NaN or infinite "
                             f"value{'s' if bad != 1 else ''}; refusing to load it")
