"""The binary layers' backward products as split bf16 GEMMs (``backend.split_matmul_pm1``,
``backend.bf16_backward``; ``kernels.bf16`` is the NumPy model).

The CPU tests check the model: the three-part split is exact where the module docstring says,
the products equal float64 references within the float32 accumulation bound, and a training
step with the option on follows the default step closely. The tests marked ``gpu`` run the
real kernels (``cupy_fused.split_bf16``, ``cublasGemmEx``) on a GPU; under the NumPy-backed
fake CuPy (``tools/fake_cupy``) they check the plumbing only, and the graph test skips."""

import numpy as np
import pytest

import minibnn as bnn
from conftest import backend_params
from minibnn import backend, losses, models, optim, train
from minibnn.kernels import bf16

cupy_only = pytest.mark.parametrize("name", backend_params(("cupy",)))
U32 = 2.0 ** -24  # float32's unit roundoff


def _spread(rng, n, lo, hi):
    """n float32 values with random sign, significand and binary exponent in [lo, hi)."""
    e = rng.integers(lo, hi, n)
    x = rng.uniform(1, 2, n) * np.exp2(e.astype(np.float64)) * rng.choice([-1.0, 1.0], n)
    return x.astype(np.float32)


def test_bf16_rounding_is_round_to_nearest_even():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # bf16's spacing in [1, 2)
    x = np.array([1.0, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20, -2.5,
                  np.inf, -np.inf, 0.0], np.float32)
    want = np.array([1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -2.5, np.inf, -np.inf, 0.0], np.float32)
    np.testing.assert_array_equal(bf16.to_float32(bf16.round_bits(x)), want)
    assert np.isnan(bf16.to_float32(bf16.round_bits(np.array([np.nan], np.float32))))[0]
    assert bf16.to_float32(bf16.round_bits(np.array([one], np.float32)))[0] == one


def test_split_is_exact_over_the_documented_range():
    rng = np.random.default_rng(0)
    x = _spread(rng, 200_000, -110, 128)
    x = x[np.abs(x) < (2 - 2.0 ** -8) * 2.0 ** 127]
    extremes = np.array([2.0 ** -110, -2.0 ** -110, (2 - 2.0 ** -7) * 2.0 ** 127,
                         np.nextafter(np.float32((2 - 2.0 ** -8) * 2.0 ** 127), np.float32(0)),
                         np.finfo(np.float32).tiny * 2.0 ** 16, 1.0, -1.0, 0.0, -0.0,
                         1 + 2.0 ** -23, 3.0 * 2.0 ** 100 + 2.0 ** 78], np.float32)
    for v in (x, extremes):
        parts = bf16.to_float32(bf16.split(v)).astype(np.float64)
        np.testing.assert_array_equal(parts.sum(axis=0), v.astype(np.float64))
        # each part is a bf16 number and no larger than half the previous part's last bit
        assert (np.abs(parts[1]) <= np.abs(parts[0]) * 2.0 ** -8).all()
        assert (np.abs(parts[2]) <= np.abs(parts[1]) * 2.0 ** -8).all()


def test_split_outside_the_range_behaves_as_documented():
    rng = np.random.default_rng(1)
    tiny = _spread(rng, 50_000, -149, -110)
    err = np.abs(bf16.to_float32(bf16.split(tiny)).astype(np.float64).sum(axis=0) - tiny)
    assert err.max() <= 2.0 ** -134 and err.max() > 0  # rounded at bf16's smallest subnormal
    big = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, np.inf, -np.inf],
                   np.float32)
    parts = bf16.to_float32(bf16.split(big))
    np.testing.assert_array_equal(parts[0], [np.inf, -np.inf, np.inf, -np.inf])
    np.testing.assert_array_equal(parts[1:], 0)  # a non-finite part ends the split
    nan = bf16.to_float32(bf16.split(np.array([np.nan], np.float32)))
    assert np.isnan(nan[0, 0]) and (nan[1:] == 0).all()


def _bound(a, b):
    """The float32 accumulation bound of split_matmul_pm1: (K + 2) u |a| |b|."""
    return (a.shape[1] + 2) * U32 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))


def _operands(rng, m, k, n, exact):
    g = (rng.standard_normal((m, k) if exact == "b" else (k, n))
         * 10.0 ** rng.integers(-8, 3, (m, k) if exact == "b" else (k, n))).astype(np.float32)
    s = np.where(rng.random((k, n) if exact == "b" else (m, k)) < 0.5, -1, 1).astype(np.float32)
    if exact == "b":
        s[rng.random(s.shape) < 0.1] = 0  # zero padding in a conv's patches
        return g, s
    return s, g


