"""Run folders: what a training run leaves on disk.

A run folder holds ``checkpoint.npz``, rewritten atomically after every epoch (model,
optimizer moments, random-generator state, history, best epoch's weights), and at the end
``model.npz`` (the weights of the best validation epoch), ``metrics.json`` and, with
matplotlib, ``curves.png``. The checkpoint holds everything the next epoch depends on, so a
resumed run ends exactly where an uninterrupted one would.

A trainer owns its folder: ``claim`` creates it (a fresh, unique name when none is given),
takes an OS lock on ``train.lock`` that the kernel drops when the process ends or dies, and
removes what a killed writer left behind. A second trainer, or a ``--resume`` of a run that
is still training, is refused with the pid that holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np

from . import backend, io, models

CHECKPOINT = "checkpoint.npz"
MODEL = "model.npz"
METRICS = "metrics.json"
CURVES = "curves.png"
LOCK = "train.lock"
#: the files whose presence means a folder already holds a run
RUN_FILES = (CHECKPOINT, MODEL, METRICS)
#: what ``io.atomic_write_bytes`` leaves behind when its writer is killed mid-write:
#: ``NAME.<8 random characters>.tmp`` (``tempfile.mkstemp``) for the files a run writes
_STALE_TEMP = re.compile(r"^(%s)\.[A-Za-z0-9_]{8}\.tmp$" % "|".join(
    re.escape(name) for name in RUN_FILES))

try:
    import fcntl
except ImportError:  # not a POSIX system: runs work, unlocked
    fcntl = None


class RunLocked(RuntimeError):
    """The run folder is locked by another live trainer."""


def new_run_dir(parent, stem):
    """Create and return a fresh folder ``parent/stem-YYYYmmdd-HHMMSS``.

    ``os.mkdir`` is exclusive, so two runs started in the same second cannot share a
    folder: the second gets the suffix ``-2`` (then ``-3``, ...).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = parent / time.strftime(f"{stem}-%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: a thousand run folders of this name already exist")


def lock(run_dir):
    """Lock ``run_dir`` for this process (``fcntl.flock`` on ``run_dir/train.lock``) and
    return the open file descriptor; closing it, or the end of the process, unlocks.

    RunLocked, naming the pid that holds it, when another process has the folder. The lock
    file itself stays (deleting it would let a second process lock a fresh file while a
    third still holds the old one).
    """
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"{run_dir} is locked by pid {holder}: another trainer is writing "
                        "this run; wait for it to finish or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def holds_run(run_dir):
    """The first of ``RUN_FILES`` present in ``run_dir``, or None."""
    return next((n for n in RUN_FILES if (Path(run_dir) / n).exists()), None)


def remove_stale_temp_files(run_dir):
    """Delete the temporary files that writers killed mid-write left in ``run_dir``
    (only names of ``_STALE_TEMP``'s pattern); call it while holding the folder's lock, so
    no live writer's file is touched. Returns the names removed."""
    removed = []
    for entry in os.scandir(run_dir):
        if entry.is_file(follow_symlinks=False) and _STALE_TEMP.match(entry.name):
            os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


@contextlib.contextmanager
def claim(run_dir=None, resume=False, parent="runs", stem="run"):
    """Own a run folder for the duration of a ``with`` block; yields its Path.

    * new run, ``run_dir`` None: a fresh unique folder (``new_run_dir(parent, stem)``);
    * new run, ``run_dir`` given: created if missing (parents too); a folder that already
      holds a run is refused (FileExistsError: use ``resume``);
    * ``resume``: the folder must hold a checkpoint.

    Then the folder is locked (``lock``) and stale temporary files are removed. If the
    block fails before the first checkpoint of a new run exists, what ``claim`` created is
    removed again, so a failed start leaves no empty folder behind.
    """
    created, new_parent = None, None
    if run_dir is None:
        if resume:
            raise ValueError("resume needs the run folder")
        new_parent = None if Path(parent).exists() else Path(parent)
        run_dir = created = new_run_dir(parent, stem)
    run_dir = Path(run_dir)
    if not resume and created is None:
        if run_dir.exists() and not run_dir.is_dir():
            raise FileExistsError(f"{run_dir}: exists and is not a folder; choose another "
                                  "--out folder")
        existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
        try:
            run_dir.mkdir(parents=True)
            created = existing / run_dir.relative_to(existing).parts[0]
        except FileExistsError:
            pass
        except OSError as exc:
            raise OSError(f"cannot create the run folder {run_dir}: {exc.strerror}") from None
    if not resume and holds_run(run_dir):  # checked again under the lock below
        raise FileExistsError(f"{run_dir} already holds a run ({holds_run(run_dir)}); "
                              "pass --resume to continue it or choose another --out folder")
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir / CHECKPOINT}: no such checkpoint file; --resume "
                                "takes the folder of a run that finished at least one epoch")
    try:
        fd = lock(run_dir)
    except BaseException:
        _remove_created(created, new_parent)
        raise
    try:
        if not resume and holds_run(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run ({holds_run(run_dir)}); "
                                  "pass --resume to continue it or choose another --out folder")
        remove_stale_temp_files(run_dir)
        yield run_dir
    except BaseException:
        if not resume and not (run_dir / CHECKPOINT).exists():
            _remove_created(created, new_parent)
        raise
    finally:
        os.close(fd)


