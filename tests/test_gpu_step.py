"""The cupy training step's fused kernels and host-sync-free epoch loop: same numbers as
the array code.

Run on a GPU (marked ``gpu``; skipped with the reason elsewhere). Under the NumPy-backed
fake CuPy (``tools/fake_cupy``) they check the plumbing only: there the kernels are NumPy
stand-ins."""

import numpy as np
import pytest

from conftest import backend_params
from minibnn import backend, losses, optim, train
from minibnn.nn import BatchNorm, Parameter
from minibnn.tensor import Tensor

cupy_only = pytest.mark.parametrize("name", backend_params(("cupy",)))


def _adam_run(name, dtype, steps=4, clip=1.0, fused=True):
    """Weights and moments after ``steps`` Adam steps from fixed grads on backend ``name``."""
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(3)
    w0 = rng.uniform(-1.2, 1.2, (37, 70)).astype(dtype)
    grads = [rng.standard_normal(w0.shape).astype(dtype) * 10.0 ** rng.integers(-6, 2)
             for _ in range(steps)]
    with backend.use(name):
        p = Parameter(backend.asarray(w0.copy()), lr_scale=3.7, clip=clip)
        opt = optim.Adam([p], lr=0.01)
        for g in grads:
            p.grad = backend.asarray(g)
            if fused:
                opt.step()
            else:
                with cupy_fused.disabled():
                    opt.step()
        return [backend.to_numpy(a) for a in (p.data, opt.state[0]["m"], opt.state[0]["v"])]


@cupy_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [1.0, None])
def test_fused_adam_equals_the_numpy_optimizer_bit_for_bit(name, dtype, clip):
    want = _adam_run("numpy", dtype, clip=clip)
    got = _adam_run(name, dtype, clip=clip)
    for a, b, what in zip(want, got, ("weights", "m", "v")):
        np.testing.assert_array_equal(b, a, err_msg=what)
    if clip is not None:
        assert np.abs(got[0]).max() <= clip


@cupy_only
def test_fused_adam_equals_the_array_code_on_the_gpu(name):
    for a, b in zip(_adam_run(name, np.float32, fused=False), _adam_run(name, np.float32)):
        np.testing.assert_array_equal(b, a)


@cupy_only
def test_fused_adam_keeps_nan(name):
    with backend.use(name):
        p = Parameter(backend.asarray(np.zeros(3, np.float32)), clip=1.0)
        opt = optim.Adam([p], lr=0.1)
        p.grad = backend.asarray(np.array([1.0, np.nan, -1.0], np.float32))
        opt.step()
        w = backend.to_numpy(p.data)
    assert np.isnan(w[1]) and np.isfinite(w[[0, 2]]).all()


@cupy_only
def test_fused_running_statistics_equal_the_formula(name):
    """The kernel against the NumPy formula on the same inputs (the batch statistics
    themselves come from each backend's own reductions, so they are given here)."""
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(0)
    running = rng.standard_normal(999).astype(np.float32)
    for new in (rng.standard_normal(999).astype(np.float32),
                rng.standard_normal(999)):  # float64 statistics are cast first
        want = (1 - 0.137) * running + 0.137 * new.astype(np.float32)
        with backend.use(name):
            r = backend.asarray(running.copy())
            cupy_fused.ema_update(r, backend.asarray(new), 0.137)
            np.testing.assert_array_equal(backend.to_numpy(r), want)


@cupy_only
def test_fused_running_statistics_equal_the_array_code(name):
    import contextlib
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((50, 9)).astype(np.float32) * 3 + 1 for _ in range(3)]
    out = []
    for fused in (False, True):
        with backend.use(name), (contextlib.nullcontext() if fused else cupy_fused.disabled()):
            bn = BatchNorm(9, momentum=0.137)
            for x in xs:
                bn(Tensor(backend.asarray(x)))
            out.append([backend.to_numpy(a) for a in (bn.running_mean, bn.running_var)])
    for a, b in zip(*out):
        np.testing.assert_array_equal(b, a)


@cupy_only
def test_deferred_nan_check_reports_at_the_next_read(name):
    from minibnn import binary
    from minibnn.kernels import cupy_gpu
    with backend.use(name):
        x = backend.asarray(np.array([[1.0, np.nan, -2.0]], np.float32))
        with pytest.raises(ValueError, match="NaN"):
            cupy_gpu.pack_rows(x)
        packed = cupy_gpu.pack_rows(x, check_nan="defer")  # no error yet
        assert packed.shape == (1, 1)
        with pytest.raises(ValueError, match="NaN"):
            binary.raise_deferred_nan()
        binary.raise_deferred_nan()  # the flag was reset by the report
        with pytest.raises(ValueError, match="NaN"):
            with binary.deferred_nan_checks():
                binary._pack(cupy_gpu, x)


@cupy_only
def test_trusted_labels_skip_only_the_range_check(name):
    with backend.use(name):
        out = Tensor(backend.asarray(np.zeros((2, 3), np.float32)), requires_grad=True)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            losses.squared_hinge(out, backend.asarray(np.array([0, 3])))
        with losses.labels_checked():
            with pytest.raises(ValueError, match="integers of shape"):
                losses.squared_hinge(out, backend.asarray(np.array([0.0, 1.0])))


