"""unseen18: buffers written in the forward across a step that raises, a rejected step and
trial calls; gradients left in ``.grad`` before an LBFGS-style step (experiments/README.md,
"unseen18").

Usage: ``PYTHONPATH=. python3 experiments/_unseen18.py [bn|spectral|grad]``; one thread.
Oracles: a deepcopy of the model run once in training mode at the step's start (the
statistics a first-order step leaves), the model's buffers at the step's start, and
``torch.optim.LBFGS`` on the same closure.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

import hessfree

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def _bn_model(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    return model, x, y


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max |a - b| over the floating-point buffers (num_batches_tracked printed apart)."""
    pairs = [(u, v) for u, v in zip(a, b, strict=True) if u.is_floating_point()]
    return max(float((u.double() - v.double()).abs().max()) for u, v in pairs)


def bn() -> None:
    """A step that raises at its second closure call (a trial), retried; a NaN batch."""
    model, x, y = _bn_model()
    opt = hessfree.HessianFree(model.parameters())
    calls = [0]

    def closure(fail_at: int | None = None):
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise RuntimeError("data loader hiccup")
        out = model(x)
        return nn.functional.cross_entropy(out, y), out

    for _ in range(3):
        opt.step(closure)
    start = _stats(model)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle(x)  # one forward in training mode at the step's start
    calls[0] = 0
    try:
        opt.step(lambda: closure(fail_at=2))
    except RuntimeError:
        pass
    print(
        f"bn raise: max |stats - start| {_diff(_stats(model), start):.3g}, "
        f"num_batches_tracked {int(model[1].num_batches_tracked)} (start "
        f"{int(start[2])})"
    )
    opt.step(closure)
    print(
        f"bn retry: max |stats - one forward at the start| "
        f"{_diff(_stats(model), _stats(oracle)):.3g}, num_batches_tracked "
        f"{int(model[1].num_batches_tracked)} (oracle {int(oracle[1].num_batches_tracked)})"
    )
    # a NaN batch at θ: the step is rejected (warned), the parameters unchanged
    xn = x.clone()
    xn[0, 0] = float("nan")
    before = _stats(model)
    opt.step(lambda: (nn.functional.cross_entropy(model(xn), y), model(xn)))
    model.eval()
    with torch.no_grad():
        finite = bool(torch.isfinite(model(x)).all())
    model.train()
    print(
        f"bn NaN batch: status {opt.last_step.status}, max |stats - before| "
        f"{_diff(_stats(model), before):.3g}, eval-mode outputs finite: {finite}"
    )

    # the same batch with max_failures=1: the step raises FloatingPointError
    opt = hessfree.HessianFree(model.parameters(), max_failures=1)
    opt.step(closure)
    before = _stats(model)
    try:
        opt.step(lambda: (nn.functional.cross_entropy(model(xn), y), model(xn)))
    except FloatingPointError:
        pass
    print(
        f"bn NaN batch, max_failures=1 (raised): max |stats - before| "
        f"{_diff(_stats(model), before):.3g}"
    )


def spectral(steps: int = 20) -> None:
    """Train-mode ``spectral_norm`` MLP, 20 steps: closure calls, failed line searches, the
    eval-mode loss; and _u after one step against one forward at the step's start."""
    torch.manual_seed(0)
    sn = nn.utils.parametrizations.spectral_norm
    model = nn.Sequential(sn(nn.Linear(5, 16)), nn.Tanh(), sn(nn.Linear(16, 3)))
    x, y = torch.randn(128, 5), torch.randint(0, 3, (128,))
    opt = hessfree.HessianFree(model.parameters())

    def closure():
        out = model(x)
        return nn.functional.cross_entropy(out, y), out

    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle(x)
    opt.step(closure)
    u = [b for n, b in model.named_buffers() if n.endswith("_u")]
    uo = [b for n, b in oracle.named_buffers() if n.endswith("_u")]
    print(f"spectral: max |_u - one forward at the start| after one step {_diff(u, uo):.3g}")
    calls, failed = opt.last_step.closure_calls, int(opt.last_step.status == "line_search_failed")
    for _ in range(steps - 1):
        opt.step(closure)
        calls += opt.last_step.closure_calls
        failed += opt.last_step.status == "line_search_failed"
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    print(
        f"spectral {steps} steps: {calls} closure calls, {failed} failed line searches, "
        f"eval loss {loss:.4f}"
    )


