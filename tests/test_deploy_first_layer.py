"""The frozen runtime's first layer on 8-bit input and its glue: both exact methods
(bit planes, float32 BLAS) against exact integer arithmetic, the float32 bound, the
fused threshold on float32 sums, the measured choice, and buffers reused across batches."""

import numpy as np
import pytest

from minibnn import deploy, nn
from minibnn.deploy import runtime
from minibnn.kernels import numba_cpu, numba_madd, reference

from arrays import dev
from conftest import backend_params

CPU = backend_params(["numpy", "numba"])
INT8 = runtime.int8_available("numba")  # AVX512-VNNI or AVX2


def exact_first(x, w_pm1):
    """(2x - 255) . w in int64: the first layer's z."""
    return (2 * x.astype(np.int64) - 255) @ w_pm1.T.astype(np.int64)


@pytest.mark.parametrize("name", CPU)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 63, 7), (17, 784, 65), (3, 1000, 130), (0, 10, 4)])
def test_both_methods_are_the_exact_first_layer(name, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    x[:, :1] = 255  # extremes
    w = np.where(rng.random((n, k)) < 0.5, -1, 1)
    packed = reference.pack_rows(w)
    kern = numba_cpu if name == "numba" else reference
    want = exact_first(x, w)
    for method in ("bitplanes", "float32") + (("int8",) if INT8 else ()):
        z = deploy.first_layer(x, packed, k, kern, method)
        assert z.dtype == np.int32 and z.shape == (m, n)
        np.testing.assert_array_equal(z, want)


def test_float32_bound():
    assert runtime.float32_is_exact(784) and runtime.float32_is_exact(65793)
    assert not runtime.float32_is_exact(65794)  # 255 * 65794 > 2^24
    x = np.zeros((1, 65794), np.uint8)
    w = reference.pack_rows(np.ones((1, 65794)))
    with pytest.raises(ValueError, match="'float32' is not exact for k = 65794"):
        deploy.first_layer(x, w, 65794, reference, "float32")
    with pytest.raises(ValueError, match="'float16' is not exact for k = 65794"):
        deploy.first_layer(x, w, 65794, reference, "float16")
    with pytest.raises(ValueError, match="method: expected 'bitplanes', 'float32', 'int8' or "
                                         "'float16'"):
        deploy.first_layer(x, w, 65794, reference, "int4")


def test_sums_threshold_is_the_integer_threshold():
    """2 s - c >= t  iff  s >= t_s, for every reachable s, thresholds beyond the range too."""
    k = 5
    s = np.arange(-255 * k, 255 * k + 1)
    for c in (-255 * k, -7, 0, 8, 255 * k):
        t = np.array([-10**9, -2 * 255 * k - 1, -3, -2, 0, 1, 2, 17, 2 * 255 * k + 1, 10**9])
        ts = runtime.sums_threshold(t, np.full(t.shape, c, np.float32), k)
        assert ts.dtype == np.float32
        np.testing.assert_array_equal(s[:, None].astype(np.float32) >= ts,
                                      2 * s[:, None] - c >= t)


def small_net(k=784, hidden=48, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.BinaryLinear(k, hidden, rng=rng), nn.BatchNorm(hidden), nn.Sign(),
                          nn.BinaryLinear(hidden, 10, rng=rng), nn.BatchNorm(10))
    for layer in model.layers:
        if isinstance(layer, nn.BatchNorm):
            layer.running_mean[...] = dev(rng.normal(0, 20, layer.running_mean.shape))
            layer.gamma.data[...] = dev(rng.normal(0, 1, layer.gamma.data.shape))
    return deploy.freeze(model.eval())


@pytest.mark.parametrize("name", CPU)
def test_methods_and_batches_agree(name):
    """Every method and batch size gives the same integer scores and hidden bits: the
    buffers reused from batch to batch (and the fused float32 threshold) change nothing."""
    frozen = small_net()
    x = np.random.default_rng(1).integers(0, 256, size=(300, 784), dtype=np.uint8)
    frozen.first_layer_method = "bitplanes"
    want = frozen.integer_scores(x, backend=name)
    want_pred = frozen.predict(x, backend=name)
    bits = frozen.activations(x, backend=name)
    methods = ("float32", "auto", "bitplanes") + (("int8",) if INT8 and name == "numba" else ())
    for method in methods:
        frozen.first_layer_method = method
        for batch in (300, 64, 7):
            got = frozen.integer_scores(x, backend=name, batch_size=batch)
            np.testing.assert_array_equal(got, want)
            assert not np.shares_memory(got[:7], got[7:])
        np.testing.assert_array_equal(frozen.predict(x, backend=name, batch_size=50),
                                      want_pred)
        for a, b in zip(frozen.activations(x, backend=name), bits):
            np.testing.assert_array_equal(a, b)


def test_auto_times_both_methods_once_per_backend():
    frozen = small_net()
    x = np.random.default_rng(2).integers(0, 256, size=(40, 784), dtype=np.uint8)
    frozen.predict(x, backend="numba")
    times = frozen.first_layer_timings["numba"]
    assert set(times) == {"bitplanes", "float32"} | ({"int8"} if INT8 else set())
    assert all(t > 0 for t in times.values())
    plan = frozen._first_plans["numba"]
    assert plan.method == min(times, key=times.get)
    frozen.predict(x, backend="numba")
    assert frozen._first_plans["numba"] is plan  # kept
    frozen.layers[0].weight = frozen.layers[0].weight.copy()  # a new weight: planned again
    frozen.predict(x, backend="numba")
    assert frozen._first_plans["numba"] is not plan


def test_methods_take_turns_and_a_slow_one_is_dropped():
    import time
    calls = []

    def run(key, seconds):
        def fn():
            calls.append(key)
            time.sleep(seconds)
        return fn

    times = runtime._best_times({"fast": run("fast", 0.001), "slow": run("slow", 0.06)},
                                "numpy", rounds=4)
    # warm-up and round 1 in turns, then the slow one (over 2x the fast) is not run again
    assert calls == ["fast", "slow", "fast", "slow", "fast", "fast", "fast"]
    assert times["fast"] < times["slow"] and times["slow"] >= 0.06


def test_numba_keeps_weights_in_kernel_form_once():
    """On numba every layer after the first multiplies by a PreparedWeights (the kernels'
    panels or planes, made once), kept across calls, remade for a replaced weight array."""
    frozen = small_net()
    x = np.random.default_rng(3).integers(0, 256, size=(30, 784), dtype=np.uint8)
    want = frozen.integer_scores(x, backend="numpy")
    np.testing.assert_array_equal(frozen.integer_scores(x, backend="numba"), want)
    prepared = frozen._prepare("numba")
    assert isinstance(prepared[0].gemm_weight, np.ndarray)  # the first layer: its own methods
    second = prepared[1].gemm_weight
    assert isinstance(second, numba_cpu.PreparedWeights)
    np.testing.assert_array_equal(second.rows, frozen.layers[1].weight)
    assert frozen._prepare("numba")[1].gemm_weight is second  # kept
    assert not isinstance(frozen._prepare("numpy")[1].gemm_weight, numba_cpu.PreparedWeights)
    old = frozen.layers[1].weight
    flipped = ~old  # every sign flips; the padding bits stay 0
    flipped[:, -1] &= reference.pad_mask(frozen.layers[1].k)
    frozen.layers[1].weight = flipped
    assert frozen._prepare("numba")[1].gemm_weight is not second
    np.testing.assert_array_equal(frozen.integer_scores(x, backend="numba"),
                                  frozen.integer_scores(x, backend="numpy"))
    frozen.layers[1].weight = old
    np.testing.assert_array_equal(frozen.integer_scores(x, backend="numba"), want)


def test_first_layer_method_is_checked():
    frozen = small_net()
    with pytest.raises(ValueError, match=r"first_layer_method: expected one of \('auto', "
                                         r"'bitplanes', 'float32', 'int8', 'float16'\), "
                                         r"got 'int4'"):
        frozen.first_layer_method = "int4"
    assert frozen.first_layer_method == "auto"
    wide = runtime.FrozenBNN([
        runtime.FrozenLayer(reference.pack_rows(np.ones((2, 70000))), 70000, 8,
                            threshold=np.zeros(2, np.int32)),
        runtime.FrozenLayer(reference.pack_rows(np.ones((3, 2))), 2, 1,
                            scale=np.ones(3), offset=np.zeros(3))])
    for method in ("float32", "float16"):
        with pytest.raises(ValueError, match=f"'{method}' is not exact for a first layer of "
                                             "k = 70000"):
            wide.first_layer_method = method
    x = np.full((2, 70000), 255, np.uint8)
    np.testing.assert_array_equal(wide.integer_scores(x, backend="numba"), [[2, 2, 2]] * 2)
    assert wide._first_plans["numba"].method in ("bitplanes", "int8")  # never float32 here
    assert "float32" not in wide.first_layer_timings.get("numba", {})


def test_int8_only_where_it_runs():
    frozen = small_net()
    x = np.zeros((3, 784), np.uint8)
    frozen.first_layer_method = "int8"
    with pytest.raises(ValueError, match="'int8' runs on the numba backend of a CPU with "
                                         "AVX512-VNNI or AVX2, not on backend 'numpy'"):
        frozen.predict(x, backend="numpy")
    if INT8:
        frozen.first_layer_method = "bitplanes"
        want = frozen.integer_scores(x, backend="numba")
        frozen.first_layer_method = "int8"
        np.testing.assert_array_equal(frozen.integer_scores(x, backend="numba"), want)
        assert frozen._first_plans["numba"].method == "int8"


@pytest.mark.skipif(not numba_madd.available(), reason="this CPU has no AVX2")
def test_int8_first_layer_on_avx2(monkeypatch):
    """Where the CPU has AVX2 but not VNNI, "int8" runs on numba_madd's vpmaddubsw product:
    the same scores and bits as bit planes, in batches and fused with the threshold."""
    frozen = small_net()
    x = np.random.default_rng(6).integers(0, 256, size=(70, 784), dtype=np.uint8)
    x[0], x[1] = 0, 255
    frozen.first_layer_method = "bitplanes"
    want = frozen.integer_scores(x, backend="numba")
    bits = frozen.activations(x, backend="numba")
    monkeypatch.setattr(runtime, "int8_kernels", lambda: numba_madd)
    frozen.first_layer_method = "int8"
    for batch in (70, 16, 3):
        np.testing.assert_array_equal(frozen.integer_scores(x, backend="numba", batch_size=batch),
                                      want)
    plan = frozen._first_plans["numba"]
    assert plan.method == "int8" and plan.dense.kern is numba_madd
    for a, b in zip(frozen.activations(x, backend="numba"), bits):
        np.testing.assert_array_equal(a, b)


def test_float16_only_on_the_gpu():
    frozen = small_net()
    x = np.random.default_rng(4).integers(0, 256, size=(20, 784), dtype=np.uint8)
    frozen.first_layer_method = "float16"  # accepted: where it runs is checked when it runs
    for name in ("numpy", "numba"):
        with pytest.raises(ValueError, match=r"first_layer_method: 'float16' runs on the cupy "
                                             rf"backend \(cuBLAS GemmEx\), not on '{name}'"):
            frozen.predict(x, backend=name)
    dense = runtime.dense_first_weights(frozen.layers[0].weight, 784, np, "float16")
    assert dense.w_t.dtype == np.float16
    with pytest.raises(ValueError, match="method: 'float16' runs on the cupy backend"):
        runtime.first_layer(x, frozen.layers[0].weight, 784, reference, "float16", dense)
    frozen.first_layer_method = "auto"
    frozen.predict(x, backend="numba")
    assert "float16" not in frozen.first_layer_timings["numba"]


@pytest.mark.parametrize("name", backend_params(["cupy"]))
def test_float16_first_layer_on_the_gpu_is_exact(name):
    """The "float16" first layer (tensor cores through cublasGemmEx; under the fake CuPy its
    NumPy stand-in) gives the integer scores, hidden bits and predictions of bit planes on
    the NumPy reference, in every batch size, fused threshold and traced alike."""
    frozen = small_net()
    x = np.random.default_rng(5).integers(0, 256, size=(300, 784), dtype=np.uint8)
    x[0], x[1], x[2] = 0, 255, 128  # the extremes: |s| = 255 k is the largest sum
    frozen.first_layer_method = "bitplanes"
    want = frozen.integer_scores(x, backend="numpy")
    want_pred = frozen.predict(x, backend="numpy")
    bits = frozen.activations(x, backend="numpy")
    trace = frozen.trace(x[:50], backend="numpy")
    assert runtime.float16_exact_on(name) is None, runtime.float16_exact_on(name)
    frozen.first_layer_method = "float16"
    for batch in (300, 64, 7):
        np.testing.assert_array_equal(frozen.integer_scores(x, backend=name, batch_size=batch),
                                      want)
    assert frozen._first_plans[name].method == "float16"
    np.testing.assert_array_equal(frozen.predict(x, backend=name), want_pred)
    for a, b in zip(frozen.activations(x, backend=name), bits):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(frozen.trace(x[:50], backend=name), trace):
        np.testing.assert_array_equal(a, b)
    frozen = small_net()  # "auto" (the default) times float16 with the other methods
    np.testing.assert_array_equal(frozen.predict(x, backend=name), want_pred)
    assert "float16" in frozen.first_layer_timings[name]
    assert frozen._first_plans[name].method == min(frozen.first_layer_timings[name],
                                                   key=frozen.first_layer_timings[name].get)
