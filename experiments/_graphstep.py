"""A whole Hessian-free step without host reads, for one CUDA graph: does HF escape the launches?

Stop 45's GPU check (H200, ``results/2026-12-04-nvidia-h200-gpu-check.md``) found the library's
HF step launch-bound: on CURVES a step took 65-105 ms (curvature batch 5,000) while a
Gauss-Newton product replayed from a CUDA graph took 0.6-1.4 ms, and Adam's step ~3.4 ms at any
batch, so Adam took 8,700 steps in 30 s to HF's 230-610 and won 2.06x. On a CPU the same HF
regime beats tuned Adam (run27, CURVES 0.94x): per step it makes up for its cost. Counted on
a CPU (``count_ops``), the library's step makes ~3,200 non-view ATen calls (800 with
``precond=None``), K-FAC's apply ~265 per CG iteration, plus host reads between them; each is a
launch on the GPU.

This is the question's smallest test, outside the library: one step of HF as the references
describe it (Martens 2010; K-FAC preconditioning as Martens & Grosse 2015), written so that
every decision is a tensor operation — a fixed number of preconditioned CG iterations, the
reduction ratio and the accept/reject of the step by ``torch.where``, Levenberg-Marquardt's
damping update on a device scalar — so the whole step (forward, gradient, curvature graph,
CG, trial, update) can be recorded once in a CUDA graph and replayed with the next batch
copied into static buffers. K-FAC's factors are refreshed eagerly every ``refresh`` steps
(an eigendecomposition) and copied into the buffers the graph reads.

Simplifications against the library (so its results are an upper bound on what a captured
library step could gain, not a replacement): no backtracking over CG iterates and no line
search (a rejected step raises λ), no CG stopping test (``cg_iters`` always), the last CG
iterate as the next warm start (decay ``cg_decay``), a loss whose Hessian with respect to the
outputs is given in closed form (``BCE`` with logits, summed over pixels, mean over cases).

Run on a lent GPU (about 3 minutes)::

    PYTHONPATH=$PWD python3 experiments/_graphstep.py --device cuda --out $OUT

It times a step eager and replayed, and races CURVES (20,000 images) at equal wall-clock from
the same weights: the graphed step in two regimes, the library's HF defaults, and Adam at the
best settings of stop 45's sweep. On a CPU (``--device cpu --quick``) the same code runs on
small sizes; there the graph falls back to eager and the times mean nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import md_table, sync  # noqa: E402


def bce_loss(z: Tensor, t: Tensor) -> Tensor:
    """BCE with logits summed over outputs, mean over cases (Martens 2010's autoencoders)."""
    return nn.functional.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]


def bce_loss_hessian(z: Tensor, w: Tensor) -> Tensor:
    """``H_ℓ w`` for :func:`bce_loss` at logits ``z``: diagonal ``σ(z)(1 − σ(z)) / cases``."""
    s = torch.sigmoid(z)
    return s * (1 - s) * w / z.shape[0]


