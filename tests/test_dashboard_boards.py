"""The dashboard's data: boards grouped by headline, what a board shows, every trial of a sweep.

Fast (no browser): the board grouping shared with ``weakbench leaderboard``
(:func:`weakbench.platform.leaderboard.board_tables`), :func:`weakbench.dashboards.build.board_view`
on hand-built runs, and :func:`weakbench.dashboards.build.sweep_views` on real MLflow runs in SQLite.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from weakbench.dashboards.build import board_view, leaderboard_html, sweep_views
from weakbench.dashboards.synthetic import log_synthetic_sweeps
from weakbench.platform import results
from weakbench.platform.leaderboard import board_tables, build_leaderboard
from weakbench.platform.results import rows_to_table


def _run(i, method, seed, metrics, backbone="r18", status="FINISHED", lr="0.1"):
    return {"run_id": f"run{i:03d}", "run_name": f"{method}-{i}", "dataset": "d", "method": method,
            "backbone": backbone, "seed": seed, "status": status, "sweep_id": f"sweep-{method}",
            "start_time": 1_700_000_000_000 + i * 1000, "experiment_id": "1",
            "params": {"lr": lr, "seed": str(seed)}, "metrics": metrics}


def _wsol(val, test):
    return {"val/max_box_acc_v2": val, "test/max_box_acc_v2": test, "test/pxap": test - 5,
            "test/best_threshold": 0.3, "test/num_images": 260.0}


def _box(head, val, test):
    return {f"val/pseudo_masks/{head}": val, f"test/pseudo_masks/{head}": test,
            f"test/pseudo_masks/box_filled/{head}": test - 4, "test/pseudo_masks/num_instances": 90.0}


def _store_rows():
    rows = [_run(s, "cam", s, _wsol(50 + s, 49 + s)) for s in range(3)]
    rows += [_run(10 + s, "center_gaussian", s, _wsol(45, 44), backbone="none") for s in range(3)]
    rows += [_run(20 + s, "bbam", s, _box("instance_miou", 40 + s, 39 + s)) for s in range(3)]
    rows += [_run(30 + s, "ccgr", s, {"val/mask_rcnn/map_r50": 30 + s, "test/mask_rcnn/map_r50": 29 + s,
                                       "test/pseudo_masks_with_labels/map_r50": 60.0}) for s in range(3)]
    return rows


def test_runs_are_grouped_into_one_board_per_headline():
    table = rows_to_table(_store_rows())
    boards = dict(board_tables(table))  # in DISPLAY_ORDER of their headline
    assert list(boards) == ["val/max_box_acc_v2", "val/pseudo_masks/instance_miou", "val/mask_rcnn/map_r50"]
    assert sorted(set(boards["val/max_box_acc_v2"]["method"].to_pylist())) == ["cam", "center_gaussian"]
    assert set(boards["val/mask_rcnn/map_r50"]["method"].to_pylist()) == {"ccgr"}
    assert [k for k, _ in board_tables(table, "val/pxap")] == ["val/pxap"]  # a metric given: one board
    assert [k for k, _ in board_tables(table.slice(0, 0))] == ["val/max_box_acc_v2"]


def test_board_view_puts_the_verdict_and_headline_first_and_keeps_diagnostics_out_of_the_scores():
    table = dict(board_tables(rows_to_table(_store_rows())))["val/max_box_acc_v2"]
    v = board_view(build_leaderboard(table, n_boot=200))
    assert v.primary == "test/max_box_acc_v2" and v.scores == ["test/max_box_acc_v2", "test/pxap"]
    assert v.diagnostics == ["test/best_threshold", "test/num_images"]
    roles = {r["method"]: (r["_role"], r["_flags"], r["_verdict"]) for r in v.rows}
    assert roles["center_gaussian"] == ("baseline", [], "is the best trivial baseline")
    assert roles["cam"][0] == "method" and roles["cam"][1] == [] and "beats center_gaussian" in roles["cam"][2]
    html = leaderboard_html(v, None)
    heads = html.split("<tbody>")[0].split("<th ")[1:]
    assert 'class="row"' in heads[0] and 'class="verdict"' in heads[1] and 'class="headline"' in heads[2]
    assert 'data-role="baseline"' in html and "best threshold" not in html  # diagnostics: folded table only


def test_board_view_reads_new_columns_of_the_board_records():
    """A column the leaderboard adds (``flags``, ``verdict``) reaches the page through board_view."""
    lb = build_leaderboard(dict(board_tables(rows_to_table(_store_rows())))["val/max_box_acc_v2"], n_boot=200)
    flags = [["CRR inactive: 64 % of sets hold one image"] if m == "cam" else [] for m in lb["method"].to_pylist()]
    lb = lb.append_column("flags", pa.array(flags, pa.list_(pa.string())))
    lb = lb.append_column("verdict", pa.array([f"verdict of {m}" for m in lb["method"].to_pylist()]))
    v = board_view(lb)
    cam = next(r for r in v.rows if r["method"] == "cam")
    assert cam["_flags"] == ["CRR inactive: 64 % of sets hold one image"] and cam["_verdict"] == "verdict of cam"
    html = leaderboard_html(v, None)
    assert 'data-method="cam" data-role="method" data-flagged="1"' in html and "CRR inactive" in html


def test_sweep_views_show_every_trial_with_its_last_value(tmp_path):
    """Finished, failed and scheduler-stopped trials of real MLflow runs: the stopped one is in the
    sweep with its last (epoch 1) value and is told apart from an interrupted one only through the
    MLflow tag; histories are read per epoch."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log_synthetic_sweeps(uri, methods=("bbam",), n_configs=2, n_seeds=1, failed_runs=1, stopped_runs=1, epochs=3,
                         artifact_location=(tmp_path / "a").as_uri())
    results.update_store(uri, tmp_path / "store")
    table = results.read_store(tmp_path / "store")
    assert table.num_rows == 4
    [sw] = sweep_views(table, uri)
    assert sw.metric == "val/pseudo_masks/instance_miou" and sw.curves_note == ""
    assert sorted(t.status for t in sw.trials) == ["finished", "finished", "stopped early"]  # failed: no value
    stopped = next(t for t in sw.trials if t.status == "stopped early")
    assert [s for s, _ in stopped.history] == [1] and stopped.value == pytest.approx(stopped.history[0][1])
    finished = [t for t in sw.trials if t.status == "finished"]
    assert all([s for s, _ in t.history] == [1, 2, 3] and t.value == pytest.approx(t.history[-1][1]) for t in finished)
    [plain] = sweep_views(table)  # no MLflow: no curves, and KILLED is not called "stopped early"
    assert sorted(t.status for t in plain.trials) == ["finished", "finished", "killed"] and plain.curves_note


