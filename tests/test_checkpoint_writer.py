"""runs.CheckpointWriter: checkpoints written in the background hold the state of the moment
they were submitted, land atomically, and report a failed write."""

import numpy as np
import pytest

import minibnn as bnn
from minibnn import models, optim, runs


def _run_state():
    model = models.mnist_mlp(hidden=16, layers=1, rng=bnn.seed(0))
    opt = optim.Adam(model.parameters(), lr=1e-3)
    for p in opt.params:
        p.grad = np.ones_like(p.data)
    opt.step()
    best = dict(epoch=1, valid=0.5, state=model.state_dict())
    return model, opt, best


def test_a_submitted_checkpoint_holds_the_state_of_its_submit(tmp_path):
    model, opt, best = _run_state()
    writer = runs.CheckpointWriter()
    writer.submit(tmp_path, {"a": 1}, 1, model, opt, np.random.default_rng(0), [], best)
    want = {k: v.copy() for k, v in model.state_dict().items()}
    for p in model.parameters():  # training goes on while the file is written
        p.data += 1.0
    writer.wait()
    assert writer.written == 1
    ck = runs.read_checkpoint_file(tmp_path / runs.CHECKPOINT)
    assert ck["meta"]["epoch"] == 1
    for k, v in want.items():
        np.testing.assert_array_equal(ck["model"][k], v)
    assert not list(tmp_path.glob("*.tmp*"))  # no temporary file left behind


def test_a_failed_write_is_reported_and_the_last_good_epoch_kept(tmp_path):
    model, opt, best = _run_state()
    writer = runs.CheckpointWriter(written=3)  # a resumed run: epoch 3 is on disk
    missing = tmp_path / "gone"                # the folder does not exist: the write fails
    writer.submit(missing, {}, 4, model, opt, np.random.default_rng(0), [], best)
    with pytest.raises(OSError):
        writer.wait()
    assert writer.written == 3
    writer.wait()  # the error was reported once
    writer.submit(missing, {}, 5, model, opt, np.random.default_rng(0), [], best)
    assert writer.settle() == 3  # settle never raises
    writer.submit(tmp_path, {}, 6, model, opt, np.random.default_rng(0), [], best)
    writer.wait()
    assert writer.written == 6
