"""tools/sass_mainloop.py: its SASS reading on a hand-written listing, and, where ptxas and
cuobjdump are found (a developer's machine), what it says of the packaged kernels."""

import importlib.util
from pathlib import Path

import pytest

from minibnn.kernels.nvrtc_check import NVRTCUnavailable, find_cuobjdump, find_ptxas, load_nvrtc

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sass_mainloop.py"
spec = importlib.util.spec_from_file_location("sass_mainloop", TOOL)
sm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sm)

LISTING = """
        code for sm_90
                Function : kern
        .headerflags    @"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   LDS.64 R4, [R2] ;                      /* 0x0000000002047984 */
        /*0020*/                   BMMA.168256.AND.POPC R8, R4.ROW, R6.COL, R8 ;
        /*0030*/                   IMAD.MOV.U32 R4, RZ, RZ, R5 ;          /* 0x000000ffff047224 */
        /*0040*/              @!PT LDS RZ, [RZ] ;                         /* 0x00000000fffff984 */
        /*0050*/                   LDSM.16.M88.4 R12, [R3] ;              /* 0x000000000303783b */
        /*0060*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R10.64] ;
        /*0070*/                   BMMA.168256.AND.POPC R8, R12.ROW, R6.COL, R8 ;
        /*0080*/               @P0 BRA 0x10 ;                             /* 0xfffffffc00000947 */
        /*0090*/                   BRA 0x90 ;                             /* 0xfffffffc00000947 */
        /*00a0*/                   EXIT ;                                 /* 0x000000000000794d */
                Function : other
        /*0000*/                   EXIT ;                                 /* 0x000000000000794d */
"""


def test_it_reads_the_main_loop_of_a_listing():
    code = sm.entries(LISTING)
    assert set(code) == {"kern", "other"} and len(code["kern"]) == 11
    # the loop 0x10 .. 0x80 (the self-branch at 0x90 holds no BMMA and is not it)
    assert sm.main_loop(code["kern"]) == {"instructions": 8, "BMMA": 2, "BGMMA": 0, "mma": 2,
                                          "moves": 1, "LDSM": 1, "LDS": 2, "LDGSTS": 1}
    assert sm.main_loop(code["other"]) is None


def _tools_or_skip():
    try:
        load_nvrtc()
    except NVRTCUnavailable as exc:
        pytest.skip(str(exc))
    if find_ptxas() is None or find_cuobjdump() is None:
        pytest.skip("no ptxas or cuobjdump (a developer's check: MINIBNN_PTXAS, "
                    "MINIBNN_CUOBJDUMP or the nvidia-cuda-nvcc / -cuobjdump wheels)")


def test_the_ldmatrix_forms_issue_fewer_instructions_per_mma(capsys):
    """Each "_ldm" twin's loop issues fewer instructions and fewer register moves per mma
    than its ld.shared form, on sm_90 and on sm_80."""
    _tools_or_skip()
    for arch in ("sm_90", "sm_80"):
        sm.main(["--arch", arch])
        rows = {}
        for line in capsys.readouterr().out.splitlines()[2:]:
            name, instr, _, _, mma, _, moves, *_ = line.split()
            rows[name] = (int(instr) / int(mma), int(moves) / int(mma))
        for old, new in (("xnor_gemm_tc", "xnor_gemm_tcl"), ("xnor_gemm_tc256", "xnor_gemm_tcl256"),
                         ("xnor_gemm_tc_direct", "xnor_gemm_tcl_direct")):
            for suffix in ("", "_threshold"):
                a, b = rows[old + suffix], rows[new + suffix]
                assert b[0] < a[0] and b[1] < a[1], (arch, old + suffix, a, b)


def test_it_counts_a_warpgroup_mma_as_its_warp_share_of_mma():
    """A BGMMA.64xNx256 is N / 8 m16n8k256 mma for each of the warpgroup's 4 warps."""
    listing = LISTING.replace("BMMA.168256.AND.POPC R8, R12.ROW, R6.COL, R8",
                              "BGMMA.64x256x256.AND.POPC R24, gdesc[UR16], R24")
    c = sm.main_loop(sm.entries(listing)["kern"])
    assert (c["BMMA"], c["BGMMA"], c["mma"]) == (1, 1, 33)


def test_the_wgmma_forms_loop_reads_no_fragments(capsys):
    """The wgmma entries' main loops (sm_90a) issue the warpgroup MMA and no ldmatrix (the
    tensor cores read both operands from shared memory themselves; ptxas's ``@!PT LDS``
    padding around the proxy fence, never executed, is all the LDS there is)."""
    _tools_or_skip()
    sm.main(["--source", "xnor_gemm_wgmma.cu"])
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        name, instr, bmma, bgmma, mma, per, moves, ldsm, lds, ldgsts = line.split()
        rows[name] = (int(bmma), int(bgmma), int(ldsm), int(lds), int(ldgsts))
    for name in ("xnor_gemm_wg", "xnor_gemm_wg_threshold", "xnor_gemm_wg128",
                 "xnor_gemm_wg128_threshold"):
        bmma, bgmma, ldsm, lds, ldgsts = rows[name]
        assert bmma == ldsm == 0 and bgmma >= 2 and ldgsts >= 6, (name, rows[name])
