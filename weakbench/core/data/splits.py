"""Deterministic, stored train / val / test splits (DESIGN.md: "Splits are deterministic and stored,
so every trial of a sweep sees the same split").

A split file is JSON::

    {"format": "weakbench-splits-v1", "dataset": "<name>", "fingerprint": "<16 hex>",
     "seed": 0, "fractions": [0.6, 0.2, 0.2], "num_records": 128,
     "classes": null, "splits": {"train": [...], "val": [...], "test": [...]}}

``classes`` is the class filter of the source (``["person"]``: indices are positions in the
filtered records) or null; files written before it existed lack the key and read as null.

Indices are positions in ``DatasetSource.records``. Loading refuses a file whose fingerprint is
not the source's: a changed annotation file or image set would silently shift every index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from weakbench.core.data.source import DatasetSource
from weakbench.core.errors import DataError
from weakbench.core.io import atomic_write_text

__all__ = ["Splits", "SPLIT_NAMES", "make_splits", "save_splits", "load_splits", "split_path", "load_or_make_splits"]

SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "weakbench-splits-v1"


class Splits(dict):
    """``{"train": [...], "val": [...], "test": [...]}`` (sorted record indices) that also
    remembers the dataset it was made for: ``fingerprint``, ``dataset`` (name), ``seed``,
    ``fractions``, ``num_records`` and ``classes`` (the source's class filter, or None)."""

    def __init__(self, splits: dict[str, list[int]], *, fingerprint: str, dataset: str, seed: int,
                 fractions: Sequence[float], num_records: int, classes: Sequence[str] | None = None):
        super().__init__(splits)
        self.classes = tuple(classes) if classes else None
        self.fingerprint = fingerprint
        self.dataset = dataset
        self.seed = seed
        self.fractions = tuple(float(f) for f in fractions)
        self.num_records = num_records


def make_splits(source: DatasetSource, seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Splits:
    """Split record indices into train / val / test by a seeded permutation.

    The permutation is ``numpy.random.default_rng(seed).permutation(N)``; the first
    ``n_train = floor(f_train·N)`` go to train, the next ``n_val = floor(f_val·N)`` to val, the
    rest to test. When ``N >= 3`` every split gets at least one image (taken from the largest
    split). Each list is sorted.

    Args:
        source: the dataset.
        seed: integer seed (>= 0).
        fractions: three non-negative fractions (train, val, test) summing to 1 (±1e-6).

    Raises:
        ValueError: bad fractions or seed.
    """
    f = [float(x) for x in fractions]
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {tuple(fractions)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n = len(source.records)
    counts = [int(np.floor(f[0] * n)), int(np.floor(f[1] * n))]
    counts.append(n - sum(counts))
    if n >= 3:
        for k in range(3):
            while counts[k] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[k] += 1
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + counts)
    splits = {name: sorted(int(i) for i in perm[bounds[k]:bounds[k + 1]]) for k, name in enumerate(SPLIT_NAMES)}
    return Splits(splits, fingerprint=source.fingerprint, dataset=source.name, seed=seed, fractions=f, num_records=n,
                  classes=source.classes)


def save_splits(splits: Splits | dict, path: str | Path, *, fingerprint: str | None = None) -> Path:
    """Write ``splits`` as JSON (atomically: a temporary file renamed into place).

    Args:
        splits: a :class:`Splits` (carries its fingerprint) or a plain dict with ``fingerprint``
            given.
        path: target file; parent directories are created.

    Raises:
        ValueError: no fingerprint known.
    """
    fp = fingerprint or getattr(splits, "fingerprint", None)
    if not fp:
        raise ValueError("save_splits needs the dataset fingerprint: pass a Splits from make_splits or fingerprint=")
    doc = {
        "format": _FORMAT,
        "dataset": getattr(splits, "dataset", None),
        "fingerprint": fp,
        "seed": getattr(splits, "seed", None),
        "fractions": list(getattr(splits, "fractions", ())) or None,
        "num_records": getattr(splits, "num_records", None),
        "classes": list(getattr(splits, "classes", None) or ()) or None,
        "splits": {k: [int(i) for i in v] for k, v in splits.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def load_splits(path: str | Path, source: DatasetSource | None = None) -> Splits:
    """Read a split file; with ``source``, check it belongs to that dataset.

    Raises:
        DataError: missing or malformed file (names the file and field); fingerprint differs from
            ``source.fingerprint`` (names both and the fix); an index outside ``[0, len(source))``.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("splits"), dict):
        raise DataError(f"{path}: splits: missing field (expected a weakbench split file with 'splits' and 'fingerprint')")
    fp = doc.get("fingerprint")
    if not isinstance(fp, str) or not fp:
        raise DataError(f"{path}: fingerprint: missing field; re-create the file with save_splits")
    for name, idx in doc["splits"].items():
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise DataError(f"{path}: splits.{name}: expected a list of integer record indices")
    if source is not None:
        if fp != source.fingerprint:
            raise DataError(f"{path}: fingerprint {fp} was made for dataset {doc.get('dataset')!r} but "
                            f"{source.name!r} at {source.root} has fingerprint {source.fingerprint}; the annotations "
                            f"or images changed — delete the split file to make new splits (results will not be "
                            f"comparable with runs on the old split)")
        n = len(source.records)
        for name, idx in doc["splits"].items():
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise DataError(f"{path}: splits.{name}: index {bad[0]} outside [0, {n})")
    return Splits(doc["splits"], fingerprint=fp, dataset=doc.get("dataset") or "", seed=doc.get("seed"),
                  fractions=doc.get("fractions") or (), num_records=doc.get("num_records"), classes=doc.get("classes"))


def split_path(directory: str | Path, source: DatasetSource, seed: int) -> Path:
    """Conventional split file location: ``<directory>/splits/<name>-<fingerprint>-seed<seed>.json``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in source.name)
    return Path(directory) / "splits" / f"{safe}-{source.fingerprint}-seed{seed}.json"


def load_or_make_splits(source: DatasetSource, seed: int, path: str | Path,
                        fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> Splits:
    """Load the split file at ``path`` if it exists (checked against ``source``), else make
    the splits with :func:`make_splits` and save them there. Every trial of a sweep calling this
    with the same path gets the same split.

    Raises:
        DataError: as :func:`load_splits`; also when the stored seed or fractions differ from
            the requested ones.
    """
    path = Path(path)
    if path.exists():
        s = load_splits(path, source)
        want = tuple(float(f) for f in fractions)
        if (s.seed is not None and s.seed != seed) or (s.fractions and tuple(s.fractions) != want):
            raise DataError(f"{path}: stored splits have seed={s.seed}, fractions={list(s.fractions)} but seed={seed}, "
                            f"fractions={list(want)} were requested; use another split file or the stored settings")
        return s
    s = make_splits(source, seed, fractions)
    save_splits(s, path)
    return s
