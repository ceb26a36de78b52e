"""Frozen networks: predictions equal the trained model's on all 10,000 MNIST test images on
every backend, scores to float tolerance, exact integer thresholds, save/load and its
errors, the command line, and models freeze must refuse."""

import zipfile

import numpy as np
import pytest

from minibnn import backend, data, deploy, models, nn
from minibnn import train as T
from minibnn.tensor import Tensor, no_grad

from arrays import dev, host
from conftest import backend_params


@pytest.fixture(scope="module")
def mnist():
    m = data.load_mnist()
    return m.test_images, m.test_labels.astype(np.int64), m.train_images[:2000]


def _train(tmp_path_factory, **kw):
    cfg = T.TrainConfig(hidden=128, layers=2, epochs=1, batch_size=100, train_limit=4000,
                        seed=1, lr_start=0.01, lr_end=0.001, **kw)
    run = tmp_path_factory.mktemp("run")
    T.train(cfg, run, progress=False, log=lambda *_: None)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(run_dir):
    return T.load_model(run_dir / T.MODEL)[0]


@pytest.fixture(scope="module")
def shift_trained(tmp_path_factory):
    return T.load_model(_train(tmp_path_factory, bn="shift") / T.MODEL)[0]


@pytest.fixture(scope="module")
def planted(run_dir):
    """The trained model with negative gammas in every batch norm, a zero gamma (constant
    unit) and a hidden unit whose threshold lies beyond any reachable pre-activation."""
    model = T.load_model(run_dir / T.MODEL)[0]
    bns = [l for l in model.layers if isinstance(l, nn.BatchNorm)]
    for bn in bns:
        bn.gamma.data[::3] *= -1
    bns[0].gamma.data[5] = 0.0
    bns[1].beta.data[7] = 1e6
    return model


def _bias_model(images):
    """A hand-built net with biased BinaryLinear layers; BN statistics from MNIST batches."""
    rng = np.random.default_rng(7)
    model = nn.Sequential(nn.BinaryLinear(784, 96, bias=True, rng=rng), nn.BatchNorm(96),
                          nn.Sign(), nn.Dropout(0.3, rng=rng),
                          nn.BinaryLinear(96, 64, bias=True, rng=rng), nn.ShiftBatchNorm(64),
                          nn.Sign(), nn.BinaryLinear(64, 10, bias=True, rng=rng), nn.BatchNorm(10))
    for layer in model.layers:
        if isinstance(layer, nn.BinaryLinear):
            layer.bias.data[...] = dev(rng.normal(0, 3, layer.bias.data.shape))
        if isinstance(layer, nn.BatchNorm) or isinstance(layer, nn.ShiftBatchNorm):
            layer.momentum = 0.5
            layer.gamma.data[...] = dev(rng.normal(0, 1, layer.gamma.data.shape))
            layer.beta.data[...] = dev(rng.normal(0, 0.5, layer.beta.data.shape))
    model.train()
    with no_grad():
        for i in range(0, 1000, 200):
            model(Tensor(data.to_pm1(images[i:i + 200])))
    return model.eval()


def _linears(model):
    return [l for l in model.layers if isinstance(l, nn.BinaryLinear)]


def _model_outputs(model, x_uint8, dtype=np.float32):
    """The model's eval-mode scores, the output of every Sign and the first layer's
    pre-activation s (NumPy), on data.to_pm1(x) = (2x - 255) / 256 in ``dtype``."""
    model.eval()
    h, signs, first = Tensor(data.to_pm1(x_uint8, dtype=dtype)), [], None
    with no_grad():
        for layer in model.layers:
            h = layer(h)
            if first is None and isinstance(layer, nn.BinaryLinear):
                first = backend.to_numpy(h.data)
            if isinstance(layer, nn.Sign):
                signs.append(backend.to_numpy(h.data))
    return backend.to_numpy(h.data), signs, first


MODELS = ["trained", "shift_trained", "planted", "bias"]


@pytest.fixture(scope="module")
def case(request, mnist):
    test_x, _, train_x = mnist
    model = (_bias_model(train_x) if request.param == "bias"
             else request.getfixturevalue(request.param))
    frozen = deploy.freeze(model)
    scores, signs, first = _model_outputs(model, test_x)
    return dict(model=model, frozen=frozen, scores=scores, signs=signs, first=first,
                name=request.param)


@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS, indirect=True)
@pytest.mark.parametrize("name", backend_params())
def test_predictions_equal_the_model_on_all_test_images(case, name, mnist):
    """Equal on all 10,000 images: every pre-activation is exact in the float32 model too
    (to_pm1 gives multiples of 1/256), and the thresholds follow its float32 batch norm."""
    test_x, labels, _ = mnist
    got = case["frozen"].predict(test_x, backend=name)
    want = case["scores"].argmax(axis=1)
    assert got.shape == (10000,) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    if case["name"] in ("trained", "shift_trained"):
        assert np.mean(got == labels) > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS, indirect=True)
