"""benchmarks/fit_epochs.py: sizing a run to a wall-clock budget from a probe run's history,
here on a real (tiny) probe run and on made-up histories."""

import json

import pytest

from conftest import load_benchmark
from minibnn import train as T


def test_fit_epochs_arithmetic():
    fit = load_benchmark("fit_epochs").fit_epochs
    history = [dict(wall_seconds=7.0), dict(wall_seconds=1.0), dict(wall_seconds=1.2)]
    # steady 1.1 s, fixed 20 - 2.2 = 17.8 s: 1 + floor((540 * 0.93 - 17.8) / 1.1) = 441
    assert fit(history, 20.0, 540) == (441, pytest.approx(1.1), pytest.approx(17.8))
    assert fit(history, 20.0, 540, cap=300)[0] == 300
    assert fit(history, 600.0, 540)[0] == 1  # nothing fits: at least one epoch
    with pytest.raises(ValueError, match="at least 2 are needed"):
        fit(history[:1], 20.0, 540)
    with pytest.raises(ValueError, match="lacks wall_seconds"):
        fit([dict(seconds=1.0)] * 3, 20.0, 540)


def test_fit_epochs_reads_a_probe_run(tmp_path, capsys):
    bench = load_benchmark("fit_epochs")
    T.train(T.TrainConfig(hidden=16, layers=1, epochs=3, batch_size=50, train_limit=200),
            tmp_path / "probe", progress=False, log=lambda *_: None, checkpoint_every=3)
    metrics = tmp_path / "probe" / T.METRICS
    walls = [h["wall_seconds"] for h in json.loads(metrics.read_text())["history"]]
    probe = sum(walls) + 5.0
    assert bench.main([str(metrics), "--probe-seconds", str(probe), "--budget", "100",
                       "--margin", "0"]) == 0
    out, err = capsys.readouterr()
    steady = (walls[1] + walls[2]) / 2
    assert int(out) == 1 + int((100 - (probe - walls[1] - walls[2])) // steady)
    assert "s/epoch" in err
