// Binary tensor-core GEMM for compute capability >= 8.0 (compiled by NVRTC through CuPy).
//
// Uses mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc (PTX ISA, "Warp-level
// matrix multiply-accumulate instructions"; .and.popc because on sm_90 the .xor.popc form
// is emulated and much slower), which accumulates D = C + popcount(A_row AND B_col). With
// the row popcounts pa, pb (padding bits are 0 and count nowhere):
//     a . b = K - 2 * pa - 2 * pb + 4 * popcount(a AND b).
//
// Two block tiles (template parameters of one body):
//   128 x 128, 8 warps as 2 (M) x 4 (N) of 64 x 32, 3 stages, 2 blocks per SM: the
//     "tiled" entries xnor_gemm_tc* and the "direct" ones xnor_gemm_tc_direct*;
//   256 x 128, 8 warps as 4 x 2 of 64 x 64, 4 stages, 1 block per SM: xnor_gemm_tc256*.
//     Each operand word loaded from L2 feeds 1.5x the products of the 128 x 128 tile, and
//     each fragment loaded from shared memory 1.33x the mma (a 64 x 64 warp tile, as in
//     CUTLASS's binary GEMMs for sm_80); it needs about 190 registers, so one block per SM.
// Each also comes as an ldmatrix twin, "tcl" for "tc" (xnor_gemm_tcl*, xnor_gemm_tcl256*,
// xnor_gemm_tcl_direct*: the same operands and outputs, 4 stages, fragments loaded with
// ldmatrix; see "LDM = true" above tc_gemm).
// Which is fastest at which shape is for a GPU benchmark to say (bench_gemm.py times each).
//
// Tiled entries: operands padded by the caller: A (Mp, Wp), B (Np, Wp) row-major u64
// words with Mp, Np multiples of the block tile's rows (BM for A, BN for B), Wp a multiple
// of 8, 16-byte aligned rows, zeros in the pads, and their row popcounts pop_a, pop_b.
// Only C[i, j] with i < M, j < N is written (row stride N).
//
// The "direct" entries (xnor_gemm_tc_direct*) take the operands as they are: A (M, W) and
// B (N, W) row-major u64 words with no padding at all. Loads past row M (N) or word W are
// zero-filled in shared memory by cp.async's src-size operand, and the row popcounts are
// counted in the kernel from the fragments the warps already hold, so one launch does the
// whole product (the tiled entries need a padded copy and a popcount launch per operand,
// which at few rows cost more than the product).
//
// Fragment layouts for m16n8k256 .b1 (PTX ISA, "Matrix Fragments for mma.m16n8k256"),
// with g = laneid >> 2 and t = laneid % 4:
//   A (4 x .b32): a0 row g,   bits k = 32t .. 32t+31;   a1 row g+8, same k;
//                 a2 row g,   bits k = 128+32t .. ;     a3 row g+8, same k.
//   B (2 x .b32): b0 column g, k = 32t ..;  b1 column g, k = 128+32t ..
//   C (4 x .s32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
// The sum over k does not depend on which k a bit is called as long as A and B agree.
// So each lane loads the u64 word t of the 256-bit step for its rows: the low half
// goes to the first k half (a0/a1, b0), the high half to the second (a2/a3, b1). (The
// ldmatrix twins use k in its natural order instead: bytes 4t .. of each 16-byte half.)

typedef unsigned long long u64;
typedef unsigned int u32;

#define TC_BKW 8                   // u64 words of K per pipeline stage (two k256 steps)
#define TC_LDW 12                  // shared row stride in u64: 96 bytes, so the 16 rows x
                                   // 32 bytes read by a half warp fall in distinct banks