def _remove_created(created, new_parent):
    """Remove ``created`` (a folder this process made for a run) if nothing but the lock
    file was written into it, and ``new_parent`` (the ``runs`` folder, if this process
    made it too) if that leaves it empty."""
    if created is None:
        return
    leftovers = [p for p in Path(created).rglob("*") if p.is_file() and p.name != LOCK]
    if not leftovers:
        shutil.rmtree(created, ignore_errors=True)
    if new_parent is not None:
        with contextlib.suppress(OSError):
            new_parent.rmdir()  # only when empty: another run may have started in it


#: what a checkpoint's ``meta`` entry must hold
META_KEYS = ("config", "epoch", "history", "rng", "optim_t", "optim_lr", "n_params",
             "best_epoch", "best_valid")


def save_checkpoint(run_dir, config, epoch, model, opt, rng, history, best, data=None,
                    ranks=1):
    """Write the run's state after ``epoch`` epochs to ``run_dir/checkpoint.npz``.

    ``config`` is the run's options (a dict), ``rng`` the generator that shuffles and drops
    out, ``best`` a dict with the best epoch, its validation error and its state dict,
    ``data`` what the run trained on (``train.data_record``), ``ranks`` the number of
    data-parallel processes that trained it.
    """
    io.atomic_savez(Path(run_dir) / CHECKPOINT,
                    checkpoint_arrays(config, epoch, model, opt, rng, history, best, data, ranks))


class CheckpointWriter:
    """Writes checkpoints in a background thread while training goes on.

    ``submit`` copies the run's state at once (``checkpoint_arrays``: host copies, so later
    steps cannot change it) and writes the file in a thread, atomically as
    ``save_checkpoint`` does; at most one write is in flight (``submit`` first waits for the
    previous one). ``wait`` returns once the last write is on disk and raises its error if
    it failed; ``written`` is the epoch of the last checkpoint known to be on disk. Why: the
    paper's 3 x 4096 MLP writes 590 MB per epoch (weights, best weights, Adam's moments),
    1.7-2.5 s on this project's machines, longer than the 0.8 s a GPU epoch takes to train.
    A failed write surfaces at the next ``submit`` or ``wait``: the run then stops one epoch
    later than a synchronous write would, with the same last good checkpoint.
    """

    def __init__(self, written=0):
        self._thread = None
        self._error = None
        self._pending = written
        self.written = written  # a resumed run starts from the checkpoint it read

    def submit(self, run_dir, config, epoch, model, opt, rng, history, best, data=None,
               ranks=1):
        import threading
        self.wait()
        arrays = checkpoint_arrays(config, epoch, model, opt, rng, history, best, data, ranks)
        path = Path(run_dir) / CHECKPOINT

        def write():
            try:
                io.atomic_savez(path, arrays)
            except BaseException as exc:  # noqa: BLE001  (handed to the training thread)
                self._error = exc

        self._pending = epoch
        self._thread = threading.Thread(target=write, name="minibnn-checkpoint", daemon=True)
        self._thread.start()

    def wait(self):
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None:
                self.written = self._pending
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def settle(self):
        """``wait`` without raising (for exit paths that already carry an error); returns
        ``written``."""
        try:
            self.wait()
        except BaseException:  # noqa: BLE001  (the caller reports the run's own error)
            pass
        return self.written


