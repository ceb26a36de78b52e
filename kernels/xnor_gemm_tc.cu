// Binary tensor-core GEMM for compute capability >= 8.0 (compiled by NVRTC through CuPy).
//
// Uses mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc (PTX ISA, "Warp-level
// matrix multiply-accumulate instructions"; .and.popc because on sm_90 the .xor.popc form
// is emulated and much slower), which accumulates D = C + popcount(A_row AND B_col). With
// the row popcounts pa, pb (padding bits are 0 and count nowhere):
//     a . b = K - 2 * pa - 2 * pb + 4 * popcount(a AND b).
//
// Operands are padded by the caller: A (Mp, Wp), B (Np, Wp) row-major u64 words with
// Mp, Np multiples of 128, Wp a multiple of 8, 16-byte aligned rows, zeros in the pads.
// Only C[i, j] with i < M, j < N is written (row stride N).
//
// Fragment layouts for m16n8k256 .b1 (PTX ISA, "Matrix Fragments for mma.m16n8k256"),
// with g = laneid >> 2 and t = laneid % 4:
//   A (4 x .b32): a0 row g,   bits k = 32t .. 32t+31;   a1 row g+8, same k;
//                 a2 row g,   bits k = 128+32t .. ;     a3 row g+8, same k.
//   B (2 x .b32): b0 column g, k = 32t ..;  b1 column g, k = 128+32t ..
//   C (4 x .s32): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
// The sum over k does not depend on which k a bit is called as long as A and B agree.
// So each lane loads the u64 word t of the 256-bit step for its rows: the low half
// goes to the first k half (a0/a1, b0), the high half to the second (a2/a3, b1).

typedef unsigned long long u64;
typedef unsigned int u32;

#define TC_BM 128
#define TC_BN 128
#define TC_BKW 8                   // u64 words of K per pipeline stage (two k256 steps)
#define TC_LDW 12                  // shared row stride in u64: 96 bytes, so the 16 rows x
                                   // 32 bytes read by a half warp fall in distinct banks
#define TC_STAGES 3
#define TC_STAGE_WORDS ((TC_BM + TC_BN) * TC_LDW)
#define TC_SMEM_BYTES (TC_STAGES * TC_STAGE_WORDS * 8)   // 73728, dynamic shared memory

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

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait_stages()
{
    asm volatile("cp.async.wait_group %0;\n" :: "n"(TC_STAGES - 2) : "memory");
}

__device__ __forceinline__ void mma_b1_and(int c[4], const u32 a[4], const u32 b[2])
{
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copy K stage `stage` of the block's A and B tiles (128 rows x 8 words each) into
// shared buffer `buf`: 512 chunks of 16 bytes per operand, two per thread.
__device__ __forceinline__ void tc_load_stage(u64* smem, int buf, int stage,
                                              const u64* __restrict__ A,
                                              const u64* __restrict__ B,
                                              long long row0, long long col0, int Wp, int tid)
{
    u64* sA = smem + buf * TC_STAGE_WORDS;
    u64* sB = sA + TC_BM * TC_LDW;
    const long long kw0 = (long long)stage * TC_BKW;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const int chunk = q * 256 + tid;
        const int r = chunk >> 2, part = chunk & 3;
        cp_async16(sA + r * TC_LDW + 2 * part, A + (row0 + r) * Wp + kw0 + 2 * part);
        cp_async16(sB + r * TC_LDW + 2 * part, B + (col0 + r) * Wp + kw0 + 2 * part);
    }
}

