"""Per-image results (weakbench.core.metrics.per_image): the evaluated split's metrics are
recomputed exactly from its per-image table, on the whole split and on any resample."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from weakbench.methods import build_method
from weakbench.core.errors import DataError
from weakbench.core.metrics import PxAPEvaluator, WsolEvaluator
from weakbench.core.metrics.per_image import (
    PerImage, build_table, metric_at_threshold, metric_on_weights, read_table, write_table,
)


def test_split_metrics_recomputed_exactly_from_the_table(tmp_path):
    """A centre Gaussian on the synthetic default (boxes and masks): every box metric, top-1 loc
    and PxAP of the split equal those recomputed from the stored table (all weights 1), after a
    Parquet round trip."""
    from weakbench.core.data import open_dataset
    from weakbench.methods.evaluate import evaluate_split

    source = open_dataset(None, cache_dir=tmp_path)
    m = build_method("center_gaussian", {"input_size": 32, "sigma": 0.3}, num_classes=source.num_classes,
                     multilabel=source.multilabel)
    metrics, _, details = evaluate_split(m, m.build_model(), source, list(range(24)), input_size=32,
                                         device=torch.device("cpu"), batch_size=5)
    write_table(details["per_image"], tmp_path / "t.parquet", "test")
    data = PerImage(read_table(tmp_path / "t.parquet"))
    assert len(data) >= 24 and set(data.images.tolist()) <= {str(r.image_id) for r in source.records}
    ones = np.ones((1, len(data)))
    for name in ("max_box_acc", "max_box_acc_v2", "max_box_acc_v2_iou30", "max_box_acc_v2_iou70", "top1_loc",
                 "pxap"):
        assert metric_on_weights(data, name, ones)[0] == pytest.approx(metrics[name], abs=1e-9), name
    # the test split's accuracy at its own best threshold is MaxBoxAcc
    assert metric_at_threshold(data, "max_box_acc", metrics["best_threshold"], ones)[0] == pytest.approx(
        metrics["max_box_acc"])


def _random_maps(rng, n, s=24):
    maps = rng.random((n, s, s)).astype(np.float32)
    maps = np.cumsum(np.cumsum(maps, 1), 2)
    maps = (maps - maps.min((1, 2), keepdims=True)) / np.ptp(maps, (1, 2), keepdims=True)
    return maps


def test_resample_equals_evaluating_the_resampled_images():
    """A weighted set (image i counted w_i times) gives what the evaluators give on the images
    repeated: the max over thresholds is taken on the resample, not per image."""
    rng = np.random.default_rng(0)
    n, s = 12, 24
    maps = _random_maps(rng, n, s)
    boxes = [np.array([[rng.integers(0, 8), rng.integers(0, 8), rng.integers(12, 23), rng.integers(12, 23)]])
             for _ in range(n)]
    masks = rng.random((n, s, s)) > 0.6
    top1 = rng.random(n) > 0.3
    ev = WsolEvaluator(cam_curve_interval=0.05)
    ev.accumulate(maps, boxes, class_correct_top1=top1)
    px = PxAPEvaluator(cam_curve_interval=0.05)
    px.accumulate(maps, masks)
    bits = {"box_iou50": np.concatenate(ev.v1.sample_bits[50])}
    bits.update({f"box_v2_iou{d}": np.concatenate(ev.v2.sample_bits[d]) for d in (30, 50, 70)})
    table = build_table("test", ev.v1.thresholds, [f"im{i}" for i in range(n)], [0] * n, bits, top1=top1,
                        pos=px.sample_pos, neg=px.sample_neg)
    data = PerImage(table)
    counts = rng.integers(0, 3, size=n)
    counts[0] = 1
    rep = np.repeat(np.arange(n), counts)
    ev2 = WsolEvaluator(cam_curve_interval=0.05)
    ev2.accumulate(maps[rep], [boxes[i] for i in rep], class_correct_top1=top1[rep])
    px2 = PxAPEvaluator(cam_curve_interval=0.05)
    px2.accumulate(maps[rep], masks[rep])
    want = {**ev2.compute(), "pxap": px2.compute()["pxap"]}
    for name in ("max_box_acc", "max_box_acc_v2", "top1_loc", "pxap"):
        assert metric_on_weights(data, name, counts[None, :].astype(float))[0] == pytest.approx(want[name]), name


def test_other_version_is_refused():
    t = build_table("test", np.array([0.0, 0.5]), ["a"], [0], {"box_iou50": np.array([[True, False]])})
    old = t.replace_schema_metadata({b"weakbench.per_image_version": b"0"})
    with pytest.raises(DataError, match="rebuild the results store"):
        PerImage(old)
    with pytest.raises(DataError, match="cannot be recomputed"):
        metric_on_weights(PerImage(t), "pxap", np.ones((1, 1)))


def test_trial_logs_per_image_results_that_reach_the_store(tmp_path):
    """An inline trial of the centre Gaussian logs per_image/<split>/per_image.parquet for its val
    and test stages; the store copies them, and they recompute the logged test metrics."""
    from weakbench.platform import tracking
    from weakbench.core.data import open_dataset
    from weakbench.core.data.splits import make_splits, save_splits
    from weakbench.platform.engine import run_trial
    from weakbench.platform.results import read_per_image, read_store, update_store
    from weakbench.platform.engine import TrialSpec

    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    save_splits(make_splits(source, seed=0), cache / "splits.json")
    spec = TrialSpec(method="center_gaussian", params={"input_size": 32}, data=None, data_cache=str(cache),
                     splits_path=str(cache / "splits.json"), trial_dir=str(tmp_path / "trial"),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id="t0",
                     run_name="cg-t0", eval_max_images=12, num_overlays=0, log_model=False)
    metrics = run_trial(spec, executor="inline")
    store = tmp_path / "store"
    update_store(spec.tracking_uri, store)
    table = read_store(store)
    (rid,) = table["run_id"].to_pylist()
    assert set(read_per_image(store, [rid], "val")) == {rid}
    data = PerImage(read_per_image(store, [rid], "test")[rid])
    assert len(data) >= 12 and data.thresholds.size == 100
    for name in ("max_box_acc", "max_box_acc_v2", "pxap"):
        assert metric_on_weights(data, name, np.ones((1, len(data))))[0] == pytest.approx(metrics[f"test/{name}"])


def test_evaluate_runs_reach_the_evaluation_board(tmp_path):
    """``weakbench evaluate`` logs its per-image results; the store keeps evaluations apart from
    trials and build_boards sets them on a board of their own, with intervals over the images."""
    from weakbench.platform import tracking
    from weakbench.platform.evaluation import evaluate_dataset
    from weakbench.platform.leaderboard import board_records, build_boards
    from weakbench.platform.results import read_store, update_store

    uri = tracking.default_tracking_uri(tmp_path)
    for method, params in (("center_gaussian", {"input_size": 32, "sigma": 0.3}), ("whole_image", {"input_size": 32})):
        evaluate_dataset(None, tracking_uri=uri, method=method, params=params, cache_dir=tmp_path / "cache",
                         max_images=16, num_overlays=0, device="cpu")
    store = tmp_path / "store"
    update_store(uri, store)
    assert read_store(store).num_rows == 0  # no trial: the evaluations live apart
    boards = build_boards(read_store(store), store, n_boot=200)
    ev = board_records(boards[-1])
    assert ev["reported_on"] == "all" and {r["method"] for r in ev["rows"]} == {"center_gaussian", "whole_image"}
    for r in ev["rows"]:
        assert r["n_images"] == 16 and r["noise"] == "images (16); seed-free"
        assert r["all/max_box_acc_v2.ci_low"] <= r["all/max_box_acc_v2.mean"] <= r["all/max_box_acc_v2.ci_high"]