@pytest.mark.parametrize("method", ["bitplanes", "float32", "int8"])
@pytest.mark.parametrize("name", backend_params(["numpy", "numba"]))
def test_each_first_layer_method_equals_the_model_on_all_test_images(case, method, name, mnist):
    """Every exact first-layer method, forced, gives the model's predictions on every image
    and its hidden bits (the first layer's included) on the first 2,000."""
    from minibnn.deploy import runtime

    if method == "int8" and not runtime.int8_available(name):
        pytest.skip(f"the int8 first layer does not run on {name} here")
    test_x = mnist[0]
    frozen = case["frozen"]
    frozen.first_layer_method = method
    try:
        n = len(test_x) if name == "numba" else 2000
        got = frozen.predict(test_x[:n], backend=name, batch_size=1500)  # several batches
        np.testing.assert_array_equal(got, case["scores"][:n].argmax(axis=1))
        for bits, sign in zip(frozen.activations(test_x[:2000], backend=name), case["signs"]):
            np.testing.assert_array_equal(bits, sign[:2000] > 0)
    finally:
        frozen.first_layer_method = "auto"


@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS, indirect=True)
def test_exact_arithmetic_equals_the_model_in_float64(case, mnist):
    """With float64 thresholds (match_float32=False) the frozen net is the model computed
    exactly: it equals the model run in float64 on every image, scores to 1e-9."""
    test_x = mnist[0]
    frozen = deploy.freeze(case["model"], match_float32=False)
    scores64, _, _ = _model_outputs(case["model"], test_x, dtype=np.float64)
    got = frozen.scores(test_x, backend="numba")
    np.testing.assert_array_equal(got.argmax(axis=1), scores64.argmax(axis=1))
    np.testing.assert_allclose(got, scores64, rtol=1e-9, atol=1e-9 * np.abs(scores64).max())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bias", "planted"], indirect=True)
@pytest.mark.parametrize("gpu", backend_params(["cupy"]))
def test_cupy_equals_numba_bit_for_bit(case, gpu, mnist):
    frozen, x = case["frozen"], mnist[0]
    for a, b in zip(frozen.trace(x[:2000], backend=gpu),
                    frozen.trace(x[:2000], backend="numba")):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen.integer_scores(x, backend=gpu, batch_size=3000),
                                  frozen.integer_scores(x, backend="numba"))


@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS, indirect=True)
def test_scores_match_the_model_and_hidden_bits_are_exact(case, mnist):
    frozen, scores, signs = case["frozen"], case["scores"], case["signs"]
    test_x = mnist[0]
    got = frozen.scores(test_x, backend="numba")
    assert got.dtype == np.float64
    zs = frozen.trace(test_x, backend="numba")
    bits = [z >= layer.threshold for z, layer in zip(zs[:-1], frozen.layers[:-1])]
    model_bits = [s > 0 for s in signs]
    for b, mb in zip(bits, model_bits):  # every hidden layer, the first included: bit-exact
        np.testing.assert_array_equal(b, mb)
    # the first layer's integer z is exactly 256 times the model's float32 pre-activation
    lin = _linears(case["model"])[0]
    w = np.where(backend.to_numpy(lin.weight.data) >= 0, 1.0, -1.0)
    s_exact = data.to_pm1(test_x, np.float64) @ w.T      # float64: exact as well
    want = s_exact.astype(np.float32)                    # exact: multiples of 1/256
    if lin.bias is not None:
        want = want + backend.to_numpy(lin.bias.data)    # the model's float32 add
    np.testing.assert_array_equal(case["first"], want)   # float32 x @ W^T (+ bias)
    z0, exact = zs[0].astype(np.float64), 256 * s_exact
    same, negated = np.all(z0 == exact, axis=0), np.all(z0 == -exact, axis=0)  # per unit
    assert np.all(same | negated)
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5 * np.abs(scores).max())
    np.testing.assert_array_equal(zs[-1][:1000],
                                  frozen.integer_scores(test_x[:1000], backend="numpy"))


