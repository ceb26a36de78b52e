"""Classify the MNIST test set with the paper's MLP: float32 forward vs the frozen binary net.

The networks are the paper's permutation-invariant MLPs (Courbariaux et al. 2016,
arXiv:1602.02830, Section 2.1 and the run-time discussion of Section 3): 784 -> 3 x 4096
-> 10 and 784 -> 3 x 2048 -> 10. Their weights are random (timing does not depend on
training) but their batch norms carry statistics of real MNIST batches, so the integer
thresholds are the kind a trained net has. Each network runs

* "float32 numpy": the eval-mode forward as the model computes it, in plain NumPy
  float32 (BLAS matmul with the +-1 weights, batch norm, sign), from uint8 pixels;
* "frozen <backend>": ``deploy.freeze(model)`` on the numpy (reference), numba and cupy
  backends: bit planes of the uint8 input, XNOR-popcount GEMMs, integer thresholds,
  packed activations, one float affine at the end;
* "float32 cupy" (cuBLAS, TF32 off as CuPy's default) when the cupy backend runs.

Every figure is the median of --repeats runs after a warm-up; the paths take turns in
each repeat so that load from other work on the machine spreads over all of them. The
NumPy reference backend is timed on a subset of the images (it is the readable ground
truth, not a fast path) and its time is scaled to the full set; the table says so.
Predictions of each path are compared with the float32 forward on all images it ran.
Model sizes: float32 weights (4 bytes each) and the trained model's .npz against the
saved frozen .npz. Results go to benchmarks/results/inference_{cpu,gpu}[_quick].{json,png}.

    python benchmarks/bench_inference.py [--quick] [--repeats 5]
                                         [--backends numpy,numba,cupy] [--out DIR]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import minibnn  # noqa: E402
from minibnn import backend, data, deploy, models, nn  # noqa: E402
from minibnn.tensor import Tensor, no_grad  # noqa: E402

NETS = [(4096, 3), (2048, 3)]
QUICK_NETS = [(512, 3), (256, 2)]
QUICK_IMAGES = 1000
REFERENCE_IMAGES = 200  # the NumPy reference backend runs on this many images of big nets


# ----------------------------------------------------------------------------- the networks

def build(hidden, layers, train_images, seed=0):
    """The paper's MLP with random weights and batch-norm statistics from MNIST batches."""
    rng = np.random.default_rng(seed)
    model = models.mnist_mlp(hidden=hidden, layers=layers, rng=rng)
    bns = [l for l in model.layers if isinstance(l, (nn.BatchNorm, nn.ShiftBatchNorm))]
    for bn in bns:  # a trained net's gamma and beta are not 1 and 0
        bn.gamma.data[...] = rng.uniform(0.5, 1.5, bn.num_features) * np.where(
            rng.random(bn.num_features) < 0.1, -1, 1)
        bn.beta.data[...] = rng.normal(0, 0.3, bn.num_features)
        bn.momentum = 0.5
    model.train()
    with no_grad():
        for i in range(0, 2000, 500):
            model(Tensor(backend.asarray(data.to_pm1(train_images[i:i + 500]))))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


class Float32Net:
    """The model's eval-mode forward written out in NumPy (or CuPy) float32:
    h <- sign(BN(h W_b^T)) per hidden layer, scores = BN(h W_b^T), from uint8 pixels, with
    each batch norm as the model applies it in eval mode, ``BN(h) = a h + c``
    (``eval_affine``)."""

    def __init__(self, model, xp=np):
        self.xp = xp
        self.blocks = []
        layers = [l for l in model.layers if not isinstance(l, nn.Dropout)]
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.BinaryLinear):
                w = np.where(backend.to_numpy(layer.weight.data) >= 0, 1, -1).astype(np.float32)
                self.blocks.append(dict(w_t=xp.asarray(np.ascontiguousarray(w.T)), bn=None,
                                        sign=False))
            elif isinstance(layer, (nn.BatchNorm, nn.ShiftBatchNorm)):
                with no_grad():
                    a, c = layer.eval_affine()
                self.blocks[-1]["bn"] = [xp.asarray(backend.to_numpy(t.data), dtype=np.float32)
                                         for t in (a, c)]
            elif isinstance(layer, nn.Sign):
                self.blocks[-1]["sign"] = True
            else:
                raise ValueError(f"layer {i}: {type(layer).__name__} not supported here")

    def scores(self, x_uint8):
        xp = self.xp
        h = xp.asarray(data.to_pm1(x_uint8))  # (2x - 255) / 256, as the model sees it
        for b in self.blocks:
            h = h @ b["w_t"]
            if b["bn"] is not None:
                a, c = b["bn"]
                h *= a
                h += c
            if b["sign"]:
                h = xp.where(h >= 0, np.float32(1), np.float32(-1))
        return h

    def predict(self, x_uint8):
        return backend.to_numpy(self.scores(x_uint8).argmax(axis=1))

