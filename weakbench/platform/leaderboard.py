"""The leaderboard: test numbers of validation-selected configurations, with seed intervals.

Semantics (Choe et al., CVPR 2020, "split discipline"; DESIGN.md "Evaluation protocol"):

* A **group** is one (dataset, method, backbone).
* A **configuration** is the set of runs of a group sharing ``config_group`` (the hash of the
  params without ``seed``; see :func:`weakbench.platform.results.config_group`).
* Selection: among the ``FINISHED`` runs whose metrics are all finite (a run with any NaN or
  infinite metric diverged and never selects) and that logged ``select_metric`` (default
  ``val/max_box_acc_v2``), the configuration with the best **mean over seeds** of that metric is
  chosen, in the metric's declared direction (:mod:`weakbench.methods.metric_declarations`; an
  undeclared or diagnostic metric is refused with a ConfigError). Ties go to the
  configuration with more seeds, then to the smaller ``config_group`` (deterministic).
* Report: the chosen configuration's ``<report_split>/*`` metrics (default ``test``), one value
  per seed (runs repeating a seed are averaged first), as mean, sample standard deviation
  (``ddof=1``) and a 95% percentile-bootstrap confidence interval of the mean over seeds
  (``n_boot`` resamples of the seeds with replacement). With one seed, std and the interval are
  NaN (rendered "n/a").
* Cost: ``n_trials`` counts every run of the group (failed ones included); ``gpu_hours`` and
  ``cpu_hours`` sum ``cost/gpu_hours`` and ``cost/cpu_hours`` over all those runs (the price of the
  whole search, not only of the winner).
* Paired comparison with the baseline (``cam``): the primary reported metric
  (``<report_split>/<name of select_metric>``) of this row and of the baseline's selected
  configuration for the same dataset and backbone, paired on seed. The mean paired difference
  gets a 95% percentile-bootstrap interval over the pairs and a paired t-test p-value
  (``scipy.stats.ttest_rel``). The verdict is "better/worse than cam beyond seed noise" when the
  interval excludes 0 **and** p < 0.05 (with 2–5 seeds the percentile bootstrap alone is too
  narrow: it cannot reach beyond the observed extremes), "within seed noise" otherwise, and
  "not enough seeds" with fewer than :data:`MIN_SEEDS_BEYOND_NOISE` (3) common seeds: the board
  refuses to call a difference beyond seed noise on two seeds (the mean difference is still shown).
* Seed-free rows (``seed_free``): a row all of whose selected runs are seed-free by
  :meth:`weakbench.methods.base.Method.seed_free` (the trivial baselines; a ``classifier_cam``
  method at ``epochs`` 0 from the pretrained backbone and head) gives the same value for every
  seed, so it is a constant in both comparisons (:func:`_differences`): another row's seeds are
  tested against it (one-sample, at least :data:`MIN_SEEDS_BEYOND_NOISE` seeds), and between two
  seed-free rows the difference is exact (verdict "…, exact: neither depends on the seed"; its
  interval is the difference itself and no p-value is computed).

* Trivial baselines (:data:`~weakbench.core.conventions.TRIVIAL_BASELINES`: ``center_gaussian``,
  ``whole_image``; Choe et al. 2020): per dataset, the trivial row with the best primary mean is
  *the best trivial baseline*, compared with every other row of the dataset whatever its
  backbone, against the baseline's mean as a constant (a fixed prior has no randomness: every
  seed gives the same value). ``below_trivial`` is True — the row is *marked* — unless the
  difference's 95 % bootstrap interval lies above 0 **and** the t-test's p < 0.05 with at least
  :data:`MIN_SEEDS_BEYOND_NOISE` seeds: with fewer seeds nothing is called beyond seed noise.
  ``below_trivial`` is null for the trivial rows and where the dataset has no trivial row.
* Box-supervised methods (BBAM, CCGR) log the same score for the box itself filled as the mask
  (``<split>/…/box_filled/<name>``, :func:`~weakbench.methods.metric_declarations.baseline_metric`):
  on a dataset without a trivial row, a row whose runs logged it is compared with it the same way,
  paired on seed over the same runs (``trivial_baseline = "box_filled"``). Where the runs have
  per-image results, every variant the method declares (``Method.compared_with_variants``: BBAM
  ``box_filled``, ``box_crf``; CCGR ``unrefined``, ``box_filled``) is compared instead on the
  paired image and seed bootstrap, Holm-corrected with the board's other comparisons
  (:func:`variant_pair` picks the metric), and the paired ``box_filled`` verdict replaces the
  seed-paired one.

The output is a :class:`pyarrow.Table`, one row per group, sorted by dataset then by the primary
metric (best first). Its schema metadata and its ``selected_on`` / ``reported_on`` columns say
which split selected and which split is reported.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from weakbench.core import conventions as C
from weakbench.methods import metric_declarations as D
from weakbench.core.errors import ConfigError
from weakbench.platform.results import finite_metric_rows, metric_columns

#: fewest seeds with which the trivial-baseline comparison calls a difference "beyond seed noise"
MIN_SEEDS_BEYOND_NOISE = 3

_FIXED_FIELDS = [
    pa.field("dataset", pa.string()),
    pa.field("method", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("selected_on", pa.string()),
    pa.field("reported_on", pa.string()),
    pa.field("select_metric", pa.string()),
    pa.field("select_mean", pa.float64()),
    pa.field("config_group", pa.string()),
    pa.field("params_json", pa.string()),
    pa.field("n_seeds", pa.int64()),
    pa.field("seed_free", pa.bool_()),
    pa.field("seeds", pa.list_(pa.int64())),
    pa.field("n_trials", pa.int64()),
    pa.field("n_failed", pa.int64()),
    pa.field("n_configs", pa.int64()),
    pa.field("run_ids", pa.list_(pa.string())),
    pa.field("experiment_id", pa.string()),
    pa.field("sweep_ids", pa.list_(pa.string())),
    pa.field("gpu_hours", pa.float64()),
    pa.field("cpu_hours", pa.float64()),
    pa.field("baseline_method", pa.string()),
    pa.field("baseline_n_pairs", pa.int64()),
    pa.field("baseline_diff_mean", pa.float64()),
    pa.field("baseline_diff_ci_low", pa.float64()),
    pa.field("baseline_diff_ci_high", pa.float64()),
    pa.field("baseline_p_value", pa.float64()),
    pa.field("baseline_verdict", pa.string()),
]
STAT_SUFFIXES = ("mean", "std", "ci_low", "ci_high", "n")


def higher_is_better(metric: str) -> bool:
    """Declared direction of a metric key like ``val/max_box_acc_v2``
    (:func:`weakbench.methods.metric_declarations.higher_is_better`; raises ConfigError for an
    undeclared or diagnostic metric)."""
    return D.higher_is_better(metric)


def _rng(seed: int, *key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(key).encode())])


def bootstrap_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (float64 (n,)).

    Returns ``(low, high)``; ``(nan, nan)`` when ``n < 2``. Resamples ``n`` values with
    replacement ``n_boot`` times and takes the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the
    resampled means (Efron & Tibshirani 1993, ch. 13).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    idx = rng.integers(0, n, size=(n_boot, n))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _per_seed(seeds: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """Average ``values`` per seed, ignoring NaN; returns ``{seed: mean}``."""
    out: dict[int, list[float]] = {}
    for s, v in zip(seeds.tolist(), values.tolist()):
        if not math.isnan(v):
            out.setdefault(int(s), []).append(v)
    return {s: float(np.mean(v)) for s, v in sorted(out.items())}


def _str_array(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].fill_null("").to_numpy(zero_copy_only=False), dtype=object)


def build_leaderboard(
    table: pa.Table,
    select_metric: str = D.DEFAULT_SELECT_METRIC,
    report_split: str = "test",
    baseline_method: str = "cam",
    n_boot: int = 2000,
    seed: int = 0,
    per_image: Mapping[str, pa.Table] | None = None,
) -> pa.Table:
    """Build the leaderboard from a results table (:data:`weakbench.platform.results.SCHEMA`).

    Args:
        table: one row per run (from :func:`weakbench.platform.results.read_store`).
        select_metric: MLflow metric key that selects the configuration, ``<split>/<name>``.
        report_split: split whose metrics are reported (``test``).
        baseline_method: method for the paired comparison.
        n_boot: bootstrap resamples (≥ 100).
        seed: seed of the bootstrap generator (each group also mixes in its own key, so results
            do not depend on row order).
        per_image: ``{run id: per-image table of the reported split}``
            (:func:`weakbench.platform.results.read_per_image`). A row all of whose selected runs
            have one gets intervals over test images and seeds and its declared comparisons
            (:mod:`weakbench.platform.verdicts`); the others keep seed-only statistics and say so
            in ``noise``.

    Returns:
        a table with the fixed columns listed in ``docs/results_schema.md`` plus, for every
        reported metric ``m`` (e.g. ``test/pxap``), columns ``m.mean``, ``m.std``, ``m.ci_low``,
        ``m.ci_high`` (float64, the metric's unit) and ``m.n`` (int64, seeds with a value).

    Raises:
        ConfigError: ``select_metric`` is not ``<split>/<name>``, is undeclared or a diagnostic
            (:mod:`weakbench.methods.metric_declarations`), ``n_boot`` < 100, or the selection split
            equals the reported split.
    """
    if "/" not in select_metric:
        raise ConfigError(f"select_metric {select_metric!r}: expected '<split>/<name>', e.g. 'val/max_box_acc_v2'")
    select_split, select_name = select_metric.split("/", 1)
    if select_split == report_split:
        raise ConfigError(
            f"select_metric {select_metric!r} and report_split {report_split!r}: selecting and reporting on the "
            f"same split overstates results (Choe et al. 2020); select on 'val', report on 'test'"
        )
    if n_boot < 100:
        raise ConfigError(f"n_boot={n_boot}: use at least 100 bootstrap resamples (2000 is the default)")
    primary = f"{report_split}/{select_name}"
    hib = higher_is_better(select_metric)

    missing = [c for c in ("dataset", "method", "backbone", "config_group", "status", "seed", "metrics", "run_id")
               if c not in table.column_names]
    if missing:
        raise ConfigError(f"results table: missing columns {missing}; build it with weakbench.platform.results")
    metrics = metric_columns(table)
    report_names = sorted((k for k in metrics if k.startswith(report_split + "/")), key=lambda k: (k != primary, k))
    if primary not in report_names:
        report_names.insert(0, primary)
        metrics[primary] = np.full(table.num_rows, np.nan)
    sel = metrics.get(select_metric, np.full(table.num_rows, np.nan))
    finite_row = finite_metric_rows(table)

    ds, me, bb = _str_array(table, "dataset"), _str_array(table, "method"), _str_array(table, "backbone")
    cg, status = _str_array(table, "config_group"), _str_array(table, "status")
    run_ids = _str_array(table, "run_id")
    exp_ids = _str_array(table, "experiment_id") if "experiment_id" in table.column_names else np.full(table.num_rows, "", object)
    sweep_ids = _str_array(table, "sweep_id") if "sweep_id" in table.column_names else np.full(table.num_rows, "", object)
    seeds = table["seed"].fill_null(-1).to_numpy()
    gpu = metrics.get(C.COST_GPU_HOURS, np.full(table.num_rows, np.nan))
    cpu = metrics.get(C.COST_CPU_HOURS, np.full(table.num_rows, np.nan))
    params_col = table["params"] if "params" in table.column_names else None

    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, key in enumerate(zip(ds.tolist(), me.tolist(), bb.tolist())):
        groups.setdefault(key, []).append(i)

    rows: list[dict[str, Any]] = []
    chosen_runs: dict[tuple[str, str, str], np.ndarray] = {}
    for key, idx_list in groups.items():
        idx = np.asarray(idx_list)
        # a diverged run (any metric NaN/inf) or a failed one never selects, even if it finished
        ok = idx[(status[idx] == "FINISHED") & finite_row[idx] & ~np.isnan(sel[idx])]
        if len(ok) == 0:
            continue
        # the one selection rule: the configuration with the best mean over seeds
        from weakbench.platform.selection import Candidate, config_means, select

        cands = [Candidate(int(i), cg[i], int(seeds[i]), float(sel[i]), (int(i),)) for i in ok.tolist()]
        g, _ = select(cands, hib)
        runs = ok[cg[ok] == g]
        score = config_means([c for c in cands if c.config == g])[g][0]
        chosen_runs[key] = runs
        row: dict[str, Any] = {
            "dataset": key[0], "method": key[1], "backbone": key[2],
            "selected_on": select_split, "reported_on": report_split, "select_metric": select_metric,
            "select_mean": score, "config_group": g,
            "params_json": _params_json(params_col, int(runs[0])),
            "seeds": sorted({int(s) for s in seeds[runs].tolist()}),
            "n_trials": len(idx), "n_failed": int(np.sum(status[idx] == "FAILED")),
            "n_configs": len(np.unique(cg[idx])),
            "run_ids": run_ids[runs].tolist(),
            "experiment_id": exp_ids[runs[0]] or None,
            "sweep_ids": sorted({s for s in sweep_ids[idx].tolist() if s}),
            "gpu_hours": _nansum(gpu[idx]), "cpu_hours": _nansum(cpu[idx]),
        }
        row["n_seeds"] = len(row["seeds"])
        row["seed_free"] = all(_seed_free(key[1], _params(params_col, int(r))) for r in runs)
        for m in report_names:
            per_seed = _per_seed(seeds[runs], metrics[m][runs])
            vals = np.array(list(per_seed.values()), dtype=np.float64)
            lo, hi = bootstrap_ci(vals, n_boot, _rng(seed, *key, m))
            row[f"{m}.mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}.std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m}.ci_low"], row[f"{m}.ci_high"] = lo, hi
            row[f"{m}.n"] = len(vals)
        rows.append(row)

    # paired comparison with the baseline's selected configuration (same dataset and backbone)
    by_key = {(r["dataset"], r["method"], r["backbone"]): r for r in rows}
    for row in rows:
        key = (row["dataset"], row["method"], row["backbone"])
        base_key = (row["dataset"], baseline_method, row["backbone"])
        row.update(baseline_method=baseline_method, baseline_n_pairs=0, baseline_diff_mean=math.nan,
                   baseline_diff_ci_low=math.nan, baseline_diff_ci_high=math.nan, baseline_p_value=math.nan)
        if row["method"] == baseline_method:
            row["baseline_verdict"] = "is the baseline"
            continue
        if base_key not in chosen_runs:
            row["baseline_verdict"] = f"no {baseline_method} run on this dataset and backbone"
            continue
        mine = _per_seed(seeds[chosen_runs[key]], metrics[primary][chosen_runs[key]])
        theirs = _per_seed(seeds[chosen_runs[base_key]], metrics[primary][chosen_runs[base_key]])
        diffs, how = _differences(mine, theirs, row["seed_free"], by_key[base_key]["seed_free"])
        row["baseline_n_pairs"] = len(diffs)
        if len(diffs):
            row["baseline_diff_mean"] = float(diffs.mean())
        if how == "exact":
            d = float(diffs[0]) if len(diffs) else math.nan
            better = d > 0 if higher_is_better(primary) else d < 0
            worse = d < 0 if higher_is_better(primary) else d > 0
            row["baseline_diff_ci_low"] = row["baseline_diff_ci_high"] = d
            row["baseline_verdict"] = (f"better than {baseline_method}, {EXACT}" if better else
                                       f"worse than {baseline_method}, {EXACT}" if worse else f"equal, {EXACT}")
            continue
        if len(diffs) < MIN_SEEDS_BEYOND_NOISE:
            row["baseline_verdict"] = "not enough seeds"
            continue
        lo, hi = bootstrap_ci(diffs, n_boot, _rng(seed, *key, "paired", primary))
        row["baseline_diff_ci_low"], row["baseline_diff_ci_high"] = lo, hi
        row["baseline_p_value"] = _paired_p(diffs)
        significant = row["baseline_p_value"] < 0.05  # NaN compares False
        better, worse = (lo > 0, hi < 0) if higher_is_better(primary) else (hi < 0, lo > 0)
        better, worse = better and significant, worse and significant
        if better:
            row["baseline_verdict"] = f"better than {baseline_method} beyond seed noise"
        elif worse:
            row["baseline_verdict"] = f"worse than {baseline_method} beyond seed noise"
        else:
            row["baseline_verdict"] = "within seed noise"

    box_key = D.baseline_metric(primary)
    box_values = metrics.get(box_key) if box_key else None
    _compare_with_trivial(rows, chosen_runs, seeds, metrics[primary], primary, n_boot, seed, box_values)

    report_names += _image_verdicts(rows, chosen_runs, per_image or {}, run_ids, seeds, metrics, report_split,
                                    primary, hib, n_boot, seed)
    _flag_rows(rows, chosen_runs, seeds, metrics, report_names)

    sign = -1.0 if hib else 1.0
    rows.sort(key=lambda r: (r["dataset"], _nan_last(sign * r[f"{primary}.mean"]), r["method"], r["backbone"]))
    fields = list(_FIXED_FIELDS) + list(_TRIVIAL_FIELDS) + list(_IMAGE_FIELDS)
    for m in report_names:
        fields += [pa.field(f"{m}.{s}", pa.int64() if s == "n" else pa.float64()) for s in STAT_SUFFIXES]
    schema = pa.schema(fields, metadata={
        b"weakbench.selected_on": select_split.encode(), b"weakbench.reported_on": report_split.encode(),
        b"weakbench.select_metric": select_metric.encode(), b"weakbench.primary_metric": primary.encode(),
        b"weakbench.baseline_method": baseline_method.encode(), b"weakbench.n_boot": str(n_boot).encode(),
        b"weakbench.box_baseline_metric": (box_key if box_values is not None else "").encode(),
    })
    return pa.Table.from_pylist(rows, schema=schema)


def _compare_with_trivial(rows: list[dict[str, Any]], chosen_runs: dict, seeds: np.ndarray, values: np.ndarray,
                          primary: str, n_boot: int, seed: int, box_values: np.ndarray | None = None) -> None:
    """Fill ``trivial_*`` and ``below_trivial`` of every row in place (module docstring)."""
    hib = higher_is_better(primary)
    for row in rows:
        row.update(trivial_baseline=None, trivial_n=0, trivial_diff_mean=math.nan, trivial_diff_ci_low=math.nan,
                   trivial_diff_ci_high=math.nan, trivial_p_value=math.nan, below_trivial=None)
    for ds in sorted({r["dataset"] for r in rows}):
        trivial = [r for r in rows if r["dataset"] == ds and r["method"] in C.TRIVIAL_BASELINES
                   and not math.isnan(r[f"{primary}.mean"])]
        if not trivial:
            for r in rows:
                if r["dataset"] != ds:
                    continue
                key = (r["dataset"], r["method"], r["backbone"])
                box = (_per_seed(seeds[chosen_runs[key]], box_values[chosen_runs[key]])
                       if box_values is not None else {})
                if not box:
                    r["trivial_verdict"] = "no trivial baseline on this dataset"
                    continue
                # the same runs' box-filled masks: paired on seed, never a constant
                mine = _per_seed(seeds[chosen_runs[key]], values[chosen_runs[key]])
                common = sorted(set(mine) & set(box))
                _trivial_verdict(r, np.array([mine[s] - box[s] for s in common]), "box_filled", "the box-filled masks",
                                 hib, n_boot, _rng(seed, *key, "box_filled", primary))
            continue
        best = max(trivial, key=lambda r: (r[f"{primary}.mean"] if hib else -r[f"{primary}.mean"]))
        bkey = (best["dataset"], best["method"], best["backbone"])
        theirs = _per_seed(seeds[chosen_runs[bkey]], values[chosen_runs[bkey]])
        for r in rows:
            if r["dataset"] != ds:
                continue
            r["trivial_baseline"] = best["method"]
            if r["method"] in C.TRIVIAL_BASELINES:
                r["trivial_verdict"] = "is the best trivial baseline" if r is best else "is a trivial baseline"
                continue
            key = (r["dataset"], r["method"], r["backbone"])
            mine = _per_seed(seeds[chosen_runs[key]], values[chosen_runs[key]])
            # a fixed prior is seed-free: its mean is its value for every seed
            diffs, how = _differences(mine, theirs, r["seed_free"], True)
            _trivial_verdict(r, diffs, best["method"], best["method"], hib, n_boot, _rng(seed, *key, "trivial", primary),
                             exact=how == "exact")


#: the operating point: test accuracy at the thresholds chosen on validation (bare names)
AT_VAL_TAU = {"max_box_acc_at_val_tau": ("best_threshold",),
              "max_box_acc_v2_at_val_tau": ("best_threshold_v2_iou30", "best_threshold_v2_iou50",
                                            "best_threshold_v2_iou70"),
              # the semantic mIoU at the background threshold chosen on val (Puzzle-CAM's operating point)
              "miou_at_val_tau": ("best_bg_threshold",)}

_VERDICT_TYPE = pa.struct([
    pa.field("against", pa.string()), pa.field("metric", pa.string()), pa.field("diff", pa.float64()),
    pa.field("ci_low", pa.float64()), pa.field("ci_high", pa.float64()), pa.field("p_value", pa.float64()),
    pa.field("p_holm", pa.float64()), pa.field("holm_ci_low", pa.float64()), pa.field("holm_ci_high", pa.float64()),
    pa.field("verdict", pa.string()),
])
_IMAGE_FIELDS = [
    pa.field("n_images", pa.int64()), pa.field("noise", pa.string()),
    pa.field("verdicts", pa.list_(_VERDICT_TYPE)), pa.field("flags", pa.list_(pa.string())),
    pa.field("diagnostics", pa.list_(pa.string())),
]


def _row_runs(runs: np.ndarray, run_ids: np.ndarray, seeds: np.ndarray, metrics: dict[str, np.ndarray],
              per_image: Mapping[str, Any], seed_free: bool):
    """The :class:`~weakbench.platform.verdicts.RowRuns` of a row's selected runs (one run per
    seed, the first; one run in all when seed-free), or ``None`` when one lacks per-image results
    or they cover different images. The runs are in ascending seed order, so that the bootstrap's
    seed draws, and with them the intervals, do not depend on the order the store lists runs in."""
    from weakbench.platform.verdicts import RowRuns, consistent

    first: dict[int, int] = {}
    for r in runs.tolist():
        first.setdefault(int(seeds[r]), r)
    by_seed = [first[s] for s in sorted(first)]
    chosen = by_seed[:1] if seed_free else by_seed
    if not chosen or any(run_ids[r] not in per_image for r in chosen):
        return None
    taus = []
    for r in chosen:
        t: dict[str, Any] = {}
        v1 = metrics.get("val/best_threshold")
        if v1 is not None and not math.isnan(v1[r]):
            t["max_box_acc"] = float(v1[r])
        v2 = [metrics.get(f"val/best_threshold_v2_iou{d}") for d in (30, 50, 70)]
        if all(v is not None and not math.isnan(v[r]) for v in v2):
            t["max_box_acc_v2"] = {d: float(v[r]) for d, v in zip((30, 50, 70), v2)}
        bg = metrics.get("val/best_bg_threshold")
        if bg is not None and not math.isnan(bg[r]):
            t["miou"] = float(bg[r])
        taus.append(t or None)
    row = RowRuns([per_image[run_ids[r]] for r in chosen], seed_free=seed_free, taus=taus)
    return row if consistent(row) else None


def _image_verdicts(rows: list[dict[str, Any]], chosen_runs: dict, per_image: Mapping[str, Any], run_ids: np.ndarray,
                    seeds: np.ndarray, metrics: dict[str, np.ndarray], report_split: str, primary: str, hib: bool,
                    n_boot: int, seed: int) -> list[str]:
    """Intervals over test images and seeds, the declared paired comparisons with Holm's
    correction per dataset, and the operating point, for the rows with per-image results
    (:mod:`weakbench.platform.verdicts`); fills ``n_images``, ``noise``, ``verdicts`` of every row
    in place and overwrites the ``baseline_*`` / ``trivial_*`` fields from the paired comparison
    where one was made. Returns the operating-point keys added to the reported metrics."""
    from weakbench.core.metrics.per_image import PerImage
    from weakbench.platform.verdicts import Bootstrap, can_compute, compare, decide, interval, noise_words, same_images

    cache: dict[str, PerImage] = {}

    def load(rid: str) -> PerImage:
        if rid not in cache:
            cache[rid] = PerImage(per_image[rid])
        return cache[rid]

    data = _LazyPerImage(per_image, load)
    resolved: dict[tuple[str, str, str], Any] = {}
    for r in rows:
        key = (r["dataset"], r["method"], r["backbone"])
        rr = _row_runs(chosen_runs[key], run_ids, seeds, metrics, data, r["seed_free"]) if per_image else None
        r["n_images"] = len(rr.runs[0].universe) if rr is not None else None
        r["noise"] = noise_words(rr, r["n_seeds"])
        r["verdicts"] = []
        if rr is not None:
            resolved[key] = rr
    added = [f"{report_split}/{m}" for m in AT_VAL_TAU if any(can_compute(rr, m) for rr in resolved.values())]
    for r in rows:
        for m in added:
            for suffix in STAT_SUFFIXES:
                r[f"{m}.{suffix}"] = 0 if suffix == "n" else math.nan
    primary_bare = primary.split("/", 1)[1]
    for ds in sorted({r["dataset"] for r in rows}):
        boot = Bootstrap(n_boot, _rng(seed, ds, "images"))
        board = sorted((r for r in rows if r["dataset"] == ds), key=lambda r: (r["method"], r["backbone"]))
        for r in board:  # intervals of every recomputable metric, in a fixed order
            key = (r["dataset"], r["method"], r["backbone"])
            rr = resolved.get(key)
            if rr is None:
                continue
            for m in [k for k in r if k.endswith(".mean")]:
                name = m[: -len(".mean")]
                bare = name.split("/", 1)[1] if "/" in name else name
                if not name.startswith(report_split + "/"):
                    continue
                if not can_compute(rr, bare):
                    continue
                est, b = boot.row(rr, bare)
                lo, hi = interval(b)
                r[f"{name}.ci_low"], r[f"{name}.ci_high"] = lo, hi
                if bare in AT_VAL_TAU:
                    r[f"{name}.mean"], r[f"{name}.n"] = est, len(rr.runs)
        comparisons, owners = [], []
        for r in board:
            key = (r["dataset"], r["method"], r["backbone"])
            rr = resolved.get(key)
            if rr is None or not can_compute(rr, primary_bare):
                continue
            for other in _compared_with(r["method"]):
                against = _comparator(board, other, r["backbone"], primary, hib)
                if against is None:
                    continue
                okey = (against["dataset"], against["method"], against["backbone"])
                orr = resolved.get(okey)
                if orr is None or not can_compute(orr, primary_bare) or not same_images(rr, orr):
                    continue
                label = against["method"] if against["backbone"] == r["backbone"] else \
                    f"{against['method']} ({against['backbone']})"
                comparisons.append(compare(boot, rr, orr, primary_bare, r["method"], label))
                owners.append((r, against))
            # the variants the same runs logged as their own baselines (BBAM: box_filled, box_crf;
            # CCGR: unrefined, box_filled), on the same image and seed draws
            available = [k[: -len(".mean")].split("/", 1)[1] for k in r if k.endswith(".mean")
                         and k.startswith(report_split + "/")]
            for v in _compared_with_variants(r["method"]):
                pair = variant_pair(primary_bare, v, available)
                if pair is None or not can_compute(rr, pair[0]) or not can_compute(rr, pair[1]):
                    continue
                comparisons.append(compare(boot, rr, rr, pair[0], r["method"], v, metric_b=pair[1]))
                owners.append((r, {"dataset": r["dataset"], "method": v, "backbone": r["backbone"]}))
        decide(comparisons, hib)
        for c, (r, against) in zip(comparisons, owners):
            r["verdicts"].append(c.record())
            _legacy_fields(r, against, c, primary)
    return added


class _LazyPerImage(dict):
    """``{run id: PerImage}`` read on first use (a board rarely needs every stored table)."""

    def __init__(self, tables: Mapping[str, Any], load):
        super().__init__()
        self._tables, self._load = tables, load

    def __contains__(self, rid: object) -> bool:
        return rid in self._tables

    def __getitem__(self, rid: str):
        return self._load(rid)


def variant_pair(primary: str, variant: str, available: Sequence[str]) -> tuple[str, str] | None:
    """The metric a row is compared with its ``variant`` on (bare names): the headline
    ``<head>/<name>`` against ``<head>/<variant>/<name>`` when the run logged that; else the first
    (sorted) ``<other head>/<name>`` with ``<other head>/<variant>/<name>`` logged (CCGR's variants
    are of its pseudo masks, ``pseudo_masks_with_labels/unrefined/map_r50``, not of its headline
    ``mask_rcnn/map_r50``). ``None`` when the variant of the headline's name was not logged.

    >>> variant_pair("pseudo_masks/instance_miou", "box_filled",
    ...              ["pseudo_masks/instance_miou", "pseudo_masks/box_filled/instance_miou"])
    ('pseudo_masks/instance_miou', 'pseudo_masks/box_filled/instance_miou')
    """
    head, _, name = primary.rpartition("/")
    have = set(available)

    def key(h: str, *parts: str) -> str:
        return "/".join(p for p in (h, *parts) if p)

    if key(head, variant, name) in have:
        return primary, key(head, variant, name)
    for m in sorted(have):
        h, _, n = m.rpartition("/")
        if n == name and not h.endswith(variant) and key(h, variant, name) in have:
            return m, key(h, variant, name)
    return None


def _compared_with_variants(method: str) -> tuple[str, ...]:
    """The metric variants ``method`` declares as its own baselines (``Method.compared_with_variants``)."""
    from weakbench.methods import get_method_class

    try:
        return tuple(get_method_class(method).compared_with_variants)
    except Exception:  # noqa: BLE001 - a store written by another version
        return ()


def _compared_with(method: str) -> tuple[str, ...]:
    """The rows ``method`` declares it is compared against (``Method.compared_with``); none for a
    name no registered method has."""
    from weakbench.methods import get_method_class

    try:
        return tuple(get_method_class(method).compared_with)
    except Exception:  # noqa: BLE001 - a store written by another version
        return ()


def _comparator(board: list[dict[str, Any]], method: str, backbone: str, primary: str, hib: bool):
    """The row of ``method`` on this board to compare with: the one with the same backbone, else
    (a trivial baseline has none) the best of its rows by the primary mean."""
    rows = [r for r in board if r["method"] == method]
    same = [r for r in rows if r["backbone"] == backbone]
    if same:
        return same[0]
    rows = [r for r in rows if not math.isnan(r[f"{primary}.mean"])]
    if not rows:
        return None
    return max(rows, key=lambda r: r[f"{primary}.mean"] if hib else -r[f"{primary}.mean"])


def _legacy_fields(r: dict[str, Any], against: dict[str, Any], c, primary: str) -> None:
    """Overwrite the seed-only ``baseline_*`` / ``trivial_*`` fields of ``r`` with the paired
    comparison ``c`` over test images and seeds, where it compares with the same row."""
    if r.get("baseline_method") == against["method"] and against["backbone"] == r["backbone"]:
        r.update(baseline_n_pairs=len(r["seeds"]), baseline_diff_mean=c.diff, baseline_diff_ci_low=c.ci_low,
                 baseline_diff_ci_high=c.ci_high, baseline_p_value=c.p_holm,
                 baseline_verdict=f"{c.verdict} (paired over test images and seeds, Holm)")
    if r.get("trivial_baseline") == against["method"] and c.metric == primary.split("/", 1)[-1]:
        beats = c.verdict.startswith("beats")
        r.update(trivial_n=len(r["seeds"]), trivial_diff_mean=c.diff, trivial_diff_ci_low=c.ci_low,
                 trivial_diff_ci_high=c.ci_high, trivial_p_value=c.p_holm, below_trivial=not beats,
                 trivial_verdict=f"{c.verdict} (paired over test images and seeds, Holm)")


def _flag_rows(rows: list[dict[str, Any]], chosen_runs: dict, seeds: np.ndarray, metrics: dict[str, np.ndarray],
               report_names: list[str]) -> None:
    """``flags``: a row's mechanism checks in words. A trained row (not seed-free) whose seeds
    give identical values of every reported metric is degenerate (``"degenerate: seeds
    identical"``). ``diagnostics``: the method's ``row_diagnostics`` in words (never a flag)."""
    for r in rows:
        flags = list(r.get("flags") or [])
        key = (r["dataset"], r["method"], r["backbone"])
        runs = chosen_runs[key]
        if not r["seed_free"] and r["n_seeds"] >= 2:
            same = True
            for m in report_names:
                if m not in metrics:
                    continue
                per = _per_seed(seeds[runs], metrics[m][runs])
                vals = np.array(list(per.values()))
                if len(vals) >= 2 and not np.all(vals == vals[0]):
                    same = False
                    break
            if same:
                flags.append(f"degenerate: seeds identical ({r['n_seeds']} seeds give the same metrics)")
        for check in _mechanism_checks(r["method"]):
            value = _logged_mean(metrics, runs, check.metric)
            if check.fails(value):
                flags.append(check.words.format(value=value))
        notes = (d.text({m: _logged_mean(metrics, runs, m) for m in d.metrics})
                 for d in _mechanism_checks(r["method"], "row_diagnostics"))
        r["diagnostics"] = [n for n in notes if n]
        acc, chance = _logged_mean(metrics, runs, "cls_acc", ("test",)), _logged_mean(metrics, runs, "cls_chance", ("test",))
        if not math.isnan(acc) and not math.isnan(chance):
            if acc < CHANCE_FACTOR * chance:
                flags.append(f"classifier near chance: test top-1 {acc:.2f} % (chance {chance:.2f} %)")
            elif acc < WEAK_CLASSIFIER:
                flags.append(f"weak classifier: test top-1 {acc:.2f} % (chance {chance:.2f} %)")
        r["flags"] = flags


#: a classifier row is flagged "near chance" below this multiple of chance, "weak" below
#: :data:`WEAK_CLASSIFIER` percent top-1 (its GT-known CAMs come from a classifier that barely
#: tells the classes apart)
CHANCE_FACTOR = 5.0
WEAK_CLASSIFIER = 20.0


def _mechanism_checks(method: str, attribute: str = "mechanism_checks"):
    """``Method.mechanism_checks`` (or another such tuple, ``row_diagnostics``) of a registered
    method (none for an unknown name)."""
    from weakbench.methods import get_method_class

    try:
        return tuple(getattr(get_method_class(method), attribute, ()))
    except Exception:  # noqa: BLE001 - a store written by another version
        return ()


def _logged_mean(metrics: dict[str, np.ndarray], runs: np.ndarray, name: str,
                 splits: tuple[str, ...] = ("test", "val", "train")) -> float:
    """Mean over ``runs`` of the first logged key ``<split>/…/<name>`` (splits in order); NaN when
    none is logged."""
    for split in splits:
        keys = sorted(k for k in metrics if k.startswith(split + "/") and (k == f"{split}/{name}"
                                                                          or k.endswith("/" + name)))
        for k in keys:
            v = metrics[k][runs]
            if np.any(~np.isnan(v)):
                return float(np.nanmean(v))
    return math.nan


def _trivial_verdict(r: dict[str, Any], diffs: np.ndarray, baseline: str, name: str, hib: bool, n_boot: int,
                     rng: np.random.Generator, exact: bool = False) -> None:
    """Fill one row's ``trivial_*`` fields from its differences with the baseline (``name`` in the
    verdict); ``exact``: one exact difference of two seed-free rows (:func:`_differences`)."""
    r["trivial_baseline"] = baseline
    r["trivial_n"] = len(diffs)
    r["trivial_diff_mean"] = float(diffs.mean()) if len(diffs) else math.nan
    if exact and len(diffs):
        d = float(diffs[0])
        beats = d > 0 if hib else d < 0
        r["trivial_diff_ci_low"] = r["trivial_diff_ci_high"] = d
        r["below_trivial"] = not beats
        r["trivial_verdict"] = f"beats {name}, {EXACT}" if beats else f"does not beat {name}, {EXACT}"
        return
    if len(diffs) < MIN_SEEDS_BEYOND_NOISE:
        r["below_trivial"] = True
        r["trivial_verdict"] = f"{len(diffs)} seed(s): fewer than {MIN_SEEDS_BEYOND_NOISE}, not shown to beat {name}"
        return
    lo, hi = bootstrap_ci(diffs, n_boot, rng)
    p = _paired_p(diffs)
    r["trivial_diff_ci_low"], r["trivial_diff_ci_high"], r["trivial_p_value"] = lo, hi, p
    beats = (lo > 0 if hib else hi < 0) and p < 0.05
    r["below_trivial"] = not beats
    r["trivial_verdict"] = f"beats {name} beyond seed noise" if beats else f"does not beat {name} beyond seed noise"


_TRIVIAL_FIELDS = [
    pa.field("trivial_baseline", pa.string()), pa.field("trivial_n", pa.int64()),
    pa.field("trivial_diff_mean", pa.float64()), pa.field("trivial_diff_ci_low", pa.float64()),
    pa.field("trivial_diff_ci_high", pa.float64()), pa.field("trivial_p_value", pa.float64()),
    pa.field("trivial_verdict", pa.string()), pa.field("below_trivial", pa.bool_()),
]


def _neg_str(s: str) -> tuple[int, ...]:
    """Sort key that prefers the lexicographically smaller string inside a max()."""
    return tuple(-ord(c) for c in s)


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _nansum(x: np.ndarray) -> float:
    return float(np.nansum(x)) if np.any(~np.isnan(x)) else math.nan


def _paired_p(diffs: np.ndarray) -> float:
    """Two-sided paired t-test p-value of mean(diffs) = 0 (Student's t, n-1 degrees of freedom);
    the same number as ``scipy.stats.ttest_rel`` without importing ``scipy.stats`` (1 s)."""
    from scipy.special import stdtr

    n = len(diffs)
    if n < 2:
        return math.nan
    sd = float(np.std(diffs, ddof=1))
    if sd == 0.0:  # identical differences: certain if non-zero, no evidence if all zero
        return 0.0 if float(diffs[0]) != 0.0 else 1.0
    t = float(np.mean(diffs)) / (sd / math.sqrt(n))
    return float(2.0 * stdtr(n - 1, -abs(t)))


#: the verdicts' words for a difference between two seed-free rows (:func:`_differences`)
EXACT = "exact: neither depends on the seed"


def _differences(mine: dict[int, float], theirs: dict[int, float], mine_free: bool,
                 theirs_free: bool) -> tuple[np.ndarray, str]:
    """The differences (this row − baseline, per seed) a verdict is drawn from, and how:

    * ``"exact"``, both rows seed-free (:meth:`weakbench.methods.base.Method.seed_free`): the one
      difference of their means, exact — there is no seed noise to test against;
    * ``"constant"``, the baseline seed-free: each of this row's seeds minus the baseline's mean
      (a one-sample test of this row's seed spread);
    * ``"constant_mine"``, this row seed-free: its mean minus each of the baseline's seeds;
    * ``"paired"``, neither: paired on the common seeds.
    """
    if mine_free and theirs_free:
        if not mine or not theirs:
            return np.array([]), "exact"
        return np.array([np.mean(list(mine.values())) - np.mean(list(theirs.values()))]), "exact"
    if theirs_free:
        const = float(np.mean(list(theirs.values()))) if theirs else math.nan
        return np.array([v - const for v in mine.values()]), "constant"
    if mine_free:
        const = float(np.mean(list(mine.values()))) if mine else math.nan
        return np.array([const - v for v in theirs.values()]), "constant_mine"
    common = sorted(set(mine) & set(theirs))
    return np.array([mine[s] - theirs[s] for s in common]), "paired"


def _seed_free(method: str, params: dict[str, str]) -> bool:
    """:meth:`Method.seed_free` of a registered method on the typed config of a run's MLflow
    ``params`` (:func:`typed_config`); False for a name no method has (a store written by another
    version)."""
    from weakbench.methods import get_method_class

    try:
        cls = get_method_class(method)
    except Exception:  # noqa: BLE001 - unknown method name: treat as seed-dependent
        return False
    return bool(cls.seed_free(typed_config(cls, params)))


def typed_config(cls, params: Mapping[str, str]):
    """The tracking boundary's adapter: a run's MLflow ``params`` (every value stored as text,
    ``str(value)``) as method ``cls``'s typed config. Each text is read back as the Python literal it
    was written from (``"0"`` → 0, ``"True"`` → True, ``"None"`` → None, ``"(0.5, 0.75)"`` → a
    tuple; anything else stays text); keys the schema does not have (a retired field, the engine's
    own params) are dropped and missing fields take the schema's defaults. Built without
    validation (``model_construct``): a stored run is read, not re-checked (its weights file or
    backbone may not exist here)."""
    import ast

    def value(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text

    fields = cls.Config.model_fields
    return cls.Config.model_construct(**{k: value(v) for k, v in params.items() if k in fields})


def _params(params_col: pa.ChunkedArray | None, i: int) -> dict[str, str]:
    """Run ``i``'s MLflow params as ``{name: text}`` (empty without a params column)."""
    if params_col is None:
        return {}
    items = params_col[i].as_py() or []
    return {str(k): str(v) for k, v in (items if isinstance(items, list) else items.items())}


def _params_json(params_col: pa.ChunkedArray | None, i: int) -> str:
    """Run ``i``'s params without ``seed`` as sorted-keys JSON (``"{}"`` without a params column)."""
    d = _params(params_col, i)
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True)


def _display_rank(key: str) -> int:
    """Position of a reported key among the scores people quote
    (:data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER`); variants, diagnostics and
    undeclared metrics come after them."""
    spec = D.lookup(key)
    if spec is None or spec.base or spec.direction is None or spec.name not in D.DISPLAY_ORDER:
        return len(D.DISPLAY_ORDER)
    return D.DISPLAY_ORDER.index(spec.name)


def _box_column(lb: pa.Table) -> str:
    """The reported key of the box-filled baseline of the primary metric, ``""`` when not logged."""
    return (lb.schema.metadata or {}).get(b"weakbench.box_baseline_metric", b"").decode()


def leaderboard_metrics(lb: pa.Table) -> list[str]:
    """Reported metric keys of a leaderboard in display order: the primary (selecting) metric,
    its box-filled baseline when logged (BBAM, CCGR), then the declared scores in
    :data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER`, then the others (thresholds,
    counts, variants) as stored, e.g. ``["test/max_box_acc_v2", "test/max_box_acc", "test/pxap", ...]``."""
    names = [c[: -len(".mean")] for c in lb.column_names if c.endswith(".mean")]
    if not names:
        return names
    box = _box_column(lb)
    rest = sorted(names[1:], key=lambda n: (n != box, _display_rank(n), names.index(n)))
    return names[:1] + rest


def format_stat(mean: float | None, std: float | None, lo: float | None, hi: float | None, digits: int = 2) -> str:
    """``"61.20 ± 1.30 [59.9, 62.5]"``; ``"61.20 ± n/a"`` with one seed; ``"—"`` without value."""
    if mean is None or math.isnan(mean):
        return "—"
    s = f"{mean:.{digits}f} ± " + ("n/a" if std is None or math.isnan(std) else f"{std:.{digits}f}")
    if lo is not None and not math.isnan(lo):
        s += f" [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]"
    return s


def title(lb: pa.Table) -> str:
    """``"Leaderboard — selected on val (val/max_box_acc_v2), reported on test"``."""
    meta = lb.schema.metadata or {}
    sel = meta.get(b"weakbench.selected_on", b"val").decode()
    rep = meta.get(b"weakbench.reported_on", b"test").decode()
    metric = meta.get(b"weakbench.select_metric", b"?").decode()
    return f"Leaderboard — selected on {sel} ({metric}), reported on {rep}"


def board_caption(lb: pa.Table) -> str:
    """The line under a printed board: what its intervals cover and what ✗ means."""
    if any(r.get("n_images") for r in lb.to_pylist()):
        return ("mean ± std over seeds [95% CI: a bootstrap over test images and seeds where the row has per-image "
                "results ('interval covers'), else over seeds only]; ✗ (red): not shown to beat the best trivial "
                "baseline; verdicts paired image by image, Holm-corrected over the board's comparisons; a seed-free "
                "row (the trivial baselines, a 0-epoch pretrained CAM) has no seed noise, but test-image noise")
    return ("mean ± std over seeds [95% bootstrap CI over seeds only: no per-image results, test images held "
            f"fixed]; n/a with one seed; ✗ (red): does not beat the best trivial baseline beyond seed noise "
            f"(≥ {MIN_SEEDS_BEYOND_NOISE} seeds needed); a seed-free row (the trivial baselines, a 0-epoch "
            "pretrained CAM) is a constant here")


def render_rich(lb: pa.Table, max_metrics: int = 5):
    """A :class:`rich.table.Table` of the leaderboard whose title says which split selected and
    which split is reported. Shows the primary metric and up to ``max_metrics - 1`` headline
    metrics (the box-filled baseline, then :data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER`)
    as ``mean ± std [95% CI]``, seeds/trials, cost and the
    comparison with the baseline."""
    from rich.table import Table
    from rich.markup import escape

    names = shown_metrics(lb, max_metrics)
    t = Table(title=title(lb), caption=board_caption(lb))
    for col in ("dataset", "method", "backbone", "seeds/trials"):
        t.add_column(col)
    meta = lb.schema.metadata or {}
    t.add_column(meta.get(b"weakbench.select_metric", b"val").decode() + " (mean)", justify="right")
    for m in names:
        spec = D.lookup(m)  # the paper's name above the key, so a truncated key still reads
        t.add_column(f"{spec.display}\n{m}" if spec else m, justify="right")
    t.add_column("GPU-h / CPU-h", justify="right")
    base = meta.get(b"weakbench.baseline_method", b"cam").decode()
    t.add_column(f"vs {base}")
    t.add_column("vs best trivial baseline")
    image_rows = any(r.get("verdicts") or r.get("flags") or r.get("diagnostics") for r in lb.to_pylist())
    if image_rows:
        t.add_column("interval covers")
        t.add_column("paired verdicts (95 % CI; Holm over the board)")
        t.add_column("flags")
        t.add_column("row diagnostics")
    for r in lb.to_pylist():
        diff = r["baseline_diff_mean"]
        vs = r["baseline_verdict"] or ""
        if diff is not None and not math.isnan(diff):
            vs = f"{diff:+.2f}: {vs}"
        cost = f"{_fmt(r['gpu_hours'])} / {_fmt(r['cpu_hours'])}"
        t.add_row(
            escape(r["dataset"]), escape(r["method"]), escape(r["backbone"]), f"{r['n_seeds']}/{r['n_trials']}",
            _fmt(r["select_mean"]),
            *[format_stat(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.ci_low"], r[f"{m}.ci_high"]) for m in names],
            cost, escape(vs), escape(trivial_cell(r)),
            *([escape(r.get("noise") or ""), escape(verdicts_cell(r)), escape("; ".join(r.get("flags") or [])),
               escape("; ".join(r.get("diagnostics") or []))] if image_rows else []),
            style="red" if r.get("below_trivial") else None,
        )
    return t


def verdicts_cell(r: dict[str, Any]) -> str:
    """A row's paired verdicts, one per line: ``"+5.77 [+1.2, +10.3]: beats center_gaussian (none)"``."""
    lines = []
    for v in r.get("verdicts") or []:
        lines.append(f"{_fmt_signed(v['diff'])} [{_fmt_signed(v['ci_low'], 1)}, {_fmt_signed(v['ci_high'], 1)}]: "
                     f"{v['verdict']}")
    return "\n".join(lines)


def _fmt_signed(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def shown_metrics(lb: pa.Table, max_metrics: int = 5) -> list[str]:
    """The metrics a printed board shows: the primary one, then the box-filled baseline and the
    headline metrics of :data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER`, at most
    ``max_metrics``."""
    reported = leaderboard_metrics(lb)
    box = _box_column(lb)
    headline = [n for n in reported[1:] if n == box or _display_rank(n) < len(D.DISPLAY_ORDER)]
    return (reported[:1] + headline)[:max_metrics]


def board_columns(lb: pa.Table, max_metrics: int = 5) -> list:
    """The columns of the printed board for :func:`weakbench.platform.output.render`, over the
    records ``lb.to_pylist()``: the same cells as :func:`render_rich`; csv/json export each metric's
    mean, std and 95 % CI bounds and the comparisons' numbers. A new board column is one more entry."""
    from weakbench.platform.output import Column

    meta = lb.schema.metadata or {}
    base = meta.get(b"weakbench.baseline_method", b"cam").decode()
    select = meta.get(b"weakbench.select_metric", b"val").decode()

    def stat(m: str):
        return lambda r: format_stat(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.ci_low"], r[f"{m}.ci_high"])

    def vs_base(r) -> str:
        diff, vs = r.get("baseline_diff_mean"), r.get("baseline_verdict") or ""
        return f"{diff:+.2f}: {vs}" if diff is not None and not math.isnan(diff) else vs

    def flagged(r) -> str | None:
        return "red" if r.get("below_trivial") else None

    cols = [Column("dataset", "dataset", style=flagged), Column("method", "method", style=flagged),
            Column("backbone", "backbone", style=flagged),
            Column("n_seeds", "seeds/trials", text=lambda r: f"{r['n_seeds']}/{r['n_trials']}", fields=("n_seeds", "n_trials")),
            Column("select_mean", f"{select} (mean)", kind="number", text=lambda r: _fmt(r["select_mean"]))]
    for m in shown_metrics(lb, max_metrics):
        spec = D.lookup(m)
        cols.append(Column(m, f"{spec.display}\n{m}" if spec else m, kind="number", text=stat(m), style=flagged,
                           fields=tuple(f"{m}.{k}" for k in ("mean", "std", "ci_low", "ci_high"))))
    cols += [Column("gpu_hours", "GPU-h / CPU-h", kind="number", text=lambda r: f"{_fmt(r['gpu_hours'])} / {_fmt(r['cpu_hours'])}",
                    fields=("gpu_hours", "cpu_hours")),
             Column("baseline_verdict", f"vs {base}", text=vs_base, fields=("baseline_diff_mean", "baseline_verdict")),
             Column("trivial_verdict", "vs best trivial baseline", text=trivial_cell, style=flagged,
                    fields=("trivial_diff_mean", "trivial_verdict", "below_trivial"))]
    if any(r.get("verdicts") or r.get("flags") or r.get("diagnostics") for r in lb.to_pylist()):
        cols += [Column("noise", "interval covers"),
                 Column("verdicts", "paired verdicts (95 % CI; Holm over the board)", text=verdicts_cell),
                 Column("flags", "flags", text=lambda r: "; ".join(r.get("flags") or [])),
                 Column("diagnostics", "row diagnostics", text=lambda r: "; ".join(r.get("diagnostics") or []))]
    return cols


def trivial_cell(r: dict[str, Any]) -> str:
    """The board's trivial-baseline cell of a leaderboard row: ``"✗ +0.42: does not beat
    center_gaussian beyond seed noise"`` (✗ marks ``below_trivial``), ``""`` without a verdict."""
    text = r.get("trivial_verdict") or ""
    diff = r.get("trivial_diff_mean")
    if diff is not None and not math.isnan(diff):
        text = f"{diff:+.2f}: {text}"
    return ("✗ " + text) if r.get("below_trivial") else text


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def legend(lb: pa.Table) -> str:
    """One line for under the table: what the headline metric means (its declaration's description
    and direction) and which row is the baseline a row must beat: per dataset the best trivial
    baseline row (``center_gaussian`` / ``whole_image``; the rows marked ✗ do not beat it beyond
    seed noise), or each row's own box-filled masks (BBAM, CCGR), or, when there is none, a plain
    statement and the command that adds one. E.g. ``"test/max_box_acc_v2 (MaxBoxAccV2): share of
    images where … (%, 0–100; higher is better). Baseline: center_gaussian / none on synthetic,
    the best trivial baseline (no training); ✗ marks rows that do not beat it beyond seed noise."``
    (when rows have paired verdicts over test images and seeds, the ✗ sentence says so instead)."""
    meta = lb.schema.metadata or {}
    reported = leaderboard_metrics(lb)
    head = reported[0] if reported else meta.get(b"weakbench.primary_metric", b"?").decode()
    spec = D.lookup(head)
    parts = [f"{head} ({spec.display}): {spec.explain()}." if spec else
             f"{head}: not declared (weakbench/methods/metric_specs.py METRICS, or the method's Method.metrics)."]
    rows = lb.to_pylist()
    datasets = sorted({r["dataset"] for r in rows})
    best = {r["dataset"]: r for r in rows if r.get("trivial_verdict") == "is the best trivial baseline"}
    boxed = {r["dataset"] for r in rows if r.get("trivial_baseline") == "box_filled"}
    found = [f"{best[d]['method']} / {best[d]['backbone']} on {d}" for d in datasets if d in best]
    if found:
        parts.append(f"Baseline: {'; '.join(found)}, the best trivial baseline (no training).")
    if boxed:
        parts.append(f"Baseline on {', '.join(sorted(boxed))}: each row's own box-filled masks ({_box_column(lb)}, "
                     f"the box itself as the mask).")
    missing = [d for d in datasets if d not in best and d not in boxed]
    if found or boxed:
        if any(r.get("verdicts") for r in rows):  # paired over test images and seeds (verdicts.py)
            parts.append("✗ marks rows not shown to beat it (paired over test images and seeds, Holm-corrected over "
                         "the board; a row without per-image results: beyond seed noise).")
        else:
            parts.append("✗ marks rows that do not beat it beyond seed noise.")
    if missing or not datasets:
        where = f" on {', '.join(missing)}" if missing else ""
        if D.baseline_metric(head) is not None:
            parts.append(f"No baseline{where}: no run logged the box-filled masks "
                         f"({D.baseline_metric(head)}, logged on data with masks), so no row is checked against one.")
        else:
            cmds = "; ".join(_trivial_command(d) for d in (missing or ["<dataset>"]))
            parts.append(f"No baseline{where}: this board has no trivial baseline row, so no row is checked against "
                         f"one; add one with {cmds}.")
    parts += [f"Disagreement: {d}." for d in ranking_disagreements(lb)]
    return " ".join(parts)


#: metrics of one headline family: a board ranked by the key also says where these rank rows otherwise
HEADLINE_FAMILIES = {"max_box_acc_v2": ("max_box_acc",), "max_box_acc": ("max_box_acc_v2",)}


def ranking_disagreements(lb: pa.Table) -> list[str]:
    """Pairs of rows (same dataset) that the primary metric and another metric of its headline
    family (:data:`HEADLINE_FAMILIES`; MaxBoxAcc against MaxBoxAccV2) rank in opposite orders, in
    words: ``"MaxBoxAccV2 ranks cam above center_gaussian (19.40 vs 18.90), MaxBoxAcc below (4.55
    vs 6.06)"``. Means only: it says the two metrics disagree, not that either difference is real."""
    meta = lb.schema.metadata or {}
    primary = meta.get(b"weakbench.primary_metric", b"").decode()
    if "/" not in primary:
        return []
    split, name = primary.split("/", 1)
    out = []
    rows = lb.to_pylist()
    for other in HEADLINE_FAMILIES.get(name, ()):
        key = f"{split}/{other}"
        if f"{key}.mean" not in lb.column_names:
            continue
        d1, d2 = D.lookup(primary), D.lookup(key)
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if a["dataset"] != b["dataset"]:
                    continue
                pa_, pb = a[f"{primary}.mean"], b[f"{primary}.mean"]
                oa, ob = a[f"{key}.mean"], b[f"{key}.mean"]
                if any(v is None or math.isnan(v) for v in (pa_, pb, oa, ob)):
                    continue
                if (pa_ - pb) * (oa - ob) < 0:
                    hi, lo = (a, b) if pa_ > pb else (b, a)
                    out.append(f"{d1.display if d1 else primary} ranks {hi['method']} above {lo['method']} "
                               f"({hi[f'{primary}.mean']:.2f} vs {lo[f'{primary}.mean']:.2f}), "
                               f"{d2.display if d2 else key} below ({hi[f'{key}.mean']:.2f} vs {lo[f'{key}.mean']:.2f})")
    return out


def _trivial_command(dataset: str) -> str:
    """The command that puts a trivial baseline on the board for ``dataset`` (a dataset name)."""
    if dataset == "synthetic":
        return "weakbench sweep search_spaces/center_gaussian.yaml (no --data: the synthetic default)"
    return f"weakbench sweep search_spaces/center_gaussian.yaml --data <the {dataset} directory> (the same --data as its sweeps)"


def board_tables(table: pa.Table, select_metric: str | None = None) -> list[tuple[str, pa.Table]]:
    """The runs of ``table`` grouped into boards, one per headline: ``[(select_metric, runs), …]``.

    With ``select_metric`` (``"<split>/<name>"``) every run is on one board ranked by it. Without,
    each method's runs go to the board of its declared headline
    (:func:`~weakbench.methods.metric_declarations.default_select_metric`: ``val/max_box_acc_v2``
    for the CAM methods and the trivial baselines, ``val/pseudo_masks/instance_miou`` for BBAM,
    ``val/mask_rcnn/map_r50`` for CCGR), boards in the order of their headline in
    :data:`~weakbench.methods.metric_declarations.DISPLAY_ORDER` (then by key); an empty table
    gives one board on :data:`~weakbench.methods.metric_declarations.DEFAULT_SELECT_METRIC`. A run without a method tag counts as a method of the default headline. The CLI's
    ``leaderboard`` and the dashboard both group with this function.
    """
    import pyarrow.compute as pc

    if select_metric is not None:
        return [(select_metric, table)]
    methods = table["method"].fill_null("") if table.num_rows else pa.chunked_array([], pa.string())
    groups: dict[str, list[str]] = {}
    for m in sorted(set(methods.to_pylist())):
        groups.setdefault(D.default_select_metric(m) if m else D.DEFAULT_SELECT_METRIC, []).append(m)
    order = sorted(groups, key=lambda k: (_display_rank(k), k))
    boards = [(key, table.filter(pc.is_in(methods, value_set=pa.array(groups[key], pa.string())))) for key in order]
    return boards or [(D.DEFAULT_SELECT_METRIC, table)]


def build_boards(table: pa.Table, store_dir=None, select_metric: str | None = None, report_split: str = "test",
                 baseline_method: str = "cam", n_boot: int = 2000, seed: int = 0) -> list[pa.Table]:
    """Every board of a results table, built: the groups of :func:`board_tables` (one per headline;
    ``select_metric`` forces one board), each with the per-image results of the store at
    ``store_dir`` (:func:`weakbench.platform.results.read_per_image`) so that its intervals cover
    test images and seeds, then the board of the store's ``weakbench evaluate`` runs
    (:func:`build_evaluation_board`) when it holds any.

    Returns:
        the boards (:func:`build_leaderboard` tables, then the evaluation board).
    """
    from weakbench.platform.results import read_per_image

    per_image = read_per_image(store_dir, table["run_id"].to_pylist(), report_split) if store_dir else {}
    out = [build_leaderboard(part, select_metric=key, report_split=report_split, baseline_method=baseline_method,
                             n_boot=n_boot, seed=seed, per_image=per_image)
           for key, part in board_tables(table, select_metric)]
    if store_dir is not None:  # the evaluations' board, when the store holds any
        from weakbench.platform.results import EVALUATION_STORE_DIR, read_store

        ev_dir = Path(store_dir) / EVALUATION_STORE_DIR
        ev = read_store(ev_dir)
        if ev.num_rows:
            board = build_evaluation_board(ev, read_per_image(ev_dir, ev["run_id"].to_pylist(), C.EVAL_SPLIT),
                                           n_boot=n_boot, seed=seed)
            out = [board] if table.num_rows == 0 else out + [board]  # no empty trial board beside it
    return out


def board_records(lb: pa.Table) -> dict[str, Any]:
    """A board as plain records (for ``--format json`` and the dashboard): ``{"title", "select_metric",
    "selected_on", "reported_on", "legend", "rows": [one dict per row: every column, the
    intervals (``<metric>.ci_low/.ci_high``), ``n_images``, ``n_seeds``, ``noise``, ``flags`` and
    ``verdicts``]}``; NaN becomes ``None``."""
    meta = lb.schema.metadata or {}

    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    if meta.get(b"weakbench.kind") == b"evaluation":
        return {"title": "Evaluations (weakbench evaluate): every image, no split, no selection", "select_metric": None,
                "selected_on": None, "reported_on": C.EVAL_SPLIT, "legend": "",
                "rows": [clean(r) for r in lb.to_pylist()]}
    return {"title": title(lb), "select_metric": meta.get(b"weakbench.select_metric", b"").decode(),
            "selected_on": meta.get(b"weakbench.selected_on", b"").decode(),
            "reported_on": meta.get(b"weakbench.reported_on", b"").decode(), "legend": legend(lb),
            "ranking_disagreements": ranking_disagreements(lb),
            "rows": [clean(r) for r in lb.to_pylist()]}


def build_evaluation_board(table: pa.Table, per_image: Mapping[str, pa.Table] | None = None,
                           primary_name: str = D.DEFAULT_HEADLINE, n_boot: int = 2000, seed: int = 0) -> pa.Table:
    """The board of ``weakbench evaluate`` runs (every image of a dataset, no split, no selection):
    one seed-free row per (dataset, method, backbone, configuration), the latest ``FINISHED``
    evaluation of each, with intervals over the images and the declared paired comparisons
    (Holm over each dataset's comparisons; :mod:`weakbench.platform.verdicts`). Rows scored on
    different images (another ``max_images``, another dataset version) are never compared.

    Args:
        table: the evaluation store (``<store>/_evaluations``, :func:`weakbench.platform.results.read_store`).
        per_image: ``{run id: per-image table of split "all"}``.
        primary_name: the bare metric the comparisons are made on.

    Returns:
        a table: ``dataset``, ``method``, ``backbone``, ``params_json``, ``run_id``, ``reported_on``
        (``"all"``), ``n_images``, ``noise``, ``verdicts``, ``flags`` and, for each reported metric
        ``m``, ``m.mean``, ``m.ci_low``, ``m.ci_high``; sorted by dataset, then the primary metric.
    """
    from weakbench.core.metrics.per_image import PerImage
    from weakbench.platform.verdicts import Bootstrap, RowRuns, can_compute, compare, decide, interval, same_images

    split = C.EVAL_SPLIT
    primary = f"{split}/{primary_name}"
    hib = higher_is_better(primary)
    per_image = per_image or {}
    metrics = metric_columns(table)
    names = sorted((k for k in metrics if k.startswith(split + "/")), key=lambda k: (k != primary, _display_rank(k), k))
    latest: dict[tuple, int] = {}
    ends = table["end_time"].cast(pa.int64()).fill_null(0).to_numpy() if table.num_rows else np.zeros(0)
    status = _str_array(table, "status") if table.num_rows else np.zeros(0, object)
    params_col = table["params"] if table.num_rows else None
    for i, key in enumerate(zip(*(_str_array(table, c).tolist() for c in ("dataset", "method", "backbone",
                                                                           "config_group")))):
        if status[i] != "FINISHED" or not finite_metric_rows(table.slice(i, 1))[0]:
            continue
        if key not in latest or ends[i] > ends[latest[key]]:
            latest[key] = i
    run_ids = _str_array(table, "run_id") if table.num_rows else np.zeros(0, object)
    rows, resolved = [], {}
    for key, i in sorted(latest.items()):
        row: dict[str, Any] = {"dataset": key[0], "method": key[1], "backbone": key[2],
                               "params_json": _params_json(params_col, i), "run_id": run_ids[i], "reported_on": split,
                               "verdicts": [], "flags": []}
        rr = RowRuns([PerImage(per_image[run_ids[i]])], seed_free=True) if run_ids[i] in per_image else None
        row["n_images"] = len(rr.runs[0].universe) if rr is not None else None
        if rr is None:
            row["noise"] = "none: no per-image results"
        elif _seed_free(key[1], _params(params_col, i)):
            row["noise"] = f"images ({row['n_images']}); seed-free"
        else:
            row["noise"] = f"images ({row['n_images']}) only: one trained model, its seed noise not covered"
        if rr is not None:
            resolved[id(row)] = rr
        for m in names:
            row[f"{m}.mean"] = float(metrics[m][i])
            row[f"{m}.ci_low"] = row[f"{m}.ci_high"] = math.nan
        rows.append(row)
    primary_missing = primary not in names
    for ds in sorted({r["dataset"] for r in rows}):
        boot = Bootstrap(n_boot, _rng(seed, ds, "evaluation"))
        board = [r for r in rows if r["dataset"] == ds]
        for r in board:
            rr = resolved.get(id(r))
            if rr is None:
                continue
            for m in names:
                bare = m.split("/", 1)[1]
                if can_compute(rr, bare):
                    r[f"{m}.ci_low"], r[f"{m}.ci_high"] = interval(boot.row(rr, bare)[1])
        comparisons, owners = [], []
        for r in board:
            rr = resolved.get(id(r))
            if rr is None or primary_missing or not can_compute(rr, primary_name):
                continue
            for other in _compared_with(r["method"]):
                cands = [o for o in board if o["method"] == other and id(o) in resolved]
                same = [o for o in cands if o["backbone"] == r["backbone"]]
                cands = same or cands
                if not cands:
                    continue
                against = max(cands, key=lambda o: o[f"{primary}.mean"] if hib else -o[f"{primary}.mean"])
                orr = resolved[id(against)]
                if not same_images(rr, orr) or not can_compute(orr, primary_name):
                    continue
                comparisons.append(compare(boot, rr, orr, primary_name, r["method"], against["method"]))
                owners.append(r)
        decide(comparisons, hib)
        for c, r in zip(comparisons, owners):
            r["verdicts"].append(c.record())
    sign = -1.0 if hib else 1.0
    rows.sort(key=lambda r: (r["dataset"], _nan_last(sign * r.get(f"{primary}.mean", math.nan)), r["method"]))
    fields = [pa.field("dataset", pa.string()), pa.field("method", pa.string()), pa.field("backbone", pa.string()),
              pa.field("params_json", pa.string()), pa.field("run_id", pa.string()),
              pa.field("reported_on", pa.string())] + list(_IMAGE_FIELDS)
    for m in names:
        fields += [pa.field(f"{m}.{s}", pa.float64()) for s in ("mean", "ci_low", "ci_high")]
    schema = pa.schema(fields, metadata={b"weakbench.selected_on": b"none (evaluation runs)",
                                         b"weakbench.reported_on": split.encode(),
                                         b"weakbench.select_metric": b"none", b"weakbench.primary_metric": primary.encode(),
                                         b"weakbench.kind": b"evaluation"})
    return pa.Table.from_pylist(rows, schema=schema)


def _value_ci(value: float | None, lo: float | None, hi: float | None) -> str:
    """``"63.90 [62.3, 65.9]"``; ``"—"`` without a value; no interval without per-image results."""
    if value is None or math.isnan(value):
        return "—"
    if lo is None or math.isnan(lo):
        return f"{value:.2f}"
    return f"{value:.2f} [{lo:.1f}, {hi:.1f}]"


def render_evaluation_rich(lb: pa.Table, max_metrics: int = 4):
    """A :class:`rich.table.Table` of an evaluation board (:func:`build_evaluation_board`)."""
    from rich.markup import escape
    from rich.table import Table

    names = [c[: -len(".mean")] for c in lb.column_names if c.endswith(".mean")]
    names = [n for n in names if _display_rank(n) < len(D.DISPLAY_ORDER)][:max_metrics]
    t = Table(title="Evaluations (weakbench evaluate): every image of each dataset, no split, no selection",
              caption="value [95 % bootstrap CI over the images]; verdicts paired image by image, Holm over the board")
    for col in ("dataset", "method", "backbone", "images"):
        t.add_column(col)
    for m in names:
        spec = D.lookup(m)
        t.add_column(f"{spec.display}\n{m}" if spec else m, justify="right")
    t.add_column("paired verdicts")
    for r in lb.to_pylist():
        t.add_row(escape(r["dataset"]), escape(r["method"]), escape(r["backbone"]), str(r["n_images"] or "—"),
                  *[_value_ci(r[f"{m}.mean"], r[f"{m}.ci_low"], r[f"{m}.ci_high"]) for m in names],
                  escape(verdicts_cell(r)))
    return t