@pytest.mark.slow
def test_first_layer_is_the_exact_bit_plane_sum(trained, mnist):
    """z = sum_n 2^n (y^n . w) = (2x - 255) . w: checked against integer matmul."""
    frozen = deploy.freeze(trained, match_float32=False)
    x = mnist[0][:300].reshape(300, -1)
    w = np.where(host(_linears(trained)[0].weight) >= 0, 1, -1).astype(np.int64)
    exact = (2 * x.astype(np.int64) - 255) @ w.T
    z0 = frozen.trace(x, backend="numpy")[0]
    # units frozen with a negative slope compute -z
    flipped = np.all(z0 == -exact, axis=0) & ~np.all(z0 == exact, axis=0)
    np.testing.assert_array_equal(np.where(flipped, -z0, z0), exact)
    assert frozen.layers[0].threshold.dtype == np.int32


@pytest.mark.slow
def test_float32_matching_moves_only_rounding_ties(trained):
    plain = deploy.freeze(trained, match_float32=False)
    matched = deploy.freeze(trained)
    for a, b in zip(plain.layers[:-1], matched.layers[:-1]):
        assert np.abs(a.threshold.astype(np.int64) - b.threshold).max() <= 1
        np.testing.assert_array_equal(a.weight, b.weight)
    assert sum(matched.info["float32_adjusted"]) == sum(
        int(np.sum(a.threshold != b.threshold))
        for a, b in zip(plain.layers[:-1], matched.layers[:-1]))


