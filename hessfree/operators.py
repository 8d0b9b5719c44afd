r"""SciPy ``LinearOperator`` views of curvature over a model, a loss and data.

Notation: :math:`\theta \in \mathbb{R}^n` the parameters (flattened in ``params`` order),
:math:`o_b = f_\theta(x_b)` the model outputs on batch :math:`b` (:math:`N_b` examples along
dimension 0, :math:`N = \sum_b N_b`), :math:`\ell_b = \ell(o_b, y_b)` the batch loss and

.. math::
    L(\theta) = \sum_b w_b\, \ell_b, \qquad
    w_b = N_b / N \ \text{for reduction 'mean'}, \qquad w_b = 1 \ \text{for 'sum'},

the loss over all the data (with ``'mean'`` a ragged last batch weighs only its share; for
cross-entropy and NLL losses with class-index targets, :math:`N_b` is what torch's ``'mean'``
divides by, the batch's total class ``weight`` of the targets that are not ``ignore_index``,
so the operator is the curvature of the loss on all the data at once).
The operators are the curvature matrices of :math:`L` at the current :math:`\theta`:

* :class:`HessianLinearOperator`: :math:`H = \nabla^2 L` (Pearlmutter 1994);
* :class:`GGNLinearOperator`: :math:`G = \sum_b w_b J_b^\top H_{\ell_b} J_b` (Schraudolph 2002);
* :class:`FisherLinearOperator`: the empirical Fisher :math:`F = \tfrac1N \sum_i g_i g_i^\top`
  (``'sum'``: :math:`\sum_i g_i g_i^\top`), :math:`g_i` the gradient of example :math:`i`'s loss;
* :class:`MCFisherLinearOperator`: the Monte-Carlo Fisher :math:`\hat F = \sum_b w_b J_b^\top
  \hat H_{\ell_b} J_b` with labels drawn once from the model's predictive distribution
  (:class:`~hessfree.MCFisherProduct`), :math:`\mathbb E[\hat F] = G`;
* :class:`JacobianLinearOperator`: :math:`J = \partial o/\partial\theta`, shape
  ``(outputs.numel(), n)``; ``matvec`` is a JVP, ``rmatvec`` a VJP.

Each is a :class:`scipy.sparse.linalg.LinearOperator`, so ``cg``, ``minres`` (``shift=`` for
damping), ``gmres``, ``eigsh``, ``lobpcg``, ``lsqr`` and ``svds`` accept it directly and
SciPy's operator algebra composes (``H + lam * I`` with ``I`` an identity operator, which
``H.damped(lam)`` builds for you). Nothing :math:`n \times n` is ever formed:
every product is autograd on the products of :mod:`hessfree.curvature`.

**Graphs.** With one batch the first-order graph is built once, at construction, and every
product reuses it (one forward pass in all); ``cache_graph=False`` trades that memory for a
forward pass per product. A cached graph (and the Jacobian's, always cached) belongs to the
parameters it was built at: once they change (``optimizer.step()``, ``load_state_dict``,
``p.data = ...``, or a write through ``p.data``, seen by comparing the values with a copy
taken at construction, one read of the parameters per product), its products raise
``RuntimeError``; the uncached products follow the current parameters. With several
batches each product runs one forward pass per batch (``progress=True`` shows a tqdm bar).
``matmat`` (``lobpcg``, probes in :mod:`hessfree.spectral`) goes through the batched products
(``is_grads_batched``).

**The numpy edge.** Products run in the parameters' dtype and on their device. A float32
model gives a float32 operator; ``dtype=numpy.float64`` presents it as float64 (for ARPACK's
accuracy) and converts only the vectors. On CPU arrays cross with ``torch.from_numpy`` /
``Tensor.numpy`` (no copy when the dtype matches and the array is contiguous); on CUDA only
the vector crosses the bus.

**Threads.** numpy's BLAS threads (SciPy's vector updates) and torch's (the products) fight
over the cores inside SciPy's solvers; wrap a solve in :func:`limit_blas_threads` (measured
numbers in :mod:`hessfree._threads`)::

    with limit_blas_threads(1):
        x, info = scipy.sparse.linalg.cg(G.damped(lam), b)

Several threads may share one operator, but not with a training step of the same model:
an uncached product whose parameters another thread changes between its batches' forward
passes (``optimizer.step()``, ``load_state_dict``) raises ``RuntimeError`` rather than sum
batches taken at two points, and buffer writes made by another thread's forward pass during
a product are refused like the product's own (the version counters they are seen by are
shared by all threads); hold one lock around the products and the steps.

**Shift-invert and the matrix exponential.** ``eigsh(A, sigma=s)`` inverts
:math:`A - sI` with SciPy's own GMRES when ``A`` is an operator, which can stall on an
indefinite curvature: for the Hessian of a 43-parameter MLP it failed ("gmres_loose did not
converge") after 22 s on one draw of the data and converged after 266 s on another, where
MINRES took 24 s (load 12; experiments/README.md, "operators16"). Pass the inverse as
``OPinv``, by MINRES, which takes a symmetric indefinite :math:`A - sI` (its ``shift``)::

    def solve(b):
        return scipy.sparse.linalg.minres(H, b, shift=s, rtol=1e-12)[0]
    OPinv = scipy.sparse.linalg.LinearOperator(H.shape, matvec=solve, dtype=H.dtype)
    values = scipy.sparse.linalg.eigsh(H, k=2, sigma=s, OPinv=OPinv, return_eigenvectors=False)

``scipy.sparse.linalg.expm_multiply(-G, v)`` works as is; pass ``traceA`` (e.g. from
:func:`hessfree.spectral.hutchinson_trace`) to spare SciPy its estimate and its warning.

**Stochastic layers.** Dropout and train-mode BatchNorm change the function between forward
passes, so products would not come from one matrix; the constructors refuse models with such
modules in training mode (call ``model.eval()``, or pass ``allow_training_mode=True``).
With ``allow_training_mode=True`` a train-mode BatchNorm normalises each batch by its own
statistics: the operator is :math:`\sum_b w_b \nabla^2 \ell_b` of those per-batch losses, a
fixed matrix that depends on how ``data`` is batched (with one batch, the curvature of the
train-mode loss on all of it), and its forward passes leave the running statistics as they
were (the operators read the model, they do not train it; the forward passes of such a
model take a per-model lock, so operators over it used from several threads keep that too).
Any other module whose forward pass writes to its buffers (a train-mode ``spectral_norm``'s
power iteration, a running average) is refused the same way, by what the operator's own
forward passes did: at construction (``ValueError``), or from a product after
``model.train()`` (``RuntimeError``); writes between products (a training loop's) are
not the operator's and pass. Randomness inside ``forward`` that is not a module
(``F.dropout(x, training=True)``) is not detected. (:class:`~hessfree.HessianFree` offers
another way: with ``replay_rng=True``, its default, a step's model calls draw one set of
random numbers and its trial calls another.)

**Where the code lives.** This module: the public operators. The numpy edge and the identity
of ``damped``: :mod:`hessfree._numpy_edge`; checks on ``(model, loss_fn, data)`` and the model
call: :mod:`hessfree._model_data`; batches, weighted sums and ranks (the constructor) or one
product (:meth:`~CurvatureLinearOperator.from_product`): :mod:`hessfree._product_sources`; the
base :class:`CurvatureLinearOperator`: :mod:`hessfree._curvature_operator`;
:func:`limit_blas_threads`: :mod:`hessfree._threads`.

Example:
    >>> from scipy.sparse.linalg import cg
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    >>> H = HessianLinearOperator(model, torch.nn.MSELoss(reduction="sum"), (x, y))
    >>> H @ np.ones(3)  # H = 2 x^T x = 2 I
    array([2., 2., 2.])
    >>> cg(H.damped(2.0), np.ones(3), rtol=1e-12)[0]  # (H + 2 I) x = 1
    array([0.25, 0.25, 0.25])

References:
    Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation.
    Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient descent.
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.2 (curvature over a
    mini-batch), §4.3 (Gauss-Newton).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_int, check_scalar_loss, unreached_params_error
from ._curvature_operator import CurvatureLinearOperator
from ._flat import ParamLayout
from ._graph_ops import twice_differentiable_weight_norm
from ._model_data import (
    _BufferWatch,
    _call_model,
    _check_model,
    _check_rows,
    _resolve_params,
    _shape,
    _to_device,
)
from ._numpy_edge import _AdjointOperator, _outside_inference_mode, _TorchLinearOperator
from ._product_sources import (
    _BuiltAt,
    refuse_once_differentiable,
    refuse_reentrant_checkpoint,
)
from ._rng import _batch_seed
from ._threads import limit_blas_threads
from .curvature import (
    MC_FISHER_LOSSES,
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    MCFisherProduct,
    _depends_on,
)

__all__ = [
    "CurvatureLinearOperator",
    "HessianLinearOperator",
    "GGNLinearOperator",
    "FisherLinearOperator",
    "MCFisherLinearOperator",
    "JacobianLinearOperator",
    "limit_blas_threads",
]


class HessianLinearOperator(CurvatureLinearOperator):
    r"""The Hessian :math:`H = \nabla^2 L` of the loss over the data, as a ``LinearOperator``.

    Each product is one backward pass through the gradient's graph (Pearlmutter 1994),
    ``matmat`` one batched backward pass. Arguments as :class:`CurvatureLinearOperator`.

    Example:
        >>> from scipy.sparse.linalg import eigsh
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> H = HessianLinearOperator(model, torch.nn.MSELoss(), (x, torch.zeros(2, 1).double()))
        >>> H.shape, H.dtype  # H = x^T x (mean over 2 examples of a squared error)
        ((2, 2), dtype('float64'))
        >>> eigsh(H, k=1, which="LA", return_eigenvectors=False)
        array([9.])

    References:
        Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation.
    """

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return HessianProduct(loss, self.params)

    @classmethod
    def from_function(
        cls, f: Callable[[Tensor], Tensor], x: Tensor, *, dtype: object = None
    ) -> HessianLinearOperator:
        r"""The Hessian :math:`\nabla^2 f(x)` of a scalar function of one tensor.

        The operator acts on flattened vectors of ``x.numel()`` entries (``x.reshape(-1)``
        order); the gradient graph is built once, here. Like :func:`hessfree.hvp` as an
        operator.

        Args:
            f: Maps a tensor shaped like ``x`` to a scalar.
            x: The point (not modified; need not require grad).
            dtype: As for the constructor.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor or ``f(x)`` not a tensor.
            ValueError: If ``f(x)`` is not a scalar or does not depend on ``x``.

        Example:
            >>> from scipy.optimize import rosen_hess
            >>> def rosen(x):
            ...     return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
            >>> x = torch.tensor([0.5, 1.5, -0.3], dtype=torch.float64)
            >>> H = HessianLinearOperator.from_function(rosen, x)
            >>> bool(np.allclose(H @ np.eye(3), rosen_hess(x.numpy())))
            True
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = f"tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"`x` must be a floating-point tensor, got {kind}.")
        with torch.enable_grad(), _outside_inference_mode():  # as the products (_numpy_edge)
            z = x.detach().reshape(-1).clone().requires_grad_(True)
            with twice_differentiable_weight_norm():  # torch's fused kernel: wrong Hessian
                loss = check_scalar_loss("f(x)", f(z.view_as(x)))
            refuse_reentrant_checkpoint([loss], "HessianLinearOperator.from_function")
            refuse_once_differentiable([loss], "HessianLinearOperator.from_function", "f")
            product = HessianProduct(loss, [z])
        return cls.from_product(product, dtype=dtype)