@pytest.mark.parametrize("exact", ["a", "b"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 300, 5), (64, 2000, 33), (3, 0, 4)])
def test_split_products_meet_the_float32_accumulation_bound(exact, shape):
    a, b = _operands(np.random.default_rng(2), *shape, exact)
    got = bf16.split_matmul(a, b, exact)
    assert got.dtype == np.float32 and got.shape == (shape[0], shape[2])
    err = np.abs(got - a.astype(np.float64) @ b.astype(np.float64))
    assert (err <= _bound(a, b)).all()
    # and the bound is not vacuous: one bf16 part alone would miss it
    if shape[1] > 1:
        f = b if exact == "a" else a
        one = bf16.to_float32(bf16.split(f)[0])
        coarse = a @ one if exact == "a" else one @ b
        assert (np.abs(coarse - a.astype(np.float64) @ b.astype(np.float64)) > _bound(a, b)).any()


def test_split_products_refuse_bad_operands():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="exact: expected 'a' or 'b'"):
        backend.split_matmul_pm1(a, a.T, "c")
    with pytest.raises(ValueError, match=r"2-D float32 \(M, K\) @ \(K, N\).*\(3, 4\).*\(3, 4\)"):
        backend.split_matmul_pm1(a, a, "b")
    with pytest.raises(ValueError, match="float64"):
        backend.split_matmul_pm1(a.astype(np.float64), a.T, "b")


def test_the_layout_writes_fewer_bytes_and_is_checked():
    # the CIFAR-10 ConvNet's second conv at batch 50: K = 128 channels for g_x, N*Ho*Wo for g_W
    assert backend.split_layout(1152, 128, 51200, "a") == "reduction"  # g_x = W2^T g2
    assert backend.split_layout(128, 51200, 1152, "b") == "output"     # g_W = g2 patches
    assert backend.split_layout(100, 4096, 4096, "b") == "output"      # linear g_x = g W_b
    assert backend.split_layout(4096, 100, 4096, "b") == "reduction"   # linear g_W = g^T x
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="layout: expected one of reduction, output or None"):
        backend.split_matmul_pm1(a, a.T, "b", layout="rows")


def test_the_setting_is_checked_and_restored(monkeypatch):
    with pytest.raises(ValueError, match="set_bf16_backward: expected 0/1 or one of off, cupy, "
                                         "all"):
        backend.set_bf16_backward("sometimes")
    before = backend.bf16_backward()
    with backend.using_bf16_backward("all"):
        assert backend.bf16_backward() == "all"
    assert backend.bf16_backward() == before
    monkeypatch.setattr(backend, "_bf16_backward", [None])
    monkeypatch.setenv("MINIBNN_CUPY_BF16_BACKWARD", "perhaps")
    with pytest.raises(ValueError, match="MINIBNN_CUPY_BF16_BACKWARD"):
        backend.bf16_backward()
    monkeypatch.setenv("MINIBNN_CUPY_BF16_BACKWARD", "1")
    monkeypatch.setattr(backend, "_bf16_backward", [None])
    assert backend.bf16_backward() == "cupy"


def test_cupy_mode_leaves_cpu_products_alone(monkeypatch):
    """"cupy" changes nothing on the CPU backends: the same floats as with the option off."""
    calls = []
    monkeypatch.setattr(backend, "split_matmul_pm1", lambda *a: calls.append(a))
    a, b = _operands(np.random.default_rng(3), 5, 20, 6, "b")
    with backend.using_bf16_backward("cupy"):
        np.testing.assert_array_equal(backend.matmul_pm1(a, b, "b"), a @ b)
    assert calls == []


def _train(name, mode, steps, net="conv"):
    """Losses, gradients of the first step and parameters after ``steps`` Adam steps."""
    rng = np.random.default_rng(1)
    with backend.use(name), backend.using_bf16_backward(mode):
        model = models.mnist_convnet(rng=bnn.seed(0)) if net == "conv" else \
            models.mnist_mlp(hidden=64, dropout_in=0, dropout_hidden=0, rng=bnn.seed(0))
        opt = optim.Adam(model.parameters(), lr=1e-3)
        out, grads = [], None
        for _ in range(steps):
            x = rng.uniform(-1, 1, (16, 1, 28, 28) if net == "conv" else (16, 784))
            x, y = backend.asarray(x.astype(np.float32)), backend.asarray(rng.integers(0, 10, 16))
            loss, _ = train.train_step(model, opt, losses.squared_hinge, x, y)
            out.append(float(backend.to_numpy(loss.data)))
            if grads is None:
                grads = [backend.to_numpy(p.grad) for p in model.parameters()]
        return out, grads, [backend.to_numpy(p.data) for p in model.parameters()]


