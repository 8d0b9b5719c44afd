"""Martens' diagonal preconditioner against explicit per-example gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import dense
from hessfree import (
    CGPairPreconditioner,
    EmpiricalFisherDiagonal,
    GGNProduct,
    HessianFree,
    NystromPreconditioner,
    PrecondContext,
    StopReason,
    cg,
    nystrom_sketch,
)
from hessfree.preconditioning import two_loop


def _context(case, generator=None, damping=0.0, shift=0.0):
    model, x, y, loss_fn = case.build()
    out = model(x)
    loss = loss_fn(out, y)
    G = GGNProduct(loss, out, list(model.parameters()))
    D = dense(model, x, y, loss_fn)
    ctx = PrecondContext(
        jacobian=G.jacobian,
        output_grad=G.output_grad,
        reduction=D.reduction,
        damping=damping,
        shift=shift,
        generator=generator,
    )
    return ctx, D


def test_exact_fisher_diagonal_matches_per_example_gradients(case):
    ctx, D = _context(case)
    diag = EmpiricalFisherDiagonal(num_probes=None).fisher_diagonal(ctx)
    torch.testing.assert_close(diag, torch.diagonal(D.F), rtol=1e-10, atol=1e-12)


def test_probe_estimate_is_unbiased():
    from cases import CASES

    ctx, D = _context(CASES[0], generator=torch.Generator().manual_seed(0))
    est = EmpiricalFisherDiagonal(num_probes=4000).fisher_diagonal(ctx)
    exact = torch.diagonal(D.F)
    # Rademacher cross terms average out at rate 1/sqrt(probes): 4000 probes -> a few percent
    assert float((est - exact).norm() / exact.norm()) < 0.1
    # ... while one probe is visibly noisy, so the check above can fail
    one = EmpiricalFisherDiagonal(num_probes=1).fisher_diagonal(ctx)
    assert float((one - exact).norm() / exact.norm()) > 0.1


def test_preconditioner_diagonal_formula():
    from cases import CASES

    ctx, D = _context(CASES[1], damping=0.3, shift=0.01)
    M = EmpiricalFisherDiagonal(exponent=0.75, num_probes=None)(ctx)
    torch.testing.assert_close(
        M, (torch.diagonal(D.F) + 0.3 + 0.01) ** 0.75, rtol=1e-10, atol=1e-12
    )


def test_optimizer_uses_the_preconditioner():
    """CG with the preconditioner takes a different path, and what the preconditioner returns
    reaches CG (a non-SPD diagonal is refused there)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    calls = []

    def run(precond):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        # damping pinned: the test checks that λ reaches the preconditioner, not its default
        opt = HessianFree(model.parameters(), precond=precond, cg_max_iter=50, damping=1.0)

        def closure():
            out = model(x)
            return F.cross_entropy(out, y), out

        opt.step(closure)
        return opt.last_step

    def spy(ctx):
        calls.append(ctx.damping)
        return EmpiricalFisherDiagonal(num_probes=None)(ctx)

    plain, pre = run(None), run(spy)
    assert calls == [1.0]
    assert (plain.cg_iters, plain.loss_after) != (pre.cg_iters, pre.loss_after)
    # a broken user preconditioner is a bug to report, not a numerical event
    with pytest.raises(ValueError, match="`precond` as a diagonal tensor must be positive"):
        run(lambda ctx: torch.full((ctx.jacobian.layout.numel,), -1.0, dtype=torch.float64))


def test_bad_preconditioner_arguments():
    with pytest.raises(ValueError, match=r"`exponent` must be in \[0.0, 1.0\], got 1.5"):
        EmpiricalFisherDiagonal(exponent=1.5)
    with pytest.raises(ValueError, match="`num_probes` must be an int >= 1, got 0"):
        EmpiricalFisherDiagonal(num_probes=0)


