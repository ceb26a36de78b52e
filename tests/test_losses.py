"""Losses on small hand-computed examples, and their label checks."""

import math

import numpy as np
import pytest
from arrays import dev, host

from minibnn import losses
from minibnn.tensor import Tensor

OUT = np.array([[0.5, -2.0, 0.3],
                [1.5, 0.2, -0.4]])
LABELS = np.array([0, 2])


def test_pm1_targets():
    np.testing.assert_array_equal(host(losses.pm1_targets(dev(LABELS), 3)),
                                  [[1, -1, -1], [-1, -1, 1]])


def test_squared_hinge_value_and_gradient():
    # t = [[1,-1,-1],[-1,-1,1]]; margins 1 - t*y = [[0.5,-1,1.3],[2.5,1.2,1.4]]
    # clipped at 0 and squared: 0.25, 0, 1.69, 6.25, 1.44, 1.96 -> sum 11.59, mean over 6
    y = Tensor(OUT.copy(), requires_grad=True)
    loss = losses.squared_hinge(y, LABELS)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(11.59 / 6, rel=1e-12)
    loss.backward()
    # d/dy = 2 * max(0, margin) * (-t) / 6
    expected = np.array([[-2 * 0.5, 0.0, 2 * 1.3], [2 * 2.5, 2 * 1.2, -2 * 1.4]]) / 6
    np.testing.assert_allclose(host(y.grad), expected, rtol=1e-12)


def test_squared_hinge_zero_when_margins_met():
    y = Tensor(np.array([[1.0, -1.0], [-3.0, 2.0]]), requires_grad=True)
    loss = losses.squared_hinge(y, np.array([0, 1]))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(host(y.grad), 0.0)


def test_cross_entropy_value_and_gradient():
    logits = Tensor(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), requires_grad=True)
    loss = losses.cross_entropy(logits, np.array([2, 1]))
    # row 0: log(1 + e^-1 + e^-2); row 1: log 3
    expected = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    e = np.exp([1.0, 2.0, 3.0])
    softmax = np.array([e / e.sum(), [1 / 3] * 3])
    onehot = np.array([[0, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(host(logits.grad), (softmax - onehot) / 2, rtol=1e-12)


def test_cross_entropy_large_logits_are_stable():
    logits = Tensor(np.array([[1000.0, 0.0], [0.0, -1000.0]]))
    loss = losses.cross_entropy(logits, np.array([1, 1]))
    assert loss.item() == pytest.approx(1000.0, rel=1e-12)


@pytest.mark.parametrize("fn", [losses.squared_hinge, losses.cross_entropy])
def test_float32_in_float32_out(fn):
    y = Tensor(OUT.astype(np.float32), requires_grad=True)
    loss = fn(y, LABELS)
    assert loss.dtype == np.float32
    loss.backward()
    assert y.grad.dtype == np.float32


@pytest.mark.parametrize("fn", [losses.squared_hinge, losses.cross_entropy])
def test_labels_as_list_or_tensor(fn):
    ref = fn(Tensor(OUT), LABELS).item()
    assert fn(Tensor(OUT), [0, 2]).item() == ref
    assert fn(Tensor(OUT), Tensor(LABELS)).item() == ref
    assert fn(Tensor(OUT), LABELS.astype(np.uint8)).item() == ref


@pytest.mark.parametrize("fn", [losses.squared_hinge, losses.cross_entropy])
@pytest.mark.parametrize("labels,match", [
    (np.array([0, 1, 2]), r"shape \(2,\).*shape \(3,\)"),
    (np.array([[0], [2]]), r"shape \(2, 1\)"),
    (np.array(1), r"shape \(\)"),
    (np.array([0.0, 2.0]), "float64"),
    (np.array([True, False]), "bool"),
    (np.array([0, 3]), r"\[0, 3\).*\[0, 3\]"),
    (np.array([-1, 2]), r"\[-1, 2\]"),
], ids=["too-many", "2d", "scalar", "float", "bool", "too-big", "negative"])
def test_bad_labels(fn, labels, match):
    with pytest.raises(ValueError, match=match) as info:
        fn(Tensor(OUT), labels)
    assert fn.__name__ in str(info.value)


@pytest.mark.parametrize("fn", [losses.squared_hinge, losses.cross_entropy])
def test_output_must_be_2d(fn):
    with pytest.raises(ValueError, match=r"\(batch, classes\).*\(3,\)"):
        fn(Tensor(np.zeros(3)), np.array([0, 1, 2]))


def test_registry():
    assert losses.LOSSES == {"squared-hinge": losses.squared_hinge,
                             "cross-entropy": losses.cross_entropy}
