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
Table A6) or, when given, ``round(top_k_fraction · h·w)`` (at least 1); k is clamped to ``h·w``
(:func:`resolve_k`). ``h·w`` is the CAM's number of positions (the largest selected feature map).

k from the data (``top_k_fraction: object_size``). Sec. 3.2 says that k "enforces the pixel
constraint, and its value depends on the image size … when adjusting this parameter, it is
crucial to consider the relative object size in the highest feature map", and the Limitations
paragraph (Sec. 5) that choosing k "currently depends on hyperparameter tuning" and that automated
ways to determine it could be explored. With ``object_size`` the fraction is the dataset's
relative object size (:func:`relative_object_size`), measured on the **train split only** (never
val or test). It reads the train split's GT boxes, more than the image labels a strictly
image-level setting has: one scalar, the size prior the paper sets by hand.

* per train image, the area of the **union** of its GT boxes (clipped to the image) divided by the
  image's area ``width·height`` (both in original pixels), a ratio in [0, 1]. The union is
  computed **exactly** (:func:`union_box_area`: the boxes' edges cut the image into rectangular
  cells, a cell is covered when a box contains it), not on a raster, so overlapping boxes count
  once and the value does not depend on a grid size. All of an image's boxes count, whatever their
  class (one k serves every class channel). Images without a box carry no size and are left out;
* the **mean** over those images (not the median): ``fraction·h·w`` is then the expected object
  area in CAM positions, and a skewed size distribution (many small objects, a few large ones)
  moves k towards the large objects, i.e. towards GAP, where a median k would cut every object
  larger than the typical one down to its ``k`` strongest positions.

The ratio is the same on the S×S network input as on the original image: the input is the image
resized without keeping its aspect ratio (and flipped), which scales every area by the same
factor. The value is a float in (0, 1]; k = ``round(fraction · h·w)``, at least 1. Reading the
boxes is cheap for COCO and box metadata (held in memory); a wsol source localised by masks
(OpenImages) decodes every train mask once per trial.

It is resolved by the ``train`` stage's fit task (:class:`TopGAPFitTask`) when the engine asks it
for the training dataset (``train_dataset(source, splits["train"])``), after the model is built
and before the first forward pass, and written into the model (buffer ``object_size_fraction``,
float64, NaN until resolved), so the state dict, the checkpoints, the stage product ``model.pt``
and the logged predictor carry it: validation, the eval stage and a registered model score with
the k training used. A resumed trial recomputes it (the same float: the mean is an exactly
rounded sum over the same boxes) and refuses a checkpoint that carries another value. The value
is logged with every validation as ``train/top_k_fraction`` and ``train/top_k`` (k at the CAM
size of the last forward pass); the config param stays ``object_size``.

Errors: ``top_k_fraction`` other than a number in (0, 1], ``"object_size"`` or null is refused
when the config is validated (:class:`~weakbench.core.errors.ConfigError` naming the field
and the allowed values); ``object_size`` on a train split with no GT box, or whose boxes have no
area, raises ConfigError when the fit stage starts; a forward pass of a model whose fraction was
never resolved (e.g. ``weakbench evaluate --method topgap``, which has no train split) raises
ConfigError.

Loss (eq. 1): ``L = CE + λ‖X‖₁``. For multi-label data the CE is the multi-label soft-margin
loss (:func:`weakbench.methods.cam.classification_loss`). ``‖X‖₁`` is taken as the **mean**
absolute value of ``X`` over all B·C·h·w entries (our choice: the paper reports ℓ1 values around
0.05–0.4 and uses λ = 1 next to a CE of order 1, which fits a mean, not a sum over 56²·C entries).

Evaluation of the paper (:meth:`TopGAP.extra_metrics`): IoU of the thresholded CAM with the
object mask (Table 7), the centre and corner ERF and their distance (Definition 6, Tables 2, A1,
A2, A5) and robust accuracy under L∞ PGD and FGSM using Foolbox 3 (``LinfPGD``, ``FGSM``).
Attack settings (``attack_setting``) are named after the paper's two protocols:

