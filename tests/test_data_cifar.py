"""Tests for minibnn.data's CIFAR-10 reader, the CIFAR-10 split, to_pm1 on NCHW images and ZCA.

Every file is written here in the official binary layout (one label byte, then 1024 red,
1024 green, 1024 blue bytes, each plane 32x32 row-major); no test needs the real data.
"""

import numpy as np
import pytest

from minibnn.data import (
    CIFAR10,
    CIFAR10_CLASSES,
    ZCA,
    DatasetError,
    load_cifar10,
    read_cifar10_batch,
    split_cifar10,
    to_pm1,
)

TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST = "test_batch.bin"


def record(label, image):
    """One record, written plane by plane without reshaping tricks."""
    return bytes([label]) + b"".join(image[c].tobytes() for c in range(3))


def write_batch(path, images, labels):
    path.write_bytes(b"".join(record(int(y), x) for x, y in zip(images, labels)))


def make_cifar(parent, n=3, seed=0):
    """Write cifar-10-batches-bin/ under `parent` with `n` records per file; return the arrays."""
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    arrays = {}
    for name in TRAIN + [TEST]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_batch(folder / name, x, y)
        arrays[name] = (x, y)
    return folder, arrays


# --------------------------------------------------------------------------- reading


def test_round_trip_parent_and_folder_forms(tmp_path):
    folder, arrays = make_cifar(tmp_path, n=3)
    for where in (tmp_path, folder, str(folder)):
        c = load_cifar10(where, records_per_batch=3)
        assert isinstance(c, CIFAR10)
        assert c.train_images.shape == (15, 3, 32, 32) and c.test_images.shape == (3, 3, 32, 32)
        assert all(a.dtype == np.uint8 for a in c)
        # data_batch_1..5 in that order
        np.testing.assert_array_equal(c.train_images, np.concatenate([arrays[n][0] for n in TRAIN]))
        np.testing.assert_array_equal(c.train_labels, np.concatenate([arrays[n][1] for n in TRAIN]))
        np.testing.assert_array_equal(c.test_images, arrays[TEST][0])
        np.testing.assert_array_equal(c.test_labels, arrays[TEST][1])
        assert c.train_images.flags.writeable and c.train_images.flags.c_contiguous


def test_pixel_order_is_r_then_g_then_b_planes_row_major(tmp_path):
    # byte k of the pixels holds k % 251: plane c, row h, column w is byte c*1024 + h*32 + w
    pixels = bytes(k % 251 for k in range(3072))
    path = tmp_path / "b.bin"
    path.write_bytes(bytes([7]) + pixels + bytes([2]) + pixels[::-1])
    x, y = read_cifar10_batch(path, records=None)
    assert y.tolist() == [7, 2]
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    np.testing.assert_array_equal(x[0], (c * 1024 + h * 32 + w) % 251)
    assert x[0, 0, 0, 1] == 1 and x[0, 0, 1, 0] == 32 and x[0, 1, 0, 0] == 1024 % 251
    np.testing.assert_array_equal(x[1].reshape(-1), np.frombuffer(pixels[::-1], np.uint8))


def test_default_insists_on_official_record_count(tmp_path):
    make_cifar(tmp_path, n=2)
    with pytest.raises(DatasetError, match=r"data_batch_1\.bin: holds 2 records, expected 10000"):
        load_cifar10(tmp_path)
    x, y = read_cifar10_batch(tmp_path / "cifar-10-batches-bin" / TEST, records=None)
    assert len(x) == len(y) == 2


@pytest.mark.parametrize("cut", [1, 3072, 3074])
def test_truncated_file_names_the_file(tmp_path, cut):
    folder, _ = make_cifar(tmp_path, n=2)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: .*not a whole.*3073-byte"):
        load_cifar10(tmp_path, records_per_batch=2)
    with pytest.raises(ValueError, match="truncated"):
        read_cifar10_batch(path, records=None)


