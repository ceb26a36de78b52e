"""The compiled convolution glue equals the NumPy code it replaces, bit for bit, on awkward
shapes: the numba backend's (kernels/numba_conv.py) and the cupy backend's CUDA kernels
(kernels/cupy_conv.py, kernels/conv_glue.cu; those tests carry the ``gpu`` marker). Odd
sizes, kh != kw, stride 2 and 3, padding 0 to 3 (wider than the kernel's reach), one
image, one channel, empty batches, patches of C*kh*kw bits not a multiple of 64,
overlapping pools, max-pool ties, float32 and float64, inputs that are views (F-ordered,
permuted, reversed, broadcast), and on the GPU a grid of one block (the grid-stride loop).
"""

import numpy as np
import pytest
from arrays import dev, host

from minibnn import backend, binary, nn
from minibnn import functional as F
from minibnn.kernels import reference
from minibnn.tensor import Tensor
from tests.conftest import backend_params

GLUES = backend_params(("numba", "cupy"))
CUPY = backend_params(("cupy",))

# (N, C, H, W, kh, kw, stride, padding)
CONV_SHAPES = [
    (2, 3, 7, 5, 3, 3, 1, 1),
    (1, 1, 5, 5, 3, 3, 2, 1),
    (3, 5, 9, 8, 3, 2, 2, 0),
    (2, 3, 8, 7, 2, 3, 2, 2),   # kh < kw, stride 2, padding 2
    (2, 7, 6, 6, 5, 5, 1, 2),
    (2, 4, 4, 4, 3, 3, 1, 3),   # padding wider than the kernel's reach: whole padded rows
    (1, 2, 11, 9, 2, 3, 3, 1),  # stride 3: some input rows are in no window
    (1, 23, 5, 6, 3, 3, 1, 1),  # 23*9 = 207 taps: a patch spans 4 words, the last partial
    (2, 9, 5, 5, 3, 3, 1, 1),   # 81 taps: the second word holds 17 bits
    (4, 8, 8, 8, 1, 1, 1, 0),   # 1x1 kernel: 8 taps, one partial word
    (2, 16, 6, 6, 2, 2, 2, 0),  # 64 taps: exactly one full word
    (1, 32, 3, 5, 2, 2, 1, 1),  # 128 taps: two full words
    (2, 3, 3, 4, 5, 6, 1, 1),   # kernel = padded input: one output position
    (0, 3, 5, 5, 3, 3, 1, 1),   # empty batch
]
IDS = ["n{}c{}h{}w{}k{}x{}s{}p{}".format(*s) for s in CONV_SHAPES]


class Poisoned:
    """An array module (NumPy or CuPy) whose ``empty`` fills the new array with NaN or
    all-ones bits, so an output element a kernel forgets to write cannot pass for a right
    one by holding a previous result (CuPy's pool hands freed blocks back)."""

    def __init__(self, xp):
        self.xp = xp

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        fill = dtype.type(np.nan if dtype.kind == "f" else np.iinfo(dtype).max)
        return self.xp.full(shape, fill, dtype=dtype)

    def __getattr__(self, name):
        return getattr(self.xp, name)


@pytest.fixture(params=GLUES)
def glue(request, monkeypatch):
    """The compiled glue module of each backend that has one, with that backend active
    (cupy's outputs allocated poisoned)."""
    with backend.use(request.param):
        module = backend.conv_kernels(request.param)
        if request.param == "cupy":
            monkeypatch.setattr(module, "_cp", lambda: Poisoned(backend.xp()))
        yield module


@pytest.fixture(params=CUPY)
def cupy_glue(request, monkeypatch):
    """kernels.cupy_conv with the cupy backend active and its outputs allocated poisoned."""
    with backend.use(request.param):
        module = backend.conv_kernels(request.param)
        monkeypatch.setattr(module, "_cp", lambda: Poisoned(backend.xp()))
        yield module


