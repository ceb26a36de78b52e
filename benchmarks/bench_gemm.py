"""Time the binary XNOR-popcount GEMM against float matrix products and the popcount roofline.

Shapes are M x K x N (A is M x K, the weights B are N x K): 100 x 4096 x 4096 is one
batch of the paper's MNIST MLP (Courbariaux et al. 2016, arXiv:1602.02830, section 4),
10000 x 4096 x 4096 its run-time batch, 4096^3 a square reference, 8192^3 on a GPU, and on
the CPU 256 x 65536 x 1024, a long K where Harley-Seal counting (``numba_hs``) pays.
TOPS counts 2 operations per multiply-accumulate: 2 M N K / t. "x f32" is the speed-up
over NumPy's float32 matmul of the same +-1 matrices in the same run.

CPU rows: every Numba kernel variant (``numba_cpu.available_kernels()``), the autotune's
choice ("numba auto"), and "plain 4x4 ctpop": a first-attempt kernel written here (a 4 x 4
register tile, ``prange`` over row tiles, ``llvm.ctpop`` per word, no cache blocking), the
baseline of issue #10 (it writes into an output buffer made once, as the numba rows do).
Rows named "..., prepared B" (the broadcast kernels and the autotune's choice) run the same
product with B made once into the forms the kernels read (``numba_cpu.prepare_weights``, as
a frozen net keeps its weights); they have no packing or end-to-end figures, since that
work belongs to freezing. "% peak" is a kernel's TOPS over the machine's XOR-popcount-accumulate
peak, an L1-resident micro-benchmark on all cores (:func:`roofline`): measured first (the
JSON's machine ``roofline_tops``), then timed again with each shape's kernels, taking its
turn among them, and each row's "% peak" is of that shape's figure (``roofline_tops`` in
the row): this machine's speed drifts from minute to minute, and a peak measured minutes
earlier made the first shape's kernels look up to 2x further from it than they were.
Packing (A and B from float32) is timed apart, and "end to end" runs pack A + pack B + GEMM.
Each figure is the best of --repeats runs (more, up to 50, where a round of a shape's paths
takes under a fifth of a second) after one warm-up run (the median is kept in the JSON too): on a shared machine the best run is the one least disturbed by other work. The
CPU paths of a shape take turns, one run each per round, so a drift in the machine's speed
falls on all of them alike.

GPU rows (``--backends ...,cupy`` on a GPU; each time the median of --repeats samples of
calls issued back to back, per call, see ``gpu_time``: every row alike, cuBLAS included;
the kernel rows also keep the latency of one call alone as ``latency_s`` in the JSON):
cuBLAS fp32 and fp16 through CuPy, each
``cupy_gpu`` kernel on packed operands (packing and end to end beside it): "tensorcore" (the
form its autotune picked for the shape class; its timings are printed and kept in the
JSON's machine info) and each tensor-core form by name, and "cuda"; and for each kernel a
frozen layer's product three ways, all with B prepared (``cupy_gpu.prepare_weights``:
padded, popcounts made once): the int32 product alone, the product then ``pack_threshold``
(two passes, bits out) and ``gemm_threshold`` (the threshold in the GEMM's epilogue, bits out).

    python benchmarks/bench_gemm.py [--quick] [--backends numpy,reference,numba,cupy]
                                    [--repeats 5] [--out DIR] [--isa native|cascadelake|znver3]
                                    [--shapes MxKxN,...]

``--isa`` runs the CPU rows as a CPU with less of the x86 ISA would (:data:`ISA_PROFILES`):
the script starts itself again with Numba compiling for that CPU's features
(:func:`kernels.autotune.isa_profile_environment`
(NUMBA_CPU_NAME, NUMBA_CPU_FEATURES: the host's features less those the profile lacks,
e.g. no AVX512_VPOPCNTDQ on Cascade Lake, no AVX-512 at all on Zen 3) and OpenBLAS on that
CPU's float kernels (OPENBLAS_CORETYPE)). The instructions are those of the profile, the
micro-architecture is this machine's: a proxy for that CPU, not a measurement on it (vector
widths, ports and latencies differ), which the JSON says. The output is named
``gemm_cpu_isa-<profile>.json``. A profile needs a host that has every feature it keeps.

Results go to benchmarks/results/ (--quick: benchmarks/results/quick/, ignored by git).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OpenBLAS reads this when NumPy loads it: its threads sleep at once after a product
# instead of spinning on the cores the next path (a numba kernel, taking its turn) needs
# (minibnn/__init__ sets it too, but NumPy is imported here first)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from minibnn.kernels import autotune, numba_cpu, numba_simd, reference  # noqa: E402
from minibnn.kernels import cupy_gpu  # noqa: E402
from minibnn.kernels._numba_common import popcount64  # noqa: E402

CPU_SHAPES = [(100, 4096, 4096), (10000, 4096, 4096), (4096, 4096, 4096), (256, 65536, 1024)]
GPU_SHAPES = CPU_SHAPES[:3] + [(8192, 8192, 8192)]
QUICK_SHAPES = [(64, 512, 256), (300, 1024, 700)]
REFERENCE_BUDGET_S = 2.0  # the NumPy reference GEMM runs on a row subsample past this


def timings(fn, repeats, sync=None):
    """(best, median) seconds of ``repeats`` runs of ``fn`` after one warm-up run."""
    fn()
    if sync:
        sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return float(np.min(times)), float(np.median(times))


def best_time(fn, repeats, sync=None):
    return timings(fn, repeats, sync)[0]


def round_robin(paths, repeats, rewarm_below_s=0.05, budget_s=1.0, max_rounds=50):
    """{name: (best, median) seconds} of the functions in ``paths``, each run once as a
    warm-up, then rounds in which each runs once, in turn: ``repeats`` rounds, or more (up
    to ``max_rounds``) while a round takes under ``budget_s`` / ``repeats``, since the best
    of 5 runs of a sub-millisecond product is as noisy as the machine. A path whose warm-up
    took under ``rewarm_below_s`` runs once more, untimed, right before each timed run: the
    thread pools (Numba's, OpenBLAS's) have gone to sleep during the other paths' turns, and
    waking them would be timed with the kernel; the long paths pay it at the same share."""
    quick, warm = {}, 0.0
    for name, fn in paths.items():
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        quick[name] = took < rewarm_below_s
        warm += took * (2 if quick[name] else 1)
    rounds = max(1, repeats, min(max_rounds, int(budget_s / max(warm, 1e-9))))
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            if quick[name]:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.min(ts)), float(np.median(ts))) for name, ts in times.items()}


# ------------------------------------------------------------- the popcount roofline

_PEAK_ROWS, _PEAK_WORDS = numba_simd.TILE[0], 256  # 4 + 4 rows x 2 KiB: 16 KiB, in L1


@njit(parallel=True, cache=False)
def _peak_loop(a, b, lanes, reps, sink):
    """Each thread runs the 4 x 4 micro-kernel ``reps`` times over its own L1-resident rows."""
    for t in prange(a.shape[0]):
        tmp = np.zeros(16, dtype=np.int64)
        pa, pb = a[t].ctypes.data, b[t].ctypes.data
        sa, sb = a.strides[1], b.strides[1]
        total = 0
        for _ in range(reps):
            if lanes == 8:
                numba_simd._mk_simd512(pa, sa, pb, sb, 0, _PEAK_WORDS, tmp.ctypes.data)
            elif lanes == 4:
                numba_simd._mk_simd256(pa, sa, pb, sb, 0, _PEAK_WORDS, tmp.ctypes.data)
            else:
                numba_simd._mk_scalar(pa, sa, pb, sb, 0, _PEAK_WORDS, tmp.ctypes.data)
            total += tmp[0]
        sink[t] = total


def roofline(repeats=50, target_s=0.005):
    """The machine's XOR-popcount-accumulate peak, TOPS (2 ops per bit pair), on all cores.

    Every thread runs the kernels' 4 x 4 register tile (``numba_simd``: 8 loads, then 16
    xor + popcount + add per vector of K) over its own 4 + 4 rows of 256 words (16 KiB,
    resident in L1), so neither cache nor memory limits it: the rate of the arithmetic
    itself. The peak is the best over the vector widths this CPU offers (1, 4, 8 lanes),
    each the best of ``repeats`` runs of about ``target_s`` (short runs, like the GEMM
    timings' best-of: on a busy machine a long run measures its share of the cores).
    Returns (peak TOPS, {lanes: TOPS}, probe): ``probe`` = (fn, ops), one run of about
    ``target_s`` of the best width and the ops it counts, for timing the peak again beside
    each shape's kernels (:func:`bench_shape`).

    Without VPOPCNTDQ the micro-kernel's vector popcount is LLVM's nibble-table expansion,
    so the peak is that method's; the Harley-Seal kernels count fewer popcounts than that
    and can pass it on long K.
    """
    threads = numba.get_num_threads()
    rng = np.random.default_rng(1)
    shape = (threads, _PEAK_ROWS, _PEAK_WORDS)
    a = rng.integers(0, 2**63, size=shape, dtype=np.uint64)
    b = rng.integers(0, 2**63, size=shape, dtype=np.uint64)
    sink = np.zeros(threads, np.int64)
    per, probes = {}, {}
    for name in numba_simd.KERNELS:
        if name not in numba_cpu.available_kernels():
            continue
        lanes = numba_simd.LANES[name]
        reps = 16
        while True:  # the cost of a rep from a run of >= 50 ms, where the launch (and, on
            # a busy machine, waiting for a core) is a small part
            t = best_time(lambda: _peak_loop(a, b, lanes, reps, sink), 1)
            if t >= 0.05 or reps > 1 << 30:
                break
            reps *= 2
        reps = max(16, int(reps * target_s / t))
        t = best_time(lambda: _peak_loop(a, b, lanes, reps, sink), repeats)
        bit_pairs = threads * reps * _PEAK_ROWS * _PEAK_ROWS * _PEAK_WORDS * 64
        per[lanes] = 2 * bit_pairs / t / 1e12
        probes[lanes] = (lambda lanes=lanes, reps=reps: _peak_loop(a, b, lanes, reps, sink),
                         2 * bit_pairs)
    best = max(per, key=per.get)
    return per[best], per, probes[best]


# ------------------------------------------------- the plain blocked kernel (baseline)


@njit(parallel=True, cache=False)
def plain_4x4(a, b, k, out):
    """k - 2 popcount(a[i] ^ b[j]) into ``out`` (int32 (M, N)) with a 4 x 4 register tile
    and ``prange`` over row tiles: 16 scalar ``llvm.ctpop`` counters over the whole of K, no
    cache blocking. It writes into a buffer made once, as the numba rows do: allocating the
    output in each call timed 71 ms against 56 ms at 4096^3 (64 MiB of fresh pages)."""
    m, w_count = a.shape
    n = b.shape[0]
    for t in prange((m + 3) // 4):
        i = 4 * t
        if i + 4 <= m:
            for j in range(0, n - n % 4, 4):
                c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.uint64(0)
                c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.uint64(0)
                for w in range(w_count):
                    a0, a1, a2, a3 = a[i, w], a[i + 1, w], a[i + 2, w], a[i + 3, w]
                    b0, b1, b2, b3 = b[j, w], b[j + 1, w], b[j + 2, w], b[j + 3, w]
                    c00 += popcount64(a0 ^ b0)
                    c01 += popcount64(a0 ^ b1)
                    c02 += popcount64(a0 ^ b2)
                    c03 += popcount64(a0 ^ b3)
                    c10 += popcount64(a1 ^ b0)
                    c11 += popcount64(a1 ^ b1)
                    c12 += popcount64(a1 ^ b2)
                    c13 += popcount64(a1 ^ b3)
                    c20 += popcount64(a2 ^ b0)
                    c21 += popcount64(a2 ^ b1)
                    c22 += popcount64(a2 ^ b2)
                    c23 += popcount64(a2 ^ b3)
                    c30 += popcount64(a3 ^ b0)
                    c31 += popcount64(a3 ^ b1)
                    c32 += popcount64(a3 ^ b2)
                    c33 += popcount64(a3 ^ b3)
                cs = (c00, c01, c02, c03, c10, c11, c12, c13,
                      c20, c21, c22, c23, c30, c31, c32, c33)
                for q in range(16):
                    out[i + q // 4, j + q % 4] = k - 2 * np.int32(cs[q])
            j_start = n - n % 4
        else:
            j_start = 0
        for r in range(i, min(i + 4, m)):  # the pairs outside whole tiles
            for j in range(j_start if i + 4 <= m else 0, n):
                s = np.uint64(0)
                for w in range(w_count):
                    s += popcount64(a[r, w] ^ b[j, w])
                out[r, j] = k - 2 * np.int32(s)
    return out


PREPARED = ", prepared B"  # rows whose B is a numba_cpu.PreparedWeights (panels, planes made once)


#: GPU samples cover at least this much GPU time: calls issued back to back, so that the
#: host's launch time per call (tens of microseconds through CuPy) overlaps the GPU's work
#: instead of adding to it, as it does for a single call on an idle GPU
GPU_SAMPLE_S = 2e-3


def gpu_time(fn, repeats):
    """Seconds per call of ``fn`` on the GPU: the median over ``repeats`` samples, each
    timed with CUDA events around ``inner`` calls issued back to back (``inner`` sized from
    a single call so that a sample spans about GPU_SAMPLE_S, at most 200 calls), divided by
    ``inner``. That is the product's rate in a stream of products (a batch loop, a
    benchmark of one kernel); the latency of one call on an idle GPU also counts the
    host's launch time (``gpu_latency``)."""
    import cupy as cp

    single = gpu_latency(fn, 1)
    inner = int(min(200, max(1, np.ceil(GPU_SAMPLE_S / max(single, 1e-6)))))
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / inner)
    return float(np.median(times))


