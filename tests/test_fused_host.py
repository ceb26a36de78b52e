"""The CUDA bodies of kernels/cupy_fused.py's ElementwiseKernels, compiled as C++ for the
CPU, give the NumPy stand-ins of tools/fake_cupy bit for bit.

On a GPU the ``gpu`` tests (tests/test_gpu_step.py, tests/test_bf16_backward.py) check the
fused kernels against the array code. Without one, the fake CuPy runs NumPy stand-ins,
written in the order of the CUDA bodies and checked against the array code by the same
tests under the fake, but the bodies themselves were only compiled. Here each body becomes
a C++ loop over its elements, as CuPy's ElementwiseKernel makes it a CUDA loop: ``i`` is
the element's C-order index in the broadcast shape, an input parameter is a value read at
``i``, an output a reference to the element at ``i``, a ``raw`` parameter the pointer
itself; ``T`` and ``S`` take the dtype of the first array bound to them; outputs not given
are allocated. The CUDA intrinsics the bodies use (``__float_as_uint``,
``__longlong_as_double``, ``__double_as_longlong``, ``__clz``) get host versions, and it
is compiled with ``-ffp-contract=off`` as CuPy compiles these with ``--fmad=false``. So
arithmetic order, casts, comparisons, the hash and the bf16 bit manipulation are checked in
CI; what is not modelled is CUDA's ``-ftz=true`` (float32 subnormals flushed on the GPU),
which no value here produces except in the bf16 split, whose kernel avoids float32
arithmetic for that reason. Skipped when no C++ compiler is found.
"""

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import load_fake_cupy
from minibnn.kernels import cupy_fused

CXX = next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, clang++, c++) found")

C_TYPES = {"float32": "float", "float64": "double", "int64": "long long", "int32": "int",
           "uint64": "unsigned long long", "uint16": "unsigned short", "bool": "bool"}
DTYPES = {"float": np.float32, "double": np.float64}
SHIM = """
#include <cmath>
#include <cstring>
using std::sqrt; using std::fabs;
#define __device__
static unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
static int __clz(unsigned int x) { return x ? __builtin_clz(x) : 32; }
"""
BINDINGS = [("float", "float"), ("double", "double"), ("float", "double"), ("double", "float")]


def _params(spec):
    """[(raw, type, name)] of an ElementwiseKernel parameter list."""
    out = []
    for p in spec.split(","):
        words = p.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))
    return out


def _c_type(t, binding):
    return {"T": binding[0], "S": binding[1]}.get(t) or C_TYPES[t]


