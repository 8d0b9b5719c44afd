"""Worker for tests/test_distributed.py: one rank of a data-parallel HF run (gloo, loopback).

Usage: python _dist_worker.py RANK WORLD INIT_FILE OUT_FILE STEPS
[crash|operator|replicated|somedraw|mcfisher|weighted|growing|separate]
With WORLD=1 it runs the single-process reference on the full batch. ``operator`` computes
SciPy-operator products over the rank's shard instead of training. ``replicated`` gives every
rank the same curvature batch (the first 40 examples) with ``curvature_batch='replicated'`` and
records the all_reduce calls of each step. ``somedraw``: rank 0's closure draws a random number
(adding 0 × it to the loss), the other ranks' do not. ``mcfisher``: ``curvature='fisher_mc'`` on
sharded batches; each rank saves (to OUT_FILE.RANK) its parameters and, per step, the state of
the generator its Monte-Carlo labels were drawn from. ``weighted``: unequal shards (1 and 63
of the 64 examples), trained once with ``process_group=Averager(weight=shard size)`` ("final")
and once, from the same start, with the plain mean over the ranks ("unweighted").
``growing``: a new batch each step whose size changes (24-64 of the 64 examples), split
unevenly between the two ranks (rank 0's share changes too), with the default ``'auto'`` λ
floor, which moves with the global batch b ((b₀ / b)^1.5 above b₀, b₀ / b below); the single
process takes the ranks' mean of their shard means on the whole batch. Every rank saves its
floors (OUT_FILE.RANK).
``separate``: each rank its own model (seed 1 + rank) on its shard; a step with the default
group must refuse (the message is saved), then each rank trains alone in its own group from
``new_subgroups(group_size=1)``.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import traceback
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hessfree import EmpiricalFisherDiagonal, FisherLinearOperator, GGNLinearOperator, HessianFree


def main() -> None:
    rank, world, init_file, out_file, steps = sys.argv[1:6]
    rank, world, steps = int(rank), int(world), int(steps)
    mode = sys.argv[6] if len(sys.argv) > 6 else ""
    torch.set_num_threads(1)
    if world == 1:
        work(rank, world, out_file, steps, mode)
        return
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        # generous: the rendezvous waits for the slowest rank to import torch and start, which
        # on a loaded 2-core machine can take many seconds; a dead peer is still noticed at
        # once (its connection closes), so the crash test does not wait for this
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        work(rank, world, out_file, steps, mode)
    except BaseException:
        # A peer died (the crash test): destroying the group or gloo's teardown at exit could
        # wait on the dead peer, so report and leave at once, skipping both.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Ranks that reach gloo's teardown at interpreter exit at different times (rank 0 is
    # still writing its result) may abort with "terminate called without an active
    # exception": meet first, then leave the group.
    world_group = weakref.ref(dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    if world_group() is not None:
        # torch keeps the group (the first optimizer imported torch._dynamo while it existed):
        # destroyed during interpreter finalisation, gloo can abort ("terminate called without
        # an active exception"), so leave without that teardown, as the CLI does
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _mc_fisher(model, X, y, rank: int, world: int, v):
    """The Monte-Carlo Fisher of a mean with ignored targets (unequal shares per rank), each
    rank's labels drawn from its own seed: on two ranks the operator; in one process, the same
    draws made shard by shard and weighted by each shard's share of the mean by hand."""
    import torch.nn.functional as F

    from hessfree import MCFisherLinearOperator, MCFisherProduct
    from hessfree.operators import _batch_seed

    loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    if world == 2:
        shard = slice(rank * 32, (rank + 1) * 32)
        return MCFisherLinearOperator(model, loss_fn, (X[shard], y[shard]), seed=5) @ v
    total, kept = 0, float((y != 1).sum())
    for r in range(2):
        xs, ys = X[r * 32 : (r + 1) * 32], y[r * 32 : (r + 1) * 32]
        out = model(xs)
        gen = torch.Generator().manual_seed(_batch_seed(5, 0, r))
        P = MCFisherProduct(
            F.cross_entropy(out, ys, ignore_index=1), out, list(model.parameters()), generator=gen
        )
        total = total + float((ys != 1).sum()) / kept * P(torch.from_numpy(v)).numpy()
    return total


def _mc_fisher_steps(model, Xs, ys, rank: int, out_file: str, steps: int) -> None:
    """HF with the Monte-Carlo Fisher on this rank's shard, recording the generator state each
    step's labels start from (the product is built once per step)."""
    import hessfree.optimizer as optimizer

    states = []
    built = optimizer.MCFisherProduct

    class Recorded(built):
        def __init__(self, *args, generator=None, **kwargs):
            states.append(generator.get_state().clone())
            super().__init__(*args, generator=generator, **kwargs)

    optimizer.MCFisherProduct = Recorded
    opt = HessianFree(model.parameters(), curvature="fisher_mc", seed=3, cg_max_iter=5)

    def closure():
        out = model(Xs)
        return F.cross_entropy(out, ys), out

    for _ in range(steps):
        opt.step(closure)
    final = [p.detach() for p in model.parameters()]
    torch.save({"final": final, "states": states}, f"{out_file}.{rank}")