#define TC_THREADS 256
// the 128 x 128 tile
#define TC_BM 128
#define TC_BN 128
#define TC_STAGES 3
#define TC_STAGE_WORDS ((TC_BM + TC_BN) * TC_LDW)
#define TC_SMEM_BYTES (TC_STAGES * TC_STAGE_WORDS * 8)   // 73728, dynamic shared memory
#define TC_DIRECT_SMEM_BYTES (TC_SMEM_BYTES + (TC_BM + TC_BN) * 4)  // 74752: + popcounts
// the 256 x 128 tile
#define TC256_BM 256
#define TC256_BN 128
#define TC256_STAGES 4
#define TC256_SMEM_BYTES (TC256_STAGES * (TC256_BM + TC256_BN) * TC_LDW * 8)  // 147456
// the ldmatrix forms ("_ldm"): shared row stride 80 bytes (5 x 16), so the 8 rows x 16
// bytes that one ldmatrix phase reads fall in 8 distinct 16-byte bank groups; 4 stages
#define TCL_LDW 10
#define TCL_STAGES 4
#define TCL_SMEM_BYTES (TCL_STAGES * (TC_BM + TC_BN) * TCL_LDW * 8)  // 81920
#define TCL_DIRECT_SMEM_BYTES (TCL_SMEM_BYTES + (TC_BM + TC_BN) * 4)  // 82944: + popcounts
#define TCL256_SMEM_BYTES (TCL_STAGES * (TC256_BM + TC256_BN) * TCL_LDW * 8)  // 122880

// ---- PTX wrappers begin (tests/test_gemm_kernels_host.py runs this file as C++ on the CPU
// with stand-ins for everything between these two lines) ----
__device__ __forceinline__ u32 smem_addr(const void* p)
{
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

__device__ __forceinline__ void cp_async16(void* dst_smem, const void* src_gmem)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(smem_addr(dst_smem)), "l"(src_gmem) : "memory");
}

// cp.async with src-size (PTX ISA, "cp.async"): copies `bytes` (0 or the full size) from
// global memory and zero-fills the rest of the destination.
__device__ __forceinline__ void cp_async16_zfill(void* dst_smem, const void* src_gmem, u32 bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_addr(dst_smem)), "l"(src_gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async8_zfill(void* dst_smem, const void* src_gmem, u32 bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n"
                 :: "r"(smem_addr(dst_smem)), "l"(src_gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int STAGES>
__device__ __forceinline__ void cp_async_wait_stages()
{
    asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2) : "memory");
}

__device__ __forceinline__ void mma_b1_and(int c[4], const u32 a[4], const u32 b[2])
{
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA, "ldmatrix"): lanes 8j .. 8j+7 give
// the shared-window addresses (smem_addr) of the 8 rows (16 bytes each, 16-byte aligned) of
// matrix j; lane l receives r[j] = bytes 4 (l % 4) .. 4 (l % 4) + 3 of row l / 4 of matrix
// j. One instruction loads a whole A fragment of m16n8k256 .b1, or the B fragments of two
// 8-column tiles, into the registers the mma takes (no moves: see "ldmatrix forms" above
// tc_gemm). The address is a 32-bit one the caller keeps, so the loop adds constants to it.
__device__ __forceinline__ void ldsm_x4(u32 r[4], u32 row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
}

// ---- PTX wrappers end ----

// Copy K stage `stage` of the block's A and B tiles (BM and BN rows x 8 words) into
// shared buffer `buf`: 4 chunks of 16 bytes per row, (BM + BN) / 64 per thread.
// Tiled form (DIRECT = false): the operands are padded (rows to the tile, words to 8), row
// stride W, so every chunk is real. Direct form: rows past M (A) or N (B) and words past W
// are zero-filled. With `wide` (W even, both bases 16-byte aligned) a 16-byte chunk is
// wholly inside or outside; otherwise each chunk is two 8-byte copies.
template <int BM, int BN, bool DIRECT>
__device__ __forceinline__ void tc_load_stage(u64* smem, int buf, int stage,
                                              const u64* __restrict__ A,
                                              const u64* __restrict__ B,
                                              long long row0, long long col0, int W, int tid,
                                              int M, int N, bool wide)
{
    u64* sA = smem + buf * (BM + BN) * TC_LDW;
    u64* sB = sA + BM * TC_LDW;
    const long long kw0 = (long long)stage * TC_BKW;
#pragma unroll
    for (int q = 0; q < (BM + BN) * 4 / TC_THREADS; ++q) {
        const int chunk = q * TC_THREADS + tid;
        const bool is_a = q < BM * 4 / TC_THREADS;  // the first BM * 4 chunks are A's
        const int r = (is_a ? chunk : chunk - BM * 4) >> 2, part = chunk & 3;
        const long long kw = kw0 + 2 * part;
        const u64* src = is_a ? A : B;
        const long long row = (is_a ? row0 : col0) + r;
        const int rows = is_a ? M : N;
        u64* dst = (is_a ? sA : sB) + r * TC_LDW + 2 * part;
        if (!DIRECT) {
            cp_async16(dst, src + row * W + kw);
        } else if (wide) {
            const bool in = row < rows && kw < W;
            cp_async16_zfill(dst, in ? src + row * W + kw : src, in ? 16u : 0u);
        } else {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool in = row < rows && kw + e < W;
                cp_async8_zfill(dst + e, in ? src + row * W + kw + e : src, in ? 8u : 0u);
            }
        }
    }
}

