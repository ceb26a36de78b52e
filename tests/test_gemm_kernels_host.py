"""The GPU GEMM and packing kernels (kernels/xnor_gemm_tc.cu, kernels/xnor_gemm.cu), their
very source compiled as C++ and run on the CPU by a small CUDA emulator, launched by
kernels/cupy_gpu.py's own wrappers on the fake CuPy's arrays, equal the NumPy reference
bit for bit; no GPU is needed.

The emulator runs each block's 256 threads as coroutines (``ucontext``) on one OS thread,
switching at every barrier, so ``__syncthreads``, the warp shuffles and ballots, and the
warp-wide ``mma`` meet as they do on the GPU:

* ``__syncthreads`` waits for the block's threads, the ``*_sync`` warp functions, the
  ``ldmatrix`` and the ``mma`` for the warp's 32 lanes (each lane deposits its operand or
  address, all read, all go on);
* ``ldmatrix.x4`` hands lane l the 4 bytes at 4 (l % 4) of row l / 4 of each matrix, as
  the PTX ISA states (a row address misaligned or outside shared memory stops the launch);
* ``mma.m16n8k256 .b1 .and.popc`` is computed from the fragment layouts as the PTX ISA
  states them (its own code here, not the kernel's loading convention);
* ``cp.async`` copies (with their src-size zero-fill) are queued per thread in commit
  groups and land either at issue or only at the ``cp.async.wait_group`` that must
  retire them (both schedules are run: a kernel that reads a stage before waiting for
  it, or reuses a buffer too early, gets stale or garbage words in one of them);
* shared memory starts as garbage (0xA5 bytes), outputs as all-ones bits.

Between the ``PTX wrappers begin/end`` marker lines of xnor_gemm_tc.cu the inline-asm
helpers are swapped for these stand-ins; everything else is the source NVRTC compiles.
This checks what the NumPy models of tests/test_kernels_gpu_emulation.py re-state by hand
(index arithmetic, fragment loads, epilogues) on the source itself, and the ordering of
its asynchronous copies, which no model checks. What it cannot check: timing, the
hardware's real ``cp.async`` and ``mma`` encodings (ptxas assembles them:
tests/test_kernels_nvrtc.py), and memory-model effects beyond these two schedules.
Skipped when no C++ compiler is found.
"""

import ctypes
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import load_fake_cupy, planted_thresholds
from minibnn.kernels import reference
from minibnn.kernels.cuda_sources import read_source

CXX = next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, clang++, c++) found")

EMULATOR = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

struct emu_dim3 { unsigned int x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static   /* blocks run one after another: a static is the block's */

enum { EMU_THREADS = 256, EMU_STACK = 1 << 16 };
struct emu_copy { void* dst; const void* src; unsigned int bytes, size; };
static ucontext_t emu_main, emu_ctx[EMU_THREADS];
static std::vector<char> emu_stacks;
static int emu_cur, emu_finished[EMU_THREADS];
static unsigned long emu_sync_gen, emu_warp_gen[EMU_THREADS / 32];
static int emu_sync_count, emu_warp_count[EMU_THREADS / 32];
static unsigned long long emu_xchg[EMU_THREADS][8];
static std::vector<unsigned long long> emu_smem;
static std::vector<emu_copy> emu_open[EMU_THREADS];
static std::vector<std::vector<emu_copy>> emu_groups[EMU_THREADS];
static int emu_late;           /* cp.async lands at the wait (1) or at issue (0) */
static long emu_switches;
static int emu_failed;         /* why the launch stopped early: 1 a barrier some thread never
                                  reaches, 2 a misaligned or oversized cp.async, 3 a partial
                                  warp mask, 4 an ldmatrix row misaligned or outside shared
                                  memory, 5 a wgmma descriptor this emulator does not take
                                  (swizzled, a base offset, rows outside shared memory) or
                                  one that differs across the warpgroup */
static std::function<void()> emu_body;
static void (*emu_block_start)() = nullptr;  /* per-block state of the wgmma stand-ins */

static void emu_fail(int why)  /* from a kernel thread: abandon the launch */
{
    emu_failed = why;
    setcontext(&emu_main);
}

static void emu_yield()
{
    const int me = emu_cur;
    int next = me;
    do next = (next + 1) % EMU_THREADS; while (emu_finished[next] && next != me);
    if (++emu_switches > 50000000L) emu_fail(1);  /* a barrier some thread never reaches */
    if (next != me) {
        emu_cur = next;
        threadIdx.x = next;
        swapcontext(&emu_ctx[me], &emu_ctx[next]);
        emu_cur = me;           /* resumed */
        threadIdx.x = me;
    }
}

static void __syncthreads()
{
    const unsigned long gen = emu_sync_gen;
    if (++emu_sync_count == EMU_THREADS) { emu_sync_count = 0; ++emu_sync_gen; return; }
    while (emu_sync_gen == gen) emu_yield();
}

static void emu_warp_sync()
{
    const int w = threadIdx.x >> 5;
    const unsigned long gen = emu_warp_gen[w];
    if (++emu_warp_count[w] == 32) { emu_warp_count[w] = 0; ++emu_warp_gen[w]; return; }
    while (emu_warp_gen[w] == gen) emu_yield();
}

template <class T> static T __shfl_xor_sync(unsigned int mask, T v, int lane_mask)
{
    if (mask != 0xffffffffu) emu_fail(3);
    const int me = threadIdx.x, partner = (me & ~31) | ((me & 31) ^ lane_mask);
    std::memcpy(&emu_xchg[me][0], &v, sizeof(T));
    emu_warp_sync();
    T r;
    std::memcpy(&r, &emu_xchg[partner][0], sizeof(T));
    emu_warp_sync();
    return r;
}

static unsigned int __ballot_sync(unsigned int mask, int predicate)
{
    if (mask != 0xffffffffu) emu_fail(3);
    const int me = threadIdx.x, base = me & ~31;
    emu_xchg[me][0] = predicate != 0;
    emu_warp_sync();
    unsigned int r = 0;
    for (int l = 0; l < 32; ++l) r |= (unsigned int)emu_xchg[base + l][0] << l;
    emu_warp_sync();
    return r;
}

template <class T> static T atomicOr(T* p, T v)  /* one OS thread: plainly atomic */
{
    const T old = *p;
    *p = old | v;
    return old;
}

struct int2 { int x, y; };
static int2 make_int2(int x, int y) { return int2{x, y}; }

static int __popc(unsigned int v) { return __builtin_popcount(v); }
static int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
"""

# the stand-ins for the PTX wrappers of xnor_gemm_tc.cu (same names and signatures)
TC_STANDINS = r"""
static void emu_land(const emu_copy& c)
{
    std::memcpy(c.dst, c.src, c.bytes);
    std::memset((char*)c.dst + c.bytes, 0, c.size - c.bytes);
}

static void emu_issue(void* dst, const void* src, unsigned int bytes, unsigned int size)
{
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % size
        || bytes > size) emu_fail(2);  /* cp.async's alignment and size rules */
    const emu_copy c = {dst, src, bytes, size};
    if (emu_late) emu_open[threadIdx.x].push_back(c); else emu_land(c);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) { emu_issue(dst, src, 16, 16); }
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, u32 bytes)
{
    emu_issue(dst, src, bytes, 16);
}
__device__ __forceinline__ void cp_async8_zfill(void* dst, const void* src, u32 bytes)
{
    emu_issue(dst, src, bytes, 8);
}
__device__ __forceinline__ void cp_async_commit()
{
    emu_groups[threadIdx.x].push_back(emu_open[threadIdx.x]);
    emu_open[threadIdx.x].clear();
}
template <int STAGES> __device__ __forceinline__ void cp_async_wait_stages()
{
    std::vector<std::vector<emu_copy>>& g = emu_groups[threadIdx.x];
    while (g.size() > (size_t)(STAGES - 2)) {   /* wait_group(STAGES - 2) retires the rest */
        for (const emu_copy& c : g.front()) emu_land(c);
        g.erase(g.begin());
    }
}

