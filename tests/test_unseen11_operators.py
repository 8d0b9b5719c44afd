"""The SciPy operators on cases nobody had tried (unseen11), each against an independent oracle.

Oracles: explicit float64 Jacobians and Hessians of the loss on all the data
(``torch.autograd.functional`` through ``torch.func.functional_call``), ``numpy.linalg``'s
least squares, SVD and eigenvalues, and Hutchinson's variance in closed form.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from hessfree import (
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
from hessfree.spectral import hutchinson_trace


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g).to(dtype), torch.randn(6, 2, generator=g).to(dtype)


def _dense(model: nn.Module, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Float64 output Jacobian of ``model(x)`` and Hessian of its mean squared error."""
    named = {k: v.detach().double() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])
    x, y = x.double(), y.double()

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model.double(), dict(zip(named, parts, strict=True)), (x,))

    J = jacobian(lambda t: f(t).reshape(-1), theta)
    H = hessian(lambda t: F.mse_loss(f(t), y), theta)
    return J.numpy(), H.numpy()


# --------------------------------------------------------------------------------------------
# Defects: a cached graph after the parameters' tensors were swapped or converted
# --------------------------------------------------------------------------------------------
def test_unseen11_vector_to_parameters_refuses_stale_cached_graph() -> None:
    """``vector_to_parameters`` assigns ``p.data``, which leaves the version counter alone:
    the cached Hessian and the Jacobian kept giving the old point's products (1.6 and 2.2 off
    in max entry on main). Now refused; an uncached operator follows the new point exactly."""
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    J = JacobianLinearOperator(model, x)
    Hu = HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False)
    vector_to_parameters(2 * parameters_to_vector(model.parameters()), model.parameters())
    J_new, H_new = _dense(model, x, y)
    eye = np.eye(H.shape[0])
    with pytest.raises(RuntimeError, match=r"replaced.*parameter 0 \(shape \(4, 3\)\)"):
        H @ eye[0]
    with pytest.raises(RuntimeError, match="replaced.*vector_to_parameters"):
        J @ eye[0]
    np.testing.assert_allclose(Hu @ eye, H_new, rtol=1e-10, atol=1e-12)
    fresh = JacobianLinearOperator(model, x)
    np.testing.assert_allclose(fresh @ eye, J_new, rtol=1e-10, atol=1e-12)


def test_unseen11_model_converted_after_construction_is_refused_by_name() -> None:
    """``model.double()`` after building: main's cached operators gave float32 products of
    the old graph silently, the uncached ones blamed the inputs ("mat1 and mat2 must have the
    same dtype"), the Jacobian said the outputs "do not depend on" the parameters."""
    model = _mlp(torch.float32)
    x, y = _data(torch.float32)
    ops = {
        "cached": HessianLinearOperator(model, nn.MSELoss(), (x, y)),
        "uncached": GGNLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False),
        "batches": GGNLinearOperator(model, nn.MSELoss(), [(x[:3], y[:3]), (x[3:], y[3:])]),
        "jacobian": JacobianLinearOperator(model, x),
    }
    model.double()
    for name, op in ops.items():
        with pytest.raises(RuntimeError, match=r"converted.*now torch\.float64.*torch\.float32"):
            op @ np.ones(op.shape[1])
        if name != "jacobian":
            with pytest.raises(RuntimeError, match="converted"):
                op.gradient()


def test_unseen11_in_place_change_message_kept() -> None:
    """The in-place wording (optimizer.step) is unchanged by the tensor comparison."""
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    with torch.no_grad():
        model[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"changed in place.*parameter 0"):
        H @ np.ones(H.shape[0])


# --------------------------------------------------------------------------------------------
# Defect: pickle and deepcopy failed with torch's unrelated messages
# --------------------------------------------------------------------------------------------
def test_unseen11_pickle_and_deepcopy_refused_clearly_copy_works() -> None:
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    J = JacobianLinearOperator(model, x)
    for op in (H, J, H.damped(1.0), J.H):
        with pytest.raises(TypeError, match="cannot be pickled or deep-copied.*state_dict"):
            pickle.dumps(op)
        with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
            copy.deepcopy(op)
    v = np.arange(H.shape[0], dtype=np.float64)
    np.testing.assert_array_equal(copy.copy(H) @ v, H @ v)
    np.testing.assert_array_equal(copy.copy(J) @ v, J @ v)