@pytest.mark.slow
def test_threshold_edge_cases_planted(planted):
    frozen = deploy.freeze(planted)
    t0, t1 = frozen.layers[0], frozen.layers[1]
    assert t0.threshold[5] in (-(t0.z_max + 1), t0.z_max + 1)  # gamma = 0: constant unit
    assert t1.threshold[7] == -(t1.z_max + 1)  # beta = 1e6: always +1
    # negative gamma: the unit's weight row is negated (valid bits flipped, padding kept 0)
    w = np.where(host(_linears(planted)[1].weight) >= 0, 1.0, -1.0)
    from minibnn.kernels.reference import unpack_rows
    rows = unpack_rows(t1.weight, t1.k)
    assert np.array_equal(rows[0], -w[0]) and np.array_equal(rows[1], w[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["trained"], indirect=True)
def test_inputs_accepted_and_refused(case, mnist):
    frozen = case["frozen"]
    x = mnist[0][:50]
    flat = frozen.predict(x.reshape(50, -1), backend="numba")
    np.testing.assert_array_equal(frozen.predict(x, backend="numba"), flat)
    np.testing.assert_array_equal(frozen.predict(x, backend="numba", batch_size=7), flat)
    assert frozen.predict(x[:0]).shape == (0,)
    assert frozen.scores(x[:0]).shape == (0, 10)
    with pytest.raises(TypeError, match="uint8"):
        frozen.predict(data.to_pm1(x))
    with pytest.raises(ValueError, match=r"\(n, 784\)"):
        frozen.predict(x.reshape(50, -1)[:, :700])
    with pytest.raises(ValueError, match="shape"):
        frozen.predict(x[0, 0])
    with pytest.raises(ValueError, match="batch_size"):
        frozen.predict(x, batch_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["planted"], indirect=True)
def test_save_load_round_trip(case, tmp_path, mnist):
    model, frozen = case["model"], case["frozen"]
    path = frozen.save(tmp_path / "frozen.npz")
    back = deploy.load(path)
    assert deploy.is_frozen_file(path)
    assert len(back.layers) == len(frozen.layers)
    for a, b in zip(frozen.layers, back.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
        assert (a.k, a.planes, a.is_output) == (b.k, b.planes, b.is_output)
        if a.is_output:
            np.testing.assert_array_equal(a.scale, b.scale)
            np.testing.assert_array_equal(a.offset, b.offset)
        else:
            np.testing.assert_array_equal(a.threshold, b.threshold)
    x = mnist[0][:500]
    np.testing.assert_array_equal(back.scores(x), frozen.scores(x))
    assert back.info["float32_adjusted"] == frozen.info["float32_adjusted"]
    float32_bytes = 4 * sum(p.data.size for p in model.parameters())
    assert path.stat().st_size * 20 < float32_bytes


def _rewrite(src, dst, **changes):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(dst, **arrays)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("case", ["trained"], indirect=True)
def test_load_refuses_what_is_not_a_frozen_net(case, tmp_path, run_dir):
    good = case["frozen"].save(tmp_path / "good.npz")
    cases = {
        "version": (_rewrite(good, tmp_path / "v2.npz", format_version=np.array(2)),
                    "format version 2"),
        "format": (_rewrite(good, tmp_path / "fmt.npz", format=np.array("something")),
                   "not a frozen minibnn network"),
        "random npz": (_rewrite(tmp_path / "good.npz", tmp_path / "rnd.npz", format=None),
                       "no 'format' entry"),
        "model": (run_dir / T.MODEL, "freeze it"),
        "shape": (_rewrite(good, tmp_path / "shape.npz",
                           **{"layer1/threshold": np.zeros(3, np.int32)}), "layer1/threshold"),
        "dtype": (_rewrite(good, tmp_path / "dtype.npz",
                           **{"layer0/weight": np.zeros((256, 13), np.int64)}), "layer0/weight"),
    }
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (tmp_path / "trunc.npz", "not a frozen minibnn network")
    (tmp_path / "text.npz").write_text("hello, I am not an archive\n")
    cases["text"] = (tmp_path / "text.npz", "not a readable .npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    cases["npy"] = (tmp_path / "array.npy", "single .npy array")
    for name, (path, message) in cases.items():
        with pytest.raises(deploy.FrozenFormatError, match=message):
            deploy.load(path)
        assert not deploy.is_frozen_file(path) or name in ("version", "shape", "dtype")
    # a member whose data is cut short inside an intact archive
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "cut.npz", "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename == "layer1/weight.npy":
                payload = payload[:200]
            zout.writestr(item.filename, payload)
    with pytest.raises(deploy.FrozenFormatError, match="damaged or truncated"):
        deploy.load(tmp_path / "cut.npz")
    with pytest.raises(FileNotFoundError):
        deploy.load(tmp_path / "missing.npz")


def test_freeze_refuses_models_it_cannot_freeze():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="Sequential"):
        deploy.freeze(nn.BinaryLinear(4, 2, rng=rng))
    bad = {
        "float Linear": nn.Sequential(nn.Linear(4, 3, rng=rng), nn.BatchNorm(3), nn.Sign(),
                                      nn.BinaryLinear(3, 2, rng=rng)),
        "HardTanh": nn.Sequential(nn.BinaryLinear(4, 3, rng=rng), nn.BatchNorm(3),
                                  nn.HardTanh(), nn.BinaryLinear(3, 2, rng=rng)),
        "ends in Sign": nn.Sequential(nn.BinaryLinear(4, 3, rng=rng), nn.Sign()),
        "two BNs": nn.Sequential(nn.BinaryLinear(4, 3, rng=rng), nn.BatchNorm(3),
                                 nn.BatchNorm(3), nn.Sign(), nn.BinaryLinear(3, 2, rng=rng)),
        "empty": nn.Sequential(nn.Dropout(0.1)),
    }
    for name, model in bad.items():
        with pytest.raises(ValueError, match="cannot freeze"):
            deploy.freeze(model)


def test_freeze_without_batch_norm_or_hidden_layers(mnist):
    """BinaryLinear -> Sign without BN (threshold z >= 0), and one output layer on 8-bit input.

    Without BN the first threshold sits on an integer, z = 0, which MNIST images do reach:
    sign(0) = +1 there, in the exact integers and in the float32 model alike."""
    rng = np.random.default_rng(3)
    x = mnist[0][:400].reshape(400, -1)
    l1, l2 = nn.BinaryLinear(784, 32, rng=rng), nn.BinaryLinear(32, 10, rng=rng)
    frozen = deploy.freeze(nn.Sequential(l1, nn.Sign(), l2))
    w1, w2 = (np.where(host(l.weight) >= 0, 1, -1).astype(np.int64) for l in (l1, l2))
    h = np.where((2 * x.astype(np.int64) - 255) @ w1.T >= 0, 1, -1)  # sign(0) = +1
    np.testing.assert_array_equal(frozen.scores(x), h @ w2.T)
    np.testing.assert_array_equal(frozen.scores(x), _model_outputs(nn.Sequential(l1, nn.Sign(), l2), x)[0])
    model = nn.Sequential(nn.BinaryLinear(784, 10, rng=rng), nn.BatchNorm(10))
    scores, _, _ = _model_outputs(model, x)
    np.testing.assert_allclose(deploy.freeze(model).scores(x), scores, rtol=1e-5,
                               atol=1e-5 * np.abs(scores).max())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["trained"], indirect=True)
def test_cli_eval_accepts_a_frozen_file(case, tmp_path, capsys, mnist):
    from minibnn import cli
    frozen = case["frozen"]
    path = frozen.save(tmp_path / "frozen.npz")
    err = np.mean(frozen.predict(mnist[0]) != mnist[1])
    with backend.use(backend.active()):  # main's --backend is process-wide: undo it after
        assert cli.main(["--backend", "numba", "eval", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"test error {100 * err:.2f}%" in out and "frozen" in out
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:1000])
    assert cli.main(["eval", str(tmp_path / "bad.npz")]) == 2


def test_package_exports():
    import minibnn
    assert minibnn.deploy is deploy
    assert callable(minibnn.summary)
    assert isinstance(models.mnist_mlp(hidden=8, layers=1), nn.Sequential)

