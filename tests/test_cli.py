"""The command line a user expects: options before or after the subcommand, --version,
--quiet, a plain log off a terminal, eval's splits and checkpoints, freeze and predict."""

import json

import numpy as np
import pytest

from minibnn import cli, data, deploy, models
from minibnn import train as T


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of ``python -m minibnn *argv``, in this process."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _pred(text):
    return np.array([int(v) for v in text.split()], np.int64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small finished run: a 1 x 16 MLP after one epoch on 500 images."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--hidden", "16", "--layers", "1", "--epochs", "1",
                     "--train-limit", "500", "--val-size", "2000", "--seed", "2",
                     "--out", str(folder), "--quiet"]) == 0
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The first 50 MNIST test images as (N, 28, 28) and (N, 784) .npy, IDX and IDX.gz."""
    folder = tmp_path_factory.mktemp("images")
    x = data.load_mnist().test_images[:50]
    np.save(folder / "square.npy", x)
    np.save(folder / "rows.npy", x.reshape(50, -1))
    data.write_idx(folder / "images.idx", x)
    data.write_idx(folder / "images.idx.gz", x)
    return folder, x


def test_backend_and_quiet_go_before_or_after_the_subcommand():
    parse = cli.build_parser().parse_args
    assert parse(["train"]).backend is None and parse(["train"]).quiet is False
    assert parse(["train", "--backend", "numba"]).backend == "numba"
    assert parse(["--backend", "numba", "train"]).backend == "numba"
    assert parse(["--backend", "numba", "eval", "x", "--backend", "numpy"]).backend == "numpy"
    assert parse(["eval", "x", "-q"]).quiet and parse(["-q", "predict", "m", "i"]).quiet
    assert parse(["freeze", "x", "--quiet"]).quiet
    with pytest.raises(SystemExit):
        parse(["train", "--backend", "tpu"])


def test_version(capsys):
    import minibnn
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"minibnn {minibnn.__version__}"


def test_quiet_prints_only_the_result_line(run, capsys):
    metrics = json.loads((run / T.METRICS).read_text())
    assert metrics["config"]["val_size"] == 2000 and len(metrics["history"]) == 1
    code, out, err = _run(capsys, "eval", str(run), "--quiet")
    assert code == 0 and err == "" and out.count("\n") == 1
    assert f"test error {100 * metrics['test_error']:.2f}%" in out


def _tiny_mnist(folder, n=120):
    """An MNIST-layout folder of ``n`` random 28x28 training and test images."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split in ("train", "t10k"):
        data.write_idx(folder / f"{split}-images-idx3-ubyte",
                       rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    return folder


@pytest.mark.parametrize("terminal", [False, True])
def test_plain_log_off_a_terminal_and_bars_on_one(tmp_path, capsys, monkeypatch, terminal):
    monkeypatch.setattr(cli, "_interactive", lambda: terminal)
    tiny = ["--data-dir", str(_tiny_mnist(tmp_path / "data")), "--val-size", "20"]
    code, out, err = _run(capsys, "train", "--hidden", "8", "--layers", "1", "--epochs", "1",
                          *tiny, "--out", str(tmp_path / "run"))
    assert code == 0
    # on the GPU a note says when the step cannot run as a CUDA graph (and why)
    lines = [line for line in out.splitlines() if not line.startswith("CUDA graph: off (")]
    assert lines[0].startswith("training 1x8 binary MLP")
    assert lines[1] == f"run folder {tmp_path / 'run'}"
    assert "train error" in lines[2] and "valid error" in lines[2] and "test error" in lines[2]
    assert lines[3].startswith("best validation error") and len(lines) == 4
    assert "\r" not in out
    if terminal:  # bars on stderr: the training pass, then the evaluation pass
        assert "\r" in err and "epoch 1/1 evaluating" in err
    else:
        assert err == ""
    code, out, err = _run(capsys, "eval", str(tmp_path / "run"))
    assert code == 0 and ("evaluating test" in err) == terminal and "\r" not in out
    quiet = _run(capsys, "train", "--hidden", "8", "--layers", "1", "--epochs", "1",
                 *tiny, "--out", str(tmp_path / "quiet"), "-q")
    assert quiet[0] == 0 and quiet[2] == ""
    assert quiet[1].splitlines() == [lines[3].replace(str(tmp_path / "run"),
                                                      str(tmp_path / "quiet"))]


def test_eval_splits_checkpoints_and_batch_size(run, capsys):
    metrics = json.loads((run / T.METRICS).read_text())
    code, out, _ = _run(capsys, "eval", str(run), "--split", "validation")
    assert code == 0
    assert f"validation error {100 * metrics['best_valid_error']:.2f}% on 2000 mnist" in out
    code, out, _ = _run(capsys, "eval", str(run / T.CHECKPOINT), "--split", "validation",
                        "--batch-size", "7")
    assert code == 0 and "best epoch so far, 1" in out
    assert f"validation error {100 * metrics['best_valid_error']:.2f}% on 2000" in out
    code, out, _ = _run(capsys, "eval", str(run), "--split", "train")
    model, _ = T.load_model(run / T.MODEL)
    tx, ty = T.prepare_data(T.TrainConfig(**metrics["config"]))[:2]
    assert len(tx) == 500
    assert f"train error {100 * T.error_rate(model, tx, ty):.2f}% on 500 mnist" in out
    code, _, err = _run(capsys, "eval", str(run), "--batch-size", "0")
    assert code == 2 and "--batch-size" in err


def test_freeze_then_predict_from_every_kind_of_file(run, images, tmp_path, capsys):
    folder, x = images
    model, _ = T.load_model(run / T.MODEL)
    expected = T.predict(model, data.to_pm1(x))
    frozen = tmp_path / "net.frozen.npz"
    code, out, _ = _run(capsys, "freeze", str(run), "-o", str(frozen))
    assert code == 0 and "FrozenBNN(784 -> 16 -> 10" in out
    assert deploy.load(frozen).classes == 10
    code, out, _ = _run(capsys, "freeze", str(run / T.MODEL))  # default name beside it
    assert code == 0 and (run / "model.frozen.npz").is_file()
    metrics = json.loads((run / T.METRICS).read_text())
    code, out, _ = _run(capsys, "eval", str(frozen))
    assert f"test error {100 * metrics['test_error']:.2f}%" in out
    for net in (frozen, run, run / T.MODEL, run / T.CHECKPOINT):
        for name in ("square.npy", "rows.npy", "images.idx", "images.idx.gz"):
            code, out, err = _run(capsys, "predict", str(net), str(folder / name))
            assert code == 0, err
            np.testing.assert_array_equal(_pred(out), expected, err_msg=f"{net} {name}")
    code, out, _ = _run(capsys, "predict", str(frozen), str(folder / "rows.npy"),
                        "-o", str(tmp_path / "pred.txt"), "--batch-size", "9")
    assert code == 0 and "50 images" in out
    np.testing.assert_array_equal(_pred((tmp_path / "pred.txt").read_text()), expected)


def test_predict_and_freeze_errors_lose_nothing(run, images, tmp_path, capsys):
    folder, x = images
    np.save(tmp_path / "float.npy", x.astype(np.float32))
    np.save(tmp_path / "small.npy", x[:, :20, :20])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npz", x=x)
    (tmp_path / "junk.idx").write_bytes(b"\x13\x37" * 40)
    data.write_idx(tmp_path / "labels.idx", np.arange(5, dtype=np.uint8))
    cases = {"float.npy": "float32 values; expected uint8",
             "small.npy": "images of shape 20x20, but",
             "objects.npy": "never unpickles",
             "archive.npz": ".npz archive",
             "junk.idx": "not an IDX file",
             "labels.idx": "a 1-d array is labels",
             "missing.npy": "no such file"}
    for name, message in cases.items():
        code, out, err = _run(capsys, "predict", str(run), str(tmp_path / name))
        assert code == 2 and out == "", name
        assert err.startswith("error: IMAGES:") and message in err, err
        assert "784" in err or name not in ("small.npy",)
    model_bytes = (run / T.MODEL).read_bytes()
    code, _, err = _run(capsys, "predict", str(run), str(folder / "rows.npy"),
                        "-o", str(run / T.MODEL))
    assert code == 2 and "does not overwrite" in err
    code, _, err = _run(capsys, "freeze", str(run), "-o", str(run / T.MODEL))
    assert code == 2 and "-o" in err and "not a frozen network" in err
    assert (run / T.MODEL).read_bytes() == model_bytes
    code, _, err = _run(capsys, "freeze", str(run), "-o", str(tmp_path / "no" / "f.npz"))
    assert code == 2 and "does not exist" in err
    _run(capsys, "freeze", str(run), "-o", str(tmp_path / "f.npz"))
    code, _, err = _run(capsys, "freeze", str(tmp_path / "f.npz"))
    assert code == 2 and "already a frozen network" in err
    code, _, err = _run(capsys, "predict", str(run / T.METRICS), str(folder / "rows.npy"))
    assert code == 2 and "metrics.json" in err and "Traceback" not in err


def test_freeze_and_predict_a_convnet(tmp_path, images, capsys):
    folder, x = images
    model = models.mnist_convnet(channels=(4, 8), hidden=16, rng=np.random.default_rng(0))
    models.save_model(tmp_path / "conv.npz", model.eval())
    expected = T.predict(model, data.to_pm1(x, flatten=False).reshape(-1, 1, 28, 28))
    assert len(set(expected.tolist())) > 1  # an untrained net, but not a constant one
    np.save(tmp_path / "nchw.npy", x[:, None])
    code, out, _ = _run(capsys, "freeze", str(tmp_path / "conv.npz"))
    assert code == 0 and (tmp_path / "conv.frozen.npz").is_file()
    for net in ("conv.npz", "conv.frozen.npz"):
        for images_file in (folder / "square.npy", folder / "rows.npy", tmp_path / "nchw.npy"):
            code, out, err = _run(capsys, "predict", str(tmp_path / net), str(images_file))
            assert code == 0, err
            np.testing.assert_array_equal(_pred(out), expected)
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 28, 28), np.uint8))
    code, _, err = _run(capsys, "predict", str(tmp_path / "conv.frozen.npz"),
                        str(tmp_path / "rgb.npy"))
    assert code == 2 and "3x28x28" in err and "1x28x28 images" in err


def test_a_model_trained_on_whitened_images_is_not_fed_raw_pixels(run, images, tmp_path,
                                                                   capsys):
    folder, _ = images
    model, meta = T.load_model(run / T.MODEL)
    assert meta["zca"] is False  # every run records whether its inputs were whitened
    models.save_model(tmp_path / "zca.npz", model, extra=dict(meta, zca=True))
    for argv in (["freeze", str(tmp_path / "zca.npz")],
                 ["predict", str(tmp_path / "zca.npz"), str(folder / "rows.npy")]):
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == "" and "ZCA-whitened" in err, argv
    assert not (tmp_path / "zca.frozen.npz").exists()


def test_eval_says_when_the_data_does_not_fit_the_model(tmp_path, capsys):
    model = models.mnist_mlp(hidden=8, layers=1, in_features=144, classes=4,
                             rng=np.random.default_rng(0))
    models.save_model(tmp_path / "small-images.npz", model.eval())
    code, out, err = _run(capsys, "eval", str(tmp_path / "small-images.npz"))
    assert code == 2 and out == ""
    assert "mnist data: images of shape 784" in err and "takes 144 values" in err
