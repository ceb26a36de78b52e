"""Training speed: images per second of one Adam training step, minibnn on every available
backend beside the same network in PyTorch (when importable), side by side in one run.

Networks (``minibnn.models``; the paper is Courbariaux et al. 2016, arXiv:1602.02830):

* ``mlp512``, ``mlp1024``: the MNIST MLP at 3 x 512 and 3 x 1024 with dropout 0.2 / 0.5,
  batch 100 (the CPU sizes of the issue's PyTorch CPU anchor);
* ``mlp4096``: the paper's MNIST MLP, 3 x 4096, dropout 0.2 / 0.5, batch 100;
* ``mlp512nd``: 3 x 512 without dropout, batch 100: the CLI's default MNIST run, where the
  hidden layers' forward runs on the XNOR kernel in training too;
* ``mnist_convnet``: the small MNIST ConvNet (2x16C3-MP2-2x32C3-MP2-256FC), batch 100;
* ``cifar10_convnet``: the paper's CIFAR-10 ConvNet, batch 50.

On the GPU minibnn runs three ways: ``minibnn cupy array code`` (the fused kernels off: the
readable array code, one CuPy call per line), ``minibnn cupy`` (fused kernels: the step as
``train.train_epoch`` runs it eagerly) and ``minibnn cupy graph`` (``graphs.GraphedStep``:
the same step captured once and replayed as one CUDA graph); ``minibnn cupy bf16`` and
``minibnn cupy graph bf16`` are the last two with ``backend.bf16_backward`` on (the binary
layers' backward products with a +-1 operand as three exact bf16 GEMMs on the tensor cores,
``backend.split_matmul_pm1``; it changes only layers marked ``binary_input=True``, so in the
dropout MLPs, whose hidden layers take scaled signs in training, those rows are the plain
ones again).

Paths: ``minibnn <backend>`` runs ``train.train_step`` (forward, backward, Adam with the
Glorot ``lr_scale``, clip) on synthetic batches of the right shape; ``torch <device> eager``
the PyTorch twin of the same model (``torch_bnn.py``: same layers, sizes, sign and
straight-through estimator, BN, dropout, squared hinge, per-layer Adam scale and clip) and,
on a GPU, ``torch cuda graph`` the same step captured as one CUDA graph. Each path runs
``--steps`` steps per repeat after a warm-up; the paths take turns within each repeat so
that load from other jobs spreads over all of them; figures are medians over repeats.
Reported: seconds per step, images/s, seconds per 50,000-image epoch, the ratio to the
PyTorch path of the same device, and peak GPU memory where there is a GPU.

    python benchmarks/bench_train.py [--quick] [--nets mlp512,mnist_convnet]
        [--backends numpy,numba] [--steps 5] [--repeats 5] [--no-torch] [--out DIR]

Results: benchmarks/results/train_{cpu,gpu}.{json,png}; ``--quick`` (a few steps of the
small nets, under a minute on 2 cores) writes to benchmarks/results/quick/ instead, which
git ignores, so a quick run never overwrites the recorded results.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# before NumPy loads OpenBLAS, as ``import minibnn`` first would (see minibnn/__init__.py:
# OpenBLAS's threads otherwise spin on the cores numba's kernels need); PyTorch uses MKL
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import minibnn as bnn  # noqa: E402
from minibnn import backend, losses, models, optim, train  # noqa: E402


#: name -> (builder(rng), input shape, batch size)
NETS = {
    "mlp512": (lambda rng: models.mnist_mlp(hidden=512, rng=rng), (784,), 100),
    "mlp1024": (lambda rng: models.mnist_mlp(hidden=1024, rng=rng), (784,), 100),
    "mlp4096": (lambda rng: models.mnist_mlp(hidden=4096, rng=rng), (784,), 100),
    "mlp512nd": (lambda rng: models.mnist_mlp(hidden=512, dropout_in=0, dropout_hidden=0,
                                              rng=rng), (784,), 100),
    "mnist_convnet": (lambda rng: models.mnist_convnet(rng=rng), (1, 28, 28), 100),
    "cifar10_convnet": (lambda rng: models.cifar10_convnet(rng=rng), (3, 32, 32), 50),
}
CPU_NETS = ["mlp512", "mlp1024", "mlp512nd", "mnist_convnet"]
GPU_NETS = ["mlp4096", "cifar10_convnet"]
QUICK_NETS = ["mlp512", "mnist_convnet"]
EPOCH_IMAGES = 50_000
LR = 1e-3


def _batches(shape, batch, count, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, (batch,) + shape).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(count)]


def _minibnn_path(net, name, steps, mode="eager"):
    """A callable running ``steps`` training steps on backend ``name``.

    mode: "eager" (``train.train_step`` as ``train.train_epoch`` runs it: labels checked
    once, NaN checks read with the loss), "array" (the same on the GPU with the fused
    kernels off: the array code, many launches), "graph" (``graphs.GraphedStep``: the step
    replayed as one CUDA graph), "bf16" and "graph_bf16" ("eager" and "graph" with the
    split bf16 backward products, ``backend.using_bf16_backward("cupy")``)."""
    import contextlib
    from minibnn import binary, graphs
    build, shape, batch = NETS[net]
    with backend.use(name):
        model = build(bnn.seed(0))
        opt = optim.Adam(model.parameters(), lr=LR)
        data = [(backend.asarray(x), backend.asarray(y)) for x, y in _batches(shape, batch, steps)]
        graphed = None
        if mode.startswith("graph"):
            why = graphs.unsupported(model, opt)
            graphed = why if why else graphs.GraphedStep(model, opt, losses.squared_hinge)

    def context():
        if mode.endswith("bf16"):
            return backend.using_bf16_backward("cupy")
        if mode != "array":
            return contextlib.nullcontext()
        from minibnn.kernels import cupy_fused
        return cupy_fused.disabled()

    def run():
        if isinstance(graphed, str):
            raise RuntimeError(f"no CUDA graph here: {graphed}")
        with backend.use(name), context(), binary.deferring_nan_checks(), losses.labels_checked():
            for x, y in data:
                if graphed is None:
                    loss, _ = train.train_step(model, opt, losses.squared_hinge, x, y)
                else:
                    loss, _ = graphed(x, y)
            if name == "cupy":
                import cupy
                cupy.cuda.Device().synchronize()
            if graphed is not None and graphed.reason is not None:
                raise RuntimeError(f"CUDA graph capture failed: {graphed.reason}")
            return float(loss.item())

    return run


def _torch_path(net, device, graph, steps):
    import torch
    import torch_bnn
    build, shape, batch = NETS[net]
    with backend.use("numpy"):
        model = build(bnn.seed(0))
    trainer = torch_bnn.TorchTrainer(model, lr=LR, device=device, graph=graph)
    data = [(torch.as_tensor(x, device=device), torch.as_tensor(y, device=device))
            for x, y in _batches(shape, batch, steps)]

    def run():
        for x, y in data:
            loss = trainer.step(x, y)
        trainer.sync()
        return float(loss.item())

    return run


def _torch_devices():
    """[(label, device, graph)] of the PyTorch paths this machine can run, or [] without it."""
    try:
        import torch
    except ImportError:
        return []
    out = [("torch cpu eager", "cpu", False)]
    if torch.cuda.is_available():
        out += [("torch cuda eager", "cuda", False), ("torch cuda graph", "cuda", True)]
    return out


def measure(net, backends, steps, repeats, use_torch, log=print):
    """Rows {net, path, device, step_s, images_per_s, epoch_s, ...} for one network."""
    paths = {}
    for name in backends:
        if name != "cupy":
            paths[f"minibnn {name}"] = ("cpu", _minibnn_path(net, name, steps))
            continue
        paths["minibnn cupy array code"] = ("cuda", _minibnn_path(net, name, steps, "array"))
        paths["minibnn cupy"] = ("cuda", _minibnn_path(net, name, steps))
        paths["minibnn cupy graph"] = ("cuda", _minibnn_path(net, name, steps, "graph"))
        paths["minibnn cupy bf16"] = ("cuda", _minibnn_path(net, name, steps, "bf16"))
        paths["minibnn cupy graph bf16"] = ("cuda", _minibnn_path(net, name, steps, "graph_bf16"))
    if use_torch:
        for label, device, graph in _torch_devices():
            if device == "cpu" and net in GPU_NETS and "cupy" in backends:
                continue  # the GPU nets on a GPU machine: no CPU anchor needed
            paths[label] = (device, _torch_path(net, device, graph, steps))
    times = {label: [] for label in paths}
    for label, (_, run) in list(paths.items()):
        try:
            run()  # warm-up: compiles, allocates, captures
        except Exception as exc:  # noqa: BLE001  (one path failing must not lose the others)
            log(f"  {label}: left out ({type(exc).__name__}: {exc})")
            del paths[label], times[label]
    for _ in range(repeats):
        for label, (_, run) in paths.items():
            t0 = time.perf_counter()
            run()
            times[label].append((time.perf_counter() - t0) / steps)
    batch = NETS[net][2]
    rows = []
    for label, (device, _) in paths.items():
        step = float(np.median(times[label]))
        rows.append(dict(net=net, path=label, device=device, batch=batch, step_s=step,
                         images_per_s=batch / step, epoch_s=EPOCH_IMAGES * step / batch,
                         all_step_s=[float(t) for t in times[label]]))
    for r in rows:  # ratio to PyTorch eager on the same device, in this run
        anchor = [a for a in rows if a["path"] == f"torch {r['device']} eager"]
        r["vs_torch_eager"] = anchor[0]["step_s"] / r["step_s"] if anchor else None
    return rows


def _peak_gpu_memory():
    out = {}
    if backend.available()["cupy"] is None:
        import cupy
        out["cupy_pool_total_bytes"] = int(cupy.get_default_memory_pool().total_bytes())
    try:
        import torch
        if torch.cuda.is_available():
            out["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small nets, few steps (< 1 minute)")
    ap.add_argument("--nets", help=f"comma-separated, from {', '.join(NETS)}")
    ap.add_argument("--backends", help="comma-separated minibnn backends (default: all available)")
    ap.add_argument("--steps", type=int, default=None, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true", help="leave the PyTorch anchor out")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    common.start_numba_threads()

    usable = [n for n, why in backend.available().items() if why is None]
    backends = args.backends.split(",") if args.backends else usable
    for name in backends:
        if name not in backend.NAMES:
            ap.error(f"--backends: unknown backend {name!r}; expected {', '.join(backend.NAMES)}")
        if name not in usable:
            ap.error(f"--backends: {backend.available()[name]}")
    gpu = "cupy" in backends
    nets = (args.nets.split(",") if args.nets else
            QUICK_NETS if args.quick else GPU_NETS + ["mlp512nd"] if gpu else CPU_NETS)
    for net in nets:
        if net not in NETS:
            ap.error(f"--nets: unknown network {net!r}; expected {', '.join(NETS)}")
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 5)
    out_dir = common.results_dir(args.out, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)

    info = common.machine_info(gpu, backends=backends, steps=steps, repeats=repeats)
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    print(f"# {info['cpu']}, {info['cores']} cores" + (f", {info.get('gpu')}" if gpu else "")
          + f"; load average at start {info['load_average_at_start']}")
    rows = []
    for net in nets:
        rows += measure(net, backends, steps, repeats, not args.no_torch)
        print(f"\n{net} (batch {NETS[net][2]}, {steps} steps x {repeats} repeats, median)")
        print(f"{'path':<24}{'ms/step':>10}{'images/s':>11}{'s/epoch':>10}{'vs torch eager':>16}")
        for r in (r for r in rows if r["net"] == net):
            ratio = f"{r['vs_torch_eager']:.2f}x" if r["vs_torch_eager"] else "-"
            print(f"{r['path']:<24}{1e3 * r['step_s']:>10.1f}{r['images_per_s']:>11.0f}"
                  f"{r['epoch_s']:>10.1f}{ratio:>16}")
    info["load_average_at_end"] = list(os.getloadavg())
    result = dict(machine=info, peak_gpu_memory=_peak_gpu_memory() if gpu else None, rows=rows)
    stem = "train_gpu" if gpu else "train_cpu"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    common.grouped_bars(rows, "net", "path", "images_per_s", out_dir / f"{stem}.png",
                        xlabel=lambda n: f"{n}\n(batch {NETS[n][2]})", ylabel="images / s",
                        title=f"Training throughput, {info['cpu']}",
                        annotate=lambda r: f"{r['images_per_s']:.0f}")
    return result


if __name__ == "__main__":
    main()
