"""The numba backward of a binary convolution (kernels/numba_conv.py,
``binary_conv2d_backward``) against the NumPy code it replaces (``functional.conv2d_backward``
on im2col patches): the input gradient in the reference's summation order, bit for bit
against a NumPy transcription of that order; the weight gradient, whose order BLAS does
not promise, within rounding of the exact (float64) sum. Odd sizes, kh != kw, one image,
an odd number of images (a partial chunk), channels that are not a multiple of anything,
padding 0 to the kernel's reach, float32 and float64; refused layers fall back."""

import numpy as np
import pytest

from minibnn import backend, binary, nn
from minibnn import functional as F
from minibnn.tensor import Tensor
from tests.conftest import backend_params

pytestmark = pytest.mark.parametrize("name", backend_params(("numba",)))

# (N, C, O, H, W, kh, kw, padding), stride 1
SHAPES = [
    (3, 5, 7, 9, 8, 3, 3, 1),
    (1, 1, 1, 5, 5, 3, 3, 1),    # one image, one channel
    (2, 16, 16, 28, 28, 3, 3, 1),  # the MNIST ConvNet's second layer, a small batch
    (5, 23, 3, 6, 7, 3, 2, 1),   # kh != kw, 23 channels, 5 images: a partial chunk
    (2, 3, 9, 7, 6, 2, 3, 0),    # no padding
    (2, 4, 6, 6, 6, 5, 5, 4),    # padding = kernel size - 1: the gradient gets no border
    (2, 33, 5, 4, 4, 3, 3, 2),   # 33 channels, padding 2
    (3, 2, 4, 3, 5, 1, 1, 0),    # 1x1 kernel
    (0, 3, 4, 5, 5, 3, 3, 1),    # empty batch
]
IDS = ["n{}c{}o{}h{}w{}k{}x{}p{}".format(*s) for s in SHAPES]


def _case(shape, dtype, seed=0):
    n, c, o, h, w, kh, kw, p = shape
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, c, h, w)) < 0.5, -1, 1).astype(dtype)
    wb = np.where(rng.random((o, c, kh, kw)) < 0.5, -1, 1).astype(dtype)
    ho, wo = h + 2 * p - kh + 1, w + 2 * p - kw + 1
    g = rng.standard_normal((n, o, ho, wo)).astype(dtype)
    g[(g * 8).round() == 0] = 0.0
    g.reshape(-1)[::11] = -0.0
    return x, wb, g, p


def _gx_in_reference_order(g, wb, x_shape, p):
    """The input gradient summed as BLAS + col2im sum it: for each tap (i, j) row-major,
    S_ij = sum over o ascending of wb[o, c, i, j] * g[o] at the tap's output position (one
    rounding per added product), then gx = ((0 + S_00) + S_01) + ..., in NumPy float ops."""
    n, c, h, w = x_shape
    o, _, kh, kw = wb.shape
    ho, wo = g.shape[2:]
    gx = np.zeros(x_shape, g.dtype)
    for i in range(kh):
        for j in range(kw):
            # input (y, z) takes output (y + p - i, z + p - j) where that exists
            y0, y1 = max(0, i - p), min(h, ho + i - p)
            z0, z1 = max(0, j - p), min(w, wo + j - p)
            s = np.zeros((n, c, h, w), g.dtype)
            for k in range(o):
                part = g[:, k, y0 + p - i:y1 + p - i, z0 + p - j:z1 + p - j]
                s[:, :, y0:y1, z0:z1] += wb[k, :, i, j][None, :, None, None] * part[:, None]
            gx += s
    return gx


def _gw_exact(g, x, wb, p):
    """The weight gradient in float64 (exact for these sizes: +-1 times float32) and the
    sum of its terms' magnitudes, the scale of any float32 rounding of it."""
    kh, kw = wb.shape[2:]
    patches = F.im2col(x.astype(np.float64), kh, kw, 1, p)
    g2 = g.astype(np.float64).transpose(1, 0, 2, 3).reshape(wb.shape[0], -1)
    return (g2 @ patches).reshape(wb.shape), (np.abs(g2) @ np.abs(patches)).reshape(wb.shape)


def _variant(variant):
    """The ``tiles`` argument of ``binary_conv2d_backward`` for each way it can run: the
    plain loops, and every tile set of ``numba_conv_tiles`` (whatever this CPU would pick:
    a 64-byte set runs split into 32-byte vectors where there is no AVX-512)."""
    from minibnn.kernels import numba_conv_tiles
    return False if variant == "loops" else numba_conv_tiles.TILES[int(variant[5:])]


