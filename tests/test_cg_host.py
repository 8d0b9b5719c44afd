"""CG's stop tests on the host (CPU, a read every iteration) against the device tests, bit for bit.

The oracle is the device path itself (``cg._HOST_SCALARS = False``), which is the loop the
library ran before the host path existed, and torch's own 0-dim arithmetic for the scalar
helpers. Results are compared as bit patterns (``view`` as integers), so NaN and -0.0 count.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import pytest
import torch

from hessfree.cg import CGResult, CGStop, cg

cg_module = importlib.import_module("hessfree.cg")

_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _solve_both(monkeypatch, *args, **kwargs) -> tuple[CGResult, CGResult, list, list]:
    """cg on the host path and on the device path; the monitor's calls of each."""
    calls: dict[bool, list] = {True: [], False: []}
    monitor = kwargs.pop("monitor", None)
    results = {}
    for host in (True, False):
        monkeypatch.setattr(cg_module, "_HOST_SCALARS", host)
        built = {}
        if monitor is not None:

            def watched(i, x, host=host):
                calls[host].append((i, _bits(x).clone()))
                return monitor(i, x)

            built["monitor"] = watched
        results[host] = cg(*args, **kwargs, **built)
    return results[True], results[False], calls[True], calls[False]


def _assert_identical(a: CGResult, b: CGResult) -> None:
    assert (a.reason, a.num_iter, a.num_matvec, a.iterations) == (
        b.reason,
        b.num_iter,
        b.num_matvec,
        b.iterations,
    )
    assert a.x.dtype == b.x.dtype and a.phi_history.dtype == b.phi_history.dtype
    assert torch.equal(_bits(a.x), _bits(b.x))
    assert torch.equal(_bits(a.phi_history), _bits(b.phi_history))
    assert torch.equal(_bits(a.iterate_phi), _bits(b.iterate_phi))
    assert all(torch.equal(_bits(u), _bits(v)) for u, v in zip(a.iterates, b.iterates, strict=True))