def test_extra_bytes_and_empty_file(tmp_path):
    folder, _ = make_cifar(tmp_path, n=2)
    path = folder / TEST
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=r"test_batch\.bin: 6147 bytes .* 2 records and 1 bytes"):
        load_cifar10(tmp_path, records_per_batch=2)
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"test_batch\.bin: 0 bytes"):
        read_cifar10_batch(path, records=None)


def test_a_whole_extra_record_is_a_wrong_count(tmp_path):
    folder, _ = make_cifar(tmp_path, n=2)
    path = folder / "data_batch_5.bin"
    path.write_bytes(path.read_bytes() * 2)
    with pytest.raises(DatasetError, match=r"data_batch_5\.bin: holds 4 records, expected 2"):
        load_cifar10(tmp_path, records_per_batch=2)


@pytest.mark.parametrize("label", [10, 255])
def test_label_above_9_names_the_file_and_record(tmp_path, label):
    folder, arrays = make_cifar(tmp_path, n=3)
    x, y = arrays["data_batch_2.bin"]
    y = y.copy()
    y[1] = label
    write_batch(folder / "data_batch_2.bin", x, y)
    with pytest.raises(DatasetError, match=rf"data_batch_2\.bin: record 1 has label {label}, "
                                           r"expected 0\.\.9"):
        load_cifar10(tmp_path, records_per_batch=3)


def test_missing_file_names_it_and_says_where_to_get_it(tmp_path):
    folder, _ = make_cifar(tmp_path, n=1)
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_cifar10(tmp_path, records_per_batch=1)
    msg = str(e.value)
    assert "data_batch_4.bin" in msg and "data_batch_1.bin" not in msg.split("Expected")[0]
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    assert "CIFAR-10 binary version" in msg and "cifar-10-batches-bin" in msg


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_1\.bin, .*test_batch\.bin"):
        load_cifar10(tmp_path / "nowhere")


def test_python_version_is_refused_with_a_reason(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="Python version.*unpickling"):
        load_cifar10(tmp_path)


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="data_dir must be a path"):
        load_cifar10(3)
    with pytest.raises(TypeError, match="records must be an int"):
        read_cifar10_batch(tmp_path / "x.bin", records=2.0)
    with pytest.raises(ValueError, match="records is 0"):
        read_cifar10_batch(tmp_path / "x.bin", records=0)


def test_classes():
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[0] == "airplane"
    assert CIFAR10_CLASSES[9] == "truck"


# --------------------------------------------------------------------------- split


def test_split_cifar10_is_first_45000_and_last_5000():
    n = 50000
    ids = np.arange(n)
    c = CIFAR10(ids, ids % 10, ids[:10], ids[:10] % 10)
    tx, ty, vx, vy = split_cifar10(c.train_images, c.train_labels)
    assert len(tx) == len(ty) == 45000 and len(vx) == len(vy) == 5000
    np.testing.assert_array_equal(tx, ids[:45000])
    np.testing.assert_array_equal(vx, ids[45000:])
    assert not set(tx.tolist()) & set(vx.tolist())
    np.testing.assert_array_equal(ty, ids[:45000] % 10)
    assert len(split_cifar10(ids, ids, n_valid=0)[2]) == 0
    with pytest.raises(ValueError, match="images has 50000 examples but labels has 3"):
        split_cifar10(ids, ids[:3])


# --------------------------------------------------------------------------- to_pm1


def test_to_pm1_keeps_nchw_shape_when_asked():
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    kept = to_pm1(x, flatten=False)
    assert kept.shape == (4, 3, 5, 6) and kept.dtype == np.float32
    np.testing.assert_array_equal(kept.reshape(4, -1), to_pm1(x))
    assert to_pm1(x).shape == (4, 90)
    np.testing.assert_array_equal(kept, (2 * x.astype(np.float64) - 255) / 256)
    assert to_pm1(x, np.float64, flatten=False).dtype == np.float64
    with pytest.raises(TypeError, match="flatten must be a bool"):
        to_pm1(x, flatten=0)