VARIANTS = ["loops", "tiles64", "tiles32"]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_equal_the_reference(name, shape, dtype, variant):
    from minibnn.kernels import numba_conv
    x, wb, g, p = _case(shape, dtype)
    assert numba_conv.direct_backward_fits(x, g, wb, 1, p)
    gx, gw = numba_conv.binary_conv2d_backward(g, x, wb, 1, p, tiles=_variant(variant))
    assert gx.shape == x.shape and gx.dtype == dtype and gw.shape == wb.shape and gw.dtype == dtype
    np.testing.assert_array_equal(gx, _gx_in_reference_order(g, wb, x.shape, p))
    exact, scale = _gw_exact(g, x, wb, p)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    assert np.all(np.abs(gw - exact) <= tol * scale), np.abs(gw - exact).max()
    # the BLAS path this replaces: the same input gradient up to rounding, and its weight
    # gradient meets the same bound
    with backend.use("numpy"):
        gx_ref, gw_ref = F.conv2d_backward(g, x.shape, wb, 1, p, F.im2col(x, *wb.shape[2:], 1, p))
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=tol * np.abs(gx_ref).max(initial=1.0))
    assert np.all(np.abs(gw_ref - exact) <= tol * scale)


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_tiles_keep_their_planes_between_calls(name, variant):
    """The tile sets keep each thread's planes from call to call (zero borders written
    once): a run of calls with other batch sizes (a partial last chunk after full ones),
    other layers and a 1x1 kernel without padding (whose gradient plane has no border, so
    a partial chunk meets an earlier chunk's data right past its last pixel) gives what
    the plain loops give on every call."""
    from minibnn.kernels import numba_conv
    tiles = _variant(variant)
    for n, c, o, hw, k, p in [(9, 3, 5, 7, 3, 1), (6, 3, 5, 7, 3, 1), (9, 3, 5, 7, 3, 1),
                              (8, 4, 3, 5, 1, 0), (7, 4, 3, 5, 1, 0), (2, 4, 3, 5, 1, 0),
                              (5, 3, 5, 7, 3, 1)]:
        x, wb, g, p = _case((n, c, o, hw, hw, k, k, p), np.float32, seed=n + k)
        want = numba_conv.binary_conv2d_backward(g, x, wb, 1, p, tiles=False)
        got = numba_conv.binary_conv2d_backward(g, x, wb, 1, p, tiles=tiles)
        np.testing.assert_array_equal(got[0], want[0])
        exact, scale = _gw_exact(g, x, wb, p)
        assert np.all(np.abs(got[1] - exact) <= 1e-5 * scale)


def test_gradients_do_not_depend_on_the_thread_count(name):
    import numba

    from minibnn.kernels import numba_conv
    x, wb, g, p = _case((7, 6, 5, 9, 9, 3, 3, 1), np.float32, seed=3)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = numba_conv.binary_conv2d_backward(g, x, wb, 1, p)
    finally:
        numba.set_num_threads(before)
    many = numba_conv.binary_conv2d_backward(g, x, wb, 1, p)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_only_the_gradients_asked_for(name):
    from minibnn.kernels import numba_conv
    x, wb, g, p = _case((3, 4, 5, 6, 6, 3, 3, 1), np.float32)
    gx, gw = numba_conv.binary_conv2d_backward(g, x, wb, 1, p)
    gx_only = numba_conv.binary_conv2d_backward(g, x, wb, 1, p, need_w=False)
    gw_only = numba_conv.binary_conv2d_backward(g, x, wb, 1, p, need_x=False)
    assert gx_only[1] is None and gw_only[0] is None
    np.testing.assert_array_equal(gx_only[0], gx)
    np.testing.assert_array_equal(gw_only[1], gw)


def test_layers_it_does_not_take_are_refused_by_name(name):
    from minibnn.kernels import numba_conv
    x, wb, g, p = _case((2, 3, 4, 6, 6, 3, 3, 1), np.float32)
    assert not numba_conv.direct_backward_fits(x, g, wb, 2, p)       # stride 2
    assert not numba_conv.direct_backward_fits(x, g, wb, 1, 3)       # padding beyond reach
    assert not numba_conv.direct_backward_fits(x.astype(np.float64), g, wb, 1, p)  # dtypes
    with pytest.raises(ValueError, match="stride 2"):
        numba_conv.binary_conv2d_backward(g, x, wb, 2, p)
    with pytest.raises(ValueError, match=r"gradient of shape \(2, 4, 5, 6\)"):
        numba_conv.binary_conv2d_backward(g[:, :, :5], x, wb, 1, p)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 3)])
def test_binary_conv_layer_gradients_equal_numpy(name, stride, padding, xnor_products):
    """A BinaryConv2d layer's gradients on numba (the direct backward at stride 1 and
    padding within reach, the patch path otherwise) equal those on numpy up to rounding,
    the input gradient bit for bit where the direct backward runs."""
    rng = np.random.default_rng(5)
    x = np.where(rng.random((3, 5, 8, 7)) < 0.5, -1, 1).astype(np.float32)
    upstream = rng.standard_normal((3, 6) + F.conv_output_shape(
        x.shape, (6, 5, 3, 3), stride, padding)[2:]).astype(np.float32)
    grads = {}
    for backend_name in ("numpy", name):
        with backend.use(backend_name):
            layer = nn.BinaryConv2d(5, 6, 3, stride=stride, padding=padding, binary_input=True,
                                    rng=np.random.default_rng(1))
            xt = Tensor(x, requires_grad=True)
            (layer(xt) * Tensor(upstream)).sum().backward()
            grads[backend_name] = (xt.grad, layer.weight.grad)
    np.testing.assert_allclose(grads[name][0], grads["numpy"][0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(grads[name][1], grads["numpy"][1], rtol=1e-5, atol=1e-5)
    if stride == 1 and padding == 1:
        wb = binary.sign(layer.weight.data)
        want = _gx_in_reference_order(upstream, wb, x.shape, padding)
        np.testing.assert_array_equal(grads[name][0], want)
