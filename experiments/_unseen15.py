"""unseen15: loops, scales and hooks no earlier pass had tried.

Parts (``python experiments/_unseen15.py [interrupt|scale|hooks|closures|race]``, default
all; markdown to stdout; run with main's package and with this branch's on ``PYTHONPATH``
for before/after):

- ``interrupt``: a 5-8-3 tanh MLP (float32, 64 cases, cross-entropy), 6 steps; at step 0 or
  3 the closure's k-th call raises, the caller catches it and steps again: max |Δθ| from the
  run that never raised (oracle: that run; a step that raised must leave everything as it
  was), under 8 settings.
- ``scale``: the same MLP in float32 with the loss times 2^k, 8 steps, tolerances 0 (they are
  absolute, as LBFGS's): relative parameter distance from the unscaled run (a power of two
  scales every product and quotient exactly until float32's range ends) and the statuses.
- ``hooks``: the products under a ×2 gradient hook against dense float64 G, DG, GD, DGD
  (``torch.autograd.functional``); a logging hook (returns None) on a ReLU MLP with dead units
  and on an ``nn.Embedding`` trained on mini-batches, against the run without it.
- ``closures``: LBFGS-style closures with ``backward(retain_graph=False)``, backward called
  twice, and a two-head model with one head on detached features.
- ``race``: a float32 regression in raw units (features ×1-1000, targets ~1e5-1e6,
  ``reduction='sum'``: loss ~1e14, past 2^46), each contender stepping in turn by its own CPU
  time: HF (Gauss-Newton, Hessian), L-BFGS (strong Wolfe), Adam 1e-3 / 1e-2.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hessfree import GGNProduct, HessianFree, HessianProduct

torch.set_num_threads(1)


def _classes(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, generator=g, dtype=dtype), torch.randint(0, 3, (64,), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _flat(params) -> Tensor:
    return torch.cat([p.detach().flatten() for p in params])


# ------------------------------------------------------------------------------ interrupt


def _interrupted(fail_step, fail_call, style="lo", exc=KeyboardInterrupt, **kw):
    X, y = _classes()
    m = _mlp()
    opt = HessianFree(m.parameters(), **kw)
    calls, armed = [0], [False]

    def closure():
        calls[0] += 1
        if armed[0] and calls[0] == fail_call:
            armed[0] = False
            raise exc("interrupted")
        if style == "lo":
            out = m(X)
            return F.cross_entropy(out, y), out
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y)
        loss.backward()
        return loss

    for i in range(6):
        if i == fail_step:
            calls[0], armed[0] = 0, True
            try:
                opt.step(closure)
                return None  # the step made fewer calls: nothing raised
            except exc:
                pass
        opt.step(closure)
    return _flat(m.parameters())


def part_interrupt() -> None:
    print("## interrupt: max |Δθ| after 6 steps from the run that never raised\n")
    print("| setting | step 0, call 2 | step 0, call 3 | step 3, call 2 | step 3, call 3 |")
    print("|---|---|---|---|---|")
    settings = {
        "(loss, outputs), 'auto'": {},
        "LBFGS style": {"style": "lbfgs"},
        "curvature='fisher_mc'": {"curvature": "fisher_mc"},
        "damping_metric='marquardt'": {"damping_metric": "marquardt"},
        "replay_rng=True": {"replay_rng": True},
        "precond='nystrom'": {"precond": "nystrom"},
        "precond=None, trust_radius=True": {"precond": None, "trust_radius": True},
        "precond='kfac'": {"precond": "kfac"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kw in settings.items():
            ref = _interrupted(None, 0, **kw)
            cells = []
            for step, call in ((0, 2), (0, 3), (3, 2), (3, 3)):
                got = _interrupted(step, call, **kw)
                cells.append(
                    "(no call)" if got is None else f"{float((got - ref).abs().max()):.3g}"
                )
            print(f"| {name} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------- scale


def _scaled(power: int, style: str, steps: int = 8) -> tuple[Tensor, list[str], list[str]]:
    X, y = _classes()
    m = _mlp()
    opt = HessianFree(
        m.parameters(),
        curvature="auto" if style == "lo" else "hessian",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    scale = 2.0**power

    def closure():
        opt.zero_grad()
        out = m(X)
        loss = F.cross_entropy(out, y) * scale
        if style == "lo":
            return loss, out
        loss.backward()
        return loss

    statuses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
            statuses.append(opt.last_step.status.value)
    return _flat(m.parameters()), statuses, [str(w.message) for w in caught]


def part_scale() -> None:
    print("\n## scale: float32 loss × 2^k, 8 steps: relative distance from the unscaled run\n")
    print("| closure | k | distance | accepted | other statuses | first warning |")
    print("|---|---|---|---|---|---|")
    for style in ("lo", "hessian"):
        ref, _, _ = _scaled(0, style)
        for k in (40, 44, 48, 52, 56, 60, 64, 66):
            theta, st, msgs = _scaled(k, style)
            d = float((theta - ref).norm() / ref.norm())
            other = sorted({s for s in st if s != "accepted"})
            first = msgs[0][:110].replace("|", "/") if msgs else ""
            print(f"| {style} | {k} | {d:.3g} | {st.count('accepted')} | {other} | {first} |")


# ---------------------------------------------------------------------------------- hooks


def _products_under_scale_hook() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = list(m.parameters())
    names = [k for k, _ in m.named_parameters()]
    n = sum(p.numel() for p in params)

    def unflat(t):
        out, i = {}, 0
        for k, p in zip(names, params, strict=True):
            out[k] = t[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return out

    theta = _flat(params)
    H = torch.autograd.functional.hessian(
        lambda t: F.cross_entropy(functional_call(m, unflat(t), (X,)), y), theta
    )
    J = torch.autograd.functional.jacobian(
        lambda t: functional_call(m, unflat(t), (X,)), theta
    ).reshape(-1, n)
    o = m(X).detach().flatten()
    Hl = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z.view(12, 3), y), o)
    G = J.T @ Hl @ J
    d = torch.ones(n, dtype=torch.float64)
    d[: params[0].numel()] = 2.0
    D = torch.diag(d)
    params[0].register_hook(lambda grad: grad * 2)
    eye = torch.eye(n, dtype=torch.float64)
    out = m(X)
    Gp = torch.stack([GGNProduct(F.cross_entropy(out, y), out, params).matvec(e) for e in eye], 1)
    Hp = torch.stack([HessianProduct(F.cross_entropy(m(X), y), params).matvec(e) for e in eye], 1)
    print("| product (hook ×2 on the first weight) | vs C | vs DC | vs CD | vs DCD |")
    print("|---|---|---|---|---|")
    for name, A, C in (("GGN", Gp, G), ("Hessian", Hp, H)):
        cells = [float((A - B).abs().max() / B.abs().max()) for B in (C, D @ C, C @ D, D @ C @ D)]
        print(f"| {name} | " + " | ".join(f"{c:.2g}" for c in cells) + " |")


def _relu_run(hook: bool, precond) -> Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=g)
    X[:, 5] = 0.0
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        m[0].bias[:6] = -5.0  # 6 dead units: their rows' gradient is exactly 0
    log = []
    if hook:
        for p in m.parameters():
            p.register_hook(lambda grad: log.append(grad.detach().norm()))
    opt = HessianFree(m.parameters(), precond=precond)

    def closure():
        out = m(X)
        return F.cross_entropy(out, y), out

    for _ in range(8):
        opt.step(closure)
    return _flat(m.parameters())


def _embedding_run(hook: bool) -> tuple[Tensor, float]:
    torch.manual_seed(0)
    emb, lin = nn.Embedding(50, 4), nn.Linear(4, 2)
    if hook:
        emb.weight.register_hook(lambda grad: None)
    params = [*emb.parameters(), *lin.parameters()]
    opt = HessianFree(params)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (400,), generator=g)
    labels = tokens % 2
    for _ in range(10):
        idx = torch.randint(0, 400, (32,), generator=g)

        def closure(idx=idx):
            out = lin(emb(tokens[idx]))
            return F.cross_entropy(out, labels[idx]), out

        opt.step(closure)
    with torch.no_grad():
        full = float(F.cross_entropy(lin(emb(tokens)), labels))
    return _flat(params), full


def part_hooks() -> None:
    print("\n## hooks\n")
    _products_under_scale_hook()
    print("\n| logging hook (returns None) | max |Δθ| from the run without it | note |")
    print("|---|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for precond in ("auto", None, "nystrom", "martens"):
            ref = _relu_run(False, precond)
            try:
                d = f"{float((_relu_run(True, precond) - ref).abs().max()):.3g}"
                note = ""
            except RuntimeError as err:
                d, note = "raised", str(err)[:100]
            print(f"| ReLU MLP, 6 dead units, precond={precond!r}, 8 steps | {d} | {note} |")
        a, fa = _embedding_run(False)
        b, fb = _embedding_run(True)
        d = float((a - b).abs().max())
        print(
            f"| nn.Embedding(50, 4), batches of 32, 10 steps | {d:.3g} | "
            f"training-set loss {fb:.4f} vs {fa:.4f} without |"
        )


# ------------------------------------------------------------------------------- closures


def part_closures() -> None:
    print("\n## closures: 10 steps\n")
    print("| closure | final loss / outcome |")
    print("|---|---|")
    X, y = _classes()

    def lbfgs(retain, twice=False) -> str:
        m = _mlp()
        opt = HessianFree(m.parameters())

        def c():
            opt.zero_grad()
            loss = F.cross_entropy(m(X), y)
            loss.backward(retain_graph=True if twice else retain)
            if twice:
                loss.backward()
            return loss

        try:
            for _ in range(10):
                opt.step(c)
        except RuntimeError as err:
            return f"RuntimeError: {str(err)[:80]}"
        return f"{opt.last_step.loss_after:.4f}"

    def heads(detach: bool) -> str:
        torch.manual_seed(1)
        body, h1, h2 = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 1)
        opt = HessianFree([*body.parameters(), *h1.parameters(), *h2.parameters()])

        def c():
            z = torch.tanh(body(X))
            o2 = h2(z.detach() if detach else z)
            return F.cross_entropy(h1(z), y) + F.mse_loss(o2, X[:, :1])

        statuses = []
        for _ in range(10):
            opt.step(c)
            statuses.append(opt.last_step.status.value)
        return f"{opt.last_step.loss_after:.4f}; {sorted(set(statuses))}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"| LBFGS style, backward() | {lbfgs(None)} |")
        print(f"| LBFGS style, backward(retain_graph=False) | {lbfgs(False)} |")
        print(f"| LBFGS style, backward twice (gradient 2g) | {lbfgs(None, twice=True)} |")
        print(f"| two heads, loss only | {heads(False)} |")
        print(f"| two heads, second on detached features | {heads(True)} |")


# ----------------------------------------------------------------------------------- race


def _raw_regression() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 4, generator=g) * torch.tensor([1.0, 10.0, 100.0, 1000.0])
    y = (3e5 + 1e5 * torch.tanh(X[:, :1]) + 200.0 * X[:, 1:2] + 0.3 * X[:, 3:4] ** 1).abs()
    y = y + 1e4 * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), X, y


def part_race(budget: float = 1.5) -> None:
    print(f"\n## race: raw-unit float32 regression, sum of squares, {budget} s CPU each\n")
    model0, x, y = _raw_regression()
    names = ["hf_lo", "hf_hess", "lbfgs", "adam3", "adam2"]
    models = {k: copy.deepcopy(model0) for k in names}
    opts = {
        "hf_lo": HessianFree(models["hf_lo"].parameters()),
        "hf_hess": HessianFree(models["hf_hess"].parameters(), curvature="hessian"),
        "lbfgs": torch.optim.LBFGS(models["lbfgs"].parameters(), line_search_fn="strong_wolfe"),
        "adam3": torch.optim.Adam(models["adam3"].parameters(), lr=1e-3),
        "adam2": torch.optim.Adam(models["adam2"].parameters(), lr=1e-2),
    }

    def loss_of(m):
        return F.mse_loss(m(x), y, reduction="sum")

    def closure_for(k):
        m, o = models[k], opts[k]
        if k == "hf_lo":

            def c_lo():
                out = m(x)
                return F.mse_loss(out, y, reduction="sum"), out

            return c_lo

        def c():
            o.zero_grad()
            loss = loss_of(m)
            loss.backward()
            return loss

        return c

    closures = {k: closure_for(k) for k in names}
    spent = dict.fromkeys(names, 0.0)
    failed = dict.fromkeys(names, "")
    load0 = os.getloadavg()[0]
    start = float(loss_of(model0).detach())
    while any(spent[k] < budget and not failed[k] for k in names):
        for k in names:
            if spent[k] >= budget or failed[k]:
                continue
            t0 = time.process_time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opts[k].step(closures[k])
            except (RuntimeError, FloatingPointError) as err:
                failed[k] = type(err).__name__
            spent[k] += time.process_time() - t0
    loss = {k: float(loss_of(models[k]).detach()) for k in names}
    print(f"start loss {start:.4g}; load {load0:.1f}-{os.getloadavg()[0]:.1f}\n")
    print("| contender | final loss | stopped by |\n|---|---|---|")
    for k in names:
        print(f"| {k} | {loss[k]:.4g} | {failed[k] or 'budget'} |")
    hf = min(loss["hf_lo"], loss["hf_hess"])
    other = min(loss[k] for k in names[2:])
    print(f"\nbest HF / best of L-BFGS, Adam: {hf / other:.3g}")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["interrupt", "scale", "hooks", "closures", "race"]
    print(f"torch {torch.version.__version__}, load {os.getloadavg()[0]:.1f}")
    for part in parts:
        globals()[f"part_{part}"]()
