"""The CPU GEMM micro-kernels one by one, and the autotune that picks among them.

Every kernel the autotune can pick is checked bit-exact against ``kernels.reference`` on
awkward shapes, with both ways of splitting the work over threads; the autotune's cache is
written, read back, survives corruption with a warning, and a forced choice wins. No test
depends on which kernel is fastest here.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from minibnn.kernels import (autotune, numba_avx2, numba_cpu, numba_hs, numba_madd, numba_simd,
                             numba_vnni, reference)

SIMD = [k for k in numba_simd.KERNELS if k in numba_cpu.available_kernels()]
HS = [k for k in numba_hs.KERNELS if k in numba_cpu.available_kernels()]
NIBBLE = [k for k in numba_avx2.WORDS if k in numba_cpu.available_kernels()]

# (M, N, K): K not a multiple of 64 or of a vector, M or N of 1, odd sizes, more than one
# K block (W > 256 words) and more than one block of B rows.
AWKWARD = [(1, 1, 1), (1, 7, 65), (7, 1, 130), (3, 5, 63), (5, 3, 64 * 9 + 1), (4, 4, 512),
           (9, 13, 4095), (17, 33, 64 * 257 + 5), (6, 1030, 300), (33, 2, 1000), (2, 33, 200),
           (5, 6, 389), (3, 9, 784)]  # 7 words = 4 + 2 + 1, 13 words = 8 + 4 + 1


def operands(m, n, k, seed):
    rng = np.random.default_rng(seed)
    return (reference.pack_rows(rng.random((m, k)) < 0.5),
            reference.pack_rows(rng.random((n, k)) < 0.5))


@pytest.mark.parametrize("name", SIMD)
@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", AWKWARD)
def test_micro_kernels_bit_exact(name, cols, threads, m, n, k):
    a, b = operands(m, n, k, m * 1000 + n * 10 + k)
    cnt = np.zeros((m, n), np.int32)
    numba_simd.xnor_gemm_into(name, a, b, cnt, k, cols=cols, threads=threads)
    np.testing.assert_array_equal(cnt, reference.xnor_gemm(a, b, k))


BCAST = [k for k in numba_simd.BCAST if k in numba_cpu.available_kernels()]
# panels of 4 or 8 rows of B in groups of 2 or 4: N below one panel, below one group,
# a whole number of groups, a group and a partial panel; M below a row tile and past one
BCAST_SHAPES = AWKWARD + [(4, 8, 64), (8, 32, 3 * 64), (5, 37, 144), (13, 16, 288),
                          (4, 64, 1152), (3, 3, 65), (12, 40, 1)]


@pytest.mark.parametrize("name", BCAST)
@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", BCAST_SHAPES)
def test_broadcast_kernels_bit_exact(name, cols, threads, m, n, k):
    a, b = operands(m, n, k, m * 1000 + n * 10 + k)
    cnt = np.full((m + 1, n + 3), -7, np.int32)  # a wider buffer: nothing past N is written
    view = cnt[:m, :n]
    out = np.empty((m, n), np.int32)
    numba_simd.xnor_gemm_bcast_into(name, a, b, out, k, cols=cols, threads=threads)
    np.testing.assert_array_equal(out, reference.xnor_gemm(a, b, k))
    # into a row-strided view of a larger array: the columns and rows past it keep -7
    numba_simd.xnor_gemm_bcast_into(name, a, b, view, k, cols=cols, threads=threads)
    np.testing.assert_array_equal(view, reference.xnor_gemm(a, b, k))
    assert (cnt[:, n:] == -7).all() and (cnt[m:] == -7).all()


@pytest.mark.parametrize("name", BCAST)
@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("m,n,k", BCAST_SHAPES)
def test_broadcast_kernels_on_panels_made_once(name, cols, threads, m, n, k):
    """B in panel form (pack_panels, as a frozen net keeps its weights): the same product."""
    a, b = operands(m, n, k, m * 1000 + n * 10 + k + 1)
    pan = numba_simd.pack_panels(name, b)
    lanes = numba_simd.BCAST[name][0]
    assert pan.shape == (-(-n // lanes), b.shape[1], lanes)
    for p in range(pan.shape[0]):  # panel p, word w, lane l: row p L + l of B, 0 past N
        for lane in range(lanes):
            j = p * lanes + lane
            np.testing.assert_array_equal(pan[p, :, lane], b[j] if j < n else 0)
    cnt = np.full((m + 1, n + 3), -7, np.int32)
    numba_simd.xnor_gemm_bcast_into(name, a, pan, cnt[:m, :n], k, cols=cols, threads=threads)
    np.testing.assert_array_equal(cnt[:m, :n], reference.xnor_gemm(a, b, k))
    assert (cnt[:, n:] == -7).all() and (cnt[m:] == -7).all()


def test_panels_of_the_wrong_shape_are_refused():
    if not BCAST:
        pytest.skip("no broadcast kernel on this CPU")
    name = BCAST[0]
    a, b = operands(4, 10, 200, 0)
    cnt = np.full((4, 10), -7, np.int32)
    other = "bcast512" if name == "bcast256" else "bcast256"
    for bad in (numba_simd.pack_panels(name, b[:3]),  # panels for fewer rows than N
                numba_simd.pack_panels(other, b),  # another kernel's lanes
                numba_simd.pack_panels(name, b)[:, :2],  # fewer words than A
                numba_simd.pack_panels(name, b).astype(np.int64)):
        with pytest.raises(ValueError, match=f"b: expected {name}'s panels of shape"):
            numba_simd.xnor_gemm_bcast_into(name, a, bad, cnt, 200)
    assert (cnt == -7).all()


@pytest.mark.parametrize("name", numba_cpu.available_kernels() + ("auto",))
@pytest.mark.parametrize("m,n,k", BCAST_SHAPES)
def test_prepared_weights_give_the_same_product(name, m, n, k):
    a, b = operands(m, n, k, m * 1000 + n * 10 + k + 2)
    prepared = numba_cpu.prepare_weights(b)
    want = reference.xnor_gemm(a, b, k)
    np.testing.assert_array_equal(numba_cpu.xnor_gemm(a, prepared, k, kernel=name), want)
    out = np.full((m, n), 12345, np.int32)
    assert numba_cpu.xnor_gemm(a, prepared, k, kernel=name, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_prepared_weights_are_a_copy_and_checked():
    a, b = operands(5, 9, 100, 4)
    prepared = numba_cpu.prepare_weights(b)
    assert numba_cpu.prepare_weights(prepared) is prepared
    want = reference.xnor_gemm(a, b, 100)
    b[:] = 0  # the caller's array changes; the prepared weights do not
    for name in BCAST + ["auto"]:
        np.testing.assert_array_equal(numba_cpu.xnor_gemm(a, prepared, 100, kernel=name), want)
    assert not prepared.rows.flags.writeable
    for bad in (np.zeros((3, 2), np.int64), np.zeros(4, np.uint64), [[1, 2]], None):
        with pytest.raises(ValueError, match="b: expected a 2-D uint64 NumPy array"):
            numba_cpu.prepare_weights(bad)
    with pytest.raises(ValueError, match="words per row"):  # checked by each product
        numba_cpu.xnor_gemm(a, prepared, 300)
    padded = numba_cpu.prepare_weights(np.full((2, 2), np.uint64(2**64 - 1)))
    with pytest.raises(ValueError, match="padding bits"):  # bits past k = 100 are set
        numba_cpu.xnor_gemm(a, padded, 100)


@pytest.mark.parametrize("name", NIBBLE)
def test_nibble_kernels_reuse_their_plane_buffers_safely(name):
    """The planes go into buffers kept per thread: a larger product, a smaller one (a view
    of the same buffer), a larger again, and products on other threads, all exact."""
    import concurrent.futures

    shapes = [(40, 30, 1000), (5, 3, 130), (60, 70, 4095), (7, 9, 64)]

    def run(m, n, k):
        a, b = operands(m, n, k, m + n + k)
        cnt = np.zeros((m, n), np.int32)
        numba_avx2.xnor_gemm_into(a, b, cnt, k, name)
        return bool((cnt == reference.xnor_gemm(a, b, k)).all())

    assert all(run(*s) for s in shapes + shapes[::-1])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert all(pool.map(lambda s: run(*s), shapes * 3))


@pytest.mark.parametrize("name", NIBBLE)
def test_nibble_planes_made_once_are_checked(name):
    a, b = operands(4, 6, 300, 1)
    planes = numba_avx2.nibble_planes(b, name)
    cnt = np.zeros((4, 6), np.int32)
    numba_avx2.xnor_gemm_into(a, b, cnt, 300, name, planes)
    np.testing.assert_array_equal(cnt, reference.xnor_gemm(a, b, 300))
    other = "avx512bw" if name == "avx2" else "avx2"
    for bad in (planes[:5], numba_avx2.nibble_planes(b, other), planes.astype(np.int64)):
        cnt[:] = 0
        with pytest.raises(ValueError, match=f"b_planes: expected {name}'s nibble planes"):
            numba_avx2.xnor_gemm_into(a, b, cnt, 300, name, bad)
        assert (cnt == 0).all()


@pytest.mark.parametrize("name", NIBBLE)
@pytest.mark.parametrize("m,n,k", AWKWARD)
def test_nibble_kernels_bit_exact(name, m, n, k):
    a, b = operands(m, n, k, m * 1000 + n * 10 + k)
    cnt = np.zeros((m, n), np.int32)
    numba_avx2.xnor_gemm_into(a, b, cnt, k, name)
    np.testing.assert_array_equal(cnt, reference.xnor_gemm(a, b, k))


# Harley-Seal folds groups of 8 vectors (32 words with 4 lanes, 64 with 8): K with several
# whole groups, then whole vectors past the last group, then single words, for both widths.
HS_SHAPES = AWKWARD + [(2, 2, 64 * 64), (3, 5, 64 * (3 * 64 + 3 * 8 + 3) + 17),
                       (5, 3, 64 * (2 * 32 + 3 * 4 + 1) + 1), (1, 9, 64 * 512),
                       (7, 7, 64 * 1000 - 3)]


@pytest.mark.parametrize("name", HS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,n,k", HS_SHAPES)
def test_harley_seal_kernels_bit_exact(name, threads, m, n, k):
    a, b = operands(m, n, k, m * 1000 + n * 10 + k)
    cnt = np.full((m, n), -7, np.int32)  # overwritten, not added to
    numba_hs.xnor_gemm_into(name, a, b, cnt, k, threads=threads)
    np.testing.assert_array_equal(cnt, reference.xnor_gemm(a, b, k))


def test_harley_seal_counts_all_ones():
    """The carries' weights: all-different operands make every CSA level carry."""
    if not HS:
        pytest.skip("no Harley-Seal kernel on this CPU")
    k = 64 * 64 * 5
    a = np.full((2, k // 64), np.uint64(2**64 - 1))
    b = np.zeros((2, k // 64), np.uint64)
    for name in HS:
        cnt = np.empty((2, 2), np.int32)
        numba_hs.xnor_gemm_into(name, a, b, cnt, k)
        np.testing.assert_array_equal(cnt, np.full((2, 2), -k))


@pytest.mark.parametrize("name", ["generic"] + SIMD)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 70), (2, 7, 784), (9, 4, 389),
                                   (5, 13, 4096), (4, 6, 64 * 9 + 3)])
def test_bitplane_variants_bit_exact(name, m, n, k):
    """Every variant of the fused bit-plane product (the first layer on 8-bit input)."""
    rng = np.random.default_rng(m + n + k)
    x = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    x[0, :3] = (0, 255, 128)[:k]
    planes = reference.pack_bitplanes(x)
    w = reference.pack_rows(rng.random((n, k)) < 0.5)
    want = reference.bitplane_gemm(planes, w, k)
    np.testing.assert_array_equal(numba_cpu.bitplane_gemm(planes, w, k, kernel=name), want)
    np.testing.assert_array_equal(want, (2 * x.astype(np.int64) - 255)
                                  @ reference.unpack_rows(w, k, np.int64).T)


def test_bitplane_rejects_unknown_kernel():
    planes = reference.pack_bitplanes(np.zeros((1, 10), np.uint8))
    with pytest.raises(ValueError, match="kernel: expected one of"):
        numba_cpu.bitplane_gemm(planes, reference.pack_rows(np.ones((2, 10))), 10, kernel="avx2")


@pytest.mark.parametrize("name", numba_cpu.available_kernels())
def test_every_variant_through_xnor_gemm_with_out(name):
    a, b = operands(10, 11, 777, 3)
    out = np.full((10, 11), 12345, np.int32)  # stale contents are overwritten
    got = numba_cpu.xnor_gemm(a, b, 777, kernel=name, out=out)
    assert got is out
    np.testing.assert_array_equal(out, reference.xnor_gemm(a, b, 777))


def test_xnor_gemm_out_is_checked():
    a, b = operands(3, 4, 100, 0)
    for bad in (np.zeros((4, 3), np.int32), np.zeros((3, 4), np.int64),
                np.zeros((4, 3), np.int32).T, [[0] * 4] * 3):
        with pytest.raises(ValueError, match=r"out: expected a C-contiguous int32 array of "
                                             r"shape \(3, 4\)"):
            numba_cpu.xnor_gemm(a, b, 100, out=bad)


def test_vector_popcount_in_the_machine_code():
    """Where the CPU has AVX512_VPOPCNTDQ, LLVM turns the vector ctpop into vpopcntq."""
    if not autotune.isa_features()["features"]["avx512_vpopcntdq"] or "simd512" not in SIMD:
        pytest.skip("this CPU has no AVX512_VPOPCNTDQ")
    from numba import njit

    mk = numba_simd._mk_simd512

    @njit  # compiled here, not loaded from numba's cache, so its assembly can be read
    def tile(a, b, out):
        mk(a.ctypes.data, a.strides[0], b.ctypes.data, b.strides[0], 0, a.shape[1],
           out.ctypes.data)

    a, b = operands(4, 4, 4096, 1)
    out = np.zeros(16, np.int64)
    tile(a, b, out)
    want = 4096 - reference.xnor_gemm(a, b, 4096).ravel()
    np.testing.assert_array_equal(out, want // 2)  # popcounts: k - 2 pop = result
    asm = "".join(tile.inspect_asm().values())
    assert "vpopcntq" in asm and "zmm" in asm


def test_isa_features_are_reported():
    isa = autotune.isa_features()
    assert set(isa["features"]) >= {"popcnt", "avx2", "avx512f", "avx512bw",
                                    "avx512_vpopcntdq", "avx512_vnni"}
    assert all(isinstance(v, bool) for v in isa["features"].values())
    assert isinstance(isa["cpu"], str) and isa["cpu"]
    assert "numba" in autotune.machine_key(isa)


def test_target_features_follow_numba_cpu_features(monkeypatch):
    """Numba compiles for NUMBA_CPU_FEATURES when it is set: a kernel is offered only where
    that target and the host both have the feature."""
    import numba

    assert autotune._target_features("+avx2, -avx512f,+popcnt", {}) == {
        "avx2": True, "avx512f": False, "popcnt": True}
    assert autotune._target_features(None, {"avx2": True}) == {"avx2": True}
    host = autotune._probe_isa()["features"]
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+popcnt,+avx2,-avx512f,-avx512bw")
    narrowed = autotune._probe_isa()
    assert narrowed["numba_cpu_features"].startswith("+popcnt")
    assert narrowed["features"]["avx512f"] is False and narrowed["features"]["avx512bw"] is False
    assert narrowed["features"]["avx2"] == host["avx2"]  # kept only where the host has it
    assert narrowed["features"]["avx512_vpopcntdq"] is False  # not named: off


def test_isa_profile_environment():
    host = {"popcnt": True, "avx2": True, "avx512f": True, "avx512cd": True, "avx512bw": True,
            "avx512dq": True, "avx512vl": True, "avx512vnni": True, "avx512vpopcntdq": True,
            "avx512bitalg": True, "evex512": True, "gfni": True, "sse4.2": True}
    env = autotune.isa_profile_environment("cascadelake", host)
    spec = set(env["NUMBA_CPU_FEATURES"].split(","))
    assert env["NUMBA_CPU_NAME"] == "cascadelake" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert {"+avx512bw", "+avx512vnni", "+avx2", "+popcnt", "+evex512", "+sse4.2",
            "-avx512vpopcntdq", "-avx512bitalg", "-gfni"} <= spec
    env = autotune.isa_profile_environment("znver3", host)
    spec = set(env["NUMBA_CPU_FEATURES"].split(","))
    assert {"+avx2", "+popcnt", "-avx512f", "-avx512bw", "-evex512"} <= spec
    with pytest.raises(ValueError, match=r"this CPU lacks \['avx512bw'\]"):
        autotune.isa_profile_environment("cascadelake", {**host, "avx512bw": False})
    with pytest.raises(ValueError, match="profile: expected one of"):
        autotune.isa_profile_environment("pentium", host)


_UNDER_PROFILE = """
import numpy as np
from minibnn.kernels import autotune, numba_cpu, numba_madd, numba_vnni, reference
from minibnn.deploy import runtime
names = numba_cpu.available_kernels()
f = autotune.isa_features()["features"]
rng = np.random.default_rng(0)
for m, n, k in [(1, 1, 1), (5, 7, 777), (9, 13, 4096 + 65), (3, 5, 64 * 300 + 7)]:
    a = reference.pack_rows(rng.random((m, k)) < 0.5)
    b = reference.pack_rows(rng.random((n, k)) < 0.5)
    want = reference.xnor_gemm(a, b, k)
    for name in names:
        assert (numba_cpu.xnor_gemm(a, b, k, kernel=name) == want).all(), (name, m, n, k)
x = rng.integers(0, 256, size=(9, 789), dtype=np.uint8)
w = rng.integers(-1, 2, size=(21, 789), dtype=np.int8)
int8 = runtime.int8_kernels()
assert (int8.int8_gemm(x, int8.pack_weights(w), 21) == x.astype(np.int64) @ w.T).all()
print(int8.__name__.rsplit(".", 1)[-1])
print(sorted(names), f["avx512f"], f["avx512_vpopcntdq"], numba_vnni.available())
"""


@pytest.mark.slow
@pytest.mark.parametrize("profile", sorted(autotune.ISA_PROFILES))
def test_kernels_under_a_narrower_isa(profile, tmp_path):
    """In a process whose Numba targets a CPU with less of the ISA (no VPOPCNTDQ, or no
    AVX-512 at all), only that CPU's kernels are offered and each one is exact."""
    try:
        env = autotune.isa_profile_environment(profile)
    except ValueError as exc:
        pytest.skip(str(exc))
    env = {**os.environ, **env, "NUMBA_CACHE_DIR": str(tmp_path),
           "MINIBNN_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _UNDER_PROFILE], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    int8, last = out.stdout.strip().split("\n")[-2:]
    names, avx512f, vpopcnt, vnni = last.rsplit(" ", 3)
    assert vpopcnt == "False"
    assert int8 == ("numba_madd" if profile == "znver3" else "numba_vnni")  # the int8 first layer
    if profile == "znver3":
        assert avx512f == "False" and vnni == "False"
        assert not any(n in names for n in ("simd512", "avx512bw", "hs512", "bcast512"))
    else:
        assert avx512f == "True" and all(n in names for n in ("simd512", "avx512bw", "hs512",
                                                             "bcast512"))


# the int8 products of the first layer: VNNI (any int8 weights) and AVX2 (weights -1, 0, +1)
INT8 = [pytest.param(mod, low, high, marks=pytest.mark.skipif(not mod.available(), reason=why))
        for mod, low, high, why in ((numba_vnni, -128, 128, "this CPU has no AVX512-VNNI"),
                                    (numba_madd, -1, 2, "this CPU has no AVX2"))]


@pytest.mark.parametrize("mod,low,high", INT8)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (13, 784, 70), (4, 64, 64),
                                   (9, 1001, 129), (0, 5, 3), (3, 0, 5), (300, 33, 200),
                                   (4, 64, 16), (6, 4 * 64 * 3 + 5, 17)])  # several int16 blocks
def test_int8_product_is_exact(mod, low, high, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.integers(0, 256, size=(m, k), dtype=np.uint8)
    w = rng.integers(low, high, size=(n, k), dtype=np.int8)
    w[:, :1] = low  # the extremes
    x[:, :1] = 255
    wp = mod.pack_weights(w)
    got = mod.int8_gemm(x, wp, n)
    assert got.dtype == np.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.T.astype(np.int64))
    # reused buffers with stale contents give the same
    mp, kp = -(-m // 4) * 4, -(-k // 4) * 4
    out = np.full((mp, wp.shape[0] * wp.shape[2] // 4), 7, np.int32)
    xb = np.full((mp, kp), 9, np.uint8)
    again = mod.int8_gemm(x, wp, n, out=out, x_buf=xb)
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("mod,low,high", INT8)
def test_int8_operands_are_checked(mod, low, high):
    w = mod.pack_weights(np.ones((3, 10), np.int8))
    with pytest.raises(ValueError, match="w: expected int8 weights of shape"):
        mod.pack_weights(np.ones((3, 10)))
    with pytest.raises(ValueError, match="x: expected uint8 pixels"):
        mod.int8_gemm(np.ones((2, 10), np.int8), w, 3)
    with pytest.raises(ValueError, match="wp: expected packed int8 weights for K = 13"):
        mod.int8_gemm(np.ones((2, 13), np.uint8), w, 3)
    with pytest.raises(ValueError, match="wp: expected packed int8 weights for K = 10"):
        mod.int8_gemm(np.ones((2, 10), np.uint8), w, 1000)  # more columns than packed
    with pytest.raises(ValueError, match="out: expected a C-contiguous int32 array"):
        mod.int8_gemm(np.ones((2, 10), np.uint8), w, 3, out=np.zeros((2, 3), np.int32))
    if mod is numba_madd:
        with pytest.raises(ValueError, match=r"w: expected weights in \{-1, 0, \+1\}"):
            mod.pack_weights(np.full((3, 10), 2, np.int8))


@pytest.mark.skipif(not numba_madd.available(), reason="this CPU has no AVX2")
def test_madd_int16_sums_do_not_overflow():
    """The largest sums: 255 x (+1 or -1) on every input, over several int16 blocks of 64
    groups of 4 (each block's int16 lane reaches +-64 x 510 = +-32,640)."""
    k = 4 * 64 * 5 + 3
    x = np.full((5, k), 255, np.uint8)
    w = np.ones((18, k), np.int8)
    w[1::2] = -1
    got = numba_madd.int8_gemm(x, numba_madd.pack_weights(w), 18)
    np.testing.assert_array_equal(got, np.where(np.arange(18) % 2, -255 * k, 255 * k)[None]
                                  .repeat(5, 0))


# ------------------------------------------------------------------------- autotune


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty autotune cache directory, no forced kernel, autotune on."""
    monkeypatch.setenv("MINIBNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MINIBNN_GEMM_KERNEL", raising=False)
    monkeypatch.delenv("MINIBNN_AUTOTUNE", raising=False)
    autotune.clear_memory()
    yield tmp_path / autotune.CACHE_FILE
    autotune.clear_memory()


def fake_runner(calls):
    """A ``run`` for ``choose`` that records its calls and takes no time."""
    return lambda name, a, b, k: calls.append((name, a.shape, b.shape, k))


def test_cache_dir_default_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIBNN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "minibnn" / "gemm_autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == tmp_path / "home" / ".cache" / "minibnn"


def test_choice_is_measured_written_and_read_back(cache):
    calls = []
    names = ("generic", "scalar")
    got = autotune.choose(100, 4096, 64, names, fake_runner(calls))
    assert got in names and {c[0] for c in calls} == set(names)
    assert calls[0][1:] == ((100, 64), (2048, 64), 4096)  # the class's timed product
    data = json.loads(cache.read_text())
    (machine,) = data["machines"].values()
    cls = autotune.shape_class(100, 4096, 64)[0]
    assert machine["choices"][cls]["kernel"] == got
    assert set(machine["choices"][cls]["seconds"]) == set(names)
    # the same class again, in a "new process": read from the file, nothing timed
    autotune.clear_memory()
    calls.clear()
    assert autotune.choose(200, 2000, 40, names, fake_runner(calls)) == got
    assert calls == []
    # a planted choice in the file is what the next process uses
    machine["choices"][cls]["kernel"] = "scalar" if got == "generic" else "generic"
    cache.write_text(json.dumps(data))
    autotune.clear_memory()
    assert autotune.choose(100, 4096, 64, names, fake_runner(calls)) != got and calls == []
    # unless an older tuner made it: then it is measured again
    machine["choices"][cls]["tuner"] = autotune.TUNER - 1
    cache.write_text(json.dumps(data))
    autotune.clear_memory()
    autotune.choose(100, 4096, 64, names, fake_runner(calls))
    assert calls


def test_a_choice_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet(cache,
                                                                                   monkeypatch):
    """Each record keeps the load average and cores it was measured under; a record made
    while the machine was busy (load > 1.5 x cores) is trusted while it stays busy, and
    measured again (and replaced) by a process that finds it quiet (load < cores / 2)."""
    calls = []
    names = ("generic", "scalar")
    monkeypatch.setattr(autotune, "_load_and_cores", lambda: (7.5, 2))
    autotune.choose(100, 4096, 64, names, fake_runner(calls))
    cls = autotune.shape_class(100, 4096, 64)[0]
    (machine,) = json.loads(cache.read_text())["machines"].values()
    record = machine["choices"][cls]
    assert record["busy"] is True and record["load_average"] == 7.5 and record["cores"] == 2
    assert autotune.busy(7.5, 2) and not autotune.busy(2.5, 2) and not autotune.busy(None, 2)
    for load, retimed in ((7.5, False), (1.5, False), (0.4, True)):
        autotune.clear_memory()
        calls.clear()
        monkeypatch.setattr(autotune, "_load_and_cores", lambda load=load: (load, 2))
        autotune.choose(100, 4096, 64, names, fake_runner(calls))
        assert bool(calls) == retimed, load
    (machine,) = json.loads(cache.read_text())["machines"].values()
    assert machine["choices"][cls]["busy"] is False  # the quiet measurement replaced it
    autotune.clear_memory()
    calls.clear()
    autotune.choose(100, 4096, 64, names, fake_runner(calls))  # and is trusted from now on
    assert calls == []


def test_other_shape_classes_are_timed_apart(cache):
    calls = []
    autotune.choose(100, 4096, 64, ("generic", "scalar"), fake_runner(calls))
    n = len(calls)
    autotune.choose(4, 10, 2, ("generic", "scalar"), fake_runner(calls))
    assert len(calls) > n and calls[n][1:] == ((8, 4), (32, 4), 256)


def test_corrupt_cache_is_ignored_with_a_warning(cache):
    cache.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="corrupt GEMM autotune cache"):
        autotune.choose(100, 4096, 64, ("generic", "scalar"), fake_runner([]))
    data = json.loads(cache.read_text())  # rewritten whole
    assert list(data["machines"].values())[0]["choices"]


def test_wrong_format_and_unknown_kernel_in_cache(cache):
    cache.write_text(json.dumps({"format": 999, "machines": {}}))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        autotune.choose(1, 1, 1, ("generic",), fake_runner([]))
    # a recorded kernel this machine no longer offers is measured again
    data = json.loads(cache.read_text())
    for m in data["machines"].values():
        for r in m["choices"].values():
            r["kernel"] = "fortran"
    cache.write_text(json.dumps(data))
    autotune.clear_memory()
    calls = []
    assert autotune.choose(1, 1, 1, ("generic",), fake_runner(calls)) == "generic" and calls


def test_unwritable_cache_warns_and_keeps_the_choice(tmp_path, monkeypatch, cache):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MINIBNN_CACHE_DIR", str(blocker / "sub"))  # parent is a file
    with pytest.warns(RuntimeWarning, match="cannot write the GEMM autotune cache"):
        got = autotune.choose(100, 4096, 64, ("generic", "scalar"), fake_runner([]))
    calls = []
    assert autotune.choose(100, 4096, 64, ("generic", "scalar"), fake_runner(calls)) == got
    assert calls == []


def test_forced_choice_is_honoured(cache, monkeypatch):
    monkeypatch.setenv("MINIBNN_GEMM_KERNEL", "scalar")
    calls = []
    assert autotune.choose(100, 4096, 64, ("generic", "scalar"), fake_runner(calls)) == "scalar"
    assert calls == [] and not cache.exists()
    a, b = operands(9, 10, 300, 4)
    np.testing.assert_array_equal(numba_cpu.xnor_gemm(a, b, 300), reference.xnor_gemm(a, b, 300))
    assert numba_cpu.default_kernel(9, 10, 300) == "scalar"
    monkeypatch.setenv("MINIBNN_GEMM_KERNEL", "fortran")
    with pytest.raises(ValueError, match="MINIBNN_GEMM_KERNEL: expected one of"):
        numba_cpu.xnor_gemm(a, b, 300)


def test_autotune_off_uses_the_static_choice(cache, monkeypatch):
    monkeypatch.setenv("MINIBNN_AUTOTUNE", "0")
    calls = []
    names = numba_cpu.available_kernels()
    got = autotune.choose(100, 4096, 64, names, fake_runner(calls))
    assert got == autotune.static_choice(names) and calls == [] and not cache.exists()
    no_avx = {"features": {"avx2": False, "avx512_vpopcntdq": False}}
    assert autotune.static_choice(("generic", "scalar"), no_avx) == "scalar"
    vp = {"features": {"avx2": True, "avx512_vpopcntdq": True}}
    assert autotune.static_choice(("generic", "scalar", "simd256", "simd512"), vp) == "simd512"


def test_real_autotune_picks_an_available_kernel(cache):
    """Measured for real (small class): the winner is some variant, recorded with times."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = numba_cpu.default_kernel(3, 5, 100)
    assert got in numba_cpu.available_kernels()
    (machine,) = json.loads(cache.read_text())["machines"].values()
    (record,) = machine["choices"].values()
    assert set(record["seconds"]) == set(numba_cpu.available_kernels())
    assert all(t > 0 for t in record["seconds"].values())


def test_autotune_times_few_rows_on_all_threads_and_many_on_one(monkeypatch):
    """A class of few rows runs its candidates as a real product would, on every thread
    (how a kernel splits 100 rows decides its speed there); a class of many rows on one
    thread (its rate per core). The thread count is restored either way."""
    import numba
    seen = []
    monkeypatch.setattr(numba_cpu, "xnor_gemm",
                        lambda a, b, k, kernel=None: seen.append((a.shape[0],
                                                                  numba.get_num_threads())))
    threads = numba.get_num_threads()
    b = np.zeros((32, 2), np.uint64)
    for m in (8, 100, numba_cpu._TUNE_ONE_THREAD_ROWS, numba_cpu._TUNE_ONE_THREAD_ROWS + 1, 512):
        numba_cpu._run_tuned("generic", np.zeros((m, 2), np.uint64), b, 128)
        assert numba.get_num_threads() == threads
    limit = numba_cpu._TUNE_ONE_THREAD_ROWS
    assert seen == [(m, threads if m <= limit else 1) for m, _ in seen]
    # the classes' timed shapes fall on both sides: 8 and 100 rows on all threads, 512 on one
    timed = {autotune.shape_class(m, 4096, 64)[1][0] for m in (1, 100, 10000)}
    assert timed == {8, 100, 512} and min(timed) <= limit < max(timed)
