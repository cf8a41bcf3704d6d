"""Checks a dataset before a sweep starts Ray: every image decodes, paths resolve.

``check_images`` decodes every image of a :class:`~.source.DatasetSource` in a thread pool
(Pillow releases the GIL while decoding) with a rich progress bar, and records success in
``<cache_dir>/checked/<fingerprint>.json`` so that the next sweep of the same dataset skips the
work. The fingerprint covers the annotation bytes and every image's name and size (see
:func:`~.source.fingerprint_files`): editing an annotation or replacing an image with a file of
another size checks again.
"""

from __future__ import annotations

import errno
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weakbench.core.data.source import DatasetSource
from weakbench.core.errors import DataError
from weakbench.core.io import atomic_write_text

__all__ = ["check_images", "resolve_path"]


def resolve_path(path: str | Path, what: str = "--data") -> Path:
    """``path`` made absolute with every symlink resolved.

    Raises:
        DataError: the path runs into a symlink loop (or another ``ELOOP``), naming it and the fix.
    """
    p = Path(path).expanduser()
    try:
        return p.resolve(strict=False)
    except RuntimeError as e:  # Python < 3.13: "Symlink loop from '…'"
        raise DataError(f"{p}: {what} is a symbolic link loop ({e}); point {what} at the real dataset directory") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{p}: {what} is a symbolic link loop; point {what} at the real dataset directory") from None
        raise DataError(f"{p}: cannot resolve {what} ({e.strerror or e})") from None


def check_images(source: DatasetSource, cache_dir: str | Path | None, *, workers: int | None = None,
                 progress: bool = True, console=None) -> bool:
    """Decode every image of ``source`` (declared size included), in parallel, once per fingerprint.

    Args:
        source: the dataset.
        cache_dir: where the result is cached (``<cache_dir>/checked/<fingerprint>.json``);
            ``None`` checks without caching.
        workers: decoding threads (default ``min(8, cpu count)``).
        progress: show a rich progress bar (on ``console``, default stderr).

    Returns:
        True when the images were decoded now, False when the cache said they had been.

    Raises:
        DataError: one or more images are missing, do not decode or have another size than declared;
            names the first three (each message names the file and the fix) and how many failed.
    """
    marker = Path(cache_dir).expanduser() / "checked" / f"{source.fingerprint}.json" if cache_dir is not None else None
    if marker is not None and marker.is_file():
        return False
    n = len(source.records)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    errors: list[tuple[int, str]] = []

    def one(i: int) -> None:
        try:
            source.load_image(i)
        except DataError as e:
            errors.append((i, str(e)))

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wb-check") as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        if progress:
            from rich.console import Console
            from rich.progress import track

            for f in track(futures, total=n, description=f"checking {n} images of {source.name}",
                           console=console or Console(stderr=True), transient=True):
                f.result()
        else:
            for f in futures:
                f.result()
    if errors:
        errors.sort()
        shown = "; ".join(msg for _, msg in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"{len(errors)} of {n} image(s) of {source.name} are unusable: {shown}{more}")
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"dataset": source.name, "root": str(source.root), "images": n,
                                              "seconds": round(time.time() - t0, 3), "checked_at": time.time()}))
    return True
