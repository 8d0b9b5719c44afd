"""unseen17: what a user of HessianFree meets next (experiments/README.md, "unseen17").

Parts (each prints its rows; run with this branch's or main's library first on PYTHONPATH):

* ``bn``: train-mode BatchNorm's running statistics after HF steps against one train-mode
  forward pass per step at the step's start (a first-order step's effect), and after a trial
  evaluation whose forward pass is non-finite.
* ``clip``: an LBFGS-style closure with ``clip_grad_norm_`` inside, against the same run
  without it (loss after 10 steps), and whether a warning names it.
* ``compile``: ``opt.step(closure)`` called inside a ``torch.compile``'d function
  (backend ``eager``: Dynamo's tracing alone), against the plain run.
* ``dtype``: the model converted with ``.double()`` in place between steps.
* ``leftover``: ``max_iter=3`` with ``zero_grad`` outside an LBFGS-style closure.
* ``layout``: a ``channels_last`` CNN, K-FAC with ``include_conv=True`` and without.

Usage: ``PYTHONPATH=$PWD python3 experiments/_unseen17.py [part ...]`` (1 thread).
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree import HessianFree

torch.set_num_threads(1)


def _classes(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(1)
    mid = [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(5, 8), *mid, nn.Tanh(), nn.Linear(8, 3))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _warned(fn) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message)[:110] for w in rec]


def part_bn() -> None:
    X, y = _classes(256)
    for style in ("loss_outputs", "lbfgs"):
        model = _mlp(bn=True)
        opt = HessianFree(model.parameters())

        def closure(model=model, opt=opt, style=style):
            out = model(X)
            loss = F.cross_entropy(out, y)
            if style == "lbfgs":
                opt.zero_grad()
                loss.backward()
                return loss
            return loss, out

        oracle_model = copy.deepcopy(model)
        calls = 0
        worst = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(20):
                oracle_model.load_state_dict(model.state_dict())
                oracle = copy.deepcopy(oracle_model)
                with torch.no_grad():
                    oracle(X)
                opt.step(closure)
                calls += opt.last_step.closure_calls
                worst = max(
                    worst, float((model[1].running_mean - oracle[1].running_mean).abs().max())
                )
        model.eval()
        with torch.no_grad():
            eval_loss = float(F.cross_entropy(model(X), y))
        print(
            f"bn {style}: 20 steps, {calls} closure calls, num_batches_tracked "
            f"{int(model[1].num_batches_tracked)} (one forward per step: 20), max |running_mean "
            f"- one forward at theta| per step {worst:.3g}, eval-mode loss {eval_loss:.4f}"
        )
    # a non-finite trial
    model = _mlp(bn=True)
    opt = HessianFree(model.parameters())
    calls = [0]

    def nan_closure():
        calls[0] += 1
        out = model(X * float("nan") if calls[0] == 2 else X)
        return F.cross_entropy(out, y), out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(nan_closure)
    model.eval()
    with torch.no_grad():
        finite = bool(torch.isfinite(model(X)).all())
    print(
        f"bn nan trial: status {opt.last_step.status}, running_mean finite "
        f"{bool(torch.isfinite(model[1].running_mean).all())}, eval outputs finite {finite}"
    )


def part_clip() -> None:
    X, y = _classes(256)
    for bound in (None, 1.0, 0.1, 0.01):
        model = _mlp()
        opt = HessianFree(model.parameters())

        def closure(model=model, opt=opt, bound=bound):
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            if bound is not None:
                nn.utils.clip_grad_norm_(model.parameters(), bound)
            return loss

        def run(opt=opt, closure=closure):
            rhos, norms = [], []
            for _ in range(10):
                opt.step(closure)
                rhos.append(opt.last_step.rho)
                norms.append(opt.last_step.grad_norm)
            return rhos, norms

        (rhos, norms), warned = _warned(run)
        with torch.no_grad():
            loss = float(F.cross_entropy(model(X), y))
        print(
            f"clip {bound}: loss after 10 steps {loss:.4f}, grad_norm seen step 0 "
            f"{norms[0]:.3g}, rho {[round(r, 2) for r in rhos[:5]]}, warned: "
            f"{[w for w in warned if 'gradient' in w][:1]}"
        )


def part_compile() -> None:
    X, y = _classes()
    finals = {}
    for how in ("plain", "compiled"):
        model = _mlp()
        opt = HessianFree(model.parameters())

        def closure(model=model):
            out = model(X)
            return F.cross_entropy(out, y), out

        def train_step(opt=opt, closure=closure):
            opt.step(closure)

        fn = torch.compile(train_step, backend="eager") if how == "compiled" else train_step
        t = time.perf_counter()
        try:
            _, warned = _warned(lambda fn=fn: [fn() for _ in range(3)])
            finals[how] = _flat(model)
            print(f"compile {how}: ok in {time.perf_counter() - t:.1f} s, warnings {warned[:2]}")
        except Exception as err:  # noqa: BLE001 - a probe: report what torch raised
            print(f"compile {how}: {type(err).__name__}: {str(err)[:300]}")
            traceback.print_exc(limit=-3)
    if len(finals) == 2:
        print(f"compile: max |diff| {float((finals['plain'] - finals['compiled']).abs().max())}")


def part_dtype() -> None:
    X, y = _classes()
    for style in ("loss_outputs", "lbfgs"):
        model = _mlp()
        opt = HessianFree(model.parameters())

        def closure(model=model, opt=opt, style=style):
            out = model(X.to(next(model.parameters()).dtype))
            loss = F.cross_entropy(out, y)
            if style == "lbfgs":
                opt.zero_grad()
                loss.backward()
                return loss
            return loss, out

        try:
            for _ in range(2):
                opt.step(closure)
            model.double()
            for _ in range(2):
                opt.step(closure)
            print(
                f"dtype {style}: after .double() status {opt.last_step.status}, loss "
                f"{opt.last_step.loss:.4f}, parameters {next(model.parameters()).dtype}"
            )
        except Exception as err:  # noqa: BLE001 - a probe
            print(f"dtype {style}: {type(err).__name__}: {str(err)[:300]}")


def part_leftover() -> None:
    X, y = _classes()
    finals = {}
    cases = (("inside", 3), ("outside", 3), ("outside", 1), ("nowhere", 1))
    for how, max_iter in cases:
        model = _mlp()
        opt = HessianFree(model.parameters(), max_iter=max_iter)

        def closure(model=model, opt=opt, how=how):
            if how == "inside":
                opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss

        try:
            for _ in range(10 if max_iter == 1 else 3):
                if how == "outside":
                    opt.zero_grad()
                opt.step(closure)
        except ValueError as err:
            print(f"leftover {how}, max_iter={max_iter}: ValueError: {str(err)[:150]}")
            continue
        with torch.no_grad():
            loss = float(F.cross_entropy(model(X), y))
        finals[how, max_iter] = _flat(model)
        print(f"leftover {how}, max_iter={max_iter}: loss after 9-10 steps {loss:.4f}")


def part_layout() -> None:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    for precond in ("auto", hessfree.KFACPreconditioner, None):
        finals = {}
        for fmt in ("contiguous", "channels_last"):
            torch.manual_seed(2)
            model = nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(6, 4, 3),
                nn.Tanh(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 4),
            )
            x = X
            if fmt == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                x = X.to(memory_format=torch.channels_last)
            pc = precond(model, include_conv=True) if callable(precond) else precond
            opt = HessianFree(model.parameters(), precond=pc)

            def closure(model=model, x=x):
                out = model(x)
                return F.cross_entropy(out, y), out

            try:
                for _ in range(3):
                    opt.step(closure)
                finals[fmt] = _flat(model)
            except Exception as err:  # noqa: BLE001 - a probe
                print(f"layout {precond} {fmt}: {type(err).__name__}: {str(err)[:200]}")
        if len(finals) == 2:
            d = float((finals["contiguous"] - finals["channels_last"]).abs().max())
            print(f"layout precond={getattr(precond, '__name__', precond)}: max |diff| {d:.3g}")


PARTS = {
    "bn": part_bn,
    "clip": part_clip,
    "compile": part_compile,
    "dtype": part_dtype,
    "leftover": part_leftover,
    "layout": part_layout,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    print(f"hessfree from {hessfree.__file__}")
    for name in names:
        t = time.process_time()
        PARTS[name]()
        print(f"  ({name}: {time.process_time() - t:.1f} s CPU)")
