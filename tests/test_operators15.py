"""The SciPy operators and ``hessfree.spectral`` under uses no earlier round tried (operators15).

Oracles: explicit float64 Hessians and Jacobians from ``torch.autograd.functional`` on a flat
parameter vector (through ``torch.func.functional_call``), per-example gradients for the
empirical Fisher, and ``numpy.linalg.eigh`` of those matrices. Every test is seeded and
deterministic; float64 throughout, so 1e-12 bounds the rounding of these small products.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
from hessfree.spectral import bottom_eigenpairs, top_eigenpairs


def _flat_fn(model: nn.Module, fn: Callable[[dict[str, Tensor]], Tensor]) -> Callable:
    """``fn`` of the model's parameters as one flat vector (``model.parameters()`` order)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_fn(theta: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return fn(params)

    return flat_fn


def _theta(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _dense_hessian(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> np.ndarray:
    f = _flat_fn(model, lambda ps: loss_fn(functional_call(model, ps, (x,)), y))
    return hessian(f, _theta(model)).numpy()


def _dense_jacobian(model: nn.Module, x: Tensor) -> np.ndarray:
    f = _flat_fn(model, lambda ps: functional_call(model, ps, (x,)).reshape(-1))
    return jacobian(f, _theta(model)).numpy()


def _mlp_data(outputs: int = 1) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    return model, x, torch.randn(8, outputs, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# writes through p.data after building: refused by the cached graphs, followed by the uncached
# --------------------------------------------------------------------------------------------


def test_cached_operators_refuse_a_write_through_p_data():
    """``p.data.add_`` bumps no version counter of ``p``: a cached graph went on at a mixed
    point (new weights saved by reference, old activations), off the dense Hessians at both
    points. Now refused; the uncached operator gives the new point's Hessian."""
    model, x, y = _mlp_data()
    loss_fn = nn.MSELoss()
    n = sum(p.numel() for p in model.parameters())
    cached = [
        HessianLinearOperator(model, loss_fn, (x, y)),
        GGNLinearOperator(model, loss_fn, (x, y)),
        FisherLinearOperator(model, loss_fn, (x, y)),
        JacobianLinearOperator(model, x),
    ]
    uncached = HessianLinearOperator(model, loss_fn, (x, y), cache_graph=False)
    for p in model.parameters():
        p.data.add_(0.3)
    for op in cached:
        with pytest.raises(RuntimeError, match=r"changed value .* parameter 0 \(shape \(4, 3\)\)"):
            op @ np.ones(n)
        if op.shape[0] == op.shape[1]:
            with pytest.raises(RuntimeError, match="p.data"):
                op.gradient()
    with pytest.raises(RuntimeError, match="changed value"):
        cached[-1].H @ np.ones(8)
    dense = _dense_hessian(model, loss_fn, x, y)
    np.testing.assert_allclose(uncached @ np.eye(n), dense, rtol=0, atol=1e-12)


def test_cached_operator_at_its_own_values_again_still_runs():
    """Values written back bit for bit (a probe step undone) are the graph's point: the
    products run and equal the dense Hessian there; NaN parameters are not a change."""
    model, x, y = _mlp_data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    n = H.shape[0]
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.data.add_(0.5)
    for p, b in zip(model.parameters(), before, strict=True):
        p.data.copy_(b)
    np.testing.assert_allclose(
        H @ np.eye(n), _dense_hessian(model, nn.MSELoss(), x, y), rtol=0, atol=1e-12
    )
    with torch.no_grad():
        model[0].weight.data[0, 0] = float("nan")
    G = GGNLinearOperator(model, nn.MSELoss(), (x, y))
    assert np.isnan(G @ np.ones(n)).any()  # NaN products, not "changed value"


# --------------------------------------------------------------------------------------------
# forward passes that write module buffers (train-mode spectral_norm)
# --------------------------------------------------------------------------------------------


def _spectral_model(old_style: bool = False) -> nn.Module:
    torch.manual_seed(2)
    layer = nn.Linear(3, 4).double()
    if old_style:
        layer = nn.utils.spectral_norm(layer)
    else:
        layer = nn.utils.parametrizations.spectral_norm(layer)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("old_style", [False, True])
def test_train_mode_spectral_norm_is_refused_naming_the_module(old_style):
    """Its power iteration writes ``_u``/``_v`` in every forward pass: uncached products drifted
    and the operators wrote to the model. Refused at construction, naming the buffer, the
    module and model.eval(); accepted in eval mode and with allow_training_mode=True."""
    model = _spectral_model(old_style)
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    kind = "Linear" if old_style else "_SpectralNorm"  # the old one: a hook on the Linear
    match = rf"writes to its buffers: \S*_u .*{kind}.*model\.eval\(\)"
    for build in (
        lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y)),
        lambda: GGNLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False),
        lambda: HessianLinearOperator(model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])]),
        lambda: JacobianLinearOperator(model, x),
    ):
        with pytest.raises(ValueError, match=match):
            build()
    HessianLinearOperator(model, nn.MSELoss(), (x, y), allow_training_mode=True)
    model.eval()
    u = [b.clone() for b in model.buffers()]
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False)
    n = H.shape[0]
    first = H @ np.eye(n)
    np.testing.assert_array_equal(H @ np.eye(n), first)  # one matrix
    assert all(torch.equal(a, b) for a, b in zip(u, model.buffers(), strict=True))
    np.testing.assert_allclose(first, first.T, rtol=0, atol=1e-12)


