"""``open_dataset``: one entry point that recognises the dataset format of a path."""

from __future__ import annotations

from pathlib import Path

from weakbench.core.data.check import resolve_path
from weakbench.core.data.coco import COCO_ANNOTATION_FILE, CocoSource
from weakbench.core.data.source import DatasetSource
from weakbench.core.data.synthetic import ensure_synthetic, parse_synthetic, synthetic_name
from weakbench.core.data.wsol import WSOL_METADATA_FILES, WsolMetadataSource
from weakbench.core.errors import DataError

__all__ = ["open_dataset", "DEFAULT_CACHE_DIR"]

DEFAULT_CACHE_DIR = Path("~/.cache/weakbench")

_EXPECTED = (f"a COCO directory ({COCO_ANNOTATION_FILE} + images/) or a wsolevaluation metadata directory "
             f"({', '.join(WSOL_METADATA_FILES)}), or no path for the synthetic default")


def open_dataset(path: str | Path | None, *, cache_dir: str | Path | None = None, seed: int = 0,
                 image_root: str | Path | None = None, mask_root: str | Path | None = None,
                 classes: str | list[str] | tuple[str, ...] | None = None) -> DatasetSource:
    """Open a dataset, recognising its format.

    Args:
        path: ``None`` (or ``"synthetic"``) for the embedded synthetic dataset,
            ``"synthetic:touching"`` / ``"synthetic:hard"`` for its variants
            (:mod:`~.synthetic`); a COCO directory (``annotations/instances.json`` + ``images/``);
            or a wsolevaluation metadata directory (``image_ids.txt``, ``class_labels.txt``,
            ``image_sizes.txt``, ``localization.txt``).
        cache_dir: where the synthetic dataset is generated (``<cache_dir>/synthetic-v1-seed<seed>``,
            a variant ``synthetic-v1-<variant>-seed<seed>``, re-used while its fingerprint file
            matches); default ``~/.cache/weakbench``.
        seed: seed of the synthetic dataset (ignored for real data).
        image_root, mask_root: wsol metadata only; the directories image and mask paths are
            relative to (default: the metadata directory's parent).
        classes: keep only these classes (``"person,dog"`` or a list of names; None: all), for
            every format; the source is then named ``"<name>-person+dog"`` and has its own
            fingerprint (see :attr:`DatasetSource.classes`).

    Returns:
        a :class:`DatasetSource` (``CocoSource`` named ``"synthetic"`` for ``None``,
        ``"synthetic-<variant>"`` for a variant).

    Raises:
        DataError: the path does not exist, is a symlink loop, is not a directory, or holds neither format
            (the message lists what was expected); an unknown class name; any reader error.
        ConfigError: ``synthetic:<name>`` with an unknown variant.
    """
    variant = parse_synthetic(path) if (path is None or isinstance(path, str)) else None
    if variant is not None:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()
        return CocoSource(ensure_synthetic(cache, seed=seed, variant=variant), name=synthetic_name(variant),
                          classes=classes)
    p = Path(path).expanduser()
    resolve_path(p)  # a symlink loop is named as such (exists() would say "does not exist")
    if not p.exists():
        raise DataError(f"{p}: dataset directory does not exist; expected {_EXPECTED}")
    if not p.is_dir():
        raise DataError(f"{p}: not a directory; expected {_EXPECTED}")
    if (p / COCO_ANNOTATION_FILE).exists():
        if image_root is not None or mask_root is not None:
            raise DataError(f"{p}: image_root/mask_root apply to wsolevaluation metadata only; a COCO dataset keeps "
                            f"its images in {p / 'images'}")
        return CocoSource(p, classes=classes)
    if (p / "image_ids.txt").exists() or (p / "class_labels.txt").exists():
        missing = [f for f in WSOL_METADATA_FILES[:3] if not (p / f).exists()]
        if missing:
            raise DataError(f"{p}: wsolevaluation metadata directory lacks {', '.join(missing)}; "
                            f"expected {', '.join(WSOL_METADATA_FILES)}")
        return WsolMetadataSource(p, image_root=image_root, mask_root=mask_root, classes=classes)
    if (p / "instances.json").exists() or (p / "annotations").is_dir():
        raise DataError(f"{p}: no {COCO_ANNOTATION_FILE}; a COCO dataset needs its annotations at exactly that path "
                        f"(rename the JSON to instances.json under annotations/)")
    found = sorted(x.name for x in p.iterdir())[:8]
    inside = [x for x in sorted(p.iterdir()) if x.is_dir() and _looks_like_dataset(x)]
    if inside:  # the folder above a dataset, e.g. ilsvrc_val1300/ whose metadata/ is the dataset
        raise DataError(f"{p}: not a dataset itself, but {', '.join(str(x) for x in inside)} is one; fix: use "
                        f"{inside[0]} as the dataset directory (--data {inside[0]})")
    raise DataError(f"{p}: not a dataset (found {found or 'an empty directory'}); expected {_EXPECTED}")


def _looks_like_dataset(d: Path) -> bool:
    """Whether directory ``d`` holds either format's marker file (COCO's annotation file, or
    wsolevaluation's ``image_ids.txt`` / ``class_labels.txt``)."""
    try:
        return (d / COCO_ANNOTATION_FILE).is_file() or (d / "image_ids.txt").is_file() or (d / "class_labels.txt").is_file()
    except OSError:
        return False
