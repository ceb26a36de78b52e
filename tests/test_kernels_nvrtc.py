"""Every CUDA source compiles with NVRTC for compute_80 and compute_90 (no GPU needed).

Needs the NVRTC library (``pip install nvidia-cuda-nvrtc-cu12``); skipped with the
reason when it is missing.
"""

import re
from pathlib import Path

import pytest

from minibnn.kernels import cupy_gpu
from minibnn.kernels.cuda_sources import EXACT_ARCH, SOURCES, read_source
from minibnn.kernels.nvrtc_check import (NVRTCError, NVRTCUnavailable, compile_all, compile_source,
                                         find_ptxas, load_nvrtc, ptxas_resources, supported_archs)

try:
    load_nvrtc()
    NVRTC_WHY = ""
except NVRTCUnavailable as exc:
    NVRTC_WHY = str(exc)

pytestmark = pytest.mark.skipif(bool(NVRTC_WHY), reason=NVRTC_WHY)

ENTRIES = {
    "xnor_gemm.cu": {"pack_rows_f32", "pack_rows_f64", "pack_rows_bool", "row_popcount",
                     "xnor_gemm_cuda_core", "xnor_gemm_cuda_core_threshold", "pack_threshold_i32"},
    "xnor_gemm_tc.cu": {"xnor_gemm_tc", "xnor_gemm_tc_threshold", "xnor_gemm_tc_direct",
                        "xnor_gemm_tc_direct_threshold", "xnor_gemm_tc256",
                        "xnor_gemm_tc256_threshold", "xnor_gemm_tcl", "xnor_gemm_tcl_threshold",
                        "xnor_gemm_tcl_direct", "xnor_gemm_tcl_direct_threshold",
                        "xnor_gemm_tcl256", "xnor_gemm_tcl256_threshold"},
    "conv_glue.cu": {f"{op}_{t}" for op in ("im2col", "col2im", "pack_sign_patches")
                     for t in ("f32", "f64")}
                    | {f"{op}_{t}_{a}" for op in ("max_pool2d", "max_pool2d_backward")
                       for t in ("f32", "f64") for a in ("u8", "i32")}
                    | {"im2col_f32_bf16"},
}
# the wgmma module is compiled after xnor_gemm_tc.cu (its prelude): its own entries and the
# prelude's
ENTRIES["xnor_gemm_wgmma.cu"] = ENTRIES["xnor_gemm_tc.cu"] | {
    "xnor_gemm_wg", "xnor_gemm_wg_threshold", "xnor_gemm_wg128", "xnor_gemm_wg128_threshold"}


@pytest.fixture(scope="module", params=["compute_80", "compute_90"])
def ptx(request):
    return compile_all(request.param)


def test_every_source_compiles(ptx):
    cc = 90 if ".target sm_90" in ptx["xnor_gemm.cu"] else 80
    # the wgmma source for 9.0 alone (compute_90a), every other one from its minimum up
    assert set(ptx) == {n for n, low in SOURCES.items()
                        if (cc == low if n in EXACT_ARCH else cc >= low)}
    for name, text in ptx.items():
        entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", text))
        assert entries == ENTRIES[name], name


def test_tensor_core_source_uses_and_popc(ptx):
    text = ptx["xnor_gemm_tc.cu"]
    mmas = re.findall(r"mma\.sync\.aligned\.\S+", text)
    # 2 k256 steps per stage x the warp's mma tiles, fully unrolled, in each entry: (4 x 4)
    # in the eight 128 x 128 ones (int32 output or threshold epilogue; tiled or direct;
    # ld.shared or ldmatrix), (4 x 8) in the four 256 x 128 ones
    assert len(mmas) == 8 * 2 * 16 + 4 * 2 * 32
    assert set(mmas) == {"mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc"}
    assert "xor.popc" not in text
    # 3 stages (wait_group 1) in the 128 x 128 ld.shared forms, 4 (wait_group 2) in the rest
    assert "cp.async.cg.shared.global" in text and "cp.async.wait_group 1" in text
    assert "cp.async.wait_group 2" in text
    # the ldmatrix forms: per k256 step, 4 A tiles + 2 B tile pairs (128 x 128: 4 tiled and
    # direct entries) or 4 + 4 (256 x 128: 2 entries), 2 steps per stage
    ldsm = re.findall(r"ldmatrix\.sync\.aligned\.m8n8\.x4\.shared\.b16", text)
    assert len(ldsm) == 4 * 2 * 6 + 2 * 2 * 8
    # the direct entries' zero-filling copies: 16 bytes (cg) and 8 bytes (ca), with src-size
    assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16, %r\d+;", text)
    assert re.search(r"cp\.async\.ca\.shared\.global \[%r\d+\], \[%rd\d+\], 8, %r\d+;", text)


