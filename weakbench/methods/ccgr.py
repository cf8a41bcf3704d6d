"""CCGR: Center-context-gap refinement for weakly supervised instance segmentation (AAAI 2020;
the copy in ``shared/papers/004_*`` is the anonymous submission), as a weakbench plan.

Image-level labels only. Three branches trained in turn, for ``rounds`` rounds (paper: 3–5
iterations), with a classifier and box proposals before them. The algorithm (box integral,
CCGR loss and refinement, PRM peaks, bags, WSDDN scores) lives in
:mod:`weakbench.methods.ccgr_ops`; this module is the plan:

1. ``classifier`` (fit, shared): a CAM classifier (:class:`~weakbench.methods.cam.CAMNet`) on the
   image labels; its CAMs give the peaks and the round-1 semantic labels.
2. ``proposals`` (map, shared, no input): selective search (``cv2.ximgproc``; MCG is not
   available offline) on every image, at most ``proposal_max_side`` pixels on the long side,
   boxes mapped back to the image. The product depends only on the dataset fingerprint and the
   proposal settings, so every trial of a sweep — whatever its other hyperparameters — shares
   it; it is the "selective-search cache".
3. ``peaks`` (map, shared; classifier + proposals): PRM peaks of the CAM of each labelled class
   (3×3 local maxima at or above the map's median, at the CAM's own resolution), round-1 bags
   (per peak, the proposals holding only that peak, the top ``bag_size`` by Eq. 4 with the CAM
   foreground as O and, as B_S, the CAM's centre-surround contrast, ``objectness``) and round-1
   semantic labels (thresholded CAMs — AffinityNet, the paper's
   source, is not available offline: a declared deviation).
4. per round ``r`` (``r1``, ``r2``, …):

   * ``mil_r<r>`` (fit): the MIL branch, WSDDN on ROIAlign features of the bag proposals
     (paper Eq. for σ_cls, σ_det and the per-bag cross-entropy), its backbone started from the
     classifier's;
   * ``semantic_r<r>`` (fit): the SS branch, an FCN with a pyramid pooling module, trained with
     cross-entropy on the round's semantic labels (ignore pixels excluded);
   * ``refine_r<r>`` (map over every image of every split): the MIL-selected box of each bag
     (argmax of x^B in the bag's class row), refined by CCGR on the SS score map of its class
     (``refinement_steps`` steps of ``refinement_step_size``, context box ``context_scale`` ×
     the box), a box stops once it would hold another peak of its class (the paper's rule;
     ``peak_stop``, :func:`stopping_peaks`); pseudo masks = SS
     argmax equal to the box's class, inside the refined box (and, for comparison, inside the
     unrefined box);
   * ``instance_r<r>`` (fit): the IS branch, torchvision Mask R-CNN trained on the train split's
     pseudo masks and refined boxes;
   * ``instances_r<r>`` (map, rounds before the last): the IS branch's detections of the image's
     labelled classes become the next round's bags (the ``bag_size`` proposals of highest IoU
     with each box) and semantic labels (union of its masks per class).

5. ``evaluate`` (eval, **diagnostics**): per split (val, test) and per round, the pseudo masks of
   the split's images, made *with those images' own class labels* (so no mask has a wrong class:
   not the paper's measure, hence the namespace ``pseudo_masks_with_labels``): ``map_r25``,
   ``map_r50`` (mask mAP^r at IoU 0.25 / 0.5, VOC-style,
   :func:`weakbench.core.metrics.voc_instance_ap`), ``box_map50`` (box AP at 0.5, same rule), ``abo``,
   the same for the unrefined boxes' masks (``unrefined/…``) and for the MIL box filled as its
   mask (``box_filled/…``), and the mean IoU with GT of the MIL-selected boxes before and after
   refinement (``box_iou_before``, ``box_iou_after``: each box against the best GT box of its
   class; ``gt_box_iou_before`` / ``_after``: each GT instance against the best selected box of
   its class, which spurious peaks' boxes do not drag down). Keys: ``val/pseudo_masks_with_labels/map_r50``
   (the last round), ``…/r1/map_r50`` (every round), ``…/refinement_gain/box_iou``,
   ``…/round_gain/map_r50`` (last round minus round 1).
6. ``instance_eval`` (eval, **the headline**): the paper's protocol (Tables 1–3, as PRM and the other
   WSIS papers): the last round's IS branch alone on the held-out val and test images, *without*
   image labels: ``mask_rcnn/map_r50`` (mask mAP^r at IoU 0.5), ``mask_rcnn/map_r25``,
   ``mask_rcnn/box_map50`` (:func:`instance_branch_metrics`), COCOeval's summary beside them.
   Configurations are selected on ``val/mask_rcnn/map_r50`` and reported on test.

Diagnostics of the proposals and bags: ``<split>/proposals/proposal_recall`` (share of GT boxes
some proposal overlaps by IoU ≥ 0.5: the ceiling of any box picked among the proposals) and
``<split>/peaks/bag_best_iou`` against ``random_bag_best_iou`` (each bag's best IoU with a GT box
of its class, and the same for as many proposals drawn at random from the same candidates: what
Eq. 4's ranking adds).

Choices where the paper is silent or out of reach here (each documented where it is made):

* selective search instead of MCG. MCG scores its proposals; selective search does not, so Eq. 4's
  B_S is the CAM foreground's centre-surround contrast (``ccgr_ops.contrast_objectness``, ring of
  1.5× the box; ``objectness: cam_contrast``) — or, as before, ``1 − i/n`` over OpenCV's order
  (``objectness: rank``); both against random bags in docs/ccgr.md;
* round-1 semantic labels from thresholded CAMs instead of AffinityNet (``cam_fg_threshold``,
  ``cam_bg_threshold``; between them: ignore);
* the MIL and SS branches are separate networks whose backbones start from the classifier (the
  paper shares the convolutional layers; trained in turn, as here, the difference is only that
  the branches do not update a common trunk);
* MIL and SS use Adam (the paper: Adam, lr 1e-4, weight decay 1e-4); the IS branch uses SGD
  (torchvision's Mask R-CNN recipe; the paper's lr 1e-2 at batch 16 with Adam would diverge);
* the per-bag losses are averaged over the bags of a batch (the paper sums them: a constant
  factor absorbed by the learning rate);
* Mask R-CNN's backbone starts from the classifier's (the paper uses ImageNet weights);
* the next round's bags come from the IS detections of the image's labelled classes scoring at
  least ``instance_score_threshold``, and always from each labelled class's best detection (a
  branch trained a few epochs on pseudo labels scores below any fixed threshold); an image
  whose IS branch finds nothing of its labelled classes keeps its round-1 bags and labels;
* pseudo masks under 16 pixels (the SS branch does not see the class in the box) or with a box
  under 4 px a side are dropped (such targets made Mask R-CNN's box regression diverge);
* the IS branch's mask logits start as Detectron2's (weights normal with std 0.001, zero bias;
  ``build_detector(mask_logits_init="detectron2")``), not torchvision's Kaiming init, whose
  weight std is ``sqrt(2 / (C + 1))`` (1 for one class): with one class on a pretrained body
  (coco128 ``person``) the mask logits started far from 0 and SGD diverged to NaN (figures in
  docs/ccgr.md, "The instance branch");
* peaks below ``peak_min_score`` (0.2 of the class map's maximum) are dropped on top of PRM's
  median rule, which alone leaves several peaks per instance, most of them off any object (the
  count is in docs/ccgr.md); the extra peaks also split bags: a proposal may hold only its own
  peak;
* the refinement's stop is the paper's ("once it holds more than one peak": ``peak_stop: any``,
  the default); ``peak_stop: region`` counts the peaks of one SS region as one instance and
  ``off`` never stops (:func:`stopping_peaks`). The default budget is 200 steps of 0.02 box
  sides (a side travels up to ≈ 2.5 box sides), chosen on the synthetic default's val split.
  On test no rule is shown better than the paper's, so ``any`` stays the default: instance-branch
  mAP^r_0.5 any / region / off 29.2 / 21.5 / 21.9 on the synthetic default and 13.1 / 12.8 / 10.9
  on ``synthetic:touching`` (20 test images × 3 seeds; every paired difference's 95 % interval
  holds 0; table, intervals, scale and command in docs/ccgr.md,
  ``benchmarks/quality_ccgr_stop_rule.py``);
* image labels are used on val/test to make (and score) their pseudo masks, as BBAM uses boxes
  there: weak supervision provides them on every split. The IS branch is evaluated without them.

Headline metric: ``mask_rcnn/map_r50``, the IS branch on held-out images without labels
(selected on val, reported on test).

Measurements (proposals and bags, the step size, the stop rule, rounds 1–3, with split, image
count and command): docs/ccgr.md.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from weakbench.methods import ccgr_ops as ops
from weakbench.methods.bbam import (_image_tensor, _rle, _unrle, detection_metrics, mask_metrics_on_val_and_test,
                                    mask_rcnn_instances, random_hflip)
from weakbench.methods.bbam_ops import box_filled_mask
from weakbench.methods.base import Method, MethodConfig, register_method
from weakbench.methods.classifier import ClassifierFitTask
from weakbench.methods.pipeline import (PREDICTOR, UNUSED, FitTask, Stage, StageContext, StepContext, load_data,
                                        save_data)
from weakbench.methods.metric_declarations import MechanismCheck, RowDiagnostic, metric

#: fields of the CAM classifier (:class:`~weakbench.methods.classifier.ClassifierConfig`) that CCGR passes on
CLASSIFIER_FIELDS = ("backbone", "pretrained", "weights_path", "output_stride", "lr", "backbone_lr_mult", "weight_decay",
                     "momentum", "batch_size", "epochs", "input_size", "seed", "cam_curve_interval")
SPLITS = ("train", "val", "test")
IGNORE = 255
MIN_MASK_PIXELS = 16  #: pseudo masks smaller than this (pixels) are dropped
#: metric namespace of the pseudo-mask diagnostics (made with each image's own labels; declared as a
#: variant in weakbench.methods.metric_declarations so it never reads as the paper's measure)
PSEUDO_NS = "pseudo_masks_with_labels"


class CCGRConfig(MethodConfig):
    """CCGR hyperparameters (paper §"Implementation details"; scaled defaults say so), in one field
    group per stage (:attr:`CCGR.stage_groups`; the branches of round r read, through their inputs,
    the classifier's backbone, input size, seed and weight decay)."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "classifier": CLASSIFIER_FIELDS,
        "proposals": ("proposal_mode", "max_proposals", "proposal_min_size", "proposal_max_side", "max_images_per_split"),
        "peaks": ("bag_size", "cam_fg_threshold", "cam_bg_threshold", "peak_min_score", "objectness"),
        "branches": ("branch_batch_size",),
        "mil": ("mil_epochs", "mil_lr"),
        "semantic": ("semantic_epochs", "semantic_lr"),
        "refine": ("refine", "context_scale", "refinement_steps", "refinement_step_size", "refinement_step_unit",
                   "ccgr_form", "refinement_map", "peak_stop"),
        "instance": ("mask_rcnn_epochs", "mask_rcnn_lr", "mask_rcnn_batch_size", "fpn_channels", "box_head_size"),
        "next_round": ("instance_score_threshold", "next_round_from"),
        "rounds": ("rounds",),
        PREDICTOR: ("score_threshold",),
        # the classifier's SGD is plain and its lr constant (CLASSIFIER_FIELDS leave these at the CAM's
        # defaults): the engine refuses nesterov: true and a non-constant lr_schedule for it
        UNUSED: ("nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma")}

    output_stride: Literal[8, 16, 32] = Field(8, description="classifier output stride (8: peaks on a finer CAM)")
    epochs: int = Field(8, ge=0, le=1000, description="classifier epochs")
    lr: float = Field(0.01, gt=0, le=10, description="classifier SGD learning rate")
    input_size: int = Field(96, ge=32, le=1024, description="input side of every branch (classifier, MIL, SS; Mask "
                            "R-CNN's shorter side), pixels")
    batch_size: int = Field(16, ge=1, le=4096, description="classifier images per worker per step")
    # proposals
    proposal_mode: Literal["fast", "quality"] = Field("fast", description="selective search strategy (cv2.ximgproc)")
    max_proposals: int = Field(300, ge=10, le=5000, description="proposals kept per image, in selective search's order")
    proposal_min_size: float = Field(4.0, ge=1, le=256, description="proposals narrower or lower than this (pixels) are dropped")
    proposal_max_side: int = Field(224, ge=32, le=2048, description="selective search runs on the image resized to at most "
                                   "this long side, in pixels (a speed/recall trade-off; timings in docs/ccgr.md)")
    # peaks, bags, round-1 labels
    peak_min_score: float = Field(0.2, ge=0, lt=1, description="peaks whose normalised CAM value (of the class's "
                                  "maximum) is below this are dropped; 0: PRM's rule alone (local maxima at or above the "
                                  "map's median)")
    bag_size: int = Field(10, ge=1, le=100, description="proposals per bag (paper: 10)")
    objectness: Literal["cam_contrast", "rank"] = Field(
        "cam_contrast", description="Eq. 4's objectness B_S of each proposal (selective search gives none): "
        "'cam_contrast' (default) the centre-surround contrast of the CAM foreground (ccgr_ops.contrast_objectness); "
        "'rank' 1 − i/n over selective search's order (ccgr_ops.proposal_rank_scores, the earlier default)")
    cam_fg_threshold: float = Field(0.4, gt=0, lt=1, description="round-1 SS labels: a pixel whose largest normalised CAM "
                                    "of a labelled class is at or above this takes that class")
    cam_bg_threshold: float = Field(0.1, ge=0, lt=1, description="round-1 SS labels: below this, background; between the "
                                    "thresholds, ignore")
    # rounds and branches
    rounds: int = Field(2, ge=1, le=5, description="iterations of MIL → SS → CCGR → IS (paper: 3–5)")
    branch_batch_size: int = Field(8, ge=1, le=256, description="images per step of the MIL and SS branches (paper: 1)")
    mil_epochs: int = Field(6, ge=0, le=1000, description="MIL branch epochs per round")
    mil_lr: float = Field(1e-4, gt=0, le=1, description="MIL branch Adam learning rate (paper: 1e-4)")
    semantic_epochs: int = Field(8, ge=0, le=1000, description="SS branch epochs per round")
    semantic_lr: float = Field(1e-4, gt=0, le=1, description="SS branch Adam learning rate (paper: 1e-4)")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="weight decay of every branch (paper: 1e-4)")
    # CCGR
    refine: bool = Field(True, description="run the CCGR refinement (false: the MIL boxes are used as they are)")
    context_scale: float = Field(1.5, gt=1, le=4, description="context box: this times the box's width and height (paper: 1.5)")
    refinement_steps: int = Field(200, ge=0, le=5000, description="gradient steps of the box refinement (~200)")
    refinement_step_size: float = Field(0.02, gt=0, le=100, description="box refinement step: a fraction of the box's "
                                        "width / height (refinement_step_unit 'box') or pixels ('pixel'); see "
                                        "ccgr_ops.refine_boxes. 200 steps of 0.02 let a side travel ≈ 2.5 box sides: "
                                        "MIL boxes are far off (IoU ≈ 0.5 with GT) and shorter budgets stop at a worse "
                                        "local optimum (measured: docs/ccgr.md)")
    refinement_step_unit: Literal["box", "pixel"] = Field("box", description="unit of refinement_step_size: 'box' makes "
                                                          "the refinement independent of image and object size")
    ccgr_form: Literal["area_weighted", "literal"] = Field("area_weighted", description="Φ(C): the mean over the context "
                                                           "ring (default) or the paper's written Φ(B̃) − Φ(B)")
    peak_stop: Literal["any", "region", "off"] = Field(
        "any", description="when a refined box stops: 'any' (default, the paper's rule) once it would hold any other "
        "peak of its class; 'region' once it would hold a peak of its class outside the SS region of its own object "
        "(peaks of one SS region count as one instance: lets a box grow over a second instance that the SS map joins "
        "to its own); 'off' never. See stopping_peaks")
    refinement_map: Literal["probability", "label"] = Field(
        "probability", description="the map S the refinement reads for a box of class c: the SS branch's softmax "
        "probability of c (the paper's semantic score map; default) or its argmax label map as 0/1 (argmax == c), the "
        "map the pseudo masks are cut from")
    # instance branch
    mask_rcnn_epochs: int = Field(10, ge=0, le=1000, description="Mask R-CNN epochs per round")
    mask_rcnn_lr: float = Field(0.01, gt=0, le=10, description="Mask R-CNN SGD learning rate (paper: 1e-2 at batch 16)")
    mask_rcnn_batch_size: int = Field(4, ge=1, le=256, description="Mask R-CNN images per worker per step")
    fpn_channels: int = Field(64, ge=8, le=1024, description="Mask R-CNN FPN width (256 in torchvision; smaller for CPU)")
    box_head_size: int = Field(256, ge=16, le=4096, description="Mask R-CNN box head width (1024 in torchvision)")
    next_round_from: Literal["instance_branch", "pseudo_masks"] = Field(
        "instance_branch", description="what seeds round r + 1's bags and SS labels: the IS branch's detections and "
        "masks (the paper; default) or round r's own refined boxes and pseudo masks (the IS branch is then left out "
        "of the loop; it is still trained and scored). On a CPU budget the IS branch scores far below the pseudo "
        "masks it is trained on; this setting tells the loop's effect from that branch's")
    instance_score_threshold: float = Field(0.3, ge=0, le=1, description="IS detections of a labelled class at or above "
                                            "this seed the next round's bags and labels (and, always, each labelled "
                                            "class's best detection)")
    score_threshold: float = Field(0.5, ge=0, le=1, description="predictor: detections below this score are dropped")
    max_images_per_split: int | None = Field(None, ge=1, description="use at most this many images per split (CPU budgets)")
    cam_curve_interval: float = Field(0.01, gt=0, lt=1, description="classifier validation: WSOL threshold step")

    @model_validator(mode="after")
    def _thresholds_in_order(self):
        if self.cam_bg_threshold > self.cam_fg_threshold:
            raise ValueError(f"cam_bg_threshold ({self.cam_bg_threshold}) must be <= cam_fg_threshold "
                             f"({self.cam_fg_threshold}): pixels between the two are ignore")
        return self


