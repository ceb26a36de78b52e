"""Losses: the paper's squared hinge (L2-SVM output layer) and softmax cross-entropy."""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor


_trusted = [False]  # inside labels_checked(): the range check was done by the caller


@contextlib.contextmanager
def labels_checked():
    """Within this block the losses skip their range check of the labels (``0 <= label <
    classes``), which on the GPU reads the minimum and maximum back to the host and so waits
    for the GPU at every step. For callers that checked the labels of the whole data set
    first, as ``train.train_epoch`` does; the shape and dtype checks stay."""
    previous = _trusted[0]
    _trusted[0] = True
    try:
        yield
    finally:
        _trusted[0] = previous


def _labels(labels, output, name):
    xp = backend.get_array_module(output.data)
    labels = labels.data if isinstance(labels, Tensor) else labels
    labels = xp.asarray(labels)
    if output.ndim != 2:
        raise ValueError(f"{name}: output must have shape (batch, classes), got {tuple(output.shape)}")
    if labels.shape != (output.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"{name}: labels must be integers of shape ({output.shape[0]},), got "
                         f"shape {tuple(labels.shape)} dtype {labels.dtype}")
    if not _trusted[0]:
        check_label_range(labels, output.shape[1], name)
    return labels


def check_label_range(labels, classes, name=None):
    """ValueError unless every label lies in [0, classes) (reads the minimum and maximum
    back from the GPU for a CuPy array)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"{name + ': ' if name else ''}labels must lie in [0, {classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def pm1_targets(labels, classes, dtype=np.float32):
    """One-hot targets with +1 for the class and -1 elsewhere (the paper's hinge targets)."""
    xp = backend.get_array_module(labels)
    t = xp.full((len(labels), classes), -1, dtype=dtype)
    t[xp.arange(len(labels)), labels] = 1
    return t


def squared_hinge(output, labels):
    """mean(max(0, 1 - t * y)^2) over all batch x class entries, t = +-1 one-hot targets;
    the L2-SVM loss of the paper's Theano code. ``labels`` are class indices."""
    labels = _labels(labels, output, "squared_hinge")
    t = pm1_targets(labels, output.shape[1], dtype=output.dtype)
    margin = F.relu(1.0 - output * t)
    return F.mean(margin * margin)


def cross_entropy(logits, labels):
    """-mean(log softmax(logits)[i, labels[i]]); ``labels`` are class indices."""
    labels = _labels(labels, logits, "cross_entropy")
    xp = backend.get_array_module(logits.data)
    picked = F.log_softmax(logits, axis=1)[xp.arange(logits.shape[0]), labels]
    return -F.mean(picked)


LOSSES = {"squared-hinge": squared_hinge, "cross-entropy": cross_entropy}