def _function(name, binding):
    ins, outs, body = cupy_fused._SOURCES[name]
    lines = []
    for k, (raw, t, p) in enumerate(_params(ins) + _params(outs)):
        c = _c_type(t, binding)
        is_out = k >= len(_params(ins))
        if raw:
            lines.append(f"{c} *{p} = ({c} *)ptr[{k}];")
        elif is_out:
            lines.append(f"{c} &{p} = (({c} *)ptr[{k}])[i * stride[{k}]];")
        else:
            lines.append(f"const {c} {p} = ((const {c} *)ptr[{k}])[i * stride[{k}]];")
    decls = "\n        ".join(lines)
    return (f'extern "C" void {name}_{binding[0]}_{binding[1]}(long long n, void **ptr, '
            f"const long long *stride)\n{{\n"
            f"    typedef {binding[0]} T;\n    typedef {binding[1]} S;  // CuPy's type names\n"
            f"    for (long long i = 0; i < n; ++i) {{\n        "
            f"{decls}\n        {{\n{body}\n        }}\n    }}\n}}\n")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """Every kernel body under every binding of T and S, in one library."""
    folder = tmp_path_factory.mktemp("fused_host")
    parts = [SHIM] + sorted(set(cupy_fused._PREAMBLES.values()))
    for name in cupy_fused._SOURCES:
        parts += [_function(name, b) for b in BINDINGS]
    source, library = folder / "fused.cpp", folder / "fused.so"
    source.write_text("\n".join(parts), encoding="utf-8")
    done = subprocess.run([CXX, "-std=c++14", "-O1", "-ffp-contract=off", "-Wall",
                           "-Wno-unused-variable", "-Wno-unused-but-set-variable",
                           "-Wno-unused-local-typedefs", "-Wno-unused-function", "-shared",
                           "-fPIC", "-o", str(library), str(source)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    return ctypes.CDLL(str(library))


def run(lib, name, *args):
    """Kernel ``name``'s CUDA body on NumPy arguments, called as CuPy calls an
    ElementwiseKernel: the inputs, then optionally the outputs. Returns the output (or a
    tuple of them)."""
    ins, outs, _ = cupy_fused._SOURCES[name]
    params = _params(ins) + _params(outs)
    args = list(args) + [None] * (len(params) - len(args))
    bound = {}
    for (raw, t, _), a in zip(params, args):
        if t in ("T", "S") and isinstance(a, np.ndarray) and t not in bound:
            bound[t] = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[a.dtype]
    binding = (bound.get("T", "float"), bound.get("S", bound.get("T", "float")))
    shape = np.broadcast_shapes(*[a.shape for (raw, _, _), a in zip(params, args)
                                  if not raw and isinstance(a, np.ndarray)])
    n = int(np.prod(shape))
    ptrs, strides, keep, results = [], [], [], []
    for k, ((raw, t, _), a) in enumerate(zip(params, args)):
        dtype = DTYPES.get(_c_type(t, binding)) or np.dtype(t)
        is_out = k >= len(_params(ins))
        if raw:
            buf = a
            stride = 0
        elif isinstance(a, np.ndarray):
            buf = np.ascontiguousarray(np.broadcast_to(a.astype(dtype, copy=False), shape))
            stride = 1
        elif a is None:  # an output to allocate
            buf = np.empty(shape, dtype)
            stride = 1
        else:  # a scalar, cast to the parameter's type
            buf = np.array([a], dtype)
            stride = 0
        if is_out:
            results.append((a, buf))
        keep.append(buf)
        ptrs.append(buf.ctypes.data)
        strides.append(stride)
    fn = getattr(lib, f"{name}_{binding[0]}_{binding[1]}")
    fn(ctypes.c_longlong(n), (ctypes.c_void_p * len(ptrs))(*ptrs),
       (ctypes.c_longlong * len(strides))(*strides))
    out = []
    for given, buf in results:
        if given is not None and given is not buf:
            given[...] = buf
            buf = given
        out.append(buf)
    return out[0] if len(out) == 1 else tuple(out)




def standin(name, *args):
    """The fake CuPy's NumPy stand-in for kernel ``name`` on copies of NumPy ``args``;
    returns what it returns, as NumPy (in-place outputs written back into ``args``)."""
    fake = load_fake_cupy()
    ins, outs, body = cupy_fused._SOURCES[name]
    wrapped = [fake.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    got = fake.ElementwiseKernel(ins, outs, body, f"minibnn_{name}")(*wrapped)
    if isinstance(got, tuple):
        return tuple(g.get() for g in got)
    return None if got is None else got.get()


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b)
    if a.dtype.kind == "f":  # and the signs of zeros
        np.testing.assert_array_equal(np.signbit(a[a == 0]), np.signbit(b[b == 0]))


def _values(rng, shape, dtype, scale=1.0):
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-3], dtype)
    flat[:len(special)] = special[:flat.size]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_adam_body_equals_its_standin(lib, dtype, clip):
    rng = np.random.default_rng(1)
    g = rng.standard_normal(300).astype(dtype)
    g[3] = np.nan
    w = rng.uniform(-1.2, 1.2, 300).astype(dtype)
    m = (rng.standard_normal(300) * 0.1).astype(dtype)
    v = (rng.random(300) * 0.01).astype(dtype)
    t = dtype
    scalars = (t(0.9), t(1 - 0.9), t(0.999), t(1 - 0.999), t(1e-8))
    alpha = 0.0123456789
    lo, hi = (t(-1), t(1)) if clip else (t(0), t(0))
    want = [a.copy() for a in (w, m, v)]
    standin("adam", g, *scalars, alpha, lo, hi, clip, *want)
    got = [a.copy() for a in (w, m, v)]
    run(lib, "adam", g, *scalars, alpha, lo, hi, clip, *got)
    for a, b in zip(got, want):
        _same(a, b)
    # the CUDA-graph twin reads alpha_t from a device slot by its float64 bits
    vals = np.zeros(8, np.uint64)
    vals[5] = struct.unpack("<Q", struct.pack("<d", alpha))[0]
    dev = [a.copy() for a in (w, m, v)]
    run(lib, "adam_dev", g, *scalars, vals, np.int32(5), lo, hi, clip, *dev)
    for a, b in zip(dev, want):
        _same(a, b)


@pytest.mark.parametrize("x_dtype,r_dtype", [(np.float32, np.float32), (np.float64, np.float32),
                                             (np.float64, np.float64)])
