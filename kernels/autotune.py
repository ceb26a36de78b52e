"""Pick the fastest CPU XNOR GEMM kernel for this machine by measuring, and remember it.

Which of :func:`kernels.numba_cpu.available_kernels` is fastest depends on the CPU (a vector
popcount is one instruction with AVX512_VPOPCNTDQ, a nibble-table expansion without it) and
on the shape (a few rows of A, a short K). Like FFTW's wisdom, the first product of each
*shape class* (:func:`shape_class`: buckets of M, N and the words of K) times every
candidate kernel on a small product of that class (random operands, in turns, best of a
few runs, about 0.3 s in all once the kernels are compiled) and keeps the fastest. Choices
are cached in a JSON file (:func:`cache_path`) keyed by :func:`machine_key` (CPU model,
ISA features, Numba version), so the next process reads them back.

Control, by environment variable (read on every call):

* ``MINIBNN_GEMM_KERNEL=<name>``: always use this kernel (an unknown name raises ValueError).
* ``MINIBNN_AUTOTUNE=0``: never measure; use :func:`static_choice` (from the ISA alone).
* ``MINIBNN_CACHE_DIR=<dir>``: where the cache file lives (default
  ``$XDG_CACHE_HOME/minibnn``, else ``~/.cache/minibnn``).

A corrupt cache file is ignored with a warning (and replaced at the next write); a cache
directory that cannot be written costs a warning, the choice is then kept in memory only.
"""

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["isa_features", "machine_key", "cache_dir", "cache_path", "shape_class",
           "static_choice", "choose", "tune", "clear_memory"]

CACHE_FILE = "gemm_autotune.json"
FORMAT = 1
TUNER = 3  # how choices are measured; a record made another way is measured again
# Feature names as LLVM (llvmlite.binding.get_host_cpu_features) and /proc/cpuinfo spell them.
_FEATURES = {  # ours: (llvm name, /proc/cpuinfo flag)
    "popcnt": ("popcnt", "popcnt"),
    "avx2": ("avx2", "avx2"),
    "avx512f": ("avx512f", "avx512f"),
    "avx512bw": ("avx512bw", "avx512bw"),
    "avx512vl": ("avx512vl", "avx512vl"),
    "avx512_vnni": ("avx512vnni", "avx512_vnni"),
    "avx_vnni": ("avxvnni", "avx_vnni"),
    "avx512_vpopcntdq": ("avx512vpopcntdq", "avx512_vpopcntdq"),
    "avx512_bitalg": ("avx512bitalg", "avx512_bitalg"),
}
_memory = {}  # (machine key, shape class) -> kernel name, this process
_warned = set()


