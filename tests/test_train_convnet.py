"""ConvNets in the training pipeline: recipes, data preparation for images, the command
line for CIFAR-10 and SVHN, and resume of a ConvNet run."""

import numpy as np
import pytest

from minibnn import backend, cli, data, models, nn, runs
from minibnn import train as T

from arrays import host


def quiet(*_):
    pass


def test_recipes_are_the_authors():
    c = T.TrainConfig.recipe("cifar10", "convnet", data_dir="x")
    assert (c.batch_size, c.lr_start, c.lr_end, c.epochs, c.optimizer, c.bn) == (
        50, 1e-3, 3e-7, 500, "adam", "standard")
    s = T.TrainConfig.recipe("svhn", "convnet", data_dir="x")
    assert (s.batch_size, s.lr_start, s.lr_end, s.epochs) == (50, 1e-3, 1e-6, 200)
    t = T.TrainConfig.recipe("cifar10", "convnet", torch=True, data_dir="x", epochs=3)
    assert (t.optimizer, t.bn, t.epochs) == ("shift-adamax", "shift", 3)  # overrides win
    assert T.TrainConfig.recipe() == T.TrainConfig()  # the MNIST MLP default is unchanged
    for cfg, arch in ((c, "cifar10_convnet"), (s, "svhn_convnet"),
                      (T.TrainConfig(model="convnet"), "mnist_convnet"),
                      (T.TrainConfig(dataset="cifar10", data_dir="x"), "mnist_mlp")):
        assert cfg.validate().arch == arch
        assert models.build(cfg.model_config()).config["arch"] == arch
    assert T.TrainConfig(dataset="cifar10", data_dir="x").model_config()["in_features"] == 3072
    with pytest.raises(ValueError, match="no recipe"):
        T.TrainConfig.recipe("mnist", "resnet")


def test_bn_momentum_reaches_every_batch_norm():
    cfg = T.TrainConfig(model="convnet", bn_momentum=0.01).validate()
    model = models.build(cfg.model_config())
    bns = [m for m in model if isinstance(m, (nn.BatchNorm, nn.ShiftBatchNorm))]
    assert len(bns) == 6 and all(b.momentum == 0.01 for b in bns)
    mlp = models.build(T.TrainConfig(bn_momentum=0.05).model_config())
    assert {m.momentum for m in mlp if isinstance(m, nn.BatchNorm)} == {0.05}
    assert "momentum" not in T.TrainConfig().model_config()  # default configs unchanged
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="bn_momentum"):
            T.TrainConfig(bn_momentum=bad).validate()
    with pytest.raises(ValueError, match="bn_recompute"):
        T.TrainConfig(bn_recompute=-1).validate()
    assert T.TrainConfig.recipe("mnist", "convnet").bn_recompute == 10000


