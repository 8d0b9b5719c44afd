"""lossmodels: why HF loses on the mixture-density, KLDiv-functional and two-head models.

    OPENBLAS_NUM_THREADS=1 python experiments/_lossmodels.py trace [--seconds 4]
    OPENBLAS_NUM_THREADS=1 python experiments/_lossmodels.py spectrum
    OPENBLAS_NUM_THREADS=1 python experiments/_lossmodels.py race [--seconds 4] [--seeds 0,1]
    OPENBLAS_NUM_THREADS=1 python experiments/_lossmodels.py cost

``trace``: ``HessianFree(model.parameters())`` with a ``(loss, outputs)`` closure, full batch
(256), per family and seed until ``--seconds`` of CPU time: counts of ``cg_reason`` and
``status``, product / preconditioner products, CPU per phase, and the loss reached.

``spectrum``: the per-example blocks of :math:`H_\\ell` (outputs' Hessian of the loss) along
HF's own trajectory on the MDN: the share of examples with a negative eigenvalue and the
most negative eigenvalue over the largest, at the start and every 50 steps; and the
Gauss-Newton curvature :math:`g^\\top G g / g^\\top g` with and without the negative part.

``race``: contenders interleaved in 0.2-s slices of CPU time (``time.process_time``), same
initial weights, full batch: HF variants against Adam (lr 1e-3 ... 3e-2) and L-BFGS (strong
Wolfe), as in ``_unseen5.race``. For the MDN also the NLL on 4,096 held-out points (the
data's own entropy is about -0.19: ``_entropy``), since a training NLL below it is a
component collapsing onto training points.

``cost``: CPU time per curvature product, closed-form / generic, for the KLDiv model.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import hessfree
import hessfree.curvature as hf_curvature
import hessfree.optimizer as hf_optimizer

sys.path.insert(0, os.path.dirname(__file__))
from _unseen5 import FAMILIES as UNSEEN5  # noqa: E402
from _unseen5 import family as _unseen5_family  # noqa: E402

torch.set_num_threads(1)
FAMILIES = ("mdn", "twohead", "functional")


def _hetero_nll(out, y):
    """Heteroscedastic Gaussian NLL in (mean, log-variance): not convex in the outputs."""
    return F.gaussian_nll_loss(out[:, :1], y, out[:, 1:].exp())


def family(name: str, n: int, seed: int = 0):
    """``_unseen5.family``, plus ``hetero``: a 1-32-2 tanh MLP predicting the mean and
    log-variance of y = sin(3x) + (0.05 + 0.3|x|)·noise, trained by ``gaussian_nll_loss``."""
    if name != "hetero":
        return _unseen5_family(name, n, seed)
    g = torch.Generator().manual_seed(100 + seed)
    torch.manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x) + (0.05 + 0.3 * x.abs()) * torch.randn(n, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    return model, _hetero_nll, x, y


def _closure(model, loss_fn, x, y):
    def closure():
        out = model(x)
        return loss_fn(out, y), out

    return closure


# --------------------------------------------------------------------------------------------
# trace
# --------------------------------------------------------------------------------------------
def trace(args) -> None:
    print(f"trace: HessianFree(params), (loss, outputs) closure, n={args.n}, {args.seconds} s CPU")
    for name in FAMILIES:
        for seed in (0, 1):
            model, loss_fn, x, y = family(name, args.n, seed)
            opt = hessfree.HessianFree(model.parameters(), **_variant_kwargs(args.variant))
            closure = _closure(model, loss_fn, x, y)
            rows = []
            load0 = os.getloadavg()[0]
            t0 = time.process_time()
            while time.process_time() - t0 < args.seconds:
                opt.step(closure)
                rows.append(opt.last_step)
            load1 = os.getloadavg()[0]
            reasons = collections.Counter(s.cg_reason for s in rows)
            status = collections.Counter(str(s.status) for s in rows)
            phases = collections.Counter()
            for s in rows:
                phases.update(s.time_phases)
            mv = sum(s.cg_matvecs for s in rows)
            pmv = sum(s.precond_matvecs for s in rows)
            print(
                f"| {name} | {seed} | {load0:.1f}/{load1:.1f} | {len(rows)} | "
                f"{rows[-1].loss_after:.4g} | {dict(reasons)} | {dict(status)} | {mv} | {pmv} | "
                + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
                + f" | λ last {rows[-1].damping:.3g} |",
                flush=True,
            )


# --------------------------------------------------------------------------------------------
# spectrum of the MDN's loss Hessian blocks
# --------------------------------------------------------------------------------------------
def _blocks(loss, out):
    """Per-example blocks B_i = ∂²ℓ/∂o_i² (N, K, K) by K batched double-backward products
    (exact for a loss that is a sum over examples; checked with a random probe)."""
    (go,) = torch.autograd.grad(loss, out, create_graph=True)
    return _blocks_from(go, out)


def _blocks_from(go, out):
    n, k = out.shape
    probes = torch.zeros(k, n, k, dtype=out.dtype)
    probes[torch.arange(k), :, torch.arange(k)] = 1.0
    (cols,) = torch.autograd.grad(go, out, probes, retain_graph=True, is_grads_batched=True)
    B = cols.permute(1, 2, 0)  # B[i, a, b] = ∂²ℓ/∂o_ia ∂o_ib
    u = torch.randn_like(out)
    (hu,) = torch.autograd.grad(go, out, u, retain_graph=True)
    err = float((hu - torch.einsum("nab,nb->na", B, u)).norm() / hu.norm())
    return B, err


def spectrum(args) -> None:
    for seed in (0, 1):
        model, loss_fn, x, y = family("mdn", args.n, seed)
        opt = hessfree.HessianFree(model.parameters())
        closure = _closure(model, loss_fn, x, y)
        print(f"mdn seed {seed}")
        print("| step | loss | examples with an eigenvalue < 0 | min eig / max eig | sep. err |")
        print("|---|---|---|---|---|")
        for step in range(args.steps + 1):
            if step % 50 == 0:
                out = model(x)
                loss = loss_fn(out, y)
                B, err = _blocks(loss, out)
                ev = torch.linalg.eigvalsh(B.double())
                neg = float((ev[:, 0] < -1e-6 * ev[:, -1].abs()).float().mean())
                ratio = float(ev[:, 0].min() / ev[:, -1].max())
                cells = f"{float(loss.detach()):.4f} | {neg:.0%} | {ratio:.3g} | {err:.1e}"
                print(f"| {step} | {cells} |")
            opt.step(closure)


# --------------------------------------------------------------------------------------------
# race
# --------------------------------------------------------------------------------------------
def _variant_kwargs(variant: str) -> dict:
    if variant == "noprecond":
        return {"precond": None}
    return {}


class _ProjectedGGN(hessfree.GGNProduct):
    """Prototype: H_ℓ's per-example blocks with negative eigenvalues clamped to 0 ("clamp")
    or flipped (|·|, "abs"), for a loss that is a sum over examples of a 2-D output."""

    mode = "clamp"

    def _loss_hessian_map(self, loss, outputs, gos, blocks):
        generic = super()._loss_hessian_map(loss, outputs, gos, blocks)
        if self.jacobian.is_sequence or outputs.dim() != 2 or not gos[0].requires_grad:
            return generic
        B, _ = _blocks_from(gos[0], outputs)
        ev, U = torch.linalg.eigh(B.double())  # float32's eigh gave NaN on some blocks
        ev = ev.clamp(min=0) if self.mode == "clamp" else ev.abs()
        P = ((U * ev.unsqueeze(1)) @ U.transpose(1, 2)).to(B.dtype)

        def hl(w):
            if w.dim() > 2:
                return torch.einsum("nab,knb->kna", P, w)
            return torch.einsum("nab,nb->na", P, w)

        return hl


def _exact_loss_hessian(step):
    """main's product: the exact H_ℓ of a non-convex loss (no |·| on its blocks)."""

    def wrapped():
        saved = hf_curvature._absolute_blocks
        hf_curvature._absolute_blocks = lambda go, outputs: None
        try:
            step()
        finally:
            hf_curvature._absolute_blocks = saved

    return wrapped


