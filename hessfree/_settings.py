r"""The hyperparameters of :class:`hessfree.HessianFree`, in one frozen, validated object.

:class:`HFSettings` is the single place where a hyperparameter's name, default, type and allowed
range live: :class:`~hessfree.HessianFree` builds one from its keyword arguments and stores the
plain ones in its ``param_groups`` (so ``state_dict()`` carries them, as ``torch.optim.LBFGS``'s
does), and the experiment runner's config schema validates a YAML entry with
:meth:`HFSettings.from_kwargs` / :meth:`HFSettings.problems` without building an optimizer.
Every check raises ``ValueError`` for a bad value and ``TypeError`` for a bad type, with a
message that names the key, shows the value and says what is allowed (:mod:`hessfree._checks`).
The meaning of each field is documented on :class:`~hessfree.HessianFree`'s arguments.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ._checks import check_choice, check_int, check_number
from .acceleration import ProductPolicy
from .cg import _check_max_iter
from .damping import DAMPING_METRICS, DAMPING_RULES, DampingPolicy

__all__ = ["HFSettings"]

CURVATURES = ("auto", "ggn", "hessian", "fisher", "fisher_mc")
#: ``cg_max_iter='auto'``: the reference code's 250 (Martens 2010), on structurally damped steps
#: ``_SD_CG_MAX_ITER`` (``HessianFree``'s ``cg_max_iter``; the evidence is there).
_AUTO_CG_MAX_ITER = 250
_SD_CG_MAX_ITER = 25
#: ``cg_max_iter='auto'`` on a K-FAC-preconditioned step whose objective is seen stochastic
#: (mini-batches): two CG iterations, the K-FAC-like regime of the scorecard's tuned CURVES and
#: MNIST-1D rows (``experiments/README.md``, "ablate" and "kfac2").
_KFAC_STOCHASTIC_CG_MAX_ITER = 2
#: ``cg_max_iter='auto'`` on a K-FAC-preconditioned step of an objective seen deterministic
#: (full batch, or a growing batch that has reached the set): five CG iterations; ours, from
#: MNIST-1D's times to the scorecard's targets, full batch and in the tuned batch schedule
#: (``experiments/README.md``, "wholebatch").
_KFAC_DETERMINISTIC_CG_MAX_ITER = 5
#: ``min_damping='auto'``: this fraction of the curvature scale |gᵀCg|/gᵀDg where the optimizer
#: has measured it, else this absolute value (the former default ``min_damping=1e-8``; ours).
#: A fraction keeps the floor where it was for a loss of scale ~1 and moves it with the loss
#: (``experiments/README.md``, "lamscale"). In float64 the optimizer passes the scale times
#: eps64/eps32 (``_damping_control._precision_share``; "unseenfb").
AUTO_MIN_DAMPING = 1e-8
#: ``max_damping='auto'``: the upper bound on :math:`\lambda` as this multiple of the curvature
#: scale :math:`|g_0^\top C g_0| / g_0^\top D g_0` where the optimizer has measured it, else
#: this absolute value (the former default ``max_damping=1e10``). Absolute, the cap bent the
#: trajectory of a loss multiplied by :math:`2^{33}` or more, whose :math:`\lambda` it clipped
#: while every other quantity scaled exactly (``experiments/README.md``, "unseen14").
AUTO_MAX_DAMPING = 1e10


@dataclass(frozen=True)
class HFSettings:
    r"""All of :class:`~hessfree.HessianFree`'s hyperparameters, validated on construction.

    The fields are :class:`~hessfree.HessianFree`'s keyword arguments (see there for their
    meaning) with the same defaults. Numbers are stored as ``float``/``int``, ``products`` as a
    :class:`~hessfree.ProductPolicy`; ``precond='auto'``, ``'martens'`` or ``'nystrom'`` stays the
    string (the optimizer builds the preconditioner).

    Raises:
        ValueError: If a value is out of range (the message names the key and what is allowed).
        TypeError: If a value has the wrong type.

    Example:
        >>> s = HFSettings(cg_max_iter=50)
        >>> s.cg_max_iter, s.damping, s.initial_damping
        (50, 'auto', nan)
        >>> s.replace(damping=10).initial_damping
        10.0
        >>> HFSettings.from_kwargs(armijo_c=2)
        Traceback (most recent call last):
        ...
        ValueError: `armijo_c` must be in (0.0, 1.0), got 2.0.
        >>> for key, message in HFSettings.problems({"cg_max_iter": 0, "line_search": "wolfe"}):
        ...     print(key, "|", message)
        cg_max_iter | `cg_max_iter` must be an int >= 1, got 0.
        line_search | Unknown `line_search` 'wolfe'; expected one of 'armijo'.
    """

    lr: float = 1.0
    curvature: str | Callable = "auto"
    damping: float | str = "auto"
    adapt_damping: bool = True
    damping_rule: str = "nielsen"
    damping_metric: str = "identity"
    damping_increase: float = 1.5
    damping_decrease: float = 2.0 / 3.0
    min_damping: float | str = "auto"
    max_damping: float | str = "auto"
    relative_min_damping: float | str = "auto"
    weight_decay: float = 0.0
    structural_damping: float | str = "auto"
    cg_max_iter: int | str = "auto"
    cg_min_iter: int = 1
    cg_rtol: float | str = "auto"
    cg_progress_tol: float = 5e-4
    cg_decay: float | str = "auto"
    cg_check_every: int | None = None
    cg_stop_on_increase: bool | str = "auto"
    backtrack: bool = True
    trust_radius: bool | str = "auto"
    extrapolate: bool | str = "auto"
    line_search: str | None = "armijo"
    armijo_c: float = 1e-2
    line_search_shrink: float = 0.8
    line_search_max_iter: int = 60
    precond: Any = "auto"  # 'auto', None, 'martens', 'nystrom', a preconditioner or a callable
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    max_iter: int = 1
    max_eval: int | None = None
    max_failures: int = 10
    callback: Callable | None = None
    seed: int = 0
    process_group: object | None = None
    curvature_batch: str = "sharded"
    products: ProductPolicy | Mapping | None = None
    replay_rng: bool = True

    #: Settings that may differ between param groups (the rest are one per optimizer).
    PER_GROUP: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")
    #: Settings that take Python objects, which a YAML file cannot express.
    PYTHON_ONLY: ClassVar[tuple[str, ...]] = ("callback", "process_group")
    #: Settings kept in every param group, so ``state_dict()`` carries them: the plain-valued
    #: ones (``curvature`` and ``precond`` may be callables, ``products`` is an object).
    GROUP_KEYS: ClassVar[tuple[str, ...]] = (
        "lr",
        "weight_decay",
        "tolerance_grad",
        "tolerance_change",
        "max_iter",
        "max_eval",
        "damping",
        "adapt_damping",
        "damping_rule",
        "damping_metric",
        "damping_increase",
        "damping_decrease",
        "min_damping",
        "max_damping",
        "relative_min_damping",
        "structural_damping",
        "cg_max_iter",
        "cg_min_iter",
        "cg_rtol",
        "cg_progress_tol",
        "cg_decay",
        "cg_check_every",
        "cg_stop_on_increase",
        "backtrack",
        "trust_radius",
        "extrapolate",
        "line_search",
        "armijo_c",
        "line_search_shrink",
        "line_search_max_iter",
        "max_failures",
        "seed",
        "curvature_batch",
        "replay_rng",
    )

    def __post_init__(self) -> None:
        for key, value in _validated(self).items():
            object.__setattr__(self, key, value)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> HFSettings:
        """Settings from keyword arguments; an unknown key is a ``TypeError`` listing the keys."""
        unknown = [k for k in kwargs if k not in cls.keys()]
        if unknown:
            raise TypeError(
                f"Unknown HessianFree setting `{unknown[0]}` = {kwargs[unknown[0]]!r}; expected "
                f"one of {', '.join(cls.keys())}."
            )
        return cls(**kwargs)

    @classmethod
    def problems(cls, kwargs: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Every problem with ``kwargs`` as ``(key, message)``; empty if they are valid.

        Each key is checked alone (so each message belongs to one key), then, if all pass,
        all together for the constraints between keys (``key`` is then the first key the
        message names, or ``None``).
        """
        found: list[tuple[str | None, str]] = []
        for key, value in kwargs.items():
            try:
                cls.from_kwargs(**{key: value})
            except (TypeError, ValueError) as err:
                found.append((key, str(err)))
        if not found and kwargs:
            try:
                cls.from_kwargs(**kwargs)
            except (TypeError, ValueError) as err:
                message = str(err)
                named = [k for k in kwargs if f"`{k}`" in message or f"{k}=" in message]
                found.append((named[0] if named else None, message))
        return found

    def replace(self, **changes: Any) -> HFSettings:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------ listing
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The setting names, in :class:`~hessfree.HessianFree`'s argument order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each setting's default, as written (``products=None``, not a policy object)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def group_values(self) -> dict[str, Any]:
        """The values stored in each param group (:attr:`GROUP_KEYS`)."""
        return {k: getattr(self, k) for k in self.GROUP_KEYS}

    def damping_policy(self, scale: float = 0.0, curvature: float = 0.0) -> DampingPolicy:
        """The rule that changes :math:`\\lambda` from step to step, with its bounds.

        Args:
            scale: The curvature scale :math:`|g^\\top C g| / g^\\top D g` the optimizer
                measured (``state['damping_scale']``), or 0 where it has none: the lower
                bound of ``min_damping='auto'`` is ``AUTO_MIN_DAMPING`` times it where it is
                finite and > 0, else ``AUTO_MIN_DAMPING`` itself; a number is absolute.
            curvature: The curvature scale itself (``state['damping_scale']``; ``scale`` is
                its first measurement times a precision share), or 0: the upper bound of
                ``max_damping='auto'`` is ``AUTO_MAX_DAMPING`` times it (:meth:`max_damping_at`).

        Example:
            >>> HFSettings().damping_policy(scale=300.0).min_damping
            3e-06
            >>> HFSettings().damping_policy().min_damping  # no scale measured
            1e-08
            >>> HFSettings(min_damping=0.0).damping_policy(scale=300.0).min_damping
            0.0
        """
        return DampingPolicy(
            adapt=self.adapt_damping,
            rule=self.damping_rule,
            increase=self.damping_increase,
            decrease=self.damping_decrease,
            min_damping=self.min_damping_at(scale),
            max_damping=self.max_damping_at(curvature),
        )

    def min_damping_at(self, scale: float = 0.0) -> float:
        """The lower bound on :math:`\\lambda` for the curvature scale ``scale`` (0: unknown),
        at most ``max_damping`` (:meth:`damping_policy`)."""
        if not isinstance(self.min_damping, str):
            return self.min_damping
        known = math.isfinite(scale) and scale > 0
        low = AUTO_MIN_DAMPING * scale if known else AUTO_MIN_DAMPING
        return low if isinstance(self.max_damping, str) else min(low, self.max_damping)

    def max_damping_at(self, curvature: float = 0.0) -> float:
        """The upper bound on :math:`\\lambda` for the curvature scale ``curvature`` (0:
        unknown): ``AUTO_MAX_DAMPING`` times it under ``'auto'`` (at least a given
        ``min_damping``), a number as it is.

        Example:
            >>> HFSettings().max_damping_at(300.0)
            3000000000000.0
            >>> HFSettings().max_damping_at()  # no scale measured
            10000000000.0
        """
        if not isinstance(self.max_damping, str):
            return self.max_damping
        known = math.isfinite(curvature) and curvature > 0
        high = AUTO_MAX_DAMPING * curvature if known else AUTO_MAX_DAMPING
        return high if isinstance(self.min_damping, str) else max(high, self.min_damping)

    @property
    def initial_damping(self) -> float:
        """The initial :math:`\\lambda`: the number given, or NaN for ``'auto'`` (calibrated)."""
        return math.nan if isinstance(self.damping, str) else self.damping