class GraphHF:
    """HF steps whose every decision stays on the device; see the module docstring.

    Args:
        model: A network whose trained parameters all belong to ``nn.Linear`` layers (K-FAC).
        x, t: The training inputs and targets (on the model's device).
        batch, curvature_batch: Cases per gradient and per curvature batch (a random subset
            each step, drawn on the host from a seeded generator, like the scorecard's runs).
        cg_iters: CG iterations per step (all of them: there is no stopping test).
        refresh: Steps between K-FAC refreshes; ``0`` for no preconditioner.
        damping: Initial λ; ``None``: ``gᵀGg / gᵀg`` at the first step (one host read).
        cuda_graph: Capture the step on a CUDA device (ignored elsewhere).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        t: Tensor,
        *,
        batch: int,
        curvature_batch: int,
        cg_iters: int = 3,
        refresh: int = 10,
        damping: float | None = None,
        cg_decay: float = 0.95,
        kfac_floor: float = 1e-4,
        cuda_graph: bool = True,
        loss: Callable[[Tensor, Tensor], Tensor] = bce_loss,
        loss_hessian: Callable[[Tensor, Tensor], Tensor] = bce_loss_hessian,
        seed: int = 0,
    ) -> None:
        self.model, self.x, self.t = model, x, t
        self.loss, self.loss_hessian = loss, loss_hessian
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.params = [p for m in self.layers for p in (m.weight, m.bias)]
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        if trained != {id(p) for p in self.params}:
            raise ValueError("GraphHF: every trained parameter must be an nn.Linear's weight/bias")
        self.cg_iters, self.refresh, self.cg_decay = cg_iters, refresh, cg_decay
        self.kfac_floor = kfac_floor
        dev, dt = x.device, self.params[0].dtype
        self.device = dev
        n = sum(p.numel() for p in self.params)
        self.sizes = [p.numel() for p in self.params]
        self.x0 = torch.zeros(n, device=dev, dtype=dt)  # CG's warm start
        self.lam = torch.tensor(math.nan if damping is None else damping, device=dev, dtype=dt)
        self.rho = torch.tensor(math.nan, device=dev, dtype=dt)
        self.accepted = torch.zeros((), device=dev, dtype=torch.bool)
        self.f0 = torch.tensor(math.nan, device=dev, dtype=dt)
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.curvature_batch = batch, curvature_batch
        self.xb = x[:batch].clone()
        self.tb = t[:batch].clone()
        self.xc = x[:curvature_batch].clone()
        self.tc = t[:curvature_batch].clone()
        # K-FAC eigenbases (static: the graph reads them; a refresh copies into them)
        self.eig = None
        if refresh:
            self.eig = [
                (
                    torch.eye(m.in_features + 1, device=dev, dtype=dt),
                    torch.ones(m.in_features + 1, device=dev, dtype=dt),
                    torch.eye(m.out_features, device=dev, dtype=dt),
                    torch.ones(m.out_features, device=dev, dtype=dt),
                )
                for m in self.layers
            ]
        self.steps = 0
        self.cuda_graph = cuda_graph and dev.type == "cuda" and torch.cuda.is_available()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.mode = "eager"

    # ----------------------------------------------------------------------------- pieces
    def _flat(self, ts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def _views(self, v: Tensor) -> list[Tensor]:
        return [c.view_as(p) for c, p in zip(v.split(self.sizes), self.params, strict=True)]

    def gn_product(self, z: Tensor, v: Tensor, u: Tensor, jt: tuple[Tensor, ...]) -> Tensor:
        """``G v = Jᵀ H_ℓ J v``: ``J v`` as the derivative of ``Jᵀu`` along ``v`` (``jt`` is
        ``Jᵀu`` built with ``create_graph``), then one backward pass."""
        jv = torch.autograd.grad(jt, u, self._views(v), retain_graph=True)[0]
        w = self.loss_hessian(z.detach(), jv)
        return self._flat(torch.autograd.grad(z, self.params, w, retain_graph=True))

    def precondition(self, r: Tensor, mu: Tensor) -> Tensor:
        """``(A ⊗ G + μ I)⁻¹ r`` per layer, ``[W b]`` as one ``(out, in + 1)`` block."""
        if self.eig is None:
            return r
        parts = []
        views = self._views(r)
        for i, (qa, a, qg, g) in enumerate(self.eig):
            w, b = views[2 * i], views[2 * i + 1]
            v = torch.cat([w, b.unsqueeze(1)], dim=1)  # (out, in + 1)
            s = qg.T @ v @ qa
            s = s / (torch.outer(g, a) + mu)
            z = qg @ s @ qa.T
            parts += [z[:, :-1].reshape(-1), z[:, -1]]
        return torch.cat(parts)

    def _body(self) -> None:
        """One step on the static batches; no host reads (``count_ops`` checks that)."""
        model, params = self.model, self.params
        with torch.enable_grad():
            f0 = self.loss(model(self.xb), self.tb)
            g = self._flat(torch.autograd.grad(f0, params))
            z = model(self.xc)
            u = torch.zeros_like(z, requires_grad=True)
            jt = torch.autograd.grad(z, params, u, create_graph=True)
        lam = self.lam
        # CG on (G + λI) x = −g from the decayed warm start, preconditioned
        x = self.x0 * self.cg_decay
        r = -g - (self.gn_product(z, x, u, jt) + lam * x)
        y = self.precondition(r, lam)
        p = y
        ry = r.dot(y)
        tiny = torch.finfo(g.dtype).tiny
        for _ in range(self.cg_iters):
            ap = self.gn_product(z, p, u, jt) + lam * p
            pap = p.dot(ap)
            alpha = ry / pap.clamp_min(tiny)
            alpha = torch.where(pap > 0, alpha, torch.zeros_like(alpha))  # no ascent
            x = x + alpha * p
            r = r - alpha * ap
            y = self.precondition(r, lam)
            ry_new = r.dot(y)
            p = y + (ry_new / ry.clamp_min(tiny)) * p
            ry = ry_new
        # the model's change, undamped: q = gᵀx + ½xᵀGx, with (G + λI)x = −g − r
        q = 0.5 * g.dot(x) - 0.5 * x.dot(r) - 0.5 * lam * x.dot(x)
        with torch.no_grad():
            old = [w.clone() for w in params]
            for pv, dv in zip(params, self._views(x), strict=True):
                pv.add_(dv)
            f1 = self.loss(model(self.xb), self.tb)
            rho = (f1 - f0.detach()) / q
            ok = torch.isfinite(f1) & (q < 0) & (rho > 0)
            for pv, o in zip(params, old, strict=True):
                pv.copy_(torch.where(ok, pv, o))
            # Levenberg-Marquardt (Martens 2010): 3/2 below ρ = 1/4, 2/3 above 3/4
            bad = (~ok) | (rho < 0.25)
            lam_new = torch.where(bad, lam * 1.5, torch.where(rho > 0.75, lam * (2 / 3), lam))
            self.lam.copy_(lam_new.clamp(1e-8, 1e10))
            self.x0.copy_(torch.where(torch.isfinite(x), x, torch.zeros_like(x)))
            self.rho.copy_(rho)
            self.accepted.copy_(ok)
            self.f0.copy_(f0.detach())

    # ------------------------------------------------------------------------------ K-FAC
    def refresh_kfac(self) -> None:
        """K-FAC's factors on the curvature batch (one Monte Carlo probe), eigendecomposed;
        eager (an ``eigh`` per factor), written into the buffers the graph reads."""
        inputs: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}

        def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[id(m)], outs[id(m)] = args[0].detach(), out

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            with torch.enable_grad():
                z = self.model(self.xc)
        finally:
            for h in handles:
                h.remove()
        c = z.shape[0]
        xi = torch.randint(0, 2, z.shape, generator=self.gen).to(z) * 2 - 1
        # E[u uᵀ] = H_ℓ per case, without the 1/cases of the mean (it goes into A's mean)
        u = (self.loss_hessian(z.detach(), torch.ones_like(z)) * c).sqrt() * xi
        ds = torch.autograd.grad(z, [outs[id(m)] for m in self.layers], u)
        for m, d, eig in zip(self.layers, ds, self.eig, strict=True):
            a = inputs[id(m)]
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            A = a.T @ a / c
            G = d.T @ d / c
            ea, qa = torch.linalg.eigh(A)
            eg, qg = torch.linalg.eigh(G)
            floor = self.kfac_floor * torch.sqrt(ea.mean().clamp_min(0) * eg.mean().clamp_min(0))
            eig[0].copy_(qa)
            eig[1].copy_(ea.clamp_min(0) + floor.sqrt())
            eig[2].copy_(qg)
            eig[3].copy_(eg.clamp_min(0) + floor.sqrt())

    # ------------------------------------------------------------------------------- step
    def _draw(self) -> None:
        n = len(self.x)
        for size, xs, ts in (
            (self.batch, self.xb, self.tb),
            (self.curvature_batch, self.xc, self.tc),
        ):
            idx = torch.randperm(n, generator=self.gen)[:size].to(self.device)
            xs.copy_(self.x[idx])
            ts.copy_(self.t[idx])

    def _initial_damping(self) -> None:
        """λ₀ = gᵀGg / gᵀg on the first batches: a Rayleigh quotient, scale-free."""
        with torch.enable_grad():
            g = self._flat(
                torch.autograd.grad(self.loss(self.model(self.xb), self.tb), self.params)
            )
            z = self.model(self.xc)
            u = torch.zeros_like(z, requires_grad=True)
            jt = torch.autograd.grad(z, self.params, u, create_graph=True)
            gg = self.gn_product(z, g, u, jt)
        self.lam.fill_(float(g.dot(gg) / g.dot(g)))

    def step(self) -> None:
        self._draw()
        if self.steps == 0 and not math.isfinite(float(self.lam)):
            self._initial_damping()
        if self.eig is not None and self.steps % self.refresh == 0:
            self.refresh_kfac()
        if not self.cuda_graph:
            self._body()
        elif self.graph is not None:
            self.graph.replay()
        elif self.steps < 3:  # warm-up steps on a side stream, then the capture
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._body()
            except Exception as err:  # noqa: BLE001 - report it, go on eagerly
                self.cuda_graph, self.mode = False, f"eager (capture failed: {err!r:.300})"
                self._body()
            else:
                self.graph = graph
                self.graph.replay()  # a capture records without running
                self.mode = "cuda_graph"
        self.steps += 1


_SIDE: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


# --------------------------------------------------------------------------- measurement
_VIEWS = (
    "view", "aten.t.", "reshape", "slice", "expand", "detach", "as_strided", "select",
    "split", "unsqueeze", "squeeze", "permute", "transpose", "alias", "unbind", "lift_fresh",
)  # fmt: skip


class _Count(TorchDispatchMode):
    """ATen calls below autograd, views (no kernel on a GPU) apart, and host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func)
        if "_local_scalar_dense" in name:
            if not isinstance(args[0], Tensor):  # a size already on the host (seen under
                return args[0]  # torch.func in the library's loss-Hessian path): no read
            self.reads += 1
        elif not any(v in name for v in _VIEWS):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops():
    """Count what the enclosed code dispatches: ``.kernels`` (a Counter), ``.reads``."""
    c = _Count()
    with c:
        yield c


