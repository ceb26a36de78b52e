"""benchmarks/bench_train_ops.py runs end to end on a tiny setting: one row per op and
shape, the compiled result compared with the array code's, written as JSON."""

import json

import pytest

from tests.conftest import REASONS, load_benchmark


@pytest.mark.skipif(REASONS["numba"] is not None, reason=str(REASONS["numba"]))
def test_bench_train_ops_writes_its_table_and_json(tmp_path, capsys):
    bench = load_benchmark("bench_train_ops")
    bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train_ops_cpu_quick.json").read_text())
    ops = {r["op"]: r for r in saved["rows"]}
    assert sorted(ops) == sorted(["binary_conv2d_backward", "binary_conv2d_backward (loops)",
                                  "pack_sign_patches", "conv_output",
                                  "sign_ste", "sign_ste_backward", "bn_forward",
                                  "bn_forward_backward", "bn_train_forward",
                                  "max_pool2d_forward_backward", "adam_step"])
    for name in ("pack_sign_patches", "conv_output", "sign_ste", "sign_ste_backward",
                 "bn_forward", "bn_train_forward", "max_pool2d_forward_backward", "adam_step"):
        assert ops[name]["exact"], name  # bit for bit
    for r in saved["rows"]:  # the others within rounding
        assert r["max_rel"] < 1e-5 and r["ratio"] == pytest.approx(r["array_ms"] / r["compiled_ms"])
    assert "binary_conv2d_backward" in capsys.readouterr().out
