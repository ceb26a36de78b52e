"""The registry: one table of option names, used by TrainConfig and the command line."""

import argparse

import pytest

from minibnn import cli, losses, models, nn, optim, registry
from minibnn.train import TrainConfig


def test_every_kind_lists_what_it_builds():
    assert registry.choices("optimizer") == sorted(optim.OPTIMIZERS)
    assert registry.lookup("optimizer", "shift-adamax") is optim.ShiftAdaMax
    assert registry.lookup("loss", "squared-hinge") is losses.squared_hinge
    assert registry.lookup("bn", "shift") is nn.ShiftBatchNorm
    assert registry.lookup("schedule", "exp") is optim.ExponentialDecay
    assert registry.lookup("arch", "mnist_mlp") is models.mnist_mlp
    assert registry.lookup("arch", "cifar10_convnet") is models.cifar10_convnet


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam'.*got 'rmsprop'"):
        registry.lookup("optimizer", "rmsprop")
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.choices("activation")
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="cosine").validate()
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="resnet").validate()
    with pytest.raises(ValueError, match="dataset must be one of"):
        TrainConfig(dataset="imagenet").validate()


def _train_choices(option):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    return next(a.choices for a in train._actions if option in a.option_strings)


@pytest.mark.parametrize("option, kind", [("--optimizer", "optimizer"), ("--loss", "loss"),
                                          ("--bn", "bn"), ("--schedule", "schedule")])
def test_the_command_line_offers_the_registry(option, kind, monkeypatch):
    """Adding a name to a registry dict makes it a CLI choice, with nothing else to edit."""
    assert sorted(_train_choices(option)) == registry.choices(kind)
    monkeypatch.setitem(registry.REGISTRY[kind], "extra-choice", object())
    assert "extra-choice" in _train_choices(option)
