"""WSOL metrics of Choe et al., "Evaluating Weakly Supervised Object Localization Methods
Right" (CVPR 2020): MaxBoxAcc, MaxBoxAccV2, PxAP and top-1 / top-5 localisation.

Numbers equal those of the reference implementation (clovaai/wsolevaluation) count for count,
but every threshold of a map is evaluated at once instead of tracing OpenCV contours once per
threshold. The protocol (DESIGN.md, "Evaluation protocol"):

* a map ``m`` (float, already min-max normalised and in the evaluation frame) becomes bytes
  ``b = uint8(m * 255)`` (computed in the map's own float dtype, truncated);
* at threshold ``τ`` a pixel is foreground when ``b > int(τ · max(b))`` (OpenCV's strict
  ``THRESH_BINARY``);
* boxes come from ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``: the outer contour of
  each 8-connected foreground component and the inner contour of each hole (a bounded
  4-connected background component); ``boundingRect`` ``(x, y, w, h)`` gives
  ``[x, y, min(x + w, W − 1), min(y + h, H − 1)]``; no foreground gives ``[0, 0, 0, 0]``;
* MaxBoxAcc keeps only the contour of largest ``cv2.contourArea`` (ties: the first contour
  in OpenCV's order); MaxBoxAccV2 keeps all contours;
* an image is correct at ``τ`` when the best IoU over its boxes and its GT boxes (the
  *inclusive* convention, :func:`weakbench.core.boxes.iou_inclusive`) is ``≥ δ``; accuracy is over the split and maximised over ``τ`` (one ``τ`` per split and δ).

How the fast path reproduces each OpenCV step without tracing (proved in the docstrings of
:mod:`._levelsets` and :mod:`._levelsets_torch`, and checked count by count against OpenCV in
``tests/``). On the CPU it is a compiled union-find sweep over the pixels by decreasing byte
value (:func:`._levelsets.sweep_scores`; numba is a hard dependency); on an accelerator,
vectorised component trees in torch (:mod:`._levelsets_torch`). Both give identical tables.

* an outer contour's ``boundingRect`` is the bounding box of its component; a hole
  contour runs through the foreground pixels 4-adjacent to the hole, so its rectangle is the
  hole's bounding box grown by one pixel on each side;
* the largest contour is always the outer contour of a top-level component (a hole's polygon
  lies inside its parent's, an island's inside the hole), and the outer polygon's area is
  that of the component with its holes filled, counted on 2×2 cells of pixel centres (1 for
  a full cell, 1/2 for a cell with three pixels). Holes are filled for all levels at once
  with the grey-level hole filling ``g = max(b, level at which the pixel's background joins
  the border)``, computed from the background component tree (torch) or by a
  raster / anti-raster scan and a priority flood (compiled sweep);
* OpenCV lists top-level contours in reverse raster order of their first pixel, so among
  equal areas the component whose first pixel (top row, then leftmost) comes last in raster
  order wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weakbench.core.errors import DataError
from weakbench.core.boxes import iou_inclusive_broadcast

NLEV = 256


def threshold_list(cam_curve_interval: float) -> np.ndarray:
    """``np.arange(0, 1, interval)`` as the reference builds it (float64)."""
    if not 0 < cam_curve_interval < 1:
        raise DataError(f"cam_curve_interval must be in (0, 1), got {cam_curve_interval}; "
                        "use 0.01 (validation) or 0.001 (reference default)")
    return np.arange(0, 1, cam_curve_interval)


def _as_maps(maps):
    """Validated float maps (N, H, W): a numpy array, or a torch tensor left on its device
    when it is not on the CPU (no copy to the host)."""
    if isinstance(maps, torch.Tensor):
        m = maps.detach()
        if m.device.type == "cpu":
            m = m.numpy()
    else:
        m = np.asarray(maps)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise DataError(f"maps must be (N, H, W), got shape {tuple(m.shape)}; "
                        "pass one normalised map per image")
    if isinstance(m, torch.Tensor):
        ok = m.is_floating_point() and (m.numel() == 0 or bool(
            (~torch.isnan(m).any()) & (m.min() >= 0) & (m.max() <= 1)))
        floating = m.is_floating_point()
    else:
        floating = np.issubdtype(m.dtype, np.floating)
        ok = floating and (m.size == 0 or bool(
            not np.isnan(m).any() and m.min() >= 0 and m.max() <= 1))
    if not floating:
        raise DataError(f"maps must be float in [0, 1], got dtype {m.dtype}; "
                        "min-max normalise the CAMs first")
    if not ok:
        raise DataError("maps must lie in [0, 1] without NaN (check_scoremap_validity); "
                        "min-max normalise each map before evaluation")
    return m


def to_bytes(maps):
    """``uint8(map * 255)`` computed in the map's own float dtype, as the reference does."""
    if isinstance(maps, torch.Tensor):
        return (maps * 255).to(torch.uint8)
    return (maps * maps.dtype.type(255)).astype(np.uint8)