// The ldmatrix forms' loader: the same copies as tc_load_stage (thread tid copies 16-byte
// part tid % 4 of rows tid / 4 + 64 q, A's rows first), with each thread's source addresses
// set up once: a_src / b_src point at word 2 (tid % 4) of its first A / B row (row0 + tid /
// 4, col0 + tid / 4), its q-th chunk is rows64 = 64 W words further, and stage s adds s *
// TC_BKW. DIRECT: bit q of valid_a / valid_b says chunk q's row exists (is below M / N);
// copies of missing rows or words are zero-filled with src-size 0, which reads nothing (the
// address they are given may lie past the operand; unlike tc_load_stage, which gives them
// the operand's base, this saves the registers that would hold the bases).
template <int BM, int BN, int LDW, bool DIRECT>
__device__ __forceinline__ void tcl_load_stage(u64* sbuf, const u64* a_src, const u64* b_src,
                                               long long rows64, int kw, int W, u32 valid_a,
                                               u32 valid_b, bool wide, int tid)
{
    u64* dst = sbuf + (tid >> 2) * LDW + 2 * (tid & 3);
    const int k0 = kw + 2 * (tid & 3);  // this thread's first word of the stage
#pragma unroll
    for (int q = 0; q < (BM + BN) / 64; ++q) {
        const bool is_a = q < BM / 64;
        const int qq = is_a ? q : q - BM / 64;
        const u64* src = (is_a ? a_src : b_src) + qq * rows64 + kw;
        u64* d = dst + q * 64 * LDW;
        const bool row_in = ((is_a ? valid_a : valid_b) >> qq) & 1;
        if (!DIRECT) {
            cp_async16(d, src);
        } else if (wide) {
            cp_async16_zfill(d, src, row_in && k0 < W ? 16u : 0u);
        } else {
#pragma unroll
            for (int e = 0; e < 2; ++e) cp_async8_zfill(d + e, src + e, row_in && k0 + e < W ? 8u : 0u);
        }
    }
}

