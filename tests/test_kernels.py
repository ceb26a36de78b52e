"""Bit packing and XNOR GEMM on every available backend, bit-exact against float matmul.

The NumPy reference and the Numba kernels always run; the CuPy kernels run when CuPy
and a GPU are present (tests marked ``gpu``, skipped with the reason otherwise).
"""

import importlib
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minibnn import kernels
from conftest import REASONS, backend_params, planted_thresholds
from minibnn.kernels import cupy_gpu, numba_cpu, reference
from minibnn.backend import KERNEL_MODULES


def per_backend(values):
    """One ``pytest.param`` per backend named in ``values`` ({backend: value}), carrying that
    backend's marks (``gpu`` for cupy; skipped with the backend's reason where it cannot run)."""
    return [pytest.param(values[p.values[0]], marks=p.marks, id=p.id)
            for p in backend_params(tuple(values))]


def per_kernel(variants):
    """Like :func:`per_backend` for {backend: {kernel variant: value}}, ids ``backend-variant``."""
    return [pytest.param(value, marks=p.marks, id=f"{p.id}-{kn}")
            for p in backend_params(tuple(variants))
            for kn, value in variants[p.values[0]].items()]


def _to_host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _gpu_pack(x):
    return _to_host(cupy_gpu.pack_rows(x))


def _skip_unless_available(kernel):
    """Skip unless this GPU runs ``kernel`` (the tensor-core forms need compute capability
    8.0; the 256-row tile needs 144 KiB of shared memory per block, which 8.6 / 8.9 lack)."""
    names = cupy_gpu.available_kernels()
    if kernel not in names:
        pytest.skip(f"kernel {kernel!r} does not run on this GPU (it runs {names})")


def _gpu_gemm(kernel):
    def run(a, b, k):
        _skip_unless_available(kernel)
        return _to_host(cupy_gpu.xnor_gemm(a, b, k, kernel=kernel))

    return run


def _numba_gemm(kernel):
    return lambda a, b, k: numba_cpu.xnor_gemm(a, b, k, kernel=kernel)


PACKERS = per_backend({"numpy": reference.pack_rows, "numba": numba_cpu.pack_rows,
                       "cupy": _gpu_pack})

# every GEMM kernel name of cupy_gpu on a GPU of compute capability >= 8.0 (as the machines
# this suite meets on the GPU have; the wgmma forms on 9.0 alone, skipped elsewhere):
# "tensorcore" runs the form its autotune picks for the shape class, and each form is also
# tested by name
CUPY_KERNELS = ("tensorcore", "tensorcore_direct", "tensorcore_tiled", "tensorcore_tiled256",
                "tensorcore_direct_ldm", "tensorcore_tiled_ldm", "tensorcore_tiled256_ldm",
                "tensorcore_wgmma", "tensorcore_wgmma128", "cuda")

GEMMS = [pytest.param(reference.xnor_gemm, id="numpy")]
GEMMS += per_kernel({"numba": {kn: _numba_gemm(kn) for kn in numba_cpu.available_kernels()},
                     "cupy": {kn: _gpu_gemm(kn) for kn in CUPY_KERNELS}})

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def pm1(x):
    """The +-1 matrix the packed bits stand for: sign(x) with sign(0) = +1 (bool: True = +1)."""
    x = np.asarray(x)
    return np.where(x if x.dtype == bool else x >= 0, 1.0, -1.0)


def random_values(rng, shape, dtype, zeros=0.2):
    """Random values of ``dtype`` with about a fraction ``zeros`` planted exact zeros."""
    if np.dtype(dtype) == bool:
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)
    x[rng.random(shape) < zeros] = 0
    return x


K_VALUES = st.one_of(st.sampled_from([1, 63, 64, 65, 127, 128, 129, 4097]), st.integers(1, 700))
DTYPES = st.sampled_from([np.float32, np.float64, np.int32, np.int8, np.bool_])


# ---------------------------------------------------------------------- interface

# The functions every backend module provides and their leading parameters, as written in
# the kernels/__init__.py docstring.
INTERFACE = {"pack_rows": ("x",), "xnor_gemm": ("a", "b", "k"),
             "pack_bitplanes": ("x",), "bitplane_gemm": ("planes", "b", "k")}


def test_interface_is_documented_as_tested():
    for name, params in INTERFACE.items():
        assert f"``{name}({', '.join(params)})``" in kernels.__doc__, name


@pytest.mark.parametrize("backend_name", sorted(KERNEL_MODULES))
def test_every_backend_module_has_the_interface(backend_name):
    """Checked on the modules themselves, so it holds without a GPU: importing
    ``kernels.cupy_gpu`` needs no CuPy."""
    mod = importlib.import_module(KERNEL_MODULES[backend_name])
    for name, params in INTERFACE.items():
        assert name in mod.__all__, name
        sig = inspect.signature(getattr(mod, name))
        ps = list(sig.parameters.values())
        assert tuple(p.name for p in ps[:len(params)]) == params, (name, sig)
        assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ps[:len(params)]), (name, sig)
        extra = ps[len(params):]
        assert all(p.default is not p.empty for p in extra), (name, sig)
    if hasattr(mod, "available_kernels"):
        assert {"available_kernels", "default_kernel"} <= set(mod.__all__)
        kernel = inspect.signature(mod.xnor_gemm).parameters.get("kernel")
        assert kernel is not None and kernel.default is None


