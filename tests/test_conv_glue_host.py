"""The CUDA convolution glue (kernels/conv_glue.cu), compiled as C++ for the CPU and run
through its real wrapper (kernels/cupy_conv.py), equals the NumPy reference bit for bit.

No GPU is needed: the kernels use no shared memory, no synchronisation and no warp
functions, only a grid-stride loop over outputs, so running every (block, thread) of a
small launch one after the other on the host computes exactly what the GPU computes
(float adds and compares are IEEE on both, except that CuPy compiles with -ftz=true, so
the GPU flushes subnormal sums to zero, which no test value here produces; the kernels
never multiply floats, so there is nothing to contract into an FMA). A shim defines ``__global__`` and ``__device__``
away and makes ``blockIdx``, ``threadIdx``, ``blockDim`` and ``gridDim`` host variables;
``cupy_conv`` is pointed at NumPy arrays and at these host kernels. This checks the index
arithmetic, the argument lists and the summation orders of the very source the GPU runs;
the ``gpu`` tests in tests/test_conv_glue.py check the same on a device. Skipped when no
C++ compiler is found.
"""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from test_conv_glue import (CONV_SHAPES, IDS, POOL_IDS, POOL_SHAPES, Poisoned, _first_argmax,
                            _signed)

from minibnn import backend, binary
from minibnn import functional as F
from minibnn.kernels import cupy_conv, reference
from minibnn.kernels.cuda_sources import read_source
from minibnn.tensor import Tensor

CXX = next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, clang++, c++) found")

SHIM = """
struct host_uint3 { unsigned int x, y, z; };
static host_uint3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#include <cstring>
static unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
extern "C" void set_thread(unsigned int grid, unsigned int block, unsigned int b,
                           unsigned int t)
{
    gridDim.x = grid; blockDim.x = block; blockIdx.x = b; threadIdx.x = t;
    gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
}
#line 1 "conv_glue.cu"
"""

#: the (blocks, threads per block) each launch is emulated with: the grid-stride loops
#: make every geometry compute the same outputs, one thread alone or several interleaved
GEOMETRIES = [(1, 1), (2, 3)]


