"""Atomic files: checkpoints (``torch.save``), JSON, text.

Every write goes to a temporary file in the destination's directory, is flushed and fsync'ed,
then renamed over the destination with :func:`os.replace`, so a reader (or a resumed run) sees
either the old file or the new one, never a half-written one.

Checkpoints hold only tensors, dicts, lists, tuples, numbers, strings and None, so they load
with ``torch.load(weights_only=True)`` (no pickled code runs when reading them).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_write",
    "write_text_atomic",
    "write_json_atomic",
    "save_checkpoint",
    "load_checkpoint",
]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file, then move it over ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the same directory (so os.replace is a rename), created with the
    # process umask's permissions (tempfile.mkstemp would make it private, 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write strict JSON (no NaN/Infinity) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` a state dict atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(
    path: str | Path, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        ValueError: The file is not a readable checkpoint (the message names it).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"cannot load checkpoint '{path}': {err}") from None
