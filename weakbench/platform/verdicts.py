"""Uncertainty over test images and seeds, and verdicts a reviewer would accept.

Every interval here comes from one bootstrap (Efron & Tibshirani 1993, ch. 13; the clustered
"two-stage" form of Davison & Hinkley 1997, Sec. 3.8) that resamples the test **images** (all
(image, class) samples of an image move together) and, where a row has several, its **seeds**,
and recomputes the metric exactly on each resample from the stored per-image results
(:mod:`weakbench.core.metrics.per_image`): MaxBoxAcc takes its maximum over thresholds on
each resample, PxAP sums the resample's histograms.

* One resample ``b`` of a row with seeds ``s_1..s_S``: image multiplicities ``c_b`` (a
  multinomial draw of the ``I`` test images) and ``S`` seeds drawn with replacement; the value is
  the mean over the drawn seeds of the metric of that seed's run on the images weighted by
  ``c_b``. A seed-free row (one run stands for every seed) resamples images only.
* Rows scored on the same images share the image draws ``c_b`` (a **paired** comparison, image
  by image); their seeds are drawn independently. Rows whose sample sets differ are never
  compared (:func:`same_images`).
* A comparison's difference gets a percentile interval and a two-sided bootstrap p-value
  ``p = min(1, 2 min(P*(d ≤ 0), P*(d ≥ 0)))``. Over the ``m`` comparisons of one board, Holm's
  step-down correction (Holm 1979) gives adjusted p-values; a verdict ("beats", "worse than")
  needs the adjusted p < 0.05, i.e. the difference's percentile interval at Holm's level for its
  rank (``1 − 0.05/(m − k + 1)``) excludes 0. Otherwise the words say the difference is not
  shown.

The selection of each row's configuration on validation is held fixed (the interval is about the
test estimate of the selected configuration, not about the selection).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from weakbench.core.metrics.per_image import PerImage, metric_at_threshold_on_images, metric_on_images

#: family-wise error rate of the verdicts on one board
ALPHA = 0.05


@dataclasses.dataclass
class RowRuns:
    """The per-image results behind one board row.

    Attributes:
        runs: one :class:`PerImage` per seed (one in all for a seed-free row).
        seed_free: the runs stand for every seed (no seed noise).
        taus: per run, the thresholds chosen on validation (``{"max_box_acc": τ,
            "max_box_acc_v2": {30: τ, 50: τ, 70: τ}}``), or ``None``; for the operating point.
    """

    runs: list[PerImage]
    seed_free: bool = False
    taus: list[dict | None] | None = None

    def image_key(self) -> tuple[str, ...]:
        """The sorted image ids the row was scored on (:attr:`PerImage.universe`: the identity
        of its image set)."""
        return tuple(self.runs[0].universe.tolist())


def same_images(a: RowRuns, b: RowRuns) -> bool:
    """Whether two rows were scored on the same images (every run of each)."""
    key = a.image_key()
    return all(tuple(r.universe.tolist()) == key for r in a.runs + b.runs)


def consistent(row: RowRuns) -> bool:
    """Whether every run of the row was scored on the same images."""
    return same_images(row, row)


def _value(data: PerImage, metric: str, order: np.ndarray, counts: np.ndarray, tau) -> np.ndarray:
    if metric.endswith("_at_val_tau"):
        base = metric[: -len("_at_val_tau")]
        if tau is None or base not in tau:
            return np.full(counts.shape[0], np.nan)
        return metric_at_threshold_on_images(data, base, tau[base], order, counts)
    return metric_on_images(data, metric, order, counts)


def can_compute(row: RowRuns, metric: str) -> bool:
    """Whether every run of the row recomputes ``metric`` (a bare name)."""
    if metric.endswith("_at_val_tau"):
        base = metric[: -len("_at_val_tau")]
        return bool(row.taus) and all(t is not None and base in t for t in row.taus) and all(
            base in r.available() for r in row.runs)
    return all(metric in r.available() for r in row.runs)


class Bootstrap:
    """Shared resampling of one board: image draws per image set, seed draws per row.

    Args:
        n_boot: resamples (B).
        rng: the generator; draws are made in the order rows are asked for, so callers pass rows
            in a deterministic order.
    """

    def __init__(self, n_boot: int, rng: np.random.Generator):
        self.n_boot = n_boot
        self.rng = rng
        self._images: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._seeds: dict[int, np.ndarray] = {}

    def image_counts(self, row: RowRuns) -> tuple[np.ndarray, np.ndarray]:
        """``(image ids (I,), counts int (B, I))`` of the row's image set, drawn once per set."""
        key = row.image_key()
        if key not in self._images:
            order = row.runs[0].universe
            draws = self.rng.integers(0, len(order), size=(self.n_boot, len(order)))
            counts = np.zeros((self.n_boot, len(order)), dtype=np.float64)
            np.add.at(counts, (np.repeat(np.arange(self.n_boot), len(order)), draws.ravel()), 1.0)
            self._images[key] = (order, counts)
        return self._images[key]

    def seed_draws(self, row: RowRuns) -> np.ndarray:
        """int (B, S): the runs drawn for each resample (its own draw for every row)."""
        key = id(row)
        if key not in self._seeds:
            s = len(row.runs)
            self._seeds[key] = (np.zeros((self.n_boot, 1), dtype=np.int64) if row.seed_free or s == 1
                                else self.rng.integers(0, s, size=(self.n_boot, s)))
        return self._seeds[key]

    def row(self, row: RowRuns, metric: str) -> tuple[float, np.ndarray]:
        """``(estimate, resampled values float (B,))`` of ``metric`` for the row: the estimate is
        the mean over its runs of the metric on all its images."""
        order, counts = self.image_counts(row)
        taus = row.taus or [None] * len(row.runs)
        per_run = np.stack([_value(r, metric, order, counts, t) for r, t in zip(row.runs, taus)])
        ones = np.ones((1, len(order)))
        est = float(np.mean([_value(r, metric, order, ones, t)[0] for r, t in zip(row.runs, taus)]))
        draws = self.seed_draws(row)
        boot = per_run[draws, np.arange(self.n_boot)[:, None]].mean(1)
        return est, boot


