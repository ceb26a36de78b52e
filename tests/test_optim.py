"""Optimizers against hand-written NumPy steps; lr_scale, clipping, schedules, state dicts."""

import tracemalloc

import numpy as np
import pytest
from arrays import dev, host

from minibnn import backend, binary, nn, optim
from minibnn.tensor import Tensor

W0 = np.array([[0.3, -0.7, 0.05], [1.2, -0.01, 0.4]])
GRADS = [np.array([[0.5, -1.0, 0.2], [0.0, 3.0, -0.4]]),
         np.array([[-0.3, 2.0, 0.1], [1.0, -0.5, 0.02]]),
         np.array([[0.8, 0.1, -2.0], [-0.2, 0.25, 0.3]])]


def param(w=W0, **kw):
    return nn.Parameter(np.array(w, dtype=np.float64), **kw)


def run(opt_cls, grads=GRADS, w=W0, lr=0.01, lr_scale=1.0, clip=None, **hyper):
    p = param(w, lr_scale=lr_scale, clip=clip)
    opt = opt_cls([p], lr=lr, **hyper)
    history = []
    for g in grads:
        p.grad = dev(g.copy())
        opt.step()
        history.append(host(p).copy())
    return history


def ap2_ref(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0, -1.0) * 2.0 ** np.round(np.log2(np.abs(x)))


# --- each optimizer against its formula -------------------------------------------------

def test_sgd():
    w, lr = W0.copy(), 0.05
    for g, got in zip(GRADS, run(optim.SGD, lr=lr)):
        w = w - lr * g
        np.testing.assert_allclose(got, w, rtol=1e-14, atol=1e-15)


def test_sgd_momentum():
    w, v, lr, mu = W0.copy(), np.zeros_like(W0), 0.05, 0.9
    for g, got in zip(GRADS, run(optim.SGD, lr=lr, momentum=mu)):
        v = mu * v + g
        w = w - lr * v
        np.testing.assert_allclose(got, w, rtol=1e-14, atol=1e-15)
    assert not np.allclose(run(optim.SGD, lr=lr)[-1], w)  # momentum changed the path


def test_adam():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    w, m, v = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
    for t, (g, got) in enumerate(zip(GRADS, run(optim.Adam, lr=lr)), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        # Kingma & Ba, end of Section 2: bias corrections folded into the step, eps after them
        w = w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
        np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-15)


def test_adam_first_step_is_about_lr_times_sign():
    (w1,) = run(optim.Adam, grads=GRADS[:1], lr=0.01)
    g = GRADS[0]
    expected = W0 - 0.01 * np.sign(g)  # m_hat / sqrt(v_hat) = sign(g) at t = 1
    np.testing.assert_allclose(w1, expected, rtol=0, atol=1e-7)


def test_adamax():
    lr, b1, b2, eps = 0.002, 0.9, 0.999, 1e-8
    w, m, u = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
    for t, (g, got) in enumerate(zip(GRADS, run(optim.AdaMax, lr=lr)), start=1):
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g))
        w = w - lr / (1 - b1 ** t) * m / (u + eps)
        np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-15)


def test_shift_adamax():
    lr, b1, b2, eps = 2.0 ** -10, 1 - 2.0 ** -3, 1 - 2.0 ** -10, 1e-8
    w, m, u = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
    for t, (g, got) in enumerate(zip(GRADS, run(optim.ShiftAdaMax, lr=lr)), start=1):
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g))
        w = w - ap2_ref(lr / (1 - b1 ** t)) * m * ap2_ref(1 / (u + eps))
        np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-15)
    assert not np.allclose(run(optim.AdaMax, lr=lr, beta1=b1, beta2=b2)[-1], w, rtol=1e-3)


def test_shift_adamax_paper_defaults():
    hyper = optim.ShiftAdaMax([param()], lr=2.0 ** -10).hyper
    assert 1 - hyper["beta1"] == 2.0 ** -3 and 1 - hyper["beta2"] == 2.0 ** -10


def test_shift_adamax_multipliers_are_powers_of_two():
    grads = [np.random.default_rng(i).standard_normal((4, 5)) * 10.0 ** e for i, e in enumerate(range(-2, 2))]
    p = param(np.zeros((4, 5)))
    opt = optim.ShiftAdaMax([p], lr=0.003)
    for g in grads:
        p.data[...] = 0.0  # so that -p.data after the step is exactly the update
        p.grad = dev(g)
        opt.step()
        m = host(opt.state[0]["m"])
        multiplier = -host(p) / m
        exponent = np.log2(multiplier)
        assert np.all(multiplier > 0)
        np.testing.assert_array_equal(exponent, np.round(exponent))


