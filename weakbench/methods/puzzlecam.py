"""Puzzle-CAM (Jo, Yu, "Puzzle-CAM: Improved localization via matching partial and full features",
ICIP 2021).

Model: the CAM baseline's network (:class:`weakbench.methods.cam.CAMNet`): backbone ``F``, 1×1
classifier ``θ``; the class maps are ``A_c = θ_cᵀ F(I)`` (eq. 1), the logits their spatial mean.

Training (Sec. 3.3–3.4): the puzzle module tiles the image ``I`` into ``g × g`` non-overlapping
tiles (``num_tiles = g²``, paper: 2 × 2), computes the class maps of every tile and merges them
back into ``A^re`` with the layout of the full image's maps ``A^s``. The loss is (eq. 7)

    L = L_cls + L_p-cls + α · L_re

* ``L_cls`` (eq. 4) and ``L_p-cls`` (eq. 5): multi-label soft-margin loss (eqs. 2–3) of
  ``GAP(A^s)`` and ``GAP(A^re)`` (cross-entropy for single-label data);
* ``L_re`` (eq. 6): L1 distance between ``A^s`` and ``A^re``. As in the official code
  (``re_loss_option="masking"``) the absolute difference is kept only for the image's classes
  and averaged over all ``B × C × h × w`` entries (:func:`reconstruction_loss`);
* ``α`` ramps linearly from 0 to its maximum (paper: 4) over the first ``alpha_ramp_fraction``
  (paper: half) of training, then stays there (:func:`alpha_at`).

``output_stride`` keeps the common default (32) for equal backbones across methods; the official
code runs its ResNets at stride 16 (``output_stride=16``).

If the merged tile maps do not have the full image's map size (e.g. odd feature sizes), they are
resized bilinearly to it (our choice; with ``input_size`` divisible by ``32·g`` the sizes match
for stride-32 backbones). A tile grid whose tile CAMs would be smaller than 2×2
(``input_size / output_stride / g < 2``) is refused: a 1×1 tile CAM is just the tile's score,
so ``A^re`` would be a ``g × g`` grid of tile classification scores and the partial-to-full
matching would carry no localisation within a tile (e.g. 4×4 tiles of a 128 px input at stride
32, or the default 2×2 tiles of a 64 px input at stride 32).

Inference (Sec. 4.1): CAMs from multiple scales (0.5, 1, 1.5, 2) and horizontal flips, ReLU,
summed after resizing each to the largest scale's map size, then max-normalised per (image,
class) (``A / (max A + 1e-5)``, Sec. 3.2) — :meth:`PuzzleCAM.multi_scale_cams`. These test-time
augmented maps are what the paper evaluates its pseudo-labels with, so the pseudo-mask metrics
always use them. The board's box metrics (MaxBoxAcc, MaxBoxAccV2, PxAP) come from the maps that
:meth:`PuzzleCAM.cams_and_scores` gives, chosen by the named setting ``inference``:

* ``"single_scale"`` (default): the CAM of the image at scale 1, un-flipped, raw as for every
  other classifier → CAM method, so the board compares methods, not test-time augmentation;
* ``"multi_scale"``: the paper's multi-scale flipped maps above (a row that uses test-time
  augmentation; do not search this field in a sweep whose rows meet single-scale rows).

Pseudo semantic masks: the normalised CAMs of the
image's classes against a constant background score ``bg_threshold``
(:func:`pseudo_semantic_masks`); :meth:`PuzzleCAM.extra_metrics` reports their mIoU with the
background threshold swept, as the paper evaluates pseudo-labels — only over images with real
masks (``has_masks``): on box-only data the metric is absent rather than scored against the
all-empty placeholder masks (which would count every pixel as background ground truth).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from weakbench.methods.base import MethodConfig, StepContext, register_method
from weakbench.methods.classifier import ClassifierConfig, ClassifierMethod
from weakbench.methods.cam import CAMNet, classification_loss
from weakbench.methods.lr_schedules import LRSchedule, describe_setting
from weakbench.methods.metric_declarations import metric

#: The optimisation the official code runs (github.com/shjo-april/PuzzleCAM,
#: ``train_classification_with_puzzle.py`` and ``tools/ai/optim_utils.py``; the paper gives none):
#: poly decay ``(1 − t/T)^0.9`` per iteration, the new layers at 10× the backbone's lr
#: (``backbone_lr_mult`` 0.1), Nesterov SGD, weight decay 1e-4. Its ``PolyOptimizer`` passes the
#: weight decay positionally into SGD's ``momentum`` slot (and uses its ``momentum=0.9`` argument
#: as the poly power), so the SGD momentum actually run is 1e-4; this setting keeps what runs.
#: Not reproduced: biases at 2× their layer's lr without weight decay. Its lr (0.1 for the
#: ImageNet-pretrained backbone, 1.0 for the new layers) is not part of the setting.
#: ``search_spaces/puzzlecam_official.yaml``.
OFFICIAL_OPTIMIZATION = {"lr_schedule": "poly", "poly_power": 0.9, "nesterov": True, "momentum": 1e-4,
                         "weight_decay": 1e-4, "backbone_lr_mult": 0.1}


class PuzzleCAMConfig(ClassifierConfig):
    """Puzzle-CAM hyperparameters (defaults: the paper's α = 4, 2 × 2 tiles, ramp over half of
    training, scales (0.5, 1, 1.5, 2) with flips).

    Raises (through :func:`weakbench.methods.base.validate_config`):
        ConfigError: ``num_tiles`` is not a square; ``input_size`` is not divisible by the grid
            side ``g = √num_tiles``; or the tile CAMs would be smaller than 2×2
            (``input_size / output_stride / g < 2``) — each message names the fields and values
            that fix it.
    """

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("alpha", "num_tiles", "alpha_ramp_fraction"),
        "evaluation": ("inference_scales", "inference_flip", "inference", "bg_threshold")}

    alpha: float = Field(4.0, ge=0, le=100, description="α, maximum weight of L_re (eq. 7)")
    num_tiles: int = Field(4, ge=4, le=64, description="tiles of the puzzle module (a square: 4 = 2×2, 9, 16)")
    alpha_ramp_fraction: float = Field(0.5, ge=0, le=1, description="fraction of training over which α ramps 0 → alpha")
    inference_scales: tuple[float, ...] = Field((0.5, 1.0, 1.5, 2.0), min_length=1, description="image scales of the inference CAMs")
    inference_flip: bool = Field(True, description="add horizontally flipped images to the inference CAMs")
    inference: Literal["single_scale", "multi_scale"] = Field(
        "single_scale", description="maps of the box metrics: single_scale (the scale-1 CAM, as every method) or "
                                    "multi_scale (the paper's inference_scales with flips: test-time augmentation); "
                                    "the pseudo-mask metrics always use multi_scale")
    bg_threshold: float = Field(0.2, gt=0, lt=1, description="background score of the pseudo semantic masks")
    lr_schedule: LRSchedule = Field(
        "constant", description="lr schedule (weakbench.methods.lr_schedules); 'constant' keeps the common training of "
        "the leaderboard. The official code (shjo-april/PuzzleCAM) runs OFFICIAL_OPTIMIZATION: "
        + describe_setting(OFFICIAL_OPTIMIZATION) + " (search_spaces/puzzlecam_official.yaml)")

    @field_validator("inference_scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0 < s <= 4) for s in v):
            raise ValueError(f"inference_scales must lie in (0, 4], got {list(v)}")
        return tuple(float(s) for s in v)

    @model_validator(mode="after")
    def _tiles(self) -> "PuzzleCAMConfig":
        g = math.isqrt(self.num_tiles)
        if g * g != self.num_tiles:
            raise ValueError(f"num_tiles ({self.num_tiles}) must be a square number of tiles: 4 (2×2), 9 (3×3), 16 (4×4)")
        if self.input_size % g:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by the tile grid side {g} "
                             f"(num_tiles={self.num_tiles}); use input_size {self.input_size // g * g} or {(self.input_size // g + 1) * g}")
        tile_cam = self.input_size / self.output_stride / g
        if tile_cam < 2:
            fixes = [f"input_size >= {2 * g * self.output_stride}"]
            strides = [s for s in (16, 8) if s < self.output_stride and self.input_size / s / g >= 2]
            if strides:
                fixes.append(f"output_stride {strides[0]}")
            grids = [k for k in range(g - 1, 1, -1) if self.input_size % k == 0 and self.input_size / self.output_stride / k >= 2]
            if grids:
                fixes.append(f"num_tiles {grids[0] ** 2} ({grids[0]}×{grids[0]})")
            raise ValueError(
                f"num_tiles={self.num_tiles} ({g}×{g} tiles) with input_size={self.input_size} and "
                f"output_stride={self.output_stride} gives tile CAMs of {tile_cam:g}×{tile_cam:g} "
                f"(input_size / output_stride / {g}), smaller than 2×2; use {' or '.join(fixes)}")
        return self

    @property
    def grid(self) -> int:
        """Tiles per side, ``g = √num_tiles``."""
        return math.isqrt(self.num_tiles)


# ---------------------------------------------------------------------- puzzle module
def tile_images(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Tiling module: split (B, ch, H, W) into ``grid²`` non-overlapping tiles.

    Returns (grid²·B, ch, H/grid, W/grid), tile-major: tile ``(i, j)`` (row i, column j) of every
    image comes in block ``i·grid + j``. Raises ``ValueError`` if H or W is not divisible by grid.
    """
    b, ch, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"tile_images: size {h}×{w} is not divisible by grid {grid}")
    th, tw = h // grid, w // grid
    t = images.reshape(b, ch, grid, th, grid, tw).permute(2, 4, 0, 1, 3, 5)
    return t.reshape(grid * grid * b, ch, th, tw)


