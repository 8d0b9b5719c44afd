"""unseen16: models, loops and misuse no earlier pass had tried.

Parts (``python experiments/_unseen16.py [leftover|exact|misuse|resume|race]``, default all;
markdown to stdout; run with main's package and with this branch's on ``PYTHONPATH`` for
before/after):

- ``leftover``: what unseen15 left. A RuntimeError of the user's at a step's first trial call
  (under no_grad): raised or swallowed, and the grad mode of the later evaluation calls; a
  ``CGPairPreconditioner`` run interrupted at a trial call, max |Δθ| from the run that never
  raised; a step inside ``parametrize.cached()`` on an MLP with an orthogonal layer (the
  reported ``loss_after`` against the true loss after the step).
- ``exact``: LBFGS-style closures, λ fixed, CG to convergence, no line search: the step is
  ``-(H + λI)^{-1} g`` with ``H`` the dense float64 Hessian from ``torch.autograd.functional``
  (λ = max(1, 1 - λ_min(H)) so that the system is definite): relative max error per model.
- ``misuse``: the error each misuse gets (first 110 characters).
- ``resume``: ``state_dict`` into a fresh optimizer, ``torch.save``/``load``, ``deepcopy`` and
  ``pickle`` of (model, optimizer) after step 3 of 7: max |Δθ| from the uninterrupted run.
- ``race``: each contender stepping in turn by its own CPU time (HF, L-BFGS strong Wolfe,
  Adam 1e-3 / 1e-2) on the orthogonal-layer classifier, the tied autoencoder and the triplet
  embedding.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from hessfree import CGPairPreconditioner, HessianFree

torch.set_num_threads(1)

_NEWTON = dict(
    curvature="hessian",
    adapt_damping=False,
    cg_max_iter=500,
    cg_rtol=1e-13,
    cg_progress_tol=1e-300,
    backtrack=False,
    line_search=None,
    precond=None,
    trust_radius=False,
)


def _data(dtype: torch.dtype = torch.float32, n: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _mlp(dtype: torch.dtype = torch.float32, hidden: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def _orthogonal(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3))
    torch.nn.utils.parametrizations.orthogonal(model[0])
    return model.to(dtype)


class _Tied(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.Linear(5, 3, bias=False).to(dtype)
        self.bias = nn.Parameter(torch.zeros(5, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.enc(x)) @ self.enc.weight + self.bias


class _CheckpointLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(5, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(3):
            x = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False)
        return self.head(x)


class _Symmetric(nn.Module):
    def forward(self, W: Tensor) -> Tensor:
        return W.triu() + W.triu(1).T


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


# ------------------------------------------------------------------------------- leftover
def part_leftover() -> None:
    print("\n## leftover: unseen15's three items\n")
    X, y = _data()
    model = _mlp()
    opt = HessianFree(model.parameters())
    calls, modes = [0], []

    def closure():
        calls[0] += 1
        modes.append(torch.is_grad_enabled())
        if calls[0] == 2:
            raise RuntimeError("data loader hiccup")
        out = model(X)
        return F.cross_entropy(out, y), out

    try:
        opt.step(closure)
        what = "swallowed"
    except RuntimeError as err:
        what = f"raised ({err})"
    modes.clear()
    for _ in range(2):
        opt.step(closure)
    print(f"- user's RuntimeError at the first trial call: {what}; grad mode of the next 2 steps' ")
    print(f"  {len(modes)} calls: {sum(modes)} with grad")

    def cgpair(fail_step: int | None) -> Tensor:
        model = _mlp()
        opt = HessianFree(model.parameters(), precond=CGPairPreconditioner(history=8))
        n, armed = [0], [False]

        def c():
            n[0] += 1
            if armed[0] and n[0] == 2:
                armed[0] = False
                raise KeyboardInterrupt
            out = model(X)
            return F.cross_entropy(out, y), out

        for i in range(6):
            if i == fail_step:
                n[0], armed[0] = 0, True
                with contextlib.suppress(KeyboardInterrupt):
                    opt.step(c)
            opt.step(c)
        return _flat(model)

    base = cgpair(None)
    for k in (3, 4):
        gap = float((cgpair(k) - base).abs().max())
        print(f"- CGPairPreconditioner, interrupted at step {k}: max |dtheta| {gap:.3g}")

    X64, y64 = _data(torch.float64, 16)
    for where in ("none", "step"):
        model = _orthogonal()
        opt = HessianFree(model.parameters())

        def c2(model=model):
            out = model(X64)
            return F.cross_entropy(out, y64), out

        try:
            reports = []
            for _ in range(8):
                with parametrize.cached() if where == "step" else contextlib.nullcontext():
                    opt.step(c2)
                with torch.no_grad():
                    reports.append(
                        (opt.last_step.loss_after, float(F.cross_entropy(model(X64), y64)))
                    )
            first, last = reports[0], reports[-1][1]
            print(
                f"- orthogonal MLP, cached() around: {where}: step 0 reported "
                f"{first[0]:.4f}, true {first[1]:.4f}; after 8 steps {last:.4f}"
            )
        except ValueError as err:
            print(f"- orthogonal MLP, cached() around: {where}: ValueError: {str(err)[:110]}")


# ---------------------------------------------------------------------------------- exact
def _newton_gap(model: nn.Module, loss_of, oracle: nn.Module | None = None) -> tuple[float, int]:
    """The step's relative max error; ``oracle``: the same model for the dense Hessian (a
    sparse embedding's own gradient cannot be reshaped by torch.autograd.functional)."""
    dense = model if oracle is None else oracle
    names = [n for n, _ in dense.named_parameters()]
    params = [p.detach() for _, p in dense.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    theta = torch.cat([p.reshape(-1) for p in params])

    def f(t):
        views = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        values = dict(zip(names, views, strict=True))
        return loss_of(lambda *a: functional_call(dense, values, a))

    g = torch.autograd.functional.jacobian(f, theta)
    H = torch.autograd.functional.hessian(f, theta)
    lam = max(1.0, 1.0 - float(torch.linalg.eigvalsh(H)[0]))
    opt = HessianFree(model.parameters(), damping=lam, **_NEWTON)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    ctx = _quiet()
    opt.step(closure)
    ctx.__exit__(None, None, None)
    expected = -torch.linalg.solve(H + lam * torch.eye(len(g), dtype=H.dtype), g)
    return float(((_flat(model) - theta) - expected).abs().max() / expected.abs().max()), len(g)


def part_exact() -> None:
    print("\n## exact: LBFGS-style closure, Hessian, the step against the dense solve\n")
    X, y = _data(torch.float64, 16)
    g = torch.Generator().manual_seed(2)
    Xp = X + 0.1 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    Xn = torch.randn(16, 5, generator=g, dtype=torch.float64)
    labels = torch.where(torch.rand(16, generator=g) > 0.5, 1.0, -1.0).double()
    idx = torch.randint(0, 10, (16,), generator=g)

    def symmetric():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        parametrize.register_parametrization(m[0], "weight", _Symmetric())
        return m

    def embedding(sparse: bool):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Embedding(10, 4, sparse=sparse), nn.Tanh(), nn.Linear(4, 3)
        ).double()

    def accumulated(m):  # the loss whose Hessian the accumulated .grad graphs carry
        return F.cross_entropy(m(X), y)

    trip, cos = nn.TripletMarginLoss(margin=1.0), nn.CosineEmbeddingLoss(margin=0.2)
    cases = [
        ("orthogonal parametrization", _orthogonal, lambda m: F.cross_entropy(m(X), y)),
        ("custom parametrization (symmetric W)", symmetric, lambda m: F.cross_entropy(m(X), y)),
        ("tied encoder/decoder weight", _Tied, lambda m: F.mse_loss(m(X), X)),
        (
            "checkpoint (non-reentrant) in a loop",
            _CheckpointLoop,
            lambda m: F.cross_entropy(m(X), y),
        ),
        ("TripletMarginLoss", lambda: _mlp(torch.float64, 4), lambda m: trip(m(X), m(Xp), m(Xn))),
        ("CosineEmbeddingLoss", lambda: _mlp(torch.float64, 4), lambda m: cos(m(X), m(Xp), labels)),
        (
            "nn.Embedding(sparse=True)",
            lambda: embedding(True),
            lambda m: F.cross_entropy(m(idx), y),
        ),
    ]
    print("| model | n | relative max error |\n|---|---|---|")
    for name, build, loss_of in cases:
        oracle = embedding(False) if "sparse" in name else None
        gap, n = _newton_gap(build(), loss_of, oracle)
        print(f"| {name} | {n} | {gap:.1e} |")

    # gradient accumulation over 4 micro-batches (backward per chunk, returns a float)
    model = _mlp(torch.float64, 4)
    ref, n = _newton_gap(_mlp(torch.float64, 4), accumulated)
    theta = _flat(model)
    opt = HessianFree(model.parameters(), damping=1.0, **_NEWTON)

    def chunks():
        opt.zero_grad()
        total = 0.0
        for k in range(4):
            loss = F.cross_entropy(model(X[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]) / 4
            loss.backward()
            total += loss.item()
        return total

    ctx = _quiet()
    opt.step(chunks)
    ctx.__exit__(None, None, None)
    plain = _mlp(torch.float64, 4)
    opt2 = HessianFree(plain.parameters(), damping=1.0, **_NEWTON)

    def whole():
        opt2.zero_grad()
        loss = accumulated(plain)
        loss.backward()
        return loss

    ctx = _quiet()
    opt2.step(whole)
    ctx.__exit__(None, None, None)
    gap = float(((_flat(model) - theta) - (_flat(plain) - theta)).abs().max())
    print(
        f"| 4 micro-batch backward() calls, float returned (vs one batch) | {n} | {gap:.1e} abs |"
    )


# --------------------------------------------------------------------------------- misuse
def part_misuse() -> None:
    print("\n## misuse: the error each gets\n")
    X, y = _data()

    def lo(model):
        def c():
            out = model(X)
            return F.cross_entropy(out, y), out

        return c

    def replaced(value):
        def run():
            model = _mlp()
            opt = HessianFree(model.parameters())
            opt.step(lo(model))
            opt.param_groups[0]["params"] = value(model)
            opt.step(lo(model))

        return run

    def nograd_lbfgs():
        model = _mlp()
        opt = HessianFree(model.parameters())

        def c():
            opt.zero_grad()
            with torch.no_grad():
                loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss

        opt.step(c)

    def complex_param():
        HessianFree([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])

    def sparse_lo():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3))
        idx = torch.randint(0, 10, (64,))
        opt = HessianFree(model.parameters())

        def c():
            out = model(idx)
            return F.cross_entropy(out, y), out

        opt.step(c)

    def bag():
        torch.manual_seed(0)
        model = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 3))
        idx = torch.randint(0, 10, (64, 3))
        opt = HessianFree(model.parameters())

        def c():
            out = model(idx)
            return F.cross_entropy(out, y), out

        opt.step(c)

    def two_groups():
        model = _mlp()
        ps = list(model.parameters())
        HessianFree([{"params": ps}, {"params": [ps[0]]}])

    def python_float():
        model = _mlp()
        HessianFree(model.parameters()).step(lambda: float(F.cross_entropy(model(X), y)))

    def inference():
        model = _mlp()
        opt = HessianFree(model.parameters())
        with torch.inference_mode():
            opt.step(lo(model))

    cases = [
        ("params := model.parameters() (generator)", replaced(lambda m: m.parameters())),
        ("params := a Parameter", replaced(lambda m: m[0].weight)),
        ("params := [w * 1, b] (non-leaf)", replaced(lambda m: [m[0].weight * 1.0, m[0].bias])),
        ("LBFGS closure, loss under no_grad", nograd_lbfgs),
        ("complex parameter", complex_param),
        ("nn.Embedding(sparse=True), (loss, outputs)", sparse_lo),
        ("nn.EmbeddingBag", bag),
        ("one parameter in two groups", two_groups),
        ("closure returns a Python float, no backward", python_float),
        ("step inside torch.inference_mode()", inference),
    ]
    print("| misuse | error |\n|---|---|")
    for name, run in cases:
        ctx = _quiet()
        try:
            run()
            what = "no error"
        except Exception as err:  # noqa: BLE001 - the report names whatever was raised
            what = f"{type(err).__name__}: {str(err)[:110]}"
        finally:
            ctx.__exit__(None, None, None)
        print(f"| {name} | {what.replace('|', '/')} |")


