"""Instance metrics through pycocotools ``COCOeval``: mask and box AP, mAP^r, and ABO.

* ``segm_ap``, ``segm_ap50``, ``segm_ap75``, ``segm_ap_s``, ``segm_ap_m``, ``segm_ap_l`` (and
  ``bbox_*``) are COCOeval's own summary (``stats[0:6]``), ×100; ``segm_ap70`` is the precision
  table at IoU 0.70 (one of COCOeval's ten thresholds), averaged like AP50 (BBAM reports it).
* ``segm_map_r25``, ``segm_map_r50`` (mAP^r, Hariharan et al. 2014, as CCGR, PRM and the other
  WSIS papers report it) and ``bbox_map_r25``, ``bbox_map_r50`` (the same for boxes) are
  :func:`voc_instance_ap`: PASCAL VOC's per-class AP over instances, not COCOeval (COCOeval's
  101-point interpolation, its per-image cap of 100 detections and its area ranges make a
  different number; its AP at IoU 0.5 is ``segm_ap50``, logged once under that name).
* ``abo``, the average best overlap: for every non-crowd GT instance, the best mask IoU
  (``pycocotools.mask.iou``) over the predictions of the same image and class (0 when there
  is none), averaged over GT instances, ×100. Scores are ignored.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from weakbench.core.errors import DataError


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _run(gt: COCO, dt: COCO, iou_type: str, iou_thrs=None) -> COCOeval:
    ev = COCOeval(gt, dt, iou_type)
    if iou_thrs is not None:
        ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    return ev


def _ap_at(ev: COCOeval, t: int) -> float:
    p = ev.eval["precision"][t, :, :, 0, -1]
    p = p[p > -1]
    return float(p.mean() * 100) if p.size else 0.0


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """PASCAL VOC's average precision (VOC 2010 onwards, "all points"): the area under the
    precision-recall curve after precision is made monotone (each point takes the largest
    precision at any higher recall), summed where recall changes. The curve runs from recall 0
    (precision 0 appended there and at recall 1, as VOC's ``VOCap`` does).

    Args:
        recall, precision: float ``(K,)``, the cumulative curve over detections sorted by score
            (recall non-decreasing, both in [0, 1]); ``K`` may be 0.

    Returns:
        AP in [0, 1] (0 for an empty curve).
    """
    mrec = np.concatenate(([0.0], np.asarray(recall, np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_instance_ap(gt: COCO, results: Sequence[dict], iou_threshold: float, iou_type: str = "segm") -> float:
    """mAP^r (Hariharan et al. 2014) in percent: PASCAL VOC's per-class AP over instances, as the
    weakly supervised instance segmentation papers compute it (PRM, CCGR, IRN: the SDS
    evaluation, in Python chainercv's ``eval_instance_segmentation_voc`` from FCIS's code).

    Per class: every prediction of that class over all images, sorted by score (highest first;
    ties keep input order); within an image, in that order, a prediction is a true positive when
    its best-overlapping GT instance of the class (mask IoU, or box IoU for ``"bbox"``; the first
    of equal IoUs) overlaps it by at least ``iou_threshold`` and no earlier prediction took that
    instance, else a false positive (VOC's rule: a duplicate of a taken instance is false even if
    another instance overlaps it enough). AP is :func:`voc_ap` (all-point interpolation, VOC
    2010 onwards; not VOC 2007's 11 points). mAP^r is the mean over the classes that have GT
    instances in ``gt`` (a class with GT but no prediction scores 0; predictions of a class
    without GT are ignored, as chainercv does). Crowd GT regions are skipped (none in
    weakbench's data layer).

    Args:
        gt: ground truth ``COCO`` (RLE or polygon ``segmentation``; ``bbox`` ``[x, y, w, h]``).
        results: dicts with ``image_id``, ``category_id``, ``score`` and an RLE ``segmentation``
            (``"segm"``) or a ``bbox`` ``[x, y, w, h]`` (``"bbox"``).
        iou_threshold: in (0, 1], e.g. 0.5 for mAP^r_0.5.
        iou_type: ``"segm"`` or ``"bbox"``.

    Returns:
        mAP^r in percent, 0–100; 0 when ``gt`` has no instance.

    Raises:
        DataError: unknown ``iou_type``, or a result lacking the field it needs.
    """
    hits, seq, n_pos = voc_hits(gt, results, (iou_threshold,), iou_type)
    cats = np.asarray([int(results[i]["category_id"]) for i in seq], np.int64)
    scores = np.asarray([float(results[i]["score"]) for i in seq], np.float64)
    matched = hits[seq, 0] if len(seq) else np.zeros(0, bool)
    aps = []
    for cat, npos in n_pos.items():
        sel = cats == cat
        order = np.argsort(-scores[sel], kind="stable")
        tp = np.cumsum(matched[sel][order])
        fp = np.cumsum(~matched[sel][order])
        prec = tp / np.maximum(tp + fp, 1)
        aps.append(voc_ap(tp / npos, prec))
    return 100.0 * float(np.mean(aps)) if aps else 0.0


def voc_hits(gt: COCO, results: Sequence[dict], iou_thresholds: Sequence[float],
             iou_type: str = "segm") -> tuple[np.ndarray, list[int], dict[int, int]]:
    """PASCAL VOC's matching of :func:`voc_instance_ap`, kept per prediction (what the per-image
    results store, :mod:`weakbench.core.metrics.per_image`).

    Within each (image, class), predictions in score order (ties: input order) take the
    best-overlapping GT instance of their class when it overlaps by at least the threshold and is
    not yet taken. Matching never crosses images.

    Args:
        gt, results, iou_type: as :func:`voc_instance_ap`.
        iou_thresholds: L thresholds in (0, 1].

    Returns:
        ``(hits, seq, n_pos)``: bool (len(results), L) true-positive flags in input order (False
        for a class without GT: those predictions are ignored); ``seq``, the input indices in the
        order :func:`voc_instance_ap` ranks ties (the (image, class) groups in order of first
        appearance, each in score order), predictions of classes without GT left out; ``n_pos``,
        ``{category id: GT instances}``.

    Raises:
        DataError: unknown ``iou_type``, or a result lacking the field it needs.
    """
    if iou_type not in ("segm", "bbox"):
        raise DataError(f"unknown iou type {iou_type!r}; use 'segm' or 'bbox'")
    field = "segmentation" if iou_type == "segm" else "bbox"
    gts: dict = defaultdict(list)
    for ann in gt.dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            gts[(ann["image_id"], ann["category_id"])].append(gt.annToRLE(ann) if iou_type == "segm" else ann["bbox"])
    n_pos: dict = defaultdict(int)
    for (_, cat), items in gts.items():
        n_pos[cat] += len(items)
    preds: dict = defaultdict(list)
    for i, r in enumerate(results):
        if field not in r:
            raise DataError(f"result #{i} has no {field!r}; add it to every prediction to evaluate {iou_type}")
        preds[(r["image_id"], r["category_id"])].append(i)
    hits = np.zeros((len(results), len(iou_thresholds)), bool)
    seq: list[int] = []
    for (img, cat), idx in preds.items():
        if n_pos.get(cat, 0) == 0:
            continue
        idx = sorted(idx, key=lambda i: -float(results[i]["score"]))
        seq += idx
        g = gts.get((img, cat), [])
        if not g:
            continue
        dets = [results[i]["segmentation"] if iou_type == "segm" else results[i]["bbox"] for i in idx]
        ious = np.asarray(mask_utils.iou(dets, g, [0] * len(g)), dtype=np.float64).reshape(len(idx), len(g))
        for t, thr in enumerate(iou_thresholds):
            taken = np.zeros(len(g), bool)
            for k, i in enumerate(idx):
                j = int(np.argmax(ious[k]))
                if ious[k, j] >= thr and not taken[j]:
                    taken[j] = hits[i, t] = True
    return hits, seq, dict(n_pos)


def per_image_tables(gt: COCO, results: Sequence[dict], scope: str, iou_types: Sequence[str] = ("segm",),
                     ious: Sequence[float] | None = None):
    """The per-image rows (:mod:`weakbench.core.metrics.per_image`, version 2) behind the AP
    names and ``instance_miou`` of one scope: an ``"image"`` row per GT image, an ``"instance"``
    row per non-crowd GT annotation (with ``ious``, one per annotation in ``gt.dataset`` order, the
    pseudo mask's IoU), and a ``"detection"`` row per prediction of a class with GT, in the order
    :func:`voc_instance_ap` ranks ties, with its :func:`voc_hits` flags at IoU 0.25 and 0.5.

    Returns:
        a ``pyarrow.Table`` (image ids as strings of ``image_id``, class index ``category_id − 1``).
    """
    from weakbench.core.metrics.per_image import AP_IOU_THRESHOLDS, detection_rows, image_rows, instance_rows
    from weakbench.core.metrics.per_image import merge_tables

    anns = [a for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    images = [str(im["id"]) for im in gt.dataset["images"]]
    parts = [image_rows(scope, images),
             instance_rows(scope, [str(a["image_id"]) for a in anns], [int(a["category_id"]) - 1 for a in anns],
                           None if ious is None else list(ious))]
    hits, seq = {}, None
    for t in iou_types:
        h, seq, _ = voc_hits(gt, results, AP_IOU_THRESHOLDS, t)
        hits[t] = h
    seq = seq if seq is not None else []
    parts.append(detection_rows(scope, [str(results[i]["image_id"]) for i in seq],
                                [int(results[i]["category_id"]) - 1 for i in seq],
                                [float(results[i]["score"]) for i in seq],
                                hits["segm"][seq] if "segm" in hits else None,
                                hits["bbox"][seq] if "bbox" in hits else None))
    return merge_tables(parts)


def average_best_overlap(gt: COCO, results: Sequence[dict]) -> float:
    """ABO in percent: mean over non-crowd GT instances of the best mask IoU with a prediction
    of the same image and category (0 if none)."""
    by_key: dict = defaultdict(list)
    for r in results:
        by_key[(r["image_id"], r["category_id"])].append(r["segmentation"])
    best = []
    for ann in gt.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        preds = by_key.get((ann["image_id"], ann["category_id"]), [])
        if not preds:
            best.append(0.0)
            continue
        g = gt.annToRLE(ann)
        ious = mask_utils.iou(list(preds), [g], [0])
        best.append(float(np.max(ious)))
    return float(np.mean(best) * 100) if best else 0.0


def coco_instance_eval(gt: COCO, results: list[dict],
                       iou_types: Sequence[str] = ("segm", "bbox")) -> dict[str, float]:
    """Evaluate instance predictions in COCO result format.

    Args:
        gt: ground truth ``pycocotools.coco.COCO``.
        results: dicts with ``image_id``, ``category_id``, ``score`` and, for ``"segm"``, an
            RLE ``segmentation`` (``counts`` str or bytes), for ``"bbox"`` a ``bbox``
            ``[x, y, w, h]``.
        iou_types: any of ``"segm"``, ``"bbox"``.

    Returns:
        ``{segm_ap, segm_ap50, segm_ap75, segm_ap70, segm_ap_s, segm_ap_m, segm_ap_l,
        segm_map_r25, segm_map_r50, bbox_…(the same), abo}`` (percent, 0–100; ``abo`` only with
        ``"segm"``). With no result at all every value is 0.

    Raises:
        DataError: unknown iou type, or a result lacking the field its iou type needs.
    """
    out: dict[str, float] = {}
    for t in iou_types:
        if t not in ("segm", "bbox"):
            raise DataError(f"unknown iou type {t!r}; use 'segm' or 'bbox'")
        field = "segmentation" if t == "segm" else "bbox"
        missing = [i for i, r in enumerate(results) if field not in r]
        if missing:
            raise DataError(f"result #{missing[0]} has no {field!r}; add it to every "
                            f"prediction to evaluate {t}")
    res = copy.deepcopy(list(results))
    for r in res:
        seg = r.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
            seg["counts"] = seg["counts"].decode("ascii")
    for t in iou_types:
        if not res:
            out.update({f"{t}_{k}": 0.0 for k in ("ap", "ap50", "ap75", "ap70", "ap_s", "ap_m", "ap_l", "map_r25", "map_r50")})
            continue
        per_type = copy.deepcopy(res)
        if t == "bbox":
            for r in per_type:
                r.pop("segmentation", None)  # loadRes would otherwise recompute the box
        dt = _quiet(gt.loadRes, per_type)
        ev = _run(gt, dt, t)
        _quiet(ev.summarize)
        out[f"{t}_ap"], out[f"{t}_ap50"], out[f"{t}_ap75"] = (float(s * 100) for s in ev.stats[:3])
        # COCOeval writes -1 for an area range without GT: report 0 there (no instance to find)
        out[f"{t}_ap_s"], out[f"{t}_ap_m"], out[f"{t}_ap_l"] = (max(0.0, float(s * 100)) for s in ev.stats[3:6])
        out[f"{t}_ap70"] = _ap_at(ev, int(np.argmin(np.abs(ev.params.iouThrs - 0.70))))
        out[f"{t}_map_r25"] = voc_instance_ap(gt, per_type, 0.25, t)
        out[f"{t}_map_r50"] = voc_instance_ap(gt, per_type, 0.5, t)
    if "segm" in iou_types:
        out["abo"] = average_best_overlap(gt, res)
    return out


def coco_gt_from_source(source, indices: Sequence[int], *, masks: bool = True) -> COCO:
    """A ground-truth ``COCO`` object for records ``indices`` of a weakbench dataset source.

    ``image_id`` is the record index, ``category_id`` is ``class + 1``, every non-crowd instance
    becomes an annotation with an RLE ``segmentation`` (its instance mask), its ``bbox``
    ``[x, y, w, h]`` and ``area`` (mask pixels). Crowd regions are not annotations here (they
    are not boxes in weakbench's data layer); predictions on them count as false positives.

    With ``masks=False`` only boxes are written (box AP on box-only data such as ILSVRC).

    Raises:
        DataError: ``masks`` on a source without instance masks.
    """
    if masks and not source.has_masks:
        raise DataError(f"dataset {source.name!r} has no instance masks: mask AP needs them "
                        f"(COCO annotations with segmentations)")
    images, anns = [], []
    for idx in indices:
        rec = source.records[int(idx)]
        a = source.annotations(int(idx))
        images.append({"id": int(idx), "width": rec.width, "height": rec.height})
        for k in range(a.num_instances):
            x0, y0, x1, y1 = (float(v) for v in a.boxes[k])
            ann = {"id": len(anns) + 1, "image_id": int(idx), "category_id": int(a.box_classes[k]) + 1,
                   "area": (x1 - x0) * (y1 - y0), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
            if masks:
                m = np.asfortranarray(a.instance_masks[k].astype(np.uint8))
                rle = mask_utils.encode(m)
                rle["counts"] = rle["counts"].decode("ascii")
                ann.update(segmentation=rle, area=float(m.sum()))
            anns.append(ann)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1, "name": n} for c, n in enumerate(source.class_names)]}
    _quiet(gt.createIndex)
    return gt


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool (H, W) masks in [0, 1]; two empty masks give 0."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class PseudoMaskEvaluator:
    """Quality of per-box pseudo instance masks against GT instance masks (BBAM, CCGR).

    Accumulate one image at a time with the pseudo mask of each GT box (same order as
    ``source.annotations(index).boxes``); :meth:`compute` returns, in percent:

    * ``instance_miou``: mean over GT boxes of IoU(pseudo mask, the box's GT instance mask);
    * ``miou``: semantic mIoU over classes + background of the pseudo label map (instances
      painted largest first; ignore pixels excluded; classes with an empty union skipped);
    * COCOeval of the masks as instance predictions (score 1, or the given scores):
      ``ap, ap50, ap75, ap70, ap_s, ap_m, ap_l, map_r25, map_r50, abo``.
    """

    def __init__(self, source, num_classes: int):
        self.source = source
        self.num_classes = int(num_classes)
        k = self.num_classes + 1
        self.confusion = np.zeros((k, k), dtype=np.int64)
        self.ious: list[float] = []
        self.results: list[dict] = []
        self.indices: list[int] = []

    def accumulate(self, index: int, masks: Sequence[np.ndarray], scores: Sequence[float] | None = None) -> None:
        """Add record ``index``: ``masks`` bool (H, W) at the image's size, one per GT box."""
        a = self.source.annotations(int(index))
        if len(masks) != a.num_instances:
            raise ValueError(f"record {index}: {len(masks)} pseudo masks for {a.num_instances} GT boxes")
        self.indices.append(int(index))
        h, w = a.semantic_mask.shape if a.semantic_mask is not None else (self.source.records[index].height,
                                                                          self.source.records[index].width)
        pred = np.zeros((h, w), dtype=np.int64)
        order = np.argsort([-int(np.asarray(m).sum()) for m in masks], kind="stable")
        for k in order:
            pred[np.asarray(masks[k], bool)] = int(a.box_classes[k]) + 1
        for k, m in enumerate(masks):
            m = np.asarray(m, bool)
            self.ious.append(mask_iou(m, a.instance_masks[k]))
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in a.boxes[k])
            self.results.append({"image_id": int(index), "category_id": int(a.box_classes[k]) + 1,
                                 "segmentation": rle, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                 "score": float(scores[k]) if scores is not None else 1.0})
        gt = a.semantic_mask.astype(np.int64)
        valid = gt != 255
        kk = self.num_classes + 1
        self.confusion += np.bincount(gt[valid] * kk + pred[valid], minlength=kk * kk).reshape(kk, kk)

    def per_image_table(self, scope: str):
        """The accumulated images' per-image rows under ``scope`` (the metric prefix the caller
        logs, e.g. ``"pseudo_masks"`` or ``"pseudo_masks/box_filled"``): each GT instance's IoU
        (``instance_miou``) and the masks' VOC matches (``map_r25``, ``map_r50``); see
        :func:`per_image_tables`."""
        gt = coco_gt_from_source(self.source, self.indices)
        return per_image_tables(gt, self.results, scope, ("segm",), ious=self.ious)

    def compute(self) -> dict[str, float]:
        conf = self.confusion.astype(np.float64)
        tp = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - tp
        iou = tp[union > 0] / union[union > 0]
        out = {"instance_miou": 100.0 * float(np.mean(self.ious)) if self.ious else 0.0,
               "miou": 100.0 * float(iou.mean()) if iou.size else 0.0,
               "num_instances": float(len(self.ious))}
        if self.indices:
            gt = coco_gt_from_source(self.source, self.indices)
            coco = coco_instance_eval(gt, self.results, iou_types=("segm",))
            out.update({k.replace("segm_", ""): v for k, v in coco.items()})
        return out
