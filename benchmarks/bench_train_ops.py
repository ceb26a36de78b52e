"""The numba backend's training-step kernels against the array code they replace, op by op,
side by side, on the shapes of the MNIST ConvNet's training step (``models.mnist_convnet``,
2x16C3-MP2-2x32C3-MP2-256FC, batch 100; ``bench_train.py`` times the whole step).

* ``binary_conv2d_backward``: both gradients of a binary 3x3 convolution (padding 1);
  array code: ``functional.conv2d_backward`` on ``im2col`` patches (two BLAS products,
  col2im); compiled: ``numba_conv.binary_conv2d_backward`` (no patch matrices);
* ``binary_conv2d_backward (loops)``: the same, compiled as the plain loops
  (``tiles=False``) instead of the register tiles (``kernels/numba_conv_tiles.py``);
* ``pack_sign_patches``: the XNOR forward's packed sign patches (array code: the bool
  patches of ``binary.conv_sign_patches``, then ``pack_rows``);
* ``conv_output``: the XNOR convolution's last step, the (O, N*Ho*Wo) int32 product minus
  the padding correction to NCHW float32 (array code: subtract, transpose, ``astype``);
* ``sign_ste`` and ``sign_ste_backward``: the Sign activation's forward (sign and the
  |x| <= 1 mask) and its backward (g times the mask);
* ``bn_forward`` and ``bn_forward_backward``: ``functional.BatchNormTrain`` on NCHW given
  the batch's statistics, the forward alone and the forward and backward together;
* ``bn_train_forward``: the same forward computing the batch's statistics too, as
  ``nn.BatchNorm2d`` runs it in training (array code: ``x.mean``, ``x.var``, the forward);
* ``max_pool2d_forward_backward``: 2x2 windows, stride 2, both passes;
* ``adam_step``: one ``optim.Adam`` step with clip on the 256x1568 weight of the ConvNet's
  hidden dense layer (each path on its own copy; compared after the first step).

"array code" is the same call with the compiled kernels switched off (``backend.conv_kernels``
returns None; the numba GEMM kernels stay on). Every compiled result is compared with the
array code's: ``exact`` says bit for bit, else ``max_rel`` is the largest difference over
the array code's largest magnitude (the ops that sum in another order). Times are the
medians of --repeats calls, the two paths taking turns; ratio = array / compiled. Shared
machines skew both sides: say so beside the numbers. Results:
benchmarks/results/train_ops_cpu.json (--quick: benchmarks/results/quick/).

    python benchmarks/bench_train_ops.py [--quick] [--batch 100] [--repeats 10] [--out DIR]
"""

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as bench_train.py (see minibnn/__init__)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from minibnn import backend, binary  # noqa: E402
from minibnn import functional as F  # noqa: E402

#: (in channels, out channels, height) of the MNIST ConvNet's binary convolutions
CONVS = [(16, 16, 28), (16, 32, 14), (32, 32, 14)]
QUICK_CONVS = [(3, 5, 6)]


