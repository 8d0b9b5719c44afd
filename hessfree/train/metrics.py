"""The metrics log (``metrics.jsonl``), the run summary (``summary.json``) and its table.

``metrics.jsonl`` holds one JSON object per evaluation, written as one ``write`` of a whole
line and flushed, so a crash leaves at most a partial last line; :func:`read_metrics` ignores
it, and a resumed run truncates the file to the length recorded in its checkpoint, which
removes both partial lines and records made after the checkpoint (the resumed run writes them
again). Non-finite numbers are written as ``null`` (strict JSON).

Record keys: ``optimizer`` (label), ``step``, ``epoch`` (cases seen / training cases),
``seconds`` (training wall-clock, evaluation and checkpointing excluded), ``batch_loss`` (loss
on the last gradient batch, before its step; null at step 0), ``train_loss``, ``test_loss``,
``train_<metric>``, ``test_<metric>`` and, after a Hessian-free step, ``hf_<field>`` for each
field of ``HessianFree.last_step``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MetricsLog", "MetricsError", "read_metrics", "summarize", "format_table", "clean_value"]


def clean_value(value: Any) -> Any:
    """A JSON-ready copy: tensors and NumPy values to numbers, enums to values, NaN/Inf to None."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (torch.Tensor, np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_value(v) for v in value]
    return str(value)


class MetricsLog:
    """Append-only JSON-lines file, one flushed line per record.

    Args:
        path: The file; created if missing.
        truncate_to: Cut the file to this many bytes first (the length a checkpoint recorded).
    """

    def __init__(self, path: str | Path, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        self.path.touch(exist_ok=True)
        if truncate_to is not None:
            size = self.path.stat().st_size
            if size < truncate_to:
                raise ValueError(
                    f"'{self.path}' has {size} bytes, less than the {truncate_to} its "
                    "checkpoint recorded; the metrics file was edited or replaced."
                )
            with open(self.path, "r+b") as f:
                f.truncate(truncate_to)
        self._sha256 = hashlib.sha256(self.path.read_bytes())
        self._file = open(self.path, "ab")  # noqa: SIM115 -- closed in close()

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line and flush it."""
        line = (json.dumps(clean_value(dict(record)), allow_nan=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._file.flush()
        self._sha256.update(line)

    def tell(self) -> int:
        """Bytes written so far (what a checkpoint records)."""
        return self._file.tell()

    def sha256(self) -> str:
        """SHA-256 of the file's :meth:`tell` bytes (what a checkpoint records with them)."""
        return self._sha256.hexdigest()

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            # The record whose flush failed (a full disk) is still buffered, and closing
            # retries it and fails again: that error would replace the worded one the failed
            # append raised. The record was never counted (tell, sha256); --resume cuts the file
            # to what the latest checkpoint recorded. The descriptor is closed either way.
            pass

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsError(ValueError):
    """A complete line of a ``metrics.jsonl`` is not a JSON record: the file was damaged."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a ``metrics.jsonl`` (a partial last line is ignored).

    Raises:
        MetricsError: A complete line is not a JSON object (the message names file and line).
    """
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1]: '' or partial
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise MetricsError(
                f"'{path}' line {number} is not a JSON record ({line[:80]!r}): the metrics file "
                "was damaged or edited. Restore it from a copy, or start a new run."
            )
        records.append(record)
    return records


def _best(records: Sequence[Mapping[str, Any]], key: str, higher: bool) -> dict[str, Any] | None:
    valid = [r for r in records if isinstance(r.get(key), (int, float))]
    if not valid:
        return None
    target = (max if higher else min)(r[key] for r in valid)
    best = next(r for r in valid if r[key] == target)  # the first to reach it: time to best
    return {
        "value": best[key],
        "step": best["step"],
        "epoch": best.get("epoch"),
        "seconds": best["seconds"],
    }


