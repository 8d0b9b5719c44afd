"""unseen10: torch.autograd.gradgradcheck over 69 ops no earlier scan covered (float64).

Second derivatives are what Hessian and Gauss-Newton products differentiate; an op that fails
or raises here gives wrong or refused curvature products.

    python experiments/_unseen10_scan.py
"""

# ruff: noqa: E501, E731
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

torch.manual_seed(0)
D = torch.float64
T = torch.rand(3, 5, dtype=D)
x = torch.randn(3, 5, dtype=D, requires_grad=True)
w = torch.randn(5, dtype=D, requires_grad=True)
b = torch.randn(5, dtype=D, requires_grad=True)
tests = {
    "rms_norm_w": (lambda x, w: F.rms_norm(x, (5,), w), (x, w)),
    "rms_norm": (lambda x: F.rms_norm(x, (5,)), (x,)),
    "rms_norm_eps": (lambda x, w: F.rms_norm(x, (5,), w, eps=1e-3), (x, w)),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b), (x, w, b)),
    "group_norm": (lambda x, w, b: F.group_norm(x.view(3, 5, 1), 5, w, b), (x, w, b)),
    "glu": (lambda x: F.glu(x[:, :4]), (x,)),
    "silu": (lambda x: F.silu(x), (x,)),
    "mish": (lambda x: F.mish(x), (x,)),
    "hardswish": (lambda x: F.hardswish(x), (x,)),
    "logsigmoid": (lambda x: F.logsigmoid(x), (x,)),
    "softplus_beta": (lambda x: F.softplus(x, beta=2.0), (x,)),
    "logdet": (lambda x: torch.logdet(x[:, :3] @ x[:, :3].T + 3 * torch.eye(3, dtype=D)), (x,)),
    "slogdet": (lambda x: torch.linalg.slogdet(x[:, :3] + 2 * torch.eye(3, dtype=D))[1], (x,)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (x,)),
    "pinball": (lambda x: torch.maximum(0.1 * x, -0.9 * x), (x,)),
    "multilabel_soft_margin": (
        lambda x: F.multilabel_soft_margin_loss(x, (x.detach() > 0).to(D)),
        (x,),
    ),
    "margin_ranking": (
        lambda x: F.margin_ranking_loss(x[:, 0], x[:, 1], torch.ones(3, dtype=D), margin=0.1),
        (x,),
    ),
    "poisson_nll_full": (lambda x: F.poisson_nll_loss(x, T, full=True), (x,)),
    "gaussian_nll_full": (
        lambda x, w: F.gaussian_nll_loss(
            x, torch.zeros_like(x), (w.abs() + 0.5).expand(3, 5), full=True
        ),
        (x, w),
    ),
    "huber_delta": (lambda x: F.huber_loss(x, torch.zeros_like(x), delta=0.3), (x,)),
    "kl_logt": (
        lambda x, w: F.kl_div(
            F.log_softmax(x, -1),
            F.log_softmax(w.expand(3, 5), -1),
            log_target=True,
            reduction="batchmean",
        ),
        (x, w),
    ),
    "scaled_dot_attn_mask": (
        lambda x: F.scaled_dot_product_attention(
            x.view(1, 3, 5),
            x.view(1, 3, 5),
            x.view(1, 3, 5),
            attn_mask=torch.tensor([[True, True, False]] * 3),
        ),
        (x,),
    ),
    "conv1d_same_dil": (
        lambda x, w: F.conv1d(
            x.view(1, 3, 5),
            w[:3].repeat(2, 3, 1).view(2, 3, 3)[:, :, :3],
            padding="same",
            dilation=2,
        ),
        (x, w),
    ),
    "conv_transpose2d": (
        lambda x, w: F.conv_transpose2d(
            x.view(1, 3, 5, 1), w[:4].view(1, 1, 2, 2).expand(3, 1, 2, 2).contiguous(), stride=2
        ),
        (x, w),
    ),
    "topk_gather": (lambda x: x.topk(2, -1).values.softmax(-1), (x,)),
    "cumprod": (lambda x: torch.cumprod(x, -1), (x,)),
    "rrelu_eval": (lambda x: F.rrelu(x, training=False), (x,)),
    "elu": (lambda x: F.elu(x, 0.7), (x,)),
    "celu": (lambda x: F.celu(x, 0.7), (x,)),
    "selu": (lambda x: F.selu(x), (x,)),
    "prelu": (lambda x, w: F.prelu(x, w), (x, w)),
    "softmin": (lambda x: F.softmin(x, -1), (x,)),
    "normalize": (lambda x: F.normalize(x, dim=-1), (x,)),
    "pairwise_distance": (lambda x, w: F.pairwise_distance(x, w.expand(3, 5)), (x, w)),
    "cosine_similarity": (lambda x, w: F.cosine_similarity(x, w.expand(3, 5)), (x, w)),
    "triplet": (lambda x, w: F.triplet_margin_loss(x, w.expand(3, 5), x.flip(0) * 0.5), (x, w)),
    "hinge_embedding": (lambda x: F.hinge_embedding_loss(x, torch.ones_like(x)), (x,)),
    "soft_margin": (lambda x: F.soft_margin_loss(x, torch.ones_like(x)), (x,)),
    "multi_margin": (lambda x: F.multi_margin_loss(x, torch.tensor([0, 1, 2])), (x,)),
    "nll_2d": (
        lambda x: F.nll_loss(
            F.log_softmax(x.view(1, 3, 5), 1), torch.zeros(1, 5, dtype=torch.long)
        ),
        (x,),
    ),
    "rnn_gru_cell": (
        lambda x, w: torch.gru_cell(
            x[:, :3],
            w[:3].expand(3, 3).contiguous(),
            torch.ones(9, 3, dtype=D) * 0.1,
            torch.ones(9, 3, dtype=D) * 0.2,
        ),
        (x, w),
    ),
    "lp_pool": (lambda x: F.lp_pool1d(x.view(1, 3, 5).abs() + 0.1, 2, 2), (x,)),
    "adaptive_max": (lambda x: F.adaptive_max_pool1d(x.view(1, 3, 5), 2), (x,)),
    "fold_unfold": (lambda x: F.unfold(x.view(1, 1, 3, 5), (2, 2)), (x,)),
    "interp_linear": (lambda x: F.interpolate(x.view(1, 3, 5), size=7, mode="linear"), (x,)),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x[:, :4].reshape(1, 4, 3, 1), 2), (x,)),
    "logaddexp": (lambda x, w: torch.logaddexp(x, w), (x, w)),
    "xlogy": (lambda x, w: torch.special.xlogy(x, w.abs() + 0.5), (x, w)),
    "erfinv": (lambda x: torch.erfinv(torch.tanh(x) * 0.9), (x,)),
    "lgamma": (lambda x: torch.lgamma(x.abs() + 0.5), (x,)),
    "digamma": (lambda x: torch.digamma(x.abs() + 0.5), (x,)),
    "polygamma": (lambda x: torch.polygamma(1, x.abs() + 0.5), (x,)),
    "atan2": (lambda x, w: torch.atan2(x, w.abs() + 0.5), (x, w)),
    "cholesky": (
        lambda x: torch.linalg.cholesky(x[:, :3] @ x[:, :3].T + 3 * torch.eye(3, dtype=D)),
        (x,),
    ),
    "solve_triangular": (
        lambda x, w: torch.linalg.solve_triangular(
            torch.tril(x[:, :3]) + 3 * torch.eye(3, dtype=D), w[:3].view(3, 1), upper=False
        ),
        (x, w),
    ),
    "matrix_power": (lambda x: torch.linalg.matrix_power(x[:, :3], 3), (x,)),
    "eigh": (lambda x: torch.linalg.eigvalsh(x[:, :3] + x[:, :3].T), (x,)),
    "svdvals": (lambda x: torch.linalg.svdvals(x), (x,)),
    "pinv": (lambda x: torch.linalg.pinv(x), (x,)),
    "norm_nuc": (lambda x: torch.linalg.matrix_norm(x, "nuc"), (x,)),
    "vector_norm_inf": (lambda x: torch.linalg.vector_norm(x, 3, -1), (x,)),
    "bilinear": (
        lambda x, w: F.bilinear(x, x, w.view(1, 1, 5).expand(2, 5, 5).contiguous()),
        (x, w),
    ),
    "embedding_renorm_free": (
        lambda w: F.embedding(torch.tensor([0, 2, 1]), w.view(5, 1).expand(5, 3)),
        (w,),
    ),
    "ctc_free_logsumexp": (lambda x: torch.logsumexp(x, -1), (x,)),
    "std_mean": (lambda x: torch.std_mean(x, -1)[0], (x,)),
    "var_unbiased0": (lambda x: x.var(-1, correction=0), (x,)),
    "cross": (lambda x, w: torch.linalg.cross(x[:, :3], w[:3].expand(3, 3)), (x, w)),
    "trapezoid": (lambda x: torch.trapezoid(x, dim=-1), (x,)),
    "stft": (
        lambda x: torch.stft(
            x.reshape(-1),
            4,
            hop_length=2,
            window=torch.hann_window(4, dtype=D),
            return_complex=True,
        ).abs(),
        (x,),
    ),
}
bad = []
for name, (f, args) in tests.items():
    try:
        ok = gradgradcheck(f, args, raise_exception=False, nondet_tol=1e-10)
    except Exception as e:
        ok = f"raised {type(e).__name__}: {str(e)[:120]}"
    if ok is not True:
        bad.append((name, ok))
print(len(tests), "ops; not ok:", bad)