def _weighted_steps(model, Xs, ys, rank: int, out_file: str, steps: int) -> None:
    """HF on this rank's shard with each rank weighted by its shard size, then from the same
    start with every rank weighted equally; rank 0 saves both results."""
    from hessfree.distributed import Averager

    start = [p.detach().clone() for p in model.parameters()]
    results = {}
    for key, group in (("final", Averager(weight=len(ys))), ("unweighted", None)):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.copy_(p0)
        opt = HessianFree(
            model.parameters(),
            damping=0.5,
            cg_max_iter=20,
            precond=EmpiricalFisherDiagonal(num_probes=None),  # exact: rank-independent
            process_group=group,
        )

        def closure():
            out = model(Xs)
            return F.cross_entropy(out, ys), out

        for _ in range(steps):
            opt.step(closure)
        results[key] = [p.detach().clone() for p in model.parameters()]
    results["mixed"] = ""
    if dist.is_initialized() and dist.get_world_size() > 1:  # rank 0 weighted, rank 1 not
        group = Averager(weight=len(ys)) if rank == 0 else None
        opt = HessianFree(model.parameters(), damping=0.5, process_group=group)
        try:
            opt.step(lambda: (F.cross_entropy(model(Xs), ys), model(Xs)))
        except ValueError as err:
            results["mixed"] = str(err)
        results["moved"] = any(
            not torch.equal(p, q)
            for p, q in zip(model.parameters(), results["unweighted"], strict=True)
        )
        results["settings"], results["resumed"] = _settings_and_resume(model, Xs, ys, rank)
    if rank == 0:
        torch.save(results, out_file)


def _growing_steps(model, X, y, rank: int, world: int, out_file: str, steps: int) -> None:
    """:func:`work`'s ``growing`` mode: the floor's b is the batch over all ranks."""
    sizes = [(32, 5), (32, 20), (48, 10), (40, 30), (64, 12), (24, 4)]  # (b, rank 0's cases)
    gen = torch.Generator().manual_seed(5)
    opt = HessianFree(model.parameters(), precond=None, cg_max_iter=10)
    floors, cases = [], []
    for s in range(steps):
        n, k = sizes[s % len(sizes)]
        idx = torch.randperm(64, generator=gen)[:n]
        Xb, yb = X[idx], y[idx]
        if world == 1:

            def closure(Xb=Xb, yb=yb, k=k):
                out = model(Xb)
                halves = F.cross_entropy(out[:k], yb[:k]) + F.cross_entropy(out[k:], yb[k:])
                return 0.5 * halves, out

        else:
            part = slice(0, k) if rank == 0 else slice(k, n)

            def closure(Xb=Xb[part], yb=yb[part]):
                out = model(Xb)
                return F.cross_entropy(out, yb), out

        opt.step(closure)
        floors.append(opt.last_step.damping_floor)
        state = opt._global_state()
        cases.append((state.get("floor_cases0", 0), state.get("floor_cases", 0)))
    final = [p.detach() for p in model.parameters()]
    torch.save({"final": final, "floors": floors, "cases": cases}, f"{out_file}.{rank}")


def _settings_and_resume(model, Xs, ys, rank: int) -> tuple[str, str]:
    """Two refusals at a first step, on both ranks: settings that differ across the ranks
    (another CG budget: before, the ranks' collectives went out of step, a hang until the
    group's timeout), and a resume where rank 1 loaded other parameters than rank 0 (before:
    only a state's step 0 was checked, so the ranks trained on mixed averages)."""

    def closure():
        out = model(Xs)
        return F.cross_entropy(out, ys), out

    messages = []
    opt = HessianFree(model.parameters(), damping=0.5, precond=None, cg_max_iter=20 + rank)
    try:
        opt.step(closure)
        messages.append("")
    except ValueError as err:
        messages.append(str(err))
    opt = HessianFree(model.parameters(), damping=0.5, precond=None, cg_max_iter=20)
    opt.step(closure)  # together: the ranks' parameters stay equal
    saved = opt.state_dict()
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # "another checkpoint"
    resumed = HessianFree(model.parameters(), damping=0.5, precond=None, cg_max_iter=20)
    resumed.load_state_dict(saved)
    try:
        resumed.step(closure)
        messages.append("")
    except ValueError as err:
        messages.append(str(err))
    twin = copy.deepcopy(model).to(torch.float32 if rank == 1 else torch.float64)

    def twin_closure():
        out = twin(Xs.to(next(twin.parameters()).dtype))
        return F.cross_entropy(out, ys), out

    try:  # a float32 rank beside a float64 one: named as such, not as "parameters differ"
        HessianFree(twin.parameters(), damping=0.5, precond=None).step(twin_closure)
        messages.append("")
    except ValueError as err:
        messages.append(str(err))
    return messages[0], messages[1] + "\n" + messages[2]