def summarize(
    records: Iterable[Mapping[str, Any]],
    outcomes: Mapping[str, Mapping[str, Any]],
    *,
    metric: str,
    higher_is_better: bool,
    name: str,
    status: str,
) -> dict[str, Any]:
    """Per-optimizer final and best values, with the step and training time reaching them.

    Args:
        records: The metrics records.
        outcomes: Per optimizer label, facts from the loop (``name``, ``stop_reason``,
            ``diverged_at_step``, ``checkpoint_step``, ...), in the config's order.
        metric: The task metric's name (``accuracy``, ...).
        higher_is_better: Its direction.
        name: The experiment's name.
        status: ``completed`` or ``interrupted``.
    """
    records = list(records)
    out: dict[str, Any] = {
        "name": name,
        "status": status,
        "metric": metric,
        "higher_is_better": higher_is_better,
        # who diverged, at a glance (each entry's `diverged_at_step` says when)
        "diverged": [k for k, o in outcomes.items() if o.get("stop_reason") == "diverged"],
        "optimizers": {},
    }
    for label, outcome in outcomes.items():
        mine = [r for r in records if r.get("optimizer") == label]
        entry: dict[str, Any] = dict(outcome)
        entry["final"] = {k: v for k, v in mine[-1].items() if k != "optimizer"} if mine else None
        entry["best"] = {
            key: _best(mine, key, higher)
            for key, higher in (
                ("train_loss", False),
                ("test_loss", False),
                (f"train_{metric}", higher_is_better),
                (f"test_{metric}", higher_is_better),
            )
        }
        out["optimizers"][label] = entry
    return clean_value(out)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result, one row per optimizer.

    Steps, epochs and seconds are where the optimizer stopped (the loop's counts); the losses
    and metric are its last evaluation's. Where that evaluation came before the stop (an
    interrupted run checkpoints its last step without evaluating it), they carry a ``*`` and a
    line under the table says at which step they were taken.

    Example:
        >>> entry = {"stop_reason": "interrupted", "steps": 45, "epochs": 0.9, "seconds": 2.0,
        ...          "final": {"step": 40, "epoch": 0.8, "seconds": 1.8, "train_loss": 0.5,
        ...                    "test_loss": 0.6, "test_accuracy": 0.9}, "best": {}}
        >>> lines = format_table({"metric": "accuracy", "optimizers": {"adam": entry}})
        >>> print("\\n".join(" ".join(line.split()) for line in lines.splitlines()[2:]))
        adam interrupted 45 0.9 2 0.5* 0.6* 0.9* -
        * the last evaluation's, before the stop: adam's at step 40.
    """
    metric = summary["metric"]
    head = [
        "optimizer",
        "stop",
        "steps",
        "epochs",
        "seconds",
        "train loss",
        "test loss",
        f"test {metric}",
        "best test loss @ s",
    ]
    rows = [head]
    earlier = []  # (label, step of its last evaluation) where that came before its stop
    for label, entry in summary["optimizers"].items():
        final = entry.get("final") or {}
        best = (entry.get("best") or {}).get("test_loss")
        # the stop's counts (a summary written before they were recorded: the evaluation's)
        steps = entry.get("steps", final.get("step"))
        mark = ""
        if final and final.get("step") != steps:
            mark = "*"
            earlier.append((label, final.get("step")))
        rows.append(
            [
                label,
                _fmt(entry.get("stop_reason")),
                _fmt(steps),
                _fmt(entry.get("epochs", final.get("epoch")), 3),
                _fmt(entry.get("seconds", final.get("seconds")), 3),
                _fmt(final.get("train_loss")) + mark,
                _fmt(final.get("test_loss")) + mark,
                _fmt(final.get(f"test_{metric}")) + mark,
                f"{_fmt(best['value'])} @ {_fmt(best['seconds'], 3)}" if best else "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    # The label column is left-aligned, the numbers right-aligned.
    lines = [
        "  ".join(
            [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if earlier:
        where = ", ".join(f"{label}'s at step {step}" for label, step in earlier)
        lines.append(f"* the last evaluation's, before the stop: {where}.")
    return "\n".join(lines)
