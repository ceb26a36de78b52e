"""Tests for minibnn.data: IDX reading/writing, MNIST loading and verification, batching."""

import gzip
import shutil
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minibnn import data
from minibnn.data import (
    MNIST_FILES,
    DatasetError,
    batches,
    load_mnist,
    mnist_dir,
    read_idx,
    split_train_valid,
    to_pm1,
    write_idx,
)

GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def make_layout(folder, n_train=12, n_test=5, hw=(28, 28), gz=True, seed=0):
    """Write a small synthetic dataset in MNIST's layout and names (like Fashion-MNIST)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), a)
    return arrays


# --------------------------------------------------------------------------- shipped MNIST


def test_shipped_mnist_shapes_dtypes(mnist):
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.train_labels.shape == (60000,)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.test_labels.shape == (10000,)
    for a in mnist:
        assert a.dtype == np.uint8
    assert mnist.train_labels.max() == 9 and mnist.test_labels.max() == 9


def test_shipped_mnist_known_facts(mnist):
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.test_labels[:3].tolist() == [7, 2, 1]
    train_counts = np.bincount(mnist.train_labels, minlength=10)
    test_counts = np.bincount(mnist.test_labels, minlength=10)
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train_counts.sum() == 60000 and test_counts.sum() == 10000
    # White digits on a black background: corners are 0, strokes reach 255.
    assert mnist.train_images[:, [0, 0, -1, -1], [0, -1, 0, -1]].max() == 0
    assert mnist.train_images.min() == 0 and mnist.train_images.max() == 255


def test_mnist_is_a_tuple(mnist):
    xtr, ytr, xte, yte = mnist
    assert xtr is mnist.train_images and yte is mnist.test_labels


def test_mnist_dir_holds_the_files():
    folder = mnist_dir()
    for name in MNIST_FILES:
        assert (folder / (name + ".gz")).is_file()


def test_readme_lists_every_checksum():
    text = (mnist_dir() / "README.md").read_text()
    for name, (gz_sha, raw_sha) in data.MNIST_SHA256.items():
        assert name in text and gz_sha in text and raw_sha in text
    assert "LeCun" in text and "Attribution-Share Alike 3.0" in text


def test_shipped_copy_rejects_verify_false():
    with pytest.raises(ValueError, match="shipped"):
        load_mnist(verify=False)


def test_corrupted_shipped_copy_says_reinstall(tmp_path, monkeypatch):
    for name in MNIST_FILES:
        shutil.copy(mnist_dir() / (name + ".gz"), tmp_path)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    monkeypatch.setattr(data, "mnist_dir", lambda: tmp_path)
    with pytest.raises(DatasetError, match="checksum") as e:
        load_mnist()
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value) and "reinstall" in str(e.value)


def test_missing_shipped_file_says_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "mnist_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz") as e:
        load_mnist()
    assert "reinstall" in str(e.value)


# --------------------------------------------------------------------------- user folders


def test_raw_and_gz_folder_loads_and_verifies(tmp_path, mnist):
    # Mix: images uncompressed, labels gzipped; the checksums are of the uncompressed bytes.
    for name in MNIST_FILES:
        src = mnist_dir() / (name + ".gz")
        if "images" in name:
            with gzip.open(src, "rb") as f, open(tmp_path / name, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copy(src, tmp_path)
    for verify in (None, True):
        got = load_mnist(str(tmp_path), verify=verify)
        for a, b in zip(got, mnist):
            np.testing.assert_array_equal(a, b)


def test_missing_file_names_file_and_folder(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in msg and str(tmp_path) in msg
    assert "--data-dir" in msg and "train-images" not in msg


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nope")


def test_fashion_like_folder_loads_without_mnist_checksums(tmp_path):
    arrays = make_layout(tmp_path, n_train=7, n_test=3)
    got = load_mnist(tmp_path)
    np.testing.assert_array_equal(got.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(got.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(got.test_images, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(got.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert load_mnist(tmp_path, verify=False).train_images.shape == (7, 28, 28)


def test_other_image_sizes_load(tmp_path):
    make_layout(tmp_path, hw=(8, 5), gz=False)
    assert load_mnist(tmp_path).test_images.shape == (5, 8, 5)


def test_verify_true_checksum_mismatch_names_file(tmp_path):
    make_layout(tmp_path)
    with pytest.raises(DatasetError, match="checksum") as e:
        load_mnist(tmp_path, verify=True)
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_verify_must_be_bool_or_none(tmp_path):
    make_layout(tmp_path)
    with pytest.raises(TypeError, match="verify"):
        load_mnist(tmp_path, verify="yes")


def test_count_mismatch(tmp_path):
    make_layout(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="5 images") as e:
        load_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_image_size_mismatch_between_train_and_test(tmp_path):
    make_layout(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 27, 28), np.uint8))
    with pytest.raises(DatasetError, match="27x28"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("train-images-idx3-ubyte", np.zeros((12, 784), np.uint8), "expected uint8 \\(n, height"),
        ("train-images-idx3-ubyte", np.zeros((12, 28, 28), np.float32), "float32"),
        ("train-labels-idx1-ubyte", np.zeros((12, 1), np.uint8), "expected integers"),
        ("train-labels-idx1-ubyte", np.zeros(12, np.float64), "float64"),
        ("train-labels-idx1-ubyte", np.full(12, 256, np.int32), "0..255"),
        ("train-labels-idx1-ubyte", np.full(12, -1, np.int8), "0..255"),
    ],
)
def test_structure_errors(tmp_path, name, array, match):
    make_layout(tmp_path)
    write_idx(tmp_path / (name + ".gz"), array)
    with pytest.raises(DatasetError, match=match) as e:
        load_mnist(tmp_path)
    assert name in str(e.value)


def test_wide_integer_labels_become_uint8(tmp_path):
    make_layout(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12, dtype=np.int32))
    got = load_mnist(tmp_path)
    assert got.train_labels.dtype == np.uint8
    assert got.train_labels.tolist() == list(range(12))


# --------------------------------------------------------------------------- IDX files

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_read_roundtrip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("x.idx" + suffix)
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.flags.writeable
    np.testing.assert_array_equal(a, b)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_big_endian_on_disk(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0B, 1]) + (2).to_bytes(4, "big") + b"\x01\x02\xff\xfe")
    a = read_idx(path)
    assert a.dtype == np.int16 and a.tolist() == [258, -2]
    write_idx(tmp_path / "y", a)
    assert (tmp_path / "y").read_bytes() == path.read_bytes()


def test_gzip_detected_by_magic_not_extension(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", a)
    (tmp_path / "a.gz").rename(tmp_path / "gzipped_without_suffix")
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped_without_suffix"), a)
    write_idx(tmp_path / "b", a)
    (tmp_path / "b").rename(tmp_path / "raw_with_suffix.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "raw_with_suffix.gz"), a)


def test_truncated_gz_is_dataset_error(tmp_path):
    src = (mnist_dir() / "t10k-labels-idx1-ubyte.gz").read_bytes()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(src[: len(src) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        read_idx(path)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert isinstance(e.value.__cause__, GZIP_ERRORS)


def test_truncated_gz_in_folder_is_dataset_error(tmp_path):
    make_layout(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path)


def test_corrupt_magic_is_dataset_error(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    write_idx(path, np.arange(5, dtype=np.uint8))
    raw = bytearray(path.read_bytes())
    raw[0] = 0x12
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="magic") as e:
        read_idx(path)
    assert "bad-idx1-ubyte" in str(e.value)


def test_unknown_type_code_is_dataset_error(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0A, 1]) + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(path)


@pytest.mark.parametrize("payload", [b"", b"\x00\x01"])
def test_zero_dims_or_short_header(tmp_path, payload):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x08, 0]) if not payload else bytes([0, 0, 0x08, 3]) + payload)
    with pytest.raises(DatasetError, match="dimensions"):
        read_idx(path)


def test_wrong_payload_length_raw(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((3, 4, 5), np.uint8))
    good = path.read_bytes()
    path.write_bytes(good[:-7])
    with pytest.raises(DatasetError, match="truncated: header says 3x4x5 .* = 60 bytes, found 53"):
        read_idx(path)
    path.write_bytes(good + b"\x00")
    with pytest.raises(DatasetError, match="trailing data") as e:
        read_idx(path)
    assert "train-images-idx3-ubyte" in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty|4-byte header"):
        read_idx(path)


def test_missing_idx_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def test_write_idx_rejects_bad_arrays(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="0 dimensions"):
        write_idx(tmp_path / "x", np.float32(1.0))
    assert list(tmp_path.iterdir()) == []


_SMALL = np.arange(40, dtype=np.int16).reshape(4, 10)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_damaged_files_raise_only_dataset_error(tmp_path_factory, data):
    """Any prefix or single-byte flip of a valid file gives the original array or DatasetError."""
    folder = tmp_path_factory.mktemp("idx")
    gz = data.draw(st.booleans())
    path = folder / ("x.gz" if gz else "x")
    write_idx(path, _SMALL)
    good = path.read_bytes()
    truncate = data.draw(st.booleans())
    if truncate:
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        pos = data.draw(st.integers(0, len(good) - 1))
        bad = bytearray(good)
        bad[pos] ^= data.draw(st.integers(1, 255))
        bad = bytes(bad)
    path.write_bytes(bad)
    try:
        out = read_idx(path)
    except DatasetError as e:
        assert str(path) in str(e)
    else:
        # A strict prefix never parses; a flipped byte may land where gzip does not look
        # (mtime, OS) or in a raw payload, which leaves a valid file of the same shape.
        assert not truncate
        assert out.shape == _SMALL.shape
        if gz:
            np.testing.assert_array_equal(out, _SMALL)


# --------------------------------------------------------------------------- split, batches, to_pm1


def test_split_train_valid_paper_split(mnist):
    tx, ty, vx, vy = split_train_valid(mnist.train_images, mnist.train_labels)
    assert tx.shape == (50000, 28, 28) and ty.shape == (50000,)
    assert vx.shape == (10000, 28, 28) and vy.shape == (10000,)
    np.testing.assert_array_equal(vy, mnist.train_labels[50000:])
    assert ty[0] == 5


def test_split_train_valid_sizes():
    x, y = np.arange(10), np.arange(10) * 2
    tx, ty, vx, vy = split_train_valid(x, y, n_valid=3)
    assert tx.tolist() == list(range(7)) and vx.tolist() == [7, 8, 9]
    assert vy.tolist() == [14, 16, 18]
    tx, ty, vx, vy = split_train_valid(x, y, n_valid=0)
    assert len(tx) == 10 and len(vx) == 0


@pytest.mark.parametrize("n_valid", [-1, 10, 11])
def test_split_train_valid_out_of_range(n_valid):
    with pytest.raises(ValueError, match="n_valid is .*expected in 0..9"):
        split_train_valid(np.zeros(10), np.zeros(10), n_valid=n_valid)


def test_split_train_valid_errors():
    with pytest.raises(TypeError, match="n_valid"):
        split_train_valid(np.zeros(10), np.zeros(10), n_valid=2.5)
    with pytest.raises(ValueError, match="same count"):
        split_train_valid(np.zeros(10), np.zeros(9))


def test_batches_in_order():
    got = [b.tolist() for b in batches(8, 3)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # a trailing batch of one would leave batch norm without a batch variance: merged
    assert [b.tolist() for b in batches(7, 3)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [b.tolist() for b in batches(1, 3)] == [[0]]  # n = 1 cannot be merged
    assert [len(b) for b in batches(4, 1)] == [1, 1, 1, 1]  # asked for batches of one
    assert [b.tolist() for b in batches(7, 3, drop_last=True)] == [[0, 1, 2], [3, 4, 5]]
    assert list(batches(0, 3)) == []
    assert list(batches(2, 3, drop_last=True)) == []


@given(n=st.integers(0, 300), bs=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       drop_last=st.booleans())
def test_batches_shuffled_cover_each_index_once(n, bs, seed, drop_last):
    out = list(batches(n, bs, rng=np.random.default_rng(seed), drop_last=drop_last))
    sizes = [len(b) for b in out]
    assert all(s == bs for s in sizes[:-1])
    assert not sizes or sizes[-1] <= bs + 1
    assert 1 not in sizes or n == 1 or bs == 1  # never a lone trailing example
    allidx = np.concatenate(out) if out else np.array([], int)
    assert len(np.unique(allidx)) == len(allidx)
    assert len(allidx) == (n - n % bs if drop_last else n)
    assert allidx.size == 0 or (allidx.min() >= 0 and allidx.max() < n)
    again = list(batches(n, bs, rng=np.random.default_rng(seed), drop_last=drop_last))
    assert all(np.array_equal(a, b) for a, b in zip(out, again))


def test_batches_shuffles():
    out = np.concatenate(list(batches(100, 10, rng=np.random.default_rng(0))))
    assert sorted(out.tolist()) == list(range(100)) and out.tolist() != list(range(100))


def test_batches_errors_raised_at_call():
    with pytest.raises(ValueError, match="batch_size"):
        batches(10, 0)
    with pytest.raises(ValueError, match="n is -1"):
        batches(-1, 2)
    with pytest.raises(TypeError, match="default_rng"):
        batches(10, 2, rng=0)
    with pytest.raises(TypeError, match="batch_size"):
        batches(10, 2.0)


def test_to_pm1(mnist):
    x = to_pm1(mnist.test_images[:100])
    assert x.shape == (100, 784) and x.dtype == np.float32
    assert x.min() == -255 / 256 and x.max() == 255 / 256
    px = np.array([[0, 255, 127, 128]], np.uint8)
    want = [[-255 / 256, 255 / 256, -1 / 256, 1 / 256]]
    np.testing.assert_array_equal(to_pm1(px, np.float64), want)
    np.testing.assert_array_equal(to_pm1(px, np.float32), np.float32(want))
    # every value is k/256: its float32 sums with +-1 weights are exact
    allpx = np.arange(256, dtype=np.uint8).reshape(1, 256)
    np.testing.assert_array_equal(to_pm1(allpx)[0] * 256, 2 * np.arange(256) - 255)
    assert to_pm1(px, np.float64).dtype == np.float64


def test_to_pm1_errors():
    with pytest.raises(TypeError, match="float32.*expected uint8"):
        to_pm1(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_pm1(np.zeros(3, np.uint8))
    with pytest.raises(TypeError, match="floating"):
        to_pm1(np.zeros((2, 3), np.uint8), dtype=np.int32)
