"""The CUDA sources shipped next to this module, and the minimum architecture of each."""

from importlib import resources
from types import MappingProxyType

__all__ = ["SOURCES", "PRELUDES", "EXACT_ARCH", "read_source", "module_source"]

#: file name -> minimum compute capability (as 10 * major + minor; 0 = any CUDA GPU)
SOURCES = MappingProxyType({  # read-only, as the two tables below
    "xnor_gemm.cu": 0,  # packing, row popcounts, CUDA-core XNOR GEMM
    "xnor_gemm_tc.cu": 80,  # m16n8k256 .b1 tensor-core GEMM (mma.sync, cp.async)
    "conv_glue.cu": 0,  # im2col, col2im, sign-patch packing, max pool (kernels/cupy_conv.py)
    "xnor_gemm_wgmma.cu": 90,  # m64nNk256 .b1 warpgroup MMA (wgmma), compute capability 9.0
})

#: source -> the sources compiled before it in the same module (it uses their definitions)
PRELUDES = MappingProxyType({"xnor_gemm_wgmma.cu": ("xnor_gemm_tc.cu",)})

#: source -> the one architecture it compiles for, with its feature suffix: the wgmma
#: instructions exist only in sm_90a code, which runs on compute capability 9.0 alone (its
#: SOURCES entry, then the only capability it serves, not a minimum)
EXACT_ARCH = MappingProxyType({"xnor_gemm_wgmma.cu": "90a"})


def read_source(name):
    """Text of the packaged CUDA source ``name`` (one of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"name: expected one of {sorted(SOURCES)}, got {name!r}")
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def module_source(name):
    """The text NVRTC compiles for the module of source ``name``: its preludes, then it."""
    return "".join(read_source(p) for p in PRELUDES.get(name, ()) + (name,))