// The epilogue of a warp's IT x JT mma tiles of 16 x 8 (acc[i][j][r], r as the C fragment:
// rows g, g + 8 and columns 2t, 2t + 1 of each tile), the warp's first row and column in the
// block wr0, wc0, and the block's row0, col0 (the tensor-core GEMMs of this file and of
// xnor_gemm_wgmma.cu, whose accumulator fragments lay out the same per warp):
// THRESH = false: C[i, j] = K - 2 pa - 2 pb + 4 acc as int32 (row stride N); PAIRS: the
// lane's two columns as one 8-byte store where N is even and C 8-byte aligned.
// THRESH = true: the threshold-and-pack epilogue described at tc_gemm below.
// pa[lr], pb[lc]: popcounts of the block's local row lr of A and column lc of B.
template <int IT, int JT, bool THRESH, bool PAIRS>
__device__ __forceinline__ void tc_epilogue(const int (&acc)[IT][JT][4], const int* pa,
                                            const int* pb, int wr0, int wc0, long long row0,
                                            long long col0, int g, int t, int* __restrict__ C,
                                            const long long* __restrict__ thr, long long periods,
                                            u32* __restrict__ bits, long long words32, int M,
                                            int N, int K)
{
    if (THRESH) {
#pragma unroll
        for (int i = 0; i < IT; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int lr = wr0 + i * 16 + g + 8 * half;
                const long long r = row0 + lr;
#pragma unroll
                for (int jj = 0; jj < JT / 4; ++jj) {
                    const long long q = (col0 + wc0 + 32 * jj) >> 5;  // 32-bit word
                    u32 word = 0;
                    if (r < M) {  // no `continue`: every lane must reach the shuffles
                        const int base = K - 2 * pa[lr];
                        const long long* tr = thr + (r % periods) * N;
#pragma unroll
                        for (int j4 = 0; j4 < 4; ++j4) {
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int lc = wc0 + (4 * jj + j4) * 8 + 2 * t + e;
                                const long long c = col0 + lc;
                                if (c >= N) continue;  // padding columns stay 0
                                const int z = base - 2 * pb[lc]
                                              + 4 * acc[i][4 * jj + j4][2 * half + e];
                                if ((long long)z >= tr[c]) word |= 1u << (8 * j4 + 2 * t + e);
                            }
                        }
                    }
                    word |= __shfl_xor_sync(0xffffffffu, word, 1);
                    word |= __shfl_xor_sync(0xffffffffu, word, 2);
                    if (t == 0 && r < M && q < words32) bits[r * words32 + q] = word;
                }
            }
        }
        return;
    }
    // PAIRS: the lane's two columns 2t, 2t+1 of a tile as one 8-byte store where aligned
    const bool pairs = PAIRS && N % 2 == 0 && ((unsigned long long)C & 7) == 0;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int lr = wr0 + i * 16 + g + 8 * half;
            const long long r = row0 + lr;
            if (r >= M) continue;
            const int base = K - 2 * pa[lr];
#pragma unroll
            for (int j = 0; j < JT; ++j) {
                if (pairs) {  // column c even, N even: c < N means c + 1 < N too
                    const int lc = wc0 + j * 8 + 2 * t;
                    const long long c = col0 + lc;
                    if (c < N)
                        *reinterpret_cast<int2*>(C + r * N + c) =
                            make_int2(base - 2 * pb[lc] + 4 * acc[i][j][2 * half],
                                      base - 2 * pb[lc + 1] + 4 * acc[i][j][2 * half + 1]);
                    continue;
                }
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int lc = wc0 + j * 8 + 2 * t + e;
                    const long long c = col0 + lc;
                    if (c < N) C[r * N + c] = base - 2 * pb[lc] + 4 * acc[i][j][2 * half + e];
                }
            }
        }
    }
}

