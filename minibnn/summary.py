"""Per-layer model summary in the manner of larq's ``larq.models.summary``.

For a trained model (a ``Module``) or a frozen network (``deploy.FrozenBNN``) it lists, per
layer: the input precision, output shape, parameters (binary and other), memory with every
parameter stored as float32 and as deployed (a binary parameter takes 1 bit), and the
multiply-accumulates per sample, split into binary (XNOR-popcount) and float MACs. The
totals give the compression ratio ``float32 memory / packed memory``.

Counting rules:

* BinaryLinear (k -> n): k n binary weights (+ n float biases); k n MACs per sample,
  binary when its input is binary (after Sign), float otherwise (the first layer).
* Linear: k n + n float parameters, k n float MACs.
* BinaryConv2d (C_in -> C_out, k x k, output Ho x Wo): k k C_in C_out binary weights
  (+ C_out float biases); Ho Wo k k C_in C_out MACs per sample, binary when its input is
  binary, float otherwise. Conv2d: the same as float parameters and float MACs. The output
  size needs the image size: ``input_shape`` = (C, H, W), or the recipe's
  (``deploy.INPUT_SHAPES`` by ``model.config["arch"]``); without it the conv rows show
  "?" and their MACs are left out of the totals.
* MaxPool2d, Sign, Dropout, Flatten: no parameters, no MACs (comparisons are not counted).
* BatchNorm / ShiftBatchNorm (and the 2-D ones): 4 n float parameters (gamma, beta and the
  two running statistics, as Keras and larq count them); element-wise, no MACs counted.
* Frozen layers: k n packed binary weights plus n int32 thresholds (hidden) or 2 n float64
  (output affine); their packed memory is the bytes actually stored (rows padded to 64
  bits; a conv layer's also its negation flags). The first layer's 8-bit input costs 8 k n
  binary MACs (one per bit plane, paper Section 1.6); a frozen conv layer costs
  Ho Wo k k C_in C_out binary MACs (x 8 on 8-bit input), its pool none; the output affine
  costs n float MACs.
"""

from __future__ import annotations

import math

from . import functional as F
from . import nn

__all__ = ["summary", "Summary"]


class Summary(str):
    """The summary table as a string; ``rows`` (one dict per layer) and ``totals`` (a dict)
    hold the numbers. ``print(summary(model))`` shows it."""

    rows: list
    totals: dict

    def __new__(cls, text, rows, totals):
        obj = super().__new__(cls, text)
        obj.rows, obj.totals = rows, totals
        return obj


def _row(name, inp, out, binary=0, other=0, packed_bytes=None, bin_macs=0, float_macs=0):
    params = binary + other
    if packed_bytes is None:
        packed_bytes = binary / 8 + 4 * other
    return dict(layer=name, input=inp, output=out, params=params, binary_params=binary,
                other_params=other, memory_float32=4 * params, memory_packed=packed_bytes,
                binary_macs=bin_macs, float_macs=float_macs)


def _numel(p):
    return int(math.prod(p.shape))


def _module_layers(model):
    if isinstance(model, nn.Sequential):
        out = []
        for layer in model.layers:
            out += _module_layers(layer) if isinstance(layer, nn.Sequential) else [layer]
        return out
    return [model]


_CONVS = (nn.BinaryConv2d, nn.Conv2d)


def _input_shape(model, layers, input_shape):
    """What the first layer takes: (C, H, W) for a conv (None when unknown), an int width
    for a dense layer, None for anything else."""
    first = next((l for l in layers if isinstance(l, (nn.BinaryLinear, nn.Linear) + _CONVS)),
                 None)
    if first is None or not isinstance(first, _CONVS):
        return None if first is None else first.in_features
    from .deploy.freezing import model_input_shape
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    try:
        return model_input_shape(model)
    except ValueError:  # a ConvNet of no known recipe
        return None


def _conv_row(name, inp, layer, shape, binary_input):
    """(row, output shape) of a BinaryConv2d / Conv2d on input ``shape`` ((C, H, W) or None)."""
    c, o, (kh, kw) = layer.in_channels, layer.out_channels, layer.kernel_size
    weights, bias = kh * kw * c * o, o if layer.bias is not None else 0
    out, macs = None, None
    if isinstance(shape, tuple) and len(shape) == 3:
        _, _, ho, wo = F.conv_output_shape((1,) + shape, (o, c, kh, kw), layer.stride,
                                           layer.padding, op=name)
        out, macs = (o, ho, wo), ho * wo * weights
    if isinstance(layer, nn.BinaryConv2d):
        kind = "bin_macs" if binary_input else "float_macs"
        return _row(name, inp, out, binary=weights, other=bias, **{kind: macs}), out
    return _row(name, inp, out, other=weights + bias, float_macs=macs), out


def _module_rows(model, input_shape=None):
    layers = _module_layers(model)
    width = _input_shape(model, layers, input_shape)
    rows, binary_input = [], False
    for i, layer in enumerate(layers):
        name = f"{i} {type(layer).__name__}"
        inp = "1-bit" if binary_input else "float"
        if isinstance(layer, _CONVS):
            row, width = _conv_row(name, inp, layer, width, binary_input)
            rows.append(row)
            binary_input = False
        elif isinstance(layer, nn.MaxPool2d):
            if isinstance(width, tuple):
                width = (width[0],) + F.pool_output_shape((1,) + width, layer.kernel_size,
                                                          layer.stride, op=name)[2:]
            rows.append(_row(name, inp, width))
        elif isinstance(layer, nn.Flatten):
            width = math.prod(width) if isinstance(width, tuple) else width
            rows.append(_row(name, inp, width))
        elif isinstance(layer, (nn.BinaryLinear, nn.Linear)):
            k, n = layer.in_features, layer.out_features
            bias = n if layer.bias is not None else 0
            if isinstance(layer, nn.BinaryLinear):
                macs = dict(bin_macs=k * n) if binary_input else dict(float_macs=k * n)
                rows.append(_row(name, inp, n, binary=k * n, other=bias, **macs))
            else:
                rows.append(_row(name, inp, n, other=k * n + bias, float_macs=k * n))
            width, binary_input = n, False
        elif isinstance(layer, (nn.BatchNorm, nn.ShiftBatchNorm)):
            if not (isinstance(width, tuple) or (width is None and isinstance(
                    layer, (nn.BatchNorm2d, nn.ShiftBatchNorm2d)))):
                width = layer.num_features  # (N, C, H, W) input keeps its shape
            rows.append(_row(name, inp, width, other=4 * layer.num_features))
            binary_input = False
        elif isinstance(layer, nn.Sign):
            rows.append(_row(name, inp, width))
            binary_input = True
        elif isinstance(layer, nn.Dropout):
            rows.append(_row(name, inp, width))
        elif isinstance(layer, nn.HardTanh):
            rows.append(_row(name, inp, width))
            binary_input = False
        else:  # unknown layer: count its parameters and buffers as float, no MACs
            other = sum(_numel(p) for p in layer.parameters())
            other += sum(_numel(b) for _, b in layer.named_buffers())
            rows.append(_row(name, inp, None, other=other))
            width, binary_input = None, False
    return rows


def _frozen_rows(frozen):
    rows = []
    for i, layer in enumerate(frozen.layers):
        k, n = layer.k, layer.n_out
        bits8 = layer.planes > 1
        inp = "8-bit" if bits8 else "1-bit"
        if layer.kind == "conv":
            kh, kw = layer.kernel
            pool = "" if layer.pool is None else f" -> max-pool {layer.pool[0]}"
            stored = layer.weight.nbytes + layer.threshold.nbytes + layer.negated.nbytes
            rows.append(_row(f"{i} binary conv {kh}x{kw}{pool} -> threshold", inp,
                             layer.out_shape, binary=k * n, other=n, packed_bytes=stored,
                             bin_macs=layer.macs))
            continue
        if layer.is_output:
            name = f"{i} binary dense -> affine"
            other, extra, float_macs = 2 * n, layer.scale.nbytes + layer.offset.nbytes, n
        else:
            name = f"{i} binary dense -> threshold"
            other, extra, float_macs = n, layer.threshold.nbytes, 0
        rows.append(_row(name, inp, n, binary=k * n, other=other,
                         packed_bytes=layer.weight.nbytes + extra,
                         bin_macs=layer.planes * k * n, float_macs=float_macs))
    return rows


