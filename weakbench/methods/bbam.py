"""BBAM: Bounding Box Attribution Map (Lee, Yi, Shin & Yoon, CVPR 2021), as a weakbench plan.

Box-supervised instance segmentation: a detector trained on GT boxes explains, for every GT box,
which pixels it needs to keep its prediction — the smallest mask ``M`` such that the perturbed
image ``I·M + μ(1−M)`` keeps the head's class probability and box regression for proposals
around the box (paper Eqs. 1–3, appendix Eq. 5). The masks become pseudo instance masks, on
which a Mask R-CNN can be trained. The algorithm lives in :mod:`weakbench.methods.bbam_ops`
(pure functions, each naming the paper equation or official-code line it follows) and the
detectors in :mod:`weakbench.methods.detection`; this module is the plan:

1. ``detector`` (fit, shared across a sweep's trials with the same detector settings):
   torchvision Faster R-CNN on a timm backbone + FPN, trained on GT boxes of the train split
   with SGD and torchvision's detection warm-up (the lr rising linearly from ``lr/1000`` over
   ``min(1000, steps per epoch − 1)`` steps, then constant; ``warmup_iters`` / ``warmup_factor``;
   the Mask R-CNN stage warms up the same way); validated by COCO box AP on val. The box head
   and predictor start as torchvision's (``nn.Linear``'s default; ``box_head_init:
   torchvision``). The official code's maskrcnn-benchmark init (``detectron2``: class logits of
   std 0.01, box deltas of std 0.001, zero biases, fc6/fc7 Kaiming uniform a = 1) is an option,
   not the default, because it measured worse here (docs/bbam.md): it removed a divergence at lr
   0.01 on ``synthetic:hard`` (2 of 3 seeds diverged with torchvision's, none with it), but on
   coco128-person at the README's settings (lr 0.005) seeds 0 and 1 diverged (non-finite loss in
   epoch 5; torchvision's init trains all three), and on the synthetic default O⁺ was non-empty
   for 33 % of val boxes against 81 %.
2. ``attribute`` (map over images, shared): per GT box, 1000 jittered proposals, O⁺ selection,
   and ``mask_iterations`` Adam steps on the mask (stride ``s(a) = s0 + s1·√a`` scaled by the
   detector's input size over 800 px), many boxes optimised together (exactly the sequential
   optimisation: BN frozen, Adam elementwise — tested in ``tests/test_bbam_ops.py``). Runs on
   the train split (the pseudo labels) and on val/test (for selection and reporting: BBAM
   needs only boxes, which weak supervision provides on every split).
3. ``pseudo_masks`` (map, shared): within-box rank cut at ``theta_fg`` (foreground) and
   ``theta_bg`` (the "liberal" mask; the band between is ignore), blur, dense CRF, box-prior
   fallbacks (the code's ``make_annotation``). One mask per GT box, always inside its box.
4. ``evaluate`` (eval): per split, against GT instance masks — ``instance_miou`` (mean over GT
   boxes of the mask IoU), ``miou`` (semantic mIoU of the pseudo label map, classes +
   background; the ignore band counts as background), COCOeval of the pseudo masks (``ap``,
   ``ap50``, ``ap75``, ``ap70``, ``ap_s/m/l``, ``map_r25``, ``map_r50``, ``abo``), and the same
   numbers for the **box-filled** mask (the box itself as the mask, ``box_filled/…``) so a
   reader sees what BBAM adds over the box, and, with the CRF on, for the CRF run from the box
   prior alone (``box_crf/…``, BBAM's own fallback for a box without attribution), so a reader
   sees what the attribution adds over the CRF. Keys: ``val/pseudo_masks/instance_miou``, …
5. optional (``mask_rcnn_epochs > 0``): ``mask_rcnn`` (fit) — torchvision Mask R-CNN, started
   from the trained detector's weights (ours: the paper starts from ImageNet weights), trained on
   the train split's pseudo masks with the official code's mask loss (``mask_loss:
   seed_growing``, :func:`~weakbench.methods.bbam_ops.seed_growing_mask_loss`: the θ_fg seed and
   the outside of the liberal θ_bg mask grown where the prediction is confident (sigmoid > 0.9 /
   < 0.1) next to a seed, foreground and background means balanced; ``ignore_band`` is the
   earlier BCE with the band ignored), then ``instance_eval`` (eval): COCOeval segm and bbox of
   its predictions on val and test (``test/mask_rcnn/segm_ap``, …).

**Absent: the MCG refinement of Eq. 4.** For its Tables 1–2 the paper refines each pseudo mask
with MCG proposals (the mask replaced by the union of proposals that overlap it enough). MCG
does not install from the package registries, and selective search (which CCGR uses) gives
boxes and regions of a colour over-segmentation, not MCG's ranked contour-based segments; a
stand-in would not be Eq. 4, so it is not offered. The pseudo masks here are the rank cut +
dense CRF of the official ``make_annotation`` code (the paper's Table 3 setting).

The paper's 𝟙_box / 𝟙_cls switches of Eq. 3 (its Fig. 4 ablation) are ``indicator_box`` /
``indicator_cls``. ``search_spaces/bbam_official.yaml`` runs the paper's and the official code's
settings (BBAMConfig's defaults: 300 iterations, λ = 0.007, θ_fg = 0.85 / θ_bg = 0.2 as the code's rank cuts, 1000
proposals, s(a) = 16 + 48·√a).

Choices where the paper is silent or the official code differs (each also in ``bbam_ops``):
the code's O⁺ rule (θ = 0.9, 0.85, 0.8 until more than 100 positives, cap 100), λ = 0.007,
θ_fg = 0.85 / θ_bg = 0.2 as within-box *rank* fractions (the paper reads them as attribution
values), the GT box's area in ``s(a)``; masks for val/test images are ours (the paper makes
pseudo labels for training images only); the predictor of a trial without Mask R-CNN detects
boxes and runs BBAM on each detection (``predict_instances``).

Headline metric: ``pseudo_masks/instance_miou`` (selected on val, reported on test).
Measurements: docs/bbam.md (and the pages it points to).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from weakbench.methods import bbam_ops as ops
from weakbench.methods.base import Method, MethodConfig, register_method
from weakbench.methods.pipeline import PREDICTOR, SPEED_ONLY, UNUSED, FitTask, Stage, StageContext, load_data, save_data
from weakbench.methods.metric_declarations import MechanismCheck, metric

class BBAMConfig(MethodConfig):
    """BBAM hyperparameters (paper §4 and the official code's defaults), in one field group per
    stage (:attr:`BBAM.stage_groups`); ``attribution_batch_images`` is ``speed_only`` (the
    attribution is chunk-independent) and ``score_threshold`` the predictor's."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "detector": ("backbone", "pretrained", "weights_path", "output_stride", "lr", "backbone_lr_mult", "weight_decay",
                     "momentum", "batch_size", "epochs", "input_size", "seed", "fpn_channels", "box_head_size",
                     "warmup_iters", "warmup_factor", "box_head_init"),
        "attribution": ("num_proposals", "jitter_ratio", "max_positives", "mask_iterations", "mask_lr", "mask_l1_weight",
                        "tv_weight", "stride_s0", "stride_s1", "loss_variant", "indicator_box", "indicator_cls",
                        "attribution_splits", "max_images_per_split"),
        "pseudo_masks": ("theta_fg", "theta_bg", "use_crf"),
        "mask_rcnn": ("mask_rcnn_epochs", "mask_rcnn_lr", "mask_loss", "seed_growing_threshold"),
        SPEED_ONLY: ("attribution_batch_images",),
        PREDICTOR: ("score_threshold",),
        # the detectors' SGD is plain and their lr constant after the warm-up: the engine refuses
        # nesterov: true and a non-constant lr_schedule for these fit stages, so no product depends
        # on these fields
        UNUSED: ("nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma")}

    epochs: int = Field(8, ge=0, le=1000, description="detector epochs (the paper trains Faster R-CNN for its schedule; scaled to fit)")
    lr: float = Field(0.01, gt=0, le=10, description="detector SGD learning rate")
    warmup_iters: int | None = Field(
        None, ge=0, le=100000, description="linear lr warm-up steps of the detector and the Mask R-CNN (None: "
                                           "min(1000, steps per epoch − 1), torchvision's detection reference; 0: none)")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="lr factor of the warm-up's first step, rising "
                                                                "linearly to 1 (torchvision's reference: 1/1000)")
    box_head_init: Literal["torchvision", "detectron2"] = Field(
        "torchvision", description="init of the detectors' box head and predictor: 'torchvision' = nn.Linear's default; "
                                   "'detectron2' = maskrcnn-benchmark's, the official code's (class logits std 0.01, "
                                   "box deltas 0.001, zero biases), which diverged on coco128-person here (docs/bbam.md)")
    batch_size: int = Field(4, ge=1, le=256, description="detector images per worker per step")
    input_size: int = Field(128, ge=32, le=1333, description="detector input: shorter side in pixels (800 in the paper)")
    fpn_channels: int = Field(256, ge=8, le=1024, description="FPN width (256 in the paper; smaller for CPU tests)")
    box_head_size: int = Field(1024, ge=16, le=4096, description="width of the two-layer box head")
    num_proposals: int = Field(ops.N_PROPOSALS, ge=10, le=10000, description="proposals jittered around each GT box (|O|)")
    jitter_ratio: float = Field(ops.JITTER_RATIO, gt=0, le=1, description="each coordinate moves by U(±ratio)·side")
    max_positives: int = Field(ops.MAX_POSITIVES, ge=1, le=1000, description="cap on |O⁺|")
    mask_iterations: int = Field(ops.ITERATIONS, ge=1, le=5000, description="Adam iterations of the mask (300)")
    mask_lr: float = Field(ops.LR, gt=0, le=1, description="Adam learning rate of the mask (0.02)")
    mask_l1_weight: float = Field(ops.L1_WEIGHT, ge=0, le=1, description="λ: weight of Σ|M| (Eq. 1; 0.007 in the code)")
    tv_weight: float = Field(ops.TV_WEIGHT, ge=0, le=1, description="weight of the total-variation term (appendix Eq. 5)")
    stride_s0: float = Field(ops.S0, ge=1, le=256, description="s0 of the mask stride s(a) = s0 + s1·√a")
    stride_s1: float = Field(ops.S1, ge=0, le=256, description="s1 of the mask stride s(a) = s0 + s1·√a")
    loss_variant: Literal["code", "paper"] = Field("code", description="perturbation loss as the official code or the paper's Eq. 3")
    theta_fg: float = Field(ops.THETA_FG, gt=0, lt=1, description="θ_fg: within-box rank cut of the foreground (0.85 in the code)")
    theta_bg: float = Field(ops.THETA_BG, ge=0, lt=1, description="θ_bg: the liberal cut; pixels between θ_bg and θ_fg are ignore")
    use_crf: bool = Field(True, description="refine the pseudo masks with a dense CRF (bbam_ops.ImageCRF)")
    attribution_splits: tuple[Literal["train", "val", "test"], ...] = Field(
        ("train", "val", "test"), description="splits whose GT boxes get BBAM masks (train: pseudo labels; val/test: evaluation)")
    max_images_per_split: int | None = Field(None, ge=1, description="attribute at most this many images per split (CPU budgets)")
    attribution_batch_images: int = Field(8, ge=1, le=256, description="images whose boxes are optimised together (speed "
                                          "only: each image is padded on its own, same-shaped images share a forward)")
    mask_rcnn_epochs: int = Field(0, ge=0, le=1000, description="train a Mask R-CNN on the pseudo masks for this many epochs (0: no)")
    mask_rcnn_lr: float = Field(0.005, gt=0, le=10, description="Mask R-CNN SGD learning rate (0.02 at batch 16 scaled linearly to 4)")
    mask_loss: Literal["seed_growing", "ignore_band"] = Field(
        "seed_growing", description="Mask R-CNN mask loss on the pseudo masks: the official code's seed growing with "
                                    "balanced means, or BCE with the θ_bg–θ_fg band ignored (plain mean)")
    seed_growing_threshold: float = Field(ops.SEED_GROWING_THRESHOLD, gt=0.5, lt=1,
                                          description="seed growing: grow where sigmoid > t / < 1 − t next to a seed (0.9)")
    indicator_box: bool = Field(True, description="𝟙_box of Eq. 3: keep the box head's regression (paper Fig. 4 ablation)")
    indicator_cls: bool = Field(True, description="𝟙_cls of Eq. 3: keep the cls head's probability (paper Fig. 4 ablation)")
    score_threshold: float = Field(0.5, ge=0, le=1, description="predictor: detections below this score are dropped")

    @model_validator(mode="after")
    def _thresholds_in_order(self):
        if self.theta_bg > self.theta_fg:
            raise ValueError(f"theta_bg ({self.theta_bg}) must be <= theta_fg ({self.theta_fg}): the ignore band lies "
                             f"between the liberal cut θ_bg and the foreground cut θ_fg")
        if not (self.indicator_box or self.indicator_cls):
            raise ValueError("indicator_box and indicator_cls are both false: the perturbation loss would be empty and "
                             "the mask would only shrink; keep at least one of them true")
        return self


