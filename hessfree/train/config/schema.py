"""Schema machinery: field specs, the strict dataclass builder and :class:`ConfigError`.

A section is a frozen dataclass whose fields carry a :class:`_Spec` (help, choices, range) in
their metadata (:func:`_field`). :func:`_build` turns a raw YAML mapping into one, appending
every problem to a list instead of stopping at the first, so :func:`~hessfree.train.config.
parse_config` can report them all at once: an unknown key with the allowed keys and the closest
match, a wrong type or an out-of-range value with its dotted path (``optimizers.0.damping``).

Why not pydantic v2: it was measured against this module (pydantic 2.13, strict models,
``extra="forbid"``). It does collect every error with its location, but its messages differ
from the ones the CLI prints and the tests pin: an unknown key is ``('budegt',) Extra inputs are
not permitted`` with no allowed-keys list and no ``did you mean `budget`?``; a range error is
``Input should be greater than 0`` without the value given; ``1e4`` for a count (a float in
YAML) is refused in strict mode and ``2.5`` reads ``Input should be a valid integer``. Keeping
today's messages would mean a custom error formatter over pydantic's error types plus a
pre-pass for the suggestions, which is no smaller than the ~150 lines here, and it would add a
dependency the package does not otherwise have. So the validator stays hand-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hessfree._checks import check_int, check_number, closest_name

#: Seeds reach scikit-learn and NumPy, which take at most 2**32 - 1.
_MAX_SEED = 2**32 - 1
#: torch.set_num_threads takes a C int; far more threads than any machine has is a typo.
_MAX_THREADS = 1024
#: gloo and NCCL hold the timeout in milliseconds in a C int: at most about 24.8 days.
_MAX_TIMEOUT = 2_000_000.0
#: Floats larger than this are not exact integers; a count given as one is refused.
_MAX_EXACT_FLOAT_INT = 2**53
#: The largest int64, what torch and NumPy count in (:func:`beyond_int64`).
_INT64_MAX = 2**63 - 1
#: Longest echo of a value in a message, and the most values a document may expand to
#: (YAML aliases can make a few hundred bytes expand to millions of values).
_MAX_SHOWN = 200
_MAX_PROBLEM_CHARS = 1000
_MAX_VALUES = 100_000


def _show(value: object) -> str:
    """``repr(value)``, cut to :data:`_MAX_SHOWN` characters (a huge value stays readable)."""
    text = reprlib_repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 5] + " ...)"


def reprlib_repr(value: object) -> str:
    import reprlib  # noqa: PLC0415

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, 8, 120, 120
    r.maxlong = 60
    return r.repr(value)


class ConfigError(ValueError):
    """One or more problems in an experiment config, reported together.

    Attributes:
        problems: One message per problem, each naming the dotted path of the offending key.
        source: The file (or other origin) the config came from, if known.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        # Cap what is echoed: a message quoting a huge value must stay a few lines.
        self.problems = [
            p if len(p) <= _MAX_PROBLEM_CHARS else p[: _MAX_PROBLEM_CHARS - 20] + " ... (cut)"
            for p in problems
        ]
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"Invalid config{where}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            text = f"Invalid config{where}: {len(self.problems)} problems:\n{listed}"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------
# Field metadata and the generic dataclass builder.


@dataclass(frozen=True)
class _Spec:
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False


def _field(default: Any = None, help: str = "", **spec: Any) -> Any:
    return field(default=default, metadata={"spec": _Spec(help, **spec)})


_INVALID = object()  # a value that failed validation; the field keeps its default


