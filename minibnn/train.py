"""The training loop, to be read beside the paper's Algorithm 1 (arXiv:1602.02830).

``train_step`` is one mini-batch of Algorithm 1 (forward with binarization, backward with
the straight-through estimator, update with clipping); ``train_epoch`` one pass over the
data; ``train`` the epochs, with the learning-rate schedule, evaluation, and a checkpoint
after every epoch (``runs``: what a run folder holds, so that a resumed run ends exactly
where an uninterrupted one would).
"""

from __future__ import annotations

import dataclasses
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
    # and the final weights; so this recipe recomputes them before every evaluation
    ("mnist", "convnet"): dict(epochs=10, batch_size=100, lr_start=3e-3, lr_end=3e-5,
                               bn_recompute=10000),
    # the Theano code's cifar10.py: batch 50, Adam, LR 1e-3 -> 3e-7 over 500 epochs
    ("cifar10", "convnet"): dict(epochs=500, batch_size=50, lr_start=1e-3, lr_end=3e-7),
    # the Theano code's svhn.py: batch 50, Adam, LR 1e-3 -> 1e-6 over 200 epochs
    ("svhn", "convnet"): dict(epochs=200, batch_size=50, lr_start=1e-3, lr_end=1e-6),
}
#: the Torch7 variant of a recipe: shift-based AdaMax and shift-based batch norm
TORCH_VARIANT = dict(optimizer="shift-adamax", bn="shift")


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
        for kind, name in (("optimizer", self.optimizer), ("loss", self.loss),
                           ("schedule", self.schedule), ("bn", self.bn)):
            registry.lookup(kind, name)  # ValueError listing the choices
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        registry.lookup("arch", self.arch)
        for name in ("hidden", "layers", "epochs", "batch_size", "halve_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {self.train_limit}")
        if self.dataset != "mnist" and self.data_dir is None:
            raise ValueError(_WHERE_TO_GET[self.dataset])
        if self.bn_recompute < 0:
            raise ValueError(f"bn_recompute must be >= 0 images, got {self.bn_recompute}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.zca and self.dataset == "mnist":
            raise ValueError("zca: ZCA whitening is for the colour data sets (cifar10, svhn)")
        return self

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
        common = dict(arch=self.arch, bn=self.bn, stochastic=self.stochastic)
        if self.bn_momentum != 0.1:  # recorded only when it differs from the recipes' default
            common["momentum"] = self.bn_momentum
        if self.model == "convnet":
            return common
        config = dict(common, hidden=self.hidden, layers=self.layers,
                      dropout_in=self.dropout_in, dropout_hidden=self.dropout_hidden)
        if self.dataset != "mnist":
            config.update(in_features=int(np.prod(shape)), classes=classes)
        return config

    @property
    def eval_batch_size(self):
        """Images per evaluation batch: a ConvNet's activations are far larger."""
        return 1000 if self.model == "mlp" else 100


# --- evaluation ------------------------------------------------------------------------------

def predict(model, x, batch_size=1000):
    """Class predictions for float inputs ``x`` (NumPy, in [-1, 1]) in eval mode, no tape."""
    was_training = model.training
    model.eval()
    out = []
    with no_grad():
        for i in range(0, len(x), batch_size):
            scores = model(Tensor(backend.asarray(x[i:i + batch_size])))
            out.append(backend.to_numpy(scores.data.argmax(axis=1)))
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def error_rate(model, x, y, batch_size=1000, dp=None):
    """Fraction of ``x`` misclassified; with ``dp`` (a ``distributed.DataParallel``) each
    rank scores its block of the rows and the counts are added over the ranks."""
    if dp is None:
        return float(np.mean(predict(model, x, batch_size) != y))
    lo, hi = dp.comm.block(len(x))
    wrong = int((predict(model, x[lo:hi], batch_size) != y[lo:hi]).sum())
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


def prepare_data(cfg):
    """(train_x, train_y, valid_x, valid_y, test_x, test_y): images scaled to [-1, 1] as
    float32 (flattened for an MLP, (n, C, H, W) for a ConvNet), labels int64.

    The authors' splits: MNIST 50k / 10k, CIFAR-10 45k / 5k (``data.load_cifar10``), SVHN as
    ``data.split_svhn``. With ``cfg.zca`` the images are ZCA-whitened by a transform fitted
    on the training split only.
    """
    shape, _ = DATASETS[cfg.dataset]
    ds = load_dataset(cfg)
    if cfg.dataset == "mnist":
        tx, ty, vx, vy = data.split_train_valid(ds.train_images, ds.train_labels)
    elif cfg.dataset == "cifar10":
        tx, ty, vx, vy = data.split_cifar10(ds.train_images, ds.train_labels)
    else:
        tx, ty, vx, vy = data.split_svhn(ds)
    if cfg.train_limit is not None:
        tx, ty = tx[:cfg.train_limit], ty[:cfg.train_limit]
    out_shape = (-1, int(np.prod(shape))) if cfg.model == "mlp" else (-1,) + shape

    def scale(images):
        return data.to_pm1(images).reshape(out_shape)

    tx, vx, sx = scale(tx), scale(vx), scale(ds.test_images)
    if cfg.zca:
        zca = data.ZCA.fit(tx.reshape(len(tx), -1))
        tx, vx, sx = (zca.transform(x.reshape(len(x), -1)).reshape(out_shape)
                      for x in (tx, vx, sx))
    return (tx, ty.astype(np.int64), vx, vy.astype(np.int64), sx,
            ds.test_labels.astype(np.int64))


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
            for k, i in enumerate(range(0, len(x), batch_size)):
                for b in norms:  # running = mean of the batches seen so far
                    b.momentum = 1.0 / (k + 1)
                xb = x[i:i + batch_size]
                if dp is not None:
                    xb = xb[slice(*dp.comm.block(len(xb)))]
                model(Tensor(backend.asarray(xb)))
    finally:
        for b, m in zip(norms, momenta):
            b.momentum = m
        model.train(was_training)


def train_epoch(model, opt, loss_fn, x, y, batch_size, rng, bar=None, dp=None):
    """One pass over (x, y) in mini-batches shuffled by ``rng``; returns
    (mean loss, training error, images seen). With ``dp`` every rank draws the same
    permutation, trains on its shard of each batch, and the sums are added over the ranks
    at the end (the progress bar shows rank 0's shards)."""
    model.train()
    loss_sum, wrong, seen = 0.0, 0, 0
    for batch in data.batches(len(x), batch_size, rng=rng):
        idx = batch if dp is None else dp.shard(batch)
        yb = backend.asarray(y[idx])
        loss, scores = train_step(model, opt, loss_fn, backend.asarray(x[idx]), yb, dp)
        loss_sum += float(loss.item()) * len(idx)
        wrong += int((scores.data.argmax(axis=1) != yb).sum())
        seen += len(idx)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{1 - wrong / seen:.4f}",
                            refresh=False)  # tqdm itself shows images/s
    if dp is not None:
        loss_sum, wrong, seen = dp.comm.sum_values(loss_sum, wrong, seen)
        wrong, seen = int(wrong), int(seen)
    return loss_sum / max(seen, 1), wrong / max(seen, 1), seen


