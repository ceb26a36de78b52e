"""The GPU goals of issues #8, #9 and #10, read from one run's benchmark JSON, one line each.

    python benchmarks/goals.py DIR [DIR ...]

reads whichever of these files the folders hold (the first found wins; a GPU check writes
them with ``benchmarks/gpu_check.sh``, the committed ones are in benchmarks/results):

* ``gemm_gpu.json`` (bench_gemm): XNOR GEMM TOPS on tensor cores (the best of the
  ``cupy tensorcore*`` rows of a shape not noted WRONG RESULT, the form named) at 8192^3
  (goal >= 3,000) and 4096^3 (>= 1,500), and at 100 x 4096 x 4096 against cuBLAS fp16 of
  the same run (>= 1x);
* ``inference_gpu.json`` (bench_inference): the frozen 3 x 4096 MLP on 10,000 images
  against the float32 CuPy forward (>= 10x) and the float16 one (>= 1.5x), with the images
  copied from the host and (where the run has those rows) already on the GPU; whether the
  ConvNet's GPU rows are there (#8);
* ``train_gpu.json`` (bench_train): the fastest minibnn step of the MLP 3 x 4096 (batch 100)
  against PyTorch with a CUDA graph (>= 1x; aim 2x PyTorch eager) and of the CIFAR-10
  ConvNet (batch 50) against PyTorch eager (>= 1x);
* ``mnist_recipe_metrics.json`` and ``cifar_run_metrics.json`` (gpu_check's run phases):
  test error at the best validation epoch (MNIST goal <= 1.0%) and the run's wall time
  (<= 9 minutes: the sum of its epochs' ``wall_seconds``, start-up not included).

Each line says "met", "NOT met" or "missing" (no such rows): goals as the issues state
them, ratios from one run, so a noisy machine moves both sides alike. Prints only; exits 0.
"""

import argparse
import json
import sys
from pathlib import Path


def _load(dirs, name):
    for d in dirs:
        path = Path(d) / name
        if path.is_file():
            return json.loads(path.read_text()), path
    return None, None


def _line(goal, value, ok, source):
    state = "missing" if ok is None else ("met" if ok else "NOT met")
    return f"{state:8s} {goal}: {value}" + (f"  [{source}]" if source else "")


def gemm_goals(data, source):
    rows = data["results"] if data else []

    def best_tc(shape):
        cands = [r for r in rows if r["shape"] == shape and r["backend"].startswith("cupy tensorcore")
                 and "," not in r["backend"] and "+" not in r["backend"] and r.get("tops")
                 and "WRONG" not in (r.get("note") or "")]  # a wrong product counts for nothing
        return max(cands, key=lambda r: r["tops"]) if cands else None

    def fp16(shape):
        return next((r for r in rows if r["shape"] == shape and r["backend"] == "cuBLAS fp16 (cupy)"),
                    None)

    out = []
    for shape, target in (("8192x8192x8192", 3000.0), ("4096x4096x4096", 1500.0)):
        r = best_tc(shape)
        out.append(_line(f"#10 GEMM {shape} >= {target:,.0f} TOPS",
                         f"{r['tops']:,.0f} TOPS ({r['backend']})" if r else "-",
                         None if r is None else r["tops"] >= target, source))
    r, h = best_tc("100x4096x4096"), fp16("100x4096x4096")
    ok = None if r is None or h is None else r["tops"] >= h["tops"]
    value = (f"{r['tops']:,.1f} TOPS ({r['backend']}) against cuBLAS fp16 {h['tops']:,.1f}: "
             f"{r['tops'] / h['tops']:.2f}x") if ok is not None else "-"
    out.append(_line("#10 GEMM 100x4096x4096 >= cuBLAS fp16", value, ok, source))
    return out