@pytest.fixture(scope="module", params=["int index", "wide index"])
def host_library(request, tmp_path_factory):
    """The glue compiled for the host, once as launched (32-bit index arithmetic where the
    launch fits, which every test shape does) and once with MINIBNN_GLUE_WIDE_INDEX (every
    launch on the 64-bit path that larger launches take on the GPU)."""
    folder = tmp_path_factory.mktemp("conv_glue_host")
    source, library = folder / "conv_glue_host.cpp", folder / "conv_glue_host.so"
    source.write_text(SHIM + read_source("conv_glue.cu"), encoding="utf-8")
    wide = ["-DMINIBNN_GLUE_WIDE_INDEX"] if request.param == "wide index" else []
    done = subprocess.run([CXX, "-std=c++14", "-O1", "-Wall", *wide, "-shared", "-fPIC", "-o",
                           str(library), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    return ctypes.CDLL(str(library))


def _c_arg(a):
    """A kernel argument as ctypes passes it: arrays by their data pointer (that of the first
    element, as CuPy passes ``x.data.ptr``), NumPy scalars by their C type. A Python int
    or float is refused: its C type would be a guess, as it is for CuPy."""
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    for kind, c_type in ((np.int64, ctypes.c_longlong), (np.float32, ctypes.c_float),
                         (np.float64, ctypes.c_double)):
        if type(a) is kind:
            return c_type(a)
    raise TypeError(f"kernel argument {a!r} of type {type(a).__name__}")


@pytest.fixture(params=GEOMETRIES, ids=lambda g: f"grid{g[0]}x{g[1]}")
def glue(request, host_library, monkeypatch):
    """kernels.cupy_conv running its kernels on the host, on NumPy arrays."""
    blocks, threads = request.param
    launches = []

    def function(source, name):
        assert source == "conv_glue.cu"
        kernel = getattr(host_library, name)

        def launch(grid, block, args):
            assert isinstance(grid, tuple) and isinstance(block, tuple)
            assert grid[0] >= 1 and block == (cupy_conv._THREADS,)
            c_args = [_c_arg(a) for a in args]
            for b in range(blocks):
                for t in range(threads):
                    host_library.set_thread(blocks, threads, b, t)
                    kernel(*c_args)
            launches.append(name)
        return launch

    monkeypatch.setattr(cupy_conv, "_cp", lambda: Poisoned(np))
    monkeypatch.setattr(cupy_conv, "_function", function)
    monkeypatch.setattr(cupy_conv, "_is_device", lambda x: isinstance(x, np.ndarray))
    cupy_conv.launches = launches
    with backend.use("numpy"):
        yield cupy_conv
    del cupy_conv.launches


def _views(a):
    """a and views of it that a kernel must read through their strides."""
    return {"C": a, "permuted": np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
            "reversed": np.ascontiguousarray(a[..., ::-1])[..., ::-1]}


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_col2im_and_sign_patches(glue, shape, dtype):
    n, c, h, w, kh, kw, s, p = shape
    rng = np.random.default_rng(11)
    x = _signed(rng, (n, c, h, w), dtype)
    for name, view in _views(x).items():
        for pad_value in (0, 1):
            want = F.im2col(x, kh, kw, s, p, pad_value)
            got = glue.im2col(view, kh, kw, s, p, pad_value)
            assert got.dtype == want.dtype and got.T.flags.c_contiguous
            np.testing.assert_array_equal(got, want, err_msg=f"im2col {name} pad {pad_value}")
        want = reference.pack_rows(binary.conv_sign_patches(x, kh, kw, s, p))
        got = glue.pack_sign_patches(view, kh, kw, s, p)
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, want, err_msg=f"pack_sign_patches {name}")
    _, _, ho, wo = F.conv_output_shape(x.shape, (1, c, kh, kw), s, p)
    cols = rng.standard_normal((n * ho * wo, c * kh * kw)).astype(dtype)
    want = F.col2im(cols, x.shape, kh, kw, s, p)
    strided = np.zeros((cols.shape[0], 2 * cols.shape[1]), dtype)[:, ::2]
    strided[...] = cols
    for layout in (cols, np.asfortranarray(cols), strided):
        got = glue.col2im(layout, x.shape, kh, kw, s, p)
        assert got.dtype == want.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    if x.size:
        assert len(glue.launches) == 3 * 2 + 3 + 3  # one launch per call


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=IDS)
def test_im2col_bf16_is_the_bf16_rounding_of_the_patches(glue, shape):
    """``im2col(..., bf16=True)``: the float32 patches rounded to bfloat16 bits in the same
    pass, bit for bit ``kernels.bf16.round_bits`` of ``functional.im2col`` (values of every
    magnitude, ties, inf and NaN; every view; both pad values); float64 input is refused."""
    from minibnn.kernels import bf16
    n, c, h, w, kh, kw, s, p = shape
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((n, c, h, w)) * 2.0 ** rng.integers(-130, 120, (n, c, h, w)))
    x = x.astype(np.float32)
    if x.size >= 4:
        x.reshape(-1)[:4] = [np.inf, -np.nan, 1 + 2.0 ** -8, -(1 + 3 * 2.0 ** -8)]
    for name, view in _views(x).items():
        for pad_value in (0, 1):
            want = bf16.round_bits(F.im2col(x, kh, kw, s, p, pad_value))
            got = glue.im2col(view, kh, kw, s, p, pad_value, bf16=True)
            assert got.dtype == np.uint16 and got.T.flags.c_contiguous
            np.testing.assert_array_equal(got, want, err_msg=f"{name} pad {pad_value}")
    with pytest.raises(TypeError, match="float32"):
        glue.im2col(x.astype(np.float64), kh, kw, s, p, bf16=True)


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=POOL_IDS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_and_its_gradient(glue, shape, ties, dtype):
    n, c, h, w, k, s = shape
    rng = np.random.default_rng(12)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    if ties:
        x = rng.integers(-2, 3, size=x.shape).astype(dtype)
    xt = Tensor(x, requires_grad=True)
    out = F.max_pool2d(xt, k, s)
    g = rng.standard_normal(out.shape).astype(dtype)
    (out * Tensor(g)).sum().backward()
    for name, view in _views(x).items():
        best, arg = glue.max_pool2d(view, k, s)
        assert best.dtype == x.dtype and arg.dtype == np.uint8
        np.testing.assert_array_equal(best, out.data, err_msg=name)
        np.testing.assert_array_equal(arg, _first_argmax(x, k, s), err_msg=name)
    for g_view in (g, np.asfortranarray(g)):
        np.testing.assert_array_equal(glue.max_pool2d_backward(g_view, arg, x.shape, k, s), xt.grad)
    ones = np.broadcast_to(np.ones((), dtype), out.shape)  # zero strides, as sum's backward
    xt.grad = None
    F.max_pool2d(xt, k, s).sum().backward()
    np.testing.assert_array_equal(glue.max_pool2d_backward(ones, arg, x.shape, k, s), xt.grad)