def _with_product(cls, mode, step):
    def wrapped():
        saved = hf_optimizer.GGNProduct
        hf_optimizer.GGNProduct = cls
        cls.mode = mode
        try:
            step()
        finally:
            hf_optimizer.GGNProduct = saved

    return wrapped


def _held_out(name: str, seed: int):
    if name not in ("mdn", "hetero"):
        return None
    _, _, x, y = family(name, 4096, seed + 1000)  # data only (a fresh generator seed)
    return x, y


def _entropy() -> float:
    """Differential entropy of the MDN data's y given x: ½ log(2πe·0.1²) − log 2 (two
    well-separated branches, noise σ = 0.1)."""
    return 0.5 * math.log(2 * math.pi * math.e * 0.01) - math.log(2)


def _contenders(name: str, seed: int, n: int, variants: list[str]):
    model0, loss_fn, x, y = family(name, n, seed)
    state = {k: v.clone() for k, v in model0.state_dict().items()}

    def fresh():
        m, *_ = family(name, n, seed)
        m.load_state_dict(state)
        return m

    out = []
    for variant in variants:
        m = fresh()
        opt = hessfree.HessianFree(m.parameters(), **_variant_kwargs(variant))
        closure = _closure(m, loss_fn, x, y)

        def hf_step(opt=opt, closure=closure):
            opt.step(closure)

        if variant in ("clamp", "abs"):
            hf_step = _with_product(_ProjectedGGN, variant, hf_step)
        if variant == "exact":
            hf_step = _exact_loss_hessian(hf_step)

        out.append((f"HF {variant}", m, hf_step))
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        m = fresh()
        opt_a = torch.optim.Adam(m.parameters(), lr=lr)

        def adam_step(m=m, opt=opt_a):
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()

        out.append((f"Adam {lr:g}", m, adam_step))
    m = fresh()
    opt_l = torch.optim.LBFGS(m.parameters(), max_iter=20, line_search_fn="strong_wolfe")

    def lbfgs_step(m=m, opt=opt_l):
        def closure():
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    out.append(("L-BFGS sw", m, lbfgs_step))
    return out, loss_fn, x, y