@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_a_training_step_with_split_products_follows_the_default(net, xnor_products, monkeypatch):
    calls = []
    real = backend.split_matmul_pm1
    monkeypatch.setattr(backend, "split_matmul_pm1",
                        lambda a, b, exact: calls.append(exact) or real(a, b, exact))
    want = _train("numpy", "off", 3, net)
    assert calls == []
    got = _train("numpy", "all", 3, net)
    assert calls  # the binary layers' backward went through the split path
    for gw, gg in zip(want[1], got[1]):  # first step: same forward, gradients within rounding
        np.testing.assert_allclose(gg, gw, rtol=1e-4, atol=1e-6 * np.abs(gw).max())
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for pw, pg in zip(want[2], got[2]):
        np.testing.assert_allclose(pg, pw, rtol=1e-3, atol=1e-4)


@cupy_only
def test_gpu_split_matches_the_numpy_model(name):
    """cupy_fused.split_bf16 / to_bf16 against kernels.bf16, bit for bit, on every layout."""
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(4)
    x = np.concatenate([_spread(rng, 4999, -149, 128),
                        np.array([np.inf, -np.inf, np.nan, 0.0, -0.0,
                                  np.finfo(np.float32).max], np.float32)]).reshape(-1, 7)
    with backend.use(name):
        xd = backend.asarray(x)
        for view, host in ((xd, x), (xd.T, x.T), (xd[::2, 1:], x[::2, 1:])):
            got = backend.to_numpy(cupy_fused.split_bf16(view))
            np.testing.assert_array_equal(got, bf16.split(np.ascontiguousarray(host)))
            got = backend.to_numpy(cupy_fused.to_bf16(view))
            np.testing.assert_array_equal(got, bf16.round_bits(np.ascontiguousarray(host)))


@cupy_only
def test_gemm_ex_is_exact_on_small_integers_and_checks_its_operands(name):
    from minibnn.kernels import cupy_blas
    rng = np.random.default_rng(5)
    assert cupy_blas.gemm_ex_available() is None, cupy_blas.gemm_ex_available()
    a = rng.integers(-200, 201, (70, 300)).astype(np.float32)
    b = rng.integers(-1, 2, (300, 50)).astype(np.float32)
    want = a.astype(np.float64) @ b
    with backend.use(name):
        for x, y in ((a.astype(np.float16), b.astype(np.float16)),
                     (bf16.round_bits(a), bf16.round_bits(b))):
            if x.dtype == np.uint16:  # bf16 holds integers up to 256 exactly
                np.testing.assert_array_equal(bf16.to_float32(x), a)
            xd, yd = backend.asarray(x), backend.asarray(y)
            np.testing.assert_array_equal(backend.to_numpy(cupy_blas.gemm_ex(xd, yd)), want)
            np.testing.assert_array_equal(backend.to_numpy(cupy_blas.gemm_ex(xd.T.T, yd)), want)
            out = cupy_blas.gemm_ex(xd, yd)
            cupy_blas.gemm_ex(xd, yd, out, beta=1.0)  # accumulates
            np.testing.assert_array_equal(backend.to_numpy(out), 2 * want)
        f32 = backend.asarray(a)
        with pytest.raises(ValueError, match="uint16 .bf16 bits. or float16, got .70, 300. "
                                             "float32"):
            cupy_blas.gemm_ex(f32, backend.asarray(b))
        with pytest.raises(ValueError, match="needs an out array"):
            cupy_blas.gemm_ex(xd, yd, beta=1.0)
        with pytest.raises(ValueError, match=r"out must be C-contiguous float32 of shape "
                                             r"\(70, 50\)"):
            cupy_blas.gemm_ex(xd, yd, backend.asarray(np.zeros((50, 70), np.float32)), beta=1.0)


