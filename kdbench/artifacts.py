"""Shared artefacts: files built once, reused across cells, and verified before they are trusted.

Trained teachers, replayed teacher outputs, trained diffusion models and corrupted test sets
are all one kind of thing (see DESIGN.md, "Shared artefacts"): written atomically (temp file in
the same directory + ``os.replace``) with a SHA-256 sidecar ``<file>.sha256``, and verified on
load. A mismatch raises :class:`ArtifactCorrupt`, which names the file and says how to rebuild it.

Checkpoints are different: they belong to one cell and are only a shortcut. A checkpoint that
cannot be read is moved aside (``checkpoint.pt.corrupt``) and the cell restarts from scratch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import KdbenchError

_CHUNK = 1 << 20


class ArtifactCorrupt(KdbenchError):
    """A cached artefact does not match the checksum recorded when it was written."""


class DiskError(KdbenchError):
    """Writing an artefact failed for a reason the user must fix (disk full, read-only)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``, released by the OS if its holder dies (SIGKILL-safe);
    how a shared artefact is built once by whichever process needs it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` via a temp file in the same directory + fsync + ``os.replace``; on failure the
    temp file is removed and a full disk or unwritable place is a one-line :class:`DiskError`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise disk_error(path, e) from None
        raise


def _json_default(obj: Any) -> Any:
    """Records (``model_dump``) as their JSON dicts; anything else as its string."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(obj)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically (:func:`write_bytes_atomic`)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    write_bytes_atomic(Path(path), data.encode())


def disk_error(path: Path, e: OSError) -> KdbenchError | OSError:
    """A full disk or an unwritable place as a one-line :class:`DiskError`; other errors as they are."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(
            f"no space left on device while writing {path} ({e.strerror}); free space and run again"
        )
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return DiskError(f"cannot write {path}: {e.strerror}; make the directory writable or choose another")
    return e


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a temp file + rename; never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(Path(path), buf.getvalue())


def save_checked(obj: Any, path: Path) -> str:
    """Save ``obj`` atomically and record its SHA-256 next to it; returns the digest."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(path, data)
    write_bytes_atomic(sidecar(path), (digest + "\n").encode())
    return digest


def record_checksum(path: Path) -> str:
    """Record the SHA-256 of an existing file (written by other code) in its sidecar."""
    digest = sha256_file(Path(path))
    write_bytes_atomic(sidecar(Path(path)), (digest + "\n").encode())
    return digest


def verify(path: Path, rebuild_hint: str = "") -> None:
    """Raise :class:`ArtifactCorrupt` unless ``path`` matches its recorded checksum."""
    path = Path(path)
    hint = f"; {rebuild_hint}" if rebuild_hint else f"; delete {path} to rebuild it"
    side = sidecar(path)
    if not side.exists():
        raise ArtifactCorrupt(f"{path} has no recorded checksum ({side.name} is missing){hint}")
    want = side.read_text().strip()
    got = sha256_file(path)
    if got != want:
        raise ArtifactCorrupt(
            f"{path} is corrupt: its SHA-256 is {got[:12]}…, recorded {want[:12]}… when it was written{hint}"
        )


def load_checked(path: Path, map_location: Any = "cpu", rebuild_hint: str = "", weights_only: bool = True):
    """Verify ``path`` against its sidecar checksum, then ``torch.load`` it."""
    verify(path, rebuild_hint)
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def load_checkpoint(path: Path, map_location: Any = "cpu", log: logging.Logger | None = None):
    """A cell's checkpoint, or None when there is none or it cannot be read.

    An unreadable checkpoint (truncated, damaged) is moved aside to ``<name>.corrupt`` and
    logged, so the cell restarts from scratch instead of failing on every rerun.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # pickle, zip and EOF errors all mean the same here
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        msg = (
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
            f"moved it to {aside.name} and restarting this cell from scratch"
        )
        if log is not None:
            log.warning(msg)
        logging.getLogger("kdbench").warning(msg)
        return None
