"""Hand-computed cases for mAP, top-1 accuracy and the semantic mIoU sweep."""

import numpy as np
import pytest

from weakbench.core.metrics import SemanticEvaluator, average_precision, multilabel_average_precision, top1_accuracy


def test_average_precision_by_hand():
    # ranking: 0.9(+) 0.8(-) 0.7(+) 0.1(-): AP = 1/2·1 + 1/2·(2/3) = 5/6
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # a tie between a positive and a negative enters together: P = 1/2 at R = 1
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_multilabel_map_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]])
    labels = np.array([[1, 0, 0], [0, 1, 0]])
    assert multilabel_average_precision(scores, labels) == pytest.approx(100.0)
    labels2 = np.array([[0, 1, 0], [1, 0, 0]])  # both classes ranked wrongly: AP = 1/2 each
    assert multilabel_average_precision(scores, labels2) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        multilabel_average_precision(scores, labels[:, :2])


def test_top1_accuracy():
    assert top1_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0, 1], [0, 1]])) == pytest.approx(50.0)


def test_semantic_miou_by_hand():
    # one 1x4 image, one class present; cam = [0.1, 0.4, 0.6, 0.9], gt = [bg, bg, c, c]
    cams = np.array([[[[0.1, 0.4, 0.6, 0.9]]]], dtype=np.float32)
    gt = np.array([[[0, 0, 1, 1]]], dtype=np.uint8)
    ev = SemanticEvaluator(1, bg_thresholds=[0.3, 0.5, 0.95])
    ev.accumulate(cams, np.array([[1]]), gt)
    r = ev.compute()
    # t=0.3: pred [0,1,1,1] -> bg IoU 1/2, fg IoU 2/3 -> 58.33; t=0.5: perfect -> 100; t=0.95: all bg -> bg 2/4, fg 0 -> 25
    assert [round(v, 2) for _, v in r["curve"]] == [58.33, 100.0, 25.0]
    assert r["best_bg_threshold"] == 0.5 and r["miou"] == pytest.approx(100.0)
    assert r["fg_precision"] == pytest.approx(100.0) and r["fg_recall"] == pytest.approx(100.0)


def test_semantic_ignores_255_and_absent_classes():
    cams = np.zeros((1, 2, 1, 3), dtype=np.float32)
    cams[0, 1] = [0.9, 0.9, 0.9]  # class 1 would win everywhere, but it is not in the image
    cams[0, 0] = [0.8, 0.1, 0.8]
    gt = np.array([[[1, 0, 255]]], dtype=np.uint8)
    ev = SemanticEvaluator(2, bg_thresholds=[0.5])
    ev.accumulate(cams, np.array([[1, 0]]), gt)
    r = ev.compute()
    assert r["miou"] == pytest.approx(100.0)  # bg and class 0 perfect; class 1 absent (NaN) and pixel 3 ignored
    assert np.isnan(r["per_class_iou"][2])