# --------------------------------------------------------------------------------------------
# randomized Nyström (Frangella, Tropp & Udell 2023)
# --------------------------------------------------------------------------------------------
def _spd(n=120, decay=0.7, rank=None, seed=0):
    """A PSD matrix with eigenvalues 100·decay^i (only the first ``rank`` nonzero if given)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = 100.0 * decay ** np.arange(n)
    if rank is not None:
        w[rank:] = 0.0
    return (Q * w) @ Q.T, w


def _matmat(A):
    At = torch.from_numpy(A)
    return lambda V: V @ At  # rows are vectors; A symmetric


def test_nystrom_sketch_recovers_a_low_rank_matrix():
    A, w = _spd(n=60, rank=8)
    U, lam = nystrom_sketch(_matmat(A), 60, 12, generator=torch.Generator().manual_seed(0))
    assert U.shape == (60, 12) and lam.shape == (12,)
    np.testing.assert_allclose((U.T @ U).numpy(), np.eye(12), atol=1e-12)
    np.testing.assert_allclose(lam[:8].numpy(), w[:8], rtol=1e-8)
    assert float(lam[8:].abs().max()) < 1e-8
    np.testing.assert_allclose(((U * lam) @ U.T).numpy(), A, atol=1e-8)


def test_nystrom_preconditioner_matches_the_explicit_formula():
    A, _ = _spd(n=50, decay=0.6)
    pre = NystromPreconditioner(rank=10, refresh=3)
    g = torch.zeros(50, dtype=torch.float64)
    ctx = PrecondContext(
        jacobian=None,
        output_grad=None,
        reduction="mean",
        damping=0.01,
        shift=0.0,
        generator=torch.Generator().manual_seed(0),
        curvature=_matmat(A),
        gradient=g,
    )
    apply = pre(ctx)
    U, lam = pre.U.numpy(), pre.eigenvalues.numpy()
    mu = 0.01
    P_inv = (lam[-1] + mu) * (U / (lam + mu)) @ U.T + np.eye(50) - U @ U.T  # eq. (1.4)
    r = np.random.default_rng(1).standard_normal(50)
    np.testing.assert_allclose(apply(torch.from_numpy(r)).numpy(), P_inv @ r, rtol=1e-12)
    # a Nyström approximation lies below A (Loewner order) and, for a fast-decaying spectrum,
    # has the top eigenvalues to within a few percent (numpy's eigvalsh as the oracle)
    assert np.linalg.eigvalsh(A - (U * lam) @ U.T).min() > -1e-9
    w = np.linalg.eigvalsh(A)[::-1]
    np.testing.assert_allclose(lam[:3], w[:3], rtol=0.1)
    assert np.all(lam <= w[:10] * (1 + 1e-9))
    # refreshed on the first call and then every `refresh` calls; μ is read at every call
    seen = []
    original = pre.update
    pre.update = lambda c: (seen.append(True), original(c))[1]
    for _ in range(7):
        pre(ctx)
    assert len(seen) == 2  # calls 4 and 7 of 1..7 (call 1 was the one above)


def test_nystrom_pcg_needs_fewer_iterations_than_plain_cg():
    A, _ = _spd(n=200, decay=0.8)  # λ_60 ≈ 1.5e-4: P⁻¹(A + μI) has condition number ≈ 2.5
    mu = 1e-4
    At = torch.from_numpy(A + mu * np.eye(200))
    b = torch.from_numpy(np.random.default_rng(2).standard_normal(200))
    pre = NystromPreconditioner(rank=60)
    ctx = PrecondContext(
        jacobian=None,
        output_grad=None,
        reduction="mean",
        damping=mu,
        shift=0.0,
        generator=torch.Generator().manual_seed(0),
        curvature=_matmat(A),
        gradient=b,
    )
    kw = dict(max_iter=500, rtol=1e-8, progress_tol=None)
    plain = cg(lambda v: At @ v, b, **kw)
    nys = cg(lambda v: At @ v, b, precond=pre(ctx), **kw)
    assert nys.reason is StopReason.CONVERGED
    assert nys.num_iter < plain.num_iter / 3, (nys.num_iter, plain.num_iter)
    x = np.linalg.solve(A + mu * np.eye(200), b.numpy())
    np.testing.assert_allclose(nys.x.numpy(), x, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_nystrom_in_the_optimizer_with_residual_blocks():
    """precond='nystrom' works with a residual closure (no per-example outputs) and sketches the
    curvature with weight decay: its eigenvalues are the dense Gauss-Newton matrix's + κ."""
    torch.manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)

    def closure():
        r1, r2 = torch.tanh(X @ w) - 0.5, w[:2] - 1.0
        return (r1**2).mean() + 0.5 * (r2**2).sum(), (r1, r2)

    pre = NystromPreconditioner(rank=4, refresh=100)
    opt = HessianFree([w], precond=pre, weight_decay=0.1, damping=1e-3)
    f0 = float(closure()[0].detach())
    opt.step(closure)
    # the sketch was taken at w = 0: G = (2/30) Xᵀ diag(tanh'(0)²) X + diag(1, 1, 0, 0), + κ
    G = 2 / 30 * X.T @ X + torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    expect = torch.linalg.eigvalsh(G + 0.1 * torch.eye(4, dtype=torch.float64)).flip(0)
    torch.testing.assert_close(pre.eigenvalues, expect, rtol=1e-8, atol=1e-10)
    # the sketch's products are counted (rank 4 = n: four), apart from CG's
    assert opt.last_step.precond_matvecs == 4 and opt.last_step.cg_matvecs >= 1
    for _ in range(15):
        opt.step(closure)
        assert opt.last_step.precond_matvecs == 0  # refresh=100: no new sketch
    # the minimum of the same objective (L2 term included) by SciPy's BFGS
    from scipy.optimize import minimize

    Xn = X.numpy()

    def objective(v):
        return (
            np.mean((np.tanh(Xn @ v) - 0.5) ** 2) + 0.5 * np.sum((v[:2] - 1.0) ** 2) + 0.05 * v @ v
        )

    best = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-12}).fun
    assert f0 > best + 0.1
    assert objective(w.detach().numpy()) == pytest.approx(best, abs=1e-9)
    assert HessianFree([w], precond="nystrom").precond.rank == 60


