"""leftovers19: small defects earlier rounds noticed and left (experiments/README.md,
leftovers19). Each test says whether it fails on main 9dd67be or is a guard."""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, lsmr
from test_train_robust import refused, write_tiny
from torch import nn

import hessfree
from hessfree import spectral

# --------------------------------------------------------------------------------------------
# 1. state_dict -> load_state_dict -> state_dict keeps each entry's dtype and value
# --------------------------------------------------------------------------------------------


def _entries(value: object, path: str = "") -> list[tuple[str, object]]:
    """Every leaf of a state entry with its path (tuples, lists and dicts walked)."""
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _entries(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [e for i, v in enumerate(value) for e in _entries(v, f"{path}[{i}]")]
    return [(path, value)]


def _assert_same_state(before: dict, after: dict) -> None:
    """Oracle: the dict saved before the load, entry by entry: the same keys, leaf types,
    tensor dtypes and values (``torch.equal``), other values ``==``."""
    assert before.keys() == after.keys()
    for key in before:
        a, b = _entries(before[key], key), _entries(after[key], key)
        assert [p for p, _ in a] == [p for p, _ in b], key
        for (path, x), (_, y) in zip(a, b, strict=True):
            assert type(x) is type(y), (path, type(x), type(y))
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
                assert torch.equal(x, y), path
            else:
                assert x == y or (x != x and y != y), path  # NaN == NaN here


def _reloaded(opt: hessfree.HessianFree, params, **kw) -> hessfree.HessianFree:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = hessfree.HessianFree(params, **kw)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


@pytest.mark.parametrize(
    ("kw", "dtype"),
    [
        ({}, torch.float32),
        ({"curvature": "fisher_mc"}, torch.float32),
        ({"curvature": "fisher_mc"}, torch.float64),
        ({"curvature": "ggn", "damping_metric": "marquardt"}, torch.float32),
    ],
)
def test_leftovers19_state_round_trip_keeps_every_entrys_dtype(one_thread, kw, dtype):
    """``rng_state`` (uint8) came back as the parameters' float dtype after load_state_dict
    (torch's loader casts each state tensor to it) until the next step (fails on main). Every
    entry of the state (counters, flags, floats, lists, the warm start, Marquardt's diagonal)
    must round-trip save -> load -> save with its type, dtype and value; and the reloaded
    optimizer's next steps are bitwise the uninterrupted one's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    x, y = torch.randn(16, 3, dtype=dtype), torch.randn(16, 2, dtype=dtype)

    def closure():
        out = net(x)
        return F.mse_loss(out, y), out

    opt = hessfree.HessianFree(net.parameters(), **kw)
    for _ in range(3):
        opt.step(closure)
    saved = opt.state_dict()
    assert saved["state"][0]["rng_state"].dtype == torch.uint8
    fresh = _reloaded(opt, net.parameters(), **kw)
    _assert_same_state(saved["state"][0], fresh.state_dict()["state"][0])
    start = copy.deepcopy(net.state_dict())
    for _ in range(2):
        opt.step(closure)
    ahead = [p.detach().clone() for p in net.parameters()]
    net.load_state_dict(start)
    for _ in range(2):
        fresh.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(ahead, net.parameters(), strict=True))


def test_leftovers19_a_converted_model_gets_parameter_space_state_in_its_dtype(one_thread):
    """Between a float32 and a float64 model the vectors over the parameters (warm start,
    Marquardt's diagonal) take the new dtype, as torch casts its optimizers' buffers (the
    contract of test_optimizer_contract); the generator's state stays uint8 (fails on main:
    float64). Oracle: the saved dict, cast by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def closure():
        out = net(x)
        return F.mse_loss(out, y), out

    kw = {"curvature": "ggn", "damping_metric": "marquardt"}
    opt = hessfree.HessianFree(net.parameters(), **kw)
    for _ in range(2):
        opt.step(closure)
    saved = opt.state_dict()["state"][0]
    net.double()
    fresh = _reloaded(opt, net.parameters(), **kw)
    loaded = fresh.state_dict()["state"][0]
    for key in ("warm_start", "damping_diagonal"):
        assert loaded[key].dtype == torch.float64
        assert torch.equal(loaded[key], saved[key].double())
    assert loaded["rng_state"].dtype == torch.uint8
    assert torch.equal(loaded["rng_state"], saved["rng_state"])


def test_leftovers19_float64_loss_probe_survives_a_reload_under_float32_params(one_thread):
    """The local phase keeps H_l u of the outputs (``phase_probe``, a tuple holding a tensor)
    in the state. With float32 parameters and float64 outputs (``model(x).double()``) the
    loader rounded it to float32 (fails on main); it must come back float64 and bitwise."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))  # noqa: E731
    teacher, model = make(), make()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.softmax(6 * teacher(x), 1).double()

    def closure():
        out = model(x).double()
        return F.cross_entropy(out, y), out

    opt = hessfree.HessianFree(model.parameters())
    for _ in range(40):
        opt.step(closure)
        if "phase_probe" in opt._global_state():
            break
    saved = opt.state_dict()
    probe = saved["state"][0]["phase_probe"]
    assert probe[1].dtype == torch.float64  # the outputs' dtype
    fresh = _reloaded(opt, model.parameters())
    reloaded = fresh.state_dict()["state"][0]["phase_probe"][1]
    assert reloaded.dtype == torch.float64 and torch.equal(reloaded, probe[1])
    _assert_same_state(saved["state"][0], fresh.state_dict()["state"][0])


# --------------------------------------------------------------------------------------------
# 2. did-you-mean for a misspelt `products` key
# --------------------------------------------------------------------------------------------


def test_leftovers19_products_key_typo_gets_a_did_you_mean():
    """``products={'cuda_graf': True}`` was refused without the suggestion HessianFree's own
    keywords get (fails on main). Oracle: difflib's closest name."""
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"Did you mean `cuda_graph` for 'cuda_graf'\?") as err:
        hessfree.HessianFree(net.parameters(), products={"cuda_graf": True})
    assert "'cuda_graph', 'precision', 'warmup'" in str(err.value)
    with pytest.raises(ValueError) as err:  # no close name: no suggestion
        hessfree.HessianFree(net.parameters(), products={"zzz": 1})
    assert "Did you mean" not in str(err.value)