def _bytes(n):
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B" if float(n).is_integer() else f"{n:,.1f} B"


COLUMNS = (("layer", "Layer"), ("input", "Input"), ("output", "Output"), ("params", "Params"),
           ("binary_params", "Binary"), ("other_params", "Other"),
           ("memory_float32", "Mem float32"), ("memory_packed", "Mem packed"),
           ("binary_macs", "Binary MACs"), ("float_macs", "Float MACs"))


def _cell(key, value):
    if key == "output":
        if value is None:
            return "?"
        return "(-1, " + (", ".join(map(str, value)) if isinstance(value, tuple)
                          else str(value)) + ")"
    if value is None:
        return "?"
    if key.startswith("memory"):
        return _bytes(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary(model, print_fn=None, input_shape=None):
    """Summarise ``model`` (a ``minibnn.nn.Module`` or a ``deploy.FrozenBNN``) layer by layer.

    Returns a ``Summary``: the table as a string, with ``.rows`` and ``.totals``
    (params, binary_params, other_params, memory_float32 and memory_packed in bytes,
    compression = memory_float32 / memory_packed, binary_macs and float_macs per sample).
    ``print_fn`` (e.g. ``print``) is called with the table as well. ``input_shape``
    (C, H, W) sizes a ConvNet's layers when its config names no recipe.
    """
    from .deploy import FrozenBNN
    if isinstance(model, FrozenBNN):
        rows, title = _frozen_rows(model), f"Frozen network: {model!r}"
        other_note = "Other = int32 thresholds and the float64 output affine."
    elif isinstance(model, nn.Module):
        rows, title = _module_rows(model, input_shape), f"Model: {type(model).__name__}"
        other_note = "Other = float32 parameters (biases, batch-norm gamma/beta/statistics)."
    else:
        raise TypeError(f"model: expected a minibnn.nn.Module or a deploy.FrozenBNN, got "
                        f"{type(model).__name__}")
    keys = ("params", "binary_params", "other_params", "memory_float32", "memory_packed",
            "binary_macs", "float_macs")
    totals = {k: sum(r[k] or 0 for r in rows) for k in keys}  # None: unknown MACs
    totals["compression"] = (totals["memory_float32"] / totals["memory_packed"]
                             if totals["memory_packed"] else float("nan"))

    cells = [[_cell(k, r[k]) for k, _ in COLUMNS] for r in rows]
    total_cells = ["Total", "", ""] + [_cell(k, totals[k]) for k, _ in COLUMNS[3:]]
    head = [h for _, h in COLUMNS]
    widths = [max(len(c[i]) for c in cells + [head, total_cells]) for i in range(len(head))]

    def line(values):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    rule = "-" * len(line(head))
    text = "\n".join(
        [title, rule, line(head), rule] + [line(c) for c in cells] + [rule, line(total_cells),
                                                                      rule]
        + [f"Parameters: {totals['params']:,} ({totals['binary_params']:,} binary, "
           f"{totals['other_params']:,} other). {other_note}",
           f"Memory: {_bytes(totals['memory_float32'])} as float32, "
           f"{_bytes(totals['memory_packed'])} packed; compression ratio "
           f"{totals['compression']:.2f}x",
           f"MACs per sample: {totals['binary_macs']:,} binary (XNOR-popcount), "
           f"{totals['float_macs']:,} float"]
        + (["Conv layers' output size unknown (?): pass input_shape=(C, H, W) to count "
            "their MACs."] if any(r["binary_macs"] is None or r["float_macs"] is None
                                  for r in rows) else []))
    result = Summary(text, rows, totals)
    if print_fn is not None:
        print_fn(result)
    return result
