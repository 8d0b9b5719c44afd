"""unseen12: training-loop patterns, torch features and losses no earlier pass had tried.

Parts (``python experiments/_unseen12.py [ops|patterns|race|swap|mask]``, default all;
markdown to stdout; run once with main's package and once with this branch's on ``PYTHONPATH``
for before/after):

- ``ops``: ``GGNLinearOperator`` and ``HessianLinearOperator`` of each case (float64, n = 12)
  against explicit float64 matrices from ``torch.autograd.functional``: max |err| / max |entry|.
- ``patterns``: what a user's loop meets: reentrant / non-reentrant ``checkpoint``, a
  ``torch.compile``'d model, ``Embedding(max_norm=, sparse=, padding_idx=)``, a batch whose
  every target is ``ignore_index``, a parameter listed twice, ``inference_mode``, a float64
  model fed float32 data, ``backward(retain_graph=True)`` / ``autograd.backward`` /
  ``autograd.grad`` closures, a ``state_dict`` round trip into a fresh model and optimizer,
  a warm-up ``LambdaLR`` from lr 0: the step's status or error, and whether the parameters
  are unchanged where the step was refused.
- ``race``: HF (both closures) against Adam (1e-3 / 1e-2) and strong-Wolfe ``LBFGS``,
  interleaved by each contender's own CPU time (``time.process_time``), same initial weights,
  full batch n = 256.
- ``swap``: two blocks of one size trained in turn (freeze one, unfreeze the other): the warm
  start dropped at each swap (this branch) against kept (main), at equal CPU time, 8 seeds.
- ``mask``: a pruning mask applied by a gradient hook (``p.register_hook(lambda g: g * mask)``)
  under each preconditioner: how far the pruned entries move.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hessfree import GGNLinearOperator, HessianFree, HessianLinearOperator

torch.set_num_threads(1)
D = torch.float64


# ---------------------------------------------------------------- models and cases


class Checkpointed(nn.Module):
    """An MLP whose first two layers run under ``torch.utils.checkpoint``."""

    def __init__(self, out: int = 3, reentrant: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, out)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        if self.reentrant:  # its backward runs only for an input that requires grad
            x = x.detach().requires_grad_(True)
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


class Padded(nn.Module):
    """Mean of token embeddings (``padding_idx=0``) into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.emb(x).mean(1))


@dataclass
class Case:
    name: str
    build: Callable[[int], tuple[nn.Module, Callable, Tensor, Tensor]]


def _mlp(out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))


def _cases() -> list[Case]:
    W = torch.tensor([0.5, 2.0, 1.0], dtype=D)

    def seeded(fn):
        def build(n: int):
            g = torch.Generator().manual_seed(0)
            torch.manual_seed(1)
            model, loss_fn, x, y = fn(g, n)
            return model.to(D), loss_fn, x, y

        return build

    def x_of(g, n):
        return torch.randn(n, 4, generator=g, dtype=D)

    def ckpt(g, n):
        y = torch.randint(0, 3, (n,), generator=g)
        return Checkpointed(), F.cross_entropy, x_of(g, n), y

    def nll_w_ign(g, n):
        y = torch.randint(0, 3, (n,), generator=g)
        y[::4] = -100

        def loss(o, t):
            return F.nll_loss(F.log_softmax(o, -1), t, weight=W.to(o.dtype), ignore_index=-100)

        return _mlp(3), loss, x_of(g, n), y

    def poisson_log_full(g, n):
        y = torch.poisson(torch.full((n, 3), 3.0, dtype=D), generator=g)

        def loss(o, t):
            return F.poisson_nll_loss(o, t, log_input=True, full=True)

        return _mlp(3), loss, x_of(g, n), y

    def poisson_rate_full(g, n):
        y = torch.poisson(torch.full((n, 3), 3.0, dtype=D), generator=g)

        def loss(o, t):
            return F.poisson_nll_loss(F.softplus(o) + 1e-3, t, log_input=False, full=True)

        return _mlp(3), loss, x_of(g, n), y

    def kl_log_target(g, n):
        t = F.log_softmax(torch.randn(n, 3, generator=g, dtype=D), -1)

        def loss(o, t):
            return F.kl_div(F.log_softmax(o, -1), t, log_target=True, reduction="batchmean")

        return _mlp(3), loss, x_of(g, n), t

    def bce_pos_weight(g, n):
        t = (torch.rand(n, 3, generator=g, dtype=D) < 0.2).to(D)
        pw = torch.tensor([4.0, 1.0, 0.25], dtype=D)

        def loss(o, t):
            return F.binary_cross_entropy_with_logits(o, t, pos_weight=pw.to(o.dtype))

        return _mlp(3), loss, x_of(g, n), t

    def huber_small(g, n):
        t = torch.randn(n, 3, generator=g, dtype=D)

        def loss(o, t):
            return F.huber_loss(o, t, delta=0.05)

        return _mlp(3), loss, x_of(g, n), t

    def triplet(g, n):
        # one net embeds anchor, positive (the anchor + noise) and negative (another input)
        def loss(o, _t):
            a, p, q = o.unbind(1)
            return F.triplet_margin_loss(a, p, q, margin=1.0)

        a = x_of(g, n)
        x = torch.stack([a, a + 0.5 * torch.randn_like(a), a[torch.randperm(n, generator=g)]], 1)
        return _mlp(4), loss, x, torch.zeros(n)

    def padded(g, n):
        x = torch.randint(0, 12, (n, 5), generator=g)
        x[:, 3:] = 0  # padding
        return Padded(), F.cross_entropy, x, x[:, :3].sum(1) % 3  # a function of the tokens

    fns = dict(
        checkpoint=ckpt,
        nll_weight_ignore=nll_w_ign,
        poisson_log_full=poisson_log_full,
        poisson_rate_full=poisson_rate_full,
        kl_log_target=kl_log_target,
        bce_pos_weight=bce_pos_weight,
        huber_delta_0p05=huber_small,
        triplet=triplet,
        embedding_padding_idx=padded,
    )
    return [Case(k, seeded(v)) for k, v in fns.items()]