def test_leftovers19_products_with_a_non_string_key_is_refused_in_words():
    """``products={3: 1, 'zzz': 1}``: sorting the unknown keys raised TypeError "'<' not
    supported between instances of 'str' and 'int'" from inside (fails on main)."""
    with pytest.raises(ValueError, match=r"Unknown `products` key\(s\) \['zzz', 3\]"):
        hessfree.HessianFree(nn.Linear(2, 1).parameters(), products={3: 1, "zzz": 1})


def test_leftovers19_yaml_products_typo_gets_the_suggestion(tmp_path, capsys):
    """The runner passes the same refusal through (fails on main: no suggestion)."""
    config = write_tiny(
        tmp_path, optimizers=[{"name": "hessianfree", "products": {"cuda_graf": True}}]
    )
    err = refused(["run", str(config), "--check"], capsys)
    assert "Did you mean `cuda_graph`" in err


# --------------------------------------------------------------------------------------------
# 3. spectral_density deflates given eigenpairs: the bottom end, both ends, reused
# --------------------------------------------------------------------------------------------


def _indefinite(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dense symmetric float64 matrix with a bulk in [-1, 1] and five outliers at each end
    (a Hessian's shape away from a minimum), and its eigenvalues (``eigvalsh``)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate(
        [rng.uniform(-1, 1, n - 10), [50.0, 40, 30, 20, 10], [-60.0, -45, -35, -25, -12]]
    )
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    return A, np.linalg.eigvalsh(A)


def _sphere_sd(mu: np.ndarray) -> float:
    """Exact standard deviation of r z^T f(A) z for z uniform on the unit sphere of an
    r-dimensional invariant subspace where f(A) has eigenvalues mu (spectral18's formula)."""
    r = mu.size
    return math.sqrt(2 * (r * (mu**2).sum() - mu.sum() ** 2) / (r + 2))


def test_leftovers19_deflating_both_ends_takes_an_indefinite_matrixs_outliers(one_thread):
    """``num_deflated`` takes the top end only; an indefinite matrix's negative outliers stayed
    in the probes' spread (fails on main: no ``deflate``). Oracle: ``eigvalsh`` of the dense
    float64 matrix; tr A and tr A^2 within five exact standard errors of the rest."""
    A, ev = _indefinite()
    m = 20
    top, bottom = spectral.top_eigenpairs(A, 5), spectral.bottom_eigenpairs(A, 5)
    sd = spectral.spectral_density(A, m, 20, seed=0, deflate=(top, bottom))
    assert sd.num_deflated == 10 and sd.num_matvecs == 10 + int(sd.num_nodes.sum()) - m * 10
    want = np.concatenate([ev[::-1][:5], ev[:5][::-1]])  # decreasing, as the rows hold them
    np.testing.assert_allclose(sd.nodes[:, :10], np.tile(want, (m, 1)), rtol=0, atol=1e-10)
    rest = ev[5:-5]
    for f, exact in [(lambda t: t, ev.sum()), (np.square, (ev**2).sum())]:
        got = sd.trace(f)
        bound = 5 * _sphere_sd(f(rest)) / math.sqrt(m)
        assert abs(got.estimate - exact) <= bound, (got.estimate, exact, bound)
    plain = spectral.spectral_density(A, m, 20, seed=0, probes="gaussian")
    only_top = spectral.spectral_density(A, m, 20, seed=0, num_deflated=5)
    # the spread of tr A^2 left after each: the negative end was most of it
    spreads = [x.trace(np.square).std_error for x in (plain, only_top, sd)]
    assert spreads[2] < 0.01 * spreads[1] < spreads[0], spreads


def test_leftovers19_pairs_computed_once_serve_several_shifts_for_log_det(one_thread):
    """Eigenvectors of A are those of A + sI: one pair of ``Eigenpairs`` serves a log det at
    each shift, the values taken again as v^T (A + sI) v (fails on main: no ``deflate``).
    Oracle: ``numpy.linalg.slogdet`` and ``eigvalsh`` of the shifted dense matrix."""
    A, ev = _indefinite()
    n, m = A.shape[0], 20
    pairs = (spectral.top_eigenpairs(A, 5), spectral.bottom_eigenpairs(A, 5))
    for shift in (61.0, 80.0):
        B = A + shift * np.eye(n)
        sd = spectral.spectral_density(B, m, 25, seed=1, deflate=pairs)
        want = np.concatenate([ev[::-1][:5], ev[:5][::-1]]) + shift
        np.testing.assert_allclose(sd.nodes[0, :10], want, rtol=0, atol=1e-10)
        exact = np.linalg.slogdet(B)[1]
        bound = 5 * _sphere_sd(np.log(ev[5:-5] + shift)) / math.sqrt(m)
        got = sd.trace(np.log).estimate
        assert abs(got - exact) <= bound + 1e-9, (shift, got, exact, bound)


def test_leftovers19_given_top_pairs_match_num_deflated(one_thread):
    """The new path against the old (fails on main: no ``deflate``):
    deflate=top_eigenpairs(A, d) takes out the values num_deflated=d does (``eigvalsh``'s top
    d), and its tr A^2 is as close to the dense one, for d products instead of ARPACK's
    (num_deflated draws ARPACK's start vector from the seed, so the probes differ)."""
    A, ev = _indefinite()
    m, exact = 20, (ev**2).sum()
    a = spectral.spectral_density(A, m, 15, seed=2, num_deflated=4)
    b = spectral.spectral_density(A, m, 15, seed=2, deflate=spectral.top_eigenpairs(A, 4))
    np.testing.assert_allclose(b.nodes[:, :4], a.nodes[:, :4], rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.nodes[0, :4], ev[::-1][:4], rtol=0, atol=1e-10)
    bound = 5 * _sphere_sd(ev[:-4] ** 2) / math.sqrt(m)
    for sd in (a, b):
        assert abs(sd.trace(np.square).estimate - exact) <= bound
    assert b.num_matvecs == 4 + int(b.num_nodes.sum()) - m * 4 < a.num_matvecs


def test_leftovers19_deflate_refuses_what_it_cannot_deflate_exactly(one_thread):
    """Refusals in words (fail on main: no ``deflate``): another matrix's eigenpairs (their
    residual), a pair given twice, both ways of deflating at once, a wrong length, too many."""
    A, _ = _indefinite()
    other, _ = _indefinite(seed=1)
    with pytest.raises(ValueError, match="not an eigenvector of `A`"):
        spectral.spectral_density(A, 2, 5, seed=0, deflate=spectral.top_eigenpairs(other, 3))
    small = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    twice = (spectral.top_eigenpairs(small, 2), spectral.top_eigenpairs(small, 2))
    with pytest.raises(ValueError, match=r"must be orthonormal.*v_0\^T v_2.*given twice"):
        spectral.spectral_density(small, 2, 2, seed=0, deflate=twice)
    top = spectral.top_eigenpairs(A, 2)
    with pytest.raises(ValueError, match="not both"):
        spectral.spectral_density(A, 2, 5, num_deflated=2, deflate=top)
    with pytest.raises(
        ValueError, match=r"shape \(120, k >= 1\) for an operator of size 120, got \(6, 2\)"
    ):
        spectral.spectral_density(A, 2, 5, deflate=spectral.top_eigenpairs(small, 2))
    with pytest.raises(TypeError, match="must be an Eigenpairs"):
        spectral.spectral_density(A, 2, 5, deflate=top.vectors)
    whole = spectral.top_eigenpairs(small, 6)
    with pytest.raises(ValueError, match="at most 5 eigenpairs of an operator of size 6, got 6"):
        spectral.spectral_density(small, 2, 2, deflate=whole)


# --------------------------------------------------------------------------------------------
# 4. the dense fallback's limit: a count the caller may move (max_dense)
# --------------------------------------------------------------------------------------------


class _CountedMatrix(LinearOperator):
    def __init__(self, M: np.ndarray) -> None:
        super().__init__(M.dtype, M.shape)
        self.M, self.count = M, 0

    def _matvec(self, x):
        self.count += 1
        return self.M @ x

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.M @ X


def _clustered_bottom(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A rotated diagonal whose five smallest eigenvalues are 1e-7 (1 + 1e-3 i): relative gap
    1e-10, where ARPACK's 'SA' stalls (as on a Gauss-Newton matrix's bottom)."""
    rng = np.random.default_rng(0)
    d = np.concatenate([1e-7 * (1 + 1e-3 * np.arange(5)), rng.uniform(0.1, 1.0, n - 5)])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    M = (Q * d) @ Q.T
    return (M + M.T) / 2, np.sort(d)


def test_leftovers19_max_dense_moves_the_dense_fallbacks_limit(one_thread):
    """The dense path's limit was the fixed n = 4096 (kept as the default: a count, not bytes,
    see ``_DENSE_FALLBACK_MAX_N``); ``max_dense`` moves it (fails on main: no keyword). At
    ``max_dense >= n`` the stalled bottom is exact in <= 2n products (oracle: the sorted
    diagonal); below n ARPACK alone runs SciPy's default 10 n restarts and gives up."""
    for fn in (spectral.top_eigenpairs, spectral.bottom_eigenpairs):
        assert inspect.signature(fn).parameters["max_dense"].default == 4096
    M, d = _clustered_bottom()
    n = M.shape[0]
    op = _CountedMatrix(M)
    pairs = spectral.bottom_eigenpairs(op, 2, max_dense=n)
    np.testing.assert_allclose(pairs.values, d[:2], rtol=0, atol=1e-15)
    assert op.count <= 2 * n
    op = _CountedMatrix(M)
    with pytest.raises(ArpackNoConvergence):
        spectral.bottom_eigenpairs(op, 2, max_dense=n - 1)
    assert op.count > 2 * n
    with pytest.raises(ValueError, match="`max_dense` must be"):
        spectral.top_eigenpairs(M, 2, max_dense=-1)