@cupy_only
@pytest.mark.parametrize("layout", ["reduction", "output"])
@pytest.mark.parametrize("exact", ["a", "b"])
def test_gpu_split_products_against_float64_and_sgemm(name, exact, layout):
    """The real GemmEx path, in each layout, within the float32 accumulation bound of the
    exact product, and close to the Sgemm product (both float32 sums of the same exact
    products); the float operand may be a transposed view (g.T in a linear layer's g_W)."""
    rng = np.random.default_rng(6)
    for shape in [(50, 128, 1152), (1152, 128, 2000), (128, 5000, 288), (1, 1, 1), (7, 3, 5),
                  (9, 3, 0), (0, 3, 4), (4, 0, 3)]:
        a, b = _operands(rng, *shape, exact)
        with backend.use(name):
            ad, bd = backend.asarray(a), backend.asarray(b)
            got = backend.to_numpy(backend.split_matmul_pm1(ad, bd, exact, layout))
            sgemm = backend.to_numpy(backend.matmul(ad, bd))
            view = (backend.asarray(np.ascontiguousarray(a.T)).T, bd) if exact == "b" else \
                (ad, backend.asarray(np.ascontiguousarray(b.T)).T)
            tgot = backend.to_numpy(backend.split_matmul_pm1(*view, exact, layout))
        assert got.shape == tgot.shape == shape[::2] and got.dtype == np.float32
        ref = a.astype(np.float64) @ b.astype(np.float64)
        assert (np.abs(got - ref) <= _bound(a, b)).all(), shape
        assert (np.abs(tgot - ref) <= _bound(a, b)).all(), shape
        assert (np.abs(got - sgemm) <= 2 * _bound(a, b)).all(), shape


@pytest.mark.parametrize("name", backend_params(("numpy", "cupy")))
@pytest.mark.parametrize("exact", ["a", "b"])
def test_the_exact_operand_may_come_as_bf16_bits(name, exact):
    """split_matmul_pm1 and matmul_pm1 take the +-1 operand as its bf16 bit patterns too
    (uint16, as ``cupy_conv.im2col(..., bf16=True)`` writes a binary conv's patches): the
    same result as from the float32 operand, in both layouts; with the split path off,
    matmul_pm1 multiplies the float32 values of the bits."""
    rng = np.random.default_rng(14)
    for shape in [(50, 128, 1152), (1152, 300, 20), (1, 1, 1), (4, 0, 3)]:
        a, b = _operands(rng, *shape, exact)
        s_bits = bf16.round_bits(a if exact == "a" else b)
        a_bits, b_bits = (s_bits, b) if exact == "a" else (a, s_bits)
        with backend.use(name), backend.using_bf16_backward("all"):
            ad, bd, abd, bbd = (backend.asarray(v) for v in (a, b, a_bits, b_bits))
            for layout in ("reduction", "output"):
                want = backend.to_numpy(backend.split_matmul_pm1(ad, bd, exact, layout))
                got = backend.to_numpy(backend.split_matmul_pm1(abd, bbd, exact, layout))
                np.testing.assert_array_equal(got, want, err_msg=f"{shape} {layout}")
            np.testing.assert_array_equal(backend.to_numpy(backend.matmul_pm1(abd, bbd, exact)),
                                          backend.to_numpy(backend.matmul_pm1(ad, bd, exact)))
        with backend.use(name), backend.using_bf16_backward("off"):
            np.testing.assert_array_equal(
                backend.to_numpy(backend.matmul_pm1(abd, bbd, exact)),
                backend.to_numpy(backend.matmul(ad, bd)))
    with pytest.raises(ValueError, match="float32"):  # only the exact operand may be bits
        backend.split_matmul_pm1(np.zeros((2, 3), np.uint16), np.zeros((3, 4), np.float32), "b")


@cupy_only
def test_gpu_bf16_copies_and_sum_match_numpy(name):
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(9)
    x = np.where(rng.random((37, 11)) < 0.5, -1, 1).astype(np.float32)
    x[0, :3] = [0.0, 2.0, 0.5]
    h = bf16.round_bits(x)
    p, q, r = (rng.standard_normal((37, 11)).astype(np.float32) for _ in range(3))
    with backend.use(name):
        xd = backend.asarray(x)
        for view, host in ((xd, x), (xd.T, x.T)):
            hh = bf16.round_bits(np.ascontiguousarray(host))
            np.testing.assert_array_equal(backend.to_numpy(cupy_fused.to_bf16_x3(view, axis=1)),
                                          np.concatenate([hh, hh, hh], axis=1))
            np.testing.assert_array_equal(backend.to_numpy(cupy_fused.to_bf16_x3(view, axis=0)),
                                          np.concatenate([hh, hh, hh], axis=0))
        np.testing.assert_array_equal(backend.to_numpy(cupy_fused.to_bf16(xd)), h)
        got = cupy_fused.sum3(*(backend.asarray(v).T for v in (p, q, r)))
        np.testing.assert_array_equal(backend.to_numpy(got), ((p + q) + r).T)


