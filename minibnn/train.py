"""The training loop, to be read beside the paper's Algorithm 1 (arXiv:1602.02830).

``train_step`` is one mini-batch of Algorithm 1 (forward with binarization, backward with
the straight-through estimator, update with clipping); ``train_epoch`` one pass over the
data; ``train`` the epochs, with the learning-rate schedule, evaluation, and a checkpoint
after every epoch (``runs``: what a run folder holds, so that a resumed run ends exactly
where an uninterrupted one would).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import backend, data, distributed, models, registry, runs
from .io import atomic_savez  # noqa: F401  (kept importable from here)
from .models import load_model, save_model  # noqa: F401  (kept importable from here)
from .runs import CHECKPOINT, CURVES, METRICS, MODEL, plot_curves, read_checkpoint  # noqa: F401
from .tensor import Tensor, no_grad


#: image shape (channels, height, width) and classes of each data set
DATASETS = {"mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "svhn": ((3, 32, 32), 10)}
MODELS = ("mlp", "convnet")

_WHERE_TO_GET = {
    "cifar10": "data_dir: --data-dir is needed for cifar10: download the CIFAR-10 binary version "
               "(cifar-10-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html, "
               "unpack it, and pass the cifar-10-batches-bin folder (data_batch_1.bin .. "
               "data_batch_5.bin, test_batch.bin) or its parent",
    "svhn": "data_dir: --data-dir is needed for svhn: download train_32x32.mat, test_32x32.mat "
            "and extra_32x32.mat (format 2, cropped digits) from "
            "http://ufldl.stanford.edu/housenumbers/ into one folder and pass it; reading them "
            "needs scipy (pip install minibnn[svhn])",
}

#: the authors' recipes, per (dataset, model): what differs from TrainConfig's defaults
RECIPES = {
    ("mnist", "mlp"): {},
    # not in the paper: a small ConvNet that trains in minutes on 2 cores. Its running BN
    # statistics lag its first layers' fast-changing weights: measured after epoch 4, eval
    # error 36.4% with them, 2.2% with statistics recomputed from 5,000 training images
    # and the final weights; so this recipe recomputes them before every evaluation.
    # 15 epochs: 1.00% validation / 1.09% test error at the best epoch (10 epochs: 1.36%)
    ("mnist", "convnet"): dict(epochs=15, batch_size=100, lr_start=3e-3, lr_end=3e-5,
                               bn_recompute=10000),
    # the Theano code's cifar10.py: batch 50, Adam, LR 1e-3 -> 3e-7 over 500 epochs
    ("cifar10", "convnet"): dict(epochs=500, batch_size=50, lr_start=1e-3, lr_end=3e-7),
    # the Theano code's svhn.py: batch 50, Adam, LR 1e-3 -> 1e-6 over 200 epochs
    ("svhn", "convnet"): dict(epochs=200, batch_size=50, lr_start=1e-3, lr_end=1e-6),
}
#: the Torch7 variant of a recipe: shift-based AdaMax and shift-based batch norm
TORCH_VARIANT = dict(optimizer="shift-adamax", bn="shift")


class ConfigError(ValueError):
    """A training option out of range; ``option`` is its TrainConfig name (``lr_start``),
    ``problem`` the rest of the message."""

    def __init__(self, option, problem):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _check_option(cfg, name, kind, low, high=None, open_low=False, why=""):
    """ConfigError unless ``cfg.<name>`` is a ``kind`` (int, or a finite float) with
    low <= value (low < value when ``open_low``) and value < high."""
    value = getattr(cfg, name)
    ok_type = (isinstance(value, (int, np.integer)) if kind is int
               else isinstance(value, (int, float, np.integer, np.floating)))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(name, f"must be {'an integer' if kind is int else 'a number'}, "
                                f"got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")
    if value < low or (open_low and value == low) or (high is not None and value >= high):
        rng = (f"in [{low}, {high})" if high is not None else
               f"> {low}" if open_low else f">= {low}")
        raise ConfigError(name, f"must be {rng}, got {value}" + (f": {why}" if why else ""))


#: bytes of training state per MLP parameter: float32 latent weight, gradient, two
#: optimizer moments, the optimizer's scratch array, and the model and best-epoch copies
#: a checkpoint writes
_BYTES_PER_PARAMETER = 7 * 4


def _physical_memory():
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _size(n_bytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1024


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint so ``--resume`` can rebuild it.

    The defaults are a short recipe that reaches about 2.1% MNIST test error in 12 epochs
    (a few minutes on 2 cores): the paper's MLP at 3 x 512, without dropout. The paper's
    own recipes are in ``RECIPES`` (``TrainConfig.recipe``) and the README. Names of the
    choosable parts (optimizer, loss, bn, schedule) come from ``registry``.
    """

    hidden: int = 512
    layers: int = 3
    epochs: int = 12
    batch_size: int = 100
    lr_start: float = 0.003
    lr_end: float = 3e-5
    schedule: str = "exp"          # "exp" (Theano recipe) or "halve" (Torch recipe)
    halve_every: int = 10
    optimizer: str = "adam"        # adam | adamax | shift-adamax | sgd
    bn: str = "standard"           # standard | shift
    loss: str = "squared-hinge"    # squared-hinge | cross-entropy
    stochastic: bool = False
    dropout_in: float = 0.0
    dropout_hidden: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    train_limit: int | None = None  # use only the first N training images (quick runs)
    dataset: str = "mnist"          # mnist | cifar10 | svhn
    model: str = "mlp"              # mlp | convnet
    zca: bool = False               # ZCA whitening (CIFAR-10; fitted on the training split)
    bn_momentum: float = 0.1        # weight of a batch in BN's running statistics (eval only)
    bn_recompute: int = 0           # before each evaluation, BN statistics from this many
                                    # training images and the epoch's final weights (0: off)
    val_size: int | None = None     # validation images (None: the data set's split, as today)
    # taken from the data when a run starts (``fit_data``), so that the run rebuilds its
    # model without its data; None until then (DATASETS' sizes)
    input_shape: tuple | None = None  # one input as the model takes it: (C, H, W), MLP (n,)
    classes: int | None = None        # 1 + the largest training or validation label

    @classmethod
    def recipe(cls, dataset="mnist", model="mlp", torch=False, **overrides):
        """The authors' recipe for ``dataset`` and ``model`` (``RECIPES``), in its Torch7
        variant when ``torch``; ``overrides`` (options the user set) win."""
        if (dataset, model) not in RECIPES:
            raise ValueError(f"no recipe for dataset {dataset!r} with model {model!r}; known: "
                             f"{sorted(RECIPES)}")
        kw = dict(RECIPES[(dataset, model)], dataset=dataset, model=model)
        if torch:
            kw.update(TORCH_VARIANT)
        kw.update(overrides)
        return cls(**kw)

    def validate(self):
        """Check every option; ConfigError (a ValueError) names the first one at fault.

        Sizes are integers in range, rates finite and positive, probabilities in range; a
        batch needs two images (batch norm has no batch variance on one); an MLP whose
        parameters would not fit in this machine's memory is refused with what it needs.
        """
        for kind, name in (("optimizer", self.optimizer), ("loss", self.loss),
                           ("schedule", self.schedule), ("bn", self.bn)):
            registry.lookup(kind, name)  # ValueError listing the choices
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        registry.lookup("arch", self.arch)
        for name in ("hidden", "layers", "epochs", "halve_every"):
            _check_option(self, name, int, 1)
        _check_option(self, "batch_size", int, 2,
                      why="batch norm needs two or more images per batch (one image has no "
                          "batch variance)")
        _check_option(self, "seed", int, 0)
        _check_option(self, "bn_recompute", int, 0)
        if self.bn_recompute == 1:
            raise ConfigError("bn_recompute", "must be 0 (off) or >= 2 images, got 1: one "
                                              "image has no batch variance")
        if self.train_limit is not None:
            _check_option(self, "train_limit", int, 2)
        for name in ("lr_start", "lr_end"):
            _check_option(self, name, float, 0.0, open_low=True)
        for name in ("dropout_in", "dropout_hidden"):
            _check_option(self, name, float, 0.0, 1.0)
        _check_option(self, "bn_momentum", float, 0.0, open_low=True)
        if self.bn_momentum > 1.0:
            raise ConfigError("bn_momentum", f"must be in (0, 1], got {self.bn_momentum}")
        if self.dataset != "mnist" and self.data_dir is None:
            raise ValueError(_WHERE_TO_GET[self.dataset])
        if self.zca and self.dataset == "mnist":
            raise ValueError("zca: ZCA whitening is for the colour data sets (cifar10, svhn)")
        if self.val_size is not None:
            if self.dataset == "svhn":
                raise ValueError("val_size: SVHN's validation set is the authors' class-balanced "
                                 "draw (400 images per class from train, 200 from extra); "
                                 "--val-size applies to mnist and cifar10")
            if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) \
                    or self.val_size < 1:
                raise ValueError(f"val_size must be an integer >= 1, got {self.val_size!r}")
        self._check_memory()
        return self

    def _check_memory(self):
        """Refuse an MLP whose training state (``_BYTES_PER_PARAMETER`` bytes a parameter)
        exceeds the machine's physical memory: it would fail with a MemoryError deep in
        NumPy, or swap the machine to a halt."""
        if self.model != "mlp":
            return  # the ConvNets' sizes are fixed by their recipes
        shape, classes = DATASETS[self.dataset]
        shape = self.input_shape or shape
        classes = self.classes or classes
        n_in = int(np.prod(shape))
        n = n_in * self.hidden + (self.layers - 1) * self.hidden ** 2 + self.hidden * classes
        need = n * _BYTES_PER_PARAMETER
        have = _physical_memory()
        if have is not None and need > have:
            raise ConfigError("hidden", f"{self.hidden}: {self.layers} x {self.hidden} units "
                                        f"make {n:,} parameters, which need about "
                                        f"{_size(need)} to train "
                                        f"({_BYTES_PER_PARAMETER} bytes each: weights, "
                                        "gradients, optimizer moments, checkpoint copies); "
                                        f"this machine has {_size(have)}")

    def fit_data(self, input_shape, classes):
        """This config with ``input_shape`` (one input as the model takes it: (C, H, W) for a
        ConvNet, (features,) for an MLP) and ``classes`` of the data filled in; ValueError
        when the config already names others (a run resumed on other data)."""
        shape = tuple(int(v) for v in input_shape)
        for name, stored, found in (("input_shape", self.input_shape, shape),
                                    ("classes", self.classes, int(classes))):
            if stored is not None and (tuple(stored) if name == "input_shape"
                                       else stored) != found:
                raise ValueError(f"{name}: the run was built for {stored} but the data in "
                                 f"{self.data_dir or 'the shipped MNIST'} gives {found}")
        return dataclasses.replace(self, input_shape=shape, classes=int(classes))

    @property
    def arch(self):
        """The architecture's name in the registry: an MLP, or the data set's ConvNet."""
        return "mnist_mlp" if self.model == "mlp" else f"{self.dataset}_convnet"

    def schedule_fn(self):
        """The learning rate per epoch, from ``schedule``'s entry in the registry."""
        make = registry.lookup("schedule", self.schedule)
        if self.schedule == "exp":
            return make(self.lr_start, self.lr_end, self.epochs)
        return make(self.lr_start, self.halve_every)

    def model_config(self):
        """The keyword arguments of the architecture's recipe (``models.build`` takes it)."""
        shape, classes = DATASETS[self.dataset]
        shape = tuple(self.input_shape) if self.input_shape else shape
        classes = self.classes or classes
        common = dict(arch=self.arch, bn=self.bn, stochastic=self.stochastic)
        if self.bn_momentum != 0.1:  # recorded only when it differs from the recipes' default
            common["momentum"] = self.bn_momentum
        if classes != 10:  # every recipe's default
            common["classes"] = int(classes)
        if self.model == "mlp":
            config = dict(common, hidden=self.hidden, layers=self.layers,
                          dropout_in=self.dropout_in, dropout_hidden=self.dropout_hidden)
            if int(np.prod(shape)) != 784 or self.dataset != "mnist":  # mnist_mlp's default
                config["in_features"] = int(np.prod(shape))
            return config
        if self.arch != "mnist_convnet":
            if shape != DATASETS[self.dataset][0]:
                raise ValueError(f"input_shape: the paper's {self.dataset} ConvNet takes images "
                                 f"of shape {DATASETS[self.dataset][0]}, the data holds {shape}")
            return common
        if shape != DATASETS["mnist"][0]:
            if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 4:
                raise ValueError(f"input_shape: the MNIST ConvNet takes square images whose side "
                                 f"is a multiple of 4 (two 2x2 max-pools), the data holds "
                                 f"{shape}")
            common.update(in_channels=shape[0], image_size=shape[1])
        return common

    @property
    def eval_batch_size(self):
        """Images per evaluation batch: a ConvNet's activations are far larger."""
        return 1000 if self.model == "mlp" else 100