def _layout(a, layout):
    """A device array equal to the NumPy array ``a`` (4-D), laid out as named: "C"
    (contiguous), "permuted" (a transposed view of a contiguous array), "reversed" (the
    last axis a negative-stride view)."""
    if layout == "C":
        return dev(a)
    if layout == "permuted":
        return dev(np.ascontiguousarray(a.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    if layout == "reversed":
        return dev(np.ascontiguousarray(a[..., ::-1]))[..., ::-1]
    raise ValueError(layout)


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name) wraps module.name to count its calls; returns the count dict."""
    calls = {}

    def wrap(module, name):
        inner = getattr(module, name)
        calls[name] = 0

        def counted(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
        return calls
    return wrap


def _signed(rng, shape, dtype):
    """Normal values with exact zeros and negative zeros sprinkled in (both are +1)."""
    x = rng.standard_normal(shape).astype(dtype)
    x[(x * 10).round() == 0] = 0.0
    x.reshape(-1)[::7] = -0.0
    return x


# --------------------------------------------------------------------------- col2im

@pytest.mark.parametrize("shape", CONV_SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_col2im_equals_numpy(glue, shape, dtype):
    n, c, h, w, kh, kw, s, p = shape
    x_shape = (n, c, h, w)
    _, _, ho, wo = F.conv_output_shape(x_shape, (1, c, kh, kw), s, p)
    cols = np.random.default_rng(0).standard_normal((n * ho * wo, c * kh * kw)).astype(dtype)
    with backend.use("numpy"):
        want = F.col2im(cols, x_shape, kh, kw, s, p)
    for layout in ("C", "F"):  # F: the transposed product conv2d_backward hands it
        d = dev(cols) if layout == "C" else backend.xp().asfortranarray(dev(cols))
        got = glue.col2im(d, x_shape, kh, kw, s, p)
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(host(got), want, err_msg=layout)  # same order: bit for bit
        # and through functional.col2im's dispatch on this backend
        np.testing.assert_array_equal(host(F.col2im(d, x_shape, kh, kw, s, p)), want)


def test_col2im_sums_in_the_order_of_the_slice_adds(glue):
    """Values whose sum depends on the order of the additions: 1e8 + 1 - 1e8 is 0 in
    float32 one way round and 1 another, so a kernel summing in another order than the
    (i, j) row-major one of the NumPy slice-adds gets different numbers."""
    x_shape, kh, kw = (1, 1, 3, 3), 3, 3
    cols = np.zeros((9, 9), dtype=np.float32)
    rng = np.random.default_rng(9)
    cols[:] = rng.choice(np.array([1e8, -1e8, 1.0, 3.0], np.float32), size=cols.shape)
    with backend.use("numpy"):
        want = F.col2im(cols, x_shape, kh, kw, 1, 1)
    np.testing.assert_array_equal(host(glue.col2im(dev(cols), x_shape, kh, kw, 1, 1)), want)


# --------------------------------------------------------------------------- im2col (cupy)

@pytest.mark.parametrize("shape", CONV_SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pad_value", [0, 1])
def test_im2col_equals_numpy_with_the_same_layout(cupy_glue, spy, shape, dtype, pad_value):
    n, c, h, w, kh, kw, s, p = shape
    x = np.random.default_rng(4).standard_normal((n, c, h, w)).astype(dtype)
    with backend.use("numpy"):
        want = F.im2col(x, kh, kw, s, p, pad_value)
    calls = spy(cupy_glue, "im2col")
    for layout in ("C", "permuted", "reversed"):
        got = F.im2col(_layout(x, layout), kh, kw, s, p, pad_value)
        assert got.dtype == want.dtype and got.shape == want.shape
        # the transposed view of a C-contiguous (C*kh*kw, N*Ho*Wo) buffer, as NumPy's
        assert got.T.flags.c_contiguous and (got.strides == want.strides or not want.size)
        np.testing.assert_array_equal(host(got), want, err_msg=layout)
    assert calls["im2col"] == 3


# --------------------------------------------------------------------------- sign patches

@pytest.mark.parametrize("shape", CONV_SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_sign_patches_equals_pack_of_numpy_patches(glue, shape, dtype):
    n, c, h, w, kh, kw, s, p = shape
    x = _signed(np.random.default_rng(1), (n, c, h, w), dtype)
    want = reference.pack_rows(binary.conv_sign_patches(x, kh, kw, s, p))
    for layout in ("C", "permuted", "reversed"):
        got = glue.pack_sign_patches(_layout(x, layout), kh, kw, s, p)
        assert got.dtype == np.uint64 and got.shape == want.shape
        np.testing.assert_array_equal(host(got), want, err_msg=layout)


@pytest.mark.parametrize("shape", CONV_SHAPES[:-1], ids=IDS[:-1])
def test_xnor_conv2d_on_the_glue_equals_the_float_convolution(glue, spy, shape):
    n, c, h, w, kh, kw, s, p = shape
    rng = np.random.default_rng(2)
    x = np.where(rng.random((n, c, h, w)) < 0.5, -1.0, 1.0).astype(np.float32)
    wb = np.where(rng.random((3, c, kh, kw)) < 0.5, -1.0, 1.0).astype(np.float32)
    with backend.use("numpy"):
        want = F.conv2d(Tensor(x), Tensor(wb), stride=s, padding=p).data
    calls = spy(glue, "pack_sign_patches")
    got = binary.xnor_conv2d(dev(x), dev(wb), s, p, dtype=np.float32)
    np.testing.assert_array_equal(host(got), want)
    assert calls["pack_sign_patches"] == 1


# --------------------------------------------------------------------------- max pool

# (N, C, H, W, k, stride)
POOL_SHAPES = [(2, 3, 8, 8, 2, 2), (1, 1, 7, 5, 2, 2), (2, 2, 7, 7, 3, 2), (2, 3, 6, 6, 3, 1),
               (3, 2, 5, 9, 2, 1), (1, 2, 9, 7, 3, 3), (2, 1, 5, 6, 2, 3), (0, 2, 4, 4, 2, 2)]
POOL_IDS = ["n{}c{}h{}w{}k{}s{}".format(*s) for s in POOL_SHAPES]


def _pool_input(shape, ties, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    if ties:  # integer-valued like a BNN's conv output: many equal maxima
        x = rng.integers(-2, 3, size=shape).astype(dtype)
    return x


def _first_argmax(x, k, stride):
    """arg of the reference: the row-major offset of each window's first maximum."""
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.reshape(win.shape[:4] + (k * k,)).argmax(axis=-1)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=POOL_IDS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_forward_and_backward_equal_numpy(glue, spy, shape, ties, dtype):
    n, c, h, w, k, s = shape
    rng = np.random.default_rng(3)
    x = _pool_input((n, c, h, w), ties, dtype, rng)
    _, _, ho, wo = F.pool_output_shape(x.shape, k, s)
    g = rng.standard_normal((n, c, ho, wo)).astype(dtype)
    results = {}
    calls = spy(glue, "max_pool2d")
    spy(glue, "max_pool2d_backward")
    for name in ("numpy", backend.active()):
        with backend.use(name):
            xt = Tensor(dev(x), requires_grad=True)
            out = F.max_pool2d(xt, k, s)
            (out * Tensor(dev(g))).sum().backward()
            results[name] = (host(out), host(xt.grad))
    assert calls == {"max_pool2d": 1, "max_pool2d_backward": 1}
    for got, want in zip(results[backend.active()], results["numpy"]):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # the glue's own (best, arg), from a view of x
    best, arg = glue.max_pool2d(_layout(x, "permuted"), k, s)
    assert host(arg).dtype == np.uint8 and best.flags.c_contiguous and arg.flags.c_contiguous
    np.testing.assert_array_equal(host(best), results["numpy"][0])
    np.testing.assert_array_equal(host(arg), _first_argmax(x, k, s))


def test_max_pool_backward_takes_a_broadcast_gradient(glue):
    """``out.sum().backward()`` hands the pool a gradient with zero strides."""
    x = _pool_input((2, 3, 7, 7), True, np.float32, np.random.default_rng(5))
    grads = {}
    for name in ("numpy", backend.active()):
        with backend.use(name):
            xt = Tensor(dev(x), requires_grad=True)
            F.max_pool2d(xt, 3, 2).sum().backward()
            grads[name] = host(xt.grad)
    np.testing.assert_array_equal(grads[backend.active()], grads["numpy"])


def _window_max(x, k, stride):
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(-2, -1))