class _RunningMean(nn.Module):
    """A user's running mean of the inputs, updated in place in the forward (unseen14's)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


_VARIANTS = {  # (keep the buffers in trials, f(θ0) as a trial, trials in eval mode, outside)
    "trials write (main)": (False, False, False, False),
    "trials kept": (True, False, False, False),
    "kept + f(θ0) as a trial": (True, True, False, False),
    "trials in eval mode": (False, False, True, False),
    "once per step outside": (False, False, False, True),
}


def variants(steps: int = 20, seeds: int = 5) -> None:
    """unseen14's float64 spectral-norm 5-8-3 MLP and running-mean MLP (64 examples), and a
    float32 spectral-norm 5-16-3 MLP on 128 random labels, 20 steps, under each way of
    treating the buffers in trial calls; seeds 0-4."""
    sn = nn.utils.parametrizations.spectral_norm
    for kind in ("spectral_norm", "running_mean", "spectral_norm 5-16-3 float32"):
        for label, (keep, base, eval_trials, outside) in _VARIANTS.items():
            hessfree.HessianFree._keep_trial_buffers = keep
            hessfree.HessianFree._trial_baseline = base
            calls, failed, losses = 0, 0, []
            for seed in range(seeds):
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(64, 5, generator=g, dtype=torch.float64)
                y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
                torch.manual_seed(seed)
                if kind == "spectral_norm":
                    model = nn.Sequential(sn(nn.Linear(5, 8)), nn.Tanh(), sn(nn.Linear(8, 3)))
                elif kind == "running_mean":
                    model = nn.Sequential(
                        _RunningMean(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)
                    )
                else:  # the `spectral` section's model and data, float32, random labels
                    model = nn.Sequential(sn(nn.Linear(5, 16)), nn.Tanh(), sn(nn.Linear(16, 3)))
                    x = torch.randn(128, 5, generator=g)
                    y = torch.randint(0, 3, (128,), generator=g)
                model = model if "float32" in kind else model.double()
                opt = hessfree.HessianFree(model.parameters())

                def closure(model=model, x=x, y=y, outside=outside, eval_trials=eval_trials):
                    trial = not torch.is_grad_enabled()
                    model.train(not outside and not (eval_trials and trial))
                    out = model(x)
                    return nn.functional.cross_entropy(out, y), out

                for _ in range(steps):
                    if outside:
                        model.train()
                        with torch.no_grad():
                            model(x)
                    opt.step(closure)
                    calls += opt.last_step.closure_calls
                    failed += opt.last_step.status == "line_search_failed"
                model.eval()
                with torch.no_grad():
                    losses.append(float(nn.functional.cross_entropy(model(x), y)))
            mean = sum(losses) / len(losses)
            print(
                f"| {kind} | {label} | {calls / seeds:.1f} | {failed} | {mean:.4f} | "
                f"{' '.join(f'{v:.4f}' for v in losses)} |"
            )
    hessfree.HessianFree._keep_trial_buffers = True
    hessfree.HessianFree._trial_baseline = True


_NEWTON = dict(  # λ fixed, CG to convergence, no backtracking or line search (unseen16's)
    adapt_damping=False,
    cg_max_iter=500,
    cg_rtol=1e-13,
    cg_progress_tol=1e-300,
    backtrack=False,
    line_search=None,
    precond=None,
    trust_radius=False,
)


class _Attention(nn.Module):
    """Tokens (B, T, 4) → self-attention (``nn.MultiheadAttention``) or a
    ``TransformerEncoderLayer`` (2 heads, dropout 0) → mean over T → Linear(4, 3)."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        if layer == "mha":
            self.mix = nn.MultiheadAttention(4, 2, batch_first=True)
        else:
            self.mix = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (
            self.mix(x, x, x, need_weights=False)[0]
            if isinstance(self.mix, nn.MultiheadAttention)
            else self.mix(x)
        )
        return self.out(h.mean(1))


