"""What the benchmark scripts share: a description of the machine and the grouped bar chart."""

import contextlib
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np


RESULTS = Path(__file__).resolve().parent / "results"
#: the user's OpenMP wait policy, read before minibnn's numba kernels set theirs (the
#: scripts import this module before minibnn; see start_numba_threads)
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


def results_dir(out, quick):
    """Where a benchmark writes: ``--out`` when given, else ``benchmarks/results/`` for a
    full run and ``benchmarks/results/quick/`` (ignored by git) for a ``--quick`` smoke run,
    so a smoke run never overwrites the tracked results."""
    if out is not None:
        return Path(out)
    return RESULTS / "quick" if quick else RESULTS


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(use_gpu, **extra):
    """Date, CPU, versions, BLAS threads, load average (other work skews times) and the GPU."""
    import numba

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "load_average_at_start": list(os.getloadavg()),
        **extra,
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                                 "num_threads")} for d in threadpool_info()]
    except ImportError:
        pass
    if use_gpu:
        import cupy as cp

        dev = cp.cuda.Device()
        info["cupy"] = cp.__version__
        info["gpu"] = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        info["compute_capability"] = dev.compute_capability
    return info


def grouped_bars(rows, group, series, value, path, *, xlabel, ylabel, title, annotate=None):
    """One group of bars per distinct ``row[group]``, one bar colour per ``row[series]``,
    height ``row[value]`` on a log axis; ``annotate(row)`` labels a bar. Writes a PNG, or
    says why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(groups)), 4.5))
    for i, name in enumerate(names):
        for j, g in enumerate(groups):
            for r in rows:
                if r[group] == g and r[series] == name:
                    x = j + (i - (len(names) - 1) / 2) * width
                    ax.bar(x, r[value], width, color=f"C{i}", label=name if j == 0 else None)
                    if annotate:
                        ax.text(x, r[value], annotate(r), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [xlabel(g) for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def restart_under_isa(parser, profile, argv, script):
    """For ``--isa PROFILE`` (not "native"): start this script again in a process whose Numba
    and OpenBLAS compile and choose as that CPU would
    (:func:`minibnn.kernels.autotune.isa_profile_environment`), with the arguments ``argv``
    (None: this process's); returns in that process, or at once for "native". A profile
    this CPU cannot run is a usage error."""
    if profile == "native" or os.environ.get("MINIBNN_BENCH_ISA") == profile:
        return
    from minibnn.kernels import autotune

    try:
        env = autotune.isa_profile_environment(profile)
    except ValueError as exc:
        parser.error(str(exc))
    os.environ.update(env, MINIBNN_BENCH_ISA=profile)
    print(f"restarting as {profile}: NUMBA_CPU_NAME={env['NUMBA_CPU_NAME']} "
          f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}", flush=True)
    os.execv(sys.executable, [sys.executable, str(Path(script).resolve()),
                              *(sys.argv[1:] if argv is None else argv)])


def note_isa(info, profile):
    """Record an ISA-restricted run in the machine info (the JSON says what it was)."""
    if profile == "native":
        return
    info["isa_profile"] = profile
    info["isa_profile_note"] = (
        f"ISA-restricted run: the instructions of {profile} (Numba target features, OpenBLAS "
        f"{os.environ.get('OPENBLAS_CORETYPE')}) on this machine's micro-architecture; a "
        "proxy for that CPU, not a measurement on it")


@contextlib.contextmanager
def array_code():
    """Switch the compiled convolution glue and training-step kernels off for the enclosed
    code (``backend.conv_kernels`` answers None): ``functional`` and ``binary`` run their
    array code, the reference the compiled paths are timed against."""
    from minibnn import backend

    saved = backend.conv_kernels
    backend.conv_kernels = lambda name=None: None
    try:
        yield
    finally:
        backend.conv_kernels = saved


def start_numba_threads():
    """Start numba's OpenMP threads now, under the wait policy minibnn's kernels set (PASSIVE
    unless the user chose one), then give the environment back its own value for PyTorch.
    Call it before importing torch.

    Each library reads OMP_WAIT_POLICY once, when its OpenMP runtime starts. Measured here:
    with PyTorch imported first, numba's loops ran on PyTorch's already-started OpenMP runtime
    and its spinning workers, and the numba ConvNet step went from 131 ms to 205 ms. So numba
    starts first with its policy, and PyTorch (its own bundled runtime) starts later with the
    user's environment, its default: each side of the comparison runs as it would alone."""
    from minibnn import backend
    if backend.available()["numba"] is None:
        from minibnn.kernels import numba_cpu
        numba_cpu.pack_rows(np.ones((64, 64), np.float32))  # a parallel loop: threads start
    if USER_OMP_WAIT_POLICY is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
