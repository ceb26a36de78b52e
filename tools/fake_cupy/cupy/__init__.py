"""A NumPy-backed stand-in for CuPy that keeps CuPy's host/device discipline, for checking
minibnn's cupy code paths on a machine without a GPU.

    PYTHONPATH=$PWD/tools/fake_cupy MINIBNN_BACKEND=cupy python -m pytest

(an absolute path: some tests start Python in another folder.)

What it checks: that the library and the tests never mix host (NumPy) and device arrays
implicitly. Like CuPy, ``np.asarray(device_array)`` raises TypeError, a device operation
given a non-scalar NumPy array raises TypeError, assigning a NumPy array into a device
array raises ValueError, device arrays are unhashable, and ``.get()`` / ``cupy.asnumpy``
are the explicit ways back. Values are computed by NumPy, and the project's CUDA kernels
(``kernels/*.cu``) are replaced by ``minibnn.kernels.reference`` (the convolution glue of
``conv_glue.cu`` by the NumPy code of ``minibnn.functional`` and ``minibnn.binary``, after
checking the kernel's scalar arguments against its CUDA signature).

What it cannot check: anything about the GPU itself: the CUDA kernels, speed, streams,
CUDA graphs (``Stream.begin_capture`` raises), cuBLAS precision. It is a development aid,
not a substitute for running the suite on a GPU.
"""

import numpy as _np

__fake__ = True
__version__ = "0.0-fake"


def _msg_implicit():
    return ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly.")


def _is_host_array(x):
    return isinstance(x, _np.ndarray) and not isinstance(x, _np.generic)