def _path(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


#: Other libraries' names for a key (no spelling is close enough for difflib to find them).
_SYNONYMS = {
    "learning_rate": "lr",
    "step_size": "lr",
    "lambda": "damping",
    "lam": "damping",
    "l2": "weight_decay",
    "wd": "weight_decay",
    "max_steps": "steps",
    "num_steps": "steps",
    "iterations": "steps",
    "max_epochs": "epochs",
    "num_epochs": "epochs",
    "time": "seconds",
    "max_seconds": "seconds",
    "time_limit": "seconds",
    "optimizer": "optimizers",
    "dataset": "data",
    "network": "model",
    "threads": "num_threads",
    "random_seed": "seed",
}


def _suggest(
    key: object, allowed: Sequence[str], elsewhere: Mapping[str, str] | None = None
) -> str:
    """``did you mean `x`? `` for a misspelt key, a synonym (``learning_rate``: ``lr``) or, with
    ``elsewhere`` (key: dotted path), a key that belongs in another section (``budget.steps``)."""
    text = str(key)
    wanted = _SYNONYMS.get(text.lower().replace("-", "_"), text.lower().replace("-", "_"))
    if wanted in allowed and wanted != text:
        return f"did you mean `{wanted}`? "
    if elsewhere and wanted in elsewhere:
        return f"did you mean `{elsewhere[wanted]}`? "
    close = closest_name(text, allowed)
    return f"did you mean `{close}`? " if close else ""


def _unknown_key(
    path: str, key: object, allowed: Sequence[str], elsewhere: Mapping[str, str] | None = None
) -> str:
    listed = ", ".join(allowed)
    shown = _path(path, key if isinstance(key, str) and len(key) <= _MAX_SHOWN else _show(key))
    return f"Unknown key `{shown}`; {_suggest(key, allowed, elsewhere)}allowed keys: {listed}."


def _is_extension_key(key: object) -> bool:
    """A top-level ``x-...`` key, which the config ignores.

    YAML anchors must be defined in the document before an alias repeats them, and a config
    has no section for values shared by several entries; as in docker-compose files, a
    top-level key starting with ``x-`` holds them (``x-common: &c {lr: 0.1}``, then
    ``<<: *c`` in each optimizer). Only the top level: inside a section a misspelt key is
    always an error.
    """
    return isinstance(key, str) and key.startswith("x-")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


#: A duration with a unit, as users write one where seconds are meant (``5m``, ``300 s``).
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hours?)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def _number_in_text(text: str) -> int | float | None:
    """The number a string spells in Python's or YAML 1.2's syntax (``0o17``, ``08``,
    ``.5e3``, ``'1e-3'``), which YAML 1.1 (or quoting) left a string; None if it spells none."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    if re.fullmatch(r"[-+]?[0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9]+)?", text) and any(
        c.isdigit() for c in text
    ):
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() and re.fullmatch(r"[-+]?[0-9_]+", text) else value
    return None


def _yaml_note(value: object, text: bool = False, path: str = "") -> str:
    """Why a boolean, a date or a string came where text or a number was meant: YAML 1.1 reads
    the unquoted words yes/no/on/off as booleans, ``2026-12-04`` as a date, and ``0o17``,
    ``08`` or ``5m`` as text; ``path`` (a key ending in ``seconds``) allows the duration hint."""
    if isinstance(value, datetime.date) and text:  # a datetime is a date too
        return f"; YAML reads an unquoted date as a date: quote it, e.g. '{value.isoformat()}'"
    if isinstance(value, str) and not text:
        number = _number_in_text(value)
        if number is not None:
            return f" (text, not a number: write {number!r} unquoted to mean the number)"
        duration = _DURATION.fullmatch(value.strip())
        if duration and path.endswith("seconds"):
            seconds = float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)[0]]
            return f" (seconds are a plain number: write {seconds:g} for {value!r})"
        return ""
    if not isinstance(value, bool):
        return ""
    quote = "; quote the word to mean the text, e.g. 'no'" if text else ""
    return f" (YAML reads unquoted yes/no/on/off/true/false, any case, as booleans{quote})"


def _inexact_note(value: object) -> str:
    """Why ``1e19`` is no count: YAML reads it as a float, and floats above 2**53 skip integers."""
    if not (isinstance(value, float) and value.is_integer()):
        return ""
    exact = int(decimal.Decimal(repr(value)))  # 1e30 is 10**30 as written, not the float's
    if abs(exact) > _INT64_MAX:
        return f" (beyond the 64-bit integers torch and NumPy count in: at most {_INT64_MAX})"
    return (
        f" (YAML reads {value!r} as a float, and a float above 2**53 is not an exact integer:"
        f" write the digits, {exact})"
    )


def beyond_int64(value: object, path: str, problems: list[str]) -> bool:
    """Whether ``value`` is an integer outside int64 (appending why to ``problems``).

    Every count of a run is a Python integer, but torch's tensors, NumPy's arrays and C
    ``long`` arguments (``torch.Generator.manual_seed``, tensor shapes) hold int64: a value
    past it that reaches one fails with an overflow after the run has started, and one that
    never does bounds nothing a run could reach (2**63 steps of 1 ns each are 292 years).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or -_INT64_MAX - 1 <= value <= _INT64_MAX
    ):
        return False
    problems.append(
        f"`{path}` = {_show(value)} is outside the 64-bit integers torch and NumPy count in "
        f"(at most {_INT64_MAX} = 2**63 - 1); use a smaller value (a budget no run reaches "
        "bounds nothing: remove it, or set another budget)."
    )
    return True


