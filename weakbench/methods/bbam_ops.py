"""BBAM as small pure functions (Lee, Yi, Shin & Yoon, "BBAM: Bounding Box Attribution Map for
Weakly Supervised Semantic and Instance Segmentation", CVPR 2021).

For every GT box of a training image, BBAM finds the smallest mask ``M`` of the image that keeps
a trained detector's predictions for proposals around the box (Eqs. 1–3, appendix Eq. 5);
the mask, refined by a within-box rank cut, a blur and a dense CRF, becomes the pseudo instance
mask. The pipeline, one function per step:

1. :func:`jitter_proposals` — proposals ``O`` around the GT box (each coordinate ± 30 %);
2. the detector's heads on ``O`` (:func:`weakbench.methods.detection.detector_forward_heads`),
   then :func:`select_positive_proposals` — ``O⁺`` with the head outputs ``p₀, t₀``
   (:func:`make_box_jobs` does 1–2 for many boxes and returns :class:`BoxJob` s);
3. :func:`optimise_box_masks` — Adam on the low-resolution masks (stride :func:`mask_stride`),
   loss :func:`perturbation_loss` + :func:`mask_l1` + :func:`total_variation`, images
   perturbed by :func:`perturb`; many boxes at once;
4. :func:`attribution_map` (mask → image size), then :func:`pseudo_mask_from_attribution`
   (rank cut :func:`box_rank_cut`, blur, CRF, fallbacks) → foreground and ignore masks.

Where the paper and the official code (github.com/jbeomlee93/BBAM, ``tools/BBAM/
BBAM_training_images_multi.py`` and ``tools/BBAM/make_annotation/``, which produced the
paper's pseudo-labels) differ, the code is followed and each docstring says so. Frames: boxes
are float ``x0, y0, x1, y1`` in pixels of the image they refer to; classes are our class
indices ``c`` in ``[0, C)`` (the detector's column / label ``c + 1``, background 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakbench.core.boxes import iou_xyxy

__all__ = [
    "S0", "S1", "JITTER_RATIO", "N_PROPOSALS", "IOU_THRESHOLDS", "MAX_POSITIVES", "ITERATIONS", "LR",
    "L1_WEIGHT", "TV_WEIGHT", "TV_BETA", "THETA_FG", "THETA_BG", "CRF_PARAMS",
    "mask_stride", "mask_shape", "jitter_proposals", "truncated_iou", "PositiveSet", "select_positive_proposals",
    "BoxJob", "make_box_jobs", "perturbation_loss", "mask_l1", "total_variation", "upsample_mask",
    "perturb", "init_mask", "optimise_box_masks", "attribution_map", "box_pixels", "box_filled_mask",
    "box_rank_cut", "dense_crf", "ImageCRF", "CRF_ENGINE", "CRF_ENGINES", "pseudo_mask_from_attribution", "SEED_GROWING_THRESHOLD", "seed_growing_mask_loss",
]

# ---------------------------------------------------------------- defaults (one place each)
S0: int = 16  #: s(a) = s0 + s1·√a (paper §4 "Reproducibility"; code line ``16 + 48 * np.power(a, 0.5)``)
S1: int = 48
JITTER_RATIO: float = 0.3  #: ± 30 % of the box side per coordinate (paper §3.3; code ``uniform(-0.3, 0.3)``)
N_PROPOSALS: int = 1000  #: proposals jittered per GT box (code ``for i in range(1000)``)
IOU_THRESHOLDS: tuple[float, ...] = (0.9, 0.85, 0.8)  #: code; the paper states 0.8 only
MAX_POSITIVES: int = 100  #: cap on |O⁺| (code)
ITERATIONS: int = 300  #: Adam iterations (paper §4; code ``max_iter_mask``)
LR: float = 0.02  #: Adam learning rate (paper §4; code ``lr_mask``)
L1_WEIGHT: float = 0.007  #: λ of Eq. 1 (paper §4; code ``l1_coeff``)
TV_WEIGHT: float = 1e-4  #: λ_TV of appendix Eq. 5 (code ``tv_coeff``)
TV_BETA: float = 3.0  #: β of appendix Eq. 5 (code ``tv_beta``)
THETA_FG: float = 0.85  #: code (``make_cocoann_topCRF_parallel.py``: th_fgs = [0.85, 0.2]); the paper states 0.8
THETA_BG: float = 0.2
#: dense CRF of the code's ``make_annotation`` (a ``DenseCRF`` of K. Nakashima's deeplab-pytorch):
#: 10 mean-field iterations, Gaussian kernel (sxy 1, weight 3), bilateral (sxy 80, srgb 3,
#: weight 4); a pixel is foreground when its CRF probability exceeds ``fg_prob`` (0.9 in code).
SEED_GROWING_THRESHOLD: float = 0.9  #: Mask R-CNN seed growing (code ``mask_head/loss.py``: ``th_growing = 0.9``)
CRF_PARAMS: dict = {"iter_max": 10, "pos_xy_std": 1.0, "pos_w": 3.0, "bi_xy_std": 80.0, "bi_rgb_std": 3.0,
                    "bi_w": 4.0, "fg_prob": 0.9}


# ----------------------------------------------------------------------------- the stride
def mask_stride(area_fraction: float, s0: float = S0, s1: float = S1, scale: float = 1.0) -> int:
    """Adaptive stride s(a) = s0 + s1·√a of the BBAM mask (paper §3.2 and §4; Fig. 7b).

    Args:
        area_fraction: ``a`` = box area / image area, clamped to ``[0, 1]``.
        s0, s1: 16 and 48 in the paper and the code.
        scale: the detector's input size relative to the code's (shorter side 800 px):
            ``scale = min_size / 800``; s is in pixels of the detector's input.

    Returns:
        ``round(s(a) · scale)`` (halves rounded up), at least 1. s(a) itself lies in
        ``[s0, s0 + s1]``; s(0) = 16, s(0.25) = 40, s(1) = 64. The code keeps s a float
        (mask size ``int(H / s)``); an integer stride is used here so that a mask cell covers a
        whole number of pixels, which changes the mask size by at most one cell.
    """
    a = min(max(float(area_fraction), 0.0), 1.0)
    s = min(max(s0 + s1 * math.sqrt(a), s0), s0 + s1)
    return max(1, int(math.floor(s * scale + 0.5)))


def mask_shape(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Low-resolution mask shape ``(h // s, w // s)`` (at least 1 × 1) of an image ``(h, w)``.

    The code uses ``int(H / s)`` (floor); the paper writes ``⌈w/s⌉ × ⌈h/s⌉``. The mask is
    stretched over the whole image by :func:`upsample_mask`, so either covers every pixel."""
    h, w = int(image_size[0]), int(image_size[1])
    return max(1, h // int(stride)), max(1, w // int(stride))


# -------------------------------------------------------------------------- proposals, O⁺
def jitter_proposals(
    box: torch.Tensor | Sequence[float],
    n: int = N_PROPOSALS,
    ratio: float = JITTER_RATIO,
    *,
    image_size: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random proposals around a box (paper §3.3 "Creating masks").

    Each coordinate moves by ``U(−ratio, ratio)`` times the box width (x0, x1) or height
    (y0, y1), independently (code: four ``random.uniform(-0.3, 0.3)`` per proposal).

    Args:
        box: ``(4,)`` ``x0, y0, x1, y1`` pixels.
        n: number of proposals drawn.
        ratio: maximal relative displacement.
        image_size: ``(H, W)``; when given, x0, y0 are clipped at 0 and x1, y1 at W, H (code).
        generator: a ``torch.Generator`` for reproducible draws (CPU).

    Returns:
        float32 ``(m, 4)``, ``m ≤ n``: the proposals with ``x1 > x0`` and ``y1 > y0`` (for
        ``ratio < 0.5`` that is all of them; the code does not filter).
    """
    b = torch.as_tensor(box, dtype=torch.float32).reshape(4)
    w, h = b[2] - b[0], b[3] - b[1]
    d = (torch.rand((n, 4), generator=generator, dtype=torch.float32) * 2 - 1) * ratio
    props = b + d * torch.stack([w, h, w, h])
    if image_size is not None:
        hh, ww = float(image_size[0]), float(image_size[1])
        props[:, 0].clamp_(min=0)
        props[:, 1].clamp_(min=0)
        props[:, 2].clamp_(max=ww)
        props[:, 3].clamp_(max=hh)
    keep = (props[:, 2] > props[:, 0]) & (props[:, 3] > props[:, 1])
    return props[keep]


def truncated_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of ``box (4,)`` with each of ``boxes (N, 4)`` as the code's ``get_single_iou``: the
    *xyxy* IoU (:func:`weakbench.core.boxes.iou_xyxy`, areas ``(x1 − x0)(y1 − y0)`` without
    ``+1``) of the corners truncated toward zero (``int()``), 0 when the boxes do not overlap or
    the union is empty. Returns float64 ``(N,)``."""
    a = torch.trunc(box.reshape(1, 4).to(torch.float64))
    b = torch.trunc(boxes.reshape(-1, 4).to(torch.float64))
    return iou_xyxy(a, b)[0].nan_to_num(0.0)  # 0 / 0 (an empty union) is NaN in torchvision


@dataclasses.dataclass
class PositiveSet:
    """The positive proposals O⁺ of one GT box and the head outputs on the unperturbed image.

    Attributes:
        proposals: float ``(K, 4)`` the kept (jittered, undecoded) proposals, pixels.
        p0: float ``(K,)`` class probability of the GT class (softmax over C + 1), ``p^c``.
        t0: float ``(K, 4)`` raw box regression ``(dx, dy, dw, dh)`` of the GT class, ``t^c``.
        decoded: float ``(K, 4)`` the regressed boxes of the GT class, pixels.
        indices: int64 ``(K,)`` positions of the kept proposals in the input.
        iou_threshold: the θ that was used, or ``None`` when O⁺ is empty.
    """

    proposals: torch.Tensor
    p0: torch.Tensor
    t0: torch.Tensor
    decoded: torch.Tensor
    indices: torch.Tensor
    iou_threshold: float | None

    @property
    def empty(self) -> bool:
        return int(self.proposals.shape[0]) == 0

    def __len__(self) -> int:
        return int(self.proposals.shape[0])


def select_positive_proposals(
    proposals: torch.Tensor,
    class_probs: torch.Tensor,
    box_regression: torch.Tensor,
    gt_box: torch.Tensor,
    cls: int,
    *,
    box_coder,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    max_positives: int = MAX_POSITIVES,
) -> PositiveSet:
    """O⁺: proposals the cls head assigns to the GT class whose regressed box fits the GT box.

    Paper §3.3: "If f^cls correctly predicts the ground-truth class, and the IoU associated with
    the predicted box by f^box is greater than 0.8". The code (``BBAM_training_images_multi.py``)
    is followed: a proposal is positive at θ when the arg-max of its C + 1 class scores
    (background included) is the GT class and :func:`truncated_iou` (GT box, the proposal's
    regressed box for that class) ``> θ``. θ runs through ``iou_thresholds`` (0.9, 0.85, 0.8);
    at the first θ with **more than** ``max_positives`` positives, the first ``max_positives``
    of them in proposal order (random, since the proposals are jittered) are kept and the
    search stops; otherwise every positive at the last θ is kept (so |O⁺| ≤ 100, possibly
    fewer, possibly 0).

    Args:
        proposals: float ``(N, 4)`` pixels of the image the heads saw.
        class_probs: ``(N, C + 1)`` softmax scores (column ``c + 1`` is class ``c``).
        box_regression: ``(N, (C + 1) · 4)`` raw deltas, as returned by
            :func:`~weakbench.methods.detection.detector_forward_heads` (``decode=False``).
        gt_box: ``(4,)`` pixels; cls: our class index ``c``.
        box_coder: the detector's ``roi_heads.box_coder`` (decodes deltas against proposals).

    Returns:
        a :class:`PositiveSet` (detached); ``.empty`` when no proposal qualifies at any θ, which
        the caller reports (the code then writes an all-zero mask, handled by
        :func:`pseudo_mask_from_attribution`'s box-prior fallback).

    Raises:
        ValueError: shapes disagree or ``cls`` is outside ``[0, C)``.
    """
    n = proposals.shape[0]
    if class_probs.shape[0] != n or box_regression.shape[0] != n:
        raise ValueError(f"{n} proposals but {class_probs.shape[0]} score rows and {box_regression.shape[0]} regression rows")
    ncls = class_probs.shape[1]
    if not 0 <= int(cls) < ncls - 1:
        raise ValueError(f"class {cls} outside [0, {ncls - 1}) (the heads have {ncls} columns incl. background)")
    if box_regression.shape[1] != 4 * ncls:
        raise ValueError(f"box_regression has {box_regression.shape[1]} columns, expected {4 * ncls}")
    label = int(cls) + 1
    with torch.no_grad():
        probs = class_probs.detach()
        reg = box_regression.detach()
        props = proposals.detach().to(reg.dtype)
        decoded_all = box_coder.decode(reg, [props]).reshape(n, ncls, 4)
        pred = probs.argmax(dim=1)
        dec_pred = decoded_all[torch.arange(n), pred]
        iou = truncated_iou(torch.as_tensor(gt_box, dtype=torch.float64).to(reg.device), dec_pred)
        chosen = torch.zeros(0, dtype=torch.long, device=reg.device)
        used: float | None = None
        for th in iou_thresholds:
            idx = torch.nonzero((pred == label) & (iou > th)).reshape(-1)
            chosen, used = idx, float(th)
            if idx.numel() > max_positives:
                chosen = idx[:max_positives]
                break
        if chosen.numel() == 0:
            used = None
        return PositiveSet(
            proposals=props[chosen].clone(),
            p0=probs[chosen, label].clone(),
            t0=reg[chosen].reshape(-1, ncls, 4)[:, label].clone(),
            decoded=decoded_all[chosen, label].clone(),
            indices=chosen.clone(),
            iou_threshold=used,
        )


@dataclasses.dataclass
class BoxJob:
    """One box's mask optimisation for :func:`optimise_box_masks`.

    Attributes:
        image_index: row of ``images_norm`` the box lies in.
        box: float ``(4,)`` the GT box, pixels of ``images_norm``.
        cls: our class index ``c``.
        proposals, p0, t0: O⁺ and its unperturbed outputs (see :class:`PositiveSet`); ``K`` may
            be 0 (then the mask stays all zero, as in the code).
        stride: the mask stride in pixels (:func:`mask_stride`).
        init_boxes: float ``(K, 4)`` boxes inside which the mask starts at 1 (the code: the
            *regressed* boxes of O⁺); ``None`` → ``proposals``.
        image_size: ``(h, w)`` valid region of the image (before padding); ``None`` → the whole
            tensor.
    """

    image_index: int
    box: torch.Tensor
    cls: int
    proposals: torch.Tensor
    p0: torch.Tensor
    t0: torch.Tensor
    stride: int
    init_boxes: torch.Tensor | None = None
    image_size: tuple[int, int] | None = None

    @classmethod
    def from_positives(cls_, image_index: int, box, cls: int, positives: PositiveSet, stride: int,
                       image_size: tuple[int, int] | None = None) -> "BoxJob":
        return cls_(image_index=image_index, box=torch.as_tensor(box, dtype=torch.float32).reshape(4), cls=int(cls),
                    proposals=positives.proposals, p0=positives.p0, t0=positives.t0, stride=int(stride),
                    init_boxes=positives.decoded, image_size=image_size)

    @property
    def empty(self) -> bool:
        return int(self.proposals.shape[0]) == 0


def _image_list(images_norm) -> list[torch.Tensor]:
    """``(B, 3, H, W)`` or a sequence of ``(3, H_i, W_i)`` / ``(1, 3, H_i, W_i)`` → list of ``(3, H_i, W_i)``."""
    if torch.is_tensor(images_norm):
        if images_norm.dim() != 4 or images_norm.shape[1] != 3:
            raise ValueError(f"images_norm must be (B, 3, H, W), got {tuple(images_norm.shape)}")
        return list(images_norm.unbind(0))
    out = [x[0] if x.dim() == 4 else x for x in images_norm]
    for x in out:
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"each image must be (3, H, W), got {tuple(x.shape)}")
    return out


def make_box_jobs(
    detector,
    images_norm: torch.Tensor | Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    classes: Sequence[torch.Tensor | Sequence[int]],
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    n_proposals: int = N_PROPOSALS,
    jitter_ratio: float = JITTER_RATIO,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    max_positives: int = MAX_POSITIVES,
    s0: float = S0,
    s1: float = S1,
    stride_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> list[BoxJob]:
    """Steps 1–2 for every GT box of a batch: jitter, score on the clean images, select O⁺.

    One backbone forward per image (no gradient), then the heads on the ``n_proposals`` of
    each box. The stride uses the GT box's area over the image's (the code's
    ``target_areas[obj] / (w*h)``; the paper says the *predicted* box's).

    Args:
        detector: eval-mode detector (set here for the call and restored).
        images_norm: ``(B, 3, H, W)`` normalised, at the detector's scale (see
            :func:`~weakbench.methods.detection.detector_inputs`), or a list of ``B`` such
            images ``(3, H_i, W_i)`` of their own sizes (each padded on its own, so nothing about
            an image depends on which others it is batched with).
        boxes: ``B`` float tensors ``(K_b, 4)``, pixels of ``images_norm``.
        classes: ``B`` sequences of ``K_b`` class indices ``c``.
        image_sizes: valid ``(h, w)`` per image; default the full tensor.
        stride_scale: see :func:`mask_stride`; default ``min(h, w) / 800`` per image (the code's
            images had their shorter side at 800 px).
        generator: for :func:`jitter_proposals`.

    Returns:
        one :class:`BoxJob` per box, images in order, boxes in order (empty ones included:
        check ``job.empty``).
    """
    from weakbench.methods.detection import detector_box_heads, detector_features

    imgs = _image_list(images_norm)
    b = len(imgs)
    sizes = [tuple(int(v) for v in s) for s in image_sizes] if image_sizes is not None \
        else [tuple(int(v) for v in x.shape[-2:]) for x in imgs]
    jobs: list[BoxJob] = []
    was = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            for i in range(b):
                bx = torch.as_tensor(boxes[i], dtype=torch.float32).reshape(-1, 4)
                cl = [int(c) for c in (classes[i].tolist() if torch.is_tensor(classes[i]) else classes[i])]
                if bx.shape[0] == 0:
                    continue
                feats = detector_features(detector, imgs[i][None])
                h, w = sizes[i]
                scale = stride_scale if stride_scale is not None else min(h, w) / 800.0
                for k in range(bx.shape[0]):
                    props = jitter_proposals(bx[k], n_proposals, jitter_ratio, image_size=(h, w), generator=generator)
                    probs, reg = detector_box_heads(detector, feats, [props.to(imgs[i].device)], [(h, w)])
                    pos = select_positive_proposals(props.to(reg.device), probs, reg, bx[k], cl[k],
                                                    box_coder=detector.roi_heads.box_coder,
                                                    iou_thresholds=iou_thresholds, max_positives=max_positives)
                    area = float((bx[k, 2] - bx[k, 0]) * (bx[k, 3] - bx[k, 1])) / float(h * w)
                    stride = mask_stride(area, s0, s1, scale)
                    jobs.append(BoxJob.from_positives(i, bx[k], cl[k], pos, stride, image_size=(h, w)))
    finally:
        detector.train(was)
    return jobs


# ------------------------------------------------------------------------------ loss terms
def perturbation_loss(
    p0: torch.Tensor,
    p: torch.Tensor,
    t0: torch.Tensor,
    t: torch.Tensor,
    *,
    use_box: bool = True,
    use_cls: bool = True,
    variant: Literal["code", "paper"] = "code",
) -> torch.Tensor:
    """L_perturb of Eq. 3, averaged over the positive proposals.

    ``variant="code"`` (default; ``BBAM_training_images_multi.py``):
    ``(1/K) Σ_k [ ½·mean_j |t₀ₖⱼ − tₖⱼ| + ½·|p₀ₖ − pₖ| ]`` (mean over the 4 deltas, both terms
    halved). ``variant="paper"``: ``(1/K) Σ_k [ Σ_j |t₀ₖⱼ − tₖⱼ| + |p₀ₖ − pₖ| ]`` (the L1 norms
    of Eq. 3 as written), which weighs the box head 4× more relative to the cls head.
    ``use_box`` / ``use_cls`` are the paper's indicators 𝟙_box and 𝟙_cls (both 1 in the paper).

    Args:
        p0, p: ``(K,)`` GT-class probability on the clean / perturbed image.
        t0, t: ``(K, 4)`` raw regression deltas of the GT class, clean / perturbed.

    Returns:
        a scalar tensor (0 when ``K == 0``), differentiable in ``p`` and ``t``.

    Raises:
        ValueError: mismatched shapes or an unknown variant.
    """
    if p0.shape != p.shape or t0.shape != t.shape or t.shape[:1] != p.shape[:1]:
        raise ValueError(f"shapes p0 {tuple(p0.shape)}, p {tuple(p.shape)}, t0 {tuple(t0.shape)}, t {tuple(t.shape)} disagree")
    if variant not in ("code", "paper"):
        raise ValueError(f"perturbation_loss variant {variant!r} unknown; use 'code' or 'paper'")
    if p.numel() == 0:
        return p.sum() * 0.0 + t.sum() * 0.0
    box = (t0.detach() - t).abs()
    cls = (p0.detach() - p).abs()
    if variant == "code":
        box, cls = box.mean(dim=1) / 2, cls / 2
    else:
        box = box.sum(dim=1)
    loss = torch.zeros_like(cls)
    if use_box:
        loss = loss + box
    if use_cls:
        loss = loss + cls
    return loss.mean()


def mask_l1(mask: torch.Tensor, weight: float = L1_WEIGHT) -> torch.Tensor:
    """Sparsity term λ‖M‖₁ of Eq. 1: ``weight · Σ|M|`` over all elements of the low-resolution
    mask (a **sum**, as the code's ``l1_coeff * torch.sum(torch.abs(mask))``; λ = 0.007).
    The sum makes the term grow with the number of mask cells, i.e. with 1/stride²."""
    return weight * mask.abs().sum()


def total_variation(mask: torch.Tensor, weight: float = 1.0, beta: float = TV_BETA, diagonal: bool = True) -> torch.Tensor:
    """TV term λ_TV‖∇M‖_β^β of the appendix Eq. 5 (β = 3; λ_TV = 1e-4 = :data:`TV_WEIGHT`).

    As the code's ``tv_norm(mask, 3, diagonal=True, sum=True)``: the sum of ``|Δ|^β`` over
    vertical and horizontal neighbour differences and, with ``diagonal=True``, over the two
    diagonal directions **each counted twice** (the code lists ``(i, j)−(i+1, j+1)`` and
    ``(i+1, j+1)−(i, j)``, and the same for the anti-diagonal). ``diagonal=False`` gives the
    plain row + column form (Fong & Vedaldi's). Hand value: ``[[0, 1], [0, 0]]`` → 4 (1 row,
    1 column, 2 × 1 anti-diagonal), 2 without diagonals.

    Args:
        mask: ``(h, w)`` (or ``(..., h, w)``: summed over everything).
        weight: multiplies the result (1.0 here: pass :data:`TV_WEIGHT` for the loss term).
    """
    m = mask
    tv = (m[..., :-1, :] - m[..., 1:, :]).abs().pow(beta).sum() + (m[..., :, :-1] - m[..., :, 1:]).abs().pow(beta).sum()
    if diagonal:
        tv = tv + 2 * (m[..., :-1, :-1] - m[..., 1:, 1:]).abs().pow(beta).sum() \
            + 2 * (m[..., 1:, :-1] - m[..., :-1, 1:]).abs().pow(beta).sum()
    return weight * tv


# ------------------------------------------------------------------------------ perturbation
def upsample_mask(mask_lowres: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(h, w)`` (or ``(N, 1, h, w)``) to ``out_size = (H, W)`` with
    ``align_corners=True`` (the code's ``torch.nn.UpsamplingBilinear2d``): the corner cells
    sit on the corner pixels. Returns the same rank as given."""
    squeeze = mask_lowres.dim() == 2
    m = mask_lowres[None, None] if squeeze else mask_lowres
    up = F.interpolate(m, size=(int(out_size[0]), int(out_size[1])), mode="bilinear", align_corners=True)
    return up[0, 0] if squeeze else up


def perturb(image_norm: torch.Tensor, mask_lowres: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Φ(I, M) = I∘M̂ + μ∘(1 − M̂) with mean fill, in normalised space (paper §3.2).

    With ``I_norm = (I − μ)/σ`` per channel, ``(Φ(I, M) − μ)/σ = I_norm · M̂`` exactly, so the
    perturbed image is the normalised image times the upsampled mask (the code's ``'constant'``
    masking: ``img * up_mask``, on images normalised by mean subtraction).

    Args:
        image_norm: ``(3, H, W)`` or ``(B, 3, H, W)`` normalised image(s).
        mask_lowres: ``(h, w)`` in ``[0, 1]``, one mask for all images given.
        out_size: ``(h_v, w_v)`` valid image region the mask is stretched over (the rest, the
            transform's zero padding, is left unchanged); default the full ``(H, W)``.

    Returns:
        a tensor like ``image_norm``, differentiable in both arguments.
    """
    H, W = image_norm.shape[-2:]
    hv, wv = (int(out_size[0]), int(out_size[1])) if out_size is not None else (H, W)
    up = upsample_mask(mask_lowres, (hv, wv))
    if (hv, wv) != (H, W):
        up = F.pad(up, (0, W - wv, 0, H - hv), value=1.0)
    return image_norm * up


def init_mask(job: BoxJob, shape: tuple[int, int], init: str = "ones_in_proposals") -> torch.Tensor:
    """Initial low-resolution mask of a job, float32 ``shape``.

    ``"ones_in_proposals"`` (code): zeros, then 1 inside every box of ``job.init_boxes`` (the
    regressed O⁺ boxes; ``job.proposals`` if None) mapped to cells by ``int(coord / stride)``
    (truncation; clipped to the mask, where the code would wrap negative indices).
    ``"ones"``: all ones (Fong & Vedaldi's start). An empty job gives zeros either way.

    Raises:
        ValueError: unknown ``init``.
    """
    if init not in ("ones_in_proposals", "ones"):
        raise ValueError(f"init {init!r} unknown; use 'ones_in_proposals' or 'ones'")
    h, w = shape
    m = torch.zeros((h, w), dtype=torch.float32)
    if job.empty:
        return m
    if init == "ones":
        return m.fill_(1.0)
    boxes = job.init_boxes if job.init_boxes is not None else job.proposals
    cells = torch.trunc(boxes.detach().cpu().to(torch.float64) / float(job.stride)).to(torch.long)
    for x0, y0, x1, y1 in cells.tolist():
        m[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = 1.0
    return m


def optimise_box_masks(
    detector,
    images_norm: torch.Tensor | Sequence[torch.Tensor],
    jobs: Sequence[BoxJob],
    *,
    iterations: int = ITERATIONS,
    lr: float = LR,
    l1_weight: float = L1_WEIGHT,
    tv_weight: float = TV_WEIGHT,
    tv_beta: float = TV_BETA,
    init: str = "ones_in_proposals",
    use_box: bool = True,
    use_cls: bool = True,
    variant: Literal["code", "paper"] = "code",
    chunk_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_iteration: Callable[[int, list[int], list[torch.Tensor]], None] | None = None,
) -> list[torch.Tensor]:
    """BBAM masks M* (Eq. 1 with Eq. 3 and the appendix TV term) for many boxes at once.

    For each job, M (``mask_shape(image_size, stride)``) starts from :func:`init_mask` and
    ``iterations`` Adam steps (``lr``) minimise
    ``perturbation_loss(p₀, p(Φ(I, M)), t₀, t(Φ(I, M))) + l1_weight·Σ|M| + tv_weight·TV(M)``,
    with M clamped to ``[0, 1]`` after each step (code: ``mask.data.clamp_(0, 1)``); ``p, t``
    are the heads' outputs for the job's O⁺ proposals on its perturbed image.

    **Batched:** the jobs of a chunk (``chunk_size`` jobs, default all) are optimised together:
    each iteration stacks the chunk's perturbed images (one per job, any source image) into one
    backbone forward per image shape (images of different padded sizes are never padded to a
    common one, which would change the features near their borders and the RoI scales), runs
    the RoI heads on each job's proposals, sums the jobs' losses and takes one Adam step over
    all masks. Since each loss depends only on its own mask and Adam is
    elementwise, and the detector is in eval mode (BatchNorm uses running statistics, so images
    do not interact), this equals optimising each box alone (the code's loop) up to float
    rounding. Chunks run one after the other; memory grows with ``chunk_size``.

    Args:
        detector: a torchvision Faster/Mask R-CNN; put in eval mode and its parameters'
            ``requires_grad`` switched off for the call (both restored after).
        images_norm: ``(B, 3, H, W)`` normalised images at the detector's scale, or a list of
            ``B`` images ``(3, H_i, W_i)`` of their own sizes (as :func:`make_box_jobs`).
        jobs: :class:`BoxJob` s (e.g. from :func:`make_box_jobs`); empty ones get a zero mask
            without optimisation (as the code's "no positive" branch).
        iterations, lr, l1_weight, tv_weight, tv_beta: the paper's / code's 300, 0.02, 0.007,
            1e-4, 3.
        init: see :func:`init_mask`.
        use_box, use_cls, variant: see :func:`perturbation_loss`.
        chunk_size: at most this many jobs per forward (``None``: all).
        progress: called as ``progress(done, total)`` after every iteration, counted in
            job-iterations (``total = len(jobs) · iterations``).
        on_iteration: called as ``on_iteration(t, job_indices, masks)`` after iteration ``t``
            (1-based) of every chunk, after the clamp, with the chunk's indices into ``jobs`` and
            their low-resolution masks (the optimiser's own tensors: copy what you keep). Adam
            has no schedule, so the masks after iteration ``t`` of an ``n``-iteration run equal
            the result of a ``t``-iteration run (a benchmark reads 60 and 300 from one run).

    Returns:
        one float32 tensor ``(h_j, w_j)`` in ``[0, 1]`` per job (CPU, detached), in job order.

    Raises:
        ValueError: a job's image index is outside the batch, or ``chunk_size < 1``.
    """
    from weakbench.methods.detection import detector_box_heads, detector_features

    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None for all jobs at once)")
    imgs = _image_list(images_norm)
    b = len(imgs)
    for j in jobs:
        if not 0 <= j.image_index < b:
            raise ValueError(f"job image_index {j.image_index} outside the batch of {b} images")
    device, dtype = (imgs[0].device, imgs[0].dtype) if imgs else (torch.device("cpu"), torch.float32)
    sizes = [tuple(j.image_size) if j.image_size is not None else tuple(imgs[j.image_index].shape[-2:]) for j in jobs]
    results: list[torch.Tensor | None] = [None] * len(jobs)
    active = []
    for i, j in enumerate(jobs):
        shape = mask_shape(sizes[i], j.stride)
        if j.empty:
            results[i] = torch.zeros(shape, dtype=torch.float32)
        else:
            active.append(i)
    total = len(jobs) * iterations
    done = (len(jobs) - len(active)) * iterations
    if progress is not None and done:
        progress(done, total)
    step = chunk_size or max(1, len(active))
    was = detector.training
    flags = [p.requires_grad for p in detector.parameters()]
    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(False)
    try:
        images = [x.detach() for x in imgs]
        for c0 in range(0, len(active), step):
            chunk = active[c0:c0 + step]
            masks = [init_mask(jobs[i], mask_shape(sizes[i], jobs[i].stride), init).to(device, dtype).requires_grad_(True)
                     for i in chunk]
            opt = torch.optim.Adam(masks, lr=lr)
            props = [jobs[i].proposals.to(device, dtype) for i in chunk]
            p0 = [jobs[i].p0.to(device, dtype) for i in chunk]
            t0 = [jobs[i].t0.to(device, dtype) for i in chunk]
            labels = [int(jobs[i].cls) + 1 for i in chunk]
            counts = [int(p.shape[0]) for p in props]
            # one backbone forward per image shape: jobs on same-shaped images share it
            groups: dict[tuple[int, int], list[int]] = {}
            for k, i in enumerate(chunk):
                groups.setdefault(tuple(images[jobs[i].image_index].shape[-2:]), []).append(k)
            for it in range(iterations):
                probs_s: list[torch.Tensor | None] = [None] * len(chunk)
                reg_s: list[torch.Tensor | None] = [None] * len(chunk)
                for ks in groups.values():
                    pert = torch.stack([perturb(images[jobs[chunk[k]].image_index], masks[k], sizes[chunk[k]])
                                        for k in ks])
                    feats = detector_features(detector, pert)
                    probs, reg = detector_box_heads(detector, feats, [props[k] for k in ks],
                                                    [sizes[chunk[k]] for k in ks])
                    for k, pk, rk in zip(ks, probs.split([counts[k] for k in ks]), reg.split([counts[k] for k in ks])):
                        probs_s[k], reg_s[k] = pk, rk
                loss = images[0].new_zeros(())
                for k, m in enumerate(masks):
                    lab = labels[k]
                    ncls = probs_s[k].shape[1]
                    t = reg_s[k].reshape(-1, ncls, 4)[:, lab]
                    loss = loss + perturbation_loss(p0[k], probs_s[k][:, lab], t0[k], t,
                                                    use_box=use_box, use_cls=use_cls, variant=variant)
                    loss = loss + mask_l1(m, l1_weight) + total_variation(m, tv_weight, tv_beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                if on_iteration is not None:
                    on_iteration(it + 1, list(chunk), masks)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            for i, m in zip(chunk, masks):
                results[i] = m.detach().to("cpu", torch.float32)
    finally:
        for p, f in zip(detector.parameters(), flags):
            p.requires_grad_(f)
        detector.train(was)
    return [r for r in results]  # type: ignore[misc]


# ------------------------------------------------------------------------------ pseudo masks
def attribution_map(mask_lowres: torch.Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """The BBAM at image size: :func:`upsample_mask` (the same upsampling the detector saw)
    to ``out_size = (H, W)``, float32 numpy ``(H, W)`` in ``[0, 1]``. The code re-reads the mask
    from a JPEG and resizes it with OpenCV; the difference is below one grey level."""
    return upsample_mask(mask_lowres.detach().float().cpu(), out_size).clamp(0, 1).numpy().astype(np.float32)


def box_pixels(box, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds ``(x0, y0, x1, y1)`` (end exclusive) of a float pixel-edge box:
    ``floor`` of the start, ``ceil`` of the end, clipped to the image, at least one pixel wide
    and high. A box ``(2, 3, 5, 7)`` covers columns 2..4 and rows 3..6."""
    x0, y0, x1, y1 = (float(v) for v in (box.tolist() if hasattr(box, "tolist") else box))
    ix0 = min(max(int(math.floor(x0)), 0), width - 1)
    iy0 = min(max(int(math.floor(y0)), 0), height - 1)
    ix1 = min(max(int(math.ceil(x1)), ix0 + 1), width)
    iy1 = min(max(int(math.ceil(y1)), iy0 + 1), height)
    return ix0, iy0, ix1, iy1


def box_filled_mask(box, height: int, width: int) -> np.ndarray:
    """The trivial baseline pseudo mask: bool ``(H, W)``, True on the box's pixels
    (:func:`box_pixels`)."""
    m = np.zeros((int(height), int(width)), dtype=bool)
    x0, y0, x1, y1 = box_pixels(box, height, width)
    m[y0:y1, x0:x1] = True
    return m


def box_rank_cut(attr: np.ndarray, box, theta: float) -> np.ndarray:
    """Within-box rank cut of the code's ``get_top_CRF`` (the paper's θ_fg / θ_bg step).

    The map is normalised as the code does, ``(a − min) / max`` (over the whole image), set to 0
    outside the box, and divided by ``v_k + 1e-8`` where ``v_k`` is the value at rank
    ``k = int(box_area · (1 − θ))`` (0-based, descending, over the whole image), then clipped to
    ``[0, 1]``: the ``k`` highest pixels of the box saturate at 1 and the rest scale linearly.
    So θ is a fraction of the box's pixels, not an attribution value as the paper's text reads.
    Computed in float64 (box values 0..99 with θ = 0.85: exactly 15 pixels equal 1).

    Args:
        attr: float ``(H, W)`` attribution at image size; box: float pixel box (:func:`box_pixels`);
        theta: in ``[0, 1)``.

    Returns:
        float64 ``(H, W)`` in ``[0, 1]``, zero outside the box (all zero if the map is).
    """
    a = np.asarray(attr, dtype=np.float64)
    H, W = a.shape
    mx = a.max()
    if mx > 0:
        a = (a - a.min()) / mx
    x0, y0, x1, y1 = box_pixels(box, H, W)
    roi = np.zeros_like(a)
    roi[y0:y1, x0:x1] = 1.0
    a = a * roi
    if a.max() <= 0:
        return a
    area = (y1 - y0) * (x1 - x0)
    k = min(int(area * (1.0 - theta)), a.size - 1)
    v = np.sort(a, axis=None)[::-1][k]
    return np.clip(a / (v + 1e-8), 0.0, 1.0)


#: engine of :class:`ImageCRF` when none is named: ``"numba"`` (ours, :mod:`weakbench.methods.densecrf`)
#: or ``"pydensecrf"`` (the official code's library); the two give the same marginals up to float32
#: rounding and the same masks on the tested coco128 images (tests/test_bbam_ops.py, docs/bbam.md)
CRF_ENGINE: str = "numba"
CRF_ENGINES: tuple[str, ...] = ("numba", "pydensecrf")


def dense_crf(image_uint8: np.ndarray, fg_prob: np.ndarray, params: dict | None = None,
              engine: str | None = None) -> np.ndarray:
    """Two-label dense CRF (Krähenbühl & Koltun, NIPS 2011) of the official code's
    ``make_annotation``: :class:`ImageCRF` of one image, one unary.

    Unaries ``−log(max(p, 1e-5))`` of ``[fg_prob, 1 − fg_prob]``; a Gaussian and a bilateral
    pairwise term with :data:`CRF_PARAMS`. The bilateral kernel uses the Euclidean colour
    distance, so RGB or BGR order gives the same result.

    Args:
        image_uint8: ``(H, W, 3)`` uint8; fg_prob: float ``(H, W)`` in ``[0, 1]``.
        params: overrides of :data:`CRF_PARAMS`; engine: see :class:`ImageCRF`.

    Returns:
        float32 ``(H, W)``: the CRF's foreground marginal.

    Raises:
        ValueError: shapes disagree or an unknown engine;
        ImportError: ``engine="pydensecrf"`` without pydensecrf (``pip install pydensecrf2``).
    """
    H, W = np.shape(fg_prob)
    if np.shape(image_uint8) != (H, W, 3):
        raise ValueError(f"image_uint8 is {np.shape(image_uint8)}, expected {(H, W, 3)} (the attribution's size)")
    return ImageCRF(image_uint8, params, engine=engine)(fg_prob)


class ImageCRF:
    """The dense CRF of one image (:func:`dense_crf`), its pairwise terms built once for many
    unaries: each call runs mean-field inference from its unary, so the result does not
    depend on earlier calls, but the permutohedral lattices (Adams et al. 2010) of the two
    kernels are built once per image instead of once per box and threshold (the official
    code builds them per call).

    Engines: ``"numba"`` (:class:`weakbench.methods.densecrf.DenseCRF2`, ours: the algorithm of
    Krähenbühl's densecrf library, which pydensecrf wraps, filtering one channel per kernel and
    iteration since ``Q_bg = 1 − Q_fg``) and ``"pydensecrf"`` (``DenseCRF2D`` of package
    ``pydensecrf2``, the official code's). They agree to float32 rounding: at most 1e-5 in the
    marginal on coco128 images with BBAM's unaries and the same ``> 0.9`` masks
    (tests/test_bbam_ops.py; docs/bbam.md has the figures and the speed).

    Args:
        image_uint8: ``(H, W, 3)`` uint8.
        params: overrides of :data:`CRF_PARAMS`.
        engine: one of :data:`CRF_ENGINES`; ``None`` → :data:`CRF_ENGINE`.

    Raises:
        ImportError: ``engine="pydensecrf"`` and pydensecrf is not installed (``pip install
            pydensecrf2``, or pass ``use_crf=False`` to :func:`pseudo_mask_from_attribution`).
        ValueError: the image is not ``(H, W, 3)``, or an unknown engine.
    """

    def __init__(self, image_uint8: np.ndarray, params: dict | None = None, engine: str | None = None):
        engine = CRF_ENGINE if engine is None else engine
        if engine not in CRF_ENGINES:
            raise ValueError(f"engine={engine!r}: the dense CRF engines are {', '.join(CRF_ENGINES)}")
        p = {**CRF_PARAMS, **(params or {})}
        img = np.array(image_uint8, dtype=np.uint8, order="C", copy=True)  # pydensecrf needs a writable buffer
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image_uint8 must be (H, W, 3), got {img.shape}")
        self.engine = engine
        self.shape = img.shape[:2]
        self.iter_max = int(p["iter_max"])
        H, W = self.shape
        if engine == "numba":
            from weakbench.methods.densecrf import DenseCRF2

            self._d = DenseCRF2(img, pos_xy_std=p["pos_xy_std"], pos_w=p["pos_w"], bi_xy_std=p["bi_xy_std"],
                                bi_rgb_std=p["bi_rgb_std"], bi_w=p["bi_w"])
            return
        try:
            import pydensecrf.densecrf as dcrf
        except ImportError:
            raise ImportError("BBAM's CRF engine 'pydensecrf' needs pydensecrf: `pip install pydensecrf2` "
                              "(imports as pydensecrf), or use engine='numba'") from None
        self._d = dcrf.DenseCRF2D(W, H, 2)
        self._d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
        self._d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=img, compat=p["bi_w"])

    def __call__(self, fg_prob: np.ndarray) -> np.ndarray:
        """Foreground marginal, float32 ``(H, W)``, of the unaries ``−log(max(p, 1e-5))`` of
        ``[fg_prob, 1 − fg_prob]`` (``fg_prob`` float ``(H, W)`` in ``[0, 1]``) after
        ``iter_max`` mean-field iterations.

        Raises:
            ValueError: ``fg_prob`` is not ``(H, W)``.
        """
        if np.shape(fg_prob) != tuple(self.shape):
            raise ValueError(f"fg_prob is {np.shape(fg_prob)}, expected {tuple(self.shape)} (the image's size)")
        prob = np.stack([fg_prob, 1.0 - fg_prob]).astype(np.float32)
        unary = -np.log(np.clip(prob, 1e-5, 1.0))  # pydensecrf.utils.unary_from_softmax, float32
        H, W = self.shape
        if self.engine == "numba":
            return self._d.inference(unary[0], unary[1], self.iter_max)
        self._d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(2, -1)))
        q = np.array(self._d.inference(self.iter_max)).reshape(2, H, W)
        return q[0].astype(np.float32)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    # cv2.GaussianBlur(ksize=2·int(σ)+1, σ) as in the code: the kernel is cut at one σ,
    # borders reflected without repeating the edge (OpenCV's default = scipy's 'mirror').
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return a
    return gaussian_filter(a, sigma=float(sigma), truncate=max(int(sigma), 1) / float(sigma), mode="mirror")


def _top_mask(attr, box, theta, sigma, crf, use_crf, fg_prob, cut=None) -> np.ndarray:
    H, W = attr.shape
    x0, y0, x1, y1 = box_pixels(box, H, W)
    roi = np.zeros((H, W), dtype=bool)
    roi[y0:y1, x0:x1] = True
    area = (y1 - y0) * (x1 - x0)
    cut = box_rank_cut(attr, box, theta) if cut is None else cut
    if cut.max() <= 0:  # no attribution (empty O⁺): the code's box-prior CRF, accept > box/5
        if use_crf:
            for init in (0.7, 0.8, 0.9, 0.95):
                start = np.where(roi, init, 0.0)
                new = crf(start) > fg_prob
                if (new & roi).sum() > area / 5:
                    return new & roi
        return roi.copy()
    m = _gaussian_blur(cut, sigma) * roi
    if m.max() > 0:
        m = (m - m.min()) / m.max()
    if use_crf:
        fg = crf(m) > fg_prob
    else:
        fg = m > 0.5
    fg &= roi
    if fg.sum() > area / 5 or area / float(H * W) > 0.1:
        return fg
    if not use_crf:
        return roi.copy()
    new = fg
    for init in (0.7, 0.8, 0.9, 0.95, 0.96):  # the code's growing from a box prior
        start = np.where(roi, init, 0.0)
        start[fg] = 1.0
        new = (crf(start) > fg_prob) & roi
        if new.sum() > area / 3:
            return new
    return new if new.any() else roi.copy()


def pseudo_mask_from_attribution(
    attr: np.ndarray,
    box,
    *,
    theta_fg: float = THETA_FG,
    theta_bg: float = THETA_BG,
    blur_sigma: float | None = None,
    stride_scale: float = 1.0,
    image_uint8: np.ndarray | None = None,
    use_crf: bool = True,
    crf_params: dict | None = None,
    crf: "ImageCRF | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo instance mask of one box from its BBAM (the code's ``make_annotation``).

    For a threshold θ (the code's ``get_top_CRF``): :func:`box_rank_cut` (the box's top
    ``(1 − θ)`` fraction of pixels saturates at 1), Gaussian blur of σ (cut at 1σ, as the
    code's ``cv2.GaussianBlur(ksize=2σ+1, σ)``), masked to the box and renormalised, then a
    dense CRF (:func:`dense_crf`) whose foreground marginal ``> 0.9`` is the mask.
    Fallbacks (code): if that mask has at most box_area/5 pixels and the box covers at most
    10 % of the image, the CRF is rerun from a box prior of 0.7, 0.8, 0.9, 0.95, 0.96 inside the
    box (1 on the mask found) until it yields more than box_area/3 pixels (else the last
    result); an all-zero attribution (empty O⁺) uses the box-prior CRF at 0.7 … 0.95 with
    acceptance above box_area/5. Where the code would give an empty mask or none at all, the
    box itself is returned (ours). Without CRF (``use_crf=False``, ours): the blurred map
    ``> 0.5``, and the box itself where that is empty or tiny by the rule above.

    The foreground uses ``theta_fg``; the code's second pass with ``theta_bg`` (its
    "liberal" mask, ``th_fgs = [0.85, 0.2]``) gives ``ignore`` = liberal ∖ foreground (the code's
    ``create_semantic_labels.py``: pixels in the θ_bg mask but not in the θ_fg mask are 255).
    With no attribution inside the box both passes are the same box-prior CRF, run once here.
    The paper describes θ_fg / θ_bg (0.8 / 0.2) as thresholds on attribution values.

    Args:
        attr: float ``(H, W)`` attribution in ``[0, 1]`` at the image's size (:func:`attribution_map`).
        box: float ``(4,)`` pixel box in that image (:func:`box_pixels` rounds it outward).
        theta_fg, theta_bg: rank-cut fractions, ``0 <= theta_bg <= theta_fg < 1``.
        blur_sigma: σ in pixels; ``None`` → ``mask_stride(a, scale=stride_scale)`` with ``a``
            the box's share of the image: the code's ``int(16 + 48·√a)`` (truncated there,
            rounded here, so at most 1 px more) in image pixels (the code ran on
            VOC images of about 500 px at scale 1; pass ``max(H, W) / 500`` to keep the blur
            relative to the image).
        image_uint8: ``(H, W, 3)`` uint8 image (needed when ``use_crf``).
        use_crf: run the dense CRF (:class:`ImageCRF`, engine :data:`CRF_ENGINE`).
        crf_params: overrides of :data:`CRF_PARAMS`.
        crf: an :class:`ImageCRF` of this image (and ``crf_params``), shared by the image's boxes
            (same result, the bilateral lattice built once); default: built here from ``image_uint8``.

    Returns:
        ``(fg, ignore)`` bool ``(H, W)``, disjoint, both inside the box.

    Raises:
        ValueError: thresholds out of order, ``attr`` not 2-D, or ``use_crf`` without an image;
        ImportError: ``use_crf`` with the pydensecrf engine and without pydensecrf.
    """
    a = np.asarray(attr, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"attr must be (H, W), got shape {a.shape}")
    if not 0.0 <= theta_bg <= theta_fg < 1.0:
        raise ValueError(f"need 0 <= theta_bg ({theta_bg}) <= theta_fg ({theta_fg}) < 1")
    if use_crf and image_uint8 is None and crf is None:
        raise ValueError("use_crf=True needs image_uint8 (the (H, W, 3) uint8 image); or pass use_crf=False")
    H, W = a.shape
    if blur_sigma is None:
        x0, y0, x1, y1 = box_pixels(box, H, W)
        blur_sigma = float(mask_stride((x1 - x0) * (y1 - y0) / float(H * W), scale=stride_scale))
    params = {**CRF_PARAMS, **(crf_params or {})}
    fg_prob = float(params["fg_prob"])
    if use_crf and crf is None:
        crf = ImageCRF(image_uint8, params)
    if use_crf and tuple(crf.shape) != (H, W):
        raise ValueError(f"crf is for a {tuple(crf.shape)} image, the attribution is {(H, W)}")
    cut = box_rank_cut(a, box, theta_fg)
    fg = _top_mask(a, box, theta_fg, blur_sigma, crf, use_crf, fg_prob, cut)
    if cut.max() <= 0:  # no attribution in the box: θ_bg's pass is the same box-prior CRF
        return fg, np.zeros_like(fg)
    liberal = _top_mask(a, box, theta_bg, blur_sigma, crf, use_crf, fg_prob)
    return fg, liberal & ~fg


# ------------------------------------------------------------------------------ Mask R-CNN stage
def seed_growing_mask_loss(
    logits: torch.Tensor,
    fg_seed: torch.Tensor,
    liberal: torch.Tensor,
    threshold: float = SEED_GROWING_THRESHOLD,
) -> torch.Tensor:
    """The official code's Mask R-CNN mask loss on BBAM pseudo masks, with seed growing and
    balanced means (``maskrcnn_benchmark/modeling/roi_heads/mask_head/loss.py`` of
    github.com/jbeomlee93/BBAM, ``seed_growing = True``, ``loss_balance = True``; the paper's §3.4
    trains Mask R-CNN on the pseudo masks with the band between θ_bg and θ_fg ignored).

    Per RoI cell, with ``s = sigmoid(logits)``:

    1. foreground candidates: the θ_fg seed (``fg_seed``) plus every cell with ``s > threshold``;
       background candidates: the cells outside the liberal θ_bg mask plus every cell with
       ``s < 1 − threshold``; a candidate that is a seed of the *other* side is dropped;
    2. a candidate becomes a target only if at least one of its 8 neighbours is a candidate of
       the same side (a 3×3 sum without the centre, zero padding): isolated cells, seeds
       included, are ignored;
    3. target 1 (foreground) or 0 (background); every other cell (the band, unless grown) is
       ignored;
    4. loss ``= ½ (mean of BCE over foreground targets + mean of BCE over background targets)``,
       the means taken over all RoIs of the batch together; ``0`` (times the logits, to keep
       the graph) when either side has no target.

    Args:
        logits: float ``(N, M, M)`` mask logits of each RoI's GT class.
        fg_seed: bool ``(N, M, M)``, the θ_fg mask projected onto each RoI.
        liberal: bool ``(N, M, M)``, the θ_bg mask (foreground ∪ ignore band) projected onto each RoI.
        threshold: growing threshold in (0.5, 1) (0.9 in the code).

    Returns:
        a scalar tensor, differentiable in ``logits`` (the growing itself is not: the targets
        are built without gradient).

    Raises:
        ValueError: shapes differ, or ``threshold`` not in (0.5, 1).
    """
    if logits.shape != fg_seed.shape or logits.shape != liberal.shape or logits.dim() != 3:
        raise ValueError(f"logits {tuple(logits.shape)}, fg_seed {tuple(fg_seed.shape)} and liberal "
                         f"{tuple(liberal.shape)} must be the same (N, M, M)")
    if not 0.5 < threshold < 1:
        raise ValueError(f"threshold={threshold}: must lie in (0.5, 1)")
    if logits.numel() == 0:
        return logits.sum() * 0
    with torch.no_grad():
        s = torch.sigmoid(logits)
        seed_fg, seed_bg = fg_seed.bool(), ~liberal.bool()
        fg = (seed_fg | (s > threshold)) & ~seed_bg
        bg = (seed_bg | (s < 1 - threshold)) & ~seed_fg
        kernel = torch.ones((1, 1, 3, 3), dtype=logits.dtype, device=logits.device)
        kernel[0, 0, 1, 1] = 0

        def has_neighbour(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x.to(logits.dtype)[:, None], kernel, padding=1)[:, 0] > 0

        target_fg = fg & has_neighbour(fg)
        target_bg = bg & has_neighbour(bg)  # disjoint from target_fg: fg excludes background seeds, bg foreground ones
    if not target_fg.any() or not target_bg.any():
        return logits.sum() * 0
    bce_fg = F.binary_cross_entropy_with_logits(logits[target_fg], torch.ones_like(logits[target_fg]))
    bce_bg = F.binary_cross_entropy_with_logits(logits[target_bg], torch.zeros_like(logits[target_bg]))
    return (bce_fg + bce_bg) / 2
