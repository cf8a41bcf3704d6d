"""Verdicts over test images and seeds (weakbench.platform.verdicts) on hand-built per-image
tables: the bootstrap recomputes the metric (max over thresholds) on each resample, a difference
within test-image noise is not called, Holm's correction counts, seed-free pairs have intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weakbench.platform.leaderboard import build_leaderboard
from weakbench.core.metrics.per_image import BOX_COLUMNS, PerImage, build_table, metric_on_weights
from weakbench.platform.results import rows_to_table
from weakbench.platform.verdicts import Bootstrap, RowRuns, compare, decide, holm


def _table(correct: np.ndarray):
    """A per-image table whose samples (one per image) are correct per threshold as ``correct``
    bool (N, T), for every box rule and δ."""
    n, t = correct.shape
    return build_table("test", np.arange(t) / t, [f"im{i:03d}" for i in range(n)], [0] * n,
                       {c: correct for c in BOX_COLUMNS})


def _at_first(n: int, idx) -> np.ndarray:
    """bool (n, 2): correct at threshold 0 on images ``idx``, never at threshold 1."""
    c = np.zeros((n, 2), dtype=bool)
    c[list(idx), 0] = True
    return c


def test_paired_bootstrap_recomputes_the_max_over_thresholds_on_each_resample():
    """Each resample's value is MaxBoxAcc of the images repeated as drawn, with its own best
    threshold: row A is best at τ0 on some resamples and at τ1 on others."""
    rng = np.random.default_rng(3)
    n = 40
    a = np.zeros((n, 2), dtype=bool)
    a[:20, 0] = True  # τ0 right on the first half, τ1 on the second half (minus two)
    a[20:38, 1] = True
    b = _at_first(n, range(15))
    ra, rb = RowRuns([PerImage(_table(a))], seed_free=True), RowRuns([PerImage(_table(b))], seed_free=True)
    boot = Bootstrap(300, rng)
    c = compare(boot, ra, rb, "max_box_acc", "a", "b")
    order, counts = boot.image_counts(ra)
    assert list(order) == [f"im{i:03d}" for i in range(n)]
    best_taus = set()
    for k in range(300):
        rep = np.repeat(np.arange(n), counts[k].astype(int))
        acc_a = 100.0 * a[rep].mean(0)  # accuracy at each τ on the resample
        acc_b = 100.0 * b[rep].mean(0)
        best_taus.add(int(np.argmax(acc_a)))
        assert c.boot[k] == pytest.approx(acc_a.max() - acc_b.max())
    assert best_taus == {0, 1}  # the max is taken per resample, not at the split's τ
    assert c.diff == pytest.approx(50.0 - 37.5)


def _runs(method, seeds, test_values, tables, per_image, *, params=None, backbone="r18"):
    rows = []
    for s, v, t in zip(seeds, test_values, tables):
        rid = f"{method}-{backbone}-{s}"
        per_image[rid] = t
        metrics = {"val/max_box_acc_v2": 50.0, "test/max_box_acc_v2": v, "test/max_box_acc": v}
        rows.append({"run_id": rid, "method": method, "backbone": backbone, "dataset": "d", "seed": s,
                     "status": "FINISHED", "params": {"lr": 0.1, "seed": s, **(params or {})}, "metrics": metrics})
    return rows


def _value(table) -> float:
    return float(metric_on_weights(PerImage(table), "max_box_acc_v2", np.ones((1, table.num_rows)))[0])


def test_beyond_seed_noise_but_within_test_image_noise_is_not_called():
    """cam and minmaxcam on the same 100 test images, 3 seeds each: minmaxcam is 2–3 points
    above cam on every seed (seed noise alone calls it), but the two disagree on 22–23 images in
    both directions, so over test images the difference is not shown."""
    n = 100
    per_image: dict = {}
    cam = [_table(_at_first(n, range(60))) for _ in range(3)]
    mm = [_table(_at_first(n, list(range(50)) + list(range(60, 60 + k)))) for k in (12, 13, 12)]
    rows = (_runs("cam", [0, 1, 2], [_value(t) for t in cam], cam, per_image)
            + _runs("minmaxcam", [0, 1, 2], [_value(t) for t in mm], mm, per_image))
    seeds_only = {r["method"]: r for r in build_leaderboard(rows_to_table(rows), n_boot=1000).to_pylist()}
    assert seeds_only["minmaxcam"]["baseline_verdict"] == "better than cam beyond seed noise"
    assert seeds_only["minmaxcam"]["noise"].startswith("seeds only")
    lb = {r["method"]: r for r in build_leaderboard(rows_to_table(rows), n_boot=1000, per_image=per_image).to_pylist()}
    mm_row = lb["minmaxcam"]
    assert mm_row["baseline_diff_mean"] == pytest.approx(np.mean([2, 3, 2]))
    assert mm_row["baseline_diff_ci_low"] < 0 < mm_row["baseline_diff_ci_high"]
    assert mm_row["baseline_verdict"].startswith("not shown different from cam")
    assert [v["against"] for v in mm_row["verdicts"]] == ["cam"]
    assert mm_row["n_images"] == 100 and mm_row["noise"] == "test images (100) x seeds (3)"
    # the row's own interval covers test images too: wider than the seeds' spread
    lo, hi = mm_row["test/max_box_acc_v2.ci_low"], mm_row["test/max_box_acc_v2.ci_high"]
    assert hi - lo > 10


def test_intervals_do_not_depend_on_the_order_runs_are_listed_in():
    """The same runs listed in another order (a fresh sweep's run ids and start times) give the
    same intervals: each row's runs enter the bootstrap in seed order."""
    n = 40
    per_image: dict = {}
    cam = [_table(_at_first(n, range(10 + 3 * k))) for k in range(3)]
    rows = (_runs("cam", [0, 1, 2], [_value(t) for t in cam], cam, per_image)
            + _runs("minmaxcam", [0, 1, 2], [_value(t) for t in reversed(cam)], list(reversed(cam)), per_image))
    boards = []
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):
        lb = build_leaderboard(rows_to_table(order), n_boot=300, per_image=per_image).to_pylist()
        keys = ("test/max_box_acc_v2.ci_low", "test/max_box_acc_v2.ci_high", "baseline_diff_ci_low",
                "baseline_diff_ci_high")
        boards.append({r["method"]: tuple(None if r[k] is None or r[k] != r[k] else r[k] for k in keys) for r in lb})
    assert boards[0] == boards[1] == boards[2]
    assert boards[0]["cam"][0] < boards[0]["cam"][1]  # a real interval, not a degenerate one


