"""Crash-safe writes: build into a temporary sibling, then rename over the target.

``os.replace`` within one directory is atomic on POSIX, so a reader (or a resumed run) sees either
the old file or the new one, never half of one. The temporary lives *next to* the target on
purpose: a temp file elsewhere (``/tmp``) may be on another filesystem, where "rename" silently
becomes a copy that a kill can cut short.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(target: Path, kind: str) -> None:
    """Temp siblings left by a writer that was killed (SIGKILL skips every cleanup)."""
    for stale in target.parent.glob(f".{target.name}.{kind}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file path next to ``path``; on success it is fsynced and renamed over
    ``path``. On error the temp file is removed and ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, "tmp")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield str(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temp dir next to ``target``; on success it replaces ``target`` (old copy kept as
    ``target.old`` until the swap is done). On error the temp dir is removed and ``target`` is
    untouched, so a crash mid-export never leaves a half-written pipeline."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target, "tmp")
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield str(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` all-or-nothing."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
