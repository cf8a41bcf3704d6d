"""Box conventions and their IoU: one named convention, one IoU function per convention.

weakbench uses two box conventions, both written ``[x0, y0, x1, y1]`` (x: columns, y: rows,
origin at the top-left corner of the image):

* **xyxy** (continuous pixel edges, float): the convention of torchvision's detectors and
  ``torchvision.ops``, of COCO (``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``) and of the
  training transforms (:mod:`weakbench.core.data.transforms`). A box over the pixel columns
  ``a..b`` has ``x0 = a``, ``x1 = b + 1``; its area is ``(x1 - x0) * (y1 - y0)``. Used by BBAM,
  CCGR and the detectors. IoU: :func:`iou_xyxy`.
* **inclusive** (integer pixel indices): the convention of the WSOL protocol (Choe et al., CVPR
  2020, clovaai/wsolevaluation). A box covers the columns ``x0..x1`` and rows ``y0..y1``, so its
  area is ``(x1 - x0 + 1) * (y1 - y0 + 1)``. GT boxes enter it through
  :func:`weakbench.core.data.transforms.resize_boxes_wsol` (wsolevaluation's ``resize_bbox``,
  truncated corners) and predicted boxes are OpenCV ``boundingRect`` s clipped to the frame.
  IoU: :func:`iou_inclusive` (pairwise) and :func:`iou_inclusive_broadcast` (elementwise); the
  compiled WSOL sweep carries a numba twin (``weakbench.core.metrics._levelsets._box_iou``),
  tested equal to the OpenCV reference count by count.
"""

from __future__ import annotations

import numpy as np
import torch


def iou_xyxy(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of *xyxy* boxes: ``torchvision.ops.box_iou``.

    Areas are ``(x1 - x0) * (y1 - y0)``, the intersection is clamped at 0 per axis, in the
    inputs' floating dtype. Example: IoU([0, 0, 10, 10], [5, 0, 15, 10]) = 50 / 150.

    Args:
        boxes_a: float ``(N, 4)`` ``[x0, y0, x1, y1]``, pixels, ``x0 <= x1`` and ``y0 <= y1``.
        boxes_b: float ``(M, 4)``, same frame and device.

    Returns:
        ``(N, M)`` in [0, 1], dtype of the inputs; NaN where both boxes have zero area and do
        not overlap (a zero union), as torchvision returns it.
    """
    from torchvision.ops import box_iou

    return box_iou(boxes_a, boxes_b)


def iou_inclusive(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair of *inclusive* boxes (``+1`` on widths and heights).

    Same arithmetic as wsolevaluation's ``calculate_multiple_iou``: integer areas, a
    float64 quotient, and IoU 0 where the union is not positive (degenerate boxes).
    Example: IoU([1, 2, 5, 6], [3, 1, 4, 5]) = 8/27.

    Args:
        boxes_a: int (N, 4) ``[x0, y0, x1, y1]``, pixel indices.
        boxes_b: int (M, 4).

    Returns:
        float64 (N, M) in [0, 1].
    """
    a = np.asarray(boxes_a, dtype=np.int64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.int64).reshape(-1, 4)[None, :, :]
    return iou_inclusive_broadcast(a, b)


def iou_inclusive_broadcast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of broadcastable *inclusive* integer box arrays ``a`` (..., 4), ``b`` (..., 4).

    The arithmetic of :func:`iou_inclusive` (integer areas with ``+1`` on widths and heights, a
    float64 quotient, 0 where the union is not positive); float64 of the broadcast shape.
    """
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    bad = union <= 0
    iou = inter / np.where(bad, 1, union)
    iou[bad] = 0.0
    return iou
