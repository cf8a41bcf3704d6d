"""WSOL metrics: hand-computed cases and property tests of the fast path against the slow
OpenCV reference (``tests/wsol_reference.py``), count by count at every threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weakbench.core.errors import DataError
from weakbench.core.metrics import (
    BoxEvaluator,
    PxAPEvaluator,
    WsolEvaluator,
    box_scores,
    iou_inclusive,
)
from weakbench.core.metrics.wsol import threshold_levels

cv2 = pytest.importorskip("cv2")
from wsol_reference import (  # noqa: E402
    ReferenceBoxEvaluator,
    ReferenceMaskEvaluator,
    calculate_multiple_iou,
    compute_bboxes_from_scoremaps,
)

# ------------------------------------------------------------------ hand-computed cases


def test_iou_hand_computed():
    # intersection columns 3..4, rows 2..5 -> 2 * 4 = 8; areas 25 and 10 -> 8 / 27
    iou = iou_inclusive(np.array([[1, 2, 5, 6]]), np.array([[3, 1, 4, 5]]))
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(8 / 27, abs=0, rel=1e-15)
    assert iou_inclusive(np.array([[0, 0, 0, 0]]), np.array([[2, 2, 3, 3]]))[0, 0] == 0.0


def test_iou_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 12, (20, 4))
    b = rng.integers(-3, 12, (7, 4))
    np.testing.assert_array_equal(iou_inclusive(a, b), calculate_multiple_iou(a, b))


def test_single_square_box_and_border_clip():
    m = np.zeros((10, 12), np.float32)
    m[2:5, 3:7] = 1.0  # rows 2..4, cols 3..6
    m[7:10, 9:12] = 0.6  # touches the bottom-right border
    sc = box_scores(m[None], [np.array([[3, 2, 7, 5]])])
    # at level 0 both blobs are foreground; largest contour is the 3x4 square
    # (contourArea 2*3 = 6 > 2*2 = 4): box [3, 2, 6+1, 4+1] equals the GT exactly
    assert sc["largest"][0, 0] == 1.0
    # the border blob's box [9, 7, min(12, 11), min(10, 9)] is clipped by W-1 / H-1
    ref, _ = compute_bboxes_from_scoremaps(m, [0.0], multi_contour_eval=True)
    assert [9, 7, 11, 9] in ref[0].tolist()


def test_hole_contour_box_is_grown_hole():
    m = np.zeros((9, 9), np.float32)
    m[1:8, 1:8] = 1.0
    m[3:6, 4:5] = 0.0  # hole rows 3..5, column 4
    boxes, n = compute_bboxes_from_scoremaps(m, [0.5], multi_contour_eval=True)
    assert n == [2]
    assert [3, 2, 6, 7] in boxes[0].tolist()  # hole bbox grown by one: x 3..5 (+1), y 2..6 (+1)
    gt = np.array([[3, 2, 6, 7]])
    sc = box_scores(m[None], [gt], largest_contour=False)
    assert sc["multi"][0, 127] == 1.0


def test_all_zero_map_gives_zero_box():
    m = np.zeros((6, 7), np.float32)
    for gt, expect in (([[0, 0, 0, 0]], 1.0), ([[0, 0, 1, 1]], 0.25)):
        sc = box_scores(m[None], [np.array(gt)])
        assert sc["max_byte"][0] == 0
        assert sc["multi"][0, 0] == expect and sc["largest"][0, 0] == expect


def test_pxap_constant_and_perfect_maps():
    gt = np.zeros((2, 8, 8), bool)
    gt[0, 2:5, 2:6] = True
    gt[1, 0:3, 0:3] = True
    p, n_ = gt.sum(), (~gt).sum()
    ev = PxAPEvaluator(0.01)
    ev.accumulate(np.full(gt.shape, 0.5, np.float32), gt)
    assert ev.compute()["pxap"] == pytest.approx(100 * p / (p + n_), rel=1e-12)
    ev = PxAPEvaluator(0.01)
    ev.accumulate(gt.astype(np.float32), gt)
    assert ev.compute()["pxap"] == pytest.approx(100.0, rel=1e-12)


def test_pxap_matches_reference_with_ignore():
    rng = np.random.default_rng(3)
    fast, ref = PxAPEvaluator(0.001), ReferenceMaskEvaluator(0.001)
    for _ in range(4):
        m = rng.random((16, 20)).astype(np.float32)
        gt = rng.random((16, 20)) > 0.7
        ig = rng.random((16, 20)) > 0.8
        fast.accumulate(m[None], gt[None], ig[None])
        ref.accumulate(m, gt, ig)
    assert fast.compute()["pxap"] == ref.compute()


def test_bad_input_raises_clear_errors():
    ev = BoxEvaluator(0.01)
    with pytest.raises(DataError, match="\\[0, 1\\]"):
        ev.accumulate(np.full((1, 4, 4), 2.0, np.float32), [np.array([[0, 0, 1, 1]])])
    with pytest.raises(DataError, match="empty"):
        ev.accumulate(np.zeros((1, 4, 4), np.float32), [np.zeros((0, 4))])
    with pytest.raises(DataError, match="cam_curve_interval"):
        BoxEvaluator(0.0)
    with pytest.raises(DataError):
        ev.compute()


# ------------------------------------------------------------------ property tests


def _smooth(rng, h, w, k):
    x = rng.random((k, k)).astype(np.float32)
    m = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip((m - m.min()) / max(float(m.max() - m.min()), 1e-6), 0, 1).astype(np.float32)


def _make_map(kind, seed, h, w):
    rng = np.random.default_rng(seed)
    if kind == "smooth":
        return _smooth(rng, h, w, int(rng.integers(2, 7)))
    if kind == "levels":  # few byte levels: ties, plateaus, holes, several blobs
        return (rng.integers(0, int(rng.integers(2, 6)), (h, w)) / 5).astype(np.float32)
    if kind == "binary":
        return ((rng.random((h, w)) > 0.5) * rng.random()).astype(np.float32)
    if kind == "rings":  # concentric rings: holes inside holes
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot(yy - h / 2, xx - w / 2)
        return ((np.cos(r * rng.uniform(0.8, 2.0)) + 1) / 2).astype(np.float32)
    if kind == "quantised":
        return (np.round(_smooth(rng, h, w, int(rng.integers(2, 7))) * 4) / 4).astype(np.float32)
    if kind == "constant":
        return np.full((h, w), rng.choice([0.0, 0.3, 1.0]), np.float32)
    return np.zeros((h, w), np.float32)


def _gt(seed, h, w):
    rng = np.random.default_rng(seed + 1)
    k = int(rng.integers(1, 4))
    xs = np.sort(rng.integers(0, w, (k, 2)), 1)
    ys = np.sort(rng.integers(0, h, (k, 2)), 1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)


KINDS = ["smooth", "levels", "binary", "rings", "quantised", "constant", "zeros"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10**6), h=st.integers(1, 18),
       w=st.integers(1, 18))
def test_best_iou_per_threshold_equals_opencv(kind, seed, h, w):
    """Per threshold, the best IoU of the fast path equals the reference's, for both rules."""
    m = _make_map(kind, seed, h, w)
    gt = _gt(seed, h, w)
    thr = np.arange(0, 1, 0.01)
    sc = box_scores(m[None], [gt])
    lev = threshold_levels(sc["max_byte"], thr)[0]
    for multi, key in ((True, "multi"), (False, "largest")):
        boxes, _ = compute_bboxes_from_scoremaps(m, thr, multi_contour_eval=multi)
        ref = np.array([calculate_multiple_iou(b, gt).max() for b in boxes])
        np.testing.assert_array_equal(sc[key][0][lev], ref, err_msg=f"{key} {kind}")
    # the default engine on the CPU is the compiled sweep: the torch component trees agree
    st_ = box_scores(torch.from_numpy(m[None]), [gt], engine="torch")
    for key in ("multi", "largest"):
        np.testing.assert_array_equal(sc[key], st_[key], err_msg=f"{key} {kind}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), h=st.integers(4, 24),
       w=st.integers(4, 24))