# --- evaluation ------------------------------------------------------------------------------

def predict(model, x, batch_size=1000, bar=None):
    """Class predictions for float inputs ``x`` (NumPy, in [-1, 1]) in eval mode, no tape;
    ``bar`` (a tqdm bar, optional) advances by each batch's images."""
    was_training = model.training
    model.eval()
    out = []
    with no_grad():
        for i in range(0, len(x), batch_size):
            scores = model(Tensor(backend.asarray(x[i:i + batch_size])))
            out.append(backend.to_numpy(scores.data.argmax(axis=1)))
            if bar is not None:
                bar.update(len(out[-1]))
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def error_rate(model, x, y, batch_size=1000, bar=None, dp=None):
    """Fraction of ``x`` misclassified; with ``dp`` (a ``distributed.DataParallel``) each
    rank scores its block of the rows and the counts are added over the ranks (``bar``
    then advances by rank 0's block)."""
    if dp is None:
        return float(np.mean(predict(model, x, batch_size, bar) != y))
    lo, hi = dp.comm.block(len(x))
    wrong = int((predict(model, x[lo:hi], batch_size, bar) != y[lo:hi]).sum())
    return dp.comm.sum_values(wrong)[0] / len(x)


# --- data ----------------------------------------------------------------------------------

def load_dataset(cfg, training=True):
    """The uint8 data set ``cfg`` names, from ``cfg.data_dir``; SVHN with its extra set
    when ``training`` (the authors trained on train + extra), without it to score a model."""
    if cfg.dataset == "mnist":
        return data.load_mnist(cfg.data_dir)
    if cfg.dataset == "cifar10":
        return data.load_cifar10(cfg.data_dir)
    return data.load_svhn(cfg.data_dir, extra=training)