* ``"imagenet"`` (default; natural images, Table A3): ε = 1/255 for FGSM and PGD, PGD with 40
  steps. The paper gives no PGD step size; we use Foolbox's default relative step
  (0.01/0.3 · ε per step, i.e. 40 steps cover 1.33 ε), our choice;
* ``"cifar"`` (Table 3): ε = 8/255, PGD with 20 steps of 2/255 (the usual CIFAR PGD-20 step).

``pgd_epsilon``, ``pgd_steps`` and ``pgd_step_size`` override the named setting when given.
The accuracies come with their binomial 95 % half-width (``*_ci95``, percentage points) over the
``eval_images`` images they are computed on, so the spread is stated with the value.

torchattacks 3.5.1 pins ``requests~=2.25.1``, which conflicts with MLflow's requirements;
Foolbox 3.3.4 installs beside MLflow 3.
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from weakbench.methods.backbones import create_backbone
from weakbench.methods.base import StepContext, normalize_maps, register_method, resize_maps
from weakbench.methods.classifier import ClassifierFitTask, ClassifierMethod, WsolConfig
from weakbench.methods.cam import classification_loss
from weakbench.core.errors import ConfigError, DataError
from weakbench.methods.metric_declarations import metric

#: ``top_k_fraction`` value that measures the fraction on the train split (:func:`relative_object_size`)
OBJECT_SIZE = "object_size"

#: ImageNet statistics the engine normalises images with (weakbench.core.data.transforms).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class TopGAPConfig(WsolConfig):
    """Top-GAP hyperparameters (defaults: λ = 1, k = 256, 3×3 convs with 256 filters, 4 maps)."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("top_k", "top_k_fraction", "l1_weight", "num_feature_maps", "head_channels", "dropout"),
        "evaluation": ("cam_iou_threshold", "attack_setting", "pgd_epsilon", "pgd_steps", "pgd_step_size",
                       "eval_images")}

    top_k: int = Field(256, ge=1, le=1_000_000, description="k, positions averaged per class by Top-GAP (absolute)")
    top_k_fraction: Annotated[float, Field(gt=0, le=1)] | Literal["object_size"] | None = Field(
        None, description="k as a fraction of the CAM's h·w positions, k = round(fraction·h·w) ≥ 1; overrides top_k "
        "when set. A number in (0, 1], or 'object_size': the train split's mean relative object size (per image the "
        "area of the union of its GT boxes over the image area; val and test are never read), measured when the "
        "train stage starts, saved with the model and logged as train/top_k_fraction")
    l1_weight: float = Field(1.0, ge=0, le=100, description="λ, weight of the ℓ1 norm of the CAM (eq. 1)")
    num_feature_maps: Literal[3, 4] = Field(4, description="last backbone feature maps fed to the head")
    head_channels: int = Field(256, ge=8, le=2048, description="filters of the 3×3 head convolutions")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the 1×1 class convolution")
    cam_iou_threshold: float = Field(0.5, gt=0, lt=1, description="threshold of the min-max normalised CAM for the IoU metric")
    attack_setting: Literal["imagenet", "cifar"] = Field(
        "imagenet", description="the paper's attack protocol: imagenet (ε 1/255, PGD-40, FGSM; Table A3) or cifar "
                                "(ε 8/255, PGD-20 of 2/255; Table 3)")
    pgd_epsilon: float | None = Field(None, ge=0, le=1, description="L∞ radius of PGD and FGSM in [0, 1] pixel units "
                                                                   "(None: the attack setting's)")
    pgd_steps: int | None = Field(None, ge=1, le=1000, description="PGD iterations (None: the attack setting's)")
    pgd_step_size: float | None = Field(None, gt=0, le=1, description="PGD step in [0, 1] pixel units (None: the "
                                                                     "attack setting's)")
    eval_images: int = Field(16, ge=1, le=10_000, description="images used for the ERF and attack metrics")

    @field_validator("top_k_fraction", mode="before")
    @classmethod
    def _fraction_or_object_size(cls, v: Any) -> Any:
        """One message for every refused value (the union's per-member errors would name a
        'literal' member for an out-of-range number)."""
        if v is None or v == OBJECT_SIZE:
            return v
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:
                f = float(v)
            except ValueError:
                f = None
            if f is not None and 0 < f <= 1:
                return f
        raise ValueError(f"top_k_fraction must be a number in (0, 1] (k = round(fraction·h·w)), "
                         f"'{OBJECT_SIZE}' (the train split's mean relative object size) or null (use top_k); got {v!r}")

    def attack(self) -> tuple[float, int, float | None]:
        """``(epsilon, pgd_steps, pgd_step_size)`` of :attr:`attack_setting` with the explicit
        overrides; a step size of None is Foolbox's default relative step (0.01/0.3 · ε)."""
        eps, steps, step = ATTACK_SETTINGS[self.attack_setting]
        return (self.pgd_epsilon if self.pgd_epsilon is not None else eps,
                self.pgd_steps if self.pgd_steps is not None else steps,
                self.pgd_step_size if self.pgd_step_size is not None else step)


