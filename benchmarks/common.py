"""What the benchmark scripts share: a description of the machine and the grouped bar chart."""

import datetime
import os
import platform
from pathlib import Path

import numpy as np


RESULTS = Path(__file__).resolve().parent / "results"


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