def _cpuinfo():
    """(model name, set of flags) from /proc/cpuinfo, or ("", set()) where there is none."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def isa_features():
    """What this CPU offers the kernels, as Numba will compile for it.

    Returns a dict: ``cpu`` (model name), ``llvm_cpu`` (the CPU LLVM targets, e.g.
    ``znver4``), ``numba_cpu_name`` (Numba's NUMBA_CPU_NAME, None = the host), and
    ``features``: {name: bool} for popcnt, avx2, avx512f, avx512bw, avx512vl, avx512_vnni,
    avx_vnni, avx512_vpopcntdq, avx512_bitalg. A feature counts when LLVM reports it for
    the host (what the compiled code may use); /proc/cpuinfo's flags are the fallback
    where LLVM cannot be asked, and ``cpuinfo_flags`` lists those it shows.
    """
    import numba
    import llvmlite.binding as llvm

    model, flags = _cpuinfo()
    try:
        host = llvm.get_host_cpu_features()
        llvm_cpu = llvm.get_host_cpu_name()
    except Exception:  # pragma: no cover - LLVM cannot report the host
        host, llvm_cpu = None, ""
    target = numba.config.CPU_NAME
    features = {}
    for name, (llvm_name, flag) in _FEATURES.items():
        if target not in (None, "host"):  # compiling for another CPU: assume nothing
            features[name] = False
        elif host is not None:
            features[name] = bool(host.get(llvm_name, False))
        else:
            features[name] = flag in flags
    return {"cpu": model or llvm_cpu, "llvm_cpu": llvm_cpu, "numba_cpu_name": target,
            "features": features,
            "cpuinfo_flags": sorted(f for _, f in _FEATURES.values() if f in flags)}


def machine_key(isa=None):
    """The cache key of this machine: CPU model, LLVM CPU, ISA features present, Numba version."""
    import numba

    isa = isa_features() if isa is None else isa
    have = "+".join(name for name, on in sorted(isa["features"].items()) if on)
    return f"{isa['cpu']} | {isa['llvm_cpu']} | {have} | numba {numba.__version__}"


def cache_dir():
    """``$MINIBNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/minibnn``, else ``~/.cache/minibnn``."""
    if os.environ.get("MINIBNN_CACHE_DIR"):
        return Path(os.environ["MINIBNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minibnn"


def cache_path():
    """The autotune cache file, ``cache_dir() / "gemm_autotune.json"``."""
    return cache_dir() / CACHE_FILE


# A shape class: bucket edges and the product timed for it (M, N, words of K).
_M_BUCKETS = ((16, 8), (256, 100), (None, 512))  # (largest M of the bucket, M timed)
_N_BUCKETS = ((64, 32), (None, 1024))
_W_BUCKETS = ((7, 4), (31, 16), (None, 64))


def _bucket(value, buckets):
    for i, (edge, timed) in enumerate(buckets):
        if edge is None or value <= edge:
            return i, timed
    raise AssertionError("unreachable")


def shape_class(m, n, w):
    """(name, (M, N, W) timed for it) of the class of an (M, W) x (N, W) product."""
    im, tm = _bucket(m, _M_BUCKETS)
    in_, tn = _bucket(n, _N_BUCKETS)
    iw, tw = _bucket(w, _W_BUCKETS)
    return f"m{im}-n{in_}-w{iw}", (tm, tn, tw)


def static_choice(available, isa=None):
    """The kernel to use without measuring (``MINIBNN_AUTOTUNE=0``): the widest vector
    popcount the CPU runs natively, else ``"scalar"``, else the first available."""
    isa = isa_features() if isa is None else isa
    f = isa["features"]
    order = []
    if f.get("avx512_vpopcntdq"):
        order.append("simd512")
    if f.get("avx2"):
        order.append("simd256")
    order += ["scalar", "generic"]
    for name in order:
        if name in available:
            return name
    return available[0]


def _load(path):
    """The cache's dict, or an empty one (with a warning when the file is unreadable)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (or no such directory)
        return {"format": FORMAT, "machines": {}}
    except OSError as exc:
        _warn_once(f"read:{path}", f"{path}: cannot read the GEMM autotune cache ({exc}); "
                                   "ignoring it")
        return {"format": FORMAT, "machines": {}}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT or \
                not isinstance(data.get("machines"), dict):
            raise ValueError(f"expected a JSON object with format {FORMAT} and 'machines'")
    except ValueError as exc:
        _warn_once(f"corrupt:{path}", f"{path}: ignoring a corrupt GEMM autotune cache ({exc}); "
                                      "it is rewritten with the next choice")
        return {"format": FORMAT, "machines": {}}
    return data


def _save(path, key, isa, cls, record):
    """Add ``record`` under machine ``key`` and class ``cls``; write atomically (a temporary
    file renamed over the old one). Warns and returns False when that fails."""
    data = _load(path)
    machine = data["machines"].setdefault(key, {"isa": isa, "choices": {}})
    if not isinstance(machine.get("choices"), dict):
        machine["choices"] = {}
    machine["choices"][cls] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        _warn_once(f"write:{path}", f"{path}: cannot write the GEMM autotune cache ({exc}); "
                                    "choices are kept for this process only")
        return False
    return True


def _warn_once(tag, message):
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear_memory():
    """Forget the choices made or read in this process (the file stays)."""
    _memory.clear()
    _warned.clear()


def tune(run, candidates, m, n, w, rounds=(3, 25), budget_s=0.3, seed=0):
    """Seconds per candidate: the fastest of its timed runs of ``run(name, a, b, k)`` on
    random operands a (m, w), b (n, w), k = 64 w, after one warm-up run each. The
    candidates take turns, round after round (at least ``rounds[0]``, at most ``rounds[1]``,
    stopping once ``budget_s`` has passed), so that load from other work on the machine
    falls on all of them alike; the minimum discards the runs another process interrupted."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=(m, w), dtype=np.uint64) << np.uint64(1)
    b = rng.integers(0, 2**63, size=(n, w), dtype=np.uint64) >> np.uint64(1)
    for name in candidates:
        run(name, a, b, 64 * w)
    times = {name: float("inf") for name in candidates}
    start = time.perf_counter()
    for i in range(rounds[1]):
        if i >= rounds[0] and time.perf_counter() - start > budget_s:
            break
        for name in candidates:
            t0 = time.perf_counter()
            run(name, a, b, 64 * w)
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def choose(m, n, w, available, run):
    """The kernel for an (m, w) x (n, w) product: forced by ``MINIBNN_GEMM_KERNEL``, static
    with ``MINIBNN_AUTOTUNE=0``, else the cached or freshly measured winner of its class.

    ``available``: the candidate names; ``run(name, a, b, k)``: runs one (used to time).
    """
    forced = os.environ.get("MINIBNN_GEMM_KERNEL", "").strip()
    if forced:
        if forced not in available:
            raise ValueError(f"MINIBNN_GEMM_KERNEL: expected one of {tuple(available)}, "
                             f"got {forced!r}")
        return forced
    if os.environ.get("MINIBNN_AUTOTUNE", "").strip().lower() in ("0", "false", "no", "off"):
        return static_choice(available)
    cls, (tm, tn, tw) = shape_class(m, n, w)
    path = cache_path()
    mem_key = (str(path), cls)
    if mem_key in _memory:
        return _memory[mem_key]
    isa = isa_features()
    key = machine_key(isa)
    record = _load(path)["machines"].get(key, {}).get("choices", {}).get(cls)
    if isinstance(record, dict) and record.get("kernel") in available and \
            record.get("tuner") == TUNER:
        _memory[mem_key] = record["kernel"]
        return record["kernel"]
    times = tune(run, available, tm, tn, tw)
    best = min(times, key=times.get)
    _save(path, key, isa, cls, {"kernel": best, "tuner": TUNER, "timed_shape": [tm, tn, 64 * tw],
                                "seconds": times,
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _memory[mem_key] = best
    return best
