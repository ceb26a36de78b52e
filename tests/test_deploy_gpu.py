"""The frozen runtime on cupy: hidden layers through the GEMM with the threshold in its
epilogue (``cupy_gpu.gemm_threshold``) on prepared weights, and the forward as one CUDA
graph per batch shape. Runs on a GPU and under the NumPy-backed fake CuPy (which cannot
capture graphs: there the capture must fail cleanly and leave the results eager)."""

import numpy as np
import pytest

from minibnn import deploy, models, nn
from minibnn.deploy import runtime
from minibnn.kernels import cupy_gpu

from arrays import dev
from conftest import backend_params

GPU = backend_params(["cupy"])


def _fake():
    import cupy
    return bool(getattr(cupy, "__fake__", False))


def _plant_bn(model, rng):
    for layer in model.modules():
        if hasattr(layer, "running_mean"):
            layer.running_mean[...] = dev(rng.normal(0, 6, layer.running_mean.shape))
            layer.gamma.data[...] = dev(rng.normal(0, 1, layer.gamma.data.shape))
    return model


def mlp_net(seed=0):
    """784 -> 130 -> 70 -> 10: two hidden layers after the first, widths not multiples of
    64, negative BN slopes planted."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.BinaryLinear(784, 130, rng=rng), nn.BatchNorm(130), nn.Sign(),
                          nn.BinaryLinear(130, 70, rng=rng), nn.BatchNorm(70), nn.Sign(),
                          nn.BinaryLinear(70, 10, rng=rng), nn.BatchNorm(10))
    return deploy.freeze(_plant_bn(model, rng).eval())


def conv_net(seed=0):
    """A small ConvNet whose second convolution has 24 channels (whole-word slots, so the
    dense layer after it counts slot padding bits in its threshold)."""
    rng = np.random.default_rng(seed)
    model = models.mnist_convnet(channels=(8, 24), hidden=40, rng=rng)
    return deploy.freeze(_plant_bn(model, rng).eval())


def _images(frozen, n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + frozen.input_shape,
                                                dtype=np.uint8)


@pytest.mark.parametrize("name", GPU)
@pytest.mark.parametrize("make", [mlp_net, conv_net], ids=["mlp", "conv"])
def test_hidden_layers_run_through_the_threshold_epilogue(name, make, monkeypatch):
    """Every binary hidden layer after the first is one gemm_threshold call on a prepared
    weight, and the integer scores, bits and predictions equal the NumPy reference's in
    every batch size; trace() (which needs z) still runs the unfused path."""
    frozen = make()
    x = _images(frozen, 150, 1)
    want = frozen.integer_scores(x, backend="numpy")
    bits = frozen.activations(x, backend="numpy")
    trace = frozen.trace(x[:20], backend="numpy")
    calls = []
    real = cupy_gpu.gemm_threshold

    def counting(a, b, k, threshold, kernel=None):
        calls.append(type(b).__name__)
        return real(a, b, k, threshold, kernel=kernel)

    monkeypatch.setattr(cupy_gpu, "gemm_threshold", counting)
    frozen.cuda_graph = False
    for batch in (150, 64, 7):
        calls.clear()
        np.testing.assert_array_equal(frozen.integer_scores(x, backend=name, batch_size=batch),
                                      want)
        hidden_after_first = sum(not l.is_output for l in frozen.layers[1:])
        assert calls == ["PreparedWeights"] * hidden_after_first * -(-150 // batch)
    np.testing.assert_array_equal(frozen.predict(x, backend=name),
                                  frozen.predict(x, backend="numpy"))
    for a, b in zip(frozen.activations(x, backend=name), bits):
        np.testing.assert_array_equal(a, b)
    calls.clear()
    for a, b in zip(frozen.trace(x[:20], backend=name), trace):
        np.testing.assert_array_equal(a, b)
    assert calls == []


@pytest.mark.parametrize("name", GPU)
@pytest.mark.parametrize("make", [mlp_net, conv_net], ids=["mlp", "conv"])
@pytest.mark.parametrize("method", ["bitplanes", "float16", "float32"])
def test_a_prepared_forward_copies_nothing_from_the_host(name, make, method, monkeypatch):
    """Once the layers and the first-layer plan are prepared, the forward of a device batch
    copies no host array to the device: inside a CUDA graph capture such a copy is a
    synchronous cudaMemcpy, which fails the capture (the H200 run found the ConvNet's
    padding mask copied on every batch, so its graphs never formed). Checked under the fake
    CuPy by refusing host arrays in cupy.asarray / cupy.array during the forward; on a GPU
    the capture itself checks it (the test below)."""
    import cupy
    if not _fake():
        pytest.skip("the capture test below checks this on a GPU")
    frozen = make()
    frozen.first_layer_method = method
    if method == "float16" and (why := runtime.float16_exact_on(name)):
        pytest.skip(why)
    x = _images(frozen, 30, 3)
    frozen.cuda_graph = False
    want = frozen.integer_scores(x, backend=name)
    layers, plan = frozen._prepare(name), frozen._first_plans[name]
    xb = cupy.asarray(x)

    def refuse(real):
        def wrapped(a, *args, **kwargs):
            if isinstance(a, np.ndarray) and a.ndim > 0:
                raise AssertionError(f"host array {a.shape} {a.dtype} copied in the forward")
            return real(a, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(cupy, "asarray", refuse(cupy.asarray))
    monkeypatch.setattr(cupy, "array", refuse(cupy.array))
    z = runtime._forward_batch(xb, layers, cupy_gpu, first=plan)
    np.testing.assert_array_equal(cupy.asnumpy(z), want)


@pytest.mark.parametrize("name", GPU)
@pytest.mark.parametrize("make", [mlp_net, conv_net], ids=["mlp", "conv"])
def test_a_graph_keeps_every_array_its_forward_reads(name, make, monkeypatch):
    """A CUDA graph replays its kernels on the addresses they had at capture, so every
    device array the captured forward reads but did not make must outlive the graph: the
    output affine (scale, offset) is made once per net and backend and handed to the graph
    with the prepared layers (an H200 run found it made per call: once freed, its memory
    was reused and replays read garbage)."""
    frozen = make()
    x = _images(frozen, 30, 4)
    seen = []
    real = frozen._graphs.run

    def spy(key, xb, forward, keep):
        seen.append(keep)
        return real(key, xb, forward, keep)

    monkeypatch.setattr(frozen._graphs, "run", spy)
    for _ in range(3):
        frozen.predict(x, backend=name, batch_size=10)
    scale, offset = frozen._output_affine(name)
    assert seen and all(any(k is scale for k in keep) and any(k is offset for k in keep)
                        for keep in seen)
    assert frozen._output_affine(name)[0] is scale  # made once


@pytest.mark.parametrize("name", GPU)
@pytest.mark.parametrize("make", [mlp_net, conv_net], ids=["mlp", "conv"])
def test_forward_graphs_give_the_eager_results(name, make):
    """Batches of one shape: the first eager, the second captured, later ones replayed
    (on a GPU); under the fake CuPy the capture fails, the reason is kept and the batch
    runs eagerly. Either way every call returns the reference's scores and predictions,
    and the last, shorter batch of a call gets its own key."""
    frozen = make()
    x = _images(frozen, 100, 2)
    want = frozen.scores(x, backend="numpy")
    want_pred = frozen.predict(x, backend="numpy")
    for _ in range(4):
        np.testing.assert_array_equal(frozen.scores(x, backend=name, batch_size=40), want)
        np.testing.assert_array_equal(frozen.predict(x, backend=name, batch_size=40), want_pred)
    graphs = frozen._graphs
    if _fake():
        assert not graphs.graphs
        assert len(frozen.graph_failures) == 4  # 40 and 20 rows, scores and predictions
        assert all("NotImplementedError" in why for why in frozen.graph_failures.values())
    else:
        assert frozen.graph_failures == {}
        assert len(graphs.graphs) == 4
    off = make()
    off.cuda_graph = False
    for _ in range(3):
        np.testing.assert_array_equal(off.scores(x, backend=name, batch_size=40), want)
    assert not off._graphs.graphs and not off._graphs.calls and not off.graph_failures


@pytest.mark.parametrize("name", GPU)
def test_forward_graphs_follow_new_weights_and_are_bounded(name, monkeypatch):
    """A replaced first-layer plan (here: a new method) keys a new graph, and no more than
    MAX_GRAPHS are kept."""
    if _fake():
        pytest.skip("the NumPy-backed fake CuPy cannot capture CUDA graphs")
    monkeypatch.setattr(runtime._ForwardGraphs, "MAX_GRAPHS", 2)
    frozen = mlp_net()
    x = _images(frozen, 60, 3)
    want = frozen.integer_scores(x, backend="numpy")
    for method in ("bitplanes", "float32"):
        frozen.first_layer_method = method
        for batch in (60, 30, 20):
            for _ in range(3):
                np.testing.assert_array_equal(
                    frozen.integer_scores(x, backend=name, batch_size=batch), want)
            assert len(frozen._graphs.graphs) <= 2
    assert all(key[4] == id(frozen._first_plans[name]) for key in frozen._graphs.graphs)


@pytest.mark.parametrize("name", GPU)
@pytest.mark.parametrize("make", [mlp_net, conv_net], ids=["mlp", "conv"])
def test_host_images_reach_the_gpu_one_batch_ahead(name, make, monkeypatch):
    """NumPy images go to the GPU through runtime._PinnedFeed: every batch staged once and
    in order, alternating between two buffers, and each next batch staged before the
    current batch's result is read back (the host's copy overlaps the GPU's work). An
    MLP's default batch is then about _HOST_BATCH_BYTES of images (784-byte rows: 2,560),
    a ConvNet's stays _CONV_BATCH (made 64 here, to keep the test short). Predictions equal
    those without staging, of images already on the device, and of the NumPy reference; no
    images, no feed."""
    import cupy
    monkeypatch.setitem(runtime._CONV_BATCH, "cupy", 64)
    frozen = make()
    n = 6000 if make is mlp_net else 150
    x = _images(frozen, n, 5)
    want = frozen.predict(x, backend="numpy")
    frozen.predict(x[:300], backend=name)  # the first-layer plan made (it reads back too)
    events, buffers = [], []
    real_stage, real_take = runtime._PinnedFeed.stage, runtime._PinnedFeed.take
    real_get = runtime._backend.to_numpy

    def stage(feed, start):
        if start < feed.x.shape[0]:
            events.append(("stage", start))
        real_stage(feed, start)

    def take(feed, start):
        got = real_take(feed, start)
        buffers.append(got.data.ptr)
        events.append(("take", start))
        return got

    def to_numpy(a):
        events.append("read")
        return real_get(a)

    monkeypatch.setattr(runtime._PinnedFeed, "stage", stage)
    monkeypatch.setattr(runtime._PinnedFeed, "take", take)
    monkeypatch.setattr(runtime._backend, "to_numpy", to_numpy)
    np.testing.assert_array_equal(frozen.predict(x, backend=name), want)
    batch = 2560 if make is mlp_net else runtime._CONV_BATCH["cupy"]
    starts = list(range(0, n, batch))
    assert len(starts) >= 2
    expected = [("stage", 0)]
    for i, s in enumerate(starts):
        expected.append(("take", s))
        if i + 1 < len(starts):
            expected.append(("stage", starts[i + 1]))
        expected.append("read")
    assert events == expected
    assert len(set(buffers[0::2])) == 1 and len(set(buffers[1::2])) == 1
    assert buffers[0] != buffers[1]
    events.clear()
    np.testing.assert_array_equal(frozen.predict(cupy.asarray(x), backend=name), want)
    assert ("take", 0) not in events  # images on the device are used where they are
    frozen.host_staging = False
    events.clear()
    np.testing.assert_array_equal(frozen.predict(x, backend=name), want)
    default = (runtime._DEFAULT_BATCH if make is mlp_net else runtime._CONV_BATCH)["cupy"]
    assert events == ["read"] * -(-n // default)
    frozen.host_staging = True
    events.clear()
    assert frozen.predict(x[:0], backend=name).shape == (0,)
    assert events == []