class GGNLinearOperator(CurvatureLinearOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top H_{\ell_b} J_b`.

    Positive semi-definite for convex losses (MSE, cross-entropy, BCE), so ``cg`` and
    ``eigsh``'s smallest eigenvalues behave. The loss Hessian is in closed form for MSE,
    softmax cross-entropy and BCE-with-logits (Schraudolph 2002; Martens 2010, §4.3).
    Arguments as :class:`CurvatureLinearOperator`.

    Example:
        >>> nn = torch.nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
        >>> G = GGNLinearOperator(model, torch.nn.MSELoss(), (x, y), dtype=np.float64)
        >>> G.shape, G.dtype  # a float32 model presented as float64
        ((9, 9), dtype('float64'))
        >>> v = np.ones(9)
        >>> bool(v @ (G @ v) >= 0)
        True

    References:
        Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient
        descent, Neural Computation. Martens (2010), §4.3.
    """

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return GGNProduct(loss, outputs, self.params)


class FisherLinearOperator(CurvatureLinearOperator):
    r"""The empirical Fisher :math:`F = \tfrac1N \sum_i g_i g_i^\top` (``'sum'``: no :math:`1/N`).

    :math:`g_i` is the gradient of example :math:`i`'s loss (examples along dimension 0 of
    the outputs); no per-example gradient is materialised. Arguments as
    :class:`CurvatureLinearOperator`; ``reduction`` also fixes the scale.

    Example:
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> loss_fn = torch.nn.MSELoss(reduction="sum")
        >>> F = FisherLinearOperator(model, loss_fn, (x, torch.zeros_like(x)))
        >>> F @ np.ones(1)  # g_i = 2 w x_i^2: 2^2 + 8^2
        array([68.])
    """

    # Quadratic in the loss: over batches with unequal shares of a mean (class weights,
    # ignore_index), each batch's Fisher is weighted by its share squared (_product_sources).
    _share_power = 2
    _loss_twice = False

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return FisherProduct(loss, outputs, self.params, reduction=self.reduction)


# The loss modules and functions MCFisherLinearOperator refuses at construction, before the data
# (others, e.g. a lambda, are recognised from their autograd node at the first product).
_MC_MODULES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
_MC_FUNCTIONS = (
    nn.functional.cross_entropy,
    nn.functional.mse_loss,
    nn.functional.binary_cross_entropy_with_logits,
)


def _check_mc_loss_fn(loss_fn: object) -> None:
    """Refuse a loss the Monte-Carlo Fisher cannot sample labels for, where it shows."""
    fn, options = loss_fn, {}
    if isinstance(loss_fn, functools.partial):
        fn, options = loss_fn.func, dict(loss_fn.keywords)
    # a torch.compile'd loss: its original decides here (a compiled function copies the
    # original's name and module, so F.cross_entropy compiled was refused as itself,
    # "compile19"); the autograd node at the first product tells whether the compile hides it
    if type(fn).__name__ == "OptimizedModule" and isinstance(
        getattr(fn, "_orig_mod", None), nn.Module
    ):
        fn = fn._orig_mod
    elif not isinstance(fn, nn.Module) and hasattr(fn, "_torchdynamo_orig_callable"):
        fn = fn._torchdynamo_orig_callable
        while fn not in _MC_FUNCTIONS and callable(getattr(fn, "__wrapped__", None)):
            fn = fn.__wrapped__  # dynamo's frame around a torch function (wrap_inline)
    if isinstance(fn, nn.Module):
        if not isinstance(fn, nn.modules.loss._Loss):
            return  # a user's module: its autograd node decides
        if not isinstance(fn, _MC_MODULES):
            found = f"nn.{type(fn).__name__}"
        else:
            options = {k: getattr(fn, k, None) for k in ("weight", "pos_weight")}
            options["label_smoothing"] = getattr(fn, "label_smoothing", 0.0)
            found = None
    elif getattr(fn, "__module__", None) == "torch.nn.functional":
        found = None if fn in _MC_FUNCTIONS else f"torch.nn.functional.{fn.__name__}"
    else:
        return
    if found is None:
        bad = [
            k
            for k in ("weight", "pos_weight", "label_smoothing")
            if options.get(k) is not None and not (k == "label_smoothing" and options[k] == 0)
        ]
        if not bad:
            return
        found = f"{type(fn).__name__ if isinstance(fn, nn.Module) else fn.__name__} with `{bad[0]}`"
    raise ValueError(
        f"MCFisherLinearOperator supports {MC_FISHER_LOSSES}; got {found}. The Monte-Carlo "
        "Fisher samples labels from the distribution the loss is the negative log-likelihood "
        "of (class weights, label smoothing and pos_weight break that); for other losses use "
        "GGNLinearOperator (the matrix it estimates) or FisherLinearOperator (the empirical "
        "Fisher)."
    )


class MCFisherLinearOperator(CurvatureLinearOperator):
    r"""The Monte-Carlo Fisher :math:`\hat F = \sum_b w_b J_b^\top \hat H_{\ell_b} J_b`.

    :math:`\hat H_{\ell_b}` is :class:`~hessfree.MCFisherProduct`'s sampled middle matrix:
    ``mc_samples`` labels per example drawn from the model's predictive distribution
    (categorical over the softmax for cross-entropy, Gaussian with variance ½ per entry for
    MSE, Bernoulli for BCE-with-logits), so :math:`\mathbb E[\hat F] = G`, the
    :class:`GGNLinearOperator`'s matrix: what curvlinops' ``FisherMCLinearOperator`` and
    BackPACK's MC-sampled GGN compute. Positive semi-definite.

    **One matrix.** The labels are drawn when a batch's product is built, from a generator
    seeded by ``seed``, the batch's place in ``data`` and the rank: every product of one
    operator (one cached batch, or each pass over several batches or ``cache_graph=False``)
    uses the same labels, so ``cg``, ``minres`` and ``eigsh`` see one symmetric matrix. Build
    a new operator (another ``seed``) for another draw.

    **Batches.** Unlike the empirical Fisher, :math:`\hat F` is linear in the loss (an
    estimate of :math:`G`), so batches combine with the weights :math:`w_b` of
    :class:`GGNLinearOperator` (class-index shares of a ``'mean'``, ``ignore_index`` rows out).

    Args:
        model, loss_fn, data: As :class:`CurvatureLinearOperator`; ``loss_fn`` is
            ``nn.CrossEntropyLoss`` (class indices), ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            (or the functional forms) with reduction ``'mean'`` or ``'sum'``.
        mc_samples: :math:`M \ge 1`, labels drawn per example (the variance falls as
            :math:`1/M`; the cost of a product barely changes).
        seed: Seed of the draws (an int :math:`\ge 0`); default: drawn once from torch's
            default CPU generator here, so ``torch.manual_seed`` makes it reproducible.
        **kwargs: ``params``, ``reduction``, ``dtype``, ``cache_graph``, ``progress``,
            ``allow_training_mode``, ``process_group``, as :class:`CurvatureLinearOperator`.

    Raises:
        TypeError: If ``mc_samples`` or ``seed`` is not an int (``True``, ``1.5``), or as
            :class:`CurvatureLinearOperator`.
        ValueError: If ``mc_samples < 1``, ``seed < 0``, or ``loss_fn`` is not a supported
            loss (a module or function at construction; a callable wrapping one, at its first
            product), or as :class:`CurvatureLinearOperator`.

    Example:
        >>> from scipy.sparse.linalg import cg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 4).double()
        >>> x, y = torch.randn(16, 3).double(), torch.randint(0, 4, (16,))
        >>> F = MCFisherLinearOperator(model, torch.nn.CrossEntropyLoss(), (x, y), seed=0)
        >>> v = np.random.default_rng(0).standard_normal(F.shape[0])  # not ones: a null direction
        >>> bool(np.array_equal(F @ v, F @ v)), bool(v @ (F @ v) > 0)
        (True, True)
        >>> p, info = cg(F.damped(1e-3), F.gradient(), rtol=1e-8)
        >>> info
        0

    References:
        Martens (2020), New insights and perspectives on the natural gradient method, JMLR.
    """

    _loss_twice = False  # sampled labels' gradients: the loss's first derivative only

    def __init__(
        self,
        model: nn.Module | Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: tuple[Any, Any] | Iterable[Sequence[Any]],
        *,
        mc_samples: int = 1,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.mc_samples = check_int("mc_samples", mc_samples, low=1)
        if seed is None and kwargs.get("_product") is None:  # from_product draws nothing
            seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        #: The seed of the draws (each batch's generator is seeded from it; ``None`` for
        #: :meth:`from_product`, whose product drew its labels already).
        self.seed = None if seed is None else check_int("seed", seed, low=0)
        if callable(loss_fn):  # a non-callable gets the base class's TypeError
            _check_mc_loss_fn(loss_fn)
        super().__init__(model, loss_fn, data, **kwargs)

    def _make_batch_product(self, loss: Tensor, outputs: Tensor, index: int) -> CurvatureProduct:
        if outputs.is_complex():  # else MCFisherProduct names the loss's autograd node only
            raise ValueError(
                f"MCFisherLinearOperator got complex outputs ({outputs.dtype}, shape "
                f"{tuple(outputs.shape)}); it samples real labels from the predictive "
                "distribution of a real loss. Pass lambda x: torch.view_as_real(model(x)) as "
                "the model and torch.nn.MSELoss on torch.view_as_real(targets) (a circular "
                "Gaussian: real and imaginary parts, each variance ½), or use "
                "GGNLinearOperator, exact for complex outputs (the matrix it estimates)."
            )
        rank = self._source._ranks.rank if self._source._ranks.active else 0
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, index, rank))
        return MCFisherProduct(
            loss, outputs, self.params, mc_samples=self.mc_samples, generator=generator
        )


# --------------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------------
def _batches_like(inputs: object) -> bool:
    """Whether ``inputs`` looks like the curvature operators' ``data`` (a list or tuple, a
    ``DataLoader`` or another iterable that is not a tensor, string or mapping)."""
    return not isinstance(inputs, Tensor | np.ndarray | str | bytes | Mapping) and isinstance(
        inputs, Iterable
    )


def _batches_error(inputs: object, err: BaseException) -> TypeError:
    """The Jacobian's error for a model that failed on a list, tuple or loader of inputs."""
    if isinstance(inputs, list | tuple):
        kinds = ", ".join(str(_shape(x)) for x in inputs[:4]) + (", ..." if len(inputs) > 4 else "")
        what = f"a {type(inputs).__name__} of {len(inputs)} item(s) [{kinds}]"
    else:
        what = f"a {type(inputs).__name__}"
    cause = err.__cause__ if isinstance(err.__cause__, TypeError | AttributeError) else err
    return TypeError(
        f"`model` failed on `inputs`, {what} ({cause}). JacobianLinearOperator calls "
        "model(inputs) once, on one batch of inputs as given: unlike the curvature operators' "
        "`data`, `inputs` is not an (inputs, targets) pair, a list of batches or a DataLoader. "
        "Pass one tensor of inputs (torch.cat the batches' inputs; no targets: the Jacobian "
        "has no loss). For a model of several inputs: a tuple is not unpacked: pass "
        "lambda args: model(*args) as the model."
    )


class JacobianLinearOperator(_TorchLinearOperator):
    r"""The output Jacobian :math:`J = \partial o/\partial\theta` of ``model(inputs)``.

    Shape ``(outputs.numel(), n)``, rows in ``outputs.reshape(-1)`` order. ``matvec`` is a
    JVP (double-backward R-op on a graph built once), ``rmatvec`` a VJP (one backward pass);
    the adjoint ``J.H`` is the VJP operator. Suits ``lsqr`` and ``svds``. On a float32 model
    ``lsmr`` may warn numpy's "overflow encountered in cast", for an int or a float64
    right-hand side alike: the products are float32 whatever the vector's dtype, and lsmr
    compares its start value 1e100 with the float32 scalars they give (the comparison's
    result is right). SciPy's own float32 dense matrix warns so with a float32 right-hand
    side; with a float64 or int one it multiplies in float64 ("leftovers19").
    ``dtype=numpy.float64`` presents the products as float64 (no warning, float32
    accuracy still); float64 products need a float64 copy of the model.

    Args:
        model: An ``nn.Module`` or a callable ``inputs -> outputs`` (a tensor).
        inputs: The model inputs (their tensors moved to the parameters' device, also inside
            tuples, lists, dicts, namedtuples and dataclasses).
        params: As :class:`CurvatureLinearOperator`.
        dtype: As :class:`CurvatureLinearOperator`.
        allow_training_mode: As :class:`CurvatureLinearOperator`.

    Raises:
        TypeError: For a ``model``, ``params`` or ``dtype`` of the wrong type, complex
            ``params``, if the model does not return a tensor or returns a complex one (the
            message shows ``torch.view_as_real``), or if it fails on ``inputs`` given as a
            list, tuple or ``DataLoader`` (the message says what ``inputs`` may be).
        ValueError: If ``inputs`` has zero rows, ``model`` fails on them, its outputs depend
            on none of ``params`` (some unused ones are fine: zero columns), or it has
            stochastic modules in training mode or a forward pass that writes to its buffers.
        RuntimeError: From a product, if ``params`` changed since construction.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        >>> J = JacobianLinearOperator(model, x)  # J = x for a bias-free linear map
        >>> J.shape, J @ np.array([1.0, 0.0]), J.H @ np.ones(3)
        ((3, 2), array([1., 3., 5.]), array([ 9., 12.]))
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Any], Tensor],
        inputs: Any,
        *,
        params: Iterable[Tensor] | None = None,
        dtype: object = None,
        allow_training_mode: bool = False,
    ) -> None:
        _check_model(model, allow_training_mode)
        buffers = _BufferWatch(model, allow_training_mode)
        params = _resolve_params(model, params)
        layout = ParamLayout(params)
        _check_rows(inputs, "inputs")
        inputs = _to_device(inputs, layout.device)
        with torch.enable_grad(), _outside_inference_mode():  # as the products (_numpy_edge)
            before = buffers.versions()
            try:
                outputs = _call_model(model, inputs)
            except (TypeError, AttributeError) as err:
                if not _batches_like(inputs):
                    raise
                raise _batches_error(inputs, err) from err
            buffers.refuse_written(before, at_construction=True)
            if outputs.is_complex():  # the edge is real: J v would lose its imaginary part
                raise TypeError(
                    f"`model(inputs)` is complex ({outputs.dtype}); JacobianLinearOperator is a "
                    "real operator (its products would drop the imaginary parts). Pass "
                    "lambda x: torch.view_as_real(model(x)) as the model: the Jacobian of the "
                    "real and imaginary parts, interleaved along a last dimension of 2."
                )
            self._jacobian = JacobianProduct(outputs, params)
            if not _depends_on([outputs], params):  # here, not silently zero products later
                raise unreached_params_error("model(inputs)", len(params))
            refuse_reentrant_checkpoint([outputs], "JacobianLinearOperator")
            refuse_once_differentiable([outputs], "JacobianLinearOperator", "the model")
        self.params = params
        #: The shape of ``model(inputs)``; rows of the operator are its entries in order.
        self.output_shape = tuple(outputs.shape)
        self._built_at = _BuiltAt(params)
        super().__init__((outputs.numel(), layout.numel), layout.dtype, layout.device, dtype)

    def _check_fresh(self) -> None:
        self._built_at.check("Build a new JacobianLinearOperator at the new parameters.")

    def _mv(self, v: Tensor) -> Tensor:
        self._check_fresh()
        return self._jacobian.jvp(v).reshape(-1)

    def _mm(self, V: Tensor) -> Tensor:
        self._check_fresh()
        try:
            return self._jacobian.batched_jvp(V).reshape(V.shape[0], -1)
        except (RuntimeError, NotImplementedError):  # no batching rule for some op
            return torch.stack([self._mv(v) for v in V])

    def _rmv(self, u: Tensor) -> Tensor:
        self._check_fresh()
        return self._jacobian.vjp(u.view(self.output_shape))

    def _rmm(self, U: Tensor) -> Tensor:
        self._check_fresh()
        try:
            return self._jacobian.batched_vjp(U.view(U.shape[0], *self.output_shape))
        except (RuntimeError, NotImplementedError):
            return torch.stack([self._rmv(u) for u in U])

    def _adjoint(self) -> _AdjointOperator:
        """:math:`J^\\top` (VJP), whose own adjoint is :math:`J` again."""
        return _AdjointOperator(self)

    _transpose = _adjoint
