"""Data-parallel training (minibnn.distributed): two MPI ranks against one process.

The two-rank tests start ``mpiexec -n 2 python tests/dist_worker.py CASE OUT`` and compare
what rank 0 wrote with the one-process run computed here; they are skipped, with the
reason, only where MPI cannot start.

Tolerance: the ranks add float32 partial sums in another order than one process, and
synchronised batch norm sums in float64. Losses agree to rtol 1e-5 (measured: 3e-8),
error rates exactly; batch-norm parameters and statistics to rtol 1e-5 + atol 1e-5
(measured worst: 0.03 of that); latent binary weights have the same signs and agree to
atol 1e-4 (measured worst 1.2e-5): Adam divides by the gradients' root mean square, which
turns rounding-level differences in near-zero gradients into visible parts of a step of
up to lr * lr_scale (here about 3e-2).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minibnn import backend, distributed, nn, optim, runs
from minibnn import functional as F
from minibnn import train as T
from minibnn.tensor import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker as W  # noqa: E402
from arrays import host  # noqa: E402
from gradcheck import check_grad  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def _env():
    """The environment of a child Python: this checkout first on its path, then the caller's
    PYTHONPATH (where a stand-in package such as a fake CuPy may live)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def _mpiexec():
    """The mpiexec beside this Python (the mpich wheel's, in a venv), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def mpirun(*args, n=2, timeout=240):
    """``mpiexec -n N python ARGS`` from the repository root; a CompletedProcess."""
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


_MPI_REASON = []


def mpi_or_skip():
    """Skip, saying why, where two MPI ranks cannot start (checked once)."""
    if not _MPI_REASON:
        reason = ""
        if _mpiexec() is None:
            reason = "no mpiexec beside Python or on PATH (pip install minibnn[dist])"
        else:
            try:
                import mpi4py  # noqa: F401
            except ImportError as exc:
                reason = f"mpi4py not importable ({exc}); pip install minibnn[dist]"
        if not reason:
            probe = mpirun("-c", "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2",
                           timeout=60)
            if probe.returncode:
                reason = f"mpiexec -n 2 cannot start: {probe.stderr.strip()[-300:]}"
        _MPI_REASON.append(reason)
    if _MPI_REASON[0]:
        pytest.skip(_MPI_REASON[0])
    if backend.active() == "cupy":  # CuPy arrays go over NCCL, which takes one GPU per rank
        import cupy
        gpus = cupy.cuda.runtime.getDeviceCount()
        if gpus < 2:
            pytest.skip(f"two ranks on the cupy backend need two GPUs (NCCL: one rank per "
                        f"GPU), found {gpus}; the one-GPU NCCL path is tested below")


def run_worker(case, out, timeout=240):
    res = mpirun(str(WORKER), case, str(out), timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


# --- one process: the pieces -------------------------------------------------------------

def test_dropout_rows_are_the_whole_batch_mask_rows():
    x = np.ones((10, 6), np.float32)
    whole_rng = np.random.default_rng(3)
    whole = host(F.dropout(Tensor(x), 0.5, whole_rng))
    if backend.active() != "cupy":  # the CPU draws one number per element of the whole batch
        assert whole_rng.bit_generator.state == _after(10 * 6)
    for start, stop in ((0, 5), (5, 10), (3, 3)):
        rng = np.random.default_rng(3)
        part = host(F.dropout(Tensor(x[start:stop]), 0.5, rng, rows=(start, 10)))
        np.testing.assert_array_equal(part, whole[start:stop])
        # the same draws as the whole batch (on the GPU: one key per call)
        assert rng.bit_generator.state == whole_rng.bit_generator.state
    with pytest.raises(ValueError, match="rows 8:13"):
        F.dropout(Tensor(x[:5]), 0.5, np.random.default_rng(0), rows=(8, 10))


def _after(n):
    rng = np.random.default_rng(3)
    rng.random(n, dtype=np.float32)
    return rng.bit_generator.state


@pytest.mark.parametrize("kind", ["standard", "shift"])
@pytest.mark.parametrize("shape", [(12, 3), (4, 3, 2, 2)])
def test_synced_batch_norm_on_one_rank_is_batch_norm(kind, shape, each_backend):
    """With a sync that adds over one rank (the identity), the synchronised code path
    gives batch norm's forward, gradients and running statistics (on every backend: the
    cupy case runs the float64 sums on the GPU)."""
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.normal(1.0, 2.0, shape).astype(np.float32))
    g = backend.asarray(rng.normal(size=shape).astype(np.float32))
    cls = {("standard", 2): nn.BatchNorm, ("shift", 2): nn.ShiftBatchNorm,
           ("standard", 4): nn.BatchNorm2d, ("shift", 4): nn.ShiftBatchNorm2d}[kind, len(shape)]
    outs = []
    for sync in (None, lambda a: a):
        bn = cls(3)
        bn.gamma.data[...] = backend.asarray(np.array([0.7, 1.3, 2.1], np.float32))
        bn.sync = sync
        xt = Tensor(x, requires_grad=True)
        y = bn(xt)
        y.backward(g)
        outs.append([backend.to_numpy(a) for a in (y.data, xt.grad, bn.gamma.grad,
                                                   bn.beta.grad, bn.running_mean,
                                                   bn.running_var)])
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_synced_batch_norm_gradients():
    rng = np.random.default_rng(1)
    x, gamma = rng.normal(size=(6, 3)), rng.uniform(0.5, 1.5, 3)

    def fn(x, gamma):
        bn = nn.BatchNorm(3)
        bn.sync = lambda a: a
        bn.gamma = gamma
        return bn(x)

    check_grad(fn, [x, gamma])
    check_grad(lambda a: F.sync_mean(a * a, (0, 2, 3), lambda s: s),
               [rng.normal(size=(2, 3, 2, 2))])


def test_one_rank_data_parallel_is_the_plain_loop():
    """``DataParallel`` over a one-rank communicator changes nothing, bit for bit."""
    results = []
    for dp_on in (False, True):
        rng = np.random.default_rng(5)
        build, shape = W.CASES["mlp-dropout-stochastic"]
        model = build(rng)
        opt = optim.Adam(model.parameters(), lr=3e-3)
        x, y = W.synthetic(shape, n=90)
        dp = distributed.DataParallel(model, distributed.Communicator()) if dp_on else None
        hist = [T.train_epoch(model, opt, T.registry.lookup("loss", "squared-hinge"), x, y,
                              40, rng, dp=dp) for _ in range(2)]
        results.append((hist, model.state_dict()))
    assert results[0][0] == results[1][0]
    for k in results[0][1]:
        np.testing.assert_array_equal(results[0][1][k], results[1][1][k], err_msg=k)


def test_one_rank_communicator_and_bad_arguments():
    comm = distributed.Communicator(note="test")
    a = np.arange(4.0)
    assert comm.allreduce(a) is a and comm.broadcast(a) is a and comm.messages == 2
    assert comm.block(7) == (0, 7) and comm.sum_values(2, 3) == (2.0, 3.0)
    assert comm.describe() == "1 rank, no MPI (test)"
    with pytest.raises(ValueError, match="op"):
        comm.allreduce(a, op="prod")
    with pytest.raises(ValueError, match="contiguous"):
        comm.allreduce(np.zeros((3, 3))[:, 1])
    with pytest.raises(ValueError, match="root"):
        comm.broadcast(a, root=1)
    model = W.CASES["mlp-standard"][0](np.random.default_rng(0))
    with pytest.raises(ValueError, match="grad_dtype"):
        distributed.DataParallel(model, comm, grad_dtype="bfloat16")
    with pytest.raises(ValueError, match="bucket_bytes"):
        distributed.DataParallel(model, comm, bucket_bytes=0)


def test_a_batch_smaller_than_the_ranks_is_refused():
    comm = distributed.Communicator()
    comm.size = 4  # only the arithmetic of check_batches is used
    dp = distributed.DataParallel(W.CASES["mlp-standard"][0](np.random.default_rng(0)),
                                  distributed.Communicator())
    dp.comm = comm
    dp.check_batches(600, 50)
    dp.check_batches(0, 1000)  # no bn_recompute
    for n, batch in ((602, 50), (600, 3)):
        with pytest.raises(ValueError, match="fewer than the 4 ranks.*batch_size or train_lim"):
            dp.check_batches(n, batch)
    with pytest.raises(ValueError, match="bn_recompute's batch of 1000 with 1001 rows"):
        dp.check_batches(1001, 1000, "bn_recompute's batch of", "bn_recompute")


def test_without_mpi4py_distributed_runs_on_one_rank_and_says_so(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from minibnn import cli\n"
            f"sys.exit(cli.main(['train', '--distributed', '--hidden', '16', '--layers', '1',"
            f" '--epochs', '1', '--train-limit', '200', '--no-progress', '--out',"
            f" {str(tmp_path / 'run')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "distributed: 1 rank, no MPI (mpi4py is not importable" in res.stdout
    assert "pip install minibnn[dist]" in res.stdout
    assert (tmp_path / "run" / T.METRICS).is_file()


# --- two ranks ---------------------------------------------------------------------------

def test_communicator_collectives_on_two_ranks(tmp_path):
    mpi_or_skip()
    run_worker("comm", tmp_path)
    info = json.loads((tmp_path / "comm.json").read_text())
    assert info["size"] == 2 and info["describe"].startswith("2 ranks over MPI")


def test_ranks_with_different_options_are_refused(tmp_path):
    mpi_or_skip()
    run_worker("mismatch", tmp_path)
    assert "'seed': 0" in (tmp_path / "refused.txt").read_text()


@pytest.fixture(scope="module")
def two_rank_equivalence(tmp_path_factory):
    mpi_or_skip()
    out = tmp_path_factory.mktemp("equivalence")
    run_worker("equivalence", out)
    return out


@pytest.mark.parametrize("name", list(W.CASES))
def test_two_ranks_compute_what_one_process_computes(two_rank_equivalence, name):
    """MLP with standard and shift BN, with dropout and stochastic binarization, and a
    small ConvNet: 3 epochs of Adam, batches of 40 split 20/20 (the last, of 7, 4/3)."""
    history, state = W.equivalence(name)
    with np.load(two_rank_equivalence / f"{name}.npz") as z:
        got = z["history"]
        theirs = {k: z[k] for k in state}
    np.testing.assert_allclose(got[:, 0], [h[0] for h in history], rtol=1e-5)
    np.testing.assert_array_equal(got[:, 1:], [h[1:] for h in history])
    for k, v in state.items():
        if k.endswith(".weight"):  # latent binary weights: Adam steps of up to lr * lr_scale
            np.testing.assert_array_equal(theirs[k] >= 0, v >= 0, err_msg=k)  # sign(W) alike
            np.testing.assert_allclose(theirs[k], v, rtol=0, atol=1e-4, err_msg=k)
        else:
            np.testing.assert_allclose(theirs[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_overlapped_all_reduce_gives_the_same_run(two_rank_equivalence):
    """Buckets all-reduced while the backward pass runs: the very same numbers."""
    with np.load(two_rank_equivalence / "overlap.npz") as a, \
            np.load(two_rank_equivalence / "mlp-dropout-stochastic.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_distributed_train_matches_one_process_and_resumes(tmp_path):
    """``train`` on an MNIST subset under two ranks: the history and the saved model of
    one process (``dist_worker.TRAIN_CASES``), and a run
    stopped after one epoch and resumed twice equals the uninterrupted two-rank run."""
    mpi_or_skip()
    run_worker("train", tmp_path)
    strip = runs.without_timings
    for name, kw in W.TRAIN_CASES.items():
        ref = T.train(W.small_config(**kw), tmp_path / f"ref-{name}", progress=False,
                      log=lambda *_: None)
        got = json.loads((tmp_path / name / T.METRICS).read_text())
        assert got["history"][-1]["train_loss"] < got["history"][0]["train_loss"]
        for a, b in zip(strip(got["history"]), strip(ref["history"]), strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert {k: v for k, v in a.items() if k != "train_loss"} == \
                {k: v for k, v in b.items() if k != "train_loss"}
        mine, theirs = W_read(tmp_path / f"ref-{name}" / T.MODEL), W_read(tmp_path / name / T.MODEL)
        for k in mine:
            np.testing.assert_allclose(theirs[k], mine[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert T.read_checkpoint(tmp_path / "part")["meta"]["ranks"] == 2
    full = json.loads((tmp_path / "full" / T.METRICS).read_text())
    part = json.loads((tmp_path / "part" / T.METRICS).read_text())
    assert strip(part["history"]) == strip(full["history"])
    a, b = W_read(tmp_path / "full" / T.MODEL), W_read(tmp_path / "part" / T.MODEL)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def W_read(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k.startswith("state/")}


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_job_and_keeps_the_checkpoint(tmp_path, how):
    """Rank 1 raises (or is killed) in epoch 3: the job ends non-zero within the timeout,
    rank 1 says what failed, and the last complete checkpoint still loads and resumes.

    Which one that is depends on timing: epoch 2's checkpoint is written in the background
    while epoch 3 trains, and mpiexec SIGKILLs rank 0 (no handler can finish the write), so
    it is epoch 2's if that write ended before the failure, else epoch 1's (which epoch 2's
    write waited for). Either way it is whole: the write is atomic."""
    mpi_or_skip()
    t0 = time.monotonic()
    res = mpirun(str(WORKER), how, str(tmp_path), timeout=120)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 120
    if how == "raise":
        assert "rank 1 of 2 failed: RuntimeError: injected failure on rank 1" in res.stderr
        assert f"the last complete checkpoint in {tmp_path / 'run'} is kept" in res.stderr
    ck = T.read_checkpoint(tmp_path / "run")
    assert ck["meta"]["epoch"] in (1, 2) and ck["meta"]["ranks"] == 2
    # mpiexec may return while the aborted rank 0 is still exiting, its run-folder lock
    # (released by the kernel when the process ends) not yet free: wait for that, bounded
    from minibnn import runs
    deadline = time.monotonic() + 60
    while True:
        try:
            os.close(runs.lock(tmp_path / "run"))
            break
        except runs.RunLocked:
            assert time.monotonic() < deadline, "the aborted job's lock was never released"
            time.sleep(0.2)
    said = []
    resumed = T.train(run_dir=tmp_path / "run", resume=True, progress=False, stop_after=1,
                      log=said.append)
    assert len(resumed["history"]) == ck["meta"]["epoch"] + 1
    assert any("trained on 2 rank(s) and resumes on 1" in line for line in said), said


@pytest.mark.slow
def test_cli_trains_on_two_ranks_and_says_so(tmp_path):
    mpi_or_skip()
    run = tmp_path / "run"
    res = mpirun("-m", "minibnn", "train", "--distributed", "--hidden", "16", "--layers", "1",
                 "--batch-size", "50", "--train-limit", "300", "--epochs", "2",
                 "--no-progress", "--out", str(run))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("distributed: 2 ranks over MPI") == 1  # rank 0 alone logs
    assert res.stdout.count("epoch   2/2") == 1
    assert json.loads((run / T.METRICS).read_text())["finished"]
    # one rank without mpiexec: MPI's singleton, and it says how to start more
    res = subprocess.run([sys.executable, "-m", "minibnn", "train", "--resume", str(run),
                          "--distributed", "--no-progress"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert "distributed: 1 rank over MPI" in res.stdout and "mpiexec -n N" in res.stdout


# --- GPUs: NCCL ----------------------------------------------------------------------------

def _gpu_or_skip():
    reason = backend.available()["cupy"]
    if reason:
        pytest.skip(reason)
    try:
        backend.nccl()
    except backend.BackendUnavailable as exc:
        pytest.skip(str(exc))


def test_nccl_says_why_it_is_unavailable():
    reason = backend.available()["cupy"]
    if reason is None:
        pytest.skip("a GPU is present: NCCL is tested below")
    with pytest.raises(backend.BackendUnavailable, match="NCCL needs the cupy backend: cupy"):
        backend.nccl()


@pytest.mark.gpu
def test_nccl_one_rank_communicator():
    """One rank per GPU; with one GPU, a one-rank NCCL communicator still runs every call."""
    _gpu_or_skip()
    with backend.use("cupy"):
        comm = distributed.Communicator(note="one GPU")
        comm.size = 1
        nccl = distributed.NcclComm(comm)
        xp = backend.xp()
        for dtype in (np.float32, np.float64, np.float16):
            a = xp.arange(8, dtype=dtype)
            nccl.allreduce(a, "sum")
            nccl.broadcast(a, 0)
            np.testing.assert_array_equal(backend.to_numpy(a), np.arange(8, dtype=dtype))


@pytest.mark.gpu
def test_nccl_two_ranks(tmp_path):
    """Two ranks, two GPUs: allreduce and broadcast of CuPy arrays over NCCL."""
    _gpu_or_skip()
    mpi_or_skip()
    import subprocess as sp
    count = sp.run([sys.executable, "-c", "import cupy; print(cupy.cuda.runtime.getDeviceCount())"],
                   capture_output=True, text=True).stdout.strip()
    if count != "" and int(count) < 2:
        pytest.skip(f"needs 2 GPUs, found {count}")
    code = ("import numpy as np\n"
            "from minibnn import backend, distributed\n"
            "backend.set_backend('cupy')\n"
            "c = distributed.init(); xp = backend.xp()\n"
            "a = xp.full(5, c.rank + 1.0, xp.float32); c.allreduce(a)\n"
            "assert float(a[0]) == 3.0, a\n"
            "b = xp.full(3, c.rank, xp.float64); c.broadcast(b, root=1)\n"
            "assert float(b.sum()) == 3.0, b\n")
    res = mpirun("-c", code, timeout=120)
    assert res.returncode == 0, res.stderr
