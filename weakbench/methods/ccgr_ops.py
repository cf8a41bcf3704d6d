"""CCGR as small pure functions (Zhang, Zeng, Xu & Lin, "Center-context-gap Refinement for Weakly
Supervised Instance Segmentation", AAAI 2020; ``shared/papers/004_*``).

CCGR trains three branches in turn from image-level labels: a MIL branch (WSDDN) picks, for each
*bag* of box proposals, the box most likely to be the bag's instance; a semantic segmentation (SS)
branch gives per-class score maps; **centre-context-gap refinement** then moves each picked box by
gradient descent so that the mean score inside it is high and the mean score in the ring around
it (the *context*) is low; the SS argmax cropped by the refined box is the pseudo instance mask
that trains a Mask R-CNN (the IS branch), whose detections seed the next round's bags. Round-1
bags come from PRM peaks of the classifier's CAMs. The pieces, one function each:

* :func:`summed_area_table`, :func:`box_integral` — the integral ∫∫ S of Eq. 2 over a fractional
  box, exact and differentiable in the box coordinates;
* :func:`context_boxes` — B̃, the box with the same centre and 1.5 × its width and height;
* :func:`ccgr_loss` — Eq. 2 (Φ, the mean score) and Eq. 3 (L = Φ(C) − Φ(B));
* :func:`refine_boxes` — the gradient descent on the box coordinates that minimises Eq. 3,
  stopping a box before it takes in a second peak of its class;
* :func:`find_peaks` — PRM peaks (Zhou et al. 2018) of a class response map;
* :func:`selective_search`, :func:`proposal_rank_scores` — proposals (selective search stands
  in for MCG) and an objectness proxy B_S;
* :func:`rank_proposals` — Eq. 4, R(B) = B_S − 0.1 · ⟨B, 1 − O⟩ / |B|;
* :func:`peak_bags` (round 1) and :func:`iou_bags` (later rounds) — the MIL bags;
* :func:`wsddn_bag_scores`, :func:`wsddn_loss` — the MIL branch's σ_cls ⊙ σ_det, φ_B and the
  per-bag cross-entropy (Bilen & Vedaldi 2016);
* :func:`pseudo_instance_mask` — the SS argmax of the box's class inside the refined box.

Frames: boxes are float ``(x0, y0, x1, y1)`` in pixels of the map they refer to, where pixel
``(row i, col j)`` covers ``[j, j + 1) × [i, i + 1)``, so a box ``(0, 0, W, H)`` is the whole map
and a pixel's centre is ``(j + 0.5, i + 0.5)``. Peaks are ``(y, x)``: integer ones are pixel
indices (their centre is what a box must contain), floating ones are points in the same
continuous frame as the boxes.

Choices where the paper is silent (each documented where it is made):

* Φ(C) is the mean over the context ring, (∫B̃ − ∫B) / (A_B̃ − A_B), as the paper defines
  A_C = A_B̃ − A_B; the paper's written Φ(C) = Φ(B̃) − Φ(B) is not a mean over C and is kept as
  ``form="literal"`` (:func:`ccgr_loss`);
* boxes and context boxes are clipped to the map: Φ is the mean over the *visible* part, a ring
  that lies entirely outside the map has Φ(C) = 0 (:func:`ccgr_loss`);
* refinement is Adam on the four coordinates with a step cosine-decayed to 0, in pixels or in
  box sides (the caller names the unit with the size; CCGR's default, 0.02 box sides, lives in
  ``CCGRConfig.refinement_step_size``), boxes projected back to valid boxes inside the map after
  each step (:func:`refine_boxes`; the experiments behind these choices are in docs/ccgr.md);
* "one instance per box": a box stops being refined before it contains a peak of its class that
  it did not contain at the start (:func:`refine_boxes`);
* peaks are regional maxima (one per connected plateau, its pixel nearest the plateau's
  centroid) rather than PRM's first-in-window rule (:func:`find_peaks`);
* a bag's proposals must contain no *other peak of the same class* (:func:`peak_bags`);
* B_S, absent from selective search, is ``1 − i / n`` by OpenCV's output order
  (:func:`proposal_rank_scores`); Eq. 4's background mean is the exact box integral
  (:func:`rank_proposals`);
* selective search is made deterministic by seeding the C library's ``rand`` that OpenCV's
  ranking draws from (:func:`selective_search`).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from weakbench.core.boxes import iou_xyxy

__all__ = [
    "BACKGROUND_WEIGHT",
    "CONTEXT_SCALE",
    "contrast_objectness",
    "DEFAULT_STEPS",
    "MIN_BOX_SIZE",
    "TOP_K",
    "best_iou_with_gt",
    "box_area_in_map",
    "box_integral",
    "ccgr_loss",
    "context_boxes",
    "find_peaks",
    "iou_bags",
    "peak_bags",
    "proposal_rank_scores",
    "pseudo_instance_mask",
    "rank_proposals",
    "refine_boxes",
    "selective_search",
    "summed_area_table",
    "wsddn_bag_scores",
    "wsddn_loss",
]

# ---------------------------------------------------------------- defaults (one place each)
CONTEXT_SCALE: float = 1.5  #: B̃ is 1.5 × B's width and height (paper, "Center-context-gap refinement")
DEFAULT_STEPS: int = 200  #: refinement steps (the paper gives none; see :func:`refine_boxes`)
MIN_BOX_SIZE: float = 2.0  #: smallest width / height, pixels, a refined box may take
BACKGROUND_WEIGHT: float = 0.1  #: the 0.1 of Eq. 4
TOP_K: int = 10  #: proposals per bag (paper: "the first 10 top-ranked proposals", "the top 10 proposals")
_AREA_EPS = 1e-6  # pixel²: areas at or below this count as empty (Φ := 0)
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8

Form = Literal["area_weighted", "literal"]


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> torch.Tensor:
    if not torch.is_tensor(boxes) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if hasattr(boxes, "shape") else type(boxes).__name__
        raise ValueError(f"ccgr_ops: {name} must be a (K, 4) tensor of x0, y0, x1, y1; got {shape}")
    return boxes


# ------------------------------------------------------------------- Eq. 2: the box integral
def summed_area_table(S: torch.Tensor) -> torch.Tensor:
    """Zero-padded summed-area table of a map (the integral image behind Eq. 2).

    Args:
        S: ``(H, W)`` or ``(K, H, W)`` real map (any values; integers are promoted to float32).

    Returns:
        ``(…, H + 1, W + 1)`` in S's floating dtype, ``sat[..., i, j] = S[..., :i, :j].sum()``
        (so row 0 and column 0 are 0 and ``sat[..., H, W]`` is the total). Differentiable in S.
        Float32 sums of a 224 × 224 map of probabilities carry absolute errors of ~1e-3; pass
        float64 where small boxes or thin rings matter (:func:`refine_boxes` does).

    Raises:
        ValueError: S is not 2- or 3-dimensional, or has an empty side.
    """
    if not torch.is_tensor(S) or S.dim() not in (2, 3) or S.shape[-1] == 0 or S.shape[-2] == 0:
        shape = tuple(S.shape) if hasattr(S, "shape") else type(S).__name__
        raise ValueError(f"ccgr_ops.summed_area_table: S must be a non-empty (H, W) or (K, H, W) map; got {shape}")
    if not S.is_floating_point():
        S = S.to(torch.float32)
    return F.pad(S.cumsum(-1).cumsum(-2), (1, 0, 1, 0))


def _sat_integrals(sat: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """∫ over ``boxes (K, M, 4)`` of the map of ``sat`` (``(H+1, W+1)`` shared or ``(K, H+1, W+1)``
    one per row of boxes) → ``(K, M)``. One gather for all 16 SAT samples of each box."""
    hp1, wp1 = sat.shape[-2], sat.shape[-1]
    h, w = hp1 - 1, wp1 - 1
    b = boxes.to(sat.dtype)
    xs = torch.stack([b[..., 0], b[..., 2]], -1).clamp(0, w)  # (K, M, 2): x0, x1
    ys = torch.stack([b[..., 1], b[..., 3]], -1).clamp(0, h)  # (K, M, 2): y0, y1
    j0 = xs.detach().floor().clamp(max=w - 1)
    i0 = ys.detach().floor().clamp(max=h - 1)
    fx, fy = xs - j0, ys - i0  # the bilinear weights carry the gradient
    j0, i0 = j0.long(), i0.long()
    base = i0[..., :, None] * wp1 + j0[..., None, :]  # (K, M, 2[y], 2[x])
    idx = torch.stack([base, base + 1, base + wp1, base + wp1 + 1], -1)  # (K, M, 2, 2, 4)
    if sat.dim() == 2:
        v = sat.reshape(-1)[idx]
    else:
        k = boxes.shape[0]
        v = sat.reshape(k, hp1 * wp1).gather(1, idx.reshape(k, math.prod(idx.shape[1:]))).reshape(idx.shape)
    fx, fy = fx[..., None, :], fy[..., :, None]
    corner = (1 - fy) * ((1 - fx) * v[..., 0] + fx * v[..., 1]) + fy * ((1 - fx) * v[..., 2] + fx * v[..., 3])
    return corner[..., 1, 1] - corner[..., 1, 0] - corner[..., 0, 1] + corner[..., 0, 0]


def box_integral(sat: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Exact integral of a piecewise-constant map over fractional boxes (numerator of Eq. 2).

    The SAT, read as the function F(x, y) = ∫₀ʸ∫₀ˣ S, is bilinear inside each pixel cell, so
    bilinear interpolation of the SAT at the four corners gives the exact integral
    ``F(x1, y1) − F(x0, y1) − F(x1, y0) + F(x0, y0)`` for any real box. Corners are clamped to
    ``[0, W] × [0, H]``: the integral is over the part of the box inside the map.

    Args:
        sat: :func:`summed_area_table` output, ``(H + 1, W + 1)`` (one map for all boxes) or
            ``(K, H + 1, W + 1)`` (map k for box k).
        boxes: ``(K, 4)`` float ``x0, y0, x1, y1`` pixels (``x1 < x0`` gives a signed result).

    Returns:
        ``(K,)`` in sat's dtype, in units of S × pixel². Differentiable in the box coordinates
        (the derivative in x1 is the integral of S along the box's right edge; it is piecewise
        constant in the coordinate, undefined exactly on pixel boundaries, and 0 for a corner
        clamped to the map's border) and in S through the SAT.

    Raises:
        ValueError: boxes not ``(K, 4)``, sat not 2-/3-dimensional, or a per-box sat whose first
        dimension is not K.
    """
    _check_boxes(boxes)
    if not torch.is_tensor(sat) or sat.dim() not in (2, 3) or sat.shape[-1] < 2 or sat.shape[-2] < 2:
        raise ValueError(f"ccgr_ops.box_integral: sat must be (H+1, W+1) or (K, H+1, W+1) from summed_area_table; "
                         f"got {tuple(sat.shape)}")
    if sat.dim() == 3 and sat.shape[0] != boxes.shape[0]:
        raise ValueError(f"ccgr_ops.box_integral: {sat.shape[0]} maps for {boxes.shape[0]} boxes; pass one map per box "
                         f"or a single (H+1, W+1) table")
    return _sat_integrals(sat, boxes[:, None, :])[:, 0]


