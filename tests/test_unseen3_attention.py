"""Curvature through ``nn.MultiheadAttention`` with ``need_weights=False`` (torch's fused
scaled-dot-product kernel, whose backward cannot be differentiated; "unseen3" in
``experiments/README.md``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import GGNLinearOperator, HessianFree

N, T, D = 4, 5, 8


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:, 3:] = True  # key padding: the last two positions
        a, _ = self.att(x, x, x, key_padding_mask=pad, need_weights=False)
        return self.head(a[:, :3].mean(1))


def _problem(dtype: torch.dtype):
    torch.manual_seed(0)
    model = _Attention().to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, D, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, x, y


def test_default_optimizer_steps_through_fused_attention():
    """On main every step raised "derivative for aten::_scaled_dot_product_flash_attention_
    for_cpu_backward is not implemented"."""
    model, x, y = _problem(torch.float32)
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    with torch.no_grad():
        first = float(closure()[0])
    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        assert float(closure()[0]) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ggn_operator_through_fused_attention_matches_explicit_ggn():
    model, x, y = _problem(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs_of(t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.view(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,))

    J = torch.autograd.functional.jacobian(outputs_of, theta).reshape(-1, theta.numel())
    out = outputs_of(theta).detach()
    H = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o, y), out)
    dense = (J.T @ H.reshape(out.numel(), out.numel()) @ J).numpy()
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), (x, y))
    v = np.random.default_rng(0).standard_normal(theta.numel())
    np.testing.assert_allclose(G @ v, dense @ v, rtol=1e-10, atol=1e-12)


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 6)
        self.mix = nn.Linear(12, 6)
        self.out = nn.Linear(6, 8)
        self.out.weight = self.emb.weight  # tied input and output embeddings

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ctx).flatten(1))))


def test_auto_kfac_leaves_out_a_weight_tied_to_an_embedding():
    """K-FAC's factors of the output layer see only that layer's share of a tied table's
    curvature; on main ``precond='auto'`` preconditioned the table with them (a tied language
    model's train loss then rose 4.0 -> 12.7 where this leaves it at 4.2, "unseen3")."""
    torch.manual_seed(0)
    model = _TiedLM()
    gen = torch.Generator().manual_seed(1)
    ctx, y = (
        torch.randint(0, 8, (16, 2), generator=gen),
        torch.randint(0, 8, (16,), generator=gen),
    )
    opt = HessianFree(model.parameters())

    def closure():
        out = model(ctx)
        return F.cross_entropy(out, y), out

    opt.step(closure)
    kfac = opt._auto_precond
    assert kfac is not None  # the untied layer holds most parameters: K-FAC stays on for it
    weights = {id(layer.weight) for layer in kfac.layers}
    assert id(model.mix.weight) in weights
    assert id(model.emb.weight) not in weights
