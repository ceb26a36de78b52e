"""benchmarks/bench_train.py runs end to end on a tiny setting, and its PyTorch twin is the
same network (same layer sizes, same initial binary weights, same loss) as the minibnn model."""

import json

import numpy as np
import pytest

import minibnn as bnn
from conftest import load_benchmark
from minibnn import Tensor, backend, losses, models


def test_bench_train_writes_its_table_and_json(tmp_path, capsys):
    bench = load_benchmark("bench_train")
    result = bench.main(["--nets", "mlp512nd", "--backends", "numpy", "--steps", "1",
                         "--repeats", "1", "--no-torch", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_cpu.json").read_text())
    assert [r["path"] for r in saved["rows"]] == ["minibnn numpy"]
    row = saved["rows"][0]
    assert row["images_per_s"] == pytest.approx(100 / row["step_s"])
    assert row["epoch_s"] == pytest.approx(500 * row["step_s"])
    assert "mlp512nd" in capsys.readouterr().out
    assert result["machine"]["cpu"]


def test_bench_train_refuses_unknown_names(capsys):
    bench = load_benchmark("bench_train")
    with pytest.raises(SystemExit):
        bench.main(["--nets", "resnet50", "--no-torch"])
    assert "unknown network 'resnet50'" in capsys.readouterr().err


@pytest.mark.parametrize("net", ["mlp512", "mnist_convnet"])
def test_torch_twin_computes_the_same_scores_and_loss(net):
    torch = pytest.importorskip("torch")
    bench = load_benchmark("bench_train")
    twin_mod = load_benchmark("torch_bnn")
    build, shape, _ = bench.NETS[net]
    with backend.use("numpy"):
        model = build(bnn.seed(0))
        model.eval()  # no dropout; BN on running statistics, identical at initialisation
        x = np.random.default_rng(0).uniform(-1, 1, (4,) + shape).astype(np.float32)
        y = np.array([0, 3, 9, 1])
        scores = model(Tensor(x))
        loss = losses.squared_hinge(scores, y).item()
    twin, scales = twin_mod.torch_twin(model)
    twin.eval()
    with torch.no_grad():
        got = twin(torch.as_tensor(x))
        got_loss = twin_mod.squared_hinge(got, torch.as_tensor(y)).item()
    np.testing.assert_allclose(got.numpy(), scores.data, rtol=1e-4, atol=1e-4)
    assert got_loss == pytest.approx(loss, rel=1e-5)
    assert scales == [m.weight.lr_scale for m in model.layers if hasattr(m, "binary_input")]


def test_torch_trainer_steps_change_the_loss():
    torch = pytest.importorskip("torch")
    twin_mod = load_benchmark("torch_bnn")
    with backend.use("numpy"):
        model = models.mnist_mlp(hidden=64, rng=bnn.seed(0))
    trainer = twin_mod.TorchTrainer(model, lr=1e-2)
    x = torch.rand(32, 784) * 2 - 1
    y = torch.randint(0, 10, (32,))
    first = trainer.step(x, y).item()
    for _ in range(20):
        last = trainer.step(x, y).item()
    assert last < first
    assert all(float(w.detach().abs().max()) <= 1.0 for w in trainer.latent)  # clipped latent weights
