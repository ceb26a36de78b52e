"""Time the binary XNOR-popcount GEMM against float matrix products, one run, one machine.

Shapes are M x K x N (A is M x K, the weights B are N x K): 100 x 4096 x 4096 is one
batch of the paper's MNIST MLP (Courbariaux et al. 2016, arXiv:1602.02830, section 4),
10000 x 4096 x 4096 its run-time batch, 4096^3 a square reference, 8192^3 on a GPU.
TOPS counts 2 operations per multiply-accumulate: 2 M N K / t. "x f32" is the speed-up
over NumPy's float32 matmul of the same +-1 matrices in the same run. Packing (A and B
from float32) is timed apart, and "end to end" runs pack A + pack B + GEMM.
Each figure is the median of --repeats runs after one warm-up run.

    python benchmarks/bench_gemm.py [--quick] [--backends numpy,reference,numba,cupy]
                                    [--repeats 5] [--out DIR]

Results go to benchmarks/results/ (--quick: benchmarks/results/quick/, ignored by git).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from minibnn.kernels import numba_cpu, reference  # noqa: E402
from minibnn.kernels import cupy_gpu  # noqa: E402

CPU_SHAPES = [(100, 4096, 4096), (10000, 4096, 4096), (4096, 4096, 4096)]
GPU_SHAPES = CPU_SHAPES + [(8192, 8192, 8192)]
QUICK_SHAPES = [(64, 512, 256), (300, 1024, 700)]
REFERENCE_BUDGET_S = 2.0  # the NumPy reference GEMM runs on a row subsample past this


def median_time(fn, repeats, sync=None):
    fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gpu_time(fn, repeats):
    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def machine_info(use_gpu):
    return common.machine_info(use_gpu, numba_kernels=list(numba_cpu.available_kernels()))

def bench_shape(m, k, n, backends, repeats, use_gpu):
    rng = np.random.default_rng(0)
    x = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    y = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    ops = 2.0 * m * n * k
    rows = []

    def add(name, t, pack=None, e2e=None, note=""):
        rows.append({"shape": f"{m}x{k}x{n}", "M": m, "K": k, "N": n, "backend": name,
                     "time_s": t, "tops": ops / t / 1e12, "pack_s": pack, "end_to_end_s": e2e,
                     "note": note})
        print(f"  {name:24s} {t * 1e3:10.2f} ms  {ops / t / 1e12:8.3f} TOPS" + (f"  ({note})" if note else ""),
              flush=True)

    add("numpy float32 matmul", median_time(lambda: x @ y.T, repeats))
    a = numba_cpu.pack_rows(x)
    b = numba_cpu.pack_rows(y)
    if "reference" in backends:
        t_row = median_time(lambda: reference.xnor_gemm(a[:8], b, k), 1) / 8
        sub = m if t_row * m <= REFERENCE_BUDGET_S else max(8, int(REFERENCE_BUDGET_S / t_row))
        reps = repeats if t_row * sub * repeats <= 4 * REFERENCE_BUDGET_S else 1
        t = median_time(lambda: reference.xnor_gemm(a[:sub], b, k), reps) * m / sub
        t_pack = median_time(lambda: (reference.pack_rows(x), reference.pack_rows(y)), reps)
        note = "" if sub == m else f"{sub} of {m} rows timed, scaled to {m}"
        add("numpy reference xnor", t, t_pack, t + t_pack, note)
    if "numba" in backends:
        t_pack = median_time(lambda: (numba_cpu.pack_rows(x), numba_cpu.pack_rows(y)), repeats)
        for kern in numba_cpu.available_kernels():
            t = median_time(lambda: numba_cpu.xnor_gemm(a, b, k, kernel=kern), repeats)
            e2e = median_time(lambda: numba_cpu.xnor_gemm(numba_cpu.pack_rows(x),
                                                          numba_cpu.pack_rows(y), k, kernel=kern),
                              repeats)
            add(f"numba {kern}", t, t_pack, e2e)
    if use_gpu:
        import cupy as cp

        xg, yg = cp.asarray(x), cp.asarray(y)
        add("cuBLAS fp32 (cupy)", gpu_time(lambda: xg @ yg.T, repeats))
        xh, yh = xg.astype(cp.float16), yg.astype(cp.float16)
        add("cuBLAS fp16 (cupy)", gpu_time(lambda: xh @ yh.T, repeats))
        t_pack = gpu_time(lambda: (cupy_gpu.pack_rows(xg, check_nan=False),
                                   cupy_gpu.pack_rows(yg, check_nan=False)), repeats)
        ag, bg = cp.asarray(a), cp.asarray(b)
        for kern in cupy_gpu.available_kernels():
            t = gpu_time(lambda: cupy_gpu.xnor_gemm(ag, bg, k, kernel=kern), repeats)
            e2e = gpu_time(lambda: cupy_gpu.xnor_gemm(cupy_gpu.pack_rows(xg, check_nan=False),
                                                      cupy_gpu.pack_rows(yg, check_nan=False),
                                                      k, kernel=kern), repeats)
            ok = bool((cupy_gpu.xnor_gemm(ag[:64], bg[:64], k, kernel=kern).get()
                       == numba_cpu.xnor_gemm(a[:64], b[:64], k)).all())
            add(f"cupy {kern}", t, t_pack, e2e, "" if ok else "WRONG RESULT")
    base = rows[0]["time_s"]
    for r in rows:
        r["speedup_vs_f32"] = base / r["time_s"]
        r["end_to_end_speedup_vs_f32"] = base / r["end_to_end_s"] if r["end_to_end_s"] else None
    return rows


def print_table(rows):
    head = (f"{'shape MxKxN':18s} {'backend':24s} {'time ms':>10s} {'TOPS':>8s} {'x f32':>7s} "
            f"{'pack ms':>9s} {'e2e ms':>9s} {'e2e x f32':>9s}  note")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        pack = f"{r['pack_s'] * 1e3:9.2f}" if r["pack_s"] is not None else f"{'-':>9s}"
        e2e = f"{r['end_to_end_s'] * 1e3:9.2f}" if r["end_to_end_s"] else f"{'-':>9s}"
        e2x = f"{r['end_to_end_speedup_vs_f32']:9.1f}" if r["end_to_end_speedup_vs_f32"] else f"{'-':>9s}"
        print(f"{r['shape']:18s} {r['backend']:24s} {r['time_s'] * 1e3:10.2f} {r['tops']:8.3f} "
              f"{r['speedup_vs_f32']:7.1f} {pack} {e2e} {e2x}  {r['note']}")


def plot(rows, path):
    common.grouped_bars(rows, "shape", "backend", "tops", path,
                        xlabel=lambda s: f"{s}\n(M x K x N)", ylabel="TOPS (2 M N K / t)",
                        title="XNOR-popcount GEMM vs float matmul")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    p.add_argument("--backends", default="numpy,reference,numba,cupy",
                   help="comma list from numpy,reference,numba,cupy (numpy float32 always runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default benchmarks/results, with "
                        "--quick benchmarks/results/quick, which git ignores)")
    args = p.parse_args(argv)
    backends = {s.strip() for s in args.backends.split(",") if s.strip()}
    unknown = backends - {"numpy", "reference", "numba", "cupy"}
    if unknown:
        p.error(f"unknown backends: {sorted(unknown)}")
    use_gpu = False
    if "cupy" in backends:
        use_gpu, why = cupy_gpu.available()
        if not use_gpu:
            print(f"cupy backend skipped: {why}")
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if use_gpu else CPU_SHAPES)
    info = machine_info(use_gpu)
    print(json.dumps(info))
    rows = []
    for m, k, n in shapes:
        print(f"{m}x{k}x{n}:", flush=True)
        rows += bench_shape(m, k, n, backends, args.repeats, use_gpu)
    print_table(rows)
    out = common.results_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("gemm_gpu" if use_gpu else "gemm_cpu") + ("_quick" if args.quick else "")
    info["load_average_at_end"] = list(os.getloadavg())
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "repeats": args.repeats,
                                                  "results": rows}, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()
