"""Instance metrics: the COCOeval wrapper against pycocotools' own summary on COCO128."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from weakbench.platform.errors import DataError
from weakbench.platform.metrics import average_best_overlap, coco_instance_eval


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
        evr = _pycocotools_stats(coco_gt, res, t, [0.25, 0.5])
        for k, i in (("map_r25", 0), ("map_r50", 1)):
            p = evr.eval["precision"][i, :, :, 0, -1]
            assert out[f"{t}_{k}"] == pytest.approx(p[p > -1].mean() * 100, abs=1e-9)
    assert out["segm_ap"] < 100.0
    assert out["segm_map_r25"] >= out["segm_map_r50"] >= out["segm_ap50"] - 1e-9
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
    from weakbench.platform.metrics import mask_iou

    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True  # 4 px, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_pseudo_mask_evaluator_gt_is_perfect_and_box_filled_is_not(synthetic_dir):
    from weakbench.platform.data import open_dataset
    from weakbench.platform.metrics import PseudoMaskEvaluator

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
