// Binary GEMM on Hopper's warpgroup MMA (compute capability 9.0 only: sm_90a).
//
// Compiled as one module after xnor_gemm_tc.cu (kernels/cuda_sources.py: PRELUDES), whose
// PTX wrappers (cp.async, smem_addr), TC_BKW and epilogue (tc_epilogue) it uses, with
// NVRTC's -arch=sm_90a: the wgmma instructions exist only there (PTX ISA, "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate Instructions"; "Requires sm_90a").
//
// wgmma.mma_async.sync.aligned.m64nNk256.s32.b1.b1.and.popc: the 128 threads of a
// warpgroup compute a 64 x N block of popcount(a AND b) over 256 bits of k in one
// instruction, both operands read by the tensor cores straight from shared memory through
// matrix descriptors. The mma.sync kernels of xnor_gemm_tc.cu load every fragment into
// registers first (ld.shared or ldmatrix) and issue a 16 x 8 mma per warp: 2 to 7
// instructions per mma in their main loops (tools/sass_mainloop.py), which bound them at
// 8192^3 well below the b1 tensor cores' rate. Here a whole 64 x 256 x 256 product is one
// instruction per warpgroup. As in xnor_gemm_tc.cu, with the row popcounts pa, pb:
//     a . b = K - 2 * pa - 2 * pb + 4 * popcount(a AND b).
//
// Block: 256 threads = 2 warpgroups; BM = 128 rows of A (64 per warpgroup) x BN rows of B
// (columns of C): BN = 256 (one m64n256k256 per warpgroup and k256 step, 128 accumulators a
// thread, one block per SM) or BN = 128 (m64n128k256, 64 accumulators, two blocks per SM).
// Each pipeline stage holds TC_BKW = 8 words (512 bits) of k of both tiles: two k256 steps.
//
// Operands as the tiled entries of xnor_gemm_tc.cu take them: A (Mp, Wp) with Mp a multiple
// of 128, B (Np, Wp) with Np a multiple of 128 (rows of B past Np, in a block's 256-row tile,
// are zero-filled), Wp a multiple of 8, 16-byte aligned rows, zeros in the pads, and the row
// popcounts pop_a, pop_b. Only C[i, j] with i < M, j < N is written.
//
// Shared memory layout (PTX ISA, "Shared Memory Matrix Layout": K-major, no swizzling, the
// canonical layout ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) in 128-bit units): a core matrix
// is 8 rows x 16 bytes (128 bits of k), its rows 16 bytes apart; core matrices of the next 8
// rows lie SBO = 128 bytes further, those of the next 128 bits of k LBO bytes further. A
// stage keeps each operand's 4 k-chunks of 16 bytes (one 64-byte row slice) as 4 columns of
// core matrices: chunk kc of row r at kc * LBO + (r / 8) * 128 + (r % 8) * 16, with LBO =
// 16 R + 32 for an R-row tile. The 32 extra bytes put the 4 chunks of one row in different
// bank groups: the 8 threads of a quarter warp copy 2 rows x 4 chunks (tid / 4, tid % 4),
// which then land in 8 distinct 16-byte bank groups (no conflicts), while each group of 4
// threads reads a row's 64 contiguous bytes from global memory. A warpgroup's k256 step
// reads chunks 2 ks and 2 ks + 1 of its 64 rows of A (descriptor start + 2 ks LBO + 1024
// wg) and of all BN rows of B.
//
// Pipeline (STAGES buffers; prefetch distance STAGES - 2): at step s every thread waits for
// its own copies of stage s (cp.async.wait_group), makes them visible to the tensor cores'
// reads (fence.proxy.async: cp.async writes through the generic proxy, wgmma reads through
// the async proxy), and the block barrier makes everyone's visible; then the copies of
// stage s + STAGES - 2 go to the buffer of stage s - 2, free because each warpgroup waited
// for its wgmma of stage s - 2 (wgmma.wait_group 1 at the end of step s - 1) before the
// barrier; then the two k256 steps of stage s are issued as one wgmma group, and the
// warpgroup waits until at most that group is in flight.

#define WG_BM 128
#define WG_STAGES 6
// bytes between the k-chunks of a tile of R rows (see "Shared memory layout" above)
#define WG_LBO(R) ((R) * 16 + 32)
#define WG_STAGE_BYTES(BN) (4 * (WG_LBO(WG_BM) + WG_LBO(BN)))
#define WG_SMEM_BYTES(BN) (WG_STAGES * WG_STAGE_BYTES(BN))  // BN 256: 148992; 128: 99840