def test_max_pool_int32_arg_and_nan(glue):
    """k*k >= 256 takes the int32 entry points; a NaN is never greater, so a window that
    starts with one keeps it and a later one never takes over (as the NumPy code)."""
    rng = np.random.default_rng(13)
    x = rng.integers(-2, 3, size=(2, 2, 17, 18)).astype(np.float32)
    best, arg = glue.max_pool2d(x, 16, 1)
    assert arg.dtype == np.int32
    np.testing.assert_array_equal(arg, _first_argmax(x, 16, 1))
    g = rng.standard_normal(best.shape).astype(np.float32)
    xt = Tensor(x, requires_grad=True)
    (F.max_pool2d(xt, 16, 1) * Tensor(g)).sum().backward()
    np.testing.assert_array_equal(glue.max_pool2d_backward(g, arg, x.shape, 16, 1), xt.grad)
    y = rng.standard_normal((1, 2, 6, 6))
    y[0, 0, 0, 0] = y[0, 1, 3, 3] = np.nan
    pool = F.MaxPool2d()
    want = pool.forward(y, 2, 2)
    best, arg = glue.max_pool2d(y, 2, 2)
    np.testing.assert_array_equal(best, want)
    np.testing.assert_array_equal(arg, pool.saved[0])
    patches = binary.conv_sign_patches(y, 3, 3, 1, 1)  # NaN >= 0 is False: bit 0
    np.testing.assert_array_equal(glue.pack_sign_patches(y, 3, 3, 1, 1),
                                  reference.pack_rows(patches))


def test_col2im_sums_in_the_order_of_the_slice_adds(glue):
    """1e8 + 1 - 1e8 is 0 or 1 in float32 depending on the order of the additions: the
    kernel agrees with the NumPy slice-adds, which the offsets taken backwards do not."""
    rng = np.random.default_rng(14)
    cols = rng.choice(np.array([1e8, -1e8, 1.0, 3.0], np.float32), size=(4 * 5, 2 * 9))
    want = F.col2im(cols, (1, 2, 4, 5), 3, 3, 1, 1)
    np.testing.assert_array_equal(glue.col2im(cols, (1, 2, 4, 5), 3, 3, 1, 1), want)
    backwards = np.zeros((1, 2, 6, 7), np.float32)
    blocks = cols.T.reshape(2, 3, 3, 1, 4, 5)
    for i, j, rows, columns in reversed(list(F.kernel_offsets(3, 3, 1, 4, 5))):
        backwards[:, :, rows, columns] += blocks[:, i, j].transpose(1, 0, 2, 3)
    assert not np.array_equal(backwards[:, :, 1:-1, 1:-1], want)  # so this test can fail
