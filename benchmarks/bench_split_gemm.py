"""The backward products of the paper's CIFAR-10 ConvNet (batch 50) on the GPU: FP32 cuBLAS
(``cupy_blas.matmul``, what a training step runs by default) against the split bf16 product
(``backend.split_matmul_pm1``: the float operand in three exact bf16 parts, one cublasGemmEx
with float32 accumulation; both layouts, and the one ``split_layout`` picks), side by side
in one run, with the largest deviation from the float64 product in units of the float32
accumulation bound (<= 1 is the promise; tests/test_bf16_backward.py checks it).

Shapes (Courbariaux et al. 2016, arXiv:1602.02830, section 2.2: 2x128C3-MP2-2x256C3-MP2-
2x512C3-MP2-2x1024FC-10, 32 x 32 inputs), for every layer marked ``binary_input=True``:
a conv's g_x = W2^T g2 ((C*9, O) @ (O, N*H*W), the +-1 operand on the left) and
g_W = g2 patches ((O, N*H*W) @ (N*H*W, C*9), on the right), a dense layer's g_x = g W_b
and g_W = g^T x. Times are medians of --repeats runs of --inner products each, after a
warm-up, measured with CUDA events around the whole run (split, bf16 copies, GEMM, sum).

    python benchmarks/bench_split_gemm.py [--repeats 5] [--inner 10] [--backend cupy] [--out DIR]

``--backend numpy`` runs the same rows through the NumPy model (kernels/bf16.py) on a few
shapes scaled down, to check the script; its times mean nothing about a GPU. Results:
benchmarks/results/split_gemm_gpu.json (a NumPy run writes split_gemm_cpu.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from minibnn import backend  # noqa: E402

BATCH = 50


def convnet_products(batch=BATCH, scale=1):
    """[(name, m, k, n, exact)] of the CIFAR-10 ConvNet's +-1 backward products; ``scale``
    divides every size (a small stand-in for the NumPy check)."""
    rows = []
    size, c_in = 32, 128
    for c, first in ((128, False), (256, True), (256, False), (512, True), (512, False)):
        if first:
            size //= 2  # a 2x2 max-pool ends each stage
        k, p = c_in * 9 // scale, batch * size * size // scale
        rows += [(f"conv {c_in}->{c} @{size}: g_x", k, c // scale, p, "a"),
                 (f"conv {c_in}->{c} @{size}: g_W", c // scale, p, k, "b")]
        c_in = c
    width = 512 * 4 * 4
    for f in (1024, 1024, 10):
        rows += [(f"dense {width}->{f}: g_x", batch, max(1, f // scale), width // scale, "b"),
                 (f"dense {width}->{f}: g_W", max(1, f // scale), batch, width // scale, "b")]
        width = f
    return rows


def operands(m, k, n, exact, rng):
    """float32 (a, b) with the float operand ~ N(0, 1e-3) and the other +-1."""
    f = (rng.standard_normal((k, n) if exact == "a" else (m, k)) * 1e-3).astype(np.float32)
    s = np.where(rng.random((m, k) if exact == "a" else (k, n)) < 0.5, -1, 1).astype(np.float32)
    return (s, f) if exact == "a" else (f, s)


def clock(fn, repeats, inner, name):
    """Median seconds per call of ``fn`` over ``repeats`` runs of ``inner`` calls (CUDA
    events on the GPU), after one warm-up run."""
    for _ in range(inner):
        fn()
    backend.synchronize()
    times = []
    for _ in range(repeats):
        if name == "cupy":
            import cupy
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def measure(name, repeats, inner, scale, log=print):
    rng = np.random.default_rng(0)
    rows = []
    xp = backend.array_module(name)
    for label, m, k, n, exact in convnet_products(scale=scale):
        a, b = operands(m, k, n, exact, rng)
        with backend.use(name):
            ad, bd = backend.asarray(a), backend.asarray(b)
            a64, b64 = ad.astype(np.float64), bd.astype(np.float64)
            ref = a64 @ b64  # float64 on the device: exact enough to judge float32 sums
            bound = xp.maximum((k + 2) * 2.0 ** -24 * (xp.abs(a64) @ xp.abs(b64)), 1e-300)
            paths = {"fp32": lambda: backend.matmul(ad, bd)}
            for layout in backend.SPLIT_LAYOUTS:
                paths[f"bf16 {layout}"] = (lambda layout=layout:
                                           backend.split_matmul_pm1(ad, bd, exact, layout))
            row = dict(product=label, m=m, k=k, n=n, exact=exact,
                       chosen=f"bf16 {backend.split_layout(m, k, n, exact)}")
            for path, fn in paths.items():
                row[f"{path} err/bound"] = float((xp.abs(fn() - ref) / bound).max())
                row[f"{path} s"] = clock(fn, repeats, inner, name)
        row["speedup"] = row["fp32 s"] / row[f"{row['chosen']} s"]
        rows.append(row)
        log(f"{label:<28}{m:>6}x{k:>6}x{n:>6}  fp32 {1e6 * row['fp32 s']:>8.1f} us  "
            + "  ".join(f"{p} {1e6 * row[f'{p} s']:>8.1f} us" for p in paths if p != "fp32")
            + f"  chosen {row['chosen'][5:]:<9} {row['speedup']:>5.2f}x"
            + f"  err/bound {max(row[f'{p} err/bound'] for p in paths if p != 'fp32'):.2g}")
    total = {p: sum(r[f"{p} s"] for r in rows) for p in ("fp32", "bf16 reduction", "bf16 output")}
    total["chosen"] = sum(r[f"{r['chosen']} s"] for r in rows)
    log(f"all products of one step: fp32 {1e3 * total['fp32']:.3f} ms, split bf16 (chosen "
        f"layouts) {1e3 * total['chosen']:.3f} ms, {total['fp32'] / total['chosen']:.2f}x")
    return rows, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cupy", choices=("cupy", "numpy"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=10, help="products per timed run")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.inner < 1:
        ap.error("--repeats and --inner must be at least 1")
    why = backend.available()[args.backend]
    if why is not None:
        ap.error(f"--backend {args.backend}: {why}")
    gpu = args.backend == "cupy"
    if gpu:
        from minibnn.kernels import cupy_blas
        for what, reason in (("cupy_blas.matmul", cupy_blas.available()),
                             ("cupy_blas.gemm_ex", cupy_blas.gemm_ex_available())):
            if reason is not None:
                ap.error(f"{what} cannot run here: {reason}")
    info = common.machine_info(gpu, backend=args.backend, repeats=args.repeats,
                               inner=args.inner, batch=BATCH)
    print(f"# {info['cpu']}" + (f", {info.get('gpu')}" if gpu else ", NumPy model, sizes / 16")
          + f"; load average at start {info['load_average_at_start']}")
    rows, total = measure(args.backend, args.repeats, args.inner, 1 if gpu else 16)
    out_dir = common.results_dir(args.out, False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"split_gemm_{'gpu' if gpu else 'cpu'}.json"
    path.write_text(json.dumps(dict(machine=info, rows=rows, total_s=total), indent=1))
    print(f"wrote {path}")
    return dict(rows=rows, total_s=total)


if __name__ == "__main__":
    main()
