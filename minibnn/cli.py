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
    from .train import DATASETS, MODELS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train a binary MLP or ConvNet (MNIST by default)",
                       description="Train the paper's binary networks: the MLP or a ConvNet, on "
                                   "MNIST (shipped; 50k train / 10k validation / 10k test), "
                                   "CIFAR-10 (45k / 5k / 10k) or SVHN. Options left out take the "
                                   "authors' recipe for the data set and model; the test error "
                                   "is reported at the epoch with the best validation error.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="%(default)s; cifar10 and svhn need --data-dir")
    p.add_argument("--model", choices=MODELS, default="mlp", help="%(default)s")
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
                   help=recipe(d.lr_end, "final rate of the exponential schedule"))
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
                   help="run folder to create (default runs/DATASET-MODEL-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint (its stored "
                        "options are used)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks: start with mpiexec -n N python -m "
                        "minibnn train --distributed ...; every batch is split across the "
                        "ranks (needs mpi4py: pip install minibnn[dist]; without it, or "
                        "without mpiexec, runs on one rank and says so)")
    return p


_OPTIONS = ("hidden", "layers", "epochs", "batch_size", "lr_start", "lr_end", "schedule",
            "halve_every", "optimizer", "bn", "loss", "stochastic", "dropout_in",
            "dropout_hidden", "zca", "bn_momentum", "bn_recompute", "seed", "data_dir",
            "train_limit")


def _cmd_train(args):
    if args.distributed:
        from . import distributed
        comm = distributed.init()
        if comm.rank == 0:
            print(f"distributed: {comm.describe()}", flush=True)
        def hint():
            run = args.resume or getattr(args, "run_dir", None)
            return f"; the last complete checkpoint in {run} is kept" if run else ""
        with distributed.abort_on_error(comm, hint):
            return _train(args, comm)
    return _train(args, None)


def _train(args, comm):
    from .train import TrainConfig, train
    progress = not args.no_progress
    if args.resume:
        train(run_dir=args.resume, resume=True, progress=progress, comm=comm)
        return 0
    given = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    cfg = TrainConfig.recipe(args.dataset, args.model, torch=args.torch, **given).validate()
    out = args.out or str(Path("runs") / time.strftime(
        f"{cfg.dataset}-{cfg.model}-%Y%m%d-%H%M%S"))
    if comm is not None:  # every rank uses rank 0's folder name (its clock may differ)
        out = comm.bcast_object(out)
    net = (f"{cfg.layers}x{cfg.hidden} binary MLP" if cfg.model == "mlp"
           else f"binary ConvNet ({cfg.arch})")
    if comm is None or comm.rank == 0:
        print(f"training {net} on {cfg.dataset}, {cfg.optimizer}, {cfg.bn} BN, batch "
              f"{cfg.batch_size}, {cfg.epochs} epochs, backend {backend.active()}; run folder "
              f"{out}")
    args.run_dir = out
    train(cfg, run_dir=out, progress=progress, comm=comm)
    return 0


def _config_for(path, model_config, args):
    """The TrainConfig that says which data a model is scored on: the run's own, else one
    made from the model's architecture and --dataset / --data-dir."""
    from .train import TrainConfig
    arch = model_config["arch"]
    dataset = args.dataset or (arch.split("_")[0] if arch != "mnist_mlp" else "mnist")
    return TrainConfig(dataset=dataset, model="mlp" if arch.endswith("mlp") else "convnet",
                       data_dir=args.data_dir).validate()


def _cmd_eval(args):
    import dataclasses

    import numpy as np

    from . import deploy, models
    from .models import load_model
    from .runs import CHECKPOINT, MODEL, read_checkpoint
    from .train import TrainConfig, error_rate, load_dataset, prepare_data
    path = Path(args.path)
    if path.is_file() and deploy.is_frozen_file(path):  # a frozen net: uint8 in, bits inside
        frozen = deploy.load(path)
        cfg = TrainConfig(dataset=args.dataset or "mnist", data_dir=args.data_dir).validate()
        test = load_dataset(cfg, training=False)
        err = float((frozen.predict(test.test_images) != test.test_labels).mean())
        print(f"{path} ({frozen!r}): test error {100 * err:.2f}% on {len(test.test_labels)} "
              f"{cfg.dataset} images (backend {backend.active()})")
        return 0
    if path.is_dir():
        ck = read_checkpoint(path)
        cfg = TrainConfig(**ck["meta"]["config"])
        if args.data_dir is not None or args.dataset is not None:
            cfg = dataclasses.replace(cfg, data_dir=args.data_dir or cfg.data_dir,
                                      dataset=args.dataset or cfg.dataset)
        if (path / MODEL).exists():
            model, _ = load_model(path / MODEL)
            source = path / MODEL
        else:  # unfinished run: best epoch so far
            model = models.build(cfg.model_config(), rng=np.random.default_rng(0))
            model.load_state_dict(ck["best"])
            model.eval()
            source = f"{path / CHECKPOINT} (best epoch so far)"
    else:
        model, _ = load_model(path)
        source = path
        cfg = _config_for(path, model.config, args)
    *_, sx, sy = prepare_data(cfg)
    err = error_rate(model, sx, sy, cfg.eval_batch_size)
    print(f"{source}: test error {100 * err:.2f}% on {len(sy)} {cfg.dataset} images "
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
    except KeyboardInterrupt:
        run = getattr(args, "run_dir", None) or getattr(args, "resume", None)
        hint = f"; resume with: python -m minibnn train --resume {run}" if run else ""
        print(f"\ninterrupted: the last complete epoch's checkpoint is kept{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError,
            backend.BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