def _image_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _unrle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@contextlib.contextmanager
def _pseudo_mask_loss(variant: str = "seed_growing", threshold: float = ops.SEED_GROWING_THRESHOLD):
    """Mask R-CNN's mask loss on BBAM pseudo masks (torchvision's ``maskrcnn_loss`` replaced for
    the block). GT masks arrive as uint8 with 1 = foreground (the θ_fg cut), 2 = ignore (the band
    up to the liberal θ_bg cut), 0 = background; each is projected onto the RoI's M × M grid by
    RoIAlign (torchvision's ``project_masks_on_boxes``).

    * ``"seed_growing"`` (default; the official code's loss): the θ_fg seed and the liberal mask,
      binarised at 0.5 after projection, go to :func:`~weakbench.methods.bbam_ops.seed_growing_mask_loss`
      (seeds grown where the prediction is confident next to a seed, balanced foreground and
      background means).
    * ``"ignore_band"`` (ours, the earlier default): binary cross-entropy against the projected
      foreground over the cells whose projected non-band share exceeds 0.5, a plain mean.
    """
    import torch.nn.functional as F
    from torchvision.models.detection import roi_heads as rh
    from torchvision.ops import roi_align

    original = rh.maskrcnn_loss

    def loss(mask_logits, proposals, gt_masks, gt_labels, mask_matched_idxs):
        size = mask_logits.shape[-1]
        labels = [gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)]
        fg_t, second_t = [], []
        for m, p, idx in zip(gt_masks, proposals, mask_matched_idxs):
            fg = (m == 1).to(p.dtype)[:, None]
            # the liberal mask (foreground ∪ band) for seed growing, the non-band cells otherwise
            second = ((m == 1) | (m == 2) if variant == "seed_growing" else m != 2).to(p.dtype)[:, None]
            rois = torch.cat([idx[:, None].to(p), p], dim=1)
            fg_t.append(roi_align(fg, rois, (size, size), 1.0)[:, 0])
            second_t.append(roi_align(second, rois, (size, size), 1.0)[:, 0])
        labels = torch.cat(labels, dim=0)
        fg = torch.cat(fg_t, dim=0)
        second = torch.cat(second_t, dim=0)
        if fg.numel() == 0:
            return mask_logits.sum() * 0
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
        if variant == "seed_growing":
            return ops.seed_growing_mask_loss(logits, fg >= 0.5, second >= 0.5, threshold)
        valid = second > 0.5
        per_px = F.binary_cross_entropy_with_logits(logits, fg, reduction="none")
        return (per_px * valid).sum() / valid.sum().clamp(min=1)

    rh.maskrcnn_loss = loss
    try:
        yield
    finally:
        rh.maskrcnn_loss = original


