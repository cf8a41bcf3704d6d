"""Trivial WSOL baselines that need no training: ``center_gaussian`` and ``whole_image``.

Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right" (CVPR 2020),
Sec. 5, show that a centre Gaussian with no training is a strong WSOL baseline; a method that
does not beat it localises nothing beyond the dataset's centre bias. Both baselines go through
the same sweep, tracking, results store, registry and leaderboard as every method.

Plan: two ``eval`` stages and no ``fit`` — ``val`` (the ``val`` split, the metric that selects
σ like any hyperparameter) then ``test`` (the ``test`` split, reported). A plan of eval stages
is the runner's cleanest fit for a parameter-free model: no Train epoch loop, no checkpoint of
weights, no optimiser, one progress unit per split; ``val/*`` and ``test/*`` keys are the same
plain keys the classifier methods log, so selection and the board treat them alike.

Maps (per image, identical for every class; the GT class's map is the prior itself):

* ``center_gaussian``: ``M(x, y) = exp(-((x - S/2)² + (y - S/2)²) / (2 (σ·S)²))`` at pixel
  centres of the S×S evaluation frame, σ = ``sigma`` (a fraction of the side).
* ``whole_image``: 1 everywhere but the top-left pixel (0). A constant map has no foreground
  under the protocol's min-max normalisation (it becomes all 0), so one pixel is dropped; at every
  threshold the foreground's bounding box is the whole frame ``[0, 0, S-1, S-1]``, and PxAP is
  that of a constant map up to one pixel (≈ 100·P/(P+N)).

Only localisation metrics are reported (``max_box_acc``, ``max_box_acc_v2`` with per-δ values
and thresholds, ``pxap`` where there are masks, ``num_images``): the baselines have no classifier,
so classification accuracy, top-1/top-5 localisation and semantic mIoU would be meaningless.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from weakbench.methods.base import MethodConfig, Stage, StageContext, register_method
from weakbench.methods.classifier import CamPredictor, ClassifierMethod, WsolConfig, save_per_image
from weakbench.methods.pipeline import UNUSED

__all__ = ["BaselineConfig", "CenterGaussianConfig", "PriorNet", "CenterGaussian", "WholeImage", "gaussian_prior",
           "whole_image_prior"]

#: metrics a baseline does not report (they need a classifier)
_CLASSIFIER_METRICS = ("cls_acc", "cls_chance", "cls_map", "top1_loc", "top5_loc", "miou", "best_bg_threshold")


def _outer(h: int, w: int, sigma: float) -> torch.Tensor:
    """exp(-(dy² + dx²) / 2σ²) at the pixel centres of an (h, w) frame, d in units of each side."""
    cy = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    cx = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    return torch.exp(-(cy[:, None] ** 2 + cx[None, :] ** 2) / (2.0 * sigma ** 2))


def gaussian_prior(size: int, sigma: float) -> torch.Tensor:
    """Isotropic centre Gaussian, float32 (size, size) in (0, 1], peak 1 at the centre.

    Args:
        size: S, the square frame's side in pixels (≥ 1).
        sigma: standard deviation as a fraction of S (> 0); Choe et al. use σ ≈ S/4.
    """
    return _outer(size, size, sigma)


def whole_image_prior(size: int) -> torch.Tensor:
    """float32 (size, size): 1 everywhere but ``[0, 0]`` (0), so that min-max normalisation keeps
    it and every threshold's foreground box is the whole frame (module docstring)."""
    return PriorNet("whole_image", 1).prior(size, size)


class PriorNet(torch.nn.Module):
    """A parameter-free "model": ``forward(x)`` on float32 (B, 3, H, W) images returns
    ``(logits (B, C) zeros, cams (B, C, H, W))``, the prior map at the input's resolution for every
    class (an ``expand``ed view: no C·H·W memory per image).

    Args:
        kind: ``"center_gaussian"`` or ``"whole_image"``.
        num_classes: C.
        sigma: the Gaussian's σ as a fraction of the side (``center_gaussian`` only).
    """

    def __init__(self, kind: str, num_classes: int, sigma: float = 0.25):
        super().__init__()
        if kind not in ("center_gaussian", "whole_image"):
            raise ValueError(f"PriorNet: kind {kind!r} is not center_gaussian or whole_image")
        self.kind, self.num_classes, self.sigma = kind, int(num_classes), float(sigma)

    def prior(self, h: int, w: int) -> torch.Tensor:
        """The prior map, float32 (h, w); a non-square frame uses σ as a fraction of each side."""
        if self.kind == "whole_image":
            m = torch.ones((h, w), dtype=torch.float32)
            m[0, 0] = 0.0
            return m
        return _outer(h, w, self.sigma)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        m = self.prior(h, w).to(x.device)
        logits = torch.zeros((b, self.num_classes), dtype=torch.float32, device=x.device)
        return logits, m[None, None].expand(b, self.num_classes, h, w)


