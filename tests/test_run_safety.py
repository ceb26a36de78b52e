"""Issue 12: nothing silent, nothing lost, one clear error.

Each test stands for a class of failure: a run scored on the wrong data, an option or a
file that would train or load garbage, a run folder shared or left behind, a traceback
where one ``error:`` line should be.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minibnn import backend, cli, data, deploy, io, losses, models, nn, optim, runs
from minibnn import train as T
from minibnn.tensor import Tensor

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def child_env(**extra):
    """The environment of a child Python: this checkout first on its path, then the caller's
    PYTHONPATH (where a stand-in package such as a fake CuPy may live)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def small(**kw):
    base = dict(hidden=16, layers=1, epochs=2, batch_size=50, train_limit=200, seed=1,
                lr_start=0.01, lr_end=0.001)
    base.update(kw)
    return T.TrainConfig(**base)


def fake_mnist(folder, n_train=10200, n_test=300, size=28, seed=0, bad=None):
    """The four IDX files in MNIST's layout under ``folder``: random images and labels.
    ``bad`` = ("train" | "valid" | "test"): one label 10 (out of range) in that split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ty = rng.integers(0, 10, n_train).astype(np.uint8)
    sy = rng.integers(0, 10, n_test).astype(np.uint8)
    if bad == "train":
        ty[3] = 10
    elif bad == "valid":
        ty[-5] = 10  # the last 10,000 training images validate
    elif bad == "test":
        sy[7] = 10
    data.write_idx(folder / "train-images-idx3-ubyte",
                   rng.integers(0, 256, (n_train, size, size), dtype=np.uint8))
    data.write_idx(folder / "train-labels-idx1-ubyte", ty)
    data.write_idx(folder / "t10k-images-idx3-ubyte",
                   rng.integers(0, 256, (n_test, size, size), dtype=np.uint8))
    data.write_idx(folder / "t10k-labels-idx1-ubyte", sy)
    return folder


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """An unfinished run (1 of 2 epochs) on the shipped MNIST; copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    T.train(small(), run, progress=False, stop_after=1, log=quiet)
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_npz(path, drop=(), **replace):
    """Rewrite the archive at ``path`` without the entries ``drop``, with ``replace``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace)
    io.atomic_savez(path, arrays)


def cli_error(capsys, argv, code=2):
    """Run the CLI in-process; return its stderr, checked to be one ``error:`` line."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- silent wrong results ----------------------------------------------------------------------

