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
* BatchNorm / ShiftBatchNorm: 4 n float parameters (gamma, beta and the two running
  statistics, as Keras and larq count them); element-wise, no MACs counted.
* Frozen layers: k n packed binary weights plus n int32 thresholds (hidden) or 2 n float64
  (output affine); their packed memory is the bytes actually stored (rows padded to 64
  bits). The first layer's 8-bit input costs 8 k n binary MACs (one per bit plane, paper
  Section 1.6); the output affine costs n float MACs.
"""

from __future__ import annotations

import math

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


def _module_rows(model):
    layers = _module_layers(model)
    first = next((l for l in layers if isinstance(l, (nn.BinaryLinear, nn.Linear))), None)
    width = None if first is None else first.in_features
    rows, binary_input = [], False
    for i, layer in enumerate(layers):
        name = f"{i} {type(layer).__name__}"
        inp = "1-bit" if binary_input else "float"
        if isinstance(layer, (nn.BinaryLinear, nn.Linear)):
            k, n = layer.in_features, layer.out_features
            bias = n if layer.bias is not None else 0
            if isinstance(layer, nn.BinaryLinear):
                macs = dict(bin_macs=k * n) if binary_input else dict(float_macs=k * n)
                rows.append(_row(name, inp, n, binary=k * n, other=bias, **macs))
            else:
                rows.append(_row(name, inp, n, other=k * n + bias, float_macs=k * n))
            width, binary_input = n, False
        elif isinstance(layer, (nn.BatchNorm, nn.ShiftBatchNorm)):
            rows.append(_row(name, inp, layer.num_features, other=4 * layer.num_features))
            width, binary_input = layer.num_features, False
        elif isinstance(layer, nn.Sign):
            rows.append(_row(name, inp, width))
            binary_input = True
        elif isinstance(layer, (nn.Dropout, nn.Flatten)):
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
        return "?" if value is None else f"(-1, {value})"
    if key.startswith("memory"):
        return _bytes(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def summary(model, print_fn=None):
    """Summarise ``model`` (a ``minibnn.nn.Module`` or a ``deploy.FrozenBNN``) layer by layer.

    Returns a ``Summary``: the table as a string, with ``.rows`` and ``.totals``
    (params, binary_params, other_params, memory_float32 and memory_packed in bytes,
    compression = memory_float32 / memory_packed, binary_macs and float_macs per sample).
    ``print_fn`` (e.g. ``print``) is called with the table as well.
    """
    from .deploy import FrozenBNN
    if isinstance(model, FrozenBNN):
        rows, title = _frozen_rows(model), f"Frozen network: {model!r}"
        other_note = "Other = int32 thresholds and the float64 output affine."
    elif isinstance(model, nn.Module):
        rows, title = _module_rows(model), f"Model: {type(model).__name__}"
        other_note = "Other = float32 parameters (biases, batch-norm gamma/beta/statistics)."
    else:
        raise TypeError(f"model: expected a minibnn.nn.Module or a deploy.FrozenBNN, got "
                        f"{type(model).__name__}")
    keys = ("params", "binary_params", "other_params", "memory_float32", "memory_packed",
            "binary_macs", "float_macs")
    totals = {k: sum(r[k] for r in rows) for k in keys}
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
           f"{totals['float_macs']:,} float"])
    result = Summary(text, rows, totals)
    if print_fn is not None:
        print_fn(result)
    return result
