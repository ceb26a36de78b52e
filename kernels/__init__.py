"""Bit packing and XNOR-popcount matrix products for binarized networks.

A leaf package (it never imports minibnn): arrays in, arrays out.

- ``kernels.reference``: readable NumPy ground truth and the shared operand checks.
- ``kernels.numba_cpu``: parallel CPU packing and GEMM (Numba).
- ``kernels.cupy_gpu``: CUDA packing and GEMM through CuPy (imported lazily).
- ``kernels.nvrtc_check``: compiles the ``*.cu`` sources with NVRTC, no GPU needed.
"""
