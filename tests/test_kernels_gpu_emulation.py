"""NumPy models of the CUDA kernels' indexing, runnable without a GPU.

Each model repeats the index arithmetic of its kernel in ``kernels/*.cu`` (which lane
or thread loads which word, where staged words land in shared memory, where each
accumulator is stored) and runs it over a whole grid. The tensor-core model performs
``mma.m16n8k256 .b1 .and.popc`` from the fragment layouts as the PTX ISA states them
("Matrix Fragments for mma.m16n8k256"), independently of how the kernel fills them.
Results must equal the reference GEMM and every output must be written exactly once.
If a kernel's indexing changes, its model here must change with it.
"""

import numpy as np
import pytest

from conftest import planted_thresholds
from minibnn.kernels import reference

# ------------------------------------------------------------ PTX ISA fragment layouts
# groupID g = laneid >> 2, threadID_in_group t = laneid % 4.
_LANE = np.arange(32)
_G, _T = _LANE >> 2, _LANE & 3


def _a_layout():
    """(row, k) of element a_i (i = 0..127, register i // 32, bit i % 32) for each lane."""
    i = np.arange(128)
    row = np.where((i < 32) | ((i >= 64) & (i < 96)), 0, 8)[None, :] + _G[:, None]
    col = _T[:, None] * 32 + (i & 31)[None, :] + np.where(i >= 64, 128, 0)[None, :]
    return row, col


def _b_layout():
    """(k, column) of element b_i (i = 0..63) for each lane."""
    i = np.arange(64)
    row = _T[:, None] * 32 + (i & 31)[None, :] + np.where(i >= 32, 128, 0)[None, :]
    col = np.broadcast_to(_G[:, None], row.shape)
    return row, col


def _c_layout():
    """(row, column) of accumulator c_i (i = 0..3) for each lane."""
    i = np.arange(4)
    row = _G[:, None] + np.where(i >= 2, 8, 0)[None, :]
    col = _T[:, None] * 2 + (i & 1)[None, :]
    return row, col


A_ROW, A_COL = _a_layout()
B_ROW, B_COL = _b_layout()
C_ROW, C_COL = _c_layout()


def test_layouts_cover_each_element_once():
    for rows, cols, shape in ((A_ROW, A_COL, (16, 256)), (B_ROW, B_COL, (256, 8)),
                              (C_ROW, C_COL, (16, 8))):
        hits = np.zeros(shape, int)
        np.add.at(hits, (rows, cols), 1)
        assert (hits == 1).all()


def _bits(regs):
    """(32, R) uint32 registers -> (32, 32 R) bits, element i = bit i % 32 of register i // 32."""
    regs = np.asarray(regs, dtype=np.uint64)
    return ((regs[:, :, None] >> np.arange(32, dtype=np.uint64)) & np.uint64(1)).reshape(32, -1)


def mma_m16n8k256_and_popc(a_regs, b_regs, c_regs):
    """D = C + popcount(A AND B) per the PTX ISA; registers per lane: a (32, 4), b (32, 2), c (32, 4)."""
    a = np.zeros((16, 256), np.int64)
    b = np.zeros((256, 8), np.int64)
    a[A_ROW, A_COL] = _bits(a_regs)
    b[B_ROW, B_COL] = _bits(b_regs)
    d = a @ b
    return np.asarray(c_regs) + d[C_ROW, C_COL]


