"""benchmarks/gpu_check.sh, the training phases' plumbing, with a stand-in for Python.

A lent GPU machine gives a session 15 minutes in all, so the script's two 9-minute phases
must not waste a call: these tests run the ``cifar-run`` and ``mnist-recipe`` phases here
with ``PYTHON`` set to a stand-in that answers ``python -m minibnn ... train`` by writing a
made-up run folder (and runs everything else with the real interpreter), then check what
the phase asked of the trainer: the data folder, the epochs sized from the probe, the
budget cut to the device call's limit, and whether the CIFAR-10 archive was converted
again or found already converted."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RECORD = 10000 * 3073  # bytes in each file of cifar-10-batches-bin (1 label + 3072 pixels)
FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("bash") is None
    or shutil.which("timeout") is None,
    reason="the script is for the lent Linux machines: needs bash and GNU coreutils")

STAND_IN = '''#!{python}
"""python for gpu_check.sh: `-m minibnn ... train` writes a run of made-up epochs."""
import json, os, sys
args = sys.argv[1:]
if args[:2] != ["-m", "minibnn"]:
    os.execv({python!r}, [{python!r}] + args)
epochs, out = int(args[args.index("--epochs") + 1]), args[args.index("--out") + 1]
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
os.makedirs(out, exist_ok=True)
history = [dict(epoch=e + 1, wall_seconds=2.0, test_error=0.0123) for e in range(epochs)]
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(dict(history=history, test_error=0.0123, finished=True), f)
print("stand-in run of", epochs, "epochs")
'''

CONVERTER = '''import pathlib, sys
pathlib.Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
(pathlib.Path(sys.argv[2]) / "converted-again").write_text(sys.argv[1])
'''


def run_phase(tmp_path, phase, data="", **env):
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "trainer_calls.jsonl"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_")}
    full.update(PYTHON=str(python), STAND_IN_LOG=str(log),
                GPU_CHECK_RUNS_DIR=str(tmp_path / "runs"),
                GPU_CHECK_CIFAR_DIR=str(tmp_path / "cifar"),
                MINIBNN_CACHE_DIR=str(tmp_path / "cache"), **env)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), data, phase], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def option(args, name):
    return args[args.index(name) + 1]


def converted(folder, sizes=None):
    folder.mkdir(parents=True)
    for f in FILES:
        with open(folder / f"{f}.bin", "wb") as out:
            out.truncate((sizes or {}).get(f, RECORD))


def archive(tmp_path):
    """A stand-in archive with a to_cifar_bin.py beside it that leaves a mark."""
    folder = tmp_path / "carried"
    folder.mkdir()
    (folder / "to_cifar_bin.py").write_text(CONVERTER)
    path = folder / "cifar10.tar.xz"
    path.write_bytes(b"not read by the stand-in converter")
    return path


def test_cifar_run_uses_data_already_converted_and_fits_the_call(tmp_path):
    converted(tmp_path / "cifar" / "cifar-10-batches-bin")
    done, calls = run_phase(tmp_path, "cifar-run", str(archive(tmp_path)), GPU_CALL_LIMIT="300")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already holds the converted archive" in done.stdout
    assert not (tmp_path / "cifar" / "converted-again").exists()
    probe, run = calls
    assert option(probe, "--epochs") == "3" and option(probe, "--out").endswith("cifar_run-probe")
    for args in (probe, run):
        assert option(args, "--data-dir") == str(tmp_path / "cifar" / "cifar-10-batches-bin")
        assert option(args, "--dataset") == "cifar10"
    # the budget is what the 300 s call has left less 40 s, not the default 510 s
    budget = int(re.search(r"cifar_run: (\d+) epochs in a budget of (\d+) s", done.stdout)[2])
    assert 240 <= budget <= 260
    epochs = int(option(run, "--epochs"))
    # fit_epochs: steady 2 s, fixed = probe wall time - 4 s (at most a few s here)
    assert budget * 0.93 / 2 - 3 <= epochs <= budget * 0.93 / 2 + 4
    metrics = json.loads((tmp_path / "out" / "cifar_run_metrics.json").read_text())
    assert len(metrics["history"]) == epochs


def test_a_call_with_too_little_time_left_starts_no_run(tmp_path):
    done, calls = run_phase(tmp_path, "mnist-recipe", GPU_CALL_LIMIT="50")
    assert "s left in the call: no run" in done.stdout
    assert [option(args, "--epochs") for args in calls] == ["3"]  # the probe alone


@pytest.mark.parametrize("broken", ["missing", "short"])
def test_cifar_run_converts_an_archive_not_yet_converted(tmp_path, broken):
    folder = tmp_path / "cifar" / "cifar-10-batches-bin"
    if broken == "short":  # a conversion stopped part way: one file cut short
        converted(folder, {"test_batch": RECORD - 3073})
    src = archive(tmp_path)
    done, calls = run_phase(tmp_path, "cifar-run", str(src))
    assert "already holds" not in done.stdout
    assert (tmp_path / "cifar" / "converted-again").read_text() == str(src)
    assert all(option(args, "--data-dir") == str(folder) for args in calls)


def test_mnist_recipe_keeps_the_default_budget_and_the_recipe(tmp_path):
    done, calls = run_phase(tmp_path, "mnist-recipe")
    assert done.returncode == 0, done.stdout + done.stderr
    probe, run = calls
    assert "in a budget of 510 s" in done.stdout
    for args in (probe, run):
        assert option(args, "--hidden") == "4096" and option(args, "--lr-end") == "3e-7"
        assert option(args, "--dropout-in") == "0.2" and "--data-dir" not in args
    assert 230 <= int(option(run, "--epochs")) <= 240  # 1 + (510 x 0.93 - fixed) // 2
    assert "MNIST recipe" in done.stdout  # goals.py's line for #9