def test_board_view_shows_paired_verdicts_their_noise_and_the_ranking_disagreement():
    """With per-image results the board's rows carry Holm-corrected verdicts over test images and
    seeds and say what their interval covers; MaxBoxAcc and MaxBoxAccV2 ranking cam and the centre
    Gaussian in opposite orders shows as a note above the table (not buried in the legend)."""
    from weakbench.dashboards.synthetic import _with_per_image

    rows, per_image = [], {}
    for i, (method, v2, acc) in enumerate([("cam", 62.0, 40.0)] * 3 + [("center_gaussian", 45.0, 50.0)] * 3):
        seed = i % 3
        metrics = {"val/max_box_acc_v2": v2 + seed, "test/max_box_acc_v2": v2, "test/max_box_acc": acc}
        metrics, per_image[f"run{i:03d}"] = _with_per_image(metrics, "test", 100, "d", [i])
        rows.append(_run(i, method, seed, metrics, backbone="r18" if method == "cam" else "none"))
    v = board_view(build_leaderboard(rows_to_table(rows), n_boot=200, per_image=per_image))
    cam = next(r for r in v.rows if r["method"] == "cam")
    assert v.paired and cam["_verdicts"] and "beats center_gaussian" in cam["_verdicts"][0]
    assert cam["_noise"] == "test images (100) x seeds (3)" and cam["_counts"].startswith("100 images · 3 seeds")
    assert [d.split(" (")[0] for d in v.disagreements] == ["MaxBoxAccV2 ranks cam above center_gaussian"]
    assert "Disagreement:" not in v.legend and "paired over test images and seeds, Holm-corrected" in v.legend
    html = leaderboard_html(v, None)
    assert "verdict: paired over test images and seeds, Holm over the board" in html
    assert "beyond seed noise" not in html and 'class="paired"' in html


def test_ccgr_rows_show_bag_quality_and_proposal_recall_in_words():
    """CCGR's row diagnostics (``CCGR.row_diagnostics``): the proposal recall (its boxes' ceiling)
    and the bags against random bags of the same size, from the logged test values (mean over the
    row's seeds), on the leaderboard row, in the CLI table and on the dashboard; never a flag. A
    row that did not log them (the bag figures here) shows none of those words."""
    from rich.console import Console

    from weakbench.platform.leaderboard import render_rich

    diag = {"test/proposals/proposal_recall": 41.0, "test/peaks/bag_best_iou": 61.5,
            "test/peaks/random_bag_best_iou": 61.4, "test/peaks/bag_top1_iou": 56.0,
            "test/peaks/random_bag_top1_iou": 34.0}
    rows = [_run(30 + s, "ccgr", s, {"val/mask_rcnn/map_r50": 30 + s, "test/mask_rcnn/map_r50": 29 + s,
                                      **{k: v + s for k, v in diag.items()}}) for s in range(3)]
    lb = build_leaderboard(rows_to_table(rows), "val/mask_rcnn/map_r50", n_boot=100)
    row = lb.to_pylist()[0]
    assert row["diagnostics"] == [
        "proposal recall@0.5 42 % (the ceiling of boxes picked among the proposals)",
        "bags (IoU with GT): best 62.5 %, top-1 57.0 %; random bags of the same size 62.4 % / 35.0 %"]
    # the words are not flags (below 50 % the proposal recall is also flagged, by its mechanism check)
    assert row["flags"] == ["proposals miss objects: 42 % of GT boxes have a proposal at IoU 0.5"]
    console = Console(width=400, record=True)
    console.print(render_rich(lb, max_metrics=2))
    text = console.export_text()
    assert "row diagnostics" in text and "62.4 % / 35.0 %" in text
    html = leaderboard_html(build_leaderboard(rows_to_table(rows), "val/mask_rcnn/map_r50", n_boot=100), None)
    assert "best 62.5 %, top-1 57.0 %" in html and "proposal recall@0.5 42 %" in html
    # only the proposal recall logged: the bag words are left out, not filled with nan
    bare = [_run(40 + s, "ccgr", s, {"val/mask_rcnn/map_r50": 30.0 + s, "test/mask_rcnn/map_r50": 29.0 + s,
                                      "test/proposals/proposal_recall": 41.0}) for s in range(2)]
    assert build_leaderboard(rows_to_table(bare), "val/mask_rcnn/map_r50", n_boot=100).to_pylist()[0][
        "diagnostics"] == ["proposal recall@0.5 41 % (the ceiling of boxes picked among the proposals)"]
