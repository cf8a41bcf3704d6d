"""Leaderboard semantics on hand-built results tables (values chosen so the answers are known)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from weakbench.core.errors import ConfigError
from weakbench.platform.leaderboard import bootstrap_ci, build_leaderboard, render_rich
from weakbench.platform.results import rows_to_table


def _run(i, method, lr, seed, val, test, status="FINISHED", backbone="r18", cpu=1.0, dataset="d"):
    metrics = {"train/loss": 0.3, "cost/cpu_hours": cpu, "cost/gpu_hours": 0.0}
    if val is not None:
        metrics["val/max_box_acc_v2"] = val
    if test is not None:
        metrics["test/max_box_acc_v2"] = test
        metrics["test/pxap"] = test + 1
    return {"run_id": f"r{i:03d}", "method": method, "backbone": backbone, "dataset": dataset, "seed": seed,
            "status": status, "experiment_id": "1", "sweep_id": f"s-{method}",
            "params": {"lr": lr, "seed": seed, "backbone": backbone}, "metrics": metrics}


def _rows():
    rows = []
    add = lambda *a, **k: rows.append(_run(len(rows), *a, **k))  # noqa: E731
    # cam, config lr=0.1: val mean 52, test 40, 41, 45  (selected)
    for s, v, t in [(0, 50, 40), (1, 52, 41), (2, 54, 45)]:
        add("cam", 0.1, s, v, t)
    # cam, config lr=0.01: val mean 50 (one seed at 60 does not win), test 90
    add("cam", 0.01, 0, 60, 90)
    add("cam", 0.01, 1, 40, 90)
    add("cam", 0.01, 2, None, None, status="FAILED", cpu=0.5)  # counted as a trial and in the cost only
    # minmaxcam: test 50, 52, 54 → paired differences with cam 10, 11, 9
    for s, t in [(0, 50), (1, 52), (2, 54)]:
        add("minmaxcam", 0.1, s, 70, t)
    # topgap: one seed
    add("topgap", 0.1, 0, 65, 48)
    # puzzlecam: seeds disjoint from cam's
    add("puzzlecam", 0.1, 5, 66, 49)
    add("puzzlecam", 0.1, 6, 66, 47)
    # a backbone without a cam run
    add("minmaxcam", 0.1, 0, 70, 60, backbone="r50")
    add("minmaxcam", 0.1, 1, 70, 62, backbone="r50")
    return rows


def _by_method(lb, backbone="r18"):
    return {r["method"]: r for r in lb.to_pylist() if r["backbone"] == backbone}


def test_selection_and_stats():
    lb = build_leaderboard(rows_to_table(_rows()))
    rows = _by_method(lb)
    cam = rows["cam"]
    assert cam["selected_on"] == "val" and cam["reported_on"] == "test"
    assert cam["select_mean"] == pytest.approx(52.0)
    assert cam["test/max_box_acc_v2.mean"] == pytest.approx(42.0)
    assert cam["test/max_box_acc_v2.std"] == pytest.approx(math.sqrt(7.0))  # deviations -2, -1, 3
    assert cam["test/pxap.mean"] == pytest.approx(43.0)
    assert 40.0 <= cam["test/max_box_acc_v2.ci_low"] < 42.0 < cam["test/max_box_acc_v2.ci_high"] <= 45.0
    assert cam["n_seeds"] == 3 and cam["seeds"] == [0, 1, 2]
    assert cam["n_trials"] == 6 and cam["n_failed"] == 1 and cam["n_configs"] == 2
    assert cam["cpu_hours"] == pytest.approx(5.5) and cam["gpu_hours"] == 0.0
    assert sorted(cam["run_ids"]) == ["r000", "r001", "r002"]
    assert '"lr": "0.1"' in cam["params_json"] and "seed" not in cam["params_json"]
    assert cam["baseline_verdict"] == "is the baseline"


def test_paired_comparison_with_baseline():
    rows = _by_method(build_leaderboard(rows_to_table(_rows())))
    mm = rows["minmaxcam"]
    assert mm["baseline_n_pairs"] == 3
    assert mm["baseline_diff_mean"] == pytest.approx(10.0)
    assert 9.0 <= mm["baseline_diff_ci_low"] <= mm["baseline_diff_ci_high"] <= 11.0
    expected_p = stats.ttest_rel([50, 52, 54], [40, 41, 45]).pvalue
    assert mm["baseline_p_value"] == pytest.approx(expected_p)
    assert mm["baseline_verdict"] == "better than cam beyond seed noise"

    top = rows["topgap"]  # one seed: no spread, no verdict
    assert top["n_seeds"] == 1 and math.isnan(top["test/max_box_acc_v2.std"])
    assert math.isnan(top["test/max_box_acc_v2.ci_low"]) and top["baseline_verdict"] == "not enough seeds"
    assert rows["puzzlecam"]["baseline_n_pairs"] == 0 and rows["puzzlecam"]["baseline_verdict"] == "not enough seeds"
    r50 = _by_method(build_leaderboard(rows_to_table(_rows())), "r50")["minmaxcam"]
    assert r50["baseline_verdict"].startswith("no cam run")


def test_noise_sized_difference_is_within_noise():
    rows = [_run(i, "cam", 0.1, s, 50, t) for i, (s, t) in enumerate([(0, 40), (1, 45), (2, 50), (3, 42)])]
    rows += [_run(10 + i, "minmaxcam", 0.1, s, 50, t) for i, (s, t) in enumerate([(0, 46), (1, 41), (2, 49), (3, 44)])]
    mm = _by_method(build_leaderboard(rows_to_table(rows)))["minmaxcam"]
    assert mm["baseline_diff_mean"] == pytest.approx(0.75)
    assert mm["baseline_diff_ci_low"] < 0 < mm["baseline_diff_ci_high"]
    assert mm["baseline_verdict"] == "within seed noise"


def test_order_independent_and_deterministic():
    # dataset "e": 20 seeds with irregular values, so that bootstrap quantiles depend on the draw
    rows = _rows() + [_run(100 + s, "cam", 0.1, s, 50, 40 + 3 * math.sin(s * 1.7), dataset="e") for s in range(20)]
    a = build_leaderboard(rows_to_table(rows), seed=3)
    random.Random(0).shuffle(rows)
    b = build_leaderboard(rows_to_table(rows), seed=3)
    key = lambda t: sorted(  # noqa: E731
        ((r["dataset"], r["method"], r["backbone"]), repr(r["test/max_box_acc_v2.ci_low"]), repr(r["test/max_box_acc_v2.ci_high"])) for r in t.to_pylist())
    assert key(a) == key(b)
    c = build_leaderboard(rows_to_table(rows), seed=4)
    assert key(a) != key(c)  # the bootstrap really resamples


def test_sorted_best_first_and_metadata():
    lb = build_leaderboard(rows_to_table(_rows()))
    means = [r["test/max_box_acc_v2.mean"] for r in lb.to_pylist()]
    assert means == sorted(means, reverse=True)
    assert lb.schema.metadata[b"weakbench.selected_on"] == b"val"
    assert lb.schema.metadata[b"weakbench.reported_on"] == b"test"


def test_lower_is_better_selection():
    rows = [_run(0, "cam", 0.1, 0, None, 40), _run(1, "cam", 0.2, 0, None, 60)]
    rows[0]["metrics"]["val/loss"] = 0.9
    rows[1]["metrics"]["val/loss"] = 0.2
    lb = build_leaderboard(rows_to_table(rows), select_metric="val/loss")
    assert lb.to_pylist()[0]["test/loss.mean"] is None or math.isnan(lb.to_pylist()[0]["test/loss.mean"])
    assert lb.to_pylist()[0]["test/max_box_acc_v2.mean"] == 60


def test_bad_arguments():
    t = rows_to_table(_rows())
    with pytest.raises(ConfigError, match="same split"):
        build_leaderboard(t, select_metric="test/max_box_acc_v2")
    with pytest.raises(ConfigError, match="<split>/<name>"):
        build_leaderboard(t, select_metric="max_box_acc_v2")
    with pytest.raises(ConfigError, match="n_boot"):
        build_leaderboard(t, n_boot=10)


def test_bootstrap_ci_bounds():
    rng = np.random.default_rng(0)
    values = np.array([1.0, 2.0, 3.0, 10.0])
    lo, hi = bootstrap_ci(values, 2000, rng)
    assert 1.0 <= lo < values.mean() < hi <= 10.0
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([5.0]), 2000, rng))


def test_render_rich_says_splits():
    lb = build_leaderboard(rows_to_table(_rows()))
    console = Console(width=250, record=True)
    console.print(render_rich(lb))
    text = console.export_text()
    assert "selected on val" in text and "reported on test" in text
    assert "42.00 ± 2.65" in text  # cam: mean ± sqrt(7)
    assert "± n/a" in text  # topgap's single seed
    assert "not enough seeds" in text


def test_diverged_or_failed_runs_never_select():
    """A run with a NaN/inf metric (diverged) or status FAILED is never picked, however good its val."""
    rows = [_run(i, "cam", 0.1, s, 50, 40 + s) for i, s in enumerate(range(2))]
    nan_loss = _run(10, "cam", 10.0, 0, 99, 90)  # FINISHED but its loss went NaN
    nan_loss["metrics"]["train/loss"] = math.nan
    inf_val = _run(11, "cam", 5.0, 0, math.inf, 91)  # an infinite selection metric
    failed = _run(12, "cam", 3.0, 0, 98, 92, status="FAILED")
    stored_inf = _run(13, "cam", 4.0, 0, 97, 93)  # inf as MLflow's SQL store returns it
    stored_inf["metrics"]["train/loss"] = 1.7976931348623157e308
    lb = build_leaderboard(rows_to_table(rows + [nan_loss, inf_val, failed, stored_inf]))
    cam = _by_method(lb)["cam"]
    assert sorted(cam["run_ids"]) == ["r000", "r001"]
    assert cam["select_mean"] == pytest.approx(50.0) and cam["test/max_box_acc_v2.mean"] == pytest.approx(40.5)
    assert cam["n_trials"] == 6 and cam["n_failed"] == 1
    # only diverged runs: the group has no selectable configuration and no row
    assert build_leaderboard(rows_to_table([nan_loss, inf_val, failed])).num_rows == 0


def test_rows_not_beating_the_best_trivial_baseline_are_marked():
    """Per dataset the best trivial baseline (here center_gaussian at 44, whole_image at 30) is
    compared with every row whatever its backbone; a deterministic baseline run with one seed is a
    constant. cam (40, 41, 45) and topgap (one seed) are marked; minmaxcam (50, 52, 54) is not."""
    rows = _rows()
    add = lambda *a, **k: rows.append(_run(len(rows), *a, **k))  # noqa: E731
    add("center_gaussian", 0.0, 0, 45, 44, backbone="none")
    add("center_gaussian", 0.0, 0, 40, 99, backbone="none")  # another sigma: worse on val, never selected
    rows[-1]["params"]["lr"] = 1.0
    add("whole_image", 0.0, 0, 20, 30, backbone="none")
    lb = build_leaderboard(rows_to_table(rows))
    r18 = _by_method(lb)
    cg = _by_method(lb, "none")["center_gaussian"]
    assert cg["test/max_box_acc_v2.mean"] == pytest.approx(44.0)
    assert cg["trivial_verdict"] == "is the best trivial baseline" and cg["below_trivial"] is None
    assert _by_method(lb, "none")["whole_image"]["trivial_verdict"] == "is a trivial baseline"
    mm = r18["minmaxcam"]
    assert mm["trivial_baseline"] == "center_gaussian" and mm["trivial_n"] == 3
    assert mm["trivial_diff_mean"] == pytest.approx(8.0) and mm["below_trivial"] is False
    assert mm["trivial_p_value"] == pytest.approx(stats.ttest_1samp([6.0, 8.0, 10.0], 0.0).pvalue)
    assert r18["cam"]["trivial_diff_mean"] == pytest.approx(-2.0) and r18["cam"]["below_trivial"] is True
    assert r18["cam"]["trivial_verdict"] == "does not beat center_gaussian beyond seed noise"
    assert r18["topgap"]["below_trivial"] is True and "fewer than 3" in r18["topgap"]["trivial_verdict"]
    # the r50 minmaxcam (60, 62) is far above 44 but has two seeds: not called beyond seed noise
    assert _by_method(lb, "r50")["minmaxcam"]["below_trivial"] is True
    console = Console(width=400, record=True)
    console.print(render_rich(lb))
    text = console.export_text()
    assert "vs best trivial baseline" in text and "✗ -2.00: does not beat center_gaussian" in text
    assert "+8.00: beats center_gaussian beyond seed noise" in text


def test_no_trivial_baseline_marks_nothing():
    lb = build_leaderboard(rows_to_table(_rows()))
    assert all(r["below_trivial"] is None for r in lb.to_pylist())
    assert {r["trivial_verdict"] for r in lb.to_pylist()} == {"no trivial baseline on this dataset"}


def test_dashboard_table_marks_rows_below_the_trivial_baseline():
    from weakbench.dashboards.build import leaderboard_html

    rows = _rows()
    rows.append(_run(len(rows), "center_gaussian", 0.0, 0, 45, 44, backbone="none"))
    html = leaderboard_html(build_leaderboard(rows_to_table(rows)), None)
    marked = [tr.split(">", 1)[0] for tr in html.split("<tr")[1:] if "below-trivial" in tr.split(">", 1)[0]]
    assert len(marked) == 4  # cam, topgap, puzzlecam and the two-seed r50 minmaxcam; not minmaxcam r18 nor the baseline
    assert all('data-method="center_gaussian"' not in m for m in marked)
    assert "vs best trivial baseline" in html and "✗ -2.00: does not beat center_gaussian" in html


def test_two_seeds_are_never_beyond_seed_noise():
    """A large, consistent difference on two common seeds is still 'not enough seeds'; the same
    differences on three seeds are called."""
    rows = [_run(i, "cam", 0.1, s, 50, t) for i, (s, t) in enumerate([(0, 40), (1, 41)])]
    rows += [_run(10 + i, "minmaxcam", 0.1, s, 50, t) for i, (s, t) in enumerate([(0, 60), (1, 62)])]
    mm = _by_method(build_leaderboard(rows_to_table(rows)))["minmaxcam"]
    assert mm["baseline_n_pairs"] == 2 and mm["baseline_diff_mean"] == pytest.approx(20.5)
    assert mm["baseline_verdict"] == "not enough seeds"
    rows += [_run(20, "cam", 0.1, 2, 50, 42), _run(21, "minmaxcam", 0.1, 2, 50, 61)]
    mm = _by_method(build_leaderboard(rows_to_table(rows)))["minmaxcam"]
    assert mm["baseline_verdict"] == "better than cam beyond seed noise"


def _zero_epoch(i, seed, val, test, head="pretrained_head"):
    r = _run(i, "cam", 0.0, seed, val, test)
    r["params"].update(epochs="0", pretrained="True", classifier_init=head)
    return r


def test_seed_free_rows_are_constants_and_two_of_them_differ_exactly():
    """A CAM at 0 epochs from the pretrained head draws nothing at random: its one seed is its
    value for every seed. Against the centre Gaussian (also seed-free) the difference is exact
    (69 − 63 = +6, no test); minmaxcam's three seeds (71, 71.5, 72) are tested against cam's
    constant 69: differences 2, 2.5, 3, one-sample t-test (p ≈ 0.013)."""
    rows = [_zero_epoch(0, 0, 60, 69.0), _run(1, "center_gaussian", 0.0, 0, 58, 63.0, backbone="none")]
    rows += [_run(2 + s, "minmaxcam", 0.1, s, 61, 71.0 + 0.5 * s) for s in range(3)]
    lb = build_leaderboard(rows_to_table(rows))
    r18 = _by_method(lb)
    cam, mm = r18["cam"], r18["minmaxcam"]
    assert cam["seed_free"] is True and mm["seed_free"] is False
    assert _by_method(lb, "none")["center_gaussian"]["seed_free"] is True
    assert cam["trivial_diff_mean"] == pytest.approx(6.0) and cam["below_trivial"] is False
    assert cam["trivial_verdict"] == "beats center_gaussian, exact: neither depends on the seed"
    assert mm["baseline_n_pairs"] == 3 and mm["baseline_diff_mean"] == pytest.approx(2.5)
    assert mm["baseline_p_value"] == pytest.approx(stats.ttest_1samp([2.0, 2.5, 3.0], 0.0).pvalue)
    assert mm["baseline_verdict"] == "better than cam beyond seed noise"
    # below the centre Gaussian the exact verdict says so, and the row is marked
    rows[0] = _zero_epoch(0, 0, 60, 62.0)
    cam = _by_method(build_leaderboard(rows_to_table(rows)))["cam"]
    assert cam["below_trivial"] is True and cam["trivial_verdict"].startswith("does not beat center_gaussian, exact")
    # two minmaxcam seeds against the constant are still too few
    lb = build_leaderboard(rows_to_table(rows[:4]))
    assert _by_method(lb)["minmaxcam"]["baseline_verdict"] == "not enough seeds"


def test_a_new_head_or_training_is_not_seed_free():
    """A zero-epoch CAM with a randomly initialised head depends on the seed: one seed is not
    enough to call anything; so does any run that trains."""
    from weakbench.methods import get_method_class

    rows = [_zero_epoch(0, 0, 60, 69.0, head="random"), _run(1, "center_gaussian", 0.0, 0, 58, 63.0, backbone="none")]
    cam = _by_method(build_leaderboard(rows_to_table(rows)))["cam"]
    assert cam["seed_free"] is False and cam["below_trivial"] is True and "fewer than 3" in cam["trivial_verdict"]
    from weakbench.platform.leaderboard import typed_config

    def seed_free(name, params):  # as the board decides it: MLflow's text params, typed at the boundary
        cls = get_method_class(name)
        return cls.seed_free(typed_config(cls, params))

    base = {"epochs": "0", "pretrained": "True", "classifier_init": "pretrained_head", "lr_milestones": "(0.5, 0.75)",
            "weights_path": "None", "backbone": "resnet18"}
    assert seed_free("cam", base) and seed_free("minmaxcam", base)
    assert not seed_free("cam", {**base, "epochs": "1"}) and not seed_free("cam", {**base, "pretrained": "False"})
    assert not seed_free("cam", {k: v for k, v in base.items() if k != "classifier_init"})
    assert seed_free("whole_image", {}) and not seed_free("bbam", base) and not seed_free("topgap", base)
    # the adapter reads each text back as the literal it was written from
    cfg = typed_config(get_method_class("cam"), base)
    assert (cfg.epochs, cfg.pretrained, cfg.lr_milestones, cfg.weights_path) == (0, True, (0.5, 0.75), None)
