"""Dataset readers and batching: IDX files (MNIST and anything in its layout), the
paper's train/validation split, a shuffled index iterator, and pixel scaling to [-1, 1].

Only NumPy, the standard library and ``minibnn.io`` (atomic writes).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pathlib
import zlib
from typing import Iterator, NamedTuple

import numpy as np

from .io import atomic_write_bytes

__all__ = [
    "DatasetError",
    "MNIST",
    "MNIST_FILES",
    "MNIST_SHA256",
    "read_idx",
    "write_idx",
    "mnist_dir",
    "load_mnist",
    "split_train_valid",
    "batches",
    "to_pm1",
]


class DatasetError(ValueError):
    """A data file is corrupted, truncated, or not what was expected; the message names it."""


# IDX type code -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "IDX file format").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# name -> (sha256 of name.gz as shipped, sha256 of the uncompressed file as MNIST publishes it).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": (
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}


# --------------------------------------------------------------------------- IDX files


def _maybe_gunzip(raw: bytes, path) -> bytes:
    """Decompress `raw` if it starts with the gzip magic, whatever the file is called."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise DatasetError(
            f"{path}: corrupted or truncated gzip data ({type(e).__name__}: {e}); "
            "replace the file with an intact copy"
        ) from e


def _parse_idx(data: bytes, path) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a native-byte-order array."""
    if len(data) < 4:
        raise DatasetError(
            f"{path}: not an IDX file: {len(data)} bytes, expected at least a 4-byte header"
        )
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetError(
            f"{path}: not an IDX file: magic bytes {data[:4].hex(' ')}, "
            f"expected 00 00 <type code in {codes}> <ndim>"
        )
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header says 0 dimensions, expected at least 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{path}: truncated header: {ndim} dimensions need {header_len} header bytes, "
            f"found {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = dtype.itemsize
    for s in shape:
        expected *= s
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "trailing data"
        dims = "x".join(map(str, shape))
        raise DatasetError(
            f"{path}: {what}: header says {dims} of {dtype.itemsize}-byte items = "
            f"{expected} bytes, found {found}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # Copy into native byte order: the result is writable and owns its memory.
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or not, detected by its magic bytes) into a NumPy array.

    Supports the IDX types ubyte, byte, short, int, float, double (big-endian on disk,
    native in memory). Any malformed content raises DatasetError naming the file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    return _parse_idx(_maybe_gunzip(raw, path), path)


def write_idx(path, array) -> None:
    """Write `array` as an IDX file, gzipped when `path` ends in .gz.

    Accepts uint8, int8, int16, int32, float32, float64 arrays with 1 to 255 dimensions.
    The file is written to a temporary name and renamed, so a failure leaves no half file.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        names = ", ".join(str(d) for d in _IDX_CODES)
        raise TypeError(f"write_idx: array has dtype {array.dtype}, expected one of {names}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx: array has {array.ndim} dimensions, expected 1 to 255")
    if any(s >= 2**32 for s in array.shape):
        raise ValueError(f"write_idx: array shape {array.shape} has a dimension >= 2**32")
    header = bytes([0, 0, _IDX_CODES[native], array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    path = pathlib.Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- MNIST


class MNIST(NamedTuple):
    """MNIST (or a dataset in its layout): uint8 images (n, H, W) and uint8 labels (n,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def mnist_dir() -> pathlib.Path:
    """The folder of the MNIST .gz files shipped inside the installed minibnn package."""
    folder = importlib.resources.files("minibnn") / "datasets" / "mnist"
    if not isinstance(folder, pathlib.Path):
        raise DatasetError(
            f"minibnn's MNIST copy is not on the file system ({folder!r}); install minibnn "
            "from a wheel or source tree, or pass data_dir to load_mnist"
        )
    return folder


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_mnist(data_dir=None, verify=None) -> MNIST:
    """Load MNIST's four IDX files: the copy shipped with minibnn, or those in `data_dir`.

    `data_dir` may hold each file gzipped (`name.gz`) or not (`name`) under MNIST's names,
    so other datasets in MNIST's layout (Fashion-MNIST, KMNIST) load too. The shipped copy
    is always checked against its sha256; a user folder is checked against MNIST's
    published checksums only when `verify=True`. Shapes, dtypes and counts are always
    checked: images (n, H, W) uint8, labels (n,) integers below 256 (returned as uint8).
    """
    if verify not in (None, True, False):
        raise TypeError(f"load_mnist: verify must be None, True or False, got {verify!r}")
    shipped = data_dir is None
    if shipped:
        if verify is False:
            raise ValueError(
                "load_mnist: verify=False is not allowed for the shipped copy, which is "
                "always checked (it takes a fraction of a second); pass data_dir to load "
                "an unverified folder"
            )
        folder = mnist_dir()
    else:
        folder = pathlib.Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data directory {folder} does not exist or is not a folder; pass --data-dir "
                "pointing at a folder with the four MNIST IDX files, or omit it to use the "
                "copy shipped with minibnn"
            )

    paths = {}
    for name in MNIST_FILES:
        path = folder / (name + ".gz") if shipped else _find(folder, name)
        if path is None or not path.is_file():
            if shipped:
                raise FileNotFoundError(
                    f"{name}.gz is missing from minibnn's shipped copy in {folder}; the "
                    "install is incomplete: reinstall minibnn (pip install --force-reinstall "
                    "minibnn), or pass --data-dir pointing at a folder with the four MNIST "
                    "IDX files"
                )
            missing = [n + "[.gz]" for n in MNIST_FILES if _find(folder, n) is None]
            raise FileNotFoundError(
                f"expected {', '.join(missing)} in {folder}; pass --data-dir pointing at a "
                "folder with the four MNIST IDX files, or omit it to use the copy shipped "
                "with minibnn"
            )
        paths[name] = path

    arrays = {}
    for name, path in paths.items():
        raw = path.read_bytes()
        gz_sha, raw_sha = MNIST_SHA256[name]
        if shipped and _sha256(raw) != gz_sha:
            raise DatasetError(
                f"{path}: sha256 checksum mismatch (got {_sha256(raw)}, expected {gz_sha}): "
                "minibnn's shipped copy of MNIST is corrupted; reinstall minibnn "
                "(pip install --force-reinstall minibnn), or pass --data-dir pointing at an "
                "intact copy of the four MNIST IDX files"
            )
        data = _maybe_gunzip(raw, path)
        if verify and _sha256(data) != raw_sha:
            raise DatasetError(
                f"{path}: sha256 checksum mismatch of the uncompressed contents "
                f"(got {_sha256(data)}, expected MNIST's published {raw_sha}); the file is "
                "corrupted or not MNIST: replace it with an intact copy, or use verify=None "
                "to load another dataset in MNIST's layout"
            )
        arrays[name] = _parse_idx(data, path)

    result = []
    for split in ("train", "t10k"):
        img_name, lab_name = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        images, labels = arrays[img_name], arrays[lab_name]
        result += _check_pair(images, labels, paths[img_name], paths[lab_name])
    train_images, train_labels, test_images, test_labels = result
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"{paths['t10k-images-idx3-ubyte']}: test images are "
            f"{'x'.join(map(str, test_images.shape[1:]))}, expected the training images' "
            f"{'x'.join(map(str, train_images.shape[1:]))}"
        )
    return MNIST(train_images, train_labels, test_images, test_labels)


def _check_pair(images, labels, img_path, lab_path):
    """Check one images/labels pair has MNIST's structure; return them as uint8."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{img_path}: images are {images.dtype} with shape {images.shape}, "
            "expected uint8 (n, height, width)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{lab_path}: labels are {labels.dtype} with shape {labels.shape}, "
            "expected integers (n,)"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DatasetError(
            f"{lab_path}: labels range over {labels.min()}..{labels.max()}, expected 0..255"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} "
            "labels; expected the same count"
        )
    return images, labels.astype(np.uint8, copy=False)


# --------------------------------------------------------------------------- batching


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} is {value}, expected {bound}")
    return int(value)