# --------------------------------------------------------------------------------- resume
def part_resume() -> None:
    print("\n## resume: a copy after step 3 of 7 against the uninterrupted run\n")
    X, y = _data()

    def closure_for(model, opt, style):
        def lo():
            out = model(X)
            return F.cross_entropy(out, y), out

        def lbfgs():
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss

        return lo if style == "lo" else lbfgs

    def run(kwargs, style, mode):
        model = _mlp()
        opt = HessianFree(model.parameters(), **kwargs)
        for i in range(7):
            if i == 3 and mode in ("state_dict", "torch.save"):
                saved = {"m": model.state_dict(), "o": opt.state_dict()}
                if mode == "torch.save":
                    buf = io.BytesIO()
                    torch.save(saved, buf)
                    buf.seek(0)
                    saved = torch.load(buf, weights_only=True)
                else:
                    saved = copy.deepcopy(saved)
                model = _mlp()
                model.load_state_dict(saved["m"])
                opt = HessianFree(model.parameters(), **kwargs)
                opt.load_state_dict(saved["o"])
            elif i == 3 and mode == "deepcopy":
                model, opt = copy.deepcopy((model, opt))
            elif i == 3 and mode == "pickle":
                model, opt = pickle.loads(pickle.dumps((model, opt)))
            opt.step(closure_for(model, opt, style))
        return _flat(model)

    settings = [
        ({}, "lo"),
        ({}, "lbfgs"),
        ({"curvature": "fisher_mc"}, "lo"),
        ({"precond": "nystrom"}, "lo"),
        ({"precond": "kfac"}, "lo"),
        ({"precond": "martens"}, "lo"),
        ({"damping_metric": "marquardt"}, "lo"),
        ({"replay_rng": True}, "lbfgs"),
    ]
    modes = ["state_dict", "torch.save", "deepcopy", "pickle"]
    print("| settings | closure | " + " | ".join(modes) + " |\n|---|---|" + "---|" * len(modes))
    ctx = _quiet()
    for kwargs, style in settings:
        base = run(kwargs, style, None)
        gaps = [f"{float((run(kwargs, style, m) - base).abs().max()):.1e}" for m in modes]
        print(f"| {kwargs or 'defaults'} | {style} | " + " | ".join(gaps) + " |")
    ctx.__exit__(None, None, None)


