"""Instance metrics: the COCOeval wrapper against pycocotools' own summary on COCO128, and the
VOC-style mAP^r (``voc_instance_ap``) on hand-built cases with hand-computed values."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from weakbench.core.errors import DataError
from weakbench.core.metrics import average_best_overlap, coco_instance_eval


@pytest.fixture(scope="module")
def coco_gt(coco128_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco128_dir / "annotations" / "instances.json"))


def _gt_as_results(gt: COCO, shift: int = 0, drop_every: int = 0) -> list[dict]:
    out = []
    for i, ann in enumerate(gt.dataset["annotations"]):
        if ann.get("iscrowd", 0) or (drop_every and i % drop_every == 0):
            continue
        m = gt.annToMask(ann)
        if shift:
            m = np.roll(m, shift, axis=1)
            m[:, :shift] = 0
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        x, y, w, h = ann["bbox"]
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "segmentation": rle, "bbox": [x + shift, y, w, h],
                    "score": 1.0 - 1e-4 * (i % 7)})
    return out


def _pycocotools_stats(gt: COCO, results: list[dict], iou_type: str, thrs=None):
    res = [dict(r) for r in results]
    if iou_type == "bbox":
        for r in res:
            r.pop("segmentation")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(res)
        ev = COCOeval(gt, dt, iou_type)
        if thrs is not None:
            ev.params.iouThrs = np.array(thrs)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_ground_truth_as_predictions_scores_100(coco_gt):
    res = _gt_as_results(coco_gt)
    out = coco_instance_eval(coco_gt, res)
    for t in ("segm", "bbox"):
        ev = _pycocotools_stats(coco_gt, res, t)
        assert out[f"{t}_ap"] == pytest.approx(ev.stats[0] * 100, abs=1e-9)
        assert out[f"{t}_ap"] == pytest.approx(100.0, abs=1e-6)
        assert out[f"{t}_map_r25"] == pytest.approx(100.0, abs=1e-6)
        assert out[f"{t}_map_r50"] == pytest.approx(100.0, abs=1e-6)
    assert out["abo"] == pytest.approx(100.0, abs=1e-9)


def test_perturbed_masks_match_pycocotools(coco_gt):
    res = _gt_as_results(coco_gt, shift=3, drop_every=5)
    out = coco_instance_eval(coco_gt, res)
    for t in ("segm", "bbox"):
        ev = _pycocotools_stats(coco_gt, res, t)
        for k, i in (("ap", 0), ("ap50", 1), ("ap75", 2)):
            assert out[f"{t}_{k}"] == pytest.approx(ev.stats[i] * 100, abs=1e-9)
    assert out["segm_ap"] < 100.0
    # mAP^r is VOC's AP (voc_instance_ap), not COCOeval's: a looser IoU never scores lower
    assert 0 < out["segm_map_r50"] <= out["segm_map_r25"] <= 100.0
    assert 0 < out["abo"] < 100.0


def test_abo_hand_computed():
    gt = COCO()
    full = np.zeros((8, 8), np.uint8)
    full[2:6, 2:6] = 1  # 16 pixels
    rle = mask_utils.encode(np.asfortranarray(full))
    rle["counts"] = rle["counts"].decode("ascii")
    gt.dataset = {"images": [{"id": 1, "width": 8, "height": 8}],
                  "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                  "annotations": [
                      {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                       "area": 16, "bbox": [2, 2, 4, 4], "iscrowd": 0},
                      {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle,
                       "area": 16, "bbox": [2, 2, 4, 4], "iscrowd": 0}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    half = full.copy()
    half[:, 4:] = 0  # 8 of the 16 pixels: IoU 0.5
    prle = mask_utils.encode(np.asfortranarray(half))
    preds = [{"image_id": 1, "category_id": 1, "segmentation": prle, "score": 0.9,
              "bbox": [2, 2, 2, 4]},
             {"image_id": 1, "category_id": 1, "segmentation": rle, "score": 0.1,
              "bbox": [2, 2, 4, 4]}]
    # class 1: best overlap 1.0 (second prediction); class 2: no prediction -> 0
    assert average_best_overlap(gt, preds) == pytest.approx(50.0)
    assert average_best_overlap(gt, preds[:1]) == pytest.approx(25.0)
    out = coco_instance_eval(gt, preds[:1], iou_types=("segm",))
    assert out["abo"] == pytest.approx(25.0)
    assert coco_instance_eval(gt, [])["segm_ap"] == 0.0
    with pytest.raises(DataError, match="segmentation"):
        coco_instance_eval(gt, [{"image_id": 1, "category_id": 1, "score": 1.0}])


def test_mask_iou_by_hand():
    from weakbench.core.metrics import mask_iou

    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True  # 4 px, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_pseudo_mask_evaluator_gt_is_perfect_and_box_filled_is_not(synthetic_dir):
    from weakbench.core.data import open_dataset
    from weakbench.core.metrics import PseudoMaskEvaluator

    source = open_dataset(str(synthetic_dir))
    perfect = PseudoMaskEvaluator(source, source.num_classes)
    boxes = PseudoMaskEvaluator(source, source.num_classes)
    for idx in range(12):
        a = source.annotations(idx)
        perfect.accumulate(idx, list(a.instance_masks))
        filled = []
        for x0, y0, x1, y1 in a.boxes:
            m = np.zeros(a.instance_masks.shape[1:], bool)
            m[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            filled.append(m)
        boxes.accumulate(idx, filled)
    p = perfect.compute()
    assert p["instance_miou"] == pytest.approx(100.0) and p["miou"] == pytest.approx(100.0)
    assert p["ap"] == pytest.approx(100.0) and p["abo"] == pytest.approx(100.0)
    b = boxes.compute()
    # boxes hold their shape plus background: IoU < 1 for every shape but never 0
    assert 30.0 < b["instance_miou"] < 99.0 and b["miou"] < 99.0 and b["ap"] < 100.0
    with pytest.raises(ValueError, match="pseudo masks for"):
        boxes.accumulate(0, [])


def _gt_with(masks_by_image: dict, categories=(1, 2, 3)) -> COCO:
    """A COCO ground truth from ``{image_id: [(category_id, bool mask), ...]}`` (8×10 images)."""
    gt = COCO()
    anns = []
    for img, items in masks_by_image.items():
        for cat, m in items:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "segmentation": rle,
                         "area": float(m.sum()), "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
    gt.dataset = {"images": [{"id": i, "width": 10, "height": 8} for i in masks_by_image],
                  "categories": [{"id": c, "name": str(c)} for c in categories], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _block(x0, x1, y0=0, y1=4):
    m = np.zeros((8, 10), bool)
    m[y0:y1, x0:x1] = True
    return m


def _pred(img, cat, m, score):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"image_id": img, "category_id": cat, "segmentation": rle, "score": score, "bbox": [0, 0, 1, 1]}


def test_voc_ap_is_the_area_under_the_monotone_curve():
    from weakbench.core.metrics import voc_ap

    # TP, FP, TP, FP over 2 positives: precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1;
    # made monotone: 1 up to recall 1/2, 2/3 up to recall 1 -> 1/2 + 1/2 * 2/3 = 5/6
    assert voc_ap(np.array([.5, .5, 1, 1]), np.array([1, .5, 2 / 3, .5])) == pytest.approx(5 / 6)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    assert voc_ap(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    # 11-point VOC 2007 would give (6 * 1 + 5 * 2/3) / 11 = 0.848...: this is not it
    assert voc_ap(np.array([.5, .5, 1, 1]), np.array([1, .5, 2 / 3, .5])) != pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_instance_ap_hand_computed():
    """Class 1 has two GT instances in image 1 (A: x 0-3, B: x 6-9; 16 px each); class 2 one in
    image 2 and no prediction (AP 0); class 3 has predictions and no GT (ignored). Class 1's
    predictions by score: exact A (TP), exact A again (a duplicate: FP), the left half of B
    (IoU 8/16 = 0.5: TP at 0.5, FP at 0.75), one in image 2 where class 1 has no GT (FP).
    AP_0.5 = 5/6 (see test_voc_ap...), AP_0.75 = 1/2 (TP, FP, FP, FP: precision 1 up to recall 1/2)."""
    from weakbench.core.metrics import voc_instance_ap

    a, b = _block(0, 4), _block(6, 10)
    gt = _gt_with({1: [(1, a), (1, b)], 2: [(2, _block(2, 6, 4, 8))]})
    preds = [_pred(1, 1, a, 0.9), _pred(1, 1, a, 0.8), _pred(1, 1, _block(6, 8), 0.7), _pred(2, 1, a, 0.6),
             _pred(1, 3, a, 0.95)]
    assert voc_instance_ap(gt, preds, 0.5) == pytest.approx(100 * (5 / 6 + 0) / 2)
    assert voc_instance_ap(gt, preds, 0.75) == pytest.approx(100 * (1 / 2 + 0) / 2)
    # the order of the results does not matter, the scores do
    assert voc_instance_ap(gt, preds[::-1], 0.5) == pytest.approx(100 * 5 / 12)
    # no prediction at all: every class with GT scores 0; no GT at all: 0
    assert voc_instance_ap(gt, [], 0.5) == 0.0
    assert voc_instance_ap(_gt_with({1: []}), preds, 0.5) == 0.0
    with pytest.raises(DataError, match="segmentation"):
        voc_instance_ap(gt, [{"image_id": 1, "category_id": 1, "score": 1.0}], 0.5)
    with pytest.raises(DataError, match="iou type"):
        voc_instance_ap(gt, preds, 0.5, "keypoints")


def test_voc_instance_ap_a_duplicate_of_a_taken_instance_is_false_even_if_another_overlaps_it():
    """VOC's rule, not "any unmatched GT": A (x 0-3) and B (x 4-7) touch. The second prediction
    (x 0-5, 24 px) overlaps A by 16/24 and B by 8/32 = 0.25: at IoU 0.25 its best GT is A, taken
    by the first prediction, so it is false although B is free and overlaps it enough. TP, FP over
    two positives: AP = 1/2 (a greedy match to any free instance would give 1)."""
    from weakbench.core.metrics import voc_instance_ap

    a, b = _block(0, 4), _block(4, 8)
    gt = _gt_with({1: [(1, a), (1, b)]}, categories=(1,))
    preds = [_pred(1, 1, a, 0.9), _pred(1, 1, _block(0, 6), 0.8)]
    assert voc_instance_ap(gt, preds, 0.25) == pytest.approx(50.0)


def test_voc_instance_ap_on_boxes():
    """``bbox``: box IoU of ``[x, y, w, h]`` boxes (pycocotools' convention, no +1). GT box
    [0, 0, 4, 4]; a prediction [2, 0, 4, 4] overlaps it by 8/24 = 1/3: TP at 0.25, FP at 0.5."""
    from weakbench.core.metrics import voc_instance_ap

    gt = _gt_with({1: [(1, _block(0, 4))]}, categories=(1,))
    preds = [{"image_id": 1, "category_id": 1, "bbox": [2.0, 0.0, 4.0, 4.0], "score": 0.5}]
    assert voc_instance_ap(gt, preds, 0.25, "bbox") == pytest.approx(100.0)
    assert voc_instance_ap(gt, preds, 0.5, "bbox") == 0.0

