"""unseen13: models, losses and loops no earlier pass had tried.

Parts (``python experiments/_unseen13.py [ops|patterns|mask|once|blocks|race]``, default all;
markdown to stdout; run once with main's package and once with this branch's on ``PYTHONPATH``
for before/after):

- ``ops``: ``HessianProduct`` and ``GGNProduct`` (what the optimizer's CG multiplies by) of
  each case (float64, n = 12) against explicit float64 matrices from
  ``torch.autograd.functional``: max |err| / max |entry|.
- ``patterns``: loops a user writes: a ``KeyboardInterrupt`` from the closure at its k-th call
  of a step, ``StepLR``, ``lr`` set by hand, two optimizers on disjoint parameters in turn,
  gradient accumulation in an LBFGS-style closure, ``AveragedModel``, ``autocast(bfloat16)``,
  a buffer updated in the forward, ``reduction='sum'`` against ``'mean'``, float16 and bfloat16
  parameters, ``MultiMarginLoss``.
- ``mask``: a pruning mask applied by a gradient hook under each preconditioner, and the mask
  grown after 3 steps: how far the pruned entries move.
- ``once``: a ``@once_differentiable`` tanh in the model and square in the loss: how far 3
  steps end from the same model with torch's own ops (or the error).
- ``blocks``: ``(loss, NamedTuple(logits, features))``: the Gauss-Newton matrix's error, and
  5 steps.
- ``race``: HF (both closures) against Adam (1e-3 / 1e-2) and strong-Wolfe ``LBFGS``,
  interleaved by each contender's own CPU time, same initial weights, full batch n = 256.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hessfree import GGNProduct, HessianFree, HessianProduct

torch.set_num_threads(1)
D = torch.float64


# ---------------------------------------------------------------- models and cases


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Bilinear(3, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(x[:, :3], torch.tanh(x[:, 1:3]))


class _LSTMProj(nn.Module):
    """Bidirectional LSTM with ``proj_size`` reading the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.r = nn.LSTM(1, 3, proj_size=2, bidirectional=True, batch_first=True)
        self.h = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(self.r(x.unsqueeze(-1))[0][:, -1])


class _Packed(nn.Module):
    """LSTM over ``pack_padded_sequence`` (lengths 3, 2, 1, ... cycling)."""

    def __init__(self) -> None:
        super().__init__()
        self.r = nn.LSTM(1, 3, batch_first=True)
        self.h = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        lengths = torch.tensor([3 - i % 3 for i in range(x.shape[0])])
        p = nn.utils.rnn.pack_padded_sequence(
            x[:, :3].unsqueeze(-1), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.r(p)
        return self.h(h[-1])


def _mlp(out: int = 3, mid: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), mid or nn.Tanh(), nn.Linear(6, out))


def _gnll(o: Tensor, y: Tensor) -> Tensor:
    return F.gaussian_nll_loss(o[:, :1], y, F.softplus(o[:, 1:]) + 1e-3, full=True)


class Case(NamedTuple):
    name: str
    model: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    target: Callable[[Tensor, torch.Generator], Tensor]


def _labels(x: Tensor, g: torch.Generator) -> Tensor:
    return (x[:, :3] @ torch.randn(3, 3, generator=g, dtype=D)).argmax(1)


def _cases() -> list[Case]:
    return [
        Case(
            "MultiLabelSoftMarginLoss",
            _mlp,
            nn.MultiLabelSoftMarginLoss(),
            lambda x, g: (x[:, :3] + 0.3 * torch.randn(len(x), 3, generator=g, dtype=D) > 0).to(D),
        ),
        Case(
            "GaussianNLL full=True, learned variance",
            lambda: _mlp(2),
            _gnll,
            lambda x, g: x[:, :1].sin() * (1 + x[:, 1:2].abs()),
        ),
        Case("nn.Bilinear", _Bilinear, F.cross_entropy, _labels),
        Case(
            "GroupNorm(affine=False)",
            lambda: _mlp(3, nn.Sequential(nn.GroupNorm(2, 6, affine=False), nn.Tanh())),
            F.cross_entropy,
            _labels,
        ),
        Case(
            "LayerNorm(elementwise_affine=False)",
            lambda: _mlp(3, nn.Sequential(nn.LayerNorm(6, elementwise_affine=False), nn.Tanh())),
            F.cross_entropy,
            _labels,
        ),
        Case("LSTM proj_size, bidirectional", _LSTMProj, F.cross_entropy, _labels),
        Case("LSTM, pack_padded_sequence", _Packed, F.cross_entropy, _labels),
    ]


