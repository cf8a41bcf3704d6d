"""Per-image results: what a paired comparison of two evaluations needs, and the metrics
recomputed exactly from it on any weighted subset (a bootstrap resample) of the images.

One table per evaluated split, one row per WSOL *sample*, an (image, present class) pair
(DESIGN.md, multi-label images), schema :data:`PER_IMAGE_SCHEMA`, version
:data:`PER_IMAGE_VERSION` (stored under ``weakbench.per_image_version`` in the schema metadata;
documented in ``docs/results_schema.md``):

* ``sample`` (string, ``"<image id>|<class index>"``), ``image`` (string, the record's
  ``image_id``), ``class_index`` (int32): the sample's identity. Two tables are compared only
  when their ``sample`` sets are equal; a bootstrap resamples *images* (all samples of an image
  move together).
* ``box_iou50`` (binary): the image's correctness at every threshold τ_t for MaxBoxAcc
  (largest contour, IoU ≥ 0.5), ``T`` bits packed with :func:`numpy.packbits` (big bit order,
  ``T = len(thresholds)``). ``box_v2_iou30``, ``box_v2_iou50``, ``box_v2_iou70`` (binary): the
  same for the all-contours boxes at δ = 30, 50, 70 (MaxBoxAccV2). Accuracy at τ_t over a
  weighted set is ``Σ_i w_i bit_i[t] / Σ_i w_i``; MaxBoxAcc is its maximum over t, so both are
  recomputed exactly (Choe et al. 2020, one τ for the whole set).
* ``top1_class_ok``, ``top5_class_ok`` (bool, null without a classifier): the sample's class is
  the top-1 / among the top-5 predictions; with the δ = 50 largest-contour bits they give
  top-1 / top-5 localisation at MaxBoxAcc's best τ of the resample.
* ``pxap_pos``, ``pxap_neg`` (list<int64>, null on samples without a mask): the sample's
  histograms of map values over its positive and (non-ignored) negative pixels on PxAP's bins;
  PxAP of a weighted set is that of the weighted sums (:func:`pxap_from_hists`).

Version 2 (:data:`PER_IMAGE_VERSION`) adds rows of other **kinds** (column ``kind``; the rows
above are ``"sample"``) and a ``scope`` (the metric's prefix, e.g. ``"pseudo_masks"``,
``"pseudo_masks/box_filled"``, ``"mask_rcnn"``; ``""`` for the evaluator's own names), so that the
remaining metrics are recomputed exactly on a resample too:

* ``"image"`` rows, one per evaluated image of a scope: ``sem_thresholds`` (list<float64>, T), and
  ``sem_classes`` (list<int32>, the k labels, 0 = background, that the image's ground truth or
  prediction uses at some threshold) with ``sem_tp``, ``sem_gt``, ``sem_pred`` (list<int64>, T×k
  row-major): the image's confusion counts per class — true positives, ground-truth pixels and
  predicted pixels (ignore pixels out) — from which the split's per-threshold IoU
  ``Σtp / (Σgt + Σpred − Σtp)`` and so ``miou`` (max over thresholds, as
  :class:`~weakbench.core.metrics.segmentation.SemanticEvaluator`) follow exactly; and, for
  multi-label classification, ``cls_scores`` (list<float32>, C) and ``cls_labels`` (list<int32>,
  the positive classes) behind ``cls_map``.
* ``"instance"`` rows, one per ground-truth instance of a scope: ``class_index`` and ``iou``
  (float64, the pseudo mask's IoU with its instance, null where there is none): ``instance_miou``
  is their mean; the rows also count the GT instances per class that AP's recall divides by.
* ``"detection"`` rows, one per prediction of a scope, in the order the evaluator received them:
  ``class_index``, ``score``, and ``hit_segm`` / ``hit_bbox`` (list<bool>, one per IoU threshold of
  ``weakbench.ap_iou_thresholds``): whether the prediction is a true positive under PASCAL VOC's
  matching inside its own image (:func:`~weakbench.core.metrics.instance.voc_instance_ap`).
  Matching never crosses images, so the flags hold on any resample, and mAP^r / box AP are
  recomputed by sorting the resample's predictions by score (:func:`weighted_voc_map`).

Metadata (bytes): ``weakbench.per_image_version``, ``weakbench.thresholds`` (JSON list of τ),
``weakbench.split``, and in version 2 ``weakbench.ap_iou_thresholds`` (JSON list) and
``weakbench.detection_scopes`` (JSON ``{scope: ["segm", "bbox"]}``: the scopes scored for AP,
also when they made no prediction). Version 1 tables (sample rows only) are still read.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import pyarrow as pa

from weakbench.core.errors import DataError

PER_IMAGE_VERSION = 2
#: versions this module reads (1: WSOL samples only)
READABLE_VERSIONS = ("1", "2")
VERSION_KEY = b"weakbench.per_image_version"
THRESHOLDS_KEY = b"weakbench.thresholds"
SPLIT_KEY = b"weakbench.split"
AP_IOU_KEY = b"weakbench.ap_iou_thresholds"
DETECTION_SCOPES_KEY = b"weakbench.detection_scopes"
#: the IoU thresholds of the ``hit_*`` flags (mAP^r at 0.25 and 0.5)
AP_IOU_THRESHOLDS = (0.25, 0.5)

#: the box-correctness columns: name → (box rule, δ in percent)
BOX_COLUMNS = {"box_iou50": ("largest", 50), "box_v2_iou30": ("multi", 30),
               "box_v2_iou50": ("multi", 50), "box_v2_iou70": ("multi", 70)}

PER_IMAGE_SCHEMA_V1 = pa.schema(
    [pa.field("sample", pa.string(), nullable=False), pa.field("image", pa.string(), nullable=False),
     pa.field("class_index", pa.int32())]
    + [pa.field(c, pa.binary()) for c in BOX_COLUMNS]
    + [pa.field("top1_class_ok", pa.bool_()), pa.field("top5_class_ok", pa.bool_()),
       pa.field("pxap_pos", pa.list_(pa.int64())), pa.field("pxap_neg", pa.list_(pa.int64()))],
    metadata={VERSION_KEY: b"1"},
)
#: the version-2 columns after those of version 1
V2_FIELDS = [
    pa.field("kind", pa.string(), nullable=False), pa.field("scope", pa.string(), nullable=False),
    pa.field("sem_thresholds", pa.list_(pa.float64())), pa.field("sem_classes", pa.list_(pa.int32())),
    pa.field("sem_tp", pa.list_(pa.int64())), pa.field("sem_gt", pa.list_(pa.int64())),
    pa.field("sem_pred", pa.list_(pa.int64())),
    pa.field("cls_scores", pa.list_(pa.float32())), pa.field("cls_labels", pa.list_(pa.int32())),
    pa.field("iou", pa.float64()), pa.field("score", pa.float64()),
    pa.field("hit_segm", pa.list_(pa.bool_())), pa.field("hit_bbox", pa.list_(pa.bool_())),
]
PER_IMAGE_SCHEMA = pa.schema(list(PER_IMAGE_SCHEMA_V1) + V2_FIELDS,
                             metadata={VERSION_KEY: str(PER_IMAGE_VERSION).encode()})

#: metrics (bare names) that :func:`metric_on_weights` recomputes from a per-image table
RECOMPUTABLE = ("max_box_acc", "max_box_acc_v2", "max_box_acc_v2_iou30", "max_box_acc_v2_iou50",
                "max_box_acc_v2_iou70", "top1_loc", "top5_loc", "pxap", "cls_acc")


def build_table(split: str, thresholds: np.ndarray, images: list[str], classes: list[int],
                bits: Mapping[str, np.ndarray], top1: np.ndarray | None = None, top5: np.ndarray | None = None,
                pos: list | None = None, neg: list | None = None) -> pa.Table:
    """A per-image table (:data:`PER_IMAGE_SCHEMA`) from arrays.

    Args:
        split: the split's name (``"test"``, ``"val"``, ``"all"``).
        thresholds: float64 (T,), the τ of the CAM curve.
        images: N image ids (str); classes: N class indices (the samples' classes).
        bits: for each name of :data:`BOX_COLUMNS` present, bool (N, T) correctness.
        top1, top5: bool (N,) or ``None``.
        pos, neg: N int arrays (bins,) or ``None`` entries (no mask), or ``None``.

    Raises:
        DataError: arrays of the wrong length.
    """
    n = len(images)
    if len(classes) != n:
        raise DataError(f"per-image table: {n} images and {len(classes)} classes; pass one class per sample")
    cols: dict[str, object] = {
        "sample": [f"{im}|{c}" for im, c in zip(images, classes)], "image": [str(i) for i in images],
        "class_index": [int(c) for c in classes]}
    for name in BOX_COLUMNS:
        b = bits.get(name)
        if b is not None and b.shape != (n, len(thresholds)):
            raise DataError(f"per-image table: bits {name!r} has shape {b.shape}, expected {(n, len(thresholds))}")
        cols[name] = None if b is None else [row.tobytes() for row in np.packbits(b.astype(bool), axis=1)]
    for name, v in (("top1_class_ok", top1), ("top5_class_ok", top5)):
        cols[name] = None if v is None else [bool(x) for x in np.asarray(v)]
    for name, v in (("pxap_pos", pos), ("pxap_neg", neg)):
        cols[name] = None if v is None else [None if h is None else np.asarray(h, np.int64).tolist() for h in v]
    cols["kind"], cols["scope"] = ["sample"] * n, [""] * n
    meta = {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode(),
            THRESHOLDS_KEY: json.dumps([float(t) for t in thresholds]).encode()}
    return _table(cols, n, meta)


def _table(cols: Mapping[str, object], n: int, meta: Mapping[bytes, bytes]) -> pa.Table:
    arrays = [pa.array(cols[f.name] if cols.get(f.name) is not None else [None] * n, type=f.type)
              for f in PER_IMAGE_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PER_IMAGE_SCHEMA.with_metadata(dict(meta)))


def image_rows(scope: str, images: list[str], *, sem: list | None = None, cls_scores: np.ndarray | None = None,
               cls_labels: np.ndarray | None = None, split: str = "") -> pa.Table:
    """Version-2 ``"image"`` rows of ``scope``, one per evaluated image (module docstring).

    Args:
        images: M image ids.
        sem: per image ``(thresholds float (T,), classes int (k,), tp, gt, pred int (T, k))`` or
            ``None`` (no mask on that image), or ``None`` for all.
        cls_scores: float (M, C) classifier scores; cls_labels: (M, C) multi-hot; or ``None``.

    Raises:
        DataError: arrays of the wrong length or shape.
    """
    m = len(images)
    cols: dict[str, object] = {"sample": [f"{scope}|image|{im}" for im in images], "image": [str(i) for i in images],
                               "kind": ["image"] * m, "scope": [scope] * m}
    if sem is not None:
        if len(sem) != m:
            raise DataError(f"per-image table: {len(sem)} semantic entries for {m} images; pass one per image")
        for name in ("sem_thresholds", "sem_classes", "sem_tp", "sem_gt", "sem_pred"):
            cols[name] = []
        for entry in sem:
            if entry is None:
                for name in ("sem_thresholds", "sem_classes", "sem_tp", "sem_gt", "sem_pred"):
                    cols[name].append(None)
                continue
            ths, classes, tp, gt, pred = entry
            shape = (len(ths), len(classes))
            for name, a in (("tp", tp), ("gt", gt), ("pred", pred)):
                if np.shape(a) != shape:
                    raise DataError(f"per-image table: sem_{name} has shape {np.shape(a)}, expected {shape}")
            cols["sem_thresholds"].append([float(t) for t in ths])
            cols["sem_classes"].append([int(c) for c in classes])
            for name, a in (("sem_tp", tp), ("sem_gt", gt), ("sem_pred", pred)):
                cols[name].append(np.asarray(a, np.int64).ravel().tolist())
    if cls_scores is not None:
        sc, lb = np.asarray(cls_scores, np.float32), np.asarray(cls_labels) > 0.5
        if sc.shape[0] != m or sc.shape != lb.shape:
            raise DataError(f"per-image table: cls_scores {sc.shape} and cls_labels {lb.shape} for {m} images")
        cols["cls_scores"] = sc.tolist()
        cols["cls_labels"] = [np.flatnonzero(row).astype(int).tolist() for row in lb]
    return _table(cols, m, {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode()})


def instance_rows(scope: str, images: list[str], classes: list[int], ious: list[float | None] | None = None,
                  split: str = "") -> pa.Table:
    """Version-2 ``"instance"`` rows of ``scope``: one per ground-truth instance (image id, class
    index, and the pseudo mask's IoU with it in [0, 1] or ``None``)."""
    n = len(images)
    if len(classes) != n or (ious is not None and len(ious) != n):
        raise DataError(f"per-image table: {n} instances, {len(classes)} classes, "
                        f"{'no' if ious is None else len(ious)} IoUs; pass one of each per instance")
    per_image: dict[str, int] = {}
    sample = []
    for im, c in zip(images, classes):
        k = per_image.get(str(im), 0)
        per_image[str(im)] = k + 1
        sample.append(f"{scope}|instance|{im}|{int(c)}|{k}")
    cols = {"sample": sample, "image": [str(i) for i in images], "class_index": [int(c) for c in classes],
            "kind": ["instance"] * n, "scope": [scope] * n,
            "iou": None if ious is None else [None if v is None else float(v) for v in ious]}
    return _table(cols, n, {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode()})


def detection_rows(scope: str, images: list[str], classes: list[int], scores: list[float],
                   hit_segm: np.ndarray | None, hit_bbox: np.ndarray | None, split: str = "") -> pa.Table:
    """Version-2 ``"detection"`` rows of ``scope`` (one per prediction, in the evaluator's order):
    image id, class index, score, and bool (n, len(:data:`AP_IOU_THRESHOLDS`)) true-positive flags
    for masks and/or boxes (``None``: that type was not scored). The table's metadata records
    the scope as scored for AP even when ``images`` is empty (no prediction: AP 0)."""
    n = len(images)
    for name, h in (("hit_segm", hit_segm), ("hit_bbox", hit_bbox)):
        if h is not None and np.shape(h) != (n, len(AP_IOU_THRESHOLDS)):
            raise DataError(f"per-image table: {name} has shape {np.shape(h)}, expected {(n, len(AP_IOU_THRESHOLDS))}")
    cols = {"sample": [f"{scope}|detection|{im}|{k}" for k, im in enumerate(images)],
            "image": [str(i) for i in images], "class_index": [int(c) for c in classes],
            "kind": ["detection"] * n, "scope": [scope] * n, "score": [float(v) for v in scores],
            "hit_segm": None if hit_segm is None else np.asarray(hit_segm, bool).tolist(),
            "hit_bbox": None if hit_bbox is None else np.asarray(hit_bbox, bool).tolist()}
    types = [t for t, h in (("segm", hit_segm), ("bbox", hit_bbox)) if h is not None]
    return _table(cols, n, {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode(),
                            AP_IOU_KEY: json.dumps(list(AP_IOU_THRESHOLDS)).encode(),
                            DETECTION_SCOPES_KEY: json.dumps({scope: types}).encode()})


def merge_tables(tables: list[pa.Table], split: str = "") -> pa.Table:
    """One version-2 table from several (of one split: the eval stages of a run, the scopes of
    one evaluator); version-1 tables are upgraded (their rows become ``"sample"`` rows of scope
    ``""``). Metadata: the WSOL thresholds of the table that has them, the union of the
    detection scopes.

    Raises:
        DataError: a table of an unknown version, or two tables with different WSOL thresholds.
    """
    out, thresholds, scopes = [], None, {}
    for t in tables:
        meta = t.schema.metadata or {}
        version = meta.get(VERSION_KEY, b"?").decode()
        if version not in READABLE_VERSIONS:
            raise DataError(f"per-image table version {version!r}, this weakbench reads {', '.join(READABLE_VERSIONS)}; "
                            f"fix: rebuild the results store from MLflow")
        if THRESHOLDS_KEY in meta and (t.num_rows or thresholds is None):
            th = meta[THRESHOLDS_KEY]
            if thresholds is not None and th != thresholds and json.loads(th):
                raise DataError("per-image tables of one split with different WSOL thresholds; evaluate them with one "
                                "cam_curve_interval")
            thresholds = th if json.loads(th) or thresholds is None else thresholds
        scopes.update(json.loads(meta.get(DETECTION_SCOPES_KEY, b"{}").decode()))
        cols = {name: t[name] if name in t.column_names else None for name in PER_IMAGE_SCHEMA.names}
        if version == "1":
            cols["kind"], cols["scope"] = pa.array(["sample"] * t.num_rows), pa.array([""] * t.num_rows)
        arrays = [cols[f.name].cast(f.type) if cols[f.name] is not None else pa.nulls(t.num_rows, f.type)
                  for f in PER_IMAGE_SCHEMA]
        out.append(pa.Table.from_arrays(arrays, schema=PER_IMAGE_SCHEMA))
    meta = {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode(),
            THRESHOLDS_KEY: thresholds or b"[]", AP_IOU_KEY: json.dumps(list(AP_IOU_THRESHOLDS)).encode(),
            DETECTION_SCOPES_KEY: json.dumps(scopes, sort_keys=True).encode()}
    merged = pa.concat_tables(out) if out else PER_IMAGE_SCHEMA.empty_table()
    return merged.replace_schema_metadata(meta)


def write_table(table: pa.Table, path, split: str) -> None:
    """Write ``table`` as Parquet at ``path`` with its split recorded (``weakbench.split``);
    atomically (:func:`weakbench.core.io.atomic_write`)."""
    from pathlib import Path

    from weakbench.core.io import atomic_write

    import pyarrow.parquet as pq

    path = Path(path)
    meta = dict(table.schema.metadata or {})
    meta[SPLIT_KEY] = split.encode()
    with atomic_write(path) as f:
        pq.write_table(table.replace_schema_metadata(meta), f, compression="zstd")


def read_table(path) -> pa.Table:
    """Read a per-image Parquet file (no code is run: Parquet holds data only)."""
    import pyarrow.parquet as pq

    return pq.read_table(path)


class PerImage:
    """A per-image table (version 1 or 2) unpacked for recomputation.

    Attributes:
        samples: object (N,) sample ids of the WSOL ``"sample"`` rows; images: object (N,) their
            image ids; thresholds: float64 (T,).
        bits: ``{column: bool (N, T)}`` for the box columns present.
        top1, top5: bool (N,) or ``None``; pos, neg: float64 (N, bins) with zero rows for
            samples without a mask, and ``has_mask`` bool (N,), or ``None`` when no sample has one.
        universe: object (I,) the sorted ids of every image the table scores (all rows but
            detections): the images a bootstrap resamples and two tables are paired on.
        semantic: ``{scope: (images (M,), thresholds (T,), tp, gt, pred float64 (M, T, K))}``.
        cls: ``(images (M,), scores float64 (M, C), labels bool (M, C))`` or ``None``.
        instances: ``{scope: (images (n,), classes int (n,), iou float64 (n,) NaN where null)}``.
        detections: ``{scope: (images, classes, scores, {"segm"|"bbox": bool (n, L)})}`` for the
            scopes scored for AP; ap_iou: the L IoU thresholds of the flags.

    Raises:
        DataError: a table of a version this module does not read.
    """

    def __init__(self, table: pa.Table):
        meta = table.schema.metadata or {}
        version = meta.get(VERSION_KEY, b"?").decode()
        if version not in READABLE_VERSIONS:
            raise DataError(f"per-image table version {version!r}, this weakbench reads {', '.join(READABLE_VERSIONS)}; "
                            f"fix: rebuild the results store from MLflow")
        self.thresholds = np.asarray(json.loads(meta.get(THRESHOLDS_KEY, b"[]").decode()), dtype=np.float64)
        self.ap_iou = tuple(json.loads(meta.get(AP_IOU_KEY, json.dumps(list(AP_IOU_THRESHOLDS)).encode()).decode()))
        kinds = np.asarray(table["kind"].to_pylist(), dtype=object) if "kind" in table.column_names else \
            np.full(table.num_rows, "sample", dtype=object)
        scopes = np.asarray(table["scope"].to_pylist(), dtype=object) if "scope" in table.column_names else \
            np.full(table.num_rows, "", dtype=object)
        all_images = np.asarray(table["image"].to_pylist(), dtype=object)
        self.universe = np.array(sorted(set(all_images[kinds != "detection"].tolist())), dtype=object)
        sample_rows = table.filter(pa.array(kinds == "sample")) if version != "1" else table
        self._sample_table(sample_rows)
        self.semantic: dict[str, tuple] = {}
        self.cls = None
        self.instances: dict[str, tuple] = {}
        self.detections: dict[str, tuple] = {}
        if version == "1":
            return
        self._v2_rows(table, kinds, scopes, all_images, json.loads(meta.get(DETECTION_SCOPES_KEY, b"{}").decode()))

    def _sample_table(self, table: pa.Table) -> None:
        t = len(self.thresholds)
        self.samples = np.asarray(table["sample"].to_pylist(), dtype=object)
        self.images = np.asarray(table["image"].to_pylist(), dtype=object)
        self.bits: dict[str, np.ndarray] = {}
        for name in BOX_COLUMNS:
            col = table[name].to_pylist()
            if col and all(v is not None for v in col):
                packed = np.frombuffer(b"".join(col), dtype=np.uint8).reshape(len(col), -1)
                self.bits[name] = np.unpackbits(packed, axis=1, count=t).astype(bool)
        self.top1 = self._flags(table, "top1_class_ok")
        self.top5 = self._flags(table, "top5_class_ok")
        pos, neg = table["pxap_pos"].to_pylist(), table["pxap_neg"].to_pylist()
        self.has_mask = np.array([p is not None for p in pos], dtype=bool)
        self.pos = self.neg = None
        if self.has_mask.any():
            bins = len(next(p for p in pos if p is not None))
            self.pos = np.array([p if p is not None else [0] * bins for p in pos], dtype=np.float64)
            self.neg = np.array([q if q is not None else [0] * bins for q in neg], dtype=np.float64)

    def _v2_rows(self, table: pa.Table, kinds, scopes, images, det_scopes: dict) -> None:
        col = {name: table[name].to_pylist() for name in ("class_index", "sem_thresholds", "sem_classes", "sem_tp",
                                                           "sem_gt", "sem_pred", "cls_scores", "cls_labels", "iou",
                                                           "score", "hit_segm", "hit_bbox")}
        for scope in sorted(set(scopes.tolist())):
            rows = np.flatnonzero((kinds == "image") & (scopes == scope))
            sem = [i for i in rows.tolist() if col["sem_classes"][i] is not None]
            if sem:
                ths = np.asarray(col["sem_thresholds"][sem[0]], np.float64)
                k = 1 + max(max(col["sem_classes"][i], default=0) for i in sem)
                dense = np.zeros((3, len(sem), len(ths), k))
                for j, i in enumerate(sem):
                    if col["sem_thresholds"][i] != col["sem_thresholds"][sem[0]]:
                        raise DataError(f"per-image table: scope {scope!r} has images with different background "
                                        f"thresholds; evaluate them in one run")
                    cls_ = np.asarray(col["sem_classes"][i], np.int64)
                    for a, name in enumerate(("sem_tp", "sem_gt", "sem_pred")):
                        dense[a, j][:, cls_] = np.asarray(col[name][i], np.float64).reshape(len(ths), len(cls_))
                self.semantic[scope] = (images[sem], ths, dense[0], dense[1], dense[2])
            cl = [i for i in rows.tolist() if col["cls_scores"][i] is not None]
            if cl and scope == "":
                scores = np.asarray([col["cls_scores"][i] for i in cl], np.float64)
                labels = np.zeros(scores.shape, bool)
                for j, i in enumerate(cl):
                    labels[j, col["cls_labels"][i]] = True
                self.cls = (images[cl], scores, labels)
            inst = np.flatnonzero((kinds == "instance") & (scopes == scope))
            if len(inst):
                self.instances[scope] = (images[inst], np.asarray([col["class_index"][i] for i in inst], np.int64),
                                         np.asarray([np.nan if col["iou"][i] is None else col["iou"][i] for i in inst]))
        for scope, types in det_scopes.items():
            det = np.flatnonzero((kinds == "detection") & (scopes == scope))
            hits = {t: np.asarray([col[f"hit_{t}"][i] for i in det], bool).reshape(len(det), len(self.ap_iou))
                    for t in types}
            self.detections[scope] = (images[det], np.asarray([col["class_index"][i] for i in det], np.int64),
                                      np.asarray([col["score"][i] for i in det], np.float64), hits)

    @staticmethod
    def _flags(table: pa.Table, name: str) -> np.ndarray | None:
        col = table[name].to_pylist()
        return np.array(col, dtype=bool) if col and all(v is not None for v in col) else None

    def __len__(self) -> int:
        return len(self.samples)

    def available(self) -> list[str]:
        """The bare metric names this table recomputes (a scope's names carry it as a prefix:
        ``"pseudo_masks/instance_miou"``)."""
        out = []
        if "box_iou50" in self.bits:
            out.append("max_box_acc")
            out += [m for m, f in (("top1_loc", self.top1), ("top5_loc", self.top5)) if f is not None]
        if all(c in self.bits for c in ("box_v2_iou30", "box_v2_iou50", "box_v2_iou70")):
            out += ["max_box_acc_v2", "max_box_acc_v2_iou30", "max_box_acc_v2_iou50", "max_box_acc_v2_iou70"]
        if self.pos is not None:
            out.append("pxap")
        if self.top1 is not None:
            out.append("cls_acc")
        pre = lambda scope: f"{scope}/" if scope else ""  # noqa: E731
        out += [f"{pre(s)}miou" for s in self.semantic]
        if self.cls is not None:
            out.append("cls_map")
        out += [f"{pre(s)}instance_miou" for s, (_, _, iou) in self.instances.items() if np.isfinite(iou).any()]
        for s, (_, _, _, hits) in self.detections.items():
            out += [f"{pre(s)}{name}" for name, (t, _) in AP_NAMES.items() if t in hits]
        return out

    def image_weights(self, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Sample weights (B, N) from image multiplicities ``counts`` (B, I) over ``image_order``
        (I image ids): each sample weighs its image's count."""
        return weights_of(self.images, image_order, counts)


def weights_of(images: np.ndarray, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row weights (B, n) of rows on ``images`` (n ids) from image multiplicities ``counts``
    (B, I) over ``image_order`` (I ids).

    Raises:
        DataError: a row's image is not in ``image_order``.
    """
    pos = {im: k for k, im in enumerate(image_order.tolist())}
    missing = [im for im in images.tolist() if im not in pos]
    if missing:
        raise DataError(f"per-image table: image {missing[0]!r} is not among the scored images; every detection's "
                        f"image needs an 'image' row of its scope")
    idx = np.array([pos[im] for im in images.tolist()], dtype=np.int64)
    return counts[:, idx]


#: AP names a detection scope recomputes: name → (hit type, IoU threshold); the names the
#: evaluators log (``coco_instance_eval``: ``segm_map_r50``…, CCGR: ``map_r50``, ``box_map50``)
AP_NAMES = {"map_r25": ("segm", 0.25), "map_r50": ("segm", 0.5), "segm_map_r25": ("segm", 0.25),
            "segm_map_r50": ("segm", 0.5), "bbox_map_r25": ("bbox", 0.25), "bbox_map_r50": ("bbox", 0.5),
            "box_map50": ("bbox", 0.5)}


def _acc_curve(bits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Accuracy (%) at every τ, float64 (B, T), of weights ``w`` (B, N) over ``bits`` (N, T)."""
    tot = w.sum(1, keepdims=True)
    return 100.0 * (w @ bits.astype(np.float64)) / np.where(tot > 0, tot, 1.0)


def pxap_from_hists(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """PxAP (%) of histograms ``pos``, ``neg`` float (B, bins) (Choe et al. 2020, Sec. 4.2, as
    :class:`~weakbench.core.metrics.wsol.PxAPEvaluator`): reversed cumulative sums give tp
    and fp; ``Σ_{i≥1, tp_i+fp_i>0} precision_i (recall_i − recall_{i−1})``. NaN where a
    histogram has no positive pixel."""
    tp = pos[:, ::-1].cumsum(1)
    fp = neg[:, ::-1].cumsum(1)
    num_pos = pos.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / num_pos
    ap = (precision[:, 1:] * np.diff(recall, axis=1) * ((tp + fp)[:, 1:] != 0)).sum(1) * 100.0
    return np.where(num_pos[:, 0] > 0, ap, np.nan)


def metric_on_weights(data: PerImage, metric: str, w: np.ndarray) -> np.ndarray:
    """``metric`` (a bare name of :data:`RECOMPUTABLE`) recomputed for each row of sample
    weights ``w`` float (B, N) (a resample's multiplicities; all ones is the evaluated split).

    MaxBoxAcc(V2) take their maximum over τ on each weighted set (its own best τ, as Choe et al.
    define it); top-1/top-5 loc are read at the δ = 50 largest-contour best τ (first argmax, as
    :class:`~weakbench.core.metrics.wsol.BoxEvaluator`). Returns float64 (B,) in percent.

    Raises:
        DataError: the table lacks the metric's columns.
    """
    w = np.asarray(w, dtype=np.float64)
    if metric not in data.available():
        raise DataError(f"per-image table: metric {metric!r} cannot be recomputed (it has {data.available()})")
    if metric in ("max_box_acc", "top1_loc", "top5_loc"):
        curve = _acc_curve(data.bits["box_iou50"], w)
        if metric == "max_box_acc":
            return curve.max(1)
        best = curve.argmax(1)
        flags = data.top1 if metric == "top1_loc" else data.top5
        ok = data.bits["box_iou50"][:, best].T & flags[None, :]  # (B, N)
        tot = w.sum(1)
        return 100.0 * (w * ok).sum(1) / np.where(tot > 0, tot, 1.0)
    if metric.startswith("max_box_acc_v2"):
        levels = [metric[-2:]] if metric != "max_box_acc_v2" else ["30", "50", "70"]
        return np.mean([_acc_curve(data.bits[f"box_v2_iou{d}"], w).max(1) for d in levels], axis=0)
    if metric == "pxap":
        wm = w * data.has_mask[None, :]
        return pxap_from_hists(wm @ data.pos, wm @ data.neg)
    # cls_acc: single-label, one sample per image, so the sample's top-1 flag is the image's
    tot = w.sum(1)
    return 100.0 * (w @ data.top1.astype(np.float64)) / np.where(tot > 0, tot, 1.0)


def metric_at_threshold(data: PerImage, metric: str, tau: float, w: np.ndarray) -> np.ndarray:
    """Accuracy (%) at one fixed threshold ``tau`` (the one chosen on another split: the operating
    point a user deploys) for ``max_box_acc`` (largest contour, δ = 50) or ``max_box_acc_v2``
    (mean over δ of the all-contours accuracy, ``tau`` one value for every δ or a dict
    ``{30: τ, 50: τ, 70: τ}``). ``tau`` is matched to the nearest threshold of the table.
    Returns float64 (B,)."""
    w = np.asarray(w, dtype=np.float64)

    def at(col: str, t: float) -> np.ndarray:
        k = int(np.argmin(np.abs(data.thresholds - t)))
        return _acc_curve(data.bits[col][:, k:k + 1], w)[:, 0]

    if metric == "max_box_acc":
        return at("box_iou50", float(tau))
    if metric == "max_box_acc_v2":
        taus = tau if isinstance(tau, Mapping) else {d: tau for d in (30, 50, 70)}
        return np.mean([at(f"box_v2_iou{d}", float(taus[d])) for d in (30, 50, 70)], axis=0)
    raise DataError(f"metric_at_threshold: {metric!r} has no threshold to fix; use max_box_acc, max_box_acc_v2 "
                    f"or miou")


def metric_at_threshold_on_images(data: PerImage, metric: str, tau, image_order: np.ndarray,
                                  counts: np.ndarray) -> np.ndarray:
    """:func:`metric_at_threshold` for image multiplicities ``counts`` (B, I) over ``image_order``;
    also ``[scope/]miou`` at one background threshold ``tau`` (the nearest of the table's): the
    semantic mIoU at the threshold chosen on validation (Puzzle-CAM's operating point)."""
    counts = np.asarray(counts, dtype=np.float64)
    scope, name = _scope_name(metric)
    if name == "miou" and scope in data.semantic:
        k = int(np.argmin(np.abs(data.semantic[scope][1] - float(tau))))
        return miou_curve(data, scope, image_order, counts)[:, k]
    return metric_at_threshold(data, metric, tau, data.image_weights(image_order, counts))


# ---------------------------------------------------------------------- version-2 metrics
def _scope_name(metric: str) -> tuple[str, str]:
    scope, _, name = metric.rpartition("/")
    return scope, name


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row has no finite value."""
    ok = np.isfinite(x)
    n = ok.sum(-1)
    return np.where(n > 0, np.where(ok, x, 0.0).sum(-1) / np.maximum(n, 1), np.nan)


def miou_curve(data: PerImage, scope: str, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mIoU (%) at every background threshold, float64 (B, T), of the image multiplicities
    ``counts`` (B, I) over ``image_order``: the weighted sums of the images' confusion counts give
    each class's IoU ``tp / (gt + pred − tp)``; the mean is over the classes (background
    included) whose union is non-empty, as :class:`~weakbench.core.metrics.segmentation.SemanticEvaluator`."""
    images, _, tp, gt, pred = data.semantic[scope]
    w = weights_of(images, image_order, counts)
    stp, sgt, spred = (np.einsum("bm,mtk->btk", w, a) for a in (tp, gt, pred))
    union = sgt + spred - stp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, stp / np.where(union > 0, union, 1.0), np.nan)
    return 100.0 * _nanmean_rows(iou)


def weighted_average_precision(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """:func:`~weakbench.core.metrics.classification.average_precision` of one class for each
    row of image weights ``w`` float (B, M) (image ``m`` counted ``w[b, m]`` times): tied scores
    enter together, so repeated images are ties and the weighted form is exact. Returns float64
    (B,) in [0, 1], NaN where the weighted set has no positive."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s = np.asarray(scores, np.float64)[order]
    y = np.asarray(labels, bool)[order]
    ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.zeros(0, np.int64)
    wo = w[:, order]
    tp = np.cumsum(wo * y, axis=1)[:, ends]
    tot = np.cumsum(wo, axis=1)[:, ends]
    npos = (wo * y).sum(1)
    precision = tp / np.where(tot > 0, tot, 1.0)
    recall = tp / np.where(npos > 0, npos, 1.0)[:, None]
    ap = (np.diff(np.concatenate([np.zeros((len(w), 1)), recall], axis=1), axis=1) * precision).sum(1)
    return np.where(npos > 0, ap, np.nan)


def weighted_voc_map(data: PerImage, scope: str, name: str, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """mAP^r or box AP (%) (:data:`AP_NAMES`) of ``scope`` for each row of image multiplicities,
    float64 (B,): :func:`weighted_voc_map_of_calls` on the scope's stored GT instances and
    detection flags at the name's IoU threshold (0 when the scope has no GT instance)."""
    kind, thr = AP_NAMES[name]
    l = int(np.argmin(np.abs(np.asarray(data.ap_iou) - thr)))
    det_images, det_classes, det_scores, hits = data.detections[scope]
    if scope not in data.instances:
        return np.zeros(counts.shape[0])
    gt_images, gt_classes, _ = data.instances[scope]
    return weighted_voc_map_of_calls(gt_images, gt_classes, det_images, det_classes, det_scores, hits[kind][:, l],
                                     image_order, counts)


def weighted_voc_map_of_calls(gt_images: np.ndarray, gt_classes: np.ndarray, det_images: np.ndarray,
                              det_classes: np.ndarray, det_scores: np.ndarray, det_hits: np.ndarray,
                              image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """VOC mAP (%) from per-prediction true/false-positive calls, for each row of image
    multiplicities, float64 (B,).

    Args:
        gt_images, gt_classes: one entry per ground-truth instance (n,): its image id and class.
        det_images, det_classes, det_scores: one entry per prediction (m,): image id, class,
            score (float).
        det_hits: bool (m,), the prediction's VOC call at one IoU threshold
            (:func:`~weakbench.core.metrics.instance.voc_hits`; calls never cross images, so an
            image drawn ``k`` times repeats its calls).
        image_order: (I,) image ids; counts: (B, I) multiplicity of each image per row (1 for
            the plain value).

    Per class with ground truth in the weighted set, the predictions sorted by score (ties in
    the given order), weighted true/false positive counts, recall over the weighted GT count,
    and PASCAL VOC's all-point AP of the monotone precision envelope
    (:func:`~weakbench.core.metrics.instance.voc_ap`); the mean over those classes (0 when
    there is none, as :func:`~weakbench.core.metrics.instance.voc_instance_ap`). A prediction
    repeated ``k`` times (its image drawn ``k`` times) enters as one point of weight ``k``: for a
    true positive the envelope is the same at every one of the ``k`` points, so the area is exact.

    Raises:
        DataError: an image of a GT instance or prediction is not in ``image_order``.
    """
    gt_images, det_images = np.asarray(gt_images, dtype=object), np.asarray(det_images, dtype=object)
    gt_classes, det_classes = np.asarray(gt_classes, np.int64), np.asarray(det_classes, np.int64)
    det_scores, hit = np.asarray(det_scores, np.float64), np.asarray(det_hits, bool)
    b = counts.shape[0]
    w_gt = weights_of(gt_images, image_order, counts)
    w_det = weights_of(det_images, image_order, counts)
    aps = []
    for c in np.unique(gt_classes).tolist():
        npos = w_gt[:, gt_classes == c].sum(1)
        sel = np.flatnonzero(det_classes == c)
        sel = sel[np.argsort(-det_scores[sel], kind="stable")]
        wd, h = w_det[:, sel], hit[sel]
        tp, fp = np.cumsum(wd * h, axis=1), np.cumsum(wd * ~h, axis=1)
        prec = tp / np.where(tp + fp > 0, tp + fp, 1.0)
        rec = tp / np.where(npos > 0, npos, 1.0)[:, None]
        mrec = np.concatenate([np.zeros((b, 1)), rec, np.ones((b, 1))], axis=1)
        mpre = np.concatenate([np.zeros((b, 1)), prec, np.zeros((b, 1))], axis=1)
        mpre = np.maximum.accumulate(mpre[:, ::-1], axis=1)[:, ::-1]
        ap = (np.diff(mrec, axis=1) * mpre[:, 1:]).sum(1)
        aps.append(np.where(npos > 0, ap, np.nan))
    if not aps:
        return np.zeros(b)
    m = _nanmean_rows(np.stack(aps, axis=1))
    return 100.0 * np.where(np.isfinite(m), m, 0.0)


def metric_on_images(data: PerImage, metric: str, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``metric`` (a bare name of :meth:`PerImage.available`) recomputed for each row of image
    multiplicities ``counts`` float (B, I) over ``image_order`` (I image ids, a superset of the
    table's images): the WSOL names through :func:`metric_on_weights`; ``[scope/]miou`` (max over
    background thresholds on the resample), ``cls_map`` (mean over classes of the weighted AP),
    ``[scope/]instance_miou`` (mean IoU over the resample's GT instances) and the AP names of
    :data:`AP_NAMES` (recomputed, sorting the resample's predictions). Returns float64 (B,) in
    percent.

    Raises:
        DataError: the table lacks the metric's rows.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if metric not in data.available():
        raise DataError(f"per-image table: metric {metric!r} cannot be recomputed (it has {data.available()})")
    if metric in RECOMPUTABLE:
        return metric_on_weights(data, metric, data.image_weights(image_order, counts))
    scope, name = _scope_name(metric)
    if name == "miou":
        return miou_curve(data, scope, image_order, counts).max(1)
    if name == "cls_map":
        images, scores, labels = data.cls
        w = weights_of(images, image_order, counts)
        aps = np.stack([weighted_average_precision(scores[:, c], labels[:, c], w) for c in range(scores.shape[1])], 1)
        return 100.0 * _nanmean_rows(aps)
    if name == "instance_miou":
        images, _, iou = data.instances[scope]
        ok = np.isfinite(iou)
        w = weights_of(images[ok], image_order, counts)
        tot = w.sum(1)
        return np.where(tot > 0, 100.0 * (w @ iou[ok]) / np.where(tot > 0, tot, 1.0), 0.0)
    return weighted_voc_map(data, scope, name, image_order, counts)
