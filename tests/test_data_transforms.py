"""Geometry of images, boxes and masks (hand-computed values and independent references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from weakbench.core.errors import DataError
from weakbench.core.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, hflip_boxes, hflip_image, hflip_masks, image_to_tensor, nearest_indices, resize_boxes,
    resize_boxes_wsol, resize_image, resize_masks,
)


def test_resize_bbox_reference_example():
    # DESIGN.md / wsolevaluation: (1, 2, 4, 3) from (w, h) = (10, 20) to (35, 10) gives (3, 1, 14, 1)
    out = resize_boxes_wsol(np.array([[1, 2, 4, 3]]), (10, 20), (35, 10))
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 1, 14, 1]]
    with pytest.raises(DataError, match="image size"):
        resize_boxes_wsol(np.array([[0, 0, 1, 1]]), (0, 5), (224, 224))


def test_resize_bbox_truncates_like_python_int():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 500, size=(200, 4))
    boxes[:, 2:] += boxes[:, :2]
    w, h = 613, 427
    out = resize_boxes_wsol(boxes, (w, h), (224, 224))
    want = [[int(x0 * 224.0 / w), int(y0 * 224.0 / h), int(x1 * 224.0 / w), int(y1 * 224.0 / h)] for x0, y0, x1, y1 in boxes]
    assert out.tolist() == want
    assert resize_boxes_wsol(np.zeros((0, 4)), (w, h), (224, 224)).shape == (0, 4)


def test_resize_boxes_float():
    out = resize_boxes(np.array([[10.0, 20.0, 30.0, 40.0]]), (100, 200), (50, 50))
    np.testing.assert_allclose(out, [[5.0, 5.0, 15.0, 10.0]])
    assert out.dtype == np.float32


def test_hflip_boxes_pixel_edges_and_involution():
    # columns 2..4 (x0=2, x1=5) in a 10-pixel-wide image map to columns 5..7 (x0=5, x1=8)
    b = np.array([[2.0, 1.0, 5.0, 3.0]])
    f = hflip_boxes(b, 10)
    assert f.tolist() == [[5.0, 1.0, 8.0, 3.0]]
    np.testing.assert_array_equal(hflip_boxes(f, 10), b)


def test_hflip_agrees_between_image_mask_and_box():
    mask = np.zeros((6, 10), dtype=bool)
    mask[1:3, 2:5] = True  # columns 2..4 → box (2, 1, 5, 3)
    img = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    fm = hflip_masks(mask).numpy()
    fi = np.asarray(hflip_image(img))[..., 0] > 0
    np.testing.assert_array_equal(fm, fi)
    ys, xs = np.nonzero(fm)
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == hflip_boxes(np.array([[2, 1, 5, 3]]), 10)[0].tolist()


def test_nearest_indices_hand_computed_and_exact_at_ties():
    # 4 → 2: centres 0.5·2=1 → floor((0+0.5)·2)=1, floor(1.5·2)=3
    assert nearest_indices(4, 2).tolist() == [1, 3]
    # 2 → 4: floor((i+0.5)/2) = 0, 0, 1, 1
    assert nearest_indices(2, 4).tolist() == [0, 0, 1, 1]
    # an exact tie that floating point gets wrong: (10 + 0.5) * 190 / 35 = 57 exactly
    assert nearest_indices(190, 35)[10] == 57


@pytest.mark.parametrize("src,dst", [((37, 23), (16, 16)), ((23, 31), (40, 40)), ((50, 20), (35, 10)), ((7, 9), (7, 9))])
def test_resize_masks_matches_nearest_exact_without_ties(src, dst):
    # sizes chosen without exact ties, where torch's "nearest-exact" is the same rule
    rng = np.random.default_rng(1)
    sem = rng.integers(0, 6, size=(src[1], src[0])).astype(np.uint8)
    sem[0, 0] = 255
    want = F.interpolate(torch.from_numpy(sem)[None, None].float(), size=(dst[1], dst[0]), mode="nearest-exact")[0, 0]
    got = resize_masks(sem, dst)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (dst[1], dst[0])
    np.testing.assert_array_equal(got.numpy(), want.to(torch.uint8).numpy())
    stack = rng.random((3, src[1], src[0])) > 0.5
    got3 = resize_masks(stack, dst)
    assert got3.dtype == torch.bool and tuple(got3.shape) == (3, dst[1], dst[0])
    want3 = F.interpolate(torch.from_numpy(stack)[None].float(), size=(dst[1], dst[0]), mode="nearest-exact")[0] > 0.5
    np.testing.assert_array_equal(got3.numpy(), want3.numpy())


def test_resize_masks_empty_stack():
    assert tuple(resize_masks(np.zeros((0, 5, 7), bool), 4).shape) == (0, 4, 4)


def test_resize_image_square_no_crop():
    img = Image.new("RGB", (40, 10), (10, 20, 30))
    out = resize_image(img, 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[8, 8].tolist() == [10, 20, 30]
    assert resize_image(img, (8, 4)).size == (8, 4)


def test_image_to_tensor_normalisation():
    img = Image.new("RGB", (3, 2), (255, 0, 128))
    t = image_to_tensor(img)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 2, 3)
    want = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
            (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    torch.testing.assert_close(t[:, 1, 2], torch.tensor(want, dtype=torch.float32))
    with pytest.raises(ValueError, match="RGB"):
        image_to_tensor(Image.new("L", (2, 2)))
