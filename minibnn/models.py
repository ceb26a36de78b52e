"""The paper's networks as recipes that return ordinary ``Sequential`` models, and the
model file (config + weights) that rebuilds one."""

from __future__ import annotations

import numpy as np

from . import io, nn

BATCH_NORMS = {"standard": nn.BatchNorm, "shift": nn.ShiftBatchNorm}


def mnist_mlp(hidden=4096, layers=3, in_features=784, classes=10, dropout_in=0.2,
              dropout_hidden=0.5, bn="standard", stochastic=False, momentum=0.1, eps=1e-4,
              rng=None):
    """The paper's permutation-invariant MNIST MLP (Section 2.1; 3 x 4096 in Theano).

    input in [-1, 1] -> Dropout(dropout_in)
      -> [BinaryLinear -> BN -> Sign -> Dropout(dropout_hidden)] x layers
      -> BinaryLinear -> BN  (scores for the squared hinge loss)

    Dropout layers with p = 0 are left out. ``bn`` is "standard" or "shift" (Algorithm 3).
    Hidden layers are marked ``binary_input`` (XNOR kernel; in eval only when dropout
    scales their input in training), the first is not.
    The returned model carries its arguments as ``model.config`` so it can be rebuilt.
    """
    if bn not in BATCH_NORMS:
        raise ValueError(f"bn must be one of {sorted(BATCH_NORMS)}, got {bn!r}")
    if int(layers) < 1 or int(hidden) < 1:
        raise ValueError(f"need layers >= 1 and hidden >= 1, got layers={layers}, hidden={hidden}")
    norm = BATCH_NORMS[bn]
    stack = [nn.Dropout(dropout_in, rng=rng)] if dropout_in else []
    # what reaches a hidden layer: the signs of the layer before, scaled by dropout in training
    after_sign = "eval" if dropout_hidden else True
    width, binary_input = in_features, False  # the first layer sees pixels
    for _ in range(int(layers)):
        stack += [nn.BinaryLinear(width, hidden, stochastic=stochastic, binary_input=binary_input,
                                  rng=rng),
                  norm(hidden, momentum=momentum, eps=eps), nn.Sign()]
        if dropout_hidden:
            stack.append(nn.Dropout(dropout_hidden, rng=rng))
        width, binary_input = hidden, after_sign
    stack += [nn.BinaryLinear(width, classes, stochastic=stochastic, binary_input=binary_input,
                              rng=rng),
              norm(classes, momentum=momentum, eps=eps)]
    model = nn.Sequential(*stack)
    model.config = dict(arch="mnist_mlp", hidden=int(hidden), layers=int(layers),
                        in_features=int(in_features), classes=int(classes),
                        dropout_in=float(dropout_in), dropout_hidden=float(dropout_hidden),
                        bn=bn, stochastic=bool(stochastic), momentum=float(momentum),
                        eps=float(eps))
    return model


ARCHITECTURES = {"mnist_mlp": mnist_mlp}


def build(config, rng=None):
    """Rebuild a model from its ``config`` dict (as stored in checkpoints)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](rng=rng, **config)


# --- model files -------------------------------------------------------------------------

def save_model(path, model, extra=None):
    """Save a model's ``config`` and state dict to one .npz (atomically); ``load_model``
    reads it back. ``extra`` (a JSON-able dict) is stored as the file's ``meta``."""
    arrays = {f"state/{k}": v for k, v in model.state_dict().items()}
    arrays["config"] = io.json_array(model.config)
    arrays["meta"] = io.json_array(extra or {})
    io.atomic_savez(path, arrays)


def load_model(path):
    """Rebuild a model saved by ``save_model``, in eval mode; returns (model, meta)."""
    with io.open_npz(path, "model") as z:
        if "config" not in z.files:
            raise ValueError(f"{path}: not a minibnn model file (no 'config' entry)")
        config, meta = io.read_json(z, "config", path), io.read_json(z, "meta", path)
        state = io.read_prefixed(z, "state/", path)
    model = build(config, rng=np.random.default_rng(0))
    model.load_state_dict(state)
    return model.eval(), meta