def test_bad_nystrom_arguments():
    with pytest.raises(ValueError, match="`rank` must be an int >= 1, got 0"):
        NystromPreconditioner(rank=0)
    with pytest.raises(ValueError, match="`refresh` must be an int >= 1, got 0"):
        NystromPreconditioner(refresh=0)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 5\], got 6"):
        nystrom_sketch(lambda V: V, 5, 6)
    with pytest.raises(ValueError, match="Unknown `precond` 'nystroem'.*'nystrom'"):
        HessianFree([torch.zeros(2, requires_grad=True)], precond="nystroem")
    ctx = PrecondContext(None, None, "mean", 1.0, 0.0)
    with pytest.raises(ValueError, match="needs curvature products and the gradient"):
        NystromPreconditioner()(ctx)


def test_auto_preconditioner_is_nystrom_for_residual_blocks_only():
    """precond='auto' (the default) sketches Gauss-Newton curvature of residual blocks, and
    leaves (loss, outputs) closures unpreconditioned, as before."""
    torch.manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)

    def blocks():
        r1, r2 = torch.tanh(X @ w) - 0.5, w[:2] - 1.0
        return (r1**2).mean() + 0.5 * (r2**2).sum(), (r1, r2)

    def outputs():
        out = torch.tanh(X @ w)
        return F.mse_loss(out, torch.full_like(out, 0.5)), out

    opt = HessianFree([w], damping=1e-3)
    assert opt.precond == "auto"
    opt.step(outputs)
    assert opt._auto_precond is None
    opt.step(blocks)
    pre = opt._auto_precond
    assert isinstance(pre, NystromPreconditioner) and pre.rank == 60
    # rank capped at n = 4: the sketch is the exact Gauss-Newton matrix at the step's start
    assert pre.U.shape == (4, 4) and bool((pre.eigenvalues > 0).all())
    # precond=None still means none
    none = HessianFree([w], damping=1e-3, precond=None)
    none.step(blocks)
    assert none._auto_precond is None and none.precond is None


