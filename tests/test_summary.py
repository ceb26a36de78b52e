"""Model summary: per-layer rows and totals against hand-counted values for a small MLP."""

import pytest

import minibnn
from minibnn import deploy, models, nn
from minibnn.summary import Summary, summary


def small():
    # Dropout, BL(20,16), BN, Sign, Dropout, BL(16,16), BN, Sign, Dropout, BL(16,3), BN
    return models.mnist_mlp(hidden=16, layers=2, in_features=20, classes=3)


def test_module_totals_by_hand():
    s = summary(small())
    assert isinstance(s, Summary) and isinstance(s, str)
    binary = 20 * 16 + 16 * 16 + 16 * 3          # 624 weights, 1 bit each
    other = 4 * 16 + 4 * 16 + 4 * 3              # BN: gamma, beta, running mean and var
    assert s.totals["binary_params"] == binary == 624
    assert s.totals["other_params"] == other == 140
    assert s.totals["params"] == 764
    assert s.totals["memory_float32"] == 4 * 764
    assert s.totals["memory_packed"] == 624 / 8 + 4 * 140 == 638
    assert s.totals["compression"] == pytest.approx(3056 / 638)
    assert s.totals["binary_macs"] == 16 * 16 + 16 * 3  # layers fed by Sign
    assert s.totals["float_macs"] == 20 * 16             # the first layer's real input
    assert [r["output"] for r in s.rows] == [20, 16, 16, 16, 16, 16, 16, 16, 16, 3, 3]
    assert [r["input"] for r in s.rows][3:6] == ["float", "1-bit", "1-bit"]
    for word in ("BinaryLinear", "Total", "compression ratio 4.79x", "(-1, 16)"):
        assert word in s


def test_frozen_totals_by_hand():
    frozen = deploy.freeze(small().eval())
    s = minibnn.summary(frozen)
    assert s.totals["binary_params"] == 624
    assert s.totals["other_params"] == 16 + 16 + 2 * 3   # int32 thresholds, float64 affine
    assert s.totals["params"] == 662
    assert s.totals["memory_float32"] == 4 * 662
    # one uint64 word per row (k <= 64), 4-byte thresholds, 8-byte scale and offset
    assert s.totals["memory_packed"] == (16 * 8 + 16 * 4) * 2 + 3 * 8 + 2 * 3 * 8 == 456
    assert s.totals["compression"] == pytest.approx(2648 / 456)
    assert s.totals["binary_macs"] == 8 * 20 * 16 + 16 * 16 + 16 * 3  # 8 bit planes first
    assert s.totals["float_macs"] == 3
    assert [r["input"] for r in s.rows] == ["8-bit", "1-bit", "1-bit"]


def test_bias_linear_and_unknown_layers():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(minibnn.backend.xp().ones(5))

    model = nn.Sequential(nn.Linear(4, 5), nn.HardTanh(), nn.BinaryLinear(5, 2, bias=True),
                          Odd())
    s = summary(model)
    assert s.totals["other_params"] == 4 * 5 + 5 + 2 + 5
    assert s.totals["binary_params"] == 10
    assert s.totals["float_macs"] == 20 + 10
    assert s.rows[-1]["output"] is None and "?" in s


def test_print_fn_and_bad_input():
    lines = []
    s = summary(small(), print_fn=lines.append)
    assert lines == [s]
    with pytest.raises(TypeError, match="Module or a deploy.FrozenBNN"):
        summary("not a model")