def gpu_latency(fn, repeats):
    """Median seconds of one call of ``fn`` alone (after a warm-up), CUDA events around it:
    the host's launch time is counted where the GPU waits for it."""
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
    isa = autotune.isa_features()
    return common.machine_info(use_gpu, numba_kernels=list(numba_cpu.available_kernels()),
                               isa=isa, autotune_key=autotune.machine_key(isa))


def bench_shape(m, k, n, backends, repeats, use_gpu, peak, probe=None):
    rng = np.random.default_rng(0)
    x = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    y = np.where(rng.random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    ops = 2.0 * m * n * k
    rows = []

    def add(name, t, pack=None, e2e=None, note="", median=None, cpu=True, latency=None):
        frac = ops / t / 1e12 / peak if (peak and cpu) else None
        rows.append({"shape": f"{m}x{k}x{n}", "M": m, "K": k, "N": n, "backend": name,
                     "time_s": t, "median_s": median, "latency_s": latency,
                     "tops": ops / t / 1e12,
                     "fraction_of_peak": frac, "roofline_tops": peak if cpu else None,
                     "pack_s": pack, "end_to_end_s": e2e, "note": note})
        print(f"  {name:36s} {t * 1e3:10.2f} ms  {ops / t / 1e12:8.3f} TOPS"
              + (f"  {100 * frac:5.1f}% peak" if frac is not None else "")
              + (f"  ({note})" if note else ""), flush=True)

    a = numba_cpu.pack_rows(x)
    b = numba_cpu.pack_rows(y)
    want = reference.xnor_gemm(a[:8], b, k)
    # The CPU products take turns, one run each per round, so that a machine whose speed
    # drifts (shared, or changing clocks) slows all of them alike; best and median per path.
    paths = {"numpy float32 matmul": lambda: x @ y.T}
    out = np.empty((m, n), np.int32)
    checks, chosen = {}, None
    if "numba" in backends:
        full = np.empty((m, n), np.int32)
        plain_4x4(a, b, k, full)  # checked against the reference on its first 8 rows
        checks["plain 4x4 ctpop"] = bool((full[:8] == want).all())
        out_plain = np.empty((m, n), np.int32)
        paths["plain 4x4 ctpop"] = lambda: plain_4x4(a, b, k, out_plain)
        chosen = numba_cpu.default_kernel(m, n, k)
        prepared = numba_cpu.prepare_weights(b)
        for kern in numba_cpu.available_kernels() + ("auto",):
            numba_cpu.xnor_gemm(a, b, k, kernel=kern, out=out)
            checks[f"numba {kern}"] = bool((out == full).all())  # the whole product
            paths[f"numba {kern}"] = (lambda kern=kern: numba_cpu.xnor_gemm(a, b, k, kernel=kern,
                                                                             out=out))
            if kern in numba_simd.BCAST or kern == "auto":  # B as a frozen net keeps it
                name = f"numba {kern}{PREPARED}"
                numba_cpu.xnor_gemm(a, prepared, k, kernel=kern, out=out)
                checks[name] = bool((out == full).all())
                paths[name] = (lambda kern=kern: numba_cpu.xnor_gemm(a, prepared, k,
                                                                      kernel=kern, out=out))
    if probe is not None:  # the roofline takes its turns too: "% peak" is of this minute
        paths["roofline"] = probe[0]
    timed = round_robin(paths, repeats)
    if probe is not None:
        peak = probe[1] / timed.pop("roofline")[0] / 1e12
        print(f"  roofline, timed with this shape's kernels: {peak:.3f} TOPS", flush=True)
    best, med = timed.pop("numpy float32 matmul")
    add("numpy float32 matmul", best, median=med, note="BLAS, float")
    rows[-1]["fraction_of_peak"] = None
    if "reference" in backends:
        t_row = best_time(lambda: reference.xnor_gemm(a[:8], b, k), 1) / 8
        sub = m if t_row * m <= REFERENCE_BUDGET_S else max(8, int(REFERENCE_BUDGET_S / t_row))
        reps = repeats if t_row * sub * repeats <= 4 * REFERENCE_BUDGET_S else 1
        t = best_time(lambda: reference.xnor_gemm(a[:sub], b, k), reps) * m / sub
        t_pack = best_time(lambda: (reference.pack_rows(x), reference.pack_rows(y)), reps)
        note = "" if sub == m else f"{sub} of {m} rows timed, scaled to {m}"
        add("numpy reference xnor", t, t_pack, t + t_pack, note)
    if "numba" in backends:
        t_pack = best_time(lambda: (numba_cpu.pack_rows(x), numba_cpu.pack_rows(y)), repeats)
        e2e = round_robin({name: (lambda kern=name[6:]: numba_cpu.xnor_gemm(
            numba_cpu.pack_rows(x), numba_cpu.pack_rows(y), k, kernel=kern, out=out))
            for name in timed if name.startswith("numba ") and PREPARED not in name}, repeats)
        for name, (best, med) in timed.items():
            note = "" if checks[name] else "WRONG RESULT"
            if name == "plain 4x4 ctpop":
                add(name, best, median=med, note=note or "baseline")
                continue
            if name.startswith("numba auto"):
                note = (note + " " if note else "") + f"autotune chose {chosen}"
            if PREPARED in name:  # packing B belongs to freezing, not to the product
                note = (note + "; " if note else "") + "B prepared once"
                add(name, best, None, None, note, median=med)
                continue
            add(name, best, t_pack, e2e[name][0], note, median=med)
    if use_gpu:
        import cupy as cp

        xg, yg = cp.asarray(x), cp.asarray(y)
        add("cuBLAS fp32 (cupy)", gpu_time(lambda: xg @ yg.T, repeats), cpu=False,
            latency=gpu_latency(lambda: xg @ yg.T, repeats))
        xh, yh = xg.astype(cp.float16), yg.astype(cp.float16)
        add("cuBLAS fp16 (cupy)", gpu_time(lambda: xh @ yh.T, repeats), cpu=False,
            latency=gpu_latency(lambda: xh @ yh.T, repeats))
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
            add(f"cupy {kern}", t, t_pack, e2e, "" if ok else "WRONG RESULT", cpu=False,
                latency=gpu_latency(lambda: cupy_gpu.xnor_gemm(ag, bg, k, kernel=kern), repeats))
        # a frozen layer's product: B prepared once (padded, popcounts), then sign(BN) as a
        # second pass over the int32 z, or in the GEMM's epilogue (bits out, no z)
        pg = cupy_gpu.prepare_weights(bg)
        z64 = reference.xnor_gemm(a[:64], b, k)
        thr = cp.asarray(z64[0].astype(np.int64))  # one row's products: about half fire
        want_bits = reference.pack_threshold(z64, thr.get())
        for kern in cupy_gpu.available_kernels():
            ok = bool((cupy_gpu.xnor_gemm(ag[:64], pg, k, kernel=kern).get() == z64).all())
            add(f"cupy {kern}{PREPARED}", gpu_time(lambda: cupy_gpu.xnor_gemm(ag, pg, k, kernel=kern),
                                                   repeats), note="" if ok else "WRONG RESULT",
                cpu=False)
            two = gpu_time(lambda: cupy_gpu.pack_threshold(
                cupy_gpu.xnor_gemm(ag, pg, k, kernel=kern), thr), repeats)
            add(f"cupy {kern}, then pack_threshold", two, note="B prepared; bits out", cpu=False)
            fused = gpu_time(lambda: cupy_gpu.gemm_threshold(ag, pg, k, thr, kernel=kern), repeats)
            got = cupy_gpu.gemm_threshold(ag[:64], pg, k, thr, kernel=kern).get()
            add(f"cupy {kern} + threshold epilogue", fused, cpu=False,
                note="B prepared; bits out" if (got == want_bits).all() else "WRONG RESULT")
    base = rows[0]["time_s"]
    plain = next((r["time_s"] for r in rows if r["backend"] == "plain 4x4 ctpop"), None)
    for r in rows:
        r["speedup_vs_f32"] = base / r["time_s"]
        r["end_to_end_speedup_vs_f32"] = base / r["end_to_end_s"] if r["end_to_end_s"] else None
        r["speedup_vs_plain_4x4"] = plain / r["time_s"] if plain else None
    return rows


def print_table(rows, peak):
    if peak:
        print(f"\nXOR-popcount-accumulate peak (L1-resident, all cores): {peak:.3f} TOPS")
    head = (f"{'shape MxKxN':18s} {'backend':36s} {'time ms':>10s} {'TOPS':>8s} {'% peak':>7s} "
            f"{'x f32':>7s} {'x plain':>7s} {'pack ms':>9s} {'e2e ms':>9s} {'e2e x f32':>9s}  note")
    print("\n" + head + "\n" + "-" * len(head))
    dash = lambda w: f"{'-':>{w}s}"  # noqa: E731
    for r in rows:
        pack = f"{r['pack_s'] * 1e3:9.2f}" if r["pack_s"] is not None else dash(9)
        e2e = f"{r['end_to_end_s'] * 1e3:9.2f}" if r["end_to_end_s"] else dash(9)
        e2x = f"{r['end_to_end_speedup_vs_f32']:9.1f}" if r["end_to_end_speedup_vs_f32"] else dash(9)
        frac = f"{100 * r['fraction_of_peak']:7.1f}" if r["fraction_of_peak"] else dash(7)
        xp = f"{r['speedup_vs_plain_4x4']:7.2f}" if r["speedup_vs_plain_4x4"] else dash(7)
        print(f"{r['shape']:18s} {r['backend']:36s} {r['time_s'] * 1e3:10.2f} {r['tops']:8.3f} "
              f"{frac} {r['speedup_vs_f32']:7.1f} {xp} {pack} {e2e} {e2x}  {r['note']}")


def plot(rows, path):
    common.grouped_bars(rows, "shape", "backend", "tops", path,
                        xlabel=lambda s: f"{s}\n(M x K x N)", ylabel="TOPS (2 M N K / t)",
                        title="XNOR-popcount GEMM vs float matmul")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes, for a smoke test (writes to a temporary directory "
                        "unless --out is given)")
    p.add_argument("--backends", default="numpy,reference,numba,cupy",
                   help="comma list from numpy,reference,numba,cupy (numpy float32 always runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--isa", default="native", choices=["native", *autotune.ISA_PROFILES],
                   help="run the CPU kernels as a CPU with this ISA would (a proxy on this "
                        "machine's micro-architecture; see the module docstring)")
    p.add_argument("--shapes", default=None,
                   help="comma list of MxKxN shapes to run instead of the default set "
                        "(e.g. 100x4096x4096); the JSON is then named ..._shapes.json")
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default benchmarks/results, with "
                        "--quick benchmarks/results/quick, which git ignores)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: expected a positive integer, got {args.repeats}")
    common.restart_under_isa(p, args.isa, argv, __file__)
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
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        except ValueError:
            shapes = [()]
        if any(len(s) != 3 or min(s) < 1 for s in shapes):
            p.error(f"--shapes: expected a comma list of MxKxN with positive integers, got "
                    f"{args.shapes!r}")
    info = machine_info(use_gpu)
    common.note_isa(info, args.isa)
    print(json.dumps(info))
    peak = probe = None
    if "numba" in backends:
        peak, per_lanes, probe = roofline(repeats=20 if args.quick else max(50, args.repeats))
        info["roofline_tops"] = peak
        info["roofline_tops_by_lanes"] = {str(k): v for k, v in per_lanes.items()}
        print(f"XOR-popcount-accumulate peak: {peak:.3f} TOPS "
              f"(by 64-bit lanes per vector: {', '.join(f'{k}: {v:.3f}' for k, v in per_lanes.items())})",
              flush=True)
    rows = []
    for m, k, n in shapes:
        print(f"{m}x{k}x{n}:", flush=True)
        rows += bench_shape(m, k, n, backends, args.repeats, use_gpu, peak, probe)
    print_table(rows, peak)
    out = common.results_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = (("gemm_gpu" if use_gpu else "gemm_cpu")
            + (f"_isa-{args.isa}" if args.isa != "native" else "")
            + ("_quick" if args.quick else "") + ("_shapes" if args.shapes else ""))
    info["load_average_at_end"] = list(os.getloadavg())
    def shape_class(key):  # cupy_gpu's (device, M, N, W bit lengths) key, as a JSON key
        return "M, N, W bit lengths " + ",".join(map(str, key[1:]))

    if use_gpu and cupy_gpu.form_timings:  # what plain "tensorcore" timed and chose
        info["tensorcore_form_timings"] = {
            shape_class(key): times for key, times in cupy_gpu.form_timings.items()}
        for key, times in cupy_gpu.form_timings.items():
            print(f"tensorcore, M/N/W bit lengths {key[1:]}: "
                  + ", ".join(f"{f} {t * 1e6:.1f} us" for f, t in sorted(times.items(),
                                                                        key=lambda x: x[1])))
    if use_gpu and cupy_gpu.form_disagreements:  # forms whose product differed: never used
        info["tensorcore_form_disagreements"] = {
            shape_class(key): forms for key, forms in cupy_gpu.form_disagreements.items()}
        print(f"WRONG tensor-core forms (left out by the autotune): "
              f"{info['tensorcore_form_disagreements']}")
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "repeats": args.repeats,
                                                  "timing": "best of repeats (median_s too)",
                                                  "results": rows}, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()
