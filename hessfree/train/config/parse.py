"""Parsing: the raw YAML mapping into an :class:`~.sections.ExperimentConfig`, and loading.

:func:`parse_config` builds each section with the schema's validator, resolves the optimizer
entries (plain or phased, with the global budget and batch sizes as defaults) and runs the
cross-section checks of :mod:`.checks`; :func:`load_config` reads the file and applies the
command-line overrides first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hessfree.train.config.checks import (
    _check_combinations,
    _check_name,
    _check_sizes,
    _resolve_loss,
)
from hessfree.train.config.hessianfree import check_hessianfree
from hessfree.train.config.overrides import apply_overrides, blame_overrides
from hessfree.train.config.schema import (
    _INVALID,
    ConfigError,
    _build,
    _check_label,
    _convert,
    _is_extension_key,
    _schema_fields,
    _show,
    _Spec,
    _suggest,
    _type_name,
    _unknown_key,
    _yaml_note,
    beyond_int64,
)
from hessfree.train.config.sections import (
    _ENTRY_KEYS,
    _PHASED_KEYS,
    _TOP_KEYS,
    _TORCH_OPTIMIZERS,
    DATA_SCHEMAS,
    MODEL_SCHEMAS,
    OPTIMIZER_NAMES,
    BudgetConfig,
    EvalConfig,
    ExperimentConfig,
    OptimizerConfig,
    OutputConfig,
    _TopLevel,
)
from hessfree.train.config.yaml_io import _yaml11_problems, read_yaml_file


def _pick_name(
    raw: Any, path: str, names: Sequence[str], problems: list[str], what: str, required: str
) -> str | None:
    """The ``name`` of a section or entry that has to be one of ``names``, or None after a
    problem (``required`` opens the message for a missing name)."""
    if not isinstance(raw, Mapping):
        problems.append(
            f"`{path}` must be a mapping with a `name`, got {_type_name(raw)} {_show(raw)}."
        )
        return None
    name = raw.get("name")
    choices = ", ".join(repr(n) for n in names)
    if name is None:
        problems.append(f"`{path}.name` is required: {required}one of {choices}.")
        return None
    if not isinstance(name, str) or name not in names:
        hint = _suggest(name, list(names)) if isinstance(name, str) else ""
        problems.append(
            f"Unknown {what} `{path}.name` = {_show(name)}{_yaml_note(name)}; {hint}expected "
            f"one of {choices}."
        )
        return None
    return name


def _batch_key(
    raw: Mapping[str, Any], key: str, default: int | None, path: str, problems: list[str]
) -> int | None:
    """An entry's ``batch_size`` or ``curvature_batch_size``: a count, null, or ``default``."""
    if key not in raw:
        return default
    value = _convert(raw[key], int | None, _Spec("", low=1), f"{path}.{key}", problems)
    return default if value is _INVALID else value


