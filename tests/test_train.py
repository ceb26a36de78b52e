"""Training loop, checkpoints, resume, interruption and the command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minibnn import runs
from minibnn import train as T

ROOT = Path(__file__).resolve().parents[1]


def small(**kw):
    base = dict(hidden=32, layers=2, epochs=3, batch_size=50, train_limit=600, seed=3,
                lr_start=0.01, lr_end=0.001)
    base.update(kw)
    return T.TrainConfig(**base)


def quiet(*_):
    pass


def read_model(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k.startswith("state/")}


@pytest.mark.slow
def test_training_learns_and_writes_run_folder(tmp_path):
    m = T.train(small(epochs=3), tmp_path / "run", progress=False, log=quiet)
    hist = m["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert m["test_error"] < 0.5  # 10 classes: chance is 0.9
    best = min(range(3), key=lambda i: (hist[i]["valid_error"], i))
    assert m["best_epoch"] == best + 1
    assert m["test_error"] == hist[best]["test_error"]
    for name in (T.CHECKPOINT, T.MODEL, T.METRICS):
        assert (tmp_path / "run" / name).is_file()
    saved = json.loads((tmp_path / "run" / T.METRICS).read_text())
    assert saved["test_error"] == m["test_error"]
    model, meta = T.load_model(tmp_path / "run" / T.MODEL)
    assert meta["best_epoch"] == m["best_epoch"]
    x, y = T.prepare_data(small())[4:]
    assert T.error_rate(model, x, y) == pytest.approx(m["test_error"])


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path):
    cfg = small(epochs=3, stochastic=True, bn="shift", optimizer="shift-adamax")
    full = T.train(cfg, tmp_path / "full", progress=False, log=quiet)
    part = T.train(small(epochs=3, stochastic=True, bn="shift", optimizer="shift-adamax"),
                   tmp_path / "part", progress=False, stop_after=1, log=quiet)
    assert not part["finished"] and len(part["history"]) == 1
    T.train(run_dir=tmp_path / "part", resume=True, progress=False, stop_after=1, log=quiet)
    resumed = T.train(run_dir=tmp_path / "part", resume=True, progress=False, log=quiet)
    strip = runs.without_timings
    assert strip(resumed["history"]) == strip(full["history"])
    a, b = read_model(tmp_path / "full" / T.MODEL), read_model(tmp_path / "part" / T.MODEL)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(tmp_path):
    T.train(small(epochs=1), tmp_path / "run", progress=False, log=quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(small(epochs=1), tmp_path / "run", progress=False, log=quiet)


@pytest.mark.slow
def test_damaged_checkpoint_is_reported(tmp_path):
    T.train(small(epochs=1), tmp_path / "run", progress=False, log=quiet)
    ck = tmp_path / "run" / T.CHECKPOINT
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    with pytest.raises(ValueError, match="checkpoint"):
        T.read_checkpoint(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        T.read_checkpoint(tmp_path / "nothing-here")


def test_bad_config_is_rejected():
    for bad in (dict(optimizer="rmsprop"), dict(epochs=0), dict(loss="l1"), dict(schedule="cos"),
                dict(train_limit=0)):
        with pytest.raises(ValueError):
            small(**bad).validate()


def _cli(*args, cwd, **kw):
    """``python -m minibnn ARGS`` in the folder ``cwd`` (a tmp_path: never the checkout)."""
    # this checkout first, then the caller's path (where a stand-in such as tools/fake_cupy
    # may live): the child runs on the backend the suite runs on
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "minibnn", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


QUICK = ["train", "--hidden", "32", "--layers", "1", "--batch-size", "50", "--train-limit",
         "300", "--no-progress", "--seed", "5"]


def _wait_for_epochs(run, n, proc, timeout=120):
    """Wait until the checkpoint in ``run`` records ``n`` finished epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if T.read_checkpoint(run)["meta"]["epoch"] >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError("training did not reach its checkpoint in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, sig):
    run = tmp_path / "run"
    # Ctrl-C's default action in the child even where the suite itself runs with SIGINT
    # ignored (nohup-like runners: Python then keeps ignoring it, and the run would finish)
    proc = _cli(*QUICK, "--epochs", "400", "--out", str(run), cwd=tmp_path,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_epochs(run, 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-2000:])
        assert "--resume" in err and str(run) in err
    done = T.read_checkpoint(run)["meta"]["epoch"]
    assert 2 <= done < 400
    # finish the interrupted run in fewer total epochs than asked: rewrite its config
    ck = T.read_checkpoint(run)
    assert ck["meta"]["config"]["epochs"] == 400
    resumed = T.train(run_dir=run, resume=True, progress=False, stop_after=1, log=quiet)
    assert len(resumed["history"]) == done + 1
    reference = T.train(T.TrainConfig(**ck["meta"]["config"]), tmp_path / "ref",
                        progress=False, stop_after=done + 1, log=quiet)
    assert [h["train_loss"] for h in resumed["history"]] == \
        [h["train_loss"] for h in reference["history"]]


@pytest.mark.slow
def test_cli_train_and_eval(tmp_path):
    run = tmp_path / "run"
    proc = _cli(*QUICK, "--epochs", "2", "--out", str(run), cwd=tmp_path)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "epoch   2/2" in out and "test error there" in out
    metrics = json.loads((run / T.METRICS).read_text())
    proc = _cli("eval", str(run), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"test error {100 * metrics['test_error']:.2f}%" in out


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = _cli("train", "--resume", str(tmp_path / "missing"), "--no-progress", cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "error:" in err and "checkpoint" in err and "Traceback" not in err
    proc = _cli(*QUICK, "--epochs", "1", "--data-dir", str(tmp_path), cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # a failed start leaves no run folder


# --- sizes from the data: input shape, classes, validation split ---------------------------

def _idx_folder(folder, side=12, classes=4, n_train=160, n_test=40, seed=0):
    """An MNIST-layout folder of small random images whose label is set by their brightness,
    so a network can learn it; ``classes`` classes of ``side`` x ``side`` images."""
    from minibnn import data
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        images = rng.integers(0, 40, (n, side, side)) + (200 * labels / (classes - 1))[:, None, None]
        data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    return folder


def test_model_sizes_come_from_the_data(tmp_path):
    folder = _idx_folder(tmp_path / "data", side=12, classes=4)
    cfg = T.TrainConfig(hidden=16, layers=1, epochs=1, batch_size=20, val_size=40,
                        data_dir=str(folder), lr_start=0.01, lr_end=0.01)
    m = T.train(cfg, tmp_path / "mlp", progress=False, log=quiet)
    assert list(m["config"]["input_shape"]) == [144] and m["config"]["classes"] == 4
    model, _ = T.load_model(tmp_path / "mlp" / T.MODEL)
    assert model.config["in_features"] == 144 and model.config["classes"] == 4
    tx, ty, vx, vy, sx, sy = T.prepare_data(cfg)
    assert tx.shape == (120, 144) and vx.shape == (40, 144) and sx.shape == (40, 144)
    assert T.predict(model, sx).max() < 4
    conv = T.TrainConfig(model="convnet", epochs=1, batch_size=20, val_size=40,
                         data_dir=str(folder), lr_start=0.01, lr_end=0.01)
    m = T.train(conv, tmp_path / "conv", progress=False, log=quiet)
    assert list(m["config"]["input_shape"]) == [1, 12, 12]
    model, _ = T.load_model(tmp_path / "conv" / T.MODEL)
    assert (model.config["in_channels"], model.config["image_size"]) == (1, 12)
    from minibnn import deploy
    frozen = deploy.freeze(model)
    assert frozen.input_shape == (1, 12, 12) and frozen.classes == 4


def test_default_configs_are_unchanged_by_the_data_sizes():
    assert T.TrainConfig().model_config() == T.TrainConfig().fit_data((784,), 10).model_config()
    conv = T.TrainConfig(model="convnet")
    assert conv.model_config() == conv.fit_data((1, 28, 28), 10).model_config()
    assert "in_features" not in T.TrainConfig().model_config()
    with pytest.raises(ValueError, match="multiple of 4"):
        conv.fit_data((1, 30, 30), 10).model_config()
    with pytest.raises(ValueError, match="input_shape"):
        T.TrainConfig(model="convnet", dataset="cifar10",
                      data_dir="x").fit_data((3, 28, 28), 10).model_config()
    with pytest.raises(ValueError, match="classes: the run was built for 10"):
        T.TrainConfig(classes=10).fit_data((784,), 4)
    with pytest.raises(ValueError, match="at least two"):
        T.classes_in(np.zeros(5, np.int64))
    assert T.classes_in(np.array([0, 3]), np.array([7])) == 8


def test_val_size(tmp_path):
    assert len(T.prepare_data(T.TrainConfig())[2]) == 10000  # the paper's 50k / 10k
    tx, _, vx, _, _, _ = T.prepare_data(T.TrainConfig(val_size=500))
    assert (len(tx), len(vx)) == (59500, 500)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="val_size"):
            T.TrainConfig(val_size=bad).validate()
    with pytest.raises(ValueError, match="val_size: SVHN"):
        T.TrainConfig(dataset="svhn", data_dir="x", model="convnet", val_size=10).validate()
    folder = _idx_folder(tmp_path / "data", n_train=100)
    for size in (None, 100):  # the default 10,000 and an explicit size: nothing left to train
        with pytest.raises(ValueError, match="val_size.*--val-size"):
            T.prepare_data(T.TrainConfig(data_dir=str(folder), val_size=size))


def test_checkpoint_every_writes_fewer_checkpoints_with_the_same_results(tmp_path, monkeypatch):
    """checkpoint_every=2 over 3 epochs: checkpoints after epochs 2 and 3 (the last) only,
    the same history and model as checkpointing every epoch; each entry has wall_seconds
    and metrics their mean. A run interrupted in epoch 4 of 5 keeps epoch 2's checkpoint,
    says so, and resumed from it ends where the uninterrupted run ends."""
    cfg = dict(epochs=3, stochastic=True, dropout_in=0.2)
    every = T.train(small(**cfg), tmp_path / "every", progress=False, log=quiet)
    written = []
    real_submit = runs.CheckpointWriter.submit

    def submit(self, run_dir, config, epoch, *args, **kw):
        written.append(epoch)
        return real_submit(self, run_dir, config, epoch, *args, **kw)

    monkeypatch.setattr(runs.CheckpointWriter, "submit", submit)
    said = []
    sparse = T.train(small(**cfg), tmp_path / "sparse", progress=False, log=said.append,
                     checkpoint_every=2)
    monkeypatch.undo()
    assert written == [2, 3]
    assert [s.endswith("(no checkpoint)") for s in said if s.startswith("epoch")] == \
        [True, False, False]
    assert runs.without_timings(sparse["history"]) == runs.without_timings(every["history"])
    assert all(h["wall_seconds"] > 0 for h in sparse["history"])
    assert sparse["wall_seconds_per_epoch"] == pytest.approx(
        np.mean([h["wall_seconds"] for h in sparse["history"]]))
    a, b = read_model(tmp_path / "every" / T.MODEL), read_model(tmp_path / "sparse" / T.MODEL)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    full = T.train(small(**dict(cfg, epochs=5)), tmp_path / "full", progress=False, log=quiet)
    calls = []
    real_epoch = T.train_epoch

    def interrupt_fourth(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_epoch(*args, **kw)

    monkeypatch.setattr(T, "train_epoch", interrupt_fourth)
    with pytest.raises(T.TrainingInterrupted) as info:
        T.train(small(**dict(cfg, epochs=5)), tmp_path / "cut", progress=False, log=quiet,
                checkpoint_every=2)
    monkeypatch.undo()
    assert "epoch 2" in str(info.value)
    assert runs.read_checkpoint(tmp_path / "cut")["meta"]["epoch"] == 2
    resumed = T.train(run_dir=tmp_path / "cut", resume=True, progress=False, log=quiet,
                      checkpoint_every=3)
    assert runs.without_timings(resumed["history"]) == runs.without_timings(full["history"])
    a, b = read_model(tmp_path / "full" / T.MODEL), read_model(tmp_path / "cut" / T.MODEL)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3", None])
def test_checkpoint_every_must_be_a_positive_int(tmp_path, bad):
    with pytest.raises(T.ConfigError, match=r"checkpoint_every expected a positive number"):
        T.train(small(), tmp_path / "run", progress=False, log=quiet, checkpoint_every=bad)
    assert not (tmp_path / "run").exists()


def test_cli_checkpoint_every_is_checked_before_any_folder(tmp_path, capsys):
    from minibnn import cli
    code = cli.main(["train", "--no-progress", "--hidden", "16", "--checkpoint-every", "0",
                     "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--checkpoint-every expected a positive number of epochs, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
