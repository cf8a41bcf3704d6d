"""Box geometry of the WSOL protocol (Choe et al., CVPR 2020): resizing and inclusive IoU.

Boxes are ``[x0, y0, x1, y1]`` in pixel indices with *inclusive* corners: a box covers the
columns ``x0..x1`` and rows ``y0..y1``, so its area is ``(x1 - x0 + 1) * (y1 - y0 + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weakbench.core.errors import DataError


def resize_box(
    box: Sequence[float], image_size_wh: tuple[int, int], resize_size_wh: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Scale one box from an image of size ``(w, h)`` into the evaluation frame.

    Follows wsolevaluation's ``resize_bbox``: each coordinate becomes
    ``int(x * resize / size)`` along its axis (float64, truncated towards zero).
    Example: box (1, 2, 4, 3) from size (10, 20) to (35, 10) gives (3, 1, 14, 1).

    Args:
        box: ``(x0, y0, x1, y1)`` in the original image's pixels.
        image_size_wh: original ``(width, height)``, both > 0.
        resize_size_wh: evaluation frame ``(width, height)``, e.g. ``(224, 224)``.

    Raises:
        DataError: a size is not positive.
    """
    (w, h), (rw, rh) = image_size_wh, resize_size_wh
    if w <= 0 or h <= 0 or rw <= 0 or rh <= 0:
        raise DataError(f"box sizes must be positive: image_size_wh={image_size_wh}, "
                        f"resize_size_wh={resize_size_wh}; fix the image size metadata")
    x0, y0, x1, y1 = box
    # Same operation order as the reference: (x * target) / origin, then int().
    return int(x0 * rw / w), int(y0 * rh / h), int(x1 * rw / w), int(y1 * rh / h)


def scale_boxes(
    boxes: np.ndarray, image_size_wh: tuple[int, int], resize_size_wh: tuple[int, int]
) -> np.ndarray:
    """Vectorised :func:`resize_box`: float or int (K, 4) -> int64 (K, 4), truncated."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    (w, h), (rw, rh) = image_size_wh, resize_size_wh
    if w <= 0 or h <= 0 or rw <= 0 or rh <= 0:
        raise DataError(f"box sizes must be positive: image_size_wh={image_size_wh}, "
                        f"resize_size_wh={resize_size_wh}; fix the image size metadata")
    target = np.array([rw, rh, rw, rh], dtype=np.float64)
    origin = np.array([w, h, w, h], dtype=np.float64)
    # np.trunc matches Python int() for the finite values boxes hold.
    return np.trunc(arr * target / origin).astype(np.int64)


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