def test_unseen11_params_given_as_names_get_the_fix() -> None:
    model, (x, y) = _mlp(), _data()
    with pytest.raises(TypeError, match=r"str '0\.weight'.*not names"):
        HessianLinearOperator(model, nn.MSELoss(), (x, y), params=["0.weight"])
    with pytest.raises(TypeError, match=r"\('0\.weight', \.\.\.\) pair.*named_parameters"):
        HessianLinearOperator(model, nn.MSELoss(), (x, y), params=model.named_parameters())


# --------------------------------------------------------------------------------------------
# Checked and right (guards)
# --------------------------------------------------------------------------------------------
def test_unseen11_lsqr_lsmr_svds_on_jacobian_match_numpy() -> None:
    """The rmatvec (VJP) path through SciPy's least-squares and SVD solvers."""
    model, (x, _) = _mlp(), _data()
    J = JacobianLinearOperator(model, x)
    Jd, _ = _dense(model, x, _data()[1])
    u = np.random.default_rng(0).standard_normal(J.shape[0])
    ref = np.linalg.lstsq(Jd, u, rcond=None)[0]  # 12 x 26: the minimum-norm solution
    tol = dict(atol=1e-14, btol=1e-14)
    np.testing.assert_allclose(sla.lsqr(J, u, iter_lim=500, **tol)[0], ref, atol=1e-10)
    np.testing.assert_allclose(sla.lsmr(J, u, maxiter=500, **tol)[0], ref, atol=1e-10)
    s = np.sort(sla.svds(J, k=3, return_singular_vectors=False, random_state=0))[::-1]
    np.testing.assert_allclose(s, np.linalg.svd(Jd, compute_uv=False)[:3], rtol=1e-10)


@pytest.mark.slow  # ~3 s: SciPy inverts H - sigma I by GMRES to machine precision
def test_unseen11_eigsh_shift_invert_matches_dense() -> None:
    """``eigsh(sigma=...)`` on an operator: SciPy builds the inverse by its iterative solver."""
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    ev = np.linalg.eigvalsh(_dense(model, x, y)[1])
    near = np.sort(ev[np.argsort(np.abs(ev - 0.05))[:2]])
    w = sla.eigsh(H, k=2, sigma=0.05, which="LM", return_eigenvectors=False, v0=np.ones(26))
    np.testing.assert_allclose(np.sort(w), near, rtol=1e-6)


def test_unseen11_blocks_of_other_layouts_and_dtypes_match_dense() -> None:
    """Fortran-ordered, float32 and integer blocks go in converted; (n, 0) gives (n, 0)."""
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    Hd = _dense(model, x, y)[1]
    eye = np.eye(26)
    np.testing.assert_allclose(H.matmat(np.asfortranarray(eye)), Hd, atol=1e-12)
    out = H.matmat(eye.astype(np.float32))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, Hd, atol=1e-12)
    np.testing.assert_allclose(H @ np.ones(26, dtype=np.int64), Hd.sum(1), atol=1e-12)
    assert H.matmat(np.zeros((26, 0))).shape == (26, 0)
    with pytest.raises(TypeError, match="complex"):
        H @ (np.ones(26) + 1j)


def test_unseen11_hutchinson_trace_within_its_closed_form_error() -> None:
    """Hutchinson on the Gauss-Newton operator against the dense trace, with a tolerance of
    5 standard deviations from the closed-form variance 2(||G||_F^2 - sum G_ii^2)/m."""
    model, (x, y) = _mlp(), _data()
    G = GGNLinearOperator(model, nn.MSELoss(), (x, y))
    Jd, _ = _dense(model, x, y)
    Gd = Jd.T @ Jd * (2 / Jd.shape[0])  # mean of 12 squared errors: H_L = (2/12) I
    m = 200
    sd = np.sqrt(2 * (np.sum(Gd**2) - np.sum(np.diag(Gd) ** 2)) / m)
    est = hutchinson_trace(G, num_probes=m, seed=0)
    assert abs(est.estimate - np.trace(Gd)) <= 5 * sd
    assert 0.5 * sd <= est.std_error <= 2 * sd  # its own error estimate agrees
