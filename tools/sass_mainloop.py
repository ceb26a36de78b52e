"""What each tensor-core GEMM entry's main loop issues, read from ptxas's SASS (no GPU needed).

    python tools/sass_mainloop.py [--arch sm_90] [--source xnor_gemm_tc.cu]
    python tools/sass_mainloop.py --source xnor_gemm_wgmma.cu       (sm_90a, its only arch)

Compiles the packaged CUDA source to PTX with NVRTC (``kernels.nvrtc_check``), assembles it
with ``ptxas`` for a real architecture, disassembles the cubin with ``cuobjdump -sass``, and
for each entry prints its main loop: the backward branch whose body holds the most tensor-
core work, with the number of instructions in it, the ``BMMA`` (mma.sync) or ``BGMMA``
(wgmma) instructions, the register moves (``MOV`` and ``IMAD.MOV``), the ``LDSM``
(ldmatrix) and ``LDS`` (ld.shared) loads, and the ``LDGSTS`` (cp.async) copies. The tensor-
core work is counted in m16n8k256 ``mma`` per warp: a ``BMMA`` is one, a warpgroup's
``BGMMA.64xNx256`` is N / 8 for each of its 4 warps, so "per mma" compares the two. A static count, not a timing: it says what a warp must
issue per ``mma``, which is where the ldmatrix forms came from (README, "the ``_ldm``
twins"); only a GPU says what that is worth.

A developer's tool: ``ptxas`` and ``cuobjdump`` as ``kernels.nvrtc_check.find_ptxas`` and
``find_cuobjdump`` find them (``$MINIBNN_PTXAS`` / ``$MINIBNN_CUOBJDUMP``, NVIDIA's pip
wheels, PATH). The test extra brings cuobjdump and the nvdisasm it runs; ptxas it does not.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minibnn.kernels import nvrtc_check  # noqa: E402
from minibnn.kernels.cuda_sources import EXACT_ARCH, module_source  # noqa: E402


_ADDR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")


def entries(sass):
    """{entry name: [(address, instruction text)]} from ``cuobjdump -sass`` output."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = _ADDR.match(line)
        if m and name is not None:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text):
    words = [w for w in text.split() if not w.startswith("@")]
    return words[0] if words else ""


def main_loop(code):
    """The counts of the backward branch's body with the most BMMA (None if none has any)."""
    best = None
    for addr, text in code:
        m = re.search(r"\bBRA (?:\S+ )?(0x[0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [_opcode(t) for a, t in code if int(m.group(1), 16) <= a <= addr]
        bgmma = [int(g.group(1)) // 8 for g in (re.match(r"BGMMA\.64x(\d+)x256", o) for o in body)
                 if g]
        counts = {"instructions": len(body),
                  "BMMA": sum(o.startswith("BMMA") for o in body),
                  "BGMMA": len(bgmma), "mma": sum(o.startswith("BMMA") for o in body) + sum(bgmma),
                  "moves": sum(o.startswith("MOV") or o.startswith("IMAD.MOV") for o in body),
                  "LDSM": sum(o.startswith("LDSM") for o in body),
                  "LDS": sum(o.split(".")[0] == "LDS" for o in body),
                  "LDGSTS": sum(o.startswith("LDGSTS") for o in body)}
        if counts["mma"] and (best is None or counts["mma"] > best["mma"]):
            best = counts
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="real architecture for ptxas (default sm_90, or "
                   "the one architecture of a source that has one: sm_90a for the wgmma GEMM)")
    p.add_argument("--source", default="xnor_gemm_tc.cu", help="packaged CUDA source")
    args = p.parse_args(argv)
    exact = EXACT_ARCH.get(args.source)
    if args.arch is None:
        args.arch = f"sm_{exact}" if exact else "sm_90"
    elif exact and args.arch != f"sm_{exact}":
        sys.exit(f"{args.source} compiles for sm_{exact} alone, not {args.arch}")
    ptxas, cuobjdump = nvrtc_check.find_ptxas(), nvrtc_check.find_cuobjdump()
    if ptxas is None or cuobjdump is None:
        sys.exit("needs ptxas and cuobjdump: " + ", ".join(
            n for n, v in (("ptxas", ptxas), ("cuobjdump", cuobjdump)) if v is None) + " not found")
    ptx = nvrtc_check.compile_source(module_source(args.source),
                                     "compute_" + args.arch.split("_")[-1], args.source)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        cubin = Path(tmp) / "k.cubin"
        subprocess.run([ptxas, f"-arch={args.arch}", str(Path(tmp) / "k.ptx"), "-o", str(cubin)],
                       check=True)
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
    print(f"{args.source} on {args.arch}: each entry's main loop (one pipeline stage)")
    print(f"{'entry':34s} {'instr':>6s} {'BMMA':>5s} {'BGMMA':>5s} {'mma':>5s} {'per mma':>8s} "
          f"{'moves':>6s} {'LDSM':>5s} {'LDS':>5s} {'LDGSTS':>6s}")
    for name, code in sorted(entries(sass).items()):
        c = main_loop(code)
        if c is None:
            continue
        print(f"{name:34s} {c['instructions']:6d} {c['BMMA']:5d} {c['BGMMA']:5d} {c['mma']:5d} "
              f"{c['instructions'] / c['mma']:8.2f} {c['moves']:6d} {c['LDSM']:5d} "
              f"{c['LDS']:5d} {c['LDGSTS']:6d}")


if __name__ == "__main__":
    main()