# ---------------------------------------------------------------- ops


def dense(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
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
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy())


def part_ops() -> None:
    print("\n## ops: operators against dense float64 (max |err| / max |entry|), n = 12\n")
    print("| case | params | H err | G err |\n|---|---|---|---|")
    for case in _cases():
        model, loss_fn, x, y = case.build(12)
        ref = dense(model, loss_fn, x, y)
        row = [case.name, str(sum(p.numel() for p in model.parameters()))]
        for kind, cls in (("H", HessianLinearOperator), ("G", GGNLinearOperator)):
            try:
                M = cls(model, loss_fn, (x, y)) @ np.eye(ref[kind].shape[0])
                row.append(f"{np.abs(M - ref[kind]).max() / np.abs(ref[kind]).max():.1e}")
            except Exception as err:  # noqa: BLE001 (a table row, not control flow)
                row.append(f"{type(err).__name__}: {str(err)[:80]}")
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------- patterns


def _outcome(fn: Callable[[], str]) -> str:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            r = fn()
        except Exception as err:  # noqa: BLE001
            r = f"**{type(err).__name__}**: {str(err)[:140]}"
    hf = sorted({str(m.message)[:90] for m in w if "HessianFree" in str(m.message)})
    return r + ("; warns: " + " / ".join(hf) if hf else "")


