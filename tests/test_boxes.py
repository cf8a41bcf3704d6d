"""The two box conventions of weakbench.core.boxes and their IoUs (hand-computed values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakbench.core.boxes import iou_inclusive, iou_xyxy


def test_iou_xyxy_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(iou_xyxy(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))


def test_inclusive_box_is_the_xyxy_box_one_pixel_larger():
    # an inclusive box over columns x0..x1 is the xyxy box [x0, x1 + 1): same pixels, same IoU
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 20, (30, 2))
    a = np.concatenate([lo, lo + rng.integers(0, 10, (30, 2))], 1)
    lo = rng.integers(0, 20, (9, 2))
    b = np.concatenate([lo, lo + rng.integers(0, 10, (9, 2))], 1)
    as_xyxy = lambda x: torch.from_numpy(x + np.array([0, 0, 1, 1])).to(torch.float64)  # noqa: E731
    np.testing.assert_allclose(iou_inclusive(a, b), iou_xyxy(as_xyxy(a), as_xyxy(b)).numpy(), rtol=1e-15, atol=0)
    assert iou_inclusive(np.array([[2, 2, 2, 2]]), np.array([[2, 2, 2, 2]]))[0, 0] == pytest.approx(1.0)
