"""Every name a user can choose, in one table: optimizers, losses, batch norms, learning-rate
schedules and architectures.

Each kind maps names to what they build; the dicts themselves live beside their
definitions (``optim.OPTIMIZERS``, ``losses.LOSSES``, ``models.BATCH_NORMS``,
``models.ARCHITECTURES``) and are collected here, so the command line, ``TrainConfig``
and the docs all offer the same choices.

    >>> from minibnn import registry
    >>> registry.choices("optimizer")
    ['adam', 'adamax', 'sgd', 'shift-adamax']
    >>> registry.lookup("bn", "shift").__name__
    'ShiftBatchNorm'
"""

from __future__ import annotations

from . import losses, models, optim

#: learning-rate schedules by name: the paper's Theano recipe and its Torch recipe
SCHEDULES = {"exp": optim.ExponentialDecay, "halve": optim.StepHalving}

REGISTRY = {
    "optimizer": optim.OPTIMIZERS,
    "loss": losses.LOSSES,
    "bn": models.BATCH_NORMS,
    "schedule": SCHEDULES,
    "arch": models.ARCHITECTURES,
}


def _kind(kind):
    if kind not in REGISTRY:
        raise ValueError(f"kind must be one of {sorted(REGISTRY)}, got {kind!r}")
    return REGISTRY[kind]


def choices(kind):
    """The names of ``kind`` (e.g. "optimizer"), sorted."""
    return sorted(_kind(kind))


def lookup(kind, name):
    """What ``name`` of ``kind`` builds; ValueError listing the choices for an unknown name."""
    table = _kind(kind)
    if name not in table:
        raise ValueError(f"{kind} must be one of {sorted(table)}, got {name!r}")
    return table[name]