def test_max_pool_with_windows_of_256_or_more_keeps_int32_arg(glue):
    x = _pool_input((2, 2, 17, 18), True, np.float32, np.random.default_rng(6))
    best, arg = glue.max_pool2d(dev(x), 16, 1)
    assert host(arg).dtype == np.int32
    np.testing.assert_array_equal(host(arg), _first_argmax(x, 16, 1))
    np.testing.assert_array_equal(host(best), _window_max(x, 16, 1))
    g = np.random.default_rng(7).standard_normal(best.shape).astype(np.float32)
    with backend.use("numpy"):
        xt = Tensor(x, requires_grad=True)
        (F.max_pool2d(xt, 16, 1) * Tensor(g)).sum().backward()
    np.testing.assert_array_equal(
        host(glue.max_pool2d_backward(dev(g), arg, x.shape, 16, 1)), xt.grad)


def test_nan_as_the_array_code_treats_it(glue):
    """A NaN is never greater, so a window that starts with one keeps it and a later one
    never takes over; NaN >= 0 is False, so its sign bit is 0. As the NumPy code."""
    y = np.random.default_rng(15).standard_normal((2, 3, 6, 7))
    y[0, 0, 0, 0] = y[0, 1, 3, 3] = y[1, 2, 5, 6] = np.nan
    pool = F.MaxPool2d()
    with backend.use("numpy"):
        want = pool.forward(y, 2, 2)
    best, arg = glue.max_pool2d(dev(y), 2, 2)
    np.testing.assert_array_equal(host(best), want)
    np.testing.assert_array_equal(host(arg), pool.saved[0])
    np.testing.assert_array_equal(host(glue.pack_sign_patches(dev(y), 3, 3, 1, 1)),
                                  reference.pack_rows(binary.conv_sign_patches(y, 3, 3, 1, 1)))


