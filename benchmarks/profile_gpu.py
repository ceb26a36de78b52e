"""Where a GPU training step's time goes: the CUDA kernels of one step, by name, for minibnn
on CuPy beside the same network in PyTorch eager (``bench_train.py`` times whole steps; this
script says which kernels make the difference).

The kernels are recorded with PyTorch's profiler (``torch.profiler``, CUPTI's kernel
activity records), which sees every kernel the process launches, CuPy's too. For each
network and path it runs a warm-up, then ``--steps`` steps under the profiler, and prints
the kernels by their total GPU time per step (microseconds per step, launches per step, the
share of the step's kernel time), with the sum of all kernels beside the step's wall time:
where the wall time is much larger than the kernel sum, the GPU waits on the host (launch
overhead, synchronisation); where the two are close, the kernels themselves are the cost.

Paths: ``minibnn cupy`` (``train.train_step`` as training runs it), ``minibnn cupy bf16``
(the split bf16 backward products on), ``torch cuda eager`` (``torch_bnn.py``'s twin).

    python benchmarks/profile_gpu.py [--nets cifar10_convnet,mlp4096] [--steps 10] [--top 25]
        [--out DIR]

Needs a GPU, CuPy and PyTorch. Writes ``profile_gpu.json`` to ``--out`` (default
benchmarks/results/quick/, which git ignores: a profile is a diagnosis, not a result).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (its networks, batches and paths)
import common  # noqa: E402


def _kernel_table(prof, steps):
    """[(name, us_per_step, launches_per_step)] of the GPU kernels and copies recorded."""
    totals = {}
    for ev in prof.events():
        dev = getattr(ev, "device_type", None)
        if dev is None or "CUDA" not in str(dev):
            continue
        us = ev.time_range.elapsed_us()  # a kernel's (or copy's) own duration
        name = ev.name if len(ev.name) <= 120 else ev.name[:117] + "..."
        t, n = totals.get(name, (0.0, 0))
        totals[name] = (t + float(us), n + 1)
    rows = [(name, t / steps, n / steps) for name, (t, n) in totals.items()]
    rows.sort(key=lambda r: -r[1])
    return rows


def profile(net, label, run, steps, top, log=print):
    """Profile ``run`` (``steps`` steps per call) once after a warm-up; a dict for the JSON."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile
    run()  # warm-up: compiles, allocates
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    wall = (time.perf_counter() - t0) / steps
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = _kernel_table(prof, steps)
    if not rows:
        raise RuntimeError("the profiler recorded no GPU kernel (CUPTI unavailable?)")
    total = sum(r[1] for r in rows)
    launches = sum(r[2] for r in rows)
    log(f"\n{net} / {label}: wall {wall * 1e3:.2f} ms per step (unprofiled), kernels "
        f"{total / 1e3:.2f} ms per step in {launches:.0f} launches")
    log(f"  {'us/step':>9} {'n/step':>7} {'share':>6}  kernel")
    for name, us, n in rows[:top]:
        log(f"  {us:9.1f} {n:7.1f} {us / max(total, 1e-9):6.1%}  {name}")
    return dict(net=net, path=label, wall_ms_per_step=wall * 1e3,
                kernel_ms_per_step=total / 1e3, launches_per_step=launches,
                kernels=[dict(name=n, us_per_step=u, launches_per_step=c) for n, u, c in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default="cifar10_convnet,mlp4096")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        import torch
        import cupy
        del cupy  # imported only to say early that it is missing
    except ImportError as exc:
        sys.exit(f"profile_gpu.py needs PyTorch and CuPy: {exc}")
    if not torch.cuda.is_available():
        sys.exit("profile_gpu.py needs a CUDA GPU")
    out_dir = common.results_dir(args.out, quick=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = common.machine_info(True, steps=args.steps)
    results = []
    for net in args.nets.split(","):
        paths = [("minibnn cupy", bench_train._minibnn_path(net, "cupy", args.steps)),
                 ("minibnn cupy bf16", bench_train._minibnn_path(net, "cupy", args.steps, "bf16")),
                 ("torch cuda eager", bench_train._torch_path(net, "cuda", False, args.steps))]
        for label, run in paths:
            try:
                results.append(profile(net, label, run, args.steps, args.top))
            except Exception as exc:  # noqa: BLE001  (one path failing must not lose the rest)
                print(f"\n{net} / {label}: left out ({type(exc).__name__}: {exc})")
    path = out_dir / "profile_gpu.json"
    path.write_text(json.dumps(dict(machine=info, profiles=results), indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