def test_numba_kernel_variants():
    """The variants on offer follow the CPU's features (``autotune.isa_features``); the
    default is whichever the autotune picks, always one of them."""
    from minibnn.kernels import autotune, numba_avx2

    names = numba_cpu.available_kernels()
    f = autotune.isa_features()["features"]
    assert names[:2] == ("generic", "scalar")
    assert set(names) <= {"generic", "scalar", "simd256", "simd512", "avx2", "avx512bw",
                          "hs256", "hs512", "bcast256", "bcast512"}
    assert ("avx2" in names) == numba_avx2.host_has_avx2() == f["avx2"]
    assert ("avx512bw" in names) == numba_avx2.host_has_avx512bw() == f["avx512bw"]
    assert ("simd256" in names) == ("hs256" in names) == ("bcast256" in names) == f["avx2"]
    assert ("simd512" in names) == ("hs512" in names) == ("bcast512" in names) == f["avx512f"]
    assert numba_cpu.default_kernel() in names
    assert numba_cpu.default_kernel(5, 3, 70) in names


# ------------------------------------------------------------------------ packing


@pytest.mark.parametrize("pack", PACKERS)
@SETTINGS
@given(rows=st.integers(0, 6), k=K_VALUES, dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_pack_matches_packbits(pack, rows, k, dtype, seed):
    x = random_values(np.random.default_rng(seed), (rows, k), dtype)
    bits = x if x.dtype == bool else x >= 0
    expect = np.packbits(bits, axis=-1, bitorder="little")
    expect = np.pad(expect, ((0, 0), (0, (-expect.shape[1]) % 8))).view("<u8")
    got = pack(x)
    assert got.dtype == np.uint64 and got.shape == (rows, (k + 63) // 64)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("pack", PACKERS)
def test_sign_of_zero_is_plus_one(pack):
    x = np.zeros((3, 70), dtype=np.float32)
    x[1] = -0.0  # -0.0 >= 0 too
    x[2, ::2] = -1.0
    got = pack(x)
    full, tail = np.uint64(2**64 - 1), np.uint64(2**6 - 1)
    assert (got[:2, 0] == full).all() and (got[:2, 1] == tail).all()
    assert got[2, 0] == np.uint64(0xAAAAAAAAAAAAAAAA)  # odd positions are the zeros
    assert got[2, 1] == np.uint64(0b101010)


@pytest.mark.parametrize("pack", PACKERS)
def test_pack_non_contiguous_and_other_ranks(pack):
    rng = np.random.default_rng(1)
    base = random_values(rng, (40, 300), np.float32)
    for view in (base[::3, 5:200:2], base.T, base[::-1, ::-1], base[:, 7:], base.T[::2]):
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(pack(view), reference.pack_rows(np.ascontiguousarray(view)))
    cube = random_values(rng, (2, 3, 65), np.float64)
    np.testing.assert_array_equal(pack(cube).reshape(6, 2), reference.pack_rows(cube.reshape(6, 65)))
    vec = random_values(rng, (130,), np.int32)
    got = pack(vec)
    assert got.shape == (3,)
    np.testing.assert_array_equal(got, reference.pack_rows(vec[None])[0])


@pytest.mark.parametrize("pack", PACKERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_nan_raises(pack, dtype):
    x = np.ones((4, 100), dtype=dtype)
    x[2, 77] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pack(x)


@pytest.mark.parametrize("pack", PACKERS[:2])
def test_pack_rejects_complex(pack):
    with pytest.raises(TypeError, match="complex128"):
        pack(np.ones((2, 3), dtype=complex))


@SETTINGS
@given(rows=st.integers(0, 5), k=K_VALUES, seed=st.integers(0, 2**32 - 1))
def test_unpack_round_trip(rows, k, seed):
    x = random_values(np.random.default_rng(seed), (rows, k), np.float64)
    for packed in (reference.pack_rows(x), numba_cpu.pack_rows(x)):
        back = numba_cpu.unpack_rows(packed, k, dtype=np.int8)
        assert back.dtype == np.int8 and back.shape == (rows, k)
        np.testing.assert_array_equal(back, pm1(x))
        np.testing.assert_array_equal(reference.pack_rows(back), packed)


def test_unpack_checks_word_count():
    with pytest.raises(ValueError, match=r"ceil\(k/64\)"):
        reference.unpack_rows(np.zeros((2, 3), np.uint64), 64)


# ---------------------------------------------------------------------------- GEMM


def float_matmul(x, y):
    return (pm1(x) @ pm1(y).T).astype(np.int64)


@pytest.mark.parametrize("gemm", GEMMS)
@SETTINGS
@given(m=st.integers(0, 9), n=st.integers(0, 9), k=K_VALUES,
       dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_gemm_matches_float_matmul(gemm, m, n, k, dtype, seed):
    rng = np.random.default_rng(seed)
    x = random_values(rng, (m, k), dtype)
    y = random_values(rng, (n, k), dtype)
    a, b = reference.pack_rows(x), reference.pack_rows(y)
    got = gemm(a, b, k)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, float_matmul(x, y))


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("m,n,k", [(37, 515, 4097), (130, 70, 700), (1, 300, 8300),
                                   (301, 1, 1000), (129, 129, 9000), (5, 260, 64)])
def test_gemm_tiles_and_blocks(gemm, m, n, k):
    """Shapes crossing register tiles, the N and K cache blocks and the GPU tiles."""
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    x = random_values(rng, (m, k), np.float32)
    y = random_values(rng, (n, k), np.float32)
    a, b = numba_cpu.pack_rows(x), numba_cpu.pack_rows(y)
    got = gemm(a, b, k)
    np.testing.assert_array_equal(got, float_matmul(x, y))
    np.testing.assert_array_equal(got, reference.xnor_gemm(a, b, k))


@pytest.mark.parametrize("gemm", GEMMS)
def test_gemm_non_contiguous_operands(gemm):
    rng = np.random.default_rng(5)
    k = 200
    x = random_values(rng, (20, k), np.float32)
    y = random_values(rng, (30, k), np.float32)
    wide_a = np.zeros((20, 9), np.uint64)
    wide_a[:, 2:6] = reference.pack_rows(x)
    b_t = np.asfortranarray(reference.pack_rows(y))  # (30, 4), column-major
    a = wide_a[:, 2:6]
    assert not a.flags.c_contiguous and not b_t.flags.c_contiguous
    np.testing.assert_array_equal(gemm(a, b_t, k), float_matmul(x, y))
    np.testing.assert_array_equal(gemm(a[::2], b_t[::-3], k), float_matmul(x[::2], y[::-3]))


@pytest.mark.parametrize("gemm", GEMMS)
def test_gemm_empty(gemm):
    a = np.zeros((0, 2), np.uint64)
    b = np.zeros((4, 2), np.uint64)
    assert gemm(a, b, 100).shape == (0, 4)
    assert gemm(b, a, 100).shape == (4, 0)
    z = gemm(np.zeros((3, 0), np.uint64), np.zeros((2, 0), np.uint64), 0)
    assert z.shape == (3, 2) and (z == 0).all()


# ----------------------------------------------------------------------- bad input

CHECKED = per_backend({"numpy": reference.xnor_gemm, "numba": numba_cpu.xnor_gemm,
                       "cupy": cupy_gpu.xnor_gemm})


@pytest.mark.parametrize("gemm", CHECKED)
def test_gemm_rejects_bad_operands(gemm):
    good = np.zeros((3, 2), np.uint64)
    cases = [
        ((np.zeros((3, 2), np.float32), good, 100), r"a: expected packed uint64 words.*float32.*pack_rows"),
        ((good, np.zeros((3, 2), np.int64), 100), r"b: expected packed uint64.*int64"),
        ((good, np.zeros((3, 3), np.uint64), 100), r"b: expected 2 words per row for k=100.*\(3, 3\)"),
        ((good, good, 129), r"a: expected 3 words per row for k=129"),
        ((np.zeros(2, np.uint64), good, 100), r"a: expected a 2-D array.*\(2,\)"),
        ((good, np.zeros((1, 3, 2), np.uint64), 100), r"b: expected a 2-D array"),
        ((good, good, -5), r"k: expected a non-negative integer"),
        ((good, good, 100.0), r"k: expected a non-negative integer"),
        (([[1, 2]], good, 100), r"a: expected"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            gemm(*args)


@pytest.mark.parametrize("gemm", CHECKED[:2])
def test_gemm_rejects_nonzero_padding(gemm):
    a = reference.pack_rows(np.ones((2, 100)))
    a[1, 1] |= np.uint64(1) << np.uint64(40)  # bit 104 > k
    with pytest.raises(ValueError, match="a: padding bits 36..63"):
        gemm(a, a.copy() * 0, 100)


def test_numba_rejects_unknown_kernel():
    a = np.zeros((1, 1), np.uint64)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        numba_cpu.xnor_gemm(a, a, 64, kernel="fortran")


@pytest.mark.gpu
@pytest.mark.skipif(REASONS["cupy"] is not None, reason=str(REASONS["cupy"]))
def test_cupy_pack_reads_device_views_in_place():
    import cupy as cp

    rng = np.random.default_rng(9)
    host = random_values(rng, (50, 333), np.float32)
    dev = cp.asarray(host)
    for h, d in ((host[::3, 4:300:2], dev[::3, 4:300:2]), (host.T, dev.T),
                 (host[::-1, ::-1], dev[::-1, ::-1])):
        np.testing.assert_array_equal(cupy_gpu.pack_rows(d).get(), reference.pack_rows(h))
    got = cupy_gpu.xnor_gemm(cupy_gpu.pack_rows(dev), cupy_gpu.pack_rows(dev[:7]), 333)
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(got.get(), float_matmul(host, host[:7]))


# ------------------------------------------------------- 8-bit input by bit planes

BITPLANES = per_backend({"numpy": reference, "numba": numba_cpu, "cupy": cupy_gpu})


@pytest.mark.parametrize("mod", BITPLANES)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 63, 5), (2, 64, 1), (5, 65, 7), (4, 784, 9),
                                     (1, 130, 3), (0, 784, 3), (4, 784, 0)])
def test_bitplane_gemm_is_the_exact_first_layer(mod, m, k, n):
    """z = sum_n 2^n (y^n . w) equals (2x - 255) . sign(w) in integers; pixel values 0, 255
    and everything between are planted."""
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    if x.size:
        x.flat[:2] = (0, 255)[: min(2, x.size)]
    w = random_values(rng, (n, k), np.float32)
    planes = mod.pack_bitplanes(x)
    assert planes.shape == (m, reference.PLANES, reference.n_words(k))
    np.testing.assert_array_equal(_to_host(planes), reference.pack_bitplanes(x))
    z = _to_host(mod.bitplane_gemm(planes, mod.pack_rows(w), k))
    assert z.dtype == np.int32
    np.testing.assert_array_equal(z, (2 * x.astype(np.int64) - 255) @ pm1(w).T)


@pytest.mark.parametrize("mod", BITPLANES)
def test_bitplane_inputs_are_checked_before_any_work(mod):
    x = np.zeros((2, 70), np.uint8)
    w = reference.pack_rows(np.ones((3, 70)))
    for bad in (x.astype(np.float32), x.astype(np.int16), x[0]):
        with pytest.raises(ValueError, match="uint8"):
            mod.pack_bitplanes(bad)
    planes = reference.pack_bitplanes(x)
    with pytest.raises(ValueError, match="planes"):
        mod.bitplane_gemm(planes[:, :4], w, 70)          # not 8 planes
    with pytest.raises(ValueError, match="planes"):
        mod.bitplane_gemm(planes.astype(np.float64), w, 70)
    with pytest.raises(ValueError):
        mod.bitplane_gemm(planes, w, 130)                # word count does not fit k


@pytest.mark.gpu
@pytest.mark.skipif(REASONS["cupy"] is not None, reason=str(REASONS["cupy"]))
def test_cupy_bitplane_gemm_splits_what_one_launch_cannot_cover(monkeypatch):
    """One GEMM launch covers at most ``_MAX_ROWS`` rows of A, and the bit-plane GEMM has 8
    per image: more images go in slices (a ConvNet's first layer on 2,048 MNIST images has
    12.8M plane rows). The limit is lowered here so that 17 images take 4 slices."""
    monkeypatch.setattr(cupy_gpu, "_MAX_ROWS", 8 * 5)
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (17, 100), dtype=np.uint8)
    w = random_values(rng, (6, 100), np.float32)
    z = _to_host(cupy_gpu.bitplane_gemm(cupy_gpu.pack_bitplanes(x), cupy_gpu.pack_rows(w), 100))
    assert z.dtype == np.int32
    np.testing.assert_array_equal(z, (2 * x.astype(np.int64) - 255) @ pm1(w).T)
    with pytest.raises(ValueError, match="a: M=41 rows exceed the launch grid limit of 40"):
        cupy_gpu.xnor_gemm(np.zeros((41, 2), np.uint64), np.zeros((3, 2), np.uint64), 100)


# ------------------------------------------------------------ threshold and pack

THRESHOLD_PACKERS = per_backend({"numpy": reference.pack_threshold,
                                 "numba": numba_cpu.pack_threshold,
                                 "cupy": lambda z, t: _to_host(cupy_gpu.pack_threshold(z, t))})


@pytest.mark.parametrize("pack", THRESHOLD_PACKERS)
@pytest.mark.parametrize("m,n,p", [(0, 5, 1), (1, 1, 1), (6, 70, 3), (10, 64, 1), (7, 1, 7),
                                   (100, 130, 1), (12, 200, 4),
                                   # last words of 16, 32, 48, 17, 33, 49 and 63 outputs
                                   (9, 16, 3), (4, 32, 1), (5, 48, 5), (3, 81, 1), (6, 97, 2),
                                   (2, 113, 1), (3, 127, 3)])
@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.int64])
def test_pack_threshold_is_compare_then_pack(pack, m, n, p, dtype):
    rng = np.random.default_rng(m * 100 + n + p)
    z = rng.integers(-6, 6, size=(m, n)).astype(dtype)
    t = rng.integers(-5, 5, size=(p, n) if p > 1 else (n,)).astype(dtype)
    want = reference.pack_rows((z.reshape(-1, p, n) >= t.reshape(1, -1, n)).reshape(m, n))
    got = pack(z, t)
    assert got.dtype == np.uint64 and got.shape == (m, (n + 63) // 64)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pack", THRESHOLD_PACKERS)
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
@pytest.mark.parametrize("n", [150, 176])
def test_pack_threshold_edge_values(pack, dtype, n):
    """The extremes of the type, signed comparison (int32 minimum against maximum), NaN
    (never >=: bit 0, as NumPy's comparison), infinities and -0.0 == +0.0, in whole 64-bit
    words (numba's vector compare) and in a last partial word (22 outputs: 16 + 6; 48: 32
    + 16); a non-contiguous z too."""
    rng = np.random.default_rng(7)
    if dtype == np.int32:
        pool = np.array([np.iinfo(np.int32).min, -1, 0, 1, np.iinfo(np.int32).max], dtype)
    else:
        pool = np.array([np.nan, -np.inf, -1.5, -0.0, 0.0, 2.0, np.inf], dtype)
    z = rng.choice(pool, size=(9, n))
    t = rng.choice(pool, size=(3, n))
    want = reference.pack_rows((z.reshape(-1, 3, n) >= t[None]).reshape(9, n))
    np.testing.assert_array_equal(pack(z, t), want)
    zt = np.asfortranarray(z)
    np.testing.assert_array_equal(pack(zt, t), want)


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_numba_pack_threshold_serial_and_parallel_passes(dtype):
    """Small z runs on one thread, large z in parallel: both give the reference's bits."""
    rng = np.random.default_rng(11)
    for m, n, p in [(1100, 1000, 4), (7, 113, 7), (5, 16, 1)]:  # 1.1M outputs: parallel
        z = rng.integers(-6, 6, size=(m, n)).astype(dtype)
        t = rng.integers(-5, 5, size=(p, n)).astype(dtype)
        want = reference.pack_rows((z.reshape(-1, p, n) >= t[None]).reshape(m, n))
        np.testing.assert_array_equal(numba_cpu.pack_threshold(z, t), want)
        for run in (numba_cpu._pack_threshold_vec, numba_cpu._pack_threshold_vec_serial):
            out = np.full_like(want, 7)
            run(z, t, out, dtype == np.float32)
            np.testing.assert_array_equal(out, want)
    assert 1100 * 1000 >= numba_cpu._SERIAL_PACK > 7 * 113


@pytest.mark.parametrize("pack", THRESHOLD_PACKERS)
def test_pack_threshold_rejects_bad_operands(pack):
    z = np.zeros((6, 5), np.int32)
    cases = [((z, np.zeros(4, np.int32)), r"threshold: expected shape \(5,\) or \(P, 5\)"),
             ((z, np.zeros((4, 5), np.int32)), r"P dividing M = 6"),
             ((z[0], np.zeros(5, np.int32)), r"z: expected a 2-D array"),
             ((z.astype(bool), np.zeros(5, np.int32)), r"z: expected an integer or real"),
             ((z, np.zeros(5, np.complex64)), r"threshold: expected an integer or real")]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            pack(*args)


def test_numba_pack_threshold_reuses_out():
    z = np.arange(-50, 50, dtype=np.int32).reshape(4, 25)
    out = np.full((4, 1), 7, np.uint64)
    got = numba_cpu.pack_threshold(z, np.zeros(25, np.int32), out=out)
    assert got is out
    np.testing.assert_array_equal(out, reference.pack_rows(z >= 0))
    with pytest.raises(ValueError, match=r"out: expected a C-contiguous uint64 array of shape"):
        numba_cpu.pack_threshold(z, np.zeros(25, np.int32), out=np.zeros((4, 2), np.uint64))


# ------------------------------------------- GEMM with the threshold in its epilogue (cupy)

GPU_KERNELS = [pytest.param(kn, marks=p.marks, id=kn) for p in backend_params(("cupy",))
               for kn in CUPY_KERNELS]


def _fused_case(rng, m, n, k, periods):
    """Packed operands and int thresholds (periods, n) taken from the products themselves
    (so about half the bits fire), with the int32 extremes planted (never, always)."""
    a = reference.pack_rows(random_values(rng, (m, k), np.float32))
    b = reference.pack_rows(random_values(rng, (n, k), np.float32))
    z = reference.xnor_gemm(a, b, k)
    thr = planted_thresholds(rng, z, periods)
    return a, b, thr, reference.pack_threshold(z, thr)


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("m,n,k,periods", [(1, 1, 1, 1), (130, 200, 700, 2), (37, 515, 4097, 1),
                                           (129, 129, 9000, 3), (5, 64, 64, 5), (12, 33, 65, 4),
                                           (301, 96, 1000, 7), (3, 127, 130, 1), (0, 70, 100, 1),
                                           (6, 300, 129, 6)])
@pytest.mark.parametrize("prepared", [False, True], ids=["b", "prepared"])
def test_cupy_gemm_threshold_is_gemm_then_pack(kernel, m, n, k, periods, prepared):
    """gemm_threshold = pack_threshold(xnor_gemm): bits, padding bits 0, every word of the
    output written (it starts as garbage), row periods of a conv table, int32/int64 tables,
    on every kernel and form and with B prepared."""
    _skip_unless_available(kernel)
    rng = np.random.default_rng(m * 13 + n * 7 + k + periods)
    a, b, thr, want = _fused_case(rng, m, n, k, periods)
    bb = cupy_gpu.prepare_weights(b) if prepared else b
    for t in (thr, np.clip(thr, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)):
        got = _to_host(cupy_gpu.gemm_threshold(a, bb, k, t, kernel=kernel))
        assert got.dtype == np.uint64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_to_host(cupy_gpu.xnor_gemm(a, bb, k, kernel=kernel)),
                                  reference.xnor_gemm(a, b, k))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_cupy_gemm_threshold_empty_and_k0(kernel):
    _skip_unless_available(kernel)
    t = np.zeros(5, np.int32)
    assert _to_host(cupy_gpu.gemm_threshold(np.zeros((0, 2), np.uint64),
                                            np.zeros((5, 2), np.uint64), 100, t,
                                            kernel=kernel)).shape == (0, 1)
    assert _to_host(cupy_gpu.gemm_threshold(np.zeros((3, 2), np.uint64),
                                            np.zeros((0, 2), np.uint64), 100,
                                            np.zeros(0, np.int32), kernel=kernel)).shape == (3, 0)
    # k = 0: every product is 0, so bit j is 0 >= t[j]
    t = np.array([0, 1, -1, 0, 5], np.int32)
    got = _to_host(cupy_gpu.gemm_threshold(np.zeros((3, 0), np.uint64),
                                           np.zeros((5, 0), np.uint64), 0, t, kernel=kernel))
    np.testing.assert_array_equal(got, np.full((3, 1), 0b01101, np.uint64))


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_cupy_gemm_threshold_rejects_bad_operands(kernel):
    _skip_unless_available(kernel)
    good = np.zeros((6, 2), np.uint64)
    cases = [((good, good, 100, np.zeros(6, np.float32)), r"threshold: expected integers exact"),
             ((good, good, 100, np.zeros(6, np.uint64)), r"threshold: expected integers exact"),
             ((good, good, 100, np.zeros(5, np.int32)), r"threshold: expected shape \(6,\)"),
             ((good, good, 100, np.zeros((4, 6), np.int32)), r"P dividing M = 6"),
             ((good, good[:, :1], 100, np.zeros(6, np.int32)), r"b: expected 2 words"),
             ((good, np.zeros((6, 2), np.int64), 100, np.zeros(6, np.int32)), r"b: expected packed")]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            cupy_gpu.gemm_threshold(*args, kernel=kernel)


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
def test_cupy_prepared_weights_are_a_copy(backend_name):
    rng = np.random.default_rng(2)
    b = reference.pack_rows(rng.standard_normal((70, 130)))
    a = reference.pack_rows(rng.standard_normal((9, 130)))
    prepared = cupy_gpu.prepare_weights(b)
    assert cupy_gpu.prepare_weights(prepared) is prepared
    want = reference.xnor_gemm(a, b, 130)
    b[:] = 0  # later writes do not reach the prepared copy
    np.testing.assert_array_equal(_to_host(cupy_gpu.xnor_gemm(a, prepared, 130)), want)
    with pytest.raises(ValueError, match=r"b: expected a 2-D uint64 array"):
        cupy_gpu.prepare_weights(np.zeros((3, 2), np.int64))


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
def test_cupy_prepared_weights_keep_no_operand_made_inside_a_graph_capture(backend_name,
                                                                           monkeypatch):
    """The tiled tensor-core form of prepared weights is made once and kept, but not while a
    CUDA graph is being captured (it would be filled only by the graph's replays, in the
    graph's own memory): then it is made for that product alone, and kept at the next
    product outside a capture. The results are the same either way."""
    if "tensorcore_tiled" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no b1 tensor cores (compute capability < 8.0)")
    rng = np.random.default_rng(3)
    b = reference.pack_rows(rng.standard_normal((70, 130)))
    a = reference.pack_rows(rng.standard_normal((9, 130)))
    want = reference.xnor_gemm(a, b, 130)
    prepared = cupy_gpu.prepare_weights(b)
    monkeypatch.setattr(cupy_gpu, "_capturing", lambda: True)
    got = cupy_gpu.xnor_gemm(a, prepared, 130, kernel="tensorcore_tiled")
    np.testing.assert_array_equal(_to_host(got), want)
    assert prepared._tc is None
    monkeypatch.setattr(cupy_gpu, "_capturing", lambda: False)
    np.testing.assert_array_equal(
        _to_host(cupy_gpu.xnor_gemm(a, prepared, 130, kernel="tensorcore_tiled")), want)
    assert prepared._tc is not None


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("k", [640, 576, 100, 4097], ids=["w10", "w9", "w2", "w65"])
def test_cupy_gemm_reads_offset_and_strided_views(kernel, k):
    """Device views that start one row in (so with an odd number of words they are not
    16-byte aligned: the direct form's 8-byte copies) and column slices (not contiguous)
    give the reference products, and the operands are left as they were."""
    _skip_unless_available(kernel)
    import cupy as cp

    rng = np.random.default_rng(k)
    a = reference.pack_rows(rng.standard_normal((38, k)))
    b = reference.pack_rows(rng.standard_normal((131, k)))
    ad, bd = cp.asarray(a), cp.asarray(b)
    for x, y in ((ad[1:], bd[1:]), (ad[1:], bd), (ad[:, :], bd[2:])):
        got = _to_host(cupy_gpu.xnor_gemm(x, y, k, kernel=kernel))
        np.testing.assert_array_equal(got, reference.xnor_gemm(_to_host(x), _to_host(y), k))
    wide = np.zeros((38, a.shape[1] + 3), np.uint64)
    wide[:, 1:-2] = a  # a column slice: rows not contiguous
    got = _to_host(cupy_gpu.xnor_gemm(cp.asarray(wide)[:, 1:-2], bd, k, kernel=kernel))
    np.testing.assert_array_equal(got, reference.xnor_gemm(a, b, k))
    np.testing.assert_array_equal(_to_host(ad), a)
    np.testing.assert_array_equal(_to_host(bd), b)


