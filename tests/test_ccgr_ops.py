"""CCGR ops: the exact box integral, the CCGR loss (Eq. 2–3) and box refinement, PRM peaks,
Eq. 4 ranking, the bags, WSDDN scores and loss, selective search and pseudo masks, on tiny
hand-built maps with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from weakbench.methods.ccgr_ops import (
    best_iou_with_gt,
    box_area_in_map,
    box_integral,
    ccgr_loss,
    context_boxes,
    find_peaks,
    iou_bags,
    peak_bags,
    contrast_objectness,
    proposal_rank_scores,
    pseudo_instance_mask,
    rank_proposals,
    refine_boxes,
    selective_search,
    summed_area_table,
    wsddn_bag_scores,
    wsddn_loss,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: small ops on the shared 2-core machine run faster that way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _square_map() -> torch.Tensor:
    """10 × 10 zeros with ones on rows and columns 2..5 (the issue's map)."""
    s = torch.zeros(10, 10, dtype=torch.float64)
    s[2:6, 2:6] = 1.0
    return s


def _blurred_rectangle(size: int, x0: int, y0: int, x1: int, y1: int, sigma: float = 2.0) -> torch.Tensor:
    """A filled rectangle (columns x0..x1−1, rows y0..y1−1) blurred by a Gaussian: a soft
    probability map as a segmentation branch gives."""
    s = torch.zeros(size, size)
    s[y0:y1, x0:x1] = 1.0
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    s = F.conv2d(s[None, None], k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(s, k.view(1, 1, -1, 1), padding=(r, 0))[0, 0].clamp(0, 1)


def _overlap_integral(s: torch.Tensor, box) -> float:
    """Brute force: Σ over pixels of S × (area of the pixel inside the box)."""
    h, w = s.shape
    x0, y0, x1, y1 = box
    j = torch.arange(w, dtype=torch.float64)
    i = torch.arange(h, dtype=torch.float64)
    cols = ((j + 1).clamp(max=float(x1)) - j.clamp(min=float(x0))).clamp(min=0)
    rows = ((i + 1).clamp(max=float(y1)) - i.clamp(min=float(y0))).clamp(min=0)
    return float((rows[:, None] * cols[None, :] * s.double()).sum())


# ------------------------------------------------------------------ SAT and box integral
def test_summed_area_table_values_and_shapes():
    s = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sat = summed_area_table(s)
    assert sat.shape == (4, 5)
    assert sat[0].abs().sum() == 0 and sat[:, 0].abs().sum() == 0
    assert sat[2, 3].item() == s[:2, :3].sum().item()
    assert sat[3, 4].item() == s.sum().item()
    batch = summed_area_table(torch.stack([s, 2 * s]))
    assert batch.shape == (2, 4, 5) and torch.equal(batch[1], 2 * sat)
    assert summed_area_table(torch.ones(2, 2, dtype=torch.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match="summed_area_table"):
        summed_area_table(torch.ones(5))


def test_box_integral_hand_values():
    s = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    sat = summed_area_table(s)
    boxes = torch.tensor([[1.0, 1.0, 3.0, 3.0],  # 5 + 6 + 9 + 10
                          [0.5, 0.0, 1.5, 1.0],  # half of S[0,0] = 0 and half of S[0,1] = 1
                          [-1.0, -2.0, 5.0, 9.0],  # clamped to the whole map: 0 + … + 15
                          [2.0, 3.0, 2.0, 4.0]], dtype=torch.float64)  # zero width
    got = box_integral(sat, boxes)
    assert got.tolist() == pytest.approx([30.0, 0.5, 120.0, 0.0])
    # one map per box
    per_box = summed_area_table(torch.stack([s, 2 * s, s, s]))
    assert box_integral(per_box, boxes).tolist() == pytest.approx([30.0, 1.0, 120.0, 0.0])


def test_box_integral_matches_brute_force_on_fractional_boxes():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(7, 9, generator=g, dtype=torch.float64)
    xy = torch.rand(20, 4, generator=g, dtype=torch.float64) * torch.tensor([11.0, 9.0, 11.0, 9.0]) - 1
    boxes = torch.stack([torch.minimum(xy[:, 0], xy[:, 2]), torch.minimum(xy[:, 1], xy[:, 3]),
                         torch.maximum(xy[:, 0], xy[:, 2]), torch.maximum(xy[:, 1], xy[:, 3])], 1)
    got = box_integral(summed_area_table(s), boxes)
    want = [_overlap_integral(s, b.tolist()) for b in boxes]
    assert got.tolist() == pytest.approx(want, abs=1e-10)


def test_box_integral_gradcheck():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 6, generator=g, dtype=torch.float64)
    # every coordinate strictly inside a cell (away from integers), so the integral is smooth there
    boxes = torch.tensor([[0.3, 1.2, 3.6, 4.7], [1.4, 0.6, 5.5, 2.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: box_integral(summed_area_table(s), b), (boxes,))
    sv = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: box_integral(summed_area_table(m), boxes.detach()), (sv,))
    # the derivative in x1 is the integral of S along the right edge (column 3, rows 1.2..4.7)
    b = boxes.detach()[:1].clone().requires_grad_(True)
    box_integral(summed_area_table(s), b).sum().backward()
    edge = 0.8 * s[1, 3] + s[2, 3] + s[3, 3] + 0.7 * s[4, 3]
    assert b.grad[0, 2].item() == pytest.approx(edge.item())


def test_box_integral_shape_errors():
    sat = summed_area_table(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        box_integral(sat, torch.zeros(3))
    with pytest.raises(ValueError, match="2 maps for 3 boxes"):
        box_integral(summed_area_table(torch.ones(2, 4, 4)), torch.zeros(3, 4))


def test_box_area_in_map_clips():
    boxes = torch.tensor([[1.0, 1.0, 3.0, 4.0], [-2.0, -2.0, 2.0, 2.0], [20.0, 0.0, 30.0, 5.0]])
    assert box_area_in_map(boxes, 10, 10).tolist() == [6.0, 4.0, 0.0]


# ------------------------------------------------------------------------- the CCGR loss
def test_context_boxes():
    got = context_boxes(torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 2.0, 4.0]]))
    assert got.tolist() == [[1.0, 1.0, 7.0, 7.0], [-0.5, -1.0, 2.5, 5.0]]
    assert context_boxes(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 2.0).tolist() == [[0.0, 0.0, 8.0, 8.0]]
    with pytest.raises(ValueError, match="scale 0.9 < 1"):
        context_boxes(torch.zeros(1, 4), 0.9)


def test_ccgr_loss_hand_values():
    sat = summed_area_table(_square_map())
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [3.0, 3.0, 5.0, 5.0]], dtype=torch.float64)
    # [2,2,6,6]: Φ(B) = 1; B̃ = [1,1,7,7] holds the same 16 ones over 36 px, the ring none → −1
    # [3,3,5,5]: B̃ = [2.5,2.5,5.5,5.5] lies in the ones: Φ(C) = Φ(B) = 1 → 0
    assert ccgr_loss(sat, boxes).tolist() == pytest.approx([-1.0, 0.0])
    # literal: Φ(C) = Φ(B̃) − Φ(B) = 16/36 − 1, L = Φ(C) − Φ(B)
    assert ccgr_loss(sat, boxes[:1], form="literal").item() == pytest.approx(16 / 36 - 1 - 1)
    # a box larger than the square: Φ(B) = 16/36; its ring [0,0,8.5,8.5]... clipped, holds none
    big = torch.tensor([[1.0, 1.0, 7.0, 7.0]], dtype=torch.float64)
    assert ccgr_loss(sat, big).item() == pytest.approx(-16 / 36)