def test_mma_model_on_one_tile():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (16, 256))
    b = rng.integers(0, 2, (256, 8))
    a_regs = np.zeros((32, 4), np.uint64)
    b_regs = np.zeros((32, 2), np.uint64)
    np.add.at(a_regs, (np.arange(32)[:, None], np.arange(128)[None, :] // 32),
              a[A_ROW, A_COL].astype(np.uint64) << (np.arange(128) % 32).astype(np.uint64)[None, :])
    np.add.at(b_regs, (np.arange(32)[:, None], np.arange(64)[None, :] // 32),
              b[B_ROW, B_COL].astype(np.uint64) << (np.arange(64) % 32).astype(np.uint64)[None, :])
    d = mma_m16n8k256_and_popc(a_regs, b_regs, np.zeros((32, 4), np.int64))
    full = a @ b
    assert (d == full[C_ROW, C_COL]).all()


# ---------------------------------------------------------- model of xnor_gemm_tc.cu

TC_BKW, TC_LDW = 8, 12
MASK32 = np.uint64(0xFFFFFFFF)
# block tile (rows of A, rows of B), warps along M, pipeline stages of the .cu's entries
TILE128 = (128, 128, 2, 3)  # xnor_gemm_tc, xnor_gemm_tc_direct (and their _threshold)
TILE256 = (256, 128, 4, 4)  # xnor_gemm_tc256 (and _threshold)
TC_BM, TC_BN, _, TC_STAGES = TILE128
TC_STAGE_WORDS = (TC_BM + TC_BN) * TC_LDW


def tc_kernel_model(ap, bp, pop_a, pop_b, m, n, wp, k, thr=None, periods=1, direct=False,
                    wide=True, tile=TILE128):
    """Run xnor_gemm_tc over its whole grid; returns (C, number of writes per output).
    With ``thr`` (int64 (periods * n,)) it runs xnor_gemm_tc_threshold instead and returns
    (the packed uint64 (m, words) output, number of writes per 32-bit output word).
    ``direct``: the xnor_gemm_tc_direct* entries instead, on unpadded ``ap`` (m, wp) and
    ``bp`` (n, wp) (``pop_a``, ``pop_b`` unused: the kernel counts them), with 16-byte
    copies if ``wide`` else 8-byte ones. ``tile``: TILE128, or TILE256 for xnor_gemm_tc256*."""
    bm, bn, warps_m, stages = tile
    warps_n = 8 // warps_m
    wtm, wtn = bm // warps_m, bn // warps_n
    it, jt = wtm // 16, wtn // 8
    stage_words = (bm + bn) * TC_LDW
    out = np.zeros((m, n), np.int64)
    writes = np.zeros((m, n), np.int64)
    words32 = 2 * (-(-n // 64))
    bits = np.zeros((m, words32), np.uint64)  # 32-bit words, held in uint64
    bit_writes = np.zeros((m, words32), np.int64)
    flat_a, flat_b = ap.reshape(-1), bp.reshape(-1)
    tid = np.arange(256)
    n_stages = -(-wp // TC_BKW)
    if direct:
        assert ap.shape == (m, wp) and bp.shape == (n, wp) and wp > 0
        assert not wide or wp % 2 == 0
    else:
        assert ap.shape[0] % bm == 0 and bp.shape[0] % bn == 0 and wp % TC_BKW == 0
    for by in range(-(-ap.shape[0] // bm)):
        for bx in range(-(-bp.shape[0] // bn)):
            row0, col0 = by * bm, bx * bn
            # the stage buffers start as garbage: every word the warps read must be loaded
            smem = np.full(stages * stage_words, 0xDEADBEEFDEADBEEF, np.uint64)
            loaded = np.zeros(stages * stage_words, np.int64)

            def load_stage(buf, stage):  # tc_load_stage, all 256 threads at once
                s_a = buf * stage_words
                s_b = s_a + bm * TC_LDW
                kw0 = stage * TC_BKW
                for q in range((bm + bn) * 4 // 256):
                    chunk = q * 256 + tid
                    is_a = q < bm * 4 // 256
                    r = (chunk if is_a else chunk - bm * 4) >> 2
                    part = chunk & 3
                    kw = kw0 + 2 * part
                    flat, base, rows = (flat_a, row0, m) if is_a else (flat_b, col0, n)
                    row = base + r
                    dst = (s_a if is_a else s_b) + r * TC_LDW + 2 * part
                    for half in range(2):  # the 16 bytes of one cp.async (or two 8-byte ones)
                        if not direct:
                            inside = np.ones(256, bool)
                        elif wide:  # one 16-byte copy, zero-filled unless wholly inside
                            inside = (row < rows) & (kw < wp)
                        else:
                            inside = (row < rows) & (kw + half < wp)
                        src = np.where(inside, row * wp + kw + half, 0)
                        smem[dst + half] = np.where(inside, flat[src], 0)
                        np.add.at(loaded, dst + half, 1)

            acc = np.zeros((8, it, jt, 32, 4), np.int64)  # warp, i, j, lane, register
            cnt_a = np.zeros((8, it, 2, 32), np.int64)  # direct: warp, i, half, lane
            cnt_b = np.zeros((8, jt, 32), np.int64)  # direct: warp, j, lane
            for s in range(stages - 1):
                if s < n_stages:
                    load_stage(s, s)
            for s in range(n_stages):
                nxt = s + stages - 1
                if nxt < n_stages:
                    assert nxt % stages != s % stages
                    load_stage(nxt % stages, nxt)
                s_a = (s % stages) * stage_words
                s_b = s_a + bm * TC_LDW
                for warp in range(8):
                    wm, wn = warp // warps_n, warp % warps_n
                    for ks in range(TC_BKW // 4):
                        af, bf = [], []
                        for i in range(it):
                            r = wm * wtm + i * 16 + _G
                            x0 = smem[s_a + r * TC_LDW + 4 * ks + _T]
                            x1 = smem[s_a + (r + 8) * TC_LDW + 4 * ks + _T]
                            af.append(np.stack([x0 & MASK32, x1 & MASK32, x0 >> np.uint64(32),
                                                x1 >> np.uint64(32)], axis=1))
                            if direct and wn == 0:
                                cnt_a[warp, i, 0] += np.bitwise_count(x0)
                                cnt_a[warp, i, 1] += np.bitwise_count(x1)
                        for j in range(jt):
                            c = wn * wtn + j * 8 + _G
                            y = smem[s_b + c * TC_LDW + 4 * ks + _T]
                            bf.append(np.stack([y & MASK32, y >> np.uint64(32)], axis=1))
                            if direct and wm == 0:
                                cnt_b[warp, j] += np.bitwise_count(y)
                        for i in range(it):
                            for j in range(jt):
                                acc[warp, i, j] = mma_m16n8k256_and_popc(af[i], bf[j], acc[warp, i, j])
            # each stage buffer word is written once per stage that uses the buffer
            used = np.bincount(np.arange(n_stages) % stages, minlength=stages)
            for buf in range(stages):
                got = loaded[buf * stage_words:(buf + 1) * stage_words].reshape(bm + bn, TC_LDW)
                assert (got[:, :TC_BKW] == used[buf]).all() and (got[:, TC_BKW:] == 0).all()
            if direct:  # the popcounts: xor-shuffle sums, lane t = 0 stores to sPop
                s_pop = np.full(bm + bn, -(1 << 40), np.int64)  # garbage until stored
                for warp in range(8):
                    wm, wn = warp // warps_n, warp % warps_n
                    vals, slots = [], []
                    if wn == 0:
                        for i in range(it):
                            for half in range(2):
                                vals.append(cnt_a[warp, i, half])
                                slots.append(wm * wtm + i * 16 + _G + 8 * half)
                    if wm == 0:
                        for j in range(jt):
                            vals.append(cnt_b[warp, j])
                            slots.append(bm + wn * wtn + j * 8 + _G)
                    for v, slot in zip(vals, slots):
                        for mask in (1, 2):
                            v = v + v[_LANE ^ mask]
                        s_pop[slot[_T == 0]] = v[_T == 0]
                pa, pb = s_pop[:bm], s_pop[bm:]
            else:
                pa = np.zeros(bm, np.int64)
                pa[: max(0, min(bm, m - row0))] = pop_a[row0: row0 + bm]
                pb = np.zeros(bn, np.int64)
                pb[: max(0, min(bn, n - col0))] = pop_b[col0: col0 + bn]
            for warp in range(8):
                wm, wn = warp // warps_n, warp % warps_n
                if thr is not None:  # the threshold epilogue, all 32 lanes at once
                    for i in range(it):
                        for half in range(2):
                            lr = wm * wtm + i * 16 + _G + 8 * half
                            r = row0 + lr
                            for jj in range(jt // 4):
                                q = (col0 + wn * wtn + 32 * jj) >> 5
                                word = np.zeros(32, np.uint64)
                                for j4 in range(4):
                                    for e in range(2):
                                        lc = wn * wtn + (4 * jj + j4) * 8 + 2 * _T + e
                                        c = col0 + lc
                                        ok = (r < m) & (c < n)
                                        rr, cc = np.where(ok, r, 0), np.where(ok, c, 0)
                                        z = (k - 2 * pa[lr] - 2 * pb[lc]
                                             + 4 * acc[warp, i, 4 * jj + j4][:, 2 * half + e])
                                        fire = ok & (z >= thr[(rr % periods) * n + cc])
                                        word |= (fire.astype(np.uint64)
                                                 << (8 * j4 + 2 * _T + e).astype(np.uint64))
                                for mask in (1, 2):  # __shfl_xor_sync: lane l reads lane l ^ mask
                                    word = word | word[_LANE ^ mask]
                                store = (_T == 0) & (r < m) & (q < words32)
                                if store.any():
                                    bits[r[store], q] = word[store]
                                    np.add.at(bit_writes, (r[store], np.full(store.sum(), q)), 1)
                    continue
                for i in range(it):
                    for half in range(2):
                        lr = wm * wtm + i * 16 + _G + 8 * half
                        r = row0 + lr
                        for j in range(jt):
                            for e in range(2):
                                lc = wn * wtn + j * 8 + 2 * _T + e
                                c = col0 + lc
                                ok = (r < m) & (c < n)
                                rr, cc = r[ok], c[ok]
                                val = (k - 2 * pa[lr[ok]] - 2 * pb[lc[ok]]
                                       + 4 * acc[warp, i, j][ok, 2 * half + e])
                                out[rr, cc] = val
                                writes[rr, cc] += 1
    if thr is not None:
        return _u32_to_u64(bits), bit_writes
    return out, writes


def _u32_to_u64(words32):
    """(m, 2w) 32-bit words -> the (m, w) uint64 array they fill (little-endian)."""
    return (words32[:, 0::2] | (words32[:, 1::2] << np.uint64(32))).astype(np.uint64)


def _pad(x, rows, words):  # what cupy_gpu._padded produces
    out = np.zeros((rows, words), np.uint64)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _tc_operands(a, b, tile=TILE128):
    """What cupy_gpu gives the tiled entries for packed a (m, w), b (n, w): both zero padded
    to whole tiles and to words a multiple of TC_BKW, their row popcounts, the padded width."""
    bm, bn = tile[:2]
    wp = -(-a.shape[1] // TC_BKW) * TC_BKW
    ap = _pad(a, -(-a.shape[0] // bm) * bm, wp)
    bp = _pad(b, -(-b.shape[0] // bn) * bn, wp)
    pop_a = np.bitwise_count(ap).sum(axis=1).astype(np.int64)[:a.shape[0]]
    pop_b = np.bitwise_count(bp).sum(axis=1).astype(np.int64)[:b.shape[0]]
    return ap, bp, pop_a, pop_b, wp


TILES = [pytest.param(TILE128, id="tile128"), pytest.param(TILE256, id="tile256")]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("m,n,k", [(130, 200, 700), (16, 8, 256), (1, 129, 1025), (257, 64, 600)])
def test_tensor_core_kernel_model(m, n, k, tile):
    rng = np.random.default_rng(m + n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    ap, bp, pop_a, pop_b, wp = _tc_operands(a, b, tile)
    out, writes = tc_kernel_model(ap, bp, pop_a, pop_b, m, n, wp, k, tile=tile)
    assert (writes == 1).all()
    np.testing.assert_array_equal(out, reference.xnor_gemm(a, b, k))


def _threshold_case(rng, a, b, k, periods):
    """A (periods, n) threshold table planted from the products (conftest's
    ``planted_thresholds``) and the bits the kernels must give."""
    z = reference.xnor_gemm(a, b, k)
    thr = planted_thresholds(rng, z, periods)
    return thr.reshape(periods, -1), reference.pack_threshold(z, thr)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("m,n,k,periods", [(130, 200, 700, 1), (16, 8, 256, 2), (1, 129, 1025, 1),
                                           (12, 64, 70, 4), (9, 33, 64, 3), (4, 96, 300, 1),
                                           (300, 100, 130, 5)])
def test_tensor_core_threshold_epilogue_model(m, n, k, periods, tile):
    """xnor_gemm_tc_threshold: the bits equal pack_threshold(GEMM), padding columns 0, and
    each 32-bit word of the output is stored exactly once (the 4 lanes of a group combine
    their bits through two xor shuffles before lane t = 0 stores)."""
    rng = np.random.default_rng(m * 5 + n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    ap, bp, pop_a, pop_b, wp = _tc_operands(a, b, tile)
    thr, want = _threshold_case(rng, a, b, k, periods)
    got, writes = tc_kernel_model(ap, bp, pop_a, pop_b, m, n, wp, k, thr.reshape(-1), periods,
                                  tile=tile)
    assert (writes == 1).all()
    np.testing.assert_array_equal(got, want)


DIRECT_CASES = [(130, 200, 700), (1, 1, 1), (1, 129, 1025), (129, 1, 64), (16, 8, 256),
                (5, 33, 4097), (200, 130, 128)]


@pytest.mark.parametrize("wide", [True, False], ids=["16-byte", "8-byte"])
@pytest.mark.parametrize("m,n,k", DIRECT_CASES)
def test_tensor_core_direct_kernel_model(m, n, k, wide):
    """xnor_gemm_tc_direct on unpadded operands: loads past row m (n) or word w read zeros
    (the stage buffers start as garbage), the popcounts counted from the fragments and summed
    over the 4 lanes of a group give a . b exactly, and each output is written once. With
    16-byte copies w must be even; 8-byte copies take any w."""
    rng = np.random.default_rng(m * 3 + n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    w = a.shape[1]
    if wide and w % 2:  # cupy_gpu copies with 16 bytes only where w is even
        pytest.skip("16-byte copies need an even number of words")
    out, writes = tc_kernel_model(a, b, None, None, m, n, w, k, direct=True, wide=wide)
    assert (writes == 1).all()
    np.testing.assert_array_equal(out, reference.xnor_gemm(a, b, k))


@pytest.mark.parametrize("m,n,k,periods", [(130, 200, 700, 2), (1, 129, 1025, 1), (12, 64, 70, 4),
                                           (9, 33, 64, 3)])
def test_tensor_core_direct_threshold_epilogue_model(m, n, k, periods):
    rng = np.random.default_rng(m * 7 + n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    thr, want = _threshold_case(rng, a, b, k, periods)
    w = a.shape[1]
    got, writes = tc_kernel_model(a, b, None, None, m, n, w, k, thr.reshape(-1), periods,
                                  direct=True, wide=w % 2 == 0)
    assert (writes == 1).all()
    np.testing.assert_array_equal(got, want)


def test_tensor_core_fragment_loads_are_bank_conflict_free():
    """A half warp's 16 lanes read 16 distinct 8-byte words over all 32 banks."""
    for base_row in (0, 16, 72):
        for ks in range(TC_BKW // 4):
            for lanes in (_LANE[:16], _LANE[16:]):
                word = (base_row + _G[lanes]) * TC_LDW + 4 * ks + _T[lanes]
                banks = np.concatenate([(2 * word) % 32, (2 * word + 1) % 32])
                assert len(set(banks.tolist())) == 32


# ------------------------------------------------------------ model of xnor_gemm.cu

CC_BM = CC_BN = 128
CC_BKW = 8
CC_LD = 2 * CC_BKW + 1


def cuda_core_kernel_model(a, b, m, n, w, k, thr=None, periods=1):
    """Run xnor_gemm_cuda_core (or with ``thr``, xnor_gemm_cuda_core_threshold: returns the
    packed output and the writes per 16-bit word) over its whole grid."""
    out = np.zeros((m, n), np.int64)
    writes = np.zeros((m, n), np.int64)
    words16 = 4 * (-(-n // 64))
    bits = np.zeros((m, words16), np.uint64)  # 16-bit words, held in uint64
    bit_writes = np.zeros((m, words16), np.int64)
    tid = np.arange(256)
    tx, ty = tid & 15, tid >> 4
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n_stages = -(-w // CC_BKW)
    for by in range(-(-m // CC_BM)):
        for bx in range(-(-n // CC_BN)):
            row0, col0 = by * CC_BM, bx * CC_BN
            acc = np.zeros((256, 8, 8), np.int64)
            for s in range(n_stages):
                s_a = np.zeros(CC_BM * CC_LD, np.uint64)
                s_b = np.zeros(CC_BN * CC_LD, np.uint64)
                for q in range(4):  # cc_load, then the stores to shared memory
                    idx = q * 256 + tid
                    r, ww = idx >> 3, s * CC_BKW + (idx & 7)
                    ok_a = (row0 + r < m) & (ww < w)
                    ok_b = (col0 + r < n) & (ww < w)
                    ra = np.where(ok_a, flat_a[np.where(ok_a, (row0 + r) * w + ww, 0)], np.uint64(0))
                    rb = np.where(ok_b, flat_b[np.where(ok_b, (col0 + r) * w + ww, 0)], np.uint64(0))
                    col = 2 * (idx & 7)
                    s_a[r * CC_LD + col] = ra & MASK32
                    s_a[r * CC_LD + col + 1] = ra >> np.uint64(32)
                    s_b[r * CC_LD + col] = rb & MASK32
                    s_b[r * CC_LD + col + 1] = rb >> np.uint64(32)
                for kk in range(2 * CC_BKW):
                    av = s_a[(ty[:, None] + 16 * np.arange(8)[None, :]) * CC_LD + kk]
                    bv = s_b[(tx[:, None] + 16 * np.arange(8)[None, :]) * CC_LD + kk]
                    acc += np.bitwise_count(av[:, :, None] ^ bv[:, None, :])
            if thr is not None:  # the ballot epilogue, warp by warp
                for warp in range(8):
                    lanes = warp * 32 + _LANE
                    for i in range(8):
                        r = row0 + ty[lanes] + 16 * i
                        for j in range(8):
                            c = col0 + tx[lanes] + 16 * j
                            ok = (r < m) & (c < n)
                            rr, cc = np.where(ok, r, 0), np.where(ok, c, 0)
                            fire = ok & (k - 2 * acc[lanes, i, j] >= thr[(rr % periods) * n + cc])
                            ballot = int(np.sum(fire.astype(np.uint64) << _LANE.astype(np.uint64)))
                            q = (col0 + 16 * j) >> 4
                            for lane in (0, 16):
                                if r[lane] < m and q < words16:
                                    bits[r[lane], q] = (ballot >> lane) & 0xFFFF
                                    bit_writes[r[lane], q] += 1
                continue
            r = row0 + ty[:, None, None] + 16 * np.arange(8)[None, :, None]
            c = col0 + tx[:, None, None] + 16 * np.arange(8)[None, None, :]
            r, c = np.broadcast_to(r, acc.shape), np.broadcast_to(c, acc.shape)
            ok = (r < m) & (c < n)
            out[r[ok], c[ok]] = k - 2 * acc[ok]
            np.add.at(writes, (r[ok], c[ok]), 1)
    if thr is not None:
        b16 = [bits[:, i::4] << np.uint64(16 * i) for i in range(4)]
        return (b16[0] | b16[1] | b16[2] | b16[3]).astype(np.uint64), bit_writes
    return out, writes


@pytest.mark.parametrize("m,n,k", [(130, 200, 700), (1, 1, 1), (129, 5, 4097)])
def test_cuda_core_kernel_model(m, n, k):
    rng = np.random.default_rng(m * n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    out, writes = cuda_core_kernel_model(a, b, m, n, a.shape[1], k)
    assert (writes == 1).all()
    np.testing.assert_array_equal(out, reference.xnor_gemm(a, b, k))


@pytest.mark.parametrize("m,n,k,periods", [(130, 200, 700, 2), (1, 1, 1, 1), (17, 65, 4097, 1),
                                           (9, 16, 64, 3), (5, 140, 100, 5)])
def test_cuda_core_threshold_epilogue_model(m, n, k, periods):
    """xnor_gemm_cuda_core_threshold: one ballot per (i, j) gives rows ty and ty + 1 their 16
    columns in order; every 16-bit output word is stored exactly once."""
    rng = np.random.default_rng(m * 3 + n + k)
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    thr, want = _threshold_case(rng, a, b, k, periods)
    got, writes = cuda_core_kernel_model(a, b, m, n, a.shape[1], k, thr.reshape(-1), periods)
    assert (writes == 1).all()
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------- model of the pack kernels


def pack_kernel_model(x):
    """pack_rows_*: warp (r, w) ballots x[r, 64w + lane] >= 0 and x[r, 64w + 32 + lane] >= 0."""
    rows, k = x.shape
    words = -(-k // 64)
    out = np.zeros((rows, words), np.uint64)
    for r in range(rows):
        for w in range(words):
            c0 = w * 64 + _LANE
            c1 = c0 + 32
            b0 = (c0 < k) & (x[r, np.minimum(c0, k - 1)] >= 0)
            b1 = (c1 < k) & (x[r, np.minimum(c1, k - 1)] >= 0)
            lo = int(np.sum(b0.astype(np.uint64) << _LANE.astype(np.uint64)))  # __ballot_sync
            hi = int(np.sum(b1.astype(np.uint64) << _LANE.astype(np.uint64)))
            out[r, w] = np.uint64((hi << 32) | lo)
    return out


def test_pack_kernel_model():
    x = np.random.default_rng(3).standard_normal((3, 130))
    x[:, ::7] = 0
    np.testing.assert_array_equal(pack_kernel_model(x), reference.pack_rows(x))


# ------------------------------------------- cupy_gpu.bitplane_gemm's host-side logic


@pytest.mark.parametrize("m, k, n", [(3, 70, 5), (1, 64, 1), (0, 784, 3), (4, 130, 0),
                                     (0, 10, 0)])
def test_cupy_bitplane_gemm_combines_planes(monkeypatch, m, k, n):
    """The wrapper's reshape and shift-add, run with NumPy standing in for CuPy and the
    reference GEMM for the kernel; an empty batch (M = 0) returns int32 (0, N)."""
    from minibnn.kernels import cupy_gpu

    monkeypatch.setattr(cupy_gpu, "_cp", lambda: np)
    monkeypatch.setattr(cupy_gpu, "xnor_gemm", reference.xnor_gemm)
    rng = np.random.default_rng(m * 31 + k + n)
    planes = reference.pack_bitplanes(rng.integers(0, 256, (m, k), dtype=np.uint8))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    z = cupy_gpu.bitplane_gemm(planes, b, k)
    assert z.dtype == np.int32 and z.shape == (m, n)
    np.testing.assert_array_equal(z, reference.bitplane_gemm(planes, b, k))