def _pair(n, common, only_a, only_b):
    a = _at_first(n, list(range(common)) + list(range(common, common + only_a)))
    b = _at_first(n, list(range(common)) + list(range(common + only_a, common + only_a + only_b)))
    return a, b


def test_holm_changes_a_verdict():
    """Two comparisons each with bootstrap p between 0.025 and 0.05: each alone is called, but
    on one board Holm multiplies the smaller p by 2 and neither is."""
    assert holm([0.03, 0.04]) == pytest.approx([0.06, 0.06])
    assert holm([0.01, 0.04, math.nan]) == pytest.approx([0.02, 0.04, math.nan], nan_ok=True)
    n = 200
    a, b = _pair(n, 60, 13, 4)  # a beats b on 13 images, b beats a on 4
    rows = {k: RowRuns([PerImage(_table(v))], seed_free=True) for k, v in (("a", a), ("b", b))}
    alone = compare(Bootstrap(4000, np.random.default_rng(0)), rows["a"], rows["b"], "max_box_acc", "a", "b")
    assert 0.025 < alone.p_value < 0.05
    decide([alone], True)
    assert alone.verdict == "beats b"
    boot = Bootstrap(4000, np.random.default_rng(0))
    c1 = compare(boot, rows["a"], rows["b"], "max_box_acc", "a", "b")
    c2 = compare(boot, rows["a"], rows["b"], "max_box_acc", "a", "b again")
    decide([c1, c2], True)
    assert c1.p_holm >= 0.05 and c1.verdict == "not shown different from b"
    assert c1.holm_ci_low <= 0 <= c1.holm_ci_high


def test_seed_free_pair_gets_a_non_zero_interval_and_other_images_are_never_compared():
    """A 0-epoch pretrained CAM and the centre Gaussian (both seed-free) differ with an interval
    over test images, not "exactly"; a row scored on other images is not compared."""
    n = 100
    per_image: dict = {}
    cam = _table(_at_first(n, range(70)))
    cg = _table(_at_first(n, list(range(55)) + list(range(80, 85))))
    seed_free = {"epochs": 0, "pretrained": True, "classifier_init": "pretrained_head"}
    rows = (_runs("cam", [0], [_value(cam)], [cam], per_image, params=seed_free)
            + _runs("center_gaussian", [0], [_value(cg)], [cg], per_image, backbone="none"))
    other = _table(_at_first(n + 1, range(70)))
    rows += _runs("minmaxcam", [0, 1, 2], [_value(other)] * 3, [other] * 3, per_image)
    lb = {r["method"]: r for r in build_leaderboard(rows_to_table(rows), n_boot=1000, per_image=per_image).to_pylist()}
    v = lb["cam"]["verdicts"]
    assert [x["against"] for x in v] == ["center_gaussian (none)"]
    assert v[0]["diff"] == pytest.approx(10.0) and v[0]["ci_low"] < v[0]["ci_high"]
    assert "exact" not in lb["cam"]["trivial_verdict"] and lb["cam"]["noise"] == "test images (100); seed-free"
    assert lb["minmaxcam"]["verdicts"] == []  # 101 images: never compared with cam or the Gaussian
    assert "degenerate: seeds identical" in lb["minmaxcam"]["flags"][0]