@pytest.mark.parametrize(
    ("matmat", "n", "rank", "error", "match"),
    [
        (lambda V: V, 0, 1, ValueError, r"`n` must be an int >= 1, got 0"),
        (lambda V: V[:1], 3, 2, ValueError, r"must return a \(2, 3\) tensor .* got shape \(1, 3\)"),
        (lambda V: V * float("nan"), 3, 2, FloatingPointError, "NaN or infinite"),
        (lambda V: V * float("inf"), 3, 2, FloatingPointError, "NaN or infinite"),
    ],
)
def test_nystrom_sketch_names_bad_sizes_and_non_finite_products(matmat, n, rank, error, match):
    with pytest.raises(error, match=match):
        nystrom_sketch(matmat, n, rank)


# --- CGPairPreconditioner: L-BFGS from CG's own products (Morales & Nocedal 2000) ---


def _pairs_of(A: np.ndarray, m: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    S = np.random.default_rng(seed).standard_normal((m, A.shape[0]))
    return [(torch.from_numpy(s), torch.from_numpy(A @ s)) for s in S]


def _dense_bfgs_inverse(pairs) -> np.ndarray:
    """H from H0 = γI by the BFGS inverse update, oldest pair first (N&W eq. 6.17, 7.20)."""
    S = [s.numpy() for s, _ in pairs]
    Y = [y.numpy() for _, y in pairs]
    n = S[0].size
    H = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) * np.eye(n)
    for s, y in zip(S, Y, strict=True):
        rho = 1.0 / (s @ y)
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H


def _as_matrix(apply, n: int) -> np.ndarray:
    return torch.stack([apply(e) for e in torch.eye(n, dtype=torch.float64)], 1).numpy()


def test_two_loop_matches_the_dense_bfgs_inverse():
    A, _ = _spd(n=30, decay=0.8)
    pairs = _pairs_of(A, 8, seed=3)
    H = _as_matrix(two_loop(pairs), 30)
    np.testing.assert_allclose(H, _dense_bfgs_inverse(pairs), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H, H.T, rtol=1e-9, atol=1e-12)  # symmetric ...
    assert np.linalg.eigvalsh(H).min() > 0  # ... positive definite
    s, y = pairs[-1]
    np.testing.assert_allclose(H @ y.numpy(), s.numpy(), rtol=1e-9)  # secant equation


def test_two_loop_shift_and_skipped_pairs():
    A, _ = _spd(n=20, decay=0.8)
    pairs = _pairs_of(A, 5, seed=4)
    shifted = _pairs_of(A + 0.3 * np.eye(20), 5, seed=4)  # the same s, y = (A + 0.3) s
    np.testing.assert_allclose(
        _as_matrix(two_loop(pairs, shift=0.3), 20),
        _as_matrix(two_loop(shifted), 20),
        rtol=1e-9,
        atol=1e-12,
    )
    s = pairs[0][0]
    bad = [(s, -s), (s, torch.full_like(s, float("nan"))), *pairs]  # sᵀy < 0, NaN: left out
    np.testing.assert_allclose(
        _as_matrix(two_loop(bad), 20), _as_matrix(two_loop(pairs), 20), rtol=1e-12
    )
    assert two_loop([(s, -s)]) is None and two_loop([]) is None