def test_ema_body_equals_its_standin(lib, x_dtype, r_dtype):
    rng = np.random.default_rng(2)
    new, r = rng.standard_normal(70).astype(x_dtype), rng.standard_normal(70).astype(r_dtype)
    want, got = r.copy(), r.copy()
    standin("ema", new, 1 - 0.137, 0.137, want)
    run(lib, "ema", new, 1 - 0.137, 0.137, got)
    _same(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sign_bodies_equal_their_standins(lib, dtype):
    x = _values(np.random.default_rng(3), (7, 9), dtype, 2.0)
    x.reshape(-1)[8:12] = [1.0, -1.0, np.nextafter(dtype(1), dtype(2)), -np.nextafter(dtype(1),
                                                                                      dtype(2))]
    _same(run(lib, "sign", x), standin("sign", x))
    for a, b in zip(run(lib, "sign_ste", x), standin("sign_ste", x)):
        _same(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_bodies_equal_their_standins(lib, dtype):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((13, 37)).astype(dtype)
    key, offset, thr = np.uint64(12345678901234567), np.uint64(7 * 70), np.uint64(1 << 22)
    scale = dtype(1 / (1 - 0.25))
    want = standin("dropout", a, key, offset, thr, scale)
    for x, y in zip(run(lib, "dropout", a, key, offset, thr, scale), want):
        _same(x, y)
    vals = np.zeros(4, np.uint64)
    vals[2] = key
    for x, y in zip(run(lib, "dropout_dev", a, vals, np.int32(2), offset, thr, scale), want):
        _same(x, y)


@pytest.mark.parametrize("s_dtype,t_dtype", [(np.float64, np.float32), (np.float32, np.float32),
                                             (np.float64, np.float64)])
def test_batch_norm_bodies_equal_their_standins(lib, s_dtype, t_dtype):
    rng = np.random.default_rng(5)
    var = rng.random((1, 6, 1, 1)).astype(s_dtype) * 3
    eps = s_dtype(1e-4)
    want = np.empty(var.shape, t_dtype)
    standin("bn_invstd", var, eps, want)
    got = run(lib, "bn_invstd", var, eps, np.empty(var.shape, t_dtype))
    _same(got, want)
    t = t_dtype
    x = rng.standard_normal((5, 6, 4, 3)).astype(t)
    mean, gamma, beta = (rng.standard_normal((1, 6, 1, 1)).astype(t) for _ in range(3))
    for a, b in zip(run(lib, "bn_forward", x, mean, got, gamma, beta),
                    standin("bn_forward", x, mean, got, gamma, beta)):
        _same(a, b)
    g, xhat = rng.standard_normal(x.shape).astype(t), rng.standard_normal(x.shape).astype(t)
    for a, b in zip(run(lib, "bn_backward_products", g, gamma, xhat),
                    standin("bn_backward_products", g, gamma, xhat)):
        _same(a, b)
    m1, m2 = (rng.standard_normal((1, 6, 1, 1)).astype(t) for _ in range(2))
    _same(run(lib, "bn_backward_input", got, g, m1, xhat, m2),
          standin("bn_backward_input", got, g, m1, xhat, m2))


def test_bf16_bodies_equal_their_standins(lib):
    """The split (whose float64 detour keeps the remainders exact where the GPU would flush
    float32 subnormals), the rounding, the tripled operand in both layouts (read from a
    transposed view: ``i`` is the C-order index) and the sum of three products."""
    rng = np.random.default_rng(6)
    x = np.concatenate([_values(rng, 200, np.float32, 100.0),
                        np.float32([3.0e38, -3.0e38, 2.0 ** -110, 2.0 ** -126, 1.0 + 2.0 ** -20,
                                    np.float32(1e-40), 65504.0, 1.0 / 3.0])])
    parts = np.zeros(3 * x.size, np.uint16)
    want = np.zeros(3 * x.size, np.uint16)
    run(lib, "split_bf16", x, np.int64(x.size), parts)
    standin("split_bf16", x, np.int64(x.size), want)
    _same(parts, want)
    _same(run(lib, "to_bf16", x), standin("to_bf16", x))
    m = _values(rng, (6, 9), np.float32, 10.0).T  # a transposed view, (9, 6)
    for along in (True, False):
        out, ref = np.zeros(3 * m.size, np.uint16), np.zeros(3 * m.size, np.uint16)
        run(lib, "to_bf16_x3", m, np.int64(9), np.int64(6), along, out)
        standin("to_bf16_x3", m, np.int64(9), np.int64(6), along, ref)
        _same(out, ref)
    p, q, r = (rng.standard_normal((4, 5)).astype(np.float32) for _ in range(3))
    _same(run(lib, "sum3", p, q, r), standin("sum3", p, q, r))


def test_every_fused_kernel_is_checked_here():
    """A kernel added to cupy_fused._SOURCES needs a test in this file too."""
    text = Path(__file__).read_text()
    missing = [k for k in cupy_fused._SOURCES if f'"{k}"' not in text]
    assert not missing, missing


def test_the_emulation_is_strict_enough_to_matter(lib, tmp_path, monkeypatch):
    """A body whose subtractions run in another order (gxhat - xhat m2 - m1 for
    (gxhat - m1) - xhat m2) gives other floats than its stand-in: the comparison is not
    vacuous."""
    ins, outs, body = cupy_fused._SOURCES["bn_backward_input"]
    swapped = body.replace("T a = gxhat - m1; T b = xhat * m2; T c = a - b;",
                           "T a = gxhat - (xhat * m2); T c = a - m1;")
    assert swapped != body
    monkeypatch.setitem(cupy_fused._SOURCES, "bn_backward_input", (ins, outs, swapped))
    source, library = tmp_path / "swapped.cpp", tmp_path / "swapped.so"
    source.write_text(SHIM + "".join(_function("bn_backward_input", b) for b in BINDINGS))
    subprocess.run([CXX, "-std=c++14", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-o",
                    str(library), str(source)], check=True)
    other = ctypes.CDLL(str(library))
    rng = np.random.default_rng(7)
    args = [rng.standard_normal(500).astype(np.float32) for _ in range(5)]
    got = run(other, "bn_backward_input", *args)
    want = standin("bn_backward_input", *args)
    assert not np.array_equal(got, want)
