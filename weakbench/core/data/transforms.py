"""Geometric transforms that carry images, boxes and masks together.

Pure functions, no randomness: the datasets draw the random decisions (through torch's RNG) and
call these. Conventions (the two box conventions are named and defined in
:mod:`weakbench.core.boxes`):

* **Float boxes** are ``(x0, y0, x1, y1)`` in the *xyxy* convention (continuous pixel edges) of
  the original image: COCO's ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``; a box covering pixel columns
  ``a..b`` (inclusive) has ``x0 = a``, ``x1 = b + 1``. Resizing multiplies by the scale factor;
  a horizontal flip maps ``x -> W - x``.
* **Evaluation boxes** (the WSOL protocol of Choe et al., CVPR 2020) are integers of the
  *inclusive* convention obtained with
  wsolevaluation's ``resize_bbox`` rule: ``int(x * S_w / w)`` (truncation), see
  :func:`resize_boxes_wsol`.
* **Images** are resized to a square ``S x S`` frame without crop; the aspect ratio is *not*
  kept (as in wsolevaluation's evaluation transform ``Resize((224, 224))``).
* **Masks** are resized with nearest neighbour sampled at pixel centres: output pixel ``i``
  takes input pixel ``floor((i + 0.5) * H_in / H_out)`` computed in exact integer arithmetic
  (:func:`nearest_indices`), which does not shift the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from weakbench.core.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resize_image",
    "hflip_image",
    "image_to_tensor",
    "resize_boxes",
    "resize_boxes_wsol",
    "hflip_boxes",
    "nearest_indices",
    "resize_masks",
    "hflip_masks",
]

#: ImageNet channel statistics (RGB, values of images scaled to [0, 1]) used to normalise inputs.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_image(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize a PIL image to ``size`` (``S`` or ``(width, height)``) with bilinear filtering.

    Aspect ratio is not kept and nothing is cropped. PIL's bilinear filter widens its support
    when shrinking (anti-aliasing), exactly as ``torchvision.transforms.Resize`` on PIL images.

    Returns:
        a new PIL image of the requested size, same mode.
    """
    w, h = (size, size) if isinstance(size, int) else size
    if image.size == (w, h):
        return image.copy()
    return image.resize((int(w), int(h)), Image.BILINEAR)


def hflip_image(image: Image.Image) -> Image.Image:
    """Mirror a PIL image left-right."""
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def image_to_tensor(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image → normalised float32 tensor (3, H, W): ``(pixel / 255 - mean) / std``.

    Raises:
        ValueError: if the image is not in mode ``"RGB"``.
    """
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor expects an RGB image, got mode {image.mode!r}")
    arr = np.asarray(image, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def resize_boxes(boxes: np.ndarray, image_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Scale float boxes from an image of ``image_size`` to ``new_size``.

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1`` in pixels of the original image (any float dtype).
        image_size: ``(width, height)`` of the original image, pixels.
        new_size: ``(width, height)`` of the resized image, pixels.

    Returns:
        float32 (K, 4) boxes in the resized frame (no rounding).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = new_size[0] / image_size[0]
    sy = new_size[1] / image_size[1]
    return (b * np.array([sx, sy, sx, sy])).astype(np.float32)


def resize_boxes_wsol(boxes: np.ndarray, image_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Scale boxes into the evaluation frame with wsolevaluation's ``resize_bbox`` rule.

    Each coordinate becomes ``int(x * new_w / w)`` (x) or ``int(y * new_h / h)`` (y), computed in
    float64 in that order and truncated towards zero, exactly as
    ``wsolevaluation/util.py::resize_bbox`` (Choe et al., CVPR 2020). Example: box
    ``(1, 2, 4, 3)`` from ``(w, h) = (10, 20)`` to ``(35, 10)`` gives ``(3, 1, 14, 1)``.

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1`` in original pixels.
        image_size: ``(width, height)`` of the original image.
        new_size: ``(width, height)`` of the evaluation frame.

    Returns:
        int64 (K, 4), corners of the *inclusive* convention (:mod:`weakbench.core.boxes`), as the
        reference reads them.

    Raises:
        DataError: a size is not positive.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = float(image_size[0]), float(image_size[1])
    nw, nh = float(new_size[0]), float(new_size[1])
    if w <= 0 or h <= 0 or nw <= 0 or nh <= 0:
        raise DataError(f"box sizes must be positive: image_size={tuple(image_size)}, "
                        f"new_size={tuple(new_size)}; fix the image size metadata")
    out = np.empty_like(b)
    out[:, 0::2] = b[:, 0::2] * nw / w
    out[:, 1::2] = b[:, 1::2] * nh / h
    return np.trunc(out).astype(np.int64)


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror float boxes left-right in an image ``width`` pixels wide: ``x -> width - x``.

    Uses the continuous pixel-edge convention (a box over columns ``a..b`` has ``x1 = b + 1``),
    so flipping twice is the identity and a box over columns ``a..b`` maps to columns
    ``W-1-b .. W-1-a``.

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1``.

    Returns:
        float32 (K, 4).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    x0 = width - b[:, 2]
    x1 = width - b[:, 0]
    b[:, 0], b[:, 2] = x0, x1
    return b


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for pixel-centre nearest neighbour, in exact integer
    arithmetic: ``floor((i + 0.5) * n_in / n_out) = ((2i + 1) * n_in) // (2 * n_out)``.

    Returns int64 (n_out,) in ``[0, n_in)``. (torch's ``"nearest-exact"`` and PIL's ``NEAREST``
    compute the same formula in floating point and can differ by one at exact ties, e.g.
    ``n_in = 190, n_out = 35, i = 10`` gives 57 here.)
    """
    i = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)


def resize_masks(masks: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of masks sampled at pixel centres (see :func:`nearest_indices`).

    Args:
        masks: (H, W) or (N, H, W) bool or uint8 (labels such as a semantic mask with 255 =
            ignore are preserved exactly).
        size: ``S`` or ``(width, height)`` of the output.

    Returns:
        a tensor of the input dtype, (S_h, S_w) or (N, S_h, S_w).
    """
    t = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    w, h = (size, size) if isinstance(size, int) else size
    iy = torch.from_numpy(nearest_indices(t.shape[-2], int(h)))
    ix = torch.from_numpy(nearest_indices(t.shape[-1], int(w)))
    return t.index_select(-2, iy).index_select(-1, ix)


def hflip_masks(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mirror (H, W) or (N, H, W) masks left-right (last axis)."""
    t = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    return torch.flip(t, dims=(-1,))
