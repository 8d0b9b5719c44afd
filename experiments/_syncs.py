"""Host reads (device syncs) of a HessianFree step, counted by call site (topic "syncs").

On a GPU every Python-level read of a tensor's value waits for the device queue to drain; on
CPU it is free, so the reads are counted, not timed. Three problems, 20 steps each:

- ``mlp``: a full-batch ``(loss, outputs)`` closure, a digits-like 64-32-10 tanh MLP, float32;
- ``lbfgs``: an LBFGS-style closure (``backward()`` inside) with the exact Hessian and the trust
  radius, a small float64 tanh regression;
- ``minibatch``: a cross-entropy classifier on mini-batches of 128 with a ``curvature_closure``
  on a quarter of each batch.

    python experiments/_syncs.py [--steps 20] [--records FILE.json]

Prints, per problem, the reads a step by site (file:line function, the innermost frame outside
torch) and the mean per step; ``--records`` saves every StepInfo field of every step (the
before/after comparison of the topic: ``last_step`` must be identical).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hessfree  # noqa: E402

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")
_TORCH = str(Path(torch.__file__).parent)
_ROOT = str(Path(hessfree.__file__).parent.parent)


class SiteCounter:
    """Wraps the Tensor methods that read values and records the caller's file:line."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self.active = False
        self._saved: dict[str, object] = {}

    def _site(self) -> str:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
            frame = frame.f_back
        if frame is None:
            return "?"
        name = os.path.relpath(frame.f_code.co_filename, _ROOT)
        return f"{name}:{frame.f_lineno} {frame.f_code.co_name}"

    def __enter__(self) -> SiteCounter:
        for name in _READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *args, _original=original, **kwargs):
                if self.active:
                    self.sites[self._site()] += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _mlp(counter: SiteCounter, steps: int) -> list[hessfree.StepInfo]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = hessfree.HessianFree(model.parameters(), cg_max_iter=20)

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    return _run(counter, steps, opt, lambda: opt.step(closure))


def _lbfgs(counter: SiteCounter, steps: int) -> list[hessfree.StepInfo]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = hessfree.HessianFree(model.parameters(), curvature="hessian", trust_radius="auto")

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return _run(counter, steps, opt, lambda: opt.step(closure))


def _minibatch(counter: SiteCounter, steps: int) -> list[hessfree.StepInfo]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 20, generator=gen)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = hessfree.HessianFree(model.parameters(), cg_max_iter=30)
    order = torch.randperm(2048, generator=gen)
    batch = {"i": 0}

    def step():
        i = batch["i"] % 16
        batch["i"] += 1
        idx = order[128 * i : 128 * (i + 1)]
        xb, yb = x[idx], y[idx]

        def closure():
            out = model(xb)
            return F.cross_entropy(out, yb), out

        def curvature_closure():
            out = model(xb[:32])
            return F.cross_entropy(out, yb[:32]), out

        opt.step(closure, curvature_closure)

    return _run(counter, steps, opt, step, model)


def _run(counter, steps, opt, step, model=None) -> list[hessfree.StepInfo]:
    infos = []
    for _ in range(steps):
        counter.active = True
        try:
            step()
        finally:
            counter.active = False
        infos.append(opt.last_step)
    params = [p for g in opt.param_groups for p in g["params"]]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params))
    print(f"  parameter hash {digest.hexdigest()[:8]}")
    return infos


def _record(info: hessfree.StepInfo) -> dict:
    out = {}
    for key, value in vars(info).items() if hasattr(info, "__dict__") else info._asdict().items():
        if key.startswith("time"):
            continue  # wall-clock fields differ run to run
        out[key] = repr(value)
    return out


PROBLEMS = {"mlp": _mlp, "lbfgs": _lbfgs, "minibatch": _minibatch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--records", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = {}
    for name, build in PROBLEMS.items():
        with SiteCounter() as counter:
            print(f"## {name}")
            infos = build(counter, args.steps)
        total = sum(counter.sites.values())
        statuses = collections.Counter(i.status.value for i in infos)
        calls = sum(i.closure_calls for i in infos)
        iters = sum(i.cg_iters for i in infos)
        print(
            f"  {total} reads in {args.steps} steps: {total / args.steps:.2f} a step; "
            f"closure calls {calls / args.steps:.2f}, CG iterations {iters / args.steps:.2f} a "
            f"step; statuses {dict(statuses)}"
        )
        for site, n in sorted(counter.sites.items(), key=lambda kv: -kv[1]):
            print(f"  {n / args.steps:6.2f}  {site}")
        records[name] = [_record(i) for i in infos]
    if args.records:
        Path(args.records).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
