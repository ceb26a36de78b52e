"""The CUDA sources shipped next to this module, and the minimum architecture of each."""

from importlib import resources

__all__ = ["SOURCES", "read_source"]

#: file name -> minimum compute capability (as 10 * major + minor; 0 = any CUDA GPU)
SOURCES = {
    "xnor_gemm.cu": 0,  # packing, row popcounts, CUDA-core XNOR GEMM
    "xnor_gemm_tc.cu": 80,  # m16n8k256 .b1 tensor-core GEMM (mma.sync, cp.async)
    "conv_glue.cu": 0,  # im2col, col2im, sign-patch packing, max pool (kernels/cupy_conv.py)
}


def read_source(name):
    """Text of the packaged CUDA source ``name`` (one of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"name: expected one of {sorted(SOURCES)}, got {name!r}")
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
