"""Instance metrics through pycocotools ``COCOeval``: mask and box AP, mAP^r, and ABO.

* ``segm_ap``, ``segm_ap50``, ``segm_ap75`` (and ``bbox_*``) are COCOeval's own summary
  (``stats[0:3]``), ×100.
* ``segm_map_r25``, ``segm_map_r50`` (mAP^r, Hariharan et al. 2014, as used by CCGR and other
  WSIS papers) are COCOeval re-run with ``params.iouThrs = [0.25, 0.5]``: the mean of the
  precision table over recall points, classes (area "all", maxDets 100), at each IoU.
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

from weakbench.platform.errors import DataError


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
        ``{segm_ap, segm_ap50, segm_ap75, segm_map_r25, segm_map_r50, bbox_ap, bbox_ap50,
        bbox_ap75, bbox_map_r25, bbox_map_r50, abo}`` (percent, 0–100; ``abo`` only with
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
            out.update({f"{t}_{k}": 0.0 for k in ("ap", "ap50", "ap75", "map_r25", "map_r50")})
            continue
        per_type = copy.deepcopy(res)
        if t == "bbox":
            for r in per_type:
                r.pop("segmentation", None)  # loadRes would otherwise recompute the box
        dt = _quiet(gt.loadRes, per_type)
        ev = _run(gt, dt, t)
        _quiet(ev.summarize)
        out[f"{t}_ap"], out[f"{t}_ap50"], out[f"{t}_ap75"] = (float(s * 100) for s in ev.stats[:3])
        evr = _run(gt, dt, t, [0.25, 0.5])
        out[f"{t}_map_r25"], out[f"{t}_map_r50"] = _ap_at(evr, 0), _ap_at(evr, 1)
    if "segm" in iou_types:
        out["abo"] = average_best_overlap(gt, res)
    return out