def _unwrap(x, where="argument"):
    """Device arrays -> their NumPy data; host arrays are refused (as CuPy does)."""
    if isinstance(x, ndarray):
        return x._a
    if _is_host_array(x):
        if x.ndim == 0:
            return x[()]
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, _np.ndarray) and not isinstance(x, ndarray):
        return ndarray(_arr=x)
    if isinstance(x, _np.generic):  # CuPy reductions and indexing give 0-d device arrays
        return ndarray(_arr=_np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


class _Data:
    def __init__(self, a):
        self.ptr = a.__array_interface__["data"][0]


class ndarray:
    """A device array: NumPy data behind CuPy's conversion rules."""

    __hash__ = None  # CuPy arrays are unhashable

    def __init__(self, shape=None, dtype=float, _arr=None):
        self._a = _np.empty(shape, dtype) if _arr is None else _arr

    # --- explicit and implicit conversion --------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        return _np.array(self._a, copy=True)

    def set(self, arr, stream=None):
        """CuPy's host-to-device copy into this array: a host array of the same shape and
        dtype, both C-contiguous (CuPy refuses others)."""
        if not _is_host_array(arr):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (arr.flags.c_contiguous and self._a.flags.c_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        self._a[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_msg_implicit())

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = [_unwrap(x) for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # --- attributes ---------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _Data(self._a))
    T = property(lambda self: ndarray(_arr=self._a.T))
    device = property(lambda self: cuda.Device(0))

    @property
    def base(self):
        return None if self._a.base is None else _wrap(self._a.base)

    def __getattr__(self, name):
        if name.startswith("__"):  # no buffer, __array_interface__ or __array_struct__ export
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                if name in ("fill",) and args and _is_host_array(args[0]) and args[0].ndim:
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
                return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
            return method
        return _wrap(attr)

    def tolist(self):
        return self._a.tolist()

    def item(self):
        return self._a.item()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(_arr=_np.asarray(v)) if not isinstance(v, _np.ndarray) else ndarray(_arr=v)
                for v in self._a)

    def __repr__(self):
        return "fake_cupy." + repr(self._a)

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __complex__(self):
        return complex(self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_key(key)])

    def __setitem__(self, key, value):
        if _is_host_array(value) and value.ndim > 0:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a[_key(key)] = _unwrap(value)

    def __copy__(self):
        return ndarray(_arr=self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(_arr=self._a.copy())

    def __reduce__(self):  # pickling a device array goes through the host, as CuPy does
        return (_from_host, (self._a.copy(),))


def _from_host(a):
    return ndarray(_arr=a)


def _key(key):
    if isinstance(key, tuple):
        return tuple(_key(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    return key  # CuPy accepts NumPy index arrays and lists as indices


def _binary(name):
    def op(self, other):
        if _is_host_array(other) and other.ndim:
            raise TypeError(f"Unsupported type {type(other)}")
        if isinstance(other, (list, tuple)):
            raise TypeError(f"Unsupported type {type(other)}")
        return _wrap(getattr(self._a, name)(_unwrap(other)))
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne", "divmod"):
    for _form in (f"__{_name}__", f"__r{_name}__", f"__i{_name}__"):
        if hasattr(_np.ndarray, _form):
            setattr(ndarray, _form, _binary(_form))
for _form in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _form, (lambda f: lambda self: _wrap(getattr(self._a, f)()))(_form))


def _inplace(name):
    op = _binary(name)

    def iop(self, other):
        op(self, other)
        return self
    return iop


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift"):
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__"))


# --- module functions -------------------------------------------------------------------------

def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else ndarray(_arr=a._a.astype(dtype))
    arr = _np.asarray(a, dtype=dtype, order=order)
    if arr.dtype.kind in "USOV":
        raise ValueError(f"Unsupported dtype {arr.dtype}")
    return ndarray(_arr=arr)


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        a = a._a
    arr = _np.array(a, dtype=dtype, copy=True, order=order, ndmin=ndmin)
    if arr.dtype.kind in "USOV":
        raise ValueError(f"Unsupported dtype {arr.dtype}")
    return ndarray(_arr=arr)


def asnumpy(a, stream=None, order="C", out=None):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def ascontiguousarray(a, dtype=None):
    return ndarray(_arr=_np.ascontiguousarray(_unwrap(a), dtype=dtype))


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


_PASSTHROUGH = {"dtype", "newaxis", "inf", "nan", "pi", "e", "iinfo", "finfo", "result_type",
                "promote_types", "can_cast", "issubdtype", "integer", "floating", "number",
                "signedinteger", "unsignedinteger", "bool_", "generic", "isscalar", "ndim",
                "errstate"}


def __getattr__(name):
    attr = getattr(_np, name)
    if name in _PASSTHROUGH or isinstance(attr, type) or not callable(attr):
        return attr

    def function(*args, **kwargs):
        return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
    function.__name__ = name
    return function


class _Fuse:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def fuse(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return _Fuse(args[0])
    return lambda fn: _Fuse(fn)


class _FakeKernel:
    """A CUDA kernel of kernels/*.cu, computed by minibnn.kernels.reference."""

    def __init__(self, name):
        self.name = name
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        from minibnn.kernels import reference as ref
        a = [x._a if isinstance(x, ndarray) else x for x in args]
        if self.name.startswith("pack_rows_"):
            x, rows, k, _, _, out, words, flag = a
            x = x.reshape(int(rows), int(k))
            if x.dtype.kind == "f" and _np.isnan(x).any():
                flag[0] = 1
                x = _np.where(_np.isnan(x), 0, x)
            out[...] = ref.pack_rows(x >= 0 if x.dtype != _np.bool_ else x)
        elif self.name == "pack_threshold_i32":
            z, rows, n, thr, periods, out, words = a
            rows, n, periods = int(rows), int(n), int(periods)
            t = thr.reshape(periods, n)
            fire = (z.reshape(-1, periods, n).astype(_np.int64) >= t[None]).reshape(rows, n)
            out[...] = ref.pack_rows(fire)
        elif self.name == "row_popcount":
            x, rows, words, pop = a
            pop[...] = _np.unpackbits(x[: int(rows)].view(_np.uint8), axis=1).sum(axis=1)
        elif self.name == "xnor_gemm_cuda_core":
            ap, bp, out, m, n, w, k = a
            out[...] = ref.xnor_gemm(ap, bp, int(k))
        elif self.name == "xnor_gemm_cuda_core_threshold":
            ap, bp, thr, periods, out, words, m, n, w, k = a
            _threshold_store(ref.xnor_gemm(ap, bp, int(k)), thr, periods, out, words)
        elif self.name.removesuffix("_threshold") in ("xnor_gemm_tc", "xnor_gemm_tc256",
                                                       "xnor_gemm_tcl", "xnor_gemm_tcl256",
                                                       "xnor_gemm_wg", "xnor_gemm_wg128"):
            ap, bp, pop_a, pop_b, *rest = a
            if "_wg" in self.name:  # the wgmma entries also take B's padded row count
                rows_b = int(rest.pop(-2))
                assert rows_b == bp.shape[0]
            m, n, wp, k = (int(v) for v in rest[-4:])
            assert ap.shape[1] == bp.shape[1] == wp and wp % 8 == 0
            row_tile = 256 if "256" in self.name else 128
            assert ap.shape[0] % row_tile == 0 and bp.shape[0] % 128 == 0
            # the kernel's AND identity with the popcounts it is given (wrong ones show):
            # popcount(a & b) = (|a| + |b| - popcount(a ^ b)) / 2, the true counts here
            # (over the real words: the pad words are zero in both, as asserted)
            w = ref.n_words(k)
            assert not ap[:, w:].any() and not bp[:, w:].any()
            a_, b_ = _np.ascontiguousarray(ap[:m, :w]), _np.ascontiguousarray(bp[:n, :w])
            xor = (w * 64 - ref.xnor_gemm(a_, b_, w * 64).astype(_np.int64)) // 2
            true_a = _np.bitwise_count(a_).sum(axis=1, dtype=_np.int64)
            true_b = _np.bitwise_count(b_).sum(axis=1, dtype=_np.int64)
            both = (true_a[:, None] + true_b[None, :] - xor) // 2
            z = (k - 2 * pop_a[:m, None].astype(_np.int64) - 2 * pop_b[None, :n].astype(_np.int64)
                 + 4 * both).astype(_np.int32)
            if not self.name.endswith("_threshold"):
                rest[0][...] = z
            else:
                _threshold_store(z, *rest[:4])
        elif self.name.removesuffix("_threshold") in ("xnor_gemm_tc_direct",
                                                       "xnor_gemm_tcl_direct"):
            # unpadded operands; the kernel counts the popcounts itself
            ap, bp, *rest = a
            m, n, w, wide, k = (int(v) for v in rest[-5:])
            assert ap.shape == (m, w) and bp.shape == (n, w) and w > 0
            assert ap.flags.c_contiguous and bp.flags.c_contiguous
            if wide:
                assert w % 2 == 0 and ap.ctypes.data % 16 == 0 and bp.ctypes.data % 16 == 0
            z = ref.xnor_gemm(ap, bp, k)
            if not self.name.endswith("_threshold"):
                rest[0][...] = z
            else:
                _threshold_store(z, *rest[:4])
        elif self.name.startswith(_CONV_GLUE):
            _conv_glue(self.name, a)
        else:
            raise NotImplementedError(f"fake cupy: no stand-in for CUDA kernel {self.name!r}")


def _threshold_store(z, thr, periods, out, words):
    """The threshold-and-pack epilogue: bit (i, j) = z[i, j] >= thr[(i mod periods) N + j]."""
    from minibnn.kernels import reference as ref
    assert thr.dtype == _np.int64 and type(periods) is _np.int64 and type(words) is _np.int64
    assert out.dtype == _np.uint64 and out.shape == (z.shape[0], int(words))
    t = thr.reshape(int(periods), z.shape[1])
    out[...] = ref.pack_threshold(z, t if int(periods) > 1 else t[0])


_CONV_GLUE = ("im2col_", "col2im_", "pack_sign_patches_", "max_pool2d_")


def _ints(values):
    """The int64 scalars of a launch of kernels/conv_glue.cu as ints; every size, stride and
    geometry parameter there is a ``long long``, so anything else is a wrapper bug."""
    for v in values:
        if type(v) is not _np.int64:
            raise TypeError(f"fake cupy: conv glue kernel got {v!r} ({type(v).__name__}) "
                            "where the CUDA signature has long long")
    return [int(v) for v in values]


def _check_view(x, strides, dtype):
    """The strides (in elements) a wrapper passed must be those of the array it passed."""
    if x.dtype != dtype:
        raise TypeError(f"fake cupy: conv glue kernel got dtype {x.dtype}, expected {dtype}")
    if tuple(strides) != tuple(s // x.itemsize for s in x.strides):
        raise ValueError(f"fake cupy: strides {strides} passed for an array with strides "
                         f"{x.strides} (itemsize {x.itemsize})")


def _conv_glue(name, a):
    """kernels/conv_glue.cu (launched by kernels/cupy_conv.py), computed by the NumPy
    reference code in minibnn.functional and minibnn.binary on the arrays the kernel got,
    after checking the scalar arguments against the CUDA signatures."""
    from minibnn import binary
    from minibnn import functional as F
    from minibnn.kernels import reference as ref
    dtype = _np.float32 if "_f32" in name else _np.float64
    if name.startswith("im2col_"):
        x, *ints, pad_value, out = a
        n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho, wo = _ints(ints)
        _check_view(x, (sn, sc, sh, sw), dtype)
        out_dtype = _np.uint16 if name.endswith("_bf16") else dtype  # bf16 bit patterns
        if type(pad_value) is not dtype or out.dtype != out_dtype:
            raise TypeError(f"fake cupy: {name} got pad_value {pad_value!r}, out {out.dtype}")
        assert x.shape == (n, c, h, w) and out.shape == (c * kh * kw, n * ho * wo)
        assert out.flags.c_contiguous
        patches = F.im2col(x, kh, kw, stride, padding, pad_value).T
        if out_dtype == _np.uint16:
            from minibnn.kernels import bf16
            patches = bf16.round_bits(patches)
        out[...] = patches
    elif name.startswith("col2im_"):
        cols, *ints, out = a
        s_row, s_col, n, c, h, w, kh, kw, stride, padding, ho, wo = _ints(ints)
        _check_view(cols, (s_row, s_col), dtype)
        assert out.shape == (n, c, h, w) and out.dtype == dtype and out.flags.c_contiguous
        out[...] = F.col2im(cols, (n, c, h, w), kh, kw, stride, padding)
    elif name.startswith("pack_sign_patches_"):
        x, *ints, out = a
        n, c, h, w, sn, sc, sh, sw, kh, kw, stride, padding, ho, wo, words = _ints(ints)
        _check_view(x, (sn, sc, sh, sw), dtype)
        assert x.shape == (n, c, h, w) and out.shape == (n * ho * wo, words)
        assert out.dtype == _np.uint64 and out.flags.c_contiguous
        out[...] = ref.pack_rows(binary.conv_sign_patches(x, kh, kw, stride, padding))
    elif name.startswith("max_pool2d_backward_"):
        g, *strides, arg, n, c, h, w, k, stride, ho, wo, out = a
        n, c, h, w, k, stride, ho, wo = _ints((n, c, h, w, k, stride, ho, wo))
        _check_view(g, _ints(strides), dtype)
        assert arg.dtype == (_np.uint8 if name.endswith("_u8") else _np.int32)
        assert arg.flags.c_contiguous and g.shape == arg.shape == (n, c, ho, wo)
        assert out.shape == (n, c, h, w) and out.dtype == dtype and out.flags.c_contiguous
        pool = F.MaxPool2d()
        pool.x_shape, pool.k, pool.stride, pool.saved = (n, c, h, w), k, stride, (arg,)
        out[...] = pool.backward(g)[0]
    elif name.startswith("max_pool2d_"):
        x, *ints, best, arg = a
        n, c, sn, sc, sh, sw, k, stride, ho, wo = _ints(ints)
        _check_view(x, (sn, sc, sh, sw), dtype)
        assert arg.dtype == (_np.uint8 if name.endswith("_u8") else _np.int32)
        assert x.shape[:2] == (n, c) and best.shape == arg.shape == (n, c, ho, wo)
        assert best.flags.c_contiguous and arg.flags.c_contiguous and best.dtype == dtype
        pool = F.MaxPool2d()
        best[...] = pool.forward(x, k, stride)
        arg[...] = pool.saved[0]
    else:
        raise NotImplementedError(f"fake cupy: no stand-in for CUDA kernel {name!r}")


class RawModule:
    def __init__(self, code=None, options=(), name_expressions=None, **kwargs):
        self.code = code

    def get_function(self, name):
        return _FakeKernel(name)


class RawKernel(_FakeKernel):
    def __init__(self, code, name, options=(), **kwargs):
        super().__init__(name)


class ElementwiseKernel:
    """Stand-ins, by kernel name, for the project's ElementwiseKernels (kernels/cupy_fused.py),
    computed with NumPy in the order of their CUDA bodies."""

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.name = name

    def __call__(self, *args):
        a = [x._a if isinstance(x, ndarray) else x for x in args]
        if self.name == "minibnn_adam":
            g, b1, c1, b2, c2, eps, alpha, lo, hi, clip, w, m, v = a
            t = w.dtype.type
            d = g * t(c1)
            m *= t(b1)
            m += d
            d = g * g
            d *= t(c2)
            v *= t(b2)
            v += d
            d = _np.sqrt(v)
            d += t(eps)
            d = m / d
            d = (d.astype(_np.float64) * alpha).astype(w.dtype)
            w -= d
            if clip:
                _np.clip(w, t(lo), t(hi), out=w)
        elif self.name == "minibnn_ema":
            x, c, mom, r = a
            t = r.dtype.type
            r[...] = t(c) * r + t(mom) * x.astype(r.dtype)
        elif self.name == "minibnn_sign":
            (x,) = a
            return _wrap(_np.where(x >= 0, x.dtype.type(1), x.dtype.type(-1)))
        elif self.name == "minibnn_sign_ste":
            (x,) = a
            return _wrap((_np.where(x >= 0, x.dtype.type(1), x.dtype.type(-1)), abs(x) <= 1))
        elif self.name == "minibnn_dropout":
            from minibnn.functional import dropout_keep
            x, key, offset, thr, scale = a
            m = dropout_keep(key, x.shape, offset, thr).astype(x.dtype) * x.dtype.type(scale)
            return _wrap((x * m, m))
        elif self.name == "minibnn_bn_invstd":
            var, eps, out = a
            out[...] = (var.dtype.type(1) / _np.sqrt(var + eps)).astype(out.dtype)
            return args[-1]
        elif self.name == "minibnn_bn_forward":
            x, mean, invstd, gamma, beta = a
            xhat = (x - mean) * invstd
            return _wrap((xhat, gamma * xhat + beta))
        elif self.name == "minibnn_bn_backward_products":
            g, gamma, xhat = a
            gxhat = g * gamma
            return _wrap((g * xhat, gxhat, gxhat * xhat))
        elif self.name == "minibnn_bn_backward_input":
            invstd, gxhat, m1, xhat, m2 = a
            return _wrap(invstd * (gxhat - m1 - xhat * m2))
        elif self.name == "minibnn_split_bf16":
            from minibnn.kernels import bf16
            x, n, parts = a
            assert type(n) is _np.int64 and n == x.size and parts.dtype == _np.uint16
            parts[...] = bf16.split(_np.asarray(x, _np.float32)).reshape(-1)
            return args[-1]
        elif self.name == "minibnn_to_bf16_x3":
            from minibnn.kernels import bf16
            x, rows, cols, along_cols, out = a
            assert type(rows) is _np.int64 and type(cols) is _np.int64 and x.shape == (rows, cols)
            h = bf16.round_bits(_np.asarray(x, _np.float32))
            assert out.shape == (3 * x.size,) and out.dtype == _np.uint16  # raw, 1-D
            out[...] = _np.concatenate([h, h, h], axis=1 if along_cols else 0).reshape(-1)
            return args[-1]
        elif self.name == "minibnn_sum3":
            p, q, r = a
            assert p.dtype == q.dtype == r.dtype == _np.float32
            return _wrap((p + q) + r)
        elif self.name == "minibnn_to_bf16":
            from minibnn.kernels import bf16
            (x,) = a
            assert x.dtype == _np.float32
            return _wrap(bf16.round_bits(x))
        else:
            raise NotImplementedError(f"fake cupy: no stand-in for ElementwiseKernel {self.name!r}")


def fake_gemm_ex(a, b, out, beta):
    """Stand-in for ``cublasGemmEx`` as ``minibnn.kernels.cupy_blas.gemm_ex`` calls it: the
    16-bit inputs (uint16 bf16 bit patterns or float16) widened exactly to float32, their
    product accumulated in float32 (NumPy's sgemm), then ``out = product + beta * out``."""
    from minibnn.kernels import bf16

    def widen(x):
        x = x._a
        return bf16.to_float32(x) if x.dtype == _np.uint16 else x.astype(_np.float32)
    prod = widen(a) @ widen(b)
    if beta == 0:
        out._a[...] = prod
    else:
        out._a[...] = prod + _np.float32(beta) * out._a
    return out


class _MemoryPool:
    def __init__(self, *a, **k):
        pass

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def malloc(self, n):
        raise NotImplementedError("fake cupy: no device memory")


def get_default_memory_pool():
    return _MemoryPool()


def get_default_pinned_memory_pool():
    return _MemoryPool()


from . import cuda, random  # noqa: E402,F401
