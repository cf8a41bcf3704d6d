"""BBAM's attribution does not depend on how images are chunked (issue 20): mixed portrait and
landscape images, batched against one image at a time, and a stage resumed after its first images
against an uninterrupted one. Before the fix a landscape image padded beside a portrait one was
read by the RoI poolers at twice its scale."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakbench.methods import build_method
from weakbench.methods.bbam_ops import optimise_box_masks
from weakbench.methods.detection import detector_box_heads, detector_features, detector_inputs
from weakbench.core.data import open_dataset

#: (width, height) of the images: landscape and portrait mixed, one square
SIZES = [(96, 64), (64, 96), (96, 64), (64, 96), (80, 80)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A one-class COCO dataset of textured images in both orientations, two boxes each."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for k, (x, y, bw, bh) in enumerate([(4, 6, w // 2, h // 2), (w // 3, h // 3, w // 2, h // 2)]):
            anns.append({"id": 10 * i + k + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, bw, bh],
                         "iscrowd": 0})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    return root


def _rigged(method):
    """The method's detector in float64 (exact arithmetic whatever the kernels) with heads that
    predict the one class with a margin and regress boxes close to the proposals, so that O⁺ is
    never empty and the masks are optimised against features the heads really read."""
    from weakbench.methods.bbam import DetectorFit

    torch.manual_seed(0)
    det = DetectorFit(method, "faster_rcnn").build_model().double().eval()
    pred = det.roi_heads.box_predictor
    with torch.no_grad():
        pred.cls_score.weight.mul_(20.0)
        pred.cls_score.bias.copy_(torch.tensor([0.0, 6.0], dtype=torch.float64))
        pred.bbox_pred.weight.mul_(0.5)
        pred.bbox_pred.bias.zero_()
    return det


def _ctx(source, det):
    return types.SimpleNamespace(source=source, device=torch.device("cpu"), load_model=lambda name: det)


def _attribute(method, source, det, chunks):
    out = {}
    for keys in chunks:
        out.update(method._attribute(keys, _ctx(source, det)))
    return out


def test_attribution_is_independent_of_chunking_and_resume(mixed):
    source = open_dataset(mixed)
    method = build_method("bbam", {"backbone": "test_resnet", "input_size": 64, "fpn_channels": 16, "box_head_size": 32,
                                   "num_proposals": 40, "mask_iterations": 3}, num_classes=1)
    det = _rigged(method)
    keys = [f"train:{i}" for i in range(len(SIZES))]
    alone = _attribute(method, source, det, [[k] for k in keys])
    together = _attribute(method, source, det, [keys])
    resumed = _attribute(method, source, det, [keys[:1], keys[1:3], keys[3:]])  # a stage interrupted, regrouped
    assert sum(p > 0 for k in keys for p in alone[k]["positives"]) >= len(keys)  # O⁺ non-empty for half the boxes or more
    moved = 0
    for k in keys:
        assert together[k]["strides"] == alone[k]["strides"] == resumed[k]["strides"]
        assert together[k]["positives"] == alone[k]["positives"] == resumed[k]["positives"]
        for a, b, r in zip(alone[k]["masks"], together[k]["masks"], resumed[k]["masks"]):
            torch.testing.assert_close(b.float(), a.float(), atol=1e-5, rtol=0)
            torch.testing.assert_close(r.float(), a.float(), atol=1e-5, rtol=0)
            moved += int(((a.float() - 1).abs() > 1e-3).any() and (a.float() > 1e-3).any())
    assert moved  # the masks were optimised, not left at a trivial value


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_roi_scales_are_fixed_at_build_whatever_the_first_call(mixed, kind):
    """torchvision's poolers keep the scales of their first call; a first call on a landscape
    image padded beside a portrait one (height 64 in a 96-tall tensor) would fix 1/2 for the
    stride-4 level. build_detector fixes exact scales first."""
    from weakbench.methods.bbam import DetectorFit

    method = build_method("bbam", {"backbone": "test_resnet", "input_size": 64, "fpn_channels": 16,
                                   "box_head_size": 32}, num_classes=1)
    det = DetectorFit(method, kind).build_model().eval()
    pools = [det.roi_heads.box_roi_pool] + ([det.roi_heads.mask_roi_pool] if kind == "mask_rcnn" else [])
    exact = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert all(p.scales == exact for p in pools)
    padded = torch.zeros((1, 3, 96, 96))
    with torch.no_grad():
        detector_box_heads(det, detector_features(det, padded), [torch.tensor([[4.0, 4.0, 40.0, 40.0]])], [(64, 96)])
    assert det.roi_heads.box_roi_pool.scales == exact
    from torchvision.ops import MultiScaleRoIAlign  # what the fix prevents: a fresh pooler infers 1/2

    fresh = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    fresh(detector_features(det, padded), [torch.tensor([[4.0, 4.0, 40.0, 40.0]])], [(64, 96)])
    assert fresh.scales[0] == 0.5


def test_optimise_takes_images_of_their_own_sizes(mixed):
    """A list of differently sized images is accepted and gives what each image gives alone."""
    source = open_dataset(mixed)
    method = build_method("bbam", {"backbone": "test_resnet", "input_size": 64, "fpn_channels": 16,
                                   "box_head_size": 32, "num_proposals": 30}, num_classes=1)
    det = _rigged(method)
    from weakbench.methods.bbam_ops import make_box_jobs

    imgs, jobs = [], []
    for i in (0, 1):
        t = torch.as_tensor(np.array(source.load_image(i)), dtype=torch.float64).permute(2, 0, 1) / 255
        b, _ = source.gt_boxes(i)
        x, s, br = detector_inputs(det, [t], [torch.as_tensor(b)])
        for j in make_box_jobs(det, [x[0]], br, [[0, 0]], image_sizes=s, n_proposals=30,
                               generator=torch.Generator().manual_seed(i)):
            j.image_index = i
            jobs.append(j)
        imgs.append(x[0])
    both = optimise_box_masks(det, imgs, jobs, iterations=2)
    single = [optimise_box_masks(det, [imgs[j.image_index]], [type(j)(**{**j.__dict__, "image_index": 0})],
                                 iterations=2)[0] for j in jobs]
    for a, b in zip(both, single):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_indicators_reach_the_optimisation(mixed):
    """indicator_box / indicator_cls (the paper's 𝟙_box / 𝟙_cls) change the attribution stage's masks."""
    source = open_dataset(mixed)
    base = {"backbone": "test_resnet", "input_size": 64, "fpn_channels": 16, "box_head_size": 32,
            "num_proposals": 40, "mask_iterations": 3}
    out = {}
    for name, extra in (("both", {}), ("box", {"indicator_cls": False}), ("cls", {"indicator_box": False})):
        method = build_method("bbam", {**base, **extra}, num_classes=1)
        out[name] = _attribute(method, source, _rigged(method), [["train:0"]])["train:0"]["masks"]
    nonempty = [k for k, m in enumerate(out["both"]) if m.float().abs().sum() > 0]
    assert nonempty
    for other in ("box", "cls"):
        assert any((out["both"][k].float() - out[other][k].float()).abs().max() > 1e-4 for k in nonempty), other


class _ExactHeads:
    """Box heads that know the answer: every proposal is classified as the one class (softmax
    ≈ 1) and regressed exactly onto the GT box (in the detector's resized pixels, given per image
    in ``gt``) it overlaps most. A detector this good finds every box; BBAM's O⁺ (the code's rule:
    arg-max = GT class and truncated IoU of the regressed box > 0.9 / 0.85 / 0.8) must then be
    full for every box, whatever the image's size against the detector's input size."""

    def __init__(self, det):
        from torchvision.ops import box_iou

        self.gt = None
        self.props = None
        rh, coder, pool = det.roi_heads, det.roi_heads.box_coder, det.roi_heads.box_roi_pool
        outer = self

        class Pool(torch.nn.Module):
            def forward(self, features, proposals, image_shapes):
                outer.props = torch.cat(list(proposals))
                return pool(features, proposals, image_shapes)

        class Predictor(torch.nn.Module):
            def forward(self, x):
                props = outer.props.to(torch.float64)
                target = outer.gt[box_iou(props, outer.gt).argmax(1)]
                deltas = coder.encode_single(target, props).to(x.dtype)
                logits = torch.tensor([0.0, 20.0], dtype=x.dtype).expand(len(props), 2) + 0 * x[:, :1]
                return logits, torch.cat([torch.zeros_like(deltas), deltas], 1) + 0 * x[:, :1]

        rh.box_roi_pool, rh.box_predictor = Pool(), Predictor()


def test_boxes_the_detector_finds_get_a_full_positive_set(mixed):
    """The O⁺ rule end to end (BBAM._attribute: resize, jitter, heads, decode, truncated IoU) on
    images the detector resizes by 1.5 and 1.2: a detector that finds every GT box (its own
    detections: the box's class, score > 0.99, IoU > 0.99) gives every box 100 positives at θ = 0.9.
    A frame slip (GT boxes in original pixels against proposals in resized ones) would empty O⁺."""
    from torchvision.ops import box_iou

    source = open_dataset(mixed)
    method = build_method("bbam", {"backbone": "test_resnet", "input_size": 96, "fpn_channels": 16,
                                   "box_head_size": 32, "num_proposals": 300, "mask_iterations": 1}, num_classes=1)
    from weakbench.methods.bbam import DetectorFit

    torch.manual_seed(0)
    det = DetectorFit(method, "faster_rcnn").build_model().eval()
    heads = _ExactHeads(det)
    for i, (w, h) in enumerate(SIZES):
        boxes, _ = source.gt_boxes(i)
        gt = torch.as_tensor(np.asarray(boxes, np.float64)).reshape(-1, 4)
        scale = 96 / min(w, h)
        assert scale > 1.1
        heads.gt = gt * scale
        image = torch.as_tensor(np.array(source.load_image(i)), dtype=torch.float32).permute(2, 0, 1) / 255
        with torch.no_grad():
            found = det([image])[0]
        iou = box_iou(gt.float(), found["boxes"])
        assert (iou.max(1).values > 0.99).all() and (found["scores"] > 0.99).all()  # the detector finds every box
        out = method._attribute([f"train:{i}"], _ctx(source, det))[f"train:{i}"]
        assert out["positives"] == [100] * len(gt), (i, out["positives"])