def _system(n: int, seed: int, dtype: torch.dtype, *, negative: int = 0, cond: float = 1e3):
    """A = Q diag(d) Q^T (d log-spaced in [1, cond], the first `negative` of them < 0), b."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.logspace(0, np.log10(cond), n)
    d[:negative] *= -1
    A = torch.from_numpy(Q @ np.diag(d) @ Q.T).to(dtype)
    b = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    return A, b


# Each case: (system kwargs, cg kwargs); the matvec is A @ v.
CASES = {
    "spd_converged": (dict(n=40, seed=0, cond=30.0), dict(rtol=1e-6, progress_tol=None)),
    "spd_max_iter": (dict(n=40, seed=1), dict(rtol=0.0, max_iter=9, progress_tol=None)),
    "progress": (dict(n=80, seed=2, cond=1e5), dict(rtol=0.0, progress_tol=0.02, max_iter=80)),
    "progress_min_iter": (
        dict(n=80, seed=2, cond=1e5),
        dict(rtol=0.0, progress_tol=0.02, min_iter=40, max_iter=80),
    ),
    "indefinite": (dict(n=30, seed=3, negative=3), dict(rtol=1e-8)),
    "indefinite_radius": (dict(n=30, seed=3, negative=3), dict(rtol=1e-8, max_norm=1e3)),
    "trust_radius": (dict(n=30, seed=4), dict(rtol=1e-8, max_norm=0.3)),
    "warm_start_descent": (
        dict(n=30, seed=5),
        dict(rtol=1e-6, descent_stop=True, x0=True, progress_tol=None),
    ),
    "diagonal_precond": (
        dict(n=30, seed=6, cond=1e4),
        dict(rtol=1e-6, precond="diag", progress_tol=None),
    ),
    "callable_precond_max_iter": (
        dict(n=30, seed=7, cond=1e4),
        dict(rtol=0.0, max_iter=12, precond="callable"),
    ),
}


def _build(case: str, dtype: torch.dtype):
    system, options = CASES[case]
    A, b = _system(dtype=dtype, **system)
    options = dict(options)
    if options.pop("x0", False):
        options["x0"] = torch.linalg.solve(A.double(), b.double()).to(dtype) * 0.9
    precond = options.pop("precond", None)
    if precond == "diag":
        options["precond"] = A.diagonal().abs() + 0.5
    elif precond == "callable":
        d = A.diagonal().abs() + 0.5
        options["precond"] = lambda r: r / d
    return (lambda v: A @ v), b, options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cg_host_tests_match_device_bitwise(monkeypatch, case, dtype):
    matvec, b, options = _build(case, dtype)
    host, device, _, _ = _solve_both(monkeypatch, matvec, b, **options)
    _assert_identical(host, device)


def test_cg_host_cases_reach_their_stops(monkeypatch):
    """The cases above do exercise each stop (else a bitwise match would prove little)."""
    monkeypatch.setattr(cg_module, "_HOST_SCALARS", True)
    reasons = {
        case: cg(*_build(case, torch.float64)[:2], **_build(case, torch.float64)[2])
        for case in CASES
    }
    assert reasons["spd_converged"].reason is CGStop.CONVERGED
    assert reasons["spd_max_iter"].reason is CGStop.MAX_ITER
    assert reasons["progress"].reason is CGStop.RELATIVE_PROGRESS
    assert reasons["progress_min_iter"].num_iter >= 40
    assert reasons["indefinite"].reason is CGStop.NEGATIVE_CURVATURE
    assert reasons["indefinite_radius"].reason is CGStop.NEGATIVE_CURVATURE
    assert reasons["trust_radius"].reason is CGStop.TRUST_RADIUS
    assert reasons["warm_start_descent"].num_matvec == reasons["warm_start_descent"].num_iter + 1
    assert reasons["warm_start_descent"].reason is CGStop.CONVERGED
    assert reasons["diagonal_precond"].reason is CGStop.CONVERGED
    assert reasons["callable_precond_max_iter"].reason is CGStop.MAX_ITER


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [None, 2.0])
def test_cg_host_negative_curvature_at_first_iteration(monkeypatch, dtype, max_norm):
    A, b = _system(12, 8, dtype, negative=12)  # every direction has pᵀAp < 0
    host, device, _, _ = _solve_both(monkeypatch, lambda v: A @ v, b, max_norm=max_norm)
    assert host.reason is CGStop.NEGATIVE_CURVATURE and host.num_iter == 1
    _assert_identical(host, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad_at", [1, 4])
def test_cg_host_non_finite_product(monkeypatch, dtype, bad_at):
    A, b = _system(20, 9, dtype)

    def make() -> Callable[[torch.Tensor], torch.Tensor]:
        count = [0]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            out = A @ v
            if count[0] == bad_at:
                out[3] = float("nan")
            return out

        return matvec

    results = []
    for host in (True, False):
        monkeypatch.setattr(cg_module, "_HOST_SCALARS", host)
        results.append(cg(make(), b, rtol=1e-10))
    assert results[0].reason is CGStop.NON_FINITE
    _assert_identical(*results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_host_monitor_calls_and_stop(monkeypatch, dtype):
    A, b = _system(40, 10, dtype, cond=1e5)
    host, device, seen_host, seen_device = _solve_both(
        monkeypatch, lambda v: A @ v, b, rtol=0.0, monitor=lambda i, x: i >= 15
    )
    assert host.reason is CGStop.MONITOR and host.num_iter == 15
    assert [i for i, _ in seen_host] == [5, 7, 9, 11, 15] == [i for i, _ in seen_device]
    assert all(torch.equal(u, v) for (_, u), (_, v) in zip(seen_host, seen_device, strict=True))
    _assert_identical(host, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cg_host_16_bit_rhs(monkeypatch, dtype):
    """float16 b runs CG in float32 (the host path); bfloat16 in bfloat16 (the device tests)."""
    A, b = _system(24, 11, torch.float32)
    A16, b16 = A.to(dtype), b.to(dtype)
    host, device, _, _ = _solve_both(monkeypatch, lambda v: A16 @ v, b16, rtol=1e-2)
    assert host.x.dtype == dtype and host.phi_history.dtype != torch.float64
    _assert_identical(host, device)


def test_cg_host_path_taken_on_cpu_only_with_a_read_every_iteration(monkeypatch):
    built = []
    original = cg_module._HostTests

    def spy(*args):
        built.append(1)
        return original(*args)

    monkeypatch.setattr(cg_module, "_HostTests", spy)
    A, b = _system(10, 12, torch.float64)
    cg(lambda v: A @ v, b)
    assert built == [1]
    cg(lambda v: A @ v, b, check_every=2)  # masked updates: the device path
    cg(lambda v: A.float() @ v, b.float())
    assert built == [1, 1]
    A16 = A.to(torch.bfloat16)
    cg(lambda v: A16 @ v, b.to(torch.bfloat16))  # bfloat16 arithmetic: the device path
    assert built == [1, 1]


def _random_float32(gen: torch.Generator, size: int) -> torch.Tensor:
    """float32 values over the whole exponent range, subnormals and the overflow edge included."""
    exponent = torch.randint(-150, 128, (size,), generator=gen).double()
    values = torch.randn(size, generator=gen, dtype=torch.float64) * torch.exp2(exponent)
    return values.float()


def test_round_float32_matches_torch_cast():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(20_000, generator=gen, dtype=torch.float64) * torch.exp2(
        torch.randint(-160, 130, (20_000,), generator=gen).double()
    )
    edge = torch.tensor([3.4028235677973366e38, 3.4028235677973362e38, -1e39, 1e-46, 7e-46])
    d = torch.cat([d, edge.double()])
    round_float32 = cg_module._float32_rounding()
    ours = torch.tensor([round_float32(v) for v in d.tolist()], dtype=torch.float32)
    assert torch.equal(_bits(ours), _bits(d.float()))


def test_host_scalar_helpers_match_tensor_arithmetic():
    """_norm_sq_next and _progress_quotient against the 0-dim float32 expressions they replace."""
    gen = torch.Generator().manual_seed(1)
    xx, alpha, xp, pp, phi, old = (_random_float32(gen, 3000) for _ in range(6))
    xx, pp = xx.abs(), pp.abs()
    f = cg_module._float32_rounding()
    values = zip(*(t.tolist() for t in (xx, alpha, xp, pp, phi, old)), strict=True)
    for a, s, u, v, ph, o in values:
        ta, ts, tu, tv, tph, to = (
            torch.tensor(w, dtype=torch.float32) for w in (a, s, u, v, ph, o)
        )
        device = ta + 2 * ts * tu + ts * ts * tv
        host = cg_module._norm_sq_next(f, a, s, u, v)
        assert torch.equal(_bits(device), _bits(torch.tensor(host, dtype=torch.float32)))
        if ph != 0:  # the library asks only where phi < 0
            host = cg_module._progress_quotient(f, ph, o)
            assert torch.equal(
                _bits((tph - to) / tph), _bits(torch.tensor(host, dtype=torch.float32))
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_progress_matches_device_progress(dtype):
    """_host_progress against _progress on histories whose quotient sits at k ε (± 1 ulp)."""
    gen = torch.Generator().manual_seed(3)
    f = cg_module._float32_rounding() if dtype == torch.float32 else float
    no = torch.zeros((), dtype=torch.bool)
    outcomes = set()
    for i in (5, 11, 25, 150, 400):
        k = cg_module._progress_gap(i)
        for tol in (torch.rand(60, generator=gen, dtype=torch.float64) * 0.01).tolist():
            history = -torch.rand(i + 1, generator=gen, dtype=torch.float64).to(dtype)
            # phi_{i-k} = phi_i (1 - k tol): the quotient lands on the threshold, give or take
            history[i - k] = history[i] * (1 - k * tol)
            history[i - k] = torch.nextafter(history[i - k], -history[i - k] * (i % 3 - 1))
            device = cg_module._progress(history[i], history, i, tol, 0, no)
            host = cg_module._host_progress(f, history.tolist(), i, tol, 0)
            assert bool(device) == host
            outcomes.add(host)
        assert not cg_module._host_progress(f, history.tolist(), i, None, 0)
        assert not cg_module._host_progress(f, history.tolist(), i, 0.01, i + 1)
    assert outcomes == {True, False}


def test_host_threshold_is_rounded_like_a_tensor_comparison():
    """``t < c`` for a float32 tensor rounds the Python float c to float32 first."""
    gen = torch.Generator().manual_seed(2)
    f = cg_module._float32_rounding()
    for c in (torch.rand(500, generator=gen, dtype=torch.float64) * 0.2).tolist():
        for q in (f(c), np.nextafter(np.float32(f(c)), np.float32(1)).item()):
            assert bool(torch.tensor(q, dtype=torch.float32) < c) == (q < f(c))
            assert bool(torch.tensor(q, dtype=torch.float32) > c) == (q > f(c))
