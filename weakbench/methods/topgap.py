"""Top-GAP (Nieradzik, Stephani, Keuper, "Top-GAP: Integrating size priors in CNNs for more
interpretability, robustness, and bias mitigation", 2024).

Model (Sec. 3.1, Fig. 2): the last ``num_feature_maps`` (3 or 4) feature maps of a timm
``features_only`` backbone each go through a 3×3 convolution with 256 filters, are upsampled
(bilinear) to the largest of them and summed; a 1×1 convolution maps the sum to the classes. Its
output ``X`` (B, C, h, w) — at the largest feature map's resolution, e.g. stride 4 for ResNet — is
the CAM. The paper names no activation or normalisation in the head, so there is none (an FPN's
lateral convolutions are linear too); optional dropout before the 1×1 convolution.

Pooling (Definition 5): per class channel, the mean of its ``k`` largest spatial values
(:func:`top_gap`); ``k = 1`` is global max pooling, ``k = h·w`` is GAP. ``k`` is ``top_k``
(absolute number of positions, the paper's k ∈ {64, …, 2048} on a 56×56 map; default 256 as in
Table A6) or, when given, ``top_k_fraction · h·w`` (rounded, at least 1); k is clamped to ``h·w``.

Loss (eq. 1): ``L = CE + λ‖X‖₁``. For multi-label data the CE is the multi-label soft-margin
loss (:func:`weakbench.methods.cam.classification_loss`). ``‖X‖₁`` is taken as the **mean**
absolute value of ``X`` over all B·C·h·w entries (our choice: the paper reports ℓ1 values around
0.05–0.4 and uses λ = 1 next to a CE of order 1, which fits a mean, not a sum over 56²·C entries).

Evaluation of the paper (:meth:`TopGAP.extra_metrics`): IoU of the thresholded CAM with the
object mask (Table 7), the ERF distance (Definition 6) and robust accuracy under L∞ PGD
(ε = 8/255, 20 steps; Table 3) using Foolbox 3 (``LinfPGD``). torchattacks 3.5.1 pins
``requests~=2.25.1``, which conflicts with MLflow's requirements; Foolbox 3.3.4 installs beside
MLflow 3.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field

from weakbench.methods.backbones import create_backbone
from weakbench.methods.base import Method, MethodConfig, StepContext, normalize_maps, register_method, resize_maps
from weakbench.methods.cam import classification_loss
from weakbench.platform.errors import ConfigError

#: ImageNet statistics the engine normalises images with (weakbench.platform.data.transforms).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class TopGAPConfig(MethodConfig):
    """Top-GAP hyperparameters (defaults: λ = 1, k = 256, 3×3 convs with 256 filters, 4 maps)."""

    top_k: int = Field(256, ge=1, le=1_000_000, description="k, positions averaged per class by Top-GAP (absolute)")
    top_k_fraction: float | None = Field(None, gt=0, le=1, description="k as a fraction of the CAM's h·w; overrides top_k when set")
    l1_weight: float = Field(1.0, ge=0, le=100, description="λ, weight of the ℓ1 norm of the CAM (eq. 1)")
    num_feature_maps: Literal[3, 4] = Field(4, description="last backbone feature maps fed to the head")
    head_channels: int = Field(256, ge=8, le=2048, description="filters of the 3×3 head convolutions")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the 1×1 class convolution")
    cam_iou_threshold: float = Field(0.5, gt=0, lt=1, description="threshold of the min-max normalised CAM for the IoU metric")
    pgd_epsilon: float = Field(8 / 255, ge=0, le=1, description="L∞ radius of PGD in [0, 1] pixel units")
    pgd_steps: int = Field(20, ge=1, le=1000, description="PGD iterations")
    pgd_step_size: float = Field(2 / 255, gt=0, le=1, description="PGD step in [0, 1] pixel units")
    eval_images: int = Field(16, ge=1, le=10_000, description="images used for the ERF distance and PGD metrics")


def top_gap(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-GAP pooling (Definition 5): per channel, the mean of the ``k`` largest values.

    Args:
        x: float (B, C, h, w).
        k: number of positions, clamped to [1, h·w].

    Returns:
        float (B, C). ``k = 1`` equals global max pooling, ``k = h·w`` equals GAP.
    """
    flat = x.flatten(2)
    k = max(1, min(int(k), flat.shape[-1]))
    if k == flat.shape[-1]:
        return flat.mean(dim=-1)
    return flat.topk(k, dim=-1).values.mean(dim=-1)


def l1_sparsity(x: torch.Tensor) -> torch.Tensor:
    """``‖X‖₁`` of eq. 1 as the mean absolute value over all entries (scalar, ≥ 0)."""
    return x.abs().mean()