@cupy_only
@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_gpu_training_with_split_products_follows_the_default(name, net, xnor_products):
    want = _train(name, "off", 3, net)
    got = _train(name, "cupy", 3, net)
    for gw, gg in zip(want[1], got[1]):
        np.testing.assert_allclose(gg, gw, rtol=1e-4, atol=1e-6 * np.abs(gw).max())
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)


@cupy_only
def test_gpu_graphed_step_with_split_products_replays_the_eager_step(name, xnor_products):
    import cupy
    if getattr(cupy, "__fake__", False):
        pytest.skip("the NumPy-backed fake CuPy cannot capture CUDA graphs")
    from test_gpu_graphs import batches_of, run_steps
    batches = batches_of(True, [20] * 5, seed=7)
    runs = []
    for graphed in (False, True):
        built = []
        def build():
            built.append(models.mnist_convnet(rng=bnn.seed(0)))
            return built[-1]
        with backend.using_bf16_backward("cupy"):
            seen, state, _, _, step = run_steps(name, build, graphed, batches)
        if step is not None:
            assert step.reason is None and step.graphed, step.reason
        params = state[:len(list(built[0].parameters()))]  # state starts with the parameters
        runs.append(([loss for loss, _ in seen], params))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(b, a)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(b, a)


def test_split_kernels_compile_with_nvrtc():
    """The bodies of the ElementwiseKernels ``split_bf16`` and ``to_bf16`` in a plain kernel
    of CuPy's argument types, compiled for compute_80 and compute_90 with the fused
    kernels' options (no GPU needed; skipped without the NVRTC library)."""
    from minibnn.kernels import cupy_fused
    from minibnn.kernels.nvrtc_check import NVRTCUnavailable, compile_source, load_nvrtc
    try:
        load_nvrtc()
    except NVRTCUnavailable as exc:
        pytest.skip(str(exc))
    source = (
        cupy_fused.SPLIT_BF16_PREAMBLE +
        'extern "C" __global__ void split_bf16(const float* xs, long long n,\n'
        '                                      unsigned short* parts) {\n'
        "    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
        "    if (i >= n) return;\n"
        "    const float x = xs[i];\n" + cupy_fused.SPLIT_BF16 + "}\n"
        'extern "C" __global__ void to_bf16(const float* xs, long long n, unsigned short* bs) {\n'
        "    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
        "    if (i >= n) return;\n"
        "    const float x = xs[i];\n"
        "    unsigned short b;\n" + cupy_fused._SOURCES["to_bf16"][2] + "\n    bs[i] = b;\n}\n"
        'extern "C" __global__ void to_bf16_x3(const float* xs, long long rows, long long cols,\n'
        "                                      bool along_cols, unsigned short* b) {\n"
        "    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
        "    if (i >= rows * cols) return;\n"
        "    const float x = xs[i];\n" + cupy_fused.TO_BF16_X3 + "}\n")
    for arch in ("compute_80", "compute_90"):  # with the -ftz=true CuPy adds to every kernel
        ptx = compile_source(source, arch, "split_bf16.cu", cupy_fused._OPTIONS + ("-ftz=true",))
        assert all(f".entry {k}" in ptx for k in ("split_bf16", "to_bf16", "to_bf16_x3"))
        assert "fma" not in ptx  # --fmad=false: every subtraction rounds on its own


