"""benchmarks/bench_inference.py: its PyTorch CPU anchor ("float32 torch cpu") runs the same
network as the float32 NumPy forward it is compared with (same predictions), and the table
shows each CPU row's ratio to it."""

import numpy as np
import pytest

from conftest import load_benchmark
from minibnn import backend


@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_torch_cpu_forward_is_the_same_network(net):
    torch = pytest.importorskip("torch")
    bench = load_benchmark("bench_inference")
    with backend.use("numpy"):
        if net == "mlp":
            from minibnn import models
            model = models.mnist_mlp(hidden=64, layers=2, rng=np.random.default_rng(0))
            bench._plant_batch_norms(model, np.random.default_rng(1))
            model.eval()
            images = np.random.default_rng(2).integers(0, 256, (50, 784), dtype=np.uint8)
        else:
            model, shape = bench.build_convnet(quick=True)
            images = bench.synthetic_images(20, shape)
        want = bench.Float32Net(model).predict(images)
        tnet = bench.TorchNet(model, torch, torch.float32, device="cpu")  # folds on the host
    got = tnet.predict(images, 7)
    np.testing.assert_array_equal(got, want)


def _rows(baseline, anchor, paths):
    """Table rows of ``paths`` ((path, seconds, has the ratio to the anchor)): the baseline's
    time is 1 s, the anchor's ("speedup_vs_..." key ``anchor``) 0.5 s."""
    return [dict(net="n", path=p, images=10, seconds_full_set=s, images_per_second=10 / s,
                 speedup_vs_float32=1.0 / s, baseline=baseline, agree_with_float32=10,
                 compared=10, note="", **({anchor: 0.5 / s} if has else {}))
            for p, s, has in paths]


def test_table_shows_the_ratio_to_torch_cpu():
    bench = load_benchmark("bench_inference")
    rows = _rows("float32 numpy", "speedup_vs_torch_cpu",
                 (("float32 numpy", 1.0, True), ("float32 torch cpu", 0.5, True),
                  ("frozen numba", 0.25, True), ("float32 cupy", 0.1, False)))
    table = bench.format_table(rows)
    assert "vs torch cpu" in table.splitlines()[0]
    line = next(l for l in table.splitlines() if "frozen numba" in l)
    assert "2.00x" in line and "4.00x vs float32 numpy" in line
    assert "10.00x vs float32 numpy  -" in table.splitlines()[-1]  # no torch ratio on a GPU row


def test_float16_forward_runs_in_float16_and_mostly_agrees():
    """The "float16 cupy" anchor's arithmetic, on NumPy: float16 throughout; the scaled
    pixels and +-1 weights are exact there, the first layer's sums and the batch norms are
    rounded, so it may differ from float32 on a few images, not on most."""
    bench = load_benchmark("bench_inference")
    with backend.use("numpy"):
        from minibnn import models
        model = models.mnist_mlp(hidden=128, layers=2, rng=np.random.default_rng(0))
        bench._plant_batch_norms(model, np.random.default_rng(1))
        model.eval()
        images = np.random.default_rng(2).integers(0, 256, (300, 784), dtype=np.uint8)
        net16 = bench.Float32Net(model, dtype=np.float16)
        assert net16.scores(images[:3]).dtype == np.float16
        agree = (net16.predict(images, 64) == bench.Float32Net(model).predict(images)).mean()
        assert agree >= 0.95
        conv, _ = bench.build_convnet(quick=True)
        with pytest.raises(ValueError, match="float32 only"):
            bench.Float32Net(conv, dtype=np.float16)


def test_table_shows_the_ratio_to_float16_only_when_measured():
    bench = load_benchmark("bench_inference")
    rows = _rows("float32 cupy", "speedup_vs_float16_cupy",
                 (("float32 cupy", 1.0, True), ("float16 cupy", 0.5, True),
                  ("frozen cupy", 0.1, True), ("frozen cupy, batch 100", 0.2, False)))
    lines = bench.format_table(rows).splitlines()
    assert "vs fp16 cupy" in lines[0]
    assert next(l for l in lines if "frozen cupy " in l).split()[-3:-1] == ["-", "5.00x"]
    assert "vs fp16 cupy" not in bench.format_table(
        [{k: v for k, v in r.items() if k != "speedup_vs_float16_cupy"} for r in rows])