def test_ccgr_loss_off_map_context_is_mean_over_visible_pixels():
    ones = summed_area_table(torch.ones(10, 10, dtype=torch.float64))
    # corner box: B̃ = [−1,−1,5,5] clips to [0,0,5,5]; ring 25 − 16 = 9 px, all ones → L = 1 − 1
    assert ccgr_loss(ones, torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)).item() == pytest.approx(0.0)
    # a box covering the map has no visible ring: Φ(C) := 0, L = −Φ(B)
    sat = summed_area_table(_square_map())
    whole = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    assert ccgr_loss(sat, whole).item() == pytest.approx(-0.16)
    # an empty box is finite
    assert torch.isfinite(ccgr_loss(sat, torch.tensor([[3.0, 3.0, 3.0, 5.0]], dtype=torch.float64))).all()


def test_ccgr_loss_errors():
    sat = summed_area_table(_square_map())
    box = torch.tensor([[2.0, 2.0, 6.0, 6.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="form 'mean' unknown"):
        ccgr_loss(sat, box, form="mean")
    with pytest.raises(ValueError, match="context_scale 1.0 must be > 1"):
        ccgr_loss(sat, box, context_scale=1.0)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        ccgr_loss(sat, box[0])


# ------------------------------------------------------------------------- the refinement
PX = {"step_size": 0.5, "step_unit": "pixel"}  # the refinement step these hand-built maps were written for


def test_refine_boxes_raises_iou_with_the_object():
    size, rect = 96, (30, 24, 70, 60)  # a 40 × 36 object
    smap = _blurred_rectangle(size, *rect)
    gt = torch.tensor([rect], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    n = 8
    wh = torch.tensor([rect[2] - rect[0], rect[3] - rect[1]], dtype=torch.float32)
    centre = torch.tensor([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    shrink = 0.6 + 0.3 * torch.rand(n, 2, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.15 * wh
    c = centre + shift
    boxes = torch.cat([c - shrink * wh / 2, c + shrink * wh / 2], 1)
    refined, info = refine_boxes(smap.expand(n, -1, -1), boxes, **PX)
    before = box_iou(boxes, gt)[:, 0]
    after = box_iou(refined, gt)[:, 0]
    # measured: mean IoU 0.52 (0.39–0.62) → 1.00 (every coordinate within 0.002 px of the rectangle)
    assert before.mean() < 0.65
    assert after.mean() > before.mean() + 0.3
    assert after.min() > 0.9
    assert (info["loss_after"] < info["loss_before"]).all()
    assert info["steps"].tolist() == [200] * n and not info["stopped_by_peak"].any()
    assert refined.dtype == torch.float32 and refined.shape == (n, 4)


def test_refine_boxes_keeps_boxes_valid_and_runs_under_no_grad():
    smap = _blurred_rectangle(32, 0, 0, 32, 3)  # a thin strip on the top edge pulls the box flat
    boxes = torch.tensor([[4.0, 0.5, 20.0, 12.0], [-3.0, -3.0, 40.0, 40.0]])
    with torch.no_grad():
        refined, _ = refine_boxes(smap.expand(2, -1, -1), boxes, steps=100, step_size=1.0, step_unit="pixel", min_size=2.0)
    assert (refined[:, :2] >= 0).all() and (refined[:, 2:] <= 32).all()
    assert ((refined[:, 2:] - refined[:, :2]) >= 2.0 - 1e-5).all()


def test_refine_boxes_stops_before_a_second_peak():
    smap = _blurred_rectangle(64, 10, 20, 50, 44)
    box = torch.tensor([[12.0, 24.0, 26.0, 40.0]])  # in the left part of the object: it grows right
    free, _ = refine_boxes(smap[None], box, **PX)
    peak = torch.tensor([[32, 40]])  # (y, x): pixel centre (40.5, 32.5), on the way
    assert free[0, 2] > 40.5  # unconstrained, the box would take the peak in
    refined, info = refine_boxes(smap[None], box, **PX, peaks=[peak])
    assert bool(info["stopped_by_peak"][0]) and 0 < int(info["steps"][0]) < 200
    assert refined[0, 2] <= 40.5 and refined[0, 2] > 30  # it grew, then stopped short of the peak
    # a float peak is a point in the box frame; a peak the input box holds already is ignored
    _, info = refine_boxes(smap[None], box, **PX, peaks=[torch.tensor([[32.5, 40.5]])])
    assert bool(info["stopped_by_peak"][0])
    _, info = refine_boxes(smap[None], box, **PX, peaks=[torch.tensor([[30, 15]])])
    assert not bool(info["stopped_by_peak"][0]) and int(info["steps"][0]) == 200


def test_refine_boxes_zero_steps_and_errors():
    smap = _blurred_rectangle(32, 8, 8, 24, 24)[None]
    box = torch.tensor([[10.0, 10.0, 20.5, 20.5]])
    out, info = refine_boxes(smap, box, **PX, steps=0)
    assert torch.equal(out, box) and info["steps"].tolist() == [0]
    assert info["loss_before"].tolist() == info["loss_after"].tolist()
    empty, _ = refine_boxes(torch.zeros(0, 8, 8), torch.zeros(0, 4), **PX)
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError, match="score_maps must be"):
        refine_boxes(smap[0], box, **PX)
    with pytest.raises(ValueError, match="x1 > x0"):
        refine_boxes(smap, torch.tensor([[5.0, 5.0, 5.0, 9.0]]), **PX)
    with pytest.raises(ValueError, match="peaks has 2 entries for 1 boxes"):
        refine_boxes(smap, box, **PX, peaks=[None, None])
    with pytest.raises(ValueError, match="step_size"):
        refine_boxes(smap, box, step_size=0.0, step_unit="pixel")
    with pytest.raises(ValueError, match="step_unit"):
        refine_boxes(smap, box, step_size=0.02, step_unit="side")
    with pytest.raises(TypeError, match="step_size"):  # no default step: the caller names size and unit
        refine_boxes(smap, box)


# ------------------------------------------------------------------------------ PRM peaks
def test_find_peaks_hand_map():
    cam = torch.zeros(7, 8)
    cam[1, 1] = 5.0  # a single peak
    cam[4, 5] = cam[4, 6] = 3.0  # a plateau of two equal maxima: one peak
    cam[5, 1], cam[5, 2] = 1.0, 2.0  # a slope: only its top (5, 2); (5, 1) is a shoulder
    cam[0, 6] = 0.5
    cam[0, 7] = 0.5  # (0, 6)–(0, 7) plateau next to nothing higher: a peak at 0.5
    peaks = find_peaks(cam)
    assert peaks.dtype == torch.int64
    # by value: 5 @ (1, 1), 3 @ the plateau (centroid (4, 5.5), tie → row-major first (4, 5)),
    # 2 @ (5, 2), 0.5 @ (0, 6)
    assert peaks.tolist() == [[1, 1], [4, 5], [5, 2], [0, 6]]
    # a plateau leaking into an equal pixel that is not a maximum is not a peak
    ridge = torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert find_peaks(ridge).tolist() == [[0, 2]]
    # a plateau of three gives its middle pixel
    row = torch.zeros(3, 7)
    row[1, 2:5] = 4.0
    assert find_peaks(row).tolist() == [[1, 3]]
    # [0, 4, 4, 4, 0]: the median is 4, the maximum: no peaks
    assert find_peaks(torch.tensor([[0.0, 4.0, 4.0, 4.0, 0.0]])).shape == (0, 2)


def test_find_peaks_median_and_constant():
    assert find_peaks(torch.full((5, 5), 0.3)).shape == (0, 2)
    cam = torch.arange(25, dtype=torch.float32).reshape(5, 5)  # one maximum at the corner
    assert find_peaks(cam).tolist() == [[4, 4]]
    cam = torch.zeros(5, 5)
    cam[2, 2] = -1.0  # the only extrema are below: the zeros plateau touches no higher pixel
    # max 0 equals the median 0: no peaks
    assert find_peaks(cam).shape == (0, 2)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        find_peaks(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="NaN"):
        find_peaks(torch.tensor([[0.0, float("nan")]]))


# ------------------------------------------------------------------ Eq. 4, bags, WSDDN
def test_proposal_rank_scores():
    assert proposal_rank_scores(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert proposal_rank_scores(0).shape == (0,)
    with pytest.raises(ValueError):
        proposal_rank_scores(-1)


def test_rank_proposals_hand_value():
    background = torch.zeros(10, 10)
    background[:, :5] = 1.0  # left half is background
    boxes = torch.tensor([[3.0, 0.0, 7.0, 4.0],  # columns 3, 4 background, 5, 6 not: half
                          [5.0, 5.0, 9.0, 9.0],  # no background
                          [20.0, 20.0, 30.0, 30.0]])  # off the map: counted as all background
    got = rank_proposals(torch.tensor([0.9, 0.9, 0.9]), boxes, background)
    assert got.tolist() == pytest.approx([0.85, 0.9, 0.8])
    with pytest.raises(ValueError, match="2 scores for 3 boxes|\\(2,\\) scores for 3 boxes"):
        rank_proposals(torch.tensor([0.9, 0.9]), boxes, background)


def test_peak_bags_same_class_rule_and_ranking():
    # peaks (y, x): 0 and 1 of class 0, 2 of class 1
    peaks = torch.tensor([[2, 2], [2, 7], [3, 3]])
    classes = torch.tensor([0, 0, 1])
    proposals = torch.tensor([[0.0, 0.0, 5.0, 5.0],  # 0: peak 0 and the class-1 peak → bag of peak 0
                              [0.0, 0.0, 10.0, 5.0],  # 1: both class-0 peaks → in no class-0 bag
                              [6.0, 1.0, 9.0, 4.0],  # 2: peak 1
                              [1.0, 1.0, 3.0, 3.0],  # 3: peak 0 only
                              [3.0, 3.0, 4.0, 4.0]])  # 4: the class-1 peak only
    ranking = torch.tensor([0.5, 0.9, 0.7, 0.8, 0.1])
    bags = peak_bags(peaks, classes, proposals, ranking, top_k=10)
    assert [b.tolist() for b in bags] == [[3, 0], [2], [1, 0, 4]]
    assert [b.tolist() for b in peak_bags(peaks, classes, proposals, ranking, top_k=1)] == [[3], [2], [1]]
    # float peaks are points; a peak no proposal holds alone gets an empty bag
    bags = peak_bags(torch.tensor([[2.5, 2.5], [2.5, 2.6]]), torch.tensor([0, 0]), proposals, ranking)
    assert [b.tolist() for b in bags] == [[], []]
    assert peak_bags(torch.zeros(0, 2), torch.zeros(0), proposals, ranking) == []


def test_iou_bags():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 12.0, 12.0]])
    proposals = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 8.0, 8.0],
                              [10.0, 10.0, 13.0, 13.0]])
    bags = iou_bags(boxes, proposals, top_k=2)
    # IoUs of box 0: 1, 0.5, 0.25, 0; box 1: 0, 0, 0, 4/9
    assert [b.tolist() for b in bags] == [[0, 1], [3, 0]]
    assert [len(b) for b in iou_bags(boxes, proposals, top_k=10)] == [4, 4]
    assert best_iou_with_gt(boxes, proposals[:2]).tolist() == pytest.approx([1.0, 0.0])


