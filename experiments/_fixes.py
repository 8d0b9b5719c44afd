"""Defects noticed in earlier sessions and left: reproductions, and two per-call costs (fixes).

``repro``: each reported situation on whatever ``hessfree`` is on ``PYTHONPATH`` (run it with
main's package and with the branch's to get the before/after tables):

1. ``JacobianLinearOperator`` given a list of batches, an ``(inputs, targets)`` pair, a
   ``DataLoader`` or a numpy array: the error's advice.
2. ``precond='auto'``/``'kfac'`` with one ``nn.Linear``'s bias frozen (from the start, and
   mid-training), or its weight frozen with the bias trained: which layers K-FAC covers, and
   what is said.
3. ``hessfree run`` killed between making the run directory and writing ``config.yaml``
   (simulated by an interrupt inside the write): what is left, and what a new run and
   ``--resume`` then say.
4. ``curvature='fisher'`` with class weights / ``ignore_index`` / ``pos_weight``, ``'mean'``
   and ``'sum'``: the optimizer's curvature (read through a ``needs_outputs = False``
   preconditioner's ``PrecondContext.curvature``) against the dense float64 empirical Fisher
   with the loss's own weighting, :math:`\\tfrac1N \\sum_i g_i g_i^\\top`.

``cost``: (5) what ``twice_differentiable_attention`` (entered on every closure call) and
``_LinearPass._hook``'s scan of non-Linear modules (every module call of a K-FAC-recording
closure call) cost on a small MLP's mini-batch step. Micro-benchmarks of each piece, then steps
of ``HessianFree(params)`` (K-FAC via ``precond='auto'``) interleaved in one process from the
same weights and batches: as is, with the attention guard replaced by ``nullcontext`` (the
most any change to the guard could save) and with the hook's scan reading
``module._parameters`` (empty for most non-Linear modules) instead of
``parameters(recurse=False)``. CPU time (``time.process_time``) and wall time per step,
median over rounds of per-round ratios, load averages at start and end; final parameters
compared bitwise.

    export OPENBLAS_NUM_THREADS=1
    PYTHONPATH=. python3 experiments/_fixes.py repro
    PYTHONPATH=. python3 experiments/_fixes.py cost [--rounds 9 --steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import timeit
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessfree

torch.set_num_threads(1)


def _say(label: str, fn) -> None:
    """Print what ``fn()`` returns, or the exception it raises (type and message)."""
    try:
        out = fn()
        print(f"- {label}: OK {out if out is not None else ''}")
    except Exception as err:  # noqa: BLE001 -- a reproduction reports whatever is raised
        print(f"- {label}: {type(err).__name__}: {err}")


# ------------------------------------------------------------------------------- repro
def repro_jacobian() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    print("\n## 1. JacobianLinearOperator given batches\n")
    torch.manual_seed(0)
    m = nn.Linear(2, 1).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    cases = {
        "a list of two input batches": [x[:2], x[2:]],
        "a list of one (inputs, targets) pair": [(x, x[:, :1])],
        "a DataLoader": DataLoader(TensorDataset(x, x[:, :1]), batch_size=2),
        "a numpy array": x.numpy(),
    }
    for label, inputs in cases.items():
        _say(label, lambda inputs=inputs: hessfree.JacobianLinearOperator(m, inputs).shape)


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def repro_frozen() -> None:
    print("\n## 2. K-FAC with a frozen bias or weight\n")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)

    def closure_of(model):
        def closure():
            out = model(x)
            return F.mse_loss(out, y), out

        return closure

    def run(precond, freeze_before=None, freeze_after=None, save=False):
        # the middle layer's weight is 120 of the 189 trained entries once its bias is frozen
        model = _mlp([3, 2, 60, 1], seed=2)
        if freeze_before:
            freeze_before(model)
        opt = hessfree.HessianFree(model.parameters(), precond=precond)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(4):
                if k == 2 and freeze_after:
                    freeze_after(model)
                    if save:  # a checkpoint between the freeze and the next step
                        opt.state_dict()
                opt.step(closure_of(model))
        kfac = opt._auto_precond if precond == "auto" else opt.precond
        layers = getattr(kfac, "layers", None)
        said = "; ".join(str(w.message)[:300] for w in caught) or "nothing"
        desc = (
            "K-FAC off"
            if layers is None
            else ", ".join(
                f"{m.in_features}->{m.out_features} bias={m.bias is not None}" for m in layers
            )
        )
        return f"layers: {desc}; warnings: {said}"

    def bias(model):
        model[2].bias.requires_grad_(False)

    def weight(model):
        model[2].weight.requires_grad_(False)

    for precond in ("auto", "kfac"):
        _say(f"{precond}, nothing frozen", lambda p=precond: run(p))
        _say(f"{precond}, middle bias frozen from the start", lambda p=precond: run(p, bias))
        _say(f"{precond}, middle bias frozen after 2 steps", lambda p=precond: run(p, None, bias))
        _say(
            f"{precond}, middle bias frozen after 2 steps, then state_dict()",
            lambda p=precond: run(p, None, bias, save=True),
        )
        _say(f"{precond}, middle weight frozen from the start", lambda p=precond: run(p, weight))
    model = _mlp([3, 2, 60, 1], seed=2)
    bias(model)
    kfac = hessfree.KFACPreconditioner(model)
    opt = hessfree.HessianFree(model.parameters(), precond=kfac)
    _say("KFACPreconditioner(model), middle bias frozen", lambda: opt.step(closure_of(model)))


def repro_rundir() -> None:
    import yaml

    import hessfree.train.rundir as rundir
    from hessfree.train.cli import main

    print("\n## 3. hessfree run killed between making the run directory and config.yaml\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "tiny.yaml"
        raw = {
            "name": "tiny",
            "num_threads": 1,
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden_sizes": [4]},
            "optimizers": [{"name": "adam", "lr": 0.01}],
            "budget": {"steps": 2},
            "output": {"plots": False, "dir": str(tmp / "runs")},
        }
        config.write_text(yaml.safe_dump(raw))
        out = tmp / "runs" / "r"
        real = rundir.write_text_atomic

        def killed(path, text):
            raise KeyboardInterrupt

        rundir.write_text_atomic = killed
        try:
            with contextlib.redirect_stderr(sys.stdout):
                code = main(["run", str(config), "--quiet", "--out", str(out)])
        finally:
            rundir.write_text_atomic = real
        left = sorted(str(p.relative_to(tmp)) for p in (tmp / "runs").rglob("*"))
        print(f"- interrupted creation: exit {code}; left under {tmp.name}/: {left}")
        for label, argv in (
            ("a new run, the same --out", ["run", str(config), "--quiet", "--out", str(out)]),
            ("--resume DIR", ["run", "--resume", str(out), "--quiet"]),
        ):
            with contextlib.redirect_stderr(sys.stdout):
                print(f"- {label}:", end=" ")
                code = main(argv)
            print(f"  (exit {code})")


def _fisher_case(kind: str, reduction: str) -> tuple[float, float]:
    """The optimizer's Fisher against the oracle: (max relative error, median entry ratio)."""
    from torch.func import functional_call

    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -1, 1, 0, -1, 2])
    w = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    probs = torch.rand(8, 3, generator=g, dtype=torch.float64)
    model = _mlp([3, 4, 3], seed=22)
    mean = reduction == "mean"
    if kind.startswith("CE"):
        weight = w if "weight" in kind else None
        loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-1, reduction=reduction)
        y = labels
        kept = labels != -1
        total = (weight[labels[kept]] if weight is not None else kept.double()).sum()

        def losses(out):  # L_i = N w_i l_i / W for 'mean'
            per = F.cross_entropy(out, labels, weight=weight, ignore_index=-1, reduction="none")
            return per * 8 / total if mean else per

    else:
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=w, reduction=reduction)
        y = probs

        def losses(out):  # 'mean': over the example's 3 entries too
            per = F.binary_cross_entropy_with_logits(out, probs, pos_weight=w, reduction="none")
            return per.sum(1) / (3 if mean else 1)

    names = [k for k, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    n = sum(sizes)

    def per_example(flat):
        chunks = [c.view_as(p) for c, p in zip(flat.split(sizes), params, strict=True)]
        return losses(functional_call(model, dict(zip(names, chunks, strict=True)), (x,)))

    flat0 = torch.cat([p.reshape(-1) for p in params])
    J = torch.autograd.functional.jacobian(per_example, flat0)
    oracle = J.T @ J / (8 if mean else 1)

    class Capture:
        needs_outputs = False
        C = None

        def __call__(self, ctx):
            if self.C is None:
                self.C = ctx.curvature(torch.eye(n, dtype=torch.float64))

    cap = Capture()
    opt = hessfree.HessianFree(model.parameters(), curvature="fisher", precond=cap)

    def closure():
        out = model(x)
        return loss_fn(out, y), out

    opt.step(closure)
    err = float((cap.C - oracle).abs().max() / oracle.abs().max())
    nz = oracle.abs() > 1e-8 * oracle.abs().max()
    return err, float((cap.C[nz] / oracle[nz]).median())


def repro_fisher() -> None:
    print("\n## 4. curvature='fisher' with weighted losses: optimizer vs dense oracle\n")
    print("| loss | reduction | max rel. error | ratio C / oracle (median entry) |")
    print("|---|---|---|---|")
    for kind in ("CE weight+ignore_index", "CE ignore_index", "BCE-logits pos_weight"):
        for reduction in ("mean", "sum"):
            err, ratio = _fisher_case(kind, reduction)
            print(f"| {kind} | {reduction} | {err:.1e} | {ratio:.3f} |")


# ------------------------------------------------------------------------------- cost
def _lean_hook(self, module, args, output):
    """``_LinearPass._hook`` with the non-Linear scan over ``module._parameters`` (the same
    tensors as ``parameters(recurse=False)``, without building a generator of named members)."""
    if not isinstance(module, nn.Linear):
        own = module._parameters
        if own and torch.is_grad_enabled():
            for p in own.values():
                if p is not None and id(p) in self.param_ids:
                    self.elsewhere.add(id(p))
        return
    return _ORIGINAL_HOOK(self, module, args, output)


from hessfree.preconditioning import _LinearPass  # noqa: E402

_ORIGINAL_HOOK = _LinearPass._hook


def _micro() -> None:
    import hessfree.optimizer as hf_opt
    from hessfree._graph_ops import twice_differentiable_attention

    print("\n### micro-benchmarks (us per call, best of 5 repeats)\n")
    n = 20000

    def best(stmt, number=n):
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6

    def guard():
        with twice_differentiable_attention():
            pass

    def null():
        with contextlib.nullcontext():
            pass

    print(
        f"- enter+exit twice_differentiable_attention: {best(guard):.2f} us; "
        f"nullcontext: {best(null):.2f} us"
    )
    model = _mlp([40, 256, 256, 10])
    x = torch.randn(250, 40, dtype=torch.float64)
    params = list(model.parameters())

    def forward_with(hook):
        _LinearPass._hook = hook
        rec = _LinearPass(params)
        with rec.recording():
            model(x)

    def forward_plain():
        with torch.enable_grad():
            model(x)

    rec = _LinearPass(params)
    act, seq = model[1], model
    out = model(x)
    for label, module in (("Tanh", act), ("Sequential", seq)):
        t_orig = best(lambda m=module: _ORIGINAL_HOOK(rec, m, (x,), out))
        t_lean = best(lambda m=module: _lean_hook(rec, m, (x,), out))
        print(f"- _LinearPass._hook on a {label}: as is {t_orig:.2f} us, lean scan {t_lean:.2f} us")
    k = 300
    plain = best(forward_plain, k)
    orig = best(lambda: forward_with(_ORIGINAL_HOOK), k)
    lean = best(lambda: forward_with(_lean_hook), k)
    _LinearPass._hook = _ORIGINAL_HOOK
    print(
        f"- MLP 40-256-256-10 forward, batch 250 (6 module calls): plain {plain:.1f} us, "
        f"recorded (hook as is) {orig:.1f} us, recorded (lean scan) {lean:.1f} us"
    )
    del hf_opt


def _cost(rounds: int, steps: int, widths: list[int], batch: int) -> None:
    import hessfree.optimizer as hf_opt

    load0 = os.getloadavg()
    print(f"\nload average at start: {load0}")
    g = torch.Generator().manual_seed(3)
    X = torch.randn(4000, widths[0], generator=g)
    Y = torch.randint(0, widths[-1], (4000,), generator=g)
    base_model = _mlp(widths, seed=4).float()
    start = copy.deepcopy(base_model.state_dict())
    batches = [torch.randint(0, 4000, (batch,), generator=g) for _ in range(2 + steps)]
    calls = []
    original_guard = hf_opt.twice_differentiable_attention
    variants = {
        "as is": (original_guard, _ORIGINAL_HOOK),
        "as is (A/A copy)": (original_guard, _ORIGINAL_HOOK),
        "no attention guard": (contextlib.nullcontext, _ORIGINAL_HOOK),
        "lean hook scan": (original_guard, _lean_hook),
    }
    cpu = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    finals = {}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            guard, hook = variants[name]
            hf_opt.twice_differentiable_attention, _LinearPass._hook = guard, hook
            model = copy.deepcopy(base_model)
            model.load_state_dict(start)
            opt = hessfree.HessianFree(model.parameters())
            c0 = w0 = 0.0
            for k, idx in enumerate(batches):
                if k == 2:  # two warm-up steps, then the timed ones
                    c0, w0 = time.process_time(), time.perf_counter()
                xb, yb = X[idx], Y[idx]

                def closure(xb=xb, yb=yb, model=model):
                    out = model(xb)
                    return F.cross_entropy(out, yb), out

                opt.step(closure)
                if k >= 2 and name == "as is" and r == 0:
                    calls.append(opt.last_step.closure_calls)
            cpu[name].append((time.process_time() - c0) / steps * 1e3)
            wall[name].append((time.perf_counter() - w0) / steps * 1e3)
            finals.setdefault(name, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    hf_opt.twice_differentiable_attention, _LinearPass._hook = original_guard, _ORIGINAL_HOOK
    load1 = os.getloadavg()
    arch = "-".join(map(str, widths))
    print(
        f"\n### steps: HessianFree(params), MLP {arch} float32, batch {batch}, "
        f"{rounds} rounds x {steps} steps; closure calls a step: {calls}\n"
    )
    print(
        "| variant | CPU ms/step (median) | wall ms/step (median) | CPU ratio to 'as is' "
        "(median of rounds) | wall ratio | final parameters |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        rc = statistics.median(a / b for a, b in zip(cpu[name], cpu["as is"], strict=True))
        rw = statistics.median(a / b for a, b in zip(wall[name], wall["as is"], strict=True))
        same = "bitwise = 'as is'" if torch.equal(finals[name], finals["as is"]) else "DIFFER"
        print(
            f"| {name} | {statistics.median(cpu[name]):.2f} | {statistics.median(wall[name]):.2f} "
            f"| {rc:.3f} | {rw:.3f} | {same} |"
        )
    print(f"\nload average at end: {load1}")
    print("per-round CPU ms/step:", {k: [round(v, 2) for v in vs] for k, vs in cpu.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["repro", "cost"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    print(
        "hessfree from", hessfree.__file__, "| torch", torch.__version__, "| numpy", np.__version__
    )
    if args.what == "repro":
        repro_jacobian()
        repro_frozen()
        repro_rundir()
        repro_fisher()
    else:
        _micro()
        _cost(args.rounds, args.steps, [40, 256, 256, 10], 250)  # the scorecard's MNIST-1D MLP
        _cost(args.rounds, args.steps, [10, 32, 2], 32)  # a tiny one: the glue's largest share


if __name__ == "__main__":
    main()