/* The shared window's addresses are offsets into the block's dynamic shared memory here. */
__device__ __forceinline__ u32 smem_addr(const void* p)
{
    return (u32)(reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(emu_smem.data()));
}

/* ldmatrix.sync.aligned.m8n8.x4.shared.b16 as the PTX ISA states it: lanes 8j .. 8j+7 give
   the 16-byte aligned shared addresses of matrix j's 8 rows; lane l receives r[j] = bytes
   4 (l % 4) .. of row l / 4 of matrix j. A row address that is misaligned or not inside the
   block's dynamic shared memory stops the launch. */
__device__ __forceinline__ void ldsm_x4(u32 r[4], u32 row)
{
    const int me = threadIdx.x, base = me & ~31, lane = me & 31;
    const char* p = reinterpret_cast<const char*>(emu_smem.data()) + row;
    if (row % 16 || row + 16 > 8 * emu_smem.size()) emu_fail(4);
    emu_xchg[me][0] = reinterpret_cast<uintptr_t>(p);
    emu_warp_sync();
    for (int j = 0; j < 4; ++j)
        std::memcpy(&r[j], reinterpret_cast<const char*>(emu_xchg[base + 8 * j + lane / 4][0])
                           + 4 * (lane % 4), 4);
    emu_warp_sync();
}

/* mma.m16n8k256.row.col.s32.b1.b1.s32.and.popc from the PTX ISA's fragment layouts, with
   g = lane >> 2, t = lane % 4: A a0 (row g, k 32t..), a1 (row g+8), a2 (row g, k 128+32t..),
   a3 (row g+8, k 128+32t..); B b0 (column g, k 32t..), b1 (column g, k 128+32t..);
   C c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1). */
__device__ __forceinline__ void mma_b1_and(int c[4], const u32 a[4], const u32 b[2])
{
    const int me = threadIdx.x, base = me & ~31, lane = me & 31;
    for (int r = 0; r < 4; ++r) emu_xchg[me][r] = a[r];
    emu_xchg[me][4] = b[0];
    emu_xchg[me][5] = b[1];
    emu_warp_sync();
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        int sum = 0;
        for (int kk = 0; kk < 8; ++kk) {  /* 32-bit chunk kk of k: lane t = kk % 4 */
            const unsigned long long aw = emu_xchg[base + (row & 7) * 4 + (kk & 3)][(row >> 3) + 2 * (kk >> 2)];
            const unsigned long long bw = emu_xchg[base + col * 4 + (kk & 3)][4 + (kk >> 2)];
            sum += __builtin_popcountll(aw & bw);
        }
        c[i] += sum;
    }
    emu_warp_sync();
}
"""

RUNNER = r"""
static void emu_entry()
{
    emu_body();
    /* returning ends the context: uc_link resumes emu_main */
}

static int emu_run(unsigned int gx, unsigned int gy, long smem_bytes, int late,
                   std::function<void()> body)
{
    emu_late = late;
    emu_failed = 0;
    emu_switches = 0;
    gridDim.x = gx; gridDim.y = gy; gridDim.z = 1;
    blockDim.x = EMU_THREADS; blockDim.y = blockDim.z = 1;
    emu_stacks.resize((size_t)EMU_THREADS * EMU_STACK);
    emu_body = body;
    for (unsigned int by = 0; by < gy; ++by)
        for (unsigned int bx = 0; bx < gx; ++bx) {
            blockIdx.x = bx; blockIdx.y = by; blockIdx.z = 0;
            emu_smem.assign((size_t)(smem_bytes + 7) / 8 + 1, 0xA5A5A5A5A5A5A5A5ull);
            emu_sync_count = 0;
            if (emu_block_start) emu_block_start();
            for (int w = 0; w < EMU_THREADS / 32; ++w) emu_warp_count[w] = 0;
            for (int t = 0; t < EMU_THREADS; ++t) {
                emu_finished[t] = 0;
                emu_open[t].clear();
                emu_groups[t].clear();
                getcontext(&emu_ctx[t]);
                emu_ctx[t].uc_stack.ss_sp = &emu_stacks[(size_t)t * EMU_STACK];
                emu_ctx[t].uc_stack.ss_size = EMU_STACK;
                emu_ctx[t].uc_link = &emu_main;
                makecontext(&emu_ctx[t], emu_entry, 0);
            }
            int left = EMU_THREADS;
            emu_cur = 0;
            while (left) {
                threadIdx.x = emu_cur;
                swapcontext(&emu_main, &emu_ctx[emu_cur]);  /* back here when emu_cur ends */
                if (emu_failed) return emu_failed;
                emu_finished[emu_cur] = 1;
                --left;
                int next = emu_cur;
                while (left && emu_finished[next]) next = (next + 1) % EMU_THREADS;
                emu_cur = next;
            }
        }
    return 0;
}