def part_patterns() -> None:
    print("\n## patterns: status or error (5 steps unless said), float64 MLP 4-8-3, n = 64\n")
    print("| pattern | closure | outcome | params unchanged where refused |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g, dtype=D)
    Y = torch.randint(0, 3, (64,), generator=g)

    def model_of(reentrant: bool | None = None, compiled: bool = False):
        torch.manual_seed(1)
        m = (Checkpointed(reentrant=reentrant) if reentrant is not None else _mlp(3)).to(D)
        return m, (torch.compile(m, backend="aot_eager") if compiled else m)

    def closure_of(opt, call, style, x=X, y=Y):
        def c():
            out = call(x)
            loss = F.cross_entropy(out, y)
            if style == "lo":
                return loss, out
            opt.zero_grad()
            loss.backward()
            return loss

        return c

    def run(make, style, steps=5):
        def go():
            m, call = make()
            opt = HessianFree(m.parameters())
            before = [p.detach().clone() for p in m.parameters()]
            try:
                for _ in range(steps):
                    opt.step(closure_of(opt, call, style))
            except Exception:
                same = all(torch.equal(p, q) for p, q in zip(m.parameters(), before, strict=True))
                run.unchanged = "yes" if same else "**no**"
                raise
            run.unchanged = "-"
            moved = [
                float((p - q).abs().max()) for p, q in zip(m.parameters(), before, strict=True)
            ]
            return f"{opt.last_step.status.value}, max |Δ| per tensor " + ", ".join(
                f"{v:.2g}" for v in moved
            )

        return go

    rows = [
        ("checkpoint(use_reentrant=True)", lambda: model_of(True)),
        ("checkpoint(use_reentrant=False)", lambda: model_of(False)),
        ("torch.compile(model) (aot_eager)", lambda: model_of(compiled=True)),
    ]
    for name, make in rows:
        for style in ("lo", "hess"):
            run.unchanged = "-"
            out = _outcome(run(make, style))
            print(f"| {name} | {style} | {out} | {run.unchanged} |")

    def embedding(kind: dict, style: str) -> str:
        torch.manual_seed(0)
        emb, head = nn.Embedding(20, 3, **kind).to(D), nn.Linear(3, 3).to(D)
        idx = torch.randint(0, 20, (64,), generator=torch.Generator().manual_seed(2))
        opt = HessianFree([*emb.parameters(), *head.parameters()])
        before = emb.weight.detach().clone()

        def c():
            out = head(emb(idx))
            loss = F.cross_entropy(out, Y)
            if style == "lo":
                return loss, out
            opt.zero_grad()
            loss.backward()
            return loss

        try:
            for _ in range(5):
                opt.step(c)
        except Exception:
            print_unchanged[0] = "yes" if torch.equal(emb.weight, before) else "**no**"
            raise
        return f"{opt.last_step.status.value}, loss {opt.last_step.loss:.4f}"

    for kind in ({"max_norm": 0.5}, {"sparse": True}, {"padding_idx": 0}):
        for style in ("lo", "hess"):
            print_unchanged = ["-"]
            out = _outcome(lambda kind=kind, style=style: embedding(kind, style))
            print(f"| Embedding({kind}) | {style} | {out} | {print_unchanged[0]} |")

    def all_ignored(style: str) -> str:
        m, _ = model_of()
        opt = HessianFree(m.parameters())
        for _ in range(3):
            opt.step(closure_of(opt, m, style))
        before = [p.detach().clone() for p in m.parameters()]
        opt.step(closure_of(opt, m, style, y=torch.full_like(Y, -100)))
        same = all(torch.equal(p, q) for p, q in zip(m.parameters(), before, strict=True))
        s = f"{opt.last_step.status.value} (params unchanged: {same})"
        for _ in range(3):
            opt.step(closure_of(opt, m, style))
        return s + f", then {opt.last_step.status.value}, λ {opt.damping:.3g}"

    for style in ("lo", "hess"):
        print(
            f"| CE batch with every target ignored, step 4 | {style} | "
            f"{_outcome(lambda s=style: all_ignored(s))} | - |"
        )

    def closure_kinds(kind: str) -> str:
        runs = []
        for k in (kind, "plain"):
            m, _ = model_of()
            opt = HessianFree(m.parameters())

            def c(m=m, opt=opt, k=k):
                opt.zero_grad()
                loss = F.cross_entropy(m(X), Y)
                if k == "retain_graph":
                    loss.backward(retain_graph=True)
                elif k == "autograd.backward":
                    torch.autograd.backward(loss)
                elif k == "autograd.grad":
                    for p, gr in zip(
                        m.parameters(), torch.autograd.grad(loss, list(m.parameters())), strict=True
                    ):
                        p.grad = gr
                else:
                    loss.backward()
                return loss

            for _ in range(3):
                opt.step(c)
            runs.append([p.detach().clone() for p in m.parameters()])
        same = all(torch.equal(p, q) for p, q in zip(*runs, strict=True))
        return f"3 steps bitwise as loss.backward(): {same}"

    for kind in ("retain_graph", "autograd.backward", "autograd.grad"):
        print(
            f"| closure calling {kind} | hess | {_outcome(lambda k=kind: closure_kinds(k))} | - |"
        )

    def state_round_trip(style: str, precond: str | None) -> str:
        ref, _ = model_of()
        o = HessianFree(ref.parameters(), precond=precond)
        for _ in range(6):
            o.step(closure_of(o, ref, style))
        m, _ = model_of()
        opt = HessianFree(m.parameters(), precond=precond)
        for _ in range(3):
            opt.step(closure_of(opt, m, style))
        buf = io.BytesIO()
        torch.save({"m": m.state_dict(), "o": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        m2, _ = model_of()
        m2.load_state_dict(saved["m"])
        o2 = HessianFree(m2.parameters(), precond=precond)
        o2.load_state_dict(saved["o"])
        for _ in range(3):
            o2.step(closure_of(o2, m2, style))
        same = all(
            torch.equal(p, q) for p, q in zip(m2.parameters(), ref.parameters(), strict=True)
        )
        return f"3 + 3 steps via torch.save/load into a fresh model and optimizer = 6: {same}"

    for style, precond in (("lo", "auto"), ("lo", "nystrom"), ("hess", "auto"), ("hess", None)):
        out = _outcome(lambda s=style, p=precond: state_round_trip(s, p))
        print(f"| state_dict round trip (precond={precond!r}) | {style} | {out} | - |")

    def misc(kind: str) -> str:
        m, _ = model_of()
        if kind == "listed twice":
            ps = list(m.parameters())
            opt = HessianFree([*ps, ps[0]])
            ref, _ = model_of()
            o2 = HessianFree(ref.parameters())
            opt.step(closure_of(opt, m, "lo"))
            o2.step(closure_of(o2, ref, "lo"))
            same = all(
                torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters(), strict=True)
            )
            return f"bitwise as listed once: {same}"
        opt = HessianFree(m.parameters())
        if kind == "inference_mode":
            with torch.inference_mode():
                opt.step(closure_of(opt, m, "lo"))
        elif kind == "float32 data":
            opt.step(closure_of(opt, m, "lo", x=X.float()))
        elif kind == "every parameter frozen after step 1":
            opt.step(closure_of(opt, m, "lo"))
            m.requires_grad_(False)
            opt.step(closure_of(opt, m, "lo"))
        elif kind == "LambdaLR warm-up from 0":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, e / 3))
            out = []
            for _ in range(4):
                opt.step(closure_of(opt, m, "lo"))
                out.append(f"lr {opt.param_groups[0]['lr']:.2f} {opt.last_step.status.value}")
                sched.step()
            return ", ".join(out)
        return "ran"

    kinds = (
        "listed twice",
        "inference_mode",
        "float32 data",
        "every parameter frozen after step 1",
    )
    for kind in (*kinds, "LambdaLR warm-up from 0"):
        print(f"| {kind} | lo | {_outcome(lambda k=kind: misc(k))} | - |")