def _progress(total, desc, enabled):
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

    def restore(self, ck):
        meta = ck["meta"]
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(dict(t=meta["optim_t"], lr=meta["optim_lr"], state=ck["optim"]))
        self.rng.bit_generator.state = meta["rng"]
        self.history, self.epoch = meta["history"], meta["epoch"]
        self.best = dict(epoch=meta["best_epoch"], valid=meta["best_valid"], state=ck["best"])

    def save(self, run_dir, ranks=1):
        runs.save_checkpoint(run_dir, dataclasses.asdict(self.cfg), self.epoch, self.model,
                             self.opt, self.rng, self.history, self.best, ranks=ranks)


def _on_root(comm, fn):
    """``fn()`` here, or on rank 0 only with its result or error handed to every rank."""
    return fn() if comm is None else comm.root_call(fn)


def train(cfg=None, run_dir=None, resume=False, progress=True, stop_after=None, log=print,
          comm=None):
    """Train (or, with ``resume=True``, continue training) the run in ``run_dir``.

    Each epoch: set the learning rate from the schedule, one pass of ``train_step`` over
    the shuffled training set, validation and test error, an atomic checkpoint. At the end,
    ``runs.write_results`` keeps the best validation epoch. ``stop_after`` ends this call
    after that many epochs (the run stays resumable); it exists for tests and for training
    in slices. Returns the metrics dict.

    ``comm`` (a ``distributed.Communicator``) trains data-parallel over its ranks, each
    started with the same arguments: every global batch is split across the ranks
    (``distributed.DataParallel``), evaluation is sharded and reduced, and rank 0 alone
    reads and writes the run folder and logs.
    """
    run_dir = Path(run_dir)
    if comm is not None and comm.rank != 0:
        log, progress = (lambda *_: None), False
    if resume:
        ck = _on_root(comm, lambda: runs.read_checkpoint(run_dir))
        cfg = TrainConfig(**ck["meta"]["config"])
    else:
        cfg = cfg or TrainConfig()

        def create():
            run_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / runs.CHECKPOINT).exists():
                raise FileExistsError(f"{run_dir} already holds a run; pass --resume to "
                                      "continue it or choose another --out folder")
        _on_root(comm, create)
    cfg.validate()
    if comm is not None:
        comm.check_same(dataclasses.asdict(cfg), "the training configuration")
    tx, ty, vx, vy, sx, sy = prepare_data(cfg)
    run = _Run(cfg)
    if resume:
        run.restore(ck)
        log(f"resuming {run_dir} after epoch {run.epoch}/{cfg.epochs}")
    dp = None if comm is None else distributed.DataParallel(run.model, comm)
    ranks = 1 if comm is None else comm.size
    if resume and ck["meta"].get("ranks", 1) != ranks:
        log(f"note: this run was trained on {ck['meta'].get('ranks', 1)} rank(s) and resumes "
            f"on {ranks}: it follows the same sequence up to float rounding, not bit for bit")
    if dp is not None:
        dp.check_batches(len(tx), cfg.batch_size)
        dp.check_batches(min(cfg.bn_recompute, len(tx)), cfg.eval_batch_size,
                         "bn_recompute's batch of", "bn_recompute")
    try:
        return _epochs(run, cfg, run_dir, (tx, ty, vx, vy, sx, sy), progress, stop_after,
                       log, dp, comm)
    finally:
        if dp is not None:
            dp.close()


