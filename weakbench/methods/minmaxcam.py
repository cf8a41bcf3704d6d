"""MinMaxCAM (Wang, Oramas, Tuytelaars, "MinMaxCAM: Improving object coverage for CAM-based
weakly supervised object localization", BMVC 2021).

Model: the CAM baseline's network (:class:`weakbench.methods.cam.CAMNet`: timm backbone ``B``,
GAP, a 1×1-conv linear layer ``fc``); the localisation map at test time is plain CAM (eq. 1).

Training (Sec. 3.4, Fig. 3), every mini-batch of ``N`` sets × ``S`` images, the ``S`` images of
a set sharing one class:

* **Stage I** — the classification loss (eq. 4; multi-label soft-margin loss, or cross-entropy for
  single-label data, :func:`weakbench.methods.cam.classification_loss`) updates ``B`` and ``fc``.
* **Stage II** — ``B`` is frozen (``B*``: no gradient to its weights, BatchNorm in eval mode so its
  running statistics are not updated — the official code calls ``model.eval()`` for this stage).
  ``H`` = CAM of the set's class from ``B*(I)`` and the *current* ``fc`` (after the Stage I
  update), resized bilinearly to the input and min-max normalised per image;
  ``f = GAP(B*(I ⊙ H))`` and ``f° = GAP(B*(I))`` (no gradient). The loss
  ``L_S2 = λ1·CRR + λ2·FRR`` (eq. 5) updates ``fc`` only (its gradient flows through ``H``).

  - CRR (eq. 2): ``1/(S(S−1)) Σ_i Σ_j ‖f_i − f_j‖²`` within a set, averaged over the sets.
  - FRR (eq. 3): ``1/S Σ_i ‖f_i − f°_i‖²`` within a set, averaged over the sets.

Choices where the paper is silent or the official code differs:

* ``feature_distance="mean"`` (default): ``‖·‖²`` is averaged over the ``D`` feature dimensions
  (the official code's ``nn.MSELoss()``, reduction ``"mean"``). ``"sum"`` gives the paper's
  literal squared L2 norm (``D`` times larger, e.g. ×512 for ResNet-18).
* Weights: the default ``λ1 = 1``, ``λ2 = 10`` is the paper's VGG16 optimum of the FRR weight
  (Sec. 4.4, Fig. 6: the VGG16 curve peaks at an FRR weight of 10); the official code's
  ``train.py`` defaults are ``λ1 = λ2 = 1`` (``--w_loss_com 1 --w_loss_ori 1``). Fig. 6 also shows
  MobileNetV2 degrading sharply for large FRR weights, so the search space reaches down to 0.1.
* Multi-label data: a set is ``S`` images that all contain the set's class. The sampler
  (:class:`ClassSetBatchSampler`) draws each set *for* a class and the batch carries it
  (``batch["set_class"]``, int64 (B,), via :class:`SetClassDataset`); ``H`` is that class's CAM
  (:func:`set_classes`). On COCO most images contain ``person``, so "a class the set's images
  share" is not "the set's class": the drawn class is the one regularised. Only a batch without
  ``set_class`` (not from the sampler: hand-built batches) falls back to the **lowest class index
  all ``S`` images share**, and a set without any shared class is then left out of Stage II
  (weight 0). Images after the last full set are ignored by Stage II.
* ``output_stride`` keeps the common default (32) so that the leaderboard compares methods on
  equal backbones; the paper used a stride-16 last stage for ResNet-50 and MobileNetV2
  (``output_stride=16``).
* Both stages step the same SGD optimiser (as the official code does); Stage II clears the
  backbone's gradients before stepping so momentum and weight decay cannot move ``B``.
* Under DDP, Stage II goes through the wrapped model's ``forward`` (``stage="regularize"``), with
  the backbone run on detached weights, so DDP all-reduces ``fc``'s gradient and sees the backbone
  as unused (``find_unused_parameters = True``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call

from weakbench.methods.base import StepContext, register_method
from weakbench.methods.classifier import ClassifierConfig, ClassifierFitTask, ClassifierMethod
from weakbench.methods.cam import CAMNet, classification_loss
from weakbench.methods.lr_schedules import LRSchedule, describe_setting
from weakbench.methods.pipeline import FitTask, Stage
from weakbench.core.errors import DataError
from weakbench.methods.metric_declarations import MechanismCheck, metric

#: The optimisation of the official code (github.com/shadowwkl/MinMaxCAM, ``train.py``; the paper
#: gives none): SGD with Nesterov momentum 0.9, weight decay 5e-4, the classifier at 10× the
#: backbone's lr (``backbone_lr_mult`` 0.1), ``MultiStepLR`` ×0.1 after epochs 50 and 100 of 200
#: (fractions 0.25 and 0.5; stepped per epoch there, per step here with the same milestones).
#: Its lr (1e-4 for an ImageNet-pretrained backbone, 1e-3 for the classifier) is not part of the
#: setting: it depends on the weights and the batch. ``search_spaces/minmaxcam_official.yaml``.
OFFICIAL_OPTIMIZATION = {"lr_schedule": "step", "lr_milestones": (0.25, 0.5), "lr_gamma": 0.1, "nesterov": True,
                         "momentum": 0.9, "weight_decay": 5e-4, "backbone_lr_mult": 0.1}


class MinMaxCAMConfig(ClassifierConfig):
    """MinMaxCAM hyperparameters (defaults: the paper's S = 5, N = 12 (Sec. 4.1), λ1 = 1 and
    λ2 = 10 — the FRR weight at which the paper's VGG16 ablation peaks (Sec. 4.4, Fig. 6) — with
    the official code's ``feature_distance="mean"``; the official ``train.py`` defaults to
    λ1 = λ2 = 1).

    ``batch_size`` is ``N × S`` images per worker; it must be a multiple of ``set_size``.

    Raises (through :func:`weakbench.methods.base.validate_config`):
        ConfigError: ``batch_size`` is not a multiple of ``set_size`` (naming both and the nearest
            valid batch sizes), or a field is out of range.
    """

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("crr_weight", "frr_weight", "set_size",
                                                                     "feature_distance")}

    crr_weight: float = Field(1.0, ge=0, le=1000, description=(
        "λ1, weight of CRR (eq. 5); default 1 = the official code's default"))
    frr_weight: float = Field(10.0, ge=0, le=1000, description=(
        "λ2, weight of FRR (eq. 5); default 10 = the paper's VGG16 optimum (Fig. 6); the official code's "
        "default is 1, and MobileNetV2 drops sharply for large values (Fig. 6)"))
    set_size: int = Field(5, ge=2, le=64, description="S, images per set sharing a class")
    batch_size: int = Field(60, ge=2, le=4096, description="N sets × S images per worker per step (paper: 12 × 5)")
    feature_distance: Literal["mean", "sum"] = Field(
        "mean", description="‖f_i − f_j‖² averaged over feature dims (official code, MSE) or summed (paper's notation)")
    lr_schedule: LRSchedule = Field(
        "constant", description="lr schedule (weakbench.methods.lr_schedules); 'constant' keeps the common training of "
        "the leaderboard. The official code (shadowwkl/MinMaxCAM train.py, 200 epochs) uses OFFICIAL_OPTIMIZATION: "
        + describe_setting(OFFICIAL_OPTIMIZATION) + " (search_spaces/minmaxcam_official.yaml)")

    @model_validator(mode="after")
    def _batch_is_sets(self) -> "MinMaxCAMConfig":
        if self.batch_size % self.set_size:
            s = self.set_size
            lo, hi = self.batch_size // s * s, (self.batch_size // s + 1) * s
            fix = f"use batch_size {lo} or {hi}" if lo >= s else f"use batch_size {hi}"
            raise ValueError(
                f"batch_size ({self.batch_size}) must be N sets × set_size ({s}) images; "
                f"{fix}, or a set_size that divides {self.batch_size}")
        return self

    @property
    def num_sets(self) -> int:
        """N, sets per mini-batch."""
        return self.batch_size // self.set_size


# ---------------------------------------------------------------------- losses
def _sq_dist(diff: torch.Tensor, feature_distance: str) -> torch.Tensor:
    sq = diff.pow(2)
    return sq.mean(dim=-1) if feature_distance == "mean" else sq.sum(dim=-1)


def crr_loss(f: torch.Tensor, feature_distance: Literal["mean", "sum"] = "mean",
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Common Region Regularization, MinMaxCAM eq. 2, averaged over sets.

    Args:
        f: float (N, S, D) object-specific features ``GAP(B*(I ⊙ H))``, ``S ≥ 2``.
        feature_distance: ``"mean"`` averages the squared difference over ``D`` (official code),
            ``"sum"`` sums it (squared L2 norm as written in the paper).
        weights: optional float (N,) per-set weights (0 drops a set); the result is
            ``Σ w_n CRR_n / max(Σ w_n, 1)``-style weighted mean (plain mean when ``None``).

    Returns:
        A scalar ``mean_n 1/(S(S−1)) Σ_{i,j} d(f_ni, f_nj)`` (≥ 0; 0 for identical features).

    Raises:
        ValueError: ``f`` is not 3-D or ``S < 2``.
    """
    if f.dim() != 3 or f.shape[1] < 2:
        raise ValueError(f"crr_loss expects f of shape (N, S>=2, D), got {tuple(f.shape)}")
    f = f.float()  # eq. 2 in float32 under bf16 autocast (squared differences of close features)
    s = f.shape[1]
    d = _sq_dist(f[:, :, None, :] - f[:, None, :, :], feature_distance)  # (N, S, S)
    per_set = d.sum(dim=(1, 2)) / (s * (s - 1))
    return _weighted_mean(per_set, weights)


