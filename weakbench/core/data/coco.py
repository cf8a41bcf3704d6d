"""COCO instances JSON reader (the primary format, DESIGN.md "Data").

Layout::

    <root>/annotations/instances.json
    <root>/images/<file_name>          (file_name as in the JSON, may contain sub-directories)

Conventions (decided here, used by every evaluator):

* **Class index** ``c`` = position of the category id in the *sorted* list of category ids;
  ``class_names[c]`` is that category's ``name``.
* **Records** are ordered by image id.
* **Crowd annotations** (``iscrowd = 1``) are not objects: they give no image-level label, no
  GT box, no instance. Their pixels (the RLE / polygon mask; the bbox rectangle when the
  annotation has no segmentation) form the ``ignore_mask``, minus the pixels of any non-crowd
  instance of the image, exactly as wsolevaluation builds OpenImages ignore regions
  (``ignore = ignore_region & ~union(instances)``). Semantic masks carry 255 there.
* **Image-level labels** are the classes with at least one non-crowd annotation (so every
  positive (image, class) pair of a WSOL evaluation has at least one GT box).
* **Boxes**: ``[x, y, w, h]`` → ``(x, y, x + w, y + h)``, float32, original pixels.
* **Masks** come from pycocotools ``COCO.annToMask`` (polygons and RLE). The dataset
  ``has_masks`` when every non-crowd annotation has a non-empty ``segmentation``; otherwise
  ``instance_masks`` and ``semantic_mask`` are ``None``.
* **Semantic masks**: instances painted by decreasing area (smaller objects on top), see
  :func:`~.source.semantic_from_instances`.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from weakbench.core.data.source import (
    Annotations, DatasetSource, ImageRecord, box_outside_image, class_subset_fingerprint, class_subset_name,
    fingerprint_files, parse_classes, select_classes, semantic_from_instances,
)
from weakbench.core.errors import DataError

__all__ = ["CocoSource", "COCO_ANNOTATION_FILE", "COCO_IMAGE_DIR", "load_coco_json"]

COCO_ANNOTATION_FILE = "annotations/instances.json"
COCO_IMAGE_DIR = "images"


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def load_coco_json(ann_file: Path) -> dict:
    """Read and validate a COCO instances JSON file.

    Checks the fields this package uses: ``images[i].{id, file_name, width, height}``,
    ``annotations[j].{id, image_id, category_id, bbox}`` (and ``iscrowd``, ``segmentation``
    when present), ``categories[k].{id, name}``, uniqueness of ids and that every annotation
    refers to a known image and category. Fills ``iscrowd = 0`` where absent.

    Returns:
        the parsed dict.

    Raises:
        DataError: one line naming the file and the JSON position or the field, e.g.
            ``…/instances.json: annotations[12].bbox: expected 4 numbers [x, y, w, h], got None``.
    """
    ann_file = Path(ann_file)
    try:
        text = ann_file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{ann_file}: annotation file not found; a COCO dataset needs {COCO_ANNOTATION_FILE}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_file}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not UTF-8 text ({e}); a COCO annotation file is JSON") from None

    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{ann_file}: {field}: {problem}")

    if not isinstance(d, dict):
        raise fail("<root>", f"expected a JSON object with images, annotations, categories; got {type(d).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in d:
            raise fail(key, "missing field (a COCO instances file has images, annotations and categories)")
        if not isinstance(d[key], list):
            raise fail(key, f"expected a list, got {type(d[key]).__name__}")
    if not d["images"]:
        raise fail("images", "no images: the list is empty")
    if not d["categories"]:
        raise fail("categories", "no categories: the list is empty")

    img_ids: set = set()
    images_by_id: dict = {}
    for i, im in enumerate(d["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            raise fail(where, f"expected an object, got {type(im).__name__}")
        for f in ("id", "file_name", "width", "height"):
            if f not in im:
                raise fail(f"{where}.{f}", "missing field")
        if not _is_int(im["id"]):
            raise fail(f"{where}.id", f"expected an integer, got {im['id']!r}")
        if im["id"] in img_ids:
            raise fail(f"{where}.id", f"duplicate image id {im['id']}")
        img_ids.add(im["id"])
        images_by_id[im["id"]] = im
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise fail(f"{where}.file_name", f"expected a non-empty string, got {im['file_name']!r}")
        for f in ("width", "height"):
            if not _is_int(im[f]) or im[f] <= 0:
                raise fail(f"{where}.{f}", f"expected a positive integer (pixels), got {im[f]!r}")

    cat_ids: set = set()
    for k, c in enumerate(d["categories"]):
        where = f"categories[{k}]"
        if not isinstance(c, dict):
            raise fail(where, f"expected an object, got {type(c).__name__}")
        for f in ("id", "name"):
            if f not in c:
                raise fail(f"{where}.{f}", "missing field")
        if not _is_int(c["id"]):
            raise fail(f"{where}.id", f"expected an integer, got {c['id']!r}")
        if c["id"] in cat_ids:
            raise fail(f"{where}.id", f"duplicate category id {c['id']}")
        cat_ids.add(c["id"])

    ann_ids: set = set()
    for j, a in enumerate(d["annotations"]):
        where = f"annotations[{j}]"
        if not isinstance(a, dict):
            raise fail(where, f"expected an object, got {type(a).__name__}")
        for f in ("id", "image_id", "category_id", "bbox"):
            if f not in a:
                raise fail(f"{where}.{f}", "missing field")
        if a["id"] in ann_ids:
            raise fail(f"{where}.id", f"duplicate annotation id {a['id']!r}")
        ann_ids.add(a["id"])
        if a["image_id"] not in img_ids:
            raise fail(f"{where}.image_id", f"{a['image_id']!r} is not the id of any entry of images")
        if a["category_id"] not in cat_ids:
            raise fail(f"{where}.category_id", f"{a['category_id']!r} is not the id of any entry of categories")
        b = a["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(_is_num(v) for v in b)):
            raise fail(f"{where}.bbox", f"expected 4 numbers [x, y, w, h], got {b!r}")
        if b[2] < 0 or b[3] < 0:
            raise fail(f"{where}.bbox", f"negative width or height in [x, y, w, h] = {b!r}")
        im = images_by_id[a["image_id"]]
        outside = box_outside_image((b[0], b[1], b[0] + b[2], b[1] + b[3]), im["width"], im["height"])
        if outside:
            raise fail(f"{where}.bbox", f"annotation id {a['id']!r} of image id {im['id']!r} ({im['file_name']}, "
                                        f"{im['width']}x{im['height']}): [x, y, w, h] = {b!r} lies outside the image "
                                        f"({outside}); fix the box or the image's width/height (boxes outside their "
                                        f"image are refused, never clipped)")
        a.setdefault("iscrowd", 0)
        if a["iscrowd"] not in (0, 1):
            raise fail(f"{where}.iscrowd", f"expected 0 or 1, got {a['iscrowd']!r}")
        seg = a.get("segmentation")
        if seg is None:
            continue
        if isinstance(seg, list):
            for p, poly in enumerate(seg):
                if not (isinstance(poly, list) and len(poly) % 2 == 0 and all(_is_num(v) for v in poly)):
                    raise fail(f"{where}.segmentation[{p}]", "expected a polygon: a list of an even number of coordinates")
        elif isinstance(seg, dict):
            if "counts" not in seg or "size" not in seg:
                raise fail(f"{where}.segmentation", "an RLE needs 'counts' and 'size'")
        else:
            raise fail(f"{where}.segmentation", f"expected a polygon list or an RLE object, got {type(seg).__name__}")
    return d


def _has_segmentation(a: dict) -> bool:
    seg = a.get("segmentation")
    if seg is None:
        return False
    if isinstance(seg, list):
        return any(len(p) >= 6 for p in seg)
    return True


class CocoSource(DatasetSource):
    """A COCO-format dataset (see the module docstring for every convention).

    Args:
        root: dataset directory.
        name: short name; default the directory name.
        ann_file: annotation JSON; default ``root / "annotations/instances.json"``.
        image_dir: image directory; default ``root / "images"``.
        classes: keep only these category names (``"person,dog"`` or a list; None: all). Their
            class indices follow the sorted category ids of the kept categories; images without a
            non-crowd instance of a kept class are dropped, and so are other categories'
            annotations (their crowd regions included: a crowd of another class is background
            for this subset, as ``COCOeval`` restricted to ``catIds`` treats it). See
            :attr:`DatasetSource.classes` for the name and fingerprint.

    Raises:
        DataError: missing / malformed annotation file, missing image files, no images; a class
            name the file does not have; no image holds a kept class.
    """

    multilabel = True

    def __init__(self, root: str | Path, *, name: str | None = None, ann_file: str | Path | None = None,
                 image_dir: str | Path | None = None, classes: str | list[str] | None = None):
        from pycocotools.coco import COCO  # local import keeps `import weakbench` light

        self.root = Path(root).resolve()
        self.name = name or self.root.name
        self.ann_file = Path(ann_file) if ann_file else self.root / COCO_ANNOTATION_FILE
        self.image_dir = Path(image_dir) if image_dir else self.root / COCO_IMAGE_DIR
        d = load_coco_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image directory not found; a COCO dataset keeps its images in "
                            f"{COCO_IMAGE_DIR}/ next to annotations/")

        cats = sorted(d["categories"], key=lambda c: c["id"])
        wanted = parse_classes(classes)
        if wanted is not None:
            keep = [cats[k] for k in select_classes([str(c["name"]) for c in cats], wanted, str(self.ann_file))]
            ids = {c["id"] for c in keep}
            anns = [a for a in d["annotations"] if a["category_id"] in ids]
            with_objects = {a["image_id"] for a in anns if not a["iscrowd"]}
            if not with_objects:
                raise DataError(f"{self.ann_file}: classes: no image holds a non-crowd instance of "
                                f"{', '.join(str(c['name']) for c in keep)}; choose other classes")
            d = {**d, "categories": keep, "annotations": [a for a in anns if a["image_id"] in with_objects],
                 "images": [im for im in d["images"] if im["id"] in with_objects]}
            cats = keep
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        self.num_classes = len(cats)
        self._cat_to_class = {cid: i for i, cid in enumerate(self.category_ids)}

        images = sorted(d["images"], key=lambda im: im["id"])
        self.records = [
            ImageRecord(index=i, image_id=im["id"], path=self.image_dir / im["file_name"],
                        width=int(im["width"]), height=int(im["height"]))
            for i, im in enumerate(images)
        ]
        self._index_of_id = {r.image_id: r.index for r in self.records}
        self.fingerprint = fingerprint_files(
            [self.ann_file], ((im["file_name"], self.image_dir / im["file_name"]) for im in images))
        if wanted is not None:
            self.classes = tuple(self.class_names)
            self.fingerprint = class_subset_fingerprint(self.fingerprint, self.class_names)
            self.name = class_subset_name(self.name, self.class_names)

        coco = COCO()
        coco.dataset = d
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        self.coco = coco

        n, c = len(self.records), self.num_classes
        self._labels = np.zeros((n, c), dtype=np.float32)
        self._objects: list[list[dict]] = [[] for _ in range(n)]
        self._crowds: list[list[dict]] = [[] for _ in range(n)]
        for a in d["annotations"]:  # file order within an image
            i = self._index_of_id[a["image_id"]]
            if a["iscrowd"]:
                self._crowds[i].append(a)
            else:
                self._objects[i].append(a)
                self._labels[i, self._cat_to_class[a["category_id"]]] = 1.0
        self.has_masks = all(_has_segmentation(a) for objs in self._objects for a in objs)
        self._boxes: list[np.ndarray] = []
        self._box_classes: list[np.ndarray] = []
        for objs in self._objects:
            b = np.array([a["bbox"] for a in objs], dtype=np.float64).reshape(-1, 4)
            b[:, 2:] += b[:, :2]
            self._boxes.append(b)
            self._box_classes.append(np.array([self._cat_to_class[a["category_id"]] for a in objs], dtype=np.int64))

    # ---------------------------------------------------------------- queries
    def labels_matrix(self) -> np.ndarray:
        return self._labels

    def index_of(self, image_id: int) -> int:
        """Record index of COCO image ``image_id``; KeyError if unknown."""
        return self._index_of_id[image_id]

    def annotation_ids(self, index: int, *, crowd: bool = False) -> list[int]:
        """COCO annotation ids of record ``index``: its objects, or its crowd regions."""
        return [a["id"] for a in (self._crowds if crowd else self._objects)[index]]

    def gt_boxes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._boxes[index].copy(), self._box_classes[index].copy()

    def _mask(self, a: dict, h: int, w: int) -> np.ndarray:
        if _has_segmentation(a):
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
                warnings.simplefilter("ignore", DeprecationWarning)
                m = self.coco.annToMask(a)
            if m.shape != (h, w):
                raise DataError(f"{self.ann_file}: annotation id {a['id']}: segmentation size {m.shape} differs from "
                                f"its image's (height, width) = ({h}, {w})")
            return m.astype(bool)
        # no segmentation: the box rectangle (used for crowd regions of box-only datasets)
        x, y, bw, bh = a["bbox"]
        m = np.zeros((h, w), dtype=bool)
        m[int(np.floor(y)):int(np.ceil(y + bh)), int(np.floor(x)):int(np.ceil(x + bw))] = True
        return m

    def annotations(self, index: int) -> Annotations:
        rec = self.records[index]
        h, w = rec.height, rec.width
        objs, crowds = self._objects[index], self._crowds[index]
        inst = None
        if self.has_masks:
            inst = np.stack([self._mask(a, h, w) for a in objs]) if objs else np.zeros((0, h, w), dtype=bool)
        ignore = None
        if crowds:
            ignore = np.zeros((h, w), dtype=bool)
            for a in crowds:
                ignore |= self._mask(a, h, w)
            if inst is not None and len(inst):
                ignore &= ~inst.any(axis=0)
            elif objs:  # no masks: keep GT boxes out of the ignore region
                for x0, y0, x1, y1 in self._boxes[index]:
                    ignore[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = False
        sem = semantic_from_instances((h, w), inst, self._box_classes[index], ignore) if inst is not None else None
        return Annotations(
            labels=self._labels[index].copy(),
            boxes=self._boxes[index].astype(np.float32),
            box_classes=self._box_classes[index].copy(),
            instance_masks=inst,
            ignore_mask=ignore,
            semantic_mask=sem,
        )