// The GEMM body. 256 threads = 8 warps as WARPS_M x (8 / WARPS_M); warp tile WTM x WTN =
// IT x JT mma tiles of 16 x 8 (IT = WTM / 16, JT = WTN / 8).
// THRESH = false: C[i, j] = a_i . b_j as int32 (row stride N).
// THRESH = true (a frozen layer's sign(BN(z)) in the epilogue, no int32 matrix): bit (i, j)
// = a_i . b_j >= thr[(i mod periods) * N + j], packed as pack_rows packs (LSB first, padding
// columns 0) into `bits`, viewed as 32-bit words, `words32` = 2 * ceil(N/64) per row.
// Lane (g, t) of a warp holds columns 2t, 2t+1 of each 8-column tile j of its columns: for
// each group of 32 columns (tiles j = 4jj .. 4jj+3) it sets bits 8(j - 4jj) + 2t + e, the 4
// lanes of a group OR theirs together with two xor shuffles, and lane t = 0 stores the
// 32-bit word. A warp's columns start on a 32-bit word boundary (WTN is a multiple of 32).
// DIRECT = false: padded operands (row stride W = a multiple of 8) and their row popcounts
// pop_a, pop_b from the caller. DIRECT = true: unpadded operands (row stride W, any W > 0);
// warps with wn = 0 count the popcounts of their A rows and warps with wm = 0 those of their
// B rows from the fragments they load (lane t of group g sees word t of each 4-word step of
// row g, g + 8), the 4 lanes of a group add theirs with two xor shuffles, and lane t = 0
// puts the row's total in shared memory (sPop: BM A rows, then BN B rows) for the epilogue.
//
// LDM = true, the ldmatrix forms: shared rows TCL_LDW words apart, addresses of the copies
// set up once (tcl_load_stage), and fragments loaded with ldmatrix in the layout the mma
// states: k in natural order, A's 16 x 256-bit tile as 4 matrices (rows 0-7 / 8-15 x bytes
// 0-15 / 16-31: a0 .. a3), two B tiles as 4 (columns 0-7, bytes 0-15 and 16-31: b0, b1 of
// the first; columns 8-15: of the second). The LDM = false forms load each lane's u64 word
// t with ld.shared and must then move its halves into the order the mma takes (83 moves
// per 32 mma in the 128 x 128 tiled form on sm_90: tools/sass_mainloop.py). The int32
// epilogue stores the two columns a lane holds as one 8-byte store when N is even and C is
// 8-byte aligned. DIRECT and LDM: each thread counts the popcounts of the chunks it copied
// (cnt_own, from shared memory once the stage has landed), the 4 threads of a row add them
// with two xor shuffles, and the first puts the row's total in sPop.
template <int BM, int BN, int WARPS_M, int STAGES, bool THRESH, bool DIRECT, bool LDM = false>
__device__ __forceinline__ void tc_gemm(u64* smem, const u64* __restrict__ A,
                                        const u64* __restrict__ B,
                                        const int* __restrict__ pop_a,
                                        const int* __restrict__ pop_b, int* __restrict__ C,
                                        const long long* __restrict__ thr, long long periods,
                                        u32* __restrict__ bits, long long words32,
                                        int M, int N, int W, bool wide, int K)
{
    constexpr int WARPS_N = 8 / WARPS_M;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    constexpr int IT = WTM / 16, JT = WTN / 8;
    constexpr int LDW = LDM ? TCL_LDW : TC_LDW;
    constexpr int STAGE_WORDS = (BM + BN) * LDW;
    static_assert(WTM % 16 == 0 && WTN % 32 == 0 && (BM * 4) % TC_THREADS == 0 &&
                  (BN * 4) % TC_THREADS == 0, "tile shape");
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const long long row0 = (long long)blockIdx.y * BM;
    const long long col0 = (long long)blockIdx.x * BN;

    int acc[IT][JT][4];
#pragma unroll
    for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < JT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
    int cnt_a[IT][2], cnt_b[JT];  // DIRECT: this lane's share of its rows' popcounts
#pragma unroll
    for (int i = 0; i < IT; ++i) cnt_a[i][0] = cnt_a[i][1] = 0;
#pragma unroll
    for (int j = 0; j < JT; ++j) cnt_b[j] = 0;
    int cnt_own[(BM + BN) / 64];  // DIRECT and LDM: this thread's chunks' popcounts
#pragma unroll
    for (int q = 0; q < (BM + BN) / 64; ++q) cnt_own[q] = 0;

    const int n_stages = (W + TC_BKW - 1) / TC_BKW;
    // LDM: this lane's ldmatrix row addresses in buffer 0 (shared window, bytes): A row
    // (l & 7) + 8 ((l >> 3) & 1) of its warp's first 16-row tile at 16-byte half l >> 4 of
    // a k-step; B column (l & 7) + 8 (l >> 4) of its first 16-column pair at half (l >> 3) & 1
    const u32 lds_a = smem_addr(smem) + 8 * ((wm * WTM + (lane & 7) + ((lane >> 3) & 1) * 8)
                                             * LDW + 2 * (lane >> 4));
    const u32 lds_b = smem_addr(smem) + 8 * ((BM + wn * WTN + (lane & 7) + (lane >> 4) * 8)
                                             * LDW + 2 * ((lane >> 3) & 1));
    // LDM: this thread's copy sources (see tcl_load_stage)
    const long long rows64 = 64LL * W;
    const u64* a_src = A + (row0 + (tid >> 2)) * W + 2 * (tid & 3);
    const u64* b_src = B + (col0 + (tid >> 2)) * W + 2 * (tid & 3);
    u32 valid_a = 0, valid_b = 0;
#pragma unroll
    for (int q = 0; q < BM / 64; ++q) valid_a |= (u32)(row0 + (tid >> 2) + 64 * q < M) << q;
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) valid_b |= (u32)(col0 + (tid >> 2) + 64 * q < N) << q;
    // One commit group per stage (possibly empty) keeps cp.async.wait_group's count exact:
    // at iteration s, groups 0..s+STAGES-2 are committed and wait_group(STAGES-2) leaves
    // only the newest STAGES-2 in flight, so group s (stage s) has landed.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_stages) {
            if (LDM)
                tcl_load_stage<BM, BN, LDW, DIRECT>(smem + s * STAGE_WORDS, a_src, b_src, rows64,
                                                    s * TC_BKW, W, valid_a, valid_b, wide, tid);
            else
                tc_load_stage<BM, BN, DIRECT>(smem, s, s, A, B, row0, col0, W, tid, M, N, wide);
        }
        cp_async_commit();
    }

    for (int s = 0; s < n_stages; ++s) {
        cp_async_wait_stages<STAGES>();
        __syncthreads();  // stage s visible to all; everyone is done with stage s-1's buffer
        const int next = s + STAGES - 1;
        if (next < n_stages) {
            if (LDM)
                tcl_load_stage<BM, BN, LDW, DIRECT>(smem + (next % STAGES) * STAGE_WORDS, a_src,
                                                    b_src, rows64, next * TC_BKW, W, valid_a,
                                                    valid_b, wide, tid);
            else
                tc_load_stage<BM, BN, DIRECT>(smem, next % STAGES, next, A, B, row0, col0, W,
                                              tid, M, N, wide);
        }
        cp_async_commit();

        const u64* sA = smem + (s % STAGES) * STAGE_WORDS;
        const u64* sB = sA + BM * LDW;
        if (DIRECT && LDM) {  // the popcounts of the chunks this thread copied (zero pads: 0)
            const u64* mine = sA + (tid >> 2) * LDW + 2 * (tid & 3);
#pragma unroll
            for (int q = 0; q < (BM + BN) / 64; ++q)
                cnt_own[q] += __popcll(mine[q * 64 * LDW]) + __popcll(mine[q * 64 * LDW + 1]);
        }
#pragma unroll
        for (int ks = 0; ks < TC_BKW / 4; ++ks) {
            u32 af[IT][4], bf[JT][2];
            if (LDM) {
                const u32 stage = 8 * (s % STAGES) * STAGE_WORDS + 32 * ks;  // bytes
#pragma unroll
                for (int i = 0; i < IT; ++i) ldsm_x4(af[i], lds_a + stage + 8 * 16 * LDW * i);
#pragma unroll
                for (int jp = 0; jp < JT / 2; ++jp) {
                    u32 r4[4];
                    ldsm_x4(r4, lds_b + stage + 8 * 16 * LDW * jp);
                    bf[2 * jp][0] = r4[0];
                    bf[2 * jp][1] = r4[1];
                    bf[2 * jp + 1][0] = r4[2];
                    bf[2 * jp + 1][1] = r4[3];
                }
#pragma unroll
                for (int i = 0; i < IT; ++i)
#pragma unroll
                    for (int j = 0; j < JT; ++j) mma_b1_and(acc[i][j], af[i], bf[j]);
                continue;
            }
#pragma unroll
            for (int i = 0; i < IT; ++i) {
                const int r = wm * WTM + i * 16 + g;
                const u64 x0 = sA[r * LDW + 4 * ks + t];
                const u64 x1 = sA[(r + 8) * LDW + 4 * ks + t];
                af[i][0] = (u32)x0;
                af[i][1] = (u32)x1;
                af[i][2] = (u32)(x0 >> 32);
                af[i][3] = (u32)(x1 >> 32);
                if (DIRECT && wn == 0) {
                    cnt_a[i][0] += __popcll(x0);
                    cnt_a[i][1] += __popcll(x1);
                }
            }
#pragma unroll
            for (int j = 0; j < JT; ++j) {
                const int c = wn * WTN + j * 8 + g;
                const u64 y = sB[c * LDW + 4 * ks + t];
                bf[j][0] = (u32)y;
                bf[j][1] = (u32)(y >> 32);
                if (DIRECT && wm == 0) cnt_b[j] += __popcll(y);
            }
#pragma unroll
            for (int i = 0; i < IT; ++i)
#pragma unroll
                for (int j = 0; j < JT; ++j) mma_b1_and(acc[i][j], af[i], bf[j]);
        }
    }

    // pa[lr], pb[lc]: popcounts of the block's local row lr of A and column lc of B
    const int* pa;
    const int* pb;
    if (!DIRECT) {
        pa = pop_a + row0;
        pb = pop_b + col0;
    } else {
        int* sPop = (int*)(smem + STAGES * STAGE_WORDS);
        if (LDM) {  // rows tid / 4 + 64 q: the 4 threads of a row are lanes 4m .. 4m+3
#pragma unroll
            for (int q = 0; q < (BM + BN) / 64; ++q) {
                int v = cnt_own[q];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if ((tid & 3) == 0) sPop[(tid >> 2) + 64 * q] = v;  // A's BM rows, then B's
            }
        }
        if (!LDM && wn == 0) {  // warp-uniform branches: all 32 lanes reach the shuffles
#pragma unroll
            for (int i = 0; i < IT; ++i)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    int v = cnt_a[i][half];
                    v += __shfl_xor_sync(0xffffffffu, v, 1);
                    v += __shfl_xor_sync(0xffffffffu, v, 2);
                    if (t == 0) sPop[wm * WTM + i * 16 + g + 8 * half] = v;
                }
        }
        if (!LDM && wm == 0) {
#pragma unroll
            for (int j = 0; j < JT; ++j) {
                int v = cnt_b[j];
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                if (t == 0) sPop[BM + wn * WTN + j * 8 + g] = v;
            }
        }
        __syncthreads();
        pa = sPop;
        pb = sPop + BM;
    }

    tc_epilogue<IT, JT, THRESH, LDM>(acc, pa, pb, wm * WTM, wn * WTN, row0, col0, g, t, C,
                                     thr, periods, bits, words32, M, N, K);
}

