"""Run every tensor-core GEMM form on this GPU, each in a process of its own, and say which
to leave out (``MINIBNN_TC_EXCLUDE``).

Plain ``"tensorcore"`` times its forms on the first product of each shape class and
already drops a form whose product differs from the direct form's
(``cupy_gpu.form_disagreements``). A form that fails outright (an illegal address, a
launch error, a hang) is another matter: the error spoils the process's CUDA context, so
the autotune, and the training run or benchmark around it, die with it. Kernels new to a
GPU are checked here first: each form runs ``xnor_gemm`` and ``gemm_threshold`` (per-unit
thresholds and a ConvNet's per-position table) on awkward shapes (K of 1, 65 and 4,097
bits, M or N of 1, odd sizes, a partial last stage) and one large product, against
``kernels.reference``, in a subprocess with a time limit, all forms at once. It prints
one line per form and, last, ``MINIBNN_TC_EXCLUDE=<forms>`` naming every form that failed
or gave a wrong product (empty when none did), for a shell to export before the real work
(``benchmarks/gpu_check.sh`` does).

    PYTHONPATH=. python benchmarks/check_forms.py [--timeout 120]
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = ((1, 1, 1), (3, 5, 65), (17, 1, 640), (1, 33, 4097), (130, 67, 1000),
          (257, 129, 4097), (1024, 512, 8192))  # (M, N, K bits)


def check_one(form):
    """Exit status 0 when ``form`` equals the reference on every shape, 1 when it does not
    (a failure to launch ends the process some other way)."""
    import cupy

    from minibnn.kernels import cupy_gpu, reference
    rng = np.random.default_rng(0)
    bad = []
    for m, n, k in SHAPES:
        a = reference.pack_rows(rng.choice([-1.0, 1.0], (m, k)))
        b = reference.pack_rows(rng.choice([-1.0, 1.0], (n, k)))
        want = reference.xnor_gemm(a, b, k)
        got = cupy.asnumpy(cupy_gpu.xnor_gemm(a, b, k, kernel=form))
        if not np.array_equal(got, want):
            bad.append(f"{m}x{n}x{k} product")
        periods = next(d for d in (3, 2, 1) if m % d == 0)  # a ConvNet's (P, N) table too
        for shape in ((n,), (periods, n)):
            threshold = rng.integers(-k, k + 1, shape)
            bits = cupy.asnumpy(cupy_gpu.gemm_threshold(a, b, k, threshold, kernel=form))
            if not np.array_equal(bits, reference.pack_threshold(want, threshold)):
                bad.append(f"{m}x{n}x{k} threshold {shape}")
    cupy.cuda.Device().synchronize()
    print("wrong: " + ", ".join(bad) if bad else "ok", flush=True)
    return 1 if bad else 0


def _command(form):
    """The command that checks ``form`` in a process of its own."""
    return [sys.executable, os.path.abspath(__file__), "--form", form]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds each form's process may take (compiling included)")
    p.add_argument("--form", default=None, help=argparse.SUPPRESS)  # one form, in-process
    args = p.parse_args(argv)
    if args.form is not None:
        return check_one(args.form)
    from minibnn.kernels import cupy_gpu
    # every form the GPU can run, whatever was excluded (unset would leave out the forms not
    # yet proven on a GPU, which are the ones to check) or forced
    os.environ["MINIBNN_TC_EXCLUDE"] = ""
    os.environ.pop("MINIBNN_TC_FORM", None)
    env = dict(os.environ)
    forms = [f for f in cupy_gpu.available_kernels() if f.startswith("tensorcore_")]
    t0 = time.perf_counter()
    procs = {f: subprocess.Popen(_command(f), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for f in forms}
    failed = []
    for form, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
            why = f"rc={proc.returncode}: " + (out.strip().splitlines() or ["(no output)"])[-1]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            why = f"no answer in {args.timeout:g} s"
        ok = proc.returncode == 0
        print(f"{form:26s} {'ok' if ok else 'LEFT OUT'}" + ("" if ok else f"  ({why[:160]})"),
              flush=True)
        if not ok:
            failed.append(form)
    print(f"MINIBNN_TC_EXCLUDE={','.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
