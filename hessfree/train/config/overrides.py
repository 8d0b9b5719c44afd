"""Command-line overrides: ``dotted.key=value`` applied to the raw mapping before validation.

Values are YAML scalars read by :func:`~.yaml_io.safe_load_yaml`; keys are not checked here but
by :func:`~.parse.parse_config`, whose problems :func:`blame_overrides` traces back to the
override that caused them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

from hessfree.train.config.schema import ConfigError, _is_extension_key, _show, _type_name
from hessfree.train.config.yaml_io import safe_load_yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into its path and YAML-parsed value.

    Example:
        >>> parse_override("optimizers.0.damping=10")
        (['optimizers', '0', 'damping'], 10)
        >>> parse_override("model.hidden_sizes=[64, 32]")
        (['model', 'hidden_sizes'], [64, 32])
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [f"Override {text!r} must look like dotted.key=value (e.g. optimizers.0.damping=10)."]
        )
    try:
        parsed = safe_load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError([f"Override {text!r}: the value is not valid YAML ({err})."]) from None
    return key.split("."), parsed


def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """Return a copy of ``raw`` with every ``dotted.key=value`` override applied.

    Missing intermediate mappings are created; list items are addressed by index. Keys are not
    checked here: :func:`parse_config` reports an unknown key with its dotted path.

    Raises:
        ConfigError: A malformed override, or a path through a value that is not a mapping or
            list, or a list index out of range.
    """
    import copy  # noqa: PLC0415

    out = copy.deepcopy(raw) if raw is not None else {}
    problems: list[str] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        if _is_extension_key(parts[0]):
            # The file's aliases were expanded when it was read: a new value here reaches
            # nothing, which would pass silently.
            problems.append(
                f"Override {text!r}: `{parts[0]}` is ignored by the config (a top-level `x-` key "
                "only holds YAML anchors, and the entries merged them when the file was read), "
                "so this would change nothing; override the key where it is used, e.g. "
                "optimizers.0.lr=0.1."
            )
            continue
        node = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    problems.append(
                        f"Override {text!r}: `{where}` is not an index of the "
                        f"{len(node)}-item list `{'.'.join(parts[:depth]) or '<top>'}`."
                    )
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None and parts[depth + 1].lstrip("-").isdigit():
                        # `betas.0=0.95` where the file leaves `betas` to its default: a
                        # mapping {'0': 0.95} would be refused as "must be a list, got dict"
                        problems.append(
                            f"Override {text!r}: `{where}` is not set in the config (its "
                            f"default applies), so it has no item {parts[depth + 1]} to "
                            f"change; give the whole value, e.g. {where}=[...]."
                        )
                        break
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                problems.append(
                    f"Override {text!r}: `{'.'.join(parts[:depth])}` is "
                    f"{_type_name(node)} {_show(node)}, not a mapping or list."
                )
                break
    if problems:
        raise ConfigError(problems, "overrides")
    return out


def blame_overrides(err: ConfigError, overrides: Sequence[str], source: str) -> ConfigError:
    """Name the command-line override behind each problem it caused, not the file."""
    if not overrides:
        return err
    keys = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        keys.append((key, text))
    problems, blamed = [], 0
    for problem in err.problems:
        # The problem's own dotted path is the first `quoted` one it names.
        first = re.search(r"`([^`]*)`", problem)
        path = first.group(1) if first else ""
        hit = next((text for key, text in keys if path == key or path.startswith(key + ".")), None)
        if hit is None:
            problems.append(problem)
        else:
            blamed += 1
            problems.append(f"{problem} (from the command-line override {_show(hit)})")
    where = "command-line overrides" if blamed == len(problems) else f"{source} + overrides"
    return ConfigError(problems, where)


def is_budget_key(path: str) -> bool:
    """Whether a dotted config path is a budget (which ``--resume`` may change).

    Example:
        >>> is_budget_key("budget.seconds"), is_budget_key("optimizers.1.budget.steps")
        (True, True)
        >>> is_budget_key("optimizers.0.lr")
        False
    """
    return bool(re.fullmatch(r"(optimizers\.\d+\.(phases\.\d+\.)?)?budget(\..*)?", path))