# ---------------------------------------------------------------------------- networks
class MILNet(torch.nn.Module):
    """The MIL branch: WSDDN (Bilen & Vedaldi 2016) on ROIAlign features.

    ``forward(images, boxes)``: images float32 ``(B, 3, S, S)`` normalised, ``boxes`` a list of B
    float32 ``(R_b, 4)`` proposal boxes in input pixels → a list of B pairs ``(x_cls, x_det)``,
    each float32 ``(C, R_b)`` (the paper's classes × proposals layout), to be combined by
    :func:`weakbench.methods.ccgr_ops.wsddn_bag_scores` bag by bag.
    """

    def __init__(self, config: CCGRConfig, num_classes: int, hidden: int = 256, pool: int = 4):
        super().__init__()
        from weakbench.methods.backbones import create_backbone

        self.backbone = create_backbone(config.backbone, pretrained=config.pretrained, weights_path=config.weights_path,
                                        output_stride=config.output_stride)
        dim = self.backbone.feature_info.channels()[-1]
        self.stride = float(self.backbone.feature_info.reduction()[-1])
        self.pool = pool
        self.fc = torch.nn.Sequential(torch.nn.Linear(dim * pool * pool, hidden), torch.nn.ReLU(inplace=True),
                                      torch.nn.Linear(hidden, hidden), torch.nn.ReLU(inplace=True))
        self.cls = torch.nn.Linear(hidden, num_classes)
        self.det = torch.nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from torchvision.ops import roi_align

        feats = self.backbone(images)[-1]
        n = [len(b) for b in boxes]
        if sum(n) == 0:
            return [(feats.new_zeros((self.cls.out_features, 0)),) * 2 for _ in boxes]
        pooled = roi_align(feats, [b.to(feats) for b in boxes], (self.pool, self.pool), spatial_scale=1.0 / self.stride,
                           sampling_ratio=2, aligned=True)
        h = self.fc(pooled.flatten(1))
        xc, xd = self.cls(h).t(), self.det(h).t()
        out, s = [], 0
        for k in n:
            out.append((xc[:, s:s + k], xd[:, s:s + k]))
            s += k
        return out


