"""How many epochs of a run fit in a wall-clock budget, from a short probe run of it.

    python benchmarks/fit_epochs.py PROBE_RUN/metrics.json --probe-seconds S \
        [--budget 540] [--margin 0.07] [--cap 1000]

prints one integer: the epochs to give the real run so that it ends within ``--budget``
seconds (start-up, data loading, the first epoch's compilation and graph capture, the
final writes included). The probe is the same command with ``--epochs 3`` (at least 2);
``--probe-seconds`` is its whole wall time. From the probe's history
(``wall_seconds`` of each epoch: training, evaluation and the checkpoint hand-off):

    steady = mean wall_seconds of epochs 2 ..      (epoch 1 pays compilation and capture)
    fixed  = probe_seconds - the sum of those      (start-up, epoch 1, final writes)
    epochs = 1 + floor((budget * (1 - margin) - fixed) / steady)

capped at ``--cap`` and at least 1. Used by ``gpu_check.sh`` to size the 9-minute runs of
issue #8 (CIFAR-10) and #9 (the MNIST recipe) on the machine at hand; the run's exponential
learning-rate schedule then spans the epochs chosen (its end points stay the recipe's).
"""

import argparse
import json
import math
import sys


def fit_epochs(history, probe_seconds, budget, margin=0.07, cap=None):
    """Epochs that fit in ``budget`` seconds (see the module docstring). ValueError when the
    probe has fewer than 2 epochs or lacks ``wall_seconds``."""
    if len(history) < 2:
        raise ValueError(f"the probe ran {len(history)} epoch(s); at least 2 are needed "
                         "(the first pays compilation and capture)")
    walls = [h.get("wall_seconds") for h in history[1:]]
    if any(w is None or not w > 0 for w in walls):
        raise ValueError("the probe's history lacks wall_seconds (a minibnn older than "
                         "checkpoint_every?)")
    steady = sum(walls) / len(walls)
    fixed = probe_seconds - sum(walls)
    epochs = 1 + math.floor((budget * (1 - margin) - fixed) / steady)
    if cap is not None:
        epochs = min(epochs, cap)
    return max(1, epochs), steady, fixed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="the probe run's metrics.json")
    p.add_argument("--probe-seconds", type=float, required=True,
                   help="the probe's whole wall time")
    p.add_argument("--budget", type=float, default=540.0, help="seconds (default 540)")
    p.add_argument("--margin", type=float, default=0.07,
                   help="fraction of the budget kept free (default 0.07)")
    p.add_argument("--cap", type=int, default=None, help="at most this many epochs")
    args = p.parse_args(argv)
    with open(args.metrics) as f:
        history = json.load(f)["history"]
    epochs, steady, fixed = fit_epochs(history, args.probe_seconds, args.budget, args.margin,
                                       args.cap)
    print(f"steady {steady:.2f} s/epoch, fixed {fixed:.1f} s: {epochs} epochs fit in "
          f"{args.budget:.0f} s", file=sys.stderr)
    print(epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