def test_recompute_bn_statistics_is_the_mean_of_the_batch_statistics():
    from minibnn import Tensor, no_grad
    rng = np.random.default_rng(4)
    model = models.mnist_mlp(hidden=16, layers=2, in_features=12, dropout_in=0.3,
                             dropout_hidden=0.5, stochastic=True, rng=rng)
    x = rng.uniform(-1, 1, (90, 12)).astype(np.float32)
    state = rng.bit_generator.state
    T.recompute_bn_statistics(model, x, 30)
    assert rng.bit_generator.state == state  # no dropout mask or stochastic sign drawn
    assert model.training and all(b.momentum == 0.1 for b in model
                                  if isinstance(b, nn.BatchNorm))
    # by hand: the eval network's per-batch statistics at each batch norm, averaged
    model.eval()
    bns = [m for m in model if isinstance(m, nn.BatchNorm)]
    got = {id(b): (host(b.running_mean.copy()), host(b.running_var.copy())) for b in bns}
    means = {id(b): [] for b in bns}
    variances = {id(b): [] for b in bns}
    with no_grad():
        for i in range(0, 90, 30):
            h = Tensor(x[i:i + 30])
            for layer in model:
                if isinstance(layer, nn.BatchNorm):
                    means[id(layer)].append(host(h.data.mean(axis=0)))
                    variances[id(layer)].append(host(h.data.var(axis=0)))
                    layer.training = True  # normalise as recompute_bn_statistics does
                    h = layer(h)
                    layer.training = False
                else:
                    h = layer(h)
    for b in bns:
        np.testing.assert_allclose(got[id(b)][0], np.mean(means[id(b)], axis=0), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(got[id(b)][1], np.mean(variances[id(b)], axis=0), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("dataset, where", [("cifar10", "cifar.html"),
                                            ("svhn", "housenumbers")])
def test_colour_data_without_data_dir_says_where_to_get_it(dataset, where, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--dataset", dataset, "--model", "convnet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data_dir: --data-dir is needed") and where in err
    assert not (tmp_path / "runs").exists()  # refused before any folder was made


def test_paper_convnets_have_the_papers_layout():
    model = models.cifar10_convnet(rng=np.random.default_rng(0))
    convs = [(m.in_channels, m.out_channels) for m in model if isinstance(m, nn.BinaryConv2d)]
    assert convs == [(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    dense = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.BinaryLinear)]
    assert dense == [(8192, 1024), (1024, 1024), (1024, 10)]
    kinds = [type(m).__name__ for m in model]
    assert kinds[:8] == ["BinaryConv2d", "BatchNorm2d", "Sign", "BinaryConv2d", "MaxPool2d",
                         "BatchNorm2d", "Sign", "BinaryConv2d"]  # conv -> pool -> BN -> sign
    assert kinds[-2:] == ["BinaryLinear", "BatchNorm"]
    flags = [m.binary_input for m in model if isinstance(m, (nn.BinaryConv2d, nn.BinaryLinear))]
    assert flags == [False] + [True] * 8
    svhn = [m.out_channels for m in models.svhn_convnet() if isinstance(m, nn.BinaryConv2d)]
    assert svhn == [64, 64, 128, 128, 256, 256]


def test_a_convnet_forward_on_a_batch():
    model = models.mnist_convnet(channels=(4, 8), hidden=16, rng=np.random.default_rng(0))
    from minibnn import Tensor
    out = model(Tensor(np.random.default_rng(1).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)))
    assert out.shape == (3, 10)
    with pytest.raises(ValueError, match="image_size"):
        models.binary_convnet((4, 8, 16), (8,), 1, 28)


def _fake_cifar(n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return data.CIFAR10(rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                        rng.integers(0, 10, n_train).astype(np.uint8),
                        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                        rng.integers(0, 10, n_test).astype(np.uint8))


def test_prepare_data_gives_images_to_a_convnet_and_rows_to_an_mlp(monkeypatch):
    fake = _fake_cifar()
    monkeypatch.setattr(data, "load_cifar10", lambda data_dir: fake)
    monkeypatch.setattr(data, "split_cifar10",
                        lambda x, y: data.split_train_valid(x, y, n_valid=10))
    tx, ty, vx, vy, sx, sy = T.prepare_data(T.TrainConfig(dataset="cifar10", model="convnet",
                                                          data_dir="x"))
    assert tx.shape == (50, 3, 32, 32) and vx.shape == (10, 3, 32, 32) and sx.dtype == np.float32
    np.testing.assert_array_equal(tx[0], (2 * fake.train_images[0].astype(np.float32) - 255) / 256)
    assert ty.dtype == np.int64 and np.array_equal(sy, fake.test_labels)
    tx2 = T.prepare_data(T.TrainConfig(dataset="cifar10", data_dir="x"))[0]
    np.testing.assert_array_equal(tx2, tx.reshape(50, -1))
    fitted = []

    class FakeZCA:  # records what it is fitted on; its "whitening" is a visible scaling
        @classmethod
        def fit(cls, x):
            fitted.append(x.copy())
            return cls()

        def transform(self, x):
            return 2 * x

    monkeypatch.setattr(data, "ZCA", FakeZCA)
    zx, _, zv, _, zs, _ = T.prepare_data(T.TrainConfig(dataset="cifar10", model="convnet",
                                                       data_dir="x", zca=True))
    assert len(fitted) == 1
    np.testing.assert_array_equal(fitted[0], tx.reshape(50, -1))  # the training split only
    np.testing.assert_array_equal(zx, 2 * tx)
    np.testing.assert_array_equal(zv, 2 * vx)
    np.testing.assert_array_equal(zs, 2 * sx)


@pytest.mark.slow
def test_convnet_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    real = T.prepare_data

    def small_eval(cfg):  # score 300 validation and test images, not 10,000 each
        tx, ty, vx, vy, sx, sy = real(cfg)
        return tx, ty, vx[:300], vy[:300], sx[:300], sy[:300]

    monkeypatch.setattr(T, "prepare_data", small_eval)
    cfg = dict(model="convnet", epochs=2, batch_size=50, train_limit=200, seed=5,
               lr_start=0.01, lr_end=0.001)
    full = T.train(T.TrainConfig(**cfg), tmp_path / "full", progress=False, log=quiet)
    T.train(T.TrainConfig(**cfg), tmp_path / "part", progress=False, stop_after=1, log=quiet)
    resumed = T.train(run_dir=tmp_path / "part", resume=True, progress=False, log=quiet)
    assert runs.without_timings(resumed["history"]) == runs.without_timings(full["history"])
    with np.load(tmp_path / "full" / T.MODEL) as a, np.load(tmp_path / "part" / T.MODEL) as b:
        for k in a.files:
            if k.startswith("state/"):
                np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_cli_evaluates_a_convnet_run_and_its_frozen_net(tmp_path, capsys, monkeypatch):
    from minibnn import deploy
    real = T.prepare_data

    def small(cfg):  # 300 training images; the test set stays whole (10,000 images)
        tx, ty, vx, vy, sx, sy = real(cfg)
        return tx[:300], ty[:300], vx[:200], vy[:200], sx, sy

    monkeypatch.setattr(T, "prepare_data", small)
    # main's --backend holds for the whole process, as for a program: undone after the test
    with backend.use(backend.active()):
        run = tmp_path / "run"
        assert cli.main(["--backend", "numba", "train", "--model", "convnet", "--epochs", "1",
                         "--no-progress", "--out", str(run)]) == 0
        capsys.readouterr()
        assert cli.main(["--backend", "numba", "eval", str(run)]) == 0
        line = capsys.readouterr().out
        assert "on 10000 mnist test images" in line and "the run's own data" in line
        model_err = float(line.split("test error ")[1].split("%")[0])
        model, _ = T.load_model(run / T.MODEL)
        deploy.freeze(model).save(tmp_path / "net.frozen.npz")
        assert cli.main(["--backend", "numba", "eval", str(tmp_path / "net.frozen.npz")]) == 0
        frozen_line = capsys.readouterr().out
        assert float(frozen_line.split("test error ")[1].split("%")[0]) == model_err
