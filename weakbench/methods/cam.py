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
from weakbench.methods.base import MethodConfig, StepContext, register_method
from weakbench.methods.classifier import ClassifierConfig, ClassifierMethod
from weakbench.core.errors import ConfigError


class CAMNet(torch.nn.Module):
    """Backbone + 1×1 conv classifier. ``forward(x)`` returns ``(logits (B, C), cams (B, C, h, w))``.

    With ``features: full`` (:class:`~weakbench.methods.classifier.ClassifierConfig`) the CAM reads the
    backbone's full feature extractor (:class:`~weakbench.methods.backbones.FullFeatures`); with
    ``classifier_init: pretrained_head`` the classifier is the pretrained head itself (weight
    and bias copied), so with ``epochs: 0`` the CAMs are those of the pretrained classifier.

    Raises:
        ConfigError: ``classifier_init: pretrained_head`` without ``pretrained`` or
            ``features: full``, or with ``num_classes`` different from the head's.
    """

    def __init__(self, config: MethodConfig, num_classes: int):
        super().__init__()
        features = getattr(config, "features", "stages")
        init = getattr(config, "classifier_init", "random")
        if init == "pretrained_head" and not (features == "full" and (config.pretrained or config.weights_path)):
            raise ConfigError("classifier_init: pretrained_head needs features: full and pretrained: true (or "
                              "weights_path): the head reads the full feature extractor's output")
        self.backbone = create_backbone(
            config.backbone, pretrained=config.pretrained, weights_path=config.weights_path,
            output_stride=config.output_stride, full=features == "full",
        )
        dim = self.backbone.feature_info.channels()[-1]
        head = init == "pretrained_head"
        self.classifier = torch.nn.Conv2d(dim, num_classes, kernel_size=1, bias=head)
        if head:
            w, b = getattr(self.backbone, "head_weight", None), getattr(self.backbone, "head_bias", None)
            if w is None:
                raise ConfigError(f"classifier_init: pretrained_head: backbone {config.backbone!r} has no linear head")
            if w.shape != (num_classes, dim):
                raise ConfigError(f"classifier_init: pretrained_head: the head of {config.backbone!r} has "
                                  f"{w.shape[0]} classes over {w.shape[1]} features, the dataset {num_classes} classes; "
                                  f"use it only on data whose classes are the backbone's (ILSVRC, 1000 in the standard "
                                  f"order), else classifier_init: random")
            with torch.no_grad():
                self.classifier.weight.copy_(w[:, :, None, None])
                if b is not None:
                    self.classifier.bias.copy_(b)
                else:
                    self.classifier.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map, float32 (B, D, h, w)."""
        return self.backbone(x)[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.classifier(self.features(x))  # a bias adds a constant per class: CAMs unchanged after min-max
        return cams.mean(dim=(2, 3)), cams


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Multi-label soft-margin loss (mean over classes and batch) or cross-entropy.

    Args:
        logits: float (B, C) (bf16 from an autocast forward is cast to float32 first).
        labels: float32 (B, C) multi-hot in {0, 1}; with ``multilabel=False`` each row has one 1.
    """
    logits = logits.float()  # the loss in float32 when the forward ran under bf16 autocast
    if multilabel:
        return F.multilabel_soft_margin_loss(logits, labels)
    return F.cross_entropy(logits, labels.argmax(dim=1))


@register_method("cam")
class CAM(ClassifierMethod):
    """Plain CAM baseline; hyperparameters are the common ones of :class:`ClassifierConfig`."""

    Config = ClassifierConfig
    #: the baseline is compared with the trivial baselines only
    compared_with = ("center_gaussian", "whole_image")

    def build_model(self) -> torch.nn.Module:
        return CAMNet(self.config, self.num_classes)

    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, _ = model(batch["image"])
        loss = classification_loss(logits, batch["labels"], self.multilabel)
        return {"loss": loss, "cls": loss.detach()}
