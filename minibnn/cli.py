"""Command line: ``python -m minibnn train``, ``python -m minibnn eval PATH``.

The choices offered for optimizers, losses, batch norms and schedules come from
``registry``, the one table of names the library accepts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import backend, registry


def _train_parser(sub):
    from .train import DATASETS, MODELS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train a binary MLP or ConvNet (MNIST by default)",
                       description="Train the paper's binary networks: the MLP or a ConvNet, on "
                                   "MNIST (shipped; 50k train / 10k validation / 10k test), "
                                   "CIFAR-10 (45k / 5k / 10k) or SVHN. Options left out take the "
                                   "authors' recipe for the data set and model; the test error "
                                   "is reported at the epoch with the best validation error.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="mnist (default); cifar10 and svhn need --data-dir")
    p.add_argument("--model", choices=MODELS, default=None, help="mlp (default)")
    p.add_argument("--torch", action="store_true",
                   help="the recipe's Torch7 variant: shift-based AdaMax and shift-based BN")
    def recipe(value, what=""):
        return f"{what} (default: the recipe's; MNIST MLP {value})".strip()

    p.add_argument("--hidden", type=int,
                   help=recipe(d.hidden, "units per hidden layer of the MLP"))
    p.add_argument("--layers", type=int,
                   help=recipe(d.layers, "hidden layers of the MLP"))
    p.add_argument("--epochs", type=int, help=recipe(d.epochs))
    p.add_argument("--batch-size", type=int, help=recipe(d.batch_size))
    p.add_argument("--lr-start", type=float, help=recipe(d.lr_start))
    p.add_argument("--lr-end", type=float,
                   help=recipe(d.lr_end, "rate of the last epoch: the exponential schedule "
                                         "runs lr-start in the first epoch, lr-end in the last"))
    p.add_argument("--schedule", choices=registry.choices("schedule"),
                   help="exponential decay lr-start -> lr-end (Theano recipe) or halving every "
                        "--halve-every epochs (Torch recipe); default exp")
    p.add_argument("--halve-every", type=int, help=recipe(d.halve_every))
    p.add_argument("--optimizer", choices=registry.choices("optimizer"),
                   help=f"default {d.optimizer} (shift-adamax with --torch)")
    p.add_argument("--bn", choices=registry.choices("bn"),
                   help="batch norm: standard or shift-based (paper Algorithm 3); default "
                        f"{d.bn} (shift with --torch)")
    p.add_argument("--loss", choices=registry.choices("loss"), help=f"default {d.loss}")
    p.add_argument("--stochastic", action="store_true", default=None,
                   help="stochastic weight binarization")
    p.add_argument("--dropout-in", type=float,
                   help=recipe(d.dropout_in, "MLP input dropout"))
    p.add_argument("--dropout-hidden", type=float,
                   help=recipe(d.dropout_hidden, "MLP hidden dropout"))
    p.add_argument("--zca", action="store_true", default=None,
                   help="ZCA-whiten the images, fitted on the training split (cifar10, svhn)")
    p.add_argument("--bn-momentum", type=float,
                   help=recipe(d.bn_momentum, "weight of each batch in batch norm's running "
                                              "statistics (used in eval only)"))
    p.add_argument("--bn-recompute", type=int, metavar="N",
                   help=recipe(d.bn_recompute, "before each evaluation, recompute batch norm's "
                                               "statistics from N training images"))
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--data-dir", default=None,
                   help="MNIST: a folder with the four IDX files (default: the copy shipped "
                        "with minibnn); cifar10: the cifar-10-batches-bin folder of the binary "
                        "version (or its parent); svhn: the folder of train_32x32.mat and "
                        "test_32x32.mat")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on only the first N training images (quick runs)")
    p.add_argument("--out", default=None,
                   help="run folder to create; one that holds a run is refused (default: a "
                        "new runs/DATASET-MODEL-YYYYmmdd-HHMMSS[-N])")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint with its own "
                        "options; --epochs may change its length, other options are refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_OPTIONS = ("hidden", "layers", "epochs", "batch_size", "lr_start", "lr_end", "schedule",
            "halve_every", "optimizer", "bn", "loss", "stochastic", "dropout_in",
            "dropout_hidden", "zca", "bn_momentum", "bn_recompute", "seed", "data_dir",
            "train_limit")


def _cmd_train(args):
    from .train import TrainConfig, train
    progress = not args.no_progress
    given = {k: getattr(args, k) for k in _OPTIONS + ("dataset", "model")
             if getattr(args, k) is not None}
    if args.resume:
        for flag, value in (("--out", args.out), ("--torch", args.torch)):
            if value:
                raise ValueError(f"{flag} cannot be given with --resume (the run keeps its "
                                 "folder and options)")
        train(run_dir=args.resume, resume=True, progress=progress, **given)
        return 0
    cfg = TrainConfig.recipe(given.pop("dataset", "mnist"), given.pop("model", "mlp"),
                             torch=args.torch, **given).validate()
    net = (f"{cfg.layers}x{cfg.hidden} binary MLP" if cfg.model == "mlp"
           else f"binary ConvNet ({cfg.arch})")
    print(f"training {net} on {cfg.dataset}, {cfg.optimizer}, {cfg.bn} BN, batch "
          f"{cfg.batch_size}, {cfg.epochs} epochs, backend {backend.active()}")
    train(cfg, run_dir=args.out, progress=progress)
    return 0


def _cmd_eval(args):
    from . import data, deploy
    from .train import (DATASETS, TrainConfig, check_same_data, error_rate, load_dataset,
                        load_for_eval, prepare_data)
    path = Path(args.path)
    if path.is_file() and deploy.is_frozen_file(path):  # a frozen net: uint8 in, bits inside
        frozen = deploy.load(path)
        cfg = TrainConfig(dataset=args.dataset or "mnist", data_dir=args.data_dir).validate()
        test = load_dataset(cfg, training=False)
        if test.test_images[0].size != frozen.in_features:
            raise ValueError(f"{cfg.data_dir or 'the shipped copy'}: test images of "
                             f"{'x'.join(map(str, test.test_images.shape[1:]))} hold "
                             f"{test.test_images[0].size} values; {path} takes "
                             f"{frozen.in_features}")
        data.check_labels(test.test_labels, DATASETS[cfg.dataset][1],
                          f"{cfg.data_dir or 'the shipped copy'}, test split")
        err = float((frozen.predict(test.test_images) != test.test_labels).mean())
        print(f"{path} ({frozen!r}): test error {100 * err:.2f}% on {len(test.test_labels)} "
              f"{cfg.dataset} images (backend {backend.active()})")
        return 0
    model, cfg, source, record = load_for_eval(path, args.dataset, args.data_dir)
    *_, sx, sy = prepare_data(cfg)
    check_same_data(record, sx, sy, cfg, source)
    err = error_rate(model, sx, sy, cfg.eval_batch_size)
    where = cfg.data_dir or "the shipped copy"
    whose = ("the run's own data" if record else "as given" if args.dataset or args.data_dir
             else "the file records no data: its architecture's data set")
    print(f"{source}: test error {100 * err:.2f}% on {len(sy)} {cfg.dataset} test images "
          f"from {where} ({whose}; backend {backend.active()})")
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
    pe.add_argument("--data-dir", default=None,
                    help="data folder (default: the run's own; MNIST: the shipped copy)")
    pe.add_argument("--dataset", choices=["mnist", "cifar10", "svhn"], default=None,
                    help="data set to score on (default: the run's own, or the model's)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.backend:
            backend.set_backend(args.backend)
        return {"train": _cmd_train, "eval": _cmd_eval}[args.command](args)
    except KeyboardInterrupt as exc:
        print(f"\n{_interrupted(args, exc)}", file=sys.stderr)
        return 130
    except Exception as exc:
        return _error(exc)


def _interrupted(args, exc):
    """The Ctrl-C message of the command that ran: only training has checkpoints."""
    if args.command != "train":
        return "interrupted"
    run = getattr(exc, "run_dir", None) or args.resume
    epoch = getattr(exc, "epoch", None)
    if not run or (epoch == 0 and not args.resume):
        return "interrupted before the first epoch finished: nothing was saved"
    kept = f"the checkpoint of epoch {epoch}" if epoch else "its last checkpoint"
    return f"interrupted: {kept} is kept; resume with: python -m minibnn train --resume {run}"


def _error(exc):
    """One ``error:`` line for a failure the user can act on; anything else is a bug and
    keeps its traceback."""
    from .runs import RunLocked
    from .train import ConfigError
    if isinstance(exc, ConfigError):
        message = f"--{exc.option.replace('_', '-')} {exc.problem}"
    elif isinstance(exc, (ValueError, TypeError, OSError, RunLocked,
                          backend.BackendUnavailable)):
        message = str(exc)
    elif isinstance(exc, MemoryError):
        message = f"out of memory ({exc or 'a smaller --hidden or --batch-size may fit'})"
    else:
        raise exc
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