def attention() -> None:
    """The step against the dense solve −(C + λI)⁻¹g with C the float64 Hessian, Gauss-Newton
    matrix or empirical Fisher of an attention model, in training and eval mode."""
    from torch.func import functional_call, jacrev, vmap

    g_ = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 4, generator=g_, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g_)
    print(
        "| layer | mode | curvature | n | relative max error of the step |\n|---|---|---|---|---|"
    )
    for layer in ("mha", "transformer"):
        for mode in ("train", "eval"):
            for curvature in ("hessian", "ggn", "fisher"):
                torch.manual_seed(0)
                model = _Attention(layer).double().train(mode == "train")
                names = [n for n, _ in model.named_parameters()]
                params = [p.detach().clone() for p in model.parameters()]
                shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
                theta = torch.cat([p.reshape(-1) for p in params])

                def values(t, names=names, sizes=sizes, shapes=shapes):
                    views = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
                    return dict(zip(names, views, strict=True))

                def outputs(t, model=model):
                    return functional_call(model, values(t), (x,))

                def loss(t):
                    return nn.functional.cross_entropy(outputs(t), y)

                # the oracle through SDPA's plain-math kernel (forward AD has no flash path)
                math_kernel = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
                math_kernel.__enter__()
                g = torch.func.grad(loss)(theta)
                if curvature == "hessian":
                    # reverse over reverse: torch.func.hessian (forward over reverse) is off
                    # by 0.08 of max|H| through MultiheadAttention → LayerNorm (torch 2.13;
                    # finite differences side with reverse over reverse, to 1.5e-8)
                    C = torch.autograd.functional.hessian(loss, theta)
                    off = float((torch.func.hessian(loss)(theta) - C).abs().max())
                    print(
                        f"|   forward-over-reverse Hessian off by {off:.2g} (max|H| "
                        f"{float(C.abs().max()):.2g}) |"
                    )
                elif curvature == "ggn":
                    J = jacrev(outputs)(theta).reshape(-1, theta.numel())
                    out = outputs(theta).detach()
                    HL = torch.func.hessian(lambda o: nn.functional.cross_entropy(o.view(8, 3), y))(
                        out.reshape(-1)
                    )
                    C = J.T @ HL @ J
                else:  # (1/N) Σ g_i g_iᵀ of the per-example losses

                    def one(t, xi, yi, model=model):
                        o = functional_call(model, values(t), (xi[None],))
                        return nn.functional.cross_entropy(o, yi[None])

                    G = vmap(torch.func.grad(one), in_dims=(None, 0, 0))(theta, x, y)
                    C = G.T @ G / len(y)
                math_kernel.__exit__(None, None, None)
                lam = max(1.0, 1.0 - float(torch.linalg.eigvalsh(C)[0]))
                expected = -torch.linalg.solve(C + lam * torch.eye(len(g), dtype=C.dtype), g)
                opt = hessfree.HessianFree(
                    model.parameters(), damping=lam, curvature=curvature, **_NEWTON
                )

                def closure(model=model):
                    out = model(x)
                    return nn.functional.cross_entropy(out, y), out

                opt.step(closure)
                now = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                gap = float(((now - theta) - expected).abs().max() / expected.abs().max())
                print(f"| {layer} | {mode} | {curvature} | {len(g)} | {gap:.1e} |")


def grad() -> None:
    """A regulariser's gradient added to .grad before an LBFGS-style step whose closure does
    not clear the gradients: LBFGS (the oracle) against HessianFree."""
    for name in ("lbfgs", "hf"):
        model, x, y = _bn_model()
        model = nn.Sequential(model[0], model[2], model[3])

        def closure(model=model, x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt = (
            torch.optim.LBFGS(model.parameters(), max_iter=1)
            if name == "lbfgs"
            else hessfree.HessianFree(model.parameters())
        )
        reg = 0.1 * sum(p.square().sum() for p in model.parameters())
        opt.zero_grad()
        reg.backward()  # the regulariser's gradient, meant to be added
        try:
            opt.step(closure)
            print(f"{name}: stepped, loss {float(nn.functional.cross_entropy(model(x), y)):.4f}")
        except ValueError as err:
            print(f"{name}: refused: {str(err)[:160]}...")


if __name__ == "__main__":
    for which in sys.argv[1:] or ["bn", "spectral", "grad"]:
        parts = {"bn": bn, "spectral": spectral, "grad": grad, "variants": variants}
        parts["attention"] = attention
        parts[which]()