def _recording_launches(monkeypatch):
    """The names of the GEMM entries launched from now on (cupy_gpu._function recorded)."""
    launched = []
    real = cupy_gpu._function

    def recording(source, name):
        if name.startswith("xnor_gemm"):
            launched.append(name)
        return real(source, name)

    monkeypatch.setattr(cupy_gpu, "_function", recording)
    return launched


def _product(threshold, a, b, k, kernel):
    """(the product or its threshold bits, what the reference gives)."""
    z = reference.xnor_gemm(a, b, k)
    if threshold:
        thr = np.zeros(b.shape[0], np.int32)
        return (_to_host(cupy_gpu.gemm_threshold(a, b, k, thr, kernel=kernel)),
                reference.pack_threshold(z, thr))
    return _to_host(cupy_gpu.xnor_gemm(a, b, k, kernel=kernel)), z


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
@pytest.mark.parametrize("threshold", [False, True], ids=["gemm", "threshold"])
def test_cupy_tensorcore_without_timing_picks_its_form_by_rows(backend_name, threshold,
                                                              monkeypatch):
    """With MINIBNN_GPU_AUTOTUNE=0 plain "tensorcore" launches the direct entry up to
    DIRECT_MAX_ROWS rows of A and the tiled one above, with the same products either way."""
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "0")
    monkeypatch.setattr(cupy_gpu, "DIRECT_MAX_ROWS", 5)
    launched = _recording_launches(monkeypatch)
    rng = np.random.default_rng(4)
    b = reference.pack_rows(rng.standard_normal((70, 300)))
    for m, entry in ((5, "xnor_gemm_tc_direct"), (6, "xnor_gemm_tc")):
        a = reference.pack_rows(rng.standard_normal((m, 300)))
        launched.clear()
        got, want = _product(threshold, a, b, 300, "tensorcore")
        np.testing.assert_array_equal(got, want)
        assert launched == [entry + ("_threshold" if threshold else "")]


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
@pytest.mark.parametrize("threshold", [False, True], ids=["gemm", "threshold"])
def test_cupy_tensorcore_times_its_forms_once_per_shape_class(backend_name, threshold,
                                                              monkeypatch):
    """The first "tensorcore" product of a shape class launches every tensor-core form once
    and then 3 times each, taking turns, keeps the times and the fastest, and gives the
    reference result; later products of the class launch only that form; a product met
    while a graph is being captured runs the untimed rule and leaves its class untimed;
    MINIBNN_TC_FORM names a form (a wrong name is a ValueError)."""
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    assert cupy_gpu._capturing() is False
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "1")
    monkeypatch.setattr(cupy_gpu, "_form_choice", {})
    monkeypatch.setattr(cupy_gpu, "form_timings", {})
    monkeypatch.setattr(cupy_gpu, "form_disagreements", {})
    forms = [f for f in cupy_gpu.available_kernels() if f.startswith("tensorcore_")]
    entry = {"tensorcore_direct": "xnor_gemm_tc_direct", "tensorcore_tiled": "xnor_gemm_tc",
             "tensorcore_tiled256": "xnor_gemm_tc256",
             "tensorcore_direct_ldm": "xnor_gemm_tcl_direct",
             "tensorcore_tiled_ldm": "xnor_gemm_tcl", "tensorcore_tiled256_ldm": "xnor_gemm_tcl256",
             "tensorcore_wgmma": "xnor_gemm_wg", "tensorcore_wgmma128": "xnor_gemm_wg128"}
    assert set(forms) <= set(entry)
    suffix = "_threshold" if threshold else ""
    launched = _recording_launches(monkeypatch)
    rng = np.random.default_rng(6)
    b = reference.pack_rows(rng.standard_normal((70, 300)))
    a = reference.pack_rows(rng.standard_normal((9, 300)))
    got, want = _product(threshold, a, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert launched == [entry[f] + suffix for f in forms] * 4
    assert not cupy_gpu.form_disagreements  # every form gave the first one's product
    (key, times), = cupy_gpu.form_timings.items()
    assert key[1:] == (9 .bit_length(), 70 .bit_length(), 5 .bit_length())
    assert set(times) == set(forms) and all(t > 0 for t in times.values())
    best = min(times, key=times.get)
    launched.clear()
    a2 = reference.pack_rows(rng.standard_normal((12, 300)))  # the same class (8..15 rows)
    got, want = _product(threshold, a2, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert launched == [entry[best] + suffix]

    monkeypatch.setattr(cupy_gpu, "_capturing", lambda: True)
    launched.clear()
    a3 = reference.pack_rows(rng.standard_normal((40, 300)))  # a new class, while capturing
    got, want = _product(threshold, a3, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert launched == ["xnor_gemm_tc_direct" + suffix] and len(cupy_gpu.form_timings) == 1
    monkeypatch.undo()

    monkeypatch.setattr(cupy_gpu, "_form_choice", {})
    launched = _recording_launches(monkeypatch)
    monkeypatch.setenv("MINIBNN_TC_FORM", "tensorcore_tiled")
    got, want = _product(threshold, a, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert launched == ["xnor_gemm_tc" + suffix]
    monkeypatch.setenv("MINIBNN_TC_FORM", "tiled")
    with pytest.raises(ValueError, match=r"MINIBNN_TC_FORM: expected one of \['tensorcore_direct'"):
        cupy_gpu.xnor_gemm(a, b, 300)


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
def test_cupy_256_row_tile_needs_its_shared_memory(backend_name, monkeypatch):
    """The 256 x 128 tiles take 144 KiB (ld.shared) and 120 KiB (ldmatrix) of shared memory
    per block: a GPU that lets a block opt in to less (compute capability 8.6 / 8.9: 99 KiB)
    does not list them, and naming one there is a ValueError before any launch; one with
    room for the ldmatrix form's 120 KiB but not 144 lists that form alone."""
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "")  # every form, the unproven ones included
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setattr(cupy_gpu, "_max_shared_per_block", lambda: 99 * 1024)
    names = cupy_gpu.available_kernels()
    # (the 128 x 128 wgmma form, 97.5 KiB, on compute capability 9.0 alone)
    wgmma128 = ("tensorcore_wgmma128",) if cupy_gpu._capability() == 90 else ()
    assert names == ("tensorcore", "tensorcore_direct", "tensorcore_tiled",
                     "tensorcore_direct_ldm", "tensorcore_tiled_ldm", *wgmma128, "cuda")
    a = np.zeros((3, 2), np.uint64)
    for name in ("tensorcore_tiled256", "tensorcore_tiled256_ldm"):
        with pytest.raises(ValueError, match=rf"kernel: expected one of .* got '{name}'"):
            cupy_gpu.xnor_gemm(a, a, 100, kernel=name)
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setattr(cupy_gpu, "_max_shared_per_block", lambda: cupy_gpu._TCL256_SMEM_BYTES)
    names = cupy_gpu.available_kernels()
    assert "tensorcore_tiled256_ldm" in names and "tensorcore_tiled256" not in names
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setattr(cupy_gpu, "_max_shared_per_block", lambda: cupy_gpu._TC256_SMEM_BYTES)
    assert {"tensorcore_tiled256", "tensorcore_tiled256_ldm"} <= set(cupy_gpu.available_kernels())


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
def test_cupy_forms_not_yet_proven_on_a_gpu_are_left_out_by_default(backend_name, monkeypatch):
    """While MINIBNN_TC_EXCLUDE is unset, the forms of UNPROVEN_FORMS (never yet run on a
    GPU) are not listed, so neither a caller nor the autotune can run them; set and empty, it
    lists every form the GPU has room for, those included."""
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    assert cupy_gpu.UNPROVEN_FORMS <= set(cupy_gpu._TC_FORMS)
    assert "tensorcore_direct" not in cupy_gpu.UNPROVEN_FORMS
    assert "tensorcore_tiled" not in cupy_gpu.UNPROVEN_FORMS
    monkeypatch.delenv("MINIBNN_TC_EXCLUDE", raising=False)
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    assert cupy_gpu.excluded_forms() == cupy_gpu.UNPROVEN_FORMS
    unset = cupy_gpu.available_kernels()
    assert not set(unset) & cupy_gpu.UNPROVEN_FORMS and "tensorcore_direct" in unset
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "")
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    assert cupy_gpu.excluded_forms() == frozenset()
    every = cupy_gpu.available_kernels()
    assert set(unset) < set(every) and set(every) - set(unset) <= cupy_gpu.UNPROVEN_FORMS
    a = np.zeros((3, 2), np.uint64)
    monkeypatch.delenv("MINIBNN_TC_EXCLUDE")
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    with pytest.raises(ValueError, match=r"kernel: expected one of .* got 'tensorcore_tiled_ldm'"):
        cupy_gpu.xnor_gemm(a, a, 100, kernel="tensorcore_tiled_ldm")


@pytest.mark.parametrize("backend_name", backend_params(("cupy",)))
def test_cupy_forms_named_in_MINIBNN_TC_EXCLUDE_are_never_run(backend_name, monkeypatch):
    """MINIBNN_TC_EXCLUDE leaves the forms it names out of available_kernels: naming one
    is then a ValueError before any launch, plain "tensorcore" neither times nor runs it,
    and its untimed rule falls back to the first form left when the direct or tiled form is
    excluded; excluding every form leaves "cuda" alone as the default; an unknown name is
    a ValueError that lists the forms."""
    if "tensorcore" not in cupy_gpu.available_kernels():
        pytest.skip("this GPU has no binary tensor cores (compute capability < 8.0)")
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setattr(cupy_gpu, "_form_choice", {})
    monkeypatch.setattr(cupy_gpu, "form_timings", {})
    monkeypatch.setattr(cupy_gpu, "form_disagreements", {})
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "1")
    monkeypatch.delenv("MINIBNN_TC_FORM", raising=False)
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "")
    all_forms = [f for f in cupy_gpu._TC_FORMS if f in cupy_gpu._tc_forms()]
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", " tensorcore_direct, tensorcore_tiled_ldm ,")
    assert cupy_gpu.excluded_forms() == {"tensorcore_direct", "tensorcore_tiled_ldm"}
    names = cupy_gpu.available_kernels()
    left = [f for f in all_forms if f not in ("tensorcore_direct", "tensorcore_tiled_ldm")]
    assert names == ("tensorcore", *left, "cuda")
    rng = np.random.default_rng(8)
    a = reference.pack_rows(rng.standard_normal((9, 300)))
    b = reference.pack_rows(rng.standard_normal((70, 300)))
    with pytest.raises(ValueError, match=r"kernel: expected one of .* got 'tensorcore_direct'"):
        cupy_gpu.xnor_gemm(a, b, 300, kernel="tensorcore_direct")
    launched = _recording_launches(monkeypatch)
    got, want = _product(False, a, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert "xnor_gemm_tc_direct" not in launched and "xnor_gemm_tcl" not in launched
    (times,) = cupy_gpu.form_timings.values()
    assert set(times) == set(left)
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "0")  # untimed: direct is out, tiled is first
    monkeypatch.setattr(cupy_gpu, "_form_choice", {})
    launched.clear()
    got, want = _product(False, a, b, 300, "tensorcore")
    np.testing.assert_array_equal(got, want)
    assert launched == ["xnor_gemm_tc"]
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", ",".join(cupy_gpu._TC_FORMS))
    assert cupy_gpu.available_kernels() == ("cuda",)
    assert cupy_gpu.default_kernel() == "cuda"
    np.testing.assert_array_equal(cupy_gpu.xnor_gemm(a, b, 300).get(), want)
    monkeypatch.setattr(cupy_gpu, "_kernels", {})
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "tensorcore_tiled,ldm")
    with pytest.raises(ValueError, match=r"MINIBNN_TC_EXCLUDE: \['ldm'\] are not tensor-core "
                                         r"forms; expected names from \('tensorcore_direct'"):
        cupy_gpu.available_kernels()