def test_cg_pairs_cut_iterations_on_related_systems():
    """A sequence of related SPD systems (the spectrum drifts 1 % a solve, as C does between HF
    steps, and λ changes): each solve preconditioned by the previous one's products."""
    rng = np.random.default_rng(5)
    n = 150
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.logspace(-3, 1, n)
    pre = CGPairPreconditioner(history=20)
    plain_iters, pair_iters = [], []
    lam = 1e-2
    for k in range(6):
        A = torch.from_numpy((Q * (ev * (1 + 0.01 * k))) @ Q.T + lam * np.eye(n))
        b = torch.from_numpy(rng.standard_normal(n))
        ctx = PrecondContext(None, None, "mean", damping=lam, shift=0.0)
        M = pre(ctx)
        kw = dict(max_iter=500, rtol=1e-6, progress_tol=None)
        plain = cg(lambda v, A=A: A @ v, b, **kw)
        res = cg(pre.watch(lambda v, A=A: A @ v), b, precond=M, **kw)
        assert res.reason is StopReason.CONVERGED
        x = np.linalg.solve(A.numpy(), b.numpy())
        np.testing.assert_allclose(res.x.numpy(), x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
        assert (M is None) == (k == 0)  # the first solve has no pairs yet
        plain_iters.append(plain.num_iter)
        pair_iters.append(res.num_iter)
        lam *= 0.7  # pairs were taken at the old λ: corrected by (λ_new - λ_old) s
    assert pair_iters[0] == plain_iters[0]
    # modest, as in Morales & Nocedal: 894 vs 1051 (m = 20; all ~150 pairs: ~0.6×)
    assert sum(pair_iters[1:]) < 0.9 * sum(plain_iters[1:]), (pair_iters, plain_iters)


def test_cg_pairs_of_a_non_finite_run_keep_the_previous_pairs():
    """A CG run whose products were all NaN (a step rejected for a NaN curvature batch) gives
    no usable pair: the next step is preconditioned by the pairs before it (the dense BFGS
    inverse of those, shifted by the damping's change), not left unpreconditioned."""
    A, _ = _spd(n=12, decay=0.8)
    good = _pairs_of(A, 4, seed=6)
    pre = CGPairPreconditioner(history=4)
    ctx = lambda lam: PrecondContext(None, None, "mean", damping=lam, shift=0.0)  # noqa: E731
    assert pre(ctx(0.1)) is None  # no pairs yet
    watched = pre.watch(lambda v: torch.from_numpy(A) @ v)
    for s, _ in good:
        watched(s)
    pre(ctx(0.2))  # adopts the four pairs, taken at λ = 0.1
    nan = pre.watch(lambda v: torch.full_like(v, float("nan")))
    for s, _ in good:
        nan(s)
    M = pre(ctx(0.05))
    assert M is not None
    expected = _dense_bfgs_inverse([(s, y - 0.05 * s) for s, y in good])  # λ 0.1 -> 0.05
    np.testing.assert_allclose(_as_matrix(M, 12), expected, rtol=1e-9, atol=1e-12)


def test_cg_pair_preconditioner_in_the_optimizer():
    """Recorded pairs are products of the damped Gauss-Newton matrix (closed form for least
    squares: G = 2XᵀX/N, plus λ), and the optimizer reaches the least-squares solution."""
    torch.manual_seed(0)
    X = torch.randn(40, 6, dtype=torch.float64) * torch.logspace(0, 2, 6, dtype=torch.float64)
    t = torch.randn(40, dtype=torch.float64)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)

    def closure():
        out = X @ w
        return F.mse_loss(out, t), out

    pre = CGPairPreconditioner(history=4)
    opt = HessianFree([w], precond=pre, damping=1e-2)
    opt.step(closure)
    lam = opt.last_step.damping
    G = 2 * X.T @ X / 40 + lam * torch.eye(6, dtype=torch.float64)
    assert 1 <= len(pre._recorded) <= 4
    for s, y in pre._recorded:
        torch.testing.assert_close(y, G @ s, rtol=1e-10, atol=1e-10)
    for _ in range(20):
        opt.step(closure)
    best = torch.linalg.lstsq(X, t).solution
    torch.testing.assert_close(w.detach(), best, rtol=1e-6, atol=1e-8)
    assert torch.isfinite(w).all()


def test_bad_cg_pair_history():
    with pytest.raises(ValueError, match="history"):
        CGPairPreconditioner(history=0)
