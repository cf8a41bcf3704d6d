"""Reader of wsolevaluation's plain-text metadata (CUB, ILSVRC, OpenImages; Choe et al., CVPR 2020).

A metadata directory (e.g. ``metadata/CUB/test``) holds::

    image_ids.txt      <path>                         one image per line
    class_labels.txt   <path>,<label>                 integer class index, one per image
    image_sizes.txt    <path>,<w>,<h>                 pixels
    localization.txt   <path>,<x0>,<y0>,<x1>,<y1>     one line per GT box (CUB, ILSVRC), or
                       <path>,<mask_png>,<ignore_png> one line per instance mask (OpenImages);
                                                      the ignore PNG is given on the image's
                                                      first line only and may be empty
    class_names.txt    (optional, a weakbench addition) one class name per line, line c = class c

``<path>`` is relative to ``image_root`` (default: the metadata directory's parent), mask and
ignore PNGs relative to ``mask_root`` (default: ``image_root``), as wsolevaluation joins them
with its ``data_root`` / ``mask_root``. ``localization.txt`` may be absent (a training split with
no localisation labels): images then have no boxes.

Conventions: single-label (``multilabel = False``); every box of an image has the image's class;
boxes are read as floats in original pixels. Mask variant: a mask pixel is foreground when its
grey value is > 0 (wsolevaluation: ``imread(..., GRAYSCALE) > 0.5``); the ignore region is
``ignore_png > 0`` minus the union of the instance masks (wsolevaluation's ``get_mask``); a mask
PNG whose size differs from ``image_sizes.txt`` is resized to it with nearest neighbour; each
instance's box is its mask's pixel extent ``(min_x, min_y, max_x + 1, max_y + 1)``; empty mask
PNGs give no instance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from weakbench.core.data.source import (
    Annotations, DatasetSource, ImageRecord, box_outside_image, class_subset_fingerprint, class_subset_name,
    fingerprint_files, parse_classes, select_classes, semantic_from_instances,
)
from weakbench.core.errors import DataError

__all__ = ["WsolMetadataSource", "WSOL_METADATA_FILES"]

WSOL_METADATA_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: metadata file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


class WsolMetadataSource(DatasetSource):
    """A dataset described by wsolevaluation metadata files (see the module docstring).

    Args:
        metadata_dir: directory holding ``image_ids.txt`` etc.
        image_root: directory the image paths are relative to; default ``metadata_dir.parent``.
        mask_root: directory the mask / ignore PNG paths are relative to; default ``image_root``.
        name: short name; default ``"<parent>-<dir>"`` of the metadata directory (``CUB-test``).
        classes: keep only the images of these classes (names from ``class_names.txt``, or the
            label numbers as strings when it is absent; ``"3,7"`` or a list; None: all). Kept
            classes are renumbered ``0..k-1`` in label order; see :attr:`DatasetSource.classes`.

    Raises:
        DataError: a missing or malformed file (naming the file, line and field), an image id
            without a label or size, a missing image file, no images; a class name the metadata
            does not have.
    """

    multilabel = False

    def __init__(self, metadata_dir: str | Path, *, image_root: str | Path | None = None,
                 mask_root: str | Path | None = None, name: str | None = None,
                 classes: str | list[str] | None = None):
        self.root = Path(metadata_dir).resolve()
        self.image_root = Path(image_root).resolve() if image_root else self.root.parent
        self.mask_root = Path(mask_root).resolve() if mask_root else self.image_root
        self.name = name or f"{self.root.parent.name}-{self.root.name}"
        f_ids, f_labels, f_sizes, f_loc = (self.root / f for f in WSOL_METADATA_FILES)

        ids = [line.strip() for _, line in _lines(f_ids)]
        if not ids:
            raise DataError(f"{f_ids}: no images (the file is empty); list one image path per line")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{f_ids}: image id {dup!r} is listed twice")
        known = set(ids)

        labels: dict[str, int] = {}
        for n, line in _lines(f_labels):
            parts = line.rsplit(",", 1)
            if len(parts) != 2:
                raise DataError(f"{f_labels}: line {n}: expected '<path>,<label>', got {line!r}")
            try:
                labels[parts[0]] = int(parts[1])
            except ValueError:
                raise DataError(f"{f_labels}: line {n}: label {parts[1]!r} is not an integer") from None
            if labels[parts[0]] < 0:
                raise DataError(f"{f_labels}: line {n}: label {parts[1]!r} is negative")
        sizes: dict[str, tuple[int, int]] = {}
        for n, line in _lines(f_sizes):
            parts = line.rsplit(",", 2)
            try:
                if len(parts) != 3:
                    raise ValueError
                sizes[parts[0]] = (int(parts[1]), int(parts[2]))
            except ValueError:
                raise DataError(f"{f_sizes}: line {n}: expected '<path>,<width>,<height>' with integers, got {line!r}") from None
        for i in ids:
            if i not in labels:
                raise DataError(f"{f_labels}: no label for image {i!r} listed in image_ids.txt")
            if i not in sizes:
                raise DataError(f"{f_sizes}: no size for image {i!r} listed in image_ids.txt")

        # localization: boxes or masks
        self.localization = "none"
        self._boxes: dict[str, list[list[float]]] = {i: [] for i in ids}
        self._mask_paths: dict[str, list[str]] = {i: [] for i in ids}
        self._ignore_paths: dict[str, str] = {}
        self._mask_boxes: dict[str, np.ndarray] = {}
        if f_loc.exists():
            for n, line in _lines(f_loc):
                parts = line.split(",")
                if len(parts) >= 5 and self.localization != "masks":
                    path, *coords = line.rsplit(",", 4)
                    try:
                        box = [float(v) for v in coords]
                    except ValueError:
                        raise DataError(f"{f_loc}: line {n}: box coordinates {coords} are not numbers") from None
                    if box[2] < box[0] or box[3] < box[1]:
                        raise DataError(f"{f_loc}: line {n}: box {box} has x1 < x0 or y1 < y0 (expected x0,y0,x1,y1)")
                    if path not in known:
                        raise DataError(f"{f_loc}: line {n}: image {path!r} is not listed in image_ids.txt")
                    outside = box_outside_image(tuple(box), *sizes[path]) if path in sizes else ""
                    if outside:
                        raise DataError(f"{f_loc}: line {n}: box x0,y0,x1,y1 = {box} of image {path!r} "
                                        f"({sizes[path][0]}x{sizes[path][1]} in image_sizes.txt) lies outside the image "
                                        f"({outside}); fix the box or the image size (boxes outside their image are "
                                        f"refused, never clipped)")
                    self.localization = "boxes"
                    self._boxes[path].append(box)
                elif len(parts) >= 3 and self.localization != "boxes":
                    path, mask, ignore = line.rsplit(",", 2)
                    if path not in known:
                        raise DataError(f"{f_loc}: line {n}: image {path!r} is not listed in image_ids.txt")
                    if not mask:
                        raise DataError(f"{f_loc}: line {n}: empty mask path (expected '<path>,<mask_png>,<ignore_png>')")
                    self.localization = "masks"
                    if path not in self._ignore_paths:
                        self._ignore_paths[path] = ignore
                    elif ignore:
                        raise DataError(f"{f_loc}: line {n}: image {path!r} has an ignore PNG on a later line; "
                                        f"give it on the image's first line only")
                    self._mask_paths[path].append(mask)
                else:
                    raise DataError(f"{f_loc}: line {n}: expected '<path>,<x0>,<y0>,<x1>,<y1>' or "
                                    f"'<path>,<mask_png>,<ignore_png>' (one kind per file), got {line!r}")

        f_names = self.root / "class_names.txt"
        max_label = max(labels[i] for i in ids)
        if f_names.exists():
            self.class_names = [line.strip() for _, line in _lines(f_names)]
            if max_label >= len(self.class_names):
                raise DataError(f"{f_names}: {len(self.class_names)} names but class_labels.txt uses label {max_label}")
        else:
            self.class_names = [str(c) for c in range(max_label + 1)]
        self.num_classes = len(self.class_names)
        wanted = parse_classes(classes)
        if wanted is not None:
            kept = select_classes(self.class_names, wanted, str(self.root / "class_labels.txt"))
            new_label = {old: new for new, old in enumerate(kept)}
            ids = [i for i in ids if labels[i] in new_label]
            if not ids:
                raise DataError(f"{f_labels}: classes: no image has class {', '.join(self.class_names[k] for k in kept)}; "
                                f"choose other classes")
            labels = {i: new_label[labels[i]] for i in ids}
            self.class_names = [self.class_names[k] for k in kept]
            self.num_classes = len(self.class_names)
        self.has_masks = self.localization == "masks"

        self.records = [ImageRecord(index=k, image_id=i, path=self.image_root / i, width=sizes[i][0], height=sizes[i][1])
                        for k, i in enumerate(ids)]
        self._labels = np.zeros((len(ids), self.num_classes), dtype=np.float32)
        for k, i in enumerate(ids):
            self._labels[k, labels[i]] = 1.0
        self._classes = np.array([labels[i] for i in ids], dtype=np.int64)

        meta = [f for f in (f_ids, f_labels, f_sizes, f_loc, f_names) if f.exists()]
        files = [(i, self.image_root / i) for i in ids]
        files += [(f"mask:{m}", self.mask_root / m) for i in ids for m in self._mask_paths[i]]
        files += [(f"mask:{p}", self.mask_root / p) for p in self._ignore_paths.values() if p]
        self.fingerprint = fingerprint_files(meta, files)
        if wanted is not None:
            self.classes = tuple(self.class_names)
            self.fingerprint = class_subset_fingerprint(self.fingerprint, self.class_names)
            self.name = class_subset_name(self.name, self.class_names)

    def labels_matrix(self) -> np.ndarray:
        return self._labels

    def gt_boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        iid = self.records[index].image_id
        if self.localization == "masks":
            if iid not in self._mask_boxes:  # boxes of the mask variant come from the masks
                self.annotations(index)
            boxes = self._mask_boxes[iid]
        else:
            boxes = np.array(self._boxes[iid], dtype=np.float64).reshape(-1, 4)
        return boxes.copy(), np.full((boxes.shape[0],), self._classes[index], dtype=np.int64)

    def _read_mask(self, rel: str, w: int, h: int) -> np.ndarray:
        path = self.mask_root / rel
        try:
            with Image.open(path) as im:
                m = im.convert("L")
        except FileNotFoundError:
            raise DataError(f"{path}: mask file not found (listed in {self.root / 'localization.txt'})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot decode mask PNG ({type(e).__name__}: {e})") from None
        if m.size != (w, h):
            m = m.resize((w, h), Image.NEAREST)
        return np.asarray(m) > 0

    def annotations(self, index: int) -> Annotations:
        rec = self.records[index]
        iid, h, w = rec.image_id, rec.height, rec.width
        cls = self._classes[index]
        inst = None
        ignore = None
        if self.localization == "masks":
            masks = [m for m in (self._read_mask(p, w, h) for p in self._mask_paths[iid]) if m.any()]
            inst = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
            boxes = []
            for m in inst:
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
            self._mask_boxes[iid] = boxes.astype(np.float64)  # integers: exact in float32
            ign = self._ignore_paths.get(iid, "")
            if ign:
                ignore = self._read_mask(ign, w, h)
                if len(inst):
                    ignore &= ~inst.any(axis=0)
        else:
            boxes = np.array(self._boxes[iid], dtype=np.float32).reshape(-1, 4)
        box_classes = np.full((boxes.shape[0],), cls, dtype=np.int64)
        sem = semantic_from_instances((h, w), inst, box_classes, ignore) if inst is not None else None
        return Annotations(labels=self._labels[index].copy(), boxes=boxes, box_classes=box_classes,
                           instance_masks=inst, ignore_mask=ignore, semantic_mask=sem)