def _data_name(cfg):
    """How messages name the data of ``cfg``: its folder, or MNIST's shipped copy."""
    return (f"{cfg.dataset} data in {cfg.data_dir}" if cfg.data_dir is not None
            else f"the shipped {cfg.dataset} copy")


def check_images(ds, cfg):
    """DatasetError unless the training and test images of ``ds`` are there and of one
    size (a run takes its input size from the data: ``TrainConfig.fit_data``)."""
    sizes = {}
    for split, images in (("training", ds.train_images), ("test", ds.test_images)):
        sizes[split] = tuple(images.shape[1:])
        if len(images) == 0:
            raise data.DatasetError(f"{_data_name(cfg)}: the {split} split holds no images")
    if sizes["training"] != sizes["test"]:
        raise data.DatasetError(
            f"{_data_name(cfg)}: the training images are {'x'.join(map(str, sizes['training']))}"
            f" but the test images {'x'.join(map(str, sizes['test']))}")


def data_record(cfg, tx, ty, vx, vy, sx, sy):
    """What a run trained and is scored on, stored in its checkpoint and model file so it
    can be evaluated on its own data: data set, absolute data folder (None: the shipped
    MNIST), model, split sizes, and checksums of the labels and of the test split."""
    labels = hashlib.sha256()
    for y in (ty, vy):
        labels.update(np.ascontiguousarray(y, np.int64).tobytes())
    return dict(dataset=cfg.dataset, data_dir=cfg.data_dir, model=cfg.model,
                split=dict(train=len(ty), valid=len(vy), test=len(sy),
                           train_limit=cfg.train_limit),
                labels_sha256=labels.hexdigest(), test_sha256=split_checksum(sx, sy, cfg))


def split_checksum(sx, sy, cfg):
    """sha256 of the prepared test split: the same only for the same data, prepared the
    same way. ZCA-whitened images depend on the BLAS that whitened them, so with ``zca``
    only the labels and the images' shape are hashed."""
    h = hashlib.sha256(np.ascontiguousarray(sy, np.int64).tobytes())
    h.update(repr(tuple(sx.shape)).encode())
    if not cfg.zca:
        h.update(np.ascontiguousarray(sx).tobytes())
    return h.hexdigest()