#define TC128 TC_BM, TC_BN, 2, TC_STAGES
#define TC256 TC256_BM, TC256_BN, 4, TC256_STAGES

// The tiled entries of one block tile: NAME (int32 output C) and NAME_threshold (the
// threshold-and-pack epilogue: `out` (M, words) uint64, thr int64 (periods, N), periods >= 1;
// row i uses table row i mod periods: a conv layer's positions). Operands padded by the
// caller, with their row popcounts (see the top of this file).
#define TC_TILED_ENTRIES(NAME, TILE, MIN_BLOCKS, LDM)                                          \
extern "C" __global__ void __launch_bounds__(TC_THREADS, MIN_BLOCKS)                        \
NAME(const u64* __restrict__ A, const u64* __restrict__ B,                                  \
     const int* __restrict__ pop_a, const int* __restrict__ pop_b,                          \
     int* __restrict__ C, int M, int N, int Wp, int K)                                      \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    tc_gemm<TILE, false, false, LDM>(smem, A, B, pop_a, pop_b, C, nullptr, 1, nullptr, 0,   \
                                     M, N, Wp, true, K);                                    \
}                                                                                           \
                                                                                            \
extern "C" __global__ void __launch_bounds__(TC_THREADS, MIN_BLOCKS)                        \
NAME##_threshold(const u64* __restrict__ A, const u64* __restrict__ B,                      \
                 const int* __restrict__ pop_a, const int* __restrict__ pop_b,              \
                 const long long* __restrict__ thr, long long periods,                      \
                 u64* __restrict__ out, long long words, int M, int N, int Wp, int K)       \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    tc_gemm<TILE, true, false, LDM>(smem, A, B, pop_a, pop_b, nullptr, thr, periods,        \
                                    (u32*)out, 2 * words, M, N, Wp, true, K);               \
}