def _schedule(
    raw: Mapping[str, Any],
    name: str,
    batch_size: int | None,
    curvature_batch_size: int | None,
    path: str,
    problems: list[str],
) -> dict[str, Any]:
    """An entry's batch schedule (``batch_growth``, ``batch_max``, ``batch_multiple``,
    ``curvature_fraction``, ``curvature_fraction_full_steps``) as :class:`OptimizerConfig`
    fields, every conflict refused.

    Returns the fields to set, with ``curvature_batch_size`` None when a fraction replaces it.
    ``batch_size`` 0: the entry's batch_size was refused; nothing is compared with it.
    """
    out: dict[str, Any] = {}
    before = len(problems)

    def refuse(key: str, allowed: str) -> None:
        problems.append(f"`{path}.{key}` = {_show(raw[key])}: {allowed}.")

    if "batch_growth" in raw:
        g = raw["batch_growth"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (1.0 <= g < math.inf):
            refuse(
                "batch_growth",
                "must be a finite number >= 1, the factor the batch grows by per step "
                "(1: a fixed batch)",
            )
        else:
            out["batch_growth"] = float(g)
    for key, meaning in (
        ("batch_max", "the largest growing batch; null: the whole training set"),
        ("batch_multiple", "growing batches are rounded down to a multiple of it"),
    ):
        if key not in raw or (key == "batch_max" and raw[key] is None):
            continue
        v = raw[key]
        if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            null = " or null" if key == "batch_max" else ""
            refuse(key, f"must be an integer >= 1{null} ({meaning})")
        elif not beyond_int64(v, f"{path}.{key}", problems):
            out[key] = v
    if "curvature_fraction" in raw and raw["curvature_fraction"] is not None:
        f = raw["curvature_fraction"]
        if name != "hessianfree":
            problems.append(
                f"`{path}.curvature_fraction` only applies to 'hessianfree', not {name!r}."
            )
        elif "curvature_batch_size" in raw and raw["curvature_batch_size"] is not None:
            problems.append(
                f"`{path}.curvature_fraction` = {_show(f)} and `{path}.curvature_batch_size` = "
                f"{_show(raw['curvature_batch_size'])} both set the curvature batch; keep one."
            )
        elif isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            refuse(
                "curvature_fraction",
                "must be a number in (0, 1], the curvature batch's share of the gradient batch "
                "(or null: use curvature_batch_size)",
            )
        else:
            out["curvature_fraction"] = float(f)
            out["curvature_batch_size"] = None
    key = "curvature_fraction_full_steps"
    if key in raw and raw[key] is not None:
        v = raw[key]
        if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
            v = int(v)
        if name != "hessianfree":
            problems.append(f"`{path}.{key}` only applies to 'hessianfree', not {name!r}.")
        elif beyond_int64(v, f"{path}.{key}", problems):
            pass
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            refuse(
                key,
                "must be an integer >= 0, the number of steps on the whole training set that "
                "still take curvature_fraction of it (0: all of it from the first full step)",
            )
        elif raw.get("curvature_fraction") is None:
            problems.append(
                f"`{path}.{key}` = {v} keeps `curvature_fraction` on the whole training set, "
                f"but `{path}.curvature_fraction` is not set; set it or remove `{key}`."
            )
        else:
            out[key] = v
    key = "min_damping_cases"
    if key in raw and raw[key] is not None:
        c = raw[key]
        if name != "hessianfree":
            problems.append(
                f"`{path}.{key}` only applies to 'hessianfree' (it sets HF's λ floor "
                f"min_damping), not {name!r}."
            )
        elif _positive_finite(c) is None:
            refuse(
                key,
                "must be a finite number > 0, or null: before each step HF's min_damping is "
                "it / the step's gradient batch size (75: 0.3 at 250 cases, 0.075 at 1000)",
            )
        elif raw.get("min_damping", "auto") != "auto":
            problems.append(
                f"`{path}.{key}` = {_show(c)} and `{path}.min_damping` = "
                f"{_show(raw['min_damping'])} both set λ's floor; keep one "
                f"({key} sets min_damping to {_show(c)} / the batch size before every step; "
                "min_damping may stay 'auto' beside it)."
            )
        elif raw.get("adapt_damping") is False:
            problems.append(
                f"`{path}.{key}` = {_show(c)} and `{path}.adapt_damping` = false: λ is not "
                f"adapted, so it stays at its first value and the floor {key} lowers as the "
                "batch grows would never apply; remove one (a fixed λ is `damping` alone)."
            )
        else:
            out[key] = _positive_finite(c)
    if len(problems) > before:
        return {}
    growth = out.get("batch_growth", 1.0)
    multiple = out.get("batch_multiple", 1)
    if growth == 1.0:
        for key in ("batch_max", "batch_multiple", "curvature_fraction_full_steps"):
            if key in out:
                problems.append(
                    f"`{path}.{key}` = {out[key]} only applies to a growing batch; set "
                    f"`{path}.batch_growth` > 1 or remove `{key}`."
                )
    elif batch_size == 0:  # batch_size itself was refused
        pass
    elif batch_size is None:
        problems.append(
            f"`{path}.batch_growth` = {growth!r} grows `batch_size` from step to step, but "
            "batch_size is null (the whole training set); set the starting batch_size."
        )
    else:
        if out.get("batch_max") is not None and out["batch_max"] < batch_size:
            problems.append(
                f"`{path}.batch_max` = {out['batch_max']} is below the starting batch_size "
                f"{batch_size}; use at least {batch_size}, or null for the whole training set."
            )
        if batch_size % multiple:
            low = batch_size - batch_size % multiple
            problems.append(
                f"`{path}.batch_size` = {batch_size} is not a multiple of `{path}.batch_multiple`"
                f" = {multiple}; use {low or multiple} or {low + multiple}."
            )
    out.setdefault("curvature_batch_size", curvature_batch_size)
    return {} if len(problems) > before else out


def _positive_finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number > 0 (not a bool), else None.

    >>> _positive_finite(75), _positive_finite(0.5), _positive_finite(10**400), _positive_finite(0)
    (75.0, 0.5, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range
        return None
    return number if 0.0 < number < math.inf else None


def _merge_budget(base: BudgetConfig, raw: Any, path: str, problems: list[str]) -> BudgetConfig:
    if raw is None:
        return base
    override = _build(BudgetConfig, raw, path, problems)
    if override is _INVALID:
        return base
    return dataclasses.replace(
        base, **{k: getattr(override, k) for k in raw if k in _schema_fields(BudgetConfig)}
    )


def _parse_phased(
    raw: Mapping[str, Any], path: str, top: _TopLevel, problems: list[str]
) -> OptimizerConfig | None:
    """An entry ``{phases: [entry, entry, ...], label, budget}``: optimizers in sequence."""
    for key in raw:
        if key not in _PHASED_KEYS:
            problems.append(
                _unknown_key(path, key, _PHASED_KEYS)[:-1]
                + " (an entry with `phases` sets the optimizer keys in each phase)."
            )
    raw_phases = raw["phases"]
    if not isinstance(raw_phases, list) or len(raw_phases) < 2:
        problems.append(
            f"`{path}.phases` must be a list of two or more optimizer entries run one after "
            f"another, got {_show(raw_phases)}; a single optimizer is a plain entry."
        )
        return None
    # A phase's budget is its own, counted from its start; the global one bounds the entry.
    no_budget = dataclasses.replace(top, budget=BudgetConfig())
    phases = []
    for j, entry in enumerate(raw_phases):
        where = f"{path}.phases.{j}"
        if isinstance(entry, Mapping):
            for key in ("phases", "label"):
                if key in entry:
                    problems.append(
                        f"`{where}.{key}` is not allowed in a phase; set it on `{path}`."
                    )
        phase = _parse_optimizer(
            {k: v for k, v in entry.items() if k not in ("phases", "label")}
            if isinstance(entry, Mapping)
            else entry,
            index=None,
            top=no_budget,
            problems=problems,
            path=where,
        )
        if phase is None:
            return None
        b = phase.budget
        if j < len(raw_phases) - 1 and b.steps is None and b.epochs is None and b.seconds is None:
            problems.append(
                f"`{where}` ({phase.name}) has no budget, so the phases after it would never "
                f"run: set `{where}.budget.steps`, `.epochs` or `.seconds`."
            )
        phases.append(phase)
    names = "+".join(ph.name for ph in phases)
    label = _check_label(raw.get("label", names), names, path, problems)
    first = phases[0]
    return OptimizerConfig(
        name=names,
        label=label,
        hyperparameters={},
        batch_size=first.batch_size,
        curvature_batch_size=first.curvature_batch_size,
        budget=_merge_budget(top.budget, raw.get("budget"), f"{path}.budget", problems),
        phases=tuple(phases),
        batch_growth=first.batch_growth,
        batch_max=first.batch_max,
        batch_multiple=first.batch_multiple,
        curvature_fraction=first.curvature_fraction,
        curvature_fraction_full_steps=first.curvature_fraction_full_steps,
        min_damping_cases=first.min_damping_cases,
    )


def _parse_optimizer(
    raw: Any,
    index: int | None,
    top: _TopLevel,
    problems: list[str],
    path: str | None = None,
) -> OptimizerConfig | None:
    path = path or f"optimizers.{index}"
    if isinstance(raw, Mapping) and "phases" in raw and index is not None:
        return _parse_phased(raw, path, top, problems)
    name = _pick_name(raw, path, OPTIMIZER_NAMES, problems, "optimizer", "")
    if name is None:
        return None
    label = _check_label(raw.get("label", name), name, path, problems)
    before = len(problems)
    batch_size = _batch_key(raw, "batch_size", top.batch_size, path, problems)
    batch_size_ok = len(problems) == before  # else the schedule is not compared with it
    curvature_batch_size = top.curvature_batch_size if name == "hessianfree" else None
    if "curvature_batch_size" in raw and name != "hessianfree":
        problems.append(
            f"`{path}.curvature_batch_size` only applies to 'hessianfree', not {name!r}."
        )
    elif name == "hessianfree":
        curvature_batch_size = _batch_key(
            raw, "curvature_batch_size", curvature_batch_size, path, problems
        )
    schedule = _schedule(
        raw, name, batch_size if batch_size_ok else 0, curvature_batch_size, path, problems
    )
    curvature_batch_size = schedule.pop("curvature_batch_size", curvature_batch_size)
    budget = _merge_budget(top.budget, raw.get("budget"), f"{path}.budget", problems)

    if name == "hessianfree":
        hyper = check_hessianfree(raw, path, problems)
    else:
        schema = _TORCH_OPTIMIZERS[name]
        built = _build(schema, raw, path, problems, skip=_ENTRY_KEYS)
        if built is _INVALID:
            return None
        hyper = dataclasses.asdict(built)
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
            if len(hyper["betas"]) != 2:
                problems.append(
                    f"`{path}.betas` must be a list of two numbers in [0, 1), "
                    f"got {list(hyper['betas'])!r}."
                )
    return OptimizerConfig(
        name=name,
        label=label,
        hyperparameters=hyper,
        batch_size=batch_size,
        curvature_batch_size=curvature_batch_size,
        budget=budget,
        **schedule,
    )


#: Appended to an unknown top-level key's message: where YAML anchors may live.
_EXTENSION_NOTE = (
    "; a top-level key starting with `x-` is ignored (e.g. `x-common: &c {lr: 0.1}` to hold "
    "YAML anchors that entries merge with `<<: *c`)."
)


def parse_config(
    raw: Any, *, default_name: str = "experiment", source: str | None = None
) -> ExperimentConfig:
    """Validate a raw mapping (as parsed from YAML) into an :class:`ExperimentConfig`.

    Args:
        raw: The parsed YAML document.
        default_name: ``name`` when the mapping has none (usually the file's stem).
        source: Where the mapping came from, for messages.

    Returns:
        ExperimentConfig: frozen, with every default and every ``null`` loss entry resolved.

    Raises:
        ConfigError: Listing every problem found, each with its dotted path.

    Example:
        >>> cfg = parse_config({"data": {"name": "digits"}, "model": {"name": "mlp"},
        ...                     "optimizers": [{"name": "adam"}], "budget": {"steps": 5}})
        >>> cfg.loss.name, cfg.optimizers[0].hyperparameters["lr"], cfg.name
        ('cross_entropy', 0.001, 'experiment')
        >>> try:
        ...     parse_config({"data": {"name": "digits"}, "model": {"name": "mlp"},
        ...                   "optimizers": [{"name": "adam", "lr": -1}], "budegt": {}})
        ... except ConfigError as err:
        ...     print(len(err.problems), err.problems[0].split(";")[0], err.problems[1], sep="\\n")
        3
        Unknown key `budegt`
        `optimizers.0.lr` must be in (0.0, inf), got -1.0.
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            [f"the top level must be a mapping of keys to values, got {_type_name(raw)}."], source
        )
    ambiguous = _yaml11_problems(raw)
    if ambiguous:  # refused alone: the markers would only add confusing type errors
        raise ConfigError(ambiguous, source)
    # A section's key written at the top level (`steps: 100`) is pointed to its section.
    elsewhere = {
        name: f"{section}.{name}"
        for section, cls in (
            ("budget", BudgetConfig),
            ("eval", EvalConfig),
            ("output", OutputConfig),
        )
        for name in _schema_fields(cls)
    }
    elsewhere["lr"] = "optimizers.0.lr"
    for key in raw:
        if _is_extension_key(key):
            continue
        if key not in _TOP_KEYS:
            problems.append(_unknown_key("", key, _TOP_KEYS, elsewhere)[:-1] + _EXTENSION_NOTE)
    top = _build(
        _TopLevel, {k: v for k, v in raw.items() if k in _schema_fields(_TopLevel)}, "", problems
    )

    data = model = None
    for key, registry, what in (
        ("data", DATA_SCHEMAS, "dataset"),
        ("model", MODEL_SCHEMAS, "model"),
    ):
        if key not in raw:
            problems.append(
                f"`{key}` is required: a mapping with `name`, one of "
                f"{', '.join(repr(n) for n in registry)}."
            )
            continue
        name = _pick_name(raw[key], key, list(registry), problems, what, f"the {what}, ")
        if name is not None:
            built = _build(registry[name], raw[key], key, problems)
            if built is not _INVALID:
                if key == "data":
                    data = built
                else:
                    model = built

    optimizers: list[OptimizerConfig] = []
    raw_opts = raw.get("optimizers")
    if raw_opts is None:
        problems.append(
            "`optimizers` is required: a list of one or more entries with `name`, "
            f"one of {', '.join(repr(n) for n in OPTIMIZER_NAMES)}."
        )
    elif not isinstance(raw_opts, list) or not raw_opts:
        problems.append(f"`optimizers` must be a non-empty list, got {_show(raw_opts)}.")
    else:
        for i, entry in enumerate(raw_opts):
            opt = _parse_optimizer(entry, i, top, problems)
            if opt is not None:
                optimizers.append(opt)

    loss = _resolve_loss(top.loss, data, model, problems)
    wanted = len(raw_opts) if isinstance(raw_opts, list) else -1
    if data is None or model is None or len(optimizers) != wanted:
        raise ConfigError(problems, source)
    settings = {k: getattr(top, k) for k in _schema_fields(_TopLevel)}
    settings.update(name=top.name or default_name, loss=loss)
    cfg = ExperimentConfig(**settings, data=data, model=model, optimizers=tuple(optimizers))
    _check_name(cfg.name, problems)
    _check_combinations(cfg, problems)
    if not any(p.startswith(("`data", "`model", "`batch", "`optimizers")) for p in problems):
        _check_sizes(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override and validate a YAML experiment config.

    Args:
        path: The YAML file.
        overrides: ``dotted.key=value`` strings applied before validation.

    Returns:
        ExperimentConfig: the validated, fully resolved config.

    Raises:
        ConfigError: The file is missing or not valid YAML, an override is malformed, or the
            config has problems (all reported together).
    """
    path = Path(path)
    raw = read_yaml_file(path)
    empty = raw is None
    raw = apply_overrides(raw, overrides)
    try:
        return parse_config(raw, default_name=_default_name(path), source=str(path))
    except ConfigError as err:
        if empty:  # say why every section is missing (a config made of overrides alone runs)
            err = ConfigError(
                ["the file holds no YAML document (it is empty, or only comments)", *err.problems],
                err.source,
            )
        raise blame_overrides(err, overrides, str(path)) from None


def _default_name(path: Path) -> str:
    """The run's name when the config sets none: the file's stem, without leading dots.

    A stem such as ``.yaml`` (the file ``.yaml``) or ``.hidden`` would name a hidden run
    directory (``.yaml-<time>``) that ``ls`` and file browsers do not show; the dots say the
    *config file* is hidden, not that its runs should be. A ``name`` the config sets is kept as
    written.

    Example:
        >>> _default_name(Path("configs/.yaml")), _default_name(Path(".tuned.v2.yaml"))
        ('yaml', 'tuned.v2')
    """
    return path.stem.lstrip(".") or "experiment"
