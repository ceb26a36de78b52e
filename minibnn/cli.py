"""Command line: ``python -m minibnn train``, ``python -m minibnn eval PATH``.

The choices offered for optimizers, losses, batch norms and schedules come from
``registry``, the one table of names the library accepts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import backend, registry


def _train_parser(sub):
    from .train import TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train the paper's binary MLP on MNIST",
                       description="Train the paper's binary MLP on MNIST (50k train / 10k "
                                   "validation / 10k test); the test error is reported at the "
                                   "epoch with the best validation error.")
    p.add_argument("--hidden", type=int, default=d.hidden, help="units per hidden layer (%(default)s)")
    p.add_argument("--layers", type=int, default=d.layers, help="hidden layers (%(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="%(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="%(default)s")
    p.add_argument("--lr-start", type=float, default=d.lr_start, help="%(default)s")
    p.add_argument("--lr-end", type=float, default=d.lr_end,
                   help="final rate of the exponential schedule (%(default)s)")
    p.add_argument("--schedule", choices=registry.choices("schedule"), default=d.schedule,
                   help="exponential decay lr-start -> lr-end (Theano recipe) or halving every "
                        "--halve-every epochs (Torch recipe); default %(default)s")
    p.add_argument("--halve-every", type=int, default=d.halve_every, help="%(default)s")
    p.add_argument("--optimizer", choices=registry.choices("optimizer"),
                   default=d.optimizer, help="%(default)s")
    p.add_argument("--bn", choices=registry.choices("bn"), default=d.bn,
                   help="batch norm: standard or shift-based (paper Algorithm 3); %(default)s")
    p.add_argument("--loss", choices=registry.choices("loss"), default=d.loss,
                   help="%(default)s")
    p.add_argument("--stochastic", action="store_true", help="stochastic weight binarization")
    p.add_argument("--dropout-in", type=float, default=d.dropout_in, help="%(default)s")
    p.add_argument("--dropout-hidden", type=float, default=d.dropout_hidden, help="%(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="%(default)s")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST IDX files (gzipped or not); default: the "
                        "copy shipped with minibnn")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on only the first N of the 50k training images (quick runs)")
    p.add_argument("--out", default=None,
                   help="run folder to create (default runs/mnist-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint (its stored "
                        "options are used)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _cmd_train(args):
    from .train import TrainConfig, train
    progress = not args.no_progress
    if args.resume:
        train(run_dir=args.resume, resume=True, progress=progress)
        return 0
    cfg = TrainConfig(hidden=args.hidden, layers=args.layers, epochs=args.epochs,
                      batch_size=args.batch_size, lr_start=args.lr_start, lr_end=args.lr_end,
                      schedule=args.schedule, halve_every=args.halve_every,
                      optimizer=args.optimizer, bn=args.bn, loss=args.loss,
                      stochastic=args.stochastic, dropout_in=args.dropout_in,
                      dropout_hidden=args.dropout_hidden, seed=args.seed,
                      data_dir=args.data_dir, train_limit=args.train_limit).validate()
    out = args.out or str(Path("runs") / time.strftime("mnist-%Y%m%d-%H%M%S"))
    print(f"training {cfg.layers}x{cfg.hidden} binary MLP, {cfg.optimizer}, {cfg.bn} BN, "
          f"{cfg.epochs} epochs, backend {backend.active()}; run folder {out}")
    args.run_dir = out
    train(cfg, run_dir=out, progress=progress)
    return 0


def _cmd_eval(args):
    from . import data, deploy, models
    from .models import load_model
    from .runs import MODEL, read_checkpoint
    from .train import TrainConfig, error_rate
    path = Path(args.path)
    mnist = data.load_mnist(args.data_dir)
    labels = mnist.test_labels.astype("int64")
    if path.is_file() and deploy.is_frozen_file(path):  # a frozen net: uint8 in, bits inside
        frozen = deploy.load(path)
        err = float((frozen.predict(mnist.test_images) != labels).mean())
        source = f"{path} ({frozen!r})"
    else:
        if path.is_dir() and not (path / MODEL).exists():  # unfinished run: best epoch so far
            ck = read_checkpoint(path)
            model = models.build(TrainConfig(**ck["meta"]["config"]).model_config())
            model.load_state_dict(ck["best"])
            model.eval()
            source = f"{path / 'checkpoint.npz'} (best epoch so far)"
        else:
            source = path / MODEL if path.is_dir() else path
            model, _ = load_model(source)
        err = error_rate(model, data.to_pm1(mnist.test_images), labels)
    print(f"{source}: test error {100 * err:.2f}% on {len(labels)} images "
          f"(backend {backend.active()})")
    return 0


def build_parser():
    """The ``python -m minibnn`` argument parser (choices read from ``registry``)."""
    parser = argparse.ArgumentParser(prog="python -m minibnn",
                                     description="Binarized Neural Networks on NumPy.")
    parser.add_argument("--backend", choices=backend.NAMES, default=None,
                        help="numpy | numba | cupy (default: $MINIBNN_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    pe = sub.add_parser("eval", help="test error of a run folder, a model or a frozen net")
    pe.add_argument("path", help="a run folder (from train), its model.npz, or a frozen .npz "
                                 "(from deploy.freeze(...).save)")
    pe.add_argument("--data-dir", default=None, help="MNIST folder (default: the shipped copy)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.backend:
            backend.set_backend(args.backend)
        return {"train": _cmd_train, "eval": _cmd_eval}[args.command](args)
    except KeyboardInterrupt:
        run = getattr(args, "run_dir", None) or getattr(args, "resume", None)
        hint = f"; resume with: python -m minibnn train --resume {run}" if run else ""
        print(f"\ninterrupted: the last complete epoch's checkpoint is kept{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError,
            backend.BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
