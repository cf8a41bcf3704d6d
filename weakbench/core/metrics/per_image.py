"""Per-image results: what a paired comparison of two evaluations needs, and the metrics
recomputed exactly from it on any weighted subset (a bootstrap resample) of the images.

One table per evaluated split, one row per WSOL *sample*, an (image, present class) pair
(DESIGN.md, multi-label images), schema :data:`PER_IMAGE_SCHEMA`, version
:data:`PER_IMAGE_VERSION` (stored under ``weakbench.per_image_version`` in the schema metadata;
documented in ``docs/results_schema.md``):

* ``sample`` (string, ``"<image id>|<class index>"``), ``image`` (string, the record's
  ``image_id``), ``class_index`` (int32): the sample's identity. Two tables are compared only
  when their ``sample`` sets are equal; a bootstrap resamples *images* (all samples of an image
  move together).
* ``box_iou50`` (binary): the image's correctness at every threshold τ_t for MaxBoxAcc
  (largest contour, IoU ≥ 0.5), ``T`` bits packed with :func:`numpy.packbits` (big bit order,
  ``T = len(thresholds)``). ``box_v2_iou30``, ``box_v2_iou50``, ``box_v2_iou70`` (binary): the
  same for the all-contours boxes at δ = 30, 50, 70 (MaxBoxAccV2). Accuracy at τ_t over a
  weighted set is ``Σ_i w_i bit_i[t] / Σ_i w_i``; MaxBoxAcc is its maximum over t, so both are
  recomputed exactly (Choe et al. 2020, one τ for the whole set).
* ``top1_class_ok``, ``top5_class_ok`` (bool, null without a classifier): the sample's class is
  the top-1 / among the top-5 predictions; with the δ = 50 largest-contour bits they give
  top-1 / top-5 localisation at MaxBoxAcc's best τ of the resample.
* ``pxap_pos``, ``pxap_neg`` (list<int64>, null on samples without a mask): the sample's
  histograms of map values over its positive and (non-ignored) negative pixels on PxAP's bins;
  PxAP of a weighted set is that of the weighted sums (:func:`pxap_from_hists`).

Metadata (bytes): ``weakbench.per_image_version``, ``weakbench.thresholds`` (JSON list of τ),
``weakbench.split``.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import pyarrow as pa

from weakbench.core.errors import DataError

PER_IMAGE_VERSION = 1
VERSION_KEY = b"weakbench.per_image_version"
THRESHOLDS_KEY = b"weakbench.thresholds"
SPLIT_KEY = b"weakbench.split"

#: the box-correctness columns: name → (box rule, δ in percent)
BOX_COLUMNS = {"box_iou50": ("largest", 50), "box_v2_iou30": ("multi", 30),
               "box_v2_iou50": ("multi", 50), "box_v2_iou70": ("multi", 70)}

PER_IMAGE_SCHEMA = pa.schema(
    [pa.field("sample", pa.string(), nullable=False), pa.field("image", pa.string(), nullable=False),
     pa.field("class_index", pa.int32())]
    + [pa.field(c, pa.binary()) for c in BOX_COLUMNS]
    + [pa.field("top1_class_ok", pa.bool_()), pa.field("top5_class_ok", pa.bool_()),
       pa.field("pxap_pos", pa.list_(pa.int64())), pa.field("pxap_neg", pa.list_(pa.int64()))],
    metadata={VERSION_KEY: str(PER_IMAGE_VERSION).encode()},
)

#: metrics (bare names) that :func:`metric_on_weights` recomputes from a per-image table
RECOMPUTABLE = ("max_box_acc", "max_box_acc_v2", "max_box_acc_v2_iou30", "max_box_acc_v2_iou50",
                "max_box_acc_v2_iou70", "top1_loc", "top5_loc", "pxap", "cls_acc")


def build_table(split: str, thresholds: np.ndarray, images: list[str], classes: list[int],
                bits: Mapping[str, np.ndarray], top1: np.ndarray | None = None, top5: np.ndarray | None = None,
                pos: list | None = None, neg: list | None = None) -> pa.Table:
    """A per-image table (:data:`PER_IMAGE_SCHEMA`) from arrays.

    Args:
        split: the split's name (``"test"``, ``"val"``, ``"all"``).
        thresholds: float64 (T,), the τ of the CAM curve.
        images: N image ids (str); classes: N class indices (the samples' classes).
        bits: for each name of :data:`BOX_COLUMNS` present, bool (N, T) correctness.
        top1, top5: bool (N,) or ``None``.
        pos, neg: N int arrays (bins,) or ``None`` entries (no mask), or ``None``.

    Raises:
        DataError: arrays of the wrong length.
    """
    n = len(images)
    if len(classes) != n:
        raise DataError(f"per-image table: {n} images and {len(classes)} classes; pass one class per sample")
    cols: dict[str, object] = {
        "sample": [f"{im}|{c}" for im, c in zip(images, classes)], "image": [str(i) for i in images],
        "class_index": [int(c) for c in classes]}
    for name in BOX_COLUMNS:
        b = bits.get(name)
        if b is not None and b.shape != (n, len(thresholds)):
            raise DataError(f"per-image table: bits {name!r} has shape {b.shape}, expected {(n, len(thresholds))}")
        cols[name] = None if b is None else [row.tobytes() for row in np.packbits(b.astype(bool), axis=1)]
    for name, v in (("top1_class_ok", top1), ("top5_class_ok", top5)):
        cols[name] = None if v is None else [bool(x) for x in np.asarray(v)]
    for name, v in (("pxap_pos", pos), ("pxap_neg", neg)):
        cols[name] = None if v is None else [None if h is None else np.asarray(h, np.int64).tolist() for h in v]
    arrays = [pa.array(cols[f.name] if cols[f.name] is not None else [None] * n, type=f.type) for f in PER_IMAGE_SCHEMA]
    meta = {VERSION_KEY: str(PER_IMAGE_VERSION).encode(), SPLIT_KEY: split.encode(),
            THRESHOLDS_KEY: json.dumps([float(t) for t in thresholds]).encode()}
    return pa.Table.from_arrays(arrays, schema=PER_IMAGE_SCHEMA.with_metadata(meta))


def write_table(table: pa.Table, path, split: str) -> None:
    """Write ``table`` as Parquet at ``path`` with its split recorded (``weakbench.split``);
    atomically (:func:`weakbench.core.io.atomic_write`)."""
    from pathlib import Path

    from weakbench.core.io import atomic_write

    import pyarrow.parquet as pq

    path = Path(path)
    meta = dict(table.schema.metadata or {})
    meta[SPLIT_KEY] = split.encode()
    with atomic_write(path) as f:
        pq.write_table(table.replace_schema_metadata(meta), f, compression="zstd")


def read_table(path) -> pa.Table:
    """Read a per-image Parquet file (no code is run: Parquet holds data only)."""
    import pyarrow.parquet as pq

    return pq.read_table(path)


class PerImage:
    """A per-image table unpacked for recomputation.

    Attributes:
        samples: object (N,) sample ids; images: object (N,) image ids; thresholds: float64 (T,).
        bits: ``{column: bool (N, T)}`` for the box columns present.
        top1, top5: bool (N,) or ``None``; pos, neg: float64 (N, bins) with zero rows for
        samples without a mask, and ``has_mask`` bool (N,), or ``None`` when no sample has one.

    Raises:
        DataError: a table of another :data:`PER_IMAGE_VERSION`.
    """

    def __init__(self, table: pa.Table):
        meta = table.schema.metadata or {}
        version = meta.get(VERSION_KEY, b"?").decode()
        if version != str(PER_IMAGE_VERSION):
            raise DataError(f"per-image table version {version!r}, this weakbench reads {PER_IMAGE_VERSION}; "
                            f"fix: rebuild the results store from MLflow")
        self.thresholds = np.asarray(json.loads(meta.get(THRESHOLDS_KEY, b"[]").decode()), dtype=np.float64)
        t = len(self.thresholds)
        self.samples = np.asarray(table["sample"].to_pylist(), dtype=object)
        self.images = np.asarray(table["image"].to_pylist(), dtype=object)
        self.bits: dict[str, np.ndarray] = {}
        for name in BOX_COLUMNS:
            col = table[name].to_pylist()
            if col and all(v is not None for v in col):
                packed = np.frombuffer(b"".join(col), dtype=np.uint8).reshape(len(col), -1)
                self.bits[name] = np.unpackbits(packed, axis=1, count=t).astype(bool)
        self.top1 = self._flags(table, "top1_class_ok")
        self.top5 = self._flags(table, "top5_class_ok")
        pos, neg = table["pxap_pos"].to_pylist(), table["pxap_neg"].to_pylist()
        self.has_mask = np.array([p is not None for p in pos], dtype=bool)
        self.pos = self.neg = None
        if self.has_mask.any():
            bins = len(next(p for p in pos if p is not None))
            self.pos = np.array([p if p is not None else [0] * bins for p in pos], dtype=np.float64)
            self.neg = np.array([q if q is not None else [0] * bins for q in neg], dtype=np.float64)

    @staticmethod
    def _flags(table: pa.Table, name: str) -> np.ndarray | None:
        col = table[name].to_pylist()
        return np.array(col, dtype=bool) if col and all(v is not None for v in col) else None

    def __len__(self) -> int:
        return len(self.samples)

    def available(self) -> list[str]:
        """The bare metric names this table recomputes."""
        out = []
        if "box_iou50" in self.bits:
            out.append("max_box_acc")
            out += [m for m, f in (("top1_loc", self.top1), ("top5_loc", self.top5)) if f is not None]
        if all(c in self.bits for c in ("box_v2_iou30", "box_v2_iou50", "box_v2_iou70")):
            out += ["max_box_acc_v2", "max_box_acc_v2_iou30", "max_box_acc_v2_iou50", "max_box_acc_v2_iou70"]
        if self.pos is not None:
            out.append("pxap")
        if self.top1 is not None:
            out.append("cls_acc")
        return out

    def image_weights(self, image_order: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Sample weights (B, N) from image multiplicities ``counts`` (B, I) over ``image_order``
        (I image ids): each sample weighs its image's count."""
        pos = {im: k for k, im in enumerate(image_order.tolist())}
        idx = np.array([pos[im] for im in self.images.tolist()], dtype=np.int64)
        return counts[:, idx]


def _acc_curve(bits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Accuracy (%) at every τ, float64 (B, T), of weights ``w`` (B, N) over ``bits`` (N, T)."""
    tot = w.sum(1, keepdims=True)
    return 100.0 * (w @ bits.astype(np.float64)) / np.where(tot > 0, tot, 1.0)


def pxap_from_hists(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """PxAP (%) of histograms ``pos``, ``neg`` float (B, bins) (Choe et al. 2020, Sec. 4.2, as
    :class:`~weakbench.core.metrics.wsol.PxAPEvaluator`): reversed cumulative sums give tp
    and fp; ``Σ_{i≥1, tp_i+fp_i>0} precision_i (recall_i − recall_{i−1})``. NaN where a
    histogram has no positive pixel."""
    tp = pos[:, ::-1].cumsum(1)
    fp = neg[:, ::-1].cumsum(1)
    num_pos = pos.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / num_pos
    ap = (precision[:, 1:] * np.diff(recall, axis=1) * ((tp + fp)[:, 1:] != 0)).sum(1) * 100.0
    return np.where(num_pos[:, 0] > 0, ap, np.nan)


def metric_on_weights(data: PerImage, metric: str, w: np.ndarray) -> np.ndarray:
    """``metric`` (a bare name of :data:`RECOMPUTABLE`) recomputed for each row of sample
    weights ``w`` float (B, N) (a resample's multiplicities; all ones is the evaluated split).

    MaxBoxAcc(V2) take their maximum over τ on each weighted set (its own best τ, as Choe et al.
    define it); top-1/top-5 loc are read at the δ = 50 largest-contour best τ (first argmax, as
    :class:`~weakbench.core.metrics.wsol.BoxEvaluator`). Returns float64 (B,) in percent.

    Raises:
        DataError: the table lacks the metric's columns.
    """
    w = np.asarray(w, dtype=np.float64)
    if metric not in data.available():
        raise DataError(f"per-image table: metric {metric!r} cannot be recomputed (it has {data.available()})")
    if metric in ("max_box_acc", "top1_loc", "top5_loc"):
        curve = _acc_curve(data.bits["box_iou50"], w)
        if metric == "max_box_acc":
            return curve.max(1)
        best = curve.argmax(1)
        flags = data.top1 if metric == "top1_loc" else data.top5
        ok = data.bits["box_iou50"][:, best].T & flags[None, :]  # (B, N)
        tot = w.sum(1)
        return 100.0 * (w * ok).sum(1) / np.where(tot > 0, tot, 1.0)
    if metric.startswith("max_box_acc_v2"):
        levels = [metric[-2:]] if metric != "max_box_acc_v2" else ["30", "50", "70"]
        return np.mean([_acc_curve(data.bits[f"box_v2_iou{d}"], w).max(1) for d in levels], axis=0)
    if metric == "pxap":
        wm = w * data.has_mask[None, :]
        return pxap_from_hists(wm @ data.pos, wm @ data.neg)
    # cls_acc: single-label, one sample per image, so the sample's top-1 flag is the image's
    tot = w.sum(1)
    return 100.0 * (w @ data.top1.astype(np.float64)) / np.where(tot > 0, tot, 1.0)


def metric_at_threshold(data: PerImage, metric: str, tau: float, w: np.ndarray) -> np.ndarray:
    """Accuracy (%) at one fixed threshold ``tau`` (the one chosen on another split: the operating
    point a user deploys) for ``max_box_acc`` (largest contour, δ = 50) or ``max_box_acc_v2``
    (mean over δ of the all-contours accuracy, ``tau`` one value for every δ or a dict
    ``{30: τ, 50: τ, 70: τ}``). ``tau`` is matched to the nearest threshold of the table.
    Returns float64 (B,)."""
    w = np.asarray(w, dtype=np.float64)

    def at(col: str, t: float) -> np.ndarray:
        k = int(np.argmin(np.abs(data.thresholds - t)))
        return _acc_curve(data.bits[col][:, k:k + 1], w)[:, 0]

    if metric == "max_box_acc":
        return at("box_iou50", float(tau))
    if metric == "max_box_acc_v2":
        taus = tau if isinstance(tau, Mapping) else {d: tau for d in (30, 50, 70)}
        return np.mean([at(f"box_v2_iou{d}", float(taus[d])) for d in (30, 50, 70)], axis=0)
    raise DataError(f"metric_at_threshold: {metric!r} has no threshold to fix; use max_box_acc or max_box_acc_v2")