def test_rows_are_flagged_where_the_mechanism_did_not_run():
    """MinMaxCAM whose sets hold one image, a 1000-way head near chance, seeds giving the same
    metrics: each row says so in words."""
    from weakbench.methods.minmaxcam import one_image_set_share
    import torch

    assert one_image_set_share(torch.tensor([3, 3, 3, 4, 5, 4, 7]), 3) == pytest.approx(50.0)
    rows = []
    for s in (0, 1, 2):
        rows.append({"run_id": f"mm{s}", "method": "minmaxcam", "backbone": "b", "dataset": "d", "seed": s,
                     "status": "FINISHED", "params": {"lr": 0.1, "seed": s},
                     "metrics": {"val/max_box_acc_v2": 50.0, "test/max_box_acc_v2": 40.0 + s,
                                 "train/one_image_sets": 64.0, "test/cls_acc": 2.44, "test/cls_chance": 0.1}})
        rows.append({"run_id": f"cam{s}", "method": "cam", "backbone": "b", "dataset": "d", "seed": s,
                     "status": "FINISHED", "params": {"lr": 0.1, "seed": s},
                     "metrics": {"val/max_box_acc_v2": 50.0, "test/max_box_acc_v2": 9.09, "test/cls_acc": 0.3,
                                 "test/cls_chance": 0.1}})
    lb = {r["method"]: r for r in build_leaderboard(rows_to_table(rows), n_boot=200).to_pylist()}
    assert lb["minmaxcam"]["flags"] == ["CRR inactive: 64 % of sets hold one image",
                                        "weak classifier: test top-1 2.44 % (chance 0.10 %)"]
    assert lb["cam"]["flags"][0].startswith("degenerate: seeds identical")
    assert lb["cam"]["flags"][1] == "classifier near chance: test top-1 0.30 % (chance 0.10 %)"


def test_evaluation_runs_make_a_board_of_seed_free_rows_with_paired_intervals():
    """``weakbench evaluate`` rows (split ``all``): the 0-epoch pretrained CAM against the centre
    Gaussian on the same images, with an interval over the images; the latest evaluation of a
    configuration counts; a row on other images is not compared."""
    from weakbench.platform.leaderboard import build_evaluation_board

    n = 100
    per_image, rows = {}, []
    seed_free = {"epochs": 0, "pretrained": True, "classifier_init": "pretrained_head"}
    for rid, method, backbone, params, table, end in [
            ("e1", "cam", "lite0", seed_free, _table(_at_first(n, range(40))), 1),
            ("e2", "cam", "lite0", seed_free, _table(_at_first(n, range(70))), 2),  # the same, later: counts
            ("e3", "center_gaussian", "none", {"sigma": 0.25}, _table(_at_first(n, range(60))), 1),
            ("e4", "whole_image", "none", {}, _table(_at_first(n + 5, range(10))), 1)]:
        per_image[rid] = table
        v = _value(table)
        rows.append({"run_id": rid, "method": method, "backbone": backbone, "dataset": "ilsvrc", "status": "FINISHED",
                     "end_time": 1000 * end, "params": {**params, "seed": 0},
                     "metrics": {"all/max_box_acc_v2": v, "all/max_box_acc": v}})
    lb = build_evaluation_board(rows_to_table(rows), per_image, n_boot=1000)
    got = {r["method"]: r for r in lb.to_pylist()}
    assert got["cam"]["run_id"] == "e2" and got["cam"]["all/max_box_acc_v2.mean"] == pytest.approx(70.0)
    assert got["cam"]["noise"] == "images (100); seed-free"
    (v,) = got["cam"]["verdicts"]
    assert v["against"] == "center_gaussian" and v["diff"] == pytest.approx(10.0)
    assert 0 < v["ci_low"] < 10 < v["ci_high"] and v["verdict"] == "beats center_gaussian"
    lo, hi = got["cam"]["all/max_box_acc_v2.ci_low"], got["cam"]["all/max_box_acc_v2.ci_high"]
    assert lo < 70 < hi


def test_board_says_when_maxboxacc_and_maxboxaccv2_disagree():
    """The README main job's case: MaxBoxAccV2 ranks cam above the centre Gaussian, MaxBoxAcc below."""
    from weakbench.platform.leaderboard import board_records, legend, ranking_disagreements

    rows = []
    for k, (method, v2, v1) in enumerate([("cam", 19.4, 4.55), ("center_gaussian", 18.9, 6.06)]):
        rows.append({"run_id": f"r{k}", "method": method, "backbone": "b", "dataset": "d", "seed": 0,
                     "status": "FINISHED", "params": {"seed": 0},
                     "metrics": {"val/max_box_acc_v2": 50.0, "test/max_box_acc_v2": v2, "test/max_box_acc": v1}})
    lb = build_leaderboard(rows_to_table(rows), n_boot=200)
    want = "MaxBoxAccV2 ranks cam above center_gaussian (19.40 vs 18.90), MaxBoxAcc below (4.55 vs 6.06)"
    assert ranking_disagreements(lb) == [want]
    assert want in legend(lb) and board_records(lb)["ranking_disagreements"] == [want]
