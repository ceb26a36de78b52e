"""Data-parallel training over MPI (mpi4py), with NCCL (through CuPy) between GPUs.

N processes (ranks), started by ``mpiexec -n N`` or ``srun``, each hold a full copy of the
model. Every global batch of B rows is split into N contiguous shards; each rank runs
forward and backward on its shard, the gradients are added over the ranks, and every
rank takes the same optimizer step. The design goal is that N ranks compute what one
process computes with batch B, up to float32 reduction order:

* **the shared stream.** Every rank builds its run from the same seed, so the generator
  that shuffles, initialises, drops out and binarizes stochastically is the same on
  every rank and advances in step with one process: each rank draws the permutation of
  the whole epoch, dropout masks for the whole batch (``nn.Dropout.rows``: it keeps its
  rows of the mask), and stochastic binary weights of the whole layer. Results depend on
  the seed, not on N.
* **gradients.** The loss is a mean over the batch, L = sum_r (b_r / B) L_r with L_r the
  mean loss of rank r's b_r rows. Each rank back-propagates (b_r / B) L_r, so the *sum*
  of the ranks' gradients is dL/dw (unequal shards included).
* **synchronised batch norm.** Batch statistics are those of the whole batch: one
  all-reduce of per-channel sums (float64) in the forward, and one of the backward's two
  per-channel sums (``nn._BatchNormBase.sync``, ``functional.BatchNormTrain``,
  ``functional.SyncMean`` for the shift-based variant).
* **initial state** is broadcast from rank 0, so the replicas start equal however they
  were built (``train`` also refuses ranks started with different options, and checks
  after every epoch that the replicas are still equal).
* **buckets**: the gradients travel in a few large flat buffers, optionally as float16,
  optionally all-reduced while the backward pass still runs (``DataParallel``).

The engine is MPI through mpi4py (imported here only, lazily: the rest of minibnn never
needs it); CuPy arrays go through NCCL (``cupy.cuda.nccl``, reached via
``backend.nccl``), with MPI used only to hand NCCL's unique id to every rank, the way
ChainerMN paired the two. Without mpi4py, or under one rank, ``init`` returns a
one-rank communicator whose collectives do nothing, and says so.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

import numpy as np

from . import backend, nn

#: default size of one gradient bucket (one flat buffer, one all-reduce)
BUCKET_BYTES = 25 << 20
#: gradient dtypes the all-reduce can carry: float32, or float16 to halve the bytes moved
GRAD_DTYPES = ("float32", "float16")


class Communicator:
    """``rank``, ``size`` and collectives on arrays, in place: ``allreduce`` (sum or max),
    ``broadcast`` from a root, ``barrier``; ``bcast_object`` for small Python objects.

    NumPy arrays travel over MPI; CuPy arrays over NCCL (created on first use: every rank
    must reach it, as with any collective). ``mpi_comm`` None makes a one-rank
    communicator whose collectives return their input; ``note`` then says why.
    ``messages`` and ``bytes`` count what ``allreduce`` and ``broadcast`` sent (the payload
    of each message, before the algorithm's own traffic).
    """

    def __init__(self, mpi_comm=None, note=""):
        self._mpi = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.note = note
        self._nccl = None
        self.messages, self.bytes = 0, 0

    def describe(self):
        """What this runs on, in words (printed by ``train --distributed``)."""
        if self._mpi is None:
            return f"1 rank, no MPI ({self.note})" if self.note else "1 rank, no MPI"
        from mpi4py import MPI
        library = " ".join(MPI.Get_library_version().splitlines()[0].split())
        text = f"{self.size} rank{'s' if self.size > 1 else ''} over MPI ({library})"
        return text + (f"; {self.note}" if self.note else "")

    # --- collectives on arrays ---------------------------------------------------------

    def allreduce(self, array, op="sum"):
        """Replace ``array`` (contiguous) by its elementwise ``op`` ("sum" or "max") over the
        ranks, in place; returns it. Every rank must call it with the same shape and dtype."""
        self._message(array, "allreduce", op)
        if self.size == 1:
            return array
        if backend.is_cupy_array(array):
            self._nccl_comm().allreduce(array, op)
        else:
            from mpi4py import MPI
            self._mpi.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM if op == "sum" else MPI.MAX)
        return array

    def broadcast(self, array, root=0):
        """Overwrite ``array`` on every rank with root's copy, in place; returns it."""
        self._message(array, "broadcast", root=root)
        if self.size == 1:
            return array
        if backend.is_cupy_array(array):
            self._nccl_comm().broadcast(array, root)
        else:
            self._mpi.Bcast(array, root=root)
        return array

    def allreduce_start(self, array, op="sum"):
        """Start ``allreduce(array, op)`` without waiting (MPI ``Iallreduce``); returns a
        handle for ``wait``. ``array`` must stay untouched until then. CuPy arrays: the
        NCCL call is enqueued on the current stream, and the handle is None."""
        self._message(array, "allreduce_start", op)
        if self.size == 1:
            return None
        if backend.is_cupy_array(array):
            self._nccl_comm().allreduce(array, op)
            return None
        from mpi4py import MPI
        return self._mpi.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM if op == "sum" else MPI.MAX)

    def wait(self, handle):
        """Wait for a collective that ``allreduce_start`` began."""
        if handle is not None:
            handle.Wait()

    def barrier(self):
        """Wait until every rank has reached this call."""
        if self._mpi is not None:
            self._mpi.Barrier()

    def bcast_object(self, obj, root=0):
        """A small picklable object (a config, a checkpoint) from ``root`` to every rank."""
        self._check_root(root)
        return obj if self._mpi is None else self._mpi.bcast(obj, root=root)

    def sum_values(self, *values):
        """Python numbers added over the ranks (one float64 message); returns a tuple."""
        return tuple(float(v) for v in self.allreduce(np.array(values, np.float64)))

    def block(self, n):
        """(lo, hi): this rank's contiguous part of range(n); parts differ by at most one
        and follow rank order (``numpy.array_split``'s split)."""
        q, r = divmod(int(n), self.size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def root_call(self, fn, root=0):
        """``fn()`` on ``root`` only; its result, or the exception it raised, reaches every
        rank (so an error such as a missing checkpoint stops every rank the same way,
        instead of leaving the others waiting in a collective)."""
        result, error = None, None
        if self.rank == root:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank, raised below
                error = exc
        result, error = self.bcast_object((result, error), root=root)
        if error is not None:
            error.minibnn_all_ranks = True  # every rank raises it: no abort needed
            raise error
        return result

    def check_same(self, value, what):
        """Raise ValueError on every rank unless every rank holds the same ``value`` (a
        picklable, comparable object) as rank 0: ranks started with different options
        would otherwise wait on each other forever or train different things."""
        root = self.bcast_object(value)
        differ = self.sum_values(root != value)[0]
        if differ:
            error = ValueError(f"{what} differs between the ranks: {int(differ)} of "
                               f"{self.size} ranks disagree with rank 0 ({root!r}); start "
                               "every rank with the same options")
            error.minibnn_all_ranks = True
            raise error

    def abort(self, code=1):
        """Stop every rank of the job now (``MPI_Abort``); without MPI, exit this process."""
        if self._mpi is not None:
            self._mpi.Abort(code)
        raise SystemExit(code)

    def _message(self, array, what, op=None, root=None):
        """Check the arguments of collective ``what`` on ``array``: its reduction ``op``
        for an all-reduce, its ``root`` for a broadcast; then count the message and its
        bytes."""
        if what.startswith("allreduce") and op not in ("sum", "max"):
            raise ValueError(f"{what}: op must be 'sum' or 'max', got {op!r}")
        _check_contiguous(array, what)
        if root is not None:
            self._check_root(root)
        self.messages, self.bytes = self.messages + 1, self.bytes + array.nbytes

    def _check_root(self, root):
        if not 0 <= root < self.size:
            raise ValueError(f"root must be a rank in [0, {self.size}), got {root}")

    def _nccl_comm(self):
        if self._nccl is None:
            self._nccl = NcclComm(self)
        return self._nccl


def _check_contiguous(array, what):
    if not (isinstance(array, np.ndarray) or backend.is_cupy_array(array)):
        raise TypeError(f"{what}: expected a NumPy or CuPy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what}: the array must be C-contiguous (it is reduced in place)")


class NcclComm:
    """NCCL between GPUs, one rank per GPU: rank 0 makes NCCL's unique id, MPI hands it to
    every rank, and each rank joins the NCCL communicator on its current CuPy device.
    Collectives run on CuPy's current stream, in place, on contiguous CuPy arrays."""

    _TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
              "int32": "NCCL_INT32", "int64": "NCCL_INT64", "uint8": "NCCL_UINT8"}

    def __init__(self, comm):
        self.nccl = backend.nccl()  # BackendUnavailable with the reason when there is none
        uid = comm.bcast_object(self.nccl.get_unique_id() if comm.rank == 0 else None)
        self.comm = self.nccl.NcclCommunicator(comm.size, uid, comm.rank)

    def _type(self, array):
        name = self._TYPES.get(array.dtype.name)
        if name is None:
            raise TypeError(f"NCCL: dtype {array.dtype} is not supported; use one of "
                            f"{sorted(self._TYPES)}")
        return getattr(self.nccl, name)

    def allreduce(self, array, op):
        nccl_op = self.nccl.NCCL_SUM if op == "sum" else self.nccl.NCCL_MAX
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, self._type(array), nccl_op,
                            backend.cuda_stream_ptr())

    def broadcast(self, array, root):
        self.comm.bcast(array.data.ptr, array.size, self._type(array), root,
                        backend.cuda_stream_ptr())


