"""hessfree: Hessian-free second-order optimization for PyTorch.

Exact curvature-vector products (:mod:`hessfree.curvature`), SciPy ``LinearOperator`` views of
curvature (:mod:`hessfree.operators`), truncated conjugate gradient (:mod:`hessfree.cg`) and the
Martens-style :class:`HessianFree` optimizer (:mod:`hessfree.optimizer`).
"""

from __future__ import annotations

from . import spectral  # used qualified: hessfree.spectral.top_eigenpairs
from ._flat import ParamLayout, trainable
from ._graph_ops import twice_differentiable_weight_norm
from ._settings import HFSettings
from .acceleration import ProductPolicy, accelerate
from .cg import CGResult, CGStop, StopReason, cg
from .curvature import (
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    MCFisherProduct,
    StructurallyDampedGGN,
    hvp,
    loss_hessian_product,
)
from .damping import reduction_ratio, update_damping
from .operators import (
    CurvatureLinearOperator,
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    MCFisherLinearOperator,
    limit_blas_threads,
)
from .optimizer import Convergence, HessianFree, StepInfo, StepStatus
from .preconditioning import (
    CGPairPreconditioner,
    EmpiricalFisherDiagonal,
    KFACPreconditioner,
    NystromPreconditioner,
    PrecondContext,
    nystrom_sketch,
)
from .recurrent import HiddenRecorder, mark_hidden, record_hidden

__version__ = "0.1.0"

__all__ = [
    # products
    "hvp",
    "CurvatureProduct",
    "HessianProduct",
    "GGNProduct",
    "FisherProduct",
    "MCFisherProduct",
    "JacobianProduct",
    "StructurallyDampedGGN",
    "loss_hessian_product",
    "ProductPolicy",
    "accelerate",
    # operators
    "CurvatureLinearOperator",
    "HessianLinearOperator",
    "GGNLinearOperator",
    "FisherLinearOperator",
    "MCFisherLinearOperator",
    "JacobianLinearOperator",
    "limit_blas_threads",
    # solver
    "cg",
    "CGResult",
    "CGStop",
    "StopReason",  # former name of CGStop
    # optimizer
    "HessianFree",
    "HFSettings",
    "StepInfo",
    "StepStatus",
    "Convergence",
    "EmpiricalFisherDiagonal",
    "KFACPreconditioner",
    "NystromPreconditioner",
    "CGPairPreconditioner",
    "PrecondContext",
    "nystrom_sketch",
    "reduction_ratio",
    "update_damping",
    "record_hidden",
    "mark_hidden",
    "HiddenRecorder",
    # submodules
    "spectral",
    # helpers
    "ParamLayout",
    "trainable",
    "twice_differentiable_weight_norm",
]
