"""The tour's figure script runs end to end (``--quick``, into a temporary folder), so the
figures can always be made again from the current library."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).with_name("make_figures.py")


@pytest.mark.slow
def test_make_figures_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"make_figures.py failed:\n{proc.stderr[-4000:]}"
    for name in ("ste.png", "flips.png", "curves.png", "roofline.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    result = json.loads((tmp_path / "figures.json").read_text())
    assert result["quick"] is True
    assert result["ste"]["gradient_inside"] == 1.0 and result["ste"]["gradient_outside"] == 0.0
    history = result["training"]["history"]
    assert len(history) == 2
    assert all(0 <= f <= 1 for row in history for f in row["net_flip_fraction"])
    assert history[-1]["valid_error"] < 0.9  # better than chance on 10 classes
    for row in result["gemm"]["shapes"]:
        assert row["numpy_float32"]["ops_per_s"] > 0
        assert all(row[f"xnor_{k}"]["ops_per_s"] > 0 for k in result["gemm"]["kernels"])