def frr_loss(f: torch.Tensor, f_orig: torch.Tensor, feature_distance: Literal["mean", "sum"] = "mean",
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Full Region Regularization, MinMaxCAM eq. 3, averaged over sets.

    Args:
        f: float (N, S, D) features of the masked images ``GAP(B*(I ⊙ H))``.
        f_orig: float (N, S, D) features of the original images ``f° = GAP(B*(I))`` (treated as
            constants: detached here).
        feature_distance, weights: as in :func:`crr_loss`.

    Returns:
        A scalar ``mean_n 1/S Σ_i d(f_ni, f°_ni)`` (≥ 0).
    """
    if f.shape != f_orig.shape or f.dim() != 3:
        raise ValueError(f"frr_loss expects f and f_orig of equal shape (N, S, D), got {tuple(f.shape)} and {tuple(f_orig.shape)}")
    per_set = _sq_dist(f.float() - f_orig.detach().float(), feature_distance).mean(dim=1)  # eq. 3 in float32
    return _weighted_mean(per_set, weights)


def _weighted_mean(per_set: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_set.mean()
    w = weights.to(per_set.dtype)
    return (per_set * w).sum() / w.sum().clamp(min=1.0)


def shared_set_classes(labels: torch.Tensor, set_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback class of each set of a batch that does not carry ``set_class``: the lowest class
    index all the set's images share.

    This is *not* the set's class on multi-label data (on COCO it is ``person`` for most sets);
    batches from :class:`ClassSetBatchSampler` carry the drawn class, see :func:`set_classes`.

    Args:
        labels: float (B, C) multi-hot labels in {0, 1}; consecutive ``set_size`` rows form one
            set (rows after the last full set are ignored).
        set_size: S ≥ 1.

    Returns:
        ``(classes, valid)``: int64 (N,) class per set (0 where none is shared) and bool (N,)
        whether the set's images share a class, with ``N = B // S``.
    """
    n = labels.shape[0] // set_size
    sets = labels[: n * set_size].reshape(n, set_size, -1) > 0.5
    shared = sets.all(dim=1)  # (N, C)
    valid = shared.any(dim=1)
    classes = torch.where(valid, shared.to(torch.int8).argmax(dim=1), torch.zeros_like(valid, dtype=torch.long))
    return classes.long(), valid


def one_image_set_share(index: torch.Tensor, set_size: int) -> float:
    """Share (%, 0–100) of a batch's sets whose ``set_size`` images are one image repeated (a
    class with one training image, :class:`ClassSetBatchSampler`): for them CRR (eq. 2) has no
    common-region signal. ``index``: int64 (B,) record indices, consecutive ``set_size`` rows one
    set (rows after the last full set ignored); 0.0 without a full set."""
    n = index.shape[0] // set_size
    if n == 0:
        return 0.0
    sets = index[: n * set_size].reshape(n, set_size)
    single = (sets == sets[:, :1]).all(dim=1)
    return 100.0 * float(single.float().mean())


def set_classes(batch: Mapping[str, Any], set_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The class each set of a MinMaxCAM batch regularises: the class the sampler drew it for.

    Args:
        batch: ``{"labels": float (B, C) multi-hot in {0, 1}, "set_class": int64 (B,) optional}``;
            consecutive ``set_size`` rows form one set (rows after the last full set are
            ignored). ``set_class[i]`` is the class image ``i``'s set was drawn for
            (:class:`ClassSetBatchSampler` via :class:`SetClassDataset`), ``-1`` when unknown.
        set_size: S ≥ 1.

    Returns:
        ``(classes, valid)``: int64 (N,) class per set and bool (N,) whether the set takes part
        in Stage II, ``N = B // S``. A set with a known ``set_class`` uses it; a set without one
        (no ``"set_class"`` key, or ``-1``) falls back to :func:`shared_set_classes` (valid only
        when its images share a class).

    Raises:
        ValueError: the images of one set carry different ``set_class`` values, a ``set_class``
            is outside ``[-1, C)``, or an image lacks the label of its set's class (the batch
            did not come from the sampler over these labels).
    """
    labels = batch["labels"]
    fallback, fallback_valid = shared_set_classes(labels, set_size)
    if "set_class" not in batch:
        return fallback, fallback_valid
    n, c = fallback.shape[0], labels.shape[1]
    drawn_all = torch.as_tensor(batch["set_class"], device=labels.device).long()[: n * set_size].reshape(n, set_size)
    drawn = drawn_all[:, 0]
    if (drawn_all != drawn[:, None]).any():
        bad = int((drawn_all != drawn[:, None]).any(dim=1).nonzero()[0])
        raise ValueError(f"MinMaxCAM: the images of set {bad} carry different set_class values "
                         f"{drawn_all[bad].tolist()}; a set's {set_size} images must be drawn for one class")
    if ((drawn < -1) | (drawn >= c)).any():
        raise ValueError(f"MinMaxCAM: set_class values {sorted(set(drawn.tolist()))} outside [-1, {c})")
    known = drawn >= 0
    sets = labels[: n * set_size].reshape(n, set_size, c) > 0.5
    carries = sets.gather(2, drawn.clamp(min=0)[:, None, None].expand(n, set_size, 1))[..., 0].all(dim=1)
    if (known & ~carries).any():
        bad = int((known & ~carries).nonzero()[0])
        raise ValueError(f"MinMaxCAM: set {bad} was drawn for class {int(drawn[bad])} but not all its images carry "
                         f"that label; batches must come from ClassSetBatchSampler over the same labels")
    return torch.where(known, drawn, fallback), torch.where(known, torch.ones_like(known), fallback_valid)


# ---------------------------------------------------------------------- model
class MinMaxCAMNet(CAMNet):
    """:class:`CAMNet` with a Stage II entry point.

    ``forward(x)`` → ``(logits (B, C), cams (B, C, h, w))`` as CAMNet.
    ``forward(x, class_ids=ids, stage="regularize")`` → ``(f, f_orig)``, both float (B, D): the
    features ``GAP(B*(x ⊙ H))`` (differentiable w.r.t. ``fc`` through ``H``) and ``GAP(B*(x))``
    (no gradient), with ``B*`` the backbone on detached weights in eval mode.
    """

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor | None = None, stage: str = "classify"):
        if stage == "classify":
            return super().forward(x)
        if stage != "regularize" or class_ids is None:
            raise ValueError("MinMaxCAMNet.forward: stage must be 'classify', or 'regularize' with class_ids")
        return self.regularization_features(x, class_ids)

    def regularization_features(self, x: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.backbone.training
        self.backbone.eval()  # B*: BatchNorm uses, and does not update, its running statistics
        try:
            frozen = {n: p.detach() for n, p in self.backbone.named_parameters()}
            with torch.no_grad():
                feats = self.backbone(x)[-1]  # B*(I)
            f_orig = feats.mean(dim=(2, 3))
            cams = self.classifier(feats)  # gradient reaches fc only
            h = cams[torch.arange(x.shape[0], device=x.device), class_ids]
            h = F.interpolate(h[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            lo = h.amin(dim=(2, 3), keepdim=True)
            hi = h.amax(dim=(2, 3), keepdim=True)
            span = hi - lo
            h = torch.where(span > 0, (h - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(h))
            feats_masked = functional_call(self.backbone, frozen, (x * h,))[-1]  # B*(I ⊙ H)
            f = feats_masked.mean(dim=(2, 3))
        finally:
            self.backbone.train(was_training)
        return f, f_orig


# ---------------------------------------------------------------------- sampler
class ClassSetBatchSampler:
    """Batches of N sets × S images sharing a class, sharded across ranks (MinMaxCAM Sec. 3.4, 4.1).

    Each epoch (deterministic in ``(seed, epoch)``): every labelled image is assigned to one of
    its classes at random; each class's images are shuffled and cut into sets of ``S``, each set
    *drawn for* that class; a last incomplete set is filled with other images of the class
    (any image carrying its label), without replacement while the class has enough images.
    The sets are shuffled and truncated (or cycled) to a fixed count ``T`` — the smallest
    multiple of ``N × world_size`` ≥ ``ceil(#labelled images / S)`` — so that every rank gets the
    same number of batches every epoch; rank ``r`` takes batches ``r, r + world_size, …`` (the
    ranks' batches are disjoint slices of one epoch order and together are all of it). Images
    without any label are never sampled.

    Yields, per batch, ``N·S`` ``(position, set_class)`` pairs of ints, set by set: ``position``
    indexes the training dataset (the rows of ``labels``), ``set_class`` is the class the pair's
    set was drawn for. :class:`SetClassDataset` turns them into items with ``"set_class"``, so
    Stage II regularises the drawn class, not merely one the set's images happen to share.

    Few images per class (e.g. ImageNet subsets with 1–2 training images per class): a class
    with ``k < S`` images fills its sets **with replacement**, so a set repeats its ``k`` distinct
    images. We keep such classes rather than skip them, because this sampler is the only training
    sampler: skipping would drop their images from Stage I's classification too. Consequences:
    CRR (eq. 2) sees only the pairs of distinct images (copies differ only by the random flip of
    the training transform), so it is weaker for small ``k`` and carries no common-region signal
    for ``k = 1``; FRR (eq. 3) is unaffected. Each such class makes ``ceil(k/S) = 1`` set of ``S``
    slots for ``k`` images, so there are more sets than ``T`` and the truncation leaves classes out
    of an epoch: with one image per class an epoch visits about ``1/S`` of the classes (a different
    random part each epoch), each image ``S`` times.

    Iterating twice without :meth:`set_epoch` gives the next epoch's order (the epoch advances
    after each full iteration); call :meth:`set_epoch` to resume a given epoch.

    Args:
        labels: float (num_images, C) multi-hot labels of the training split, in {0, 1}.
        set_size: S ≥ 1.
        num_sets: N ≥ 1 sets per batch.
        seed: base seed.
        rank, world_size: this worker (``0 ≤ rank < world_size``) and the number of workers.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
        DataError: ``labels`` is not 2-D, or no image has a label.
    """

    def __init__(self, labels: torch.Tensor, set_size: int, num_sets: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        lab = torch.as_tensor(labels).detach().cpu().numpy() > 0.5
        if lab.ndim != 2:
            raise DataError(f"MinMaxCAM sampler: labels must be (num_images, C), got shape {lab.shape}")
        self.labels = lab
        self.labelled = np.flatnonzero(lab.any(axis=1))
        if self.labelled.size == 0:
            raise DataError("MinMaxCAM sampler: no training image has a label; sets of images sharing a class cannot be formed")
        self.class_members = [np.flatnonzero(lab[:, c]) for c in range(lab.shape[1])]
        self.set_size, self.num_sets = int(set_size), int(num_sets)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        per_step = self.num_sets * self.world_size
        self.total_sets = math.ceil(math.ceil(self.labelled.size / self.set_size) / per_step) * per_step

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` at the next iteration."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.total_sets // (self.num_sets * self.world_size)

    def epoch_sets(self, epoch: int) -> list[tuple[int, list[int]]]:
        """All ``(class, image indices)`` sets of ``epoch`` (every rank's), in batch order."""
        rng = np.random.default_rng([self.seed, epoch])
        owner: dict[int, list[int]] = {}
        for i in self.labelled:
            classes = np.flatnonzero(self.labels[i])
            owner.setdefault(int(rng.choice(classes)), []).append(int(i))
        sets: list[tuple[int, list[int]]] = []
        for c in sorted(owner):
            members = rng.permutation(owner[c]).tolist()
            for start in range(0, len(members), self.set_size):
                chunk = members[start:start + self.set_size]
                if len(chunk) < self.set_size:
                    pool = np.setdiff1d(self.class_members[c], chunk)
                    need = self.set_size - len(chunk)
                    if pool.size >= need:
                        chunk += rng.choice(pool, size=need, replace=False).tolist()
                    else:  # class smaller than S: sample with replacement
                        chunk += rng.choice(self.class_members[c], size=need, replace=True).tolist()
                sets.append((c, [int(j) for j in chunk]))
        order = rng.permutation(len(sets))
        sets = [sets[k] for k in order]
        while len(sets) < self.total_sets:  # cycle so every rank has full batches
            sets += sets[: self.total_sets - len(sets)]
        return sets[: self.total_sets]

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All batches of ``epoch`` (every rank's, in order): lists of ``N·S`` ``(position,
        set_class)`` pairs; rank ``r`` iterates ``epoch_batches(e)[r::world_size]``."""
        sets = self.epoch_sets(epoch)
        n = self.num_sets
        return [[(i, c) for c, members in sets[k:k + n] for i in members] for k in range(0, len(sets), n)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.epoch_batches(self.epoch)
        self.epoch += 1
        yield from batches[self.rank::self.world_size]


class SetClassDataset(torch.utils.data.Dataset):
    """The training dataset keyed by :class:`ClassSetBatchSampler`'s ``(position, set_class)`` pairs.

    ``dataset[(i, c)]`` is ``base[i]`` (a dict: ``image``, ``labels``, ``index``, as
    :class:`weakbench.core.data.ClassificationDataset`) plus ``"set_class": int64 () c``;
    a plain position ``i`` gives ``set_class = -1`` (unknown: Stage II falls back to the lowest
    shared class, :func:`set_classes`). Collated, ``set_class`` is int64 (B,).

    Raises:
        IndexError: from ``base`` for a position outside it.
    """

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, c = key if isinstance(key, tuple) else (key, -1)
        item = dict(self.base[int(i)])
        item["set_class"] = torch.tensor(int(c), dtype=torch.int64)
        return item


class MinMaxCAMFitTask(ClassifierFitTask):
    """The classifier's ``train`` stage with :class:`SetClassDataset` around the training images,
    so each batch from :class:`ClassSetBatchSampler` carries ``set_class`` (int64 (B,))."""

    def train_dataset(self, source, indices):
        return SetClassDataset(super().train_dataset(source, indices))


# ---------------------------------------------------------------------- method
@register_method("minmaxcam")
class MinMaxCAM(ClassifierMethod):
    """MinMaxCAM: CAM + Stage II regularisation of ``fc`` by CRR and FRR (BMVC 2021, eqs. 2–5).

    ``training_step`` returns ``{"loss": L_S1 + L_S2, "cls": L_S1, "crr", "frr" (unweighted),
    "stage2": L_S2 = crr_weight·crr + frr_weight·frr, "sets": number of sets regularised}`` as
    floats (the engine logs them as ``train/<name>``, averaged over the epoch's steps).
    """

    Config = MinMaxCAMConfig
    find_unused_parameters = True  # Stage II updates fc only
    mechanism_checks = (MechanismCheck("one_image_sets", fails_above=50.0,
                                       words="CRR inactive: {value:.0f} % of sets hold one image"),)
    #: the Stage II diagnostic its mechanism check reads
    metrics = (
        metric("one_image_sets", None, "%", "one-image sets",
               "share of MinMaxCAM's image sets that repeat a single image (no cross-image signal for CRR)"),
    )

    config: MinMaxCAMConfig

    def build_model(self) -> torch.nn.Module:
        return MinMaxCAMNet(self.config, self.num_classes)

    def fit_task(self, stage: Stage, inputs=None) -> FitTask:
        """The ``train`` stage: :class:`MinMaxCAMFitTask` (batches carry ``set_class``)."""
        if stage.name != "train":
            raise NotImplementedError(f"method {self.name!r} has no fit stage {stage.name!r}")
        return MinMaxCAMFitTask(self)

    def train_batch_sampler(self, labels: torch.Tensor, batch_size: int, seed: int, rank: int, world_size: int):
        """:class:`ClassSetBatchSampler` of ``batch_size // set_size`` sets (pairs of dataset
        position and drawn class). Raises ``ValueError`` if ``batch_size`` is not a multiple of
        ``set_size``."""
        s = self.config.set_size
        if batch_size % s:
            raise ValueError(f"MinMaxCAM: batch_size {batch_size} is not a multiple of set_size {s}")
        return ClassSetBatchSampler(labels, s, batch_size // s, seed=seed, rank=rank, world_size=world_size)

    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Stage I loss only (the classification loss); Stage II needs its own update."""
        logits, _ = model(batch["image"])
        loss = classification_loss(logits, batch["labels"], self.multilabel)
        return {"loss": loss, "cls": loss.detach()}

    def stage2_losses(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """CRR (eq. 2), FRR (eq. 3) and ``L_S2 = λ1·CRR + λ2·FRR`` (eq. 5) for a batch of sets.

        Args:
            model: the (possibly DDP-wrapped) :class:`MinMaxCAMNet`.
            batch: ``{"image": float (B, 3, H, W), "labels": float (B, C) in {0, 1},
                "set_class": int64 (B,) optional}``, ``B ≥ S``; consecutive ``S`` images form a
                set; ``H`` is the CAM of each set's class (:func:`set_classes`).

        Returns:
            ``{"loss": L_S2 (scalar, differentiable w.r.t. fc), "crr", "frr" (detached scalars
            ≥ 0), "sets": number of sets taking part (float scalar)}``.

        Raises:
            ValueError: the batch holds no full set, or its ``set_class`` is inconsistent.
        """
        c = self.config
        s = c.set_size
        images = batch["image"]
        classes, valid = set_classes(batch, s)
        n = classes.shape[0]
        if n == 0:
            raise ValueError(f"MinMaxCAM: a batch of {images.shape[0]} images holds no set of set_size={s}")
        x = images[: n * s]
        f, f_orig = model(x, class_ids=classes.repeat_interleave(s), stage="regularize")
        f = f.reshape(n, s, -1)
        f_orig = f_orig.reshape(n, s, -1)
        w = valid.to(f.dtype)
        crr = crr_loss(f, c.feature_distance, w)
        frr = frr_loss(f, f_orig, c.feature_distance, w)
        loss = c.crr_weight * crr + c.frr_weight * frr
        return {"loss": loss, "crr": crr.detach(), "frr": frr.detach(), "sets": valid.sum().to(f.dtype)}

    def regularization_step(self, model: torch.nn.Module, batch: Mapping[str, Any],
                            optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Stage II: update ``fc`` only, leaving backbone weights and BN statistics untouched."""
        optimizer.zero_grad(set_to_none=True)
        losses = self.stage2_losses(model, batch)
        losses["loss"].backward()
        for p in ctx.unwrap(model).backbone.parameters():
            p.grad = None  # SGD skips parameters without gradient: no momentum / decay step on B
        optimizer.step()
        return losses

    def training_step(self, model, batch, optimizers, ctx) -> dict[str, float]:
        opt = optimizers["main"]
        # Stage I: classification, updates B and fc
        opt.zero_grad(set_to_none=True)
        s1 = self.training_losses(model, batch, ctx)
        s1["loss"].backward()
        opt.step()
        # Stage II: CRR + FRR, updates fc only
        s2 = self.regularization_step(model, batch, opt, ctx)
        out = {"cls": float(s1["cls"]), "crr": float(s2["crr"]), "frr": float(s2["frr"]),
               "stage2": float(s2["loss"].detach()), "sets": float(s2["sets"])}
        if "index" in batch:  # the mechanism check: CRR has a signal only between distinct images
            out["one_image_sets"] = one_image_set_share(batch["index"], self.config.set_size)
        out["loss"] = out["cls"] + out["stage2"]
        return out
