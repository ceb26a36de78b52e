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

Each record keeps the 1-minute load average and the usable cores at the time it was
measured. A choice measured while other work loaded the machine (:func:`busy`: a load
average above 1.5 times the cores, more than this process's own threads make) can be the
wrong one (one such record on a 2-core Zen 4 kept a slower kernel for the 100-row class), so a
later process that finds the machine quiet (a load average under half the cores) measures
that class again and replaces the record.
"""

import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["isa_features", "ISA_PROFILES", "isa_profile_environment", "machine_key",
           "cache_dir", "cache_path", "shape_class", "static_choice", "choose", "tune",
           "clear_memory", "busy"]

CACHE_FILE = "gemm_autotune.json"
FORMAT = 1
TUNER = 6  # how (and among which kernels) choices are measured; other records are redone
# (5: the broadcast kernels joined the candidates; 6: classes of few rows timed on all
# threads, the wide class at N = 2048)
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
_fast = {}  # (environment settings, shape class, candidates) -> kernel name: choose()'s
# answer without the cache path and file lookups (20 us a call, 2% of a 100-row product)
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


def _target_features(spec, host):
    """{llvm feature name: on} that Numba compiles with: ``spec`` is NUMBA_CPU_FEATURES
    (LLVM's "+avx2,-avx512f,..." form) or None, in which case Numba uses the host's."""
    if spec is None:
        return host
    features = {}
    for item in spec.split(","):
        item = item.strip()
        if len(item) > 1 and item[0] in "+-":
            features[item[1:]] = item[0] == "+"
    return features


def isa_features():
    """What this CPU offers the kernels, as Numba will compile for it.

    Returns a dict: ``cpu`` (model name), ``llvm_cpu`` (the host CPU as LLVM names it, e.g.
    ``znver4``), ``numba_cpu_name`` and ``numba_cpu_features`` (Numba's NUMBA_CPU_NAME and
    NUMBA_CPU_FEATURES, None = the host's), and ``features``: {name: bool} for popcnt, avx2,
    avx512f, avx512bw, avx512vl, avx512_vnni, avx_vnni, avx512_vpopcntdq, avx512_bitalg.

    A feature counts when Numba's target has it *and* the host runs it: Numba compiles for
    NUMBA_CPU_FEATURES when that is set (else for the host's features, whatever
    NUMBA_CPU_NAME says), and a kernel is offered only if its instructions can run here.
    So ``NUMBA_CPU_NAME=cascadelake NUMBA_CPU_FEATURES=+avx2,...,-avx512vpopcntdq`` makes a
    CPU with VPOPCNTDQ compile and choose as one without it would (an ISA-restricted run on
    this machine's micro-architecture, used by ``benchmarks/bench_gemm.py --isa``).
    /proc/cpuinfo's flags are the fallback where LLVM cannot be asked, and
    ``cpuinfo_flags`` lists those it shows.
    """
    if not _isa:
        _isa.append(_probe_isa())
    return copy.deepcopy(_isa[0])


_isa = []  # the probe's result: Numba reads NUMBA_CPU_NAME/FEATURES once, at import


def has(feature):
    """``isa_features()["features"][feature]`` without copying the dict (for hot paths)."""
    if not _isa:
        _isa.append(_probe_isa())
    return bool(_isa[0]["features"][feature])


def _probe_isa():
    import numba
    import llvmlite.binding as llvm

    model, flags = _cpuinfo()
    try:
        host = dict(llvm.get_host_cpu_features())
        llvm_cpu = llvm.get_host_cpu_name()
    except Exception:  # pragma: no cover - LLVM cannot report the host
        host, llvm_cpu = None, ""
    spec = numba.config.CPU_FEATURES
    target = _target_features(spec, host) if host is not None else None
    features = {}
    for name, (llvm_name, flag) in _FEATURES.items():
        if host is None:
            features[name] = flag in flags and (spec is None or
                                                 f"+{llvm_name}" in spec.replace(" ", ""))
        else:
            features[name] = bool(host.get(llvm_name, False) and target.get(llvm_name, False))
    return {"cpu": model or llvm_cpu, "llvm_cpu": llvm_cpu,
            "numba_cpu_name": numba.config.CPU_NAME, "numba_cpu_features": spec,
            "features": features,
            "cpuinfo_flags": sorted(f for _, f in _FEATURES.values() if f in flags)}


# CPUs whose ISA isa_profile_environment can restrict a run to: (LLVM CPU name, AVX-512
# subsets kept, other host features dropped, OPENBLAS_CORETYPE). Feature sets from the
# vendors' ISA listings: Cascade Lake is Skylake-SP's AVX-512 F/CD/BW/DQ/VL plus VNNI (no
# VPOPCNTDQ, BITALG, VBMI, IFMA, BF16, GFNI, VAES, VPCLMULQDQ, SHA); Zen 3 has AVX2 and no
# AVX-512.
ISA_PROFILES = {
    "cascadelake": ("cascadelake",
                    {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512vnni",
                     "evex512"},
                    {"gfni", "vaes", "vpclmulqdq", "sha", "rdpid", "clzero", "sse4a",
                     "avxvnni", "shstk", "amx-avx512", "avx10.1", "avx10.2"},
                    "SkylakeX"),
    "znver3": ("znver3", set(),
               {"gfni", "avxvnni", "avxifma", "avxneconvert", "avxvnniint8", "avxvnniint16",
                "amx-avx512", "avx10.1", "avx10.2"},
               "Haswell"),
}


def isa_profile_environment(profile, host_features=None):
    """The environment that makes Numba and OpenBLAS compile and choose as CPU ``profile``
    (a key of :data:`ISA_PROFILES`) would: {NUMBA_CPU_NAME, NUMBA_CPU_FEATURES,
    OPENBLAS_CORETYPE}, for a new process (Numba and OpenBLAS read them when they load).

    NUMBA_CPU_FEATURES is this host's feature list (``host_features``, LLVM's {feature: on};
    default: ask LLVM) with the features the profile lacks switched off, so the code runs
    here with only the profile's instructions: a check that a kernel compiles and computes
    right without, say, AVX-512, and a proxy for its speed there (the micro-architecture is
    still this machine's). A feature the profile keeps but the host lacks raises ValueError:
    such code could not run here.
    """
    if profile not in ISA_PROFILES:
        raise ValueError(f"profile: expected one of {tuple(ISA_PROFILES)}, got {profile!r}")
    if host_features is None:
        import llvmlite.binding as llvm

        host_features = dict(llvm.get_host_cpu_features())
    cpu, keep_avx512, drop, coretype = ISA_PROFILES[profile]
    missing = {f for f in keep_avx512 - {"evex512"} if not host_features.get(f)}
    if missing:
        raise ValueError(f"ISA profile {profile}: this CPU lacks {sorted(missing)}, which that "
                         "profile needs")
    spec = []
    for name, on in sorted(host_features.items()):
        if name.startswith("avx512") or name == "evex512":
            on = on and name in keep_avx512
        elif name in drop:
            on = False
        spec.append(("+" if on else "-") + name)
    return {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ",".join(spec),
            "OPENBLAS_CORETYPE": coretype}


def machine_key(isa=None):
    """The cache key of this machine: CPU model, LLVM CPU, ISA features present, Numba version."""
    import numba

    isa = isa_features() if isa is None else isa
    have = "+".join(name for name, on in sorted(isa["features"].items()) if on)
    target = isa.get("numba_cpu_name") or isa["llvm_cpu"]
    return f"{isa['cpu']} | {target} | {have} | numba {numba.__version__}"


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
# N of the wide class timed at 2048: at 1024 the broadcast kernels' lead over the others
# (15% at 100 x 2048 x 2048 and 9% at 100 x 4096 x 4096 on a Zen 4) shrank to a few percent
# and a tuning could pick a slower kernel; at 2048 six tunings of 100 rows picked the same
# kernel six times natively and under the Zen 3 and Cascade Lake profiles
_N_BUCKETS = ((64, 32), (None, 2048))
# K of 256 words (16384 bits) and more has a class of its own: Harley-Seal's (numba_hs)
_W_BUCKETS = ((7, 4), (31, 16), (255, 64), (None, 256))


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


def _load_and_cores():
    """(1-minute load average or None where the OS has none, the cores this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return load, cores


def busy(load=None, cores=None):
    """Whether other work loads the machine: the 1-minute load average above 1.5 times the
    usable cores (this process's own threads count in it too, up to the cores). Without a
    load average (Windows), False."""
    if load is None and cores is None:
        load, cores = _load_and_cores()
    return load is not None and load > 1.5 * cores


def _quiet(load, cores):
    return load is not None and load < 0.5 * cores


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
    _fast.clear()
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
    env = os.environ
    settings = (env.get("MINIBNN_GEMM_KERNEL"), env.get("MINIBNN_AUTOTUNE"),
                env.get("MINIBNN_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))
    fast_key = (settings, shape_class(m, n, w)[0], tuple(available))
    if fast_key in _fast:  # a call with these settings and this shape was answered before
        return _fast[fast_key]
    choice = _choose(m, n, w, available, run)
    _fast[fast_key] = choice
    return choice


def _choose(m, n, w, available, run):
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
    load, cores = _load_and_cores()
    if isinstance(record, dict) and record.get("kernel") in available and \
            record.get("tuner") == TUNER and not (
                record.get("busy") and _quiet(load, cores)):  # else measured again, now quiet
        _memory[mem_key] = record["kernel"]
        return record["kernel"]
    times = tune(run, available, tm, tn, tw)
    best = min(times, key=times.get)
    _save(path, key, isa, cls, {"kernel": best, "tuner": TUNER, "timed_shape": [tm, tn, 64 * tw],
                                "seconds": times, "load_average": load, "cores": cores,
                                "busy": busy(load, cores),
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _memory[mem_key] = best
    return best
