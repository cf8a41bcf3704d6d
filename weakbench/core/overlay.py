"""CAM overlay pictures: a heat map blended over the image, GT boxes in green, the predicted box
in red. Used for the MLflow overlay artifacts, the dashboard gallery and ``weakbench predict``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# matplotlib's "jet" sampled at 5 anchors, interpolated linearly (enough for a heat map)
_JET = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], dtype=np.float32)


def colorize(cam: np.ndarray) -> np.ndarray:
    """Map a float (H, W) array in [0, 1] to uint8 (H, W, 3) RGB with a jet colour map."""
    x = np.clip(np.nan_to_num(cam.astype(np.float32)), 0, 1) * (len(_JET) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_JET) - 2)
    t = (x - lo)[..., None]
    rgb = _JET[lo] * (1 - t) + _JET[lo + 1] * t
    return (rgb * 255).round().astype(np.uint8)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 (3, H, W) normalised image → uint8 (H, W, 3)."""
    img = image.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray, *, gt_boxes: Sequence[Sequence[int]] = (),
                pred_boxes: Sequence[Sequence[int]] = (), alpha: float = 0.5, title: str | None = None) -> Image.Image:
    """Blend a CAM over an image.

    Args:
        image: uint8 (H, W, 3) RGB.
        cam: float (h, w) in [0, 1]; resized bilinearly to (H, W) if needed.
        gt_boxes / pred_boxes: (x0, y0, x1, y1) pixel boxes in image coordinates (inclusive).
        alpha: heat-map weight in [0, 1].
        title: optional caption drawn in the top-left corner.

    Returns:
        An RGB ``PIL.Image`` of size (W, H).
    """
    h, w = image.shape[:2]
    if cam.shape != (h, w):
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    blended = (image.astype(np.float32) * (1 - alpha) + colorize(cam).astype(np.float32) * alpha).round().astype(np.uint8)
    out = Image.fromarray(blended)
    draw = ImageDraw.Draw(out)
    for boxes, colour in ((gt_boxes, (0, 255, 0)), (pred_boxes, (255, 0, 0))):
        for b in boxes:
            x0, y0, x1, y1 = (int(v) for v in b)
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, min(h, w) // 100))
    if title:
        draw.rectangle([0, 0, 7 * len(title) + 6, 14], fill=(0, 0, 0))
        draw.text((3, 1), title, fill=(255, 255, 255))
    return out


#: distinct instance colours (tab10), cycled.
_TAB10 = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                   [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.float32)


def instance_overlay(image: np.ndarray, masks: np.ndarray, boxes: Sequence[Sequence[float]] = (),
                     captions: Sequence[str] = (), *, ignore: np.ndarray | None = None, gt_boxes: Sequence[Sequence[int]] = (),
                     alpha: float = 0.5, title: str | None = None) -> Image.Image:
    """Draw instance masks (one colour each), their boxes and captions over an image.

    Args:
        image: uint8 (H, W, 3) RGB.
        masks: bool (K, H, W) instance masks.
        boxes: K ``(x0, y0, x1, y1)`` pixel boxes drawn in the instance's colour.
        captions: K strings drawn at the boxes' top-left corners (e.g. ``"dog 0.93"``).
        ignore: optional bool (H, W) band drawn hatched in grey (BBAM's uncertain pixels).
        gt_boxes: boxes drawn in green.
        alpha: mask weight in [0, 1].

    Returns:
        An RGB ``PIL.Image`` of size (W, H).
    """
    h, w = image.shape[:2]
    out_arr = image.astype(np.float32)
    masks = np.asarray(masks, bool).reshape(-1, h, w)
    for k in range(masks.shape[0]):
        colour = _TAB10[k % len(_TAB10)]
        m = masks[k]
        out_arr[m] = out_arr[m] * (1 - alpha) + colour * alpha
    if ignore is not None:
        band = np.asarray(ignore, bool) & ((np.add.outer(np.arange(h), np.arange(w)) // 2) % 2 == 0)
        out_arr[band] = out_arr[band] * 0.5 + 128 * 0.5
    out = Image.fromarray(out_arr.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(1, min(h, w) // 100)
    for b in gt_boxes:
        draw.rectangle([int(v) for v in b], outline=(0, 255, 0), width=width)
    for k, b in enumerate(boxes):
        colour = tuple(int(c) for c in _TAB10[k % len(_TAB10)])
        x0, y0, x1, y1 = (int(round(float(v))) for v in b)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        if k < len(captions) and captions[k]:
            draw.rectangle([x0, y0, x0 + 6 * len(captions[k]) + 4, y0 + 11], fill=colour)
            draw.text((x0 + 2, y0), captions[k], fill=(255, 255, 255))
    if title:
        draw.rectangle([0, 0, 7 * len(title) + 6, 14], fill=(0, 0, 0))
        draw.text((3, 1), title, fill=(255, 255, 255))
    return out