def prepare_data(cfg):
    """(train_x, train_y, valid_x, valid_y, test_x, test_y): images scaled to [-1, 1] as
    float32 (flattened for an MLP, (n, C, H, W) for a ConvNet), labels int64.

    The authors' splits: MNIST 50k / 10k, CIFAR-10 45k / 5k (``data.load_cifar10``), SVHN as
    ``data.split_svhn``; ``cfg.val_size`` sets another validation size (MNIST, CIFAR-10).
    Images keep the data's own size (``cfg.fit_data`` records it in the run). With
    ``cfg.zca`` the images are ZCA-whitened by a transform fitted on the training split only.
    """
    ds = load_dataset(cfg)
    check_images(ds, cfg)
    tx, ty, vx, vy = split_dataset(cfg, ds)
    # the training labels define the classes (unless the run recorded them); a validation
    # or test label outside them would silently count as an error, so it is refused
    classes = cfg.classes if cfg.classes is not None else classes_in(ty)
    where = _data_name(cfg)
    for split, labels in (("training", ty), ("validation", vy), ("test", ds.test_labels)):
        data.check_labels(labels, classes, f"{where}, {split} split")
    image = ds.train_images.shape[1:]
    out_shape = (-1, int(np.prod(image))) if cfg.model == "mlp" else (-1,) + (
        (1,) + image if len(image) == 2 else image)

    def scale(images):
        return data.to_pm1(images).reshape(out_shape)

    tx, vx, sx = scale(tx), scale(vx), scale(ds.test_images)
    if cfg.zca:
        zca = data.ZCA.fit(tx.reshape(len(tx), -1))
        tx, vx, sx = (zca.transform(x.reshape(len(x), -1)).reshape(out_shape)
                      for x in (tx, vx, sx))
    return (tx, ty.astype(np.int64), vx, vy.astype(np.int64), sx,
            ds.test_labels.astype(np.int64))


def split_dataset(cfg, ds):
    """(train_x, train_y, valid_x, valid_y) of the loaded data set ``ds`` as ``cfg`` splits
    it (``prepare_data``), still uint8 images: ``cfg.val_size`` validation images (default:
    the data set's split), the first ``cfg.train_limit`` training images when set."""
    if cfg.dataset == "svhn":
        tx, ty, vx, vy = data.split_svhn(ds)
    else:
        split = data.split_train_valid if cfg.dataset == "mnist" else data.split_cifar10
        size = () if cfg.val_size is None else (cfg.val_size,)  # default: the split's own
        try:
            tx, ty, vx, vy = split(ds.train_images, ds.train_labels, *size)
        except ValueError as exc:
            raise ValueError(f"val_size: the {len(ds.train_images)} training images cannot "
                             f"give a validation split of that size and keep one to train on "
                             f"({exc}); pass a smaller --val-size") from exc
    if cfg.train_limit is not None:
        tx, ty = tx[:cfg.train_limit], ty[:cfg.train_limit]
    return tx, ty, vx, vy


def _classes(cfg, splits):
    """The number of classes of a run: its recorded one, else what its training labels name
    (the validation and test labels must then fit: ``prepare_data`` checks them)."""
    return cfg.classes if cfg.classes is not None else classes_in(splits[1])


def classes_in(*labels):
    """The number of classes that label arrays name: 1 + the largest label (at least 2)."""
    largest = max((int(y.max()) for y in labels if len(y)), default=-1)
    if largest < 1:
        raise ValueError(f"labels: the training data name {largest + 1} class(es) (largest "
                         f"label {largest}); a classifier needs at least two")
    return largest + 1


# --- the loop ------------------------------------------------------------------------------

def train_step(model, opt, loss_fn, x, y, dp=None):
    """One mini-batch of the paper's Algorithm 1 (arXiv:1602.02830); returns (loss, scores).

    1.1 forward:  every BinaryLinear binarizes its latent weights, W_b = sign(W), and
                  multiplies (XNOR-popcount where its input is binary); every Sign after a
                  batch norm binarizes the activations, a_b = sign(a).
    1.2 backward: the loss's gradient flows back; through Sign the straight-through
                  estimator g_a = g_ab * 1{|a| <= 1}; the binary weight's gradient goes to
                  the latent W unchanged.
    2.  update:   the optimizer steps every parameter (a binary layer's step scaled by its
                  Glorot ``lr_scale``) and clips the latent weights to [-1, 1].
    The learning-rate decay of Algorithm 1's last line happens once per epoch (``train``).
    With ``dp`` (``distributed.DataParallel``), ``x`` and ``y`` are this rank's shard: its
    loss is weighted by the shard's share of the batch and the gradients are added over the
    ranks before the update, which every rank then takes alike.
    """
    scores = model(Tensor(x))         # 1.1
    loss = loss_fn(scores, y)
    opt.zero_grad()
    if dp is None:
        loss.backward()               # 1.2
    else:                             # 1.2, and the gradients added over the ranks
        dp.backward(loss)
    opt.step()                        # 2.
    return loss, scores


def recompute_bn_statistics(model, x, batch_size, dp=None):
    """Set every batch norm's running mean and variance to the average of its batch
    statistics over ``x`` (in batches of ``batch_size``), computed with the current weights.

    Not in the paper: the running averages (momentum 0.1) mix statistics of weights from
    many steps back, and a BNN's first layers can change fast enough for that to matter
    in eval. Only the batch norms run in training mode; everything else (dropout,
    stochastic binarization) runs in eval mode, so no random number is drawn and the
    training run is unchanged apart from these statistics. With ``dp`` each rank feeds its
    block of every batch and the (synchronised) batch norms see the whole batch.
    """
    from . import nn
    norms = [m for m in model.modules() if isinstance(m, nn._BatchNormBase)]
    was_training, momenta = model.training, [b.momentum for b in norms]
    model.eval()
    for b in norms:
        b.training = True
    try:
        with no_grad():
            for k, idx in enumerate(data.batches(len(x), batch_size)):  # never a batch of one
                for b in norms:  # running = mean of the batches seen so far
                    b.momentum = 1.0 / (k + 1)
                xb = x[idx]
                if dp is not None:
                    xb = xb[slice(*dp.comm.block(len(xb)))]
                model(Tensor(backend.asarray(xb)))
    finally:
        for b, m in zip(norms, momenta):
            b.momentum = m
        model.train(was_training)


