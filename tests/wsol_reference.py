"""Slow reference of the WSOL protocol, used only by the tests and the benchmark.

A straightforward transcription of clovaai/wsolevaluation (Choe et al., CVPR 2020,
``wsol/util.py`` and ``evaluation.py``): ``compute_bboxes_from_scoremaps`` (OpenCV threshold
and ``findContours`` once per threshold), ``calculate_multiple_iou``, ``BoxEvaluator`` and
``MaskEvaluator``. It deliberately keeps the per-threshold loop: it is the yardstick the fast
path in :mod:`weakbench.core.metrics.wsol` is compared against, count by count.
OpenCV is a dev/test dependency only.
"""

from __future__ import annotations

import cv2
import numpy as np


def compute_bboxes_from_scoremaps(scoremap, scoremap_threshold_list, multi_contour_eval=False):
    """Boxes ``[x0, y0, x1, y1]`` at each threshold, as the reference computes them.

    scoremap: float (H, W) in [0, 1]. Returns (list of int (n_t, 4) arrays, list of n_t).
    """
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)

    def scoremap2bbox(threshold):
        _, thr_gray_heatmap = cv2.threshold(
            src=scoremap_image,
            thresh=int(threshold * np.max(scoremap_image)),
            maxval=255,
            type=cv2.THRESH_BINARY,
        )
        contours = cv2.findContours(
            image=thr_gray_heatmap, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE
        )[0]
        if len(contours) == 0:
            return np.asarray([[0, 0, 0, 0]]), 1
        if not multi_contour_eval:
            contours = [max(contours, key=cv2.contourArea)]
        estimated_boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            x0, y0, x1, y1 = x, y, x + w, y + h
            x1 = min(x1, width - 1)
            y1 = min(y1, height - 1)
            estimated_boxes.append([x0, y0, x1, y1])
        return np.asarray(estimated_boxes), len(contours)

    boxes, numbers = [], []
    for threshold in scoremap_threshold_list:
        b, n = scoremap2bbox(threshold)
        boxes.append(b)
        numbers.append(n)
    return boxes, numbers


def calculate_multiple_iou(box_a, box_b):
    """Inclusive IoU of every pair: box_a (N, 4), box_b (M, 4) -> (N, M) float64."""
    num_a = box_a.shape[0]
    num_b = box_b.shape[0]
    box_a = np.tile(box_a, num_b).reshape((num_a, num_b, 4))
    box_b = np.tile(box_b, (num_a, 1)).reshape((num_a, num_b, 4))
    min_x = np.maximum(box_a[..., 0], box_b[..., 0])
    min_y = np.maximum(box_a[..., 1], box_b[..., 1])
    max_x = np.minimum(box_a[..., 2], box_b[..., 2])
    max_y = np.minimum(box_a[..., 3], box_b[..., 3])
    area_intersect = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
    area_a = (box_a[..., 2] - box_a[..., 0] + 1) * (box_a[..., 3] - box_a[..., 1] + 1)
    area_b = (box_b[..., 2] - box_b[..., 0] + 1) * (box_b[..., 3] - box_b[..., 1] + 1)
    denominator = area_a + area_b - area_intersect
    degenerate = np.where(denominator <= 0)
    denominator[degenerate] = 1
    ious = area_intersect / denominator
    ious[degenerate] = 0
    return ious


class ReferenceBoxEvaluator:
    """wsolevaluation's ``BoxEvaluator``: ``num_correct[delta][threshold]`` counts."""

    def __init__(self, cam_curve_interval=0.001, iou_threshold_list=(30, 50, 70),
                 multi_contour_eval=True):
        self.cam_threshold_list = list(np.arange(0, 1, cam_curve_interval))
        self.iou_threshold_list = list(iou_threshold_list)
        self.multi_contour_eval = multi_contour_eval
        self.num_correct = {t: np.zeros(len(self.cam_threshold_list))
                            for t in self.iou_threshold_list}
        self.cnt = 0

    def accumulate(self, scoremap, gt_boxes):
        boxes_at_thresholds, number_of_box_list = compute_bboxes_from_scoremaps(
            scoremap, self.cam_threshold_list, self.multi_contour_eval)
        boxes_at_thresholds = np.concatenate(boxes_at_thresholds, axis=0)
        multiple_iou = calculate_multiple_iou(np.array(boxes_at_thresholds), np.array(gt_boxes))
        idx = 0
        sliced = []
        for nr_box in number_of_box_list:
            sliced.append(max(multiple_iou.max(1)[idx:idx + nr_box]))
            idx += nr_box
        for t in self.iou_threshold_list:
            correct = np.where(np.asarray(sliced) >= (t / 100))[0]
            self.num_correct[t][correct] += 1
        self.cnt += 1

    def compute(self):
        return [float((self.num_correct[t] * 100.0 / float(self.cnt)).max())
                for t in self.iou_threshold_list]


class ReferenceMaskEvaluator:
    """wsolevaluation's ``MaskEvaluator`` (PxAP), with the ignore convention of ``get_mask``."""

    def __init__(self, cam_curve_interval=0.001):
        self.cam_threshold_list = list(np.arange(0, 1, cam_curve_interval))
        self.num_bins = len(self.cam_threshold_list) + 2
        self.threshold_list_right_edge = np.append(self.cam_threshold_list, [1.0, 2.0, 3.0])
        self.gt_true_score_hist = np.zeros(self.num_bins, dtype=np.float64)
        self.gt_false_score_hist = np.zeros(self.num_bins, dtype=np.float64)

    def accumulate(self, scoremap, gt_mask, ignore=None):
        mask = gt_mask.astype(np.uint8)
        if ignore is not None:
            mask[np.logical_and(ignore, np.logical_not(gt_mask))] = 255
        h, _ = np.histogram(scoremap[mask == 1], bins=self.threshold_list_right_edge)
        self.gt_true_score_hist += h.astype(np.float64)
        h, _ = np.histogram(scoremap[mask == 0], bins=self.threshold_list_right_edge)
        self.gt_false_score_hist += h.astype(np.float64)

    def compute(self):
        num_gt_true = self.gt_true_score_hist.sum()
        tp = self.gt_true_score_hist[::-1].cumsum()
        fn = num_gt_true - tp
        fp = self.gt_false_score_hist[::-1].cumsum()
        if ((tp + fn) <= 0).all():
            raise RuntimeError("No positive ground truth in the eval set.")
        if ((tp + fp) <= 0).all():
            raise RuntimeError("No positive prediction in the eval set.")
        non_zero_indices = (tp + fp) != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
            recall = tp / (tp + fn)
        auc = (precision[1:] * np.diff(recall))[non_zero_indices[1:]].sum()
        return float(auc * 100)
