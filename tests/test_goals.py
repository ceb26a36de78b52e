"""benchmarks/goals.py: the GPU goals read from a run's JSON, on the committed H200 results
(what the last GPU session measured) and on made-up ones that meet every goal."""

import json
from pathlib import Path

from conftest import load_benchmark

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _state(lines, goal):
    line = next(l for l in lines if goal in l)
    return line.split()[0] if not line.startswith("NOT met") else "NOT met"


def test_goals_of_the_committed_gpu_results():
    lines = load_benchmark("goals").summary([RESULTS])
    assert _state(lines, "GEMM 8192x8192x8192") == "NOT met" and "2,666 TOPS" in lines[0]
    assert _state(lines, "GEMM 4096x4096x4096") == "met"
    assert _state(lines, "mlp4096 step") == "met"
    assert "1.59x" in next(l for l in lines if "mlp4096 step" in l)
    assert _state(lines, "cifar10_convnet step") == "met"
    assert _state(lines, "(host images), >= 10x") == "NOT met"
    assert _state(lines, "(images on device), >= 10x") == "met"
    assert "16.32x" in next(l for l in lines if "(images on device), >= 10x" in l)
    assert _state(lines, "ConvNet GPU inference rows") == "met"
    assert _state(lines, "MNIST recipe") == "missing"


def test_goals_met_and_missing(tmp_path):
    goals = load_benchmark("goals")

    def gemm(shape, backend, tops, note=""):
        return dict(shape=shape, backend=backend, tops=tops, note=note)

    (tmp_path / "gemm_gpu.json").write_text(json.dumps({"results": [
        gemm("8192x8192x8192", "cupy tensorcore", 2900.0),
        gemm("8192x8192x8192", "cupy tensorcore_tiled_ldm", 5000.0, "WRONG RESULT"),  # not counted
        gemm("8192x8192x8192", "cupy tensorcore_tiled256", 3100.0),
        gemm("8192x8192x8192", "cupy tensorcore_tiled256, prepared B", 9999.0),  # not counted
        gemm("4096x4096x4096", "cupy tensorcore_direct", 1600.0),
        gemm("100x4096x4096", "cupy tensorcore", 120.0),
        gemm("100x4096x4096", "cuBLAS fp16 (cupy)", 86.0)]}))
    (tmp_path / "mnist_recipe_metrics.json").write_text(json.dumps(
        {"test_error": 0.0098, "best_epoch": 380,
         "history": [{"wall_seconds": 1.2}] * 400}))
    lines = goals.summary([tmp_path])
    assert "3,100 TOPS (cupy tensorcore_tiled256)" in lines[0] and lines[0].startswith("met")
    assert _state(lines, "4096x4096x4096") == "met"
    assert "1.40x" in next(l for l in lines if "100x4096x4096" in l)
    assert _state(lines, "MNIST recipe") == "met"  # 0.98% in 480 s
    assert _state(lines, "frozen 3x4096") == "missing" and _state(lines, "CIFAR-10 run") == "missing"
    (tmp_path / "mnist_recipe_metrics.json").write_text(json.dumps(
        {"test_error": 0.0098, "best_epoch": 380, "history": [{"wall_seconds": 1.5}] * 400}))
    assert _state(goals.summary([tmp_path]), "MNIST recipe") == "NOT met"  # 600 s: too long


def test_frozen_goals_show_the_unstaged_row_beside_the_host_line(tmp_path):
    """The host-images lines carry the "frozen unstaged cupy" time (FrozenBNN.host_staging's
    A/B) when the run has it; the on-device lines do not."""
    goals = load_benchmark("goals")

    def row(path, ms):
        return dict(net="3x4096", path=path, seconds_full_set=ms / 1e3)

    (tmp_path / "inference_gpu.json").write_text(json.dumps({"results": [
        row("frozen cupy", 1.5), row("frozen unstaged cupy", 2.7), row("float32 cupy", 19.4),
        row("float16 cupy", 5.2), row("frozen cupy, images on device", 1.1),
        row("float32 cupy, images on device", 17.6),
        row("float16 cupy, images on device", 3.6)]}))
    lines = goals.summary([tmp_path])
    host = next(l for l in lines if "(host images), >= 10x" in l)
    assert host.startswith("met") and "12.93x (1.50 ms against 19.40 ms); without host " \
        "staging 2.70 ms" in host
    assert all("staging" not in l for l in lines if "images on device" in l)