def init():
    """The world communicator: MPI's COMM_WORLD through mpi4py when it can be imported
    (started by ``mpiexec``/``srun`` or as a one-rank singleton), else a one-rank
    communicator whose ``note`` says why. Under the cupy backend each rank takes GPU
    ``local rank % number of GPUs`` (one rank per GPU on each node)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        return Communicator(None, f"mpi4py is not importable ({exc}); install it with "
                                  "pip install minibnn[dist]")
    comm = Communicator(MPI.COMM_WORLD)
    if comm.size == 1:
        comm.note = "one rank: start N ranks with mpiexec -n N"
    if backend.active() == "cupy":
        local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        gpu = backend.select_gpu(local.Get_rank())
        local.Free()
        comm.note = (comm.note + "; " if comm.note else "") + f"rank {comm.rank} on GPU {gpu}"
    return comm


@contextlib.contextmanager
def abort_on_error(comm, hint=""):
    """Run the body; if it raises on this rank while others may wait for it in a collective,
    print the error with the rank and stop the whole job with ``comm.abort`` (MPI_Abort), so
    no rank hangs. Errors that ``root_call`` raised on every rank are re-raised (every rank
    leaves the same way; only rank 0 reports it). ``hint`` (a string, or a function that
    returns one) ends the message, e.g. where the last complete checkpoint is."""
    try:
        yield comm
    except BaseException as exc:
        if comm.size == 1 or isinstance(exc, SystemExit) and not exc.code:
            raise
        if getattr(exc, "minibnn_all_ranks", False):
            if comm.rank == 0:
                raise
            raise SystemExit(2) from None
        if isinstance(exc, KeyboardInterrupt):
            what, tb = "interrupted", ""
        else:
            what, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        hint = hint() if callable(hint) else hint
        print(f"{tb}minibnn: rank {comm.rank} of {comm.size} failed: {what}; stopping all "
              f"{comm.size} ranks{hint}", file=sys.stderr, flush=True)
        time.sleep(1.0)  # let mpiexec pass the message on before MPI_Abort tears the job down
        comm.abort(1)


def _split(sizes, limit):
    """Consecutive groups of indices into ``sizes`` (bytes), each group's total <= ``limit``
    unless it is a single item larger than the limit."""
    groups, current, total = [], [], 0
    for i, nbytes in enumerate(sizes):
        if current and total + nbytes > limit:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += nbytes
    return groups + ([current] if current else [])


class DataParallel:
    """Makes a model data-parallel over ``comm``'s ranks.

    On creation: broadcasts every parameter and buffer from rank 0, packs the parameters
    into buckets of about ``bucket_bytes`` (one flat buffer each: a few large messages per
    step, not one per parameter), and, with more than one rank, turns on synchronised batch
    norm and whole-batch dropout masks in the model (``close`` turns them off).

    Per step: ``shard(idx)`` gives this rank's rows of the global batch ``idx`` (and tells
    the dropout layers where they lie), ``backward(loss)`` back-propagates the shard's
    mean loss weighted by its share of the batch (``scale_loss``) and adds the gradients
    over the ranks (``allreduce_gradients``). ``grad_dtype="float16"`` sends the gradients
    as float16 (half the bytes, about 3 significant digits per addend; the sum is rounded
    to float16 too). ``overlap=True`` starts each bucket's all-reduce during the backward
    pass, as soon as its gradients are complete (buckets run from the last layer back).
    """

    def __init__(self, model, comm, bucket_bytes=BUCKET_BYTES, grad_dtype="float32",
                 overlap=False):
        if grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
        if int(bucket_bytes) < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.model, self.comm = model, comm
        self.grad_dtype = np.dtype(grad_dtype)
        self.params = model.parameters()
        self.bucket_bytes, self.overlap = int(bucket_bytes), bool(overlap)
        # buckets from the last parameter back: the backward pass completes them in order
        last_first = list(range(len(self.params)))[::-1]
        self.buckets = [[last_first[i] for i in group] for group in _split(
            [self.params[i].data.size * self.grad_dtype.itemsize for i in last_first],
            self.bucket_bytes)]
        self._broadcast_state()
        self.norms = [m for m in model.modules() if isinstance(m, nn._BatchNormBase)]
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        if comm.size > 1:
            for b in self.norms:
                b.sync = self._sum_float64
        self.scale = 1.0

    def _broadcast_state(self):
        """Every parameter and buffer from rank 0 (all float32 in minibnn), one flat message
        per bucket's worth of bytes."""
        arrays = [p.data for p in self.params] + [a for _, a in self.model.named_buffers()]
        for group in _split([a.size * 4 for a in arrays], self.bucket_bytes):
            xp = backend.get_array_module(arrays[group[0]])
            flat = xp.concatenate([arrays[i].reshape(-1).astype(np.float32) for i in group])
            self.comm.broadcast(flat)
            offset = 0
            for i in group:
                n = arrays[i].size
                arrays[i][...] = flat[offset:offset + n].reshape(arrays[i].shape)
                offset += n

    def _sum_float64(self, array):
        """Batch norm's hook: ``array`` (float64) added over the ranks, in place."""
        return self.comm.allreduce(array)

    @property
    def grad_bytes(self):
        """Bytes of gradient this rank hands to the all-reduce per step (the payload)."""
        return sum(p.data.size for p in self.params) * self.grad_dtype.itemsize

    def check_batches(self, n, batch_size, what="batch_size", change="batch_size or train_limit"):
        """Refuse a split that would leave a rank without rows (the last batch of ``n``
        rows, or a batch smaller than the number of ranks); ``what`` and ``change`` name
        the options in the message."""
        last = n % batch_size
        if n and (batch_size < self.comm.size or 0 < last < self.comm.size):
            raise ValueError(
                f"{what} {batch_size} with {n} rows gives a batch of "
                f"{min(batch_size, last or batch_size)} rows, fewer than the {self.comm.size} "
                f"ranks: every rank needs at least one row of every batch; change {change}")

    def shard(self, idx):
        """This rank's rows of the global batch ``idx`` (a contiguous block, ``block``);
        sets the dropout layers' ``rows`` and the loss scale b_r / B for this step."""
        lo, hi = self.comm.block(len(idx))
        if self.comm.size > 1:
            for d in self.dropouts:
                d.rows = (lo, len(idx))
        self.scale = (hi - lo) / len(idx)
        return idx[lo:hi]

    def scale_loss(self, loss):
        """The shard's mean loss times its share of the batch, b_r / B: what this rank
        back-propagates so that the gradients' sum over the ranks is the batch mean's."""
        return loss if self.comm.size == 1 else loss * self.scale

    def backward(self, loss):
        """``backward()`` of this rank's scaled loss (``scale_loss``) and the gradients
        added over the ranks. With ``overlap``, each bucket's all-reduce starts (MPI's
        non-blocking ``Iallreduce``) as soon as the backward pass has completed its
        gradients, and runs while the earlier layers' gradients are computed; the sums
        are the same as without. On GPUs the NCCL call is issued early too, but runs on
        CuPy's current stream, in order with the backward's kernels."""
        if self.comm.size == 1:
            loss.backward()
            return
        if not self.overlap:
            self.scale_loss(loss).backward()
            self.allreduce_gradients()
            return
        bucket_of = {id(self.params[i]): k for k, b in enumerate(self.buckets) for i in b}
        missing = [len(b) for b in self.buckets]
        started = {}

        def on_leaf(tensor):
            k = bucket_of.get(id(tensor))
            if k is not None:
                missing[k] -= 1
                if missing[k] == 0:
                    started[k] = self._start(k)

        self.scale_loss(loss).backward(on_leaf=on_leaf)
        for k in range(len(self.buckets)):  # buckets with a parameter the loss does not reach
            if k not in started:
                started[k] = self._start(k)
        for k, (flat, handle) in started.items():
            self.comm.wait(handle)
            self._unpack(k, flat)

    def allreduce_gradients(self):
        """After ``backward()``: add every parameter's gradient over the ranks, one flat
        buffer per bucket. A parameter without a gradient adds zeros (every rank runs the
        same graph, so all agree on which ones have one)."""
        if self.comm.size == 1:
            return
        for k in range(len(self.buckets)):
            flat = self._pack(k)
            self.comm.allreduce(flat)
            self._unpack(k, flat)

    def _pack(self, k):
        """Bucket ``k``'s gradients in one flat buffer of ``grad_dtype``."""
        ps = [self.params[i] for i in self.buckets[k]]
        xp = backend.get_array_module(ps[0].data)
        return xp.concatenate([(p.grad if p.grad is not None else xp.zeros_like(p.data))
                               .reshape(-1).astype(self.grad_dtype) for p in ps])

    def _start(self, k):
        flat = self._pack(k)
        return flat, self.comm.allreduce_start(flat)

    def _unpack(self, k, flat):
        """The summed gradients of bucket ``k`` back into its parameters' ``grad``."""
        offset = 0
        for i in self.buckets[k]:
            p = self.params[i]
            n = p.data.size
            if p.grad is not None:
                p.grad = flat[offset:offset + n].reshape(p.data.shape).astype(p.data.dtype)
            offset += n

    def check_replicas(self):
        """Raise RuntimeError if the ranks' parameters have drifted apart (compares a
        float64 checksum of each parameter: max and min over the ranks in one message)."""
        if self.comm.size == 1:
            return
        sums = np.array([float(backend.to_numpy(p.data).astype(np.float64).sum())
                         for p in self.params])
        both = self.comm.allreduce(np.concatenate([sums, -sums]), op="max")
        bad = np.nonzero(both[:len(sums)] != -both[len(sums):])[0]
        if len(bad):
            names = [n for n, _ in self.model.named_parameters()]
            raise RuntimeError(f"the ranks' copies of the model differ in {names[bad[0]]} "
                               f"(and {len(bad) - 1} more parameters)")

    def close(self):
        """Turn synchronised batch norm and whole-batch dropout off again."""
        for b in self.norms:
            b.sync = None
        for d in self.dropouts:
            d.rows = None