def _convert(value: Any, hint: Any, spec: _Spec | None, path: str, problems: list[str]) -> Any:
    """Check ``value`` against a type hint and a :class:`_Spec`; return it converted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) != 1:  # pragma: no cover - the schema only uses X | None
            raise AssertionError(f"unsupported union {hint!r}")
        hint = args[0]
        origin = typing.get_origin(hint)
    elif value is None:
        allowed = f"one of {', '.join(map(repr, spec.choices))}" if spec and spec.choices else ""
        problems.append(f"`{path}` must not be null{'; expected ' + allowed if allowed else ''}.")
        return _INVALID

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin is tuple:
        args = typing.get_args(hint)
        (item,) = args[:1]
        if not isinstance(value, (list, tuple)):
            problems.append(f"`{path}` must be a list, got {_type_name(value)} {_show(value)}.")
            return _INVALID
        if Ellipsis not in args and len(value) != len(args):
            # tuple[float, float]: Adam's betas (an empty list raised IndexError in the probe)
            problems.append(
                f"`{path}` must be a list of {len(args)} values, got {len(value)}: {_show(value)}."
            )
            return _INVALID
        items = [_convert(v, item, spec, _path(path, i), problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else tuple(items)
    if hint is Any:
        return value

    if hint is bool:
        if not isinstance(value, bool):
            problems.append(
                f"`{path}` must be true or false, got {_type_name(value)} {_show(value)}."
            )
            return _INVALID
    elif hint is int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_FLOAT_INT:
            value = int(value)  # 1e4 in YAML is a float; accept it for a count
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(
                f"`{path}` must be an integer, got {_type_name(value)} {_show(value)}"
                f"{_yaml_note(value, path=path)}{_inexact_note(value)}."
            )
            return _INVALID
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(
                f"`{path}` must be a number, got {_type_name(value)} {_show(value)}"
                f"{_yaml_note(value, path=path)}."
            )
            return _INVALID
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            problems.append(
                f"`{path}` must be a string, got {_type_name(value)} {_show(value)}"
                f"{_yaml_note(value, text=True)}."
            )
            return _INVALID
        if "\0" in value:  # file names cannot hold it; the OS refuses it with a ValueError
            problems.append(f"`{path}` must not contain a NUL character, got {_show(value)}.")
            return _INVALID
    else:  # pragma: no cover - a schema bug, not a user error
        raise AssertionError(f"unsupported type hint {hint!r} at {path}")

    if spec is None:
        return _INVALID if hint is int and beyond_int64(value, path, problems) else value
    if spec.choices is not None and value not in spec.choices:
        listed = ", ".join(repr(c) for c in spec.choices)
        close = (
            difflib.get_close_matches(value, [str(c) for c in spec.choices], n=1)
            if isinstance(value, str)
            else []
        )
        hint_text = f"; did you mean {close[0]!r}?" if close else "."
        problems.append(f"`{path}` must be one of {listed}, got {_show(value)}{hint_text}")
        return _INVALID
    if spec.low is not None or spec.high is not None:
        try:
            if hint is int:
                check_int(
                    path,
                    value,
                    low=None if spec.low is None else int(spec.low),
                    high=None if spec.high is None else int(spec.high),
                )
            else:
                check_number(
                    path,
                    value,
                    low=spec.low,
                    high=spec.high,
                    low_open=spec.low_open,
                    high_open=spec.high_open,
                )
        except (TypeError, ValueError) as err:
            problems.append(str(err))
            return _INVALID
    if hint is int and beyond_int64(value, path, problems):  # after a tighter range's message
        return _INVALID
    return value


def _schema_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build(cls: type, raw: Any, path: str, problems: list[str], *, skip: Sequence[str] = ()) -> Any:
    """Build dataclass ``cls`` from a raw mapping, appending every problem to ``problems``."""
    if not isinstance(raw, Mapping):
        problems.append(
            f"`{path}` must be a mapping of keys to values, got {_type_name(raw)} {_show(raw)}."
        )
        return _INVALID
    fields = _schema_fields(cls)
    hints = typing.get_type_hints(cls)
    allowed = list(skip) + list(fields)
    for key in raw:
        if key not in fields and key not in skip:
            problems.append(_unknown_key(path, key, allowed))
    kwargs = {}
    for name, f in fields.items():
        spec = f.metadata.get("spec")
        if name in raw and raw[name] is None and spec is not None and spec.required:
            problems.append(f"`{_path(path, name)}` is required, got null ({spec.help}).")
        elif name in raw:
            value = _convert(raw[name], hints[name], spec, _path(path, name), problems)
            if value is not _INVALID:
                kwargs[name] = value
        elif spec is not None and spec.required:
            problems.append(f"`{_path(path, name)}` is required ({spec.help}).")
    return cls(**kwargs)


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: The longest label: ``checkpoints/<label>.pt`` is written through the temporary
#: ``.<label>.pt.<pid>.<8 hex>.tmp`` (25 more characters with a 7-digit pid, Linux's
#: largest), and file systems take names of at most 255 bytes (Linux, macOS, Windows).
_MAX_LABEL = 255 - 25
#: Names Windows keeps for devices: a file named so (any case, any extension: ``aux.txt``,
#: ``CON.pt``) cannot be created, copied or unzipped there. Python's own list
#: (``pathlib.PureWindowsPath.is_reserved`` up to 3.12, ``os.path.isreserved`` from 3.13:
#: COM1-9 and LPT1-9 with the superscripts ¹ ² ³, which a run ``name`` can spell, CONIN$ and
#: CONOUT$) and COM0 and LPT0, which Microsoft's "Naming Files, Paths, and Namespaces" page
#: lists too.
WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{d}{i}" for d in ("COM", "LPT") for i in "0123456789\u00b9\u00b2\u00b3"}
)
#: How the refusals name them.
WINDOWS_RESERVED_TEXT = "CON, PRN, AUX, NUL, CONIN$, CONOUT$, COM0-9, LPT0-9, COM¹²³, LPT¹²³"


def windows_reserved(file_name: str) -> bool:
    """Whether Windows reserves ``file_name`` for a device: its part before the first dot,
    trailing spaces dropped, is one of :data:`WINDOWS_RESERVED` in any case.

    Example:
        >>> [windows_reserved(n) for n in ("con.pt", "aux.txt.pt", "console.pt", "com10.pt")]
        [True, True, False, False]
        >>> [windows_reserved(n) for n in ("COM0.pt", "lpt\u00b3.x", "com\u2074.x", "conin$.pt")]
        [True, True, False, True]
    """
    return file_name.partition(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED


def _check_label(label: Any, default: str, path: str, problems: list[str]) -> str:
    """An optimizer entry's ``label`` (it names files), or ``default`` after a problem."""
    if not isinstance(label, str) or not _LABEL.match(label):
        problems.append(
            f"`{path}.label` must be a name of letters, digits and _.+- "
            f"(it names files), got {_show(label)}{_yaml_note(label, text=True)}."
        )
        return default
    if len(label) > _MAX_LABEL:
        problems.append(
            f"`{path}.label` has {len(label)} characters, more than the {_MAX_LABEL} a "
            f"checkpoint's file name allows (checkpoints/<label>.pt), got {_show(label)}; "
            "use a shorter label."
        )
        return default
    if windows_reserved(f"{label}.pt"):
        # Refused everywhere, as labels differing only in case are: a run directory copied to
        # (or written on) Windows would lack this checkpoint.
        base = label.partition(".")[0]
        problems.append(
            f"`{path}.label` = {label!r} names the checkpoint checkpoints/{label}.pt, and "
            f"Windows reserves the file name {base.upper()!r} for a device "
            f"({WINDOWS_RESERVED_TEXT}, in any case and with any extension): the run directory "
            "could not be copied to or written on Windows. Use another label, e.g. "
            f"{base + '-1' + label[len(base) :]!r}."
        )
        return default
    return label