def test_max_pool_tie_goes_to_the_first_element(glue):
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]], dtype=np.float32)
    xt = Tensor(dev(x), requires_grad=True)
    F.max_pool2d(xt, 2).sum().backward()
    np.testing.assert_array_equal(host(xt.grad)[0, 0], [[0.0, 1.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- the whole step

def test_a_small_convnet_step_on_the_glue_equals_numpy(glue, spy, xnor_products):
    """Forward and backward of conv (padding 1) -> pool -> binary conv (XNOR, padding 1,
    kh != kw) -> overlapping pool: the same outputs and gradients as the numpy backend,
    with every glue function of this backend called. Input and float weights are small
    integers, so every GEMM is exact in any summation order (cuBLAS included) and the
    comparison can be bit for bit; the pools see many ties."""
    rng = np.random.default_rng(8)
    x = rng.integers(-3, 4, size=(2, 3, 9, 9)).astype(np.float32)
    w1 = rng.integers(-2, 3, size=(8, 3, 3, 3)).astype(np.float32)
    names = [n for n in ("im2col", "col2im", "pack_sign_patches", "max_pool2d",
                         "max_pool2d_backward") if hasattr(glue, n)]
    calls = {}
    for n in names:
        calls = spy(glue, n)  # one dict, counting every name
    results = {}
    for name in ("numpy", backend.active()):
        with backend.use(name):
            conv = nn.Conv2d(3, 8, 3, padding=1, rng=np.random.default_rng(1))
            conv.weight.data[...] = dev(w1)
            net = nn.Sequential(conv, nn.MaxPool2d(2, 1),
                                nn.BinaryConv2d(8, 5, (3, 2), padding=1, binary_input=True,
                                                rng=np.random.default_rng(2)),
                                nn.MaxPool2d(3, 2))
            xt = Tensor(dev(x), requires_grad=True)
            out = net(xt)
            out.sum().backward()
            results[name] = [host(out), host(xt.grad)] + [host(p.grad) for p in net.parameters()]
    assert len(results["numpy"]) == 5  # out, x, conv weight and bias, binary weight
    for got, want in zip(results[backend.active()], results["numpy"]):
        np.testing.assert_array_equal(got, want)
    assert all(calls[n] >= 1 for n in names), calls


# --------------------------------------------------------------------------- cupy specifics

def test_one_block_grid_strides_over_everything(cupy_glue, monkeypatch):
    """With a grid of one block every thread loops over many outputs: the results stay
    those of the full grid (the grid-stride loop of each kernel)."""
    monkeypatch.setattr(cupy_glue, "_MAX_BLOCKS", 1)
    rng = np.random.default_rng(10)
    n, c, h, w, kh, kw, s, p = 3, 5, 9, 8, 3, 2, 2, 1
    x = _signed(rng, (n, c, h, w), np.float32)
    with backend.use("numpy"):
        cols = F.im2col(x, kh, kw, s, p)
        back = F.col2im(np.ascontiguousarray(cols), x.shape, kh, kw, s, p)
    np.testing.assert_array_equal(host(cupy_glue.im2col(dev(x), kh, kw, s, p)), cols)
    np.testing.assert_array_equal(
        host(cupy_glue.col2im(dev(np.ascontiguousarray(cols)), x.shape, kh, kw, s, p)), back)
    np.testing.assert_array_equal(host(cupy_glue.pack_sign_patches(dev(x), kh, kw, s, p)),
                                  reference.pack_rows(binary.conv_sign_patches(x, kh, kw, s, p)))
    xi = _pool_input((3, 5, 9, 8), True, np.float32, rng)
    best, arg = cupy_glue.max_pool2d(dev(xi), 3, 2)
    np.testing.assert_array_equal(host(arg), _first_argmax(xi, 3, 2))
    g = rng.standard_normal(best.shape).astype(np.float32)
    with backend.use("numpy"):
        xt = Tensor(xi, requires_grad=True)
        (F.max_pool2d(xt, 3, 2) * Tensor(g)).sum().backward()
    np.testing.assert_array_equal(host(cupy_glue.max_pool2d_backward(dev(g), arg, xi.shape, 3, 2)),
                                  xt.grad)


def test_cupy_glue_takes_float_device_arrays_only(cupy_glue):
    xp = backend.xp()
    assert cupy_glue.accepts(xp.zeros(3, dtype=np.float32))
    assert cupy_glue.accepts(xp.zeros(3, dtype=np.float64))
    assert not cupy_glue.accepts(xp.zeros(3, dtype=np.int32))  # the array code runs
    assert not cupy_glue.accepts(np.zeros(3, dtype=np.float32))  # host arrays too
    assert F.compiled_glue(xp.zeros(3, dtype=np.float16)) is None
    # an integer input still gets the NumPy layout, from the array code
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5)
    with backend.use("numpy"):
        want = F.im2col(x, 3, 3, 1, 1)
    np.testing.assert_array_equal(host(F.im2col(dev(x), 3, 3, 1, 1)), want)


def test_cupy_glue_refuses_bad_arrays(cupy_glue):
    xp = backend.xp()
    with pytest.raises(TypeError, match="cols: expected a float32 or float64 CuPy array"):
        cupy_glue.col2im(xp.zeros((9, 9), dtype=np.int32), (1, 1, 3, 3), 3, 3, 1, 1)
    with pytest.raises(TypeError, match="x: expected a float32 or float64 CuPy array"):
        cupy_glue.im2col(np.zeros((1, 1, 3, 3), np.float32), 3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"cols: shape \(9, 8\) does not fit"):
        cupy_glue.col2im(xp.zeros((9, 8), dtype=np.float32), (1, 1, 3, 3), 3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"x: expected \(N, C, H, W\)"):
        cupy_glue.pack_sign_patches(xp.zeros((3, 3), np.float32), 3, 3, 1, 1)
    g = xp.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(TypeError, match="arg: expected a CuPy array of dtype uint8"):
        cupy_glue.max_pool2d_backward(g, xp.zeros((1, 1, 2, 2), np.int32), (1, 1, 4, 4), 2, 2)
    with pytest.raises(ValueError, match=r"g, arg: shapes \(1, 1, 2, 2\) and \(1, 1, 3, 3\)"):
        cupy_glue.max_pool2d_backward(g, xp.zeros((1, 1, 3, 3), np.uint8), (1, 1, 4, 4), 2, 2)


def test_glue_is_offered_on_numba_and_cupy_only():
    assert backend.conv_kernels("numpy") is None
    with backend.use("numpy"):
        assert F.compiled_glue(np.zeros(1)) is None
    for name, module in (("numba", "numba_conv"), ("cupy", "cupy_conv")):
        if backend.available()[name] is None:
            assert backend.conv_kernels(name).__name__ == f"minibnn.kernels.{module}"
    if backend.available()["numba"] is None:
        with backend.use("numba"):  # a CuPy array or a non-array never takes the numba path
            assert F.compiled_glue(np.zeros(1)) is not None
            assert F.compiled_glue([0.0]) is None