# --------------------------------------------------------------------------- ZCA


def correlated(n=4000, d=48, seed=0):
    """Gaussian data with a random, far-from-identity covariance and a nonzero mean."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.geomspace(3.0, 0.3, d)
    return (rng.normal(size=(n, d)) @ mix + rng.normal(size=d)).astype(np.float32)


def test_zca_whitens_the_training_data():
    x = correlated()
    z = ZCA.fit(x, eps=1e-6)
    w = z.transform(x)
    assert w.dtype == np.float32 and w.shape == x.shape
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=1e-4)
    cov = np.cov(w.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(48), atol=1e-3)
    # zero-phase: the whitening matrix is symmetric (unlike PCA whitening's rotation)
    np.testing.assert_allclose(z.matrix, z.matrix.T, atol=1e-5 * np.abs(z.matrix).max())


def test_zca_eps_whitens_leading_components_and_damps_tiny_ones():
    rng = np.random.default_rng(1)
    x = correlated(d=12)
    x = np.concatenate([x, 1e-3 * rng.normal(size=(len(x), 1)).astype(np.float32)], axis=1)
    z = ZCA.fit(x, eps=1e-2)
    s = np.linalg.eigvalsh(np.cov(z.transform(x).astype(np.float64), rowvar=False))[::-1]
    np.testing.assert_allclose(s[:10], 1, atol=0.05)   # variances >> eps: whitened
    assert s[-1] < 1e-3                                 # the 1e-6-variance direction: damped
    assert z.eps == 1e-2


def test_zca_fit_uses_only_what_it_is_given():
    x = correlated()
    train, valid = x[:3000], x[3000:] + 5
    before = train.copy()
    z = ZCA.fit(train)
    np.testing.assert_array_equal(train, before)              # input untouched
    np.testing.assert_allclose(z.mean, train.mean(axis=0), atol=1e-5)
    mean, matrix = z.mean.copy(), z.matrix.copy()
    z.transform(valid)
    np.testing.assert_array_equal(z.mean, mean)               # transform fits nothing
    np.testing.assert_array_equal(z.matrix, matrix)
    again = ZCA.fit(train, chunk=7)                           # deterministic, chunking aside
    np.testing.assert_allclose(again.matrix, matrix, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ZCA.fit(train).matrix, matrix)
    # the held-out data's own statistics never enter: shifted valid is not centred
    assert abs(z.transform(valid).mean()) > 0.1


def test_zca_nchw_is_flattened_transformed_and_reshaped():
    x = correlated(n=500, d=3 * 4 * 4).reshape(500, 3, 4, 4)
    z = ZCA.fit(x)
    flat = ZCA.fit(x.reshape(500, -1))
    np.testing.assert_array_equal(z.matrix, flat.matrix)
    w = z.transform(x[:7])
    assert w.shape == (7, 3, 4, 4) and w.dtype == np.float32
    np.testing.assert_array_equal(w.reshape(7, -1), flat.transform(x[:7].reshape(7, -1)))
    np.testing.assert_allclose(z.transform(x[:7].astype(np.float64)), w, atol=1e-6)


def test_zca_errors():
    x = correlated(n=50, d=6)
    with pytest.raises(TypeError, match="dtype uint8.*to_pm1"):
        ZCA.fit(x.astype(np.uint8))
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        ZCA.fit(x[:, 0])
    with pytest.raises(ValueError, match="1 examples"):
        ZCA.fit(x[:1])
    with pytest.raises(ValueError, match="eps is 0"):
        ZCA.fit(x, eps=0)
    with pytest.raises(TypeError, match="eps must be a float"):
        ZCA.fit(x, eps="1")
    with pytest.raises(ValueError, match=r"shape \(50, 5\), 5 values .* fitted on 6"):
        ZCA.fit(x).transform(x[:, :5])