def box_area_in_map(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area (pixels², ≥ 0) of the part of each box ``(…, 4)`` inside ``[0, width] × [0, height]``;
    shape ``(…)``, differentiable in the coordinates."""
    w = (boxes[..., 2].clamp(0, width) - boxes[..., 0].clamp(0, width)).clamp(min=0)
    h = (boxes[..., 3].clamp(0, height) - boxes[..., 1].clamp(0, height)).clamp(min=0)
    return w * h


# --------------------------------------------------------------------- Eq. 3: the CCGR loss
def context_boxes(boxes: torch.Tensor, scale: float = CONTEXT_SCALE) -> torch.Tensor:
    """B̃: same centre as each box, ``scale`` × its width and height (paper: 1.5).

    Args:
        boxes: ``(K, 4)`` float ``x0, y0, x1, y1`` pixels (or ``(…, 4)``).
        scale: ≥ 1 (1 gives B̃ = B, an empty context).

    Returns:
        ``(…, 4)`` like ``boxes``, not clipped to any map (clipping is the caller's choice; see
        :func:`ccgr_loss`). Differentiable.

    Raises:
        ValueError: ``scale < 1`` or the last dimension is not 4.
    """
    if not torch.is_tensor(boxes) or boxes.shape[-1] != 4:
        raise ValueError(f"ccgr_ops.context_boxes: boxes must be (K, 4); got {tuple(getattr(boxes, 'shape', ()))}")
    if not float(scale) >= 1.0:
        raise ValueError(f"ccgr_ops.context_boxes: scale {scale} < 1 would make the context box smaller than the box; "
                         f"use a scale ≥ 1 (paper: 1.5)")
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) * (float(scale) / 2)
    return torch.cat([centre - half, centre + half], -1)


def _ccgr_loss(sat: torch.Tensor, boxes: torch.Tensor, context_scale: float, form: str) -> torch.Tensor:
    h, w = sat.shape[-2] - 1, sat.shape[-1] - 1
    both = torch.stack([boxes.to(sat.dtype), context_boxes(boxes.to(sat.dtype), context_scale)], 1)  # (K, 2, 4)
    integral = _sat_integrals(sat, both)
    area = box_area_in_map(both, h, w)
    ib, ic, ab, ac = integral[:, 0], integral[:, 1], area[:, 0], area[:, 1]
    zero = torch.zeros_like(ib)
    phi_b = torch.where(ab > _AREA_EPS, ib / ab.clamp(min=_AREA_EPS), zero)
    if form == "area_weighted":
        ring = ac - ab
        phi_c = torch.where(ring > _AREA_EPS, (ic - ib) / ring.clamp(min=_AREA_EPS), zero)
    else:
        phi_c = torch.where(ac > _AREA_EPS, ic / ac.clamp(min=_AREA_EPS), zero) - phi_b
    return phi_c - phi_b


def _check_form(form: str, context_scale: float, where: str) -> None:
    if form not in ("area_weighted", "literal"):
        raise ValueError(f"ccgr_ops.{where}: form {form!r} unknown; use 'area_weighted' (the mean over the context "
                         f"ring, default) or 'literal' (the paper's written Φ(B̃) − Φ(B))")
    if not float(context_scale) > 1.0:
        raise ValueError(f"ccgr_ops.{where}: context_scale {context_scale} must be > 1 (paper: 1.5); at 1 the context "
                         f"ring is empty")


def ccgr_loss(sat: torch.Tensor, boxes: torch.Tensor, context_scale: float = CONTEXT_SCALE,
              form: Form = "area_weighted") -> torch.Tensor:
    """Per-box CCGR loss, Eq. 3: L = Φ(C) − Φ(B), with Φ the mean score of Eq. 2.

    Φ(B) = ∫_B S / A_B. The context C = B̃ − B is the ring between the box and its context box
    (:func:`context_boxes`, ``context_scale`` × the box). Two readings of Φ(C):

    * ``"area_weighted"`` (default): Φ(C) = (∫_B̃ S − ∫_B S) / (A_B̃ − A_B), the mean score over
      the ring, with the paper's own A_C = A_B̃ − A_B. This is what the text describes ("the
      average segmentation score of C").
    * ``"literal"``: Φ(C) = Φ(B̃) − Φ(B), the formula as printed. It is a difference of two
      means, not a mean over C (it is negative whenever the box is denser than its context box,
      and L = Φ(B̃) − 2Φ(B) rewards the box twice), so it is kept only as an option (it refines
      boxes worse on synthetic maps: docs/ccgr.md, "The refinement's update rule and form").

    Off-map parts: boxes and context boxes are clipped to ``[0, W] × [0, H]`` — integrals
    (:func:`box_integral`) and areas (:func:`box_area_in_map`) alike — so each Φ is the mean over
    the *visible* pixels of its region; a region with no visible area (≤ 1e-6 px²; e.g. the
    ring of a box that covers the whole map) has Φ := 0, which keeps L finite.

    Hand values (10 × 10 zeros, ones on rows and columns 2..5): box ``[2, 2, 6, 6]`` → −1
    (area-weighted; literal 16/36 − 1 − 1); box ``[3, 3, 5, 5]`` → 0 (its ring lies in the ones).

    Args:
        sat: ``(H + 1, W + 1)`` shared or ``(K, H + 1, W + 1)`` per-box SAT of the score map
            (:func:`summed_area_table`), scores usually probabilities in ``[0, 1]``.
        boxes: ``(K, 4)`` float ``x0, y0, x1, y1`` pixels.
        context_scale: > 1 (paper: 1.5).
        form: ``"area_weighted"`` or ``"literal"``.

    Returns:
        ``(K,)`` in sat's dtype; for scores in [0, 1], in ``[−1, 1]`` (area-weighted) or
        ``[−2, 1]`` (literal). Lower is better. Differentiable in the box coordinates and S.

    Raises:
        ValueError: bad shapes (see :func:`box_integral`), an unknown ``form`` or
        ``context_scale ≤ 1``.
    """
    _check_form(form, context_scale, "ccgr_loss")
    _check_boxes(boxes)
    if not torch.is_tensor(sat) or sat.dim() not in (2, 3) or sat.shape[-1] < 2 or sat.shape[-2] < 2:
        raise ValueError(f"ccgr_ops.ccgr_loss: sat must be (H+1, W+1) or (K, H+1, W+1); got {tuple(sat.shape)}")
    if sat.dim() == 3 and sat.shape[0] != boxes.shape[0]:
        raise ValueError(f"ccgr_ops.ccgr_loss: {sat.shape[0]} maps for {boxes.shape[0]} boxes")
    return _ccgr_loss(sat, boxes, context_scale, form)


# ----------------------------------------------------------------------- the refinement
def _project(b: torch.Tensor, height: int, width: int, min_size: float) -> torch.Tensor:
    """Valid boxes inside the map: ``0 ≤ x0 ≤ W − m``, ``x0 + m ≤ x1 ≤ W`` (same for y)."""
    x0 = b[:, 0].clamp(0, width - min_size)
    y0 = b[:, 1].clamp(0, height - min_size)
    x1 = torch.maximum(b[:, 2], x0 + min_size).clamp(max=width)
    y1 = torch.maximum(b[:, 3], y0 + min_size).clamp(max=height)
    return torch.stack([x0, y0, x1, y1], 1)


def _peak_points(peaks: torch.Tensor) -> torch.Tensor:
    """``(P, 2)`` (y, x) → ``(P, 2)`` float64 points (x, y) in the box frame: integer peaks are
    pixel indices (their centre, +0.5), floating ones are points already."""
    p = torch.as_tensor(peaks).reshape(-1, 2)
    pts = p.flip(1).to(torch.float64)
    if not p.is_floating_point():
        pts = pts + 0.5
    return pts


def _contains(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``boxes (..., 4)`` × ``points (..., P, 2)`` (x, y) → ``(..., P)``: point in ``[x0, x1) × [y0, y1)``."""
    b = boxes[..., None, :]
    return (points[..., 0] >= b[..., 0]) & (points[..., 0] < b[..., 2]) & (points[..., 1] >= b[..., 1]) \
        & (points[..., 1] < b[..., 3])


def refine_boxes(
    score_maps: torch.Tensor,
    boxes: torch.Tensor,
    *,
    step_size: float,
    step_unit: Literal["pixel", "box"],
    steps: int = DEFAULT_STEPS,
    context_scale: float = CONTEXT_SCALE,
    form: Form = "area_weighted",
    peaks: Sequence[torch.Tensor | None] | None = None,
    min_size: float = MIN_BOX_SIZE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CCGR box refinement: gradient descent on each box's four coordinates minimising Eq. 3.

    The paper says only that Eq. 3 is differentiable so "the bounding box coordinates can be
    optimized with gradient descent". The update used here is **Adam** (β = 0.9, 0.999,
    ε = 1e-8, bias-corrected) on ``(x0, y0, x1, y1)`` with a **step size** that decays from
    ``step_size`` to 0 by a half cosine over ``steps``, in the unit ``step_unit`` names: pixels,
    or box sides (a fraction of the input box's width for x0, x1 and of its height for y0, y1).
    Adam normalises each coordinate's gradient, so the first step moves every coordinate with a
    non-zero gradient by exactly one ``step_size`` and later steps by at most about one,
    whatever the map's contrast or the box's size (the raw gradient scales as 1 / box side), and
    the decay lets the box settle on an edge instead of oscillating across it. A coordinate can
    travel up to ≈ (2/π) · steps · step_size units (CCGR's default, 200 steps of 0.02 box
    sides: ≈ 2.5 box sides). The function has no default step: the caller states the size
    with its unit (CCGR's is ``CCGRConfig.refinement_step_size`` / ``refinement_step_unit``).

    Adam with the cosine decay was chosen against a constant step, a per-box normalised gradient
    and sign descent on synthetic blurred, hard and noisy maps: it was the best or close to it
    in every setting (docs/ccgr.md, "The refinement's update rule and form").

    Boxes stay valid after every step: they are projected to ``0 ≤ x0``, ``x0 + min_size ≤ x1
    ≤ W`` (same for y). Where S is flat over the box, its context and their edges (e.g. a box
    and its whole ring inside a uniform region), the gradient is 0 and the box does not move.

    **One instance per box** (paper: "proposals containing only this peak"): with ``peaks``, a
    box whose update would make it contain one of its peaks stops being refined and keeps its
    last coordinates for the remaining steps. Peaks the input box already contains are ignored
    (it could not move at all otherwise; it may still shrink and let them go). Which peaks count as another
    instance is the caller's choice (CCGR: ``ccgr.stopping_peaks``, by SS region).

    The computation runs in float64 on score_maps' device with gradients enabled (also inside
    ``torch.no_grad()``); nothing is kept for the graph of the caller.

    Args:
        score_maps: ``(K, H, W)`` semantic score of each box's class (probability in [0, 1]).
        boxes: ``(K, 4)`` float ``x0, y0, x1, y1`` pixels of the map, with ``x1 > x0``, ``y1 > y0``.
        steps: number of updates (≥ 0; 0 returns the input unchanged).
        step_size: > 0, in ``step_unit``: the largest move of a coordinate in the first step.
        step_unit: ``"pixel"``: ``step_size`` is in pixels of the map; ``"box"``: a fraction of
            the input box's own width (x0, x1) and height (y0, y1), so a refinement behaves alike
            on a 30 px object in a 96 px image and on a 300 px one in a 640 px image.
        context_scale, form: as :func:`ccgr_loss`.
        peaks: ``None``, or a sequence of K entries, each ``None`` or a ``(P_k, 2)`` tensor of the
            ``(y, x)`` peaks of box k's class in its image **other than the box's own peak**
            (integer pixel indices, tested by their centre, or float points; see the module's
            frames).
        min_size: the smallest width and height, pixels (``min_size ≤ H, W``).

    Returns:
        ``(refined, info)``: refined ``(K, 4)`` in boxes' dtype and device; info with
        ``"loss_before"``, ``"loss_after"`` float64 ``(K,)`` (Eq. 3 of the input and refined
        boxes), ``"steps"`` int64 ``(K,)`` updates applied to each box, ``"stopped_by_peak"`` bool
        ``(K,)``.

    Raises:
        ValueError: shapes disagree, non-finite or empty boxes, ``steps < 0``, ``step_size ≤ 0``,
        a ``step_unit`` other than ``"pixel"`` / ``"box"``,
        ``min_size`` not in ``(0, min(H, W)]``, a ``peaks`` list of the wrong length, or the
        errors of :func:`ccgr_loss`.
    """
    _check_form(form, context_scale, "refine_boxes")
    _check_boxes(boxes)
    if not torch.is_tensor(score_maps) or score_maps.dim() != 3 or score_maps.shape[0] != boxes.shape[0]:
        raise ValueError(f"ccgr_ops.refine_boxes: score_maps must be (K, H, W) with K = {boxes.shape[0]} boxes; "
                         f"got {tuple(getattr(score_maps, 'shape', ()))}")
    k, h, w = score_maps.shape
    if int(steps) < 0 or not float(step_size) > 0:
        raise ValueError(f"ccgr_ops.refine_boxes: steps {steps} must be ≥ 0 and step_size {step_size} > 0 "
                         f"({step_unit}s)")
    if not 0 < float(min_size) <= min(h, w):
        raise ValueError(f"ccgr_ops.refine_boxes: min_size {min_size} must be in (0, {min(h, w)}] for {h} × {w} maps")
    if peaks is not None and len(peaks) != k:
        raise ValueError(f"ccgr_ops.refine_boxes: peaks has {len(peaks)} entries for {k} boxes; give one (P, 2) "
                         f"tensor (or None) per box")
    if k and (not torch.isfinite(boxes).all() or ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
        raise ValueError("ccgr_ops.refine_boxes: boxes must be finite with x1 > x0 and y1 > y0")
    device = score_maps.device
    with torch.enable_grad():
        sat = summed_area_table(score_maps.detach().to(torch.float64))
        b = boxes.detach().to(device=device, dtype=torch.float64).clone()
        with torch.no_grad():
            before = _ccgr_loss(sat, b, context_scale, form)
        taken = torch.zeros(k, dtype=torch.int64, device=device)
        stopped = torch.zeros(k, dtype=torch.bool, device=device)
        pts = pmask = None
        if peaks is not None and k:
            lists = [_peak_points(p) if p is not None else torch.zeros(0, 2, dtype=torch.float64) for p in peaks]
            n = max(len(p) for p in lists)
            if n:
                pts = torch.zeros(k, n, 2, dtype=torch.float64)
                pmask = torch.zeros(k, n, dtype=torch.bool)
                for i, p in enumerate(lists):
                    pts[i, :len(p)] = p
                    pmask[i, :len(p)] = True
                pts, pmask = pts.to(device), pmask.to(device)
                pmask &= ~_contains(b, pts)  # peaks the input box holds already are ignored
        if step_unit not in ("pixel", "box"):
            raise ValueError(f"ccgr_ops.refine_boxes: step_unit {step_unit!r} must be 'pixel' or 'box'")
        if step_unit == "box":
            wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)  # (K, 4): w, h, w, h
            unit = torch.stack([wh[:, 0], wh[:, 1], wh[:, 0], wh[:, 1]], dim=1)
        else:
            unit = torch.ones_like(b)
        m = torch.zeros_like(b)
        v = torch.zeros_like(b)
        b1, b2 = _ADAM_BETAS
        for t in range(1, int(steps) + 1 if k else 1):
            active = ~stopped
            if not active.any():
                break
            x = b.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_ccgr_loss(sat, x, context_scale, form).sum(), x)
            with torch.no_grad():
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                lr = float(step_size) * 0.5 * (1 + math.cos(math.pi * (t - 1) / int(steps)))
                upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + _ADAM_EPS)
                cand = _project(b - lr * unit * upd, h, w, float(min_size))
                if pts is not None:
                    hit = (_contains(cand, pts) & pmask).any(1) & active
                    stopped |= hit
                    active &= ~hit
                b = torch.where(active[:, None], cand, b)
                taken += active.to(torch.int64)
        with torch.no_grad():
            after = _ccgr_loss(sat, b, context_scale, form)
    info = {"loss_before": before.detach(), "loss_after": after.detach(), "steps": taken, "stopped_by_peak": stopped}
    return b.to(dtype=boxes.dtype if boxes.is_floating_point() else torch.float32, device=boxes.device), info


# ----------------------------------------------------------------------------- PRM peaks
def find_peaks(cam: torch.Tensor) -> torch.Tensor:
    """PRM peaks (Zhou et al. 2018, "peak stimulation") of one class response map.

    A peak is a local maximum in a 3 × 3 window (max pooling with −∞ padding) whose value is at
    or above the map's median (``torch.median``: the lower middle value, as PRM's median
    filter). **Plateaus:** equal maxima that touch (8-connectivity) form one plateau, which
    gives **one peak** — its pixel nearest the plateau's centroid (ties: first in row-major
    order) — and only if the plateau is a regional maximum (no pixel next to it is higher).
    PRM's code instead keeps a pixel when it is the first maximum of its own window in scan
    order, which can give several peaks on one plateau and also fires on the shoulder of a
    slope (``[1, 1, 2]``: the left 1). A map whose maximum equals its median (e.g. a constant
    map) has no peaks.

    Args:
        cam: ``(H, W)`` real, finite response map (any scale; only the order matters).

    Returns:
        int64 ``(P, 2)`` ``(y, x)`` pixel indices on cam's device, by descending value (ties:
        row-major order).

    Raises:
        ValueError: cam is not 2-D or has non-finite values.
    """
    from scipy import ndimage

    if not torch.is_tensor(cam) or cam.dim() != 2 or cam.numel() == 0:
        raise ValueError(f"ccgr_ops.find_peaks: cam must be a non-empty (H, W) tensor; got "
                         f"{tuple(getattr(cam, 'shape', ()))}")
    c = cam.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all():
        raise ValueError("ccgr_ops.find_peaks: cam has NaN or infinite values")
    empty = torch.zeros((0, 2), dtype=torch.int64, device=cam.device)
    median = c.flatten().median()
    if c.max() <= median:
        return empty
    local_max = c >= F.max_pool2d(c[None, None], 3, stride=1, padding=1)[0, 0]
    a, lm = c.numpy(), local_max.numpy()
    # a plateau that reaches an equal pixel which is not a local maximum is not a regional maximum
    pa = np.pad(a, 1, constant_values=np.nan)
    plm = np.pad(lm, 1, constant_values=False)
    h, w = a.shape
    leaks = np.zeros_like(lm)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                nb = pa[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                nlm = plm[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                leaks |= lm & (nb == a) & ~nlm
    labels, n = ndimage.label(lm, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return empty
    lab = labels[lm] - 1
    ys, xs = np.nonzero(lm)  # row-major order
    bad = np.zeros(n, dtype=bool)
    bad[lab[leaks[lm]]] = True
    value = np.zeros(n)
    value[lab] = a[ys, xs]
    keep = ~bad & (value >= float(median))
    count = np.bincount(lab, minlength=n)
    cy = np.bincount(lab, weights=ys, minlength=n) / np.maximum(count, 1)
    cx = np.bincount(lab, weights=xs, minlength=n) / np.maximum(count, 1)
    d2 = (ys - cy[lab]) ** 2 + (xs - cx[lab]) ** 2
    order = np.lexsort((np.arange(len(lab)), d2, lab))  # by plateau, then distance, then row-major
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]  # one pixel per plateau
    first = first[keep[lab[first]]]
    if len(first) == 0:
        return empty
    yx = np.stack([ys[first], xs[first]], 1)
    rank = np.lexsort((yx[:, 1], yx[:, 0], -a[yx[:, 0], yx[:, 1]]))
    return torch.as_tensor(yx[rank], dtype=torch.int64, device=cam.device)


# ------------------------------------------------------------------ Eq. 4: proposal ranking
def proposal_rank_scores(n: int) -> torch.Tensor:
    """The objectness B_S of Eq. 4 for proposals that come without one: ``1 − i / n``.

    MCG scores its proposals; selective search does not. The i-th proposal (0-based) in the
    order :func:`selective_search` returns them scores ``1 − i / n`` (1 for the first, 1/n for
    the last). That order is OpenCV's: regions sorted by ``level × U(0, 1)``, lower first, with
    level 1 for the initial segments, so early proposals tend to be small regions (OpenCV
    inverts Uijlings et al.'s ranking); it is a weak prior. With Eq. 4's weight 0.1, the
    background term only reorders proposals within ``0.1 · n`` ranks of each other.

    Returns:
        float32 ``(n,)`` in ``(0, 1]``, strictly decreasing (empty for n = 0).

    Raises:
        ValueError: ``n < 0``.
    """
    if int(n) < 0:
        raise ValueError(f"ccgr_ops.proposal_rank_scores: n = {n} proposals must be ≥ 0")
    n = int(n)
    return 1.0 - torch.arange(n, dtype=torch.float32) / max(n, 1)


def contrast_objectness(foreground: torch.Tensor, boxes: torch.Tensor,
                        context_scale: float = CONTEXT_SCALE) -> torch.Tensor:
    """An objectness B_S for proposals that come without one (selective search): the centre-surround
    contrast of a foreground map, ``(1 + mean O in B − mean O in the ring B̃ \\ B) / 2``.

    MCG, the paper's proposal source, scores each proposal; OpenCV's selective search does not.
    A box that holds an object whole has high foreground inside and low foreground in the ring
    around it (B̃: :func:`context_boxes`, ``context_scale`` × its sides, as Eq. 3's context box),
    the centre-surround cue of classic objectness measures (Alexe et al. 2012). Means are exact
    integrals of the piecewise-constant map over the parts of B and of the ring inside the map
    (:func:`box_integral`); a ring with no area inside the map (a box over the whole map) has
    mean 0; a box with no area inside the map scores 0.

    Args:
        foreground: ``(H, W)`` float O in ``[0, 1]`` (e.g. the max over the image's labelled
            classes of the normalised CAMs).
        boxes: ``(N, 4)`` float ``x0, y0, x1, y1`` pixels of the map.
        context_scale: B̃'s scale, ≥ 1.

    Returns:
        float32 ``(N,)`` in ``[0, 1]`` (0.5: no contrast).

    Raises:
        ValueError: ``foreground`` is not 2-D, bad boxes, or ``context_scale < 1``.
    """
    _check_boxes(boxes)
    if not torch.is_tensor(foreground) or foreground.dim() != 2:
        raise ValueError(f"ccgr_ops.contrast_objectness: foreground must be an (H, W) map; got "
                         f"{tuple(getattr(foreground, 'shape', ()))}")
    h, w = foreground.shape
    sat = summed_area_table(foreground.detach().to(torch.float64))
    b = boxes.detach().to(device=sat.device, dtype=torch.float64)
    ctx = context_boxes(b, context_scale)
    a_in, a_ctx = box_area_in_map(b, h, w), box_area_in_map(ctx, h, w)
    s_in, s_ctx = box_integral(sat, b), box_integral(sat, ctx)
    a_ring = (a_ctx - a_in).clamp(min=0)
    mean_in = torch.where(a_in > _AREA_EPS, s_in / a_in.clamp(min=_AREA_EPS), torch.zeros_like(a_in))
    mean_ring = torch.where(a_ring > _AREA_EPS, (s_ctx - s_in) / a_ring.clamp(min=_AREA_EPS), torch.zeros_like(a_in))
    out = torch.where(a_in > _AREA_EPS, (1.0 + mean_in - mean_ring) / 2, torch.zeros_like(a_in))
    return out.clamp(0, 1).to(torch.float32)


def rank_proposals(scores: torch.Tensor, boxes: torch.Tensor, background: torch.Tensor,
                   background_weight: float = BACKGROUND_WEIGHT) -> torch.Tensor:
    """Eq. 4: R(B) = B_S − 0.1 × ⟨B, 1 − O⟩ / |B|, the score minus 0.1 × the mean background in B.

    The Frobenius product of the box's indicator with the background map over the box's area is
    computed as the exact integral of the (piecewise-constant) background over the box, divided
    by its area (:func:`box_integral`): for boxes on pixel edges this is the mean over the
    pixels the box covers, and fractional boxes weigh their border pixels by the covered
    fraction. Boxes are clipped to the map; a box with no area on the map gets mean background
    1 (the largest penalty).

    Args:
        scores: ``(N,)`` objectness B_S (e.g. :func:`proposal_rank_scores`).
        boxes: ``(N, 4)`` float ``x0, y0, x1, y1`` pixels of the background map.
        background: ``(H, W)`` ``1 − O`` in ``[0, 1]`` (O: the foreground / segmentation score).
        background_weight: the 0.1 of Eq. 4.

    Returns:
        float ``(N,)`` (scores' floating dtype, else float32): higher ranks first.

    Raises:
        ValueError: shapes disagree or background is not 2-D.
    """
    _check_boxes(boxes)
    scores = torch.as_tensor(scores)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"ccgr_ops.rank_proposals: {tuple(scores.shape)} scores for {boxes.shape[0]} boxes")
    if not torch.is_tensor(background) or background.dim() != 2:
        raise ValueError(f"ccgr_ops.rank_proposals: background must be an (H, W) map; got "
                         f"{tuple(getattr(background, 'shape', ()))}")
    h, w = background.shape
    sat = summed_area_table(background.detach().to(torch.float64))
    b = boxes.detach().to(device=sat.device, dtype=torch.float64)
    area = box_area_in_map(b, h, w)
    mean_bg = torch.where(area > _AREA_EPS, box_integral(sat, b) / area.clamp(min=_AREA_EPS), torch.ones_like(area))
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    return (scores.to(device=sat.device, dtype=torch.float64) - float(background_weight) * mean_bg).to(dtype)


# ------------------------------------------------------------------------------ the bags
def peak_bags(peak_yx: torch.Tensor, peak_classes: torch.Tensor, proposals: torch.Tensor, ranking: torch.Tensor,
              top_k: int = TOP_K) -> list[torch.Tensor]:
    """Round-1 MIL bags: for each peak, the ``top_k`` best-ranked proposals holding only that peak.

    Paper: "we take a peak as a bag and regard all MCG box proposals containing only this peak
    as its corresponding instances" and "collect the first 10 top-ranked proposals containing
    the peak" (ranked by Eq. 4, :func:`rank_proposals`). **"Only this peak" is read per class:**
    a proposal may hold peaks of other classes. Peaks come from per-class response maps and a
    bag is one instance of one class; objects of different classes overlap routinely (a rider
    on a horse, a person at a table), so excluding every other-class peak would drop the right
    box of such instances. A proposal contains a peak when the peak's point lies in
    ``[x0, x1) × [y0, y1)`` (integer peaks: their pixel centre; float peaks: the point).

    Args:
        peak_yx: ``(P, 2)`` ``(y, x)`` peaks in the proposals' frame (int64 pixel indices or float
            points, see the module's frames).
        peak_classes: ``(P,)`` int class of each peak.
        proposals: ``(N, 4)`` float ``x0, y0, x1, y1`` pixels.
        ranking: ``(N,)`` higher is better (:func:`rank_proposals`).
        top_k: bag size (paper: 10), ≥ 1.

    Returns:
        a list of P int64 tensors of proposal indices, best first (ties: lower index first),
        each of length ``≤ top_k``; **possibly empty** when no proposal holds that peak alone.
        What to do with an empty bag (skip it, or fall back to a small box around the peak) is
        the caller's business.

    Raises:
        ValueError: shapes disagree or ``top_k < 1``.
    """
    _check_boxes(proposals, "proposals")
    peak_yx = torch.as_tensor(peak_yx)
    peak_classes = torch.as_tensor(peak_classes).reshape(-1)
    if peak_yx.numel() == 0:
        return []
    if peak_yx.dim() != 2 or peak_yx.shape[1] != 2 or peak_classes.shape[0] != peak_yx.shape[0]:
        raise ValueError(f"ccgr_ops.peak_bags: peak_yx must be (P, 2) with P classes; got {tuple(peak_yx.shape)} and "
                         f"{tuple(peak_classes.shape)}")
    ranking = torch.as_tensor(ranking).reshape(-1)
    if ranking.shape[0] != proposals.shape[0]:
        raise ValueError(f"ccgr_ops.peak_bags: {ranking.shape[0]} ranking values for {proposals.shape[0]} proposals")
    if int(top_k) < 1:
        raise ValueError(f"ccgr_ops.peak_bags: top_k {top_k} must be ≥ 1")
    pts = _peak_points(peak_yx.cpu())
    props = proposals.detach().cpu().to(torch.float64)
    inside = _contains(props, pts).T  # (P, N)
    cls = peak_classes.cpu()
    other = (cls[:, None] == cls[None, :]) & ~torch.eye(len(cls), dtype=torch.bool)  # (P, P)
    holds_other = (other.to(torch.float64) @ inside.to(torch.float64)) > 0
    ok = inside & ~holds_other
    rank = ranking.detach().cpu().to(torch.float64)
    order = torch.sort(rank, descending=True, stable=True).indices
    out = []
    for p in range(len(pts)):
        sel = order[ok[p, order]]
        out.append(sel[:int(top_k)].to(torch.int64))
    return out


def iou_bags(boxes: torch.Tensor, proposals: torch.Tensor, top_k: int = TOP_K) -> list[torch.Tensor]:
    """Later-round MIL bags: for each box of the IS branch, the ``top_k`` proposals of highest IoU.

    Paper: "For a predicted box, we first compute the box overlap ratio between it and all MCG
    box proposals, and select the top 10 proposals with the highest overlap ratios" — no IoU
    floor, so a bag can hold proposals of IoU 0 when few overlap. IoU of the *xyxy* convention
    (:func:`weakbench.core.boxes.iou_xyxy`).

    Args:
        boxes: ``(K, 4)``, proposals: ``(N, 4)`` float ``x0, y0, x1, y1`` pixels, same frame.
        top_k: bag size (paper: 10), ≥ 1.

    Returns:
        a list of K int64 tensors of ``min(top_k, N)`` proposal indices, highest IoU first (ties:
        lower index first).

    Raises:
        ValueError: shapes or ``top_k < 1``.
    """
    _check_boxes(boxes)
    _check_boxes(proposals, "proposals")
    if int(top_k) < 1:
        raise ValueError(f"ccgr_ops.iou_bags: top_k {top_k} must be ≥ 1")
    if boxes.shape[0] == 0:
        return []
    if proposals.shape[0] == 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in range(boxes.shape[0])]
    iou = iou_xyxy(boxes.detach().cpu().to(torch.float64), proposals.detach().cpu().to(torch.float64))
    order = torch.sort(iou, dim=1, descending=True, stable=True).indices[:, :int(top_k)]
    return list(order.to(torch.int64))


# ---------------------------------------------------------------------------- the MIL branch
def wsddn_bag_scores(x_cls: torch.Tensor, x_det: torch.Tensor) -> torch.Tensor:
    """WSDDN bag scores (Bilen & Vedaldi 2016; CCGR's MIL branch): φ_B = Σ_r σ_cls ⊙ σ_det.

    σ_cls is the softmax of x_cls over classes (the paper's "along columns"), σ_det the softmax
    of x_det over the bag's proposals ("along rows"); x^B = σ_cls ⊙ σ_det; φ_B sums x^B over the
    proposals. Hand value: x_cls = [[0, ln 3], [0, 0]], x_det = [[0, ln 3], [ln 3, 0]] give
    φ = (0.6875, 0.4375).

    Args:
        x_cls, x_det: ``(C, R)`` logits (classes × proposals, the paper's layout) or
            ``(B, C, R)`` for B bags of the same size R (bags of different sizes: call per bag).

    Returns:
        ``(C,)`` or ``(B, C)`` in ``[0, 1]`` (each φ(c) is a convex combination of the
        proposals' class probabilities), differentiable.

    Raises:
        ValueError: shapes differ, are not 2-/3-D, or a bag has no proposal or no class.
    """
    if not (torch.is_tensor(x_cls) and torch.is_tensor(x_det)) or x_cls.shape != x_det.shape \
            or x_cls.dim() not in (2, 3):
        raise ValueError(f"ccgr_ops.wsddn_bag_scores: x_cls and x_det must both be (C, R) or (B, C, R); got "
                         f"{tuple(getattr(x_cls, 'shape', ()))} and {tuple(getattr(x_det, 'shape', ()))}")
    if x_cls.shape[-1] == 0 or x_cls.shape[-2] == 0:
        raise ValueError(f"ccgr_ops.wsddn_bag_scores: a bag needs ≥ 1 class and ≥ 1 proposal; got "
                         f"{tuple(x_cls.shape)}")
    return (x_cls.softmax(-2) * x_det.softmax(-1)).sum(-1)


def wsddn_loss(phi: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The MIL branch's per-bag loss: −Σ_c [L_B(c) log φ_B(c) + (1 − L_B(c)) log(1 − φ_B(c))].

    The paper's binary cross-entropy summed over classes (it calls it "the standard multi-class
    cross entropy"); L_MIL is the sum over bags (the caller sums or averages). φ is clamped to
    ``[eps, 1 − eps]`` first, so the loss is finite (at most ``C · −log eps``) and has zero
    gradient where φ is clamped.

    Args:
        phi: ``(C,)`` or ``(B, C)`` bag scores in [0, 1] (:func:`wsddn_bag_scores`).
        labels: same shape, in ``[0, 1]`` (CCGR: the one-hot class of the bag's peak or box).
        eps: clamp margin, in (0, 0.5).

    Returns:
        a 0-d tensor for ``(C,)`` input, ``(B,)`` for ``(B, C)``.

    Raises:
        ValueError: shapes differ or eps out of range.
    """
    labels = torch.as_tensor(labels, dtype=phi.dtype, device=phi.device)
    if phi.shape != labels.shape or phi.dim() not in (1, 2):
        raise ValueError(f"ccgr_ops.wsddn_loss: phi {tuple(phi.shape)} and labels {tuple(labels.shape)} must be the "
                         f"same (C,) or (B, C) shape")
    if not 0 < float(eps) < 0.5:
        raise ValueError(f"ccgr_ops.wsddn_loss: eps {eps} must be in (0, 0.5)")
    p = phi.clamp(float(eps), 1 - float(eps))
    return -(labels * p.log() + (1 - labels) * (1 - p).log()).sum(-1)


# ---------------------------------------------------------------------------- proposals
_LIBC = None


def _seed_c_rand(seed: int) -> bool:
    """``srand(seed)`` of the process's C library; False where it cannot be reached."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None)
        _LIBC.srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
        return True
    except (OSError, AttributeError):
        return False


def selective_search(image_uint8: np.ndarray, *, mode: Literal["fast", "quality"] = "fast", max_proposals: int = 2000,
                     min_size: float = 4.0, seed: int | None = 0) -> torch.Tensor:
    """Selective search proposals (Uijlings et al. 2013) with OpenCV's ``cv2.ximgproc``.

    CCGR uses MCG, which is not available here; selective search is the stand-in.
    ``mode="fast"`` is ``switchToSelectiveSearchFast`` (HSV and Lab, k = 150, 300, 450, two
    strategies), ``"quality"`` is ``switchToSelectiveSearchQuality`` (five colour spaces, five
    k, four strategies). OpenCV's boxes ``(x, y, w, h)`` in integer pixels become
    ``(x, y, x + w, y + h)`` (the pixels ``x … x + w − 1`` covered); exact duplicates are
    removed (first kept), boxes with a side below ``min_size`` dropped, and the first
    ``max_proposals`` kept, in the order OpenCV returns them (see
    :func:`proposal_rank_scores`).

    **Determinism:** OpenCV orders its regions by ``level × rand() / RAND_MAX`` with the C
    library's ``rand`` (not ``cv::RNG``: ``cv2.setRNGSeed`` and ``cv2.setNumThreads`` have no
    effect), so the *set* of boxes is fixed but their order changes from call to call. With
    ``seed`` (default 0) the C library's ``srand(seed)`` is called right before the search,
    which makes the output identical across calls and processes (checked on Linux/glibc, where
    srand(0) ≡ srand(1)). This reseeds the process-wide C ``rand`` (a side effect), and another
    thread calling ``rand`` during the search would break the determinism. ``seed=None`` leaves
    the C RNG alone.

    Cost grows faster than the pixel count (timings in docs/ccgr.md); downscale large images
    first.

    Args:
        image_uint8: ``(H, W, 3)`` RGB (converted to OpenCV's BGR here) or ``(H, W)`` grey uint8.
        mode: ``"fast"`` or ``"quality"``.
        max_proposals: ≥ 1, cap on the returned boxes.
        min_size: pixels; boxes narrower or lower than this are dropped.
        seed: the C ``srand`` seed, or None (see above).

    Returns:
        float32 ``(N, 4)`` ``x0, y0, x1, y1`` pixels, ``0 ≤ x0 < x1 ≤ W``, ``0 ≤ y0 < y1 ≤ H``.

    Raises:
        ValueError: not a uint8 ``(H, W, 3)`` / ``(H, W)`` array, unknown mode, ``max_proposals < 1``.
    """
    import cv2

    img = np.asarray(image_uint8)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or min(img.shape[:2]) < 1:
        raise ValueError(f"ccgr_ops.selective_search: expected a uint8 (H, W, 3) RGB or (H, W) image; got {img.dtype} "
                         f"{img.shape}")
    if mode not in ("fast", "quality"):
        raise ValueError(f"ccgr_ops.selective_search: mode {mode!r} unknown; use 'fast' or 'quality'")
    if int(max_proposals) < 1:
        raise ValueError(f"ccgr_ops.selective_search: max_proposals {max_proposals} must be ≥ 1")
    bgr = np.ascontiguousarray(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., ::-1])
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    if seed is not None:
        _seed_c_rand(seed)
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    keep = ((boxes[:, 2] - boxes[:, 0]) >= float(min_size)) & ((boxes[:, 3] - boxes[:, 1]) >= float(min_size))
    boxes = boxes[keep][:int(max_proposals)]
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)


# ---------------------------------------------------------------------------- pseudo labels
def pseudo_instance_mask(label_map, cls: int, box) -> np.ndarray | torch.Tensor:
    """CCGR's pseudo instance label: the pixels of the box's class in the semantic argmax, in the box.

    Paper: "we directly crop the segmentation map with the refined boxes as the pseudo instance
    labels". A pixel ``(i, j)`` is in the mask when ``label_map[i, j] == cls`` and its centre
    ``(j + 0.5, i + 0.5)`` lies in ``[x0, x1) × [y0, y1)``.

    Args:
        label_map: ``(H, W)`` integer argmax of the SS branch (numpy array or torch tensor), in
            whatever class coding the caller uses (e.g. 0 = background, c + 1 = class c).
        cls: the box's class in that coding.
        box: 4 floats ``x0, y0, x1, y1`` pixels of the label map (tensor, array or sequence).

    Returns:
        bool ``(H, W)`` of the input's kind: a numpy array for a numpy label map, a tensor on the
        label map's device for a tensor.

    Raises:
        ValueError: label_map is not 2-D or box has not 4 values.
    """
    is_tensor = torch.is_tensor(label_map)
    lm = label_map if is_tensor else torch.as_tensor(np.asarray(label_map))
    if lm.dim() != 2:
        raise ValueError(f"ccgr_ops.pseudo_instance_mask: label_map must be (H, W); got {tuple(lm.shape)}")
    b = torch.as_tensor(box.tolist() if hasattr(box, "tolist") else box, dtype=torch.float64).reshape(-1)
    if b.numel() != 4:
        raise ValueError(f"ccgr_ops.pseudo_instance_mask: box must be x0, y0, x1, y1; got {b.numel()} values")
    x0, y0, x1, y1 = b.tolist()
    h, w = lm.shape
    # pixel centres j + 0.5 in [x0, x1)  ⇔  ceil(x0 − 0.5) ≤ j < ceil(x1 − 0.5)
    j0, j1 = (min(max(math.ceil(v - 0.5), 0), w) for v in (x0, x1))
    i0, i1 = (min(max(math.ceil(v - 0.5), 0), h) for v in (y0, y1))
    inside = torch.zeros((h, w), dtype=torch.bool, device=lm.device)
    inside[i0:i1, j0:j1] = True
    mask = inside & (lm == int(cls))
    return mask if is_tensor else mask.cpu().numpy()


def best_iou_with_gt(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """For each box ``(K, 4)``, its highest IoU with any of ``gt_boxes (G, 4)`` (0 when G = 0);
    float ``(K,)``, IoU of the *xyxy* convention (:func:`weakbench.core.boxes.iou_xyxy`)."""
    _check_boxes(boxes)
    _check_boxes(gt_boxes, "gt_boxes")
    if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.float32)
    return iou_xyxy(boxes.float(), gt_boxes.float().to(boxes.device)).amax(1)
