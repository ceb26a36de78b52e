// The convolution glue of the cupy backend (compiled by NVRTC through CuPy): im2col,
// col2im, sign-patch packing, max pool and its gradient. Each kernel returns exactly the
// values of the NumPy code in minibnn/functional.py and minibnn/binary.py (the reference),
// bit for bit; kernels/cupy_conv.py documents the layouts and launches them.
//
// One thread per output element (per output word for the packing), in a grid-stride loop
// so any size fits the grid; every index is 64-bit. Inputs are read through their strides
// (in elements, possibly 0 or negative), so views are never copied first. Floats are only
// compared, copied or added in the reference's order: no atomics, no reassociation.
// NVRTC has no C standard headers: only built-in types are used.

typedef unsigned long long u64;

#define GRID_STRIDE_LOOP(t, total)                                                        \
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < (total);    \
         t += (long long)gridDim.x * blockDim.x)

// ------------------------------------------------------------------------------ im2col
// out is the C-contiguous (C*kh*kw, N*Ho*Wo) buffer whose transpose functional.im2col
// returns: out[(c, i, j), (n, y, z)] = xpad[n, c, y*stride + i, z*stride + j], where xpad
// is x with `padding` rows and columns of pad_value around H and W. Thread t writes
// out[t], so stores are coalesced.
template <typename T>
__device__ void im2col_body(const T* __restrict__ x, long long n, long long c, long long h,
                            long long w, long long sn, long long sc, long long sh,
                            long long sw, long long kh, long long kw, long long stride,
                            long long padding, long long ho, long long wo, T pad_value,
                            T* __restrict__ out)
{
    const long long m = n * ho * wo;  // columns of out: patches
    const long long total = c * kh * kw * m;
    GRID_STRIDE_LOOP(t, total) {
        const long long col = t % m, row = t / m;
        const long long z = col % wo, y = (col / wo) % ho, b = col / (wo * ho);
        const long long j = row % kw, i = (row / kw) % kh, ch = row / (kw * kh);
        const long long yy = y * stride + i - padding, xx = z * stride + j - padding;
        const bool inside = yy >= 0 && yy < h && xx >= 0 && xx < w;
        out[t] = inside ? x[b * sn + ch * sc + yy * sh + xx * sw] : pad_value;
    }
}

// ------------------------------------------------------------------------------ col2im
// out (N, C, H, W) C-contiguous, every element written: the sum of the entries
// cols[(n, y, z), (c, i, j)] with y*stride + i - padding = yy and z*stride + j - padding
// = xx, added in the (i, j) row-major order of the reference's slice-adds, starting from
// 0. cols is (N*Ho*Wo, C*kh*kw) with strides (s_row, s_col).
template <typename T>
__device__ void col2im_body(const T* __restrict__ cols, long long s_row, long long s_col,
                            long long n, long long c, long long h, long long w,
                            long long kh, long long kw, long long stride, long long padding,
                            long long ho, long long wo, T* __restrict__ out)
{
    const long long total = n * c * h * w;
    GRID_STRIDE_LOOP(t, total) {
        const long long xx = t % w, yy = (t / w) % h;
        const long long ch = (t / (w * h)) % c, b = t / (w * h * c);
        T acc = (T)0;
        for (long long i = 0; i < kh; ++i) {
            const long long dy = yy + padding - i;  // = y * stride for the window row y
            if (dy < 0 || dy % stride != 0 || dy / stride >= ho) continue;
            const long long y = dy / stride;
            for (long long j = 0; j < kw; ++j) {
                const long long dx = xx + padding - j;
                if (dx < 0 || dx % stride != 0 || dx / stride >= wo) continue;
                const long long z = dx / stride;
                const long long row = (b * ho + y) * wo + z;
                const long long col = (ch * kh + i) * kw + j;
                acc += cols[row * s_row + col * s_col];
            }
        }
        out[t] = acc;
    }
}

