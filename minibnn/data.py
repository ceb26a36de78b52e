"""Dataset readers and batching: IDX files (MNIST and anything in its layout), CIFAR-10's
binary batches, SVHN's format-2 .mat files (through scipy, an optional extra), the paper's
train/validation splits, a shuffled index iterator, pixel scaling to [-1, 1] and ZCA whitening.

Only NumPy, the standard library and ``minibnn.io`` (atomic writes); scipy is imported
lazily by the SVHN reader alone. No reader unpickles anything.
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
    "CIFAR10",
    "CIFAR10_CLASSES",
    "read_cifar10_batch",
    "load_cifar10",
    "split_cifar10",
    "SVHN",
    "read_svhn_mat",
    "load_svhn",
    "split_svhn",
    "ZCA",
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


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS


class CIFAR10(NamedTuple):
    """CIFAR-10: uint8 images (n, 3, 32, 32) in NCHW (RGB) order and uint8 labels 0..9 (n,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _check_data_dir(data_dir, func):
    if not isinstance(data_dir, (str, bytes, pathlib.PurePath)) and not hasattr(
        data_dir, "__fspath__"
    ):
        raise TypeError(
            f"{func}: data_dir must be a path (str or os.PathLike), "
            f"got {type(data_dir).__name__} {data_dir!r}"
        )
    return pathlib.Path(data_dir)


def _cifar10_folder(data_dir) -> pathlib.Path:
    """The folder holding the batches: `data_dir` itself or its `cifar-10-batches-bin`."""
    data_dir = _check_data_dir(data_dir, "load_cifar10")
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    folder = data_dir / CIFAR10_FOLDER if (data_dir / CIFAR10_FOLDER).is_dir() else data_dir
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        hint = ""
        if (data_dir / "cifar-10-batches-py").is_dir() or (folder / "data_batch_1").exists():
            hint = (
                " (this looks like the Python version: minibnn does not read it, because "
                "unpickling a file can run code from it)"
            )
        raise FileNotFoundError(
            f"CIFAR-10 not found in {data_dir}: missing {', '.join(missing)} in {folder}{hint}. "
            f"Expected {CIFAR10_FOLDER}/{{{','.join(names)}}} (data_dir may be that folder "
            f"or its parent): download the \"CIFAR-10 binary version\" from {CIFAR10_URL} "
            "and unpack it with tar xzf cifar-10-binary.tar.gz"
        )
    return folder


def read_cifar10_batch(path, records=10000):
    """Read one batch file of CIFAR-10's binary version into (images, labels).

    Each record is 1 label byte (0..9) then 3072 pixel bytes: 1024 red, 1024 green,
    1024 blue, each plane 32x32 row-major (https://www.cs.toronto.edu/~kriz/cifar.html),
    so a plain reshape gives NCHW uint8 (n, 3, 32, 32). The official files hold 10,000
    records each; `records` insists on that count. Pass another int, or None for any
    positive whole number of records, only for tests and partial copies.
    A wrong size or a label above 9 raises DatasetError naming the file.
    """
    if records is not None:
        records = _check_int("records", records, 1)
    with open(path, "rb") as f:
        raw = f.read()
    n, extra = divmod(len(raw), _CIFAR_RECORD)
    if extra or n == 0:
        raise DatasetError(
            f"{path}: {len(raw)} bytes is not a whole, positive number of {_CIFAR_RECORD}-byte "
            f"records (1 label byte + {_CIFAR_PIXELS} pixel bytes): {n} records and {extra} "
            "bytes over; the file is truncated or not a CIFAR-10 binary batch: replace it "
            f"with an intact copy from {CIFAR10_URL}"
        )
    if records is not None and n != records:
        raise DatasetError(
            f"{path}: holds {n} records, expected {records} ({records * _CIFAR_RECORD} bytes); "
            f"the file is truncated or not a CIFAR-10 binary batch: replace it with an intact "
            f"copy from {CIFAR10_URL} (or, for a partial copy, pass records_per_batch=None)"
        )
    table = np.frombuffer(raw, dtype=np.uint8).reshape(n, _CIFAR_RECORD)
    labels = table[:, 0].copy()
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(
            f"{path}: record {bad[0]} has label {labels[bad[0]]}, expected 0..9 "
            f"({bad.size} bad labels in all); the file is corrupted or not CIFAR-10"
        )
    images = table[:, 1:].reshape(n, 3, 32, 32).copy()
    return images, labels


def load_cifar10(data_dir, records_per_batch=10000) -> CIFAR10:
    """Load CIFAR-10's binary version (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

    `data_dir` is the folder `cifar-10-batches-bin` or its parent; it must hold
    data_batch_1..5.bin (50,000 training images, in that order) and test_batch.bin (10,000).
    Returns a CIFAR10 of uint8 images (n, 3, 32, 32) and uint8 labels (n,).
    The authors' ConvNet (Binarized Neural Networks, arXiv:1602.02830, Section 2; their
    Theano ``cifar10.py``) trains on the first 45,000 and validates on the last 5,000:
    see `split_cifar10`.

    Only the binary version is read: the Python version is pickles, and unpickling runs
    code from the file. A missing file raises FileNotFoundError saying what is expected
    and where to get it; a damaged one raises DatasetError naming it (`read_cifar10_batch`,
    which also explains `records_per_batch`).
    """
    folder = _cifar10_folder(data_dir)
    train = [read_cifar10_batch(folder / n, records_per_batch) for n in CIFAR10_TRAIN_FILES]
    test_images, test_labels = read_cifar10_batch(folder / CIFAR10_TEST_FILE, records_per_batch)
    return CIFAR10(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_images,
        test_labels,
    )


# --------------------------------------------------------------------------- SVHN

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


class SVHN(NamedTuple):
    """SVHN: uint8 images (n, 3, 32, 32) NCHW (RGB) and uint8 labels 0..9 (n,); the extra
    set is None unless loaded with ``extra=True``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    extra_images: np.ndarray | None = None
    extra_labels: np.ndarray | None = None


def _import_loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError(
            "load_svhn reads SVHN's MATLAB .mat files with scipy.io.loadmat, and scipy is not "
            f"installed ({e}): pip install minibnn[svhn] (or pip install scipy)"
        ) from e
    return loadmat


def read_svhn_mat(path):
    """Read one SVHN format-2 file (``*_32x32.mat``) into (images, labels).

    The file holds X, uint8 (32, 32, 3, n) as (row, column, channel, example), and y,
    (n, 1) with labels 1..10 where 10 means the digit 0 (http://ufldl.stanford.edu/housenumbers/,
    "Format 2: Cropped Digits"). Returns NCHW uint8 (n, 3, 32, 32) and uint8 labels 0..9.
    Needs scipy (``pip install minibnn[svhn]``); a damaged file, wrong shapes or labels
    outside 1..10 raise DatasetError naming the file.
    """
    loadmat = _import_loadmat()
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except FileNotFoundError:
        raise
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError, OSError, ...
        raise DatasetError(
            f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}); the file is "
            f"truncated or damaged: replace it with an intact copy from {SVHN_URL}"
        ) from e
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise DatasetError(
            f"{path}: no variable {' or '.join(missing)}; expected X (32, 32, 3, n) uint8 and "
            f"y (n, 1) as in SVHN's format 2 ({SVHN_URL})"
        )
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetError(
            f"{path}: X is {x.dtype} with shape {x.shape}, expected uint8 (32, 32, 3, n)"
        )
    n = x.shape[3]
    if y.dtype.kind not in "iuf" or y.shape not in ((n, 1), (n,)):
        raise DatasetError(
            f"{path}: y is {y.dtype} with shape {y.shape}, expected integer labels ({n}, 1) "
            f"to match X's {n} images"
        )
    y = y.reshape(n)
    bad = np.flatnonzero((y < 1) | (y > 10) | (y != np.round(y)))
    if bad.size:
        raise DatasetError(
            f"{path}: example {bad[0]} has label {y[bad[0]]}, expected 1..10 (10 is the "
            f"digit 0; {bad.size} bad labels in all); the file is corrupted or not SVHN"
        )
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, (y.astype(np.uint8) % 10)


def load_svhn(data_dir, extra=False) -> SVHN:
    """Load SVHN format 2 (Netzer et al. 2011, http://ufldl.stanford.edu/housenumbers/).

    `data_dir` holds train_32x32.mat (73,257 images) and test_32x32.mat (26,032), and
    extra_32x32.mat (531,131) when `extra`: the authors (Binarized Neural Networks,
    arXiv:1602.02830, Section 2; their Theano ``svhn.py``) train on train + extra minus a
    validation set, see `split_svhn`. Labels are mapped to 0..9 (the files'
    10 is the digit 0). Needs scipy: ``pip install minibnn[svhn]``.
    """
    data_dir = _check_data_dir(data_dir, "load_svhn")
    if not isinstance(extra, bool):
        raise TypeError(f"extra must be a bool, got {type(extra).__name__} {extra!r}")
    _import_loadmat()  # say scipy is missing before looking for files
    wanted = ("train", "test", "extra") if extra else ("train", "test")
    missing = [SVHN_FILES[k] for k in wanted if not (data_dir / SVHN_FILES[k]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SVHN not found in {data_dir}: missing {', '.join(missing)}. Expected "
            f"{', '.join(SVHN_FILES[k] for k in wanted)} in that folder: download them from "
            f"{SVHN_URL} (\"Format 2: Cropped Digits\")"
        )
    parts = [read_svhn_mat(data_dir / SVHN_FILES[k]) for k in wanted]
    return SVHN(*(a for part in parts for a in part))


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


def split_cifar10(images, labels, n_valid=5000):
    """The paper's CIFAR-10 split: the first 45,000 training images train, the last 5,000
    validate (the authors' Theano ``cifar10.py``: train_set_size = 45000).

    Call it on a CIFAR10's ``train_images, train_labels``. Returns (train_x, train_y,
    valid_x, valid_y) as views, like `split_train_valid`.
    """
    return split_train_valid(images, labels, n_valid)


def split_svhn(svhn, valid_per_class_train=400, valid_per_class_extra=200, seed=0):
    """Hold out a class-balanced validation set from SVHN train and extra; the rest trains.

    The authors' Theano ``svhn.py`` (BinaryNet) takes pylearn2's SVHN sets
    ``splitted_train`` and ``valid``. pylearn2 (``datasets/svhn.py``, ``split_train_valid``)
    draws, per class, 400 examples of train and 200 of extra for validation (6,000, as in
    Sermanet et al. 2012) and trains on everything else of train + extra (598,388). This
    does the same with its own random draw: `seed` feeds ``numpy.random.default_rng``, so
    the chosen examples differ from pylearn2's (which drew from its own seeded stream)
    but the sizes and the rule are the same. The training set lists the remaining train
    examples, then the remaining extra ones, in file order (`batches` shuffles); the
    validation set likewise. Returns new arrays (train_x, train_y, valid_x, valid_y).

    With `svhn` loaded without extra, pass ``valid_per_class_extra=0`` to split train alone.
    """
    n_t = _check_int("valid_per_class_train", valid_per_class_train, 0)
    n_e = _check_int("valid_per_class_extra", valid_per_class_extra, 0)
    seed = _check_int("seed", seed, 0)
    if not isinstance(svhn, SVHN):
        raise TypeError(f"svhn must be an SVHN from load_svhn, got {type(svhn).__name__}")
    parts = [("train", svhn.train_images, svhn.train_labels, n_t)]
    if svhn.extra_images is not None:
        parts.append(("extra", svhn.extra_images, svhn.extra_labels, n_e))
    elif n_e:
        raise ValueError(
            f"valid_per_class_extra is {n_e} but svhn has no extra set: load it with "
            "load_svhn(data_dir, extra=True), as the authors did, or pass valid_per_class_extra=0"
        )
    rng = np.random.default_rng(seed)
    keeps, valids = [], []
    for name, _, labels, per_class in parts:
        is_valid = np.zeros(len(labels), dtype=bool)
        for c in range(10):
            members = np.flatnonzero(labels == c)
            if len(members) < per_class:
                raise ValueError(
                    f"svhn {name} set has {len(members)} examples of digit {c}, fewer than "
                    f"the {per_class} per class asked for validation"
                )
            is_valid[rng.choice(members, per_class, replace=False)] = True
        keeps.append(np.flatnonzero(~is_valid))
        valids.append(np.flatnonzero(is_valid))

    def gather(index_lists):
        total = sum(len(i) for i in index_lists)
        x = np.empty((total, *svhn.train_images.shape[1:]), dtype=np.uint8)
        y = np.empty(total, dtype=np.uint8)
        start = 0
        for (_, images, labels, _), idx in zip(parts, index_lists):
            np.take(images, idx, axis=0, out=x[start : start + len(idx)])
            np.take(labels, idx, axis=0, out=y[start : start + len(idx)])
            start += len(idx)
        return x, y

    return (*gather(keeps), *gather(valids))


def batches(n, batch_size, rng=None, drop_last=False) -> Iterator[np.ndarray]:
    """Yield index arrays covering range(n) in batches of `batch_size`.

    Shuffled by `rng` (a numpy.random.Generator) when given, in order otherwise. The last
    batch may be smaller unless `drop_last`, but never a batch of one after a full one: a
    trailing single index is merged into the batch before it (which then holds
    ``batch_size + 1``), because batch norm cannot train on one example (its batch
    variance is 0 and every output the same). Arguments are checked when called, and the
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
    starts = list(range(0, stop, batch_size))
    if not drop_last and len(starts) > 1 and n - starts[-1] == 1 and batch_size > 1:
        starts.pop()  # the single last index joins the batch before it
    ends = starts[1:] + [stop]
    return (order[i:j] for i, j in zip(starts, ends))


def check_labels(labels, classes, where):
    """Raise DatasetError naming ``where`` unless every label lies in 0 .. classes - 1.

    Training would stop on such a label, but in validation or test it would silently
    count as an error, so every split is checked the same way before use.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(np.count_nonzero((labels < 0) | (labels >= classes)))
        raise DatasetError(f"{where}: {bad} label{'s' if bad != 1 else ''} outside the "
                           f"{classes} classes (labels range over {labels.min()}.."
                           f"{labels.max()}, expected 0..{classes - 1})")
    return labels


def to_pm1(images_uint8, dtype=np.float32, flatten=True) -> np.ndarray:
    """Scale uint8 pixels to [-1, 1] as `(2x - 255) / 256` and flatten to (n, H*W).

    With ``flatten=False`` the shape is kept: NCHW images (n, 3, 32, 32) come back as
    (n, 3, 32, 32) floats, the input of the CIFAR-10 and SVHN ConvNets (whose Theano code
    scales by 2x/255 - 1, the same up to the factor discussed below).

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
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten must be a bool, got {type(flatten).__name__} {flatten!r}")
    out = (x.reshape(len(x), -1) if flatten else x).astype(dtype)
    out *= dtype.type(2)
    out -= dtype.type(255)
    out /= dtype.type(256)
    return out


class ZCA:
    """ZCA whitening (Bell & Sejnowski 1997): x -> (x - mean) W, W = U diag(1/sqrt(s + eps)) U^T
    where U, s are the eigenvectors and eigenvalues of the training data's covariance.

    For CIFAR-10 the authors' Torch7 code (``Main_BinaryNet_Cifar10.lua``, ``-whiten`` on by
    default) whitens the inputs; their Theano ``cifar10.py`` does not (it feeds 2x/255 - 1).
    Binarized Neural Networks, arXiv:1602.02830, Section 2 reports both. Fit on the
    training split only (`ZCA.fit`), then `transform` train, validation and test alike, so
    nothing of the held-out images leaks into the model.

    `eps` is added to every eigenvalue, in the input's units squared: it bounds how much a
    direction of tiny variance (pixel noise) is amplified, at most 1/sqrt(eps). The default
    1e-2 suits inputs in [-1, 1] (`to_pm1`); it is this library's choice, not a value taken
    from the authors' code. Directions with variance well above `eps` come out with unit
    variance, the others are damped. Computed in float64, stored as float32.
    """

    def __init__(self, mean, matrix, eps):
        self.mean = mean
        self.matrix = matrix
        self.eps = eps

    @classmethod
    def fit(cls, x, eps=1e-2, chunk=4096):
        """Fit on `x`, floats (n, d) or images (n, C, H, W) flattened to (n, C*H*W).

        Uses only `x` (it is not modified); deterministic. `chunk` rows at a time bound the
        float64 working memory.
        """
        x2 = _float_rows(x, "x")
        if len(x2) < 2:
            raise ValueError(f"x has {len(x2)} examples, expected at least 2 to fit a covariance")
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
        if not eps > 0 or not np.isfinite(eps):
            raise ValueError(f"eps is {eps}, expected a finite number > 0")
        chunk = _check_int("chunk", chunk, 1)
        n, d = x2.shape
        mean = np.zeros(d)
        for i in range(0, n, chunk):
            mean += x2[i : i + chunk].sum(axis=0, dtype=np.float64)
        mean /= n
        cov = np.zeros((d, d))
        for i in range(0, n, chunk):
            c = x2[i : i + chunk].astype(np.float64) - mean
            cov += c.T @ c
        cov /= n
        s, u = np.linalg.eigh(cov)
        s = np.maximum(s, 0.0)  # rounding can leave tiny negative eigenvalues
        matrix = (u * (1.0 / np.sqrt(s + eps))) @ u.T
        return cls(mean.astype(np.float32), matrix.astype(np.float32), float(eps))

    def transform(self, x):
        """Whiten `x` (n, d) or (n, C, H, W) with the fitted mean and matrix; float32, same shape."""
        x2 = _float_rows(x, "x")
        d = len(self.mean)
        if x2.shape[1] != d:
            raise ValueError(
                f"x has shape {np.shape(x)}, {x2.shape[1]} values per example; this ZCA was "
                f"fitted on {d}"
            )
        out = (x2.astype(np.float32) - self.mean) @ self.matrix
        return out.reshape(np.shape(x))


def _float_rows(x, name):
    """`x` as a 2-D (n, d) view of a float array with at least 2 dimensions."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name} has dtype {x.dtype}, expected floats (scale uint8 pixels with to_pm1 first)"
        )
    if x.ndim < 2 or x.shape[0] == 0 or any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{name} has shape {x.shape}, expected (n, d) or (n, C, H, W), non-empty")
    return x.reshape(len(x), -1)
