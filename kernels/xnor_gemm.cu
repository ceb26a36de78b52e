// Bit packing and XNOR-popcount GEMM for minibnn (compiled by NVRTC through CuPy).
//
// Conventions (written out in the kernels/__init__.py docstring and kernels/reference.py):
// bit 1 = +1, bit 0 = -1, sign(0) = +1; rows packed along K, least significant bit first,
// into uint64 words; padding bits 0. For packed rows a, b of K bits:
//     a . b = K - 2 * popcount(a XOR b)
//           = K - 2 * popcount(a) - 2 * popcount(b) + 4 * popcount(a AND b).
// NVRTC has no C standard headers: only built-in types are used.

typedef unsigned long long u64;
typedef unsigned int u32;

// ------------------------------------------------------------------------- packing
// One warp packs one 64-bit word: lane l reads elements 64w + l and 64w + 32 + l, and
// __ballot_sync gathers the 32 predicates of the warp with lane l's at bit l, which is
// exactly the LSB-first bit order. Strides are in elements, so slices and transposes
// are read in place. A NaN sets *nan_flag.

#define PACK_KERNEL(NAME, T, BIT, ISNAN)                                                \
extern "C" __global__ void NAME(const T* __restrict__ x, long long rows, long long k,   \
                                long long stride_row, long long stride_col,             \
                                u64* __restrict__ out, long long words,                 \
                                int* __restrict__ nan_flag)                             \
{                                                                                       \
    const int lane = threadIdx.x & 31;                                                  \
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;     \
    if (warp >= rows * words) return; /* whole warps leave together */                  \
    const long long r = warp / words;                                                   \
    const long long w = warp - r * words;                                               \
    const long long c0 = w * 64 + lane;                                                 \
    const long long c1 = c0 + 32;                                                       \
    bool b0 = false, b1 = false, bad = false;                                           \
    if (c0 < k) { T v = x[r * stride_row + c0 * stride_col]; b0 = BIT; bad |= ISNAN; }  \
    if (c1 < k) { T v = x[r * stride_row + c1 * stride_col]; b1 = BIT; bad |= ISNAN; }  \
    const u32 lo = __ballot_sync(0xffffffffu, b0);                                      \
    const u32 hi = __ballot_sync(0xffffffffu, b1);                                      \
    if (bad) atomicOr(nan_flag, 1);                                                     \
    if (lane == 0) out[r * words + w] = ((u64)hi << 32) | (u64)lo;                      \
}

PACK_KERNEL(pack_rows_f32, float, (v >= 0.0f), (v != v))
PACK_KERNEL(pack_rows_f64, double, (v >= 0.0), (v != v))
PACK_KERNEL(pack_rows_bool, unsigned char, (v != 0), false)

// Threshold and pack in one pass (a frozen layer's sign(BN(z)) as integer thresholds):
// bit (r, c) = z[r, c] >= thr[r mod periods, c], z int32 (rows, n) C-contiguous, thr int64
// (periods, n). One warp per output word, as in PACK_KERNEL: no bool matrix in between.
extern "C" __global__ void pack_threshold_i32(const int* __restrict__ z, long long rows,
                                              long long n, const long long* __restrict__ thr,
                                              long long periods, u64* __restrict__ out,
                                              long long words)
{
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= rows * words) return; /* whole warps leave together */
    const long long r = warp / words;
    const long long w = warp - r * words;
    const long long c0 = w * 64 + lane;
    const long long c1 = c0 + 32;
    const long long t = (r % periods) * n;
    const bool b0 = c0 < n && (long long)z[r * n + c0] >= thr[t + c0];
    const bool b1 = c1 < n && (long long)z[r * n + c1] >= thr[t + c1];
    const u32 lo = __ballot_sync(0xffffffffu, b0);
    const u32 hi = __ballot_sync(0xffffffffu, b1);
    if (lane == 0) out[r * words + w] = ((u64)hi << 32) | (u64)lo;
}

// popcount of each packed row (one warp per row), for the AND form of the identity.
extern "C" __global__ void row_popcount(const u64* __restrict__ x, int rows, int words,
                                        int* __restrict__ out)
{
    const int lane = threadIdx.x & 31;
    const int row = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (row >= rows) return;
    int s = 0;
    for (int w = lane; w < words; w += 32) s += __popcll(x[(long long)row * words + w]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[row] = s;
}

// ------------------------------------------------------- CUDA-core XNOR GEMM (any GPU)
// C[i, j] = K - 2 * sum_w popcount(A[i, w] ^ B[j, w]); A is (M, W), B is (N, W), C (M, N).
// Block tile 128 x 128, 256 threads as 16 x 16; thread (tx, ty) owns the 8 x 8 outputs
// (ty + 16 i, tx + 16 j), so shared-memory reads are broadcasts or hit distinct banks.
// K advances 8 words (512 bits) per stage; tiles are staged as 32-bit words in rows
// padded to 17 words (bank-conflict free); the next stage is prefetched to registers.
// Out-of-range rows and words load as 0, and only in-range outputs are stored.

#define CC_BM 128
#define CC_BN 128
#define CC_BKW 8                 // u64 words of K per stage
#define CC_LD (2 * CC_BKW + 1)   // padded row length of the staged tiles, in u32

// Fetch stage STAGE to registers: word q*256 + tid of each 128 x 8-word tile.
__device__ __forceinline__ void cc_load(const u64* __restrict__ A, const u64* __restrict__ B,
                                        u64 ra[4], u64 rb[4], long long row0, long long col0,
                                        int stage, int M, int N, int W, int tid)
{
    const int kw0 = stage * CC_BKW;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int idx = q * 256 + tid;
        const int r = idx >> 3, w = kw0 + (idx & 7);
        ra[q] = (row0 + r < M && w < W) ? A[(row0 + r) * W + w] : 0ull;
        rb[q] = (col0 + r < N && w < W) ? B[(col0 + r) * W + w] : 0ull;
    }
}