// ------------------------------------------------------------------- sign-patch packing
// out (N*Ho*Wo, words) uint64: bit e - 64 q of word q of row r = (n, y, z) is patch entry
// e = (i*kw + j)*C + c, set when xpad[n, c, y*stride + i, z*stride + j] >= 0
// with padding taps set (+1); bits at e >= kh*kw*C stay 0. One thread per word; threads
// next to each other take the same word of neighbouring rows, i.e. neighbouring output
// positions, so their 64 reads of x walk along W together.
template <typename T>
__device__ void pack_sign_patches_body(const T* __restrict__ x, long long n, long long c,
                                       long long h, long long w, long long sn,
                                       long long sc, long long sh, long long sw,
                                       long long kh, long long kw, long long stride,
                                       long long padding, long long ho, long long wo,
                                       long long words, u64* __restrict__ out)
{
    const long long k = kh * kw * c;  // bits per row
    const long long rows = n * ho * wo;
    const long long total = rows * words;
    GRID_STRIDE_LOOP(t, total) {
        const long long r = t % rows, q = t / rows;
        const long long z = r % wo, y = (r / wo) % ho, b = r / (wo * ho);
        const long long e0 = q * 64;
        const long long e1 = (e0 + 64 < k) ? e0 + 64 : k;
        // the tap (i, j) and channel ch of entry e0; advanced one entry per bit below
        long long ch = e0 % c, j = (e0 / c) % kw, i = e0 / (c * kw);
        u64 word = 0ull;
        for (long long e = e0; e < e1; ++e) {
            const long long yy = y * stride + i - padding, xx = z * stride + j - padding;
            bool bit = true;  // a padding tap is +1
            if (yy >= 0 && yy < h && xx >= 0 && xx < w)
                bit = x[b * sn + ch * sc + yy * sh + xx * sw] >= (T)0;  // NaN: 0, as NumPy
            if (bit) word |= 1ull << (e - e0);
            if (++ch == c) {
                ch = 0;
                if (++j == kw) { j = 0; ++i; }
            }
        }
        out[r * words + q] = word;
    }
}

// ---------------------------------------------------------------------------- max pool
// best, arg (N, C, Ho, Wo) C-contiguous: the max of the k x k window at (y*stride,
// z*stride) and its offset i*k + j, scanning row-major from the window's first element
// with a strict > (the first maximal element wins; a NaN first element stays).
template <typename T, typename A>
__device__ void max_pool_body(const T* __restrict__ x, long long n, long long c,
                              long long sn, long long sc, long long sh, long long sw,
                              long long k, long long stride, long long ho, long long wo,
                              T* __restrict__ best, A* __restrict__ arg)
{
    const long long total = n * c * ho * wo;
    GRID_STRIDE_LOOP(t, total) {
        const long long z = t % wo, y = (t / wo) % ho;
        const long long ch = (t / (wo * ho)) % c, b = t / (wo * ho * c);
        const T* win = x + b * sn + ch * sc + (y * stride) * sh + (z * stride) * sw;
        T m = win[0];
        long long a = 0;
        for (long long i = 0; i < k; ++i)
            for (long long j = 0; j < k; ++j) {
                const T v = win[i * sh + j * sw];
                if (v > m) { m = v; a = i * k + j; }
            }
        best[t] = m;
        arg[t] = (A)a;
    }
}

