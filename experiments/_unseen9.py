"""unseen9: how users drive HessianFree and the operators (torch.optim and SciPy integration).

Parts (``python experiments/_unseen9.py [checks|scan|cost]``, default all; markdown to stdout):

- ``checks``: each usage against an independent oracle (SGD's own scheduler sequence; dense
  float64 matrices from ``torch.autograd.functional``; a hand-written weight norm).
- ``scan``: ``torch.autograd.gradgradcheck`` over 60 ops a model or loss may use (second
  derivatives are what Hessian and Gauss-Newton products differentiate).
- ``cost``: what the two guards added here cost, interleaved in one process.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import os
import sys
import time
import timeit
import warnings

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from scipy.linalg import expm
from torch import nn
from torch.autograd import gradgradcheck
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import hessfree
from hessfree import (
    GGNLinearOperator,
    HessianFree,
    HessianLinearOperator,
    JacobianLinearOperator,
)

torch.set_num_threads(1)
D = torch.float64


def _dense(model, x, y, loss_fn=F.mse_loss):
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(t):
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(named, parts, strict=True)), (x,))

    out = f(theta).detach()
    J = jacobian(lambda t: f(t).reshape(-1), theta)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    H = hessian(lambda t: loss_fn(f(t), y), theta)
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy(), J=J.numpy())


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)


def _err(a, b):
    return f"{np.abs(np.asarray(a) - np.asarray(b)).max():.1e}"


def _try(fn):
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fn()
        note = "; ".join(sorted({str(x.message)[:70] for x in w}))
        return out + (f" (warnings: {note})" if note else "")
    except Exception as e:  # noqa: BLE001 (a study: every failure is a row)
        return f"**{type(e).__name__}**: {str(e)[:160]}"


def checks() -> None:
    print("## checks\n\n| usage | oracle | result |\n|---|---|---|")
    rows = []
    x, y = _data()
    m = _mlp()
    Dm = _dense(m, x, y)
    H = HessianLinearOperator(m, nn.MSELoss(), (x, y))
    G = GGNLinearOperator(m, nn.MSELoss(), (x, y))
    J = JacobianLinearOperator(m, x)
    n = H.shape[0]
    v = np.random.default_rng(0).standard_normal(n)
    Hd, Gd, Jd = Dm["H"], Dm["G"], Dm["J"]
    for name, op, dense in [
        ("H + G", lambda: H + G, Hd + Gd),
        ("H * 3", lambda: H * 3, 3 * Hd),
        ("H - G", lambda: H - G, Hd - Gd),
        ("H.T", lambda: H.T, Hd),
        ("H.H @ G", lambda: H.H @ G, Hd @ Gd),
        ("H ** 2", lambda: H**2, Hd @ Hd),
        ("J.H @ J", lambda: J.H @ J, Jd.T @ Jd),
        ("aslinearoperator(H)", lambda: sla.aslinearoperator(H), Hd),
        ("G.damped(0.5).H", lambda: G.damped(0.5).H, Gd + 0.5 * np.eye(n)),
    ]:
        rows.append(
            (f"`{name}` @ v", "dense float64", _try(lambda op=op, d=dense: _err(op() @ v, d @ v)))
        )
    rows.append(
        (
            "`expm_multiply(H, v)`",
            "scipy.linalg.expm(H_dense) @ v",
            _try(lambda: _err(sla.expm_multiply(H, v), expm(Hd) @ v)),
        )
    )
    rows.append(
        (
            "`expm_multiply(H, v, traceA=...)`",
            "as above",
            _try(lambda: _err(sla.expm_multiply(H, v, traceA=np.trace(Hd)), expm(Hd) @ v)),
        )
    )
    rows.append(
        (
            "`onenormest(H)`",
            "‖H‖₁ exact",
            _try(lambda: f"{sla.onenormest(H):.4f} vs {np.abs(Hd).sum(0).max():.4f} (an estimate)"),
        )
    )
    rows.append(
        (
            "`onenormest(J.H @ J)`",
            "‖JᵀJ‖₁ exact",
            _try(lambda: f"{sla.onenormest(J.H @ J):.4f} vs {np.abs(Jd.T @ Jd).sum(0).max():.4f}"),
        )
    )
    rows.append(
        (
            "`eigsh(H, 2, 'LA')`",
            "eigvalsh",
            _try(
                lambda: _err(
                    np.sort(sla.eigsh(H, 2, which="LA", return_eigenvectors=False)),
                    np.linalg.eigvalsh(Hd)[-2:],
                )
            ),
        )
    )
    rows.append(
        (
            "`svds(J, 2)`",
            "numpy svd",
            _try(
                lambda: _err(
                    np.sort(sla.svds(J, 2, return_singular_vectors=False)),
                    np.sort(np.linalg.svd(Jd, compute_uv=False)[:2]),
                )
            ),
        )
    )
    rows.append(("`scipy.sparse.linalg.expm(H)`", "-", _try(lambda: str(sla.expm(H)))))

    # model features under the operators (each against its own dense float64 matrices)
    class Ckpt(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.a, self.b, self.r = nn.Linear(3, 4), nn.Linear(4, 2), reentrant

        def forward(self, z):
            return self.b(checkpoint(lambda u: torch.tanh(self.a(u)), z, use_reentrant=self.r))

    def wn():
        mm = _mlp()
        nn.utils.parametrizations.weight_norm(mm[0])
        return mm

    def orth():
        mm = _mlp()
        nn.utils.parametrizations.orthogonal(mm[0])
        return mm

    for name, build in [
        ("checkpoint(use_reentrant=False)", lambda: Ckpt(False).double()),
        ("parametrizations.orthogonal", orth),
    ]:
        mm = build()
        Dd = _dense(mm, x, y)
        for k, cls in [("H", HessianLinearOperator), ("G", GGNLinearOperator)]:
            rows.append(
                (
                    f"{name}: {k} over 2 batches",
                    "dense float64",
                    _try(
                        lambda cls=cls, k=k, mm=mm, Dd=Dd: _err(
                            cls(mm, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
                            @ v[: Dd["H"].shape[0]],
                            Dd[k] @ v[: Dd["H"].shape[0]],
                        )
                    ),
                )
            )

    # weight norm: torch's fused kernel against a hand-written w = g v / ‖v‖
    mm = wn()
    params = list(mm.parameters())
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def hand(t):
        b0, g, vv, w1, b1 = (c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True))
        w0 = g * vv / vv.pow(2).sum(1, keepdim=True).sqrt()
        return F.mse_loss(torch.tanh(x @ w0.T + b0) @ w1.T + b1, y)

    Hh = hessian(hand, theta).numpy()
    fused = _dense(mm, x, y)["H"]  # torch's double backward through the fused kernel
    rel = np.linalg.norm(fused - Hh) / np.linalg.norm(Hh)
    rows.append(
        (
            "weight_norm: torch's own Hessian (fused kernel)",
            "hand-written Hessian",
            f"max {_err(fused, Hh)}, ‖ΔH‖/‖H‖ {rel:.2f}",
        )
    )
    op = HessianLinearOperator(mm, nn.MSELoss(), (x, y))
    w = np.random.default_rng(0).standard_normal(len(Hh))
    rows.append(
        (
            "weight_norm: HessianLinearOperator (this branch)",
            "hand-written Hessian",
            _err(op @ w, Hh @ w),
        )
    )

    # optimizer integration
    def sched_rows():
        S = torch.optim.lr_scheduler
        kinds = {
            "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.5, anneal_epochs=2),
            "SequentialLR(LinearLR, ExponentialLR)": lambda o: S.SequentialLR(
                o, [S.LinearLR(o, 0.1, 1.0, 2), S.ExponentialLR(o, 0.9)], milestones=[2]
            ),
            "ChainedScheduler": lambda o: S.ChainedScheduler(
                [S.ConstantLR(o, 0.5, 2), S.ExponentialLR(o, 0.9)]
            ),
            "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, 2),
            "CyclicLR(cycle_momentum=False)": lambda o: S.CyclicLR(
                o, 0.1, 1.0, step_size_up=2, cycle_momentum=False
            ),
            "PolynomialLR": lambda o: S.PolynomialLR(o, 4, 2.0),
            "OneCycleLR(cycle_momentum=False)": lambda o: S.OneCycleLR(
                o, 1.0, total_steps=6, cycle_momentum=False
            ),
        }
        out = []
        for name, make in kinds.items():

            def one(make=make):
                mm = _mlp()
                opt = HessianFree(mm.parameters())
                sgd = torch.optim.SGD(_mlp().parameters(), lr=1.0)
                s, s2 = make(opt), make(sgd)

                def c():
                    o = mm(x)
                    return F.mse_loss(o, y), o

                a, b = [], []
                for _ in range(5):
                    opt.step(c)
                    s.step()
                    sgd.step()
                    s2.step()
                    a.append(opt.param_groups[0]["lr"])
                    b.append(sgd.param_groups[0]["lr"])
                o2 = HessianFree(mm.parameters())
                o2.load_state_dict(opt.state_dict())
                o2.step(c)
                seq = ", ".join(f"{t:.3g}" for t in a)
                same = "equal" if a == b else "DIFFERS"
                return f"lr sequence {same} ({seq}); state dict reloads and steps"

            out.append((f"scheduler {name}", "the same scheduler on SGD", _try(one)))
        return out

    rows += sched_rows()

    def add_group(kw):
        mm = _mlp()
        mm[0].requires_grad_(False)
        opt = HessianFree([p for p in mm.parameters() if p.requires_grad], **kw)

        def c():
            o = mm(x)
            return F.mse_loss(o, y), o

        for _ in range(3):
            opt.step(c)
        mm[0].requires_grad_(True)
        opt.add_param_group({"params": list(mm[0].parameters())})
        first = [p.detach().clone() for p in mm[0].parameters()]
        ls = [float(opt.step(c)) for _ in range(3)]
        moved = any(not torch.equal(a, b) for a, b in zip(first, mm[0].parameters(), strict=True))
        return f"losses {ls[0]:.4f} → {ls[-1]:.4f}, new layer moved: {moved}"

    for kw in [{}, {"precond": "martens"}, {"precond": "nystrom"}, {"damping_metric": "marquardt"}]:
        rows.append(
            (
                f"add_param_group mid-training {kw or 'default'}",
                "loss decreases, new layer moves",
                _try(lambda kw=kw: add_group(kw)),
            )
        )

    def to_double():
        mm = _mlp().float()
        opt = HessianFree(mm.parameters())
        xs, ys = x.float(), y.float()

        def c():
            o = mm(xs)
            return F.mse_loss(o, ys), o

        opt.step(c)
        mm.double()
        xs, ys = x, y
        ls = [float(opt.step(c)) for _ in range(2)]
        return f"steps on in float64: {ls[0]:.4f} → {ls[1]:.4f}"

    rows.append(("model.double() after the optimizer was built", "keeps stepping", _try(to_double)))

    def accumulate():
        mm = _mlp()
        opt = HessianFree(mm.parameters())
        ref = _mlp()
        opt_ref = HessianFree(ref.parameters())

        def c():
            opt.zero_grad()
            tot = 0.0
            for xb, yb in zip(x.split(4), y.split(4), strict=True):
                loss = F.mse_loss(mm(xb), yb) / 2
                loss.backward()
                tot += loss.item()
            return torch.tensor(tot, dtype=D)

        def c_ref():
            opt_ref.zero_grad()
            loss = F.mse_loss(ref(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(c)
            opt_ref.step(c_ref)
        d = max(
            (a - b).abs().max().item()
            for a, b in zip(mm.parameters(), ref.parameters(), strict=True)
        )
        return f"max |θ − θ_ref| after 3 steps {d:.1e}"

    rows.append(
        (
            "gradient accumulation closure (float total, 2 micro-batches)",
            "the one-batch LBFGS-style closure",
            _try(accumulate),
        )
    )

    def reentrant():
        torch.manual_seed(0)
        mm = Ckpt(True).double()
        a0 = mm.a.weight.detach().clone()
        opt = HessianFree(mm.parameters())

        def c():
            o = mm(x)
            return F.mse_loss(o, y), o

        for _ in range(3):
            opt.step(c)
        return f"checkpointed layer moved: {not torch.equal(a0, mm.a.weight)}"

    rows.append(("checkpoint(use_reentrant=True), inputs without grad", "-", _try(reentrant)))

    def train_mode_op():
        torch.manual_seed(0)
        mm = (
            nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2))
            .double()
            .eval()
        )
        op = GGNLinearOperator(mm, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
        w = np.ones(op.shape[0])
        a = op @ w
        mm.train()
        return f"after model.train(): product changed by {_err(op @ w, a)}"

    rows.append(
        (
            "operator over 2 batches, model.train() after construction",
            "the eval-mode product",
            _try(train_mode_op),
        )
    )
    for r in rows:
        print("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |")


def scan() -> None:
    torch.manual_seed(0)

    def r(*s):
        return torch.randn(*s, dtype=D, requires_grad=True)

    t1, t3 = torch.rand(3, 4, dtype=D), torch.randint(0, 3, (2, 2, 2))
    cases = {
        "layer_norm": (lambda a, w, b: F.layer_norm(a, (4,), w, b), (r(3, 4), r(4), r(4))),
        "group_norm": (lambda a, w, b: F.group_norm(a, 2, w, b), (r(3, 4, 2), r(4), r(4))),
        "rms_norm": (lambda a, w: F.rms_norm(a, (4,), w), (r(3, 4), r(4))),
        "instance_norm": (lambda a: F.instance_norm(a), (r(2, 3, 5),)),
        "batch_norm (train)": (
            lambda a, w, b: F.batch_norm(a, None, None, w, b, training=True),
            (r(5, 3), r(3), r(3)),
        ),
        "normalize": (lambda a: F.normalize(a, dim=1), (r(3, 4),)),
        "cosine_similarity": (lambda a, b: F.cosine_similarity(a, b), (r(3, 4), r(3, 4))),
        "pairwise_distance": (lambda a, b: F.pairwise_distance(a, b), (r(3, 4), r(3, 4))),
        "cdist": (lambda a, b: torch.cdist(a, b), (r(3, 4), r(5, 4))),
        "cdist (use_mm_for_euclid_dist)": (
            lambda a, b: torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist"),
            (r(3, 4), r(5, 4)),
        ),
        "pdist": (lambda a: F.pdist(a), (r(4, 3),)),
        "embedding_bag": (
            lambda w: F.embedding_bag(
                torch.tensor([0, 2, 1, 3]), w, torch.tensor([0, 2]), mode="mean"
            ),
            (r(5, 3),),
        ),
        "_weight_norm dim 0 (fused)": (
            lambda a, g: torch._weight_norm(a, g, 0),
            (r(4, 3), r(4, 1)),
        ),
        "_weight_norm dim 1 (fused)": (
            lambda a, g: torch._weight_norm(a, g, 1),
            (r(4, 3), r(1, 3)),
        ),
        "_weight_norm dim -1 (composite)": (
            lambda a, g: torch._weight_norm(a, g, -1),
            (r(4, 3), r(1, 1)),
        ),
        "glu": (lambda a: F.glu(a), (r(3, 4),)),
        "prelu": (lambda a, w: F.prelu(a, w), (r(3, 4), r(1))),
        "softplus": (lambda a: F.softplus(a), (r(3, 4),)),
        "mish": (lambda a: F.mish(a), (r(3, 4),)),
        "silu": (lambda a: F.silu(a), (r(3, 4),)),
        "elu": (lambda a: F.elu(a), (r(3, 4),)),
        "selu": (lambda a: F.selu(a), (r(3, 4),)),
        "gelu(tanh)": (lambda a: F.gelu(a, approximate="tanh"), (r(3, 4),)),
        "logsigmoid": (lambda a: F.logsigmoid(a), (r(3, 4),)),
        "hardswish": (lambda a: F.hardswish(a), (r(3, 4),)),
        "interpolate bilinear": (
            lambda a: F.interpolate(a, scale_factor=2, mode="bilinear"),
            (r(1, 2, 3, 3),),
        ),
        "interpolate bicubic": (
            lambda a: F.interpolate(a, scale_factor=2, mode="bicubic"),
            (r(1, 2, 3, 3),),
        ),
        "grid_sample": (
            lambda a, g: F.grid_sample(a, g, align_corners=False),
            (r(1, 2, 3, 3), (torch.rand(1, 2, 2, 2, dtype=D) * 1.6 - 0.8).requires_grad_()),
        ),
        "conv_transpose2d": (lambda a, w: F.conv_transpose2d(a, w), (r(1, 2, 3, 3), r(2, 3, 2, 2))),
        "conv1d groups=2": (lambda a, w: F.conv1d(a, w, groups=2), (r(1, 4, 5), r(4, 2, 2))),
        "unfold": (lambda a: F.unfold(a, 2), (r(1, 2, 3, 3),)),
        "avg_pool2d": (lambda a: F.avg_pool2d(a, 2), (r(1, 2, 4, 4),)),
        "lp_pool2d": (lambda a: F.lp_pool2d(a, 2, 2), (r(1, 2, 4, 4),)),
        "adaptive_avg_pool2d": (lambda a: F.adaptive_avg_pool2d(a, 2), (r(1, 2, 5, 5),)),
        "log_softmax": (lambda a: F.log_softmax(a, 1), (r(3, 4),)),
        "logsumexp": (lambda a: torch.logsumexp(a, 1), (r(3, 4),)),
        "softmin": (lambda a: F.softmin(a, 1), (r(3, 4),)),
        "vector_norm p=3": (lambda a: torch.linalg.vector_norm(a, 3, dim=1), (r(3, 4),)),
        "matrix_norm fro": (lambda a: torch.linalg.matrix_norm(a), (r(3, 4),)),
        "rnn_tanh_cell": (
            lambda a, h, w1, w2: torch.rnn_tanh_cell(a, h, w1, w2),
            (r(2, 3), r(2, 4), r(4, 3), r(4, 4)),
        ),
        "gru_cell": (
            lambda a, h, w1, w2: torch.gru_cell(a, h, w1, w2),
            (r(2, 3), r(2, 4), r(12, 3), r(12, 4)),
        ),
        "lstm_cell": (
            lambda a, h, c, w1, w2: torch.lstm_cell(a, (h, c), w1, w2)[0],
            (r(2, 3), r(2, 4), r(2, 4), r(16, 3), r(16, 4)),
        ),
        "bilinear": (lambda a, b, w: F.bilinear(a, b, w), (r(3, 2), r(3, 4), r(5, 2, 4))),
        "huber_loss": (lambda a, b: F.huber_loss(a, b, delta=0.5), (r(3, 4), r(3, 4))),
        "kl_div": (
            lambda a, b: F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="batchmean"),
            (r(3, 4), r(3, 4)),
        ),
        "binary_cross_entropy": (
            lambda a: F.binary_cross_entropy(torch.sigmoid(a), t1),
            (r(3, 4),),
        ),
        "cross_entropy label_smoothing": (
            lambda a: F.cross_entropy(a, torch.tensor([0, 2, 1]), label_smoothing=0.1),
            (r(3, 4),),
        ),
        "nll_loss 2-D": (lambda a: F.nll_loss(F.log_softmax(a, 1), t3), (r(2, 3, 2, 2),)),
        "triplet_margin_loss": (
            lambda a, b, c: F.triplet_margin_loss(a, b, c),
            (r(3, 4), r(3, 4), r(3, 4)),
        ),
        "cumprod": (lambda a: torch.cumprod(a, 1), (r(3, 4),)),
        "prod": (lambda a: torch.prod(a, 1), (r(3, 4),)),
        "linalg.det": (lambda a: torch.linalg.det(a), (r(3, 3),)),
        "linalg.inv": (lambda a: torch.linalg.inv(a + 3 * torch.eye(3, dtype=D)), (r(3, 3),)),
        "linalg.cholesky": (
            lambda a: torch.linalg.cholesky(a @ a.T + torch.eye(3, dtype=D)),
            (r(3, 3),),
        ),
        "linalg.solve": (
            lambda a, b: torch.linalg.solve(a + 3 * torch.eye(3, dtype=D), b),
            (r(3, 3), r(3, 2)),
        ),
        "pixel_shuffle": (lambda a: F.pixel_shuffle(a, 2) ** 2, (r(1, 4, 2, 2),)),
        "local_response_norm": (lambda a: F.local_response_norm(a, 2), (r(1, 4, 3, 3),)),
        "svdvals": (lambda a: torch.linalg.svdvals(a), (r(3, 4),)),
        "eigvalsh": (lambda a: torch.linalg.eigvalsh(a + a.T), (r(3, 3),)),
        "scaled_dot_product_attention": (
            lambda q, k, vv: F.scaled_dot_product_attention(q, k, vv),
            (r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4)),
        ),
    }
    print(
        f"\n## scan: gradgradcheck, {len(cases)} ops, float64\n\n| op | gradgradcheck |\n|---|---|"
    )
    for name, (f, inp) in cases.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ok = "pass" if gradgradcheck(f, inp, raise_exception=False) else "**wrong**"
        except Exception as e:  # noqa: BLE001
            ok = f"raises {type(e).__name__}: {str(e)[:90]}"
        print(f"| {name} | {ok} |")


def cost() -> None:
    from hessfree._graph_ops import twice_differentiable_attention, twice_differentiable_weight_norm
    from hessfree._model_data import _check_modes_kept

    load0 = os.getloadavg()
    print("\n## cost (1 thread; best of 7 repeats, interleaved)\n")

    def attention():
        with twice_differentiable_attention():
            pass

    def both():
        with twice_differentiable_attention(), twice_differentiable_weight_norm():
            pass

    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    )
    x, y = _data()
    op = GGNLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False)
    modes = op._source._modes
    v = np.ones(op.shape[0])
    contenders = {
        "guard: attention alone (main)": (attention, 20000),
        "guard: attention + weight norm (branch)": (both, 20000),
        "mode check per product (1 Dropout)": (lambda: _check_modes_kept(modes), 20000),
        "uncached GGN product, 32 parameters (with the check)": (lambda: op @ v, 300),
    }
    res = {k: ([], []) for k in contenders}
    for _ in range(7):
        for name, (fn, number) in contenders.items():
            c0, w0 = time.process_time(), time.perf_counter()
            timeit.timeit(fn, number=number)
            res[name][0].append((time.process_time() - c0) / number * 1e6)
            res[name][1].append((time.perf_counter() - w0) / number * 1e6)
    print("| what | CPU µs (min / median) | wall µs (min / median) |\n|---|---|---|")
    for name, (cpu, wall) in res.items():
        print(
            f"| {name} | {min(cpu):.2f} / {np.median(cpu):.2f} "
            f"| {min(wall):.2f} / {np.median(wall):.2f} |"
        )
    print(f"\nload average at start {load0}, at end {os.getloadavg()}")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["checks", "scan", "cost"]
    print(f"hessfree from {hessfree.__file__}; torch {torch.__version__}")
    for part in parts:
        {"checks": checks, "scan": scan, "cost": cost}[part]()
