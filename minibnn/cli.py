"""Command line: ``python -m minibnn train | eval | freeze | predict``.

``train`` writes a run folder; ``eval`` scores a run, model, checkpoint or frozen net on a
split of its data; ``freeze`` writes the frozen (bits and thresholds) form of a trained
model; ``predict`` prints the class of each image of an IDX or ``.npy`` file. ``--backend``
and ``--quiet`` go before or after the subcommand. Progress bars are drawn only on a
terminal; a log file or pipe gets plain lines.

The choices offered for optimizers, losses, batch norms and schedules come from
``registry``, the one table of names the library accepts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from . import backend, registry


def _common_options():
    """``--backend`` and ``--quiet`` for each subcommand, so that they may follow it too.
    Their default is SUPPRESS: a subcommand that does not name them leaves what was given
    before it (or the main parser's default) in place."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", choices=backend.NAMES, default=argparse.SUPPRESS,
                   help="numpy | numba | cupy (default: $MINIBNN_BACKEND or numpy)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only errors and the final result line")
    return p


def _version():
    """The package's version, ``minibnn.__version__`` (setup.cfg reads the same line)."""
    import minibnn
    return minibnn.__version__


def _interactive():
    """True when stdout and stderr are both terminals: only then is a progress bar drawn,
    so a log file or a pipe gets plain lines without carriage returns."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _train_parser(sub, common):
    from .train import DATASETS, MODELS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train a binary MLP or ConvNet (MNIST by default)",
                       parents=[common],
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
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="validation images, the last N of the training set (default: the "
                        "data set's split: MNIST 10000, CIFAR-10 5000; not for svhn)")
    p.add_argument("--out", default=None,
                   help="run folder to create; one that holds a run is refused (default: a "
                        "new runs/DATASET-MODEL-YYYYmmdd-HHMMSS[-N])")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint with its own "
                        "options; --epochs may change its length, other options are refused")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (none is drawn when the output is not a terminal)")
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="write the run's checkpoint after every N epochs and after the last "
                        "(same results; a run stopped in between resumes from the last one "
                        "written). The 3x4096 MLP's checkpoint is 590 MB, longer to write "
                        "than a GPU epoch takes to train. Default 1")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on the GPU, run every training step eagerly instead of replaying it "
                        "as one CUDA graph (same results; also MINIBNN_CUDA_GRAPH=0)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks: start with mpiexec -n N python -m "
                        "minibnn train --distributed ...; every batch is split across the "
                        "ranks (needs mpi4py: pip install minibnn[dist]; without it, or "
                        "without mpiexec, runs on one rank and says so)")
    return p


_OPTIONS = ("hidden", "layers", "epochs", "batch_size", "lr_start", "lr_end", "schedule",
            "halve_every", "optimizer", "bn", "loss", "stochastic", "dropout_in",
            "dropout_hidden", "zca", "bn_momentum", "bn_recompute", "seed", "data_dir",
            "train_limit", "val_size")


def _cmd_train(args):
    if args.distributed:
        from . import distributed
        comm = distributed.init()
        if comm.rank == 0:
            print(f"distributed: {comm.describe()}", flush=True)

        def hint():
            run = args.resume or args.out or getattr(args, "run_dir", None)
            return (f"; the last complete checkpoint in {run} is kept" if run else
                    "; the last complete checkpoint in the run folder named above is kept")
        with distributed.abort_on_error(comm, hint):
            return _train(args, comm)
    return _train(args, None)


def _train(args, comm):
    from .runs import result_line
    from .train import TrainConfig, train
    progress = not args.no_progress and not args.quiet and _interactive()
    log = (lambda *_: None) if args.quiet else print
    given = {k: getattr(args, k) for k in _OPTIONS + ("dataset", "model")
             if getattr(args, k) is not None}
    if args.resume:
        for flag, value in (("--out", args.out), ("--torch", args.torch)):
            if value:
                raise ValueError(f"{flag} cannot be given with --resume (the run keeps its "
                                 "folder and options)")
        metrics = train(run_dir=args.resume, resume=True, progress=progress, log=log,
                        comm=comm, cuda_graph=False if args.no_cuda_graph else None,
                        checkpoint_every=args.checkpoint_every, **given)
    else:
        cfg = TrainConfig.recipe(given.pop("dataset", "mnist"), given.pop("model", "mlp"),
                                 torch=args.torch, **given).validate()
        net = (f"{cfg.layers}x{cfg.hidden} binary MLP" if cfg.model == "mlp"
               else f"binary ConvNet ({cfg.arch})")
        if comm is None or comm.rank == 0:
            log(f"training {net} on {cfg.dataset}, {cfg.optimizer}, {cfg.bn} BN, batch "
                f"{cfg.batch_size}, {cfg.epochs} epochs, backend {backend.active()}")
        metrics = train(cfg, run_dir=args.out, progress=progress, log=log, comm=comm,
                        cuda_graph=False if args.no_cuda_graph else None,
                        checkpoint_every=args.checkpoint_every)
    args.run_dir = metrics.get("run_dir")
    if args.quiet and metrics.get("finished", True) and (comm is None or comm.rank == 0):
        print(result_line(metrics, metrics.get("run_dir")))
    return 0


# --- loading what was trained: run folder, checkpoint, model file, frozen net ---------------

class _Trained(NamedTuple):
    """A network read from the command line: ``net`` a model in eval mode or a FrozenBNN,
    ``cfg`` its run's TrainConfig (None for a frozen file or a model file that stores no
    options), ``source`` what was read, for messages."""

    net: object
    cfg: object
    source: str
    zca: bool = False  # trained on ZCA-whitened images, whose transform is not stored
    record: dict | None = None  # the run's ``train.data_record``, what eval checks data against

    def check_raw_pixels(self, what):
        """ValueError when ``what`` (freeze, predict) would feed raw pixels to a network
        trained on whitened ones: a silent wrong result otherwise."""
        if self.zca:
            raise ValueError(f"{self.source}: trained on ZCA-whitened images (--zca); the "
                             "whitening, fitted on the run's training split, is not stored "
                             f"with the model, so {what} on raw pixels would give wrong "
                             "classes; eval RUN_DIR scores it with the whitening refitted")

    @property
    def frozen(self):
        from .deploy import FrozenBNN
        return isinstance(self.net, FrozenBNN)

    def input_shape(self):
        """One input as the network takes it: (C, H, W) for a ConvNet, (features,) for an
        MLP."""
        if self.frozen:
            return self.net.input_shape
        from .deploy.freezing import model_input_shape
        if self.net.config["arch"].endswith("mlp"):
            return (int(self.net.config.get("in_features", 784)),)
        return model_input_shape(self.net)


def _npz_kind(path):
    """"frozen", "model" or "checkpoint": which minibnn file the .npz at ``path`` is, from
    its entries; ValueError naming the file when it is none of them."""
    from . import io
    with io.open_npz(path, "minibnn model, checkpoint or frozen network") as z:
        names = z.files
        if "format" in names:
            return "frozen"
        if "config" in names:
            return "model"
        if "meta" in names and any(k.startswith("best/") for k in names):
            return "checkpoint"
    raise ValueError(f"{path}: not a minibnn model, checkpoint or frozen network file (its "
                     f"entries: {', '.join(sorted(names)[:6]) or 'none'})")


def _best_so_far(ck, cfg, source):
    """The model of a checkpoint's best epoch so far (``ck`` as ``runs.read_checkpoint``
    returns it, ``cfg`` its TrainConfig), in eval mode; ValueError naming ``source``."""
    import numpy as np

    from . import models
    model = models.build(cfg.model_config(), rng=np.random.default_rng(0))
    try:
        model.load_state_dict(ck["best"])
    except ValueError as exc:
        raise ValueError(f"{source}: damaged checkpoint: {exc}") from None
    return model.eval()


def _load_trained(path):
    """The network at ``path``: a run folder (its model.npz, or the best epoch of its
    checkpoint while it trains), a checkpoint file, a model file or a frozen network.

    A run folder and a model file carry the run's data record (``eval`` scores them on
    that data); a lone checkpoint file names its data by its stored options."""
    from . import deploy
    from .models import load_model
    from .runs import CHECKPOINT, MODEL, read_checkpoint, read_checkpoint_file
    from .train import stored_config
    path = Path(path)
    if path.is_dir():
        ck_path, ck = path / CHECKPOINT, read_checkpoint(path)
        record = ck["meta"].get("data")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or file")
    else:
        kind = _npz_kind(path)
        if kind == "frozen":
            return _Trained(deploy.load(path), None, str(path))
        if kind == "model":
            model, meta = load_model(path)
            meta = meta if isinstance(meta, dict) else {}
            cfg = stored_config(meta["run_config"], path) if "run_config" in meta else None
            return _Trained(model, cfg, str(path), bool(meta.get("zca")), meta.get("data"))
        ck_path, ck, record = path, read_checkpoint_file(path), None
    cfg = stored_config(ck["meta"]["config"], ck_path)
    if path.is_dir() and (path / MODEL).exists():
        model, _ = load_model(path / MODEL)
        return _Trained(model, cfg, str(path / MODEL), bool(cfg.zca), record)
    return _Trained(_best_so_far(ck, cfg, ck_path), cfg,
                    f"{ck_path} (best epoch so far, {ck['meta']['best_epoch']})",
                    bool(cfg.zca), record)


def _data_config(trained):
    """The TrainConfig naming the data of a model file that stores no options: its data
    record's, else its architecture's data set (MNIST: the shipped copy)."""
    from .train import TrainConfig
    record = trained.record
    if record:
        return TrainConfig(dataset=record["dataset"], model=record["model"],
                           data_dir=record["data_dir"],
                           train_limit=record["split"].get("train_limit"))
    arch = trained.net.config["arch"]
    return TrainConfig(dataset=arch.split("_")[0] if arch != "mnist_mlp" else "mnist",
                       model="mlp" if arch.endswith("mlp") else "convnet")


def _batch_size(value):
    if value is not None and value < 1:
        raise ValueError(f"--batch-size must be >= 1, got {value}")
    return value


def _classify(trained, x, batch_size, bar=None):
    """Predicted classes of ``x``: uint8 images for a frozen net (in slices, so that
    ``bar`` advances), [-1, 1] floats for a model."""
    import numpy as np

    from .train import predict
    step = batch_size or (1000 if len(trained.input_shape()) == 1 else 100)  # ConvNet: 100
    if not trained.frozen:
        return predict(trained.net, x, step, bar)
    out = []
    for i in range(0, len(x), step):
        out.append(trained.net.predict(x[i:i + step], batch_size=batch_size))
        if bar is not None:
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# --- eval ------------------------------------------------------------------------------------

_SPLITS = ("test", "validation", "train")


def _cmd_eval(args):
    import dataclasses

    from . import data
    from .train import (TrainConfig, _progress, check_same_data, load_dataset, prepare_data,
                        split_dataset)
    batch_size = _batch_size(args.batch_size)
    trained = _load_trained(args.path)
    record = None
    if trained.frozen:  # uint8 in, bits inside: the data set's own images
        cfg = TrainConfig(dataset=args.dataset or "mnist", data_dir=args.data_dir).validate()
        ds = load_dataset(cfg, training=args.split != "test")
        if args.split == "test":
            x, y = ds.test_images, ds.test_labels
        else:
            tx, ty, vx, vy = split_dataset(cfg, ds)
            x, y = (tx, ty) if args.split == "train" else (vx, vy)
        data.check_labels(y, trained.net.classes, f"{cfg.data_dir or 'the shipped copy'}, "
                                                  f"{args.split} split")
    else:
        cfg = trained.cfg or _data_config(trained)
        given = args.dataset is not None or args.data_dir is not None
        record = None if given else trained.record  # scored on the run's own data
        if given:
            cfg = dataclasses.replace(cfg, dataset=args.dataset or cfg.dataset,
                                      data_dir=args.data_dir if args.data_dir is not None
                                      else cfg.data_dir)
        cfg = cfg.validate()
        tx, ty, vx, vy, x, y = prepare_data(cfg)
        check_same_data(record, x, y, cfg, trained.source)
        if args.split != "test":
            x, y = (tx, ty) if args.split == "train" else (vx, vy)
        batch_size = batch_size or cfg.eval_batch_size
    _check_images(trained, x.shape[1:], f"the {cfg.dataset} data"
                  + (f" in {cfg.data_dir}" if cfg.data_dir else ""))
    bar = _progress(len(x), f"evaluating {args.split}", not args.quiet and _interactive())
    try:
        err = float((_classify(trained, x, batch_size, bar) != y).mean())
    finally:
        if bar is not None:
            bar.close()
    where = cfg.data_dir or "the shipped copy"
    whose = ("the run's own data" if record else "as given" if args.dataset or args.data_dir
             else "the run's options" if trained.cfg is not None and not trained.frozen
             else "the file records no data: its architecture's data set"
             if not trained.frozen else "the default data set")
    print(f"{trained.source}" + (f" ({trained.net!r})" if trained.frozen else "")
          + f": {args.split} error {100 * err:.2f}% on {len(y)} {cfg.dataset} {args.split} "
            f"images from {where} ({whose}; backend {backend.active()})")
    return 0


def _check_images(trained, shape, where):
    """ValueError naming ``where`` when images of ``shape`` (one image, after the count)
    are not what the network takes; (C, H, W), (H, W) for one channel and flat rows of the
    right length are."""
    import math
    want = tuple(trained.input_shape())
    shape = tuple(shape)
    if shape == want or (len(want) == 3 and want[0] == 1 and shape == want[1:]) \
            or (len(want) == 1 and math.prod(shape) == want[0]) \
            or (len(want) == 3 and shape == (math.prod(want),)):
        return
    takes = "x".join(map(str, want)) + (" values" if len(want) == 1 else " images")
    raise ValueError(f"{where}: images of shape {'x'.join(map(str, shape))}, but "
                     f"{trained.source} takes {takes}")


# --- freeze ----------------------------------------------------------------------------------

def _cmd_freeze(args):
    from . import deploy
    trained = _load_trained(args.source)
    if trained.frozen:
        raise ValueError(f"{args.source}: already a frozen network; freeze takes a run folder, "
                         "a model.npz or a checkpoint")
    trained.check_raw_pixels("freeze")
    src = Path(args.source)
    out = Path(args.output) if args.output else (
        src / "model.frozen.npz" if src.is_dir() else src.with_name(src.stem + ".frozen.npz"))
    if out.is_dir():
        raise ValueError(f"-o: {out} is a folder; name the frozen file to write, e.g. "
                         f"{out / 'model.frozen.npz'}")
    if out.exists() and not deploy.is_frozen_file(out):
        raise FileExistsError(f"-o: {out} exists and is not a frozen network; freeze does not "
                              "overwrite it: choose another name or remove it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"-o: folder {out.parent} does not exist")
    frozen = deploy.freeze(trained.net)
    frozen.save(out)
    weights = sum(p.data.size for p in trained.net.parameters()) * 4
    size = out.stat().st_size
    print(f"{out}: {frozen!r}, {size:,} bytes ({weights / size:.1f}x smaller than the float32 "
          f"parameters) from {trained.source}")
    return 0


# --- predict ---------------------------------------------------------------------------------

def _read_images(path):
    """The array in ``path``: a ``.npy`` file (read without pickle) or an IDX file, gzipped
    or not; FileNotFoundError / ValueError naming the file otherwise."""
    import numpy as np

    from . import data
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IMAGES: {path}: no such file")
    if path.suffix == ".npz":
        raise ValueError(f"IMAGES: {path} is an .npz archive; expected an IDX file (gzipped "
                         "or not) or a .npy array of uint8 images")
    if path.suffix != ".npy":
        try:
            return data.read_idx(path)
        except data.DatasetError as exc:
            raise ValueError(f"IMAGES: {exc} (IMAGES is an IDX file, gzipped or not, or a "
                             ".npy array)") from exc
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) \
                else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as exc:
            raise ValueError(f"IMAGES: {path}: not a .npy array ({exc})") from exc
        if dtype.hasobject:
            raise ValueError(f"IMAGES: {path} holds Python objects (dtype {dtype}), which "
                             "minibnn never unpickles; expected uint8 images")
        f.seek(0)
        try:
            return fmt.read_array(f, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"IMAGES: {path}: damaged .npy array of shape {shape} "
                             f"({type(exc).__name__}: {exc})") from exc


def _images_for(trained, images, path):
    """``images`` (uint8, one image per row of the first axis) as ``trained`` takes them:
    uint8 for a frozen net, [-1, 1] floats of its input shape for a model."""
    import numpy as np

    from . import data
    if images.dtype != np.uint8:
        raise TypeError(f"IMAGES: {path} holds {images.dtype} values; expected uint8 pixels "
                        "0..255 (the raw images, not scaled floats)")
    if images.ndim < 2:
        raise ValueError(f"IMAGES: {path} holds an array of shape {images.shape}; expected "
                         "images (N, H, W), (N, C, H, W) or rows (N, H*W) (a 1-d array is "
                         "labels; one image needs a leading axis of 1)")
    _check_images(trained, images.shape[1:], f"IMAGES: {path} holds {len(images)}")
    shape = (len(images),) + tuple(trained.input_shape())
    if trained.frozen:
        return images.reshape(shape)
    return data.to_pm1(images, flatten=False).reshape(shape)


def _holds_predictions(path):
    """True if ``path`` reads as what ``predict -o`` writes: lines of class numbers. Only
    such a file is overwritten, never a model, checkpoint or data file named by mistake."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return all(c in b"0123456789\n" for c in head)


