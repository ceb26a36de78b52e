"""Tests for minibnn.data's SVHN reader (format 2, .mat files through scipy) and split.

The .mat files are written here with scipy.io.savemat in the official layout (X uint8
(32, 32, 3, n), y (n, 1) with 10 for the digit 0); no test needs the real data.
"""

import sys

import numpy as np
import pytest

from minibnn.data import SVHN, DatasetError, load_svhn, read_svhn_mat, split_svhn


def savemat():
    return pytest.importorskip("scipy.io", reason="the SVHN reader needs scipy").savemat


def write_mat(path, images, labels, **override):
    """Write NCHW uint8 images and 0..9 labels as an SVHN format-2 file."""
    mat = {
        "X": np.ascontiguousarray(images.transpose(2, 3, 1, 0)),  # (H, W, C, n)
        "y": np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1),
    }
    mat.update(override)
    savemat()(str(path), mat)


def tagged(n, labels, seed=0):
    """n random images whose first two pixel bytes hold a unique id (for disjointness)."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    ids = np.arange(n) + 1000 * seed
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids % 256, ids // 256
    return x, np.asarray(labels, dtype=np.uint8)


def ids_of(x):
    return set((x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 0, 1].astype(int)).tolist())


def make_svhn(folder, n_train=20, n_test=7, n_extra=None):
    arrays = {"train": tagged(n_train, np.arange(n_train) % 10, 1),
              "test": tagged(n_test, np.arange(n_test) % 10, 2)}
    if n_extra:
        arrays["extra"] = tagged(n_extra, (np.arange(n_extra) * 3) % 10, 3)
    for name, (x, y) in arrays.items():
        write_mat(folder / f"{name}_32x32.mat", x, y)
    return arrays


# --------------------------------------------------------------------------- reading


def test_round_trip_and_label_10_is_digit_0(tmp_path):
    arrays = make_svhn(tmp_path)
    s = load_svhn(tmp_path)
    assert isinstance(s, SVHN) and s.extra_images is None and s.extra_labels is None
    for (x, y), got_x, got_y in [(arrays["train"], s.train_images, s.train_labels),
                                 (arrays["test"], s.test_images, s.test_labels)]:
        assert got_x.dtype == got_y.dtype == np.uint8
        assert got_x.shape == x.shape and got_x.flags.c_contiguous
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    # the file itself stores 10 for the digit 0
    raw = pytest.importorskip("scipy.io").loadmat(str(tmp_path / "train_32x32.mat"))["y"]
    assert raw[0, 0] == 10 and s.train_labels[0] == 0 and raw.min() == 1


def test_axes_are_row_column_channel_example(tmp_path):
    x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    x[5, 7, 2, 1] = 200  # row 5, column 7, blue, second image
    path = tmp_path / "t.mat"
    savemat()(str(path), {"X": x, "y": np.array([[3], [10]], dtype=np.uint8)})
    images, labels = read_svhn_mat(path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 0]
    assert images[1, 2, 5, 7] == 200 and images.sum() == 200


def test_extra(tmp_path):
    arrays = make_svhn(tmp_path, n_extra=30)
    s = load_svhn(tmp_path, extra=True)
    np.testing.assert_array_equal(s.extra_images, arrays["extra"][0])
    np.testing.assert_array_equal(s.extra_labels, arrays["extra"][1])


def test_missing_files_are_named_with_where_to_get_them(tmp_path):
    savemat()
    make_svhn(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing extra_32x32\.mat.*housenumbers"):
        load_svhn(tmp_path, extra=True)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing test_32x32\.mat\. Expected"):
        load_svhn(tmp_path)


def test_missing_scipy_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match=r"pip install minibnn\[svhn\]"):
        load_svhn(tmp_path)
    with pytest.raises(ImportError, match="scipy"):
        read_svhn_mat(tmp_path / "train_32x32.mat")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_file_names_it(tmp_path, damage):
    make_svhn(tmp_path)
    path = tmp_path / "train_32x32.mat"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 300)
    with pytest.raises(DatasetError, match=r"train_32x32\.mat: not a readable MATLAB \.mat"):
        load_svhn(tmp_path)


@pytest.mark.parametrize("override, message", [
    ({"X": np.zeros((28, 28, 3, 4), np.uint8)}, r"X is uint8 with shape \(28, 28, 3, 4\)"),
    ({"X": np.zeros((32, 32, 3, 4), np.float64)}, "X is float64"),
    ({"y": np.ones((5, 1), np.uint8)}, r"y is uint8 with shape \(5, 1\), .* 4 images"),
    ({"y": np.array([[1], [0], [2], [3]], np.uint8)}, r"example 1 has label 0, expected 1\.\.10"),
    ({"y": np.array([[1], [2], [11], [3]], np.uint8)}, "example 2 has label 11"),
    ({"y": np.array([[1], [2], [3.5], [3]])}, "example 2 has label 3.5"),
])
def test_wrong_contents_name_the_file(tmp_path, override, message):
    x, y = tagged(4, [1, 2, 3, 4])
    path = tmp_path / "test_32x32.mat"
    write_mat(path, x, y, **override)
    with pytest.raises(DatasetError, match=r"test_32x32\.mat: " + message):
        read_svhn_mat(path)


def test_missing_variable(tmp_path):
    path = tmp_path / "train_32x32.mat"
    savemat()(str(path), {"X": np.zeros((32, 32, 3, 1), np.uint8)})
    with pytest.raises(DatasetError, match=r"train_32x32\.mat: no variable y"):
        read_svhn_mat(path)


def test_float_labels_that_are_whole_numbers_are_accepted(tmp_path):
    x, y = tagged(3, [1, 0, 9])
    path = tmp_path / "t.mat"
    write_mat(path, x, y, y=np.array([[1.0], [10.0], [9.0]]))
    assert read_svhn_mat(path)[1].tolist() == [1, 0, 9]


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="data_dir must be a path"):
        load_svhn(None)
    with pytest.raises(TypeError, match="extra must be a bool"):
        load_svhn(tmp_path, extra="yes")


# --------------------------------------------------------------------------- split


def synthetic(n_train=60, n_extra=90, with_extra=True):
    tx, ty = tagged(n_train, np.arange(n_train) % 10, 1)
    ex, ey = tagged(n_extra, (np.arange(n_extra) * 7) % 10, 2)
    te = tagged(5, np.arange(5), 3)
    return SVHN(tx, ty, *te, *((ex, ey) if with_extra else (None, None)))


def test_split_svhn_sizes_balance_and_disjointness():
    s = synthetic()
    tx, ty, vx, vy = split_svhn(s, 4, 2, seed=0)
    assert len(vx) == len(vy) == 10 * (4 + 2)
    assert len(tx) == len(ty) == 60 + 90 - 60
    assert np.bincount(vy, minlength=10).tolist() == [6] * 10
    train_ids, valid_ids = ids_of(tx), ids_of(vx)
    assert len(train_ids) == len(tx) and len(valid_ids) == len(vx)       # no duplicates
    assert not train_ids & valid_ids                                     # disjoint
    assert train_ids | valid_ids == ids_of(s.train_images) | ids_of(s.extra_images)
    # 4 per class from train (ids < 1000 + 60), 2 per class from extra
    assert sum(i < 2000 for i in valid_ids) == 40 and sum(i >= 2000 for i in valid_ids) == 20
    # labels travel with their images
    lookup = {i: y for x, ys in [(s.train_images, s.train_labels), (s.extra_images, s.extra_labels)]
              for i, y in zip(sorted(ids_of(x)), ys)}
    assert all(lookup[i] == y for i, y in zip(
        (tx[:, 0, 0, 0].astype(int) + 256 * tx[:, 0, 0, 1].astype(int)).tolist(), ty))
    # remaining train examples first, then extra, each in file order
    order = tx[:, 0, 0, 0].astype(int) + 256 * tx[:, 0, 0, 1].astype(int)
    assert (np.diff(order) > 0).all() and order[-1] >= 2000


def test_split_svhn_defaults_are_the_authors_400_and_200_per_class():
    s = synthetic(n_train=4100, n_extra=2100)
    tx, ty, vx, vy = split_svhn(s)
    assert len(vx) == 6000 and len(tx) == 4100 + 2100 - 6000
    assert np.bincount(vy, minlength=10).tolist() == [600] * 10


def test_split_svhn_is_deterministic_per_seed():
    s = synthetic()
    a, b, c = split_svhn(s, seed=3, valid_per_class_train=2, valid_per_class_extra=1), \
        split_svhn(s, seed=3, valid_per_class_train=2, valid_per_class_extra=1), \
        split_svhn(s, seed=4, valid_per_class_train=2, valid_per_class_extra=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert ids_of(a[2]) != ids_of(c[2])


def test_split_svhn_without_extra():
    s = synthetic(with_extra=False)
    with pytest.raises(ValueError, match=r"no extra set: load it with load_svhn\(data_dir, "
                                         r"extra=True\)"):
        split_svhn(s)
    tx, ty, vx, vy = split_svhn(s, valid_per_class_train=3, valid_per_class_extra=0)
    assert len(vx) == 30 and len(tx) == 30 and not ids_of(tx) & ids_of(vx)


def test_split_svhn_errors():
    s = synthetic()
    with pytest.raises(ValueError, match="train set has 6 examples of digit 0, fewer than the 7"):
        split_svhn(s, valid_per_class_train=7)
    with pytest.raises(TypeError, match="valid_per_class_train must be an int"):
        split_svhn(s, valid_per_class_train=1.5)
    with pytest.raises(ValueError, match="seed is -1"):
        split_svhn(s, seed=-1)
    with pytest.raises(TypeError, match="svhn must be an SVHN"):
        split_svhn(tuple(s))
