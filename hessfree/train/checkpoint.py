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

``torch.save`` writes a zip archive; its end record's comment (which zip readers, torch's
included, skip) carries a short note outside the pickle: the torch and hessfree versions that
wrote the file, the state's ``format`` and the payload's digest. A file this torch cannot
unpickle at all (a much newer torch's) is then named as such, with the version to use, rather
than "truncated or overwritten"; a note whose digest is not the payload's is refused. Files
without a note (written before it existed, or truncated) read as before.
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
    """A checkpoint file cannot be used: damaged (unreadable, truncated, its content fails its
    digest), or written by a torch that this one cannot read (the message names it)."""


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
    """``torch.save`` a state dict atomically, with the SHA-256 of its serialised bytes and
    the versions that wrote it in the archive's comment (see the module docstring)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    wrapped = {
        "sha256": digest,
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    note = {
        "torch": str(torch.__version__),
        "hessfree": _hessfree_version(),
        "format": state.get("format"),
        "sha256": digest,
    }
    data = _with_note(buffer.getvalue(), _NOTE_MAGIC + json.dumps(note).encode())
    atomic_write(path, lambda f: f.write(data))


#: Opens the archive comment that :func:`save_checkpoint` writes.
_NOTE_MAGIC = b"hessfree checkpoint "
#: A zip archive's end-of-central-directory record: its signature and its size without the
#: comment, which follows it (at most 65,535 bytes, its length in the record's last 2 bytes).
_END_SIGNATURE, _END_SIZE = b"PK\x05\x06", 22


def _hessfree_version() -> str:
    try:
        from importlib.metadata import version

        return version("hessfree")
    except Exception:  # noqa: BLE001 -- not installed: running from a checkout
        return "unknown"


def _with_note(archive: bytes, comment: bytes) -> bytes:
    """``archive`` with ``comment`` as its zip comment (unchanged if it is not a zip that
    ends in a comment-less end record, as ``torch.save`` writes)."""
    end = archive[-_END_SIZE:]
    if not end.startswith(_END_SIGNATURE) or end[-2:] != b"\0\0" or len(comment) > 0xFFFF:
        return archive
    return archive[:-2] + len(comment).to_bytes(2, "little") + comment


def _read_note(data: bytes) -> dict[str, Any] | None:
    """The note :func:`save_checkpoint` left in the archive's comment (``data`` is the whole
    file), without unpickling anything; None if there is none or it cannot be read."""
    try:
        tail = data[-(_END_SIZE + 0xFFFF) :]
        at = tail.rfind(_END_SIGNATURE)
        if at < 0:
            return None
        length = int.from_bytes(tail[at + 20 : at + 22], "little")
        comment = tail[at + _END_SIZE :]
        if len(comment) != length or not comment.startswith(_NOTE_MAGIC):
            return None
        note = json.loads(comment[len(_NOTE_MAGIC) :])
    except ValueError:
        return None
    return note if isinstance(note, dict) else None


def _damaged(path: str | Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}' is damaged: {why}. Nothing was changed; restore the file from a "
        "copy, or start a new run (a run directory cannot continue without it)."
    )


def _unreadable(path: str | Path, data: bytes, err: Exception, fallback: str) -> CheckpointError:
    """A file torch failed to unpickle: another torch's, when its note says so, else damaged.

    The note is outside the pickle, so it names the torch that wrote the file even when this
    one cannot read a byte of the payload (a newer torch's types or protocol).
    """
    note = _read_note(data)
    written = note.get("torch") if note else None
    if not isinstance(written, str) or written == str(torch.__version__):
        return _damaged(path, fallback)
    by = f", hessfree {note['hessfree']}" if isinstance(note.get("hessfree"), str) else ""
    return CheckpointError(
        f"checkpoint '{path}' was written by torch {written}{by}, and this torch "
        f"{torch.__version__} cannot read it ({type(err).__name__}). Nothing was changed; "
        f"resume the run with torch {written} (e.g. pip install torch=={written}), or start "
        "a new run."
    )


def load_checkpoint(
    path: str | Path, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and verify its digest.

    Raises:
        CheckpointError: The file is unreadable, truncated, not a checkpoint, or its content
            does not match the digest stored with it (the message names the file).
    """
    # One read: the run replaces its checkpoints (atomically) while others may read them, and
    # a payload and a note read from two opens could come from two files ("damaged").
    try:
        with open(path, "rb") as f:
            whole = f.read()
    except FileNotFoundError:
        raise
    except OSError as err:  # a directory, no permission: as torch.load(path) said before
        raise _unreadable(
            path, b"", err, "it cannot be read as a checkpoint (truncated or overwritten)"
        ) from None
    try:
        outer = torch.load(io.BytesIO(whole), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises several types for a corrupt file
        # torch's own text suggests weights_only=False, which would run pickled code: not shown.
        raise _unreadable(
            path, whole, err, "it cannot be read as a checkpoint (truncated or overwritten)"
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
    note = _read_note(whole)
    if note is not None and note.get("sha256") != digest:
        raise _damaged(path, "the versions noted in its zip comment belong to another content")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- the digest matched: another torch's, or damaged
        raise _unreadable(
            path, whole, err, f"its verified content cannot be read ({err})"
        ) from None
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