def _gt_arrays(gt_boxes: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(gt_boxes) != n:
        raise DataError(f"gt_boxes has {len(gt_boxes)} entries for {n} maps; "
                        "pass one (K_i, 4) array per map")
    arrs = [np.asarray(g, dtype=np.int64).reshape(-1, 4) for g in gt_boxes]
    for i, a in enumerate(arrs):
        if a.shape[0] == 0:
            raise DataError(f"gt_boxes[{i}] is empty; every evaluated image needs at least one "
                            "GT box (drop the image or fix localization.txt)")
    k = max((a.shape[0] for a in arrs), default=1)
    gt = np.zeros((n, k, 4), dtype=np.int64)
    valid = np.zeros((n, k), dtype=bool)
    for i, a in enumerate(arrs):
        gt[i, :len(a)] = a
        valid[i, :len(a)] = True
    return gt, valid


def _best_iou(boxes: np.ndarray, image: np.ndarray, gt: np.ndarray,
              valid: np.ndarray) -> np.ndarray:
    """Max inclusive IoU (float64) of each box (P, 4) over the GT boxes of its image.

    Same integer areas and float64 quotient as the reference's ``calculate_multiple_iou``."""
    iou = iou_inclusive_broadcast(boxes[:, None, :], gt[image])  # (P, K): each box against its image's GT boxes
    iou[~valid[image]] = -1.0
    return iou.max(1)


def _component_tables(b: torch.Tensor, multi: bool, largest: bool) -> dict:
    """NodeTables (numpy) of the foreground, the holes and the hole-filled foreground.

    ``b``: int64 bytes (N, H, W), a torch tensor on the device the trees are built on.
    """
    from weakbench.core.metrics import _levelsets_torch as lv

    n, h, w = b.shape
    hp, wp = h + 4, w + 4
    out: dict = {}
    # Background (4-connected) components of {b <= L} are the upper sets of 256 - b at level
    # 255 - L; the border ring is always background, the outermost ring never.
    bgv = lv.pad_batch(256 - b, 257)
    fbg = lv.build_forest(bgv, 4, NLEV)
    ring_basin = fbg.basin_of.reshape(n, hp, wp)[:, 1, 1]
    outside = fbg.comp[fbg.canon_row[ring_basin]]  # (n, NLEV): node of the outside per level
    if multi:
        fgv = lv.pad_batch(b, 0)
        out["fg"] = lv.node_table(fgv, lv.build_forest(fgv, 8, NLEV), NLEV, w)
        hb = lv.node_table(bgv, fbg, NLEV, w)
        out["holes"] = (hb, outside)
    if largest:
        # Grey-level hole filling: a pixel is outside at level L iff b <= L and its background
        # basin has joined the outside, i.e. L >= 255 - J; so g = max(b, 255 - J).
        # canonical rows are exact below each basin's peak; joining is a prefix of levels
        img_c = fbg.image_of_node[fbg.comp[:, 0]]
        joined_c = (fbg.comp >= 0) & (fbg.comp == outside[img_c])
        jlev = torch.minimum(joined_c.sum(1)[fbg.canon_row] - 1, fbg.peak - 1)
        bas = fbg.basin_of.reshape(n, hp, wp)[:, 2:-2, 2:-2]
        g = torch.maximum(b, 255 - jlev[bas])
        gv = lv.pad_batch(g, 0)
        out["filled"] = lv.node_table(gv, lv.build_forest(gv, 8, NLEV), NLEV, w, cells=True)

    def conv(t):
        return None if t is None else t.cpu().numpy()
    for k in ("fg", "filled"):
        if k in out:
            nt = out[k]
            out[k] = type(nt)(*[conv(getattr(nt, f)) for f in nt.__dataclass_fields__])
    if "holes" in out:
        nt, o = out["holes"]
        out["holes"] = (type(nt)(*[conv(getattr(nt, f)) for f in nt.__dataclass_fields__]),
                        o.cpu().numpy())
    return out


def box_scores(maps, gt_boxes: Sequence, *, multi_contour: bool = True,
               largest_contour: bool = True, device=None,
               engine: str = "auto") -> dict[str, np.ndarray]:
    """Best IoU of every map at every byte level, for both box rules.

    Args:
        maps: float (N, H, W) in [0, 1] (numpy or torch), normalised, in the evaluation frame.
        gt_boxes: N int arrays (K_i, 4), ``[x0, y0, x1, y1]`` in frame pixels, K_i ≥ 1.
        multi_contour: compute the all-contours table (MaxBoxAccV2).
        largest_contour: compute the largest-contour table (MaxBoxAcc).
        device: ``None`` or ``"cpu"``: the compiled sweep on the CPU; a CUDA device: torch
            on that device.
        engine: ``"auto"`` (on the CPU: the compiled union-find sweep, numba; on an
            accelerator: the torch component trees), or force one implementation: ``"numba"``
            or ``"torch"`` (``"torch"`` without an accelerator ``device`` runs on the maps'
            device, e.g. the CPU). Both give identical tables.

    Returns:
        ``{"multi": float64 (N, 256), "largest": float64 (N, 256), "max_byte": int64 (N,)}``:
        entry ``[i, L]`` is the best IoU of map i's boxes for the foreground ``b > L``
        (defined for ``L < max(b)``, and for every L when ``max(b) = 0``).

    Raises:
        DataError: bad shapes, values outside [0, 1], NaN, an image without GT boxes, or an
            unknown ``engine``.
    """
    return _box_scores(maps, gt_boxes, multi_contour, largest_contour, device, engine)


def _box_scores(maps, gt_boxes: Sequence, multi_contour: bool, largest_contour: bool, device,
                engine: str, thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`box_scores`; with ``thresholds`` the compiled engine evaluates only the levels
    ``int(τ · max(b))`` those thresholds map to (the other table entries are not meaningful)."""
    m = _as_maps(maps)
    n, h, w = m.shape
    gt, valid = _gt_arrays(gt_boxes, n)
    if engine not in ("auto", "numba", "torch"):
        raise DataError(f"engine must be 'auto', 'numba' or 'torch', got {engine!r}")
    use_torch = engine == "torch" or (
        engine == "auto" and device is not None and torch.device(device).type != "cpu")
    from weakbench.core.metrics import _levelsets
    b = to_bytes(m)
    if not use_torch:
        if isinstance(b, torch.Tensor):  # a map tensor on an accelerator
            b = b.cpu().numpy()
        b = np.ascontiguousarray(b)
        max_byte = b.reshape(n, -1).max(1).astype(np.int64) if n else np.zeros(0, np.int64)
        zero_iou = _best_iou(np.zeros((n, 4), dtype=np.int64), np.arange(n), gt, valid)
        if thresholds is None:
            need = np.ones((n, NLEV), dtype=bool)
        else:
            need = np.zeros((n, NLEV), dtype=bool)
            lev = threshold_levels(max_byte, np.asarray(thresholds, dtype=np.float64))
            np.put_along_axis(need, np.minimum(lev, NLEV - 1), True, axis=1)
        tm = np.full((n, NLEV), -1.0)
        tl = np.full((n, NLEV), -1.0)
        if n and h and w:
            _levelsets.sweep_scores(b, gt, valid.sum(1).astype(np.int64), need,
                                    multi_contour, largest_contour, tm, tl, _levelsets._REP,
                                    _levelsets._NREP, _levelsets._CELL)
        out = {"max_byte": max_byte}
        if multi_contour:
            out["multi"] = np.where(tm < 0, zero_iou[:, None], tm)
        if largest_contour:
            out["largest"] = np.where(tl < 0, zero_iou[:, None], tl)
        return out
    bt = b if isinstance(b, torch.Tensor) else torch.from_numpy(b)
    bb = bt.to(device if device is not None else bt.device).to(torch.int64)
    max_byte = bt.reshape(n, -1).max(1).values.cpu().numpy().astype(np.int64) if n \
        else np.zeros(0, np.int64)
    out: dict[str, np.ndarray] = {"max_byte": max_byte}
    zero_iou = _best_iou(np.zeros((n, 4), dtype=np.int64), np.arange(n), gt, valid)
    tabs = _component_tables(bb, multi_contour, largest_contour)

    def finish(rows_boxes, rows_image, rows_level):
        table = np.full(n * NLEV, -1.0)
        if rows_boxes:
            bx = np.concatenate(rows_boxes)
            im = np.concatenate(rows_image)
            lv = np.concatenate(rows_level)
            if bx.size:
                np.maximum.at(table, im * NLEV + lv, _best_iou(bx, im, gt, valid))
        table = table.reshape(n, NLEV)
        return np.where(table < 0, zero_iou[:, None], table)

    if multi_contour:
        nt = tabs["fg"]
        boxes = [np.stack([nt.x0, nt.y0, np.minimum(nt.x1 + 1, w - 1),
                           np.minimum(nt.y1 + 1, h - 1)], 1)]
        images, levels = [nt.image], [nt.level]
        hb, outside = tabs["holes"]
        hole = hb.node != outside[hb.image, hb.level]
        # a hole contour runs through the foreground pixels around the hole: its rectangle is
        # the hole's bounding box grown by one pixel
        boxes.append(np.stack([hb.x0[hole] - 1, hb.y0[hole] - 1,
                               np.minimum(hb.x1[hole] + 2, w - 1),
                               np.minimum(hb.y1[hole] + 2, h - 1)], 1))
        images.append(hb.image[hole])
        levels.append(255 - hb.level[hole])
        out["multi"] = finish(boxes, images, levels)

    if largest_contour:
        nt = tabs["filled"]
        # largest area first; among equal areas OpenCV lists the component whose first pixel
        # comes last in raster order first
        key = nt.area2 * (h * w + 1) + nt.first
        slot = nt.image * NLEV + nt.level
        best = np.full(n * NLEV, -1, dtype=np.int64)
        np.maximum.at(best, slot, key)
        win = key == best[slot]
        boxes = np.stack([nt.x0[win], nt.y0[win], np.minimum(nt.x1[win] + 1, w - 1),
                          np.minimum(nt.y1[win] + 1, h - 1)], 1)
        out["largest"] = finish([boxes], [nt.image[win]], [nt.level[win]])
    return out


def threshold_levels(max_byte: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``int(τ · max(b))`` for every map and threshold: int64 (N, T), as the reference."""
    return (thresholds[None, :] * max_byte[:, None].astype(np.float64)).astype(np.int64)


class BoxEvaluator:
    """MaxBoxAcc / MaxBoxAccV2 accumulated batch by batch (Choe et al. 2020, Sec. 4.1).

    Args:
        cam_curve_interval: threshold step; thresholds are ``np.arange(0, 1, interval)``
            (0.01 for validation, 0.001 is the reference default).
        iou_thresholds: δ values in percent.
        multi_contour: all contours (MaxBoxAccV2 rule) or only the largest (MaxBoxAcc rule).
        device: torch device for the computation (``None``: where the maps are; pass
            ``"cuda"`` to use a GPU).
        chunk: maps processed together (memory ~ chunk × (H+4)(W+4) × 100 bytes).

    ``counts[δ]`` (int64 (T,)) is the number of images correct at each threshold, the
    reference's ``num_correct``. :meth:`compute` returns percentages (0–100):
    ``max_box_acc_iou{δ}`` and ``best_threshold_iou{δ}`` for each δ, ``max_box_acc`` (δ = 50
    if evaluated), ``max_box_acc_v2`` (mean over δ of the maxima), and ``top1_loc`` /
    ``top5_loc`` when class flags were given: the percentage of images whose top-1 (top-5)
    class is correct *and* whose IoU ≥ 0.5 at the δ = 50 best threshold (first argmax).
    """

    def __init__(self, cam_curve_interval: float = 0.01,
                 iou_thresholds: Sequence[int] = (30, 50, 70), multi_contour: bool = True,
                 device=None, chunk: int = 8) -> None:
        self.thresholds = threshold_list(cam_curve_interval)
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        if not self.iou_thresholds or any(not 0 < d <= 100 for d in self.iou_thresholds):
            raise DataError(f"iou_thresholds must be percentages in (0, 100], got "
                            f"{iou_thresholds}; use (30, 50, 70)")
        self.multi_contour = multi_contour
        self.device = device
        self.chunk = chunk
        t = len(self.thresholds)
        self.counts = {d: np.zeros(t, dtype=np.int64) for d in self.iou_thresholds}
        self.counts_top1 = np.zeros(t, dtype=np.int64)
        self.counts_top5 = np.zeros(t, dtype=np.int64)
        self.has_top1 = self.has_top5 = False
        self.cnt = 0
        # per sample, in accumulation order (weakbench.core.metrics.per_image): bool (n, T)
        # correctness per δ and the class flags, from which every number above is recomputed
        self.sample_bits: dict[int, list[np.ndarray]] = {d: [] for d in self.iou_thresholds}
        self.sample_top1: list[np.ndarray] = []
        self.sample_top5: list[np.ndarray] = []

    def _key(self) -> str:
        return "multi" if self.multi_contour else "largest"

    def accumulate(self, maps, gt_boxes: Sequence, class_correct_top1=None,
                   class_correct_top5=None) -> None:
        """Add a batch: maps float (N, H, W) in [0, 1]; gt_boxes N int (K_i, 4) arrays;
        optional bool (N,) flags: is the image's top-1 / top-5 predicted class correct."""
        n = len(maps)
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            sc = _box_scores(maps[s:e], gt_boxes[s:e], self.multi_contour,
                             not self.multi_contour, self.device, "auto", self.thresholds)
            self._add(sc[self._key()], sc["max_byte"],
                      None if class_correct_top1 is None else np.asarray(class_correct_top1)[s:e],
                      None if class_correct_top5 is None else np.asarray(class_correct_top5)[s:e])

    def _add(self, table: torch.Tensor, max_byte: torch.Tensor, top1, top5) -> None:
        tab = np.asarray(table)
        lev = threshold_levels(np.asarray(max_byte), self.thresholds)
        ious = np.take_along_axis(tab, lev, axis=1)  # (n, T)
        for d in self.iou_thresholds:
            ok = ious >= d / 100
            self.counts[d] += ok.sum(0)
            self.sample_bits[d].append(ok)
        ok50 = ious >= 0.5
        if top1 is not None:
            self.has_top1 = True
            self.counts_top1 += (ok50 & np.asarray(top1, dtype=bool)[:, None]).sum(0)
            self.sample_top1.append(np.asarray(top1, dtype=bool))
        if top5 is not None:
            self.has_top5 = True
            self.counts_top5 += (ok50 & np.asarray(top5, dtype=bool)[:, None]).sum(0)
            self.sample_top5.append(np.asarray(top5, dtype=bool))
        self.cnt += tab.shape[0]

    def compute(self) -> dict[str, float]:
        """Metrics in percent; raises DataError when nothing was accumulated."""
        if self.cnt == 0:
            raise DataError("BoxEvaluator.compute() before any accumulate(); "
                            "evaluate at least one image")
        res: dict[str, float] = {}
        maxima = []
        for d in self.iou_thresholds:
            acc = self.counts[d] * 100.0 / float(self.cnt)
            i = int(np.argmax(acc))
            res[f"max_box_acc_iou{d}"] = float(acc[i])
            res[f"best_threshold_iou{d}"] = float(self.thresholds[i])
            maxima.append(float(acc[i]))
        if 50 in self.iou_thresholds:
            res["max_box_acc"] = res["max_box_acc_iou50"]
            i50 = int(np.argmax(self.counts[50]))
            if self.has_top1:
                res["top1_loc"] = float(self.counts_top1[i50] * 100.0 / self.cnt)
            if self.has_top5:
                res["top5_loc"] = float(self.counts_top5[i50] * 100.0 / self.cnt)
        res["max_box_acc_v2"] = float(np.mean(maxima))
        return res


class WsolEvaluator:
    """Everything the engine logs for WSOL boxes in one pass over the maps.

    MaxBoxAcc (δ = 50, largest contour) and MaxBoxAccV2 (δ ∈ {30, 50, 70}, all contours,
    each δ with its own best threshold) share the background component tree of each batch.
    :meth:`compute` returns (percent, 0–100): ``max_box_acc``, ``best_threshold``,
    ``max_box_acc_v2``, ``max_box_acc_v2_iou30/50/70``, ``best_threshold_v2_iou30/50/70``,
    and ``top1_loc`` / ``top5_loc`` (class correct and IoU ≥ 0.5 with the largest contour, at
    MaxBoxAcc's best threshold) when the class flags were given.
    """

    def __init__(self, cam_curve_interval: float = 0.01,
                 iou_thresholds: Sequence[int] = (30, 50, 70), device=None,
                 chunk: int = 8) -> None:
        self.v1 = BoxEvaluator(cam_curve_interval, (50,), multi_contour=False,
                               device=device, chunk=chunk)
        self.v2 = BoxEvaluator(cam_curve_interval, iou_thresholds, multi_contour=True,
                               device=device, chunk=chunk)
        self.device = device
        self.chunk = chunk

    def accumulate(self, maps, gt_boxes: Sequence, class_correct_top1=None,
                   class_correct_top5=None) -> None:
        """Same arguments as :meth:`BoxEvaluator.accumulate`."""
        n = len(maps)
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            sc = _box_scores(maps[s:e], gt_boxes[s:e], True, True, self.device, "auto",
                             self.v1.thresholds)
            t1 = None if class_correct_top1 is None else np.asarray(class_correct_top1)[s:e]
            t5 = None if class_correct_top5 is None else np.asarray(class_correct_top5)[s:e]
            self.v1._add(sc["largest"], sc["max_byte"], t1, t5)
            self.v2._add(sc["multi"], sc["max_byte"], None, None)

    def compute(self) -> dict[str, float]:
        r1 = self.v1.compute()
        r2 = self.v2.compute()
        out = {"max_box_acc": r1["max_box_acc"], "best_threshold": r1["best_threshold_iou50"],
               "max_box_acc_v2": r2["max_box_acc_v2"]}
        for d in self.v2.iou_thresholds:
            out[f"max_box_acc_v2_iou{d}"] = r2[f"max_box_acc_iou{d}"]
            out[f"best_threshold_v2_iou{d}"] = r2[f"best_threshold_iou{d}"]
        for k in ("top1_loc", "top5_loc"):
            if k in r1:
                out[k] = r1[k]
        return out


class PxAPEvaluator:
    """Pixel average precision, PxAP (Choe et al. 2020, Sec. 4.2), as wsolevaluation's
    ``MaskEvaluator``.

    Histograms of map values over GT-positive and GT-negative pixels (ignore pixels that are
    not positive are excluded) with bin edges ``[τ_0, …, τ_{T−1}, 1, 2, 3]``; reversed
    cumulative sums give tp and fp at every threshold; precision = tp / (tp + fp), recall =
    tp / P; ``PxAP = 100 · Σ_{i≥1, tp_i+fp_i>0} precision_i (recall_i − recall_{i−1})``.
    A constant map gives 100·P/(P+N); a perfect map gives 100.

    :meth:`compute` returns ``{"pxap": float (0–100), "precision": list, "recall": list}``.
    """

    def __init__(self, cam_curve_interval: float = 0.01) -> None:
        self.thresholds = threshold_list(cam_curve_interval)
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.num_bins = len(self.thresholds) + 2
        self.pos_hist = np.zeros(self.num_bins, dtype=np.float64)
        self.neg_hist = np.zeros(self.num_bins, dtype=np.float64)
        #: per accumulated sample, int64 (num_bins,) each (weakbench.core.metrics.per_image)
        self.sample_pos: list[np.ndarray] = []
        self.sample_neg: list[np.ndarray] = []

    def accumulate(self, maps, gt_masks, ignore=None) -> None:
        """maps float (N, H, W) in [0, 1]; gt_masks bool (N, H, W); ignore bool (N, H, W)."""
        m = _as_maps(maps)
        m = m.cpu().numpy() if isinstance(m, torch.Tensor) else m
        gt = np.asarray(gt_masks.cpu() if isinstance(gt_masks, torch.Tensor) else gt_masks)
        gt = gt.astype(bool).reshape(m.shape) if gt.size == m.size else None
        if gt is None:
            raise DataError(f"gt_masks must have the maps' shape {m.shape}; resize the masks "
                            "to the evaluation frame with nearest-neighbour interpolation")
        neg = ~gt
        if ignore is not None:
            ig = np.asarray(ignore.cpu() if isinstance(ignore, torch.Tensor) else ignore)
            if ig.size != m.size:
                raise DataError(f"ignore must have the maps' shape {m.shape}")
            neg &= ~ig.astype(bool).reshape(m.shape)
        for i in range(m.shape[0]):  # one histogram per sample: a bootstrap resamples images
            p = np.histogram(m[i][gt[i]], bins=self.edges)[0]
            q = np.histogram(m[i][neg[i]], bins=self.edges)[0]
            self.pos_hist += p
            self.neg_hist += q
            self.sample_pos.append(p.astype(np.int64))
            self.sample_neg.append(q.astype(np.int64))

    def compute(self) -> dict:
        tp = self.pos_hist[::-1].cumsum()
        fp = self.neg_hist[::-1].cumsum()
        num_pos = self.pos_hist.sum()
        if num_pos <= 0:
            raise DataError("PxAP needs at least one positive GT pixel in the split; "
                            "check the masks (localization.txt mask entries)")
        if ((tp + fp) <= 0).all():
            raise DataError("PxAP: no pixel was evaluated; check the maps and masks")
        nonzero = (tp + fp) != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
            recall = tp / num_pos
        auc = (precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100
        return {"pxap": float(auc), "precision": np.nan_to_num(precision).tolist(),
                "recall": recall.tolist()}
