"""The numba backend's compiled helpers of the training step (kernels/numba_conv.py) that
replace array code elementwise: they give the array code's values bit for bit, on awkward
inputs (zeros of both signs, NaN, infinities, values at and just past +-1, views, float32
and float64, empty arrays), and the library calls them on numba."""

import numpy as np
import pytest

from minibnn import backend, binary
from minibnn.tensor import Tensor
from tests.conftest import backend_params

pytestmark = pytest.mark.parametrize("name", backend_params(("numba",)))


def _awkward(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 1.5).astype(dtype)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0,
                        np.nextafter(dtype(1), dtype(2)), -np.nextafter(dtype(1), dtype(2))],
                       dtype=dtype)
    flat[:min(flat.size, special.size)] = special[:flat.size]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 33), (0, 3), (1,), (7, 9, 611)])
@pytest.mark.parametrize("layout", ["C", "transposed", "strided"])
def test_sign_and_sign_ste_equal_the_array_code(name, dtype, shape, layout):
    """(7, 9, 611) is over numba_conv._SERIAL: sign's chunks run in parallel."""
    from minibnn.kernels import numba_conv
    x = _awkward(shape, dtype)
    if layout == "transposed":
        x = np.ascontiguousarray(x.T).T
    elif layout == "strided":
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    with np.errstate(invalid="ignore"):
        want_q = np.where(x >= 0, dtype(1), dtype(-1))
        want_keep = abs(x) <= 1
    q = numba_conv.sign(x)
    q2, keep = numba_conv.sign_ste(x)
    for got in (q, q2):
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, want_q)
    assert keep.dtype == np.bool_
    np.testing.assert_array_equal(keep, want_keep)


def test_the_library_signs_on_the_kernels(name, monkeypatch):
    """binary.sign and the Sign activation (forward and its masked backward) call the
    kernels on numba and give what the numpy backend gives; integer input keeps the array
    code (float32 out)."""
    from minibnn.kernels import numba_conv
    calls = {"sign": 0, "sign_ste": 0}
    for fn in calls:
        inner = getattr(numba_conv, fn)
        monkeypatch.setattr(numba_conv, fn, lambda *a, _f=inner, _n=fn: (
            calls.__setitem__(_n, calls[_n] + 1), _f(*a))[1])
    x = _awkward((2, 3, 4, 5), np.float32, seed=1)
    g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    results = {}
    for backend_name in ("numpy", name):
        with backend.use(backend_name):
            xt = Tensor(x.copy(), requires_grad=True)
            out = binary.sign_ste(xt)
            out.backward(g)
            results[backend_name] = (out.data, xt.grad, binary.sign(x),
                                     binary.sign(np.array([-2, 0, 3])))
    assert calls == {"sign": 1, "sign_ste": 1}
    for got, want in zip(results[name], results["numpy"]):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(2, 65, 4, 5, 3, 3, 1, 1), (1, 130, 3, 3, 2, 3, 2, 1),
                                   (2, 64, 3, 4, 3, 3, 1, 2), (3, 7, 6, 5, 3, 2, 2, 0),
                                   (1, 1, 9, 9, 5, 5, 3, 2), (2, 16, 7, 6, 3, 3, 1, 1),
                                   (2, 32, 5, 7, 3, 2, 2, 1), (1, 8, 6, 9, 2, 4, 1, 0),
                                   (2, 4, 8, 5, 5, 3, 1, 4)],
                         ids=["c65", "c130-stride2", "c64-pad2", "c7-stride2", "c1-k5s3",
                              "c16", "c32-stride2", "c8-k2x4", "c4-pad4"])
def test_pack_sign_patches_joins_groups_of_any_width(name, shape):
    """Pixels' channel-bit groups wider than a word (65, 130 channels), exactly a word
    (64), and narrow groups that straddle word boundaries, with padding taps all ones:
    the packed bool patches of the NumPy reference, bit for bit."""
    from minibnn.kernels import numba_conv, reference
    n, c, h, w, kh, kw, s, p = shape
    x = _awkward((n, c, h, w), np.float32, seed=4)
    want = reference.pack_rows(binary.conv_sign_patches(x, kh, kw, s, p))
    np.testing.assert_array_equal(numba_conv.pack_sign_patches(x, kh, kw, s, p), want)


