"""Make the figures of docs/tour.md and the numbers behind them.

    python docs/make_figures.py            # the real run: under a minute on 2 idle cores
    python docs/make_figures.py --quick    # a smoke run (seconds), into docs/figures/quick/

Writes into ``docs/figures/`` (or ``--out``):

* ``ste.png``: sign(x), Htanh(x) and the gradient 1{|x| <= 1} that the straight-through
  estimator passes, all computed by the library (``binary.sign_ste``, ``F.hardtanh``);
* ``flips.png``: per epoch and per layer, the fraction of latent weights whose sign
  changed, in a short MNIST run of ``models.mnist_mlp`` driven by ``train.train_step``;
* ``curves.png``: training and validation error of the same run;
* ``roofline.png``: achieved ops/s (2 per multiply-accumulate) of the Numba XNOR GEMM
  (every kernel of ``kernels.numba_cpu.available_kernels()``) and of NumPy's float32
  matmul, with the XNOR rate on a tiny L1-resident problem as horizontal lines;
* ``figures.json``: the machine and every number measured.

Timings are best-of-n wall-clock times on whatever else the machine is doing; the load
average before and after is written to figures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's minibnn and kernels, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/common.py: cpu_model

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("make_figures.py needs matplotlib: pip install 'minibnn[plot]'")

import numba  # noqa: E402

from common import cpu_model  # noqa: E402
from minibnn.kernels import numba_cpu  # noqa: E402
from minibnn import Tensor, backend, binary, data, registry, train  # noqa: E402
from minibnn import functional as F  # noqa: E402
from minibnn import models, nn  # noqa: E402

DPI = 96
FULL = dict(hidden=256, layers=3, train_limit=20000, epochs=10, seed=0,
            gemm_shapes=[(100, 4096, 4096), (512, 512, 512), (1024, 1024, 1024),
                         (2048, 2048, 2048)],
            tiny_shapes=[(64, 64, 2048), (128, 64, 1024), (128, 32, 2048)],
            budget_s=2.0)
QUICK = dict(hidden=64, layers=2, train_limit=2000, epochs=2, seed=0,
             gemm_shapes=[(100, 1024, 1024), (256, 256, 256)],
             tiny_shapes=[(64, 64, 2048)], budget_s=0.1)


# ----------------------------------------------------------------------------- the machine

def machine_info():
    return dict(cpu=cpu_model(), logical_cpus=os.cpu_count(),
                numba_threads=numba.get_num_threads(), python=platform.python_version(),
                numpy=np.__version__, numba=numba.__version__,
                matplotlib=matplotlib.__version__, platform=platform.platform(),
                loadavg_start=_loadavg())


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------- (a) the STE

def fig_ste(out):
    """sign and Htanh forward; the STE's backward, from the library's own ops."""
    x = np.linspace(-2.5, 2.5, 1001, dtype=np.float32)
    xs = Tensor(x, requires_grad=True)
    q = binary.sign_ste(xs)
    q.backward(np.ones_like(x))
    xh = Tensor(x, requires_grad=True)
    h = F.hardtanh(xh)
    h.backward(np.ones_like(x))
    # the gradients as NumPy arrays (copied from the GPU when MINIBNN_BACKEND is cupy)
    g_ste, g_htanh = backend.to_numpy(xs.grad), backend.to_numpy(xh.grad)
    assert np.array_equal(g_ste, g_htanh), "STE gradient differs from Htanh's derivative"

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), sharex=True)
    left.plot(x, q.numpy(), label="sign(x)  (forward; sign(0) = +1)", lw=2)
    left.plot(x, h.numpy(), "--", label="Htanh(x) = clip(x, -1, 1)", lw=2)
    left.set_title("forward")
    left.legend(loc="upper left", fontsize=8)
    right.plot(x, g_ste, lw=2, color="C2", label="STE: g * 1{|x| <= 1}")
    right.axhline(0, color="C3", lw=1, ls=":", label="d sign / dx (0 almost everywhere)")
    right.set_ylim(-0.15, 1.3)
    right.set_title("backward: gradient passed per unit of g")
    right.legend(loc="upper left", fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ste.png", dpi=DPI)
    plt.close(fig)
    inside = np.abs(x) <= 1
    return dict(points=int(x.size), gradient_inside=float(g_ste[inside].min()),
                gradient_outside=float(g_ste[~inside].max()))


# ------------------------------------------------- (b, c) sign flips and learning curves

def run_training(p, log):
    """Train ``mnist_mlp`` with the library's default recipe (TrainConfig: Adam 3e-3 ->
    3e-5, squared hinge, batch 100, no dropout) on the first ``train_limit`` MNIST
    images, one ``train.train_step`` at a time, counting latent-weight sign flips."""
    cfg = train.TrainConfig(hidden=p["hidden"], layers=p["layers"], epochs=p["epochs"],
                            train_limit=p["train_limit"], seed=p["seed"]).validate()
    tx, ty, vx, vy, sx, sy = train.prepare_data(cfg)
    rng = np.random.default_rng(cfg.seed)
    model = models.build(cfg.model_config(), rng=rng)
    opt = registry.lookup("optimizer", cfg.optimizer)(model.parameters(), lr=cfg.lr_start)
    loss_fn = registry.lookup("loss", cfg.loss)
    schedule = cfg.schedule_fn()
    layers = [m for m in model.modules() if isinstance(m, nn.BinaryLinear)]
    names = [f"layer {i + 1} ({l.in_features}->{l.out_features})" for i, l in enumerate(layers)]

    def signs():
        return [backend.to_numpy(l.weight.data) >= 0 for l in layers]  # sign(0) = +1

    history = []
    for epoch in range(cfg.epochs):
        opt.lr = schedule(epoch)
        model.train()
        start = signs()
        current = [s.copy() for s in start]
        events = np.zeros(len(layers), np.int64)
        loss_sum, wrong, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        for idx in data.batches(len(tx), cfg.batch_size, rng=rng):
            yb = ty[idx]
            loss, scores = train.train_step(model, opt, loss_fn, backend.asarray(tx[idx]),
                                            backend.asarray(yb))
            now = signs()
            events += [np.count_nonzero(a != b) for a, b in zip(now, current)]
            current = now
            loss_sum += float(loss.item()) * len(idx)
            wrong += int((backend.to_numpy(scores.data).argmax(axis=1) != yb).sum())
            seen += len(idx)
        seconds = time.perf_counter() - t0
        sizes = np.array([s.size for s in start])
        latent = [backend.to_numpy(l.weight.data) for l in layers]
        row = dict(epoch=epoch + 1, lr=opt.lr, seconds=round(seconds, 2),
                   train_loss=loss_sum / seen, train_error=wrong / seen,
                   valid_error=train.error_rate(model, vx, vy),
                   test_error=train.error_rate(model, sx, sy),
                   net_flip_fraction=[float(np.mean(a != b)) for a, b in zip(current, start)],
                   flip_events_per_weight=(events / sizes).tolist(),
                   at_clip_fraction=[float(np.mean(np.abs(w) >= 1.0)) for w in latent])
        history.append(row)
        log(f"epoch {row['epoch']:2d}  train {100 * row['train_error']:5.2f}%  valid "
            f"{100 * row['valid_error']:5.2f}%  net flips "
            + " ".join(f"{f:.4f}" for f in row["net_flip_fraction"]) + f"  {seconds:.1f}s")
    best = min(history, key=lambda r: r["valid_error"])
    return dict(config=dict(hidden=cfg.hidden, layers=cfg.layers, epochs=cfg.epochs,
                            train_images=len(tx), valid_images=len(vx), test_images=len(sx),
                            batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                            lr_start=cfg.lr_start, lr_end=cfg.lr_end, loss=cfg.loss,
                            bn=cfg.bn, seed=cfg.seed, backend=backend.active()),
                layers=names, history=history,
                best=dict(epoch=best["epoch"], valid_error=best["valid_error"],
                          test_error=best["test_error"]))


def fig_flips(run, out, title_suffix):
    epochs = [r["epoch"] for r in run["history"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, name in enumerate(run["layers"]):
        net = [r["net_flip_fraction"][i] for r in run["history"]]
        ev = [r["flip_events_per_weight"][i] for r in run["history"]]
        ax.plot(epochs, net, "o-", color=f"C{i}", label=name)
        ax.plot(epochs, ev, ":", color=f"C{i}", alpha=0.7)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of latent weights")
    ax.set_title("sign changes per epoch: solid = sign differs from epoch start,\n"
                 "dotted = flips counted after every step" + title_suffix, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "flips.png", dpi=DPI)
    plt.close(fig)


def fig_curves(run, out, title_suffix):
    h = run["history"]
    epochs = [r["epoch"] for r in h]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(epochs, [100 * r["train_error"] for r in h], "o-", label="training (during the epoch)")
    ax.plot(epochs, [100 * r["valid_error"] for r in h], "s-", label="validation (eval mode)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    c = run["config"]
    ax.set_title(f"mnist_mlp {c['layers']} x {c['hidden']}, {c['train_images']} training "
                 f"images, {c['optimizer']} {c['lr_start']:g} -> {c['lr_end']:g}" + title_suffix,
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=DPI)
    plt.close(fig)


# ----------------------------------------------------------------------- (d) GEMM roofline

def _best_time(fn, budget_s, min_reps=3, max_reps=200):
    """Best and median wall-clock seconds of ``fn()`` over repeats filling ``budget_s``
    (after one warm-up call, which also compiles)."""
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), len(times)


def _signs(rng, rows, k):
    return np.where(rng.random((rows, k)) < 0.5, np.float32(-1), np.float32(1))


def measure_gemm(p, log):
    """XNOR GEMM (each Numba kernel) and NumPy float32 matmul at each (M, N, K)."""
    rng = np.random.default_rng(0)
    kernels = list(numba_cpu.available_kernels())
    rows = []
    for m, n, k in p["gemm_shapes"]:
        a, b = _signs(rng, m, k), _signs(rng, n, k)
        pa, pb = numba_cpu.pack_rows(a), numba_cpu.pack_rows(b)
        bt = np.ascontiguousarray(b.T)
        ops = 2 * m * n * k
        row = dict(m=m, n=n, k=k, ops=ops)
        for name in kernels:
            best, med, reps = _best_time(lambda: numba_cpu.xnor_gemm(pa, pb, k, kernel=name),
                                         p["budget_s"])
            row[f"xnor_{name}"] = dict(best_s=best, median_s=med, reps=reps, ops_per_s=ops / best)
        best, med, reps = _best_time(lambda: a @ bt, p["budget_s"])
        row["numpy_float32"] = dict(best_s=best, median_s=med, reps=reps, ops_per_s=ops / best)
        rows.append(row)
        log(f"{m}x{n}x{k}: " + "  ".join(
            f"{key} {row[key]['ops_per_s'] / 1e9:.0f} Gops/s"
            for key in row if isinstance(row[key], dict)))

    # Tiny problems whose packed operands fit in one core's L1 data cache (per thread:
    # its half of A plus all of B is at most 24 KiB): the kernel's rate when no operand
    # comes from farther away. The fixed cost of a call is measured on a 4 x 4 x 64 product.
    tiny = {}
    for name in kernels:
        p1 = numba_cpu.pack_rows(_signs(rng, 4, 64))
        overhead, _, _ = _best_time(lambda: numba_cpu.xnor_gemm(p1, p1, 64, kernel=name), 0.2)
        best_rate, best_shape, best_s = 0.0, None, None
        for m, n, k in p["tiny_shapes"]:
            pa, pb = numba_cpu.pack_rows(_signs(rng, m, k)), numba_cpu.pack_rows(_signs(rng, n, k))
            t, _, _ = _best_time(lambda: numba_cpu.xnor_gemm(pa, pb, k, kernel=name),
                                 max(p["budget_s"], 0.3), max_reps=2000)
            if 2 * m * n * k / t > best_rate:
                best_rate, best_shape, best_s = 2 * m * n * k / t, (m, n, k), t
        m, n, k = best_shape
        # the rate with the fixed call cost taken out (None where noise makes it meaningless)
        net = 2 * m * n * k / (best_s - overhead) if best_s > 2 * overhead else None
        tiny[name] = dict(shape=list(best_shape), best_s=best_s, ops_per_s=best_rate,
                          call_overhead_s=overhead, ops_per_s_without_overhead=net)
        log(f"tiny L1-resident {m}x{n}x{k} ({name}): {best_rate / 1e9:.0f} Gops/s; a call "
            f"costs {overhead * 1e6:.0f} us"
            + (f" ({net / 1e9:.0f} Gops/s without it)" if net else ""))
    return dict(kernels=kernels, shapes=rows, tiny_l1=tiny)


def fig_roofline(gemm, machine, out):
    rows = gemm["shapes"]
    labels = [f"{r['m']}x{r['n']}x{r['k']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, name in enumerate(gemm["kernels"]):
        color = f"C{i}"
        ax.plot(x, [r[f"xnor_{name}"]["ops_per_s"] for r in rows], "o-", color=color,
                label=f"XNOR-popcount, numba '{name}'")
        t = gemm["tiny_l1"][name]
        ax.axhline(t["ops_per_s"], color=color, ls="--", lw=1,
                   label=f"'{name}' on a tiny L1-resident problem ({'x'.join(map(str, t['shape']))})")
        if t["ops_per_s_without_overhead"]:
            ax.axhline(t["ops_per_s_without_overhead"], color=color, ls=":", lw=1,
                       label=f"the same, less the {t['call_overhead_s'] * 1e6:.0f} us a call "
                             "costs (4x4x64)")
    ax.plot(x, [r["numpy_float32"]["ops_per_s"] for r in rows], "s-", color="k",
            label="NumPy float32 matmul")
    ax.set_yscale("log")
    ax.set_xticks(x, labels)
    ax.set_xlabel("M x N x K")
    ax.set_ylabel("ops/s (2 per multiply-accumulate)")
    ax.set_title(f"GEMM throughput on {machine['cpu']}, {machine['numba_threads']} threads",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    handles, names = ax.get_legend_handles_labels()
    per_kernel = len(handles) // len(gemm["kernels"]) if len(gemm["kernels"]) > 1 else len(handles)
    order = list(range(per_kernel)) + [len(handles) - 1] + list(range(per_kernel, len(handles) - 1))
    ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(2, len(gemm["kernels"])))
    fig.tight_layout()
    fig.savefig(out / "roofline.png", dpi=DPI)
    plt.close(fig)


# --------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small smoke run (a tiny model, 2 epochs, small GEMMs)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default docs/figures, or docs/figures/quick with --quick)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    out = args.out or Path(__file__).resolve().parent / ("figures/quick" if args.quick else "figures")
    out.mkdir(parents=True, exist_ok=True)
    suffix = " (--quick)" if args.quick else ""

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
          f"load {machine['loadavg_start']}", flush=True)
    result = dict(quick=bool(args.quick), machine=machine)
    result["ste"] = fig_ste(out)
    with backend.use("numpy"):
        result["training"] = run_training(p, lambda s: print(s, flush=True))
    fig_flips(result["training"], out, suffix)
    fig_curves(result["training"], out, suffix)
    result["gemm"] = measure_gemm(p, lambda s: print(s, flush=True))
    fig_roofline(result["gemm"], machine, out)
    machine["loadavg_end"] = _loadavg()
    result["runtime_s"] = round(time.perf_counter() - t_start, 1)
    (out / "figures.json").write_text(json.dumps(result, indent=1) + "\n")
    written = sorted(f.name for f in out.iterdir() if f.is_file() and not f.name.startswith("."))
    print(f"wrote {', '.join(written)} to {out} "
          f"in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
