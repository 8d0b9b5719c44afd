"""unseen5 Part A: loss-graph shapes against a dense float64 Gauss-Newton oracle.

Run through ``python experiments/_unseen5.py fuzz``. Per shape: the oracle G = Jᵀ H_ℓ J
(J = jacobian of the outputs in θ, H_ℓ = hessian of the loss in the outputs, both
torch.autograd.functional, float64); ``GGNProduct``; the product ``HessianFree`` builds from a
``(loss, outputs)`` closure (read inside ``_curvature_product`` before the step moves θ);
``MCFisherProduct`` with 40,000 labels (relative Frobenius error; 'refused' = ValueError).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessfree
from hessfree import GGNProduct, MCFisherProduct, loss_hessian_product

D = torch.float64
N, DIN, C = 6, 3, 4


def _model(dout: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIN, 5), nn.Tanh(), nn.Linear(5, dout)).to(D)


def _dense(mv, n: int) -> torch.Tensor:
    return torch.stack([mv(e) for e in torch.eye(n, dtype=D)], 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def check(name, dout, derive, loss_of, seed=0) -> str:
    """One row: ``derive(big)`` gives the outputs, ``loss_of(z, model)`` the scalar loss."""
    m = _model(dout, seed)
    x = torch.randn(N, DIN, generator=torch.Generator().manual_seed(seed + 7), dtype=D)
    names = [k for k, _ in m.named_parameters()]
    theta0 = [p.detach().clone() for p in m.parameters()]
    sizes = [p.numel() for p in theta0]
    flat0 = torch.cat([t.reshape(-1) for t in theta0])
    n = flat0.numel()

    def outs_of(flat):
        parts = [c.view_as(t) for c, t in zip(flat.split(sizes), theta0, strict=True)]
        return derive(functional_call(m, dict(zip(names, parts, strict=True)), (x,)))

    o0 = outs_of(flat0).detach()
    J = jacobian(outs_of, flat0).reshape(o0.numel(), -1)
    G = J.T @ hessian(lambda z: loss_of(z.view(o0.shape), m), o0.reshape(-1)) @ J
    params = list(m.parameters())
    cells = []
    outputs = derive(m(x))
    loss = loss_of(outputs, m)
    try:
        cells.append(str(loss_hessian_product(loss, outputs) is not None))
    except Exception as e:  # noqa: BLE001 - a crash is a finding
        cells.append(f"**{type(e).__name__}**")
    try:
        cells.append(f"{_rel(_dense(GGNProduct(loss, outputs, params), n), G):.1e}")
    except Exception as e:  # noqa: BLE001
        cells.append(f"**{type(e).__name__}: {str(e)[:50]}**")
    seen = {}

    class Capture(hessfree.HessianFree):
        def _curvature_product(self, *args, **kwargs):
            r = super()._curvature_product(*args, **kwargs)
            seen.setdefault("G", _dense(lambda v: r[0](v).to(D), n))
            return r

    opt = Capture(m.parameters(), cg_max_iter=2)

    def closure():
        o = derive(m(x))
        return loss_of(o, m), o

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt.step(closure)
            cells.append(f"{_rel(seen['G'], G):.1e}" if "G" in seen else "no product")
        except Exception as e:  # noqa: BLE001
            cells.append(f"**{type(e).__name__}: {str(e)[:50]}**")
    with torch.no_grad():
        for p, t in zip(m.parameters(), theta0, strict=True):
            p.copy_(t)
    try:
        o2 = derive(m(x))
        gen = torch.Generator().manual_seed(3)
        Fm = _dense(MCFisherProduct(loss_of(o2, m), o2, params, mc_samples=40000, generator=gen), n)
        cells.append(
            f"{float((Fm - G).norm() / G.norm()):.4f}"
            if G.norm() > 0
            else f"|F| {float(Fm.abs().max()):.1g}"
        )
    except ValueError:
        cells.append("refused")
    except Exception as e:  # noqa: BLE001
        cells.append(f"**{type(e).__name__}**")
    cells.append("; ".join(sorted({str(w.message)[:60] for w in caught})) or "-")
    return f"| {name} | " + " | ".join(cells) + " |"


def _ident(b):
    return b


def cases():
    y = torch.tensor([0, 3, 1, 2, 2, 1])
    yig = torch.tensor([0, -100, 1, -100, 2, 1])
    yall = torch.full((6,), -100)
    y2 = torch.tensor([[0, 1], [3, 1], [0, 2], [1, 0], [1, 3], [0, 1]])
    wcls = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=D)
    soft = F.softmax(torch.arange(24.0, dtype=D).view(6, 4).sin(), 1)
    bits = (torch.arange(24).view(6, 4) % 3 == 0).to(D)
    w4 = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=D)
    zeros, ones = torch.zeros(6, 4, dtype=D), torch.ones(6, 4, dtype=D)
    ce = F.cross_entropy
    return [
        ("CE mean", C, _ident, lambda z, m: ce(z, y)),
        ("CE sum", C, _ident, lambda z, m: ce(z, y, reduction="sum")),
        ("CE weight=", C, _ident, lambda z, m: ce(z, y, weight=wcls)),
        ("CE ignore_index", C, _ident, lambda z, m: ce(z, yig)),
        ("CE ignore_index, sum", C, _ident, lambda z, m: ce(z, yig, reduction="sum")),
        ("CE all rows ignored, sum", C, _ident, lambda z, m: ce(z, yall, reduction="sum")),
        ("CE all rows ignored, mean (NaN loss)", C, _ident, lambda z, m: ce(z, yall)),
        ("CE label_smoothing", C, _ident, lambda z, m: ce(z, y, label_smoothing=0.1)),
        ("CE probability targets", C, _ident, lambda z, m: ce(z, soft)),
        ("CE none + .sum()", C, _ident, lambda z, m: ce(z, y, reduction="none").sum()),
        ("CE none + .mean()", C, _ident, lambda z, m: ce(z, y, reduction="none").mean()),
        (
            "NLL(log_softmax dim=-1), (N,C)",
            C,
            _ident,
            lambda z, m: F.nll_loss(F.log_softmax(z, -1), y),
        ),
        (
            "NLL(log_softmax dim=-1), (N,C,d)",
            8,
            lambda b: b.view(6, 4, 2),
            lambda z, m: F.nll_loss(F.log_softmax(z, -1), y2 % 2),
        ),
        ("CE (N,C,d)", 8, lambda b: b.view(6, 4, 2), lambda z, m: ce(z, y2)),
        ("CE on a transposed view", C, lambda b: b.t(), lambda z, m: ce(z.t(), y)),
        (
            "CE on permute (N,d,C)->(N,C,d)",
            8,
            lambda b: b.view(6, 2, 4),
            lambda z, m: ce(z.permute(0, 2, 1), y2),
        ),
        ("CE on outputs[:, :k]", 6, _ident, lambda z, m: ce(z[:, :4], y)),
        ("outputs = big[:, :k]", 6, lambda b: b[:, :4], lambda z, m: ce(z, y)),
        ("outputs = big.chunk(2, 1)[0]", 8, lambda b: b.chunk(2, 1)[0], lambda z, m: ce(z, y)),
        (
            "CE on outputs.float() (float32 rounding)",
            C,
            _ident,
            lambda z, m: ce(z.float(), y).double(),
        ),
        ("CE on outputs.double() (no-op)", C, _ident, lambda z, m: ce(z.double(), y)),
        ("CE on outputs * temperature", C, _ident, lambda z, m: ce(z * 0.7, y)),
        ("CE on outputs + bias tensor", C, _ident, lambda z, m: ce(z + w4 / 10, y)),
        ("loss * 2", C, _ident, lambda z, m: ce(z, y) * 2),
        ("CE sum / n", C, _ident, lambda z, m: ce(z, y, reduction="sum") / 6),
        ("-(-loss)", C, _ident, lambda z, m: (-ce(z, y)).neg()),
        ("1 - loss", C, _ident, lambda z, m: 1 - ce(z, y)),
        ("loss.view(1) * 2 + 3", C, _ident, lambda z, m: ce(z, y).view(1) * 2 + 3),
        ("loss * loss.detach()", C, _ident, lambda z, m: ce(z, y) * ce(z, y).detach()),
        (
            "0.5 CE(head 1) + 0.5 CE(head 2)",
            8,
            _ident,
            lambda z, m: 0.5 * ce(z[:, :4], y) + 0.5 * ce(z[:, 4:], y),
        ),
        (
            "0.5 CE + 0.5 MSE, same outputs",
            C,
            _ident,
            lambda z, m: 0.5 * ce(z, y) + 0.5 * F.mse_loss(z, zeros),
        ),
        ("CE + outputs.square().mean()", C, _ident, lambda z, m: ce(z, y) + z.square().mean()),
        (
            "CE + weight penalty",
            C,
            _ident,
            lambda z, m: ce(z, y) + 1e-2 * sum((p**2).sum() for p in m.parameters()),
        ),
        (
            "torch.stack(chunk losses).sum()",
            C,
            _ident,
            lambda z, m: torch.stack(
                [ce(c, t) for c, t in zip(z.chunk(3), y.chunk(3), strict=True)]
            ).sum(),
        ),
        (
            "Python sum of chunk losses",
            C,
            _ident,
            lambda z, m: sum(ce(c, t) for c, t in zip(z.chunk(3), y.chunk(3), strict=True)),
        ),
        ("MSE, target (C,) expanded", C, _ident, lambda z, m: F.mse_loss(z, (w4 / 5).expand(6, 4))),
        ("MSE sum", C, _ident, lambda z, m: F.mse_loss(z, ones, reduction="sum")),
        ("MSE on outputs.view(-1)", C, _ident, lambda z, m: F.mse_loss(z.view(-1), ones.view(-1))),
        ("MSE(target, outputs)", C, _ident, lambda z, m: F.mse_loss(ones, z)),
        ("MSE on outputs.expand", 1, _ident, lambda z, m: F.mse_loss(z.expand(6, 3), ones[:, :3])),
        ("MSE on outputs.flip(0)", C, _ident, lambda z, m: F.mse_loss(z.flip(0), ones)),
        ("BCE-with-logits", C, _ident, lambda z, m: F.binary_cross_entropy_with_logits(z, bits)),
        (
            "BCE-with-logits pos_weight=",
            C,
            _ident,
            lambda z, m: F.binary_cross_entropy_with_logits(z, bits, pos_weight=w4),
        ),
        (
            "BCE-with-logits weight=",
            C,
            _ident,
            lambda z, m: F.binary_cross_entropy_with_logits(z, bits, weight=w4),
        ),
        (
            "NLL: log_softmax (N,K) viewed (N/2,C,2,1)",
            3,
            _ident,
            lambda z, m: F.nll_loss(F.log_softmax(z, 1).view(3, 3, 2, 1), y.view(3, 2, 1) % 3),
        ),
        (
            "NLL: log_softmax (N,C*d) viewed (N,C,d,1)",
            8,
            _ident,
            lambda z, m: F.nll_loss(F.log_softmax(z, 1).view(6, 4, 2, 1), y2.view(6, 2, 1)),
        ),
        (
            "NLL: log_softmax (N,C,d,e) viewed (N,C,d*e,1)",
            8,
            lambda b: b.view(6, 2, 2, 2),
            lambda z, m: F.nll_loss(
                F.log_softmax(z, 1).reshape(6, 2, 4, 1), y2.repeat(1, 2).view(6, 4, 1) % 2
            ),
        ),
        (
            "NLL on log_softmax(outputs.view(12, 4))",
            8,
            _ident,
            lambda z, m: F.nll_loss(F.log_softmax(z.view(12, 4), 1), y.repeat(2)),
        ),
        (
            "MSE(outputs, outputs.roll(1, 0)): target from outputs",
            C,
            _ident,
            lambda z, m: F.mse_loss(z, z.roll(1, 0)),
        ),
        (
            "BCE(outputs, sigmoid(outputs.flip(0))): soft target not detached",
            C,
            _ident,
            lambda z, m: F.binary_cross_entropy_with_logits(z, torch.sigmoid(z.flip(0))),
        ),
        ("SmoothL1", C, _ident, lambda z, m: F.smooth_l1_loss(z, zeros)),
        ("Huber delta 0.3", C, _ident, lambda z, m: F.huber_loss(z, zeros, delta=0.3)),
        (
            "KLDiv batchmean",
            C,
            _ident,
            lambda z, m: F.kl_div(F.log_softmax(z, 1), soft, reduction="batchmean"),
        ),
    ]


def fuzz() -> None:
    torch.set_num_threads(1)
    print(
        "| loss shape | closed form used | GGNProduct rel err | HessianFree's product "
        "| MC-Fisher (40k) | warnings |"
    )
    print("|---|---|---|---|---|---|")
    for case in cases():
        print(check(*case), flush=True)