// THRESH = true: the threshold-and-pack epilogue instead of int32 C (as in xnor_gemm_tc.cu):
// bit (i, j) = a_i . b_j >= thr[(i mod periods) * N + j], packed LSB first into `bits`
// viewed as 16-bit words, `words16` = 4 * ceil(N/64) per row. For output (i, j) a warp's
// lanes 0..15 hold columns tx + 16j of row ty (even) and lanes 16..31 those of row ty + 1, so
// one __ballot_sync gives each row's 16 columns 16j .. 16j + 15 in order; lanes 0 and 16
// store them.
template <bool THRESH>
__device__ __forceinline__ void cc_gemm(const u64* __restrict__ A, const u64* __restrict__ B,
                                        int* __restrict__ C, const long long* __restrict__ thr,
                                        long long periods, unsigned short* __restrict__ bits,
                                        long long words16, int M, int N, int W, int K)
{
    __shared__ u32 sA[CC_BM * CC_LD];
    __shared__ u32 sB[CC_BN * CC_LD];
    const int tid = threadIdx.x;
    const int tx = tid & 15, ty = tid >> 4;
    const long long row0 = (long long)blockIdx.y * CC_BM;
    const long long col0 = (long long)blockIdx.x * CC_BN;

    int acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0;

    u64 ra[4], rb[4];
    const int n_stages = (W + CC_BKW - 1) / CC_BKW;

    cc_load(A, B, ra, rb, row0, col0, 0, M, N, W, tid);
    for (int s = 0; s < n_stages; ++s) {
        __syncthreads();  // everyone is done reading the previous stage
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int idx = q * 256 + tid;
            const int r = idx >> 3, w = idx & 7;
            sA[r * CC_LD + 2 * w] = (u32)ra[q];
            sA[r * CC_LD + 2 * w + 1] = (u32)(ra[q] >> 32);
            sB[r * CC_LD + 2 * w] = (u32)rb[q];
            sB[r * CC_LD + 2 * w + 1] = (u32)(rb[q] >> 32);
        }
        __syncthreads();
        if (s + 1 < n_stages) cc_load(A, B, ra, rb, row0, col0, s + 1, M, N, W, tid);
#pragma unroll
        for (int kk = 0; kk < 2 * CC_BKW; ++kk) {
            u32 a[8], b[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = sA[(ty + 16 * i) * CC_LD + kk];
#pragma unroll
            for (int j = 0; j < 8; ++j) b[j] = sB[(tx + 16 * j) * CC_LD + kk];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] += __popc(a[i] ^ b[j]);
        }
    }
    if (THRESH) {
        const int lane = tid & 31;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const long long r = row0 + ty + 16 * i;
            const long long* tr = thr + (r < M ? (r % periods) * N : 0);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const long long c = col0 + tx + 16 * j;
                const bool fire = r < M && c < N && (long long)(K - 2 * acc[i][j]) >= tr[c];
                const u32 m = __ballot_sync(0xffffffffu, fire);  // every lane gets here
                const long long q = (col0 + 16 * j) >> 4;
                if ((lane & 15) == 0 && r < M && q < words16)
                    bits[r * words16 + q] = (unsigned short)(lane == 0 ? m : m >> 16);
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const long long r = row0 + ty + 16 * i;
        if (r >= M) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const long long c = col0 + tx + 16 * j;
            if (c < N) C[r * N + c] = K - 2 * acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
xnor_gemm_cuda_core(const u64* __restrict__ A, const u64* __restrict__ B,
                    int* __restrict__ C, int M, int N, int W, int K)
{
    cc_gemm<false>(A, B, C, nullptr, 1, nullptr, 0, M, N, W, K);
}

// The GEMM with the threshold-and-pack epilogue: `out` (M, words) uint64, thr int64
// (periods, N), periods >= 1.
extern "C" __global__ void __launch_bounds__(256, 2)
xnor_gemm_cuda_core_threshold(const u64* __restrict__ A, const u64* __restrict__ B,
                              const long long* __restrict__ thr, long long periods,
                              u64* __restrict__ out, long long words, int M, int N, int W,
                              int K)
{
    cc_gemm<true>(A, B, nullptr, thr, periods, (unsigned short*)out, 4 * words, M, N, W, K);
}
