"""Inference: the float32 forward vs the frozen binary net, for the paper's MLPs and its
CIFAR-10 ConvNet.

The networks (Courbariaux et al. 2016, arXiv:1602.02830, Sections 2.1-2.2 and the run-time
discussion of Section 3):

* "mlp": the permutation-invariant MLPs 784 -> 3 x 4096 -> 10 and 784 -> 3 x 2048 -> 10 on
  the MNIST test set (shipped with the package); their batch norms carry statistics of real
  MNIST batches.
* "convnet": the CIFAR-10 ConvNet (``models.cifar10_convnet``: 2x128C3 - MP2 - 2x256C3 -
  MP2 - 2x512C3 - MP2 - 2x1024FC - 10) on *synthetic* uint8 images (n, 3, 32, 32): random
  4x4 and 8x8 blocks plus pixel noise, so that the run needs no CIFAR-10 files; its batch
  norms take their statistics from such images. --conv-images of them (500 on a CPU, where
  the float32 forward costs ~0.62 GMAC an image, 10,000 when the cupy backend runs).

Weights are random (timing does not depend on training); gamma and beta are drawn as a
trained net's are not 1 and 0, about 10% of gammas negative. Each network runs

* "float32 numpy": the model's eval-mode forward written out in plain NumPy float32 from
  uint8 pixels (BLAS matmul with the +-1 weights; convolutions as im2col + BLAS through
  ``functional.conv2d``; max-pool; each batch norm as its ``eval_affine``; sign), checked
  equal to ``model(x)`` on a few images before timing;
* "frozen <backend>": ``deploy.freeze(model)`` on the numpy (reference), numba and cupy
  backends: the first layer on the uint8 input (bit planes, float32 BLAS on the pixels, or
  a uint8 x int8 VNNI product: the fastest exact one, measured), XNOR-popcount GEMMs,
  integer thresholds fused with packing, max-pool as OR/AND of packed bits, one float
  affine at the end;
* "frozen cupy" replays each batch shape's forward as one CUDA graph (``FrozenBNN.cuda_graph``,
  the default); "frozen eager cupy" is the same net launching every kernel from Python;
  both stage host images through page-locked memory a batch ahead (``host_staging``, the
  default); for the MLPs "frozen unstaged cupy" is "frozen cupy" with ``host_staging =
  False`` (each batch sent by ``cupy.asarray`` after the last one's result is read, the
  default batch);
* for the MLPs, "..., images on device" rows: "float32 cupy", "float16 cupy" and "frozen
  cupy" given the test images as one CuPy array already on the GPU (the others copy each
  batch from the host, about 8 MB for 10,000 MNIST images, which the frozen net's few
  milliseconds feel and the float forwards hardly do); their speed-ups are against the
  float rows of the same kind;
* "frozen fp16-first cupy": the same frozen net on cupy with ``first_layer_method =
  "float16"`` forced (the first layer's pixels and +-1 weights as float16 on the tensor
  cores, float32 accumulation through cuBLAS GemmEx: exact; "auto", the "frozen cupy" row,
  times it against the other methods and keeps the fastest);
* on a CPU-only run, "float32 torch cpu" when PyTorch is importable (never a dependency;
  ``pip install torch==2.13.0`` gives the CPU build; ``--no-torch`` leaves it out): the same
  forward through PyTorch's CPU kernels (oneDNN convolutions, far faster than im2col +
  OpenBLAS), the strongest float anchor on the machine; rows get "vs torch cpu" beside
  their speed-up over float32 NumPy;
* for the MLPs, "..., batch 100" rows (latency: the paper's batch): the float32 and frozen
  paths of each device (numpy and numba; cupy) in batches of 100, the frozen one's speed-up
  taken against the float32 path of the same device at the same batch;
* on a GPU: "float32 cupy" (the same forward on CuPy: cuBLAS, TF32 off as CuPy's default),
  for the MLPs "float16 cupy" (the same forward in float16 on CuPy: cuBLAS on the tensor
  cores; +-1 weights and the scaled pixels are exact in float16, the first layer's sums and
  the batch norms are rounded, so a few predictions may differ; the GPU rows get their
  ratio to it in "vs fp16 cupy")
  and, for the ConvNet, "cuDNN fp32 (torch)" and "cuDNN fp16 (torch)" when PyTorch with
  CUDA is importable (``torch.nn.functional.conv2d`` etc., cudnn.benchmark on).

Every figure is the median of --repeats runs after a warm-up; the paths take turns in
each repeat so that load from other work on the machine spreads over all of them. The
NumPy reference backend (and, on a GPU machine, the ConvNet's CPU paths) run on a subset of
the images and their time is scaled to the full set; the table says so. Predictions of each
path are compared with the float32 forward on all images it ran. Model sizes: float32
weights (4 bytes each), the trained model's .npz and the saved frozen .npz. Results go to
benchmarks/results/inference_{cpu,gpu}[_quick].json (both nets; a run of one net keeps the
other's rows from the file), inference_{cpu,gpu}[_quick].png (MLPs) and
inference_conv_{cpu,gpu}[_quick].png (ConvNet); a --quick run writes under
benchmarks/results/quick/ (ignored by git), never over the tracked results. For each MLP the
numba run also times the hidden layers' GEMM alone against float32 ("gemm" in the JSON):
issue #10's goal compares the frozen speed-up with it.

    python benchmarks/bench_inference.py [--quick] [--nets mlp,convnet] [--repeats 5]
                                         [--conv-images N] [--backends numpy,numba,cupy]
                                         [--out DIR]
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as bench_gemm.py: no spinning BLAS
# threads on the cores the next path needs (OpenBLAS reads it when NumPy loads it)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import minibnn  # noqa: E402
from minibnn import backend, data, deploy, functional, models, nn  # noqa: E402
from minibnn.deploy import runtime  # noqa: E402
from minibnn.kernels import autotune  # noqa: E402
from minibnn.functional import kernel_offsets, pool_output_shape  # noqa: E402
from minibnn.tensor import Tensor, no_grad  # noqa: E402

NETS = [(4096, 3), (2048, 3)]
QUICK_NETS = [(512, 3), (256, 2)]
QUICK_IMAGES = 1000
SMALL_BATCH = 100  # the MLPs' latency rows: the paper's MNIST batch
REFERENCE_IMAGES = 200  # the NumPy reference backend runs on this many images of big MLPs
SECTIONS = ("mlp", "convnet")
CONV_LABEL, QUICK_CONV_LABEL = "CIFAR-10 ConvNet", "MNIST-sized ConvNet"
CONV_IMAGES = {"cpu": 500, "gpu": 10000}
QUICK_CONV_IMAGES = 200
CONV_REFERENCE_IMAGES = 20  # the NumPy reference backend on the CIFAR-10 ConvNet
CONV_CPU_IMAGES_ON_GPU = 1000  # the ConvNet's CPU paths when the GPU runs 10,000
FLOAT_BATCH = {"numpy": 100, "cupy": 500, "torch": 1000}  # ConvNet images per float forward
CONV_INPUT = ("synthetic uint8 images (random 4x4 and 8x8 blocks plus pixel noise), not "
              "CIFAR-10; timing does not depend on the pixels")


# ----------------------------------------------------------------------------- the networks

def _plant_batch_norms(model, rng):
    """A trained net's gamma and beta are not 1 and 0: gamma U(0.5, 1.5) with ~10% negative,
    beta N(0, 0.3); momentum 0.5 while the caller fills the running statistics."""
    bns = [l for l in model.layers if isinstance(l, (nn.BatchNorm, nn.ShiftBatchNorm))]
    for bn in bns:
        bn.gamma.data[...] = rng.uniform(0.5, 1.5, bn.num_features) * np.where(
            rng.random(bn.num_features) < 0.1, -1, 1)
        bn.beta.data[...] = rng.normal(0, 0.3, bn.num_features)
        bn.momentum = 0.5
    return bns


def build(hidden, layers, train_images, seed=0):
    """The paper's MLP with random weights and batch-norm statistics from MNIST batches
    (built on the host whatever MINIBNN_BACKEND says: every path starts from host arrays)."""
    rng = np.random.default_rng(seed)
    with _fast_backend(), no_grad():
        model = models.mnist_mlp(hidden=hidden, layers=layers, rng=rng)
        bns = _plant_batch_norms(model, rng)
        model.train()
        for i in range(0, 2000, 500):
            model(Tensor(backend.asarray(data.to_pm1(train_images[i:i + 500]))))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def synthetic_images(n, shape, seed=1):
    """uint8 (n, C, H, W) with some spatial structure: the sum of random 4x4- and 8x8-cell
    block images (each cell about H/4 or H/8 pixels wide) and per-pixel noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    x = np.zeros((n, c, h, w), dtype=np.float32)
    for cells, weight in ((4, 0.5), (8, 0.3)):
        block = rng.uniform(0, 255, (n, c, cells, cells)).astype(np.float32)
        x += weight * np.repeat(np.repeat(block, -(-h // cells), axis=2), -(-w // cells),
                                axis=3)[:, :, :h, :w]
    x += 0.2 * rng.uniform(0, 255, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def build_convnet(quick, seed=0):
    """(model, input shape (C, H, W)): the CIFAR-10 ConvNet (quick: ``mnist_convnet``) with
    random weights and batch-norm statistics from synthetic images (4 batches of 100),
    built on the host as :func:`build`."""
    rng = np.random.default_rng(seed)
    with _fast_backend(), no_grad():
        model = models.mnist_convnet(rng=rng) if quick else models.cifar10_convnet(rng=rng)
        shape = deploy.INPUT_SHAPES[model.config["arch"]]
        bns = _plant_batch_norms(model, rng)
        calib = synthetic_images(400, shape, seed=seed + 100)
        model.train()
        for i in range(0, len(calib), 100):
            model(Tensor(backend.asarray(data.to_pm1(calib[i:i + 100], flatten=False))))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval(), shape


def _fast_backend():
    """numba when it runs here (the model's XNOR layers), else the NumPy reference."""
    return backend.use("numba" if backend.available()["numba"] is None else "numpy")


def _max_pool(h, k, stride, xp):
    """Max over k x k windows (floor mode, no padding): the values ``MaxPool2d`` gives, without
    the argmax it keeps for the backward pass."""
    _, _, ho, wo = pool_output_shape(h.shape, k, stride)
    out = None
    for _, _, rows, columns in kernel_offsets(k, k, stride, ho, wo):
        v = h[:, :, rows, columns]
        if out is None:
            out = v.copy()
        else:
            xp.maximum(out, v, out=out)
    return out


def _model_ops(model):
    """The eval-mode model as a list of ops on raw NumPy arrays: ("conv", w_b, stride,
    padding, bias), ("pool", k, stride), ("affine", a, c), ("sign",), ("flatten",),
    ("linear", w_b^T, bias); w_b = sign(W) as float32 (sign(0) = +1)."""
    ops = []
    for i, layer in enumerate(l for l in model.layers if not isinstance(l, nn.Dropout)):
        bias = None if getattr(layer, "bias", None) is None else backend.to_numpy(layer.bias.data)
        if isinstance(layer, (nn.BinaryLinear, nn.BinaryConv2d)):
            w = np.where(backend.to_numpy(layer.weight.data) >= 0, 1, -1).astype(np.float32)
            if isinstance(layer, nn.BinaryLinear):
                ops.append(("linear", np.ascontiguousarray(w.T), bias))
            else:
                ops.append(("conv", w, layer.stride, layer.padding, bias))
        elif isinstance(layer, nn.MaxPool2d):
            ops.append(("pool", layer.kernel_size, layer.stride))
        elif isinstance(layer, (nn.BatchNorm, nn.ShiftBatchNorm)):
            with no_grad():
                a, c = layer.eval_affine()
            ops.append(("affine",) + tuple(backend.to_numpy(t.data).astype(np.float32)
                                           for t in (a, c)))
        elif isinstance(layer, nn.Sign):
            ops.append(("sign",))
        elif isinstance(layer, nn.Flatten):
            ops.append(("flatten",))
        else:
            raise ValueError(f"layer {i}: {type(layer).__name__} not supported here")
    return ops


def _per_channel(v, ndim):
    return v if ndim == 2 else v.reshape(-1, 1, 1)


class Float32Net:
    """The model's eval-mode forward written out in NumPy (or CuPy) float32 from uint8 pixels:
    x_f = (2x - 255) / 256 as ``data.to_pm1``; per block conv (im2col + BLAS,
    ``functional.conv2d``) or matmul with the +-1 weights, max-pool, each batch norm as the
    model applies it in eval mode, ``BN(h) = a h + c`` (``eval_affine``), sign. Every
    pre-activation is an exact float32 integer (or multiple of 1/256 in the first layer), so
    this is the model's own arithmetic; ``check`` compares it with ``model(x)``."""

    def __init__(self, model, xp=np, dtype=np.float32):
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.ops = [tuple(xp.asarray(v, dtype=self.dtype if v.dtype.kind == "f" else None)
                          if isinstance(v, np.ndarray) else v for v in op)
                    for op in _model_ops(model)]
        self.is_conv = self.ops[0][0] == "conv"
        if self.is_conv and self.dtype != np.float32:
            raise ValueError("Float32Net: convolutions run in float32 only")

    def scores(self, x_uint8):
        xp = self.xp
        x = xp.asarray(x_uint8)
        one = self.dtype.type(1)
        h = (x if self.is_conv else x.reshape(len(x), -1)).astype(self.dtype)
        h *= 2 * one  # data.to_pm1's arithmetic, on the device when xp is CuPy
        h -= 255 * one
        h /= 256 * one
        for op in self.ops:
            kind = op[0]
            if kind == "conv":
                with no_grad():
                    h = functional.conv2d(h, op[1], op[2], op[3]).data
            elif kind == "linear":
                h = h @ op[1]
            elif kind == "pool":
                h = _max_pool(h, op[1], op[2], xp)
            elif kind == "affine":
                h *= _per_channel(op[1], h.ndim)
                h += _per_channel(op[2], h.ndim)
            elif kind == "sign":
                h = xp.where(h >= 0, one, -one)
            elif kind == "flatten":
                h = h.reshape(len(h), -1)
            if kind in ("conv", "linear") and op[-1] is not None:
                h += _per_channel(op[-1], h.ndim)
        return h

    def predict(self, x_uint8, batch=None):
        batch = batch or max(len(x_uint8), 1)
        return np.concatenate([backend.to_numpy(self.scores(x_uint8[i:i + batch]).argmax(axis=1))
                               for i in range(0, len(x_uint8), batch)])

    def check(self, model, x_uint8):
        """ValueError unless the scores equal the model's eval forward on ``x_uint8``."""
        x = data.to_pm1(x_uint8, flatten=not self.is_conv)
        with _fast_backend(), no_grad():
            want = backend.to_numpy(model(Tensor(backend.asarray(x))).data)
        got = backend.to_numpy(self.scores(x_uint8))
        if not np.array_equal(got, want):
            raise ValueError(f"the float32 forward differs from model(x) on {len(x_uint8)} "
                             f"images: max |diff| {np.abs(got - want).max()}")


class TorchNet:
    """The same forward through PyTorch in ``dtype`` (float16 or float32), batch norm and
    sign included, from uint8 pixels: on the GPU (``device="cuda"``: cuDNN convolutions,
    cuBLAS matmuls) or on the CPU (oneDNN convolutions, its BLAS for the matmuls)."""

    def __init__(self, model, torch, dtype, device="cuda"):
        self.torch, self.dtype, self.device = torch, dtype, device
        dev = device
        self.ops = [tuple(torch.as_tensor(v, device=dev, dtype=dtype)
                          if isinstance(v, np.ndarray) else v for v in op)
                    for op in _model_ops(model)]
        self.is_conv = self.ops[0][0] == "conv"
        self.one = torch.ones((), device=dev, dtype=dtype)

    def predict(self, x_uint8, batch):
        torch = self.torch
        F = torch.nn.functional
        out = []
        with torch.inference_mode():
            for i in range(0, len(x_uint8), batch):
                x = torch.as_tensor(x_uint8[i:i + batch]).to(self.device, non_blocking=True)
                h = (x if self.is_conv else x.reshape(len(x), -1)).to(self.dtype)
                h = (h * 2 - 255) / 256
                for op in self.ops:
                    kind = op[0]
                    if kind == "conv":
                        h = F.conv2d(h, op[1], op[4], stride=op[2], padding=op[3])
                    elif kind == "linear":
                        h = h @ op[1]
                        if op[2] is not None:
                            h = h + op[2]
                    elif kind == "pool":
                        h = F.max_pool2d(h, op[1], op[2])
                    elif kind == "affine":
                        h = h * _per_channel(op[1], h.ndim) + _per_channel(op[2], h.ndim)
                    elif kind == "sign":
                        h = torch.where(h >= 0, self.one, -self.one)
                    elif kind == "flatten":
                        h = h.reshape(len(h), -1)
                out.append(h.argmax(dim=1).cpu().numpy())
        return np.concatenate(out)


def _torch_cuda():
    """torch when it is importable and sees a GPU, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_cpu():
    """torch when it is importable (the CPU anchor), else None; numba's threads start
    first (``common.start_numba_threads``: each OpenMP runtime keeps its own wait policy)."""
    common.start_numba_threads()
    try:
        import torch
    except ImportError:
        return None
    return torch


# ----------------------------------------------------------------------------- breakdowns

def _stage_clock(name, repeats, b, stages):
    def clock(key, fn):
        def run():
            out = fn()
            _sync(name)
            return out
        run()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            ts.append(time.perf_counter() - t0)
        stages[key] = stages.get(key, 0.0) + float(np.median(ts)) * 10000 / b
        return out
    return clock


def layer_breakdown(frozen, images, name, repeats):
    """Seconds per 10,000 images spent in each stage of a frozen MLP's forward on one backend
    (timed on a batch of up to 1024 images, median of repeats), as the runtime runs it: the
    first layer by its method (``FrozenBNN.first_layer_plan``), thresholds fused with packing,
    products on the prepared weights, and on a backend with ``gemm_threshold`` (cupy) the
    hidden layers' product and threshold as one stage."""
    kern = backend.kernel_module(name)
    xp = backend.array_module(name)
    layers = frozen.layers_on(name)
    gemm_w = [p.gemm_weight for p in frozen._prepare(name)]
    fused = getattr(kern, "gemm_threshold", None)
    b = min(1024, len(images))
    x = xp.asarray(images[:b].reshape(b, -1))
    plan = frozen.first_layer_plan(images[:b].reshape(b, -1), backend=name)
    stages = {}
    clock = _stage_clock(name, repeats, b, stages)
    h = None
    for i, (layer, weight, threshold) in enumerate(layers):
        if i == 0 and plan.method != "bitplanes" and threshold is not None:
            s = clock(f"layer 0: first layer ({plan.method} product)",
                      lambda: runtime.first_layer_sums(x, plan.dense))
            h = clock("layer 0: threshold + pack",
                      lambda: kern.pack_threshold(s, plan.sums_threshold))
            continue
        if i == 0:
            z = clock(f"layer 0: first layer ({plan.method})",
                      lambda: deploy.first_layer(x, weight, layer.k, kern, plan.method,
                                                 plan.dense))
        elif fused is not None and threshold is not None:
            h = clock(f"layer {i}: XNOR GEMM + threshold epilogue",
                      lambda: fused(h, gemm_w[i], layer.k, threshold))
            continue
        else:
            z = clock(f"layer {i}: XNOR GEMM", lambda: kern.xnor_gemm(h, gemm_w[i], layer.k))
        if threshold is not None:
            h = clock(f"layer {i}: threshold + pack", lambda: kern.pack_threshold(z, threshold))
    return stages


def gemm_speedup(hidden, n, repeats):
    """The hidden layers' product alone, in the same run: NumPy float32 (n, hidden) @
    (hidden, hidden) against the numba XNOR GEMM (autotuned kernel) of the packed operands;
    median seconds of each and the ratio (the goal compares the frozen net's speed-up to it)."""
    from minibnn.kernels import numba_cpu

    rng = np.random.default_rng(0)
    x = np.where(rng.random((n, hidden)) < 0.5, -1.0, 1.0).astype(np.float32)
    w = np.where(rng.random((hidden, hidden)) < 0.5, -1.0, 1.0).astype(np.float32)
    a, b = numba_cpu.pack_rows(x), numba_cpu.pack_rows(w)
    out = np.empty((n, hidden), np.int32)
    times = time_round_robin({"float32": (lambda: x @ w.T, "numpy"),
                              "xnor": (lambda: numba_cpu.xnor_gemm(a, b, hidden, out=out),
                                       "numba")}, repeats)
    return dict(shape=f"{n}x{hidden}x{hidden}", float32_s=times["float32"], xnor_s=times["xnor"],
                kernel=numba_cpu.default_kernel(n, hidden, hidden),
                speedup=times["float32"] / times["xnor"])


def conv_breakdown(frozen, images, name, repeats):
    """Seconds per 10,000 images in each stage of a frozen ConvNet's forward on numba or cupy
    (one batch of the runtime's size, median of repeats), the steps of ``runtime``'s forward
    written out; the output z is checked against ``integer_scores``. Keys "<layer>: <stage>"."""
    kern = backend.kernel_module(name)
    xp = backend.array_module(name)
    b = min(runtime._CONV_BATCH[name], len(images))
    x = xp.asarray(images[:b])
    stages = {}
    clock = _stage_clock(name, repeats, b, stages)
    h = z = None
    plan = frozen.first_layer_plan(images[:b], backend=name)
    gemm_w = [p.gemm_weight for p in frozen._prepare(name)]
    fused = getattr(kern, "gemm_threshold", None)
    for i, (layer, weight, threshold) in enumerate(frozen.layers_on(name)):
        if isinstance(layer, deploy.FrozenConv):
            key = f"conv {i}"
            if layer.planes == runtime.PLANES:
                p = clock(f"{key}: patches", lambda: runtime.pixel_patches(x, layer, xp))
                raw = clock(f"{key}: first layer ({plan.method})",
                            lambda: runtime._conv_first(p, weight, layer.k, kern, plan.method,
                                                        plan.dense))
            else:
                p = clock(f"{key}: patches", lambda: runtime.conv_patches(h, layer, xp, kern))
            (ho, wo), o = layer.conv_hw, layer.n_out
            if layer.planes != runtime.PLANES and fused is not None:
                h = clock(f"{key}: XNOR GEMM + threshold epilogue", lambda: fused(
                    p, gemm_w[i], layer.gemm_k, threshold).reshape(b, ho, wo, -1))
            else:
                if layer.planes != runtime.PLANES:
                    raw = clock(f"{key}: XNOR GEMM",
                                lambda: kern.xnor_gemm(p, gemm_w[i], layer.gemm_k))
                h = clock(f"{key}: threshold + pack", lambda: kern.pack_threshold(
                    raw.reshape(b * ho * wo, o), threshold).reshape(b, ho, wo, -1))
            if layer.pool is not None:
                mask = (xp.asarray(runtime.pack_rows(layer.negated)) if layer.negated.any()
                        else None)
                h = clock(f"{key}: max-pool on bits",
                          lambda: runtime.pool_words(h, layer.pool, mask, xp))
            continue
        key = f"dense {i}"
        if layer.in_hwc is not None:
            h = clock(f"{key}: flatten", lambda: runtime.flatten_words(h, layer.in_hwc[2], xp))
        if fused is not None and threshold is not None:
            pad = layer.gemm_k - layer.k
            h = clock(f"{key}: XNOR GEMM + threshold epilogue",
                      lambda: fused(h, gemm_w[i], layer.gemm_k, threshold + pad))
            continue
        z = clock(f"{key}: XNOR GEMM", lambda: kern.xnor_gemm(h, gemm_w[i], layer.gemm_k)
                  - (layer.gemm_k - layer.k))
        if threshold is not None:
            h = clock(f"{key}: threshold + pack", lambda: kern.pack_threshold(z, threshold))
    want = frozen.integer_scores(images[:b], backend=name)
    if not np.array_equal(backend.to_numpy(z), want):
        raise AssertionError(f"conv_breakdown on {name} does not reproduce integer_scores")
    return stages


def _by_stage(breakdown):
    """{stage kind: seconds} summed over the layers ("patches", "XNOR GEMM", ...)."""
    out = {}
    for key, v in breakdown.items():
        stage = key.split(": ", 1)[1]
        out[stage] = out.get(stage, 0.0) + v
    return out


# ----------------------------------------------------------------------------- timing

def _sync(name):
    if name == "cupy":
        backend.array_module("cupy").cuda.Device().synchronize()
    elif name == "torch":
        import torch
        torch.cuda.synchronize()


def time_round_robin(paths, repeats):
    """paths: name -> (fn, backend for sync). Warm up each, then time them in turns."""
    times = {name: [] for name in paths}
    for name, (fn, bk) in paths.items():
        fn()
        _sync(bk)
    for _ in range(repeats):
        for name, (fn, bk) in paths.items():
            t0 = time.perf_counter()
            fn()
            _sync(bk)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def machine_info(use_gpu):
    info = common.machine_info(use_gpu, minibnn=minibnn.__version__)
    torch = _torch_cuda() if use_gpu else None
    if torch is not None:
        info["torch"] = torch.__version__
        info["cudnn"] = torch.backends.cudnn.version()
        info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def file_sizes(model, frozen, tmp):
    """Bytes: float32 weights, the trained model's .npz (models.save_model), the frozen .npz."""
    n_weights = sum(l.weight.data.size for l in model.layers
                    if isinstance(l, (nn.BinaryLinear, nn.BinaryConv2d)))
    model_path, frozen_path = Path(tmp) / "model.npz", Path(tmp) / "frozen.npz"
    models.save_model(model_path, model)
    frozen.save(frozen_path)
    sizes = dict(float32_weights=4 * n_weights, model_npz=model_path.stat().st_size,
                 frozen_npz=frozen_path.stat().st_size)
    sizes["ratio_float32_weights"] = sizes["float32_weights"] / sizes["frozen_npz"]
    sizes["ratio_model_npz"] = sizes["model_npz"] / sizes["frozen_npz"]
    back = deploy.load(frozen_path)  # what is timed below is what the file holds
    model_path.unlink()
    frozen_path.unlink()
    return sizes, back


ON_DEVICE = ", images on device"  # path suffix: the input is a CuPy array on the GPU


def bench_model(label, model, images, backends, repeats, reference_images, cpu_images=None,
                float_batch=None, torch=None, torch_cpu=None, small_batch=None):
    """Time every path of one network on ``images`` (uint8); returns (rows, sizes, summary).

    ``reference_images``: how many images the frozen numpy reference runs on;
    ``cpu_images``: how many the other CPU paths run on (all by default); ``float_batch``:
    images per float forward ({"numpy", "cupy", "torch"} -> n, or None for all at once);
    ``torch``: the torch module, for the cuDNN paths (ConvNet on a GPU); ``torch_cpu``: the
    torch module, for the "float32 torch cpu" path (a CPU run with PyTorch importable);
    ``small_batch``: also time the float32 and frozen paths of each device (numba, cupy) in
    batches of this many images (latency; their speed-up is against the float32 path of the
    same device at the same batch)."""
    with tempfile.TemporaryDirectory() as tmp:
        sizes, frozen = file_sizes(model, deploy.freeze(model), tmp)
    n = len(images)
    fb = float_batch or {}
    m_cpu = min(n, cpu_images or n)
    cpu_set, ref_set = images[:m_cpu], images[:min(n, reference_images)]
    float_net = Float32Net(model)
    float_net.check(model, images[:16])
    paths = {"float32 numpy": (lambda: float_net.predict(cpu_set, fb.get("numpy")), "numpy")}
    counts = {"float32 numpy": m_cpu}
    if "numba" in backends:
        paths["frozen numba"] = (lambda: frozen.predict(cpu_set, backend="numba"), "numba")
        counts["frozen numba"] = m_cpu
    if "numpy" in backends:
        counts["frozen numpy"] = len(ref_set)
        paths["frozen numpy"] = (lambda: frozen.predict(ref_set, backend="numpy"), "numpy")
    if torch_cpu is not None:
        cpu_tnet = TorchNet(model, torch_cpu, torch_cpu.float32, device="cpu")
        paths["float32 torch cpu"] = (
            lambda: cpu_tnet.predict(cpu_set, fb.get("torch", m_cpu)), "torch cpu")
        counts["float32 torch cpu"] = m_cpu
    eager = frozen16 = unstaged = None  # the frozen cupy twins (below, on a GPU)
    if "cupy" in backends:
        gpu_net = Float32Net(model, xp=backend.array_module("cupy"))
        paths["float32 cupy"] = (lambda: gpu_net.predict(images, fb.get("cupy")), "cupy")
        if not gpu_net.is_conv:  # the tensor-core float anchor (#10: frozen >= 1.5x it)
            gpu16 = Float32Net(model, xp=backend.array_module("cupy"), dtype=np.float16)
            paths["float16 cupy"] = (lambda: gpu16.predict(images, fb.get("cupy")), "cupy")
            counts["float16 cupy"] = n
        paths["frozen cupy"] = (lambda: frozen.predict(images, backend="cupy"), "cupy")
        counts["float32 cupy"] = counts["frozen cupy"] = n
        eager = runtime.FrozenBNN(frozen.layers, frozen.info)  # each batch launched from Python
        eager.cuda_graph = False
        paths["frozen eager cupy"] = (lambda: eager.predict(images, backend="cupy"), "cupy")
        counts["frozen eager cupy"] = n
        if not gpu_net.is_conv:  # host copies as before runtime._PinnedFeed: the A/B of it
            unstaged = runtime.FrozenBNN(frozen.layers, frozen.info)
            unstaged.host_staging = False
            paths["frozen unstaged cupy"] = (lambda: unstaged.predict(images, backend="cupy"),
                                             "cupy")
            counts["frozen unstaged cupy"] = n
        if not gpu_net.is_conv:  # the same three with the images already on the GPU
            dev_images = backend.array_module("cupy").asarray(images)
            paths["float32 cupy" + ON_DEVICE] = (
                lambda: gpu_net.predict(dev_images, fb.get("cupy")), "cupy")
            paths["float16 cupy" + ON_DEVICE] = (
                lambda: gpu16.predict(dev_images, fb.get("cupy")), "cupy")
            paths["frozen cupy" + ON_DEVICE] = (
                lambda: frozen.predict(dev_images, backend="cupy"), "cupy")
            for name in ("float32 cupy", "float16 cupy", "frozen cupy"):
                counts[name + ON_DEVICE] = n
        why = runtime.float16_exact_on("cupy")
        if why is None:  # the float16 first layer forced (tensor cores through GemmEx)
            frozen16 = runtime.FrozenBNN(frozen.layers, frozen.info)
            frozen16.first_layer_method = "float16"
            paths["frozen fp16-first cupy"] = (lambda: frozen16.predict(images, backend="cupy"),
                                               "cupy")
            counts["frozen fp16-first cupy"] = n
        else:
            print(f"   frozen fp16-first cupy: left out ({why})", flush=True)
        if torch is not None:
            torch.backends.cudnn.benchmark = True
            for bits, dtype in ((32, torch.float32), (16, torch.float16)):
                tnet = TorchNet(model, torch, dtype)
                paths[f"cuDNN fp{bits} (torch)"] = (
                    lambda tnet=tnet: tnet.predict(images, fb.get("torch", n)), "torch")
                counts[f"cuDNN fp{bits} (torch)"] = n
    if small_batch:
        sb, tag = small_batch, f", batch {small_batch}"
        if "numba" in backends:
            paths["float32 numpy" + tag] = (lambda: float_net.predict(cpu_set, sb), "numpy")
            paths["frozen numba" + tag] = (
                lambda: frozen.predict(cpu_set, backend="numba", batch_size=sb), "numba")
            counts["float32 numpy" + tag] = counts["frozen numba" + tag] = m_cpu
        if "cupy" in backends:
            paths["float32 cupy" + tag] = (lambda: gpu_net.predict(images, sb), "cupy")
            paths["frozen cupy" + tag] = (
                lambda: frozen.predict(images, backend="cupy", batch_size=sb), "cupy")
            paths["frozen eager cupy" + tag] = (
                lambda: eager.predict(images, backend="cupy", batch_size=sb), "cupy")
            counts["float32 cupy" + tag] = counts["frozen cupy" + tag] = n
            counts["frozen eager cupy" + tag] = n
    # the float32 forward on every image: on the GPU when it runs (same arithmetic, and
    # float32 numpy is then compared with it on its subset), else NumPy
    reference = (gpu_net if "cupy" in backends else float_net).predict(
        images, fb.get("cupy" if "cupy" in backends else "numpy"))
    print(f"   timing {', '.join(paths)} on up to {n} images, {repeats} repeats", flush=True)
    times = time_round_robin(paths, repeats)
    rows = []
    for name, (fn, _) in paths.items():
        pred = fn()
        m = counts[name]
        differ = np.flatnonzero(pred != reference[:m])
        notes = [] if m == n else [f"timed on {m} images, scaled to {n}"]
        if len(differ):
            notes.append(f"{len(differ)} predictions differ from float32")
        t_full = times[name] * n / m
        rows.append(dict(net=label, path=name, images=n, images_timed=m, seconds=times[name],
                         seconds_full_set=t_full, images_per_second=m / times[name],
                         agree_with_float32=m - len(differ), compared=m,
                         differing_images=differ.tolist(), note="; ".join(notes)))
    base = {r["path"]: r["seconds_full_set"] for r in rows}
    for r in rows:
        gpu = "cupy" in r["path"] or "cuDNN" in r["path"]
        ref = "float32 cupy" if gpu else "float32 numpy"
        if small_batch and r["path"].endswith(f", batch {small_batch}"):
            ref += f", batch {small_batch}"
        on_device = r["path"].endswith(ON_DEVICE)
        if on_device:
            ref += ON_DEVICE
        r["speedup_vs_float32"] = base[ref] / r["seconds_full_set"]
        r["baseline"] = ref
        if not gpu and "float32 torch cpu" in base and "batch" not in r["path"]:
            r["speedup_vs_torch_cpu"] = base["float32 torch cpu"] / r["seconds_full_set"]
        f16 = "float16 cupy" + (ON_DEVICE if on_device else "")
        if gpu and f16 in base and "batch" not in r["path"]:
            r["speedup_vs_float16_cupy"] = base[f16] / r["seconds_full_set"]
    for r in rows:  # which first-layer method each frozen path ran, and what "auto" timed
        net = {"frozen cupy": frozen, "frozen numba": frozen, "frozen eager cupy": eager,
               "frozen fp16-first cupy": frozen16,
               "frozen unstaged cupy": unstaged}.get(r["path"].split(",")[0])
        plan_backend = "cupy" if "cupy" in r["path"] else "numba"
        plan = getattr(net, "_first_plans", {}).get(plan_backend) if net is not None else None
        if plan is not None:
            r["first_layer_method"] = plan.method
            r["first_layer_timings"] = {m: float(t) for m, t in
                                        net.first_layer_timings.get(plan_backend, {}).items()}
    s = minibnn.summary(frozen)
    ms = minibnn.summary(model)
    extra = dict(frozen_binary_macs=s.totals["binary_macs"],
                 float32_macs=ms.totals["binary_macs"] + ms.totals["float_macs"],
                 float32_adjusted_thresholds=frozen.info["float32_adjusted"])
    breakdown = conv_breakdown if frozen.is_conv else layer_breakdown
    for name in ("numba", "cupy"):
        if name in backends:
            extra[f"breakdown_{name}"] = breakdown(frozen, images, name, repeats)
    return rows, dict(net=label, **sizes, **extra), s


def bench_mlps(mnist, quick, backends, repeats, torch_cpu=None):
    images = mnist.test_images[:QUICK_IMAGES] if quick else mnist.test_images
    rows, sizes, summaries = [], [], []
    for hidden, layers in (QUICK_NETS if quick else NETS):
        label = f"{layers}x{hidden}"
        print(f"\n== {label} MLP: building, freezing ...", flush=True)
        model = build(hidden, layers, mnist.train_images)
        r, s, summ = bench_model(label, model, images, backends, repeats,
                                 len(images) if quick else REFERENCE_IMAGES, torch_cpu=torch_cpu,
                                 small_batch=SMALL_BATCH)
        if "numba" in backends:
            g = gemm_speedup(hidden, len(images), repeats)
            frozen_x = next(row["speedup_vs_float32"] for row in r
                            if row["path"] == "frozen numba")
            s["gemm"] = dict(g, frozen_numba_speedup=frozen_x,
                             frozen_over_gemm_speedup=frozen_x / g["speedup"])
        rows += r
        sizes.append(s)
        summaries.append(summ)
    return rows, sizes, summaries[0], len(images)


def bench_convnet(quick, n, backends, repeats, torch_cpu=None):
    label = QUICK_CONV_LABEL if quick else CONV_LABEL
    print(f"\n== {label}: building (batch-norm statistics from synthetic images), freezing ...",
          flush=True)
    model, shape = build_convnet(quick)
    images = synthetic_images(n, shape)
    gpu = "cupy" in backends
    rows, sizes, summ = bench_model(
        label, model, images, backends, repeats,
        reference_images=n if quick else CONV_REFERENCE_IMAGES,
        cpu_images=CONV_CPU_IMAGES_ON_GPU if gpu and not quick else None,
        float_batch=FLOAT_BATCH, torch=_torch_cuda() if gpu else None, torch_cpu=torch_cpu)
    sizes["input"] = f"{n} {CONV_INPUT}, shape {(n,) + tuple(shape)}"
    return rows, sizes, summ, shape


# ----------------------------------------------------------------------------- reporting

def format_table(rows):
    n = rows[0]["images"]
    fp16 = any("speedup_vs_float16_cupy" in r for r in rows)
    head = (["net", "path", f"s / {n} img", "img/s", "speed-up", "vs torch cpu"]
            + ["vs fp16 cupy"] * fp16 + ["agree", "note"])

    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    body = [[r["net"], r["path"], f"{r['seconds_full_set']:.3f}",
             f"{r['images_per_second']:,.0f}",
             f"{r['speedup_vs_float32']:.2f}x vs {r['baseline']}",
             ratio(r, "speedup_vs_torch_cpu")] + [ratio(r, "speedup_vs_float16_cupy")] * fp16
            + [f"{r['agree_with_float32']}/{r['compared']}", r["note"]] for r in rows]
    widths = [max(len(str(c[i])) for c in body + [head]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(c, widths)).rstrip()
             for c in [head] + body]
    lines.insert(1, "-" * max(len(l) for l in lines))
    return "\n".join(lines)


def describe_sizes(s):
    lines = []
    for key in ("breakdown_numba", "breakdown_cupy"):
        if key not in s:
            continue
        stages = s[key]
        if any(k.startswith("conv ") for k in stages):  # a ConvNet: by stage kind and layer
            by_layer = {}
            for k, v in stages.items():
                by_layer[k.split(": ")[0]] = by_layer.get(k.split(": ")[0], 0.0) + v
            parts = [_by_stage(stages), by_layer]
            what = "by stage kind; by layer"
        else:
            parts, what = [stages], "by stage (batch 1024)"
        total = sum(stages.values())
        lines.append(f"{s['net']} frozen {key[10:]}, s per 10000 images {what}: " + "; ".join(
            ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in part.items())
            for part in parts))
    if "gemm" in s:
        g = s["gemm"]
        lines.append(f"{s['net']}: hidden-layer GEMM alone ({g['shape']}, numba {g['kernel']}) "
                     f"{g['speedup']:.1f}x float32 in this run; the frozen net's "
                     f"{g['frozen_numba_speedup']:.1f}x is {g['frozen_over_gemm_speedup']:.2f} of it")
    lines.append(
        f"{s['net']}: float32 weights {s['float32_weights'] / 2**20:.2f} MiB, trained "
        f"model.npz {s['model_npz'] / 2**20:.2f} MiB, frozen .npz "
        f"{s['frozen_npz'] / 2**20:.2f} MiB -> {s['ratio_float32_weights']:.1f}x smaller "
        f"than the float32 weights ({s['ratio_model_npz']:.1f}x than model.npz); "
        f"MACs/image: {s['frozen_binary_macs']:,} binary (frozen) vs "
        f"{s['float32_macs']:,} float32")
    if "input" in s:
        lines.append(f"{s['net']} input: {s['input']}")
    return "\n".join(lines)


def plot(rows, path, conv_shape=None):
    if conv_shape:
        kw = dict(xlabel=str, ylabel=f"images / s ({'x'.join(map(str, conv_shape))}, synthetic)")
    else:
        kw = dict(xlabel=lambda net: f"{net} MLP", ylabel="MNIST test images / s")
    common.grouped_bars(rows, "net", "path", "images_per_second", path,
                        title="Inference: float32 forward vs frozen BNN (label: speed-up "
                              "vs float32)",
                        annotate=lambda r: f"{r['speedup_vs_float32']:.1f}x", **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"small MLPs {QUICK_NETS} on {QUICK_IMAGES} images and mnist_convnet "
                        f"on {QUICK_CONV_IMAGES} synthetic images, for a smoke test")
    p.add_argument("--nets", default=",".join(SECTIONS),
                   help="comma list from mlp,convnet (default both)")
    p.add_argument("--conv-images", type=int, default=None,
                   help=f"synthetic images for the ConvNet (default {CONV_IMAGES['cpu']} on a "
                        f"CPU, {CONV_IMAGES['gpu']} with cupy, {QUICK_CONV_IMAGES} with --quick)")
    p.add_argument("--backends", default="numpy,numba,cupy",
                   help="frozen-net backends, comma list from numpy,numba,cupy (the float32 "
                        "NumPy forward always runs; cupy adds the float32 CuPy forward and, "
                        "for the ConvNet, cuDNN through torch when importable)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true",
                   help="leave out the PyTorch CPU anchor (\"float32 torch cpu\", run when "
                        "torch is importable on a CPU-only run)")
    p.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default benchmarks/results, with "
                        "--quick benchmarks/results/quick, which git ignores)")
    p.add_argument("--isa", default="native", choices=["native", *autotune.ISA_PROFILES],
                   help="run the CPU paths as a CPU with this ISA would (a proxy on this "
                        "machine's micro-architecture; see bench_gemm.py)")
    args = p.parse_args(argv)
    common.restart_under_isa(p, args.isa, argv, __file__)
    nets = [s.strip() for s in args.nets.split(",") if s.strip()]
    if not nets or set(nets) - set(SECTIONS):
        p.error(f"--nets: expected a comma list from {','.join(SECTIONS)}, got {args.nets!r}")
    backends = {s.strip() for s in args.backends.split(",") if s.strip()}
    unknown = backends - set(backend.NAMES)
    if unknown:
        p.error(f"unknown backends: {sorted(unknown)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.conv_images is not None and args.conv_images < 1:
        p.error("--conv-images must be >= 1")
    why = backend.available()
    for name in sorted(backends):
        if why[name] is not None:
            print(f"{name} backend skipped: {why[name]}")
            backends.discard(name)
    use_gpu = "cupy" in backends
    torch_cpu = None if use_gpu or args.no_torch else _torch_cpu()
    info = machine_info(use_gpu)
    if torch_cpu is not None:
        info["torch"] = torch_cpu.__version__
        info["torch_threads"] = torch_cpu.get_num_threads()
    common.note_isa(info, args.isa)
    print(json.dumps(info))
    out = common.results_dir(args.out, args.quick)
    out.mkdir(parents=True, exist_ok=True)
    suffix = (("gpu" if use_gpu else "cpu") + (f"_isa-{args.isa}" if args.isa != "native" else "")
              + ("_quick" if args.quick else ""))
    result = {"machine": info, "repeats": args.repeats, "nets": nets}
    rows, sizes, tables, summaries = [], [], {}, {}
    # a CPU run: the models live on the host and the host runs their own ops (freezing, the
    # batch norms' folds), whatever MINIBNN_BACKEND says (the GPU run keeps the default)
    with contextlib.nullcontext() if use_gpu else _fast_backend():
        if "mlp" in nets:
            r, s, summ, n = bench_mlps(data.load_mnist(), args.quick, backends, args.repeats,
                                       torch_cpu)
            rows += r
            sizes += s
            result["images"] = n
            summaries["mlp"] = summ
            tables["mlp"] = format_table(r) + "\n\n" + "\n".join(map(describe_sizes, s))
            plot(r, out / f"inference_{suffix}.png")
        if "convnet" in nets:
            n = args.conv_images or (QUICK_CONV_IMAGES if args.quick else
                                     CONV_IMAGES["gpu" if use_gpu else "cpu"])
            r, s, summ, shape = bench_convnet(args.quick, n, backends, args.repeats, torch_cpu)
            rows += r
            sizes.append(s)
            result["conv_images"] = n
            result["conv_input"] = CONV_INPUT
            summaries["convnet"] = summ
            tables["convnet"] = format_table(r) + "\n\n" + describe_sizes(s)
            plot(r, out / f"inference_conv_{suffix}.png", conv_shape=shape)
    for key, summ in summaries.items():
        print()
        print(summ)
    for table in tables.values():
        print()
        print(table)
    info["load_average_at_end"] = list(os.getloadavg())
    path = out / f"inference_{suffix}.json"
    labels = {r["net"] for r in rows}
    if set(nets) != set(SECTIONS) and path.exists():  # keep the other section's results
        old = json.loads(path.read_text())
        kept = [r for r in old.get("results", []) if r["net"] not in labels]
        if kept:
            kept_sizes = [s for s in old.get("model_sizes", []) if s["net"] not in labels]
            if "mlp" in nets:
                rows, sizes = rows + kept, sizes + kept_sizes
            else:  # the MLPs first, as a run of both writes them
                rows, sizes = kept + rows, kept_sizes + sizes
            for key in ("images", "conv_images", "conv_input"):
                if key in old and key not in result:
                    result[key] = old[key]
            old_tables = old.get("tables") or ({"mlp": old["table"]} if "table" in old else {})
            tables = {k: tables.get(k, old_tables.get(k)) for k in SECTIONS
                      if k in tables or k in old_tables}
            for k in ("frozen_summary", "frozen_summary_convnet"):
                if k in old:
                    result[k] = old[k]
            result["kept_from_earlier_run"] = dict(
                nets=sorted({r["net"] for r in kept}), machine=old.get("machine"))
    result.update(results=rows, model_sizes=sizes, tables=tables,
                  table="\n\n".join(tables.values()), notes=[
        "Median of --repeats runs after a warm-up; paths take turns within each repeat.",
        "The machine may be shared: load_average_at_start/end show other work, which skews "
        "absolute times and, less so, the ratios.",
        "The frozen first layer runs by the method FrozenBNN picks (first_layer_method "
        "'auto': the fastest exact one, timed once): 8 bit planes (8 binary MACs per float "
        "MAC), float32 BLAS on the pixel values (exact while 255 k <= 2^24) or, on numba with "
        "AVX512-VNNI, uint8 x int8 -> int32 (vpdpbusd); breakdown stages name it.",
        "gemm (per MLP): the hidden layers' product alone, float32 vs the numba XNOR GEMM, "
        "in the same run; frozen_over_gemm_speedup is the frozen net's speed-up over it.",
        "Predictions are compared with the float32 forward of the same network (each batch "
        "norm as the model's eval_affine applies it; computed by CuPy when the GPU runs); the "
        "frozen numpy reference path runs on a subset of big nets, and on a GPU machine so do "
        "the ConvNet's CPU paths (see images_timed). freeze follows that float32 batch norm "
        "where rounding moves a threshold, so every image should agree; rows' "
        "'differing_images' lists any that do not. cuDNN fp16 rounds pre-activations and "
        "batch-norm outputs to float16, so it may differ on a few images.",
        "MLPs run on the MNIST test set; the ConvNet on " + CONV_INPUT + ".",
    ])
    if "mlp" in summaries:
        result["frozen_summary"] = str(summaries["mlp"])
    if "convnet" in summaries:
        result["frozen_summary_convnet"] = str(summaries["convnet"])
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