class TrainingDiverged(ValueError):
    """The training loss or the weights became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: ``run_dir`` is the run's folder, ``epoch`` the epoch of its
    last checkpoint (0: none was written, and a new run's folder was removed)."""

    def __init__(self, run_dir, epoch):
        super().__init__(f"interrupted: {run_dir} after epoch {epoch}")
        self.run_dir, self.epoch = run_dir, epoch


#: batches between two reads of the training loss and error count on the host, per backend.
#: Each read waits for the device, so on the GPU they are summed there and read this often
#: (a non-finite loss is then reported within that many batches); on the CPU a read is free.
HOST_READ_EVERY = {"cupy": 50}


def train_epoch(model, opt, loss_fn, x, y, batch_size, rng, bar=None, dp=None, read_every=None,
                step=None):
    """One pass over (x, y) in mini-batches shuffled by ``rng``; returns
    (mean loss, training error, images seen).

    ``data.batches`` never yields a trailing batch of one (it joins the batch before it),
    which batch norm could not train on. A NaN or infinite loss stops the pass with
    TrainingDiverged: every step after it would only spread NaN through the weights. With
    ``dp`` every rank draws the same permutation, trains on its shard of each batch, and
    the sums are added over the ranks at the end (the progress bar shows rank 0's shards).

    The loss (in float64) and the error count are summed where the arrays live and read on
    the host every ``read_every`` batches (default ``HOST_READ_EVERY`` of the backend, else
    every batch) and after the last: the sums, and so the result, do not depend on it.

    On the GPU a step waits for nothing: the data set is copied to the device once per call
    and each batch is gathered there (one index upload per epoch, not two copies per step);
    the labels are range-checked once, on the whole of ``y``, instead of by the loss at every
    step (``losses.labels_checked``); and the binary layers' NaN checks are read with the
    loss (``binary.deferred_nan_checks``), so a NaN is still caught within one read.
    ``step`` (a ``graphs.GraphedStep`` of the same model and optimizer) replaces
    ``train_step``: the same step, replayed as one CUDA graph.
    """
    from . import binary, losses
    model.train()
    read_every = int(read_every or HOST_READ_EVERY.get(backend.active(), 1))
    loss_sum, wrong, seen = 0.0, 0, 0
    pending = dict(loss=None, wrong=None, first=1)  # device sums since the last read

    def where(last):
        return (f"batch {last}" if pending["first"] == last
                else f"batches {pending['first']} to {last}")

    def read(last):
        nonlocal loss_sum, wrong
        if pending["loss"] is None:
            return
        try:
            binary.raise_deferred_nan()
        except ValueError as exc:
            raise TrainingDiverged(f"{exc}, in {where(last)} "
                                   f"(learning rate {opt.lr:.3g})") from None
        value = float(pending["loss"])
        if not math.isfinite(value):
            raise TrainingDiverged(f"the training loss became {value} in {where(last)} "
                                   f"(learning rate {opt.lr:.3g})")
        loss_sum += value
        wrong += int(pending["wrong"])
        pending.update(loss=None, wrong=None, first=last + 1)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{1 - wrong / seen:.4f}",
                            refresh=False)  # tqdm itself shows images/s

    order = list(data.batches(len(x), batch_size, rng=rng))
    on_device = backend.active() == "cupy" and dp is None and len(order) > 0
    if on_device:  # the data and this epoch's order on the GPU, once
        xs, ys = backend.asarray(x), backend.asarray(y)
        flat = backend.asarray(np.concatenate(order))
        ends = np.cumsum([len(batch) for batch in order])
    checked = contextlib.ExitStack()
    b = 0
    with checked:
        checked.enter_context(binary.deferred_nan_checks())
        for b, batch in enumerate(order, start=1):
            if on_device:
                idx = flat[ends[b - 1] - len(batch):ends[b - 1]]
                xb, yb = xs[idx], ys[idx]
            else:
                idx = batch if dp is None else dp.shard(batch)
                xb, yb = backend.asarray(x[idx]), backend.asarray(y[idx])
            if step is None:
                loss, scores = train_step(model, opt, loss_fn, xb, yb, dp)
            else:
                loss, scores = step(xb, yb)
            if b == 1:  # the loss checked this batch's labels; now all of them, once
                losses.check_label_range(y, scores.shape[1])
                checked.enter_context(losses.labels_checked())
            _accumulate(pending, loss, scores, yb, len(idx))
            seen += len(idx)
            if bar is not None:
                bar.update(len(batch))
            if b % read_every == 0:
                read(b)
        read(b)
    if dp is not None:
        loss_sum, wrong, seen = dp.comm.sum_values(loss_sum, wrong, seen)
        wrong, seen = int(wrong), int(seen)
    return loss_sum / max(seen, 1), wrong / max(seen, 1), seen


def _accumulate(pending, loss, scores, yb, count):
    """Add one step's loss (float64, times its batch size) and error count to the device
    sums in ``pending``."""
    step_loss = loss.data.astype(np.float64) * count
    step_wrong = (scores.data.argmax(axis=1) != yb).sum()
    pending["loss"] = step_loss if pending["loss"] is None else pending["loss"] + step_loss
    pending["wrong"] = step_wrong if pending["wrong"] is None else pending["wrong"] + step_wrong