def _cases(batch, convs, rng):
    """[(op, shape, fn(path) -> tuple of arrays)]."""
    kern = backend.kernel_module()
    cases = []
    for c, o, h in convs:
        x = np.where(rng.random((batch, c, h, h)) < 0.5, -1, 1).astype(np.float32)
        wb = np.where(rng.random((o, c, 3, 3)) < 0.5, -1, 1).astype(np.float32)
        g = rng.standard_normal((batch, o, h, h)).astype(np.float32)
        shape = f"{batch}x{c}x{h}x{h}->{o}"

        def conv_backward(path, x=x, wb=wb, g=g):
            op = binary.BinaryConv2dFn()
            op.needs_input_grad = (True, True)
            op.save(x, wb)
            op.stride, op.padding, op.patches = 1, 1, None
            return op.backward(g)

        def conv_backward_loops(path, x=x, wb=wb, g=g, array=conv_backward):
            if path == "array":
                return array(path)
            return backend.conv_kernels().binary_conv2d_backward(g, x, wb, 1, 1, tiles=False)

        def pack(path, x=x):
            if path == "array":
                return (kern.pack_rows(binary.conv_sign_patches(x, 3, 3, 1, 1)),)
            return (backend.conv_kernels().pack_sign_patches(x, 3, 3, 1, 1),)

        prod = rng.integers(-9 * c, 9 * c, (o, batch * h * h)).astype(np.int32)
        corr = rng.integers(-3 * c, 3 * c, (o, h, h)).astype(np.int32)

        def conv_output(path, prod=prod, corr=corr, o=o, h=h):
            if path == "array":  # binary.xnor_conv2d's array code
                out = prod.reshape(o, batch, h * h) - corr.reshape(o, 1, h * h)
                return (out.reshape(o, batch, h, h).transpose(1, 0, 2, 3)
                        .astype(np.float32, order="C"),)
            return (backend.conv_kernels().conv_output(prod, corr, batch, h, h, np.float32),)

        cases += [("binary_conv2d_backward", shape, conv_backward),
                  ("binary_conv2d_backward (loops)", shape, conv_backward_loops),
                  ("pack_sign_patches", shape, pack), ("conv_output", shape, conv_output)]
    for c, _, h in convs[:2]:  # the activations after each conv layer's batch norm
        a = (rng.standard_normal((batch, c, h, h)) * 2).astype(np.float32)
        g = rng.standard_normal(a.shape).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 2, c).astype(np.float32), np.zeros(c, np.float32)
        mean, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))
        shape = f"{batch}x{c}x{h}x{h}"

        def sign_ste(path, a=a):
            op = binary.SignSTE()
            return (op.forward(a), op.saved[0])

        keep = np.abs(a) <= 1

        def sign_ste_backward(path, g=g, keep=keep):
            op = binary.SignSTE()
            op.save(keep)
            return op.backward(g)

        def bn_train(path, a=a, gamma=gamma, beta=beta):
            stats = []
            y = F.BatchNormTrain().forward(a, gamma, beta, None, None, 1e-4, (0, 2, 3),
                                           stats=stats)
            return (y,) + stats[0]

        def bn(path, a=a, g=g, gamma=gamma, beta=beta, mean=mean, var=var, backward=False):
            op = F.BatchNormTrain()
            y = op.forward(a, gamma, beta, mean, var, 1e-4, (0, 2, 3))
            return op.backward(g) if backward else (y,)

        def pool_backward(path, a=a, g=g):
            op = F.MaxPool2d()
            out = op.forward(a, 2, 2)
            return op.backward(g[:, :, :out.shape[2], :out.shape[3]].copy())

        cases += [("sign_ste", shape, sign_ste), ("sign_ste_backward", shape, sign_ste_backward),
                  ("bn_forward", shape, bn),
                  ("bn_forward_backward", shape, lambda p, f=bn: f(p, backward=True)),
                  ("bn_train_forward", shape, bn_train),
                  ("max_pool2d_forward_backward", shape, pool_backward)]
    wshape = (256, 1568) if len(convs) > 1 else (7, 45)  # the hidden dense layer's weight
    w0 = rng.uniform(-1, 1, wshape).astype(np.float32)
    gw = rng.standard_normal(wshape).astype(np.float32)
    adams = {}

    def adam_step(path):
        from minibnn import nn, optim
        if path not in adams:  # each path its own weight and moments, from the same start
            p = nn.Parameter(w0.copy(), lr_scale=50.0, clip=1.0)
            adams[path] = (p, optim.Adam([p], lr=1e-3))
        p, opt = adams[path]
        p.grad = gw
        opt.step()
        return (p.data.copy(),)

    cases.append(("adam_step", "x".join(map(str, wshape)), adam_step))
    return cases


def _compare(got, want):
    exact = all(np.array_equal(a, b) for a, b in zip(got, want))
    rel = max(float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))
              for a, b in zip(got, want))
    return exact, rel


def measure(batch, repeats, convs, seed=0):
    """Rows {op, shape, array_ms, compiled_ms, ratio, exact, max_rel}."""
    rng = np.random.default_rng(seed)
    rows = []
    with backend.use("numba"):
        for op, shape, fn in _cases(batch, convs, rng):
            paths = {"array": common.array_code, "compiled": contextlib.nullcontext}
            results, times = {}, {p: [] for p in paths}
            for p, ctx in paths.items():
                with ctx():
                    results[p] = fn(p)  # warm-up: compiles
            for _ in range(repeats):
                for p, ctx in paths.items():
                    with ctx():
                        t0 = time.perf_counter()
                        fn(p)
                        times[p].append(time.perf_counter() - t0)
            exact, rel = _compare(results["compiled"], results["array"])
            a, c = (1e3 * float(np.median(times[p])) for p in paths)
            rows.append(dict(op=op, shape=shape, array_ms=a, compiled_ms=c, ratio=a / c,
                             exact=exact, max_rel=rel))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few calls")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    if backend.available()["numba"] is not None:
        ap.error(f"needs the numba backend: {backend.available()['numba']}")
    batch = args.batch or (4 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 10)
    convs = QUICK_CONVS if args.quick else CONVS
    info = common.machine_info(False, backends=["numba"], batch=batch, repeats=repeats)
    print(f"# {info['cpu']}, {info['cores']} cores; load average at start "
          f"{info['load_average_at_start']}")
    rows = measure(batch, repeats, convs)
    info["load_average_at_end"] = list(os.getloadavg())
    print(f"{'op':<32}{'shape':<20}{'array ms':>10}{'compiled ms':>13}{'ratio':>8}  result")
    for r in rows:
        same = "bit for bit" if r["exact"] else f"max rel diff {r['max_rel']:.1e}"
        print(f"{r['op']:<32}{r['shape']:<20}{r['array_ms']:>10.2f}{r['compiled_ms']:>13.2f}"
              f"{r['ratio']:>7.1f}x  {same}")
    out_dir = common.results_dir(args.out, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("train_ops_cpu_quick.json" if args.quick else "train_ops_cpu.json")
    path.write_text(json.dumps(dict(machine=info, rows=rows), indent=1))
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