def graph_run(task: sc.Task, name: str, **kw) -> sc.Run:  # noqa: ANN003
    m = copy.deepcopy(task.model)
    hf = GraphHF(m, task.x, task.y, **kw)
    run = sc.Run(name, "HF", m, hf.step, detail=str(kw))
    run.hf = hf  # type: ignore[attr-defined]
    return run


def time_steps(model: nn.Module, x: Tensor, t: Tensor, device: str, count: int, **kw) -> dict:  # noqa: ANN003
    out = {}
    for graph in (False, True):
        hf = GraphHF(copy.deepcopy(model), x, t, cuda_graph=graph, **kw)
        times = []
        for _ in range(count):
            sync(device)
            t0 = time.perf_counter()
            hf.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        out["graph" if graph else "eager"] = dict(
            median_ms=1e3 * statistics.median(times[5:] or times),
            mode=hf.mode,
            lam=float(hf.lam),
            f=float(hf.f0),
        )
    return out


def _race(
    args: argparse.Namespace, model: nn.Module, x: Tensor, flat: Tensor, n: int, seconds: float
) -> dict:
    @torch.no_grad()
    def sq_error(m: nn.Module) -> float:
        return float((torch.sigmoid(m(x)) - flat).square().sum() / n)

    task = sc.Task(
        "curves-graphstep", f"CURVES autoencoder, {n} images", model, x, flat, bce_loss,
        sq_error, "train squared error per case", budget=seconds, sweep_budget=seconds,
        adam=[], sgd=[], hf={},
    )  # fmt: skip
    # stop 45's 30 s sweep on this task: Adam 3e-3 at 5,000 (4.26) and 1,000 (4.48), SGD-m
    # 1e-2 at 1,000 (9.45); the library's defaults 8.79
    contenders = {
        "adam5000": lambda: sc.first_order_run(task, "Adam", 3e-3, min(5000, n)),
        "adam1000": lambda: sc.first_order_run(task, "Adam", 3e-3, min(1000, n)),
        "sgd1000": lambda: sc.first_order_run(task, "SGD-momentum", 1e-2, min(1000, n)),
        "defaults": lambda: sc.hf_run(
            task, "HF defaults, 500/125", "HF", dict(batch=500, curvature_batch=125, kw={})
        ),
    }
    for key, name, kw in (
        ("g5000", "5000/1250 cg3", dict(batch=5000, curvature_batch=1250)),
        ("g1000", "1000/250 cg3", dict(batch=1000, curvature_batch=250)),
        ("g1000cg10", "1000/250 cg10", dict(batch=1000, curvature_batch=250, cg_iters=10)),
    ):
        kw = kw | dict(batch=min(kw["batch"], n), curvature_batch=min(kw["curvature_batch"], n))
        contenders[key] = functools.partial(graph_run, task, f"graph HF {name} K-FAC/10", **kw)
    runs = [contenders[k]() for k in args.runs.split(",")]
    sc.interleave(runs, task, seconds, 10, args.device)
    first = [r for r in runs if r.family != "HF" and not r.failed]
    best = min(first, key=sc.final_error) if first else None
    rows = []
    for r in runs:
        e = sc.final_error(r)
        ratio = e / sc.final_error(best) if best else math.nan
        mode = getattr(getattr(r, "hf", None), "mode", "")  # a graphed run's: replayed?
        rows.append([r.name, r.steps, f"{e:.4g}", f"{ratio:.3f}", r.failed, mode])
    print(md_table(["run", "steps", "final error", "× best baseline", "failed", "mode"], rows))
    return dict(seconds=seconds, n=n, best=best.name if best else None, rows=rows)