def test_leftovers19_the_default_limit_is_still_4096(one_thread):
    """A guard: without ``max_dense`` the limit is the documented 4096; a 60-entry stalled
    bottom takes the dense path (exact, <= 2n products)."""
    assert spectral._DENSE_FALLBACK_MAX_N == 4096
    M, d = _clustered_bottom()
    op = _CountedMatrix(M)
    np.testing.assert_allclose(spectral.bottom_eigenpairs(op, 2).values, d[:2], atol=1e-15)
    assert op.count <= 2 * M.shape[0]


# --------------------------------------------------------------------------------------------
# 6. a buffer a parent rebinds on a child it does not call
# --------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    """Holds a buffer and is never called: its parent reads and rebinds it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("avg", torch.zeros(5, dtype=torch.float64))


class _ParentRebinds(nn.Module):
    """A running mean of the inputs kept on a child the parent does not call
    (``self.stats.avg = ...`` in the parent's forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = _Holder()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.stats.avg = 0.9 * self.stats.avg + 0.1 * x.detach().mean(0)
        return self.net(x - self.stats.avg)


def _parent_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _ParentRebinds().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) + 0.5
    return model, x, (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()


def _one_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the child's buffer in a copy of the model after one training-mode forward."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)
    return twin.stats.avg.clone()


def _quiet_step(opt: hessfree.HessianFree, closure) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the buffer-writer warning
        opt.step(closure)


def test_leftovers19_trials_leave_a_buffer_rebound_on_an_uncalled_child(one_thread):
    """The pre-hook watched modules as they are called, so the trial calls each rebound the
    child's mean once more, and the first step did not warn of the write (fails on main).
    Oracle: a deepcopy of the model run forward once at the step's start, bitwise, after each
    of three steps."""
    model, x, y = _parent_case()
    opt = hessfree.HessianFree(model.parameters())

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    for i in range(3):
        oracle = _one_forward(model, x)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.step(closure)
        if i == 0:  # named as a called module's buffer is (main: no warning)
            assert any("wrote the buffer(s) _Holder.avg" in str(w.message) for w in seen)
        assert opt.last_step.closure_calls >= 3  # the step's call, f(θ0) replayed, a trial
        assert torch.equal(model.stats.avg, oracle)
        assert torch.equal(model.state_dict()["stats.avg"], oracle)


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first_call_after_forward", "trial_call"])
def test_leftovers19_a_raised_step_puts_back_an_uncalled_childs_buffer(one_thread, fail_at):
    """A step that raises left the child's buffer rebound by its calls (fails on main).
    Oracle: the tensor and values the child held at the step's start; a retried step then
    moves it once, as one forward of a deepcopy does."""
    model, x, y = _parent_case()
    opt = hessfree.HessianFree(model.parameters())
    calls = [0]

    def closure(fail: bool = False):
        calls[0] += 1
        out = model(x)
        if fail and calls[0] == fail_at:
            raise KeyboardInterrupt
        return F.cross_entropy(out, y), out

    _quiet_step(opt, closure)
    start = model.stats.avg
    values = start.clone()
    calls[0] = 0
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: closure(fail=True))
    assert calls[0] == fail_at
    assert model.stats.avg is start and torch.equal(start, values)
    oracle = _one_forward(model, x)
    _quiet_step(opt, closure)
    assert torch.equal(model.stats.avg, oracle)


# --------------------------------------------------------------------------------------------
# 5. lsmr with an integer right-hand side on a float32 operator
# --------------------------------------------------------------------------------------------


def _lsmr_warnings(A, b) -> tuple[np.ndarray, set[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = lsmr(A, b)
    return result, {(w.category, str(w.message)) for w in seen}


def test_leftovers19_lsmr_on_a_float32_operator_warns_as_scipys_float32_matrix(one_thread):
    """A guard (passes on main; the behaviour is documented, not changed): ``lsmr(J, b)`` on a
    float32 Jacobian operator warns numpy's "overflow encountered in cast" for an int ``b``
    and a float64 one alike (lsmr's 1e100 start compared with float32 scalars). Oracle:
    SciPy's own float32 dense matrix with a float32 ``b`` gives the same warning and iteration
    count; the int ``b`` is read cleanly (iterates bitwise the float64 ``b``'s)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    J = hessfree.JacobianLinearOperator(net, torch.randn(20, 4))
    dense = J @ np.eye(J.shape[1], dtype=np.float32)
    b = np.arange(J.shape[0]) % 3 - 1
    from_int, said = _lsmr_warnings(J, b)
    from_float, said_float = _lsmr_warnings(J, b.astype(np.float64))
    scipys, scipy_said = _lsmr_warnings(dense, b.astype(np.float32))
    assert said <= {(RuntimeWarning, "overflow encountered in cast")}
    assert said == said_float == scipy_said
    assert np.array_equal(from_int[0], from_float[0]) and from_int[2] == scipys[2]