def test_an_epoch_refuses_labels_out_of_range_after_its_first_batch(each_backend):
    from minibnn import models
    import minibnn as bnn
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (60, 784)).astype(np.float32)
    y = rng.integers(0, 10, 60)
    y[45] = 10  # not in the first batch of 20 for this seed's order, or in it: either way refused
    model = models.mnist_mlp(hidden=16, rng=bnn.seed(0))
    opt = optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        train.train_epoch(model, opt, losses.squared_hinge, x, y, 20, np.random.default_rng(0))


@cupy_only
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_gpu_dropout_mask_is_the_reference_hash(name, p):
    from minibnn import functional as F
    from minibnn.kernels import cupy_fused
    rng = np.random.default_rng(5)
    a = rng.standard_normal((33, 70)).astype(np.float32)
    thr = F.dropout_threshold(p)
    with backend.use(name):
        y, m = cupy_fused.dropout(backend.asarray(a), 12345678901234567, 7 * 70, thr, 1 / (1 - p))
        y, m = backend.to_numpy(y), backend.to_numpy(m)
    keep = F.dropout_keep(12345678901234567, a.shape, 7 * 70, thr)
    np.testing.assert_array_equal(m, keep.astype(np.float32) * np.float32(1 / (1 - p)))
    np.testing.assert_array_equal(y, a * m)
    assert abs(keep.mean() - (1 - p)) < 0.03


@cupy_only
def test_gpu_dropout_rows_are_the_whole_batch_mask_rows(name):
    from minibnn import functional as F
    from minibnn.tensor import Tensor
    a = np.ones((8, 50), np.float32)
    with backend.use(name):
        whole = backend.to_numpy(F.dropout(Tensor(backend.asarray(a)), 0.5, np.random.default_rng(1)).data)
        part = backend.to_numpy(F.dropout(Tensor(backend.asarray(a[3:6])), 0.5, np.random.default_rng(1),
                                          rows=(3, 8)).data)
    np.testing.assert_array_equal(part, whole[3:6])


def _steps(name, conv, fused, steps=3):
    import minibnn as bnn
    from minibnn import models
    from minibnn.kernels import cupy_fused
    with backend.use(name):
        model = (models.mnist_convnet(rng=bnn.seed(0)) if conv else
                 models.mnist_mlp(hidden=96, dropout_in=0.2, dropout_hidden=0.5, rng=bnn.seed(0)))
        opt = optim.Adam(model.parameters(), lr=1e-2)
        rng = np.random.default_rng(1)
        out = []
        for _ in range(steps):
            x = rng.uniform(-1, 1, (20, 1, 28, 28) if conv else (20, 784)).astype(np.float32)
            x, y = backend.asarray(x), backend.asarray(rng.integers(0, 10, 20))
            if fused:
                loss, _ = train.train_step(model, opt, losses.squared_hinge, x, y)
            else:
                with cupy_fused.disabled():
                    loss, _ = train.train_step(model, opt, losses.squared_hinge, x, y)
            out.append(backend.to_numpy(loss.data))
        return out + [backend.to_numpy(p.data) for p in model.parameters()] + \
            [backend.to_numpy(m.running_var) for m in model.modules() if hasattr(m, "running_var")]


@cupy_only
@pytest.mark.parametrize("conv", [False, True], ids=["mlp_dropout", "convnet"])
def test_fused_training_steps_equal_the_array_code_bit_for_bit(name, conv, xnor_products):
    for a, b in zip(_steps(name, conv, fused=False), _steps(name, conv, fused=True)):
        np.testing.assert_array_equal(b, a)


@cupy_only
def test_fused_sign_and_batch_norm_gradients_equal_the_array_code(name):
    import contextlib
    from minibnn import binary
    from minibnn.kernels import cupy_fused
    from minibnn.nn import BatchNorm
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 13)).astype(np.float32) * 2
    x[0, :3] = [0.0, -0.0, 1.0]
    g = rng.standard_normal((40, 13)).astype(np.float32)
    res = []
    for fused in (False, True):
        with backend.use(name), (contextlib.nullcontext() if fused else cupy_fused.disabled()):
            bn = BatchNorm(13)
            t = Tensor(backend.asarray(x), requires_grad=True)
            out = binary.sign_ste(bn(t))
            out.backward(backend.asarray(g))
            res.append([backend.to_numpy(out.data), backend.to_numpy(t.grad),
                        backend.to_numpy(bn.gamma.grad), backend.to_numpy(bn.beta.grad)])
    for a, b in zip(*res):
        np.testing.assert_array_equal(b, a)


@cupy_only
def test_gpu_first_layer_on_float32_is_exact_and_timed_against_bit_planes(name):
    from minibnn.deploy import runtime
    from test_deploy_first_layer import small_net
    x = np.random.default_rng(7).integers(0, 256, size=(300, 784), dtype=np.uint8)
    want = small_net().integer_scores(x, backend="numpy")
    for method in ("bitplanes", "float32", "auto"):
        frozen = small_net()
        frozen.first_layer_method = method
        np.testing.assert_array_equal(frozen.integer_scores(x, backend=name), want)
    if runtime.float32_exact_on(name):  # plain FP32 products: the exact methods compete
        assert {"bitplanes", "float32"} <= set(frozen.first_layer_timings[name])
    assert ("float16" in frozen.first_layer_timings[name]) == \
        (runtime.float16_exact_on(name) is None)
