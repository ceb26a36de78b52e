"""Bit packing and XNOR-popcount matrix products for binarized networks.

A leaf package (it never imports minibnn): arrays in, arrays out.

Modules
-------
- ``minibnn.kernels.reference``: readable NumPy ground truth and the shared operand checks.
- ``minibnn.kernels.numba_cpu``: parallel CPU packing and GEMM (Numba); dispatches among GEMM
  kernels: ``"generic"`` (in ``numba_cpu``), ``"scalar"``, ``"simd256"`` and ``"simd512"``
  (``minibnn.kernels.numba_simd``: LLVM IR micro-kernels on ``llvm.ctpop`` of 1, 4 or 8
  64-bit lanes, ``vpopcntq`` where the CPU has AVX512_VPOPCNTDQ), ``"bcast256"`` and
  ``"bcast512"`` (the same module: lanes across rows of B, for short K), ``"avx2"`` and
  ``"avx512bw"`` (``minibnn.kernels.numba_avx2``, nibble-table LLVM IR micro-kernels),
  ``"hs256"`` and ``"hs512"`` (``minibnn.kernels.numba_hs``, Harley-Seal);
  ``kernels._numba_common`` holds what they share.
- ``minibnn.kernels.numba_vnni``: uint8 x int8 -> int32 product with AVX512-VNNI ``vpdpbusd``
  (``available()``, ``pack_weights(w)``, ``int8_gemm(x, wp, n)``), one exact way to run the
  first layer on pixels (``minibnn.deploy.runtime.first_layer``); ``minibnn.kernels.numba_madd``
  the same API on AVX2 (``vpmaddubsw``, weights in {-1, 0, +1}) for CPUs without VNNI.
- ``minibnn.kernels.autotune``: the CPU's ISA features (``isa_features()``) and the measured
  choice among the CPU GEMM kernels per shape class, cached on disk per machine.
- ``minibnn.kernels.cupy_gpu``: CUDA packing and GEMM through CuPy (CuPy imported lazily).
- ``minibnn.kernels.numba_conv`` and ``minibnn.kernels.cupy_conv``: the convolution glue
  (col2im, sign-patch packing, max pool; cupy also im2col) compiled for the numba and cupy
  backends, bit for bit the NumPy code of ``minibnn.functional`` and ``minibnn.binary``;
  ``minibnn.kernels.numba_conv_tiles``: the register-tiled micro-kernels of numba's binary
  convolution backward.
- ``kernels.cuda_sources``: the packaged ``*.cu`` files and their minimum architecture.
- ``minibnn.kernels.nvrtc_check``: compiles the ``*.cu`` sources with NVRTC, no GPU needed.

Bit conventions (Courbariaux et al., "Binarized Neural Networks", arXiv:1602.02830)
------------------------------------------------------------------------------------
A value x is binarized to sign(x) with sign(0) = +1 (so -0.0 is +1 too); bool True
is +1. Bit 1 stands for +1, bit 0 for -1. A row of K values is packed along its last
axis K, least significant bit first, into W = ceil(K/64) uint64 words; the
``64 W - K`` padding bits of the last word are 0. For two packed rows a, b of K bits

    a . b = (#agreeing bits) - (#disagreeing bits) = K - 2 * popcount(a XOR b),

and padding bits, 0 in both operands, never disagree. The GPU tensor-core kernel uses
the equivalent ``K - 2 popcount(a) - 2 popcount(b) + 4 popcount(a AND b)``.
``minibnn.kernels.reference`` writes each of these out in NumPy.

The backend interface
---------------------
Each backend module (``reference``, ``numba_cpu``, ``cupy_gpu``) provides these four
functions with these leading parameters (``tests/test_kernels.py`` checks the names and
parameters; a backend may add keyword parameters with defaults, noted below). All three
give bit-identical results. "Array module" is NumPy for ``reference`` and ``numba_cpu``
(NumPy input) and CuPy for ``cupy_gpu`` (NumPy or CuPy input, results stay on the GPU).

``pack_rows(x)``
    ``x`` (..., K) of bool, integer or real floating dtype, any memory layout ->
    uint64 (..., W), W = ceil(K/64); a 1-D (K,) gives (W,). bit = (x >= 0), or x for
    bool. Raises TypeError for any other dtype (complex, object, ...), ValueError for a
    0-d input and ValueError for NaN (it has no sign). ``cupy_gpu.pack_rows(x,
    check_nan=True)``: ``check_nan=False`` skips the NaN check, which reads one flag back
    from the GPU.

``xnor_gemm(a, b, k)``
    ``a`` uint64 (M, W), ``b`` uint64 (N, W): rows packed by ``pack_rows``, ``b`` holds
    the right factor transposed (a row per output unit); W = ceil(k/64); any layout.
    Returns int32 (M, N) with ``out[i, j] = k - 2 popcount(a[i] XOR b[j])``, i.e.
    ``unpack(a) @ unpack(b).T``; M = 0 or N = 0 gives an empty result, k = 0 zeros.
    Raises ValueError naming the argument when: ``k`` is not a non-negative integer (bool
    rejected); an operand is not an array, not uint64 (a float operand gets the hint to
    pack it first), not 2-D, or has W != ceil(k/64); a padding bit (k mod 64 .. 63 of the
    last word) is 1 -- checked by ``reference`` and ``numba_cpu``, not by ``cupy_gpu``
    (reading it back would synchronize). ``numba_cpu`` and ``cupy_gpu`` take
    ``kernel=None`` (a name from ``available_kernels()``, default ``default_kernel()``;
    another name raises ValueError); ``cupy_gpu`` also raises ValueError when a size
    exceeds the int32 or launch-grid limits of its kernels.

``pack_bitplanes(x)``
    ``x`` uint8 pixels (M, K) -> uint64 (M, 8, W): plane n of row i is bit n of every
    pixel, packed as by ``pack_rows`` (bit 1 = +1). With y^n = 2 x^n - 1 in {-1, +1},
    ``2 x - 255 = sum_n 2^n y^n``. Anything but a 2-D uint8 array raises ValueError.

``bitplane_gemm(planes, b, k)``
    ``planes`` uint64 (M, 8, W) from ``pack_bitplanes``, ``b`` uint64 (N, W) from
    ``pack_rows`` -> int32 (M, N), ``z[i, j] = sum_n 2^n (k - 2 popcount(planes[i, n] XOR
    b[j])) = (2 x_i - 255) . w_j`` (the paper's first layer on 8-bit input). Raises
    ValueError if ``planes`` is not uint64 of shape (M, 8, W), and otherwise as
    ``xnor_gemm`` for ``planes[:, 0]``, ``b`` and ``k`` (padding checked on every
    backend here).

Besides these:

- ``pack_threshold(z, threshold)`` (every backend): a frozen hidden layer's sign(BN(z)),
  packed: ``z`` (M, N) integer or float, ``threshold`` (N,) or a (P, N) table with P
  dividing M (row i uses ``threshold[i mod P]``: a convolution's per-position table) ->
  uint64 (M, ceil(N/64)) with bit (i, j) = ``z[i, j] >= threshold``. ``numba_cpu`` does it
  in one parallel pass and takes ``out=`` (a uint64 buffer to reuse); ValueError for other
  dtypes or shapes.
- ``gemm_threshold(a, b, k, threshold, kernel=None)`` (``cupy_gpu``): the two in one
  kernel, ``pack_threshold(xnor_gemm(a, b, k), threshold)`` with the comparison and packing
  in the GEMM's epilogue (no int32 matrix); integer thresholds only.
- ``prepare_weights(b)`` (``numba_cpu``, ``cupy_gpu``): a right operand kept in the forms the
  backend's kernels read (a ``PreparedWeights``), which ``xnor_gemm`` takes in place of ``b``.

- ``unpack_rows(packed, k, dtype=np.float32)`` (``reference``, re-exported by
  ``numba_cpu``): uint64 (..., W) -> +-1 values (..., k) of ``dtype``, NumPy; ValueError
  unless ``packed`` is uint64 with W == ceil(k/64) and k a non-negative integer.
- ``available_kernels()`` and ``default_kernel()`` (``numba_cpu``, ``cupy_gpu``): the
  GEMM kernels this machine can run as a tuple of names, and the default.
  ``numba_cpu``: ``"generic"``, ``"scalar"``, then ``"simd256"`` and ``"avx2"`` where the
  CPU has AVX2 and ``"simd512"`` where it has AVX512F; the default
  (``default_kernel(m, n, k)``) is the autotune's measured choice for the shape class
  (``kernels.autotune``: ``MINIBNN_GEMM_KERNEL`` forces one, ``MINIBNN_AUTOTUNE=0`` skips
  measuring); ``numba_cpu.xnor_gemm`` also takes ``out=`` (an int32 (M, N) buffer to
  reuse), and ``numba_cpu.bitplane_gemm`` takes ``kernel=None`` (``"generic"`` or one of
  the ``simd``/``scalar`` kernels; default the autotune's choice). ``cupy_gpu``:
  ``("tensorcore", "tensorcore_direct", "tensorcore_tiled", "tensorcore_tiled256",
  "tensorcore_direct_ldm", "tensorcore_tiled_ldm", "tensorcore_tiled256_ldm", "cuda")`` on
  compute capability >= 8.0, with the warpgroup-MMA forms ``"tensorcore_wgmma",
  "tensorcore_wgmma128"`` before ``"cuda"`` on 9.0 (``"tensorcore"`` runs the fastest
  tensor-core form for the product's shape class, timed on first use; the 256-row and
  wgmma forms where a block may have their shared memory; the forms of
  ``cupy_gpu.UNPROVEN_FORMS``, not yet run on any GPU, only when ``MINIBNN_TC_EXCLUDE`` is
  set), else
  ``("cuda",)`` (asks the current GPU), the default first.
- ``cupy_gpu.available()``: ``(True, "")`` or ``(False, reason)``, the one check of
  whether the GPU path can run (``minibnn.backend`` reports its reason). Without CuPy,
  ``import minibnn.kernels.cupy_gpu`` still works; its functions raise ImportError with the
  reason. Shapes, dtypes and k are checked before any kernel is launched (a NaN is
  found while packing, and reported after).
- ``reference`` also exports the helpers the others share: ``n_words(k)``,
  ``pad_mask(k)``, ``WORD_BITS``, ``PLANES`` and the ``check_*`` validators.
"""
