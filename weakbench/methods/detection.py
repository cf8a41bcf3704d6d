"""Box detectors (Faster R-CNN / Mask R-CNN on a timm backbone + FPN) and detection data.

Used by BBAM (Lee et al., "BBAM: Bounding Box Attribution Map for Weakly Supervised Semantic
and Instance Segmentation", CVPR 2021), whose first stage trains a box detector on the GT
boxes, and by any later method that needs one.

Conventions (the same everywhere in this module):

* **Labels.** ``num_classes`` (``C``) counts object classes only. torchvision reserves label 0
  for the background, so our class ``c`` in ``[0, C)`` is the detector label ``c + 1``; the
  classifier has ``C + 1`` outputs and the box regressor ``(C + 1) · 4``.
* **Boxes** are float ``(x0, y0, x1, y1)`` in continuous pixel-edge coordinates (COCO
  ``[x, y, w, h]`` → ``(x, y, x + w, y + h)``), in the pixels of the image they refer to.
* **Images.** Datasets yield float32 ``(3, H, W)`` in ``[0, 1]`` at their original size; the
  detector's ``GeneralizedRCNNTransform`` resizes (shorter side to ``min_size``, longer side at
  most ``max_size``), normalises with ``image_mean`` / ``image_std`` and zero-pads to a
  multiple of 32. :func:`detector_inputs` runs that transform and returns the tensor BBAM
  perturbs; :func:`detector_forward_heads` takes such an already normalised tensor.

Nothing here downloads: the backbone comes from :func:`weakbench.methods.backbones.create_backbone`
(``pretrained_backbone=False`` by default, or a local ``weights_path``) and torchvision's
``weights`` / ``weights_backbone`` are never used.

A method builds its detector with :func:`detector_settings` of its config: inputs normalised
with the backbone's own statistics (EfficientNet-Lite: mean = std = 0.5; timm's
``pretrained_cfg``), and a pretrained body with frozen BatchNorm (torchvision's
``FrozenBatchNorm2d``, as torchvision's own detection models: batches of 2–4 images give
BatchNorm statistics too noisy to train).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor  # default mask head ends at 256 ch
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from weakbench.methods.backbones import create_backbone, input_normalization
from weakbench.core.data.source import DatasetSource
from weakbench.core.errors import ConfigError, UnknownNameError

__all__ = [
    "TimmFPNBackbone",
    "build_detector",
    "default_anchor_sizes",
    "DetectionDataset",
    "collate_detection",
    "detector_inputs",
    "detector_forward_heads",
    "detector_features",
    "detector_box_heads",
    "padded_shape",
    "fix_roi_scales",
    "detector_settings",
]

class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` body followed by a torchvision ``FeaturePyramidNetwork``.

    The body returns the last (at most) four stages whose reduction is at least 4 (strides
    4, 8, 16, 32 for ResNets); the FPN maps each to ``out_channels`` and adds a max-pooled
    extra level, as torchvision's ``resnet_fpn_backbone`` does.

    ``forward(x (B, 3, H, W))`` returns an ``OrderedDict`` ``{"0": P2, "1": P3, "2": P4,
    "3": P5, "pool": P6}`` of float tensors ``(B, out_channels, H/r, W/r)`` (fewer levels when
    the body has fewer stages). ``out_channels`` is the attribute torchvision's detectors read.
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.feature_names = [str(i) for i in range(len(in_channels))]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict(zip(self.feature_names, feats)))


def default_anchor_sizes(min_size: int, levels: int = 5) -> tuple[tuple[int], ...]:
    """One anchor size per FPN level, torchvision's ``(32, 64, 128, 256, 512)`` at 800 px scaled
    by ``min_size / 800`` (rounded, at least 4 px): at 128 px ``(5, 10, 20, 41, 82)``.

    The BBAM appendix uses ``(21, 42, 84, 168, 332)`` for VOC at min size 512, about the same
    rule (``32·512/800 = 20.5``)."""
    f = min_size / 800.0
    return tuple((max(4, int(round(32 * 2 ** i * f))),) for i in range(levels))


def _pick_stages(name: str, output_stride: int) -> tuple[list[int], list[int]]:
    """Indices and channels of the last (up to) 4 stages of timm model ``name`` with reduction ≥ 4."""
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": False}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    try:
        probe = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"backbone {name!r} cannot be built with output_stride={output_stride}: {e}") from None
    info = probe.feature_info
    idx = [i for i, r in enumerate(info.reduction()) if r >= 4][-4:]
    if not idx:
        raise ConfigError(f"backbone {name!r} has no feature stage with stride >= 4; choose another backbone")
    channels = info.channels()
    return idx, [channels[i] for i in idx]


def build_detector(
    kind: Literal["faster_rcnn", "mask_rcnn"],
    backbone: str,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    weights_path: str | None = None,
    pretrained_backbone: bool = False,
    output_stride: int = 32,
    fpn_channels: int = 256,
    box_representation_size: int = 1024,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    frozen_batch_norm: bool | None = None,
    mask_logits_init: Literal["torchvision", "detectron2"] = "torchvision",
    box_head_init: Literal["torchvision", "detectron2"] = "torchvision",
    **detector_kwargs: Any,
) -> FasterRCNN:
    """A torchvision Faster R-CNN or Mask R-CNN on a timm backbone with an FPN.

    Args:
        kind: ``"faster_rcnn"`` (boxes) or ``"mask_rcnn"`` (boxes + 28×28 mask head).
        backbone: a timm model name (``"resnet18"``, ``"resnet50"``, ``"resnet10t"``,
            ``"test_resnet"``, …); see :class:`TimmFPNBackbone` for the stages used.
        num_classes: ``C``, object classes **without** the background; the detector is built
            with ``C + 1`` classes and our class ``c`` is its label ``c + 1``.
        min_size, max_size: the transform's resize rule (pixels): shorter side to ``min_size``
            unless the longer side would exceed ``max_size``. Test mode uses exactly these.
        image_mean, image_std: per-channel statistics of images in ``[0, 1]`` (RGB).
        weights_path: local backbone state dict (``.pth``/``.safetensors``), loaded into the timm
            body (see ``create_backbone``); ``None`` for random initialisation.
        pretrained_backbone: ask timm for pretrained backbone weights (needs a reachable hub;
            off by default, nothing is ever downloaded otherwise).
        output_stride: 32 (default), or 16 / 8 to dilate the last stages (the FPN levels then
            repeat a stride; the RoI pooler infers each level's scale from its size).
        fpn_channels: FPN width (256 in the papers; 64 is plenty for tests).
        box_representation_size: width of the two-layer MLP box head (1024 in the papers).
        anchor_sizes: one tuple of sizes per FPN level (pixels of the resized image); default
            :func:`default_anchor_sizes` of ``min_size``. Aspect ratios 0.5, 1, 2.
        frozen_batch_norm: replace the body's BatchNorm layers by frozen ones (torchvision's
            ``FrozenBatchNorm2d``; timm's ``FrozenBatchNormAct2d`` where the norm carries an
            activation) holding the loaded statistics and affine terms; ``None`` (default): frozen
            exactly when the body is pretrained (``pretrained_backbone`` or ``weights_path``), as
            torchvision's detection models do. A random body keeps trainable BatchNorm (it has no
            statistics to keep).
        mask_logits_init: initialisation of the mask predictor's last 1×1 conv (the per-class
            mask logits). ``"torchvision"`` (default): torchvision's ``MaskRCNNPredictor`` init,
            Kaiming normal with ``fan_out`` = ``C + 1`` (weight std ``sqrt(2 / (C + 1))``: 1 for
            one class), default bias. ``"detectron2"``: Detectron2's
            ``MaskRCNNConvUpsampleHead`` init, normal weights of std 0.001 and zero bias, so the
            logits start near 0 (the mask loss near ln 2) whatever ``C`` and the feature scale.
            With one class on a pretrained EfficientNet-Lite0 body, torchvision's init gives
            initial mask logits of std ≈ 33 and a mask loss ≈ 17.6 (not 0.69), gradient norms
            in the hundreds, and SGD at lr 0.002 diverges within 3 epochs (docs/ccgr.md).
        box_head_init: initialisation of the box head (the two-layer MLP ``fc6``, ``fc7``) and
            the box predictor (``cls_score``, ``bbox_pred``). ``"torchvision"`` (default):
            ``nn.Linear``'s own (Kaiming uniform with a = √5, uniform bias). ``"detectron2"``:
            Detectron2's ``FastRCNNConvFCHead`` / ``FastRCNNOutputLayers`` and, identically,
            maskrcnn-benchmark's ``FPN2MLPFeatureExtractor`` (``make_fc``) / ``FPNPredictor`` (the
            code BBAM's official implementation trains its detector with): ``fc6``/``fc7`` Kaiming
            uniform with a = 1 (Caffe2's XavierFill) and zero bias; class logits normal of std
            0.01, box deltas normal of std 0.001, zero biases (logits about 3.6x smaller than
            ``nn.Linear``'s at a 256-wide head, the deltas near 0). The RPN head and the FPN
            are initialised the same way by both (normal 0.01; Kaiming uniform a = 1). Measured
            worse than the default on BBAM's Lite0 detectors (docs/bbam.md), so an option.
        **detector_kwargs: passed to torchvision's ``FasterRCNN`` / ``MaskRCNN`` (e.g.
            ``box_detections_per_img``, ``rpn_post_nms_top_n_test``).

    Returns:
        the detector (train mode). ``detector.roi_heads.box_coder`` decodes box regressions
        (weights 10, 10, 5, 5, as maskrcnn-benchmark, which BBAM's official code used).

    Raises:
        UnknownNameError: ``backbone`` is not a timm model; ConfigError: bad ``kind``,
        ``num_classes`` < 1, an unreadable ``weights_path``, an unsupported ``output_stride``, an unknown ``mask_logits_init`` or ``box_head_init``.
    """
    if kind not in ("faster_rcnn", "mask_rcnn"):
        raise ConfigError(f"detector kind {kind!r} unknown; use 'faster_rcnn' or 'mask_rcnn'")
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes}: need at least one object class (background excluded)")
    if not timm.is_model(backbone):
        raise UnknownNameError(f"unknown backbone {backbone!r} (not a timm model)")
    idx, channels = _pick_stages(backbone, output_stride)
    body = create_backbone(backbone, pretrained=pretrained_backbone, weights_path=weights_path,
                           output_stride=output_stride, out_indices=idx)
    if frozen_batch_norm is None:
        frozen_batch_norm = bool(pretrained_backbone or weights_path)
    if frozen_batch_norm:
        from timm.layers import freeze_batch_norm_2d

        body = freeze_batch_norm_2d(body)
    bb = TimmFPNBackbone(body, channels, fpn_channels)
    levels = len(idx) + 1  # + the max-pooled level
    sizes = tuple(tuple(int(s) for s in a) for a in anchor_sizes) if anchor_sizes is not None \
        else default_anchor_sizes(min_size, levels)
    if len(sizes) != levels:
        raise ConfigError(f"anchor_sizes has {len(sizes)} levels but the FPN of {backbone!r} has {levels}")
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    roi_names = [str(i) for i in range(len(idx))]
    box_pool = MultiScaleRoIAlign(featmap_names=roi_names, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(fpn_channels * 7 * 7, box_representation_size)
    box_predictor = FastRCNNPredictor(box_representation_size, num_classes + 1)
    if box_head_init not in ("torchvision", "detectron2"):
        raise ConfigError(f"box_head_init {box_head_init!r} unknown; use 'torchvision' or 'detectron2'")
    if box_head_init == "detectron2":
        for fc in (box_head.fc6, box_head.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
        nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(box_predictor.cls_score.bias)
        nn.init.zeros_(box_predictor.bbox_pred.bias)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
                  rpn_anchor_generator=anchors, box_roi_pool=box_pool, box_head=box_head,
                  box_predictor=box_predictor, **detector_kwargs)
    if kind == "faster_rcnn":
        return fix_roi_scales(FasterRCNN(bb, num_classes=None, **common))
    if mask_logits_init not in ("torchvision", "detectron2"):
        raise ConfigError(f"mask_logits_init {mask_logits_init!r} unknown; use 'torchvision' or 'detectron2'")
    mask_pool = MultiScaleRoIAlign(featmap_names=roi_names, output_size=14, sampling_ratio=2)
    predictor = MaskRCNNPredictor(256, 256, num_classes + 1)
    if mask_logits_init == "detectron2":
        nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return fix_roi_scales(MaskRCNN(bb, num_classes=None, mask_roi_pool=mask_pool, mask_predictor=predictor, **common))


def detector_settings(config: Any) -> dict[str, Any]:
    """:func:`build_detector` keyword arguments from a method config (BBAM's detector and Mask
    R-CNN, CCGR's instance branch): the resize rule (``min_size = input_size``, ``max_size =
    ceil(input_size · 1333 / 800)``, the papers' 800 / 1333 ratio), the backbone's own input
    statistics (:func:`~weakbench.methods.backbones.input_normalization`: ``pretrained_cfg``'s
    mean / std, EfficientNet-Lite 0.5 / 0.5, ImageNet's for ResNets; the rule the classifier
    methods use), ``weights_path``, ``pretrained_backbone``, ``fpn_channels`` and
    ``box_representation_size`` (``box_head_size``). BatchNorm is frozen when pretrained
    (``build_detector``'s default).

    Args:
        config: has ``backbone``, ``input_size``, ``weights_path``, ``pretrained``,
            ``fpn_channels``, ``box_head_size``.
    """
    mean, std = input_normalization(config.backbone)
    return dict(min_size=config.input_size, max_size=int(math.ceil(config.input_size * 1333 / 800)),
                image_mean=mean, image_std=std, weights_path=config.weights_path,
                pretrained_backbone=config.pretrained, fpn_channels=config.fpn_channels,
                box_representation_size=config.box_head_size)


def fix_roi_scales(detector: FasterRCNN, probe: int = 256) -> FasterRCNN:
    """Fix the level scales of the detector's RoI poolers from the backbone itself; returns it.

    torchvision's ``MultiScaleRoIAlign`` infers each level's scale on its **first call** as
    ``2^round(log2(feature height / max image height))`` over the image sizes of that call, and
    keeps it for every later call. A first call whose images are smaller than the padded tensor
    their features came from (a landscape image padded beside a portrait one, or one image of a
    padded batch described by its own size) fixes a scale twice the true one for the life of the
    model, so every box after it is read at twice its coordinates. Here the poolers are called
    once on the backbone's maps of a ``probe`` × ``probe`` zero image (no padding: every scale
    exact, e.g. 1/4, 1/8, 1/16, 1/32), in eval mode without gradients (BatchNorm statistics
    untouched), which fixes the scales before any data is seen.
    """
    was = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            ref = next(detector.parameters())
            feats = detector.backbone(torch.zeros((1, 3, probe, probe), dtype=ref.dtype, device=ref.device))
            box = [torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=ref.dtype, device=ref.device)]
            for pool in (detector.roi_heads.box_roi_pool, getattr(detector.roi_heads, "mask_roi_pool", None)):
                if pool is not None:
                    pool.scales = pool.map_levels = None
                    pool(feats, box, [(probe, probe)])
    finally:
        detector.train(was)
    return detector


# --------------------------------------------------------------------------------------- data
class DetectionDataset(Dataset):
    """Images and GT boxes of a :class:`DatasetSource` for detector training and inference.

    Item ``i`` (record ``indices[i]``) is ``(image, target)``:

    * ``image`` float32 ``(3, H, W)`` in ``[0, 1]``, the original size (the detector's transform
      resizes and normalises);
    * ``target`` dict: ``boxes`` float32 ``(K, 4)`` ``x0, y0, x1, y1`` original pixels,
      ``labels`` int64 ``(K,)`` = class + 1 (0 is torchvision's background), ``masks`` uint8
      ``(K, H, W)`` when ``with_masks``, ``image_id`` (the dataset's id: int for COCO, str for
      wsol metadata) and ``index`` (int, the record index).

    With ``train=True`` the image is mirrored left-right with probability 0.5 (torch's global
    RNG, so DataLoader workers are seeded by PyTorch): ``x -> W - x`` for boxes, masks flipped.

    Boxes with no area (``x1 <= x0`` or ``y1 <= y0``) are dropped, since torchvision refuses
    them in training. Images with no box left are kept: torchvision trains on empty targets as
    pure background (RPN and box head negatives only). Crowd regions are not boxes (the
    source's rule).

    Raises:
        IndexError: an index is outside the source; ConfigError: ``with_masks`` on a source
        without masks.
    """

    def __init__(self, source: DatasetSource, indices: Sequence[int], *, train: bool, with_masks: bool = False):
        n = len(source.records)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"record index {bad[0]} outside [0, {n}) of dataset {source.name!r}")
        if with_masks and not source.has_masks:
            raise ConfigError(f"dataset {source.name!r} ({source.root}) has no instance masks; "
                              f"use with_masks=False (Faster R-CNN) or a dataset with masks")
        self.source, self.indices, self.train, self.with_masks = source, idx, train, with_masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        index = self.indices[i]
        img = np.asarray(self.source.load_image(index), dtype=np.uint8)
        h, w = img.shape[:2]
        masks = None
        if self.with_masks:
            a = self.source.annotations(index)
            boxes, classes = a.boxes.astype(np.float64), a.box_classes
            masks = a.instance_masks if a.instance_masks is not None else np.zeros((len(boxes), h, w), bool)
        else:
            boxes, classes = self.source.gt_boxes(index)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, classes = boxes[keep], np.asarray(classes, dtype=np.int64).reshape(-1)[keep]
        if masks is not None:
            masks = masks[keep]
        image = torch.from_numpy(img.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
            if masks is not None:
                masks = masks[:, :, ::-1]
        target: dict[str, Any] = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(classes + 1, dtype=torch.int64),
            "image_id": self.source.records[index].image_id,
            "index": index,
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks).astype(np.uint8))
        return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), …]`` → ``(list of images, list of targets)``, torchvision's input form."""
    return [b[0] for b in batch], [b[1] for b in batch]


# ------------------------------------------------------------------------------ BBAM's access
def detector_inputs(
    detector: FasterRCNN, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor] | None]:
    """Run the detector's own transform (test-mode resize, normalisation, zero padding).

    Args:
        detector: from :func:`build_detector`; its ``transform`` is used in eval mode (the
            resize uses ``min_size[-1]`` exactly), whatever the detector's mode.
        images: float ``(3, H_i, W_i)`` in ``[0, 1]``.
        boxes: optional float ``(K_i, 4)`` boxes in each image's original pixels.

    Returns:
        ``images_norm`` float32 ``(B, 3, H_p, W_p)`` (normalised, padded with 0 = the mean to a
        multiple of 32), ``image_sizes`` ``[(h_i, w_i)]`` of the resized images before padding,
        and the boxes rescaled to those resized pixels (or ``None``).
    """
    t = detector.transform
    was = t.training
    t.eval()
    try:
        targets = None
        if boxes is not None:
            targets = [{"boxes": torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)} for b in boxes]
        with torch.no_grad():
            il, tt = t(list(images), targets)
    finally:
        t.train(was)
    out_boxes = [d["boxes"] for d in tt] if tt is not None else None
    return il.tensors, [tuple(int(v) for v in s) for s in il.image_sizes], out_boxes


def detector_forward_heads(
    detector: FasterRCNN,
    images_norm: torch.Tensor,
    proposals: Sequence[torch.Tensor],
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone + FPN + RoI box head on given proposals, bypassing the transform and the RPN.

    This is what BBAM's attribution needs (the official code's ``model(images,
    fixed_proposals=…)``): the same proposals are re-scored on perturbed images.

    Args:
        detector: a torchvision ``FasterRCNN`` / ``MaskRCNN`` (e.g. from :func:`build_detector`);
            call ``detector.eval()`` first for attribution (BatchNorm statistics frozen).
        images_norm: float ``(B, 3, H, W)`` already normalised with the detector's
            ``image_mean`` / ``image_std`` and already at the detector's scale (see
            :func:`detector_inputs`). Zero-padded here to a multiple of
            ``detector.transform.size_divisible`` (32) at the bottom/right, as the transform does.
        proposals: ``B`` float tensors ``(K_b, 4)``, ``x0, y0, x1, y1`` in pixels of
            ``images_norm``; ``K_b`` may be 0.
        image_sizes: ``(h, w)`` of the valid (unpadded) region of each image, as torchvision's
            ``ImageList.image_sizes``; default the full ``(H, W)``.
        decode: if True the second output is decoded boxes instead of raw regressions.

    Returns:
        ``class_probs`` float ``(ΣK, C + 1)``: softmax over background + classes (column
        ``c + 1`` is our class ``c``), proposals in the order given, image after image;
        ``box_regression`` float ``(ΣK, (C + 1) · 4)``: the raw deltas ``(dx, dy, dw, dh)`` of
        each class (torchvision's ``BoxCoder`` weights 10, 10, 5, 5), or with ``decode=True``
        the decoded boxes ``x0, y0, x1, y1`` of each class in pixels of ``images_norm``
        (not clipped to the image).

    Differentiable with respect to ``images_norm``.

    Raises:
        ValueError: ``len(proposals) != B`` or a proposal tensor is not ``(K, 4)``.
    """
    if images_norm.dim() != 4 or images_norm.shape[1] != 3:
        raise ValueError(f"images_norm must be (B, 3, H, W), got {tuple(images_norm.shape)}")
    b, _, h, w = images_norm.shape
    if len(proposals) != b:
        raise ValueError(f"{len(proposals)} proposal tensors for {b} images")
    for p in proposals:
        if p.dim() != 2 or p.shape[1] != 4:
            raise ValueError(f"each proposal tensor must be (K, 4), got {tuple(p.shape)}")
    features = detector_features(detector, images_norm)
    sizes = [tuple(s) for s in image_sizes] if image_sizes is not None else [(h, w)] * b
    return detector_box_heads(detector, features, proposals, sizes, decode=decode)


def padded_shape(detector: FasterRCNN, shape: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` rounded up to a multiple of ``detector.transform.size_divisible`` (32): the size
    of the tensor :func:`detector_features` runs the backbone on."""
    div = int(getattr(detector.transform, "size_divisible", 32))
    return -(-int(shape[0]) // div) * div, -(-int(shape[1]) // div) * div


def detector_features(detector: FasterRCNN, images_norm: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """Backbone + FPN maps of already normalised images ``(B, 3, H, W)`` (zero-padded at the
    bottom/right to a multiple of ``detector.transform.size_divisible`` first, as the transform
    does). Returns the backbone's ``OrderedDict`` of FPN levels."""
    _, _, h, w = images_norm.shape
    ph, pw = padded_shape(detector, (h, w))
    x = F.pad(images_norm, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else images_norm
    return detector.backbone(x)


def detector_box_heads(
    detector: FasterRCNN,
    features: "OrderedDict[str, torch.Tensor]",
    proposals: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    *,
    decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIAlign + box head + predictor on ``features`` from :func:`detector_features`; arguments
    and outputs as :func:`detector_forward_heads`. The RoI poolers' level scales are the ones
    :func:`build_detector` fixed (see :func:`fix_roi_scales`), whatever ``image_sizes`` say."""
    ref = next(iter(features.values()))
    props = [p.to(dtype=ref.dtype, device=ref.device) for p in proposals]
    rh = detector.roi_heads
    feats = rh.box_roi_pool(features, props, [tuple(s) for s in image_sizes])
    feats = rh.box_head(feats)
    logits, regression = rh.box_predictor(feats)
    probs = F.softmax(logits, dim=-1)
    if decode:
        boxes = rh.box_coder.decode(regression, props)  # (ΣK, C + 1, 4)
        regression = boxes.reshape(boxes.shape[0], -1)
    return probs, regression
