"""Stage products: hashed, atomically published, shareable across the trials of a sweep.

A stage's product is a directory ``<root>/<stage>-<hash16>/`` holding the stage's files and a
``manifest.json``::

    {"stage": ..., "method": ..., "hash": ..., "reads": {field: value}, "inputs": {stage: hash},
     "dataset_fingerprint": ..., "splits": ..., "files": {name: sha256}, "metrics": {...},
     "complete": true, "created": <unix time>, "trial": <trial id that computed it>}

The hash covers the method name, the stage name, the values of the config fields the stage
``reads``, its inputs' hashes, the dataset fingerprint, the stored split and the code
(:func:`code_digest`: a product is reused only by the code that made it), so two trials whose
upstream settings agree compute the same hash.

Where products live:

* ``shared`` stages: ``<sweep dir>/products/`` — every trial of the sweep looks there first. On
  a multi-node cluster the sweep directory must be on storage every node sees (the same
  requirement as Ray Tune's ``storage_path``).
* other stages: ``<trial dir>/products/``.

Concurrency: the trial that computes a product holds an exclusive ``fcntl`` lock on
``<root>/<stage>-<hash16>.lock`` while it computes; a concurrent trial of the same sweep that
needs the same product blocks on that lock and then finds the product complete (a cache hit), so
no product is computed twice. The lock is released by the kernel if its holder dies, and the
waiting trial then computes the product itself.

Publication is atomic: files are written into ``<stage>-<hash16>.tmp-<random>/``, checksummed,
the manifest is written last, and the directory is renamed into place. A product without a
complete, checksum-valid manifest is never used. ``map`` stages save their per-item results in
chunks under ``<stage>-<hash16>.partial/`` so that a killed stage resumes at its first unsaved
chunk (each chunk file holds ``{item key: result}``, its key list written last); the partial
directory is removed once the product is published.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from weakbench.core.io import atomic_write, atomic_write_text, fsync_dir


MANIFEST = "manifest.json"
#: bump when the product layout or a stage's semantics change, so old products are not reused.
PRODUCTS_VERSION = 1


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return value  # json keeps 1.0 as 1.0: stable
    return value


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """16 hex characters of sha256 over the weakbench version and the source of every module of
    :mod:`weakbench.methods` (the code that computes stage products).

    A product is reused only by the code that made it. The digest is deliberately coarse: editing
    any method recomputes every method's products (a stale detector or pseudo-mask reused after a
    bug fix would be silently wrong; a recomputation costs time only). Stage products are a
    sweep-level cache, so this rarely costs anything in practice.
    """
    import weakbench
    import weakbench.methods as methods

    h = hashlib.sha256(weakbench.__version__.encode())
    for path in sorted(Path(methods.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def stage_hash(*, method: str, stage: str, reads: Mapping[str, Any], inputs: Mapping[str, str],
               dataset_fingerprint: str, splits_digest: str, code: str | None = None) -> str:
    """16 hex characters of sha256 over the canonical JSON of everything that shapes a product:
    the method and stage, the config fields the stage reads, its inputs' hashes, the dataset
    fingerprint, the split digest, and the code (``code``, default :func:`code_digest`)."""
    doc = {"v": PRODUCTS_VERSION, "method": method, "stage": stage, "reads": _canonical(dict(reads)),
           "inputs": _canonical(dict(inputs)), "dataset": dataset_fingerprint, "splits": splits_digest,
           "code": code_digest() if code is None else code}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Product:
    """One stage product location (complete or not)."""

    def __init__(self, root: Path, stage: str, digest: str):
        self.root = Path(root)
        self.stage = stage
        self.hash = digest
        self.dir = self.root / f"{stage}-{digest}"
        self.partial_dir = self.root / f"{stage}-{digest}.partial"
        self.lock_path = self.root / f"{stage}-{digest}.lock"

    def __repr__(self) -> str:
        return f"Product({self.dir})"

    # ------------------------------------------------------------------ reading
    def manifest(self) -> dict[str, Any] | None:
        """The manifest if the product is complete and every file's checksum matches, else None."""
        f = self.dir / MANIFEST
        if not f.is_file():
            return None
        try:
            man = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if not man.get("complete") or man.get("hash") != self.hash:
            return None
        for name, digest in man.get("files", {}).items():
            p = self.dir / name
            if not p.is_file() or file_sha256(p) != digest:
                return None
        return man

    @property
    def complete(self) -> bool:
        return self.manifest() is not None

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive inter-process lock for computing this product (blocks while another holds it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def new_staging_dir(self) -> Path:
        """A fresh directory to write the product's files into before :meth:`publish`."""
        self.root.mkdir(parents=True, exist_ok=True)
        d = self.root / f"{self.stage}-{self.hash}.tmp-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d

    def publish(self, staging: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Checksum ``staging``'s files, write the manifest last, rename into place.

        If a complete product already exists (published by another trial meanwhile), the staging
        directory is discarded and the existing manifest returned: a published product is never
        overwritten.
        """
        existing = self.manifest()
        if existing is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return existing
        files = {p.relative_to(staging).as_posix(): file_sha256(p)
                 for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST}
        man = {**dict(meta), "stage": self.stage, "hash": self.hash, "files": files, "complete": True,
               "created": time.time()}
        with atomic_write(staging / MANIFEST, "w", fsync=True) as f:
            json.dump(man, f, indent=2, sort_keys=True, default=str)
        fsync_dir(staging)
        if self.dir.exists():  # an incomplete leftover (no valid manifest): replace it
            shutil.rmtree(self.dir, ignore_errors=True)
        os.replace(staging, self.dir)
        fsync_dir(self.root)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return man

    # ------------------------------------------------------------------ map-stage chunks
    def saved_keys(self) -> set[str]:
        """Item keys whose results are saved in this map stage's chunks."""
        done: set[str] = set()
        if self.partial_dir.is_dir():
            for f in self.partial_dir.glob("*.keys.json"):
                if (self.partial_dir / (f.name[:-len(".keys.json")] + ".pt")).is_file():
                    try:
                        done.update(json.loads(f.read_text()))
                    except (OSError, ValueError):
                        continue
        return done

    def load_chunks(self) -> dict[str, Any]:
        """Every saved result, ``{item key: result}``."""
        from weakbench.methods.pipeline import load_data  # data only: a crafted chunk is refused, not run

        out: dict[str, Any] = {}
        if self.partial_dir.is_dir():
            for f in sorted(self.partial_dir.glob("*.keys.json")):
                pt = self.partial_dir / (f.name[:-len(".keys.json")] + ".pt")
                if pt.is_file():
                    out.update(load_data(pt))
        return out

    def save_chunk(self, results: Mapping[str, Any]) -> Path:
        """Atomically save one chunk of map results ``{item key: result}`` (torch.save) and its key
        list; the chunk is named by the hash of its keys, so any chunking of the remaining items
        (another trial, another chunk size) can resume from what is saved."""
        import torch

        self.partial_dir.mkdir(parents=True, exist_ok=True)
        keys = sorted(results)
        cid = hashlib.sha256("\0".join(keys).encode()).hexdigest()[:16]
        final = self.partial_dir / f"{cid}.pt"
        with atomic_write(final) as f:
            torch.save(dict(results), f)
        atomic_write_text(self.partial_dir / f"{cid}.keys.json", json.dumps(keys))  # the key list last: it marks the chunk saved
        return final


def clean_stale_staging(root: Path, older_than_s: float = 3600.0) -> None:
    """Remove staging directories (``*.tmp-*``) left by killed trials more than an hour ago."""
    if not root.is_dir():
        return
    now = time.time()
    for d in root.glob("*.tmp-*"):
        try:
            if now - d.stat().st_mtime > older_than_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue
