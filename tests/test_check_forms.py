"""benchmarks/check_forms.py: each tensor-core form checked in a process of its own, and the
forms that fail or give wrong products named for MINIBNN_TC_EXCLUDE. On a GPU it runs the
real kernels; under the NumPy-backed fake CuPy (tools/fake_cupy) the plumbing."""

import os
import sys

import numpy as np
import pytest

from conftest import backend_params
from minibnn.kernels import cupy_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import check_forms  # noqa: E402

GPU = backend_params(["cupy"])


def _forms():
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    return [f for f in cupy_gpu.available_kernels() if f.startswith("tensorcore_")]


@pytest.mark.parametrize("name", GPU)
def test_every_form_is_checked_in_its_own_process(name, monkeypatch, capsys):
    """Every form the GPU lists runs in a child process (whatever MINIBNN_TC_EXCLUDE said
    before), passes, and the last line names none; a form whose process dies (here: exits
    with status 3) or hangs past the time limit is named, with why."""
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "")  # the forms it checks: all, unproven or not
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    forms = _forms()
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", forms[0])
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    assert check_forms.main(["--timeout", "600"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == forms
    assert all(line.split()[1] == "ok" for line in lines[:-1])
    assert lines[-1] == "MINIBNN_TC_EXCLUDE="
    script = {forms[0]: "import sys; sys.exit(3)", forms[-1]: "import time; time.sleep(60)"}
    monkeypatch.setattr(check_forms, "_command", lambda f: [
        sys.executable, "-c", script.get(f, "print('ok')")])
    assert check_forms.main(["--timeout", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"MINIBNN_TC_EXCLUDE={forms[0]},{forms[-1]}"
    assert "LEFT OUT  (rc=3: (no output))" in lines[0]
    assert "no answer in 5 s" in lines[len(forms) - 1]
    assert all(line.split()[1] == "ok" for line in lines[1:len(forms) - 1])


@pytest.mark.parametrize("name", GPU)
def test_a_form_with_a_wrong_product_fails_its_check(name, monkeypatch, capsys):
    """check_one compares the product and the threshold bits with the reference on every
    shape: a form whose product is off by one on one shape fails (status 1) and says where."""
    form = _forms()[0]
    assert check_forms.check_one(form) == 0
    assert capsys.readouterr().out.strip() == "ok"
    real = cupy_gpu.xnor_gemm

    def off(a, b, k, kernel=None):
        z = real(a, b, k, kernel=kernel)
        if z.shape == (130, 67):
            z[5, 7] += 2
        return z

    monkeypatch.setattr(cupy_gpu, "xnor_gemm", off)
    assert check_forms.check_one(form) == 1
    assert capsys.readouterr().out.strip() == "wrong: 130x67x1000 product"
    assert np.array_equal(real(np.zeros((1, 1), np.uint64), np.zeros((1, 1), np.uint64), 1,
                               kernel=form).get(), [[1]])