static void* emu_dynamic_smem() { return emu_smem.data(); }
"""

TC_WRAPPERS = r"""
typedef long long ll;
#define EMU_TILED(NAME)                                                                     \
extern "C" int emu_##NAME(unsigned gx, unsigned gy, long smem, int late, const u64* A,      \
    const u64* B, const int* pa, const int* pb, int* C, int M, int N, int Wp, int K)        \
{ return emu_run(gx, gy, smem, late, [=] { NAME(A, B, pa, pb, C, M, N, Wp, K); }); }         \
extern "C" int emu_##NAME##_threshold(unsigned gx, unsigned gy, long smem, int late,        \
    const u64* A, const u64* B, const int* pa, const int* pb, const ll* thr, ll periods,    \
    u64* out, ll words, int M, int N, int Wp, int K)                                        \
{ return emu_run(gx, gy, smem, late, [=] { NAME##_threshold(A, B, pa, pb, thr, periods, out, words, M, N, Wp, K); }); }
EMU_TILED(xnor_gemm_tc)
EMU_TILED(xnor_gemm_tc256)
EMU_TILED(xnor_gemm_tcl)
EMU_TILED(xnor_gemm_tcl256)
#define EMU_DIRECT(NAME)                                                                    \
extern "C" int emu_##NAME(unsigned gx, unsigned gy, long smem, int late, const u64* A,      \
    const u64* B, int* C, int M, int N, int W, int wide, int K)                             \
{ return emu_run(gx, gy, smem, late, [=] { NAME(A, B, C, M, N, W, wide, K); }); }            \
extern "C" int emu_##NAME##_threshold(unsigned gx, unsigned gy, long smem, int late,        \
    const u64* A, const u64* B, const ll* thr, ll periods, u64* out, ll words, int M, int N, \
    int W, int wide, int K)                                                                 \
{ return emu_run(gx, gy, smem, late, [=] { NAME##_threshold(A, B, thr, periods, out, words, M, N, W, wide, K); }); }
EMU_DIRECT(xnor_gemm_tc_direct)
EMU_DIRECT(xnor_gemm_tcl_direct)
"""

# the stand-ins for the wgmma wrappers of xnor_gemm_wgmma.cu (same names and signatures)
WG_STANDINS = r"""
/* wgmma.mma_async.m64nNk256.s32.b1.b1.and.popc as the PTX ISA states it: the 128 threads of
   a warpgroup (threads 128 wg .. 128 wg + 127) meet at each call with the same descriptors;
   A (64 rows) and B (N rows) are read from shared memory in the K-major, unswizzled
   canonical layout ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) of 16-byte units: row r's
   k-chunk c (128 bits) at start + (r / 8) SBO + (r % 8) 16 + c LBO, its own code here, not
   the kernel's; thread l of the warpgroup holds d[4j + 2h + e] = row 16 (l / 32) + (l % 32)
   / 4 + 8h, column 8j + 2 (l % 4) + e. The operation reads shared memory and adds to the
   accumulators at issue (emu_late = 0) or only at the wgmma.wait_group that must retire it
   (emu_late = 1): a kernel that overwrites a stage a wgmma in flight still reads, or reads
   its accumulators before the wait, goes wrong in one of the two. */
struct emu_wg_op { u64 da, db; int n; int* d[128]; };
static std::vector<emu_wg_op> emu_wg_open[2];
static std::vector<std::vector<emu_wg_op>> emu_wg_groups[2];
static unsigned long emu_wgs_gen[2];
static int emu_wgs_count[2];
static int* emu_wg_d[EMU_THREADS];
static u64 emu_wg_desc[EMU_THREADS][2];

static void emu_wg_reset()
{
    for (int g = 0; g < 2; ++g) {
        emu_wg_open[g].clear();
        emu_wg_groups[g].clear();
        emu_wgs_count[g] = 0;
    }
}

static void emu_wg_sync()
{
    const int g = threadIdx.x >> 7;
    const unsigned long gen = emu_wgs_gen[g];
    if (++emu_wgs_count[g] == 128) { emu_wgs_count[g] = 0; ++emu_wgs_gen[g]; return; }
    while (emu_wgs_gen[g] == gen) emu_yield();
}

static const unsigned char* emu_wg_row(u64 desc, int r, int c)
{
    if ((desc >> 49) & 7 || desc >> 62) emu_fail(5);  /* base offset, swizzle */
    const u64 start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4,
              sbo = ((desc >> 32) & 0x3FFF) << 4;
    const u64 at = start + (r >> 3) * sbo + (r & 7) * 16 + c * lbo;
    if (at + 16 > 8 * emu_smem.size()) emu_fail(5);
    return reinterpret_cast<const unsigned char*>(emu_smem.data()) + at;
}

static void emu_wg_do(const emu_wg_op& op)
{
    for (int r = 0; r < 64; ++r)
        for (int col = 0; col < op.n; ++col) {
            int sum = 0;
            for (int c = 0; c < 2; ++c) {
                unsigned long long x[2], y[2];
                std::memcpy(x, emu_wg_row(op.da, r, c), 16);
                std::memcpy(y, emu_wg_row(op.db, col, c), 16);
                sum += __builtin_popcountll(x[0] & y[0]) + __builtin_popcountll(x[1] & y[1]);
            }
            const int l = 32 * (r >> 4) + 4 * (r & 7) + ((col & 7) >> 1);
            op.d[l][4 * (col >> 3) + 2 * ((r >> 3) & 1) + (col & 1)] += sum;
        }
}

static void emu_wg_mma(int* d, u64 da, u64 db, int n)
{
    const int me = threadIdx.x, g = me >> 7;
    emu_wg_d[me] = d;
    emu_wg_desc[me][0] = da;
    emu_wg_desc[me][1] = db;
    emu_wg_sync();
    if ((me & 127) == 0) {
        emu_wg_op op;
        op.da = da; op.db = db; op.n = n;
        for (int l = 0; l < 128; ++l) {
            if (emu_wg_desc[128 * g + l][0] != da || emu_wg_desc[128 * g + l][1] != db)
                emu_fail(5);
            op.d[l] = emu_wg_d[128 * g + l];
        }
        if (emu_late) emu_wg_open[g].push_back(op); else emu_wg_do(op);
    }
    emu_wg_sync();
}

__device__ __forceinline__ void wg_mma_n256(int* d, u64 da, u64 db) { emu_wg_mma(d, da, db, 256); }
__device__ __forceinline__ void wg_mma_n128(int* d, u64 da, u64 db) { emu_wg_mma(d, da, db, 128); }
__device__ __forceinline__ void wg_fence() {}
__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void wg_hold(int&) {}
__device__ __forceinline__ void wg_commit()
{
    emu_wg_sync();
    const int g = threadIdx.x >> 7;
    if ((threadIdx.x & 127) == 0) {
        emu_wg_groups[g].push_back(emu_wg_open[g]);
        emu_wg_open[g].clear();
    }
    emu_wg_sync();
}
template <int N> __device__ __forceinline__ void wg_wait()
{
    emu_wg_sync();
    const int g = threadIdx.x >> 7;
    if ((threadIdx.x & 127) == 0)
        while (emu_wg_groups[g].size() > (size_t)N) {  /* retire the oldest groups */
            for (const emu_wg_op& op : emu_wg_groups[g].front()) emu_wg_do(op);
            emu_wg_groups[g].erase(emu_wg_groups[g].begin());
        }
    emu_wg_sync();
}
"""

WG_WRAPPERS = r"""
typedef long long ll;
#define EMU_WG(NAME)                                                                        \
extern "C" int emu_##NAME(unsigned gx, unsigned gy, long smem, int late, const u64* A,      \
    const u64* B, const int* pa, const int* pb, int* C, int M, int N, int Wp, int Np, int K) \
{ emu_block_start = emu_wg_reset;                                                           \
  return emu_run(gx, gy, smem, late, [=] { NAME(A, B, pa, pb, C, M, N, Wp, Np, K); }); }     \
extern "C" int emu_##NAME##_threshold(unsigned gx, unsigned gy, long smem, int late,        \
    const u64* A, const u64* B, const int* pa, const int* pb, const ll* thr, ll periods,    \
    u64* out, ll words, int M, int N, int Wp, int Np, int K)                                \
{ emu_block_start = emu_wg_reset;                                                           \
  return emu_run(gx, gy, smem, late, [=] { NAME##_threshold(A, B, pa, pb, thr, periods, out, words, M, N, Wp, Np, K); }); }
EMU_WG(xnor_gemm_wg)
EMU_WG(xnor_gemm_wg128)
"""

CC_WRAPPERS = r"""
typedef long long ll;
extern "C" int emu_xnor_gemm_cuda_core(unsigned gx, unsigned gy, long smem, int late,
    const u64* A, const u64* B, int* C, int M, int N, int W, int K)
{ return emu_run(gx, gy, smem, late, [=] { xnor_gemm_cuda_core(A, B, C, M, N, W, K); }); }
extern "C" int emu_xnor_gemm_cuda_core_threshold(unsigned gx, unsigned gy, long smem, int late,
    const u64* A, const u64* B, const ll* thr, ll periods, u64* out, ll words, int M, int N,
    int W, int K)
{ return emu_run(gx, gy, smem, late, [=] { xnor_gemm_cuda_core_threshold(A, B, thr, periods, out, words, M, N, W, K); }); }
extern "C" int emu_row_popcount(unsigned gx, unsigned gy, long smem, int late, const u64* x,
    int rows, int words, int* out)
{ return emu_run(gx, gy, smem, late, [=] { row_popcount(x, rows, words, out); }); }
#define EMU_PACK(NAME, T)                                                                  \
extern "C" int emu_##NAME(unsigned gx, unsigned gy, long smem, int late, const T* x,      \
    ll rows, ll k, ll sr, ll sc, u64* out, ll words, int* flag)                            \
{ return emu_run(gx, gy, smem, late, [=] { NAME(x, rows, k, sr, sc, out, words, flag); }); }
EMU_PACK(pack_rows_f32, float)
EMU_PACK(pack_rows_f64, double)
EMU_PACK(pack_rows_bool, unsigned char)
extern "C" int emu_pack_threshold_i32(unsigned gx, unsigned gy, long smem, int late,
    const int* z, ll rows, ll n, const ll* thr, ll periods, u64* out, ll words)
{ return emu_run(gx, gy, smem, late, [=] { pack_threshold_i32(z, rows, n, thr, periods, out, words); }); }
"""

BEGIN, END = "// ---- PTX wrappers begin", "// ---- PTX wrappers end ----"
DYNAMIC = "extern __shared__ __align__(16) u64 smem[];"


def _tc_source():
    src = read_source("xnor_gemm_tc.cu")
    start, end = src.index(BEGIN), src.index(END)
    # one per entry definition (the tiled pair and the direct pair are each written once, in
    # a macro used twice and in one used twice)
    assert src.count(DYNAMIC) == src.count('extern "C" __global__') == 4
    src = src[:start] + TC_STANDINS + src[end:]
    src = src.replace(DYNAMIC, "u64* smem = (u64*)emu_dynamic_smem();")
    return EMULATOR + RUNNER + '#line 1 "xnor_gemm_tc.cu"\n' + src + TC_WRAPPERS


WG_BEGIN, WG_END = "// ---- wgmma wrappers begin", "// ---- wgmma wrappers end ----"


def _wg_source():
    """The wgmma module as NVRTC compiles it (xnor_gemm_tc.cu, then xnor_gemm_wgmma.cu), each
    file's wrappers swapped for the stand-ins."""
    tc = read_source("xnor_gemm_tc.cu")
    tc = tc[:tc.index(BEGIN)] + TC_STANDINS + tc[tc.index(END):]
    wg = read_source("xnor_gemm_wgmma.cu")
    assert wg.count(DYNAMIC) == 2  # the entry pair's macro, used twice
    wg = wg[:wg.index(WG_BEGIN)] + WG_STANDINS + wg[wg.index(WG_END):]
    return (EMULATOR + RUNNER + '#line 1 "xnor_gemm_tc.cu"\n' + tc.replace(DYNAMIC, "u64* smem = (u64*)emu_dynamic_smem();")
            + '\n#line 1 "xnor_gemm_wgmma.cu"\n' + wg.replace(DYNAMIC, "u64* smem = (u64*)emu_dynamic_smem();")
            + WG_WRAPPERS)


def _cc_source():
    src = read_source("xnor_gemm.cu")
    assert "asm" not in src and "extern __shared__" not in src
    return EMULATOR + RUNNER + '#line 1 "xnor_gemm.cu"\n' + src + CC_WRAPPERS


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemm_host")
    out = {}
    for name, source in (("tc", _tc_source()), ("cc", _cc_source()), ("wg", _wg_source())):
        path, lib = folder / f"{name}.cpp", folder / f"{name}.so"
        path.write_text(source, encoding="utf-8")
        done = subprocess.run([CXX, "-std=c++14", "-O2", "-w", "-shared", "-fPIC", "-o",
                               str(lib), str(path)], capture_output=True, text=True)
        if done.returncode and ("ucontext" in done.stderr or "makecontext" in done.stderr):
            pytest.skip("this C library has no ucontext (makecontext/swapcontext), which the "
                        "emulator's coroutines need (glibc has it; musl and macOS may not)")
        assert done.returncode == 0, done.stderr[-4000:]
        out[name] = ctypes.CDLL(str(lib))
    return out


def _arg(a, strided=False):
    if isinstance(a, np.ndarray):
        assert strided or a.flags.c_contiguous  # a strided read takes its strides as arguments
        return ctypes.c_void_p(a.ctypes.data)
    if type(a) is np.int64:
        return ctypes.c_longlong(a)
    if type(a) in (int, np.int32):
        return ctypes.c_int(int(a))
    raise TypeError(type(a))


def _launch(lib, entry, grid, smem, late, *args):
    fn = getattr(lib, "emu_" + entry)
    fn.restype = ctypes.c_int
    strided = entry.startswith("pack_rows_")  # x is read through its strides
    failed = fn(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_long(smem),
                ctypes.c_int(late), *[_arg(a, strided and i == 0) for i, a in enumerate(args)])
    assert failed == 0, f"{entry}: " + {
        1: "some thread never reached a barrier the others wait at",
        2: "a cp.async with a misaligned address or src-size over its size",
        3: "a warp function called with a partial mask",
        4: "an ldmatrix row address misaligned or outside shared memory",
        5: "a wgmma descriptor swizzled, with a base offset, outside shared memory or not the "
           "same across the warpgroup"}[failed]


class _EmulatedKernel:
    """What cupy_gpu._function returns, launching the emulated kernel: arguments checked
    the way CuPy passes them (device arrays by pointer, NumPy int32 / int64 scalars), and
    dynamic shared memory over the function's allowance refused, as the GPU refuses it.
    ``late``: the cp.async schedule (1: copies land at the wait, 0: at issue)."""

    def __init__(self, lib, name, launched, late):
        self.lib, self.name, self.launched, self.late = lib, name, launched, late
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        assert block == (256,), block
        assert shared_mem <= self.max_dynamic_shared_size_bytes, (self.name, shared_mem)
        host = []
        for a in args:
            if hasattr(a, "_a"):  # a fake CuPy array: its NumPy data
                host.append(a._a)
            elif type(a) in (np.int32, np.int64):
                host.append(a)
            else:
                raise TypeError(f"{self.name}: argument {a!r} of type {type(a).__name__}")
        gx, gy = (tuple(grid) + (1,))[:2]
        _launch(self.lib, self.name, (gx, gy), shared_mem, self.late, *host)
        self.launched.append(self.name)


def _emulate(monkeypatch, libs, late=1):
    """kernels.cupy_gpu on the fake CuPy with its kernels run by the emulator (``libs``:
    the compiled sources): the wrapper's own padding, popcounts, grids, argument lists and
    autotune, end to end. Returns (cupy_gpu, the fake CuPy, the names launched)."""
    from minibnn.kernels import cupy_gpu

    fake = load_fake_cupy()
    launched = []
    monkeypatch.setattr(cupy_gpu, "_cp", lambda: fake)
    monkeypatch.setenv("MINIBNN_TC_EXCLUDE", "")  # every form, the unproven ones included
    # every cache the module keeps per device starts empty and is put back afterwards, so
    # nothing made here (fake arrays, emulated kernels) reaches a real GPU's later calls
    for name, empty in (("_modules", {}), ("_kernels", {}), ("_functions", {}),
                        ("_unbuilt", {}), ("_shared_set", set()), ("_form_choice", {}), ("form_timings", {}),
                        ("form_disagreements", {}), ("_deferred_flags", {})):
        assert hasattr(cupy_gpu, name), name
        monkeypatch.setattr(cupy_gpu, name, empty)
    kernels = {}

    def function(source, name):
        lib = libs[{"xnor_gemm_tc.cu": "tc", "xnor_gemm_wgmma.cu": "wg"}.get(source, "cc")]
        return kernels.setdefault(name, _EmulatedKernel(lib, name, launched, late))

    monkeypatch.setattr(cupy_gpu, "_function", function)
    return cupy_gpu, fake, launched


@pytest.fixture
def emulated_gpu(libs, monkeypatch, request):
    """``_emulate``; parametrize it indirectly with the cp.async schedule (default 1)."""
    return _emulate(monkeypatch, libs, getattr(request, "param", 1))


SCHEDULES = pytest.mark.parametrize("emulated_gpu", [1, 0], indirect=True,
                                    ids=["copies-land-at-wait", "copies-land-at-issue"])
FORMS = ["tensorcore_direct", "tensorcore_tiled", "tensorcore_tiled256", "tensorcore_direct_ldm",
         "tensorcore_tiled_ldm", "tensorcore_tiled256_ldm", "tensorcore_wgmma",
         "tensorcore_wgmma128", "cuda"]
SHAPES = [(1, 1, 1), (130, 200, 700), (16, 8, 256), (5, 33, 4097), (257, 64, 130), (3, 129, 64),
          (70, 90, 640)]  # W = 1, 11, 4, 65, 3, 1, 10: odd and even, partial last stages


def _case(rng, m, n, k, periods=None):
    a = reference.pack_rows(rng.standard_normal((m, k)))
    b = reference.pack_rows(rng.standard_normal((n, k)))
    z = reference.xnor_gemm(a, b, k)
    thr = None if periods is None else planted_thresholds(rng, z, periods)
    return a, b, z, thr


@SCHEDULES
@pytest.mark.parametrize("kernel", FORMS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_kernels_on_the_emulator(emulated_gpu, kernel, m, n, k):
    cupy_gpu, _, launched = emulated_gpu
    rng = np.random.default_rng(m * 31 + n + k)
    a, b, z, _ = _case(rng, m, n, k)
    np.testing.assert_array_equal(cupy_gpu.xnor_gemm(a, b, k, kernel=kernel).get(), z)
    assert launched[-1].startswith("xnor_gemm")


@pytest.mark.parametrize("kernel", FORMS)
@pytest.mark.parametrize("m,n,k,periods", [(130, 200, 700, 2), (9, 33, 64, 3), (300, 100, 130, 5),
                                           (1, 129, 1025, 1), (6, 33, 4097, 3)])
def test_threshold_epilogues_on_the_emulator(emulated_gpu, kernel, m, n, k, periods):
    cupy_gpu, _, _ = emulated_gpu
    rng = np.random.default_rng(m * 7 + n + k)
    a, b, z, thr = _case(rng, m, n, k, periods)
    table = thr.reshape(periods, n) if periods > 1 else thr
    np.testing.assert_array_equal(cupy_gpu.gemm_threshold(a, b, k, table, kernel=kernel).get(),
                                  reference.pack_threshold(z, table))


def _emulate_source(src, tmp_path, libs, monkeypatch, which="tc", late=1):
    """cupy_gpu (as ``_emulate``) with the tensor-core kernels (``which="wg"``: the wgmma
    ones) compiled from ``src``, an altered copy of the emulated source."""
    path, lib = tmp_path / "altered.cpp", tmp_path / "altered.so"
    path.write_text(src, encoding="utf-8")
    subprocess.run([CXX, "-std=c++14", "-O2", "-w", "-shared", "-fPIC", "-o", str(lib),
                    str(path)], check=True)
    return _emulate(monkeypatch, {**libs, which: ctypes.CDLL(str(lib))}, late)[0]


def test_the_emulator_catches_a_missing_wait(libs, tmp_path, monkeypatch):
    """The emulator is strict enough to matter: the tiled kernel with its cp.async wait
    removed reads stages that have not landed and gets wrong products under the
    copies-land-at-wait schedule."""
    src = _tc_source().replace("        cp_async_wait_stages<STAGES>();\n", "", 1)
    cupy_gpu = _emulate_source(src, tmp_path, libs, monkeypatch)
    a, b, z, _ = _case(np.random.default_rng(9), 16, 8, 1000)
    assert not np.array_equal(cupy_gpu.xnor_gemm(a, b, 1000, kernel="tensorcore_tiled").get(), z)


@pytest.mark.parametrize("change,late", [
    # the stage loop without its wgmma.wait_group 1: copies overwrite a stage whose wgmma has
    # not run yet (seen when the wgmma reads shared memory at its wait)
    (("        wg_wait<1>();\n    }", "    }"), 1),
    # prefetching one stage further, into the buffer the previous step's wgmma still reads
    (("const int next = s + WG_STAGES - 2;", "const int next = s + WG_STAGES - 1;"), 1),
    # the descriptors' LBO and SBO swapped (the 8-row groups read as k-chunks)
    (("wg_desc(st + wg * 1024 + 2 * ks * LBO_A, LBO_A, 128)",
      "wg_desc(st + wg * 1024 + 2 * ks * LBO_A, 128, LBO_A)"), 0),
    # warps 0/1 and 2/3 of a warpgroup given each other's rows in the epilogue
    (("64 * wg + 16 * warp,", "64 * wg + 16 * (warp ^ 1),"), 0),
], ids=["no-wgmma-wait", "prefetch-too-far", "lbo-sbo-swapped", "accumulator-rows"])
def test_the_emulator_catches_wgmma_mistakes(libs, tmp_path, monkeypatch, change, late):
    """The wgmma stand-ins are strict enough to matter: each of these changes to
    xnor_gemm_wgmma.cu gives wrong products on a product long enough (9 and 16 stages) to
    reuse the pipeline's buffers."""
    old, new = change
    src = _wg_source()
    assert src.count(old) == 1
    cupy_gpu = _emulate_source(src.replace(old, new), tmp_path, libs, monkeypatch, "wg", late)
    rng = np.random.default_rng(4)
    wrong = 0
    for m, n, k in ((5, 33, 4097), (70, 260, 8192)):
        a, b, z, _ = _case(rng, m, n, k)
        for form in ("tensorcore_wgmma", "tensorcore_wgmma128"):
            try:
                wrong += not np.array_equal(cupy_gpu.xnor_gemm(a, b, k, kernel=form).get(), z)
            except AssertionError as exc:  # or the emulator stopped the launch, saying why
                assert "wgmma descriptor" in str(exc)
                wrong += 1
    assert wrong


def test_the_emulator_catches_a_wrong_ldmatrix_lane_map(libs, tmp_path, monkeypatch):
    """The ldmatrix forms are checked on their fragment order, not only on what they load:
    the tiled ldmatrix form with A's matrices 1 and 2 swapped (rows 8-15 taken for the high
    k half) gives wrong products. And plain "tensorcore", timing the forms, finds them
    wrong on the product in hand, warns, and never picks them: its result is right."""
    good = ("const u32 lds_a = smem_addr(smem) + 8 * ((wm * WTM + (lane & 7) + ((lane >> 3) & 1) * 8)\n"
            "                                             * LDW + 2 * (lane >> 4));")
    src = _tc_source()
    assert src.count(good) == 1
    src = src.replace(good, good.replace("((lane >> 3) & 1) * 8", "(lane >> 4) * 8")
                      .replace("2 * (lane >> 4)", "2 * ((lane >> 3) & 1)"))
    cupy_gpu = _emulate_source(src, tmp_path, libs, monkeypatch)
    a, b, z, _ = _case(np.random.default_rng(9), 16, 8, 1000)
    np.testing.assert_array_equal(cupy_gpu.xnor_gemm(a, b, 1000, kernel="tensorcore_tiled").get(), z)
    assert not np.array_equal(cupy_gpu.xnor_gemm(a, b, 1000, kernel="tensorcore_tiled_ldm").get(), z)
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "1")
    monkeypatch.delenv("MINIBNN_TC_FORM", raising=False)
    for threshold in (False, True):
        cupy_gpu.form_disagreements.clear()
        cupy_gpu._form_choice.clear()
        with pytest.warns(RuntimeWarning, match="gave a product different from tensorcore_direct"):
            if threshold:
                thr = planted_thresholds(np.random.default_rng(3), z, 1)
                got = cupy_gpu.gemm_threshold(a, b, 1000, thr).get()
                np.testing.assert_array_equal(got, reference.pack_threshold(z, thr))
            else:
                np.testing.assert_array_equal(cupy_gpu.xnor_gemm(a, b, 1000).get(), z)
        (key, wrong), = cupy_gpu.form_disagreements.items()
        # the three ldmatrix forms, whose A fragments this source swaps: all wrong, none
        # chosen
        assert set(wrong) == {"tensorcore_tiled_ldm", "tensorcore_tiled256_ldm",
                              "tensorcore_direct_ldm"}
        assert cupy_gpu._form_choice[key] not in wrong
        assert set(cupy_gpu.form_timings[key]).isdisjoint(wrong)


def test_a_form_nvrtc_cannot_build_is_left_out_of_the_autotune(emulated_gpu, monkeypatch):
    """Plain "tensorcore" times the forms on the first product of a class: a form whose
    module NVRTC refuses (CuPy's CompileException; say, an NVRTC without sm_90a for the
    wgmma forms) was never launched, so it is left out with a warning and the product is
    still right; any other error from a form is not swallowed."""
    cupy_gpu, _, _ = emulated_gpu
    monkeypatch.setenv("MINIBNN_GPU_AUTOTUNE", "1")
    monkeypatch.delenv("MINIBNN_TC_FORM", raising=False)
    real = cupy_gpu._function

    def failing(exc):  # _function, raising exc for the wgmma module
        def function(source, name):
            if source == "xnor_gemm_wgmma.cu":
                raise exc
            return real(source, name)
        return function

    class CompileException(Exception):  # the name CuPy's compiler raises under
        pass

    monkeypatch.setattr(cupy_gpu, "_function", failing(
        CompileException("nvrtc: error: invalid value for --gpu-architecture")))
    a, b, z, _ = _case(np.random.default_rng(5), 9, 70, 300)
    with pytest.warns(RuntimeWarning, match=r"\['tensorcore_wgmma', 'tensorcore_wgmma128'\] "
                                            r"could not be compiled"):
        np.testing.assert_array_equal(cupy_gpu.xnor_gemm(a, b, 300).get(), z)
    (key, left_out), = cupy_gpu.form_disagreements.items()
    assert left_out == ["tensorcore_wgmma", "tensorcore_wgmma128"]
    assert cupy_gpu._form_choice[key] not in left_out
    assert set(cupy_gpu.form_timings[key]).isdisjoint(left_out)

    class LaunchFailure(Exception):
        pass

    monkeypatch.setattr(cupy_gpu, "_function", failing(LaunchFailure("cudaErrorIllegalInstruction")))
    cupy_gpu._form_choice.clear()
    with pytest.raises(LaunchFailure):
        cupy_gpu.xnor_gemm(a, b, 300)


def test_a_module_nvrtc_refused_is_not_compiled_again(monkeypatch):
    """cupy_gpu._function: CuPy compiles a RawModule's code on its first get_function and,
    when NVRTC refuses it, again on the next. The refusal is kept per device and source:
    later kernels of that module raise it at once (the autotune of every new shape class
    would otherwise pay the compilation again); other modules, other devices and other
    errors are not touched."""
    from minibnn.kernels import cupy_gpu

    class CompileException(Exception):  # the name CuPy's compiler raises under
        pass

    compiled, device = [], [0]

    class RawModule:
        def __init__(self, code, options):
            self.options = options

        def get_function(self, name):
            compiled.append((device[0], name))
            if any(o.startswith("-arch=sm_90a") for o in self.options):
                raise CompileException("nvrtc: error: invalid value for --gpu-architecture")
            if name == "flaky":
                raise RuntimeError("not a compiler error")
            return ("function", name)

    fake = SimpleNamespace(RawModule=RawModule,
                           cuda=SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: device[0])))
    monkeypatch.setattr(cupy_gpu, "_cp", lambda: fake)
    for name in ("_modules", "_functions", "_unbuilt"):
        monkeypatch.setattr(cupy_gpu, name, {})
    with pytest.raises(CompileException) as first:
        cupy_gpu._function("xnor_gemm_wgmma.cu", "xnor_gemm_wg")
    with pytest.raises(CompileException) as again:
        cupy_gpu._function("xnor_gemm_wgmma.cu", "xnor_gemm_wg128")
    assert again.value is first.value and compiled == [(0, "xnor_gemm_wg")]
    assert cupy_gpu._function("xnor_gemm_tc.cu", "xnor_gemm_tc") == ("function", "xnor_gemm_tc")
    for _ in range(2):  # an error other than the compiler's is not kept
        with pytest.raises(RuntimeError):
            cupy_gpu._function("xnor_gemm_tc.cu", "flaky")
    device[0] = 1  # another GPU (another NVRTC target) tries for itself
    with pytest.raises(CompileException):
        cupy_gpu._function("xnor_gemm_wgmma.cu", "xnor_gemm_wg128")
    assert compiled == [(0, "xnor_gemm_wg"), (0, "xnor_gemm_tc"), (0, "flaky"), (0, "flaky"),
                        (1, "xnor_gemm_wg128")]


# ------------------------------- prepared weights, views, the autotune, packing

KERNEL_NAMES = ["tensorcore"] + FORMS


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("m,n,k,periods", [(130, 200, 700, 2), (1, 1, 1, 1), (40, 129, 576, 4),
                                           (257, 64, 640, 1)])
def test_gpu_gemm_path_end_to_end_on_the_emulator(emulated_gpu, kernel, m, n, k, periods):
    """cupy_gpu.xnor_gemm and gemm_threshold, plain and on prepared weights, on device
    arrays and on a view one row in (rows 8 bytes off 16 when W is odd), give the reference
    on every kernel name, "tensorcore" included (its first product of a class times every
    form through the emulator)."""
    cupy_gpu, fake, launched = emulated_gpu
    rng = np.random.default_rng(m + n + k)
    a_full = reference.pack_rows(rng.standard_normal((m + 1, k)))
    a, b = a_full[1:], reference.pack_rows(rng.standard_normal((n, k)))
    z = reference.xnor_gemm(a, b, k)
    thr = planted_thresholds(rng, z, periods)
    want_bits = reference.pack_threshold(z, thr.reshape(periods, n) if periods > 1 else thr)
    prepared = cupy_gpu.prepare_weights(b)
    for left in (a, fake.asarray(a_full)[1:]):
        for right in (b, prepared):
            got = cupy_gpu.xnor_gemm(left, right, k, kernel=kernel)
            np.testing.assert_array_equal(got.get(), z)
            bits = cupy_gpu.gemm_threshold(left, right, k, thr.reshape(periods, n)
                                           if periods > 1 else thr, kernel=kernel)
            np.testing.assert_array_equal(bits.get(), want_bits)
    entries = {n for n in launched if n.startswith("xnor_gemm")}
    if kernel == "tensorcore":
        assert cupy_gpu.form_timings and entries >= {
            "xnor_gemm_tc_direct", "xnor_gemm_tc", "xnor_gemm_tc256", "xnor_gemm_tcl_direct",
            "xnor_gemm_tcl", "xnor_gemm_tcl256", "xnor_gemm_wg", "xnor_gemm_wg128"}
    else:
        assert len({e.replace("_threshold", "") for e in entries}) == 1, entries


def test_gpu_packing_path_end_to_end_on_the_emulator(emulated_gpu):
    """cupy_gpu.pack_rows (float32, float64, bool and other dtypes; C-ordered, transposed
    and reversed views read through their strides; a NaN raised at once or deferred to
    nan_seen), pack_threshold (fused int32 pass and the general one), pack_bitplanes and
    bitplane_gemm, on the emulator, give the reference."""
    cupy_gpu, fake, launched = emulated_gpu
    rng = np.random.default_rng(12)
    for dtype in (np.float32, np.float64, np.int16):
        x = rng.standard_normal((7, 130)).astype(dtype)
        x[0, :5] = 0
        xd = fake.asarray(x)
        for host, device in ((x, xd), (x[:, ::-1], xd[:, ::-1]), (x[::2], xd[::2]),
                             (x.T, xd.T)):
            np.testing.assert_array_equal(cupy_gpu.pack_rows(device).get(),
                                          reference.pack_rows(host))
    bools = rng.random((5, 70)) < 0.5
    np.testing.assert_array_equal(cupy_gpu.pack_rows(fake.asarray(bools)).get(),
                                  reference.pack_rows(bools))
    assert {"pack_rows_f32", "pack_rows_f64", "pack_rows_bool"} <= set(launched)
    bad = rng.standard_normal((3, 100)).astype(np.float32)
    bad[2, 99] = np.nan
    with pytest.raises(ValueError, match="cannot binarize NaN"):
        cupy_gpu.pack_rows(fake.asarray(bad))
    assert not cupy_gpu.nan_seen()
    cupy_gpu.pack_rows(fake.asarray(bad), check_nan="defer")
    assert cupy_gpu.nan_seen() and not cupy_gpu.nan_seen()

    z = rng.integers(-50, 50, (12, 70)).astype(np.int32)
    thr = rng.integers(-40, 40, (4, 70))
    np.testing.assert_array_equal(cupy_gpu.pack_threshold(fake.asarray(z), thr).get(),
                                  reference.pack_threshold(z, thr))
    zf = z.astype(np.float32) + 0.5  # not int32: compare, then pack
    np.testing.assert_array_equal(cupy_gpu.pack_threshold(fake.asarray(zf), thr[0]).get(),
                                  reference.pack_threshold(zf, thr[0]))

    pixels = rng.integers(0, 256, (9, 100)).astype(np.uint8)
    w = reference.pack_rows(rng.standard_normal((33, 100)))
    planes = cupy_gpu.pack_bitplanes(fake.asarray(pixels))
    np.testing.assert_array_equal(planes.get(), reference.pack_bitplanes(pixels))
    np.testing.assert_array_equal(cupy_gpu.bitplane_gemm(planes, w, 100).get(),
                                  reference.bitplane_gemm(reference.pack_bitplanes(pixels), w, 100))


def test_the_module_caches_are_all_reset_by_the_fixture():
    """Every module-level dict or set of cupy_gpu is one the emulated_gpu fixture swaps out
    (a new cache left out would carry fake arrays into a real GPU's later calls)."""
    from minibnn.kernels import cupy_gpu
    caches = {name for name, value in vars(cupy_gpu).items()
              if isinstance(value, (dict, set)) and not name.startswith("__")}
    assert caches == {"_modules", "_kernels", "_functions", "_unbuilt", "_shared_set",
                      "_form_choice", "form_timings", "form_disagreements", "_deferred_flags"}
