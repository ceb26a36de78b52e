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


def test_table_shows_the_ratio_to_torch_cpu():
    bench = load_benchmark("bench_inference")
    rows = [dict(net="n", path=p, images=10, seconds_full_set=s, images_per_second=10 / s,
                 speedup_vs_float32=1.0 / s, baseline="float32 numpy", agree_with_float32=10,
                 compared=10, note="", **({"speedup_vs_torch_cpu": 0.5 / s} if t else {}))
            for p, s, t in (("float32 numpy", 1.0, True), ("float32 torch cpu", 0.5, True),
                            ("frozen numba", 0.25, True), ("float32 cupy", 0.1, False))]
    table = bench.format_table(rows)
    assert "vs torch cpu" in table.splitlines()[0]
    line = next(l for l in table.splitlines() if "frozen numba" in l)
    assert "2.00x" in line and "4.00x vs float32 numpy" in line
    assert "10.00x vs float32 numpy  -" in table.splitlines()[-1]  # no torch ratio on a GPU row
