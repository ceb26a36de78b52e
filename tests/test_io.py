"""Atomic writes give files the permissions of the user's umask, as open() would."""

import os
import stat

import numpy as np
import pytest

from minibnn import deploy, io, models
from minibnn import train as T


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert io.current_umask() == mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the user's other files get
    expected = 0o666 & ~mask
    assert _mode(plain) == expected
    io.atomic_write_bytes(tmp_path / "a.bin", b"abc")
    io.atomic_savez(tmp_path / "b.npz", {"x": np.arange(3)})
    model = models.mnist_mlp(hidden=8, layers=1, dropout_in=0, dropout_hidden=0,
                             rng=np.random.default_rng(0))
    models.save_model(tmp_path / "model.npz", model)
    deploy.freeze(model.eval()).save(tmp_path / "model.frozen.npz")
    for name in ("a.bin", "b.npz", "model.npz", "model.frozen.npz"):
        assert _mode(tmp_path / name) == expected, name
    # rewriting an existing file (as every checkpoint does) gives the same mode
    io.atomic_write_bytes(tmp_path / "a.bin", b"abcd")
    assert _mode(tmp_path / "a.bin") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.bin", "b.npz", "model.frozen.npz", "model.npz", "plain.txt"]  # no temp file left


def test_run_folder_files_share_one_mode(tmp_path, umask):
    umask(0o027)
    cfg = T.TrainConfig(hidden=8, layers=1, epochs=1, batch_size=50, train_limit=100,
                        lr_start=0.01, lr_end=0.01)
    T.train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    modes = {p.name: _mode(p) for p in (tmp_path / "run").iterdir()}
    assert {T.CHECKPOINT, T.MODEL, T.METRICS} <= modes.keys()
    assert set(modes.values()) == {0o640}, modes