def test_eval_scores_a_run_on_its_own_data(tmp_path, capsys, monkeypatch):
    fake_mnist(tmp_path / "work" / "digits")
    monkeypatch.chdir(tmp_path / "work")
    run = tmp_path / "run"
    T.train(small(epochs=1, data_dir="digits"), run, progress=False, log=quiet)
    ck = T.read_checkpoint(run)
    absolute = str((tmp_path / "work" / "digits").resolve())
    assert ck["meta"]["config"]["data_dir"] == absolute  # relative --data-dir made absolute
    record = ck["meta"]["data"]
    assert record["dataset"] == "mnist" and record["data_dir"] == absolute
    assert record["split"] == dict(train=200, valid=10000, test=300, train_limit=200)
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative path would no longer resolve
    for target in (run, run / T.MODEL):
        assert cli.main(["eval", str(target)]) == 0
        out = capsys.readouterr().out
        assert f"on 300 mnist test images from {absolute} (the run's own data" in out
    # the data changed under the run: refused, unless --data-dir says to score elsewhere
    fake_mnist(tmp_path / "work" / "digits", seed=9)
    err = cli_error(capsys, ["eval", str(run)])
    assert "is not the data" in err and absolute in err and "--data-dir" in err
    assert cli.main(["eval", str(run), "--data-dir", str(tmp_path / "work" / "digits")]) == 0
    assert "on 300 mnist test images" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, says", [
    ("--lr-start", "inf", "--lr-start must be a finite number"),
    ("--lr-end", "nan", "--lr-end must be a finite number"),
    ("--lr-start", "-0.1", "--lr-start must be > 0"),
    ("--hidden", "-5", "--hidden must be >= 1"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--batch-size", "1", "--batch-size must be >= 2"),
    ("--dropout-in", "1", "--dropout-in must be in [0.0, 1.0)"),
    ("--dropout-hidden", "-0.2", "--dropout-hidden must be in [0.0, 1.0)"),
    ("--bn-momentum", "inf", "--bn-momentum must be a finite number"),
    ("--train-limit", "1", "--train-limit must be >= 2"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--bn-recompute", "1", "--bn-recompute must be 0 (off) or >= 2"),
])
def test_out_of_range_options_are_refused(option, value, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, ["train", "--no-progress", option, value])
    assert err.startswith(f"error: {says}")
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys,
                                                                    monkeypatch, one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    before = (run / T.CHECKPOINT).read_bytes()
    real, calls = T.train_step, []

    def nan_in_the_third_batch(model, opt, loss_fn, x, y, dp=None):
        loss, scores = real(model, opt, loss_fn, x, y, dp)
        calls.append(1)
        return (Tensor(np.float32(np.nan)) if len(calls) == 3 else loss), scores

    monkeypatch.setattr(T, "train_step", nan_in_the_third_batch)
    # the NaN is injected in Python, which a replayed CUDA graph does not run: eager steps
    monkeypatch.setenv("MINIBNN_CUDA_GRAPH", "0")
    err = cli_error(capsys, ["train", "--resume", str(run), "--no-progress"])
    # the loss is read on the host every `every` batches (1 on the CPU, more on cupy): the
    # error names the batches summed since the last read, and the epoch stops at that read
    every = T.HOST_READ_EVERY.get(backend.active(), 1)
    first = (3 - 1) // every * every + 1
    assert 3 <= len(calls) <= first + every - 1
    where = f"batches {first} to {len(calls)}" if first < len(calls) else f"batch {first}"
    assert f"epoch 2: the training loss became nan in {where} " in err
    assert "last good checkpoint (epoch 1) is kept" in err
    assert (run / T.CHECKPOINT).read_bytes() == before
    assert not (run / T.MODEL).exists() and not (run / T.METRICS).exists()
    # a new run that diverges at once: finite options, no checkpoint, no folder left
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, ["train", "--no-progress", "--hidden", "16", "--layers", "1",
                             "--train-limit", "200", "--optimizer", "sgd", "--lr-start", "1e30",
                             "--out", "boom"])
    assert "training loss became" in err and "nothing was saved" in err
    assert not (tmp_path / "boom").exists()


@pytest.mark.parametrize("split", ["valid", "test"])
def test_labels_outside_the_classes_are_refused_in_every_split(split, tmp_path):
    fake_mnist(tmp_path / "d", bad=split)
    name = {"valid": "validation", "test": "test"}[split]
    with pytest.raises(data.DatasetError,
                       match=f"{name} split: 1 label outside the 10 classes .*expected 0..9"):
        T.prepare_data(small(data_dir=str(tmp_path / "d")))
    # a run that recorded its classes checks its training split the same way
    fake_mnist(tmp_path / "t", bad="train")
    with pytest.raises(data.DatasetError,
                       match="training split: 1 label outside the 10 classes .*expected 0..9"):
        T.prepare_data(small(data_dir=str(tmp_path / "t"), classes=10))


def test_the_training_labels_define_the_classes(tmp_path):
    """Classes come from the data (issue #12): the training split's labels name them, so a
    label 10 there makes an 11-class problem, and the other splits are checked against it."""
    fake_mnist(tmp_path / "d", bad="train")
    cfg = small(data_dir=str(tmp_path / "d"))
    splits = T.prepare_data(cfg)
    assert T._classes(cfg, splits) == 11