def _separate_steps(Xs, ys, rank: int, world: int, out_file: str, steps: int) -> None:
    """Rank r trains its own model (seed 1 + r): refused in the default group, then alone in
    its own one-rank group; rank 0 saves the refusal's message and its parameters."""
    torch.manual_seed(1 + rank)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def closure():
        out = model(Xs)
        return F.cross_entropy(out, ys), out

    message = ""
    own = None
    if world > 1:
        try:
            HessianFree(model.parameters(), damping=0.5, precond=None).step(closure)
        except ValueError as err:
            message = str(err)
        own, _ = dist.new_subgroups(group_size=1)
        rank0_only = dist.new_group(ranks=[0])  # every rank creates it; rank 1 is outside
        if rank == 1:
            try:
                HessianFree(model.parameters(), process_group=rank0_only)
                outside = "accepted"
            except ValueError as err:
                outside = str(err)
            with open(out_file + ".outside", "w") as f:
                f.write(outside)
    opt = HessianFree(model.parameters(), damping=0.5, precond=None, process_group=own)
    for _ in range(steps):
        opt.step(closure)
    if rank == 0:
        torch.save(
            {"message": message, "final": [p.detach() for p in model.parameters()]}, out_file
        )


def work(rank: int, world: int, out_file: str, steps: int, mode: str) -> None:
    crash = mode == "crash"
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    shard = slice(rank * 64 // world, (rank + 1) * 64 // world)
    if mode == "separate" and world == 1:
        shard = slice(0, 32)  # rank 0's shard of the two-rank run
    if mode == "weighted" and world == 2:
        shard = slice(0, 1) if rank == 0 else slice(1, 64)
    Xs, ys = X[shard], y[shard]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    if mode == "operator":
        import numpy as np

        v = np.random.default_rng(0).normal(size=sum(p.numel() for p in model.parameters()))
        loss_fn = nn.CrossEntropyLoss()
        one = GGNLinearOperator(model, loss_fn, (Xs, ys))
        # ragged batches on this rank: 10 + the rest
        many = FisherLinearOperator(model, loss_fn, [(Xs[:10], ys[:10]), (Xs[10:], ys[10:])])
        # batches and ranks holding unequal shares of the mean: the Fisher weighs them squared
        w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
        weighted = nn.CrossEntropyLoss(weight=w, ignore_index=1)
        shares = FisherLinearOperator(model, weighted, [(Xs[:10], ys[:10]), (Xs[10:], ys[10:])])
        result = {
            "ggn": one @ v,
            "grad": one.gradient(),
            "fisher": many @ v,
            "fgrad": many.gradient(),
            "fisher_weighted": shares @ v,
            "fisher_cached": FisherLinearOperator(model, weighted, (Xs, ys)) @ v,
            "mc_fisher": _mc_fisher(model, X, y, rank, world, v),
        }
        if rank == 0:
            torch.save({k: torch.from_numpy(np.asarray(a)) for k, a in result.items()}, out_file)
        return
    if mode == "mcfisher":
        _mc_fisher_steps(model, Xs, ys, rank, out_file, steps)
        return
    if mode == "weighted":
        _weighted_steps(model, Xs, ys, rank, out_file, steps)
        return
    if mode == "growing":
        _growing_steps(model, X, y, rank, world, out_file, steps)
        return
    if mode == "separate":
        _separate_steps(Xs, ys, rank, world, out_file, steps)
        return
    replicated = mode == "replicated"
    opt = HessianFree(
        model.parameters(),
        damping=0.5,
        cg_max_iter=20,
        cg_rtol=1e-10,  # several products per CG run: the tests count collectives per product
        precond=EmpiricalFisherDiagonal(num_probes=None),
        curvature_batch="replicated" if replicated else "sharded",
    )  # exact: rank-independent
    calls = [0]
    reduces = [0]
    if replicated and world > 1:
        all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            reduces[0] += 1
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counted

    def closure():
        calls[0] += 1
        if crash and rank == 1 and calls[0] == 3:
            os._exit(3)  # die mid-step, between collectives
        out = model(Xs)
        loss = F.cross_entropy(out, ys)
        if mode == "somedraw" and rank == 0:
            loss = loss + 0.0 * torch.rand((), dtype=loss.dtype)  # draws; the value is exact
        return loss, out

    def curvature_closure():
        out = model(X[:40])
        return F.cross_entropy(out, y[:40]), out

    per_step = []
    for _ in range(steps):
        before = reduces[0]
        opt.step(closure, curvature_closure if replicated else None)
        info = opt.last_step
        per_step.append((reduces[0] - before, info.closure_calls, info.cg_matvecs))
    if rank == 0:
        torch.manual_seed(1)
        init = [
            p.detach()
            for p in nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
            .double()
            .parameters()
        ]
        torch.save(
            {"final": [p.detach() for p in model.parameters()], "init": init, "steps": per_step},
            out_file,
        )


if __name__ == "__main__":
    main()