def test_wsddn_bag_scores_hand_value():
    ln3 = math.log(3.0)
    x_cls = torch.tensor([[0.0, ln3], [0.0, 0.0]])
    x_det = torch.tensor([[0.0, ln3], [ln3, 0.0]])
    # σ_cls, softmax over classes (columns): [[1/2, 3/4], [1/2, 1/4]]
    # σ_det, softmax over proposals (rows):  [[1/4, 3/4], [3/4, 1/4]]
    # x^B = [[1/8, 9/16], [3/8, 1/16]] → φ = (1/8 + 9/16, 3/8 + 1/16) = (11/16, 7/16)
    phi = wsddn_bag_scores(x_cls, x_det)
    assert phi.tolist() == pytest.approx([0.6875, 0.4375])
    batched = wsddn_bag_scores(torch.stack([x_cls, x_cls]), torch.stack([x_det, x_det.flip(1)]))
    assert batched.shape == (2, 2) and batched[0].tolist() == pytest.approx([0.6875, 0.4375])
    with pytest.raises(ValueError, match="same|both"):
        wsddn_bag_scores(x_cls, x_det[:, :1])
    with pytest.raises(ValueError, match="≥ 1 proposal"):
        wsddn_bag_scores(torch.zeros(2, 0), torch.zeros(2, 0))