def test_counts_per_threshold_equal_reference(seed, n, h, w):
    """The evaluator's per-threshold counts equal BoxEvaluator's ``num_correct`` (batches)."""
    maps = np.stack([_make_map(KINDS[(seed + i) % 5], seed + i, h, w) for i in range(n)])
    gts = [_gt(seed + i, h, w) for i in range(n)]
    for multi, ious in ((True, (30, 50, 70)), (False, (50,))):
        ref = ReferenceBoxEvaluator(0.01, ious, multi)
        for m, g in zip(maps, gts):
            ref.accumulate(m, g)
        fast = BoxEvaluator(0.01, ious, multi_contour=multi, chunk=4)
        fast.accumulate(maps[: n // 2], gts[: n // 2])
        fast.accumulate(torch.from_numpy(maps[n // 2:]), gts[n // 2:])
        for d in ious:
            np.testing.assert_array_equal(fast.counts[d], ref.num_correct[d].astype(np.int64))
        got = fast.compute()
        for d, v in zip(ious, ref.compute()):
            assert got[f"max_box_acc_iou{d}"] == v


def test_wsol_evaluator_on_cam_like_maps_at_1000_thresholds():
    rng = np.random.default_rng(11)
    maps = np.stack([_smooth(rng, 40, 48, 7) for _ in range(6)])
    gts = [_gt(i, 40, 48) for i in range(6)]
    top1 = np.array([1, 0, 1, 1, 0, 1], bool)
    ev = WsolEvaluator(0.001, chunk=4)
    ev.accumulate(maps, gts, class_correct_top1=top1, class_correct_top5=np.ones(6, bool))
    out = ev.compute()
    ref1 = ReferenceBoxEvaluator(0.001, (50,), multi_contour_eval=False)
    ref2 = ReferenceBoxEvaluator(0.001, (30, 50, 70), multi_contour_eval=True)
    for m, g in zip(maps, gts):
        ref1.accumulate(m, g)
        ref2.accumulate(m, g)
    assert out["max_box_acc"] == ref1.compute()[0]
    v2 = ref2.compute()
    assert out["max_box_acc_v2"] == pytest.approx(np.mean(v2), abs=1e-12)
    assert [out[f"max_box_acc_v2_iou{d}"] for d in (30, 50, 70)] == v2
    i50 = int(np.argmax(ref1.num_correct[50]))
    assert out["best_threshold"] == pytest.approx(i50 * 0.001, abs=1e-12)
    # top-5 always correct: top5_loc is MaxBoxAcc; top-1 loc can only be lower
    assert out["top5_loc"] == out["max_box_acc"]
    assert out["top1_loc"] <= out["top5_loc"]


def test_torch_engine_equals_numba_engine():
    maps = np.stack([_make_map(KINDS[i % 6], i, 14, 17) for i in range(8)])
    gts = [_gt(i, 14, 17) for i in range(8)]
    a = box_scores(maps, gts, engine="numba")
    b = box_scores(torch.from_numpy(maps), gts, engine="torch")
    for k in ("multi", "largest", "max_byte"):
        np.testing.assert_array_equal(a[k], b[k])


def test_numba_engine_equals_torch_engine_on_larger_maps():
    """Every table entry of the compiled sweep equals the torch component trees' (on the CPU),
    on maps large enough for deep hole nesting and long flood paths (rings, plateaus, noise)."""
    kinds = ["rings", "levels", "binary", "smooth", "quantised"]
    maps = np.stack([_make_map(kinds[i % 5], 100 + i, 41, 47) for i in range(5)])
    gts = [_gt(100 + i, 41, 47) for i in range(5)]
    a = box_scores(maps, gts, engine="numba")
    b = box_scores(torch.from_numpy(maps), gts, engine="torch")
    for k in ("multi", "largest", "max_byte"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # BoxEvaluator evaluates only the levels its thresholds map to: the same counts
    for multi, ious in ((True, (30, 50, 70)), (False, (50,))):
        ref = ReferenceBoxEvaluator(0.02, ious, multi)
        for m, g in zip(maps, gts):
            ref.accumulate(m, g)
        fast = BoxEvaluator(0.02, ious, multi_contour=multi)
        fast.accumulate(maps, gts)
        for d in ious:
            np.testing.assert_array_equal(fast.counts[d], ref.num_correct[d].astype(np.int64))


@pytest.mark.parametrize("engine", ["cv2", "numpy"])  # the numpy component trees were removed
def test_unknown_engine_raises(engine):
    with pytest.raises(DataError, match="engine"):
        box_scores(np.zeros((1, 4, 4), np.float32), [np.array([[0, 0, 1, 1]])], engine=engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_equals_cpu_path():
    rng = np.random.default_rng(5)
    maps = np.stack([_make_map(KINDS[i % 5], i, 30, 34) for i in range(12)])
    gts = [_gt(i, 30, 34) for i in range(12)]
    a = box_scores(maps, gts)
    b = box_scores(torch.from_numpy(maps), gts, device="cuda")
    for k in ("multi", "largest", "max_byte"):
        np.testing.assert_array_equal(a[k], b[k])
    del rng
