"""The dataset-source contract: records, per-image annotations, images, fingerprints.

A :class:`DatasetSource` answers every query the engine and the evaluators ask about a dataset
(in the spirit of pycocotools' ``COCO`` object). Concrete sources: :class:`~.coco.CocoSource`
(COCO instances JSON, the primary format) and :class:`~.wsol.WsolMetadataSource`
(wsolevaluation's plain-text metadata). Use :func:`~.open.open_dataset` to get one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from weakbench.core.errors import DataError

__all__ = ["ImageRecord", "Annotations", "DatasetSource", "fingerprint_files", "box_outside_image", "BOX_TOLERANCE_PX",
           "parse_classes", "select_classes", "class_subset_fingerprint", "class_subset_name"]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    Attributes:
        index: position in ``DatasetSource.records`` (0-based); what splits store.
        image_id: the dataset's own id (COCO: the int ``images[].id``; wsol metadata: the
            relative image path string).
        path: absolute path of the image file.
        width, height: size in pixels as declared by the annotations (the image must decode to
            this size).
    """

    index: int
    image_id: int | str
    path: Path
    width: int
    height: int


@dataclasses.dataclass
class Annotations:
    """Ground truth of one image, in ORIGINAL pixel coordinates.

    Attributes:
        labels: float32 (C,) multi-hot in {0, 1}: classes with at least one non-crowd instance.
        boxes: float32 (K, 4) ``x0, y0, x1, y1`` pixels (COCO ``[x, y, w, h]`` →
            ``(x, y, x + w, y + h)``); crowd regions are not boxes.
        box_classes: int64 (K,) class index in ``[0, C)`` of each box.
        instance_masks: bool (K, H, W), one per box, or ``None`` when the dataset has no masks.
        ignore_mask: bool (H, W) pixels excluded from pixel metrics (COCO crowd regions, wsol
            ignore PNGs) minus pixels of any instance; ``None`` when there is none.
        semantic_mask: uint8 (H, W): 0 background, ``c + 1`` for class ``c``, 255 ignore; or
            ``None`` when the dataset has no masks.
    """

    labels: np.ndarray
    boxes: np.ndarray
    box_classes: np.ndarray
    instance_masks: np.ndarray | None
    ignore_mask: np.ndarray | None
    semantic_mask: np.ndarray | None

    @property
    def num_instances(self) -> int:
        return int(self.boxes.shape[0])


class DatasetSource:
    """Base class of dataset readers.

    Attributes:
        name: short name (directory name, or ``"synthetic"``) used in tags and tables.
        root: the dataset directory.
        fingerprint: 16 hex characters, sha256 over the annotation file bytes and the sorted
            image file names and sizes (see :func:`fingerprint_files`); tags every run and guards
            stored splits.
        num_classes: ``C``.
        class_names: ``C`` names in class-index order.
        multilabel: True when an image may carry several classes (COCO), False for
            single-label data (wsol metadata: CUB, ILSVRC, OpenImages).
        has_masks: True when instance masks are available (semantic masks then too).
        records: the images, ``records[i].index == i``.
        classes: the class filter the source was opened with (names, in the dataset's class
            order), or None for every class. A filtered source keeps only those classes (class
            indices renumbered ``0..len(classes)-1`` in the dataset's order), only the images that
            hold at least one of them, and only their instances; its ``name`` is
            ``"<name>-a+b"`` and its fingerprint differs from the whole dataset's
            (:func:`class_subset_fingerprint`).
    """

    name: str
    root: Path
    fingerprint: str
    num_classes: int
    class_names: list[str]
    multilabel: bool
    has_masks: bool
    records: list[ImageRecord]
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, root='{self.root}', images={len(self.records)}, "
                f"classes={self.num_classes}, fingerprint={self.fingerprint})")

    # ---------------------------------------------------------------- labels (cheap)
    def labels_matrix(self) -> np.ndarray:
        """float32 (N, C) multi-hot image-level labels of every record (cached, cheap)."""
        raise NotImplementedError

    def image_labels(self, index: int) -> np.ndarray:
        """float32 (C,) multi-hot labels of record ``index`` (no mask decoding)."""
        return self.labels_matrix()[index]

    # ---------------------------------------------------------------- boxes (cheap)
    def gt_boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """GT boxes of record ``index`` without decoding masks: ``(boxes float64 (K, 4) x0, y0, x1, y1
        in original pixels, box_classes int64 (K,))``. Float64 keeps COCO's ``x + w`` exact, which
        matters where ``int(x·S/w)`` truncates (``Annotations.boxes`` is the same in float32)."""
        a = self.annotations(index)
        return a.boxes.astype(np.float64), a.box_classes

    # ---------------------------------------------------------------- full annotations
    def annotations(self, index: int) -> Annotations:
        """Labels, boxes, instance / ignore / semantic masks of record ``index`` in original pixels."""
        raise NotImplementedError

    # ---------------------------------------------------------------- images
    def load_image(self, index: int) -> Image.Image:
        """Decode record ``index`` as an RGB PIL image of the declared size.

        Raises:
            DataError: the file is missing or does not decode (names the file), or it decodes to
                a size other than the annotations declare (boxes would be wrong).
        """
        rec = self.records[index]
        try:
            with Image.open(rec.path) as im:
                im.load()
                img = im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{rec.path}: image file not found (record {index}, image id {rec.image_id!r}); "
                            f"restore it or remove it from the annotations") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{rec.path}: cannot decode image ({type(e).__name__}: {e}); "
                            f"re-download it or remove it from the annotations") from None
        if img.size != (rec.width, rec.height):
            raise DataError(f"{rec.path}: image is {img.size[0]}x{img.size[1]} but the annotations declare "
                            f"width={rec.width}, height={rec.height}; fix the annotation sizes")
        return img