def test_wsddn_loss_hand_value():
    phi = torch.tensor([0.6875, 0.4375])
    # −log 0.6875 − log(1 − 0.4375)
    assert wsddn_loss(phi, torch.tensor([1.0, 0.0])).item() == pytest.approx(-math.log(0.6875) - math.log(0.5625))
    loss = wsddn_loss(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]]), eps=1e-6)
    assert loss.shape == (1,) and loss.item() == pytest.approx(-2 * math.log(1e-6), rel=1e-4)
    with pytest.raises(ValueError, match="same"):
        wsddn_loss(phi, torch.tensor([1.0]))


# ------------------------------------------------------------------ proposals, pseudo masks
def test_selective_search_deterministic_and_finds_the_rectangles():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (96, 96, 3), dtype=np.uint8)
    rects = [(10, 12, 46, 44), (52, 50, 88, 84)]  # x0, y0, x1, y1
    img[12:44, 10:46] = (220, 40, 30)
    img[50:84, 52:88] = (30, 200, 60)
    a = selective_search(img)
    b = selective_search(img)
    assert a.dtype == torch.float32 and a.ndim == 2 and a.shape[1] == 4 and len(a) > 0
    assert torch.equal(a, b)
    assert (a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= 96).all() and (a[:, 3] <= 96).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    assert len(torch.unique(a, dim=0)) == len(a)
    assert (box_iou(torch.tensor(rects, dtype=torch.float32), a).amax(1) > 0.7).all()
    assert len(selective_search(img, max_proposals=3)) == 3
    big = selective_search(img, min_size=20)
    assert len(big) and ((big[:, 2:] - big[:, :2]) >= 20).all()
    with pytest.raises(ValueError, match="uint8"):
        selective_search(img.astype(np.float32))
    with pytest.raises(ValueError, match="mode"):
        selective_search(img, mode="exhaustive")