def race(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.families.split(",") if args.families else FAMILIES
    variants = args.variants.split(",")
    print(f"race: {args.seconds} s CPU each, full batch n={args.n}, seeds {seeds}")
    for name in names:
        for seed in seeds:
            load0 = os.getloadavg()[0]
            cons, loss_fn, x, y = _contenders(name, seed, args.n, variants)
            cpu = [0.0] * len(cons)
            steps = [0] * len(cons)
            dead = [False] * len(cons)
            for i, (_, _m, step) in enumerate(cons):  # warm-up: one step each, not timed
                step()
                steps[i] += 1
            while any(c < args.seconds and not d for c, d in zip(cpu, dead, strict=True)):
                for i, (_, _m, step) in enumerate(cons):
                    if cpu[i] >= args.seconds or dead[i]:
                        continue
                    t0 = time.process_time()
                    while time.process_time() - t0 < 0.2:
                        try:
                            step()
                        except Exception:  # an optimizer that fails stops where it is
                            dead[i] = True
                            break
                        steps[i] += 1
                    cpu[i] += time.process_time() - t0
            load1 = os.getloadavg()[0]
            held = _held_out(name, seed)
            cells = []
            for (label, m, _), k in zip(cons, steps, strict=True):
                with torch.no_grad():
                    v = float(loss_fn(m(x), y))
                    h = f" / {float(loss_fn(m(held[0]), held[1])):.4g}" if held else ""
                cells.append(f"{label}: {v:.4g}{h} ({k})")
            final = []
            for _, m, _ in cons:
                with torch.no_grad():
                    v = float(loss_fn(m(x), y))
                final.append(v if math.isfinite(v) else math.inf)
            nv = len(variants)
            best_adam = min(final[nv : nv + 4])
            if name in ("mdn", "hetero"):
                rel = [f"{f - best_adam:+.3g} / {f - final[-1]:+.3g}" for f in final[:nv]]
            else:
                rel = [f"{f / best_adam:.3g} / {f / final[-1]:.3g}" for f in final[:nv]]
            print(
                f"| {name} | {seed} | {load0:.1f}/{load1:.1f} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(rel)
                + " |",
                flush=True,
            )


# --------------------------------------------------------------------------------------------
# heads: the two-head model's curvature per head
# --------------------------------------------------------------------------------------------
def heads(args) -> None:
    """Along the gradient g, the curvature g^T G_h g / g^T g of each head's term of the
    two-head loss (CE on the class head, SmoothL1 on the regression head), and the share of
    each head in the gradient, at the start and after 50, 100 and 200 HF steps."""
    from _unseen5 import two_head_loss

    for seed in (0, 1):
        model, loss_fn, x, y = family("twohead", args.n, seed)
        opt = hessfree.HessianFree(model.parameters())
        closure = _closure(model, loss_fn, x, y)
        params = list(model.parameters())
        print(f"twohead seed {seed}")
        print("| step | loss | CE gᵀGg/gᵀg | SmoothL1 gᵀGg/gᵀg | ‖g_CE‖ | ‖g_SmoothL1‖ |")
        print("|---|---|---|---|---|---|")
        for step in range(201):
            if step in (0, 50, 100, 200):
                out = model(x)
                g = hessfree.GGNProduct(two_head_loss(out, y), out, params).gradient
                cells = []
                grads = []
                for h, term in enumerate(
                    (
                        lambda o, y=y: F.cross_entropy(o[0], y[0]),
                        lambda o, y=y: F.smooth_l1_loss(o[1], y[1], beta=0.5),
                    )
                ):
                    out = model(x)
                    head = hessfree.GGNProduct(term(out), out[h], params)
                    cells.append(float(g @ head(g) / (g @ g)))
                    grads.append(float(head.gradient.norm()))
                with torch.no_grad():
                    loss = float(loss_fn(model(x), y))
                print(
                    f"| {step} | {loss:.4f} | {cells[0]:.3g} | {cells[1]:.3g} | "
                    f"{grads[0]:.3g} | {grads[1]:.3g} |"
                )
            opt.step(closure)


# --------------------------------------------------------------------------------------------
# same: the families the change must leave alone
# --------------------------------------------------------------------------------------------
def same(args) -> None:
    """``--steps`` HF steps per unseen5 family and seed with the new product and with main's
    (exact H_ℓ); whether the parameters agree bitwise at the end."""
    for name in UNSEEN5:
        for seed in (0, 1):
            ends = []
            for variant in ("default", "exact"):
                model, loss_fn, x, y = family(name, args.n, seed)
                opt = hessfree.HessianFree(model.parameters())
                closure = _closure(model, loss_fn, x, y)

                def step(opt=opt, closure=closure):
                    opt.step(closure)

                if variant == "exact":
                    step = _exact_loss_hessian(step)
                for _ in range(args.steps):
                    step()
                ends.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            print(f"| {name} | {seed} | {args.steps} | {torch.equal(*ends)} |", flush=True)


# --------------------------------------------------------------------------------------------
# product cost
# --------------------------------------------------------------------------------------------
def cost(args) -> None:
    """CPU per GGN product on the KLDiv model: the product HessianFree builds now, against
    the generic double backward (forced by writing the loss as ``-(-loss)``)."""
    model, loss_fn, x, y = family("functional", args.n, 0)
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params))

    def build(generic: bool):
        out = model(x)
        loss = loss_fn(out, y)
        return hessfree.GGNProduct((-loss).neg() if generic else loss, out, params)

    products = {"default": build(False), "generic": build(True)}
    for k, p in products.items():
        print(k, p._hl.__qualname__)
    ggn = products["default"]
    w = ggn.jacobian.jvp(v)
    products["H_ℓ part alone"] = lambda _v: ggn.loss_hessian(w)
    products["gradient (forward + backward)"] = lambda _v: torch.autograd.grad(
        loss_fn(model(x), y), params, allow_unused=True
    )
    times = {k: [] for k in products}
    load0 = os.getloadavg()[0]
    for _ in range(3):
        for p in products.values():
            p(v)
    for _ in range(args.rounds):
        for k, p in products.items():
            t0 = time.process_time()
            for _ in range(20):
                p(v)
            times[k].append((time.process_time() - t0) / 20)
    load1 = os.getloadavg()[0]
    med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    print(f"load {load0:.1f}/{load1:.1f}; median CPU ms per product:")
    for k, t in med.items():
        print(f"  {k}: {1e3 * t:.3f}")
    print(f"  ratio default / generic: {med['default'] / med['generic']:.3f}")
    print(f"  H_ℓ share of a product: {med['H_ℓ part alone'] / med['default']:.3f}")
    print(f"  product / gradient: {med['default'] / med['gradient (forward + backward)']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("trace", "spectrum", "race", "cost", "same", "heads"))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--families", default="")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--variant", default="default")
    args = parser.parse_args()
    what = {"trace": trace, "spectrum": spectrum, "race": race, "cost": cost, "same": same}
    what["heads"] = heads
    what[args.what](args)


if __name__ == "__main__":
    main()
