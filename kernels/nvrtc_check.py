"""Compile the packaged CUDA sources to PTX with NVRTC, without a GPU (a CI check).

NVRTC is loaded with ctypes from the ``nvidia-cuda-nvrtc-cu12`` wheel
(``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``), from ``$MINIBNN_NVRTC`` (a path to the
library) or from the system library path. No CUDA driver or device is needed: PTX
generation for a virtual architecture ``compute_XY`` is pure compilation.
"""

import ctypes
import ctypes.util
import importlib.util
import os
from pathlib import Path

from .cuda_sources import EXACT_ARCH, SOURCES, module_source

__all__ = ["NVRTCError", "NVRTCUnavailable", "load_nvrtc", "nvrtc_version", "supported_archs",
           "compile_source", "compile_all", "find_ptxas", "find_cuobjdump", "ptxas_resources"]


class NVRTCUnavailable(RuntimeError):
    """No NVRTC library could be loaded (the message says where it looked)."""


class NVRTCError(RuntimeError):
    """NVRTC rejected a source; the message carries NVRTC's log."""


_LIB = None


def _wheel_files(package, relative):
    """The files at the ``relative`` paths under each folder of the installed (namespace)
    package ``package`` (say ``"nvidia.cuda_nvrtc"``), as strings: NVIDIA's pip wheels."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        for rel in relative:
            p = Path(loc) / rel
            if p.is_file():
                yield str(p)


def _candidates():
    env = os.environ.get("MINIBNN_NVRTC")
    if env:
        yield env
    yield from _wheel_files("nvidia.cuda_nvrtc", [f"lib/{name}" for name in
                                                  ("libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so")])
    for name in ("libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"):
        yield name
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def load_nvrtc():
    """The NVRTC shared library as a ctypes CDLL; raises NVRTCUnavailable if none loads."""
    global _LIB
    if _LIB is not None:
        return _LIB
    tried = []
    for cand in _candidates():
        try:
            lib = ctypes.CDLL(cand)
        except OSError as exc:
            tried.append(f"{cand} ({exc})")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        _LIB = lib
        return lib
    raise NVRTCUnavailable(
        "NVRTC not found; install it with `pip install nvidia-cuda-nvrtc-cu12` or set "
        "MINIBNN_NVRTC to libnvrtc.so. Tried: " + "; ".join(tried)
    )


def nvrtc_version():
    """(major, minor) of the loaded NVRTC."""
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs():
    """The compute capabilities the loaded NVRTC compiles for, as sorted ints (75, 80, ...).

    NVRTC's own list (``nvrtcGetSupportedArchs``, CUDA 11.2 and later): each CUDA release
    drops old architectures (CUDA 13 no longer has compute_70), so a check that names an
    architecture asks here first.
    """
    lib = load_nvrtc()
    count = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return sorted(int(a) for a in archs)


def _check(lib, status, what, log=""):
    if status != 0:
        msg = lib.nvrtcGetErrorString(status).decode()
        raise NVRTCError(f"{what} failed: {msg}" + (f"\n{log}" if log else ""))


def compile_source(source, arch="compute_80", name="kernel.cu", options=()):
    """Compile CUDA C++ ``source`` to PTX for virtual architecture ``arch``; returns the PTX text.

    Raises NVRTCError with NVRTC's log when compilation fails.
    """
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                       0, None, None), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}", "--std=c++14", *options]
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        _check(lib, status, f"compiling {name} for {arch}", log)
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_all(arch="compute_80"):
    """Compile every packaged source whose minimum architecture ``arch`` meets; {name: PTX}.

    A source of :data:`~.cuda_sources.EXACT_ARCH` (the wgmma GEMM: ``90a``) is compiled, with
    its preludes, for its own architecture (``compute_90a``), and only when ``arch`` is
    that architecture without the suffix (``compute_90``)."""
    cc = int(arch.split("_")[-1])
    out = {}
    for name, min_cc in SOURCES.items():
        exact = EXACT_ARCH.get(name)
        if exact is not None:
            if cc == min_cc:
                out[name] = compile_source(module_source(name), f"compute_{exact}", name)
        elif cc >= min_cc:
            out[name] = compile_source(module_source(name), arch, name)
    return out


def find_ptxas():
    """Path of a ``ptxas`` (``$MINIBNN_PTXAS``, the ``nvidia-cuda-nvcc-cu12`` wheel's, or one on
    PATH), or None. Not a dependency: a developer's check of registers and spills."""
    import shutil
    env = os.environ.get("MINIBNN_PTXAS")
    if env:
        return env if Path(env).is_file() else None
    return next(_wheel_files("nvidia.cuda_nvcc", ["bin/ptxas"]), None) or shutil.which("ptxas")


def find_cuobjdump():
    """Path of a ``cuobjdump`` (``$MINIBNN_CUOBJDUMP``, one on PATH, or the
    ``nvidia-cuda-cuobjdump`` wheel's, which runs the ``nvidia-cuda-nvdisasm`` wheel's
    ``nvdisasm`` beside it for ``-sass``), or None. A developer's tool, in the test extra."""
    import shutil
    env = os.environ.get("MINIBNN_CUOBJDUMP")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("cuobjdump") or next(
        _wheel_files("nvidia", ["cu13/bin/cuobjdump", "cu12/bin/cuobjdump"]), None)


def ptxas_resources(ptx, arch="sm_90", ptxas=None):
    """Assemble PTX text for real architecture ``arch`` with ``ptxas -v``; returns
    {entry: {"registers": int, "spill_stores": bytes, "spill_loads": bytes}}."""
    import re
    import subprocess
    import tempfile
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("ptxas not found: set MINIBNN_PTXAS or install nvidia-cuda-nvcc-cu12")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if run.returncode:
        raise NVRTCError(f"ptxas failed for {arch}:\n{run.stderr}")
    out, entry = {}, None
    for line in run.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0})
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and entry is not None:
            entry["spill_stores"], entry["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            entry["registers"] = int(m.group(1))
    return out