# ----------------------------------------------------------------------------------- race
def _race(title: str, build, loss_of, budget: float) -> None:
    names = ["hf", "lbfgs", "adam3", "adam2"]
    models = {k: build() for k in names}
    opts = {
        "hf": HessianFree(models["hf"].parameters()),
        "lbfgs": torch.optim.LBFGS(models["lbfgs"].parameters(), line_search_fn="strong_wolfe"),
        "adam3": torch.optim.Adam(models["adam3"].parameters(), lr=1e-3),
        "adam2": torch.optim.Adam(models["adam2"].parameters(), lr=1e-2),
    }

    def closure_for(k):
        m, o = models[k], opts[k]

        def c():
            o.zero_grad()
            loss = loss_of(m)
            loss.backward()
            return loss

        return c

    closures = {k: closure_for(k) for k in names}
    spent = dict.fromkeys(names, 0.0)
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        start = float(loss_of(build()))
    ctx = _quiet()
    while any(spent[k] < budget for k in names):
        for k in names:
            if spent[k] >= budget:
                continue
            t0 = time.process_time()
            opts[k].step(closures[k])
            spent[k] += time.process_time() - t0
    ctx.__exit__(None, None, None)
    with torch.no_grad():
        loss = {k: float(loss_of(models[k])) for k in names}
    other = min(loss[k] for k in names[1:])
    row = " | ".join(f"{loss[k]:.4g}" for k in names)
    ratio = f"{loss['hf'] / other:.4g}" if other > 0 else "both 0"
    print(f"| {title} | {start:.4g} | {row} | {ratio} | {load0:.1f} |")