#: the paper's attack protocols: (ε, PGD steps, PGD step size or None = Foolbox's relative default)
ATTACK_SETTINGS: dict[str, tuple[float, int, float | None]] = {
    "imagenet": (1 / 255, 40, None),   # Table A3: ε = 1/255 for FGSM and PGD, 40 PGD steps
    "cifar": (8 / 255, 20, 2 / 255),   # Table 3: ε = 8/255, PGD-20
}


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
    return x.float().abs().mean()  # float32 under bf16 autocast: a mean over every entry


def resolve_k(config: TopGAPConfig, hw: int, object_size: float | None = None) -> int:
    """k for a CAM of ``hw`` positions: ``round(fraction·hw)`` (≥ 1) or ``top_k``, ≤ ``hw``.

    The fraction is ``config.top_k_fraction``; when that is ``"object_size"`` it is
    ``object_size``, the resolved value (:func:`relative_object_size` of the train split, what
    :attr:`TopGAPNet.k_fraction` holds), which is ignored otherwise.

    Raises:
        ConfigError: ``top_k_fraction`` is ``"object_size"`` and ``object_size`` is None.
    """
    fraction = config.top_k_fraction
    if fraction == OBJECT_SIZE:
        if object_size is None:
            raise ConfigError(
                "topgap: top_k_fraction='object_size' is not resolved: the fraction is measured on the train split when "
                "the train stage builds its dataset (TopGAPFitTask.train_dataset) and is saved with the model; this "
                "model has none (e.g. `weakbench evaluate --method topgap` has no train split). Give top_k_fraction a "
                "number in (0, 1] or set top_k")
        fraction = object_size
    k = round(fraction * hw) if fraction is not None else config.top_k
    return max(1, min(int(k), hw))