def test_shift_adamax_in_place_ap2_equals_binary_ap2():
    rng = np.random.default_rng(0)
    k = np.arange(-30, 31, dtype=np.float64)
    for dtype in (np.float32, np.float64):
        powers = (2.0 ** k).astype(dtype)
        halfway = (np.sqrt(2.0) * 2.0 ** k).astype(dtype)  # log2 near k + 1/2
        near = [halfway]
        for direction in (0, np.inf):
            x = halfway
            for _ in range(3):
                near.append(x := np.nextafter(x, dtype(direction)))
        x = np.concatenate([powers, powers * dtype(1.5), powers * dtype(0.75),
                            np.nextafter(powers, dtype(0)), np.nextafter(powers, dtype(np.inf)),
                            *near, np.exp(rng.uniform(-40, 40, 2000)).astype(dtype),
                            np.array([1e-8, 1e8, 0.0, np.inf], dtype)])
        y = x.copy()
        assert optim._ap2_positive_inplace(y) is y and y.dtype == dtype
        np.testing.assert_array_equal(y, binary.ap2(x))
        np.testing.assert_array_equal(y[:len(k)], powers)
        # where log2 lands exactly on a half, the exponent rounds to the even neighbour
        finite = (x > 0) & np.isfinite(x)
        log2 = np.log2(x[finite])
        tie = log2 % 1 == 0.5
        assert tie.sum() > 10
        lo = np.floor(log2[tie])
        even = np.where(lo % 2 == 0, lo, lo + 1)
        np.testing.assert_array_equal(y[finite][tie], 2.0 ** even)


@pytest.mark.parametrize("cls,hyper", [(optim.SGD, {}), (optim.SGD, {"momentum": 0.9}),
                                       (optim.Adam, {}), (optim.AdaMax, {}),
                                       (optim.ShiftAdaMax, {})])
def test_step_allocates_no_parameter_sized_array(cls, hyper):
    # NumPy reports its data allocations to tracemalloc. After a warm-up step (which creates
    # the moment and scratch arrays) a step may allocate scalars and small buffers only.
    # tracemalloc sees host memory only, so the test is about the NumPy arrays of the CPU
    # backends and pins numpy (on the GPU a parameter-sized allocation would go unseen).
    with backend.use("numpy"):
        rng = np.random.default_rng(0)
        n = 1 << 20
        ps = [nn.Parameter(rng.standard_normal(n).astype(np.float32), lr_scale=2.0, clip=1.0),
              nn.Parameter(rng.standard_normal(n).astype(np.float32))]
        for p in ps:
            p.grad = rng.standard_normal(n).astype(np.float32)
        opt = cls(ps, lr=1e-3, **hyper)
        opt.step()
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            opt.step()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if not was_tracing:
                tracemalloc.stop()
    assert peak < 0.05 * ps[0].data.nbytes, f"{cls.__name__} step allocated {peak} bytes at peak"


# --- lr_scale and clip ------------------------------------------------------------------

@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdaMax, optim.ShiftAdaMax])
def test_lr_scale_is_honoured(cls):
    scaled = run(cls, lr=0.004, lr_scale=4.0)[-1]
    np.testing.assert_allclose(scaled, run(cls, lr=0.016)[-1], rtol=1e-14)
    assert not np.allclose(scaled, run(cls, lr=0.004)[-1])


def test_sgd_lr_scale_exact():
    (w1,) = run(optim.SGD, grads=GRADS[:1], lr=0.1, lr_scale=2.5)
    np.testing.assert_allclose(w1, W0 - 0.25 * GRADS[0], rtol=1e-14)


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdaMax, optim.ShiftAdaMax])
def test_clip_is_honoured(cls):
    w = np.array([0.95, -0.95, 0.2, 0.999])
    g = np.array([-1.0, 1.0, 0.1, -1e-3])
    p = param(w, clip=1.0)
    opt = cls([p], lr=1.0)
    p.grad = dev(g)
    opt.step()
    stepped = host(p)
    assert stepped[0] == 1.0 and stepped[1] == -1.0  # pushed past +-1, ends exactly at +-1
    assert -1.0 < stepped[2] < 0.2
    assert np.all(np.abs(stepped) <= 1.0)
    q = param(w)  # without clip the same step goes past 1
    opt = cls([q], lr=1.0)
    q.grad = dev(g)
    opt.step()
    stepped = host(q)
    assert stepped[0] > 1.0 and stepped[1] < -1.0


def test_binary_layer_weights_stay_in_range_under_training_steps():
    layer = nn.BinaryLinear(6, 4, rng=np.random.default_rng(0))
    opt = optim.Adam(layer.parameters(), lr=0.5)
    for s in range(5):
        g = np.random.default_rng(s).standard_normal((4, 6)).astype(np.float32)
        layer.weight.grad = dev(g)
        opt.step()
    w = host(layer.weight)
    assert w.dtype == np.float32
    assert np.all(np.abs(w) <= 1.0) and np.any(np.abs(w) == 1.0)