# ---------------------------------------------------------------- race


def part_race(budget: float = 1.5, only: tuple[str, ...] = ()) -> None:
    """Each contender steps in turn, each by its own CPU time, from the same weights."""
    print(f"\n## race: loss at {budget} s CPU each (full batch, n = 256), interleaved\n")
    print("| case | HF hess | HF lo | LBFGS sw | Adam 1e-3 | Adam 1e-2 | best HF / other | load |")
    print("|---|---|---|---|---|---|---|---|")
    for case in _cases():
        if only and case.name not in only:
            continue
        load0 = os.getloadavg()[0]
        model0, loss_fn, x, y = case.build(256)
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
        failed: dict[str, str] = {}

        def closure_for(k, models=models, opts=opts, loss_fn=loss_fn, x=x, y=y):
            m, o = models[k], opts[k]
            if k == "lo":
                return lambda: (lambda out: (loss_fn(out, y), out))(m(x))

            def c():
                o.zero_grad()
                loss = loss_fn(m(x), y)
                loss.backward()
                return loss

            return c

        closures = {k: closure_for(k) for k in names}
        while any(spent[k] < budget for k in names if k not in failed):
            for k in names:
                if k in failed or spent[k] >= budget:
                    continue
                t0 = time.process_time()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opts[k].step(closures[k])
                except Exception as err:  # noqa: BLE001
                    failed[k] = f"{type(err).__name__}: {str(err)[:60]}"
                spent[k] += time.process_time() - t0
        loss = {}
        for k in names:
            with torch.enable_grad():
                loss[k] = float(loss_fn(models[k](x), y).detach())
        res = [failed.get(k, f"{loss[k]:.4g}") for k in names]
        hf = min(loss[k] for k in ("hess", "lo") if k not in failed)
        other = min(loss[k] for k in names[2:] if k not in failed)
        ratio = f"{hf / other:.3f}" if other > 0 else f"{hf:.3g} vs {other:.3g}"
        print(
            f"| {case.name} | "
            + " | ".join(res)
            + f" | {ratio} | {load0:.1f}-{os.getloadavg()[0]:.1f} |"
        )