def interval(boot: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of resampled values (NaN ignored); ``(nan, nan)`` when none is finite."""
    b = boot[np.isfinite(boot)]
    if not len(b):
        return math.nan, math.nan
    lo, hi = np.quantile(b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_p(diff_boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: ``min(1, 2 min(P*(d ≤ 0), P*(d ≥ 0)))``."""
    d = diff_boot[np.isfinite(diff_boot)]
    if not len(d):
        return math.nan
    return float(min(1.0, 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): sort ascending, ``p_(k) · (m − k + 1)``,
    running maximum, capped at 1; NaN stays NaN and does not count in ``m``."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, p[i] * (m - k)))
        out[i] = running
    return out.tolist()


@dataclasses.dataclass
class Comparison:
    """One paired comparison on a board: ``row − against`` of ``metric``.

    Attributes:
        against: the other row's label; metric: bare name; diff: the estimated difference;
        ci_low, ci_high: its 95 % percentile interval; p_value: bootstrap p; p_holm: Holm-adjusted
        over the board; verdict: words (set by :func:`decide`).
    """

    row: str
    against: str
    metric: str
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    boot: np.ndarray
    p_holm: float = math.nan
    holm_ci_low: float = math.nan
    holm_ci_high: float = math.nan
    verdict: str = ""

    def record(self) -> dict:
        """The comparison as a plain record (no bootstrap values)."""
        return {k: getattr(self, k) for k in ("against", "metric", "diff", "ci_low", "ci_high", "p_value", "p_holm",
                                              "holm_ci_low", "holm_ci_high", "verdict")}


def compare(boot: Bootstrap, a: RowRuns, b: RowRuns, metric: str, a_name: str, b_name: str,
            metric_b: str | None = None) -> Comparison:
    """Paired comparison of two rows scored on the same images (:func:`same_images`): ``metric``
    of ``a`` minus ``metric_b`` (default ``metric``) of ``b``. With ``b`` the same row as ``a``
    and ``metric_b`` a variant the same runs logged (BBAM's ``pseudo_masks/box_filled/instance_miou``
    beside ``pseudo_masks/instance_miou``), both share the image *and* the seed draws.

    Raises:
        ValueError: the rows were scored on different images.
    """
    if not same_images(a, b):
        raise ValueError(f"{a_name} and {b_name} were scored on different images; they are never compared")
    ea, ba = boot.row(a, metric)
    eb, bb = boot.row(b, metric_b or metric)
    d = ba - bb
    lo, hi = interval(d)
    return Comparison(row=a_name, against=b_name, metric=metric, diff=ea - eb, ci_low=lo, ci_high=hi,
                      p_value=bootstrap_p(d), boot=d)


def decide(comparisons: Sequence[Comparison], higher_is_better: bool) -> None:
    """Holm-correct the comparisons of one board and write each one's verdict in place:
    ``"beats X"`` / ``"worse than X"`` when the Holm-adjusted p < :data:`ALPHA`, else
    ``"not shown different from X"``; each with its interval at Holm's level for its rank."""
    adj = holm([c.p_value for c in comparisons])
    ranked = sorted((i for i, c in enumerate(comparisons) if math.isfinite(c.p_value)),
                    key=lambda i: comparisons[i].p_value)
    m = len(ranked)
    for k, i in enumerate(ranked):
        c = comparisons[i]
        c.holm_ci_low, c.holm_ci_high = interval(c.boot, 1 - ALPHA / (m - k))
    for c, p in zip(comparisons, adj):
        c.p_holm = p
        if math.isfinite(p) and p < ALPHA:
            better = (c.diff > 0) == higher_is_better
            c.verdict = f"beats {c.against}" if better else f"worse than {c.against}"
        else:
            c.verdict = f"not shown different from {c.against}"


def noise_words(row: RowRuns | None, n_seeds: int) -> str:
    """What a row's interval covers, in words."""
    if row is None:
        return "seeds only (no per-image results: test images held fixed)"
    n_images = len(row.runs[0].universe)
    if row.seed_free:
        return f"test images ({n_images}); seed-free"
    return f"test images ({n_images}) x seeds ({n_seeds})"


def rows_from_tables(tables: Mapping[str, object]) -> dict[str, PerImage]:
    """``{run id: PerImage}`` from ``{run id: pyarrow.Table}`` (:func:`weakbench.platform.results.read_per_image`)."""
    return {rid: PerImage(t) for rid, t in tables.items()}