def _progress(total, desc, enabled):
    """A tqdm bar on stderr counting images, or None when ``enabled`` is false (no bar is
    drawn into a log: the command line enables it only on a terminal) or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)


class _Run:
    """What a run carries from epoch to epoch: model, optimizer, generator, history, best."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.model = models.build(cfg.model_config(), rng=self.rng)
        self.loss_fn = registry.lookup("loss", cfg.loss)
        self.opt = registry.lookup("optimizer", cfg.optimizer)(self.model.parameters(),
                                                               lr=cfg.lr_start)
        self.schedule = cfg.schedule_fn()
        self.history, self.epoch = [], 0
        self.best = dict(epoch=-1, valid=float("inf"), state=self.model.state_dict())

    def restore(self, ck, path):
        """Continue from the checkpoint ``ck`` (read from ``path``); a checkpoint that does
        not fit this run's model or optimizer is a ValueError naming ``path``."""
        meta = ck["meta"]
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(dict(t=meta["optim_t"], lr=meta["optim_lr"],
                                          state=ck["optim"]))
            self.rng.bit_generator.state = meta["rng"]
            best_model = models.build(self.cfg.model_config(), rng=np.random.default_rng(0))
            best_model.load_state_dict(ck["best"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: damaged checkpoint: {exc}") from None
        self.history, self.epoch = meta["history"], meta["epoch"]
        self.best = dict(epoch=meta["best_epoch"], valid=meta["best_valid"], state=ck["best"])

    def save(self, run_dir, record, ranks=1, writer=None):
        """Checkpoint the run; with ``writer`` (a ``runs.CheckpointWriter``) the state is
        copied now and written in the background."""
        save = runs.save_checkpoint if writer is None else writer.submit
        save(run_dir, dataclasses.asdict(self.cfg), self.epoch, self.model, self.opt, self.rng,
             self.history, self.best, record, ranks=ranks)


def _on_root(comm, fn):
    """``fn()`` here, or on rank 0 only with its result or error handed to every rank."""
    return fn() if comm is None else comm.root_call(fn)


@contextlib.contextmanager
def _claimed(comm, run_dir, **kw):
    """``runs.claim(run_dir, **kw)`` on rank 0 (every rank of a distributed run gets its
    folder, or its error); the folder is locked by rank 0 alone, which alone writes it."""
    if comm is None:
        with runs.claim(run_dir, **kw) as folder:
            yield folder
        return
    held = {}

    def enter():
        held["cm"] = runs.claim(run_dir, **kw)
        return str(held["cm"].__enter__())

    folder = Path(_on_root(comm, enter))
    try:
        yield folder
    except BaseException:
        if "cm" in held:
            held["cm"].__exit__(*sys.exc_info())  # removes a new run's folder if unsaved
        raise
    else:
        if "cm" in held:
            held["cm"].__exit__(None, None, None)


#: the options that a resumed run may change (``resume_config``)
RESUMABLE = ("epochs",)


def resume_config(stored, **given):
    """The TrainConfig of a run resumed with the options ``given`` (None: not given).

    A run continues with its own options: giving another value for any of them is a
    ConfigError naming each, except ``epochs``, which may extend (or shorten) the run, and
    ``data_dir``, which may point at the same data moved elsewhere (``train`` checks that
    it is the same data). Giving an option its stored value is accepted.
    """
    cfg = stored if isinstance(stored, TrainConfig) else TrainConfig(**stored)
    changes, differ = {}, []
    for name, value in given.items():
        if value is None:
            continue
        if name == "data_dir":
            value = str(Path(value).expanduser().resolve())
        if name in RESUMABLE or name == "data_dir":
            changes[name] = value
        elif value != getattr(cfg, name):
            differ.append(f"--{name.replace('_', '-')} (the run has {getattr(cfg, name)!r}, "
                          f"given {value!r})")
    if differ:
        raise ConfigError("resume", "continues a run with the options it started with; "
                                    "these cannot change: " + ", ".join(differ))
    return dataclasses.replace(cfg, **changes)


def _schedule_note(cfg, done, old_epochs):
    """What happens to the learning rate when a run's length changes on resume."""
    if cfg.schedule == "halve":
        return (f"epochs {old_epochs} -> {cfg.epochs}: the halving schedule does not depend "
                "on the length, so this run ends where one trained "
                f"{cfg.epochs} epochs from the start would")
    return (f"epochs {old_epochs} -> {cfg.epochs}: the exponential schedule is re-planned "
            f"over {cfg.epochs} epochs: epochs {done + 1}..{cfg.epochs} run at its rates "
            f"(the last at lr_end {cfg.lr_end:g}), the {done} done ran at the "
            f"{old_epochs}-epoch schedule's, so the result differs from a run trained "
            f"{cfg.epochs} epochs from the start")


def graphed_step(model, opt, loss_fn, comm=None, enabled=None, log=print):
    """A ``graphs.GraphedStep`` for training on the GPU, or None where the step cannot be
    captured (logged with the reason) or the graph is turned off. ``enabled`` None reads
    ``MINIBNN_CUDA_GRAPH`` (on unless "0"); off on every backend but cupy and in
    data-parallel runs. The normal case, a graph, logs nothing: the log stays the same on
    every backend."""
    if backend.active() != "cupy":
        return None
    if enabled is None:
        enabled = os.environ.get("MINIBNN_CUDA_GRAPH", "1").strip() not in ("0", "false", "no")
    if not enabled:  # the user's choice: nothing to report
        return None
    if comm is not None:
        log("CUDA graph: off (data-parallel run)")
        return None
    from . import graphs
    why = graphs.unsupported(model, opt)
    if why is not None:
        log(f"CUDA graph: off ({why})")
        return None
    return graphs.GraphedStep(model, opt, loss_fn)


def train(cfg=None, run_dir=None, resume=False, progress=True, stop_after=None, log=print,
          comm=None, cuda_graph=None, checkpoint_every=1, **resume_options):
    """Train (or, with ``resume=True``, continue training) the run in ``run_dir``.

    Each epoch: set the learning rate from the schedule, one pass of ``train_step`` over
    the shuffled training set, validation and test error, an atomic checkpoint. At the end,
    ``runs.write_results`` keeps the best validation epoch. ``stop_after`` ends this call
    after that many epochs (the run stays resumable); it exists for tests and for training
    in slices. Returns the metrics dict.

    ``checkpoint_every`` (a positive int, default 1): write the checkpoint only after every
    that many epochs and after the last epoch of the call; the best epoch's weights are
    kept in memory in between, so results are the same, but a run stopped between
    checkpoints resumes from the last one written. (The paper's 3 x 4096 MLP writes 590 MB
    per checkpoint, longer than a GPU epoch takes.) Each history entry's ``wall_seconds`` is
    the time since the previous entry: training, evaluation and the checkpoint hand-off.

    A new run validates its options and loads its data before it creates its folder
    (``run_dir``, or a fresh ``runs/DATASET-MODEL-YYYYmmdd-HHMMSS`` when None), so a bad
    start leaves nothing behind. The folder is locked while training (``runs.claim``). A
    relative ``data_dir`` is stored as an absolute path. With ``resume``, options in
    ``resume_options`` are checked by ``resume_config``; ``epochs`` may change the length.

    ``comm`` (a ``distributed.Communicator``) trains data-parallel over its ranks, each
    started with the same arguments: every global batch is split across the ranks
    (``distributed.DataParallel``), evaluation is sharded and reduced, and rank 0 alone
    claims, reads and writes the run folder and logs.

    On the GPU the training step runs as one CUDA graph (``graphed_step``; the same floats
    as the eager step) unless ``cuda_graph=False`` or ``MINIBNN_CUDA_GRAPH=0``.

    Raises TrainingDiverged when the loss or the weights become NaN or infinite (the last
    good checkpoint stays, no model.npz is written) and TrainingInterrupted on Ctrl-C.
    """
    if resume_options and not resume:
        raise TypeError(f"train: {sorted(resume_options)} are for resume=True; a new run takes "
                        "its options in cfg")
    if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer))
            or checkpoint_every < 1):
        raise ConfigError("checkpoint_every", f"expected a positive number of epochs, got "
                                              f"{checkpoint_every!r}")
    if comm is not None and comm.rank != 0:
        log, progress = (lambda *_: None), False
    if resume:
        if run_dir is None:
            raise ValueError("resume needs run_dir, the folder of the run to continue")
        with _claimed(comm, run_dir, resume=True) as run_dir:
            path = run_dir / runs.CHECKPOINT
            ck = _on_root(comm, lambda: runs.read_checkpoint(run_dir))
            cfg = resume_config(stored_config(ck["meta"]["config"], path), **resume_options)
            cfg.validate()
            done, old_epochs = ck["meta"]["epoch"], ck["meta"]["config"]["epochs"]
            if cfg.epochs < done:
                raise ConfigError("epochs", f"{cfg.epochs} is fewer than the {done} epochs "
                                            f"{run_dir} has already trained")
            if comm is not None:
                comm.check_same(dataclasses.asdict(cfg), "the training configuration")
            splits = prepare_data(cfg)
            cfg = cfg.fit_data(splits[0].shape[1:], _classes(cfg, splits))
            check_same_data(ck["meta"].get("data"), *splits[4:], cfg, run_dir)
            run = _Run(cfg)
            run.restore(ck, path)
            log(f"resuming {run_dir} after epoch {run.epoch}/{cfg.epochs}")
            if cfg.epochs != old_epochs:
                log(_schedule_note(cfg, done, old_epochs))
            ranks = 1 if comm is None else comm.size
            if ck["meta"].get("ranks", 1) != ranks:
                log(f"note: this run was trained on {ck['meta'].get('ranks', 1)} rank(s) and "
                    f"resumes on {ranks}: it follows the same sequence up to float rounding, "
                    "not bit for bit")
            return _train_epochs(run, run_dir, splits, progress, stop_after, log, comm, cuda_graph,
                                 checkpoint_every)
    cfg = cfg or TrainConfig()
    if cfg.data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(Path(cfg.data_dir).expanduser().resolve()))
    cfg.validate()
    if comm is not None:
        comm.check_same(dataclasses.asdict(cfg), "the training configuration")
    splits = prepare_data(cfg)
    cfg = cfg.fit_data(splits[0].shape[1:], _classes(cfg, splits))
    run = _Run(cfg)
    with _claimed(comm, run_dir, stem=f"{cfg.dataset}-{cfg.model}") as run_dir:
        log(f"run folder {run_dir}")
        return _train_epochs(run, run_dir, splits, progress, stop_after, log, comm, cuda_graph,
                             checkpoint_every)