def part_race(budget: float = 1.0) -> None:
    print(f"\n## race: {budget} s CPU each, interleaved, float64, LBFGS-style closures\n")
    X, y = _data(torch.float64)
    g = torch.Generator().manual_seed(2)
    Xp = X + 0.1 * torch.randn(64, 5, generator=g, dtype=torch.float64)
    Xn = torch.randn(64, 5, generator=g, dtype=torch.float64)
    trip = nn.TripletMarginLoss(margin=4.0)  # unreachable for all triplets: no zero loss
    print(
        "| model | start | HF | L-BFGS | Adam 1e-3 | Adam 1e-2 | HF / best other | load |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    _race("orthogonal layer, CE", _orthogonal, lambda m: F.cross_entropy(m(X), y), budget)
    _race("tied autoencoder, MSE", _Tied, lambda m: F.mse_loss(m(X), X), budget)
    _race(
        "triplet embedding (margin 4)",
        lambda: _mlp(torch.float64, 8),
        lambda m: trip(m(X), m(Xp), m(Xn)),
        budget,
    )


if __name__ == "__main__":
    parts = sys.argv[1:] or ["leftover", "exact", "misuse", "resume", "race"]
    print(f"torch {torch.version.__version__}, load {os.getloadavg()[0]:.1f}")
    for part in parts:
        globals()[f"part_{part}"]()
