"""HessianFree's config keys: the names and defaults of its signature, values checked by it.

The runner sits above the core, so :class:`hessfree.optimizer.HessianFree` is imported lazily
(:func:`optimizer_class`, which :mod:`hessfree.train.optimizers` builds from too). Each given
key is checked by constructing the optimizer over a one-element dummy parameter with that key
alone, which pins the optimizer's own message to the key's dotted path; one more construction
with every key catches constraints between keys.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hessfree.train.config.schema import _path, _show, _unknown_key
from hessfree.train.config.sections import _ENTRY_KEYS


def optimizer_class() -> type:
    """Import :class:`hessfree.optimizer.HessianFree` lazily (train sits above the optimizer)."""
    from hessfree.optimizer import HessianFree

    return HessianFree


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


#: HessianFree arguments that take Python objects, which a YAML file cannot express.
_HF_PYTHON_ONLY = ("callback", "process_group")


def _hessianfree_defaults(cls: type) -> dict[str, Any]:
    """Keyword arguments of ``cls.__init__`` other than ``params``, with their defaults."""
    out: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name in ("params", *_HF_PYTHON_ONLY) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = p.default  # inspect.Parameter.empty for a required one
    return out


def _key_in_message(message: str, keys: Sequence[str]) -> str | None:
    for key in keys:
        if re.search(rf"[`'\"]{re.escape(key)}[`'\"]", message):
            return key
    return None


def check_hessianfree(raw: Mapping[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    """Validate HF hyperparameters by matching the signature and constructing the optimizer."""
    import torch  # noqa: PLC0415 -- keep `import hessfree.train.config` light

    try:
        cls = optimizer_class()
    except ImportError as err:
        problems.append(
            f"`{path}.name`: optimizer 'hessianfree' is unavailable "
            f"(importing hessfree.optimizer failed: {err})."
        )
        return {}
    defaults = _hessianfree_defaults(cls)
    allowed = list(_ENTRY_KEYS) + list(defaults)
    given: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _ENTRY_KEYS:
            continue
        if key not in defaults:
            problems.append(_unknown_key(path, key, allowed))
            continue
        default = defaults[key]
        # A YAML integer where the default is a float (damping: 10) is meant as that float.
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        given[key] = value
    missing = [k for k, d in defaults.items() if d is inspect.Parameter.empty and k not in given]
    for key in missing:
        problems.append(f"`{_path(path, key)}` is required by HessianFree.")
    if missing:
        return given

    def construct(kwargs: dict[str, Any]) -> str | None:
        dummy = torch.zeros(1, requires_grad=True)
        try:
            cls([dummy], **kwargs)
        except (TypeError, ValueError) as err:
            return str(err)
        return None

    # One construction per key pins each message to its dotted path, so all are reported;
    # a final one with every key catches constraints between keys.
    bad = False
    for key, value in given.items():
        message = construct({key: value})
        if message is not None:
            problems.append(f"`{_path(path, key)}` = {_show(value)}: {message}")
            bad = True
    if not bad and given:
        message = construct(given)
        if message is not None:
            key = _key_in_message(message, list(given))
            problems.append(f"`{_path(path, key) if key else path}`: {message}")
    resolved = {k: v for k, v in defaults.items() if v is not inspect.Parameter.empty and _plain(v)}
    resolved.update(given)
    return resolved