BN_SHAPES = [(2, 1, 1, 1), (3, 5, 7, 9), (2, 33, 4, 3), (100, 16, 6, 6)]


def _bn_case(shape, dtype, seed=6):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    gamma = rng.uniform(0.5, 2, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, g, gamma, beta


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_forward_equals_the_array_code(name, shape, dtype):
    from minibnn import functional as F
    x, _, gamma, beta = _bn_case(shape, dtype)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    op = F.BatchNormTrain()
    with backend.use("numpy"):
        want = op.forward(x, gamma, beta, mean, var, 1e-4, (0, 2, 3))
    want_xhat = op.saved[0]
    invstd = (1.0 / np.sqrt(var + 1e-4)).astype(dtype)
    from minibnn.kernels import numba_conv
    xhat, y = numba_conv.bn_forward(x, mean, invstd, gamma, beta)
    np.testing.assert_array_equal(xhat, want_xhat)
    np.testing.assert_array_equal(y, want)


# every branch of NumPy's pairwise sum: planes under 8, up to 128, longer (split at
# multiples of 8), C == 1 (one run over the batch), the ConvNet's own planes
BN_STAT_SHAPES = BN_SHAPES + [(4, 1, 20, 26), (5, 3, 1, 7), (3, 2, 11, 13), (2, 4, 16, 8),
                              (6, 2, 37, 29), (1, 3, 129, 1), (100, 16, 28, 28)]


@pytest.mark.parametrize("shape", BN_STAT_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_train_forward_computes_numpys_statistics(name, shape, dtype):
    """The fused kernel's mean and var are x.mean and x.var over (0, 2, 3) bit for bit (NumPy's
    summation order), and its y that of the array code given those statistics; the backward
    from x (xhat recomputed) gives bn_backward's values on the array code's xhat, bit for
    bit."""
    from minibnn import functional as F
    from minibnn.kernels import numba_conv
    x, g, gamma, beta = _bn_case(shape, dtype, seed=sum(shape))
    x.reshape(-1)[:2] = [1e4, -1e4]  # a wide range, so that an order change shows in the sums
    mean, var, invstd, y = numba_conv.bn_train_forward(x, gamma, beta, 1e-4)
    assert mean.dtype == var.dtype == invstd.dtype == y.dtype == dtype
    np.testing.assert_array_equal(mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_array_equal(var, x.var(axis=(0, 2, 3)))
    np.testing.assert_array_equal(invstd, (1.0 / np.sqrt(var + 1e-4)).astype(dtype))
    op = F.BatchNormTrain()
    with backend.use("numpy"):
        want = op.forward(x, gamma, beta, mean, var, 1e-4, (0, 2, 3))
    np.testing.assert_array_equal(y, want)
    got = numba_conv.bn_backward_x(g, x, mean, invstd, gamma)
    for a, b in zip(got, numba_conv.bn_backward(g, op.saved[0], invstd, gamma)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_backward_within_rounding_of_the_exact_gradient(name, shape, dtype):
    """The sums in float64, the input gradient from them: each within a few float
    roundings of the float64 evaluation of the array code's formula, as the array code's
    own result is."""
    from minibnn import functional as F
    from minibnn.kernels import numba_conv
    x, g, gamma, _ = _bn_case(shape, dtype)
    axes = (0, 2, 3)
    var = x.var(axis=axes)
    invstd = (1.0 / np.sqrt(var + 1e-4)).astype(dtype)
    xhat = ((x - x.mean(axis=axes, keepdims=True)) * invstd.reshape(1, -1, 1, 1)).astype(dtype)
    gx, ggamma, gbeta = numba_conv.bn_backward(g, xhat, invstd, gamma)
    assert gx.dtype == ggamma.dtype == gbeta.dtype == dtype
    g64, xh64, gm64 = g.astype(np.float64), xhat.astype(np.float64), gamma.astype(np.float64)
    s = (1, -1, 1, 1)
    exact_gbeta, exact_ggamma = g64.sum(axis=axes), (g64 * xh64).sum(axis=axes)
    gxhat = g64 * gm64.reshape(s)
    exact_gx = invstd.astype(np.float64).reshape(s) * (
        gxhat - gxhat.mean(axis=axes, keepdims=True)
        - xh64 * (gxhat * xh64).mean(axis=axes, keepdims=True))
    u = np.finfo(dtype).eps
    assert np.all(np.abs(gbeta - exact_gbeta) <= 2 * u * np.abs(g64).sum(axis=axes))
    assert np.all(np.abs(ggamma - exact_ggamma) <= 2 * u * np.abs(g64 * xh64).sum(axis=axes))
    scale = invstd.astype(np.float64).reshape(s) * (np.abs(gxhat) + np.abs(gxhat).mean(
        axis=axes, keepdims=True) * (1 + np.abs(xh64)))
    assert np.all(np.abs(gx - exact_gx) <= 8 * u * scale)
    op = F.BatchNormTrain()
    op.axes, op.sync, op.count = axes, None, None
    op.save(xhat, invstd.reshape(s), gamma.reshape(s))
    with backend.use("numpy"):
        ref_gx, ref_ggamma, ref_gbeta = op.backward(g)
    assert np.all(np.abs(ref_gx - exact_gx) <= 8 * u * scale)  # the bound is the array code's too
    assert np.all(np.abs(gbeta - ref_gbeta) <= 4 * u * np.abs(g64).sum(axis=axes))


def test_batch_norm_layer_runs_on_the_kernels(name, monkeypatch):
    """BatchNorm2d in training on numba: forward bit for bit as on numpy, gradients within
    rounding, the kernels called; a non-contiguous gradient or a 2-D batch norm keeps the
    array code."""
    from minibnn import nn
    from minibnn.kernels import numba_conv
    calls = {"bn_train_forward": 0, "bn_backward_x": 0}
    for fn in calls:
        inner = getattr(numba_conv, fn)
        monkeypatch.setattr(numba_conv, fn, lambda *a, _f=inner, _n=fn: (
            calls.__setitem__(_n, calls[_n] + 1), _f(*a))[1])
    x, g, _, _ = _bn_case((4, 3, 5, 6), np.float32)
    results = {}
    for backend_name in ("numpy", name):
        with backend.use(backend_name):
            bn = nn.BatchNorm2d(3)
            bn.gamma.data[...] = [0.5, 1.0, 2.0]
            xt = Tensor(x.copy(), requires_grad=True)
            out = bn(xt)
            out.backward(g)
            results[backend_name] = (out.data, xt.grad, bn.gamma.grad, bn.beta.grad,
                                     bn.running_mean, bn.running_var)
    assert calls == {"bn_train_forward": 1, "bn_backward_x": 1}
    np.testing.assert_array_equal(results[name][0], results["numpy"][0])
    for got, want in zip(results[name][4:], results["numpy"][4:]):  # running statistics
        np.testing.assert_array_equal(got, want)
    for got, want in zip(results[name][1:4], results["numpy"][1:4]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with backend.use(name):  # a gradient with zero strides: the array code
        bn = nn.BatchNorm2d(3)
        xt = Tensor(x.copy(), requires_grad=True)
        bn(xt).sum().backward()
        nn.BatchNorm(6)(Tensor(x[:, 0, 0, :].copy(), requires_grad=True)).sum().backward()
    assert calls == {"bn_train_forward": 2, "bn_backward_x": 1}


@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.float64])
@pytest.mark.parametrize("padded", [True, False])
def test_conv_output_equals_the_array_code(name, dtype, padded):
    """The XNOR convolution's last step, (O, N*Ho*Wo) product minus the padding correction
    to NCHW in the output dtype, as xnor_conv2d's array code does it."""
    from minibnn.kernels import numba_conv
    rng = np.random.default_rng(3)
    o, n, ho, wo = 5, 3, 4, 7
    prod = rng.integers(-50, 50, (o, n * ho * wo)).astype(np.int32)
    corr = rng.integers(-9, 9, (o, ho, wo)).astype(np.int32) if padded else None
    want = prod.reshape(o, n, ho * wo).copy()
    if padded:
        want -= corr.reshape(o, 1, ho * wo)
    want = want.reshape(o, n, ho, wo).transpose(1, 0, 2, 3).astype(dtype, order="C")
    got = numba_conv.conv_output(prod, corr, n, ho, wo, dtype)
    assert got.dtype == dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_xnor_conv2d_runs_conv_output_on_numba(name, monkeypatch):
    """binary.xnor_conv2d on numba ends in numba_conv.conv_output, with numpy's result."""
    from minibnn.kernels import numba_conv
    rng = np.random.default_rng(4)
    x = np.where(rng.random((2, 3, 6, 5)) < 0.5, -1, 1).astype(np.float32)
    wb = np.where(rng.random((4, 3, 3, 3)) < 0.5, -1, 1).astype(np.float32)
    calls = []
    inner = numba_conv.conv_output
    monkeypatch.setattr(numba_conv, "conv_output", lambda *a: (calls.append(1), inner(*a))[1])
    with backend.use("numpy"):
        want = binary.xnor_conv2d(x, wb, 1, 1, dtype=np.float32)
    with backend.use(name):
        got = binary.xnor_conv2d(x, wb, 1, 1, dtype=np.float32)
    assert calls == [1]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 301, 350)], ids=["small", "parallel"])
