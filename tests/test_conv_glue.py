"""The numba backend's compiled convolution glue (kernels/numba_conv.py) equals the NumPy
code it replaces, bit for bit, on awkward shapes: odd sizes, stride 2, padding wider
than the kernel's reach, one image, one channel, empty batches, overlapping pools."""

import numpy as np
import pytest

from minibnn import backend, binary, functional as F
from minibnn.tensor import Tensor
from tests.conftest import REASONS

pytestmark = pytest.mark.skipif(REASONS["numba"] is not None, reason=str(REASONS["numba"]))

# (N, C, H, W, kh, kw, stride, padding)
CONV_SHAPES = [
    (2, 3, 7, 5, 3, 3, 1, 1),
    (1, 1, 5, 5, 3, 3, 2, 1),
    (3, 5, 9, 8, 3, 2, 2, 0),
    (2, 7, 6, 6, 5, 5, 1, 2),
    (2, 4, 4, 4, 3, 3, 1, 3),   # padding wider than the kernel's reach: whole padded rows
    (1, 23, 5, 6, 3, 3, 1, 1),  # 23*9 = 207 taps: a patch spans 4 words, the last partial
    (4, 8, 8, 8, 1, 1, 1, 0),   # 1x1 kernel: 8 taps, one partial word
    (2, 16, 6, 6, 2, 2, 2, 0),  # 64 taps: exactly one full word
    (0, 3, 5, 5, 3, 3, 1, 1),   # empty batch
]


def _glue():
    return backend.conv_kernels("numba")


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_equals_numpy(shape, dtype):
    n, c, h, w, kh, kw, s, p = shape
    x_shape = (n, c, h, w)
    _, _, ho, wo = F.conv_output_shape(x_shape, (1, c, kh, kw), s, p)
    cols = np.random.default_rng(0).standard_normal((n * ho * wo, c * kh * kw)).astype(dtype)
    with backend.use("numpy"):
        want = F.col2im(cols, x_shape, kh, kw, s, p)
    got = _glue().col2im(cols, x_shape, kh, kw, s, p)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # same summation order: bit for bit
    # the F-ordered view conv2d_backward hands it, and the numba backend's dispatch
    with backend.use("numba"):
        np.testing.assert_array_equal(F.col2im(np.asfortranarray(cols), x_shape, kh, kw, s, p), want)


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_pack_sign_patches_equals_pack_of_numpy_patches(shape):
    n, c, h, w, kh, kw, s, p = shape
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype(np.float32)
    x[x.round(1) == 0] = 0.0  # zeros count as +1
    from minibnn.kernels import reference
    want = reference.pack_rows(binary.conv_sign_patches(x, kh, kw, s, p))
    got = _glue().pack_sign_patches(x, kh, kw, s, p)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", CONV_SHAPES[:-1], ids=str)
def test_xnor_conv2d_on_numba_equals_the_float_convolution(shape):
    n, c, h, w, kh, kw, s, p = shape
    rng = np.random.default_rng(2)
    x = np.where(rng.random((n, c, h, w)) < 0.5, -1.0, 1.0).astype(np.float32)
    wb = np.where(rng.random((3, c, kh, kw)) < 0.5, -1.0, 1.0).astype(np.float32)
    with backend.use("numpy"):
        want = F.conv2d(Tensor(x), Tensor(wb), stride=s, padding=p).data
    with backend.use("numba"):
        got = binary.xnor_conv2d(x, wb, s, p, dtype=np.float32)
    np.testing.assert_array_equal(got, want)


# (N, C, H, W, k, stride)
POOL_SHAPES = [(2, 3, 8, 8, 2, 2), (1, 1, 7, 5, 2, 2), (2, 2, 7, 7, 3, 2), (2, 3, 6, 6, 3, 1),
               (3, 2, 5, 9, 2, 1), (0, 2, 4, 4, 2, 2)]


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_forward_and_backward_equal_numpy(shape, ties):
    n, c, h, w, k, s = shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    if ties:  # integer-valued like a BNN's conv output: many equal maxima
        x = rng.integers(-2, 3, size=x.shape).astype(np.float32)
    _, _, ho, wo = F.pool_output_shape(x.shape, k, s)
    g = rng.standard_normal((n, c, ho, wo)).astype(np.float32)
    results = {}
    for name in ("numpy", "numba"):
        with backend.use(name):
            xt = Tensor(x, requires_grad=True)
            out = F.max_pool2d(xt, k, s)
            (out * Tensor(g)).sum().backward()
            results[name] = (out.data, xt.grad)
    np.testing.assert_array_equal(results["numba"][0], results["numpy"][0])
    np.testing.assert_array_equal(results["numba"][1], results["numpy"][1])


def test_max_pool_tie_goes_to_the_first_element_on_numba():
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]], dtype=np.float32)
    with backend.use("numba"):
        xt = Tensor(x, requires_grad=True)
        F.max_pool2d(xt, 2).sum().backward()
    np.testing.assert_array_equal(xt.grad[0, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_glue_is_only_offered_on_numba():
    assert backend.conv_kernels("numpy") is None
    assert backend.conv_kernels("numba") is not None
    with backend.use("numba"):  # a CuPy array or a non-array never takes the numba path
        assert F.compiled_glue(np.zeros(1)) is not None
        assert F.compiled_glue([0.0]) is None