def test_nan_in_model_checkpoint_or_frozen_file_is_refused(tmp_path, one_epoch_run):
    model = models.mnist_mlp(hidden=16, layers=1, rng=np.random.default_rng(0))
    next(m for m in model if isinstance(m, nn.BatchNorm)).running_var[2] = np.nan
    models.save_model(tmp_path / "m.npz", model)
    with pytest.raises(ValueError, match=r"m\.npz: array 'state/.*running_var' holds 1 NaN"):
        models.load_model(tmp_path / "m.npz")
    run = copy_run(one_epoch_run, tmp_path / "run")
    ck = run / T.CHECKPOINT
    with np.load(ck) as z:
        key = next(k for k in z.files if k.startswith("optim/"))
        bad = z[key].copy()
    bad.flat[0] = np.inf
    rewrite_npz(ck, **{key: bad})
    with pytest.raises(ValueError, match=f"checkpoint.npz: array '{key}' holds 1 NaN or inf"):
        T.read_checkpoint(run)
    good = models.mnist_mlp(hidden=16, layers=1, rng=np.random.default_rng(0)).eval()
    path = deploy.freeze(good).save(tmp_path / "f.npz")
    with np.load(path) as z:
        key = next(k for k in z.files if k.endswith("/offset"))
        offset = z[key].copy()
    offset[0] = np.nan
    rewrite_npz(path, **{key: offset})
    with pytest.raises(deploy.FrozenFormatError, match=f"{key} holds NaN or infinity"):
        deploy.load(path)


def test_a_checkpoint_without_optimizer_state_is_refused_on_resume(tmp_path, capsys,
                                                                   one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    with np.load(run / T.CHECKPOINT) as z:
        moments = [k for k in z.files if k.startswith("optim/0/")]
    assert moments  # Adam's m and v
    rewrite_npz(run / T.CHECKPOINT, drop=moments)
    err = cli_error(capsys, ["train", "--resume", str(run), "--no-progress"])
    assert "checkpoint.npz: damaged checkpoint: optimizer state of parameter 0 holds []" in err


def test_batch_norm_refuses_a_batch_of_one_and_training_never_makes_one():
    for bn in (nn.BatchNorm(4), nn.ShiftBatchNorm(4)):
        with pytest.raises(ValueError, match="batch of one has no batch variance"):
            bn(Tensor(np.ones((1, 4), np.float32)))
        bn.eval()
        assert bn(Tensor(np.ones((1, 4), np.float32))).shape == (1, 4)  # eval: fine
    with pytest.raises(ValueError, match="batch of one"):
        nn.BatchNorm2d(3)(Tensor(np.ones((1, 3, 1, 1), np.float32)))
    assert nn.BatchNorm2d(3)(Tensor(np.ones((1, 3, 2, 2), np.float32))).shape == (1, 3, 2, 2)
    # 101 images in batches of 50: 50 and 51, never a lone image (which would raise above)
    rng = np.random.default_rng(0)
    model = models.mnist_mlp(hidden=8, layers=1, in_features=6, rng=rng)
    opt = T.registry.lookup("optimizer", "adam")(model.parameters(), lr=1e-3)
    x = rng.uniform(-1, 1, (101, 6)).astype(np.float32)
    y = rng.integers(0, 10, 101)
    loss, err, seen = T.train_epoch(model, opt, T.registry.lookup("loss", "squared-hinge"),
                                    x, y, 50, rng)
    assert seen == 101 and np.isfinite(loss)
    # recompute_bn_statistics batches the same way: 1001 images in batches of 1000
    T.recompute_bn_statistics(model, rng.uniform(-1, 1, (1001, 6)).astype(np.float32), 1000)


def test_the_last_epoch_runs_at_lr_end(one_epoch_run, tmp_path):
    run = copy_run(one_epoch_run, tmp_path / "run")
    m = T.train(run_dir=run, resume=True, progress=False, log=quiet)
    assert [h["lr"] for h in m["history"]] == [0.01, 0.001]  # small(): 0.01 -> 0.001


# --- lost work ---------------------------------------------------------------------------------

def test_run_folders_started_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: fmt.replace("%Y%m%d-%H%M%S",
                                                                       "20260101-120000"))
    made = [runs.new_run_dir(tmp_path / "runs", "mnist-mlp") for _ in range(3)]
    assert [p.name for p in made] == ["mnist-mlp-20260101-120000", "mnist-mlp-20260101-120000-2",
                                      "mnist-mlp-20260101-120000-3"]
    assert all(p.is_dir() for p in made)
    # two trainers without --out in the same second: two folders, two runs
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        T.train(small(epochs=1, train_limit=100), progress=False, stop_after=1, log=quiet)
    found = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert found[-2:] == ["mnist-mlp-20260101-120000-4", "mnist-mlp-20260101-120000-5"]
    assert all((tmp_path / "runs" / n / T.CHECKPOINT).is_file() for n in found[-2:])


