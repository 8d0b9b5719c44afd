"""YAML in and out: the safe loader, reading a config file, dumping and digesting a config.

The loader reads ``1e-3`` as a float (PyYAML's YAML 1.1 resolver would read a string) and
refuses duplicate keys and documents whose aliases expand beyond :data:`_MAX_VALUES` values.
A dumped config lists every key in :class:`~.sections.ExperimentConfig`'s field order; its
SHA-256 is what a checkpoint must match to be resumed.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import hashlib
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from hessfree.train.config.schema import (
    _MAX_PROBLEM_CHARS,
    _MAX_VALUES,
    ConfigError,
    _show,
    _type_name,
)
from hessfree.train.config.sections import ExperimentConfig, OptimizerConfig

# ---------------------------------------------------------------------------------------------
# YAML: the safe loader, plus floats without a dot (1e-3) and an error on duplicate keys.


class _SafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser if built
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and rejects duplicate keys."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Yaml11Number:
    """A scalar that only YAML 1.1 reads as this number, kept with the text the user wrote.

    PyYAML implements YAML 1.1, which reads ``1:30`` as 90 (base 60) and ``017`` as 15
    (octal); YAML 1.2, most other tools and a reader take them as the text ``'1:30'`` and
    the number 17. A config value must mean what its author wrote, so the loader keeps such
    a scalar as this marker and :func:`_yaml11_problems` refuses it, naming the key. A leading
    zero that changes nothing (``007``) is read as the number.
    """

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: int | float) -> None:
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return self.text

    def __deepcopy__(self, memo: dict) -> _Yaml11Number:  # immutable: overrides copy the tree
        return self

    def problem(self, path: str) -> str:
        """The refusal: the key, the text, both readings and what to write instead."""
        quoted = f"quote it ('{self.text}') for the text"
        if ":" in self.text:
            return (
                f"`{path}` = {self.text} is read by YAML 1.1 (PyYAML, this loader) as "
                f"{self.value!r}, a base-60 number, and by YAML 1.2 as the text "
                f"'{self.text}'; write the number you mean (e.g. {self.value!r}) or {quoted}."
            )
        decimal = int(self.text.replace("_", ""), 10)
        # not 0o17 for the octal reading: that is text to YAML 1.1, and refused as such
        return (
            f"`{path}` = {self.text} is read by YAML 1.1 (PyYAML, this loader) as {self.value} "
            f"(a leading 0 means octal) and by YAML 1.2 as {decimal}; write {decimal} without "
            f"the leading 0 (or {self.value} for the octal value), or {quoted}."
        )


def _leading_zero(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?0[0-9_]+", text))


def _construct_int(loader: _SafeLoader, node: yaml.ScalarNode) -> int | _Yaml11Number:
    """An integer, or a :class:`_Yaml11Number` for base 60 and for octal that changes it."""
    value = yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    text = str(node.value)
    if ":" in text or (_leading_zero(text) and value != int(text.replace("_", ""), 10)):
        return _Yaml11Number(text, value)
    return value


def _construct_float(loader: _SafeLoader, node: yaml.ScalarNode) -> float | _Yaml11Number:
    """A float, or a :class:`_Yaml11Number` for a base-60 one (``1:30.5``)."""
    value = yaml.constructor.SafeConstructor.construct_yaml_float(loader, node)
    return _Yaml11Number(str(node.value), value) if ":" in str(node.value) else value


_SafeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_SafeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _yaml11_problems(raw: Any, path: str = "") -> list[str]:
    """Refusals for every :class:`_Yaml11Number` in a parsed document, with dotted paths.

    The top level's ``x-`` keys are skipped: they only hold anchors, and what an entry merges
    from them is found in the entry.

    Example:
        >>> _yaml11_problems(safe_load_yaml("budget: {seconds: 1:30}\\nseed: 007"))[0][:40]
        '`budget.seconds` = 1:30 is read by YAML '
    """
    problems: list[str] = []
    stack = [(raw, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _Yaml11Number):
            problems.append(value.problem(where or "<top>"))
        elif isinstance(value, Mapping):
            stack.extend(
                (v, f"{where}.{k}" if where else str(k))
                for k, v in reversed(list(value.items()))
                if where or not (isinstance(k, str) and k.startswith("x-"))
            )
        elif isinstance(value, list):
            stack.extend((v, f"{where}.{i}") for i, v in reversed(list(enumerate(value))))
    return problems


def _construct_mapping(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose own keys are unique; keys merged in by ``<<: *anchor`` are not its own.

    ``flatten_mapping`` puts the merged pairs first (ordered so that the first merged mapping
    wins), then the mapping's own: an own key overrides a merged one, which is what merge keys
    are for (``<<: *common`` then ``lr: 0.1``), and only an own key given twice is refused.
    """
    merge_keys = sum(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value)
    own = len(node.value) - merge_keys
    loader.flatten_mapping(node)
    merged = len(node.value) - own
    mapping: dict = {}
    seen: set = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)  # a list key whole, for its message
        if not isinstance(key, Hashable):  # `? [a, b] : 1`: a dict cannot hold it
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"a key must be a single value (a name or a number), got the "
                f"{_type_name(key)} {_show(key)} as a key (line {line}); a `?` starts a "
                "complex key in YAML, which a config has no use for",
                key_node.start_mark,
            )
        if i >= merged:
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML with a safe loader (no Python objects), ``1e-3`` as float, no duplicate keys.

    Example:
        >>> safe_load_yaml("lr: 1e-3\\nsteps: 10")
        {'lr': 0.001, 'steps': 10}
    """
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 -- _SafeLoader subclasses SafeLoader


def read_yaml_file(path: Path) -> Any:
    """Read a YAML file as the safe loader parses it.

    Raises:
        ConfigError: The file cannot be read, is not UTF-8 text, is not valid YAML, or its
            aliases expand it beyond :data:`_MAX_VALUES` values.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            [f"cannot read the config file: {err.strerror or err}{_directory_hint(path)}."],
            str(path),
        ) from None
    try:
        text = _decode(data)
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                f"the file is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}"
                f"{_encoding_hint(data)}); save it as UTF-8, or check it is the YAML config "
                "you meant."
            ],
            str(path),
        ) from None
    try:
        raw = safe_load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            [f"not valid YAML: {_cut(str(err))}{_tab_hint(err, text)}"], str(path)
        ) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        # PyYAML's constructors raise these for e.g. an impossible date or a 5,000-digit int.
        raise ConfigError(
            [f"not valid YAML: {type(err).__name__}: {_cut(str(err))}"], str(path)
        ) from None
    _check_expansion(raw, str(path))
    return raw