def test_split_kernel_body_computes_the_numpy_model_when_compiled_for_the_cpu(tmp_path):
    """The CUDA text of ``split_bf16`` and ``to_bf16`` compiled as C++ for this CPU, with
    __float_as_uint and its kin as bit copies, and run on values across float32's range: bit
    for bit the NumPy model. On x86 it runs with the SSE control register's flush-to-zero and
    denormals-are-zero bits set, as CuPy compiles every kernel with -ftz=true (float32
    subnormals flushed; float64 arithmetic on normal values is not affected): the split must
    not depend on float32 arithmetic on subnormals (a GPU run found the first version did).
    This checks the kernel text itself without a GPU (skipped without a C++ compiler)."""
    import shutil
    import subprocess
    from minibnn.kernels import cupy_fused
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "split.cpp"
    src.write_text(
        "#include <cstring>\n#include <cstdio>\n"
        "#if defined(__SSE2__)\n#include <xmmintrin.h>\n#endif\n"
        "#define __device__ static\n"
        "static unsigned int __float_as_uint(float f) { unsigned int u; "
        "std::memcpy(&u, &f, 4); return u; }\n"
        "static float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); "
        "return f; }\n"
        "static double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, 8); "
        "return f; }\n"
        "static long long __double_as_longlong(double f) { long long u; "
        "std::memcpy(&u, &f, 8); return u; }\n"
        "static int __clz(unsigned int u) { return u ? __builtin_clz(u) : 32; }\n"
        + cupy_fused.SPLIT_BF16_PREAMBLE +
        "static void split(float x, long long i, long long n, unsigned short* parts) {"
        + cupy_fused.SPLIT_BF16 + "}\n"
        "static unsigned short to_bf16(float x) { unsigned short b;"
        + cupy_fused._SOURCES["to_bf16"][2] + " return b; }\n"
        "static void to_bf16_x3(float x, long long i, long long rows, long long cols,"
        " bool along_cols, unsigned short* b) {" + cupy_fused.TO_BF16_X3 + "}\n"
        "int main() {\n"
        "#if defined(__SSE2__)\n"
        "    _mm_setcsr(_mm_getcsr() | 0x8040);  /* FTZ | DAZ, as -ftz=true on the GPU */\n"
        "#endif\n"
        "    long long n; if (std::fread(&n, 8, 1, stdin) != 1) return 1;\n"
        "    float* xs = new float[n]; unsigned short* out = new unsigned short[4 * n];\n"
        "    if (std::fread(xs, 4, n, stdin) != (size_t)n) return 1;\n"
        "    for (long long i = 0; i < n; i++) { split(xs[i], i, n, out);"
        " out[3 * n + i] = to_bf16(xs[i]); }\n"
        "    unsigned short* x3 = new unsigned short[6 * n];\n"
        "    for (long long i = 0; i < n; i++) { to_bf16_x3(xs[i], i, n / 7, 7, true, x3);"
        " to_bf16_x3(xs[i], i, n / 7, 7, false, x3 + 3 * n); }\n"
        "    std::fwrite(out, 2, 4 * n, stdout); std::fwrite(x3, 2, 6 * n, stdout); return 0;\n}\n")
    exe = tmp_path / "split"
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-o", str(exe), str(src)], check=True)
    rng = np.random.default_rng(8)
    x = np.concatenate([_spread(rng, 20_004, -149, 128),  # 20,013 values: 2,859 rows of 7
                        np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1.0,
                                  np.finfo(np.float32).max, 1 + 2.0 ** -8], np.float32)])
    run = subprocess.run([str(exe)], input=np.int64(x.size).tobytes() + x.tobytes(),
                         capture_output=True, check=True)
    got = np.frombuffer(run.stdout, np.uint16)
    split, x3 = got[:4 * x.size].reshape(4, x.size), got[4 * x.size:]
    np.testing.assert_array_equal(split[:3], bf16.split(x))
    np.testing.assert_array_equal(split[3], bf16.round_bits(x))
    h = bf16.round_bits(x).reshape(-1, 7)  # as (n / 7, 7): side by side, then stacked
    np.testing.assert_array_equal(x3[:3 * x.size].reshape(-1, 21), np.concatenate([h] * 3, 1))
    np.testing.assert_array_equal(x3[3 * x.size:].reshape(-1, 7), np.concatenate([h] * 3, 0))


def test_bench_split_gemm_runs_on_the_numpy_model(tmp_path, capsys):
    import json
    from conftest import load_benchmark
    bench = load_benchmark("bench_split_gemm")
    shapes = bench.convnet_products()
    assert ("conv 128->128 @32: g_x", 1152, 128, 51200, "a") in shapes  # W2^T g2 at batch 50
    assert ("dense 8192->1024: g_W", 1024, 50, 8192, "b") in shapes
    result = bench.main(["--backend", "numpy", "--repeats", "1", "--inner", "1",
                         "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "split_gemm_cpu.json").read_text())
    assert len(saved["rows"]) == len(shapes) == len(result["rows"])
    for row in saved["rows"]:
        assert all(row[f"{p} err/bound"] <= 1 for p in ("fp32", "bf16 reduction", "bf16 output"))
        assert row["chosen"] in ("bf16 reduction", "bf16 output") and row["fp32 s"] > 0
    assert "all products of one step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--backend", "numpy", "--repeats", "0", "--out", str(tmp_path)])
