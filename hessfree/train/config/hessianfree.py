"""HessianFree's config keys: the fields of :class:`hessfree.HFSettings`, checked by it.

The keys, their defaults and every check come from :class:`~hessfree.HFSettings`, the core's
one record of HessianFree's hyperparameters (imported lazily: :func:`settings_class`, which
keeps ``import hessfree.train.config`` light). Each given key is checked alone, which pins
its message to the key's dotted path; if all pass, all together for the constraints between
keys. No optimizer is built here (:mod:`hessfree.train.optimizers` builds the real one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hessfree.train.config.schema import _path, _show, _unknown_key, _yaml_note, beyond_int64
from hessfree.train.config.sections import _ENTRY_KEYS


def settings_class() -> type:
    """:class:`hessfree.HFSettings`, imported when an HF entry is checked."""
    from hessfree import HFSettings

    return HFSettings


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _key_in_message(message: str, keys: Sequence[str]) -> str | None:
    for key in keys:
        if re.search(rf"[`'\"]{re.escape(key)}[`'\"]", message):
            return key
    return None


def check_hessianfree(raw: Mapping[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    """Validate an HF entry's hyperparameters; return them with every plain default filled in."""
    try:
        settings = settings_class()
    except ImportError as err:
        problems.append(
            f"`{path}.name`: optimizer 'hessianfree' is unavailable "
            f"(importing hessfree failed: {err})."
        )
        return {}
    # Python objects (callback, process_group) are not config keys: YAML cannot express them.
    defaults = {k: v for k, v in settings.defaults().items() if k not in settings.PYTHON_ONLY}
    allowed = list(_ENTRY_KEYS) + list(defaults)
    given: dict[str, Any] = {}
    # precond: kfac (with options) is the runner's: it needs the model, so it is built there
    is_kfac = _is_kfac(raw.get("precond"))
    kfac = check_kfac(raw["precond"], _path(path, "precond"), problems) if is_kfac else None
    for key, value in raw.items():
        if key in _ENTRY_KEYS or (key == "precond" and is_kfac):
            continue
        if key not in defaults:
            problems.append(_unknown_key(path, key, allowed))
            continue
        # A YAML integer where the default is a float (cg_rtol: 0) is meant as that float.
        if (
            isinstance(defaults[key], float)
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            value = float(value)
        given[key] = value

    bad = False
    for key, value in given.items():
        if beyond_int64(value, _path(path, key), problems):  # seed: manual_seed's C long
            bad = True
            continue
        # `precond: off` is the boolean False to YAML 1.1; say so where no boolean is meant.
        note = _yaml_note(value) if not isinstance(defaults[key], bool) else ""
        for _, message in settings.problems({key: value}):
            problems.append(f"`{_path(path, key)}` = {_show(value)}{note}: {message}")
            bad = True
    if not bad and given:
        for _, message in settings.problems(given):
            key = _key_in_message(message, list(given))
            problems.append(f"`{_path(path, key) if key else path}`: {message}")
            bad = True
    if not bad and given:
        # An integer where the setting holds a float (cg_rtol: 0, whose default is 'auto'):
        # the float HFSettings normalises it to.
        normalised = settings.from_kwargs(**given)
        for key, value in given.items():
            number = getattr(normalised, key)
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(number, float):
                given[key] = number
    resolved = {k: v for k, v in defaults.items() if _plain(v)}
    resolved.update(given)
    if kfac is not None:
        resolved["precond"] = kfac
    return resolved


#: The options of ``precond: {name: kfac, ...}``: :class:`hessfree.KFACPreconditioner`'s
#: keyword arguments (the model is the run's).
KFAC_OPTIONS = ("refresh", "decay", "num_probes", "relative_damping", "max_dense", "rank")


def _is_kfac(value: Any) -> bool:
    return value == "kfac" or (isinstance(value, Mapping) and value.get("name") == "kfac")


def check_kfac(value: Any, path: str, problems: list[str]) -> dict[str, Any] | None:
    """Validate ``precond: kfac`` or ``precond: {name: kfac, <option>: ...}``.

    Returns ``{'name': 'kfac', <option>: value, ...}`` with every option filled in (the
    :class:`hessfree.KFACPreconditioner` defaults), or ``None`` after adding a problem.

    >>> check_kfac({"name": "kfac", "rank": 16}, "optimizers[0].precond", [])["rank"]
    16
    >>> problems = []
    >>> check_kfac({"name": "kfac", "rank": 0}, "optimizers[0].precond", problems)
    >>> problems  # doctest: +ELLIPSIS
    ['`optimizers[0].precond.rank` = 0: `rank` must be an int >= 1...']
    """
    import torch  # noqa: PLC0415

    from hessfree import KFACPreconditioner  # noqa: PLC0415

    options = {} if value == "kfac" else {k: v for k, v in value.items() if k != "name"}
    unknown = [k for k in options if k not in KFAC_OPTIONS]
    if unknown:
        problems.append(_unknown_key(path, unknown[0], ["name", *KFAC_OPTIONS]))
        return None
    probe = torch.nn.Linear(1, 1)
    bad = False
    for key, v in options.items():
        nullable = key in ("num_probes", "rank")
        message = None
        if beyond_int64(v, _path(path, key), problems):
            bad = True
            continue
        if isinstance(v, bool) or not (v is None or isinstance(v, (int, float))):
            message = f"must be a number{' or null' if nullable else ''}."
        elif v is None and not nullable:
            message = "must be a number, not null."
        elif isinstance(v, float) and key in ("refresh", "num_probes", "max_dense", "rank"):
            message = "must be an integer."
        else:
            try:
                KFACPreconditioner(probe, **{key: v}).remove()
            except ValueError as err:
                message = str(err)
        if message is not None:
            problems.append(f"`{_path(path, key)}` = {_show(v)}: {message}")
            bad = True
    if bad:
        return None
    defaults = KFACPreconditioner(probe)
    probe_defaults = {k: getattr(defaults, k) for k in KFAC_OPTIONS}
    defaults.remove()
    return {"name": "kfac", **probe_defaults, **options}