def _directory_hint(path: Path) -> str:
    """For a directory given as the config: one run takes one file; name one, and the loop."""
    if not path.is_dir():
        return ""
    configs = sorted(p.name for p in path.glob("*.yaml") if not p.name.startswith("."))
    example = f" such as '{path / configs[0]}'" if configs else ""
    return (
        f"; give one config file{example} (a run takes one; to run several: "
        f'for c in {path}/*.yaml; do hessfree run "$c"; done)'
    )


def _decode(data: bytes) -> str:
    """The file's text: UTF-8 (a byte-order mark is dropped), or UTF-16 behind its mark.

    YAML 1.1 (§5.2) allows UTF-16 when the stream starts with a byte-order mark, and Windows
    editors save "Unicode" text that way; PyYAML reads it too, so it means what it says. A
    UTF-32 mark (which starts like UTF-16's little-endian one) and anything else are decoded
    as UTF-8, which refuses them.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not data.startswith(
        codecs.BOM_UTF32_LE
    ):
        return data.decode("utf-16")
    nul = data.find(b"\x00")
    if nul >= 0:  # valid UTF-8, but never YAML: UTF-16/32 text of ASCII characters
        raise UnicodeDecodeError("utf-8", data, nul, nul + 1, "a NUL byte")
    return data.decode("utf-8").removeprefix("\ufeff")


def _encoding_hint(data: bytes) -> str:
    """Name the encoding an undecodable file announces (UTF-32's mark, or UTF-16 without one)."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return ": the file starts with a UTF-32 byte-order mark"
    if b"\x00" in data:
        return ": NUL bytes, as in UTF-16 or UTF-32 text without a byte-order mark"
    return ""


def _tab_hint(err: yaml.YAMLError, text: str) -> str:
    """Say why when PyYAML stops at a tab: YAML indents with spaces only (§5.5), and its own
    message ("found character that cannot start any token") does not name the character."""
    mark = getattr(err, "problem_mark", None)
    index = getattr(mark, "index", None)
    if not isinstance(index, int) or not 0 <= index < len(text) or text[index] != "\t":
        return ""
    return (
        f" (line {mark.line + 1} has a tab there: YAML indents with spaces only; replace the "
        "tabs with spaces)"
    )


def _cut(text: str) -> str:
    return (
        text if len(text) <= _MAX_PROBLEM_CHARS // 2 else text[: _MAX_PROBLEM_CHARS // 2] + " ..."
    )


def _check_expansion(raw: Any, source: str) -> None:
    """Refuse a document whose aliases expand it beyond :data:`_MAX_VALUES` values."""
    count, stack = 0, [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES or depth > 100:
            raise ConfigError(
                [
                    f"the document expands to more than {_MAX_VALUES:,} values or 100 levels "
                    "(YAML aliases such as *a repeat their anchor); a config is far smaller."
                ],
                source,
            )
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-ready values; :func:`parse_config` reads it back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "optimizers":
            entries = []
            for opt in value:
                if opt.phases:
                    phases = [_entry(ph, plain) for ph in opt.phases]
                    for ph in phases:
                        del ph["label"]
                    entries.append(
                        {"label": opt.label, "phases": phases, "budget": plain(opt.budget)}
                    )
                else:
                    entries.append(_entry(opt, plain))
            out["optimizers"] = entries
        else:
            out[f.name] = plain(value)
    return out


def _entry(opt: OptimizerConfig, plain: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": opt.name, "label": opt.label}
    entry.update(plain(opt.hyperparameters))
    entry["batch_size"] = opt.batch_size
    # Schedule keys only when set: configs without them keep the digests they had.
    if opt.growing:
        entry["batch_growth"] = opt.batch_growth
        entry["batch_max"] = opt.batch_max
        if opt.batch_multiple != 1:
            entry["batch_multiple"] = opt.batch_multiple
    if opt.name == "hessianfree":
        if opt.curvature_fraction is not None:
            entry["curvature_fraction"] = opt.curvature_fraction
            if opt.curvature_fraction_full_steps:
                entry["curvature_fraction_full_steps"] = opt.curvature_fraction_full_steps
        else:
            entry["curvature_batch_size"] = opt.curvature_batch_size
        if opt.min_damping_cases is not None:
            entry["min_damping_cases"] = opt.min_damping_cases
    entry["budget"] = plain(opt.budget)
    return entry


def _yaml(plain: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(plain), sort_keys=False, default_flow_style=None, width=100)


def dump_config(cfg: ExperimentConfig, header: str = "") -> str:
    """The resolved config as YAML text, optionally opened by ``header`` as comment lines."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + _yaml(config_to_dict(cfg))


def config_digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config (what a checkpoint must match to be resumed).

    The ``distributed`` section is left out: a timeout does not change the results, and runs
    written before the section existed keep their digest.
    """
    return plain_digests(config_to_dict(cfg))[0]


def plain_digests(plain: dict[str, Any]) -> tuple[str, str]:
    """:func:`config_digest` and :func:`training_digest` of a resolved config as a plain dict
    (:func:`config_to_dict`'s, or a run's ``config.yaml`` as the version that wrote it resolved
    it, read back with ``yaml.safe_load``). ``plain`` is not changed."""
    plain = copy.deepcopy(plain)
    plain.pop("distributed", None)
    whole = hashlib.sha256(_yaml(plain).encode()).hexdigest()
    plain.pop("budget", None)
    for entry in plain.get("optimizers") or ():
        if isinstance(entry, dict):
            entry.pop("budget", None)
            for phase in entry.get("phases") or ():
                if isinstance(phase, dict):
                    phase.pop("budget", None)
    return whole, hashlib.sha256(_yaml(plain).encode()).hexdigest()


def training_digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config less every budget: what a step's result depends on.

    Two configs with equal training digests take the same steps; only when they stop differs,
    so a run may be resumed with a larger (or smaller) budget.
    """
    return plain_digests(config_to_dict(cfg))[1]