// ---- wgmma wrappers begin (tests/test_gemm_kernels_host.py runs this file as C++ on the CPU
// with stand-ins for everything between these two lines) ----
__device__ __forceinline__ void wg_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wg_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}

__device__ __forceinline__ void fence_proxy_async()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving reads of an accumulator above a wgmma.wait_group (the
// registers are written by the asynchronous wgmma, which the compiler does not see).
__device__ __forceinline__ void wg_hold(int& r)
{
    asm volatile("" : "+r"(r) :: "memory");
}

#define WG_D8(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), \
                 "+r"(d[i + 4]), "+r"(d[i + 5]), "+r"(d[i + 6]), "+r"(d[i + 7])

// d += popcount(A AND B) for 64 rows of A x 256 rows of B x 256 bits of k (scale-d 1),
// A and B given by matrix descriptors (wg_desc); d[4j + 2h + e] is row 16 (warp % 4) +
// lane / 4 + 8h, column 8j + 2 (lane % 4) + e of the warpgroup's 64 x 256 block.
__device__ __forceinline__ void wg_mma_n256(int* d, u64 desc_a, u64 desc_b)
{
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k256.s32.b1.b1.and.popc {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, "
        "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "
        "%124, %125, %126, %127}, %128, %129, 1;\n"
        : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56),
          WG_D8(64), WG_D8(72), WG_D8(80), WG_D8(88), WG_D8(96), WG_D8(104), WG_D8(112),
          WG_D8(120)
        : "l"(desc_a), "l"(desc_b)
        : "memory");
}

// The same for 64 x 128 (m64n128k256, 64 accumulators).
__device__ __forceinline__ void wg_mma_n128(int* d, u64 desc_a, u64 desc_b)
{
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k256.s32.b1.b1.and.popc {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1;\n"
        : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56)
        : "l"(desc_a), "l"(desc_b)
        : "memory");
}
// ---- wgmma wrappers end ----

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading dimension byte offset (LBO) and stride dimension byte offset (SBO), each in
// 16-byte units in bits 0-13, 16-29 and 32-45; base offset 0 and swizzle mode 0 (none).
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lbo, u32 sbo)
{
    return (u64)((addr >> 4) & 0x3FFF) | ((u64)((lbo >> 4) & 0x3FFF) << 16)
           | ((u64)((sbo >> 4) & 0x3FFF) << 32);
}

// Copy stage k-words kw .. kw + 7 of the block's tiles into the stage buffer at byte offset
// `buf` of shared memory: thread tid copies 16-byte chunk tid % 4 of rows tid / 4 + 64 q
// (q < 2 of A, q < BN / 64 of B). a_src / b_src: the thread's first chunk of its first row
// (set up once); rows64 = 64 rows of words; bit q of valid_b: that B row exists (< Np).
template <int BN>
__device__ __forceinline__ void wg_load_stage(char* smem, u32 buf, const u64* a_src,
                                              const u64* b_src, const u64* B, long long rows64,
                                              int kw, u32 valid_b, int tid)
{
    const int kc = tid & 3, r = tid >> 2;
    char* dst_a = smem + buf + kc * WG_LBO(WG_BM) + (r >> 3) * 128 + (r & 7) * 16;
    char* dst_b = smem + buf + 4 * WG_LBO(WG_BM) + kc * WG_LBO(BN) + (r >> 3) * 128 + (r & 7) * 16;
#pragma unroll
    for (int q = 0; q < WG_BM / 64; ++q) cp_async16(dst_a + q * 1024, a_src + q * rows64 + kw);
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) {
        const bool in = (valid_b >> q) & 1;
        cp_async16_zfill(dst_b + q * 1024, in ? b_src + q * rows64 + kw : B, in ? 16u : 0u);
    }
}

