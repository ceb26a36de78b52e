"""benchmarks/bench_conv_glue.py runs end to end on a tiny setting: one row per op of the
backend's glue and shape, each checked equal to the array code, written as JSON."""

import json

import pytest

from tests.conftest import REASONS, load_benchmark


@pytest.mark.skipif(REASONS["numba"] is not None, reason=str(REASONS["numba"]))
def test_bench_conv_glue_writes_its_table_and_json(tmp_path, capsys):
    bench = load_benchmark("bench_conv_glue")
    bench.main(["--quick", "--backends", "numba", "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "conv_glue_cpu_quick.json").read_text())
    ops = [(r["op"], r["shape"]) for r in saved["rows"]]
    # numba has no im2col: the four others, on each quick shape
    assert sorted(ops) == sorted((op, f"4x{c}x{h}x{h}") for c, h in bench.QUICK_INPUTS
                                 for op in ("col2im", "pack_sign_patches", "max_pool2d",
                                            "max_pool2d_backward"))
    for r in saved["rows"]:
        assert r["exact"] and r["ratio"] == pytest.approx(r["array_ms"] / r["glue_ms"])
    assert "pack_sign_patches" in capsys.readouterr().out


def test_bench_conv_glue_refuses_a_backend_without_glue(capsys):
    bench = load_benchmark("bench_conv_glue")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--backends", "numpy"])
    assert "'numpy' has no compiled glue" in capsys.readouterr().err
