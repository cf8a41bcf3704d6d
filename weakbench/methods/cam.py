"""CAM baseline (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016).

Model: timm backbone → last feature map F (B, D, h, w) → global average pooling → linear
classifier W (C, D). The CAM of class c is ``M_c(x, y) = Σ_d W[c, d] · F[d, x, y]`` (eq. 1 of
Zhou et al. with the bias dropped, since a constant offset disappears in min-max
normalisation). The classifier is implemented as a 1×1 convolution so that ``cams`` is one
convolution over F and the logits are its spatial mean (GAP commutes with the linear layer).

Loss: multi-label soft-margin loss (``MultiLabelSoftMarginLoss``, i.e. mean binary
cross-entropy over classes) for multi-label data (COCO, VOC); cross-entropy when every image
has exactly one label (``multilabel=False``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from weakbench.methods.backbones import create_backbone
from weakbench.methods.base import Method, MethodConfig, StepContext, register_method


class CAMNet(torch.nn.Module):
    """Backbone + 1×1 conv classifier. ``forward(x)`` returns ``(logits (B, C), cams (B, C, h, w))``."""

    def __init__(self, config: MethodConfig, num_classes: int):
        super().__init__()
        self.backbone = create_backbone(
            config.backbone, pretrained=config.pretrained, weights_path=config.weights_path,
            output_stride=config.output_stride,
        )
        dim = self.backbone.feature_info.channels()[-1]
        self.classifier = torch.nn.Conv2d(dim, num_classes, kernel_size=1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, float32 (B, D, h, w)."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.classifier(self.features(x))
        return cams.mean(dim=(2, 3)), cams


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Multi-label soft-margin loss (mean over classes and batch) or cross-entropy.

    Args:
        logits: float32 (B, C).
        labels: float32 (B, C) multi-hot in {0, 1}; with ``multilabel=False`` each row has one 1.
    """
    if multilabel:
        return F.multilabel_soft_margin_loss(logits, labels)
    return F.cross_entropy(logits, labels.argmax(dim=1))


@register_method("cam")
class CAM(Method):
    """Plain CAM baseline; hyperparameters are the common ones of :class:`MethodConfig`."""

    Config = MethodConfig

    def build_model(self) -> torch.nn.Module:
        return CAMNet(self.config, self.num_classes)

    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, _ = model(batch["image"])
        loss = classification_loss(logits, batch["labels"], self.multilabel)
        return {"loss": loss, "cls": loss.detach()}
