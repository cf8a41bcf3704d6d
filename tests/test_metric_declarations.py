"""Metric declarations (weakbench.methods.metric_declarations): every key the methods' evaluation
stages emit is declared, lookups go through stage namespaces and baseline variants, the board ranks
in the declared direction, and the line under the board says what the headline means and which row
is the baseline."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from weakbench.methods import build_method, get_method_class, list_methods
from weakbench.methods.pipeline import StageContext
from weakbench.methods import metric_declarations as D
from weakbench.core.conventions import TRIVIAL_BASELINES
from weakbench.platform.loops import stage_key as _stage_key
from weakbench.core.errors import ConfigError
from weakbench.platform.leaderboard import build_leaderboard, leaderboard_metrics, legend, render_rich
from weakbench.platform.results import rows_to_table

#: small models for every classifier method (the methods' own test files use the same sizes)
SMALL = {"backbone": "resnet10t", "input_size": 64, "batch_size": 4, "pretrained": False}
PER_METHOD = {"topgap": {"head_channels": 32, "top_k_fraction": 0.1, "eval_images": 4, "pgd_steps": 2},
              "minmaxcam": {"batch_size": 6, "set_size": 3}, "puzzlecam": {"output_stride": 16,
                                                                          "inference_scales": (1.0,)}}
# the built-in ones: toy methods other test modules register at import (tests/test_pipeline.py) are
# unregistered when their module ends, which may come before these tests run
CLASSIFIER_METHODS = [n for n in list_methods() if get_method_class(n).shape == "classifier_cam"
                      and get_method_class(n).__module__.startswith("weakbench.")]


def _params(name: str) -> dict:
    fields = get_method_class(name).Config.model_fields
    small = {k: v for k, v in SMALL.items() if not (k == "backbone" and name in TRIVIAL_BASELINES)}  # backbone: none
    return {k: v for k, v in {**small, **PER_METHOD.get(name, {})}.items() if k in fields}


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_every_key_a_classifier_method_plan_emits_is_declared(name, synthetic_dir, tmp_path):
    """Run the method's own plan on the synthetic data (untrained model): the validation after the
    last epoch of every fit stage and every eval stage, keyed as the engine keys them. Every key is
    declared, and the method-specific metrics (extra_metrics) reach the test split, which the board
    reports."""
    from weakbench.core.data import make_splits, open_dataset

    source = open_dataset(synthetic_dir)
    m = build_method(name, _params(name), num_classes=source.num_classes, multilabel=source.multilabel)
    torch.manual_seed(0)
    model = m.build_model()
    splits = make_splits(source, seed=0)
    keys: dict[str, float] = {}
    for st in m.plan():
        ctx = StageContext(stage=st, config=m.config, source=source, splits=splits, inputs={}, out_dir=tmp_path,
                           device=torch.device("cpu"), load_model=lambda _stage: model, max_images=4, num_overlays=0,
                           eval_batch_size=4)
        if st.kind == "fit":
            out, split = m.fit_task(st).validate(model, ctx, last=True), "val"
        elif st.kind == "eval":
            out, split = m.evaluate_stage(st, ctx)[0], st.split
        else:
            continue
        keys.update({_stage_key(st, split, k): v for k, v in out.items()})
    assert any(k.startswith("test/") for k in keys), keys
    assert not D.undeclared(keys), D.undeclared(keys)
    # what extra_metrics reports on validation also reaches the test split
    extra = {k.split("/", 1)[1] for k in keys if k.startswith("val/")} - {k.split("/", 1)[1] for k in keys if k.startswith("test/")}
    assert not extra, f"{name}: validation-only metrics never reach the board: {sorted(extra)}"
    if name == "topgap":
        assert "test/robust_accuracy" in keys and D.spec("test/robust_accuracy").direction == "max"
    # through the results store's table to the board: every test metric is a reported column
    lb = build_leaderboard(rows_to_table([_run(0, name, 0, keys)]), select_metric=f"val/{D.headline_metric(name)}")
    assert lb.num_rows == 1
    assert {k for k in keys if k.startswith("test/")} <= set(leaderboard_metrics(lb))


def test_instance_metric_producers_are_declared(synthetic_dir):
    """BBAM's and CCGR's scores come from PseudoMaskEvaluator and COCO evaluation: their keys, under
    the namespaces and baseline prefixes the methods log them with, are declared (the slow
    end-to-end tests in test_bbam.py / test_ccgr.py check a real run's keys)."""
    from weakbench.core.data import open_dataset
    from weakbench.core.metrics import PseudoMaskEvaluator, coco_gt_from_source, coco_instance_eval

    source = open_dataset(synthetic_dir)
    ev = PseudoMaskEvaluator(source, source.num_classes)
    ann = source.annotations(0)
    ev.accumulate(0, [np.asarray(mk, dtype=bool) for mk in ann.instance_masks])
    names = set(ev.compute())
    names |= set(coco_instance_eval(coco_gt_from_source(source, [0]), [], iou_types=("segm", "bbox")))
    keys = [f"{s}/{ns}{n}" for s in ("val", "test") for n in names
            for ns in ("pseudo_masks/", "pseudo_masks/box_filled/", "pseudo_masks/box_crf/", "pseudo_masks/r2/",
                       "pseudo_masks/unrefined/", "mask_rcnn/", "detector/")]
    assert not D.undeclared(keys), D.undeclared(keys)


def test_every_headline_is_declared_and_the_search_space_default_comes_from_it():
    from weakbench.platform.search_space import parse_search_space

    # the shipped methods (other tests register toy methods, e.g. test_pipeline's, in the same registry)
    shipped = [n for n in list_methods() if get_method_class(n).__module__.startswith("weakbench.methods")]
    assert {"cam", "bbam", "ccgr", "center_gaussian"} <= set(shipped)
    for name in shipped:
        head = D.headline_metric(name)
        spec = D.spec(head)
        assert spec.direction in ("max", "min") and spec.selects_on == "val" and spec.description, name
        space = parse_search_space({"method": name})
        assert space.metric == f"val/{head}" == D.default_select_metric(name)
        assert space.mode == spec.direction
    with pytest.raises(ConfigError, match="not declared.*metric_specs.py"):
        parse_search_space({"method": "cam", "metric": "val/made_up_score"})
    with pytest.raises(ConfigError, match="diagnostic"):
        parse_search_space({"method": "cam", "metric": "val/best_threshold"})


@pytest.mark.parametrize("key, name, direction, base", [
    ("val/max_box_acc_v2", "max_box_acc_v2", "max", ""),
    ("max_box_acc_v2", "max_box_acc_v2", "max", ""),
    ("test/pseudo_masks/instance_miou", "instance_miou", "max", ""),
    ("val/pseudo_masks/box_filled/instance_miou", "box_filled/instance_miou", "max", "instance_miou"),
    ("test/pseudo_masks/box_crf/miou", "box_crf/miou", "max", "miou"),
    ("val/pseudo_masks/unrefined/map_r50", "unrefined/map_r50", "max", "map_r50"),
    ("val/pseudo_masks/r1/map_r50", "r1/map_r50", "max", "map_r50"),
    ("val/pseudo_masks/round_gain/map_r50", "round_gain/map_r50", "max", "map_r50"),
    ("test/pseudo_masks/r2/refinement_gain/box_iou", "r2/refinement_gain/box_iou", "max", "box_iou"),
    ("test/mask_rcnn/segm_map_r50", "segm_map_r50", "max", ""),
    # CCGR's headline (the IS branch) and its diagnostics made with image labels (a variant: never
    # quoted before the scores people compare)
    ("test/mask_rcnn/map_r50", "map_r50", "max", ""),
    ("test/proposals/proposal_recall", "proposal_recall", "max", ""),
    ("val/pseudo_masks_with_labels/map_r50", "pseudo_masks_with_labels/map_r50", "max", "map_r50"),
    ("val/pseudo_masks_with_labels/r1/unrefined/map_r50", "pseudo_masks_with_labels/r1/unrefined/map_r50", "max",
     "map_r50"),
    ("test/pseudo_masks_with_labels/r2/refinement_gain/box_iou",
     "pseudo_masks_with_labels/r2/refinement_gain/box_iou", "max", "box_iou"),
    ("val/attribute/positive_share", "positive_share", "max", ""),
    ("all/pxap", "pxap", "max", ""),
    ("train/loss", "loss", "min", ""),
    ("cost/gpu_hours", "cost/gpu_hours", "min", ""),
    ("cost/pseudo_masks_seconds", "cost/pseudo_masks_seconds", "min", ""),
    ("val/best_threshold_v2_iou50", "best_threshold_v2_iou50", None, ""),
])
def test_lookup_through_namespaces_and_baseline_variants(key, name, direction, base):
    spec = D.lookup(key)
    assert spec is not None and (spec.name, spec.direction, spec.base) == (name, direction, base)
    assert spec.description and spec.display


def test_variants_say_what_they_are_and_unknown_metrics_are_refused():
    labels = D.spec("test/pseudo_masks_with_labels/map_r50")
    assert "image labels" in labels.display and "not the paper's protocol" in labels.description
    assert "PASCAL VOC" in D.spec("map_r50").description and "COCO" in D.spec("segm_ap50").description
    box = D.spec("val/pseudo_masks/box_filled/instance_miou")
    assert "box itself filled as the mask" in box.description
    assert D.spec("instance_miou").description in box.description
    assert D.lookup("val/pseudo_masks/r1/made_up") is None and D.lookup("val/box_filled/nothing") is None
    assert D.lookup("val/made_up_score") is None
    with pytest.raises(D.UnknownMetricError, match="metric_specs.py"):
        D.spec("val/made_up_score")
    with pytest.raises(ConfigError, match="diagnostic"):
        D.higher_is_better("val/num_images")
    assert D.baseline_metric("test/pseudo_masks/instance_miou") == "test/pseudo_masks/box_filled/instance_miou"
    assert D.baseline_metric("test/max_box_acc_v2") is None


def _run(i, method, seed, metrics, backbone="r18", dataset="d"):
    return {"run_id": f"r{i:03d}", "method": method, "backbone": backbone, "dataset": dataset, "seed": seed,
            "status": "FINISHED", "experiment_id": "1", "sweep_id": f"s-{method}",
            "params": {"lr": 0.1, "seed": seed}, "metrics": metrics}


def test_the_board_ranks_a_min_metric_ascending_and_refuses_an_undeclared_one():
    rows = [_run(i, m, 0, {"val/loss": v, "test/loss": v, "test/max_box_acc_v2": 50.0})
            for i, (m, v) in enumerate([("cam", 0.5), ("minmaxcam", 0.2), ("topgap", 0.9)])]
    lb = build_leaderboard(rows_to_table(rows), select_metric="val/loss")
    assert [r["method"] for r in lb.to_pylist()] == ["minmaxcam", "cam", "topgap"]  # lower is better first
    for r in rows:
        r["metrics"]["val/max_box_acc_v2"] = r["metrics"]["test/max_box_acc_v2"] = 100 * r["metrics"]["val/loss"]
    lb = build_leaderboard(rows_to_table(rows))
    assert [r["method"] for r in lb.to_pylist()] == ["topgap", "cam", "minmaxcam"]  # higher is better first
    with pytest.raises(ConfigError, match="not declared"):
        build_leaderboard(rows_to_table(rows), select_metric="val/made_up_score")


def _board_rows(with_trivial: bool):
    rows = []
    for s, (v, t) in enumerate([(50, 40), (52, 41), (54, 45)]):
        rows.append(_run(len(rows), "cam", s, {"val/max_box_acc_v2": v, "test/max_box_acc_v2": t}))
    for s, t in enumerate([50, 52, 54]):
        rows.append(_run(len(rows), "minmaxcam", s, {"val/max_box_acc_v2": 70, "test/max_box_acc_v2": t}))
    if with_trivial:
        rows.append(_run(len(rows), "center_gaussian", 0, {"val/max_box_acc_v2": 45, "test/max_box_acc_v2": 44},
                         backbone="none"))
    return rows


def test_the_line_under_the_board_names_the_metric_and_the_baseline_row():
    lb = build_leaderboard(rows_to_table(_board_rows(True)))
    line = legend(lb)
    assert "\n" not in line
    assert D.spec("max_box_acc_v2").description in line and "higher is better" in line
    assert "Baseline: center_gaussian / none on d, the best trivial baseline" in line
    # ✗ in the legend means what it means in the table: cam is marked, minmaxcam is not
    marked = {r["method"] for r in lb.to_pylist() if r["below_trivial"]}
    assert marked == {"cam"} and "✗ marks rows that do not beat it" in line

    none = legend(build_leaderboard(rows_to_table(_board_rows(False))))
    assert "No baseline on d: this board has no trivial baseline row" in none
    assert "weakbench sweep search_spaces/center_gaussian.yaml --data <the d directory>" in none
    synthetic = [dict(r, dataset="synthetic") for r in _board_rows(False)]
    assert "center_gaussian.yaml (no --data: the synthetic default)" in legend(build_leaderboard(rows_to_table(synthetic)))


def test_a_box_supervised_board_is_compared_with_its_own_box_filled_masks():
    """BBAM-like rows log the box-filled baseline beside their headline: the legend names it and
    the rows are marked (✗) like rows that do not beat the best trivial baseline."""
    key, box = "pseudo_masks/instance_miou", "pseudo_masks/box_filled/instance_miou"
    rows = []
    for s, (ours, b) in enumerate([(70, 50), (72, 51), (71, 50)]):  # beats the box by ~20 on each seed
        rows.append(_run(len(rows), "bbam", s, {f"val/{key}": ours, f"test/{key}": ours, f"test/{box}": b,
                                                f"val/{box}": b}))
    for s, (ours, b) in enumerate([(50, 50), (52, 51)]):  # two seeds only: never beyond seed noise
        rows.append(_run(len(rows), "ccgr", s, {f"val/{key}": ours, f"test/{key}": ours, f"test/{box}": b}))
    lb = build_leaderboard(rows_to_table(rows), select_metric=f"val/{key}")
    by = {r["method"]: r for r in lb.to_pylist()}
    assert by["bbam"]["trivial_baseline"] == "box_filled" and by["bbam"]["below_trivial"] is False
    assert by["bbam"]["trivial_diff_mean"] == pytest.approx(20.666, abs=1e-2)
    assert by["ccgr"]["below_trivial"] is True and "fewer than 3" in by["ccgr"]["trivial_verdict"]
    line = legend(lb)
    assert line.startswith(f"test/{key} (instance mIoU): {D.spec(key).description}")
    assert f"each row's own box-filled masks (test/{box}" in line and "✗ marks rows" in line
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(render_rich(lb))
    text = console.export_text()
    assert f"test/{box}" in text and "beats the box-filled masks beyond seed noise" in text


def test_weakbench_leaderboard_prints_the_line_under_each_board(tmp_path):
    """The CLI prints the legend under the table (the board from a results store, no MLflow runs)."""
    from typer.testing import CliRunner

    from weakbench.cli import app
    from weakbench.platform.results import write_table

    from weakbench.platform import tracking
    from weakbench.core.conventions import DEFAULT_EXPERIMENT

    store = tmp_path / "results"
    write_table(rows_to_table(_board_rows(False)), store)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.client_for(uri).create_experiment(DEFAULT_EXPERIMENT)  # an experiment without runs
    res = CliRunner().invoke(app, ["leaderboard", "--output-dir", str(tmp_path), "--store", str(store),
                                   "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    text = re.sub(r"\s+", " ", res.output)
    table_end = text.index("does not beat the best trivial baseline")  # the table's caption
    assert text.index("test/max_box_acc_v2 (MaxBoxAccV2): share of images") > table_end
    assert "No baseline on d" in text and "search_spaces/center_gaussian.yaml --data" in text
