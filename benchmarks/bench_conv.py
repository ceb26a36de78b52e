"""Per-layer binary convolution vs float convolution, on the paper's CIFAR-10 ConvNet shapes.

The layers are those of ``models.cifar10_convnet`` (Courbariaux et al. 2016,
arXiv:1602.02830, Table 1): 3x3 convolutions with padding 1 on 32x32, 16x16 and 8x8 maps.
For each layer whose input is binary (all but the first), on a batch of +-1 activations:

* "float32 im2col+BLAS": ``functional.conv2d`` forward in NumPy float32 (one im2col, one
  BLAS GEMM), the float path a trained model takes without the XNOR kernel;
* "xnor <backend>": ``binary.xnor_conv2d`` on the numba (and cupy) backend: sign patches
  packed 64 to a word, one XNOR-popcount GEMM, the padding correction subtracted; the
  time includes building and packing the patches, which a frozen net shares with it;
* on a GPU, "cuDNN" through PyTorch (``torch.nn.functional.conv2d``, float16 and float32)
  when PyTorch is importable.

Each result is checked to equal the float convolution exactly. Figures are medians of
--repeats runs after a warm-up, the paths taking turns in each repeat. Results go to
benchmarks/results/conv_{cpu,gpu}.{json,png}; a --quick run writes
benchmarks/results/quick/conv_{cpu,gpu}_quick.{json,png} (ignored by git).

    python benchmarks/bench_conv.py [--quick] [--batch 50] [--repeats 5] [--out DIR]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as bench_gemm.py: no spinning BLAS
# threads on the cores the next path needs (OpenBLAS reads it when NumPy loads it)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from minibnn import Tensor, backend, binary, functional, no_grad  # noqa: E402

# (C_in, C_out, H) of cifar10_convnet's binary-input convolutions (3x3, padding 1)
LAYERS = [(128, 128, 32), (128, 256, 16), (256, 256, 16), (256, 512, 8), (512, 512, 8)]
QUICK_LAYERS = [(32, 32, 16), (64, 64, 8)]


def _median_times(paths, repeats):
    """{name: median seconds} for callables run round robin after one warm-up each."""
    times = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _gpu_paths(x, w, expected):
    """GPU paths (cupy XNOR, cuDNN through torch), each checked; {} without a GPU."""
    paths = {}
    if backend.available()["cupy"] is not None:
        return paths
    import cupy as cp
    xd, wd = cp.asarray(x), cp.asarray(w)

    def xnor_cupy():
        with backend.use("cupy"):
            out = binary.xnor_conv2d(xd, wd, padding=1)
        cp.cuda.Device().synchronize()
        return out

    with backend.use("cupy"):
        assert np.array_equal(cp.asnumpy(binary.xnor_conv2d(xd, wd, padding=1)), expected)
    paths["xnor cupy"] = xnor_cupy
    try:
        import torch
    except ImportError:
        return paths
    for dtype in (torch.float16, torch.float32):
        xt = torch.as_tensor(x, device="cuda", dtype=dtype)
        wt = torch.as_tensor(w, device="cuda", dtype=dtype)

        def cudnn(xt=xt, wt=wt):
            out = torch.nn.functional.conv2d(xt, wt, padding=1)
            torch.cuda.synchronize()
            return out

        got = cudnn().float().cpu().numpy()
        assert np.array_equal(got, expected), f"cuDNN {dtype} is not exact"
        paths[f"cuDNN {str(dtype).split('.')[-1]}"] = cudnn
    return paths


def bench_layer(c_in, c_out, h, batch, repeats, seed=0):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((batch, c_in, h, h)) < 0.5, -1.0, 1.0).astype(np.float32)
    w = np.where(rng.random((c_out, c_in, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    expected = functional.conv2d(x, w, padding=1).numpy()

    xt, wt = Tensor(x), Tensor(w)

    def float_conv():
        with no_grad():
            return functional.conv2d(xt, wt, padding=1)

    paths = {"float32 im2col+BLAS": float_conv}
    for name in ("numba",):
        if backend.available()[name] is None:
            with backend.use(name):
                assert np.array_equal(binary.xnor_conv2d(x, w, padding=1), expected)

            def xnor(name=name):
                with backend.use(name):
                    return binary.xnor_conv2d(x, w, padding=1)

            paths[f"xnor {name}"] = xnor
    paths.update(_gpu_paths(x, w, expected))
    times = _median_times(paths, repeats)
    ops = 2 * batch * h * h * c_out * c_in * 9
    base = times["float32 im2col+BLAS"]
    return [dict(layer=f"{c_in}->{c_out} @{h}x{h}", c_in=c_in, c_out=c_out, size=h, batch=batch,
                 path=name, seconds=t, tops=ops / t / 1e12, speedup_vs_float32=base / t,
                 exact=True) for name, t in times.items()]


def print_table(rows):
    head = f"{'layer':<18} {'path':<22} {'ms':>9} {'TOPS':>7} {'vs float32':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<18} {r['path']:<22} {1e3 * r['seconds']:9.2f} {r['tops']:7.3f} "
              f"{r['speedup_vs_float32']:10.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small layers and batch: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="images per batch (50, quick 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default benchmarks/results, with "
                        "--quick benchmarks/results/quick, which git ignores)")
    args = p.parse_args(argv)
    batch = args.batch or (8 if args.quick else 50)
    if batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be positive")
    use_gpu = backend.available()["cupy"] is None
    rows = []
    for c_in, c_out, h in (QUICK_LAYERS if args.quick else LAYERS):
        rows += bench_layer(c_in, c_out, h, batch, args.repeats)
    print(f"binary vs float convolution, 3x3 padding 1, batch {batch}, CPU {common.cpu_model()}")
    print_table(rows)
    out = common.results_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"conv_{'gpu' if use_gpu else 'cpu'}{'_quick' if args.quick else ''}"
    result = dict(machine=common.machine_info(use_gpu), batch=batch, repeats=args.repeats,
                  rows=rows, note="every binary result checked equal to the float convolution")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / (stem + '.json')}")
    common.grouped_bars(rows, "layer", "path", "seconds", out / f"{stem}.png",
                        xlabel=str, ylabel="seconds per batch (log)",
                        title=f"binary vs float 3x3 convolution, batch {batch}",
                        annotate=lambda r: f"{r['speedup_vs_float32']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
