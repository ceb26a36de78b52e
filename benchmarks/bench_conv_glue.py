"""The convolution glue: the array code of ``functional`` / ``binary`` against the compiled
glue (``backend.conv_kernels()``) of the numba and cupy backends, op by op, side by side.

Ops and shapes are those of one training step of the paper's CIFAR-10 ConvNet
(``models.cifar10_convnet``; Courbariaux et al. 2016, arXiv:1602.02830): 3x3 convolutions
with padding 1 on 128 to 512 channels at 32x32, 16x16 and 8x8, 2x2 max pools.

* ``im2col`` (cupy only; numba has none): the patches for the weight gradient;
* ``col2im``: the input gradient's scatter of the patch gradients;
* ``pack_sign_patches``: the XNOR forward's packed sign patches (array code: the bool
  patches of ``binary.conv_sign_patches``, then ``pack_rows``);
* ``max_pool2d`` and ``max_pool2d_backward``.

"array code" is the same call with the glue switched off. Each glue result is checked
equal to the array code's, bit for bit. Times are medians of --repeats calls after a
warm-up, the two paths taking turns; on the GPU each call is followed by a device
synchronisation, so a time is the launches' host cost and the kernels' run together.
The ratio is array code / glue (above 1: the glue is faster). Results go to
benchmarks/results/conv_glue_{cpu,gpu}.json (--quick: benchmarks/results/quick/).

    python benchmarks/bench_conv_glue.py [--quick] [--backends numba,cupy] [--batch 50]
        [--repeats 10] [--out DIR]
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
from minibnn import backend, binary  # noqa: E402
from minibnn import functional as F  # noqa: E402

# (channels, height) of the binary convolutions' and the pools' inputs at each map size
INPUTS = [(128, 32), (256, 16), (512, 8)]
QUICK_INPUTS = [(16, 8), (32, 4)]


PATHS = ("array", "glue")


def _glue_or_array(path):
    return common.array_code() if path == "array" else contextlib.nullcontext()


def _cases(batch, inputs, kern, rng):
    """(op, input text, run) per op and shape: ``run("array")`` and ``run("glue")`` make the
    same call with the glue off and on, and return a tuple of arrays."""
    xp = backend.xp()
    cases = []
    for c, h in inputs:
        x = xp.asarray(rng.standard_normal((batch, c, h, h)).astype(np.float32))
        # the patch gradient as conv2d_backward hands it: the transpose of a product (F-ordered)
        cols = xp.asarray(rng.standard_normal((c * 9, batch * h * h)).astype(np.float32)).T
        shape = f"{batch}x{c}x{h}x{h}"

        def im2col(p, x=x):
            with _glue_or_array(p):
                return (F.im2col(x, 3, 3, 1, 1),)

        def col2im(p, cols=cols, s=x.shape):
            with _glue_or_array(p):
                return (F.col2im(cols, s, 3, 3, 1, 1),)

        def pack(p, x=x):  # the two ways binary.xnor_conv2d builds its packed patches
            if p == "array":
                return (kern.pack_rows(binary.conv_sign_patches(x, 3, 3, 1, 1)),)
            return (backend.conv_kernels().pack_sign_patches(x, 3, 3, 1, 1),)

        cases += [("im2col", shape, im2col), ("col2im", shape, col2im),
                  ("pack_sign_patches", shape, pack)]
    for c, h in inputs:
        x = xp.asarray(rng.standard_normal((batch, c, h, h)).astype(np.float32))
        shape = f"{batch}x{c}x{h}x{h}"
        pools = {}
        for p in PATHS:  # each path's backward gets its own forward's arg
            with _glue_or_array(p):
                pools[p] = F.MaxPool2d()
                best = pools[p].forward(x, 2, 2)
        g = xp.asarray(rng.standard_normal(best.shape).astype(np.float32))

        def forward(p, x=x):
            with _glue_or_array(p):
                pool = F.MaxPool2d()
                return pool.forward(x, 2, 2), pool.saved[0]

        def backward(p, pools=pools, g=g):
            with _glue_or_array(p):
                return pools[p].backward(g)

        cases += [("max_pool2d", shape, forward), ("max_pool2d_backward", shape, backward)]
    return cases


def bench_backend(name, batch, repeats, inputs, seed=0):
    """Rows {backend, op, shape, array_ms, glue_ms, ratio} for backend ``name``: medians of
    ``repeats`` timed calls per path after a checked warm-up, the paths taking turns."""
    rows = []
    with backend.use(name):
        glue = backend.conv_kernels()
        cases = _cases(batch, inputs, backend.kernel_module(), np.random.default_rng(seed))
        for op, shape, run in cases:
            if not hasattr(glue, op):
                continue
            for a, b in zip(run("array"), run("glue")):
                assert a.dtype == b.dtype and np.array_equal(backend.to_numpy(a),
                                                             backend.to_numpy(b)), (op, shape)
            times = {p: [] for p in PATHS}
            for _ in range(repeats):
                for p in PATHS:
                    t0 = time.perf_counter()
                    run(p)
                    backend.synchronize()
                    times[p].append(time.perf_counter() - t0)
            array_s, glue_s = (float(np.median(times[p])) for p in PATHS)
            rows.append(dict(backend=name, op=op, shape=shape, array_ms=1e3 * array_s,
                             glue_ms=1e3 * glue_s, ratio=array_s / glue_s, exact=True))
    return rows


def print_table(rows):
    head = f"{'backend':<7} {'op':<20} {'input':<16} {'array ms':>9} {'glue ms':>9} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<7} {r['op']:<20} {r['shape']:<16} {r['array_ms']:9.3f} "
              f"{r['glue_ms']:9.3f} {r['ratio']:6.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and batch: a smoke run")
    p.add_argument("--backends", default=None,
                   help="comma-separated, from numba, cupy (default: those available)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (50, quick 4)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None,
                   help="folder for the JSON (default benchmarks/results, with --quick "
                        "benchmarks/results/quick, which git ignores)")
    args = p.parse_args(argv)
    batch = args.batch or (4 if args.quick else 50)
    if batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be positive")
    available = backend.available()
    names = (args.backends.split(",") if args.backends
             else [n for n in ("numba", "cupy") if available[n] is None])
    for n in names:
        if n not in ("numba", "cupy"):
            p.error(f"--backends: {n!r} has no compiled glue; expected numba or cupy")
        if available[n] is not None:
            p.error(f"--backends: {available[n]}")
    rows = []
    for n in names:
        rows += bench_backend(n, batch, args.repeats, QUICK_INPUTS if args.quick else INPUTS)
    use_gpu = "cupy" in names
    print(f"convolution glue, array code vs compiled, batch {batch}, CPU {common.cpu_model()}")
    print_table(rows)
    out = common.results_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"conv_glue_{'gpu' if use_gpu else 'cpu'}{'_quick' if args.quick else ''}"
    result = dict(machine=common.machine_info(use_gpu), batch=batch, repeats=args.repeats,
                  rows=rows, note="every glue result checked equal to the array code's")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / (stem + '.json')}")
    return result


if __name__ == "__main__":
    main()