def test_wgmma_source_compiles_for_sm_90a_alone(ptx):
    """The warpgroup-MMA GEMM is sm_90a code: compiled for compute_90a when compute_90 is
    asked for, never for 8.0; each of its entries fences a stage's cp.async writes to the
    async proxy and then issues the stage's two k256 steps as binary wgmma (the prelude's
    entries none), and the wgmma groups are committed and waited for."""
    if "xnor_gemm_wgmma.cu" not in ptx:
        assert ".target sm_80" in ptx["xnor_gemm.cu"]
        return
    text = ptx["xnor_gemm_wgmma.cu"]
    assert ".target sm_90a" in text
    n = "wgmma.mma_async.sync.aligned.m64n{}k256.s32.b1.b1.and.popc"
    bodies = re.split(r"\.visible \.entry (\w+)\(", text)[1:]
    for entry, body in zip(bodies[::2], bodies[1::2]):
        if not entry.startswith("xnor_gemm_wg"):
            assert "wgmma" not in body, entry
            continue
        mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.\S+", body)
        # one stage: a fence, then two k256 steps (ptxas may unroll the stage loop)
        fences = body.count("fence.proxy.async.shared::cta")
        assert fences >= 1 and mmas == [n.format(128 if "wg128" in entry else 256)] * 2 * fences
    assert "wgmma.wait_group.sync.aligned 1" in text and "wgmma.commit_group" in text
    assert "cp.async.wait_group 3" in text  # 6 stages, prefetch distance 4


def test_nvrtc_lists_the_architectures_it_supports():
    archs = supported_archs()
    assert archs == sorted(archs) and 80 in archs and 90 in archs


def test_cuda_core_source_compiles_for_older_gpus():
    """The CUDA-core kernel and the convolution glue serve GPUs without b1 tensor cores:
    compile them for the oldest architecture below 8.0 that this NVRTC still supports
    (7.0 up to CUDA 12, 7.5 in 13)."""
    older = [a for a in supported_archs() if a < 80]
    if not older:
        pytest.skip(f"this NVRTC supports no architecture below compute_80: {supported_archs()}")
    ptx = compile_all(f"compute_{older[0]}")
    assert set(ptx) == {"xnor_gemm.cu", "conv_glue.cu"}
    assert "popc.b32" in ptx["xnor_gemm.cu"]


def test_conv_glue_has_no_atomics_and_launches_what_it_defines(ptx):
    """Each output is written by one thread (sums in a fixed order, no atomics), and every
    kernel name kernels/cupy_conv.py can launch is an entry of conv_glue.cu."""
    text = ptx["conv_glue.cu"]
    assert "atom." not in text and "red." not in text
    assert "add.f32" in text and "add.f64" in text  # the sums of col2im and the pool's gradient
    assert not re.search(r"\b(fma|mul|div|sub)\.\w*f(32|64)", text)  # floats: added, compared
    wrapper = (Path(cupy_gpu.__file__).parent / "cupy_conv.py").read_text()
    launched = set(re.findall(r'_launch\(f"(\w+)_\{suffix\}(_\{kind\})?"', wrapper))
    assert {op for op, _ in launched} == {"im2col", "col2im", "pack_sign_patches", "max_pool2d",
                                          "max_pool2d_backward"}
    for op, kind in launched:
        for t in ("f32", "f64"):
            for a in (("u8", "i32") if kind else ("",)):
                assert "_".join(filter(None, (op, t, a))) in ENTRIES["conv_glue.cu"]


def test_compile_error_carries_the_log():
    with pytest.raises(NVRTCError, match="undefined_thing"):
        compile_source('extern "C" __global__ void f() { undefined_thing(); }', "compute_80")


