"""What tests/test_distributed.py runs under ``mpiexec -n 2 python tests/dist_worker.py CASE OUT``
(and, for the one-process references, imports and calls with ``comm=None``).

Every case runs on every rank; rank 0 writes what the test compares into the folder OUT.
A failed assertion raises, and ``abort_on_error`` stops both ranks with a non-zero exit.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minibnn import distributed, losses, models, optim  # noqa: E402
from minibnn import train as T  # noqa: E402

# one case per network the equivalence test covers: (model recipe, input shape)
CASES = {
    "mlp-standard": (lambda rng: models.mnist_mlp(hidden=32, layers=2, in_features=20,
                                                  dropout_in=0, dropout_hidden=0, rng=rng),
                     (20,)),
    "mlp-shift": (lambda rng: models.mnist_mlp(hidden=32, layers=2, in_features=20,
                                               dropout_in=0, dropout_hidden=0, bn="shift",
                                               rng=rng), (20,)),
    "mlp-dropout-stochastic": (lambda rng: models.mnist_mlp(
        hidden=32, layers=2, in_features=20, dropout_in=0.2, dropout_hidden=0.5,
        stochastic=True, rng=rng), (20,)),
    "convnet-standard": (lambda rng: models.binary_convnet((4, 8), (16,), in_channels=1,
                                                           image_size=8, rng=rng), (1, 8, 8)),
    "convnet-shift": (lambda rng: models.binary_convnet((4, 8), (16,), in_channels=1,
                                                        image_size=8, bn="shift", rng=rng),
                      (1, 8, 8)),
}
ROWS, BATCH, EPOCHS = 407, 40, 3  # the last batch of each epoch has 7 rows: shards of 4 and 3


def synthetic(shape, n=ROWS, seed=11):
    """Inputs uniform in [-1, 1] (no constant feature) and labels of a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n,) + shape).astype(np.float32)
    w = rng.normal(size=(int(np.prod(shape)), 10))
    return x, (x.reshape(n, -1) @ w).argmax(axis=1).astype(np.int64)


def equivalence(name, comm=None, **dp_options):
    """EPOCHS epochs of ``train.train_epoch`` on synthetic data, data-parallel over ``comm``
    (one process when None; ``dp_options`` for ``DataParallel``): per-epoch (loss,
    training error, held-out error), and the final state dict."""
    build, shape = CASES[name]
    rng = np.random.default_rng(5)
    model = build(rng)
    opt = optim.Adam(model.parameters(), lr=3e-3)
    x, y = synthetic(shape)
    hx, hy = synthetic(shape, n=101, seed=12)
    dp = None if comm is None else distributed.DataParallel(model, comm, **dp_options)
    history = []
    for _ in range(EPOCHS):
        loss, err, seen = T.train_epoch(model, opt, losses.squared_hinge, x, y, BATCH, rng,
                                        dp=dp)
        assert seen == ROWS, seen
        history.append((loss, err, T.error_rate(model, hx, hy, 50, dp=dp)))
    return history, model.state_dict()


def case_equivalence(comm, out):
    for name in CASES:
        history, state = equivalence(name, comm)
        if comm.rank == 0:
            np.savez(out / f"{name}.npz", history=np.array(history), **state)
    # the all-reduce overlapped with the backward pass, in small buckets: the same sums
    history, state = equivalence("mlp-dropout-stochastic", comm, overlap=True, bucket_bytes=3000)
    if comm.rank == 0:
        np.savez(out / "overlap.npz", history=np.array(history), **state)


def case_comm(comm, out):
    """Communicator unit checks with every rank taking part."""
    r, n = comm.rank, comm.size
    for dtype in (np.float32, np.float64, np.float16, np.int64):
        a = np.arange(6, dtype=dtype) * (r + 1)
        assert comm.allreduce(a) is a  # in place
        np.testing.assert_array_equal(a, np.arange(6, dtype=dtype) * n * (n + 1) // 2)
    m = np.array([r, -r], np.float64)
    comm.allreduce(m, op="max")
    np.testing.assert_array_equal(m, [n - 1, 0])
    b = np.full((2, 3), r, np.float32)
    assert comm.broadcast(b, root=n - 1) is b
    np.testing.assert_array_equal(b, np.full((2, 3), n - 1))
    assert comm.bcast_object({"rank": r}) == {"rank": 0}
    assert comm.sum_values(1, r) == (n, n * (n - 1) / 2)
    blocks = [tuple(x) for x in _gather(comm, comm.block(10))]
    assert blocks[0][0] == 0 and blocks[-1][1] == 10 and all(
        blocks[i][1] == blocks[i + 1][0] for i in range(n - 1)), blocks
    comm.barrier()
    try:
        comm.root_call(lambda: (_ for _ in ()).throw(FileNotFoundError("only root sees this")))
    except FileNotFoundError as exc:
        assert "only root" in str(exc) and exc.minibnn_all_ranks
    else:
        raise AssertionError("root_call did not raise on every rank")
    assert comm.root_call(lambda: 42) == 42
    for bad in (lambda: comm.allreduce(np.zeros((4, 4))[:, 0]),
                lambda: comm.allreduce([1.0, 2.0]), lambda: comm.allreduce(np.zeros(2), "min"),
                lambda: comm.broadcast(np.zeros(2), root=n)):
        try:
            bad()
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError("bad collective arguments were accepted")
    # gradients travel in buckets: one message per bucket per step, float16 on request
    model = models.mnist_mlp(hidden=16, layers=2, in_features=20, dropout_in=0,
                             dropout_hidden=0, rng=np.random.default_rng(1))
    x, y = synthetic((20,), n=40)
    grads = {}
    for dtype, overlap in (("float32", False), ("float16", False), ("float32", True)):
        dp = distributed.DataParallel(model, comm, bucket_bytes=1000, grad_dtype=dtype,
                                      overlap=overlap)
        assert 1 < len(dp.buckets) < len(dp.params), dp.buckets
        idx = dp.shard(np.arange(40))
        loss = losses.squared_hinge(model(T.Tensor(x[idx])), y[idx])
        model.zero_grad()
        before = comm.messages
        dp.backward(loss)
        assert comm.messages - before == len(dp.buckets) + 3  # + one per batch norm
        grads[dtype, overlap] = [p.grad.copy() for p in dp.params]
        assert all(g.dtype == np.float32 for g in grads[dtype, overlap])
        dp.close()
    for a, b, c in zip(grads["float32", False], grads["float16", False],
                       grads["float32", True]):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-3 * np.abs(a).max())
        np.testing.assert_array_equal(c, a)  # overlapped: the same sums
    if r == 0:
        (out / "comm.json").write_text(json.dumps(dict(size=n, describe=comm.describe(),
                                                       messages=comm.messages)))


