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

// Index arithmetic: every kernel splits its flat output index t into coordinates by
// division and remainder. The GPU has no integer divide instruction: a 32-bit division is a
// short sequence, a 64-bit one a long subroutine (on the CIFAR-10 ConvNet's training step on
// an H200, benchmarks/profile_gpu.py, col2im went from 0.97 to 0.69 ms and the max-pool
// gradient from 0.30 to 0.25; im2col, bound by its writes, stayed at about 0.2 ms a call).
// So each body is a template over the index type I, and the entry points
// run it with int when every index of the launch fits in 31 bits (I_FITS), else with long
// long. Addresses (index times stride) are always formed in 64 bits. Defining
// MINIBNN_GLUE_WIDE_INDEX makes every launch take the long long path (the host tests
// compile both).
#ifdef MINIBNN_GLUE_WIDE_INDEX
#define I_FITS(x) false
#else
#define I_FITS(x) ((x) < 2147483647LL)
#endif
#define COMMA ,
#define RUN_WITH_INDEX(fits, body, T_ARGS, ARGS)                                           \
    do { if (fits) body<T_ARGS, int> ARGS; else body<T_ARGS, long long> ARGS; } while (0)

// ------------------------------------------------------------------------------ im2col
// out is the C-contiguous (C*kh*kw, N*Ho*Wo) buffer whose transpose functional.im2col
// returns: out[(c, i, j), (n, y, z)] = xpad[n, c, y*stride + i, z*stride + j], where xpad
// is x with `padding` rows and columns of pad_value around H and W. Thread t writes
// out[t], so stores are coalesced.
//
// The _bf16 variant writes each value as bfloat16 bits (uint16, rounded to nearest even,
// NaN kept quiet: kernels/bf16.py's round_bits, integer operations only), i.e. to_bf16 of
// the float32 patches in the same pass: the patches of a binary layer's +-1 input for its
// split bf16 backward product (minibnn.backend.split_matmul_pm1), at half the bytes.
__device__ inline float to_out(float v, float) { return v; }
__device__ inline double to_out(double v, double) { return v; }
__device__ inline unsigned short to_out(float v, unsigned short)
{
    unsigned int u = __float_as_uint(v);
    unsigned int h = (u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u)
                                                     : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (unsigned short)h;
}

template <typename T, typename O, typename I>
__device__ void im2col_body(const T* __restrict__ x, long long n, long long c, long long h,
                            long long w, long long sn, long long sc, long long sh,
                            long long sw, long long kh, long long kw, long long stride,
                            long long padding, long long ho, long long wo, T pad_value,
                            O* __restrict__ out)
{
    const I m = (I)(n * ho * wo);  // columns of out: patches
    const long long total = c * kh * kw * n * ho * wo;
    const I iwo = (I)wo, iho = (I)ho, ikw = (I)kw, ikh = (I)kh, ih = (I)h, iw = (I)w;
    const I istride = (I)stride, ipad = (I)padding;
    GRID_STRIDE_LOOP(t, total) {
        const I ti = (I)t;
        const I col = ti % m, row = ti / m;
        const I z = col % iwo, y = (col / iwo) % iho, b = col / (iwo * iho);
        const I j = row % ikw, i = (row / ikw) % ikh, ch = row / (ikw * ikh);
        const I yy = y * istride + i - ipad, xx = z * istride + j - ipad;
        const bool inside = yy >= 0 && yy < ih && xx >= 0 && xx < iw;
        out[t] = to_out(inside ? x[(long long)b * sn + (long long)ch * sc + (long long)yy * sh
                                   + (long long)xx * sw]
                               : pad_value, (O)0);
    }
}

