"""Convolution and pooling: conv2d / max_pool2d against naive loops and the float64
gradient checker, the tie rule of max pooling, the XNOR convolution (exactly the float one
on +-1 input, on every backend), the conv layers' init and their errors."""

import math

import numpy as np
import pytest
from arrays import dev, host
from gradcheck import check_grad

from minibnn import backend, binary, nn
from minibnn import functional as F
from minibnn.tensor import Tensor

RNG = np.random.default_rng(2024)


def pm1(*shape, rng=RNG):
    return rng.choice([-1.0, 1.0], shape)


def distinct(*shape, spacing=0.1):
    """No two values within ``spacing`` (so max pooling is differentiable)."""
    n = int(np.prod(shape))
    return (RNG.permutation(n) * spacing - n * spacing / 2).reshape(shape)


def conv_ref(x, w, stride=1, padding=0):
    """Naive float64 convolution: one dot product per output position."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = xpad[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", window, w)
    return out


def max_pool_ref(x, g, k, stride):
    """Naive max pooling and its gradient, the first maximum (row-major) taking it all."""
    n, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out, gx = np.zeros((n, c, ho, wo)), np.zeros(x.shape)
    for a in range(n):
        for b in range(c):
            for i in range(ho):
                for j in range(wo):
                    win = x[a, b, i * stride:i * stride + k, j * stride:j * stride + k]
                    r, s = np.unravel_index(np.argmax(win), win.shape)  # first occurrence
                    out[a, b, i, j] = win[r, s]
                    gx[a, b, i * stride + r, j * stride + s] += g[a, b, i, j]
    return out, gx


# (N, C, H, W, O, kh, kw, stride, padding): odd sizes, H != W, K = C*kh*kw not a multiple
# of 64, batch of 1, a kernel as large as the padded input, windows made only of padding
SHAPES = [
    (2, 3, 7, 7, 5, 3, 3, 1, 1),    # K = 27
    (1, 7, 9, 8, 4, 3, 3, 2, 2),    # K = 63
    (3, 8, 6, 5, 6, 3, 3, 1, 0),    # K = 72
    (2, 64, 5, 5, 3, 3, 3, 2, 1),   # K = 576
    (2, 3, 3, 4, 2, 5, 6, 1, 1),    # kernel = padded input: 1 x 1 output
    (1, 2, 3, 3, 3, 5, 5, 1, 2),    # kernel larger than the input itself
    (2, 2, 5, 6, 3, 2, 2, 1, 2),    # the corner windows lie wholly in the padding
    (1, 5, 11, 9, 2, 3, 2, 3, 1),   # stride 3, non-square kernel
    (2, 4, 6, 6, 3, 1, 1, 2, 0),    # 1 x 1 kernel
]
IDS = [f"n{s[0]}c{s[1]}h{s[2]}w{s[3]}o{s[4]}k{s[5]}x{s[6]}s{s[7]}p{s[8]}" for s in SHAPES]


def conv_case(shape, rng=RNG):
    n, c, h, w, o, kh, kw, s, p = shape
    return pm1(n, c, h, w, rng=rng), pm1(o, c, kh, kw, rng=rng), s, p


# --- float conv2d -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_conv2d_matches_naive_loop(shape):
    n, c, h, w, o, kh, kw, s, p = shape
    x, wt = RNG.standard_normal((n, c, h, w)), RNG.standard_normal((o, c, kh, kw))
    out = F.conv2d(Tensor(x), Tensor(wt), stride=s, padding=p)
    assert out.shape == F.conv_output_shape(x.shape, wt.shape, s, p)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), conv_ref(x, wt, s, p), rtol=1e-12, atol=1e-12)


def test_conv2d_float32_stays_float32():
    x = Tensor(RNG.standard_normal((2, 3, 5, 5)).astype(np.float32))
    w = Tensor(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32))
    assert F.conv2d(x, w, padding=1).dtype == np.float32


def test_im2col_layout_and_col2im_adjoint():
    x = RNG.standard_normal((2, 3, 5, 4))
    cols = F.im2col(x, 3, 2, stride=2, padding=1)
    # row (n, ho, wo), column (c, i, j): the order of w.reshape(O, -1)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = 3, 3
    assert cols.shape == (2 * ho * wo, 3 * 3 * 2)
    assert cols[1 * ho * wo + 2 * wo + 1, 2 * 6 + 1 * 2 + 0] == xpad[1, 2, 2 * 2 + 1, 1 * 2 + 0]
    # col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>
    c = RNG.standard_normal(cols.shape)
    np.testing.assert_allclose(np.sum(cols * c),
                               np.sum(x * F.col2im(c, x.shape, 3, 2, stride=2, padding=1)))


def test_col2im_accumulates_overlapping_patches():
    # with a 3x3 kernel, stride 1, padding 1, every element is in as many windows as it has
    # neighbours-or-itself inside the image
    cols = np.ones((1 * 4 * 5, 1 * 9))
    counts = F.col2im(cols, (1, 1, 4, 5), 3, 3, stride=1, padding=1)[0, 0]
    rows = np.array([2, 3, 3, 2])[:, None]
    columns = np.array([2, 3, 3, 3, 2])[None, :]
    np.testing.assert_array_equal(counts, rows * columns)


@pytest.mark.parametrize("shape", [
    (2, 3, 5, 5, 2, 3, 3, 1, 0),
    (2, 3, 5, 5, 2, 3, 3, 1, 1),
    (1, 2, 6, 5, 3, 3, 3, 2, 1),
    (1, 2, 5, 7, 2, 3, 2, 2, 2),
    (1, 7, 4, 3, 2, 3, 3, 1, 1),    # K = 63
    (2, 1, 3, 3, 2, 4, 5, 1, 1),    # kernel = padded input
], ids=lambda s: f"c{s[1]}h{s[2]}w{s[3]}k{s[5]}x{s[6]}s{s[7]}p{s[8]}n{s[0]}")
def test_conv2d_gradients(shape):
    n, c, h, w, o, kh, kw, s, p = shape
    check_grad(lambda x, wt: F.conv2d(x, wt, stride=s, padding=p),
               [RNG.standard_normal((n, c, h, w)), RNG.standard_normal((o, c, kh, kw))])


def test_conv2d_layer_gradients_with_bias():
    def fn(x, w, b):
        layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        layer.weight, layer.bias = w, b
        return layer(x)

    check_grad(fn, [RNG.standard_normal((2, 2, 5, 4)), RNG.standard_normal((3, 2, 3, 3)),
                    RNG.standard_normal(3)])


def test_conv2d_gradient_only_for_what_needs_it():
    x = Tensor(RNG.standard_normal((1, 2, 4, 4)), requires_grad=True)
    w = Tensor(RNG.standard_normal((3, 2, 3, 3)))
    F.conv2d(x, w, padding=1).sum().backward()
    assert x.grad.shape == x.shape and w.grad is None


# --- max pooling ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,k,stride", [
    ((2, 3, 4, 4), 2, None),
    ((1, 2, 5, 7), 2, None),        # floor mode: the last row and column are dropped
    ((2, 1, 7, 6), 3, 2),           # overlapping windows
    ((1, 2, 5, 5), 2, 1),
    ((1, 1, 6, 5), 3, None),
])
def test_max_pool2d_gradients_away_from_ties(shape, k, stride):
    check_grad(lambda x: F.max_pool2d(x, k, stride), [distinct(*shape)])


@pytest.mark.parametrize("shape,k,stride", [
    ((2, 3, 6, 6), 2, None), ((2, 2, 7, 5), 3, 2), ((1, 2, 6, 7), 2, 1), ((1, 1, 5, 5), 3, 1)])
def test_max_pool2d_matches_naive_loop_with_many_ties(shape, k, stride):
    x = RNG.integers(-2, 3, shape).astype(np.float64)  # integers, as a BNN's conv outputs
    t = Tensor(x, requires_grad=True)
    out = F.max_pool2d(t, k, stride)
    g = RNG.standard_normal(out.shape)
    out.backward(g)
    ref_out, ref_gx = max_pool_ref(x, g, k, k if stride is None else stride)
    np.testing.assert_array_equal(out.numpy(), ref_out)
    np.testing.assert_allclose(host(t.grad), ref_gx, rtol=1e-12, atol=1e-12)


def test_max_pool2d_all_equal_window_gives_its_top_left_everything():
    x = Tensor(np.full((1, 1, 4, 4), 3.0), requires_grad=True)
    F.max_pool2d(x, 2).backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(host(x.grad)[0, 0], expected)


def test_max_pool2d_tie_goes_to_the_first_in_row_major_order():
    x = Tensor(np.array([[[[1.0, 3.0], [3.0, 2.0]]]]), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(host(x.grad)[0, 0], [[0, 1], [0, 0]])


def test_max_pool2d_overlapping_windows_accumulate():
    # all equal, k=2, stride 1: each of the 2x2 windows sends its gradient to its top-left
    x = Tensor(np.zeros((1, 1, 3, 3)), requires_grad=True)
    F.max_pool2d(x, 2, stride=1).backward(np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(host(x.grad)[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    # one maximum shared by all four windows receives all four gradients
    x = Tensor(np.array([[[[0.0, 0, 0], [0, 5, 0], [0, 0, 0]]]]), requires_grad=True)
    F.max_pool2d(x, 2, stride=1).backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    np.testing.assert_array_equal(host(x.grad)[0, 0], [[0, 0, 0], [0, 10, 0], [0, 0, 0]])


def test_max_pool_layer_floor_mode_shape():
    out = nn.MaxPool2d(2)(Tensor(RNG.standard_normal((2, 3, 7, 5)).astype(np.float32)))
    assert out.shape == (2, 3, 3, 2) and out.dtype == np.float32
    assert nn.MaxPool2d(3, stride=2)(Tensor(np.zeros((1, 1, 7, 7)))).shape == (1, 1, 3, 3)


# --- batch norm on NCHW, Flatten ----------------------------------------------------------

@pytest.mark.parametrize("cls", [nn.BatchNorm2d, nn.ShiftBatchNorm2d])
def test_batchnorm2d_is_per_channel_and_refuses_2d(cls):
    x = Tensor((RNG.standard_normal((4, 3, 5, 5)) * [[[[1]], [[3]], [[9]]]] + 2).astype(np.float32))
    y = cls(3)(x).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    base = nn.BatchNorm if cls is nn.BatchNorm2d else nn.ShiftBatchNorm
    np.testing.assert_array_equal(y, base(3)(x).numpy())
    for bad in [(4, 3), (4, 3, 5), (4, 2, 5, 5)]:
        with pytest.raises(ValueError, match=rf"{cls.__name__}: input of shape \({bad[0]}, "
                                             r".*expected \(batch, 3, height, width\)"):
            cls(3)(Tensor(np.zeros(bad, np.float32)))
    with pytest.raises(ValueError, match=cls.__name__):
        cls(3).eval()(Tensor(np.zeros((4, 3), np.float32)))


def test_batchnorm2d_gradients():
    def fn(x, gamma, beta):
        bn = nn.BatchNorm2d(3)
        bn.gamma, bn.beta = gamma, beta
        return bn(x)

    check_grad(fn, [RNG.standard_normal((2, 3, 3, 2)) * 2 + 1, RNG.uniform(0.5, 2, 3),
                    RNG.standard_normal(3)])


def test_flatten_on_nchw_keeps_c_h_w_order_and_gradient():
    x = Tensor(RNG.standard_normal((2, 3, 4, 5)), requires_grad=True)
    y = nn.Flatten()(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y.numpy(), x.numpy().reshape(2, -1))
    check_grad(lambda a: nn.Flatten()(a), [RNG.standard_normal((2, 3, 2, 3))])


# --- binary convolution -----------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_xnor_conv_equals_float_conv_exactly(each_backend, shape, xnor_products):
    x, wb, s, p = conv_case(shape)
    x32, w32 = backend.asarray(x, np.float32), backend.asarray(wb, np.float32)
    got = binary.binary_conv2d(Tensor(x32), Tensor(w32), stride=s, padding=p)
    assert got.dtype == np.float32
    expected = F.conv2d(Tensor(x32), Tensor(w32), stride=s, padding=p).numpy()
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(got.numpy(), conv_ref(x, wb, s, p))
    raw = binary.xnor_conv2d(x32, w32, s, p)
    assert raw.dtype == np.int32 and raw.flags.c_contiguous
    np.testing.assert_array_equal(backend.to_numpy(raw), expected)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[6]],
                         ids=[IDS[0], IDS[1], IDS[4], IDS[6]])
def test_xnor_conv_layer_gradients_equal_float_path(each_backend, shape, xnor_products):
    x, wb, s, p = conv_case(shape)
    o, c, kh, kw = wb.shape
    outs = {}
    for flag in (False, True):
        layer = nn.BinaryConv2d(c, o, (kh, kw), stride=s, padding=p, bias=True,
                                binary_input=flag, rng=np.random.default_rng(5))
        xt = Tensor(backend.asarray(x, np.float32), requires_grad=True)
        out = layer(xt)
        g = np.random.default_rng(6).standard_normal(out.shape).astype(np.float32)
        out.backward(backend.asarray(g))
        outs[flag] = (out.numpy(), backend.to_numpy(xt.grad),
                      backend.to_numpy(layer.weight.grad), backend.to_numpy(layer.bias.grad))
    # out, x's gradient and the bias gradient bit for bit; the weight gradient too, except
    # where numba's direct backward (kernels/numba_conv.binary_conv2d_backward) sums it in
    # an order BLAS does not promise: there within rounding (tests/test_conv_backward.py)
    glue = backend.conv_kernels()
    direct = (glue is not None and hasattr(glue, "binary_conv2d_backward")
              and glue.direct_backward_fits(*(a.astype(np.float32) for a in (x, x, wb)), s, p))
    for i, (a, b) in enumerate(zip(outs[False], outs[True])):
        if i == 2 and direct:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
        else:
            np.testing.assert_array_equal(a, b)


def test_binary_conv_gradient_is_that_of_zero_padding():
    # with +1 padding the weight gradient would also collect border taps; check g_W directly
    x, wb, s, p = conv_case((1, 2, 4, 5, 3, 3, 3, 2, 2))
    xt, wt = Tensor(x, requires_grad=True), Tensor(wb, requires_grad=True)
    out = binary.binary_conv2d(xt, wt, stride=s, padding=p)
    g = RNG.standard_normal(out.shape)
    out.backward(g)
    h = 1e-6
    for t, ref in ((xt, lambda d: conv_ref(x + d, wb, s, p)),
                   (wt, lambda d: conv_ref(x, wb + d, s, p))):
        d = RNG.standard_normal(t.shape)
        numeric = (np.sum(g * ref(h * d)) - np.sum(g * ref(-h * d))) / (2 * h)
        assert math.isclose(numeric, np.sum(host(t.grad) * d), rel_tol=1e-6)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_padding_correction_is_what_plus_one_padding_adds(each_backend, padding):
    wb = pm1(4, 3, 3, 3)
    h, w = 5, 4
    corr = binary.padding_correction(backend.asarray(wb), (h, w), stride=2, padding=padding)
    assert corr.dtype == np.int32
    plus_one = conv_ref(np.pad(np.ones((1, 3, h, w)), ((0, 0), (0, 0), (padding,) * 2,
                                                       (padding,) * 2), constant_values=1), wb, 2)
    zero = conv_ref(np.ones((1, 3, h, w)), wb, 2, padding)
    np.testing.assert_array_equal(backend.to_numpy(corr), (plus_one - zero)[0])


def test_sign_patches_and_weight_rows_give_the_plus_one_padded_conv():
    x, wb, s, p = conv_case((2, 3, 5, 6, 4, 3, 2, 2, 1))
    x[0, 0, 0, :3] = 0.0  # zero counts as +1
    patches = binary.conv_sign_patches(x, 3, 2, stride=s, padding=p)
    assert patches.dtype == bool and patches.shape == (2 * 3 * 4, 3 * 2 * 3)
    rows = binary.conv_weight_rows(wb)
    got = np.where(patches, 1.0, -1.0) @ rows.T  # (N*Ho*Wo, O)
    xs = np.pad(np.where(x >= 0, 1.0, -1.0), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=1)
    np.testing.assert_array_equal(got.reshape(2, 3, 4, 4).transpose(0, 3, 1, 2),
                                  conv_ref(xs, wb, s))


def test_binary_conv2d_float_path_gradient_wrt_input():
    w = np.random.default_rng(3).uniform(-1, 1, (3, 2, 3, 3))

    def fn(x):
        layer = nn.BinaryConv2d(2, 3, 3, stride=2, padding=1)
        layer.weight.data = dev(w)
        return layer(x)

    (g,) = check_grad(fn, [RNG.standard_normal((2, 2, 5, 6))])
    assert np.any(host(g) != 0)


def test_binary_conv2d_eval_flag_and_stochastic_in_training_only():
    x = Tensor(pm1(2, 3, 6, 6).astype(np.float32))
    layer = nn.BinaryConv2d(3, 4, 3, padding=1, stochastic=True, binary_input="eval",
                            rng=np.random.default_rng(1))
    assert not layer.uses_xnor()
    layer.eval()
    assert layer.uses_xnor()
    expected = F.conv2d(x, Tensor(binary.sign(layer.weight.data)), padding=1).numpy()
    np.testing.assert_array_equal(layer(x).numpy(), expected)
    layer.train()
    outs = [layer(x).numpy() for _ in range(3)]
    assert any(not np.array_equal(o, expected) for o in outs)


def test_small_convnet_trains_a_step_on_either_path():
    def net(flag):
        r = np.random.default_rng(0)
        return nn.Sequential(
            nn.BinaryConv2d(1, 4, 3, padding=1, rng=r), nn.BatchNorm2d(4), nn.Sign(),
            nn.BinaryConv2d(4, 4, 3, padding=1, binary_input=flag, rng=r), nn.MaxPool2d(2),
            nn.ShiftBatchNorm2d(4), nn.Sign(), nn.Flatten(),
            nn.BinaryLinear(4 * 3 * 3, 10, binary_input=flag, rng=r), nn.BatchNorm(10))

    x = Tensor(RNG.standard_normal((3, 1, 7, 6)).astype(np.float32))
    grads = []
    for flag in (False, True):
        model = net(flag)
        model(x).sum().backward()
        grads.append([host(p.grad) for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- init -------------------------------------------------------------------------------

def test_binary_conv2d_init():
    layer = nn.BinaryConv2d(7, 5, 3, rng=np.random.default_rng(0))
    w = layer.weight
    assert w.shape == (5, 7, 3, 3) and w.dtype == np.float32 and layer.bias is None
    assert np.all(np.abs(host(w)) <= 1) and np.abs(host(w)).max() > 0.9
    assert w.clip == 1.0
    assert w.lr_scale == pytest.approx(1 / math.sqrt(1.5 / (9 * 7 + 9 * 5)))
    again = nn.BinaryConv2d(7, 5, 3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(host(w), host(again.weight))
    assert nn.BinaryConv2d(2, 3, 3, bias=True).bias.shape == (3,)


def test_conv2d_init_is_glorot_uniform():
    layer = nn.Conv2d(16, 32, 3, rng=np.random.default_rng(0))
    limit = math.sqrt(6 / (16 * 9 + 32 * 9))
    assert np.abs(host(layer.weight)).max() <= limit
    assert np.abs(host(layer.weight)).max() > 0.95 * limit
    assert layer.weight.lr_scale == 1.0 and layer.weight.clip is None
    np.testing.assert_array_equal(host(layer.bias), np.zeros(32))


# --- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 4, 3), lambda: nn.BinaryConv2d(3, 4, 3),
    lambda: nn.BinaryConv2d(3, 4, 3, binary_input=True)], ids=["Conv2d", "BinaryConv2d", "xnor"])
def test_conv_layers_name_themselves_and_the_shapes(make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}: input of shape \(2, 3, 5\) is not 4-D"):
        layer(Tensor(np.zeros((2, 3, 5), np.float32)))
    with pytest.raises(ValueError, match=rf"{name}: input of shape \(2, 5, 6, 6\) has 5 channels,"
                                         r" the weight of shape \(4, 3, 3, 3\) expects 3"):
        layer(Tensor(np.zeros((2, 5, 6, 6), np.float32)))
    with pytest.raises(ValueError, match=rf"{name}: kernel 3x3 is larger than the padded input "
                                         r"2x6 \(input of shape \(1, 3, 2, 6\), padding 0\)"):
        layer(Tensor(np.zeros((1, 3, 2, 6), np.float32)))


@pytest.mark.parametrize("kwargs,what", [
    ({"stride": 0}, "stride"), ({"stride": 1.5}, "stride"), ({"stride": True}, "stride"),
    ({"padding": -1}, "padding"), ({"padding": 0.5}, "padding"),
    ({"kernel_size": 0}, "kernel_size"), ({"kernel_size": (3, 2, 1)}, "kernel_size"),
    ({"in_channels": 0}, "in_channels")])
@pytest.mark.parametrize("cls", [nn.Conv2d, nn.BinaryConv2d])
def test_conv_layers_refuse_bad_arguments(cls, kwargs, what):
    args = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {what} must be"):
        cls(**args)


def test_binary_conv2d_refuses_bad_binary_input():
    with pytest.raises(ValueError, match="BinaryConv2d: binary_input"):
        nn.BinaryConv2d(3, 4, 3, binary_input="yes")


@pytest.mark.parametrize("fn", [F.conv2d, binary.binary_conv2d], ids=["conv2d", "binary"])
def test_functional_conv_errors(fn):
    x, w = Tensor(np.ones((1, 2, 4, 4))), Tensor(np.ones((3, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"weight of shape \(3, 2, 3\) is not 4-D"):
        fn(x, Tensor(np.ones((3, 2, 3))))
    with pytest.raises(ValueError, match=r"input of shape \(2, 4, 4\) is not 4-D"):
        fn(Tensor(np.ones((2, 4, 4))), w)
    with pytest.raises(ValueError, match=r"has 2 channels, the weight of shape \(3, 3, 3, 3\)"):
        fn(x, Tensor(np.ones((3, 3, 3, 3))))
    with pytest.raises(ValueError, match=r"kernel 3x3 is larger than the padded input 2x2"):
        fn(Tensor(np.ones((1, 2, 2, 2))), w)
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="stride must be an integer >= 1"):
            fn(x, w, stride=bad)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="padding must be an integer >= 0"):
            fn(x, w, padding=bad)
    assert fn(Tensor(np.ones((1, 2, 2, 2))), w, padding=1).shape == (1, 3, 2, 2)


def test_max_pool_errors_name_the_layer_and_shape():
    with pytest.raises(ValueError, match=r"MaxPool2d: input of shape \(2, 8\) is not 4-D"):
        nn.MaxPool2d(2)(Tensor(np.zeros((2, 8))))
    with pytest.raises(ValueError, match=r"MaxPool2d: kernel 3x3 is larger than the padded "
                                         r"input 2x5 \(input of shape \(1, 1, 2, 5\)"):
        nn.MaxPool2d(3)(Tensor(np.zeros((1, 1, 2, 5))))
    with pytest.raises(ValueError, match=r"max_pool2d: kernel 2x2 is larger"):
        F.max_pool2d(Tensor(np.zeros((1, 1, 1, 5))), 2)
    for kwargs in ({"kernel_size": 0}, {"kernel_size": 2, "stride": 0}, {"kernel_size": 2.0}):
        with pytest.raises(ValueError, match="MaxPool2d: .* must be an integer >= 1"):
            nn.MaxPool2d(**kwargs)
    with pytest.raises(ValueError, match="max_pool2d: stride must be an integer >= 1"):
        F.max_pool2d(Tensor(np.zeros((1, 1, 4, 4))), 2, stride=0)