def _train_epochs(run, run_dir, splits, progress, stop_after, log, comm=None, cuda_graph=None,
                  checkpoint_every=1):
    """The epochs of ``train``, from ``run.epoch`` on, in the claimed folder ``run_dir``."""
    cfg = run.cfg
    tx, ty, vx, vy, sx, sy = splits
    record = data_record(cfg, *splits)
    saved = run.epoch  # a new run starts at 0 (nothing saved), a resumed one at its checkpoint
    end = cfg.epochs if stop_after is None else min(cfg.epochs, run.epoch + stop_after)
    dp = None if comm is None else distributed.DataParallel(run.model, comm)
    if dp is not None:
        dp.check_batches(len(tx), cfg.batch_size)
        dp.check_batches(min(cfg.bn_recompute, len(tx)), cfg.eval_batch_size,
                         "bn_recompute's batch of", "bn_recompute")
    ranks = 1 if comm is None else comm.size
    step = graphed_step(run.model, run.opt, run.loss_fn, comm, cuda_graph, log)
    writer = runs.CheckpointWriter(saved)  # each checkpoint is written while the next epoch trains
    mark = time.perf_counter()  # each epoch's wall_seconds runs from the previous record
    try:
        while run.epoch < end:
            run.opt.lr = run.schedule(run.epoch)
            bar = _progress(len(tx), f"epoch {run.epoch + 1}/{cfg.epochs}", progress)
            t0 = time.perf_counter()
            try:
                loss, train_err, seen = train_epoch(run.model, run.opt, run.loss_fn, tx, ty,
                                                    cfg.batch_size, run.rng, bar, dp, step=step)
                if step is not None and step.reason is not None and not step.reported:
                    log(f"CUDA graph: capture failed, training eagerly ({step.reason})")
                    step.reported = True
            finally:
                if bar is not None:
                    bar.close()
            seconds = time.perf_counter() - t0
            state = run.model.state_dict()
            bad = [k for k, v in state.items() if not np.isfinite(v).all()]
            if bad:
                raise TrainingDiverged(f"the weights {bad[:3]} hold NaN or infinity")
            if cfg.bn_recompute:
                recompute_bn_statistics(run.model, tx[:cfg.bn_recompute], cfg.eval_batch_size,
                                        dp)
            if dp is not None:
                dp.check_replicas()
            bar = _progress(len(vx) + len(sx), f"epoch {run.epoch + 1}/{cfg.epochs} evaluating",
                            progress)
            try:
                valid_err = error_rate(run.model, vx, vy, cfg.eval_batch_size, bar, dp)
                test_err = error_rate(run.model, sx, sy, cfg.eval_batch_size, bar, dp)
            finally:
                if bar is not None:
                    bar.close()
            run.epoch += 1
            now = time.perf_counter()
            wall, mark = now - mark, now
            run.history.append(dict(epoch=run.epoch, lr=run.opt.lr, train_loss=loss,
                                    train_error=train_err, valid_error=valid_err,
                                    test_error=test_err, seconds=seconds,
                                    images_per_second=seen / seconds, wall_seconds=wall))
            if valid_err < run.best["valid"]:
                run.best = dict(epoch=run.epoch, valid=valid_err, state=run.model.state_dict())
            if run.epoch % checkpoint_every == 0 or run.epoch == end:
                _on_root(comm, lambda: run.save(run_dir, record, ranks, writer))
                saved = run.epoch  # submitted; on disk once writer.wait() returns
            log(f"epoch {run.epoch:3d}/{cfg.epochs}  lr {run.opt.lr:.2e}  loss {loss:.4f}  "
                f"train error {100 * train_err:5.2f}%  valid error {100 * valid_err:5.2f}%  "
                f"test error {100 * test_err:5.2f}%  {seconds:6.1f}s  {seen / seconds:,.0f} img/s"
                + ("" if saved == run.epoch else "  (no checkpoint)"))
        _on_root(comm, writer.wait)  # the last checkpoint is on disk before the run reports
        if end < cfg.epochs:
            return dict(config=dataclasses.asdict(cfg), history=run.history, finished=False,
                        run_dir=str(run_dir))
        metrics = _on_root(comm, lambda: finish(run_dir, cfg, run.history, run.best, log,
                                                record))
        return dict(metrics, run_dir=str(run_dir))
    except TrainingDiverged as exc:
        saved = min(saved, writer.settle()) if comm is None or comm.rank == 0 else saved
        kept = (f"the last good checkpoint (epoch {saved}) is kept in {run_dir}" if saved
                else "nothing was saved")
        raise TrainingDiverged(f"epoch {run.epoch + 1}: {exc}; training stopped and "
                               f"{kept}; try a smaller --lr-start") from None
    except KeyboardInterrupt:
        if comm is None or comm.rank == 0:
            saved = min(saved, writer.settle())
        raise TrainingInterrupted(run_dir, saved) from None
    finally:
        writer.settle()  # no write outlives this call (the caller may remove the folder)
        if dp is not None:
            dp.close()


def stored_config(config, path):
    """The TrainConfig stored in a checkpoint or model file at ``path``; ValueError naming
    the file when the stored options are not TrainConfig's."""
    try:
        return TrainConfig(**config)
    except TypeError as exc:
        raise ValueError(f"{path}: damaged run options ({exc})") from None


def check_same_data(record, sx, sy, cfg, source):
    """ValueError unless the prepared test split (sx, sy) is the one ``record`` (a
    ``data_record``) was made from: the data folder changed since the run trained."""
    if record is not None and record.get("test_sha256") not in (None,
                                                                split_checksum(sx, sy, cfg)):
        raise ValueError(f"{_data_name(cfg)} is not the data {source} was trained and scored "
                         "on (its test split's checksum differs); pass --data-dir (and "
                         "--dataset) to score it on other data anyway")


def finish(run_dir, cfg, history, best, log=print, data=None):
    """Write model.npz (best validation epoch), metrics.json and curves.png; return metrics.
    ``data`` (``data_record``) is stored in both, so the model can be scored on its own data."""
    return runs.write_results(run_dir, dataclasses.asdict(cfg), cfg.model_config(), history,
                              best, log, data)