// 128 x 128, two blocks per SM (dynamic shared memory TC_SMEM_BYTES).
TC_TILED_ENTRIES(xnor_gemm_tc, TC128, 2, false)

// 256 x 128, one block per SM (A padded to 256 rows, B to 128; TC256_SMEM_BYTES).
TC_TILED_ENTRIES(xnor_gemm_tc256, TC256, 1, false)

// The ldmatrix forms of the two tiles (TCL_SMEM_BYTES and TCL256_SMEM_BYTES), same operands.
#define TCL128 TC_BM, TC_BN, 2, TCL_STAGES
#define TCL256 TC256_BM, TC256_BN, 4, TCL_STAGES
TC_TILED_ENTRIES(xnor_gemm_tcl, TCL128, 2, true)
TC_TILED_ENTRIES(xnor_gemm_tcl256, TCL256, 1, true)

// The direct entries of a 128 x 128 tile: unpadded A (M, W), B (N, W), W > 0; wide != 0 when
// W is even and both base addresses are 16-byte aligned; NAME (int32 output C) and
// NAME_threshold (as the tiled ones').
#define TC_DIRECT_ENTRIES(NAME, TILE, LDM)                                                   \
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)                                 \
NAME(const u64* __restrict__ A, const u64* __restrict__ B, int* __restrict__ C,             \
     int M, int N, int W, int wide, int K)                                                  \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    tc_gemm<TILE, false, true, LDM>(smem, A, B, nullptr, nullptr, C, nullptr, 1, nullptr,   \
                                    0, M, N, W, wide != 0, K);                              \
}                                                                                           \
                                                                                            \
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)                                 \
NAME##_threshold(const u64* __restrict__ A, const u64* __restrict__ B,                      \
                 const long long* __restrict__ thr, long long periods,                      \
                 u64* __restrict__ out, long long words, int M, int N, int W, int wide,     \
                 int K)                                                                     \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    tc_gemm<TILE, true, true, LDM>(smem, A, B, nullptr, nullptr, nullptr, thr, periods,     \
                                   (u32*)out, 2 * words, M, N, W, wide != 0, K);            \
}

// Dynamic shared memory TC_DIRECT_SMEM_BYTES, and TCL_DIRECT_SMEM_BYTES for the ldmatrix form.
TC_DIRECT_ENTRIES(xnor_gemm_tc_direct, TC128, false)
TC_DIRECT_ENTRIES(xnor_gemm_tcl_direct, TCL128, true)