LOCKER = ("import sys, time; from minibnn import runs; runs.lock(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(120)")


def test_a_run_folder_is_locked_while_a_process_owns_it(tmp_path, capsys, one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    env = child_env()
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(run)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = cli_error(capsys, ["train", "--resume", str(run), "--no-progress"])
        assert f"is locked by pid {holder.pid}" in err
        empty = tmp_path / "empty"
        empty.mkdir()
        holder2 = subprocess.Popen([sys.executable, "-c", LOCKER, str(empty)], env=env,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert holder2.stdout.readline().strip() == "locked"
            with pytest.raises(runs.RunLocked, match=f"locked by pid {holder2.pid}"):
                T.train(small(epochs=1), empty, progress=False, log=quiet)
        finally:
            holder2.kill()
            holder2.wait()
    finally:
        holder.send_signal(signal.SIGKILL)  # death releases the lock
        holder.wait()
    m = T.train(run_dir=run, resume=True, progress=False, log=quiet)
    assert m["finished"] and (run / T.MODEL).is_file()


@pytest.mark.slow
def test_a_second_trainer_cannot_resume_a_run_still_training(tmp_path, capsys):
    run = tmp_path / "run"
    env = child_env(PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "minibnn", "train", "--hidden", "32",
                             "--layers", "1", "--train-limit", "300", "--epochs", "400",
                             "--no-progress", "--out", str(run)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / T.CHECKPOINT).exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        err = cli_error(capsys, ["train", "--resume", str(run), "--no-progress"])
        assert f"is locked by pid {proc.pid}" in err
        err = cli_error(capsys, ["train", "--no-progress", "--out", str(run)])
        assert "already holds a run" in err or f"locked by pid {proc.pid}" in err
    finally:
        proc.kill()
        proc.communicate()
    assert T.read_checkpoint(run)["meta"]["config"]["epochs"] == 400  # untouched by either


def test_out_holding_a_run_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / T.METRICS).write_text('{"test_error": 0.01}')
    err = cli_error(capsys, ["train", "--no-progress", "--out", str(out)])
    assert "already holds a run (metrics.json)" in err and "--resume" in err
    assert (out / T.METRICS).read_text() == '{"test_error": 0.01}'
    assert [p.name for p in out.iterdir()] == [T.METRICS]


def test_stale_temporary_files_are_removed_when_a_run_is_opened(tmp_path, one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    ours = ["checkpoint.npz.k2_j9xq1.tmp", "model.npz.abcdefgh.tmp", "metrics.json.a1b2c3d4.tmp"]
    others = ["notes.txt.abcdefgh.tmp", "checkpoint.npz.tmp", "checkpoint.npz.toolongname.tmp"]
    for name in ours + others:
        (run / name).write_bytes(b"x" * 100)
    T.train(run_dir=run, resume=True, progress=False, stop_after=0, log=quiet)
    left = {p.name for p in run.iterdir()}
    assert not left & set(ours) and set(others) <= left


def test_a_failed_start_leaves_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["train", "--no-progress", "--data-dir", "missing", "--out", "a/b/c"])
    cli_error(capsys, ["train", "--no-progress", "--data-dir", "missing"])
    assert list(tmp_path.iterdir()) == []

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_epoch", interrupt)
    assert cli.main(["train", "--no-progress", "--hidden", "16", "--out", "a/b"]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err
    assert list(tmp_path.iterdir()) == []  # a/ was made for the run: removed with it
    assert cli.main(["train", "--no-progress", "--hidden", "16"]) == 130
    assert list(tmp_path.iterdir()) == []  # runs/ and runs/mnist-mlp-... alike


def test_resume_refuses_options_that_cannot_change(tmp_path, capsys, one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    err = cli_error(capsys, ["train", "--resume", str(run), "--hidden", "64", "--lr-start",
                             "0.5", "--batch-size", "50", "--no-progress"])
    assert "--hidden (the run has 16, given 64), --lr-start (the run has 0.01, given 0.5)" in err
    assert "--batch-size" not in err  # the run's own value: accepted
    err = cli_error(capsys, ["train", "--resume", str(run), "--out", "x", "--no-progress"])
    assert "--out cannot be given with --resume" in err
    err = cli_error(capsys, ["train", "--resume", str(run), "--epochs", "0", "--no-progress"])
    assert "--epochs" in err


@pytest.mark.slow
def test_extending_a_run_with_the_halving_schedule_ends_as_a_longer_run_would(tmp_path):
    cfg = dict(schedule="halve", halve_every=1, epochs=2, stochastic=True, dropout_in=0.2)
    T.train(small(**cfg), tmp_path / "short", progress=False, log=quiet)  # finished at 2
    said = []
    extended = T.train(run_dir=tmp_path / "short", resume=True, progress=False,
                       log=said.append, epochs=3)
    assert any("ends where one trained 3 epochs from the start would" in s for s in said)
    full = T.train(small(**dict(cfg, epochs=3)), tmp_path / "long", progress=False, log=quiet)
    strip = runs.without_timings
    assert strip(extended["history"]) == strip(full["history"])
    with np.load(tmp_path / "short" / T.MODEL) as a, np.load(tmp_path / "long" / T.MODEL) as b:
        for k in a.files:
            if k.startswith("state/"):
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_extending_a_run_with_the_exponential_schedule_says_what_it_does(tmp_path,
                                                                        one_epoch_run):
    run = copy_run(one_epoch_run, tmp_path / "run")
    said = []
    m = T.train(run_dir=run, resume=True, progress=False, log=said.append, epochs=4)
    assert any("re-planned over 4 epochs" in s and "differs from a run trained 4 epochs"
               in s for s in said)
    lrs = [h["lr"] for h in m["history"]]
    assert lrs[0] == 0.01 and lrs[-1] == 0.001  # the done epoch kept; the last at lr_end
    assert lrs[1] == pytest.approx(0.01 * 0.1 ** (1 / 3))  # the 4-epoch schedule from then on
    with pytest.raises(T.ConfigError, match="fewer than the 4 epochs"):
        T.train(run_dir=run, resume=True, progress=False, log=quiet, epochs=3)


def test_quick_benchmarks_write_outside_the_tracked_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    quick = common.results_dir(None, quick=True)
    assert quick == ROOT / "benchmarks" / "results" / "quick"
    assert common.results_dir(None, quick=False) == ROOT / "benchmarks" / "results"
    assert common.results_dir("/x", quick=True) == Path("/x")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(quick / "gemm_cpu_quick.json")],
                             cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0  # ignored by git: a smoke run never shows as a change


# --- clear errors ------------------------------------------------------------------------------

def test_cli_failures_are_one_error_line(tmp_path, capsys, monkeypatch, one_epoch_run):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    err = cli_error(capsys, ["train", "--no-progress", "--out", "afile/sub"])
    assert "cannot create the run folder afile/sub" in err
    err = cli_error(capsys, ["train", "--no-progress", "--hidden", "10000000"])
    assert err.startswith("error: --hidden 10000000: 3 x 10000000 units make ")
    assert "TiB to train" in err and "this machine has" in err
    run = copy_run(one_epoch_run, tmp_path / "run")
    meta = T.read_checkpoint(run)["meta"]
    del meta["epoch"]
    rewrite_npz(run / T.CHECKPOINT, meta=io.json_array(meta))
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--no-progress"]):
        err = cli_error(capsys, argv)
        assert "checkpoint.npz: damaged checkpoint: its 'meta' entry lacks 'epoch'" in err
    run = copy_run(one_epoch_run, tmp_path / "run2")
    with np.load(run / T.CHECKPOINT) as z:
        gone = [next(k for k in z.files if k.startswith(p) and k.endswith("gamma"))
                for p in ("model/", "best/")]
    rewrite_npz(run / T.CHECKPOINT, drop=gone)
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--no-progress"]):
        err = cli_error(capsys, argv)
        assert "checkpoint.npz: damaged checkpoint: state dict does not match the model: " \
               "missing keys" in err
    np.save(tmp_path / "array.npy", np.zeros(3))
    err = cli_error(capsys, ["eval", "array.npy"])
    assert "array.npy: not a minibnn model, checkpoint or frozen network file: a single .npy array" in err
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    err = cli_error(capsys, ["eval", "noise.npz"])
    kind = "not a minibnn model, checkpoint or frozen network file"
    assert f"noise.npz: {kind}" in err and "allow_pickle" not in err
    (tmp_path / "zipnoise.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    err = cli_error(capsys, ["eval", "zipnoise.npz"])
    assert f"zipnoise.npz: {kind}" in err and "allow_pickle" not in err
    # data of another size: a new run takes its size from the data (tests/test_train.py),
    # a trained network refuses it with the sizes named
    fake_mnist(tmp_path / "big", n_train=10010, n_test=20, size=32)
    err = cli_error(capsys, ["eval", str(one_epoch_run), "--data-dir", "big"])
    assert "images of shape 1024, but" in err and "takes 784 values" in err
    net = models.mnist_mlp(hidden=16, layers=1, rng=np.random.default_rng(0)).eval()
    deploy.freeze(net).save(tmp_path / "net.frozen.npz")
    err = cli_error(capsys, ["eval", "net.frozen.npz", "--data-dir", "big"])
    assert "images of shape 32x32, but net.frozen.npz takes 784 values" in err


def test_ctrl_c_messages_fit_the_command(tmp_path, capsys, monkeypatch, one_epoch_run):
    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "predict", interrupt)
    assert cli.main(["eval", str(one_epoch_run)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    run = copy_run(one_epoch_run, tmp_path / "run")
    monkeypatch.setattr(T, "train_epoch", interrupt)
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"the checkpoint of epoch 1 is kept; resume with: python -m minibnn train " \
           f"--resume {run}" in err


def test_loss_is_read_on_the_host_every_n_batches_with_the_same_result(monkeypatch):
    """train_epoch sums loss and errors where the arrays live and reads them every
    ``read_every`` batches (the GPU default avoids a device sync per step): the epoch's
    result is the same, and a NaN is still caught, within the batches of one read."""
    def epoch(read_every, nan_at=None):
        rng = np.random.default_rng(0)
        model = models.mnist_mlp(hidden=16, layers=1, dropout_in=0, dropout_hidden=0, rng=rng)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        x = rng.uniform(-1, 1, (230, 784)).astype(np.float32)
        y = rng.integers(0, 10, 230)
        real, calls = T.train_step, []

        def step(*args):
            loss, scores = real(*args)
            calls.append(1)
            return (Tensor(np.float32(np.nan)) if len(calls) == nan_at else loss), scores
        monkeypatch.setattr(T, "train_step", step)
        try:
            return T.train_epoch(model, opt, losses.squared_hinge, x, y, 20,
                                 np.random.default_rng(1), read_every=read_every)
        finally:
            monkeypatch.undo()

    every = epoch(1)
    assert epoch(7) == every and epoch(50) == every and every[2] == 230
    with pytest.raises(T.TrainingDiverged, match="became nan in batch 3 "):
        epoch(1, nan_at=3)
    with pytest.raises(T.TrainingDiverged, match="became nan in batches 1 to 4 "):
        epoch(4, nan_at=3)
    with pytest.raises(T.TrainingDiverged, match="became nan in batches 9 to 12 "):
        epoch(4, nan_at=11)  # 12 batches: the last read covers 9..12
