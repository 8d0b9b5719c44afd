"""Atomic files: checkpoints (``torch.save``), JSON, text.

Every write goes to a temporary file in the destination's directory, is flushed and fsync'ed,
then renamed over the destination with :func:`os.replace`, so a reader (or a resumed run) sees
either the old file or the new one, never a half-written one.

Checkpoints hold only tensors, dicts, lists, tuples, numbers, strings and None, so they load
with ``torch.load(weights_only=True)`` (no pickled code runs when reading them). The state is
serialised once, and the file holds those bytes with their SHA-256 (``{"sha256": hex,
"payload": uint8 tensor}``); :func:`load_checkpoint` recomputes the digest, so a flipped bit is
an error rather than silently different weights. Files written before the digest existed
(the state dict itself) still load, unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "write_text_atomic",
    "write_json_atomic",
    "save_checkpoint",
    "load_checkpoint",
]


class CheckpointError(ValueError):
    """A checkpoint file is damaged: unreadable, truncated, or its content fails its digest."""


TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file, then move it over ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name in the same directory (so os.replace is a rename), created with the
    # process umask's permissions (tempfile.mkstemp would make it private, 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
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
    """``torch.save`` a state dict atomically, with the SHA-256 of its serialised bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapped = {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    atomic_write(path, lambda f: torch.save(wrapped, f))


def _damaged(path: str | Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}' is damaged: {why}. Nothing was changed; restore the file from a "
        "copy, or start a new run (a run directory cannot continue without it)."
    )


def load_checkpoint(
    path: str | Path, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its digest.

    Raises:
        CheckpointError: The file is unreadable, truncated, not a checkpoint, or its content
            does not match the digest stored with it (the message names the file).
    """
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 -- torch raises several types for a corrupt file
        # torch's own text suggests weights_only=False, which would run pickled code: not shown.
        raise _damaged(
            path, "it cannot be read as a checkpoint (truncated or overwritten)"
        ) from None
    if not isinstance(outer, dict):
        raise _damaged(path, f"it holds a {type(outer).__name__}, not a checkpoint")
    if "payload" not in outer:
        return outer  # written before checkpoints carried a digest
    payload, digest = outer.get("payload"), outer.get("sha256")
    if (
        not isinstance(payload, torch.Tensor)
        or payload.dtype != torch.uint8
        or not isinstance(digest, str)
    ):
        raise _damaged(path, "its digest or content is missing")
    data = payload.contiguous().numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise _damaged(
            path, "its content does not match the SHA-256 digest stored with it (changed on disk)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- the digest matched: written damaged
        raise _damaged(path, f"its verified content cannot be read ({err})") from None
    if not isinstance(state, dict):
        raise _damaged(path, f"it holds a {type(state).__name__}, not a checkpoint")
    return state


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``directory``."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