# ---------------------------------------------------------------- swap and mask


def part_swap(budget: float = 0.6, seeds: int = 8) -> None:
    """Blocks 0 and 2 (4×4 each) trained in turn with the head (the other block frozen), from
    the same weights: ``cold`` (this branch: the warm start dropped at each swap) against
    ``kept`` (main's behaviour, restored by marking the state as laid out for the new block),
    interleaved by each arm's own CPU time."""
    import statistics

    print(f"\n## swap: blocks trained in turn, loss at {budget} s CPU, {seeds} seeds\n")
    print("| settings | geo-mean loss kept | cold | cold lower on | median steps kept / cold |")
    print("|---|---|---|---|---|")
    for kw in ({"precond": None}, {"precond": None, "damping_metric": "marquardt"}, {}):
        loss: dict[str, list[float]] = {"kept": [], "cold": []}
        steps: dict[str, list[int]] = {"kept": [], "cold": []}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(100 + seed)
            X = torch.randn(64, 4, generator=g, dtype=D)
            Y = torch.randn(64, 2, generator=g, dtype=D)
            runs = {}
            for arm in loss:
                torch.manual_seed(seed)
                m = nn.Sequential(
                    nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)
                ).to(D)
                runs[arm] = dict(m=m, opt=HessianFree(m.parameters(), **kw), k=0, t=0.0)
            while any(r["t"] < budget for r in runs.values()):
                for arm, r in runs.items():
                    if r["t"] >= budget:
                        continue
                    m, opt = r["m"], r["opt"]
                    t0 = time.process_time()
                    for i in (0, 2):
                        m[i].requires_grad_(i == 2 * (r["k"] % 2))
                    if arm == "kept":
                        listed = [p for grp in opt.param_groups for p in grp["params"]]
                        for st in opt.state.values():
                            if "trained" in st:
                                st["trained"] = [i for i, p in enumerate(listed) if p.requires_grad]

                    def c(m=m, X=X, Y=Y):
                        out = m(X)
                        return F.mse_loss(out, Y), out

                    opt.step(c)
                    r["k"] += 1
                    r["t"] += time.process_time() - t0
            for arm, r in runs.items():
                with torch.no_grad():
                    loss[arm].append(float(F.mse_loss(r["m"](X), Y)))
                steps[arm].append(r["k"])
        gm = {arm: statistics.geometric_mean(v) for arm, v in loss.items()}
        wins = sum(a < b for a, b in zip(loss["cold"], loss["kept"], strict=True))
        print(
            f"| {kw} | {gm['kept']:.4f} | {gm['cold']:.4f} | {wins} / {seeds} | "
            f"{statistics.median(steps['kept'])} / {statistics.median(steps['cold'])} |"
        )


def part_mask(steps: int = 5) -> None:
    print(f"\n## mask: pruning by a gradient hook, {steps} steps: max |pruned entry| after\n")
    print("| precond | (loss, outputs) | LBFGS-style |\n|---|---|---|")
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 4, generator=g, dtype=D), torch.randint(0, 3, (64,), generator=g)
    for precond in ("auto", None, "kfac", "martens", "nystrom"):
        row = []
        for style in ("lo", "hess"):
            torch.manual_seed(1)
            m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
            mask = (torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) > 0.5).to(D)
            with torch.no_grad():
                m[0].weight.mul_(mask)
            m[0].weight.register_hook(lambda gr, mask=mask: gr * mask)
            opt = HessianFree(m.parameters(), precond=precond)

            def c(m=m, opt=opt, style=style):
                out = m(X)
                loss = F.cross_entropy(out, Y)
                if style == "lo":
                    return loss, out
                opt.zero_grad()
                loss.backward()
                return loss

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(steps):
                        opt.step(c)
                row.append(f"{float((m[0].weight.detach() * (1 - mask)).abs().max()):.2g}")
            except Exception as err:  # noqa: BLE001
                row.append(f"{type(err).__name__} (needs per-example information)")
        print(f"| {precond!r} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["ops", "patterns", "race", "swap", "mask"]
    print(f"torch {torch.version.__version__}, load {os.getloadavg()[0]:.1f}")
    for part in parts:
        name, _, cases = part.partition(":")  # e.g. race:triplet,checkpoint
        kwargs = {"only": tuple(cases.split(","))} if cases else {}
        globals()[f"part_{name}"](**kwargs)