def inference_goals(data, source):
    rows = data["results"] if data else []

    def seconds(net, path):
        r = next((r for r in rows if r["net"] == net and r["path"] == path), None)
        return None if r is None else r["seconds_full_set"]

    out = []
    # images copied from the host batch by batch, and (the "batches on the device")
    # given as one CuPy array already on the GPU: every path of a line alike
    for tag, where in (("", "host images"), (", images on device", "images on device")):
        frozen, f32, f16 = (seconds("3x4096", p + tag)
                            for p in ("frozen cupy", "float32 cupy", "float16 cupy"))
        if tag and frozen is None:
            continue  # an older run without the on-device rows
        for goal, base, target in (("float32 CuPy", f32, 10.0), ("float16 CuPy", f16, 1.5)):
            ok = None if frozen is None or base is None else base / frozen >= target
            value = (f"{base / frozen:.2f}x ({frozen * 1e3:.2f} ms against "
                     f"{base * 1e3:.2f} ms)" if ok is not None else "-")
            unstaged = None if tag else seconds("3x4096", "frozen unstaged cupy")
            if ok is not None and unstaged is not None:  # the A/B of FrozenBNN.host_staging
                value += f"; without host staging {unstaged * 1e3:.2f} ms"
            out.append(_line(f"#10 frozen 3x4096, 10k images ({where}), >= {target:g}x {goal}",
                             value, ok, source))
    conv = sorted({r["path"] for r in rows if "ConvNet" in r["net"] and ("cupy" in r["path"]
                                                                       or "cuDNN" in r["path"])})
    out.append(_line("#8 ConvNet GPU inference rows", ", ".join(conv) if conv else "-",
                     True if conv else None, source))
    return out


def train_goals(data, source):
    rows = data["rows"] if data else []

    def step(net, pred):
        cands = [r for r in rows if r["net"] == net and pred(r["path"])]
        return min(cands, key=lambda r: r["step_s"]) if cands else None

    out = []
    for net, anchor, label, target in (("mlp4096", "torch cuda graph", "PyTorch CUDA graph", 1.0),
                                       ("cifar10_convnet", "torch cuda eager", "PyTorch eager",
                                        1.0)):
        ours = step(net, lambda p: p.startswith("minibnn cupy"))
        ref = step(net, lambda p, a=anchor: p == a)
        ok = None if ours is None or ref is None else ref["step_s"] / ours["step_s"] >= target
        value = (f"{ref['step_s'] / ours['step_s']:.2f}x ({ours['path']} {ours['step_s'] * 1e3:.2f} ms "
                 f"against {ref['step_s'] * 1e3:.2f} ms)" if ok is not None else "-")
        out.append(_line(f"#9 {net} step >= {label}", value, ok, source))
    return out


def run_goals(data, source, name, max_error=None):
    if data is None:
        return [_line(f"{name} run", "-", None, None)]
    hist = data.get("history", [])
    wall = sum(h.get("wall_seconds") or 0.0 for h in hist)
    err = data.get("test_error")
    ok_time = wall <= 540.0 if hist else None
    value = (f"test error {100 * err:.2f}% at epoch {data.get('best_epoch')} of {len(hist)}, "
             f"{wall:.0f} s of epochs" if err is not None else "-")
    ok = ok_time if max_error is None else (None if err is None else
                                            (err <= max_error and bool(ok_time)))
    goal = f"{name} run" + (f" <= {100 * max_error:.1f}%" if max_error else "") + " in <= 9 min"
    return [_line(goal, value, ok, source)]


def summary(dirs):
    lines = []
    data, path = _load(dirs, "gemm_gpu.json")
    lines += gemm_goals(data, path)
    data, path = _load(dirs, "inference_gpu.json")
    lines += inference_goals(data, path)
    data, path = _load(dirs, "train_gpu.json")
    lines += train_goals(data, path)
    data, path = _load(dirs, "mnist_recipe_metrics.json")
    lines += run_goals(data, path, "#9 MNIST recipe", max_error=0.010)
    data, path = _load(dirs, "cifar_run_metrics.json")
    lines += run_goals(data, path, "#8 CIFAR-10")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="folders with a run's JSON files")
    args = p.parse_args(argv)
    print("\n".join(summary(args.dirs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