def test_sign_ste_backward_equals_the_array_code(name, shape):
    """g * keep on awkward g (signed zeros, NaN, infinities), views, both dtypes; a small
    array (one thread) and one over numba_conv._PARALLEL_MIN (chunks in parallel)."""
    from minibnn.kernels import numba_conv
    n, c, h, w = shape
    for dtype in (np.float32, np.float64):
        x = _awkward(shape, dtype)
        g = _awkward((n, c, w, h), dtype, seed=1).transpose(0, 1, 3, 2)
        keep = np.abs(x) <= 1
        got = numba_conv.sign_ste_backward(g, keep)
        with np.errstate(invalid="ignore"):  # inf * 0
            want = g * keep
        assert got.dtype == dtype and got.shape == g.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("wshape", [(37, 11), (301, 250)], ids=["small", "parallel"])
@pytest.mark.parametrize("clip", [None, 1.0, 0.25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_on_the_kernel_equals_the_array_code(name, dtype, clip, wshape, monkeypatch):
    """optim.Adam on numba (numba_conv.adam_update) gives the array code's weights and
    moments bit for bit over several steps, with lr_scale and clip, on gradients holding
    zeros of both signs and large and tiny values; the kernel is called once per parameter
    and step."""
    from minibnn import nn, optim
    from minibnn.kernels import numba_conv
    calls = []
    inner = numba_conv.adam_update
    monkeypatch.setattr(numba_conv, "adam_update", lambda *a: (calls.append(1), inner(*a))[1])
    rng = np.random.default_rng(5)
    w0 = rng.uniform(-1.2, 1.2, wshape).astype(dtype)  # (301, 250): chunks in parallel
    grads = [(rng.standard_normal(w0.shape) * 10.0 ** rng.integers(-6, 3, w0.shape))
             .astype(dtype) for _ in range(4)]
    for g in grads:
        g.reshape(-1)[:3] = [0.0, -0.0, 1e-30]
    results = {}
    for backend_name in ("numpy", name):
        with backend.use(backend_name):
            p = nn.Parameter(w0.copy(), lr_scale=3.7, clip=clip)
            opt = optim.Adam([p], lr=0.01)
            for g in grads:
                p.grad = g.copy()
                opt.step()
            results[backend_name] = (p.data, opt.state[0]["m"], opt.state[0]["v"])
    assert len(calls) == len(grads)
    for got, want in zip(results[name], results["numpy"]):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)


def test_adam_keeps_the_array_code_for_what_the_kernel_does_not_take(name, monkeypatch):
    """A NumPy-float hyperparameter (NumPy would round differently) or a non-contiguous
    gradient runs the array code."""
    from minibnn import nn, optim
    from minibnn.kernels import numba_conv
    calls = []
    monkeypatch.setattr(numba_conv, "adam_update", lambda *a: calls.append(1))
    with backend.use(name):
        p = nn.Parameter(np.ones((4, 6), np.float32))
        opt = optim.Adam([p], lr=0.01, beta1=np.float64(0.9))
        p.grad = np.ones((4, 6), np.float32)
        opt.step()
        q = nn.Parameter(np.ones((4, 6), np.float32))
        opt = optim.Adam([q], lr=0.01)
        q.grad = np.ones((6, 4), np.float32).T
        opt.step()
    assert calls == []
    assert np.all(p.data < 1) and np.all(q.data < 1)


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 3, 7, 9)])
def test_the_2x2_max_pool_equals_the_array_code_on_awkward_values(name, shape):
    """The written-out 2x2 pool (forward and backward) on inputs holding NaN, infinities,
    signed zeros and ties, and gradients holding signed zeros: the array code's values and
    window offsets, bit for bit. (A NaN or infinite gradient is left out: the array code's
    g * (arg == t) spreads it as NaN over its whole window, every compiled pool backward
    puts it at the arg only.)"""
    from minibnn import functional as F
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        x = _awkward(shape, dtype)
        x.reshape(-1)[20:40] = 1.0  # ties
        g = rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2)).astype(dtype)
        g.reshape(-1)[:4] = [0.0, -0.0, -0.0, 0.0]
        results = {}
        for backend_name in ("numpy", name):
            with backend.use(backend_name):
                op = F.MaxPool2d()
                out = op.forward(x, 2, 2)
                results[backend_name] = (out, op.saved[0], op.backward(g)[0])
        for got, want in zip(results[name], results["numpy"]):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_swap_planes_is_the_transposed_copy_and_the_float_conv_uses_it(name, monkeypatch):
    """swap_planes equals ascontiguousarray(a.transpose(1, 0, 2, 3)) on views and dtypes;
    the float convolution's forward and backward call it on numba and give numpy's values."""
    from minibnn import functional as F
    from minibnn.kernels import numba_conv
    rng = np.random.default_rng(9)
    for a in (rng.standard_normal((3, 4, 5, 6)).astype(np.float32),
              rng.integers(-9, 9, (2, 5, 3, 1)).astype(np.int32),
              rng.standard_normal((4, 3, 6, 5)).transpose(0, 1, 3, 2), np.zeros((0, 2, 3, 3))):
        got = numba_conv.swap_planes(a)
        assert got.dtype == a.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.ascontiguousarray(a.transpose(1, 0, 2, 3)))
    calls = []
    inner = numba_conv.swap_planes
    monkeypatch.setattr(numba_conv, "swap_planes", lambda a: (calls.append(1), inner(a))[1])
    x = rng.standard_normal((3, 2, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    g = rng.standard_normal((3, 4, 7, 6)).astype(np.float32)
    results = {}
    for backend_name in ("numpy", name):
        with backend.use(backend_name):
            xt, wt = Tensor(x.copy(), requires_grad=True), Tensor(w.copy(), requires_grad=True)
            out = F.conv2d(xt, wt, 1, 1)
            out.backward(g)
            results[backend_name] = (out.data, xt.grad, wt.grad)
    assert len(calls) == 2
    for got, want in zip(results[name], results["numpy"]):
        np.testing.assert_array_equal(got, want)


def test_batch_statistics_without_a_list_to_return_them_is_refused(name):
    from minibnn import functional as F
    x, _, gamma, beta = _bn_case((2, 3, 4, 4), np.float32)
    for backend_name in ("numpy", name):
        with backend.use(backend_name), pytest.raises(TypeError, match="needs stats"):
            F.BatchNormTrain().forward(x, gamma, beta, None, None, 1e-4, (0, 2, 3))
