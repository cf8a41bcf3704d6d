"""Semantic pseudo-mask quality: mIoU over classes + background with the background threshold swept.

Prediction rule (Puzzle-CAM, Sec. 3.3; the common WSSS pseudo-label rule): for every pixel, the
normalised CAMs of the classes *present in the image* are compared; the pixel is background when
the largest of them is below the background threshold ``t``, else it takes the argmax class.
Pixels labelled 255 in the ground truth are ignored. The confusion matrices of all thresholds
are accumulated over the split, and the split's mIoU at each threshold is the mean IoU over the
classes (background included) whose union is non-empty; the best threshold is chosen on the
split (Puzzle-CAM evaluates its pseudo-labels on the training images this way).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class SemanticEvaluator:
    """Accumulate per-threshold confusion matrices; compute mIoU, per-class IoU, fg precision/recall.

    Args:
        num_classes: C foreground classes; the label space is ``0`` (background) … ``C``.
        bg_thresholds: background thresholds in [0, 1] (default 0.05, 0.10, …, 0.90).
    """

    def __init__(self, num_classes: int, bg_thresholds: Sequence[float] | None = None):
        self.num_classes = int(num_classes)
        self.thresholds = np.round(np.arange(0.05, 0.95, 0.05) if bg_thresholds is None else np.asarray(bg_thresholds, dtype=np.float64), 4)
        k = self.num_classes + 1
        self.confusion = np.zeros((len(self.thresholds), k, k), dtype=np.int64)  # [t, gt, pred]
        #: per accumulated image: ``(classes int (k,), tp, gt, pred int64 (T, k))``, its confusion
        #: counts of the labels it uses (:mod:`weakbench.core.metrics.per_image`)
        self.per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def accumulate(self, cams, labels, semantic) -> None:
        """Add a batch.

        Args:
            cams: float (N, C, H, W) per-class maps in [0, 1] (normalised per image and class).
            labels: (N, C) multi-hot image labels; only present classes can be predicted.
            semantic: uint8/int (N, H, W) ground truth: 0 background, ``c + 1`` class ``c``, 255 ignore.
        """
        cams = torch.as_tensor(cams, dtype=torch.float32)
        labels = torch.as_tensor(labels) > 0.5
        gt = torch.as_tensor(semantic).long()
        n, c = cams.shape[:2]
        if c != self.num_classes:
            raise ValueError(f"cams have {c} classes, the evaluator {self.num_classes}")
        masked = torch.where(labels[:, :, None, None], cams, torch.full_like(cams, -1.0))
        best, arg = masked.max(dim=1)  # (N, H, W)
        valid = gt != 255
        g = gt[valid].numpy()
        b = best[valid].numpy()
        fg = (arg[valid] + 1).numpy()
        k = self.num_classes + 1
        for i, t in enumerate(self.thresholds):
            pred = np.where(b >= t, fg, 0)
            self.confusion[i] += np.bincount(g * k + pred, minlength=k * k).reshape(k, k)
        for j in range(n):  # each image's counts of the labels it uses: 0, its GT classes, its present classes
            v = valid[j]
            gj, bj, fj = gt[j][v].numpy(), best[j][v].numpy(), (arg[j][v] + 1).numpy()
            used = np.union1d(np.union1d([0], np.unique(gj)), np.flatnonzero(labels[j].numpy()) + 1).astype(np.int64)
            tp = np.zeros((len(self.thresholds), len(used)), np.int64)
            pr = np.zeros_like(tp)
            gcount = np.bincount(gj, minlength=k)[used]
            for i, t in enumerate(self.thresholds):
                pred = np.where(bj >= t, fj, 0)
                pr[i] = np.bincount(pred, minlength=k)[used]
                tp[i] = np.bincount(pred[pred == gj], minlength=k)[used]
            self.per_image.append((used, tp, np.broadcast_to(gcount, tp.shape).copy(), pr))

    def compute(self) -> dict:
        """Returns ``miou`` (percent, at the best threshold), ``best_bg_threshold``, ``curve``
        (list of ``(threshold, miou)``), ``per_class_iou`` (percent, background first, NaN for a
        class absent from both GT and prediction), ``fg_precision`` and ``fg_recall`` (percent,
        foreground versus background at the best threshold)."""
        conf = self.confusion.astype(np.float64)
        tp = np.diagonal(conf, axis1=1, axis2=2)
        union = conf.sum(axis=1) + conf.sum(axis=2) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        mious = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in iou])
        if not np.isfinite(mious).any():
            return {"miou": float("nan"), "best_bg_threshold": float("nan"), "curve": [], "per_class_iou": [],
                    "fg_precision": float("nan"), "fg_recall": float("nan")}
        i = int(np.nanargmax(mious))
        m = conf[i]
        fg_tp = m[1:, 1:].sum()
        pred_fg = m[:, 1:].sum()
        gt_fg = m[1:, :].sum()
        return {
            "miou": 100.0 * float(mious[i]),
            "best_bg_threshold": float(self.thresholds[i]),
            "curve": [(float(t), 100.0 * float(v)) for t, v in zip(self.thresholds, mious)],
            "per_class_iou": [100.0 * float(v) for v in iou[i]],
            "fg_precision": 100.0 * float(fg_tp / pred_fg) if pred_fg else float("nan"),
            "fg_recall": 100.0 * float(fg_tp / gt_fg) if gt_fg else float("nan"),
        }
