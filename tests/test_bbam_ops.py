"""BBAM: stride, loss terms, perturbation, O⁺ selection and rank cut on hand-computed values;
the detector (build, one training step, eval), its head access, batched ≡ sequential mask
optimisation, and pseudo masks that stay inside their boxes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from weakbench.methods.bbam_ops import (
    BoxJob, attribution_map, box_filled_mask, box_pixels, box_rank_cut, jitter_proposals, make_box_jobs,
    mask_l1, mask_shape, mask_stride, optimise_box_masks, perturb, perturbation_loss,
    pseudo_mask_from_attribution, select_positive_proposals, total_variation, truncated_iou, upsample_mask,
)
from weakbench.methods.detection import (
    DetectionDataset, build_detector, collate_detection, detector_forward_heads, detector_inputs,
)
from weakbench.core.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine two OpenMP threads competing with other
    work run these small convolutions many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def source(synthetic_dir):
    from weakbench.core.data import open_dataset

    return open_dataset(synthetic_dir)


def _tiny_detector(num_classes: int, kind: str = "faster_rcnn", backbone: str = "test_resnet"):
    torch.manual_seed(0)
    return build_detector(kind, backbone, num_classes, min_size=SIZE, max_size=SIZE, image_mean=MEAN, image_std=STD,
                          fpn_channels=32, box_representation_size=128)


@pytest.fixture(scope="module")
def tiny(source):
    """An untrained tiny Faster R-CNN in eval mode and two synthetic images at 128 px."""
    det = _tiny_detector(source.num_classes).eval()
    ds = DetectionDataset(source, [0, 1], train=False)
    images, targets = collate_detection([ds[0], ds[1]])
    x, sizes, boxes = detector_inputs(det, images, [t["boxes"] for t in targets])
    return det, x, sizes, boxes, targets


# ------------------------------------------------------------------------------ the stride
def test_mask_stride_hand_values():
    assert mask_stride(0.0) == 16
    assert mask_stride(0.25) == 40
    assert mask_stride(1.0) == 64
    assert mask_stride(-1.0) == 16 and mask_stride(4.0) == 64  # a clamped to [0, 1]
    assert mask_stride(0.25, scale=0.5) == 20
    assert mask_stride(0.0, scale=128 / 800) == 3  # 2.56 rounds to 3
    assert mask_stride(0.0, scale=0.01) == 1  # never below one pixel
    assert mask_shape((128, 96), 40) == (3, 2)
    assert mask_shape((10, 10), 64) == (1, 1)


# ------------------------------------------------------------------------------ loss terms
def test_total_variation_hand_value():
    m = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # |Δ|³: one vertical (1), one horizontal (1), the anti-diagonal counted twice (2), main 0
    assert total_variation(m).item() == pytest.approx(4.0)
    assert total_variation(m, weight=1e-4).item() == pytest.approx(4e-4)
    assert total_variation(m, diagonal=False).item() == pytest.approx(2.0)
    assert total_variation(2 * m).item() == pytest.approx(32.0)  # β = 3
    assert total_variation(torch.full((3, 4), 0.3)).item() == 0.0


def test_mask_l1_on_known_grid():
    m = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 5  # sum 3
    assert mask_l1(m).item() == pytest.approx(0.007 * 3)
    assert mask_l1(m, weight=1.0).item() == pytest.approx(3.0)


def test_perturbation_loss_hand_made_head_output():
    p0 = torch.tensor([0.9, 0.5])
    p = torch.tensor([0.7, 0.5])
    t0 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    # code: k0 = ½·mean(0,1,2,3) + ½·0.2 = 0.85, k1 = ½·1 + 0 = 0.5 → mean 0.675
    assert perturbation_loss(p0, p, t0, t).item() == pytest.approx(0.675)
    # paper (L1 norms of Eq. 3): k0 = 6 + 0.2, k1 = 4 → 5.1
    assert perturbation_loss(p0, p, t0, t, variant="paper").item() == pytest.approx(5.1)
    assert perturbation_loss(p0, p, t0, t, use_box=False).item() == pytest.approx(0.05)
    assert perturbation_loss(p0, p, t0, t, use_cls=False).item() == pytest.approx(0.625)
    empty = torch.zeros(0)
    assert perturbation_loss(empty, empty, torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0
    with pytest.raises(ValueError):
        perturbation_loss(p0, p[:1], t0, t)


# ------------------------------------------------------------------------------ perturbation
def test_mean_fill_equals_multiplying_the_normalised_image():
    g = torch.Generator().manual_seed(0)
    img = torch.rand((3, 20, 24), generator=g)
    mask = torch.rand((4, 5), generator=g)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    up = upsample_mask(mask, (20, 24))
    pixel = img * up + mean * (1 - up)  # Φ(I, M) = I∘M̂ + μ∘(1 − M̂) in pixel space
    torch.testing.assert_close(perturb((img - mean) / std, mask), (pixel - mean) / std, atol=1e-6, rtol=1e-5)
    # align_corners=True: the corner cells sit on the corner pixels
    assert up[0, 0] == mask[0, 0] and up[-1, -1] == mask[-1, -1]
    # with a valid region, the padding is left as it was (0 = the mean after normalisation)
    padded = torch.nn.functional.pad((img - mean) / std, (0, 8, 0, 12))
    out = perturb(padded, mask, out_size=(20, 24))
    torch.testing.assert_close(out[:, :20, :24], perturb((img - mean) / std, mask))
    assert out[:, 20:].abs().sum() == 0 and out[:, :, 24:].abs().sum() == 0


# ------------------------------------------------------------------------------ proposals, O⁺
def test_jitter_proposals_bounds_and_clipping():
    box = torch.tensor([10.0, 20.0, 50.0, 40.0])  # w 40, h 20
    p = jitter_proposals(box, 500, image_size=(45, 55), generator=torch.Generator().manual_seed(0))
    assert p.shape == (500, 4) and p.dtype == torch.float32
    d = (p - box).abs()
    assert (d[:, [0, 2]] <= 0.3 * 40 + 1e-4).all() and (d[:, [1, 3]] <= 0.3 * 20 + 1e-4).all()
    assert (p[:, 2] <= 55).all() and (p[:, 3] <= 45).all() and (p[:, :2] >= 0).all()
    assert (p[:, 2] > p[:, 0]).all() and (p[:, 3] > p[:, 1]).all()
    q = jitter_proposals(box, 500, image_size=(45, 55), generator=torch.Generator().manual_seed(0))
    assert torch.equal(p, q)
    assert jitter_proposals(box, 200, ratio=0.9, generator=torch.Generator().manual_seed(1)).shape[0] < 200


def test_truncated_iou_as_official_code():
    gt = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.9, 0.9, 10.9, 10.9], [20.0, 20.0, 30.0, 30.0]])
    torch.testing.assert_close(truncated_iou(gt, boxes), torch.tensor([1.0, 50 / 150, 1.0, 0.0], dtype=torch.float64))


def _head_output(decoded_iou_offsets, pred_classes, num_classes=3):
    """Proposals equal to a GT box shifted right by ``offsets`` px, zero regression (decoded =
    proposal), and probabilities peaking at ``pred_classes`` (detector labels)."""
    gt = torch.tensor([0.0, 0.0, 100.0, 100.0])
    off = torch.as_tensor(decoded_iou_offsets, dtype=torch.float32)
    props = gt.repeat(len(off), 1)
    props[:, 0] += off
    props[:, 2] += off
    probs = torch.full((len(off), num_classes + 1), 0.1)
    probs[torch.arange(len(off)), torch.as_tensor(pred_classes)] = 0.7
    reg = torch.zeros(len(off), 4 * (num_classes + 1))
    reg[:, 4 * 2:4 * 3] = torch.arange(4, dtype=torch.float32)  # class 1 (label 2) deltas, unused by decoding below
    return gt, props, probs, reg


class _IdentityCoder(BoxCoder):
    """Decodes every delta to its proposal, so the IoUs are set by the proposals alone."""

    def __init__(self):
        super().__init__((10.0, 10.0, 5.0, 5.0))

    def decode(self, rel_codes, boxes):
        b = torch.cat(list(boxes))
        return b[:, None, :].expand(-1, rel_codes.shape[1] // 4, -1).clone()


def test_select_positive_proposals_threshold_cascade_and_cap():
    coder = _IdentityCoder()
    # 150 perfect proposals of label 2 (class 1): the first θ (0.9) has > 100 → first 100 kept
    gt, props, probs, reg = _head_output([0] * 150, [2] * 150)
    pos = select_positive_proposals(props, probs, reg, gt, 1, box_coder=coder)
    assert len(pos) == 100 and pos.iou_threshold == 0.9
    assert torch.equal(pos.indices, torch.arange(100))
    torch.testing.assert_close(pos.p0, torch.full((100,), 0.7))
    torch.testing.assert_close(pos.t0, torch.arange(4, dtype=torch.float32).repeat(100, 1))
    # shift 5 → IoU 95/105 = 0.905, shift 10 → 90/110 = 0.818; one wrong class, one background
    offsets = [5] * 50 + [10] * 30 + [0, 0]
    gt, props, probs, reg = _head_output(offsets, [2] * 80 + [1, 0])
    pos = select_positive_proposals(props, probs, reg, gt, 1, box_coder=coder)
    assert len(pos) == 80 and pos.iou_threshold == 0.8  # ≤ 100 at every θ: all positives of the last
    assert not pos.empty
    # nothing of the GT class: reported as empty, not an error
    gt, props, probs, reg = _head_output([0] * 10, [0] * 10)
    pos = select_positive_proposals(props, probs, reg, gt, 1, box_coder=coder)
    assert pos.empty and pos.iou_threshold is None and pos.proposals.shape == (0, 4) and pos.t0.shape == (0, 4)
    with pytest.raises(ValueError):
        select_positive_proposals(props, probs, reg, gt, 3, box_coder=coder)  # class 3 of 3 does not exist


# ------------------------------------------------------------------------------ pseudo masks
def test_rank_cut_saturates_the_top_fraction_of_the_box():
    attr = np.zeros((20, 20))
    attr[5:15, 5:15] = np.arange(100).reshape(10, 10)
    attr /= attr.max()
    box = (5, 5, 15, 15)
    cut = box_rank_cut(attr, box, 0.85)
    assert (cut == 1.0).sum() == 15
    assert (cut[attr * 99 >= 84.5] == 1).all()  # values 85..99
    assert (box_rank_cut(attr, box, 0.2) == 1.0).sum() == 80
    assert cut[:5].sum() == 0 and cut[:, 15:].sum() == 0  # zero outside the box


def test_box_pixels_and_filled_mask():
    assert box_pixels((2.0, 3.0, 5.0, 7.0), 10, 10) == (2, 3, 5, 7)
    assert box_pixels((2.4, 3.6, 4.1, 6.5), 10, 10) == (2, 3, 5, 7)  # rounded outward
    assert box_pixels((-3.0, 8.0, 30.0, 8.0), 10, 10) == (0, 8, 10, 9)  # clipped, at least 1 px
    m = box_filled_mask((2.0, 3.0, 5.0, 7.0), 10, 10)
    assert m.dtype == bool and m.sum() == 12 and m[3:7, 2:5].all()


@pytest.mark.parametrize("use_crf", [True, False])
def test_pseudo_mask_lies_inside_its_box(source, use_crf):
    if use_crf:
        pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed")
    a = source.annotations(0)
    img = np.asarray(source.load_image(0))
    H, W = img.shape[:2]
    for k in range(a.num_instances):
        gt = a.instance_masks[k]
        # an attribution that leaks outside the box: the object, blurred, plus a bright corner
        attr = torch.nn.functional.avg_pool2d(torch.tensor(gt, dtype=torch.float32)[None, None], 7, 1, 3)[0, 0].numpy()
        attr[:10, :10] = 1.0
        box = a.boxes[k]
        inside = box_filled_mask(box, H, W)
        fg, ignore = pseudo_mask_from_attribution(attr, box, image_uint8=img, use_crf=use_crf, stride_scale=W / 500)
        assert fg.shape == (H, W) and fg.dtype == bool and ignore.dtype == bool
        assert not (fg & ~inside).any() and not (ignore & ~inside).any()
        assert not (fg & ignore).any()
        assert fg.sum() > 0.5 * gt.sum()  # the synthetic shapes are easy
    # an all-zero attribution (empty O⁺) falls back to a box prior, still inside the box
    fg, ignore = pseudo_mask_from_attribution(np.zeros((H, W)), a.boxes[0], image_uint8=img, use_crf=use_crf)
    assert fg.any() and not (fg & ~box_filled_mask(a.boxes[0], H, W)).any()
    with pytest.raises(ValueError):
        pseudo_mask_from_attribution(np.zeros((H, W)), a.boxes[0], theta_fg=0.1, theta_bg=0.5, use_crf=False)


# ------------------------------------------------------------------------------ detector
def test_detection_dataset_items_and_flip(source):
    ds = DetectionDataset(source, [0, 1], train=False, with_masks=True)
    img, t = ds[0]
    a = source.annotations(0)
    assert img.dtype == torch.float32 and img.shape == (3, a.instance_masks.shape[1], a.instance_masks.shape[2])
    assert 0 <= img.min() and img.max() <= 1
    assert t["labels"].dtype == torch.int64 and torch.equal(t["labels"], torch.as_tensor(a.box_classes) + 1)
    torch.testing.assert_close(t["boxes"], torch.as_tensor(a.boxes))
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == a.instance_masks.shape
    assert t["index"] == 0 and t["image_id"] == source.records[0].image_id
    flip = DetectionDataset(source, [0], train=True, with_masks=True)
    W = img.shape[-1]
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        fimg, ft = flip[0]
        flipped = not torch.equal(fimg, img)
        seen.add(flipped)
        if flipped:
            torch.testing.assert_close(fimg, img.flip(-1))
            torch.testing.assert_close(ft["boxes"][:, [0, 2]], W - t["boxes"][:, [2, 0]])
            assert torch.equal(ft["masks"], t["masks"].flip(-1))
    assert seen == {True, False}
    with pytest.raises(IndexError):
        DetectionDataset(source, [10 ** 6], train=False)


def test_detector_trains_one_step_and_predicts(source):
    ds = DetectionDataset(source, [0, 1], train=True, with_masks=True)
    images, targets = collate_detection([ds[0], ds[1]])
    for kind, backbone in (("faster_rcnn", "resnet18"), ("mask_rcnn", "test_resnet")):
        det = _tiny_detector(source.num_classes, kind, backbone).train()
        assert det.roi_heads.box_predictor.cls_score.out_features == source.num_classes + 1
        opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        losses = det(images, targets)
        assert ("loss_mask" in losses) == (kind == "mask_rcnn")
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        det.eval()
        with torch.no_grad():
            out = det(images)
        assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
        assert (out[0]["labels"] >= 1).all() and (out[0]["labels"] <= source.num_classes).all()
        if kind == "mask_rcnn":
            assert out[0]["masks"].shape[1:] == (1, *images[0].shape[1:])
    with pytest.raises(ConfigError):
        build_detector("retinanet", "resnet18", 3, min_size=SIZE, max_size=SIZE, image_mean=MEAN, image_std=STD)


def test_forward_heads_match_the_detectors_own_roi_head(source, tiny):
    det, x, sizes, boxes, _ = tiny
    ds = DetectionDataset(source, [0, 1], train=False)
    images, _ = collate_detection([ds[0], ds[1]])
    g = torch.Generator().manual_seed(1)
    props = [jitter_proposals(b[0], 40, image_size=s, generator=g) for b, s in zip(boxes, sizes)]
    captured = {}
    hook = det.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    rpn_forward = det.rpn.forward
    det.rpn.forward = lambda images, features, targets=None: (props, {})  # our proposals, the full pipeline
    try:
        with torch.no_grad():
            det(images)
    finally:
        det.rpn.forward = rpn_forward
        hook.remove()
    logits, reg = captured["out"]
    with torch.no_grad():
        probs, reg2 = detector_forward_heads(det, x, props, image_sizes=sizes)
        _, decoded = detector_forward_heads(det, x, props, image_sizes=sizes, decode=True)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reg2, reg, atol=1e-6, rtol=1e-5)
    manual = det.roi_heads.box_coder.decode(reg, props).reshape(decoded.shape)
    torch.testing.assert_close(decoded, manual)


# ------------------------------------------------------------------------------ optimisation
def _jobs(tiny, pairs, n=8):
    """Jobs with O⁺ = the jittered proposals themselves (an untrained detector has no positives)."""
    det, x, sizes, boxes, targets = tiny
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i, k in pairs:
        box, c = boxes[i][k], int(targets[i]["labels"][k]) - 1
        props = jitter_proposals(box, n, image_size=sizes[i], generator=g)
        with torch.no_grad():
            p, r = detector_forward_heads(det, x[i:i + 1], [props])
        r = r.reshape(n, -1, 4)
        dec = det.roi_heads.box_coder.decode(r.reshape(n, -1), [props]).reshape(n, -1, 4)[:, c + 1]
        area = float((box[2] - box[0]) * (box[3] - box[1])) / (sizes[i][0] * sizes[i][1])
        jobs.append(BoxJob(i, box, c, props, p[:, c + 1], r[:, c + 1], mask_stride(area, scale=SIZE / 800), dec, sizes[i]))
    return jobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_optimisation_equals_one_box_at_a_time(tiny, dtype):
    """Float64 makes the equality exact whatever the convolution kernels: in float32, kernels
    that round differently at batch 1 and batch 3 can move an element whose gradient is ~0 by
    up to ``lr`` in an Adam step (m/√v ≈ ±1), which is why the float32 case uses a backbone
    whose kernels are batch-independent."""
    det, x, *_ = tiny
    if dtype == torch.float64:
        det, x = copy.deepcopy(det).double(), x.double()
        tiny = (det, x, *tiny[2:])
    jobs = _jobs(tiny, [(0, 0), (0, 1), (1, 0)])  # 3 boxes from 2 images, different strides
    calls = []
    batched = optimise_box_masks(det, x, jobs, iterations=4, progress=lambda d, t: calls.append((d, t)))
    sequential = [optimise_box_masks(det, x, [j], iterations=4)[0] for j in jobs]
    chunked = optimise_box_masks(det, x, jobs, iterations=4, chunk_size=2)
    for b, s, c, j in zip(batched, sequential, chunked, jobs):
        assert b.shape == mask_shape(j.image_size, j.stride)
        torch.testing.assert_close(b, s, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, s, atol=1e-5, rtol=0)
        assert 0 <= b.min() and b.max() <= 1
    assert calls[-1] == (12, 12) and len(calls) == 4
    # the masks moved away from their initialisation (ones inside the regressed O⁺ boxes)
    start = optimise_box_masks(det, x, jobs, iterations=0)
    assert any((b - s).abs().max() > 1e-3 for b, s in zip(batched, start))
    assert not det.training and all(p.requires_grad for p in det.parameters())  # state restored


def test_masks_after_iteration_t_of_a_longer_run_equal_a_t_iteration_run(tiny):
    """``on_iteration`` (the quality benchmark reads 60 and 300 iterations from one run): the
    masks it sees after iteration 2 of a 5-iteration run are those of a 2-iteration run."""
    det, x, *_ = tiny
    jobs = _jobs(tiny, [(0, 0), (1, 0)])
    seen = {}

    def hook(t, idx, masks):
        assert idx == [0, 1]
        seen[t] = [m.detach().clone() for m in masks]

    five = optimise_box_masks(det, x, jobs, iterations=5, on_iteration=hook)
    two = optimise_box_masks(det, x, jobs, iterations=2)
    assert sorted(seen) == [1, 2, 3, 4, 5]
    for a, b in zip(seen[2], two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(seen[5], five):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(seen[2], seen[5]))


def test_box_jobs_from_an_untrained_detector_are_reported_empty(tiny):
    det, x, sizes, boxes, targets = tiny
    jobs = make_box_jobs(det, x, boxes, [t["labels"] - 1 for t in targets], image_sizes=sizes, n_proposals=50,
                         generator=torch.Generator().manual_seed(0))
    assert len(jobs) == sum(len(b) for b in boxes)
    assert all(j.stride == mask_stride(float((j.box[2] - j.box[0]) * (j.box[3] - j.box[1])) / SIZE ** 2,
                                       scale=SIZE / 800) for j in jobs)
    empty = [j for j in jobs if j.empty]
    masks = optimise_box_masks(det, x, empty, iterations=2)
    assert all(m.abs().sum() == 0 for m in masks)  # the code's "no positive" branch: a zero mask
    attr = attribution_map(masks[0], (96, 96)) if masks else np.zeros((96, 96), np.float32)
    assert attr.shape == (96, 96) and attr.dtype == np.float32


# ------------------------------------------------------------------------------ Mask R-CNN loss
def test_seed_growing_mask_loss_hand_values():
    """One RoI of 1 × 8 cells. Seeds: foreground {0, 1, 7}, liberal mask {0, 1, 2, 3, 7} (band
    {2, 3}), background {4, 5, 6}. Logits 0, 3, 3, 0, 0, -3, 0, 0 (sigmoid .5, .95, .95, .5, .5,
    .047, .5, .5). Grown: cell 2 (band, .95 > .9) to the foreground. Targets: foreground {0, 1, 2}
    (each has a foreground neighbour), background {4, 5, 6}; cell 3 (band, not grown) and cell 7
    (a seed with no foreground neighbour) are ignored. With a = log(1 + e^-3):
    fg mean = (log 2 + 2a) / 3, bg mean = (2 log 2 + a) / 3, loss = ½ (sum) = (log 2 + a) / 2."""
    from weakbench.methods.bbam_ops import seed_growing_mask_loss

    logits = torch.tensor([[[0.0, 3.0, 3.0, 0.0, 0.0, -3.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    fg = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 1]]], dtype=torch.bool)
    liberal = torch.tensor([[[1, 1, 1, 1, 0, 0, 0, 1]]], dtype=torch.bool)
    a = np.log1p(np.exp(-3.0))
    loss = seed_growing_mask_loss(logits, fg, liberal)
    assert loss.item() == pytest.approx((np.log(2) + a) / 2, abs=1e-12)
    loss.backward()
    g = logits.grad[0, 0]
    assert g[3] == 0 and g[7] == 0  # ignored cells
    assert g[0] < 0 and g[4] > 0  # pushed up on foreground, down on background
    # the balanced means: one foreground target and two background ones weigh ½ each
    half = seed_growing_mask_loss(torch.zeros(1, 1, 4, dtype=torch.float64), torch.tensor([[[1, 1, 0, 0]]]).bool(),
                                  torch.tensor([[[1, 1, 0, 0]]]).bool())
    assert half.item() == pytest.approx(np.log(2), abs=1e-12)
    # no background target (everything in the liberal mask, nothing confident): zero, graph kept
    none = seed_growing_mask_loss(logits, fg, torch.ones_like(liberal))
    assert none.item() == 0 and none.requires_grad
    with pytest.raises(ValueError, match="threshold"):
        seed_growing_mask_loss(logits, fg, liberal, threshold=0.4)


@pytest.mark.parametrize("variant", ["seed_growing", "ignore_band"])
def test_mask_rcnn_trains_with_either_pseudo_mask_loss(source, variant):
    """A Mask R-CNN step with pseudo masks (1 fg, 2 band, 0 bg) under each loss: finite mask
    loss, torchvision's own loss restored after the block."""
    from torchvision.models.detection import roi_heads as rh

    from weakbench.methods.bbam import _pseudo_mask_loss

    det = _tiny_detector(source.num_classes, kind="mask_rcnn").train()
    ds = DetectionDataset(source, [0, 1], train=False, with_masks=True)
    images, targets = collate_detection([ds[0], ds[1]])
    for t in targets:  # a band of 2 around each instance mask
        m = t["masks"].bool()
        grown = torch.nn.functional.max_pool2d(m[:, None].float(), 5, 1, 2)[:, 0].bool()
        t["masks"] = m.to(torch.uint8) + 2 * (grown & ~m).to(torch.uint8)
    original = rh.maskrcnn_loss
    with _pseudo_mask_loss(variant):
        parts = det(images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
    assert rh.maskrcnn_loss is original
    assert torch.isfinite(parts["loss_mask"]) and parts["loss_mask"].requires_grad


def test_image_crf_reused_for_many_boxes_equals_a_fresh_crf_per_box(source):
    """The lattice built once per image gives exactly the marginals of a CRF built per call, so
    the pseudo masks do not change (only their cost)."""
    from weakbench.methods.bbam_ops import ImageCRF, dense_crf

    img = np.asarray(source.load_image(3), dtype=np.uint8)
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    crf = ImageCRF(img)
    for _ in range(3):
        p = rng.uniform(0, 1, (h, w)).astype(np.float32)
        np.testing.assert_array_equal(crf(p), dense_crf(img, p))
    boxes, _ = source.gt_boxes(3)
    for b in boxes:
        attr = np.zeros((h, w), np.float32)
        x0, y0, x1, y1 = box_pixels(b, h, w)
        attr[y0:y1, x0:x1] = rng.uniform(0, 1, (y1 - y0, x1 - x0))
        shared = pseudo_mask_from_attribution(attr, b, image_uint8=img, crf=crf)
        fresh = pseudo_mask_from_attribution(attr, b, image_uint8=img)
        for s, f in zip(shared, fresh):
            np.testing.assert_array_equal(s, f)
        empty_fg, empty_ignore = pseudo_mask_from_attribution(np.zeros((h, w), np.float32), b, crf=crf)
        assert empty_fg.any() and not empty_ignore.any()  # no attribution: one box-prior pass, no band
    with pytest.raises(ValueError, match="expected"):
        crf(np.zeros((h + 1, w), np.float32))


# ----------------------------------------------------------------------------- the numba dense CRF
@pytest.fixture(scope="module")
def coco_images(coco128_dir, tmp_path_factory):
    """Three coco128 person images (uint8 (H, W, 3)) with their GT boxes."""
    from weakbench.core.data import open_dataset

    src = open_dataset(coco128_dir, cache_dir=tmp_path_factory.mktemp("coco_crf"), classes="person")
    idx = [i for i in range(len(src)) if len(src.gt_boxes(i)[0])][:3]
    return [(np.asarray(src.load_image(i), dtype=np.uint8), np.asarray(src.gt_boxes(i)[0], dtype=np.float64))
            for i in idx]


def _crf_unaries(img, boxes, rng):
    """The fg_prob maps BBAM's CRF sees: the box priors of the fallbacks (0.7 and 0.95 inside the
    box, 1 on an earlier mask) and a blurred, renormalised rank cut (the main path), plus noise."""
    from weakbench.methods.bbam_ops import _gaussian_blur

    H, W = img.shape[:2]
    x0, y0, x1, y1 = box_pixels(boxes[0], H, W)
    roi = np.zeros((H, W), bool)
    roi[y0:y1, x0:x1] = True
    grown = np.where(roi, 0.95, 0.0)
    grown[(y0 + y1) // 2 - 5:(y0 + y1) // 2 + 5, (x0 + x1) // 2 - 5:(x0 + x1) // 2 + 5] = 1.0
    cut = box_rank_cut(rng.uniform(0, 1, (H, W)) * roi, boxes[0], 0.85)
    m = _gaussian_blur(cut, 20.0) * roi
    return {"box 0.7": np.where(roi, 0.7, 0.0), "box 0.95 + mask": grown, "rank cut": (m - m.min()) / m.max(),
            "uniform noise": rng.uniform(0, 1, (H, W)).astype(np.float32)}


def test_numba_crf_equals_pydensecrf_on_coco_images(coco_images):
    """Our mean-field inference (Krähenbühl & Koltun's algorithm on the permutohedral lattice,
    one channel per kernel) gives pydensecrf's marginals to float32 rounding, and the same
    ``> 0.9`` masks, on real images and the unaries BBAM uses."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed")
    from weakbench.methods.bbam_ops import ImageCRF

    rng = np.random.default_rng(0)
    for img, boxes in coco_images[:2]:
        ours, ref = ImageCRF(img, engine="numba"), ImageCRF(img, engine="pydensecrf")
        for name, p in _crf_unaries(img, boxes, rng).items():
            q, r = ours(p), ref(p)
            assert q.dtype == np.float32 and q.shape == img.shape[:2]
            if name != "uniform noise":  # BBAM's unaries: at most 1e-5 apart seen, the same masks
                assert np.abs(q - r).max() <= 3e-5, (img.shape, name, np.abs(q - r).max())
                np.testing.assert_array_equal(q > 0.9, r > 0.9, err_msg=f"{img.shape} {name}")
                continue
            # independent noise per pixel (a stress case, not a BBAM unary) amplifies float32
            # rounding most: up to 1.5e-4 seen, and a pixel or two whose marginal lies within
            # rounding of the threshold lands on the other side
            assert np.abs(q - r).max() <= 5e-4, (img.shape, np.abs(q - r).max())
            differ = (q > 0.9) != (r > 0.9)
            assert differ.sum() <= 3 and (np.abs(r[differ] - 0.9) <= 5e-5).all(), r[differ]


def test_numba_crf_pseudo_masks_equal_pydensecrf_ones(coco_images):
    """The whole pseudo-mask rule (θ_fg and θ_bg passes, the fallbacks' retries) gives the same
    masks with either engine: every GT box of a coco128 image, a random attribution and none."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed")
    from weakbench.methods.bbam_ops import ImageCRF

    img, boxes = coco_images[2]
    H, W = img.shape[:2]
    ours, ref = ImageCRF(img, engine="numba"), ImageCRF(img, engine="pydensecrf")
    rng = np.random.default_rng(1)
    for k, box in enumerate(boxes[:3]):
        attr = np.zeros((H, W)) if k == 0 else rng.uniform(0, 1, (H, W))
        got = [pseudo_mask_from_attribution(attr, box, image_uint8=img, crf=c, stride_scale=max(H, W) / 500)
               for c in (ours, ref)]
        for a, b in zip(got[0], got[1]):
            np.testing.assert_array_equal(a, b)


def test_lattice_filter_is_linear_so_one_channel_suffices(coco_images):
    """K(Q_bg) = K(1) − K(Q_fg): the one-channel update equals mean field with both channels
    filtered (written here with numpy on the same lattice)."""
    from weakbench.methods.densecrf import DenseCRF2

    img = np.ascontiguousarray(coco_images[0][0][:60, :90])
    crf = DenseCRF2(img, pos_xy_std=1.0, pos_w=3.0, bi_xy_std=80.0, bi_rgb_std=3.0, bi_w=4.0)
    rng = np.random.default_rng(2)
    q = rng.uniform(0, 1, img.shape[:2]).astype(np.float32).ravel()
    for lat in crf._lat:
        lin = lat.compute(1 - q) - (lat.compute(np.ones_like(q)) - lat.compute(q))
        assert np.abs(lin).max() <= 1e-5 * np.abs(lat.compute(q)).max()
    u = -np.log(np.clip(np.stack([q, 1 - q]), 1e-5, 1)).astype(np.float32)
    Q = np.exp(-u) / np.exp(-u).sum(0)
    for _ in range(5):
        msg = sum(w * np.stack([lat.norm * lat.compute(lat.norm * Q[l]) for l in (0, 1)])
                  for w, lat in zip(crf._w, crf._lat))
        e = np.exp(-u + msg - (-u + msg).max(0))
        Q = e / e.sum(0)
    got = crf.inference(u[0].reshape(img.shape[:2]), u[1].reshape(img.shape[:2]), 5).ravel()
    assert np.abs(got - Q[0]).max() <= 1e-5
    # blur neighbours: the sorted merge (the default) and the hash lookups (the fallback for
    # keys too spread to pack in 62 bits) find the same ones
    from weakbench.methods import densecrf

    for lat in crf._lat:
        assert (lat.nbr > 0).any()
    for feat in (np.stack(np.meshgrid(np.arange(40.0), np.arange(30.0)), -1).reshape(-1, 2),
                 rng.uniform(0, 60, (500, 5))):
        f = np.ascontiguousarray(feat, dtype=np.float32)
        d = f.shape[1]
        scale = np.array([1 / np.sqrt((i + 2) * (i + 1)) * np.float32(np.sqrt(2 / 3) * (d + 1)) for i in range(d)],
                         dtype=np.float32)
        _, _, keys, table, shift, _ = densecrf._build_lattice(f, scale, np.float32(1 / (d + 1)), np.float32(d + 1), 0)
        by_sort, ok = densecrf._lattice_neighbours_sorted(keys)
        assert ok
        np.testing.assert_array_equal(by_sort, densecrf._lattice_neighbours(keys, table, shift))
    # the filter of a constant is the constant times the kernel's mass: symmetric normalisation
    # makes K(1) about 1 away from the border
    assert 0.5 < np.median(crf._one[0]) < 1.5


def test_dense_crf_bad_input():
    from weakbench.methods.bbam_ops import ImageCRF
    from weakbench.methods.densecrf import DenseCRF2, lattice_filter

    img = np.zeros((6, 7, 3), np.uint8)
    with pytest.raises(ValueError, match="engine='torch'"):
        ImageCRF(img, engine="torch")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ImageCRF(np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match="fg_prob is"):
        ImageCRF(img)(np.zeros((7, 6)))
    kw = dict(pos_xy_std=1.0, pos_w=3.0, bi_xy_std=80.0, bi_rgb_std=3.0, bi_w=4.0)
    with pytest.raises(ValueError, match="uint8"):
        DenseCRF2(img.astype(np.float32), **kw)
    with pytest.raises(ValueError, match="bi_rgb_std=0"):
        DenseCRF2(img, **{**kw, "bi_rgb_std": 0})
    crf = DenseCRF2(img, **kw)
    with pytest.raises(ValueError, match="unary_bg is"):
        crf.inference(np.zeros((6, 7)), np.zeros((7, 6)), 5)
    with pytest.raises(ValueError, match="n_iterations=-1"):
        crf.inference(np.zeros((6, 7)), np.zeros((6, 7)), -1)
    with pytest.raises(ValueError, match="values"):
        lattice_filter(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="1 <= d <= 6"):
        lattice_filter(np.zeros((5, 7)), np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        lattice_filter(np.full((5, 2), np.nan), np.zeros(5))
    with pytest.raises(ValueError, match="16-bit"):  # densecrf's keys are shorts: refuse, do not wrap
        lattice_filter(np.array([[0.0, 0.0], [30000.0, 0.0]]), np.ones(2))
    q = crf.inference(np.zeros((6, 7)), np.full((6, 7), 20.0), 0)  # no iteration: softmax of −U
    np.testing.assert_allclose(q, 1 / (1 + np.exp(-20.0)), rtol=1e-6)