class BaselineConfig(WsolConfig):
    """Hyperparameters of a trivial baseline: the common ones (``input_size`` is the evaluation
    frame, ``cam_curve_interval`` the threshold step, ``seed`` a repeat that changes nothing);
    there is no backbone (``backbone: none``) and nothing is trained (``epochs: 0``). The
    evaluated fields form the ``evaluation`` group; the rest of the common schema is ``unused``."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "evaluation": ("input_size",),
        UNUSED: ("backbone", "pretrained", "weights_path", "output_stride", "lr", "backbone_lr_mult", "weight_decay",
                 "momentum", "nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma", "batch_size", "epochs",
                 "seed")}

    backbone: Literal["none"] = Field("none", description="no backbone: the map is a fixed prior")
    epochs: int = Field(0, ge=0, le=0, description="nothing is trained")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:  # replaces MethodConfig's timm check
        return v


class CenterGaussianConfig(BaselineConfig):
    """``sigma``: σ of the centre Gaussian as a fraction of the side (Choe et al. 2020); chosen on
    val like any hyperparameter (``search_spaces/center_gaussian.yaml``)."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"evaluation": ("sigma",)}

    sigma: float = Field(0.25, gt=0, le=2, description="Gaussian σ as a fraction of the side S (0.25: σ = S/4)")


class _Baseline(ClassifierMethod):
    """Shared plan and hooks of the trivial baselines (module docstring)."""

    Config: ClassVar[type[MethodConfig]] = BaselineConfig
    stage_groups = {"val": ("evaluation",), "test": ("evaluation",)}
    #: metrics of evaluate_split a baseline does not report (they need a classifier)
    unreported_metrics: ClassVar[tuple[str, ...]] = _CLASSIFIER_METRICS
    #: a trivial baseline is what the others are compared against
    compared_with: ClassVar[tuple[str, ...]] = ()

    def model(self) -> PriorNet:
        """The parameter-free map model of this baseline."""
        raise NotImplementedError

    @classmethod
    def seed_free(cls, config) -> bool:
        """Always: a fixed prior draws nothing at random (every seed gives the same maps)."""
        return True

    def build_model(self) -> torch.nn.Module:
        return self.model()

    def plan(self) -> tuple[Stage, ...]:
        return (Stage("val", "eval", split="val", namespaced=False),
                Stage("test", "eval", split="test", namespaced=False))

    def evaluate_stage(self, stage: Stage, ctx: StageContext) -> tuple[dict[str, float], list]:
        """Localisation metrics of the prior on ``stage.split`` (classifier metrics dropped)."""
        from weakbench.methods.evaluate import evaluate_split

        metrics, overlays, details = evaluate_split(
            self, self.model().to(ctx.device), ctx.source, ctx.splits[stage.split], input_size=self.config.input_size,
            device=ctx.device, cam_curve_interval=self.config.cam_curve_interval, batch_size=ctx.eval_batch_size,
            max_images=ctx.max_images, num_overlays=ctx.num_overlays if stage.split == "test" else 0)
        save_per_image(details, ctx, stage.split)
        return {k: v for k, v in metrics.items() if k not in self.unreported_metrics}, overlays

    def build_predictor(self, ctx: StageContext) -> torch.nn.Module | None:
        """A :class:`CamPredictor` around the prior (what ``register`` and ``evaluate`` load)."""
        mean, std = self.input_normalization
        return CamPredictor(self, self.model().eval(), ctx.source.class_names, self.config.input_size, mean, std)


@register_method("center_gaussian")
class CenterGaussian(_Baseline):
    """Centre Gaussian of σ = ``sigma``·S for every image (Choe et al. 2020's trivial baseline)."""

    Config = CenterGaussianConfig

    def model(self) -> PriorNet:
        return PriorNet("center_gaussian", self.num_classes, sigma=self.config.sigma)


@register_method("whole_image")
class WholeImage(_Baseline):
    """The whole frame as the box of every image."""

    Config = BaselineConfig

    def model(self) -> PriorNet:
        return PriorNet("whole_image", self.num_classes)