def split_train_valid(images, labels, n_valid=10000):
    """Split off the last `n_valid` examples for validation: the paper's 50k/10k MNIST split.

    Returns (train_x, train_y, valid_x, valid_y) as views; like the paper's Theano code,
    the first 50,000 MNIST training examples train and the last 10,000 validate.
    """
    if len(images) != len(labels):
        raise ValueError(
            f"images has {len(images)} examples but labels has {len(labels)}; "
            "expected the same count"
        )
    n = len(images)
    # At least one training example must remain (none at all only when n == 0).
    n_valid = _check_int("n_valid", n_valid, 0, max(n - 1, 0))
    cut = n - n_valid
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def batches(n, batch_size, rng=None, drop_last=False) -> Iterator[np.ndarray]:
    """Yield index arrays covering range(n) in batches of `batch_size`.

    Shuffled by `rng` (a numpy.random.Generator) when given, in order otherwise. The last
    batch may be smaller unless `drop_last`. Arguments are checked when called, and the
    permutation is drawn then too.
    """
    n = _check_int("n", n, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}; "
            "make one with numpy.random.default_rng(seed)"
        )
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return (order[i : i + batch_size] for i in range(0, stop, batch_size))


def to_pm1(images_uint8, dtype=np.float32) -> np.ndarray:
    """Scale uint8 pixels to [-1, 1] as `(2x - 255) / 256` and flatten to (n, H*W).

    The paper feeds MNIST to its MLP scaled to [-1, 1] (2x/255 - 1). Dividing by 256
    instead of 255 changes only a global factor 255/256, which the batch norm after the
    first layer removes, and makes every value a multiple of 1/256: exact in binary
    floating point, and so is any sum of up to 2^16 of them times +-1. The first layer's
    float32 pre-activation is then exact, and the frozen integer network
    (``deploy.freeze``) reproduces the float model bit for bit. 0 -> -255/256, 255 -> +255/256.
    """
    x = np.asarray(images_uint8)
    if x.dtype != np.uint8:
        raise TypeError(f"images_uint8 has dtype {x.dtype}, expected uint8")
    if x.ndim < 2:
        raise ValueError(f"images_uint8 has shape {x.shape}, expected (n, H, W) or (n, D)")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype is {dtype}, expected a floating dtype")
    out = x.reshape(len(x), -1).astype(dtype)
    out *= dtype.type(2)
    out -= dtype.type(255)
    out /= dtype.type(256)
    return out