// 256 threads = 8 warps as 2 (M) x 4 (N); warp tile 64 x 32 = 4 x 4 mma tiles of 16 x 8.
// THRESH = false: C[i, j] = a_i . b_j as int32 (row stride N).
// THRESH = true (a frozen layer's sign(BN(z)) in the epilogue, no int32 matrix): bit (i, j)
// = a_i . b_j >= thr[(i mod periods) * N + j], packed as pack_rows packs (LSB first, padding
// columns 0) into `bits`, viewed as 32-bit words, `words32` = 2 * ceil(N/64) per row.
// Lane (g, t) of a warp holds columns 2t, 2t+1 of each 8-column tile j of its 32 columns:
// it sets bits 8j + 2t + e, the 4 lanes of a group OR theirs together with two xor shuffles,
// and lane t = 0 stores the 32-bit word. Columns wn*32.. start on a 32-bit word boundary.
template <bool THRESH>
__device__ __forceinline__ void tc_gemm(u64* smem, const u64* __restrict__ A,
                                        const u64* __restrict__ B,
                                        const int* __restrict__ pop_a,
                                        const int* __restrict__ pop_b, int* __restrict__ C,
                                        const long long* __restrict__ thr, long long periods,
                                        u32* __restrict__ bits, long long words32,
                                        int M, int N, int Wp, int K)
{
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    const long long row0 = (long long)blockIdx.y * TC_BM;
    const long long col0 = (long long)blockIdx.x * TC_BN;

    int acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

    const int n_stages = Wp / TC_BKW;
    // One commit group per stage (possibly empty) keeps cp.async.wait_group's count exact:
    // at iteration s, groups 0..s+STAGES-2 are committed and wait_group(STAGES-2) leaves
    // only the newest STAGES-2 in flight, so group s (stage s) has landed.
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < n_stages) tc_load_stage(smem, s, s, A, B, row0, col0, Wp, tid);
        cp_async_commit();
    }

    for (int s = 0; s < n_stages; ++s) {
        cp_async_wait_stages();
        __syncthreads();  // stage s visible to all; everyone is done with stage s-1's buffer
        const int next = s + TC_STAGES - 1;
        if (next < n_stages) tc_load_stage(smem, next % TC_STAGES, next, A, B, row0, col0, Wp, tid);
        cp_async_commit();

        const u64* sA = smem + (s % TC_STAGES) * TC_STAGE_WORDS;
        const u64* sB = sA + TC_BM * TC_LDW;
#pragma unroll
        for (int ks = 0; ks < TC_BKW / 4; ++ks) {
            u32 af[4][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = wm * 64 + i * 16 + g;
                const u64 x0 = sA[r * TC_LDW + 4 * ks + t];
                const u64 x1 = sA[(r + 8) * TC_LDW + 4 * ks + t];
                af[i][0] = (u32)x0;
                af[i][1] = (u32)x1;
                af[i][2] = (u32)(x0 >> 32);
                af[i][3] = (u32)(x1 >> 32);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = wn * 32 + j * 8 + g;
                const u64 y = sB[c * TC_LDW + 4 * ks + t];
                bf[j][0] = (u32)y;
                bf[j][1] = (u32)(y >> 32);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_b1_and(acc[i][j], af[i], bf[j]);
        }
    }

    if (THRESH) {
        const long long q = (col0 + wn * 32) >> 5;  // the warp's 32-bit word in each row
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const long long r = row0 + wm * 64 + i * 16 + g + 8 * half;
                u32 word = 0;
                if (r < M) {  // no `continue`: every lane must reach the shuffles
                    const int base = K - 2 * pop_a[r];
                    const long long* tr = thr + (r % periods) * N;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const long long c = col0 + wn * 32 + j * 8 + 2 * t + e;
                            if (c >= N) continue;  // padding columns stay 0
                            const int z = base - 2 * pop_b[c] + 4 * acc[i][j][2 * half + e];
                            if ((long long)z >= tr[c]) word |= 1u << (8 * j + 2 * t + e);
                        }
                    }
                }
                word |= __shfl_xor_sync(0xffffffffu, word, 1);
                word |= __shfl_xor_sync(0xffffffffu, word, 2);
                if (t == 0 && r < M && q < words32) bits[r * words32 + q] = word;
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long r = row0 + wm * 64 + i * 16 + g + 8 * half;
            if (r >= M) continue;
            const int base = K - 2 * pop_a[r];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const long long c = col0 + wn * 32 + j * 8 + 2 * t + e;
                    if (c < N) C[r * N + c] = base - 2 * pop_b[c] + 4 * acc[i][j][2 * half + e];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
xnor_gemm_tc(const u64* __restrict__ A, const u64* __restrict__ B,
             const int* __restrict__ pop_a, const int* __restrict__ pop_b,
             int* __restrict__ C, int M, int N, int Wp, int K)
{
    extern __shared__ __align__(16) u64 smem[];
    tc_gemm<false>(smem, A, B, pop_a, pop_b, C, nullptr, 1, nullptr, 0, M, N, Wp, K);
}

// The GEMM with the threshold-and-pack epilogue: `out` (M, words) uint64, thr int64
// (periods, N), periods >= 1 (row i uses table row i mod periods: a conv layer's positions).
extern "C" __global__ void __launch_bounds__(256, 2)
xnor_gemm_tc_threshold(const u64* __restrict__ A, const u64* __restrict__ B,
                       const int* __restrict__ pop_a, const int* __restrict__ pop_b,
                       const long long* __restrict__ thr, long long periods,
                       u64* __restrict__ out, long long words, int M, int N, int Wp, int K)
{
    extern __shared__ __align__(16) u64 smem[];
    tc_gemm<true>(smem, A, B, pop_a, pop_b, nullptr, thr, periods, (u32*)out, 2 * words,
                  M, N, Wp, K);
}