// ------------------------------------------------------------------------------ col2im
// out (N, C, H, W) C-contiguous, every element written: the sum of the entries
// cols[(n, y, z), (c, i, j)] with y*stride + i - padding = yy and z*stride + j - padding
// = xx, added in the (i, j) row-major order of the reference's slice-adds, starting from
// 0. cols is (N*Ho*Wo, C*kh*kw) with strides (s_row, s_col).
template <typename T, typename I>
__device__ void col2im_body(const T* __restrict__ cols, long long s_row, long long s_col,
                            long long n, long long c, long long h, long long w,
                            long long kh, long long kw, long long stride, long long padding,
                            long long ho, long long wo, T* __restrict__ out)
{
    const long long total = n * c * h * w;
    const I iw = (I)w, ih = (I)h, ic = (I)c, ikh = (I)kh, ikw = (I)kw;
    const I istride = (I)stride, ipad = (I)padding, iho = (I)ho, iwo = (I)wo;
    GRID_STRIDE_LOOP(t, total) {
        const I ti = (I)t;
        const I xx = ti % iw, yy = (ti / iw) % ih;
        const I ch = (ti / (iw * ih)) % ic, b = ti / (iw * ih * ic);
        T acc = (T)0;
        for (I i = 0; i < ikh; ++i) {
            const I dy = yy + ipad - i;  // = y * stride for the window row y
            if (dy < 0 || dy % istride != 0 || dy / istride >= iho) continue;
            const I y = dy / istride;
            for (I j = 0; j < ikw; ++j) {
                const I dx = xx + ipad - j;
                if (dx < 0 || dx % istride != 0 || dx / istride >= iwo) continue;
                const I z = dx / istride;
                const long long row = ((long long)b * ho + y) * wo + z;
                const long long col = ((long long)ch * kh + i) * kw + j;
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
template <typename T, typename I>
__device__ void pack_sign_patches_body(const T* __restrict__ x, long long n, long long c,
                                       long long h, long long w, long long sn,
                                       long long sc, long long sh, long long sw,
                                       long long kh, long long kw, long long stride,
                                       long long padding, long long ho, long long wo,
                                       long long words, u64* __restrict__ out)
{
    const I k = (I)(kh * kw * c);  // bits per row
    const I rows = (I)(n * ho * wo);
    const long long total = n * ho * wo * words;
    const I ic = (I)c, ikw = (I)kw, iwo = (I)wo, iho = (I)ho, ih = (I)h, iw = (I)w;
    const I istride = (I)stride, ipad = (I)padding;
    GRID_STRIDE_LOOP(t, total) {
        const I ti = (I)t;
        const I r = ti % rows, q = ti / rows;
        const I z = r % iwo, y = (r / iwo) % iho, b = r / (iwo * iho);
        const I e0 = q * 64;
        const I e1 = (e0 + 64 < k) ? e0 + 64 : k;
        // the tap (i, j) and channel ch of entry e0; advanced one entry per bit below
        I ch = e0 % ic, j = (e0 / ic) % ikw, i = e0 / (ic * ikw);
        u64 word = 0ull;
        for (I e = e0; e < e1; ++e) {
            const I yy = y * istride + i - ipad, xx = z * istride + j - ipad;
            bool bit = true;  // a padding tap is +1
            if (yy >= 0 && yy < ih && xx >= 0 && xx < iw)
                bit = x[(long long)b * sn + (long long)ch * sc + (long long)yy * sh
                        + (long long)xx * sw] >= (T)0;  // NaN: 0, as NumPy
            if (bit) word |= 1ull << (e - e0);
            if (++ch == ic) {
                ch = 0;
                if (++j == ikw) { j = 0; ++i; }
            }
        }
        out[(long long)r * words + q] = word;
    }
}

// ---------------------------------------------------------------------------- max pool
// best, arg (N, C, Ho, Wo) C-contiguous: the max of the k x k window at (y*stride,
// z*stride) and its offset i*k + j, scanning row-major from the window's first element
// with a strict > (the first maximal element wins; a NaN first element stays).
template <typename T, typename A, typename I>
__device__ void max_pool_body(const T* __restrict__ x, long long n, long long c,
                              long long sn, long long sc, long long sh, long long sw,
                              long long k, long long stride, long long ho, long long wo,
                              T* __restrict__ best, A* __restrict__ arg)
{
    const long long total = n * c * ho * wo;
    const I iwo = (I)wo, iho = (I)ho, ic = (I)c;
    GRID_STRIDE_LOOP(t, total) {
        const I ti = (I)t;
        const I z = ti % iwo, y = (ti / iwo) % iho;
        const I ch = (ti / (iwo * iho)) % ic, b = ti / (iwo * iho * ic);
        const T* win = x + (long long)b * sn + (long long)ch * sc + (long long)y * stride * sh
                       + (long long)z * stride * sw;
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
template <typename T, typename A, typename I>
__device__ void max_pool_backward_body(const T* __restrict__ g, long long sn, long long sc,
                                       long long sh, long long sw,
                                       const A* __restrict__ arg, long long n, long long c,
                                       long long h, long long w, long long k,
                                       long long stride, long long ho, long long wo,
                                       T* __restrict__ out)
{
    const long long total = n * c * h * w;
    const I iw = (I)w, ih = (I)h, ic = (I)c, ik = (I)k, istride = (I)stride;
    const I iho = (I)ho, iwo = (I)wo;
    GRID_STRIDE_LOOP(t, total) {
        const I ti = (I)t;
        const I xx = ti % iw, yy = (ti / iw) % ih;
        const I ch = (ti / (iw * ih)) % ic, b = ti / (iw * ih * ic);
        T acc = (T)0;
        for (I i = 0; i < ik; ++i) {
            const I dy = yy - i;  // = y * stride for the window row y
            if (dy < 0 || dy % istride != 0 || dy / istride >= iho) continue;
            const I y = dy / istride;
            for (I j = 0; j < ik; ++j) {
                const I dx = xx - j;
                if (dx < 0 || dx % istride != 0 || dx / istride >= iwo) continue;
                const I z = dx / istride;
                if ((long long)arg[(((long long)b * c + ch) * ho + y) * wo + z] == i * ik + j)
                    acc += g[(long long)b * sn + (long long)ch * sc + (long long)y * sh
                             + (long long)z * sw];
            }
        }
        out[t] = acc;
    }
}

// ---------------------------------------------------------------------- entry points
// float32 (_f32) and float64 (_f64); the pool's arg as uint8 (_u8) or int32 (_i32).

#define IM2COL(NAME, T, O)                                                                 \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long h,          \
                                long long w, long long sn, long long sc, long long sh,     \
                                long long sw, long long kh, long long kw, long long stride, \
                                long long padding, long long ho, long long wo, T pad_value,\
                                O* out)                                                    \
{ RUN_WITH_INDEX(I_FITS(c * kh * kw * n * ho * wo + n * c * h * w), im2col_body, T COMMA O, \
                 (x, n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho, wo, pad_value,  \
                  out)); }

#define COL2IM(NAME, T)                                                                    \
extern "C" __global__ void NAME(const T* cols, long long s_row, long long s_col,           \
                                long long n, long long c, long long h, long long w,        \
                                long long kh, long long kw, long long stride,              \
                                long long padding, long long ho, long long wo, T* out)     \
{ RUN_WITH_INDEX(I_FITS(n * c * (h + kh) * (w + kw) + n * c * ho * wo), col2im_body, T,   \
                 (cols, s_row, s_col, n, c, h, w, kh, kw, stride, padding, ho, wo, out)); }

#define PACK_SIGN_PATCHES(NAME, T)                                                         \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long h,          \
                                long long w, long long sn, long long sc, long long sh,     \
                                long long sw, long long kh, long long kw, long long stride, \
                                long long padding, long long ho, long long wo,             \
                                long long words, u64* out)                                 \
{ RUN_WITH_INDEX(I_FITS(n * ho * wo * (words + 1) + kh * kw * c + 64 + n * c * h * w),     \
                 pack_sign_patches_body, T,                                               \
                 (x, n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho, wo, words,     \
                  out)); }

#define MAX_POOL(NAME, T, A)                                                               \
extern "C" __global__ void NAME(const T* x, long long n, long long c, long long sn,        \
                                long long sc, long long sh, long long sw, long long k,     \
                                long long stride, long long ho, long long wo, T* best,     \
                                A* arg)                                                    \
{ RUN_WITH_INDEX(I_FITS(n * c * ho * wo), max_pool_body, T COMMA A,                      \
                 (x, n, c, sn, sc, sh, sw, k, stride, ho, wo, best, arg)); }

#define MAX_POOL_BACKWARD(NAME, T, A)                                                      \
extern "C" __global__ void NAME(const T* g, long long sn, long long sc, long long sh,      \
                                long long sw, const A* arg, long long n, long long c,      \
                                long long h, long long w, long long k, long long stride,   \
                                long long ho, long long wo, T* out)                        \
{ RUN_WITH_INDEX(I_FITS(n * c * (h + k) * (w + k) + n * c * ho * wo), max_pool_backward_body, \
                 T COMMA A, (g, sn, sc, sh, sw, arg, n, c, h, w, k, stride, ho, wo, out)); }

IM2COL(im2col_f32, float, float)
IM2COL(im2col_f64, double, double)
IM2COL(im2col_f32_bf16, float, unsigned short)
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
