"""Data-parallel training speed: images/s of the MNIST MLP on N = 1 and 2 MPI ranks.

For each network and each N, ``mpiexec -n N`` runs this script with ``--worker``: every
rank builds the same model, ``distributed.DataParallel`` splits each global batch of
``--batch`` MNIST images across the ranks, and rank 0 times ``--steps`` training steps
(after two warm-up steps) and the gradient all-reduce inside them. Each configuration
is RANKSxTHREADS: N ranks, each with that many BLAS and Numba threads, and a trailing
"o" overlaps the all-reduce with the backward pass (``DataParallel(overlap=True)``); the
default 1x1, 1x2, 2x1, 2x1o compares one core, two cores by threads, and two cores by
ranks, without and with overlap. Also
reported: the bytes each rank hands to MPI per step (gradients, and everything including
synchronised batch norm) and the number of messages. Speedups are against the first
configuration of the same net.

    python benchmarks/bench_train_dist.py [--quick] [--configs 1x1,1x2,2x1,2x1o] [--steps 20]

Writes benchmarks/results/train_dist_cpu.json (``--quick``: a file in the system's temp
folder, never the tracked results) and prints a table. Needs mpi4py and mpiexec
(``pip install minibnn[dist]``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NETS = [(3, 512), (3, 2048)]
QUICK_NETS = [(2, 128)]


def worker(layers, hidden, batch, steps, backend_name, overlap):
    """One rank: time ``steps`` data-parallel steps; rank 0 prints a JSON line."""
    from minibnn import backend, data, distributed, losses, models, optim
    from minibnn import train as T
    backend.set_backend(backend_name)
    comm = distributed.init()
    rng = np.random.default_rng(0)
    model = models.mnist_mlp(hidden=hidden, layers=layers, dropout_in=0, dropout_hidden=0,
                             rng=rng)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    mnist = data.load_mnist()
    x = data.to_pm1(mnist.train_images[:batch * (steps + 2)])
    y = mnist.train_labels[:len(x)].astype(np.int64)
    dp = distributed.DataParallel(model, comm, overlap=overlap)
    reduce_seconds = [0.0]  # the blocking all-reduce (without overlap: hidden otherwise)
    allreduce = dp.allreduce_gradients

    def timed_allreduce():
        t = time.perf_counter()
        allreduce()
        reduce_seconds[0] += time.perf_counter() - t
    dp.allreduce_gradients = timed_allreduce

    def step(i):
        idx = dp.shard(np.arange(i * batch, (i + 1) * batch))
        T.train_step(model, opt, losses.squared_hinge, backend.asarray(x[idx]),
                     backend.asarray(y[idx]), dp)

    for i in range(2):  # warm-up: kernels compiled, buffers allocated
        step(i)
    comm.barrier()
    reduce_seconds[0], messages, nbytes = 0.0, comm.messages, comm.bytes
    t0 = time.perf_counter()
    for i in range(2, steps + 2):
        step(i)
    comm.barrier()
    seconds = time.perf_counter() - t0
    if comm.rank == 0:
        print(json.dumps(dict(
            net=f"{layers}x{hidden}", ranks=comm.size, overlap=overlap, batch=batch,
            steps=steps,
            params=sum(p.data.size for p in dp.params), buckets=len(dp.buckets),
            step_ms=1e3 * seconds / steps, images_per_second=batch * steps / seconds,
            allreduce_ms=1e3 * reduce_seconds[0] / steps,
            grad_bytes_per_step=dp.grad_bytes,
            bytes_per_step=(comm.bytes - nbytes) / steps,
            messages_per_step=(comm.messages - messages) / steps,
            mpi=comm.describe())), flush=True)


def run(ranks, threads, layers, hidden, batch, steps, backend_name, overlap):
    """``mpiexec -n ranks`` this script as a worker, ``threads`` per rank; rank 0's row."""
    threads = str(threads)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads,
               OPENBLAS_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads)
    here = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in a venv
    mpiexec = str(here) if here.exists() else shutil.which("mpiexec") or "mpiexec"
    cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__,
           "--worker", f"{layers},{hidden},{batch},{steps},{backend_name},{int(overlap)}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["threads_per_rank"] = int(threads)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small net, few steps")
    p.add_argument("--configs", default="1x1,1x2,2x1,2x1o",
                   help="RANKSxTHREADS per rank, 'o' to overlap, comma-separated "
                        "(default 1x1,1x2,2x1,2x1o)")
    p.add_argument("--nets", default=None,
                   help="LAYERSxHIDDEN MLPs, comma-separated (default 3x512,3x2048; quick 2x128)")
    p.add_argument("--batch", type=int, default=100, help="global batch (default 100)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick 5)")
    p.add_argument("--backend", default="numba", help="numpy | numba (default numba)")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        layers, hidden, batch, steps, name, overlap = args.worker.split(",")
        worker(int(layers), int(hidden), int(batch), int(steps), name, overlap == "1")
        return 0
    from common import machine_info
    steps = args.steps or (5 if args.quick else 20)
    rows = []
    nets = ([tuple(int(v) for v in n.split("x")) for n in args.nets.split(",")] if args.nets
            else QUICK_NETS if args.quick else NETS)
    for layers, hidden in nets:
        for config in args.configs.split(","):
            overlap = config.endswith("o")
            n, threads = (int(v) for v in config.rstrip("o").split("x"))
            rows.append(run(n, threads, layers, hidden, args.batch, steps, args.backend,
                            overlap))
            base = next(r for r in rows if r["net"] == rows[-1]["net"])
            rows[-1]["speedup_vs_first"] = rows[-1]["images_per_second"] / base["images_per_second"]
    head = (f"{'net':>8} {'ranks':>5} {'thr':>3} {'ovl':>3} {'img/s':>8} {'step ms':>8} {'allred ms':>9} "
            f"{'grad MB/step':>12} {'all MB/step':>11} {'msgs/step':>9} {'speedup':>7}")
    print(head)
    for r in rows:
        print(f"{r['net']:>8} {r['ranks']:>5} {r['threads_per_rank']:>3} "
              f"{'yes' if r['overlap'] else 'no':>3} "
              f"{r['images_per_second']:>8,.0f} {r['step_ms']:>8.1f} {r['allreduce_ms']:>9.2f} "
              f"{r['grad_bytes_per_step'] / 1e6:>12.3f} {r['bytes_per_step'] / 1e6:>11.3f} "
              f"{r['messages_per_step']:>9.1f} {r['speedup_vs_first']:>7.2f}")
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "minibnn-bench" / "train_dist_cpu_quick.json"
        if args.quick else ROOT / "benchmarks" / "results" / "train_dist_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine_info(False, backend=args.backend,
                                                        mpi=rows[0]["mpi"]),
                                   batch=args.batch, steps=steps, rows=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