def _build(case: Case, n: int) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = case.target(x, g)
    torch.manual_seed(1)
    return case.model().to(D), x, y


def dense(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 H and Jᵀ H_ℓ J of ``loss_fn(model(x), y)`` by ``torch.autograd.functional``."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(named, parts, strict=True)), (x,))

    out = f(theta).detach()
    J = jacobian(lambda t: f(t).reshape(-1), theta)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    H = hessian(lambda t: loss_fn(f(t), y), theta)
    return H, J.T @ HL @ J


def part_ops() -> None:
    print("\n## ops: products against dense float64 (max |err| / max |entry|), n = 12\n")
    print("| case | params | H err | G err |\n|---|---|---|---|")
    for case in _cases():
        model, x, y = _build(case, 12)
        H, G = dense(model, case.loss, x, y)
        params = list(model.parameters())
        out = model(x)
        loss = case.loss(out, y)
        eye = torch.eye(H.shape[0], dtype=D)
        row = [case.name, str(H.shape[0])]
        for ref, prod in ((H, HessianProduct(loss, params)), (G, GGNProduct(loss, out, params))):
            M = torch.stack([prod(e) for e in eye], 1)
            row.append(f"{float((M - ref).abs().max() / ref.abs().max()):.1e}")
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------- patterns


def _data(n: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _outcome(fn: Callable[[], str]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 (a table row, not control flow)
            return f"**{type(err).__name__}**: {str(err)[:150]}"


def part_patterns() -> None:
    print("\n## patterns: float64 MLP 4-5-3, CE, n = 64 (5 steps unless said)\n")
    print("| pattern | outcome |\n|---|---|")
    X, Y = _data()

    def lo(m: nn.Module, loss_fn: Callable = F.cross_entropy, x: Tensor = X) -> Callable:
        return lambda: (lambda out: (loss_fn(out, Y), out))(m(x))

    def interrupt() -> str:
        rows = []
        for style in ("lo", "lbfgs"):
            for k in (1, 2):
                m = _net()
                opt = HessianFree(m.parameters())
                calls = [0, 10**9]

                def c(m=m, opt=opt, style=style, calls=calls):
                    calls[0] += 1
                    if calls[0] == calls[1]:
                        raise KeyboardInterrupt
                    if style == "lo":
                        out = m(X)
                        return F.cross_entropy(out, Y), out
                    opt.zero_grad()
                    loss = F.cross_entropy(m(X), Y)
                    loss.backward()
                    return loss

                opt.step(c)
                before = _flat(m)
                calls[1] = calls[0] + k
                try:
                    opt.step(c)
                except KeyboardInterrupt:
                    pass
                calls[1] = 10**9
                moved = float((_flat(m) - before).abs().max())
                opt.step(c)
                rows.append(f"{style} k={k}: moved {moved:.0f}, next {opt.last_step.status}")
        return "; ".join(rows)

    def steplr() -> str:
        m = _net()
        opt = HessianFree(m.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
        out = []
        for _ in range(5):
            opt.step(lo(m))
            out.append(f"{opt.last_step.status}@{opt.param_groups[0]['lr']:g}")
            sched.step()
        return ", ".join(out) + f"; loss {float(lo(m)()[0]):.4f}"

    def two() -> str:
        m = _net()
        opts = [HessianFree(m[0].parameters()), HessianFree(m[2].parameters())]
        st = []
        for i in range(6):
            opts[i % 2].step(lo(m))
            st.append(str(opts[i % 2].last_step.status))
        return f"{', '.join(st)}; loss {float(lo(m)()[0]):.4f}"

    def accumulate() -> str:
        res = []
        for chunks in (1, 4):
            m = _net()
            opt = HessianFree(m.parameters())

            def c(m=m, opt=opt, chunks=chunks):
                opt.zero_grad()
                total = torch.zeros((), dtype=D)
                for xc, yc in zip(X.chunk(chunks), Y.chunk(chunks), strict=True):
                    loss = F.cross_entropy(m(xc), yc) / chunks
                    loss.backward()
                    total = total + loss.detach()
                return total

            for _ in range(3):
                opt.step(c)
            res.append(_flat(m))
        return f"4 chunks vs 1: max |Δθ| {float((res[0] - res[1]).abs().max()):.1e} after 3 steps"

    def swa() -> str:
        m = _net()
        avg = torch.optim.swa_utils.AveragedModel(m)
        opt = HessianFree(m.parameters())
        for _ in range(5):
            opt.step(lo(m))
            avg.update_parameters(m)
        return (
            f"{opt.last_step.status}; averaged model's loss {float(F.cross_entropy(avg(X), Y)):.4f}"
        )

    def autocast() -> str:
        m = _net().float()
        opt = HessianFree(m.parameters())

        def c():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(X.float())
                return F.cross_entropy(out, Y), out

        l0 = float(c()[0])
        for _ in range(5):
            opt.step(c)
        return f"{opt.last_step.status}; loss {l0:.4f} -> {float(c()[0]):.4f}"

    def half(dtype: torch.dtype) -> Callable[[], str]:
        def go() -> str:
            m = _net().to(dtype)
            opt = HessianFree(m.parameters())
            c = lo(m, x=X.to(dtype))
            l0 = float(c()[0])
            for _ in range(5):
                opt.step(c)
            return f"{opt.last_step.status}; loss {l0:.4f} -> {float(c()[0]):.4f}"

        return go

    def reduction() -> str:
        res = []
        for red in ("mean", "sum"):
            m = _net()
            opt = HessianFree(m.parameters())
            for _ in range(5):
                opt.step(lo(m, lambda o, y, red=red: F.cross_entropy(o, y, reduction=red)))
            res.append(_flat(m))
        return f"max |Δθ| sum vs mean after 5 steps: {float((res[0] - res[1]).abs().max()):.1e}"

    def multimargin(curvature: str) -> Callable[[], str]:
        def go() -> str:
            m = _net()
            opt = HessianFree(m.parameters(), curvature=curvature)
            for _ in range(5):
                opt.step(lo(m, F.multi_margin_loss))
            return f"{opt.last_step.status}; loss {float(lo(m, F.multi_margin_loss)()[0]):.4f}"

        return go

    for name, fn in (
        ("KeyboardInterrupt at the closure's k-th call of a step", interrupt),
        ("StepLR(2, 0.5)", steplr),
        ("two HessianFree on disjoint layers, in turn", two),
        ("gradient accumulation, LBFGS-style closure", accumulate),
        ("AveragedModel alongside", swa),
        ("autocast(bfloat16) in the closure, float32 model", autocast),
        ("float16 parameters", half(torch.float16)),
        ("bfloat16 parameters", half(torch.bfloat16)),
        ("CE reduction='sum' vs 'mean'", reduction),
        ("MultiMarginLoss, default curvature", multimargin("auto")),
        ("MultiMarginLoss, curvature='fisher'", multimargin("fisher")),
    ):
        print(f"| {name} | {_outcome(fn)} |")


# ---------------------------------------------------------------- the fixes


def _pruned(mask: Tensor) -> nn.Sequential:
    m = _net()
    with torch.no_grad():
        m[0].weight.mul_(mask)
    m[0].weight.register_hook(lambda g: g * mask)
    return m


def _mask(seed: int, keep: float) -> Tensor:
    return (torch.rand(5, 4, generator=torch.Generator().manual_seed(seed)) < keep).to(D)


def part_mask() -> None:
    print("\n## mask: max |pruned entry| (gradient-hook mask), (loss, outputs) closure\n")
    print("| precond | fixed mask, 5 steps | mask grown after 3 steps, 3 more |\n|---|---|---|")
    X, Y = _data()
    for precond in ("auto", "kfac", None, "martens", "nystrom"):
        row = []
        for grow in (False, True):
            mask = _mask(3, 0.8 if grow else 0.5)
            m = _pruned(mask)
            opt = HessianFree(m.parameters(), precond=precond)

            def c(m=m):
                out = m(X)
                return F.cross_entropy(out, Y), out

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(6 if grow else 5):
                    if grow and i == 3:
                        mask.mul_(_mask(4, 0.6))
                        with torch.no_grad():
                            m[0].weight.mul_(mask)
                    opt.step(c)
            moved = float((m[0].weight.detach() * (1 - mask)).abs().max())
            row.append(f"{moved:.2g} (loss {float(c()[0].detach()):.4f})")
        print(f"| {precond!r} | " + " | ".join(row) + " |")


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return (1 - y * y) * g


class _OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


def part_once() -> None:
    print("\n## once: @once_differentiable Function, 3 steps: max |Δθ| vs torch's own op\n")
    print("| where | curvature | closure | outcome |\n|---|---|---|---|")
    X, Y = _data()
    T = torch.randn(64, 3, generator=torch.Generator().manual_seed(5), dtype=D)

    def run(where: str, curvature: str, style: str) -> str:
        res = []
        for custom in (True, False):
            m = _net()
            opt = HessianFree(m.parameters(), curvature=curvature)
            act = _OnceTanh.apply if custom and where == "model" else torch.tanh
            sq = _OnceSquare.apply if custom and where == "loss" else torch.square

            def c(m=m, opt=opt, act=act, sq=sq):
                out = m[2](act(m[0](X)))
                loss = sq(out - T).mean()
                if style == "lo":
                    return loss, out
                opt.zero_grad()
                loss.backward()
                return loss

            for _ in range(3):
                opt.step(c)
            res.append(_flat(m))
        return f"accepted; {float((res[0] - res[1]).abs().max()):.2g}"

    for where in ("model", "loss"):
        for curvature, style in (("auto", "lo"), ("hessian", "lbfgs"), ("fisher", "lo")):
            out = _outcome(lambda w=where, c=curvature, s=style: run(w, c, s))
            print(f"| {where} | {curvature} | {style} | {out} |")


class _Out(NamedTuple):
    logits: Tensor
    features: Tensor


def part_blocks() -> None:
    print("\n## blocks: (loss, NamedTuple(logits, features)), CE, 4-5-3 MLP\n")
    X, Y = _data()
    m = _net()
    params = list(m.parameters())
    h = m[1](m[0](X))
    out = m[2](h)
    loss = F.cross_entropy(out, Y)
    eye = torch.eye(sum(p.numel() for p in params), dtype=D)
    ref = torch.stack([GGNProduct(loss, out, params)(e) for e in eye], 1)
    M = torch.stack([GGNProduct(loss, (out, h), params)(e) for e in eye], 1)
    err = float((M - ref).abs().max() / ref.abs().max())
    print(f"GGNProduct over both blocks vs logits alone: {err:.2f} max |err| / max |entry|\n")
    print("| closure returns | 5 steps |\n|---|---|")
    for name, pack in (
        ("(loss, logits)", lambda o, f: o),
        ("(loss, _Out(logits, features))", _Out),
    ):

        def go(pack=pack) -> str:
            m = _net()
            opt = HessianFree(m.parameters())

            def c():
                f = m[1](m[0](X))
                o = m[2](f)
                return F.cross_entropy(o, Y), pack(o, f)

            for _ in range(5):
                opt.step(c)
            return f"{opt.last_step.status}; loss {float(c()[0]):.4f}"

        print(f"| {name} | {_outcome(go)} |")


# ---------------------------------------------------------------- race


def part_race(budget: float = 1.5) -> None:
    """Each contender steps in turn, each by its own CPU time, from the same weights."""
    print(f"\n## race: loss at {budget} s CPU each (full batch, n = 256), interleaved\n")
    print("| case | HF hess | HF lo | LBFGS sw | Adam 1e-3 | Adam 1e-2 | best HF / other | load |")
    print("|---|---|---|---|---|---|---|---|")
    for case in _cases():
        load0 = os.getloadavg()[0]
        model0, x, y = _build(case, 256)
        names = ["hess", "lo", "lbfgs", "adam3", "adam2"]
        models = {k: copy.deepcopy(model0) for k in names}
        opts = {
            "hess": HessianFree(models["hess"].parameters()),
            "lo": HessianFree(models["lo"].parameters()),
            "lbfgs": torch.optim.LBFGS(models["lbfgs"].parameters(), line_search_fn="strong_wolfe"),
            "adam3": torch.optim.Adam(models["adam3"].parameters(), lr=1e-3),
            "adam2": torch.optim.Adam(models["adam2"].parameters(), lr=1e-2),
        }
        spent = dict.fromkeys(names, 0.0)

        def closure_for(k: str, models=models, opts=opts, case=case, x=x, y=y) -> Callable:
            m, o, loss_fn = models[k], opts[k], case.loss
            if k == "lo":
                return lambda: (lambda out: (loss_fn(out, y), out))(m(x))

            def c():
                o.zero_grad()
                loss = loss_fn(m(x), y)
                loss.backward()
                return loss

            return c

        closures = {k: closure_for(k) for k in names}
        while any(spent[k] < budget for k in names):
            for k in names:
                if spent[k] >= budget:
                    continue
                t0 = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opts[k].step(closures[k])
                spent[k] += time.process_time() - t0
        loss = {k: float(case.loss(models[k](x), y).detach()) for k in names}
        hf = min(loss["hess"], loss["lo"])
        other = min(loss[k] for k in names[2:])
        print(
            f"| {case.name} | "
            + " | ".join(f"{loss[k]:.4g}" for k in names)
            + f" | {hf / other:.3f} | {load0:.1f}-{os.getloadavg()[0]:.1f} |"
        )


if __name__ == "__main__":
    parts = sys.argv[1:] or ["ops", "patterns", "mask", "once", "blocks", "race"]
    print(f"torch {torch.version.__version__}, load {os.getloadavg()[0]:.1f}")
    for part in parts:
        globals()[f"part_{part}"]()