def layer_breakdown(frozen, images, name, repeats):
    """Seconds per 10,000 images spent in each stage of the frozen forward on one backend
    (timed on a batch of up to 1024 images, median of repeats)."""
    kern = backend.kernel_module(name)
    xp = backend.array_module(name)
    layers = frozen.layers_on(name)
    b = min(1024, len(images))
    x = xp.asarray(images[:b].reshape(b, -1))
    stages = {}

    def clock(key, fn):
        def run():
            out = fn()
            _sync(name)
            return out
        run()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            ts.append(time.perf_counter() - t0)
        stages[key] = float(np.median(ts)) * 10000 / b
        return out

    h = None
    for i, (layer, weight, threshold) in enumerate(layers):
        if i == 0:
            z = clock("layer 0: 8 bit planes, XNOR GEMM, shift-add",
                      lambda: deploy.first_layer(x, weight, layer.k, kern))
        else:
            z = clock(f"layer {i}: XNOR GEMM", lambda: kern.xnor_gemm(h, weight, layer.k))
        if threshold is not None:
            h = clock(f"layer {i}: threshold + pack", lambda: kern.pack_rows(z >= threshold))
    return stages


# ----------------------------------------------------------------------------- timing

def _sync(name):
    if name == "cupy":
        backend.array_module("cupy").cuda.Device().synchronize()


def time_round_robin(paths, repeats):
    """paths: name -> (fn, backend for sync). Warm up each, then time them in turns."""
    times = {name: [] for name in paths}
    for name, (fn, bk) in paths.items():
        fn()
        _sync(bk)
    for _ in range(repeats):
        for name, (fn, bk) in paths.items():
            t0 = time.perf_counter()
            fn()
            _sync(bk)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def machine_info(use_gpu):
    return common.machine_info(use_gpu, minibnn=minibnn.__version__)

def file_sizes(model, frozen, tmp):
    """Bytes: float32 weights, the trained model's .npz (models.save_model), the frozen .npz."""
    n_weights = sum(l.weight.data.size for l in model.layers if isinstance(l, nn.BinaryLinear))
    model_path, frozen_path = Path(tmp) / "model.npz", Path(tmp) / "frozen.npz"
    models.save_model(model_path, model)
    frozen.save(frozen_path)
    sizes = dict(float32_weights=4 * n_weights, model_npz=model_path.stat().st_size,
                 frozen_npz=frozen_path.stat().st_size)
    sizes["ratio_float32_weights"] = sizes["float32_weights"] / sizes["frozen_npz"]
    sizes["ratio_model_npz"] = sizes["model_npz"] / sizes["frozen_npz"]
    back = deploy.load(frozen_path)  # what is timed below is what the file holds
    model_path.unlink()
    frozen_path.unlink()
    return sizes, back


def bench_net(hidden, layers, images, train_images, backends, repeats, quick):
    label = f"{layers}x{hidden}"
    print(f"\n== {label} MLP: building, freezing ...", flush=True)
    model = build(hidden, layers, train_images)
    with tempfile.TemporaryDirectory() as tmp:
        sizes, frozen = file_sizes(model, deploy.freeze(model), tmp)
    n = len(images)
    float_net = Float32Net(model)
    reference = float_net.predict(images)
    paths = {"float32 numpy": (lambda: float_net.predict(images), "numpy")}
    counts = {"float32 numpy": n}
    if "numba" in backends:
        paths["frozen numba"] = (lambda: frozen.predict(images, backend="numba"), "numba")
        counts["frozen numba"] = n
    if "numpy" in backends:
        subset = images[:n if quick else min(n, REFERENCE_IMAGES)]
        counts["frozen numpy"] = len(subset)
        paths["frozen numpy"] = (lambda: frozen.predict(subset, backend="numpy"), "numpy")
    if "cupy" in backends:
        gpu_net = Float32Net(model, xp=backend.array_module("cupy"))
        paths["float32 cupy"] = (lambda: gpu_net.predict(images), "cupy")
        paths["frozen cupy"] = (lambda: frozen.predict(images, backend="cupy"), "cupy")
        counts["float32 cupy"] = counts["frozen cupy"] = n
    print(f"   timing {', '.join(paths)} on {n} images, {repeats} repeats", flush=True)
    times = time_round_robin(paths, repeats)
    rows = []
    for name, (fn, _) in paths.items():
        pred = fn()
        m = counts[name]
        differ = np.flatnonzero(pred != reference[:m])
        notes = [] if m == n else [f"timed on {m} images, scaled to {n}"]
        if len(differ):
            notes.append(f"{len(differ)} predictions differ from float32")
        t_full = times[name] * n / m
        rows.append(dict(net=label, path=name, images_timed=m, seconds=times[name],
                         seconds_full_set=t_full, images_per_second=m / times[name],
                         agree_with_float32=m - len(differ), compared=m,
                         differing_images=differ.tolist(), note="; ".join(notes)))
    base = {r["path"]: r["seconds_full_set"] for r in rows}
    for r in rows:
        ref = "float32 cupy" if r["path"].endswith("cupy") else "float32 numpy"
        r["speedup_vs_float32"] = base[ref] / r["seconds_full_set"]
        r["baseline"] = ref
    s = minibnn.summary(frozen)
    ms = minibnn.summary(model)
    extra = dict(frozen_binary_macs=s.totals["binary_macs"],
                 float32_macs=ms.totals["binary_macs"] + ms.totals["float_macs"],
                 float32_adjusted_thresholds=frozen.info["float32_adjusted"])
    for name in ("numba", "cupy"):
        if name in backends:
            extra[f"breakdown_{name}"] = layer_breakdown(frozen, images, name, repeats)
    return rows, dict(net=label, **sizes, **extra), s


