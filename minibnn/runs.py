"""Run folders: what a training run leaves on disk.

A run folder holds ``checkpoint.npz``, rewritten atomically after every epoch (model,
optimizer moments, random-generator state, history, best epoch's weights), and at the end
``model.npz`` (the weights of the best validation epoch), ``metrics.json`` and, with
matplotlib, ``curves.png``. The checkpoint holds everything the next epoch depends on, so a
resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from . import backend, io, models

CHECKPOINT = "checkpoint.npz"
MODEL = "model.npz"
METRICS = "metrics.json"
CURVES = "curves.png"


def save_checkpoint(run_dir, config, epoch, model, opt, rng, history, best, ranks=1):
    """Write the run's state after ``epoch`` epochs to ``run_dir/checkpoint.npz``.

    ``config`` is the run's options (a dict), ``rng`` the generator that shuffles and drops
    out, ``best`` a dict with the best epoch, its validation error and its state dict,
    ``ranks`` the number of data-parallel processes that trained it.
    """
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"best/{k}": v for k, v in best["state"].items()})
    sd = opt.state_dict()
    for i, s in enumerate(sd["state"]):
        arrays.update({f"optim/{i}/{k}": v for k, v in s.items()})
    meta = dict(config=config, epoch=epoch, history=history,
                rng=rng.bit_generator.state, optim_t=sd["t"], optim_lr=sd["lr"],
                n_params=len(sd["state"]), best_epoch=best["epoch"], best_valid=best["valid"],
                ranks=int(ranks))
    arrays["meta"] = io.json_array(meta)
    io.atomic_savez(Path(run_dir) / CHECKPOINT, arrays)


def read_checkpoint(run_dir):
    """A run folder's checkpoint as a dict: ``meta`` (config, epoch, history, generator
    state, ...), ``model`` and ``best`` state dicts, ``optim`` (one dict per parameter)."""
    path = Path(run_dir) / CHECKPOINT
    with io.open_npz(path, "checkpoint") as z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a minibnn checkpoint (no 'meta' entry)")
        meta = io.read_json(z, "meta", path)
        ck = dict(meta=meta, model=io.read_prefixed(z, "model/", path),
                  best=io.read_prefixed(z, "best/", path))
        ck["optim"] = [io.read_prefixed(z, f"optim/{i}/", path) for i in range(meta["n_params"])]
    return ck


def write_results(run_dir, config, model_config, history, best, log=print):
    """Finish a run: ``model.npz`` (best validation epoch), ``metrics.json``, ``curves.png``.

    The test error reported is the one measured at the best validation epoch. Returns the
    metrics dict.
    """
    model = models.build(model_config, rng=np.random.default_rng(0))
    model.load_state_dict(best["state"])
    test_at_best = history[best["epoch"] - 1]["test_error"]
    metrics = dict(
        config=config, history=history, finished=True,
        best_epoch=best["epoch"], best_valid_error=best["valid"], test_error=test_at_best,
        seconds_per_epoch=float(np.mean([h["seconds"] for h in history])),
        backend=backend.active(), machine=dict(platform=platform.platform(),
                                               processor=platform.processor(),
                                               cpus=os.cpu_count(), numpy=np.__version__))
    models.save_model(Path(run_dir) / MODEL, model,
                      extra=dict(test_error=test_at_best, best_epoch=best["epoch"]))
    io.atomic_write_bytes(Path(run_dir) / METRICS, json.dumps(metrics, indent=2).encode())
    plot_curves(history, Path(run_dir) / CURVES)
    log(f"best validation error {100 * best['valid']:.2f}% at epoch {best['epoch']}; "
        f"test error there {100 * test_at_best:.2f}%  (run folder: {run_dir})")
    return metrics


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
