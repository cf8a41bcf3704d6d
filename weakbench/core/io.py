"""Atomic file writes: a reader of the path sees the old file or the new one, never a torn one.

One implementation for every store that writes in place (sweep state, results partitions,
per-image tables, stage products, checkpoints, splits, dashboards, caches): the bytes go to a
hidden temporary file in the target's directory (``.<name>.<random>.tmp``: same filesystem, so
:func:`os.replace` is atomic; hidden, so directory readers that skip dot-files never see it), which
replaces the target only once written. A failed write leaves the target as it was and removes the
temporary file. The temporary file is created with the process's umask, as a plain ``open`` would.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator, Literal

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: Literal["wb", "w"] = "wb", *, fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit of the ``with`` block it
    replaces ``path`` (:func:`os.replace`), on an exception it is removed and ``path`` is untouched.

    Args:
        path: the file to write; its directory must exist.
        mode: ``"wb"`` (bytes: ``torch.save``, ``pyarrow.parquet.write_table``) or ``"w"`` (text,
            UTF-8).
        fsync: flush and ``fsync`` the file before the rename, so the new content survives a
            machine crash, not only a killed process (the directory entry is not fsync'ed: call
            :func:`fsync_dir` for that).

    Raises:
        OSError: the directory cannot be written (missing, full disk, read-only mount).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    f = open(tmp, "xb") if mode == "wb" else open(tmp, "x", encoding="utf-8")
    try:
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`). Raises OSError."""
    with atomic_write(path, "w", fsync=fsync) as f:
        f.write(text)


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so that renames into it survive a crash; best effort (a filesystem
    that refuses, or a missing directory, is ignored)."""
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