def resolve_k(config: TopGAPConfig, hw: int) -> int:
    """k for a CAM of ``hw`` positions: ``round(top_k_fraction·hw)`` (≥ 1) or ``top_k``, ≤ ``hw``."""
    k = round(config.top_k_fraction * hw) if config.top_k_fraction is not None else config.top_k
    return max(1, min(int(k), hw))


class TopGAPNet(torch.nn.Module):
    """Backbone + Top-GAP head. ``forward(x)`` → ``(logits (B, C), cams (B, C, h, w))`` with the
    CAM at the largest selected feature map's resolution and logits = Top-GAP of the CAM."""

    def __init__(self, config: TopGAPConfig, num_classes: int):
        super().__init__()
        n = config.num_feature_maps
        self.backbone = create_backbone(
            config.backbone, pretrained=config.pretrained, weights_path=config.weights_path,
            output_stride=config.output_stride, out_indices=tuple(range(-n, 0)),
        )
        channels = self.backbone.feature_info.channels()
        if len(channels) != n:
            raise ConfigError(f"topgap: backbone {config.backbone!r} gives {len(channels)} feature maps, num_feature_maps={n}")
        self.laterals = torch.nn.ModuleList(
            torch.nn.Conv2d(c, config.head_channels, kernel_size=3, padding=1) for c in channels)
        self.dropout = torch.nn.Dropout2d(config.dropout) if config.dropout > 0 else torch.nn.Identity()
        self.classifier = torch.nn.Conv2d(config.head_channels, num_classes, kernel_size=1)
        self.config = config

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        total = None
        for f, conv in zip(feats, self.laterals):
            y = conv(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        return self.classifier(self.dropout(total))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams = self.cam(x)
        k = resolve_k(self.config, cams.shape[-2] * cams.shape[-1])
        return top_gap(cams, k), cams


# ---------------------------------------------------------------------- evaluation helpers
def cam_mask_iou(maps: torch.Tensor, masks: torch.Tensor, threshold: float, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of thresholded maps with object masks (Top-GAP Table 7).

    Args:
        maps: float (N, H, W) min-max normalised CAMs in [0, 1].
        masks: bool (N, H, W) object masks.
        threshold: a pixel is foreground when ``map >= threshold``.
        ignore: optional bool (N, H, W) pixels left out of both intersection and union.

    Returns:
        float (N,) IoU in [0, 1] (1 when prediction and mask are both empty).
    """
    pred = maps >= threshold
    gt = masks.bool()
    if ignore is not None:
        keep = ~ignore.bool()
        pred, gt = pred & keep, gt & keep
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).float()


def erf_distance(cam_fn, images: torch.Tensor) -> torch.Tensor:
    """ERF distance (Top-GAP Definition 6) per image: ``ERF(h/2, w/2) − ERF(1, 1)``.

    ``ERF(p)`` is the mean over input pixels of ``|∂ Σ_k X_{k,p} / ∂ I|`` (Definition 1 with the
    channel sum; input channels summed). The paper's appendix z-normalises the gradients; we
    z-normalise the two gradient maps of an image jointly (mean 0, std 1 over their 2·H·W
    values), which makes the distance unit-free. Positive: the centre output depends more on the
    input than the corner output.

    Args:
        cam_fn: images (B, 3, H, W) → CAM (B, C, h, w).
        images: float (B, 3, H, W).

    Returns:
        float (B,).
    """
    x = images.detach().clone().requires_grad_(True)
    cams = cam_fn(x).sum(dim=1)  # (B, h, w), channel sum
    h, w = cams.shape[-2:]
    g_center = torch.autograd.grad(cams[:, h // 2, w // 2].sum(), x, retain_graph=True)[0].abs().sum(1)
    g_corner = torch.autograd.grad(cams[:, 0, 0].sum(), x)[0].abs().sum(1)
    both = torch.stack([g_center, g_corner], 1).flatten(1)  # (B, 2HW)
    z = (both - both.mean(1, keepdim=True)) / both.std(1, keepdim=True).clamp(min=1e-12)
    z = z.reshape(x.shape[0], 2, -1)
    return z[:, 0].mean(1) - z[:, 1].mean(1)


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool (B,): the top-scoring class is one of the image's labels."""
    return labels.gather(1, logits.argmax(1, keepdim=True))[:, 0] > 0.5


def pgd_robust_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
                       steps: int, step_size: float, mean=_MEAN, std=_STD) -> torch.Tensor:
    """Top-1 correctness under an L∞ PGD attack (Foolbox ``LinfPGD``, random start).

    The attack works in [0, 1] pixel space (images are de-normalised with ``mean``/``std`` and the
    model re-normalises them). Its target label is, per image, the highest-scoring *present*
    class under clean inference (for single-label data: the label). Returns bool (B,): top-1 of
    the adversarial image is one of the image's labels.

    Raises:
        ConfigError: Foolbox is not installed.
    """
    try:
        with warnings.catch_warnings():  # foolbox 3.3.4 imports scipy.ndimage.filters (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox as fb
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("topgap robust accuracy needs Foolbox: pip install 'foolbox==3.3.4'") from None
    m = torch.tensor(mean, device=images.device)[:, None, None]
    s = torch.tensor(std, device=images.device)[:, None, None]
    x01 = (images * s + m).clamp(0, 1)

    class _Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    wrapped = _Logits(model).eval()
    fmodel = fb.PyTorchModel(wrapped, bounds=(0, 1), preprocessing=dict(mean=list(mean), std=list(std), axis=-3))
    with torch.no_grad():
        clean = wrapped((x01 - m) / s)
    target = clean.masked_fill(labels < 0.5, float("-inf")).argmax(1)
    attack = fb.attacks.LinfPGD(steps=steps, abs_stepsize=step_size, random_start=True)
    _, adv, _ = attack(fmodel, x01, target, epsilons=epsilon)
    with torch.no_grad():
        logits = wrapped((adv - m) / s)
    return top1_correct(logits, labels)


# ---------------------------------------------------------------------- method
@register_method("topgap")
class TopGAP(Method):
    """Top-GAP: FPN-style CAM head, top-k pooling, ``CE + λ‖X‖₁`` (2024, Def. 5, eq. 1).

    ``training_losses`` returns ``{"loss", "cls", "l1"}``.
    """

    Config = TopGAPConfig
    config: TopGAPConfig

    def build_model(self) -> torch.nn.Module:
        return TopGAPNet(self.config, self.num_classes)

    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, cams = model(batch["image"])
        cls = classification_loss(logits, batch["labels"], self.multilabel)
        l1 = l1_sparsity(cams)
        loss = cls + self.config.l1_weight * l1
        return {"loss": loss, "cls": cls.detach(), "l1": l1.detach()}

    def extra_metrics(self, model: torch.nn.Module, batches: list[Mapping[str, Any]], device: torch.device) -> dict[str, float]:
        """The paper's own evaluation on validation ``batches``:

        * ``cam_iou`` (%): mean IoU over (image, present class with a non-empty mask) of the
          CAM (resized to the input, min-max normalised) thresholded at ``cam_iou_threshold``
          against the class's mask (``"ignore"`` pixels excluded);
        * ``erf_distance``: mean ERF distance (Definition 6) over the first ``eval_images`` images;
        * ``clean_accuracy`` / ``robust_accuracy`` (%): top-1 accuracy (top class among the
          image's labels) of the first ``eval_images`` images, clean and under PGD
          (``pgd_epsilon``, ``pgd_steps``, ``pgd_step_size``).
        """
        c = self.config
        was_training = model.training
        model.eval()
        ious: list[torch.Tensor] = []
        imgs, labs = [], []
        try:
            with torch.no_grad():
                for batch in batches:
                    images = batch["image"].to(device)
                    labels = batch["labels"].to(device)
                    imgs.append(images)
                    labs.append(labels)
                    if "masks" not in batch:
                        continue
                    masks = batch["masks"].to(device).bool()
                    b_idx, c_idx = torch.nonzero((labels > 0.5) & masks.flatten(2).any(2), as_tuple=True)
                    if b_idx.numel() == 0:
                        continue
                    cams = model(images)[1]
                    maps = normalize_maps(resize_maps(cams[b_idx, c_idx], images.shape[-2:]))
                    ign = batch.get("ignore")
                    ign = ign.to(device)[b_idx] if ign is not None else None
                    ious.append(cam_mask_iou(maps, masks[b_idx, c_idx], c.cam_iou_threshold, ign))
            out: dict[str, float] = {}
            if ious:
                out["cam_iou"] = float(100 * torch.cat(ious).mean())
            if imgs:
                x = torch.cat(imgs)[: c.eval_images]
                y = torch.cat(labs)[: c.eval_images]
                out["erf_distance"] = float(erf_distance(lambda t: model(t)[1], x).mean())
                with torch.no_grad():
                    out["clean_accuracy"] = float(100 * top1_correct(model(x)[0], y).float().mean())
                robust = pgd_robust_correct(model, x, y, c.pgd_epsilon, c.pgd_steps, c.pgd_step_size)
                out["robust_accuracy"] = float(100 * robust.float().mean())
            return out
        finally:
            model.train(was_training)