def test_product_refuses_buffer_writes_after_model_train():
    """Built in eval mode, then model.train(): the uncached product's forward passes write the
    buffers again, and the product says so instead of drifting."""
    model = _spectral_model().eval()
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False)
    G = GGNLinearOperator(model, nn.MSELoss(), [(x[:3], y[:3]), (x[3:], y[3:])])
    n = H.shape[0]
    model.train()
    for op in (H, G):
        with pytest.raises(RuntimeError, match=r"writes to its buffers.*model\.train\(\) since"):
            op @ np.ones(n)
        with pytest.raises(RuntimeError, match="writes to its buffers"):
            op.gradient()
    # a training step's writes between products are the caller's, not the operator's
    model.eval()
    model(x)
    H @ np.ones(n)


def test_any_buffer_written_by_forward_is_refused():
    """Not only spectral_norm: a module that keeps a running average in a buffer."""

    class RunningMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("avg", torch.zeros(3, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(x.mean(0), alpha=0.1)
            return x - self.avg

    torch.manual_seed(4)
    model = nn.Sequential(RunningMean(), nn.Linear(3, 1)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"0\.avg \(in 0, RunningMean\)"):
        FisherLinearOperator(model, nn.MSELoss(), (x, y))


# --------------------------------------------------------------------------------------------
# torch.autograd.set_detect_anomaly(True): blocks row by row, no failed batched attempts
# --------------------------------------------------------------------------------------------


def test_matmat_under_detect_anomaly_is_exact_and_warns_nothing():
    """Anomaly mode's NaN check calls .item(), which vmap cannot batch: every batched product
    failed once (a wasted backward pass and a warning with a traceback) before falling back.
    A float32 model whose loss is taken in float64 (the lead's case) and a float64 one."""
    model, x, _ = _mlp_data(outputs=3)
    targets = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])

    def loss_fn(outputs: Tensor, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs.double(), t)

    n = sum(p.numel() for p in model.parameters())
    dense_h = _dense_hessian(model, loss_fn, x, targets)
    dense_j = _dense_jacobian(model, x)
    model32 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.set_detect_anomaly(True):
            H = HessianLinearOperator(model, loss_fn, (x, targets))
            J = JacobianLinearOperator(model, x)
            np.testing.assert_allclose(H.matmat(np.eye(n)), dense_h, rtol=0, atol=1e-12)
            np.testing.assert_allclose(J.matmat(np.eye(n)), dense_j, rtol=0, atol=1e-12)
            np.testing.assert_allclose(J.H.matmat(np.eye(24)), dense_j.T, rtol=0, atol=1e-12)
            G32 = GGNLinearOperator(model32, loss_fn, (x.float(), targets))
            rows = np.stack([G32 @ e for e in np.eye(G32.shape[0], dtype=np.float32)], axis=1)
            block = G32.matmat(np.eye(G32.shape[0], dtype=np.float32))
    assert not [str(w.message)[:60] for w in caught]
    np.testing.assert_array_equal(block, rows)  # the same products, one per column


