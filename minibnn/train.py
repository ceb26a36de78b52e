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

from . import backend, data, models, registry, runs
from .io import atomic_savez  # noqa: F401  (kept importable from here)
from .models import load_model, save_model  # noqa: F401  (kept importable from here)
from .runs import CHECKPOINT, CURVES, METRICS, MODEL, plot_curves, read_checkpoint  # noqa: F401
from .tensor import Tensor, no_grad


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint so ``--resume`` can rebuild it.

    The defaults are a short recipe that reaches about 2.1% MNIST test error in 12 epochs
    (a few minutes on 2 cores): the paper's architecture at 3 x 512, without dropout. The
    paper's own recipes (3 x 4096 with dropout, 1000 epochs) are in the README. Names of
    the choosable parts (optimizer, loss, bn, schedule, arch) come from ``registry``.
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
    arch: str = "mnist_mlp"

    def validate(self):
        for kind, name in (("optimizer", self.optimizer), ("loss", self.loss),
                           ("schedule", self.schedule), ("bn", self.bn), ("arch", self.arch)):
            registry.lookup(kind, name)  # ValueError listing the choices
        for name in ("hidden", "layers", "epochs", "batch_size", "halve_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {self.train_limit}")
        return self

    def schedule_fn(self):
        """The learning rate per epoch, from ``schedule``'s entry in the registry."""
        make = registry.lookup("schedule", self.schedule)
        if self.schedule == "exp":
            return make(self.lr_start, self.lr_end, self.epochs)
        return make(self.lr_start, self.halve_every)

    def model_config(self):
        """The keyword arguments of the architecture's recipe (``models.build`` takes it)."""
        return dict(arch=self.arch, hidden=self.hidden, layers=self.layers,
                    dropout_in=self.dropout_in, dropout_hidden=self.dropout_hidden,
                    bn=self.bn, stochastic=self.stochastic)


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


def error_rate(model, x, y, batch_size=1000):
    return float(np.mean(predict(model, x, batch_size) != y))


# --- data ----------------------------------------------------------------------------------

def prepare_data(cfg):
    """(train_x, train_y, valid_x, valid_y, test_x, test_y) as [-1, 1] float32 and int64."""
    mnist = data.load_mnist(cfg.data_dir)
    tx, ty, vx, vy = data.split_train_valid(mnist.train_images, mnist.train_labels)
    if cfg.train_limit is not None:
        tx, ty = tx[:cfg.train_limit], ty[:cfg.train_limit]
    return (data.to_pm1(tx), ty.astype(np.int64), data.to_pm1(vx), vy.astype(np.int64),
            data.to_pm1(mnist.test_images), mnist.test_labels.astype(np.int64))


# --- the loop ------------------------------------------------------------------------------

def train_step(model, opt, loss_fn, x, y):
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
    """
    scores = model(Tensor(x))         # 1.1
    loss = loss_fn(scores, y)
    opt.zero_grad()
    loss.backward()                   # 1.2
    opt.step()                        # 2.
    return loss, scores


def train_epoch(model, opt, loss_fn, x, y, batch_size, rng, bar=None):
    """One pass over (x, y) in mini-batches shuffled by ``rng``; returns
    (mean loss, training error, images seen)."""
    model.train()
    loss_sum, wrong, seen = 0.0, 0, 0
    for idx in data.batches(len(x), batch_size, rng=rng):
        yb = backend.asarray(y[idx])
        loss, scores = train_step(model, opt, loss_fn, backend.asarray(x[idx]), yb)
        loss_sum += float(loss.item()) * len(idx)
        wrong += int((scores.data.argmax(axis=1) != yb).sum())
        seen += len(idx)
        if bar is not None:
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{1 - wrong / seen:.4f}",
                            refresh=False)  # tqdm itself shows images/s
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

    def save(self, run_dir):
        runs.save_checkpoint(run_dir, dataclasses.asdict(self.cfg), self.epoch, self.model,
                             self.opt, self.rng, self.history, self.best)


def train(cfg=None, run_dir=None, resume=False, progress=True, stop_after=None, log=print):
    """Train (or, with ``resume=True``, continue training) the run in ``run_dir``.

    Each epoch: set the learning rate from the schedule, one pass of ``train_step`` over
    the shuffled training set, validation and test error, an atomic checkpoint. At the end,
    ``runs.write_results`` keeps the best validation epoch. ``stop_after`` ends this call
    after that many epochs (the run stays resumable); it exists for tests and for training
    in slices. Returns the metrics dict.
    """
    run_dir = Path(run_dir)
    if resume:
        ck = runs.read_checkpoint(run_dir)
        cfg = TrainConfig(**ck["meta"]["config"])
    else:
        cfg = cfg or TrainConfig()
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / runs.CHECKPOINT).exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it "
                                  "or choose another --out folder")
    cfg.validate()
    tx, ty, vx, vy, sx, sy = prepare_data(cfg)
    run = _Run(cfg)
    if resume:
        run.restore(ck)
        log(f"resuming {run_dir} after epoch {run.epoch}/{cfg.epochs}")

    end = cfg.epochs if stop_after is None else min(cfg.epochs, run.epoch + stop_after)
    while run.epoch < end:
        run.opt.lr = run.schedule(run.epoch)
        bar = _progress(len(tx), f"epoch {run.epoch + 1}/{cfg.epochs}", progress)
        t0 = time.perf_counter()
        loss, train_err, seen = train_epoch(run.model, run.opt, run.loss_fn, tx, ty,
                                            cfg.batch_size, run.rng, bar)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        valid_err, test_err = error_rate(run.model, vx, vy), error_rate(run.model, sx, sy)
        run.epoch += 1
        run.history.append(dict(epoch=run.epoch, lr=run.opt.lr, train_loss=loss,
                                train_error=train_err, valid_error=valid_err,
                                test_error=test_err, seconds=seconds,
                                images_per_second=seen / seconds))
        if valid_err < run.best["valid"]:
            run.best = dict(epoch=run.epoch, valid=valid_err, state=run.model.state_dict())
        run.save(run_dir)
        log(f"epoch {run.epoch:3d}/{cfg.epochs}  lr {run.opt.lr:.2e}  loss {loss:.4f}  "
            f"train {100 * train_err:5.2f}%  valid {100 * valid_err:5.2f}%  "
            f"test {100 * test_err:5.2f}%  {seconds:6.1f}s  {seen / seconds:,.0f} img/s")

    if end < cfg.epochs:
        return dict(config=dataclasses.asdict(cfg), history=run.history, finished=False)
    return finish(run_dir, cfg, run.history, run.best, log)


def finish(run_dir, cfg, history, best, log=print):
    """Write model.npz (best validation epoch), metrics.json and curves.png; return metrics."""
    return runs.write_results(run_dir, dataclasses.asdict(cfg), cfg.model_config(), history,
                              best, log)