def merge_tiles(tiles: torch.Tensor, grid: int) -> torch.Tensor:
    """Merging module, the inverse of :func:`tile_images`: (grid²·B, ch, h, w) → (B, ch, grid·h, grid·w)."""
    n, ch, h, w = tiles.shape
    if n % (grid * grid):
        raise ValueError(f"merge_tiles: {n} tiles is not a multiple of grid² = {grid * grid}")
    b = n // (grid * grid)
    t = tiles.reshape(grid, grid, b, ch, h, w).permute(2, 3, 0, 4, 1, 5)
    return t.reshape(b, ch, grid * h, grid * w)


# ---------------------------------------------------------------------- losses
def reconstruction_loss(cams_full: torch.Tensor, cams_merged: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L_re`` (Puzzle-CAM eq. 6) restricted to the image's classes (official "masking" option).

    Args:
        cams_full: float (B, C, h, w) class maps ``A^s`` of the full images.
        cams_merged: float (B, C, h, w) merged tile maps ``A^re``.
        labels: float (B, C) multi-hot image labels in {0, 1}.

    Returns:
        Scalar ``mean_{b,c,x,y} |A^s − A^re| · y_{b,c}`` (mean over all B·C·h·w entries).
    """
    if cams_full.shape != cams_merged.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, {tuple(cams_full.shape)} vs {tuple(cams_merged.shape)}")
    # in float32 under bf16 autocast: eq. 6 is a small difference of two maps of similar values
    return ((cams_full.float() - cams_merged.float()).abs() * labels[:, :, None, None]).mean()


def alpha_at(progress: float, alpha: float, ramp_fraction: float) -> float:
    """α at training progress ``progress`` ∈ [0, 1]: ``alpha · min(1, progress / ramp_fraction)``
    (linear ramp; ``ramp_fraction = 0`` means constant ``alpha``)."""
    if ramp_fraction <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, max(0.0, progress) / ramp_fraction)


def pseudo_semantic_masks(cams: torch.Tensor, labels: torch.Tensor, bg_threshold: float) -> torch.Tensor:
    """Pseudo semantic masks from normalised CAMs.

    Args:
        cams: float (B, C, H, W) CAMs in [0, 1].
        labels: float (B, C) multi-hot image labels; absent classes are never predicted.
        bg_threshold: constant background score in (0, 1).

    Returns:
        int64 (B, H, W): 0 where no present class's CAM exceeds ``bg_threshold`` (background),
        otherwise ``1 + argmax_c`` over the present classes (ties go to the background).
    """
    scores = cams * (labels[:, :, None, None] > 0.5)
    bg = torch.full_like(scores[:, :1], float(bg_threshold))
    return torch.cat([bg, scores], dim=1).argmax(dim=1)


def semantic_confusion(pred: torch.Tensor, gt: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Confusion matrix int64 (L, L) [gt, pred] of int64 label maps; ``gt < 0`` pixels are ignored."""
    keep = gt >= 0
    idx = gt[keep] * num_labels + pred[keep]
    return torch.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def miou_from_confusion(conf: torch.Tensor) -> float:
    """Mean IoU (%) over labels present in the ground truth or the prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    valid = union > 0
    return float(100.0 * (tp[valid] / union[valid]).mean()) if valid.any() else float("nan")


def semantic_targets(masks: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class bool masks (B, C, H, W) → int64 (B, H, W) labels: 0 background, ``c + 1`` class
    ``c``, −1 ignored (``ignore`` pixels and pixels claimed by two or more classes)."""
    m = masks.bool()
    count = m.sum(dim=1)
    target = torch.where(count > 0, m.to(torch.int8).argmax(dim=1) + 1, torch.zeros_like(count))
    target = torch.where(count > 1, torch.full_like(target, -1), target)
    if ignore is not None:
        target = torch.where(ignore.bool(), torch.full_like(target, -1), target)
    return target.long()


# ---------------------------------------------------------------------- method
@register_method("puzzlecam")
class PuzzleCAM(ClassifierMethod):
    """Puzzle-CAM: L_cls + L_p-cls + α·L_re with α ramped (ICIP 2021, eqs. 4–7).

    ``training_losses`` returns ``{"loss", "cls", "p_cls", "re", "alpha"}``.
    """

    Config = PuzzleCAMConfig
    config: PuzzleCAMConfig
    #: the pseudo-mask metrics of :meth:`extra_metrics`
    metrics = (
        metric("pseudo_mask_miou", "max", "%", "pseudo-mask mIoU",
               "the overlap (IoU) of the semantic masks made from the maps with the true masks, averaged over the classes "
               "and the background, at the best background threshold"),
        metric("pseudo_mask_bg_threshold", None, "threshold", "pseudo-mask background threshold",
               "the background threshold at which the pseudo-mask mIoU is reached"),
        metric("pseudo_mask_miou_at_config", "max", "%", "pseudo-mask mIoU (configured threshold)",
               "the pseudo-mask mIoU at the configuration's own background threshold"),
    )

    #: thresholds swept for the pseudo-mask mIoU of :meth:`extra_metrics`
    bg_thresholds = tuple(round(0.05 * i, 2) for i in range(1, 20))

    def build_model(self) -> torch.nn.Module:
        return CAMNet(self.config, self.num_classes)

    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["labels"]
        g = self.config.grid
        # one forward for the full images and their tiles would mix BN statistics of two input
        # sizes; the official code runs them as two forwards, and so do we
        logits, cams_full = model(images)
        _, cams_tiles = model(tile_images(images, g))
        cams_merged = merge_tiles(cams_tiles, g)
        if cams_merged.shape[-2:] != cams_full.shape[-2:]:
            cams_merged = F.interpolate(cams_merged, size=cams_full.shape[-2:], mode="bilinear", align_corners=False)
        cls = classification_loss(logits, labels, self.multilabel)
        p_cls = classification_loss(cams_merged.mean(dim=(2, 3)), labels, self.multilabel)
        target = labels if self.multilabel else F.one_hot(labels.argmax(1), labels.shape[1]).to(labels.dtype)
        re = reconstruction_loss(cams_full, cams_merged, target)
        alpha = alpha_at(ctx.progress, self.config.alpha, self.config.alpha_ramp_fraction)
        loss = cls + p_cls + alpha * re
        return {"loss": loss, "cls": cls.detach(), "p_cls": p_cls.detach(), "re": re.detach(),
                "alpha": torch.tensor(alpha)}

    def class_scores(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)[0]

    def cams(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.cams_and_scores(model, images)[0]

    def cams_and_scores(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps of the box metrics (B, C, h, w) by ``inference`` (module docstring) and the
        logits (B, C) of the scale-1 un-flipped image: ``single_scale``, the raw CAM from one
        forward pass (as :meth:`ClassifierMethod.cams_and_scores`); ``multi_scale``,
        :meth:`multi_scale_cams`."""
        if self.config.inference == "single_scale":
            logits, cams = model(images)
            return cams, logits
        return self.multi_scale_cams(model, images)

    def multi_scale_cams(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-scale, flipped CAMs (ReLU, summed, max-normalised to [0, 1]) (B, C, h, w) at the
        largest scale's map size, and the logits (B, C) of the scale-1 un-flipped image (Sec. 4.1)."""
        c = self.config
        h, w = images.shape[-2:]
        maps: list[torch.Tensor] = []
        logits = None
        for s in c.inference_scales:
            x = images if s == 1.0 else F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))),
                                                      mode="bilinear", align_corners=False)
            batch = torch.cat([x, x.flip(-1)]) if c.inference_flip else x
            lg, cam = model(batch)
            b = images.shape[0]
            if s == 1.0:
                logits = lg[:b]
            cam = F.relu(cam)
            if c.inference_flip:
                cam = cam[:b] + cam[b:].flip(-1)
            maps.append(cam)
        if logits is None:
            logits = model(images)[0]
        size = max((m.shape[-2:] for m in maps), key=lambda t: t[0] * t[1])
        total = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m
                    for m in maps)
        total = total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)
        return total, logits

    @torch.no_grad()
    def extra_metrics(self, model: torch.nn.Module, batches: list[Mapping[str, Any]], device: torch.device) -> dict[str, float]:
        """mIoU (%) of pseudo semantic masks (classes + background; Puzzle-CAM Sec. 4.1's
        pseudo-label evaluation) over the images of ``batches`` that have real masks.

        Args:
            batches: as :meth:`ClassifierMethod.extra_metrics`: ``"image"`` float (B, 3, S, S), ``"labels"``
                float (B, C), ``"masks"`` bool (B, C, S, S), ``"ignore"`` bool (B, S, S) optional,
                ``"has_masks"`` bool (B,). Only images with ``has_masks`` count; a batch without
                ``"masks"`` or ``"has_masks"`` is skipped (its masks cannot be told from
                box-only data's all-empty placeholders).

        Returns:
            ``{}`` when no image has masks; else ``pseudo_mask_miou`` (%, in [0, 100]) at the best
            background threshold of a sweep 0.05, 0.10, …, 0.95, that threshold
            (``pseudo_mask_bg_threshold``) and the mIoU at ``bg_threshold``
            (``pseudo_mask_miou_at_config``).
        """
        n_labels = self.num_classes + 1
        ths = sorted(set(self.bg_thresholds) | {self.config.bg_threshold})
        conf = {t: torch.zeros(n_labels, n_labels, dtype=torch.long) for t in ths}
        seen = False
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                if "masks" not in batch or "has_masks" not in batch:
                    continue
                keep = torch.as_tensor(batch["has_masks"]).bool().cpu()
                if not keep.any():
                    continue
                seen = True
                images = batch["image"][keep].to(device)
                labels = batch["labels"][keep].to(device)
                cams, _ = self.multi_scale_cams(model, images)
                cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)
                ignore = batch.get("ignore")
                gt = semantic_targets(batch["masks"][keep].to(device), ignore[keep].to(device) if ignore is not None else None)
                for t in ths:
                    pred = pseudo_semantic_masks(cams, labels, t)
                    conf[t] += semantic_confusion(pred.cpu(), gt.cpu(), n_labels)
        finally:
            model.train(was_training)
        if not seen:
            return {}
        scores = {t: miou_from_confusion(conf[t]) for t in ths}
        best = max(scores, key=lambda t: -1 if math.isnan(scores[t]) else scores[t])
        return {"pseudo_mask_miou": scores[best], "pseudo_mask_bg_threshold": float(best),
                "pseudo_mask_miou_at_config": scores[self.config.bg_threshold]}