def print_table(rows, sizes, n):
    head = ["net", "path", f"s / {n} img", "img/s", "speed-up", "agree", "note"]
    body = [[r["net"], r["path"], f"{r['seconds_full_set']:.3f}",
             f"{r['images_per_second']:,.0f}",
             f"{r['speedup_vs_float32']:.2f}x vs {r['baseline']}",
             f"{r['agree_with_float32']}/{r['compared']}", r["note"]] for r in rows]
    widths = [max(len(str(c[i])) for c in body + [head]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(c, widths)).rstrip()
             for c in [head] + body]
    lines.insert(1, "-" * max(len(l) for l in lines))
    print("\n".join(lines))
    print()
    for s in sizes:
        for key in ("breakdown_numba", "breakdown_cupy"):
            if key in s:
                total = sum(s[key].values())
                print(f"{s['net']} frozen {key[10:]}, s per 10000 images by stage (batch 1024): "
                      + ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)"
                                  for k, v in s[key].items()))
        print(f"{s['net']}: float32 weights {s['float32_weights'] / 2**20:.2f} MiB, trained "
              f"model.npz {s['model_npz'] / 2**20:.2f} MiB, frozen .npz "
              f"{s['frozen_npz'] / 2**20:.2f} MiB -> {s['ratio_float32_weights']:.1f}x smaller "
              f"than the float32 weights ({s['ratio_model_npz']:.1f}x than model.npz); "
              f"MACs/image: {s['frozen_binary_macs']:,} binary (frozen) vs "
              f"{s['float32_macs']:,} float32")
    return "\n".join(lines)


def plot(rows, path):
    common.grouped_bars(rows, "net", "path", "images_per_second", path,
                        xlabel=lambda net: f"{net} MLP", ylabel="MNIST test images / s",
                        title="Inference: float32 forward vs frozen BNN (label: speed-up "
                              "vs float32)",
                        annotate=lambda r: f"{r['speedup_vs_float32']:.1f}x")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small nets {QUICK_NETS} on {QUICK_IMAGES} images, for a smoke test")
    p.add_argument("--backends", default="numpy,numba,cupy",
                   help="frozen-net backends, comma list from numpy,numba,cupy (the float32 "
                        "NumPy forward always runs; cupy adds the cuBLAS float32 forward)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    backends = {s.strip() for s in args.backends.split(",") if s.strip()}
    unknown = backends - set(backend.NAMES)
    if unknown:
        p.error(f"unknown backends: {sorted(unknown)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    why = backend.available()
    for name in sorted(backends):
        if why[name] is not None:
            print(f"{name} backend skipped: {why[name]}")
            backends.discard(name)
    use_gpu = "cupy" in backends
    mnist = data.load_mnist()
    images = mnist.test_images[:QUICK_IMAGES] if args.quick else mnist.test_images
    info = machine_info(use_gpu)
    print(json.dumps(info))
    rows, sizes, summaries = [], [], []
    for hidden, layers in (QUICK_NETS if args.quick else NETS):
        r, s, summ = bench_net(hidden, layers, images, mnist.train_images, backends,
                               args.repeats, args.quick)
        rows += r
        sizes.append(s)
        summaries.append(summ)
    print()
    print(summaries[0])
    print()
    table = print_table(rows, sizes, len(images))
    info["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("inference_gpu" if use_gpu else "inference_cpu") + ("_quick" if args.quick else "")
    notes = [
        "Median of --repeats runs after a warm-up; paths take turns within each repeat.",
        "The machine may be shared: load_average_at_start/end show other work, which skews "
        "absolute times and, less so, the ratios.",
        "The frozen first layer costs 8 binary MACs per float MAC (one per input bit plane).",
        "Predictions are compared with the float32 forward of the same network (each batch "
        "norm as the model's eval_affine applies it); the frozen numpy reference path runs "
        "on a subset of big nets (see images_timed). freeze follows that float32 batch norm "
        "where rounding moves a threshold, so every image should agree; rows' "
        "'differing_images' lists any that do not.",
    ]
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": info, "repeats": args.repeats, "images": len(images), "results": rows,
         "model_sizes": sizes, "notes": notes, "table": table,
         "frozen_summary": str(summaries[0])}, indent=1))
    print(f"wrote {out / (stem + '.json')}")
    plot(rows, out / f"{stem}.png")


if __name__ == "__main__":
    main()