class DetectorFit(FitTask):
    """Fit stage of a torchvision detector (Faster R-CNN on boxes, or Mask R-CNN on pseudo masks):
    SGD (momentum, weight decay, ``backbone_lr_mult`` for the body) with the linear warm-up of
    :meth:`configure_schedulers`, constant after it."""

    def __init__(self, method: "BBAM", kind: Literal["faster_rcnn", "mask_rcnn"], pseudo_dir: Path | None = None,
                 init_dir: Path | None = None):
        self.method, self.kind, self.pseudo_dir, self.init_dir = method, kind, pseudo_dir, init_dir
        self.batch_size = method.config.batch_size
        self.seed = method.config.seed

    def build_model(self) -> torch.nn.Module:
        from weakbench.methods.detection import build_detector, detector_settings

        c = self.method.config
        model = build_detector(self.kind, c.backbone, self.method.num_classes, output_stride=c.output_stride,
                               box_head_init=c.box_head_init, **detector_settings(c))
        if self.init_dir is not None:
            # Mask R-CNN starts from the trained detector (backbone, FPN, RPN, box head; the mask
            # head is new): the paper starts from ImageNet weights, which a from-scratch CPU
            # budget cannot replace, and the detector already knows these boxes (our choice)
            state = load_data(Path(self.init_dir) / "model.pt")
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
        return model

    def configure_optimizers(self, model):
        c = self.method.config
        lr = c.lr if self.kind == "faster_rcnn" else c.mask_rcnn_lr
        body = [p for n, p in model.named_parameters() if n.startswith("backbone.body.") and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.body.") and p.requires_grad]
        groups = [g for g in ({"params": body, "lr": lr * c.backbone_lr_mult}, {"params": rest, "lr": lr}) if g["params"]]
        return {"main": torch.optim.SGD(groups, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)}

    def warmup_steps(self, total_steps: int) -> int:
        """Steps of the linear warm-up for a stage of ``total_steps`` training steps: the config's
        ``warmup_iters``, or (``None``) torchvision's detection reference rule ``min(1000, steps
        per epoch − 1)`` (``references/detection/engine.py``: the first epoch only)."""
        c = self.method.config
        if c.warmup_iters is not None:
            return int(c.warmup_iters)
        epochs = c.epochs if self.kind == "faster_rcnn" else c.mask_rcnn_epochs
        return max(0, min(1000, int(total_steps) // max(1, int(epochs)) - 1))

    def configure_schedulers(self, optimizers, total_steps: int):
        """torchvision's detection warm-up: the lr of every parameter group (its own lr, so
        ``backbone_lr_mult`` keeps its ratio) multiplied by a factor rising linearly from
        ``warmup_factor`` (1/1000) at step 0 to 1 at step :meth:`warmup_steps`, constant after
        (torch's ``LinearLR``, stepped once per training step by the engine). None with 0 steps
        or a factor of 1."""
        n = self.warmup_steps(total_steps)
        c = self.method.config
        if n <= 0 or c.warmup_factor >= 1.0:
            return {}
        return {name: torch.optim.lr_scheduler.LinearLR(opt, start_factor=c.warmup_factor, end_factor=1.0,
                                                        total_iters=n)
                for name, opt in optimizers.items()}

    def train_dataset(self, source, indices):
        from weakbench.methods.detection import DetectionDataset

        if self.kind == "faster_rcnn":
            return DetectionDataset(source, indices, train=True)
        return PseudoMaskDataset(source, indices, self.pseudo_dir)

    def collate(self, items):
        from weakbench.methods.detection import collate_detection

        return collate_detection(items)

    def training_losses(self, model, batch, ctx):
        images, targets = batch
        targets = [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
        c = self.method.config
        with _pseudo_mask_loss(c.mask_loss, c.seed_growing_threshold) if self.kind == "mask_rcnn" \
                else contextlib.nullcontext():
            parts = model(images, targets)
        loss = sum(parts.values())
        return {"loss": loss, **{k.replace("loss_", ""): v.detach() for k, v in parts.items()}}

    def validate(self, model, ctx: StageContext, last: bool) -> dict[str, float]:
        """COCO box AP (and mask AP for Mask R-CNN) on the val split (``max_images`` of them)."""
        idx = list(ctx.splits["val"])[: ctx.max_images] if ctx.max_images else list(ctx.splits["val"])
        return detection_metrics(model, ctx.source, idx, ctx.device, masks=self.kind == "mask_rcnn")


class PseudoMaskDataset(torch.utils.data.Dataset):
    """Training images with BBAM pseudo masks as Mask R-CNN targets (uint8 masks: 1 foreground,
    2 ignore band, 0 background), GT boxes and labels; images without a pseudo mask are skipped."""

    def __init__(self, source, indices, pseudo_dir: Path):
        self.source = source
        self.table = load_data(Path(pseudo_dir) / "pseudo_masks.pt")
        self.indices = [int(i) for i in indices if f"train:{int(i)}" in self.table]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        img = self.source.load_image(index)
        boxes, classes = self.source.gt_boxes(index)
        entry = self.table[f"train:{index}"]
        masks = np.stack([_unrle(f).astype(np.uint8) + 2 * _unrle(g).astype(np.uint8)
                          for f, g in zip(entry["fg"], entry["ignore"])]) if len(boxes) else np.zeros((0, img.height, img.width), np.uint8)
        image = _image_tensor(img)
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.as_tensor(np.asarray(classes) + 1, dtype=torch.int64),
                  "masks": torch.from_numpy(masks), "index": index}
        return random_hflip(image, target)


def random_hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """With probability 0.5 (``torch.rand``), mirror a detection sample left-right: the image
    ``(3, H, W)``, its ``boxes`` ``(K, 4)`` xyxy and ``masks`` ``(K, H, W)``."""
    if torch.rand(()) < 0.5:
        w = image.shape[-1]
        image = image.flip(-1)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        target["masks"] = target["masks"].flip(-1)
    return image, target


@torch.no_grad()
def detection_metrics(model, source, indices, device, *, masks: bool, batch_size: int = 4,
                      per_image: dict | None = None) -> dict[str, float]:
    """COCOeval of a torchvision detector's predictions on records ``indices`` (percent):
    ``bbox_ap``, ``bbox_ap50`` … and, with ``masks``, ``segm_ap`` … (masks > 0.5), ``abo``.
    With ``per_image`` (``{"scope": str}``), also its per-image table under ``"table"``
    (:func:`weakbench.core.metrics.instance.per_image_tables`: the predictions' VOC matches)."""
    from weakbench.core.metrics import coco_gt_from_source, coco_instance_eval

    was = model.training
    model.eval()
    results: list[dict] = []
    try:
        for s in range(0, len(indices), batch_size):
            chunk = indices[s:s + batch_size]
            outs = model([_image_tensor(source.load_image(i)).to(device) for i in chunk])
            for i, o in zip(chunk, outs):
                for k in range(len(o["boxes"])):
                    x0, y0, x1, y1 = (float(v) for v in o["boxes"][k])
                    r = {"image_id": int(i), "category_id": int(o["labels"][k]), "score": float(o["scores"][k]),
                         "bbox": [x0, y0, x1 - x0, y1 - y0]}
                    if masks:
                        r["segmentation"] = _rle((o["masks"][k, 0] > 0.5).cpu().numpy())
                    results.append(r)
    finally:
        model.train(was)
    gt = coco_gt_from_source(source, indices, masks=masks)
    if per_image is not None:
        from weakbench.core.metrics.instance import per_image_tables

        per_image["table"] = per_image_tables(gt, results, per_image["scope"], ("segm", "bbox") if masks else ("bbox",))
    return coco_instance_eval(gt, results, iou_types=("segm", "bbox") if masks else ("bbox",))


def mask_metrics_on_val_and_test(model, ctx: StageContext) -> dict[str, float]:
    """:func:`detection_metrics` with masks of ``model`` on the val and test splits (``max_images``
    of each), keyed ``val/…`` and ``test/…``."""
    from weakbench.methods.base import save_split_tables

    out, tables = {}, {}
    for split in ("val", "test"):
        idx = list(ctx.splits[split])[: ctx.max_images] if ctx.max_images else list(ctx.splits[split])
        keep = {"scope": ctx.stage.metric_ns or ctx.stage.name}
        out.update({f"{split}/{k}": v for k, v in detection_metrics(model, ctx.source, idx, ctx.device, masks=True,
                                                                    per_image=keep).items()})
        tables[split] = keep["table"]
    save_split_tables(tables, ctx)  # per-image rows behind mAP^r / box AP (the board's paired bootstrap)
    return out


def mask_rcnn_instances(model: torch.nn.Module, images: list[torch.Tensor], score_threshold: float) -> list[dict]:
    """A trained torchvision Mask R-CNN's predictions as :class:`InstancePredictor` dicts: detections
    at or above ``score_threshold``, labels 0-based, masks ``> 0.5``."""
    out = []
    with torch.no_grad():
        for o in model.eval()(images):
            keep = o["scores"] >= score_threshold
            out.append({"boxes": o["boxes"][keep], "labels": o["labels"][keep] - 1, "scores": o["scores"][keep],
                        "masks": o["masks"][keep, 0] > 0.5})
    return out


@register_method("bbam")
class BBAM(Method):
    """BBAM (detector → box attribution masks → pseudo masks → optional Mask R-CNN); see the module docstring."""

    shape = "detector_attribution"
    Config = BBAMConfig
    headline_metric = "pseudo_masks/instance_miou"
    compared_with: ClassVar[tuple[str, ...]] = ()
    compared_with_variants: ClassVar[tuple[str, ...]] = ("box_filled", "box_crf")
    mechanism_checks = (MechanismCheck("positive_share", fails_below=50.0,
                                       words="attribution empty: O+ non-empty for {value:.0f} % of boxes"),)
    #: the attribute stage's metrics (the masks are scored by the common instance metrics)
    metrics = (
        metric("positive_share", "max", "%", "attributed boxes",
               "share of boxes for which the attribution found at least one proposal that keeps the detection"),
        metric("mean_positives", None, "count", "positive proposals per box",
               "how many perturbed proposals per box keep the detection, on average"),
    )
    #: each stage reads its own group and, through its inputs, every earlier one (the mask R-CNN the
    #: detector's backbone, input size and optimiser settings)
    stage_groups = {"detector": ("detector",), "attribute": ("attribution",), "pseudo_masks": ("pseudo_masks",),
                    "evaluate": (), "mask_rcnn": ("mask_rcnn",), "instance_eval": ()}
    #: the common schema's ``cam_curve_interval``, which BBAM never read, left the schema
    retired_fields = ("cam_curve_interval",)

    @property
    def map_chunk_size(self) -> int:
        return self.config.attribution_batch_images

    # ------------------------------------------------------------------ plan
    def plan(self) -> tuple[Stage, ...]:
        c = self.config
        stages = [
            Stage("detector", "fit", epochs=c.epochs, shared=True),
            Stage("attribute", "map", inputs=("detector",), shared=True, split="train"),
            Stage("pseudo_masks", "map", inputs=("attribute",), shared=True, split="train"),
            Stage("evaluate", "eval", inputs=("pseudo_masks",), split="val", metric_ns="pseudo_masks"),
        ]
        if c.mask_rcnn_epochs > 0:
            stages += [Stage("mask_rcnn", "fit", inputs=("detector", "pseudo_masks"), epochs=c.mask_rcnn_epochs,
                             shared=True),
                       Stage("instance_eval", "eval", inputs=("mask_rcnn",), split="test", metric_ns="mask_rcnn")]
        return tuple(stages)

    def check_fit(self, stage: Stage, optimizers, schedulers) -> None:
        """The common checks, with the detectors' warm-up (:meth:`DetectorFit.configure_schedulers`)
        not counted as honouring ``lr_schedule``: a non-constant ``lr_schedule`` is refused, as
        before the warm-up existed (after the warm-up the lr is constant)."""
        super().check_fit(stage, optimizers, {})

    def fit_task(self, stage: Stage, inputs=None) -> FitTask:
        if stage.name == "detector":
            return DetectorFit(self, "faster_rcnn")
        if stage.name == "mask_rcnn":
            return DetectorFit(self, "mask_rcnn", pseudo_dir=(inputs or {}).get("pseudo_masks"),
                               init_dir=(inputs or {}).get("detector"))
        raise NotImplementedError(f"bbam has no fit stage {stage.name!r}")

    # ------------------------------------------------------------------ map stages
    def map_items(self, stage: Stage, ctx: StageContext) -> list[str]:
        """``"<split>:<record index>"`` of every image with at least one GT box, per attributed split."""
        keys = []
        cap = self.config.max_images_per_split
        for split in self.config.attribution_splits:
            idx = [int(i) for i in ctx.splits[split] if len(ctx.source.gt_boxes(int(i))[0])]
            keys += [f"{split}:{i}" for i in (idx[:cap] if cap else idx)]
        return keys

    def map_batch(self, stage: Stage, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        if stage.name == "attribute":
            return self._attribute(keys, ctx)
        if stage.name == "pseudo_masks":
            return self._pseudo_masks(keys, ctx)
        raise NotImplementedError(f"bbam has no map stage {stage.name!r}")

    def _attribute(self, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        from weakbench.methods.detection import detector_inputs

        c = self.config
        detector = ctx.load_model("detector")
        dtype = next(detector.parameters()).dtype
        images_norm, sizes, boxes_r, classes, orig = [], [], [], [], []
        for key in keys:
            index = int(key.split(":")[1])
            img = ctx.source.load_image(index)
            b, cl = ctx.source.gt_boxes(index)
            # each image resized, normalised and padded on its own: padding a chunk to a common
            # size would change the features near an image's border and, through the RoI
            # poolers' inferred scales, where its boxes are read; so the attribution of an
            # image does not depend on attribution_batch_images, its chunk-mates or a resume
            norm, size, box_r = detector_inputs(detector, [_image_tensor(img).to(ctx.device, dtype)],
                                                [torch.as_tensor(b, dtype=dtype).reshape(-1, 4)])
            images_norm.append(norm[0])
            sizes.append(size[0])
            boxes_r.append(box_r[0])
            classes.append([int(v) for v in cl])
            orig.append((img.height, img.width))
        jobs = []
        for b, key in enumerate(keys):
            # one generator per image, seeded by the trial seed and the record: the proposals do
            # not depend on how images are chunked, so a resumed or re-chunked stage agrees
            gen = torch.Generator().manual_seed(hash_seed(c.seed, key))
            for job in ops.make_box_jobs(detector, [images_norm[b]], [boxes_r[b]], [classes[b]], image_sizes=[sizes[b]],
                                         n_proposals=c.num_proposals, jitter_ratio=c.jitter_ratio,
                                         max_positives=c.max_positives, s0=c.stride_s0, s1=c.stride_s1, generator=gen):
                job.image_index = b
                jobs.append((key, job))
        masks = ops.optimise_box_masks(detector, images_norm, [j for _, j in jobs], iterations=c.mask_iterations,
                                       lr=c.mask_lr, l1_weight=c.mask_l1_weight, tv_weight=c.tv_weight,
                                       use_box=c.indicator_box, use_cls=c.indicator_cls, variant=c.loss_variant)
        out: dict[str, Any] = {k: {"masks": [], "strides": [], "positives": [], "orig_size": orig[b]}
                               for b, k in enumerate(keys)}
        for (key, job), m in zip(jobs, masks):
            out[key]["masks"].append(m.to(torch.float16))
            out[key]["strides"].append(int(job.stride))
            out[key]["positives"].append(int(job.proposals.shape[0]))
        return out

    def _pseudo_masks(self, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        c = self.config
        table = _load_table(ctx.inputs["attribute"] / "attributions.pt")
        out = {}
        for key in keys:
            index = int(key.split(":")[1])
            img = ctx.source.load_image(index)
            h, w = img.height, img.width
            image = np.asarray(img, dtype=np.uint8)
            boxes, _ = ctx.source.gt_boxes(index)
            entry = table[key]
            fgs, igs = [], []
            crf = ops.ImageCRF(image) if c.use_crf and len(boxes) else None  # one lattice for the image's boxes
            for k, box in enumerate(boxes):
                attr = ops.attribution_map(entry["masks"][k].float(), (h, w))
                fg, ign = ops.pseudo_mask_from_attribution(attr, box, theta_fg=c.theta_fg, theta_bg=c.theta_bg,
                                                           stride_scale=max(h, w) / 500.0, use_crf=c.use_crf, crf=crf)
                fgs.append(_rle(fg))
                igs.append(_rle(ign))
            out[key] = {"fg": fgs, "ignore": igs}
        return out

    def map_reduce(self, stage: Stage, results: dict[str, Any], ctx: StageContext) -> dict[str, float]:
        if stage.name == "attribute":
            save_data(results, ctx.out_dir / "attributions.pt")
            pos = [p for r in results.values() for p in r["positives"]]
            out: dict[str, float] = {}
            for split in self.config.attribution_splits:
                sp = [p for k, r in results.items() if k.startswith(split + ":") for p in r["positives"]]
                if sp:
                    out[f"{split}/positive_share"] = 100.0 * sum(p > 0 for p in sp) / len(sp)
                    out[f"{split}/boxes"] = float(len(sp))
            out["mean_positives"] = float(np.mean(pos)) if pos else 0.0
            return out
        if stage.name == "pseudo_masks":
            save_data(results, ctx.out_dir / "pseudo_masks.pt")
            return {"boxes": float(sum(len(r["fg"]) for r in results.values()))}
        raise NotImplementedError(f"bbam has no map stage {stage.name!r}")

    # ------------------------------------------------------------------ eval stages
    def evaluate_stage(self, stage: Stage, ctx: StageContext) -> tuple[dict[str, float], list]:
        if stage.name == "evaluate":
            return self._evaluate_pseudo_masks(ctx)
        if stage.name == "instance_eval":
            model = ctx.load_model("mask_rcnn")
            return mask_metrics_on_val_and_test(model, ctx), []
        raise NotImplementedError(f"bbam has no eval stage {stage.name!r}")

    def _evaluate_pseudo_masks(self, ctx: StageContext) -> tuple[dict[str, float], list]:
        from weakbench.methods.base import save_split_tables
        from weakbench.core.metrics import PseudoMaskEvaluator
        from weakbench.core.metrics.per_image import merge_tables
        from weakbench.core.overlay import instance_overlay

        table = _load_table(ctx.inputs["pseudo_masks"] / "pseudo_masks.pt")
        out: dict[str, float] = {}
        overlays = []
        tables: dict = {}
        if not ctx.source.has_masks:  # box-only data: the masks are made, but cannot be scored
            return {f"{s}/num_images": float(sum(k.startswith(s + ":") for k in table)) for s in self.config.attribution_splits}, []
        for split in self.config.attribution_splits:
            ours = PseudoMaskEvaluator(ctx.source, ctx.source.num_classes)
            boxes = PseudoMaskEvaluator(ctx.source, ctx.source.num_classes)
            # with the CRF on, a second baseline: the CRF from the box prior alone (BBAM's own
            # fallback for a box without attribution), so a reader sees what BBAM adds over it
            crf = PseudoMaskEvaluator(ctx.source, ctx.source.num_classes) if self.config.use_crf else None
            for key, entry in table.items():
                if not key.startswith(split + ":"):
                    continue
                index = int(key.split(":")[1])
                rec = ctx.source.records[index]
                fg = [_unrle(r) for r in entry["fg"]]
                ours.accumulate(index, fg)
                gt_boxes, _ = ctx.source.gt_boxes(index)
                boxes.accumulate(index, [ops.box_filled_mask(b, rec.height, rec.width) for b in gt_boxes])
                if crf is not None:
                    image_crf = ops.ImageCRF(np.asarray(ctx.source.load_image(index), dtype=np.uint8))
                    zero = np.zeros((rec.height, rec.width), np.float32)
                    crf.accumulate(index, [ops.pseudo_mask_from_attribution(
                        zero, b, theta_fg=self.config.theta_fg, theta_bg=self.config.theta_bg,
                        stride_scale=max(rec.height, rec.width) / 500.0, use_crf=True, crf=image_crf)[0]
                        for b in gt_boxes])
                if split == (ctx.stage.split or "val") and len(overlays) < ctx.num_overlays:
                    ign = np.any(np.stack([_unrle(r) for r in entry["ignore"]]), axis=0)
                    img = np.asarray(ctx.source.load_image(index), dtype=np.uint8)
                    names = [ctx.source.class_names[int(c)] for c in ctx.source.gt_boxes(index)[1]]
                    overlays.append((f"{index:05d}_bbam.png", instance_overlay(
                        img, np.stack(fg), gt_boxes.tolist(), names, ignore=ign, title=f"BBAM pseudo masks ({split})")))
            if not ours.indices:
                continue
            # per-image rows behind instance_miou and mAP^r of BBAM and its variants (the board's
            # paired bootstrap), under the keys' prefixes: pseudo_masks, pseudo_masks/box_filled, …
            ns = ctx.stage.metric_ns or ctx.stage.name
            tables[split] = merge_tables([ev.per_image_table(f"{ns}/{tag}".rstrip("/")) for tag, ev in
                                          (("", ours), ("box_filled", boxes), ("box_crf", crf)) if ev is not None])
            a, b = ours.compute(), boxes.compute()
            out.update({f"{split}/{k}": v for k, v in a.items()})
            out.update({f"{split}/box_filled/{k}": v for k, v in b.items() if k != "num_instances"})
            out[f"{split}/gain_over_box/instance_miou"] = a["instance_miou"] - b["instance_miou"]
            if crf is not None:
                out.update({f"{split}/box_crf/{k}": v for k, v in crf.compute().items() if k != "num_instances"})
        save_split_tables(tables, ctx)
        return out, overlays

    # ------------------------------------------------------------------ inference
    def build_predictor(self, ctx: StageContext):
        from weakbench.methods.instance import InstancePredictor

        models = {"detector": ctx.load_model("detector").cpu().eval()}
        if self.config.mask_rcnn_epochs > 0:
            models["mask_rcnn"] = ctx.load_model("mask_rcnn").cpu().eval()
        return InstancePredictor(self, models, ctx.source.class_names, self.config.input_size,
                                 score_threshold=self.config.score_threshold)

    def predict_instances(self, models: dict[str, torch.nn.Module], images: list[torch.Tensor], *,
                          score_threshold: float) -> list[dict[str, torch.Tensor]]:
        """Detect, then a mask per detection: Mask R-CNN's (``> 0.5``) when the plan trained one,
        else BBAM on the detection (its box and class as the GT box of the attribution)."""
        from weakbench.methods.detection import detector_inputs

        c = self.config
        out = []
        if "mask_rcnn" in models:
            return mask_rcnn_instances(models["mask_rcnn"], images, score_threshold)
        detector = models["detector"].eval()
        for image in images:
            with torch.no_grad():
                det = detector([image])[0]
            keep = det["scores"] >= score_threshold
            boxes, labels, scores = det["boxes"][keep], det["labels"][keep] - 1, det["scores"][keep]
            h, w = image.shape[-2:]
            masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
            if len(boxes):
                norm, sizes, boxes_r = detector_inputs(detector, [image], [boxes])
                gen = torch.Generator().manual_seed(c.seed)
                jobs = ops.make_box_jobs(detector, norm, [boxes_r[0]], [labels.tolist()], image_sizes=sizes,
                                         n_proposals=c.num_proposals, jitter_ratio=c.jitter_ratio,
                                         max_positives=c.max_positives, s0=c.stride_s0, s1=c.stride_s1, generator=gen)
                with torch.enable_grad():  # the mask is optimised by gradient even under no_grad inference
                    lowres = ops.optimise_box_masks(detector, norm, jobs, iterations=c.mask_iterations, lr=c.mask_lr,
                                                    l1_weight=c.mask_l1_weight, tv_weight=c.tv_weight,
                                                    use_box=c.indicator_box, use_cls=c.indicator_cls,
                                                    variant=c.loss_variant)
                img8 = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                image_crf = ops.ImageCRF(img8) if c.use_crf else None
                for k, m in enumerate(lowres):
                    fg, _ = ops.pseudo_mask_from_attribution(ops.attribution_map(m, (h, w)), boxes[k], theta_fg=c.theta_fg,
                                                             theta_bg=c.theta_bg, stride_scale=max(h, w) / 500.0,
                                                             use_crf=c.use_crf, crf=image_crf)
                    masks[k] = torch.from_numpy(fg)
            out.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
        return out


def hash_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the trial seed and an item key (stable across processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") & ((1 << 63) - 1)


_TABLES: dict[str, Any] = {}


def _load_table(path: Path) -> dict[str, Any]:
    """A product table, loaded once per process (the map stages read it chunk after chunk)."""
    key = str(path)
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = load_data(path)
    return _TABLES[key]