// out (N, C, H, W) C-contiguous, every element written: the sum of g over the windows
// whose arg points at it, in ascending offset order t = i*k + j as the reference's
// slice-adds, starting from 0. g is (N, C, Ho, Wo) with strides; arg C-contiguous.
template <typename T, typename A>
__device__ void max_pool_backward_body(const T* __restrict__ g, long long sn, long long sc,
                                       long long sh, long long sw,
                                       const A* __restrict__ arg, long long n, long long c,
                                       long long h, long long w, long long k,
                                       long long stride, long long ho, long long wo,
                                       T* __restrict__ out)
{
    const long long total = n * c * h * w;
    GRID_STRIDE_LOOP(t, total) {
        const long long xx = t % w, yy = (t / w) % h;
        const long long ch = (t / (w * h)) % c, b = t / (w * h * c);
        T acc = (T)0;
        for (long long i = 0; i < k; ++i) {
            const long long dy = yy - i;  // = y * stride for the window row y
            if (dy < 0 || dy % stride != 0 || dy / stride >= ho) continue;
            const long long y = dy / stride;
            for (long long j = 0; j < k; ++j) {
                const long long dx = xx - j;
                if (dx < 0 || dx % stride != 0 || dx / stride >= wo) continue;
                const long long z = dx / stride;
                if ((long long)arg[((b * c + ch) * ho + y) * wo + z] == i * k + j)
                    acc += g[b * sn + ch * sc + y * sh + z * sw];
            }
        }
        out[t] = acc;
    }
}

// ---------------------------------------------------------------------- entry points
// float32 (_f32) and float64 (_f64); the pool's arg as uint8 (_u8) or int32 (_i32).

#define IM2COL(NAME, T)                                                                    \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long h,          \
                                long long w, long long sn, long long sc, long long sh,     \
                                long long sw, long long kh, long long kw, long long stride, \
                                long long padding, long long ho, long long wo, T pad_value,\
                                T* out)                                                    \
{ im2col_body<T>(x, n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho, wo,          \
                 pad_value, out); }

#define COL2IM(NAME, T)                                                                    \
extern "C" __global__ void NAME(const T* cols, long long s_row, long long s_col,           \
                                long long n, long long c, long long h, long long w,        \
                                long long kh, long long kw, long long stride,              \
                                long long padding, long long ho, long long wo, T* out)     \
{ col2im_body<T>(cols, s_row, s_col, n, c, h, w, kh, kw, stride, padding, ho, wo, out); }

#define PACK_SIGN_PATCHES(NAME, T)                                                         \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long h,          \
                                long long w, long long sn, long long sc, long long sh,     \
                                long long sw, long long kh, long long kw, long long stride, \
                                long long padding, long long ho, long long wo,             \
                                long long words, u64* out)                                 \
{ pack_sign_patches_body<T>(x, n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho,   \
                            wo, words, out); }

#define MAX_POOL(NAME, T, A)                                                               \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long sn,        \
                                long long sc, long long sh, long long sw, long long k,     \
                                long long stride, long long ho, long long wo, T* best,     \
                                A* arg)                                                    \
{ max_pool_body<T, A>(x, n, c, sn, sc, sh, sw, k, stride, ho, wo, best, arg); }

#define MAX_POOL_BACKWARD(NAME, T, A)                                                      \
extern "C" __global__ void NAME(const T* g, long long sn, long long sc, long long sh,      \
                                long long sw, const A* arg, long long n, long long c,      \
                                long long h, long long w, long long k, long long stride,   \
                                long long ho, long long wo, T* out)                        \
{ max_pool_backward_body<T, A>(g, sn, sc, sh, sw, arg, n, c, h, w, k, stride, ho, wo,     \
                               out); }

IM2COL(im2col_f32, float)
IM2COL(im2col_f64, double)
COL2IM(col2im_f32, float)
COL2IM(col2im_f64, double)
PACK_SIGN_PATCHES(pack_sign_patches_f32, float)
PACK_SIGN_PATCHES(pack_sign_patches_f64, double)
MAX_POOL(max_pool2d_f32_u8, float, unsigned char)
MAX_POOL(max_pool2d_f32_i32, float, int)
MAX_POOL(max_pool2d_f64_u8, double, unsigned char)
MAX_POOL(max_pool2d_f64_i32, double, int)
MAX_POOL_BACKWARD(max_pool2d_backward_f32_u8, float, unsigned char)
MAX_POOL_BACKWARD(max_pool2d_backward_f32_i32, float, int)
MAX_POOL_BACKWARD(max_pool2d_backward_f64_u8, double, unsigned char)
MAX_POOL_BACKWARD(max_pool2d_backward_f64_i32, double, int)