def _gather(comm, pair):
    """Every rank's pair, through allreduce (rank r fills row r)."""
    rows = np.zeros((comm.size, 2), np.int64)
    rows[comm.rank] = pair
    return comm.allreduce(rows).tolist()


def small_config(**kw):
    """A quick MNIST run. SGD, because Adam divides by the root of the squared gradients:
    where the true gradient is zero (the first layer's weights on MNIST's always-black
    border pixels, whose effect the batch norm after it removes) the float32 gradient is
    rounding noise that depends on the reduction order, and Adam turns it into steps of
    up to about lr * lr_scale * |g| / eps. The synthetic data of ``equivalence`` has no
    constant feature, and there Adam is compared too."""
    base = dict(hidden=32, layers=2, epochs=3, batch_size=50, train_limit=600, seed=3,
                lr_start=1.0, lr_end=0.1, optimizer="sgd")
    base.update(kw)
    return T.TrainConfig(**base)


#: the end-to-end runs: standard BN with its statistics recomputed before evaluation
#: (250 images: one batch, split across the ranks), and shift BN with dropout and
#: stochastic binary weights
TRAIN_CASES = {"train-standard": dict(bn_recompute=250),
               "train-shift-dropout": dict(bn="shift", dropout_in=0.2, dropout_hidden=0.3,
                                           stochastic=True)}


def case_train(comm, out):
    """The whole ``train`` on an MNIST subset, and the same run stopped after one epoch and
    resumed twice (the resume test)."""
    quiet = lambda *_: None  # noqa: E731
    for name, kw in TRAIN_CASES.items():
        T.train(small_config(**kw), out / name, progress=False, log=quiet, comm=comm)
    cfg = small_config(bn="shift", dropout_hidden=0.3, optimizer="adam")
    T.train(cfg, out / "full", progress=False, log=quiet, comm=comm)
    T.train(small_config(bn="shift", dropout_hidden=0.3, optimizer="adam"), out / "part",
            progress=False, stop_after=1, log=quiet, comm=comm)
    T.train(run_dir=out / "part", resume=True, progress=False, stop_after=1, log=quiet,
            comm=comm)
    T.train(run_dir=out / "part", resume=True, progress=False, log=quiet, comm=comm)


def fail(how, out):
    """``python -m minibnn train --distributed`` where rank 1 fails in its 27th step (the
    3rd of epoch 3): ``raise`` raises, ``kill`` kills itself. Checkpoints are written in a
    background thread while the next epoch trains, at most one in flight: by then epoch 1's
    is on disk for sure (epoch 2's submit waited for it), epoch 2's may still be in flight
    and is lost when mpiexec SIGKILLs rank 0."""
    import os
    import signal

    from minibnn import cli
    step, calls = T.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 27 and comm_rank() == 1:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return step(*args, **kwargs)

    T.train_step = failing_step
    return cli.main(["train", "--distributed", "--hidden", "16", "--layers", "1",
                     "--batch-size", "50", "--train-limit", "600", "--epochs", "4",
                     "--no-progress", "--out", str(Path(out) / "run")])


def comm_rank():
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


def case_mismatch(comm, out):
    """Ranks started with different options (here: seeds) are refused on every rank."""
    try:
        T.train(small_config(seed=comm.rank, epochs=1), out / "run", progress=False,
                log=lambda *_: None, comm=comm)
    except ValueError as exc:
        assert "the training configuration differs between the ranks" in str(exc), exc
        assert "1 of 2 ranks disagree" in str(exc), exc
        if comm.rank == 0:
            (out / "refused.txt").write_text(str(exc))
    else:
        raise AssertionError("ranks with different seeds were accepted")


def main(case, out):
    if case in ("raise", "kill"):
        return fail(case, out)
    comm = distributed.init()
    with distributed.abort_on_error(comm):
        globals()[f"case_{case}"](comm, Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
