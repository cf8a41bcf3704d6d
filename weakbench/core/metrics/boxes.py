"""Box geometry of the WSOL protocol (Choe et al., CVPR 2020): inclusive IoU.

Boxes enter the evaluation frame through
:func:`weakbench.core.data.transforms.resize_boxes_wsol` (wsolevaluation's ``resize_bbox``).

Boxes are ``[x0, y0, x1, y1]`` in pixel indices with *inclusive* corners: a box covers the
columns ``x0..x1`` and rows ``y0..y1``, so its area is ``(x1 - x0 + 1) * (y1 - y0 + 1)``.
"""

from __future__ import annotations

import numpy as np



def iou_inclusive(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair with the inclusive pixel convention (``+1`` on widths and heights).

    Same arithmetic as wsolevaluation's ``calculate_multiple_iou``: integer areas, a
    float64 quotient, and IoU 0 where the union is not positive (degenerate boxes).
    Example: IoU([1, 2, 5, 6], [3, 1, 4, 5]) = 8/27.

    Args:
        boxes_a: int (N, 4) ``[x0, y0, x1, y1]``.
        boxes_b: int (M, 4).

    Returns:
        float64 (N, M) in [0, 1].
    """
    a = np.asarray(boxes_a, dtype=np.int64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.int64).reshape(-1, 4)[None, :, :]
    return iou_broadcast(a, b)


def iou_broadcast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inclusive IoU of broadcastable integer box arrays ``a`` (..., 4) and ``b`` (..., 4).

    Integer areas with ``+1`` on widths and heights and a float64 quotient, as the reference's
    ``calculate_multiple_iou``; a non-positive union gives 0.
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