def _validated(s: HFSettings) -> dict[str, Any]:
    """Check every field of ``s`` (in the optimizer's historical order); return normalised ones."""
    out: dict[str, Any] = {}
    out["lr"] = check_number("lr", s.lr, low=0.0)
    out["tolerance_grad"] = check_number("tolerance_grad", s.tolerance_grad, low=0.0)
    out["tolerance_change"] = check_number("tolerance_change", s.tolerance_change, low=0.0)
    out["weight_decay"] = check_number("weight_decay", s.weight_decay, low=0.0)
    if not callable(s.curvature):
        check_choice("curvature", s.curvature, CURVATURES)
    if isinstance(s.damping, str):
        check_choice("damping", s.damping, ("auto",))
    else:
        out["damping"] = check_number("damping", s.damping, low=0.0, low_open=True)
    if isinstance(s.structural_damping, str):
        if s.structural_damping != "auto":
            raise ValueError(
                "`structural_damping` must be 'auto' or a number >= 0, got "
                f"{s.structural_damping!r}."
            )
        structural = 0.0  # 'auto' is on only where Gauss-Newton products and hidden states are
    else:
        structural = out["structural_damping"] = check_number(
            "structural_damping", s.structural_damping, low=0.0
        )
    if structural > 0 and s.curvature not in ("auto", "ggn"):
        raise ValueError(
            "`structural_damping` > 0 needs Gauss-Newton curvature, "
            f"got curvature={s.curvature!r}; "
            "use curvature='ggn' (or 'auto')."
        )
    _check_bool("adapt_damping", s.adapt_damping)
    check_choice("damping_rule", s.damping_rule, DAMPING_RULES)
    check_choice("damping_metric", s.damping_metric, DAMPING_METRICS)
    if s.damping_metric == "marquardt":
        if callable(s.curvature) or s.curvature not in ("auto", "ggn"):
            raise ValueError(
                "damping_metric='marquardt' scales the damping by the Gauss-Newton diagonal "
                f"and needs Gauss-Newton curvature, got curvature={s.curvature!r}; use "
                "curvature='ggn' (or 'auto' with a closure that returns (loss, outputs)), or "
                "damping_metric='identity'."
            )
        if s.trust_radius is True:
            raise ValueError(
                "damping_metric='marquardt' runs CG in Moré's scaled variables, where "
                "`trust_radius`'s ball is not the one its radius is measured in; got "
                "trust_radius=True, use 'auto' (off with Gauss-Newton curvature) or "
                "damping_metric='identity'."
            )
        if structural > 0:
            raise ValueError(
                "damping_metric='marquardt' and `structural_damping` > 0 are two metrics for "
                f"the damping, got structural_damping={s.structural_damping!r}; use one: "
                "structural_damping=0 (or 'auto', off under 'marquardt'), or "
                "damping_metric='identity'."
            )
    out["damping_increase"] = check_number(
        "damping_increase",
        s.damping_increase,
        low=1.0,
        low_open=True,
        hint="did you swap it with `damping_decrease`?"
        if _real_in(s.damping_increase, 0, 1)
        else "",
    )
    out["damping_decrease"] = check_number(
        "damping_decrease",
        s.damping_decrease,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        hint="did you swap it with `damping_increase`?"
        if _real_in(s.damping_decrease, 1, math.inf)
        else "",
    )
    if isinstance(s.min_damping, str):
        if s.min_damping != "auto":
            raise ValueError(
                f"`min_damping` must be 'auto' or a number >= 0, got {s.min_damping!r}."
            )
        # 'auto' is AUTO_MIN_DAMPING × the curvature scale, or AUTO_MIN_DAMPING where that is
        # unknown: `max_damping` and a given `damping` are checked against the latter
        low, shown = AUTO_MIN_DAMPING, f"'auto' ({AUTO_MIN_DAMPING!r} before a curvature scale)"
    else:
        low = out["min_damping"] = check_number("min_damping", s.min_damping, low=0.0)
        shown = repr(low)
    if isinstance(s.max_damping, str):
        if s.max_damping != "auto":
            raise ValueError(
                f"`max_damping` must be 'auto' or a number > min_damping, got {s.max_damping!r}."
            )
        # 'auto' is AUTO_MAX_DAMPING × the curvature scale, or AUTO_MAX_DAMPING where that is
        # unknown (at least a given min_damping): a given `damping` is checked against the latter
        high = max(AUTO_MAX_DAMPING, low)
    else:
        high = out["max_damping"] = check_number(
            "max_damping",
            s.max_damping,
            low=low,
            high=math.inf,
            low_open=True,
            hint=f"(`min_damping` is {shown}; `max_damping` must exceed it)",
        )
    if isinstance(s.relative_min_damping, str):
        check_choice("relative_min_damping", s.relative_min_damping, ("auto",))
    else:
        out["relative_min_damping"] = check_number(
            "relative_min_damping",
            s.relative_min_damping,
            low=0.0,
            high=1.0,
            hint="It is a fraction of the curvature scale g'Cg/g'g; for an absolute floor on "
            "the damping use `min_damping`."
            if _real_in(s.relative_min_damping, 1, math.inf)
            else "",
        )
    initial = out.get("damping", math.nan)
    if not math.isnan(initial) and not (low <= initial <= high):
        raise ValueError(
            f"`damping` must be in [min_damping, max_damping] = [{low!r}, {high!r}], "
            f"got {initial!r}."
        )
    if isinstance(s.cg_max_iter, str):
        check_choice("cg_max_iter", s.cg_max_iter, ("auto",))
        most = _AUTO_CG_MAX_ITER  # 'auto' is this, or fewer on structurally damped steps
    else:
        most = out["cg_max_iter"] = _check_max_iter("cg_max_iter", s.cg_max_iter)
    out["cg_min_iter"] = check_int("cg_min_iter", s.cg_min_iter, low=0, high=most)
    if isinstance(s.cg_rtol, str):
        check_choice("cg_rtol", s.cg_rtol, ("auto",))
    else:
        out["cg_rtol"] = check_number("cg_rtol", s.cg_rtol, low=0.0)
    out["cg_progress_tol"] = check_number(
        "cg_progress_tol", s.cg_progress_tol, low=0.0, low_open=True
    )
    if isinstance(s.cg_decay, str):
        check_choice("cg_decay", s.cg_decay, ("auto",))
    else:
        out["cg_decay"] = check_number("cg_decay", s.cg_decay, low=0.0, high=1.0)
    if s.cg_check_every is not None:
        out["cg_check_every"] = check_int("cg_check_every", s.cg_check_every, low=1)
    _check_auto_or_bool("cg_stop_on_increase", s.cg_stop_on_increase)
    _check_bool("backtrack", s.backtrack)
    if isinstance(s.trust_radius, str):
        check_choice("trust_radius", s.trust_radius, ("auto",))
    else:
        _check_bool("trust_radius", s.trust_radius)
    _check_auto_or_bool("extrapolate", s.extrapolate)
    if s.line_search is not None:
        check_choice("line_search", s.line_search, ("armijo",))
    out["armijo_c"] = check_number(
        "armijo_c", s.armijo_c, low=0.0, high=1.0, low_open=True, high_open=True
    )
    out["line_search_shrink"] = check_number(
        "line_search_shrink", s.line_search_shrink, low=0.0, high=1.0, low_open=True, high_open=True
    )
    out["line_search_max_iter"] = check_int("line_search_max_iter", s.line_search_max_iter, low=1)
    if isinstance(s.precond, str) and s.precond not in ("auto", "martens", "nystrom", "kfac"):
        raise ValueError(
            f"Unknown `precond` {s.precond!r}; expected 'auto', None, 'martens', 'nystrom', "
            "'kfac' or a callable."
        )
    if s.precond is not None and not isinstance(s.precond, str) and not callable(s.precond):
        raise TypeError(
            "`precond` must be 'auto', None, 'martens', 'nystrom', 'kfac' or a callable, got "
            f"{type(s.precond).__name__}."
        )
    out["max_failures"] = check_int("max_failures", s.max_failures, low=1)
    out["max_iter"] = check_int("max_iter", s.max_iter, low=1)
    if s.max_eval is not None:
        out["max_eval"] = check_int("max_eval", s.max_eval, low=1)
    if s.callback is not None and not callable(s.callback):
        raise TypeError(f"`callback` must be callable or None, got {type(s.callback).__name__}.")
    # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; past it the first random draw
    # (nystrom, fisher_mc, K-FAC probes) raised
    out["seed"] = check_int("seed", s.seed, low=-(2**63), high=2**64 - 1)
    out["products"] = ProductPolicy.of(s.products)
    check_choice("curvature_batch", s.curvature_batch, ("sharded", "replicated"))
    _check_bool("replay_rng", s.replay_rng)
    return out


def _real_in(value: object, low: float, high: float) -> bool:
    """Whether ``value`` is a real number strictly between ``low`` and ``high`` (for hints)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and low < value < high


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
    return value


def _check_auto_or_bool(name: str, value: object) -> None:
    """``'auto'``, True or False: another string is a ``ValueError``, another type a
    ``TypeError``, each naming ``name`` and the value."""
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return
    error = ValueError if isinstance(value, str) else TypeError
    kind = "" if isinstance(value, str) else f"{type(value).__name__} "
    raise error(f"`{name}` must be 'auto', True or False, got {kind}{value!r}.")