def _cmd_predict(args):
    from . import io
    from .train import _progress
    batch_size = _batch_size(args.batch_size)
    trained = _load_trained(args.model)
    trained.check_raw_pixels("predict")
    images = _images_for(trained, _read_images(args.images), args.images)
    out = Path(args.output) if args.output else None
    if out is not None:
        if out.is_dir() or not out.parent.is_dir():
            raise ValueError(f"-o: {out} is a folder or in a folder that does not exist; name "
                             "the file to write the predictions to")
        if out.exists() and not _holds_predictions(out):
            raise FileExistsError(f"-o: {out} exists and does not hold predictions (one class "
                                  "per line); predict does not overwrite it: choose another "
                                  "name or remove it")
    bar = _progress(len(images), "predicting", not args.quiet and _interactive())
    try:
        classes = _classify(trained, images, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    text = "".join(f"{c}\n" for c in classes.tolist())
    if out is None:
        sys.stdout.write(text)
        return 0
    io.atomic_write_bytes(out, text.encode())
    print(f"{out}: the predicted classes of the {len(classes)} images of {args.images}, one "
          f"per line, by {trained.source} (backend {backend.active()})")
    return 0


def build_parser():
    """The ``python -m minibnn`` argument parser (choices read from ``registry``)."""
    parser = argparse.ArgumentParser(prog="python -m minibnn",
                                     description="Binarized Neural Networks on NumPy.")
    parser.add_argument("--version", action="version", version=f"minibnn {_version()}")
    parser.add_argument("--backend", choices=backend.NAMES, default=None,
                        help="numpy | numba | cupy (default: $MINIBNN_BACKEND or numpy); may "
                             "also follow the subcommand")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="print only errors and the final result line; may also follow "
                             "the subcommand")
    common = _common_options()
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, common)
    pe = sub.add_parser("eval", parents=[common],
                        help="error of a run folder, checkpoint, model or frozen net")
    pe.add_argument("path", help="a run folder (from train), its model.npz or checkpoint.npz, "
                                 "or a frozen .npz (from freeze)")
    pe.add_argument("--split", choices=_SPLITS, default="test",
                    help="which images to score: the test set (default), or the run's "
                         "validation or training split")
    pe.add_argument("--batch-size", type=int, default=None,
                    help="images per batch (default: 1000 for an MLP, 100 for a ConvNet)")
    pe.add_argument("--data-dir", default=None,
                    help="data folder (default: the run's own; MNIST: the shipped copy)")
    pe.add_argument("--dataset", choices=["mnist", "cifar10", "svhn"], default=None,
                    help="data set to score on (default: the run's own, or the model's)")
    pf = sub.add_parser("freeze", parents=[common],
                        help="write the frozen net (packed bits, integer thresholds) of a "
                             "trained model",
                        description="Freeze a trained MLP or ConvNet into packed sign bits and "
                                    "integer thresholds (minibnn.deploy.freeze) and save it.")
    pf.add_argument("source", help="a run folder, its model.npz or a checkpoint.npz")
    pf.add_argument("-o", "--output", default=None,
                    help="the frozen file to write (default: RUN_DIR/model.frozen.npz, or "
                         "NAME.frozen.npz beside NAME.npz)")
    pp = sub.add_parser("predict", parents=[common],
                        help="print the predicted class of each image, one per line",
                        description="Predict the class of each image of an IDX file (gzipped "
                                    "or not) or a .npy array of uint8 images: (N, 28, 28) or "
                                    "(N, 784) for MNIST, what the model takes in general.")
    pp.add_argument("model", help="a frozen .npz, a model.npz, a checkpoint.npz or a run folder")
    pp.add_argument("images", help="an IDX file (as MNIST's, .gz or not) or a .npy of uint8 "
                                   "images")
    pp.add_argument("-o", "--output", default=None,
                    help="write the classes to this file, one per line, instead of stdout")
    pp.add_argument("--batch-size", type=int, default=None,
                    help="images per batch (default: the runtime's)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.backend:
            backend.set_backend(args.backend)
        return {"train": _cmd_train, "eval": _cmd_eval, "freeze": _cmd_freeze,
                "predict": _cmd_predict}[args.command](args)
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