def checkpoint_arrays(config, epoch, model, opt, rng, history, best, data=None, ranks=1):
    """The arrays of a checkpoint (see ``save_checkpoint``), as host copies."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"best/{k}": v for k, v in best["state"].items()})
    sd = opt.state_dict()
    for i, s in enumerate(sd["state"]):
        arrays.update({f"optim/{i}/{k}": v for k, v in s.items()})
    meta = dict(config=config, epoch=epoch, history=history,
                rng=rng.bit_generator.state, optim_t=sd["t"], optim_lr=sd["lr"],
                n_params=len(sd["state"]),
                best_epoch=best["epoch"], best_valid=best["valid"], data=data,
                ranks=int(ranks))
    arrays["meta"] = io.json_array(meta)
    return arrays


def read_checkpoint(run_dir):
    """A run folder's checkpoint as a dict: ``meta`` (config, epoch, history, generator
    state, ...), ``model`` and ``best`` state dicts, ``optim`` (one dict per parameter).

    A missing ``meta`` key or a NaN or infinity in any array is a ValueError naming the
    file and what is wrong (missing optimizer arrays are caught by
    ``Optimizer.load_state_dict``).
    """
    return read_checkpoint_file(Path(run_dir) / CHECKPOINT)


def read_checkpoint_file(path):
    """``read_checkpoint`` of the checkpoint file ``path`` itself, wherever it lies."""
    path = Path(path)
    with io.open_npz(path, "checkpoint") as z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a minibnn checkpoint (no 'meta' entry)")
        meta = io.read_json(z, "meta", path)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: damaged 'meta' entry (not a JSON object)")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{path}: damaged checkpoint: its 'meta' entry lacks "
                             f"{', '.join(map(repr, missing))}")
        ck = dict(meta=meta, model=io.read_prefixed(z, "model/", path),
                  best=io.read_prefixed(z, "best/", path))
        ck["optim"] = [io.read_prefixed(z, f"optim/{i}/", path) for i in range(meta["n_params"])]
    for name in ("model", "best"):
        if not ck[name]:
            raise ValueError(f"{path}: damaged checkpoint: no '{name}/' arrays")
        io.check_finite(ck[name], path, f"{name}/")
    for i, state in enumerate(ck["optim"]):
        io.check_finite(state, path, f"optim/{i}/")
    return ck


#: history keys that time an epoch (they differ between runs that compute the same thing)
TIMING_KEYS = ("seconds", "images_per_second", "wall_seconds")


def without_timings(history):
    """``history`` without its timing keys: what two runs of the same computation share."""
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def _mean_or_none(values):
    values = [v for v in values if v is not None]  # runs before wall_seconds lack it
    return float(np.mean(values)) if values else None


def write_results(run_dir, config, model_config, history, best, log=print, data=None):
    """Finish a run: ``model.npz`` (best validation epoch), ``metrics.json``, ``curves.png``.

    The test error reported is the one measured at the best validation epoch. Returns the
    metrics dict.
    """
    model = models.build(model_config, rng=np.random.default_rng(0))
    model.load_state_dict(best["state"])
    test_at_best = history[best["epoch"] - 1]["test_error"]
    metrics = dict(
        config=config, data=data, history=history, finished=True,
        best_epoch=best["epoch"], best_valid_error=best["valid"], test_error=test_at_best,
        seconds_per_epoch=float(np.mean([h["seconds"] for h in history])),
        wall_seconds_per_epoch=_mean_or_none([h.get("wall_seconds") for h in history]),
        backend=backend.active(), machine=dict(platform=platform.platform(),
                                               processor=platform.processor(),
                                               cpus=os.cpu_count(), numpy=np.__version__))
    models.save_model(Path(run_dir) / MODEL, model,
                      extra=dict(test_error=test_at_best, best_epoch=best["epoch"], data=data,
                                 run_config=config,
                                 zca=bool(config.get("zca"))))  # its input is not raw pixels
    io.atomic_write_bytes(Path(run_dir) / METRICS, json.dumps(metrics, indent=2).encode())
    plot_curves(history, Path(run_dir) / CURVES)
    log(result_line(metrics, run_dir))
    return metrics


def result_line(metrics, run_dir):
    """The one line that reports a finished run (the last line of ``train``'s log; all that
    ``python -m minibnn train --quiet`` prints)."""
    return (f"best validation error {100 * metrics['best_valid_error']:.2f}% at epoch "
            f"{metrics['best_epoch']}; test error there {100 * metrics['test_error']:.2f}%  "
            f"(run folder: {run_dir})")


def plot_curves(history, path):
    """Learning curves (train/valid/test error and loss per epoch) as a PNG, if matplotlib
    is installed; returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_error", "valid_error", "test_error"):
        ax1.plot(epochs, [100 * h[key] for h in history], label=key.replace("_", " "))
    ax1.set(xlabel="epoch", ylabel="error (%)", yscale="log", title="error")
    ax1.legend()
    ax2.plot(epochs, [h["train_loss"] for h in history])
    ax2.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