def test_parameter_without_grad_is_left_alone():
    a, b = param(), param()
    opt = optim.SGD([a, b], lr=0.1)
    a.grad = dev(GRADS[0])
    opt.step()
    np.testing.assert_array_equal(host(b), W0)
    assert not np.array_equal(host(a), W0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_float32_parameters_stay_float32():
    p = nn.Parameter(W0.astype(np.float32))
    opt = optim.Adam([p], lr=0.01)
    for g in GRADS:
        p.grad = dev(g.astype(np.float32))
        opt.step()
    assert p.data.dtype == np.float32


# --- schedules --------------------------------------------------------------------------

def test_exponential_decay_ends_at_lr_end_in_the_last_epoch():
    s = optim.ExponentialDecay(1e-3, 1e-5, epochs=11)
    assert s(0) == 1e-3
    assert s(5) == pytest.approx(1e-4, rel=1e-12)
    assert s(10) == 1e-5  # the last epoch (0-based 10 of 11) runs at exactly lr_end
    ratios = [s(e + 1) / s(e) for e in range(10)]
    np.testing.assert_allclose(ratios, 0.01 ** 0.1, rtol=1e-12)  # a constant factor per epoch
    for epochs in (2, 3, 12, 500):  # the recipes' lengths: always lr_end in the last epoch
        last = optim.ExponentialDecay(3e-3, 3e-5, epochs)(epochs - 1)
        assert last == 3e-5
    assert optim.ExponentialDecay(3e-3, 3e-5, 1)(0) == 3e-3  # one epoch: lr_start
    # the training loop sets the optimizer's rate from it: the history says so too
    from minibnn.train import TrainConfig
    cfg = TrainConfig(epochs=4, lr_start=1e-2, lr_end=1e-4)
    rates = [cfg.schedule_fn()(e) for e in range(cfg.epochs)]
    assert rates[0] == 1e-2 and rates[-1] == 1e-4


def test_step_halving():
    s = optim.StepHalving(0.1, every=3)
    assert [s(e) for e in range(8)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]


def test_schedule_bad_arguments():
    for args in [(0, 1e-5, 10), (1e-3, -1.0, 10), (1e-3, 1e-5, 0), (float('inf'), 1e-5, 3),
                 (1e-3, float('nan'), 3)]:
        with pytest.raises(ValueError):
            optim.ExponentialDecay(*args)
    for args in [(0.0, 3), (0.1, 0)]:
        with pytest.raises(ValueError):
            optim.StepHalving(*args)


# --- state dicts ------------------------------------------------------------------------

@pytest.mark.parametrize("cls,hyper", [(optim.SGD, {"momentum": 0.9}), (optim.Adam, {}),
                                       (optim.AdaMax, {}), (optim.ShiftAdaMax, {})])
def test_state_dict_round_trip_continues_identically(cls, hyper):
    p = param()
    opt = cls([p], lr=0.01, **hyper)
    for g in GRADS[:2]:
        p.grad = dev(g)
        opt.step()
    sd, w_saved = opt.state_dict(), host(p).copy()
    assert sd["t"] == 2 and sd["state"][0]
    # keep going with the original ...
    p.grad = dev(GRADS[2])
    opt.step()
    opt.step()
    # ... and with a fresh optimizer resumed from the saved state
    q = param(w_saved)
    resumed = cls([q], lr=0.5, **hyper)  # lr comes from the state dict
    resumed.load_state_dict(sd)
    assert resumed.t == 2 and resumed.lr == 0.01
    q.grad = dev(GRADS[2])
    resumed.step()
    resumed.step()
    np.testing.assert_array_equal(host(q), host(p))


def test_loading_a_state_dict_does_not_alias_it():
    p = param()
    opt = optim.Adam([p], lr=0.01)
    p.grad = dev(GRADS[0])
    opt.step()
    sd = opt.state_dict()
    m_saved = sd["state"][0]["m"].copy()
    q = param()
    resumed = optim.Adam([q], lr=0.01)
    resumed.load_state_dict(sd)
    q.grad = dev(GRADS[1])
    resumed.step()
    np.testing.assert_array_equal(sd["state"][0]["m"], m_saved)


def test_nan_learning_rate_is_rejected():
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([param()], lr=float("nan"))


def test_state_dict_is_a_snapshot():
    p = param()
    opt = optim.Adam([p], lr=0.01)
    p.grad = dev(GRADS[0])
    opt.step()
    sd = opt.state_dict()
    m = sd["state"][0]["m"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["m"], m)
    assert sd["t"] == 1


def test_load_state_dict_errors():
    p = param()
    opt = optim.Adam([p], lr=0.01)
    p.grad = dev(GRADS[0])
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="1 parameters.*2"):
        optim.Adam([param(), param()], lr=0.01).load_state_dict(sd)
    other = optim.Adam([param(np.zeros((3, 3)))], lr=0.01)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 3\)"):
        other.load_state_dict(sd)
    assert other.t == 0  # nothing was loaded


# --- construction errors ----------------------------------------------------------------

@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdaMax, optim.ShiftAdaMax])
def test_bad_construction(cls):
    for lr in (0.0, -0.1):
        with pytest.raises(ValueError, match="lr"):
            cls([param()], lr=lr)
    with pytest.raises(ValueError, match="empty"):
        cls([], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        cls(iter(()), lr=0.1)
    with pytest.raises(TypeError, match="unknown"):
        cls([param()], lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="grad"):
        cls([Tensor(np.zeros(2))], lr=0.1)


def test_registry():
    assert optim.OPTIMIZERS == {"sgd": optim.SGD, "adam": optim.Adam, "adamax": optim.AdaMax,
                                "shift-adamax": optim.ShiftAdaMax}