class SemanticFCN(torch.nn.Module):
    """The SS branch: an FCN with a pyramid pooling module (Zhao et al. 2017, bins 1, 2, 3, 6).

    ``forward(images)``: float32 ``(B, 3, S, S)`` normalised → logits float32 ``(B, C + 1, S, S)``
    (channel 0 background, ``c + 1`` class ``c``), upsampled bilinearly to the input size.
    The PPM has no batch norm (batches of a few images; pooled 1×1 bins).
    """

    def __init__(self, config: CCGRConfig, num_classes: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        from weakbench.methods.backbones import create_backbone

        self.backbone = create_backbone(config.backbone, pretrained=config.pretrained, weights_path=config.weights_path,
                                        output_stride=config.output_stride)
        dim = self.backbone.feature_info.channels()[-1]
        red = max(16, dim // 4)
        self.bins = bins
        self.stages = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Conv2d(dim, red, 1), torch.nn.ReLU(inplace=True))
                                          for _ in bins)
        self.fuse = torch.nn.Sequential(torch.nn.Conv2d(dim + red * len(bins), red, 3, padding=1), torch.nn.ReLU(inplace=True))
        self.classifier = torch.nn.Conv2d(red, num_classes + 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone(images)[-1]
        h, w = f.shape[-2:]
        pyramid = [f] + [F.interpolate(st(F.adaptive_avg_pool2d(f, b)), size=(h, w), mode="bilinear", align_corners=False)
                         for b, st in zip(self.bins, self.stages)]
        logits = self.classifier(self.fuse(torch.cat(pyramid, dim=1)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _init_backbone_from(model: torch.nn.Module, classifier_dir: Path | None) -> None:
    """Start ``model.backbone`` from the trained classifier's backbone (same timm model; keys and
    shapes that match), so the branches start from the shared convolutional layers."""
    if classifier_dir is None:
        return
    state = load_data(Path(classifier_dir) / "model.pt")
    own = model.backbone.state_dict()
    sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model.backbone.load_state_dict({k: v for k, v in sub.items() if k in own and own[k].shape == v.shape}, strict=False)


# ---------------------------------------------------------------------------- products
def _paint_labels(masks, classes, scores, height: int, width: int) -> np.ndarray:
    """An SS label map ``(height, width)`` uint8 (0 background, ``c + 1`` class ``c``) from
    instance masks (bool ``(height, width)`` each) of 0-based ``classes``; where masks overlap,
    the higher score wins the pixel (the first of equal scores)."""
    label = np.zeros((height, width), np.uint8)
    best = np.full((height, width), -np.inf, np.float32)
    for m, k, sc in zip(masks, classes, scores):
        upd = m & (sc > best)
        label[upd] = int(k) + 1
        best[upd] = sc
    return label


def _png(label: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(label, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)


_TABLES: dict[str, Any] = {}


def _table(path: Path) -> dict[str, Any]:
    """A product table, loaded once per process (several stages read the same ones)."""
    key = str(path)
    if key not in _TABLES:
        if len(_TABLES) > 6:
            _TABLES.clear()
        _TABLES[key] = load_data(path)
    return _TABLES[key]


def _bag_source(inputs: dict[str, Path], r: int) -> tuple[Path, str]:
    """Product directory and file of round ``r``'s bags and semantic labels."""
    if r == 1:
        return inputs["peaks"], "peaks.pt"
    return inputs[f"instances_r{r - 1}"], "instances.pt"


class _BranchData(torch.utils.data.Dataset):
    """Train-split images of one round with their bags (MIL) or semantic labels (SS).

    Item: ``{"image": float32 (3, S, S), "index": int, "boxes": float32 (R, 4) input pixels,
    "bag_sizes": list[int], "bag_classes": list[int], "label": uint8 (S, S)}``, randomly flipped.
    """

    def __init__(self, method: "CCGR", source, indices, proposals: dict, table: dict, kind: Literal["mil", "semantic"]):
        self.method, self.source, self.kind = method, source, kind
        self.proposals, self.table = proposals, table
        self.keys = [f"train:{int(i)}" for i in indices if f"train:{int(i)}" in table
                     and (kind == "semantic" or table[f"train:{int(i)}"]["bags"])]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        from weakbench.core.data.transforms import image_to_tensor, resize_image

        key = self.keys[i]
        index = int(key.split(":")[1])
        entry = self.table[key]
        img = self.source.load_image(index)
        w, h = img.width, img.height
        s = self.method.config.input_size
        mean, std = self.method.input_normalization
        image = image_to_tensor(resize_image(img, s), mean, std)
        flip = bool(torch.rand(()) < 0.5)
        item: dict[str, Any] = {"index": index}
        if self.kind == "mil":
            props = torch.as_tensor(self.proposals[key], dtype=torch.float32)
            boxes = torch.cat([props[b] for b in entry["bags"]]) * torch.tensor([s / w, s / h, s / w, s / h])
            if flip:
                boxes = torch.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], dim=1)
            item.update(boxes=boxes, bag_sizes=[len(b) for b in entry["bags"]], bag_classes=list(entry["bag_classes"]))
        else:
            lab = torch.from_numpy(_unpng(entry["label"]).copy())[None, None].float()
            item["label"] = F.interpolate(lab, size=(s, s), mode="nearest")[0, 0].to(torch.uint8)
            if flip:
                item["label"] = item["label"].flip(-1)
        item["image"] = image.flip(-1) if flip else image
        return item


def _collate(items: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items]),
                           "index": torch.tensor([it["index"] for it in items])}
    if "label" in items[0]:
        out["label"] = torch.stack([it["label"] for it in items])
    if "boxes" in items[0]:
        out["boxes"] = [it["boxes"] for it in items]
        out["bag_sizes"] = [it["bag_sizes"] for it in items]
        out["bag_classes"] = [it["bag_classes"] for it in items]
    return out