def test_pseudo_instance_mask():
    label = np.zeros((6, 8), dtype=np.int64)
    label[1:5, 2:7] = 3
    label[2, 3] = 1
    # box [2.4, 1, 5.6, 4]: pixel centres 2.5..5.5 → columns 2..5, rows 1..3
    m = pseudo_instance_mask(label, 3, torch.tensor([2.4, 1.0, 5.6, 4.0]))
    assert isinstance(m, np.ndarray) and m.dtype == bool
    want = np.zeros((6, 8), dtype=bool)
    want[1:4, 2:6] = True
    want[2, 3] = False
    assert np.array_equal(m, want)
    mt = pseudo_instance_mask(torch.as_tensor(label), 3, [2.4, 1.0, 5.6, 4.0])
    assert torch.is_tensor(mt) and mt.dtype == torch.bool and np.array_equal(mt.numpy(), want)
    assert not pseudo_instance_mask(label, 3, [-5.0, -5.0, -1.0, -1.0]).any()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pseudo_instance_mask(label[None], 3, [0, 0, 1, 1])


def test_contrast_objectness_hand_computed():
    """A 10×10 map with a 4×4 object of 1s at x, y 2–5. The object's own box: 1 inside, 0 in its
    1.5× ring → (1 + 1 − 0) / 2 = 1. Its left half [2, 2, 4, 6]: 1 inside; ring [1.5, 1, 4.5, 7]
    minus the box holds 2.5 × 4 − 8 = 2 object pixels over 18 − 8 = 10 → (2 − 0.2) / 2 = 0.9. The
    whole map: 16/100 inside, no ring inside the map (mean 0) → 0.58. A background box [6, 6, 10,
    10]: ring (clipped to [5, 5, 10, 10]) of 9 px holds 1 object pixel → (1 − 1/9) / 2 = 4/9. A box
    off the map scores 0."""
    fg = torch.zeros(10, 10)
    fg[2:6, 2:6] = 1.0
    boxes = torch.tensor([[2, 2, 6, 6], [2, 2, 4, 6], [0, 0, 10, 10], [6, 6, 10, 10], [20, 20, 22, 22]], dtype=torch.float32)
    got = contrast_objectness(fg, boxes)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([1.0, 0.9, 0.58, 4 / 9, 0.0], abs=1e-6)
    # the object's box outranks its half, the whole image and the background
    assert int(got.argmax()) == 0
    with pytest.raises(ValueError, match="foreground"):
        contrast_objectness(fg[None], boxes)
    with pytest.raises(ValueError, match="scale"):
        contrast_objectness(fg, boxes, 0.5)