BOX_TOLERANCE_PX = 1.0
"""How far (pixels) a box may reach beyond its image before it is refused (float rounding of
annotation tools); beyond it the dataset is refused, never clipped, in every format."""


def box_outside_image(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """``""`` when ``box = (x0, y0, x1, y1)`` (pixels) lies inside a ``width`` × ``height`` image
    (within :data:`BOX_TOLERANCE_PX`), otherwise what is wrong, e.g. ``"x1 = 790 > width 640"``."""
    x0, y0, x1, y1 = box
    t = BOX_TOLERANCE_PX
    problems = [p for p, bad in ((f"x0 = {x0:g} < 0", x0 < -t), (f"y0 = {y0:g} < 0", y0 < -t),
                                 (f"x1 = {x1:g} > width {width}", x1 > width + t),
                                 (f"y1 = {y1:g} > height {height}", y1 > height + t)) if bad]
    return ", ".join(problems)


def fingerprint_files(annotation_files: Iterable[Path], image_files: Iterable[tuple[str, Path]]) -> str:
    """Dataset fingerprint: 16 hex chars of sha256.

    The hash covers, in order, the bytes of each annotation file, then for each image (sorted by
    its relative name) the line ``"<name>\\0<size in bytes>\\n"``.

    Args:
        annotation_files: annotation / metadata files, hashed in the given order.
        image_files: ``(relative name, absolute path)`` of every image referenced.

    Raises:
        DataError: an image file is missing, or cannot be read (a symbolic-link loop, no
            permission); names the first few and how many.
    """
    h = hashlib.sha256()
    for f in annotation_files:
        h.update(Path(f).read_bytes())
    missing: list[str] = []
    unreadable: list[str] = []
    entries = []
    for rel, path in image_files:
        try:
            entries.append((rel, path.stat().st_size))
        except FileNotFoundError:
            missing.append(str(path))
        except OSError as e:  # a symbolic-link loop (ELOOP), no permission, a name too long ...
            unreadable.append(f"{path} ({e.strerror or type(e).__name__})")
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else "")
        raise DataError(f"{len(unreadable)} image file(s) referenced by the annotations cannot be read: {shown}; "
                        f"fix: replace each with the image file itself (a broken or looping link cannot be read)")
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} image file(s) referenced by the annotations are missing: {shown}; "
                        f"restore them or remove them from the annotations")
    for rel, size in sorted(entries):
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()[:16]


def semantic_from_instances(shape: tuple[int, int], masks: np.ndarray, classes: np.ndarray,
                            ignore: np.ndarray | None) -> np.ndarray:
    """Paint a semantic mask uint8 (H, W) from instance masks.

    Instances are painted in order of decreasing mask area, so a smaller object lying on a larger
    one keeps its class where they overlap (painter's order); pixels of class ``c`` get ``c + 1``,
    background 0, and ``ignore`` pixels 255.
    """
    sem = np.zeros(shape, dtype=np.uint8)
    if masks.shape[0]:
        areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
        for k in np.argsort(-areas, kind="stable"):
            sem[masks[k]] = int(classes[k]) + 1
    if ignore is not None:
        sem[ignore] = 255
    return sem


def parse_classes(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A class filter as given on a command line (``"person,dog"``) or in a file (a list), as a
    tuple of names (whitespace stripped, duplicates dropped, order kept); None or empty: no filter.

    Raises:
        DataError: an empty name (``"person,,dog"``) or a value that is neither a string nor a list of strings.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise DataError(f"classes: expected a comma-separated string or a list of class names, got {value!r}")
    names = [x.strip() for x in items]
    if any(not n for n in names):
        raise DataError(f"classes: {value!r} holds an empty class name; write e.g. person,dog")
    out = tuple(dict.fromkeys(names))
    return out or None


def select_classes(class_names: list[str], classes: Iterable[str], where: str) -> list[int]:
    """Indices (ascending, i.e. in the dataset's class order) of the named classes.

    Args:
        class_names: the dataset's class names in class-index order.
        classes: the names to keep.
        where: the file the names come from, for the error message.

    Raises:
        DataError: a name the dataset does not have (names it, ``where`` and some known names).
    """
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        shown = ", ".join(class_names[:12]) + (f" ... ({len(class_names)} in all)" if len(class_names) > 12 else "")
        raise DataError(f"{where}: classes: {unknown[0]!r} is not a class of this dataset (its classes: {shown}); "
                        f"fix --classes / the space file's classes")
    return sorted({index[c] for c in classes})


def class_subset_fingerprint(fingerprint: str, kept_names: list[str]) -> str:
    """Fingerprint of a class-filtered dataset: 16 hex chars of sha256 over the unfiltered
    fingerprint and ``"\0classes=" + ",".join(kept_names)`` (names in the dataset's class order)."""
    return hashlib.sha256(f"{fingerprint}\0classes={','.join(kept_names)}".encode()).hexdigest()[:16]


def class_subset_name(name: str, kept_names: list[str]) -> str:
    """Name of a class-filtered dataset: ``"coco128-person+dog"`` (no brackets: rich markup and
    file names take it as it is)."""
    return f"{name}-{'+'.join(kept_names)}"