_RUNS = ("adam5000", "adam1000", "sgd1000", "defaults", "g5000", "g1000", "g1000cg10")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="steps,race", help="steps, race or both")
    ap.add_argument(
        "--runs",
        default=",".join(_RUNS),
        help="the race's contenders, comma-separated (e.g. adam5000,sgd1000,g5000 for 100 s)",
    )
    args = ap.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(_RUNS)
    if unknown:  # before any work: a typo must not cost device minutes
        ap.error(f"--runs: unknown {sorted(unknown)}; choose from {', '.join(_RUNS)}")
    import gpu_check

    torch.manual_seed(0)
    n = 400 if args.quick else 20_000
    seconds = 2.0 if args.quick else args.seconds
    model, x, flat = gpu_check.curves(n, args.device)
    res: dict = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), argv=sys.argv)
    res["machine"] = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        load=Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "",
        threads=torch.get_num_threads(),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today()}-graphstep-{args.device}.json"
    c = len(x) // 4
    with count_ops() as counted:
        hf = GraphHF(
            copy.deepcopy(model),
            x,
            flat,
            batch=len(x) // 4,
            curvature_batch=c // 4,
            cuda_graph=False,
        )
        hf.step()
    res["ops_first_step"] = dict(kernels=sum(counted.kernels.values()), reads=counted.reads)
    if "steps" in args.parts:
        res["steps"] = {
            name: time_steps(model, x, flat, args.device, 8 if args.quick else 40, **kw)
            for name, kw in {
                "b5000/c1250 cg3 K-FAC/10": dict(batch=min(5000, n), curvature_batch=min(1250, n)),
                "b1000/c250 cg3 K-FAC/10": dict(batch=min(1000, n), curvature_batch=min(250, n)),
            }.items()
        }
        print(json.dumps(res["steps"], indent=1))
        path.write_text(json.dumps(res, indent=1, default=str))  # kept if the race fails
    if "race" in args.parts:
        res["race"] = _race(args, model, x, flat, n, seconds)
        path.write_text(json.dumps(res, indent=1, default=str))
    return path


if __name__ == "__main__":
    print(main())