def _epochs(run, cfg, run_dir, arrays, progress, stop_after, log, dp, comm):
    """The epochs of ``train`` from ``run.epoch`` on; the metrics dict at the end."""
    tx, ty, vx, vy, sx, sy = arrays

    end = cfg.epochs if stop_after is None else min(cfg.epochs, run.epoch + stop_after)
    while run.epoch < end:
        run.opt.lr = run.schedule(run.epoch)
        bar = _progress(len(tx), f"epoch {run.epoch + 1}/{cfg.epochs}", progress)
        t0 = time.perf_counter()
        loss, train_err, seen = train_epoch(run.model, run.opt, run.loss_fn, tx, ty,
                                            cfg.batch_size, run.rng, bar, dp)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if cfg.bn_recompute:
            recompute_bn_statistics(run.model, tx[:cfg.bn_recompute], cfg.eval_batch_size, dp)
        if dp is not None:
            dp.check_replicas()
        valid_err = error_rate(run.model, vx, vy, cfg.eval_batch_size, dp)
        test_err = error_rate(run.model, sx, sy, cfg.eval_batch_size, dp)
        run.epoch += 1
        run.history.append(dict(epoch=run.epoch, lr=run.opt.lr, train_loss=loss,
                                train_error=train_err, valid_error=valid_err,
                                test_error=test_err, seconds=seconds,
                                images_per_second=seen / seconds))
        if valid_err < run.best["valid"]:
            run.best = dict(epoch=run.epoch, valid=valid_err, state=run.model.state_dict())
        _on_root(comm, lambda: run.save(run_dir, 1 if comm is None else comm.size))
        log(f"epoch {run.epoch:3d}/{cfg.epochs}  lr {run.opt.lr:.2e}  loss {loss:.4f}  "
            f"train {100 * train_err:5.2f}%  valid {100 * valid_err:5.2f}%  "
            f"test {100 * test_err:5.2f}%  {seconds:6.1f}s  {seen / seconds:,.0f} img/s")

    if end < cfg.epochs:
        return dict(config=dataclasses.asdict(cfg), history=run.history, finished=False)
    return _on_root(comm, lambda: finish(run_dir, cfg, run.history, run.best, log))


def finish(run_dir, cfg, history, best, log=print):
    """Write model.npz (best validation epoch), metrics.json and curves.png; return metrics."""
    return runs.write_results(run_dir, dataclasses.asdict(cfg), cfg.model_config(), history,
                              best, log)