template <int BN, bool THRESH>
__device__ __forceinline__ void wg_gemm(u64* smem64, const u64* __restrict__ A,
                                        const u64* __restrict__ B,
                                        const int* __restrict__ pop_a,
                                        const int* __restrict__ pop_b, int* __restrict__ C,
                                        const long long* __restrict__ thr, long long periods,
                                        u32* __restrict__ bits, long long words32, int M, int N,
                                        int Wp, int Np, int K)
{
    constexpr int LBO_A = WG_LBO(WG_BM), LBO_B = WG_LBO(BN), STAGE = WG_STAGE_BYTES(BN);
    char* smem = reinterpret_cast<char*>(smem64);
    const int tid = threadIdx.x;
    const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const long long row0 = (long long)blockIdx.y * WG_BM;
    const long long col0 = (long long)blockIdx.x * BN;

    int acc[1][BN / 8][4];  // acc[0][j][2h + e]: see wg_mma_n256
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[0][j][r] = 0;
    int* d = &acc[0][0][0];

    const int n_stages = Wp / TC_BKW;
    const long long rows64 = 64LL * Wp;
    const u64* a_src = A + (row0 + (tid >> 2)) * Wp + 2 * (tid & 3);
    const u64* b_src = B + (col0 + (tid >> 2)) * Wp + 2 * (tid & 3);
    u32 valid_b = 0;
#pragma unroll
    for (int q = 0; q < BN / 64; ++q) valid_b |= (u32)(col0 + (tid >> 2) + 64 * q < Np) << q;
    const u32 sbase = smem_addr(smem);

    // One commit group per stage (possibly empty): at step s, groups 0 .. s + STAGES - 3 are
    // committed, and wait_group(STAGES - 3) (cp_async_wait_stages<STAGES - 1>) leaves the
    // newest STAGES - 3 in flight, so stage s has landed.
#pragma unroll
    for (int s = 0; s < WG_STAGES - 2; ++s) {
        if (s < n_stages)
            wg_load_stage<BN>(smem, s * STAGE, a_src, b_src, B, rows64, s * TC_BKW, valid_b, tid);
        cp_async_commit();
    }
    for (int s = 0; s < n_stages; ++s) {
        cp_async_wait_stages<WG_STAGES - 1>();
        fence_proxy_async();
        __syncthreads();
        const int next = s + WG_STAGES - 2;
        if (next < n_stages)
            wg_load_stage<BN>(smem, (next % WG_STAGES) * STAGE, a_src, b_src, B, rows64,
                              next * TC_BKW, valid_b, tid);
        cp_async_commit();
        const u32 st = sbase + (s % WG_STAGES) * STAGE;
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < TC_BKW / 4; ++ks) {
            const u64 da = wg_desc(st + wg * 1024 + 2 * ks * LBO_A, LBO_A, 128);
            const u64 db = wg_desc(st + 4 * LBO_A + 2 * ks * LBO_B, LBO_B, 128);
            if (BN == 256)
                wg_mma_n256(d, da, db);
            else
                wg_mma_n128(d, da, db);
        }
        wg_commit();
        wg_wait<1>();
    }
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) wg_hold(d[i]);

    tc_epilogue<1, BN / 8, THRESH, true>(acc, pop_a + row0, pop_b + col0, 64 * wg + 16 * warp,
                                         0, row0, col0, lane >> 2, lane & 3, C, thr, periods,
                                         bits, words32, M, N, K);
}

// NAME (int32 output C) and NAME_threshold (the threshold-and-pack epilogue, as the tiled
// entries of xnor_gemm_tc.cu): operands padded by the caller (see the top of this file);
// Np = rows of B as padded (a multiple of 128). Dynamic shared memory WG_SMEM_BYTES(BN).
#define WG_ENTRIES(NAME, BN, MIN_BLOCKS)                                                      \
extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                               \
NAME(const u64* __restrict__ A, const u64* __restrict__ B,                                  \
     const int* __restrict__ pop_a, const int* __restrict__ pop_b,                          \
     int* __restrict__ C, int M, int N, int Wp, int Np, int K)                              \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    wg_gemm<BN, false>(smem, A, B, pop_a, pop_b, C, nullptr, 1, nullptr, 0, M, N, Wp, Np, K); \
}                                                                                           \
                                                                                            \
extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                               \
NAME##_threshold(const u64* __restrict__ A, const u64* __restrict__ B,                      \
                 const int* __restrict__ pop_a, const int* __restrict__ pop_b,              \
                 const long long* __restrict__ thr, long long periods,                      \
                 u64* __restrict__ out, long long words, int M, int N, int Wp, int Np, int K) \
{                                                                                           \
    extern __shared__ __align__(16) u64 smem[];                                             \
    wg_gemm<BN, true>(smem, A, B, pop_a, pop_b, nullptr, thr, periods, (u32*)out, 2 * words, \
                      M, N, Wp, Np, K);                                                     \
}

// 128 x 256, one block per SM (148992 bytes of shared memory)
WG_ENTRIES(xnor_gemm_wg, 256, 1)
// 128 x 128, two blocks per SM (99840 bytes each)
WG_ENTRIES(xnor_gemm_wg128, 128, 2)
