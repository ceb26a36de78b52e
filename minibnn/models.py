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


def binary_convnet(stages, fc, in_channels=3, image_size=32, classes=10, bn="standard",
                   stochastic=False, momentum=0.1, eps=1e-4, rng=None):
    """A VGG-like binary ConvNet in the layout of the paper's CIFAR-10 and SVHN networks.

    Each stage of width c is two 3x3 convolutions (padding 1), the second followed by a
    2x2 max-pool, in the authors' order conv -> pool -> BN -> sign:

        [BinaryConv2d(c) -> BN -> Sign -> BinaryConv2d(c) -> MaxPool2d(2) -> BN -> Sign]
          per stage, then Flatten
        -> [BinaryLinear(f) -> BN -> Sign] per entry f of ``fc``
        -> BinaryLinear(classes) -> BN  (scores for the squared hinge loss)

    The first convolution sees the real-valued image; every later layer is marked
    ``binary_input=True`` and runs on the XNOR kernel. ``image_size`` must be divisible by
    2 ** len(stages).
    """
    norm1, norm2 = _norms(bn)
    stages, fc = [int(c) for c in stages], [int(f) for f in fc]
    if not stages or min(stages) < 1 or (fc and min(fc) < 1) or int(classes) < 1:
        raise ValueError(f"need at least one stage and positive widths, got stages={stages}, "
                         f"fc={fc}, classes={classes}")
    size = int(image_size)
    if size < 1 or size % 2 ** len(stages):
        raise ValueError(f"image_size {image_size} must be a positive multiple of "
                         f"2 ** {len(stages)} (one 2x2 max-pool per stage)")
    layers, width, binary_input = [], int(in_channels), False
    for c in stages:
        layers += [nn.BinaryConv2d(width, c, 3, padding=1, stochastic=stochastic,
                                   binary_input=binary_input, rng=rng),
                   norm2(c, momentum=momentum, eps=eps), nn.Sign(),
                   nn.BinaryConv2d(c, c, 3, padding=1, stochastic=stochastic,
                                   binary_input=True, rng=rng),
                   nn.MaxPool2d(2), norm2(c, momentum=momentum, eps=eps), nn.Sign()]
        width, binary_input, size = c, True, size // 2
    layers.append(nn.Flatten())
    width *= size * size
    for f in fc + [int(classes)]:
        layers += [nn.BinaryLinear(width, f, stochastic=stochastic, binary_input=True, rng=rng),
                   norm1(f, momentum=momentum, eps=eps), nn.Sign()]
        width = f
    layers.pop()  # no Sign after the output batch norm
    return nn.Sequential(*layers)


def _norms(bn):
    if bn not in BATCH_NORMS:
        raise ValueError(f"bn must be one of {sorted(BATCH_NORMS)}, got {bn!r}")
    return BATCH_NORMS[bn], {"standard": nn.BatchNorm2d, "shift": nn.ShiftBatchNorm2d}[bn]


def _with_config(model, arch, **config):
    model.config = dict(arch=arch, **config)
    return model


def cifar10_convnet(classes=10, bn="standard", stochastic=False, momentum=0.1, eps=1e-4,
                    rng=None):
    """The paper's CIFAR-10 ConvNet (Table 1; the authors' Theano ``cifar10.py``):
    2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - 2x1024FC - 10, on 3x32x32 input."""
    kw = dict(classes=int(classes), bn=bn, stochastic=bool(stochastic),
              momentum=float(momentum), eps=float(eps))
    return _with_config(binary_convnet((128, 256, 512), (1024, 1024), 3, 32, rng=rng, **kw),
                        "cifar10_convnet", **kw)


def svhn_convnet(classes=10, bn="standard", stochastic=False, momentum=0.1, eps=1e-4,
                 rng=None):
    """The paper's SVHN ConvNet (the authors' Theano ``svhn.py``): the CIFAR-10 network with
    half the convolution widths, 2x64C3 - MP2 - 2x128C3 - MP2 - 2x256C3 - MP2 - 2x1024FC - 10."""
    kw = dict(classes=int(classes), bn=bn, stochastic=bool(stochastic),
              momentum=float(momentum), eps=float(eps))
    return _with_config(binary_convnet((64, 128, 256), (1024, 1024), 3, 32, rng=rng, **kw),
                        "svhn_convnet", **kw)


def mnist_convnet(channels=(16, 32), hidden=256, classes=10, bn="standard", stochastic=False,
                  momentum=0.1, eps=1e-4, in_channels=1, image_size=28, rng=None):
    """A small binary ConvNet for MNIST (not in the paper) that trains on a 2-core CPU in
    minutes: 2x16C3 - MP2 - 2x32C3 - MP2 - 256FC - 10 on 1x28x28 input, by default.
    ``in_channels`` and ``image_size`` fit it to other data in MNIST's layout; they are
    recorded in ``model.config`` only when they differ from 1 and 28."""
    kw = dict(channels=[int(c) for c in channels], hidden=int(hidden), classes=int(classes),
              bn=bn, stochastic=bool(stochastic), momentum=float(momentum), eps=float(eps))
    model = binary_convnet(kw["channels"], (kw["hidden"],), int(in_channels), int(image_size),
                           classes=kw["classes"], bn=bn, stochastic=kw["stochastic"],
                           momentum=kw["momentum"], eps=kw["eps"], rng=rng)
    if (int(in_channels), int(image_size)) != (1, 28):
        kw.update(in_channels=int(in_channels), image_size=int(image_size))
    return _with_config(model, "mnist_convnet", **kw)


ARCHITECTURES = {"mnist_mlp": mnist_mlp, "mnist_convnet": mnist_convnet,
                 "cifar10_convnet": cifar10_convnet, "svhn_convnet": svhn_convnet}


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
    """Rebuild a model saved by ``save_model``, in eval mode; returns (model, meta).

    A file whose config does not build, whose arrays do not fit, or that holds NaN or
    infinity is a ValueError naming the file."""
    with io.open_npz(path, "model") as z:
        if "config" not in z.files:
            raise ValueError(f"{path}: not a minibnn model file (no 'config' entry)")
        config, meta = io.read_json(z, "config", path), io.read_json(z, "meta", path)
        state = io.read_prefixed(z, "state/", path)
    io.check_finite(state, path, "state/")
    try:
        model = build(config, rng=np.random.default_rng(0))
        model.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: damaged model file: {exc}") from None
    return model.eval(), meta