def test_wrapper_constants_match_the_source():
    src = read_source("xnor_gemm_tc.cu")
    d = {k: int(v) for k, v in re.findall(r"#define (TC\w*) (\d+)\b", src)}
    assert cupy_gpu._TC_BKW == d["TC_BKW"]
    assert cupy_gpu._TILE == d["TC_BM"] == d["TC_BN"]
    assert cupy_gpu._TC_SMEM_BYTES == d["TC_STAGES"] * (d["TC_BM"] + d["TC_BN"]) * d["TC_LDW"] * 8
    assert "// 73728" in src and cupy_gpu._TC_SMEM_BYTES == 73728
    assert "// 74752" in src and cupy_gpu._TC_DIRECT_SMEM_BYTES == 74752
    assert cupy_gpu._TC_DIRECT_SMEM_BYTES == cupy_gpu._TC_SMEM_BYTES + (d["TC_BM"] + d["TC_BN"]) * 4
    assert cupy_gpu._TC256_ROWS == d["TC256_BM"] and d["TC256_BN"] == cupy_gpu._TILE
    assert cupy_gpu._TC256_SMEM_BYTES == (d["TC256_STAGES"] * (d["TC256_BM"] + d["TC256_BN"])
                                          * d["TC_LDW"] * 8)
    assert "// 147456" in src and cupy_gpu._TC256_SMEM_BYTES == 147456
    assert cupy_gpu._TCL_SMEM_BYTES == d["TCL_STAGES"] * (d["TC_BM"] + d["TC_BN"]) * d["TCL_LDW"] * 8
    assert cupy_gpu._TCL_DIRECT_SMEM_BYTES == cupy_gpu._TCL_SMEM_BYTES + (d["TC_BM"] + d["TC_BN"]) * 4
    assert cupy_gpu._TCL256_SMEM_BYTES == (d["TCL_STAGES"] * (d["TC256_BM"] + d["TC256_BN"])
                                           * d["TCL_LDW"] * 8)
    assert "// 81920" in src and "// 82944" in src and "// 122880" in src
    assert (cupy_gpu._TCL_SMEM_BYTES, cupy_gpu._TCL_DIRECT_SMEM_BYTES,
            cupy_gpu._TCL256_SMEM_BYTES) == (81920, 82944, 122880)
    wg = read_source("xnor_gemm_wgmma.cu")
    stages = int(re.search(r"#define WG_STAGES (\d+)", wg).group(1))
    assert "// BN 256: 148992; 128: 99840" in wg and stages == 6
    for cols, total in ((256, 148992), (128, 99840)):
        assert cupy_gpu._wg_smem_bytes(cols) == stages * 4 * ((128 * 16 + 32) + (cols * 16 + 32))
        assert cupy_gpu._wg_smem_bytes(cols) == total
        assert cupy_gpu._TC_SPECS["tensorcore_wgmma" + ("" if cols == 256 else "128")].smem == total
    assert int(re.search(r"#define WG_BM (\d+)", wg).group(1)) == cupy_gpu._TILE
    cc = dict(re.findall(r"#define (CC_B\w) (\d+)\b", read_source("xnor_gemm.cu")))
    assert int(cc["CC_BM"]) == int(cc["CC_BN"]) == cupy_gpu._TILE


@pytest.mark.skipif(find_ptxas() is None, reason="no ptxas (a developer's check: set MINIBNN_PTXAS "
                    "or pip install nvidia-cuda-nvcc-cu12)")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_tensor_core_kernels_do_not_spill(arch):
    """Every tensor-core entry fits its launch bounds without spilling: (256, 2), at most 128
    registers, for the 128 x 128 tiles; (256, 1), at most 255, for the 256 x 128 tiles (a
    64 x 64 warp tile holds 128 accumulators). The threshold epilogue and the direct forms'
    popcounts cost registers, not local memory."""
    try:
        res = ptxas_resources(compile_all(f"compute_{arch}")["xnor_gemm_tc.cu"], f"sm_{arch}")
    except NVRTCError as exc:
        if "version" in str(exc).lower():  # a ptxas older than this NVRTC's PTX
            pytest.skip(f"this ptxas cannot read this NVRTC's PTX: {exc}")
        raise
    assert set(res) == ENTRIES["xnor_gemm_tc.cu"]
    for entry, r in res.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (entry, r)
        assert 0 < r["registers"] <= (255 if "256" in entry else 128), \
            (entry, r)


@pytest.mark.skipif(find_ptxas() is None, reason="no ptxas (a developer's check: set MINIBNN_PTXAS "
                    "or pip install nvidia-cuda-nvcc-cu12)")
def test_wgmma_kernels_do_not_spill():
    """The wgmma entries fit their launch bounds without spilling: (256, 1), at most 255
    registers, for the 128 x 256 tile (128 accumulators a thread); (256, 2), at most 128, for
    the 128 x 128 one."""
    try:
        res = ptxas_resources(compile_all("compute_90")["xnor_gemm_wgmma.cu"], "sm_90a")
    except NVRTCError as exc:
        if "version" in str(exc).lower():  # a ptxas older than this NVRTC's PTX
            pytest.skip(f"this ptxas cannot read this NVRTC's PTX: {exc}")
        raise
    wg = {e: r for e, r in res.items() if e.startswith("xnor_gemm_wg")}
    assert set(wg) == ENTRIES["xnor_gemm_wgmma.cu"] - ENTRIES["xnor_gemm_tc.cu"]
    for entry, r in wg.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (entry, r)
        assert 0 < r["registers"] <= (128 if "wg128" in entry else 255), (entry, r)