def test_product_matmat_under_detect_anomaly_is_exact_and_warns_nothing():
    """The products' own matmat (hessfree.curvature) took the same failed batched attempt
    under anomaly mode (one wasted backward pass and a warning with a traceback) before its
    row-by-row fallback; now it goes row by row at once. Oracle: the dense float64 GGN."""
    from hessfree.curvature import GGNProduct

    model, x, _ = _mlp_data(outputs=3)
    targets = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])
    loss_fn = nn.functional.cross_entropy
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    names = [k for k, _ in model.named_parameters()]

    def outputs_of(*flat: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, flat, strict=True)), (x,))

    out = model(x)
    J = torch.cat([j.reshape(out.numel(), -1) for j in jacobian(outputs_of, tuple(params))], dim=1)
    H_out = hessian(lambda o: loss_fn(o.view_as(out), targets), out.detach().reshape(-1))
    dense = (J.T @ H_out @ J).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.set_detect_anomaly(True):
            out = model(x)
            product = GGNProduct(loss_fn(out, targets), out, params)
            block = product.matmat(torch.eye(n, dtype=torch.float64))
    assert not [str(w.message)[:60] for w in caught]
    np.testing.assert_allclose(block.numpy(), dense, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# nn.KLDivLoss(reduction='batchmean')
# --------------------------------------------------------------------------------------------


def test_kl_div_batchmean_is_the_mean_over_examples():
    """'batchmean' (torch's recommended KL reduction) was refused as an unknown reduction, and
    reduction='mean' then as disagreeing. It is the mean over examples: the Hessian over
    uneven batches and the empirical Fisher against the dense oracles of all the data."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(1))
    model = model.double()
    x = torch.randn(10, 3, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(10, 3, dtype=torch.float64), 1)
    loss_fn = nn.KLDivLoss(reduction="batchmean", log_target=True)
    n = sum(p.numel() for p in model.parameters())
    batches = [(x[:4], target[:4]), (x[4:8], target[4:8]), (x[8:], target[8:])]
    H = HessianLinearOperator(model, loss_fn, batches, reduction="mean")
    assert H.reduction == "mean"
    np.testing.assert_allclose(
        H @ np.eye(n), _dense_hessian(model, loss_fn, x, target), rtol=0, atol=1e-12
    )
    grads = []
    for i in range(10):
        f = _flat_fn(
            model,
            lambda ps, i=i: loss_fn(functional_call(model, ps, (x[i : i + 1],)), target[i : i + 1]),
        )
        grads.append(jacobian(f, _theta(model)).numpy())
    g = np.stack(grads)
    F = FisherLinearOperator(model, loss_fn, (x, target))
    np.testing.assert_allclose(F @ np.eye(n), g.T @ g / 10, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# spectral: the whole spectrum (k = n), a 1x1 operator
# --------------------------------------------------------------------------------------------


def test_eigenpairs_of_a_one_parameter_operator():
    """k = 1 of a 1x1 operator was refused with the empty range "[1, 0]"."""
    model = nn.Linear(1, 1, bias=False).double()
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    H = HessianLinearOperator(model, nn.MSELoss(reduction="sum"), (x, torch.zeros_like(x)))
    for pairs in (top_eigenpairs(H), bottom_eigenpairs(H, k=1)):
        np.testing.assert_allclose(pairs.values, [10.0], rtol=1e-15)  # 2 (1 + 4)
        np.testing.assert_allclose(np.abs(pairs.vectors), [[1.0]], rtol=1e-15)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 1\] .* got 2"):
        top_eigenpairs(H, k=2)


def test_whole_spectrum_matches_dense_eigh():
    """k = n gives every eigenpair, ordered, against numpy.linalg.eigh of the dense Hessian;
    NaN products are refused as for ARPACK's path."""
    model, x, y = _mlp_data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    n = H.shape[0]
    values, vectors = np.linalg.eigh(_dense_hessian(model, nn.MSELoss(), x, y))
    top, bottom = top_eigenpairs(H, k=n), bottom_eigenpairs(H, k=n)
    np.testing.assert_allclose(top.values, values[::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(bottom.values, values, rtol=0, atol=1e-12)
    # eigenvectors up to sign (the eigenvalues here are distinct)
    gaps = np.diff(values).min()
    assert gaps > 1e-6
    np.testing.assert_allclose(np.abs(bottom.vectors.T @ vectors), np.eye(n), atol=1e-8)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        top_eigenpairs(np.array([[1.0, np.nan], [np.nan, 1.0]]), k=2)


# --------------------------------------------------------------------------------------------
# a model returning a dict
# --------------------------------------------------------------------------------------------


def test_dict_outputs_are_refused_with_the_fix_that_works():
    """The refusal named only "got dict"; it now shows the lambda (and params=) that the
    operators need, and that fix gives the dense Hessian."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> dict[str, object]:
            return {"logits": self.body(x), "note": "aux"}

    torch.manual_seed(6)
    model = Heads().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    match = r"got dict with keys 'logits', 'note': pass lambda x: model\(x\)\['logits'\]"
    with pytest.raises(TypeError, match=match):
        HessianLinearOperator(model, nn.MSELoss(), (x, y))
    with pytest.raises(TypeError, match=match):
        JacobianLinearOperator(model, x)
    H = HessianLinearOperator(
        lambda inputs: model(inputs)["logits"],
        nn.MSELoss(),
        (x, y),
        params=list(model.parameters()),
    )
    dense = _dense_hessian(model.body, nn.MSELoss(), x, y)
    np.testing.assert_allclose(H @ np.eye(H.shape[0]), dense, rtol=0, atol=1e-12)