def union_box_area(boxes: np.ndarray, width: float, height: float) -> float:
    """Exact area of the union of ``boxes`` clipped to the ``width`` × ``height`` image.

    The boxes' x and y edges cut the image into rectangular cells; a cell is covered when some box
    contains it, and the area is the sum of the covered cells' areas (no rasterisation: the value
    is exact up to float64 rounding). Overlapping boxes count once.

    Args:
        boxes: float (K, 4) ``x0, y0, x1, y1`` in pixels (K may be 0; empty or inverted boxes
            cover nothing).
        width, height: image size in pixels.

    Returns:
        Area in square pixels, in ``[0, width·height]``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, x1 = np.clip(b[:, 0], 0, width), np.clip(b[:, 2], 0, width)
    y0, y1 = np.clip(b[:, 1], 0, height), np.clip(b[:, 3], 0, height)
    keep = (x1 > x0) & (y1 > y0)
    if not keep.any():
        return 0.0
    x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    xs, ys = np.unique(np.concatenate([x0, x1])), np.unique(np.concatenate([y0, y1]))
    covered = np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    for c0, c1, r0, r1 in zip(np.searchsorted(xs, x0), np.searchsorted(xs, x1),
                              np.searchsorted(ys, y0), np.searchsorted(ys, y1)):
        covered[r0:r1, c0:c1] = True
    cells = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return math.fsum(cells[covered].tolist())


def relative_object_size(source, indices: Sequence[int]) -> float:
    """The mean relative object size of records ``indices`` of ``source`` (the train split's, for
    ``top_k_fraction: object_size``; see the module docstring for the choices).

    Per image with at least one GT box (``source.gt_boxes``): :func:`union_box_area` of its boxes
    divided by ``width·height`` of its record (original pixels); images without boxes are left
    out. The mean is an exactly rounded sum (``math.fsum``) divided by the count, so the value
    does not depend on the order of ``indices``. Only ``indices`` are read.

    Returns:
        float in (0, 1].

    Raises:
        ConfigError: no image of ``indices`` has a box, or the boxes have no area.
    """
    sizes = []
    for i in indices:
        rec = source.records[int(i)]
        boxes, _ = source.gt_boxes(int(i))
        if len(boxes):
            sizes.append(union_box_area(boxes, rec.width, rec.height) / (float(rec.width) * float(rec.height)))
    if not sizes:
        raise ConfigError(f"topgap: top_k_fraction='object_size' needs GT boxes on the train split, and none of its "
                          f"{len(indices)} image(s) of dataset {source.name!r} has one; give top_k_fraction a number in "
                          f"(0, 1] or set top_k")
    mean = math.fsum(sizes) / len(sizes)
    if not mean > 0:
        raise ConfigError(f"topgap: top_k_fraction='object_size': the GT boxes of the train split of dataset "
                          f"{source.name!r} have no area; give top_k_fraction a number in (0, 1] or set top_k")
    return min(1.0, mean)


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
        #: k of the last forward pass (None before the first)
        self.last_k: int | None = None
        self._object_size: float | None = None  # python copy of the buffer: no device sync per forward
        if config.top_k_fraction == OBJECT_SIZE:  # only then: older state dicts load unchanged
            self.register_buffer("object_size_fraction", torch.tensor(float("nan"), dtype=torch.float64))
            self.register_load_state_dict_post_hook(_sync_object_size)

    @property
    def k_fraction(self) -> float | None:
        """The fraction of the CAM's positions k is taken from: ``top_k_fraction`` as configured,
        the resolved relative object size for ``"object_size"`` (None until resolved), or None
        when k is the absolute ``top_k``."""
        if self.config.top_k_fraction == OBJECT_SIZE:
            return self._object_size
        return self.config.top_k_fraction

    def set_object_size(self, fraction: float) -> None:
        """Store the resolved ``top_k_fraction: object_size`` value (float in (0, 1]) in the
        buffer ``object_size_fraction`` (saved with the state dict) and its python copy.

        Raises:
            ConfigError: the config's ``top_k_fraction`` is not ``"object_size"``, or
                ``fraction`` is not in (0, 1].
        """
        if self.config.top_k_fraction != OBJECT_SIZE:
            raise ConfigError(f"topgap: set_object_size needs top_k_fraction='object_size', the config has "
                              f"{self.config.top_k_fraction!r}")
        fraction = float(fraction)
        if not 0 < fraction <= 1:
            raise ConfigError(f"topgap: the relative object size must be in (0, 1], got {fraction!r}")
        self.object_size_fraction.fill_(fraction)
        self._object_size = fraction

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
        k = resolve_k(self.config, cams.shape[-2] * cams.shape[-1], self._object_size)
        self.last_k = k
        return top_gap(cams, k), cams


def _sync_object_size(module: TopGAPNet, incompatible_keys) -> None:
    """After ``load_state_dict``: the python copy follows the loaded buffer (NaN: unresolved)."""
    value = float(module.object_size_fraction)
    module._object_size = value if math.isfinite(value) else None


class TopGAPFitTask(ClassifierFitTask):
    """The ``train`` stage of Top-GAP: the classifier's fit task, plus the resolution of
    ``top_k_fraction: object_size`` (module docstring).

    The engine builds the model (:meth:`build_model`), loads a checkpoint's state when it
    resumes, then asks for the training dataset of ``splits["train"]`` (:meth:`train_dataset`):
    there the relative object size of exactly those records is measured and written into the
    model this task built (and into any model it builds later), before the first forward pass.
    Validation logs it as ``train/top_k_fraction`` and ``train/top_k``.
    """

    def __init__(self, method: "TopGAP"):
        super().__init__(method)
        self.object_size: float | None = None  # resolved fraction (object_size only)
        self._models: list[TopGAPNet] = []

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        if self.object_size is not None:
            model.set_object_size(self.object_size)
        self._models.append(model)
        return model

    def train_dataset(self, source, indices):
        if self.method.config.top_k_fraction == OBJECT_SIZE:
            self.object_size = relative_object_size(source, indices)
            for model in self._models:
                before = model.k_fraction
                if before is not None and before != self.object_size:
                    raise DataError(f"topgap: the model (e.g. a resumed checkpoint) was trained with "
                                    f"top_k_fraction={before!r} from the train split's relative object size, the "
                                    f"train split of {source.name!r} now gives {self.object_size!r}; the data or "
                                    f"the split changed, start the trial afresh")
                model.set_object_size(self.object_size)
        return super().train_dataset(source, indices)

    def validate(self, model, ctx, last: bool) -> dict[str, float]:
        metrics = super().validate(model, ctx, last)
        if self.method.config.top_k_fraction == OBJECT_SIZE:
            fraction = getattr(model, "k_fraction", None)
            if fraction is not None:
                metrics["train/top_k_fraction"] = float(fraction)
                if getattr(model, "last_k", None) is not None:
                    metrics["train/top_k"] = float(model.last_k)
        return metrics


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


def erf_center_corner(cam_fn, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and corner ERF (Top-GAP Definition 6; Tables A1, A2, A5) per image.

    ``ERF(p)`` is the mean over input pixels of ``|∂ Σ_k X_{k,p} / ∂ I|`` (Definition 1 with the
    channel sum; input channels summed), for the output centre ``p = (h/2, w/2)`` and the corner
    ``p = (1, 1)`` (index 0, 0 here). The paper's appendix says only that "the gradients were
    z-normalized to have mean 0 and standard deviation 1". Normalising each gradient map on its
    own would make every ERF 0, and normalising the two maps of an image jointly forces
    centre = −corner, so neither reproduces its tables (centre ≈ 0.5, corner ≈ 0.005 in Table A5).
    Our reading: the *signed* gradients of both positions and all images of the batch are
    z-normalised together (one mean and one standard deviation per model and batch), and each ERF
    is the mean absolute z-value over the input pixels (input channels summed). The values are
    unit-free, ≥ 0 and on one scale for centre and corner; the signed gradients of a trained
    network have a mean close to 0, so an output position that barely depends on the input gets
    an ERF close to 0.

    Args:
        cam_fn: images (B, 3, H, W) → CAM (B, C, h, w).
        images: float (B, 3, H, W).

    Returns:
        ``(center, corner)``, each float (B,) ≥ 0.
    """
    x = images.detach().clone().requires_grad_(True)
    cams = cam_fn(x).sum(dim=1)  # (B, h, w), channel sum
    h, w = cams.shape[-2:]
    g_center = torch.autograd.grad(cams[:, h // 2, w // 2].sum(), x, retain_graph=True)[0]
    g_corner = torch.autograd.grad(cams[:, 0, 0].sum(), x)[0]
    both = torch.stack([g_center, g_corner], 1)  # (B, 2, 3, H, W), signed
    z = (both - both.mean()) / both.std().clamp(min=1e-12)
    erf = z.abs().sum(2).flatten(2).mean(2)  # channels summed, pixels averaged: (B, 2)
    return erf[:, 0], erf[:, 1]


def erf_distance(cam_fn, images: torch.Tensor) -> torch.Tensor:
    """ERF distance (Top-GAP Definition 6) per image: ``ERF(h/2, w/2) − ERF(1, 1)`` of
    :func:`erf_center_corner`; float (B,). Positive: the centre output depends more on the input
    than the corner output."""
    center, corner = erf_center_corner(cam_fn, images)
    return center - corner


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool (B,): the top-scoring class is one of the image's labels."""
    return labels.gather(1, logits.argmax(1, keepdim=True))[:, 0] > 0.5


def pgd_robust_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
                       steps: int, step_size: float | None, mean=_MEAN, std=_STD, attack: str = "pgd") -> torch.Tensor:
    """Top-1 correctness under an L∞ attack: Foolbox ``LinfPGD`` (random start; ``step_size``
    None: Foolbox's relative default 0.01/0.3 · ε) or, with ``attack="fgsm"``, ``FGSM`` (one
    signed-gradient step of ε; ``steps`` and ``step_size`` unused).

    The attack works in [0, 1] pixel space (images are de-normalised with ``mean``/``std``, the
    model's input normalisation, and the model re-normalises them). Its target label is, per
    image, the highest-scoring *present* class under clean inference (for single-label data: the
    label). Returns bool (B,): top-1 of the adversarial image is one of the image's labels.

    Raises:
        ConfigError: Foolbox is not installed; an unknown ``attack``.
    """
    if attack not in ("pgd", "fgsm"):
        raise ConfigError(f"topgap: unknown attack {attack!r}; use 'pgd' or 'fgsm'")
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
    if attack == "fgsm":
        attacker = fb.attacks.FGSM()
    else:
        attacker = fb.attacks.LinfPGD(steps=steps, abs_stepsize=step_size, random_start=True)
    _, adv, _ = attacker(fmodel, x01, target, epsilons=epsilon)
    with torch.no_grad():
        logits = wrapped((adv - m) / s)
    return top1_correct(logits, labels)


# ---------------------------------------------------------------------- method
@register_method("topgap")
class TopGAP(ClassifierMethod):
    """Top-GAP: FPN-style CAM head, top-k pooling, ``CE + λ‖X‖₁`` (2024, Def. 5, eq. 1).

    ``training_losses`` returns ``{"loss", "cls", "l1"}``.
    """

    Config = TopGAPConfig
    config: TopGAPConfig
    #: the metrics of :meth:`extra_metrics` and of the train stage (``train/top_k_fraction``)
    metrics = (
        metric("cam_iou", "max", "%", "CAM IoU",
               "the overlap (IoU) of the thresholded map with the true object mask, averaged over images and classes"),
        metric("erf_distance", None, "ratio", "ERF distance",
               "how much more the centre of the map depends on the input than its corner (Top-GAP's effective-receptive-"
               "field distance)"),
        metric("erf_center", None, "ratio", "centre ERF",
               "how much the centre of the map depends on the input pixels (mean absolute z-normalised gradient)"),
        metric("erf_corner", None, "ratio", "corner ERF",
               "how much the corner of the map depends on the input pixels (mean absolute z-normalised gradient)"),
        metric("clean_accuracy", "max", "%", "clean accuracy",
               "share of images whose top predicted class is one of the image's classes"),
        metric("robust_accuracy", "max", "%", "robust accuracy",
               "share of images still classified right after a small adversarial change of their pixels (PGD attack)"),
        metric("fgsm_accuracy", "max", "%", "FGSM accuracy",
               "share of images still classified right after a one-step adversarial change of their pixels (FGSM attack)"),
        *[metric(f"{a}_ci95", None, "%", f"{d} ±95 %",
                 f"half-width of the binomial 95 % interval of the {d} over the images it is computed on")
          for a, d in (("clean_accuracy", "clean accuracy"), ("robust_accuracy", "robust accuracy"),
                       ("fgsm_accuracy", "FGSM accuracy"))],
        metric("attack_images", None, "count", "attacked images", "how many images the attack accuracies are computed on"),
        metric("top_k_fraction", None, "ratio", "k / (h·w)",
               "the share of the map's positions Top-GAP averages per class, for top_k_fraction: object_size the train "
               "split's mean relative object size (union of an image's boxes over its area; logged as train/top_k_fraction)"),
        metric("top_k", None, "count", "k", "how many positions of the map Top-GAP averages per class"),
    )

    def build_model(self) -> torch.nn.Module:
        return TopGAPNet(self.config, self.num_classes)

    def check_untrained(self) -> None:
        """``top_k_fraction: object_size`` is measured on the train split by the train stage;
        without one (``weakbench evaluate --method topgap``) it cannot be resolved.

        Raises:
            ConfigError: naming ``top_k_fraction`` and the fix.
        """
        if self.config.top_k_fraction == OBJECT_SIZE:
            raise ConfigError("topgap: top_k_fraction='object_size' is measured on the train split by the train stage, "
                              "and this run has none (weakbench evaluate --method topgap trains nothing). Give "
                              "top_k_fraction a number in (0, 1] (e.g. --set top_k_fraction=0.5), or top_k_fraction=null and a top_k")

    def fit_task(self, stage, inputs=None):
        """The ``train`` stage: :class:`TopGAPFitTask` (resolves ``top_k_fraction: object_size``)."""
        if stage.name != "train":
            raise NotImplementedError(f"method {self.name!r} has no fit stage {stage.name!r}")
        return TopGAPFitTask(self)

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
        * ``erf_center``, ``erf_corner``, ``erf_distance``: mean centre and corner ERF and their
          difference (Definition 6; :func:`erf_center_corner`) over the first ``eval_images``
          images;
        * ``clean_accuracy`` / ``robust_accuracy`` / ``fgsm_accuracy`` (%): top-1 accuracy (top
          class among the image's labels) of the first ``eval_images`` images, clean, under PGD
          and under FGSM (:meth:`TopGAPConfig.attack`), each with ``<name>_ci95``, the binomial
          95 % half-width 1.96·√(p(1−p)/n) in percentage points;
        * ``attack_images``: n, the images the three accuracies are computed on.

        The attacks de-normalise with the backbone's input normalisation
        (:attr:`Method.input_normalization`).
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
                center, corner = erf_center_corner(lambda t: model(t)[1], x)
                out["erf_center"] = float(center.mean())
                out["erf_corner"] = float(corner.mean())
                out["erf_distance"] = float((center - corner).mean())
                mean, std = self.input_normalization
                eps, steps, step = c.attack()
                with torch.no_grad():
                    correct = {"clean_accuracy": top1_correct(model(x)[0], y)}
                correct["robust_accuracy"] = pgd_robust_correct(model, x, y, eps, steps, step, mean, std)
                correct["fgsm_accuracy"] = pgd_robust_correct(model, x, y, eps, steps, step, mean, std, attack="fgsm")
                n = len(x)
                for name, ok in correct.items():
                    p = float(ok.float().mean())
                    out[name] = 100 * p
                    out[f"{name}_ci95"] = 100 * 1.96 * (p * (1 - p) / n) ** 0.5
                out["attack_images"] = float(n)
            return out
        finally:
            model.train(was_training)