class BranchFit(FitTask):
    """Fit stage of the MIL or SS branch of round ``r`` (Adam, the paper's optimiser)."""

    def __init__(self, method: "CCGR", kind: Literal["mil", "semantic"], r: int, inputs: dict[str, Path] | None):
        self.method, self.kind, self.r, self.inputs = method, kind, r, inputs
        self.batch_size = method.config.branch_batch_size
        self.seed = method.config.seed + 1000 * r

    def build_model(self) -> torch.nn.Module:
        c, n = self.method.config, self.method.num_classes
        model = MILNet(c, n) if self.kind == "mil" else SemanticFCN(c, n)
        _init_backbone_from(model, (self.inputs or {}).get("classifier"))
        return model

    def configure_optimizers(self, model):
        c = self.method.config
        lr = c.mil_lr if self.kind == "mil" else c.semantic_lr
        return {"main": torch.optim.Adam(model.parameters(), lr=lr, weight_decay=c.weight_decay)}

    def train_dataset(self, source, indices):
        directory, name = _bag_source(self.inputs, self.r)
        proposals = _table(self.inputs["proposals"] / "proposals.pt") if self.kind == "mil" else {}
        return _BranchData(self.method, source, indices, proposals, _table(directory / name), self.kind)

    def collate(self, items):
        return _collate(items)

    def to_device(self, batch, device):
        out = dict(batch)
        out["image"] = batch["image"].to(device)
        if "label" in batch:
            out["label"] = batch["label"].to(device)
        if "boxes" in batch:
            out["boxes"] = [b.to(device) for b in batch["boxes"]]
        return out

    def training_losses(self, model, batch, ctx: StepContext):
        if self.kind == "semantic":
            loss = F.cross_entropy(model(batch["image"]), batch["label"].long(), ignore_index=IGNORE)
            return {"loss": loss}
        n = self.method.num_classes
        losses = []
        for (xc, xd), sizes, classes in zip(model(batch["image"], batch["boxes"]), batch["bag_sizes"], batch["bag_classes"]):
            s = 0
            for k, c in zip(sizes, classes):
                phi = ops.wsddn_bag_scores(xc[:, s:s + k], xd[:, s:s + k])
                losses.append(ops.wsddn_loss(phi, F.one_hot(torch.tensor(int(c)), n).to(phi)))
                s += k
        loss = torch.stack(losses).mean() if losses else batch["image"].sum() * 0
        return {"loss": loss}


    @torch.no_grad()
    def validate(self, model, ctx: StageContext, last: bool) -> dict[str, float]:
        """SS branch, after its last epoch, on data with masks: ``miou`` (percent) of the argmax
        against the GT semantic masks of the val split (classes + background, ignore pixels out),
        so a reader sees how good the maps are that CCGR refines on."""
        if self.kind != "semantic" or not last or not ctx.source.has_masks:
            return {}
        from weakbench.core.data.transforms import image_to_tensor, resize_image

        n = self.method.num_classes + 1
        conf = torch.zeros(n, n, dtype=torch.int64)
        mean, std = self.method.input_normalization
        idx = list(ctx.splits["val"])[: ctx.max_images] if ctx.max_images else list(ctx.splits["val"])
        was = model.training
        model.eval()
        for i in idx:
            img = ctx.source.load_image(int(i))
            x = image_to_tensor(resize_image(img, self.method.config.input_size), mean, std)[None].to(ctx.device)
            pred = F.interpolate(model(x), size=(img.height, img.width), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
            gt = torch.from_numpy(ctx.source.annotations(int(i)).semantic_mask.astype(np.int64))
            ok = gt != IGNORE
            conf += torch.bincount(gt[ok] * n + pred[ok], minlength=n * n).reshape(n, n)
        model.train(was)
        inter = conf.diag().double()
        union = conf.sum(0).double() + conf.sum(1).double() - inter
        present = union > 0
        return {"miou": float(100.0 * (inter[present] / union[present]).mean()) if present.any() else 0.0}


class _PseudoInstanceData(torch.utils.data.Dataset):
    """Train images with CCGR pseudo instances (refined boxes, their masks, classes) as Mask R-CNN
    targets; images without one are skipped."""

    def __init__(self, source, indices, table: dict):
        self.source, self.table = source, table
        self.indices = [int(i) for i in indices if table.get(f"train:{int(i)}", {}).get("fg")]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        entry = self.table[f"train:{index}"]
        img = self.source.load_image(index)
        image = _image_tensor(img)
        masks = torch.from_numpy(np.stack([_unrle(r) for r in entry["fg"]]).astype(np.uint8))
        target = {"boxes": torch.as_tensor(entry["boxes_fg"], dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.as_tensor(entry["classes_fg"], dtype=torch.int64) + 1, "masks": masks, "index": index}
        return random_hflip(image, target)


class InstanceFit(FitTask):
    """Fit stage of round ``r``'s IS branch: torchvision Mask R-CNN on the round's pseudo masks."""

    def __init__(self, method: "CCGR", r: int, inputs: dict[str, Path] | None):
        self.method, self.r, self.inputs = method, r, inputs
        self.batch_size = method.config.mask_rcnn_batch_size
        self.seed = method.config.seed + 1000 * r + 7

    def build_model(self) -> torch.nn.Module:
        """Mask R-CNN on the method's backbone. It normalises images with the backbone's own
        statistics (``Method.input_normalization``, those the classifier whose body it starts from
        was trained with; e.g. mean = std = 0.5 for the Lite backbones), and a body with pretrained
        weights (``pretrained`` or ``weights_path``) has its batch norms frozen
        (``timm.layers.freeze_batch_norm_2d``; torchvision's detectors do the same with
        ``FrozenBatchNorm2d``): batches of a few images would otherwise re-estimate, and spoil,
        the pretrained statistics."""
        from weakbench.methods.detection import build_detector

        c = self.method.config
        mean, std = self.method.input_normalization
        model = build_detector("mask_rcnn", c.backbone, self.method.num_classes, min_size=c.input_size,
                               max_size=int(math.ceil(c.input_size * 1333 / 800)), image_mean=mean,
                               image_std=std, weights_path=c.weights_path, pretrained_backbone=c.pretrained,
                               output_stride=32, fpn_channels=c.fpn_channels, box_representation_size=c.box_head_size,
                               mask_logits_init="detectron2")
        cls_dir = (self.inputs or {}).get("classifier")
        if cls_dir is not None:  # the backbone starts from the classifier (the paper: from ImageNet weights)
            state = load_data(Path(cls_dir) / "model.pt")
            body = model.backbone.body
            own = body.state_dict()
            sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            body.load_state_dict({k: v for k, v in sub.items() if k in own and own[k].shape == v.shape}, strict=False)
        if c.pretrained or c.weights_path:
            from timm.layers import freeze_batch_norm_2d

            model.backbone.body = freeze_batch_norm_2d(model.backbone.body)
        return model

    def configure_optimizers(self, model):
        c = self.method.config
        params = [p for p in model.parameters() if p.requires_grad]
        return {"main": torch.optim.SGD(params, lr=c.mask_rcnn_lr, momentum=c.momentum, weight_decay=c.weight_decay)}

    def train_dataset(self, source, indices):
        return _PseudoInstanceData(source, indices, _table(self.inputs[f"refine_r{self.r}"] / "refined.pt"))

    def collate(self, items):
        from weakbench.methods.detection import collate_detection

        return collate_detection(items)

    def training_losses(self, model, batch, ctx):
        images, targets = batch
        targets = [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
        parts = model(images, targets)
        return {"loss": sum(parts.values()), **{k.replace("loss_", ""): v.detach() for k, v in parts.items()}}

    def validate(self, model, ctx: StageContext, last: bool) -> dict[str, float]:
        if not last or not ctx.source.has_masks:
            return {}
        idx = list(ctx.splits["val"])[: ctx.max_images] if ctx.max_images else list(ctx.splits["val"])
        return detection_metrics(model, ctx.source, idx, ctx.device, masks=True)


# ---------------------------------------------------------------------------- the method
@register_method("ccgr")
class CCGR(Method):
    """CCGR (classifier → proposals → peaks → rounds of MIL, SS, CCGR, IS); see the module docstring."""

    shape = "multi_branch"
    Config = CCGRConfig
    headline_metric = "mask_rcnn/map_r50"  #: the paper's protocol: the IS branch on held-out images, no labels
    compared_with: ClassVar[tuple[str, ...]] = ()
    compared_with_variants: ClassVar[tuple[str, ...]] = ("unrefined", "box_filled")
    mechanism_checks = (MechanismCheck("peak_recall", fails_below=50.0,
                                       words="peaks miss objects: peak recall {value:.0f} %"),
                        MechanismCheck("proposal_recall", fails_below=50.0,
                                       words="proposals miss objects: {value:.0f} % of GT boxes have a proposal at "
                                             "IoU 0.5"))
    #: on every board row: the proposals' ceiling and what Eq. 4's ranking adds over random bags
    row_diagnostics = (RowDiagnostic(("proposal_recall",), "proposal recall@0.5 {proposal_recall:.0f} % (the ceiling of "
                                                           "boxes picked among the proposals)"),
                       RowDiagnostic(("bag_best_iou", "random_bag_best_iou", "bag_top1_iou", "random_bag_top1_iou"),
                                     "bags (IoU with GT): best {bag_best_iou:.1f} %, top-1 {bag_top1_iou:.1f} %; "
                                     "random bags of the same size {random_bag_best_iou:.1f} % / "
                                     "{random_bag_top1_iou:.1f} %"))
    map_chunk_size = 8
    #: the stages' box, proposal, bag and peak metrics (masks: the common instance metrics)
    metrics = (
        metric("box_iou", "max", "%", "box IoU", "the overlap (IoU) with the true box of the picked boxes"),
        metric("box_iou_before", "max", "%", "box IoU before refinement",
               "the overlap (IoU) with the true box of the boxes picked before refinement"),
        metric("box_iou_after", "max", "%", "box IoU after refinement",
               "the overlap (IoU) with the true box of the boxes after refinement"),
        metric("gt_box_iou_before", "max", "%", "GT-box IoU before refinement",
               "for each true box, the best overlap (IoU) of a picked box before refinement"),
        metric("gt_box_iou_after", "max", "%", "GT-box IoU after refinement",
               "for each true box, the best overlap (IoU) of a picked box after refinement"),
        metric("ss_box_iou_before", None, "%", "SS-region IoU before refinement",
               "the overlap (IoU) of each picked box before refinement with the box of the segmentation branch's own region "
               "for it (a diagnostic of what the refinement is driven towards)"),
        metric("ss_box_iou_after", None, "%", "SS-region IoU after refinement",
               "the overlap (IoU) of each box after refinement with the box of the segmentation branch's own region for it"),
        metric("ss_blob_box_iou", None, "%", "SS-region box IoU",
               "the overlap (IoU) with the true box of the boxes of the segmentation branch's own regions"),
        metric("box_map50", "max", "%", "box mAP@0.5",
               "how well the predicted boxes find the true objects, counting a box right at IoU ≥ 0.5 (PASCAL VOC average "
               "precision per class, averaged over the classes)"),
        metric("proposal_recall", "max", "%", "proposal recall@0.5",
               "share of true objects that some box proposal overlaps by IoU ≥ 0.5: the ceiling of any method that picks "
               "its boxes among the proposals"),
        metric("bag_best_iou", "max", "%", "bag best IoU",
               "for each bag of proposals, the overlap (IoU) of its best proposal with the true boxes of its class, "
               "averaged over the bags"),
        metric("random_bag_best_iou", None, "%", "random bag best IoU",
               "the same for bags of as many proposals drawn at random from the same candidates (what the bag's "
               "ranking must beat)"),
        metric("bag_top1_iou", "max", "%", "bag top-1 IoU",
               "for each bag of proposals, the overlap (IoU) of its best-ranked proposal with the true boxes of its class, "
               "averaged over the bags"),
        metric("random_bag_top1_iou", None, "%", "random bag top-1 IoU",
               "the same for the first of as many proposals drawn at random from the same candidates"),
        metric("peak_recall", "max", "%", "peak recall", "share of true objects on which a peak of the class map falls"),
        metric("peak_precision", "max", "%", "peak precision", "share of the class map's peaks that fall on a true object of "
               "their class"),
        metric("peaks_per_image", None, "count", "peaks per image", "how many peaks the class maps have per image"),
        metric("mean_proposals", None, "count", "proposals per image", "how many box proposals an image has, on average"),
        metric("instances", None, "count", "instances", "how many object masks the stage made"),
        metric("detections", None, "count", "detections", "how many objects the detector found"),
    )
    #: the groups each stage reads (round r's stages by role); later stages read the earlier groups
    #: through their inputs. ``rounds`` shapes only the plan, so only the (trial-private) eval stages read it
    stage_groups = {"classifier": ("classifier",), "proposals": ("proposals",), "peaks": ("peaks",),
                    "mil": ("branches", "mil"), "semantic": ("branches", "semantic"), "refine": ("refine",),
                    "instance": ("instance",), "instances": ("next_round",), "evaluate": ("rounds",),
                    "instance_eval": ("rounds",)}

    def __init__(self, config, num_classes: int, multilabel: bool = True):
        super().__init__(config, num_classes, multilabel)
        from weakbench.methods.classifier import ClassifierConfig
        from weakbench.methods.cam import CAM

        c = self.config
        self.cam = CAM(ClassifierConfig(**{f: getattr(c, f) for f in CLASSIFIER_FIELDS}),
                       num_classes, multilabel)

    # ------------------------------------------------------------------ plan
    def plan(self) -> tuple[Stage, ...]:
        c = self.config
        stages = [
            Stage("classifier", "fit", epochs=c.epochs, shared=True),
            Stage("proposals", "map", shared=True, split="train"),
            Stage("peaks", "map", inputs=("classifier", "proposals"), shared=True, split="train"),
        ]
        for r in range(1, c.rounds + 1):
            src = "peaks" if r == 1 else f"instances_r{r - 1}"
            stages += [
                Stage(f"mil_r{r}", "fit", role="mil", epochs=c.mil_epochs, inputs=("classifier", "proposals", src),
                      shared=True),
                Stage(f"semantic_r{r}", "fit", role="semantic", epochs=c.semantic_epochs, inputs=("classifier", src),
                      shared=True),
                Stage(f"refine_r{r}", "map", role="refine",
                      inputs=("proposals", "peaks", src, f"mil_r{r}", f"semantic_r{r}"), shared=True, split="train"),
                Stage(f"instance_r{r}", "fit", role="instance", epochs=c.mask_rcnn_epochs,
                      inputs=("classifier", f"refine_r{r}"), shared=True),
            ]
            if r < c.rounds:
                stages.append(Stage(f"instances_r{r}", "map", role="instances",
                                    inputs=("proposals", "peaks", f"instance_r{r}", f"refine_r{r}"), shared=True,
                                    split="train"))
        stages += [
            Stage("evaluate", "eval", inputs=tuple(f"refine_r{r}" for r in range(1, c.rounds + 1)), split="val",
                  metric_ns=PSEUDO_NS),
            Stage("instance_eval", "eval", inputs=(f"instance_r{c.rounds}",), split="test", metric_ns="mask_rcnn"),
        ]
        return tuple(stages)

    def fit_task(self, stage: Stage, inputs=None) -> FitTask:
        if stage.name == "classifier":
            return ClassifierFitTask(self.cam)
        kind, _, r = stage.name.rpartition("_r")
        if kind in ("mil", "semantic"):
            return BranchFit(self, kind, int(r), dict(inputs) if inputs is not None else None)
        if kind == "instance":
            return InstanceFit(self, int(r), dict(inputs) if inputs is not None else None)
        raise NotImplementedError(f"ccgr has no fit stage {stage.name!r}")

    @property
    def input_normalization(self):
        return self.cam.input_normalization

    # ------------------------------------------------------------------ map stages
    def _keys(self, ctx: StageContext) -> list[str]:
        cap = self.config.max_images_per_split
        keys = []
        for split in SPLITS:
            idx = [int(i) for i in ctx.splits[split] if ctx.source.image_labels(int(i)).any()]
            keys += [f"{split}:{i}" for i in (idx[:cap] if cap else idx)]
        return keys

    def map_items(self, stage: Stage, ctx: StageContext) -> list[str]:
        return self._keys(ctx)

    def map_batch(self, stage: Stage, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        kind = stage.name.rpartition("_r")[0] or stage.name
        if stage.name == "proposals":
            return self._proposals(keys, ctx)
        if stage.name == "peaks":
            return self._peaks(keys, ctx)
        if kind == "refine":
            return self._refine(int(stage.name.rpartition("_r")[2]), keys, ctx)
        if kind == "instances":
            return self._instances(int(stage.name.rpartition("_r")[2]), keys, ctx)
        raise NotImplementedError(f"ccgr has no map stage {stage.name!r}")

    def _proposals(self, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        c = self.config
        out = {}
        for key in keys:
            img = ctx.source.load_image(int(key.split(":")[1]))
            scale = min(1.0, c.proposal_max_side / max(img.width, img.height))
            small = img if scale == 1.0 else img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
            boxes = ops.selective_search(np.asarray(small, dtype=np.uint8), mode=c.proposal_mode,
                                         max_proposals=c.max_proposals, min_size=c.proposal_min_size * scale)
            boxes = np.asarray(boxes, dtype=np.float32) / scale
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, img.width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, img.height)
            out[key] = boxes
        return out

    def _image_batch(self, keys: list[str], ctx: StageContext) -> tuple[torch.Tensor, list]:
        from weakbench.core.data.transforms import image_to_tensor, resize_image

        mean, std = self.input_normalization
        imgs = [ctx.source.load_image(int(k.split(":")[1])) for k in keys]
        x = torch.stack([image_to_tensor(resize_image(im, self.config.input_size), mean, std) for im in imgs])
        return x.to(ctx.device), imgs

    @torch.no_grad()
    def _peaks(self, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        c = self.config
        model = ctx.load_model("classifier")
        proposals = _table(ctx.inputs["proposals"] / "proposals.pt")
        x, imgs = self._image_batch(keys, ctx)
        cams = self.cam.cams(model, x).float().relu()  # (B, C, h, w)
        out = {}
        for b, key in enumerate(keys):
            index = int(key.split(":")[1])
            w, h = imgs[b].width, imgs[b].height
            labelled = [int(k) for k in np.flatnonzero(ctx.source.image_labels(index))]
            cam = cams[b, labelled]
            cam = cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
            ch, cw = cam.shape[-2:]
            peaks, peak_cls, peak_val = [], [], []
            for j, cls in enumerate(labelled):
                p = ops.find_peaks(cam[j])
                for y, xx in p.tolist():
                    if float(cam[j, y, xx]) < c.peak_min_score:
                        continue
                    # the centre of the CAM cell, in image pixels
                    peaks.append(((y + 0.5) * h / ch, (xx + 0.5) * w / cw))
                    peak_cls.append(cls)
                    peak_val.append(float(cam[j, y, xx]))
            up = F.interpolate(cam[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
            fg, arg = up.max(0)
            label = torch.full((h, w), IGNORE, dtype=torch.uint8)
            label[fg < c.cam_bg_threshold] = 0
            sel = fg >= c.cam_fg_threshold
            label[sel] = (torch.as_tensor(labelled)[arg[sel]] + 1).to(torch.uint8)
            props = torch.as_tensor(proposals[key], dtype=torch.float32)
            peak_t = torch.as_tensor(peaks, dtype=torch.float32).reshape(-1, 2)
            cls_t = torch.as_tensor(peak_cls, dtype=torch.int64)
            bags, bag_classes = [], []
            random_bags: list[list[int]] = []
            if len(props) and len(peak_t):
                if c.objectness == "cam_contrast":
                    # the paper's 1.5 ring, not the refinement's context_scale: a sweep over that field
                    # keeps sharing the peaks, bags and round-1 branches
                    objectness = ops.contrast_objectness(fg, props)
                else:
                    objectness = ops.proposal_rank_scores(len(props))
                ranking = ops.rank_proposals(objectness, props, 1.0 - fg)
                # a diagnostic of the ranking: bags of as many proposals drawn at random from the same
                # candidates (those holding only their peak), a random ranking's top k
                gen = torch.Generator().manual_seed(int(c.seed) * 100003 + index)
                shuffled = ops.peak_bags(peak_t, cls_t, props, torch.rand(len(props), generator=gen), top_k=c.bag_size)
                for k, bag in enumerate(ops.peak_bags(peak_t, cls_t, props, ranking, top_k=c.bag_size)):
                    if len(bag):
                        bags.append(bag.tolist())
                        bag_classes.append(int(cls_t[k]))
                        random_bags.append(shuffled[k].tolist())
            out[key] = {"peaks": peak_t.numpy(), "peak_classes": cls_t.numpy(), "peak_scores": np.asarray(peak_val, np.float32),
                        "bags": bags, "bag_classes": bag_classes, "random_bags": random_bags,
                        "label": _png(label.numpy())}
        return out

    @torch.no_grad()
    def _refine(self, r: int, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        c = self.config
        mil, sem = ctx.load_model(f"mil_r{r}"), ctx.load_model(f"semantic_r{r}")
        directory, name = _bag_source(ctx.inputs, r)
        bags_table = _table(directory / name)
        peaks_table = _table(ctx.inputs["peaks"] / "peaks.pt")
        proposals = _table(ctx.inputs["proposals"] / "proposals.pt")
        x, imgs = self._image_batch(keys, ctx)
        s = c.input_size
        logits = sem(x)
        out = {}
        for b, key in enumerate(keys):
            w, h = imgs[b].width, imgs[b].height
            entry = bags_table.get(key) or peaks_table[key]
            if not entry["bags"]:
                entry = peaks_table[key]
            props = torch.as_tensor(proposals[key], dtype=torch.float32)
            prob = F.interpolate(logits[b:b + 1], size=(h, w), mode="bilinear", align_corners=False)[0].softmax(0).cpu()
            label_map = prob.argmax(0).numpy()
            res = {"boxes_before": np.zeros((0, 4), np.float32), "boxes_after": np.zeros((0, 4), np.float32),
                   "classes": np.zeros((0,), np.int64), "scores": np.zeros((0,), np.float32), "steps": np.zeros((0,), np.int64),
                   "fg": [], "fg_unrefined": [], "boxes_fg": [], "classes_fg": [], "scores_fg": [],
                   "boxes_unrefined_fg": [], "classes_unrefined_fg": [], "scores_unrefined_fg": []}
            if entry["bags"] and len(props):
                boxes = [props[torch.as_tensor(bag)] for bag in entry["bags"]]
                scale = torch.tensor([s / w, s / h, s / w, s / h])
                xc, xd = mil(x[b:b + 1], [(torch.cat(boxes) * scale).to(x.device)])[0]
                sel, scores, cls = [], [], []
                st = 0
                for bag_boxes, k in zip(boxes, entry["bag_classes"]):
                    n = len(bag_boxes)
                    xb = xc[:, st:st + n].softmax(0) * xd[:, st:st + n].softmax(1)
                    j = int(xb[k].argmax())
                    sel.append(bag_boxes[j])
                    scores.append(float(xb[k].sum().clamp(0, 1)))
                    cls.append(int(k))
                    st += n
                before = torch.stack(sel)
                cls_t = torch.as_tensor(cls)
                after, steps = before.clone(), torch.zeros(len(before), dtype=torch.int64)
                if c.refine and c.refinement_steps > 0:
                    others = None
                    if c.peak_stop != "off":
                        others = stopping_peaks(label_map if c.peak_stop == "region" else None, before.numpy(), cls,
                                                peaks_table[key]["peaks"], peaks_table[key]["peak_classes"])
                    if c.refinement_map == "label":
                        maps = (torch.from_numpy(label_map)[None] == (cls_t + 1)[:, None, None]).float()
                    else:
                        maps = prob[cls_t + 1]
                    with torch.enable_grad():
                        after, info = ops.refine_boxes(maps, before, steps=c.refinement_steps,
                                                       step_size=c.refinement_step_size, context_scale=c.context_scale,
                                                       form=c.ccgr_form, peaks=others, step_unit=c.refinement_step_unit)
                    after = after.detach()
                    steps = torch.as_tensor(info.get("steps", steps))
                res.update(boxes_before=before.numpy(), boxes_after=after.numpy(), classes=cls_t.numpy(),
                           scores=np.asarray(scores, np.float32), steps=steps.numpy(),
                           ss_blob_boxes=ss_blob_boxes(label_map, before.numpy(), cls))
                for tag, bx in (("", after), ("unrefined_", before)):
                    for box, k, sc in zip(bx, cls, scores):
                        m = ops.pseudo_instance_mask(label_map, k + 1, box)
                        m = np.asarray(m, dtype=bool)
                        # a few pixels or a sliver of a box is no instance; such targets also make
                        # Mask R-CNN's box regression diverge
                        if m.sum() >= MIN_MASK_PIXELS and float(box[2] - box[0]) >= 4 and float(box[3] - box[1]) >= 4:
                            res["fg" if not tag else "fg_unrefined"].append(_rle(m))
                            res[f"boxes_{tag}fg"].append(box.tolist())
                            res[f"classes_{tag}fg"].append(k)
                            res[f"scores_{tag}fg"].append(sc)
            out[key] = res
        return out

    @torch.no_grad()
    def _instances(self, r: int, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        c = self.config
        proposals = _table(ctx.inputs["proposals"] / "proposals.pt")
        if c.next_round_from == "pseudo_masks":
            return self._instances_from_pseudo_masks(r, keys, ctx, proposals)
        model = ctx.load_model(f"instance_r{r}")
        out = {}
        for key in keys:
            index = int(key.split(":")[1])
            img = ctx.source.load_image(index)
            o = model([_image_tensor(img).to(ctx.device)])[0]
            labelled = set(int(k) for k in np.flatnonzero(ctx.source.image_labels(index)))
            lab = (o["labels"] - 1).cpu()
            sc_all = o["scores"].cpu()
            mine = torch.as_tensor([int(v) in labelled for v in lab], dtype=torch.bool)
            keep = (sc_all >= c.instance_score_threshold) & mine
            # every labelled class the IS branch finds seeds the next round with at least its best
            # detection: a branch trained for a few epochs on pseudo labels scores below any fixed
            # threshold (0.05–0.13 on the synthetic default after 10 epochs)
            for k in labelled:
                cls_idx = torch.nonzero(mine & (lab == k)).flatten()
                if len(cls_idx):
                    keep[cls_idx[sc_all[cls_idx].argmax()]] = True
            boxes, lab, scores = o["boxes"].cpu()[keep], lab[keep], o["scores"].cpu()[keep]
            masks = (o["masks"].cpu()[keep, 0] > 0.5) if len(boxes) else torch.zeros((0, img.height, img.width), dtype=torch.bool)
            props = torch.as_tensor(proposals[key], dtype=torch.float32)
            if not len(boxes) or not len(props):
                out[key] = {"bags": [], "bag_classes": [], "label": None, "detections": 0}
                continue
            bags = ops.iou_bags(boxes, props, top_k=c.bag_size)
            label = _paint_labels(masks.numpy(), lab.tolist(), scores.tolist(), img.height, img.width)
            out[key] = {"bags": [bg.tolist() for bg in bags], "bag_classes": lab.tolist(), "label": _png(label),
                        "detections": int(len(boxes))}
        return out

    def _instances_from_pseudo_masks(self, r: int, keys: list[str], ctx: StageContext, proposals: dict) -> dict[str, Any]:
        """``next_round_from: pseudo_masks``: round r's refined boxes seed the next round's bags (the
        ``bag_size`` proposals of highest IoU with each) and its pseudo masks, painted in order
        of MIL score (a higher score wins a pixel), its SS labels, as the IS detections do by
        default. An image with no pseudo mask keeps its round-1 bags and labels (map_reduce)."""
        table = _table(ctx.inputs[f"refine_r{r}"] / "refined.pt")
        out = {}
        for key in keys:
            e = table.get(key) or {}
            rec = ctx.source.records[int(key.split(":")[1])]
            props = torch.as_tensor(proposals[key], dtype=torch.float32)
            boxes = torch.as_tensor(np.asarray(e.get("boxes_fg", []), dtype=np.float32)).reshape(-1, 4)
            if not len(boxes) or not len(props):
                out[key] = {"bags": [], "bag_classes": [], "label": None, "detections": 0}
                continue
            bags = ops.iou_bags(boxes, props, top_k=self.config.bag_size)
            label = _paint_labels((_unrle(rle) for rle in e["fg"]), e["classes_fg"], e["scores_fg"], rec.height,
                                  rec.width)
            out[key] = {"bags": [bg.tolist() for bg in bags], "bag_classes": [int(k) for k in e["classes_fg"]],
                        "label": _png(label), "detections": int(len(boxes))}
        return out

    def map_reduce(self, stage: Stage, results: dict[str, Any], ctx: StageContext) -> dict[str, float]:
        kind = stage.name.rpartition("_r")[0] or stage.name
        if stage.name == "proposals":
            save_data(results, ctx.out_dir / "proposals.pt")
            n = [len(v) for v in results.values()]
            return {"images": float(len(n)), "mean_proposals": float(np.mean(n)) if n else 0.0,
                    **self._proposal_recall(results, ctx)}
        if stage.name == "peaks":
            save_data(results, ctx.out_dir / "peaks.pt")
            return self._peak_metrics(results, ctx)
        if kind == "refine":
            save_data(results, ctx.out_dir / "refined.pt")
            return {"instances": float(sum(len(v["fg"]) for v in results.values())),
                    "boxes": float(sum(len(v["classes"]) for v in results.values()))}
        if kind == "instances":
            peaks = _table(ctx.inputs["peaks"] / "peaks.pt")
            for key, v in results.items():  # nothing found: the image keeps its round-1 bags and labels
                if not v["bags"] or v["label"] is None:
                    results[key] = {**peaks[key], "detections": v.get("detections", 0)}
            save_data(results, ctx.out_dir / "instances.pt")
            return {"detections": float(sum(v.get("detections", 0) for v in results.values()))}
        raise NotImplementedError(f"ccgr has no map stage {stage.name!r}")

    @staticmethod
    def _bag_quality(results: dict[str, Any], ctx: StageContext, split: str) -> dict[str, list[float]]:
        """For each bag of ``split``, IoUs with the GT boxes of the bag's class (0 where the image has
        none): ``bag_best_iou`` the best over its proposals, ``bag_top1_iou`` its first (best-ranked)
        proposal's best, and ``random_bag_best_iou`` / ``random_bag_top1_iou`` the same for its random
        twin (``random_bags``: as many proposals drawn at random from the same candidates)."""
        proposals = _table(ctx.inputs["proposals"] / "proposals.pt")
        q: dict[str, list[float]] = {k: [] for k in ("bag_best_iou", "bag_top1_iou", "random_bag_best_iou",
                                                     "random_bag_top1_iou")}
        for key, v in results.items():
            if not key.startswith(split + ":") or not v["bags"]:
                continue
            gb, gc = ctx.source.gt_boxes(int(key.split(":")[1]))
            gb = torch.as_tensor(np.asarray(gb, dtype=np.float32)).reshape(-1, 4)
            gc = np.asarray(gc).reshape(-1)
            props = torch.as_tensor(np.asarray(proposals[key], dtype=np.float32)).reshape(-1, 4)
            for bag, twin, k in zip(v["bags"], v.get("random_bags", v["bags"]), v["bag_classes"]):
                g = gb[torch.as_tensor(gc == int(k))]
                for sel, pre in ((bag, "bag"), (twin, "random_bag")):
                    ious = (ops.best_iou_with_gt(props[torch.as_tensor(sel, dtype=torch.long)], g)
                            if len(sel) and len(g) else torch.zeros(max(1, len(sel))))
                    q[f"{pre}_best_iou"].append(float(ious.max()))
                    q[f"{pre}_top1_iou"].append(float(ious[0]))
        return q

    @staticmethod
    def _proposal_recall(results: dict[str, Any], ctx: StageContext) -> dict[str, float]:
        """Per split, ``<split>/proposal_recall``: the share (percent) of GT boxes of the split's
        images that some proposal overlaps by IoU ≥ 0.5 (``torchvision.ops.box_iou``) — the
        ceiling of any box picked among the proposals."""
        out: dict[str, float] = {}
        for split in SPLITS:
            best: list[float] = []
            for key, props in results.items():
                if key.startswith(split + ":"):
                    gb, _ = ctx.source.gt_boxes(int(key.split(":")[1]))
                    gb = torch.as_tensor(np.asarray(gb, dtype=np.float32)).reshape(-1, 4)
                    if len(gb):
                        p = torch.as_tensor(np.asarray(props, dtype=np.float32)).reshape(-1, 4)
                        best += ops.best_iou_with_gt(gb, p).tolist() if len(p) else [0.0] * len(gb)
            if best:
                out[f"{split}/proposal_recall"] = 100.0 * float(np.mean(np.asarray(best) >= 0.5))
        return out

    def _peak_metrics(self, results: dict[str, Any], ctx: StageContext) -> dict[str, float]:
        """Peak recall (share of GT instances of each split holding a peak of their class, inside
        the instance mask where the data has masks, else inside the box), peaks per image, and the
        share of peaks that fall on a GT instance of their class (precision)."""
        out: dict[str, float] = {}
        for split in SPLITS:
            found = total = hits = npk = 0
            nimg = 0
            for key, v in results.items():
                if not key.startswith(split + ":"):
                    continue
                nimg += 1
                a = ctx.source.annotations(int(key.split(":")[1]))
                pk, pc = np.asarray(v["peaks"]).reshape(-1, 2), np.asarray(v["peak_classes"])
                iy = np.clip(pk[:, 0].astype(int), 0, ctx.source.records[int(key.split(':')[1])].height - 1)
                ix = np.clip(pk[:, 1].astype(int), 0, ctx.source.records[int(key.split(':')[1])].width - 1)
                on_gt = np.zeros(len(pk), bool)
                for k in range(a.num_instances):
                    cls = int(a.box_classes[k])
                    if a.instance_masks is not None:
                        inside = a.instance_masks[k][iy, ix]
                    else:
                        x0, y0, x1, y1 = a.boxes[k]
                        inside = (pk[:, 1] >= x0) & (pk[:, 1] < x1) & (pk[:, 0] >= y0) & (pk[:, 0] < y1)
                    mine = inside & (pc == cls)
                    found += bool(mine.any())
                    on_gt |= mine
                    total += 1
                hits += int(on_gt.sum())
                npk += len(pk)
            q = self._bag_quality(results, ctx, split)
            if q["bag_best_iou"]:
                out.update({f"{split}/{k}": 100.0 * float(np.mean(v)) for k, v in q.items()})
            if nimg:
                out[f"{split}/peak_recall"] = 100.0 * found / max(1, total)
                out[f"{split}/peak_precision"] = 100.0 * hits / max(1, npk)
                out[f"{split}/peaks_per_image"] = npk / nimg
        return out

    # ------------------------------------------------------------------ eval stages
    def evaluate_stage(self, stage: Stage, ctx: StageContext) -> tuple[dict[str, float], list]:
        if stage.name == "evaluate":
            return self._evaluate_rounds(ctx)
        if stage.name == "instance_eval":
            if not ctx.source.has_masks:
                return {}, []
            return instance_branch_metrics(mask_metrics_on_val_and_test(
                ctx.load_model(f"instance_r{self.config.rounds}"), ctx)), []
        raise NotImplementedError(f"ccgr has no eval stage {stage.name!r}")

    def _evaluate_rounds(self, ctx: StageContext) -> tuple[dict[str, float], list]:
        from weakbench.methods.base import save_split_tables
        from weakbench.core.metrics import coco_gt_from_source, coco_instance_eval
        from weakbench.core.metrics.instance import per_image_tables
        from weakbench.core.metrics.per_image import merge_tables
        from weakbench.core.overlay import instance_overlay

        if not ctx.source.has_masks:
            return {}, []
        out: dict[str, float] = {}
        overlays: list = []
        rounds = self.config.rounds
        tables: dict = {}
        ns = ctx.stage.metric_ns or ctx.stage.name
        for split in ("val", "test"):
            for r in range(1, rounds + 1):
                table = _table(ctx.inputs[f"refine_r{r}"] / "refined.pt")
                keys = [k for k in table if k.startswith(split + ":")]
                if not keys:
                    continue
                indices = [int(k.split(":")[1]) for k in keys]
                gt = coco_gt_from_source(ctx.source, indices, masks=True)
                m: dict[str, float] = {}
                parts: list = []
                for tag, fg, bx, cl, sc in (("", "fg", "boxes_fg", "classes_fg", "scores_fg"),
                                            ("unrefined/", "fg_unrefined", "boxes_unrefined_fg", "classes_unrefined_fg",
                                             "scores_unrefined_fg")):
                    res = []
                    for key, idx in zip(keys, indices):
                        e = table[key]
                        for rle, box, k, s in zip(e[fg], e[bx], e[cl], e[sc]):
                            x0, y0, x1, y1 = box
                            res.append({"image_id": idx, "category_id": int(k) + 1, "score": float(s), "segmentation": rle,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0]})
                    ev = coco_instance_eval(gt, res, iou_types=("segm", "bbox"))
                    if r == rounds:  # per-image rows behind the last round's mAP^r (the board's bootstrap)
                        parts.append(per_image_tables(gt, res, f"{ns}/{tag}".rstrip("/"), ("segm", "bbox")))
                    m.update({f"{tag}map_r25": ev["segm_map_r25"], f"{tag}map_r50": ev["segm_map_r50"],
                              f"{tag}box_map50": ev["bbox_map_r50"], f"{tag}abo": ev.get("abo", 0.0),
                              f"{tag}num_instances": float(len(res))})
                # the MIL box filled as its own mask: what the SS branch's shape adds over the box
                res = []
                for key, idx in zip(keys, indices):
                    e = table[key]
                    rec = ctx.source.records[idx]
                    for box, k, s in zip(e["boxes_before"], e["classes"], e["scores"]):
                        x0, y0, x1, y1 = (float(v) for v in box)
                        res.append({"image_id": idx, "category_id": int(k) + 1, "score": float(s),
                                    "segmentation": _rle(box_filled_mask(box, rec.height, rec.width)),
                                    "bbox": [x0, y0, x1 - x0, y1 - y0]})
                ev = coco_instance_eval(gt, res, iou_types=("segm",))
                m["box_filled/map_r50"], m["box_filled/map_r25"] = ev["segm_map_r50"], ev["segm_map_r25"]
                if r == rounds:
                    parts.append(per_image_tables(gt, res, f"{ns}/box_filled", ("segm",)))
                    tables[split] = merge_tables(parts)
                before, after = [], []
                for key, idx in zip(keys, indices):
                    e = table[key]
                    gb, gc = ctx.source.gt_boxes(idx)
                    before += _best_iou(e["boxes_before"], e["classes"], gb, gc)
                    after += _best_iou(e["boxes_after"], e["classes"], gb, gc)
                m["box_iou_before"] = 100.0 * float(np.mean(before)) if before else 0.0
                m["box_iou_after"] = 100.0 * float(np.mean(after)) if after else 0.0
                m["refinement_gain/box_iou"] = m["box_iou_after"] - m["box_iou_before"]
                # the other way round: each GT instance's best selected box of its class (spurious
                # peaks' boxes, which drag the mean over boxes down, do not count here)
                gt_before, gt_after = [], []
                for key, idx in zip(keys, indices):
                    e = table[key]
                    gb, gc = ctx.source.gt_boxes(idx)
                    gt_before += _best_iou(gb, gc, e["boxes_before"], e["classes"]) if len(e["classes"]) else [0.0] * len(gb)
                    gt_after += _best_iou(gb, gc, e["boxes_after"], e["classes"]) if len(e["classes"]) else [0.0] * len(gb)
                m["gt_box_iou_before"] = 100.0 * float(np.mean(gt_before)) if gt_before else 0.0
                m["gt_box_iou_after"] = 100.0 * float(np.mean(gt_after)) if gt_after else 0.0
                # what the refinement is driven by: the SS map's own region for each box (the box
                # of its connected argmax component overlapping the MIL box most); the refinement
                # moving boxes towards it while GT IoU falls means the map, not the step, is off
                ss_before, ss_after, ss_gt = [], [], []
                for key, idx in zip(keys, indices):
                    e = table[key]
                    blobs = np.asarray(e.get("ss_blob_boxes", np.zeros((0, 4))), dtype=np.float32).reshape(-1, 4)
                    has = blobs[:, 2] > blobs[:, 0]
                    if not has.any():
                        continue
                    gb, gc = ctx.source.gt_boxes(idx)
                    ss_before += _pair_iou(np.asarray(e["boxes_before"])[has], blobs[has])
                    ss_after += _pair_iou(np.asarray(e["boxes_after"])[has], blobs[has])
                    ss_gt += _best_iou(blobs[has], np.asarray(e["classes"])[has], gb, gc)
                if ss_before:
                    m["ss_box_iou_before"] = 100.0 * float(np.mean(ss_before))
                    m["ss_box_iou_after"] = 100.0 * float(np.mean(ss_after))
                    m["ss_blob_box_iou"] = 100.0 * float(np.mean(ss_gt))
                out.update({f"{split}/r{r}/{k}": v for k, v in m.items()})
                if r == rounds:
                    out.update({f"{split}/{k}": v for k, v in m.items()})
                    if split == "val":
                        for key, idx in zip(keys, indices):
                            e = table[key]
                            if len(overlays) >= ctx.num_overlays or not e["fg"]:
                                continue
                            img = np.asarray(ctx.source.load_image(idx), dtype=np.uint8)
                            names = [ctx.source.class_names[int(k)] for k in e["classes_fg"]]
                            overlays.append((f"{idx:05d}_ccgr.png", instance_overlay(
                                img, np.stack([_unrle(q) for q in e["fg"]]), [list(b) for b in e["boxes_fg"]], names,
                                title=f"CCGR pseudo masks, round {r} (val)")))
            if f"{split}/r1/map_r50" in out and f"{split}/r{rounds}/map_r50" in out:
                out[f"{split}/round_gain/map_r50"] = out[f"{split}/r{rounds}/map_r50"] - out[f"{split}/r1/map_r50"]
        save_split_tables(tables, ctx)
        return out, overlays

    # ------------------------------------------------------------------ inference
    def build_predictor(self, ctx: StageContext):
        from weakbench.methods.instance import InstancePredictor

        models = {"mask_rcnn": ctx.load_model(f"instance_r{self.config.rounds}").cpu().eval()}
        return InstancePredictor(self, models, ctx.source.class_names, self.config.input_size,
                                 score_threshold=self.config.score_threshold)

    def predict_instances(self, models: dict[str, torch.nn.Module], images: list[torch.Tensor], *,
                          score_threshold: float) -> list[dict[str, torch.Tensor]]:
        """The paper's inference: the IS branch alone (Mask R-CNN, masks ``> 0.5``)."""
        return mask_rcnn_instances(models["mask_rcnn"], images, score_threshold)


def instance_branch_metrics(coco: dict[str, float]) -> dict[str, float]:
    """The IS branch's scores as CCGR reports them (its Tables 1–3), each logged once.

    ``coco`` is :func:`weakbench.core.metrics.coco_instance_eval`'s output per split
    (``val/segm_map_r50`` …). Returns, per split: ``map_r50``, ``map_r25`` (mask mAP^r, VOC-style,
    :func:`~weakbench.core.metrics.voc_instance_ap`), ``box_map50`` (box AP at IoU 0.5, the same
    VOC rule), ``abo``, and COCOeval's own summary under its ``segm_`` / ``bbox_`` names
    (``segm_ap``, ``segm_ap50`` …: COCO's 101-point AP, a different number from mAP^r). The
    VOC box AP at 0.25 is dropped (the paper does not report it).
    """
    out: dict[str, float] = {}
    for key, v in coco.items():
        split, _, name = key.rpartition("/")
        pre = f"{split}/" if split else ""
        renamed = {"segm_map_r50": "map_r50", "segm_map_r25": "map_r25", "bbox_map_r50": "box_map50"}
        if name == "bbox_map_r25":
            continue
        out[pre + renamed.get(name, name)] = v
    return out


def _own_regions(label_map: np.ndarray, boxes: np.ndarray, classes) -> tuple[dict[int, np.ndarray], list[int]]:
    """The SS region of each box's object: per class ``k`` of ``classes`` the 8-connected
    components of ``label_map == k + 1`` (an int ``(H, W)`` id map, 0 outside), and per box the id
    of the component that overlaps the box most (0 where the class has no pixel inside it)."""
    from scipy import ndimage

    h, w = label_map.shape
    regions: dict[int, np.ndarray] = {}
    own: list[int] = []
    for box, k in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), classes):
        k = int(k)
        if k not in regions:
            regions[k] = ndimage.label(label_map == k + 1, structure=np.ones((3, 3), bool))[0]
        x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
        x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
        ids = regions[k][y0:y1, x0:x1].ravel()
        ids = ids[ids > 0]
        own.append(int(np.bincount(ids).argmax()) if len(ids) else 0)
    return regions, own


def ss_blob_boxes(label_map: np.ndarray, boxes: np.ndarray, classes) -> np.ndarray:
    """For each box (N, 4) ``x0, y0, x1, y1`` in pixels of class ``classes[i]`` (0-based), the
    bounding box (N, 4, float32, pixels, ``x1``/``y1`` exclusive) of the 8-connected component
    of ``label_map == class + 1`` (H, W, int; 0 = background) that overlaps the box most; all
    zeros where the class has no pixel inside the box. A diagnostic of the refinement's input:
    the box the SS map itself outlines for that object."""
    from scipy import ndimage

    out = np.zeros((len(boxes), 4), np.float32)
    regions, own = _own_regions(label_map, boxes, classes)
    slices = {k: ndimage.find_objects(lab) for k, lab in regions.items()}
    for i, (k, best) in enumerate(zip(classes, own)):
        if best:
            sy, sx = slices[int(k)][best - 1]
            out[i] = (sx.start, sy.start, sx.stop, sy.stop)
    return out


def stopping_peaks(label_map: np.ndarray | None, boxes: np.ndarray, classes, peaks, peak_classes) -> list[torch.Tensor]:
    """The peaks that stop each box's refinement (``ccgr_ops.refine_boxes``'s ``peaks``).

    The paper stops refining a box "once it holds more than one peak": one box, one instance.
    PRM-style peaks are not one per instance, though (docs/ccgr.md counts them). Read literally
    (``label_map`` None, option ``peak_stop: any``, the default), the stop then can keep a box
    from growing over its own object. The option
    ``peak_stop: region`` counts peaks as instances by the SS branch's own regions: a peak of
    the box's class is no stop when it lies in the same 8-connected region of ``label_map ==
    class + 1`` as the box's object (the region overlapping the box most, as in
    :func:`ss_blob_boxes`). Two objects of a class that the SS map joins into one region are not
    told apart then, and the box may grow over both: the merge the paper's stop exists to
    prevent, which the synthetic default (instances at least 3 px apart) cannot show. On touching
    instances (``synthetic:touching``) no rule beats the paper's, which stays the default
    (docs/ccgr.md, "The stop rule on test").

    Args:
        label_map: ``(H, W)`` int SS argmax (0 background, ``c + 1`` class ``c``), or None for the
            literal rule.
        boxes: ``(N, 4)`` float ``x0, y0, x1, y1`` pixels, the boxes before refinement.
        classes: ``(N,)`` 0-based class of each box.
        peaks: ``(P, 2)`` int ``(y, x)`` pixel peaks of the image; ``peak_classes``: ``(P,)``.

    Returns:
        N tensors ``(P_i, 2)`` (the peaks' own dtype): the peaks of box i's class outside the box
        (those inside it are its own; ``refine_boxes`` ignores them anyway) and, with a label
        map, outside its object's region.
    """
    pk, pc = torch.as_tensor(np.asarray(peaks)).reshape(-1, 2), torch.as_tensor(np.asarray(peak_classes)).reshape(-1)
    classes = [int(k) for k in classes]
    regions, own = _own_regions(label_map, boxes, classes) if label_map is not None else ({}, [0] * len(classes))
    out: list[torch.Tensor] = []
    for box, k, mine in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), classes, own):
        same = pk[pc == k]
        if len(same):
            inside = (same[:, 1] >= box[0]) & (same[:, 1] < box[2]) & (same[:, 0] >= box[1]) & (same[:, 0] < box[3])
            same = same[~inside]
        if mine and len(same):
            lab = regions[k]
            yy = same[:, 0].long().clamp(0, lab.shape[0] - 1).numpy()
            xx = same[:, 1].long().clamp(0, lab.shape[1] - 1).numpy()
            same = same[torch.as_tensor(lab[yy, xx] != mine)]
        out.append(same.reshape(-1, 2))
    return out


def _pair_iou(a, b) -> list[float]:
    """IoU of ``a[i]`` with ``b[i]`` (both (N, 4) ``x0, y0, x1, y1``)."""
    from torchvision.ops import box_iou

    a = torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(-1, 4)
    b = torch.as_tensor(np.asarray(b, dtype=np.float32)).reshape(-1, 4)
    return box_iou(a, b).diagonal().tolist() if len(a) else []


def _best_iou(boxes, classes, gt_boxes, gt_classes) -> list[float]:
    """For each box, its IoU with the best GT box of the same class (0 when there is none)."""
    from torchvision.ops import box_iou

    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    gt = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float32)).reshape(-1, 4)
    if not len(boxes):
        return []
    if not len(gt):
        return [0.0] * len(boxes)
    iou = box_iou(boxes, gt)
    same = torch.as_tensor(np.asarray(classes))[:, None] == torch.as_tensor(np.asarray(gt_classes))[None, :]
    return (iou * same).amax(1).tolist()
