"""The training step as one CUDA graph (``minibnn.graphs``): replays compute exactly what the
eager step computes, step after step, and consume the step count and the random generator
as it does. GPU only (marked ``gpu``); the NumPy-backed fake CuPy cannot capture graphs."""

import numpy as np
import pytest

import minibnn as bnn
from conftest import backend_params
from minibnn import backend, graphs, losses, models, optim, train

cupy_only = pytest.mark.parametrize("name", backend_params(("cupy",)))


@pytest.fixture
def real_gpu(name):
    import cupy
    if getattr(cupy, "__fake__", False):
        pytest.skip("the NumPy-backed fake CuPy cannot capture CUDA graphs")
    return name


def _build(conv):
    if conv:
        return models.mnist_convnet(rng=bnn.seed(0))
    return models.mnist_mlp(hidden=96, dropout_in=0.2, dropout_hidden=0.5, rng=bnn.seed(0))


def run_steps(name, build, graphed, batches):
    """Train ``build()``'s model with Adam (lr 1e-2) on ``batches`` on backend ``name``, eagerly
    or through a ``GraphedStep``; returns (per step (loss, scores), state: the parameters,
    then Adam's moments, then BN running means, Adam's step count, the models' generator
    states, the GraphedStep or None). Shared with tests/test_bf16_backward.py."""
    with backend.use(name):
        model = build()
        opt = optim.Adam(model.parameters(), lr=1e-2)
        step = graphs.GraphedStep(model, opt, losses.squared_hinge) if graphed else None
        seen = []
        for x, y in batches:
            x, y = backend.asarray(x), backend.asarray(y)
            if step is None:
                with losses.labels_checked():
                    loss, scores = train.train_step(model, opt, losses.squared_hinge, x, y)
            else:
                loss, scores = step(x, y)
            seen.append((backend.to_numpy(loss.data).copy(), backend.to_numpy(scores.data).copy()))
        state = [backend.to_numpy(p.data) for p in model.parameters()]
        state += [backend.to_numpy(s[k]) for s in opt.state for k in ("m", "v")]
        state += [backend.to_numpy(m.running_mean) for m in model.modules()
                  if hasattr(m, "running_mean")]
        rng_state = [m.rng.bit_generator.state for m in model.modules() if hasattr(m, "rng")]
        return seen, state, opt.t, rng_state, step


def _run(name, conv, graphed, batches):
    return run_steps(name, lambda: _build(conv), graphed, batches)


def batches_of(conv, sizes, seed=1):
    rng = np.random.default_rng(seed)
    shape = (1, 28, 28) if conv else (784,)
    return [(rng.uniform(-1, 1, (n,) + shape).astype(np.float32), rng.integers(0, 10, n))
            for n in sizes]


@cupy_only
@pytest.mark.parametrize("conv", [False, True], ids=["mlp_dropout", "convnet"])
def test_replayed_steps_equal_eager_steps_bit_for_bit(real_gpu, conv, xnor_products):
    batches = batches_of(conv, [20] * 6)
    want = _run(real_gpu, conv, False, batches)
    got = _run(real_gpu, conv, True, batches)
    step = got[4]
    assert step.reason is None, step.reason
    assert step.graphed  # the last steps were replays
    for (lw, sw), (lg, sg) in zip(want[0], got[0]):
        np.testing.assert_array_equal(lg, lw)
        np.testing.assert_array_equal(sg, sw)
    for a, b in zip(want[1], got[1]):
        np.testing.assert_array_equal(b, a)
    assert got[2] == want[2] == 6           # the step count advanced once per replay
    assert got[3] == want[3]                # the generator drew the same keys


@cupy_only
def test_each_batch_shape_gets_its_own_graph(real_gpu, xnor_products):
    batches = batches_of(False, [20, 20, 20, 13, 20, 13, 20])
    want = _run(real_gpu, False, False, batches)
    got = _run(real_gpu, False, True, batches)
    assert got[4].reason is None, got[4].reason
    assert len(got[4].graphs) == 2  # 20 rows: calls 1 eager, 2 captured; 13 rows: 4 eager, 6 captured
    for a, b in zip(want[1], got[1]):
        np.testing.assert_array_equal(b, a)


@cupy_only
def test_training_with_and_without_the_graph_ends_the_same(real_gpu, tmp_path):
    cfg = train.TrainConfig(epochs=2, hidden=64, dropout_in=0.2, dropout_hidden=0.5,
                            train_limit=1200, val_size=300)
    logs = []
    with backend.use(real_gpu):
        on = train.train(cfg, tmp_path / "on", progress=False, log=logs.append)
        off = train.train(cfg, tmp_path / "off", progress=False, log=lambda *a: None,
                          cuda_graph=False)
    assert not any("CUDA graph: off" in line for line in logs), logs
    assert not any("capture failed" in line for line in logs), logs
    def results(m):  # everything but the timings
        return [{k: v for k, v in h.items() if "second" not in k and "per_s" not in k}
                for h in m["history"]], m["best_epoch"], m["test_error"]
    assert results(on) == results(off)


def test_the_graph_refuses_what_it_cannot_hold_with_the_reason(each_backend):
    model = models.mnist_mlp(hidden=8, rng=bnn.seed(0))
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="cannot capture the training step as a CUDA graph"):
        graphs.GraphedStep(model, opt, losses.squared_hinge)
    assert "SGD" in graphs.unsupported(model, opt) or "cupy backend" in graphs.unsupported(model, opt)


@cupy_only
def test_direct_cublas_products_match_cupy(name):
    import cupy
    from minibnn.kernels import cupy_blas
    if getattr(cupy, "__fake__", False):
        pytest.skip("no cuBLAS under the fake CuPy")
    assert cupy_blas.available() is None, cupy_blas.available()
    rng = np.random.default_rng(4)
    for m, k, n in [(1, 1, 1), (100, 784, 4096), (7, 3, 1), (1, 50, 9), (33, 0, 5)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        for x, y in [(a, b), (np.asfortranarray(a), b), (a, np.asfortranarray(b))]:
            got = cupy_blas.matmul(cupy.asarray(x), cupy.asarray(y)).get()
            np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
