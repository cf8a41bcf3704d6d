"""CCGR on the stage runner: the plan (rounds, what each stage reads), config errors, a two-round
trial on the synthetic default (pseudo masks per round, refinement before/after, the IS branch's
predictor), a sweep over the context scale that computes the classifier and the proposals once,
a sweep killed in round 2 that resumes in round 2, and a capped COCO128 run.

Real Ray, real MLflow (SQLite), real data. The unit tests of the algorithm itself (box
integral, CCGR loss, refinement, peaks, bags, WSDDN) are in ``tests/test_ccgr_ops.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from weakbench.methods import build_method, validate_config
from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial
from weakbench.core.errors import ConfigError
from weakbench.methods.metric_declarations import undeclared

REPO = Path(__file__).resolve().parents[1]
PSEUDO = "pseudo_masks_with_labels"  #: namespace of the pseudo-mask diagnostics (made with image labels)
#: small enough for a 2-core CPU: each branch a few epochs on the synthetic default's 96 px images
TINY = {"backbone": "resnet18", "input_size": 96, "epochs": 8, "batch_size": 16, "lr": 0.02, "rounds": 2,
        "max_proposals": 150, "mil_epochs": 4, "mil_lr": 0.001, "semantic_epochs": 4, "semantic_lr": 0.001,
        "mask_rcnn_epochs": 3, "refinement_steps": 100}


def test_plan_rounds_and_what_each_stage_reads():
    m = build_method("ccgr", {"rounds": 2}, num_classes=4)
    plan = m.stages()
    names = [s.name for s in plan]
    assert names == ["classifier", "proposals", "peaks",
                     "mil_r1", "semantic_r1", "refine_r1", "instance_r1", "instances_r1",
                     "mil_r2", "semantic_r2", "refine_r2", "instance_r2", "evaluate", "instance_eval"]
    st = {s.name: s for s in plan}
    # a sweep over the context scale shares everything before the refinement
    for name in ("classifier", "proposals", "peaks", "mil_r1", "semantic_r1"):
        assert "context_scale" not in st[name].reads, name
    assert "context_scale" in st["refine_r1"].reads and st["refine_r1"].shared
    assert "seed" not in st["proposals"].reads and st["proposals"].inputs == ()  # keyed by data and settings only
    # the classifier product carries its validation metrics, computed at the threshold step
    assert "cam_curve_interval" in st["classifier"].reads
    # round r's branches read the classifier's fields through their input (MILNet builds its backbone from them)
    assert {"pretrained", "output_stride", "weights_path"} <= set(st["mil_r1"].reads)
    assert st["mil_r2"].inputs[-1] == "instances_r1" and st["semantic_r2"].inputs[-1] == "instances_r1"
    assert st["evaluate"].inputs == ("refine_r1", "refine_r2")
    three = [s.name for s in build_method("ccgr", {"rounds": 3}, num_classes=4).plan()]
    assert "refine_r3" in three and "instances_r2" in three and "instances_r3" not in three
    # the paper's protocol: the IS branch on held-out images without labels
    assert m.headline_metric == "mask_rcnn/map_r50"
    from weakbench.methods.metric_declarations import default_select_metric
    from weakbench.platform.search_space import load_search_space

    # register, the leaderboard and the search space all select on it, on val
    assert default_select_metric("ccgr") == "val/mask_rcnn/map_r50"
    assert load_search_space(REPO / "search_spaces" / "ccgr.yaml").metric == "val/mask_rcnn/map_r50"
    assert "objectness" in st["peaks"].reads and "context_scale" not in st["peaks"].reads
    assert m.config.peak_stop == "any" and m.config.objectness == "cam_contrast"


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="cam_bg_threshold .* must be <= cam_fg_threshold"):
        validate_config("ccgr", {"cam_fg_threshold": 0.2, "cam_bg_threshold": 0.5})
    with pytest.raises(ConfigError, match="context_scale"):
        validate_config("ccgr", {"context_scale": 1.0})
    with pytest.raises(ConfigError, match="rounds"):
        validate_config("ccgr", {"rounds": 0})


def _spec(tmp: Path, source_dir: str | None, cache: Path, splits: Path, params: dict, trial: str = "t0") -> TrialSpec:
    return TrialSpec(method="ccgr", params=params, data=source_dir, data_cache=str(cache), splits_path=str(splits),
                     trial_dir=str(tmp / trial), tracking_uri=tracking.default_tracking_uri(tmp), sweep_id="s",
                     trial_id=trial, run_name=trial, eval_max_images=16, num_overlays=2, log_model=True,
                     products_dir=str(tmp / "products"))


def test_ss_blob_boxes_pick_the_component_overlapping_the_box_most():
    """Class 1 (label 2) has two regions: a 3×2 block at x 1–3, y 1–2 and one pixel at (7, 7)
    diagonal-adjacent to a second block at x 8–9, y 8–9 (8-connected: one component). A box over
    the first block gets [1, 1, 4, 3]; a box holding one pixel of the first and four of the second
    component gets the second's box [7, 7, 10, 10]; a box over background gets zeros."""
    from weakbench.methods.ccgr import ss_blob_boxes

    lab = np.zeros((10, 10), np.int64)
    lab[1:3, 1:4] = 2
    lab[7, 7] = 2
    lab[8:10, 8:10] = 2
    lab[5, 5] = 1  # another class inside the last box: not counted for class 1
    boxes = np.array([[0, 0, 5, 5], [3, 2, 10, 10], [4, 4, 7, 7]], np.float32)
    got = ss_blob_boxes(lab, boxes, [1, 1, 1])
    np.testing.assert_array_equal(got, [[1, 1, 4, 3], [7, 7, 10, 10], [0, 0, 0, 0]])


def test_stopping_peaks_count_one_ss_region_as_one_instance():
    """Class 0 (label 1) has two SS regions, A = rows/cols 0–3 and B = rows/cols 6–9. A box
    [0, 0, 2, 2] of class 0 holds peak (1, 1): its own. Peak (3, 3) lies in A, the box's own
    region: no stop with the region rule, a stop with the literal one. (8, 8) lies in B and (5, 5)
    on background: stops under both. (2, 8) is class 1's: never a stop for a class-0 box."""
    from weakbench.methods.ccgr import stopping_peaks

    lab = np.zeros((10, 10), np.int64)
    lab[0:4, 0:4] = 1
    lab[6:10, 6:10] = 1
    lab[2, 8] = 2
    peaks = np.array([[1, 1], [3, 3], [8, 8], [5, 5], [2, 8]])
    classes = np.array([0, 0, 0, 0, 1])
    box = np.array([[0, 0, 2, 2]], np.float32)
    (region,) = stopping_peaks(lab, box, [0], peaks, classes)
    (literal,) = stopping_peaks(None, box, [0], peaks, classes)
    assert sorted(map(tuple, region.tolist())) == [(5, 5), (8, 8)]
    assert sorted(map(tuple, literal.tolist())) == [(3, 3), (5, 5), (8, 8)]
    # a class-1 box over (2, 8) has no other class-1 peak: nothing stops it
    (other,) = stopping_peaks(lab, np.array([[8, 2, 9, 3]], np.float32), [1], peaks, classes)
    assert other.shape == (0, 2)


def test_region_stop_lets_a_box_grow_over_its_own_object():
    """One object of class 0 (an SS region, the 0/1 map's ones at x 10–29, y 10–29) holds two
    peaks. Started from its left half, the box refines towards the whole object with the region
    stop; with the literal stop the second peak (at x 24) halts it before it gets there."""
    from weakbench.methods import ccgr_ops as ops
    from weakbench.methods.ccgr import stopping_peaks

    lab = np.zeros((40, 40), np.int64)
    lab[10:30, 10:30] = 1
    maps = torch.from_numpy((lab == 1).astype(np.float32))[None]
    box = torch.tensor([[10.0, 10.0, 20.0, 30.0]])
    peaks, classes = np.array([[20, 14], [20, 24]]), np.array([0, 0])
    got = {}
    for rule, lm in (("region", lab), ("any", None)):
        stops = stopping_peaks(lm, box.numpy(), [0], peaks, classes)
        got[rule], _ = ops.refine_boxes(maps, box, steps=200, step_size=0.02, step_unit="box", peaks=stops)
    full = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    from torchvision.ops import box_iou

    assert float(box_iou(got["region"], full)) > 0.9
    assert float(got["any"][0, 2]) <= 24.5 + 1e-6  # never took in the peak's pixel centre x = 24.5
    assert float(box_iou(got["any"], full)) < 0.8


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_rounds_on_the_synthetic_default(tmp_path):
    """Two rounds end to end: every round's pseudo masks are scored on val and test, the refined
    boxes against the unrefined ones, the peaks find most instances, the IS branch is evaluated
    and its predictor (the registered model) draws masks."""
    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    splits = tmp_path / "splits.json"
    save_splits(make_splits(source, seed=0), splits)
    spec = _spec(tmp_path, None, cache, splits, {**TINY, "max_images_per_split": 40})
    t0 = time.time()
    m = run_trial(spec, executor="inline")
    # every val/test key the real run logged is declared (direction, unit, meaning)
    assert not undeclared(m), undeclared(m)
    seconds = time.time() - t0
    keys = ("map_r50", "map_r25", "box_map50", "box_iou_before", "box_iou_after", "unrefined/map_r50", "box_filled/map_r50")
    summary = {k: round(m[f"val/{PSEUDO}/{k}"], 2) for k in keys}
    summary.update({f"r1/{k}": round(m[f"val/{PSEUDO}/r1/{k}"], 2) for k in keys[:5]})
    summary["peak_recall"] = round(m["val/peaks/peak_recall"], 1)
    summary.update({k: round(m[f"val/peaks/{k}"], 2) for k in ("bag_best_iou", "random_bag_best_iou")})
    summary["proposal_recall"] = round(m["val/proposals/proposal_recall"], 1)
    summary.update({f"is/{k}": round(m[f"test/mask_rcnn/{k}"], 2) for k in ("map_r50", "map_r25", "box_map50")})
    summary.update({k: round(m[f"val/{PSEUDO}/{k}"], 2) for k in ("ss_box_iou_before", "ss_box_iou_after",
                                                                      "ss_blob_box_iou", "gt_box_iou_before",
                                                                      "gt_box_iou_after")})
    summary["seconds"] = round(seconds)
    print("ccgr two rounds (val):", json.dumps(summary))
    for split in ("val", "test"):
        for r in (1, 2):
            for k in keys:
                assert f"{split}/{PSEUDO}/r{r}/{k}" in m, (split, r, k)
        assert m[f"{split}/{PSEUDO}/map_r50"] == m[f"{split}/{PSEUDO}/r2/map_r50"]
        assert f"{split}/{PSEUDO}/round_gain/map_r50" in m
        # the IS branch's scores, each once: VOC mAP^r and box AP beside COCOeval's own summary
        for k in ("map_r50", "map_r25", "box_map50", "segm_ap50", "bbox_ap50"):
            assert 0 <= m[f"{split}/mask_rcnn/{k}"] <= 100, k
        assert f"{split}/mask_rcnn/segm_map_r50" not in m and f"{split}/pseudo_masks/map_r50" not in m
        assert 0 < m[f"{split}/proposals/proposal_recall"] <= 100
    assert m["val/peaks/peak_recall"] >= 50, "the classifier's peaks miss most instances"
    assert m[f"val/{PSEUDO}/r1/num_instances"] > 0
    client = tracking.client_for(spec.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["weakbench.stage.refine_r2.cache"] == "computed"
    arts = [a.path for a in client.list_artifacts(run.info.run_id, C.OVERLAY_DIR)]
    assert arts, "no pseudo-mask overlay"
    from weakbench.platform.predict import load_predictor, predict_images

    predictor = load_predictor(run.data.tags[C.TAG_MODEL_URI], spec.tracking_uri)
    preds = predict_images(predictor, [Path(source.records[0].path)], tmp_path / "pred")
    assert preds[0].overlays[0].is_file()


SWEEP_SETS = ["--set", "epochs=3", "--set", "mil_epochs=2", "--set", "semantic_epochs=2", "--set", "mask_rcnn_epochs=2",
              "--set", "max_images_per_split=12", "--set", "max_proposals=80", "--set", "refinement_steps=40",
              "--eval-max-images", "8"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sweep_over_context_scale_shares_round_one_and_resumes_in_round_two(tmp_path):
    """A 2-trial sweep of ccgr.yaml (context scale, step size and steps searched): killed once
    round 2 has begun, then ``--resume``d. Both trials finish; the classifier, the proposals, the
    peaks and round 1's MIL and SS branches are computed once for the sweep (one computation,
    every other use a cache hit with the same product hash); the killed trial resumes in round 2
    (its round-1 stages are not recomputed); one MLflow run per trial, none RUNNING."""
    from test_bbam import _kill_tree, _runs

    out = tmp_path / "runs"
    space = str(REPO / "search_spaces" / "ccgr.yaml")
    base = [sys.executable, "-m", "weakbench", "sweep", space, "--output-dir", str(out), "--name", "ctx", "--address", "local"]
    first = base + ["--trials", "2", "--executor", "inline", "--num-cpus", "1", "--max-concurrent", "1", "--no-model",
                    *SWEEP_SETS]
    proc = subprocess.Popen(first, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    products = out / "sweeps" / "ctx" / "products"
    deadline = time.time() + 900
    try:
        while time.time() < deadline and not list(products.glob("mil_r2-*/manifest.json")):
            assert proc.poll() is None, "the sweep ended before round 2"
            time.sleep(0.5)
        assert list(products.glob("mil_r2-*/manifest.json")), "round 2 did not start within 900 s"
    finally:
        _kill_tree(proc)
    assert not list(products.glob("instance_r2-*/manifest.json")), "round 2 finished before the kill"
    resumed = subprocess.run(base + ["--resume", "--num-cpus", "1"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, trials = _runs(out)
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials), [t.info.status for t in trials]
    assert len({t.data.params["context_scale"] for t in trials}) == 2
    for stage in ("classifier", "proposals", "peaks", "mil_r1", "semantic_r1"):
        assert len({t.data.tags[f"weakbench.stage.{stage}.hash"] for t in trials}) == 1, stage
        assert len(list(products.glob(f"{stage}-*/manifest.json"))) == 1, stage
    # the killed trial resumed in round 2: the classifier (trained before the kill) and round 2's
    # MIL branch (finished just before it) were each trained once, one loss per epoch
    history = {t.info.run_id: [m.step for m in client.get_metric_history(t.info.run_id, "train/classifier/loss")]
               for t in trials}
    trained = [rid for rid, steps in history.items() if steps]
    assert len(trained) == 1 and sorted(history[trained[0]]) == [1, 2, 3], history
    mil2 = [m.step for m in client.get_metric_history(trained[0], "train/mil_r2/loss")]
    assert len(mil2) == len(set(mil2)) == 2, mil2  # steps count fit epochs over the whole plan (10, 11 here)
    assert all(t.data.tags["weakbench.stage.classifier.cache"] == "hit" for t in trials if t.info.run_id != trained[0])
    assert all("val/mask_rcnn/map_r50" in t.data.metrics and f"val/{PSEUDO}/r2/box_iou_after" in t.data.metrics
               for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_coco128_capped_subset_end_to_end(tmp_path, coco128_dir):
    """On a capped COCO128 subset the whole plan runs (one round): selective-search proposals
    inside every image, peaks for the labelled classes only, pseudo masks inside their boxes, every
    score in range. Quality is not asserted: from-scratch branches on a few 640 × 480 images give
    mAP^r near 0, which the note reports as such."""
    import torch

    cache = tmp_path / "cache"
    source = open_dataset(str(coco128_dir), cache_dir=cache)
    splits = tmp_path / "splits.json"
    save_splits(make_splits(source, seed=0), splits)
    params = {**TINY, "rounds": 1, "epochs": 1, "mil_epochs": 1, "semantic_epochs": 1, "mask_rcnn_epochs": 1,
              "input_size": 128, "max_images_per_split": 4, "max_proposals": 100, "refinement_steps": 20}
    spec = _spec(tmp_path, str(coco128_dir), cache, splits, params)
    m = run_trial(spec, executor="inline")
    timing = {k.removeprefix("cost/"): round(v, 1) for k, v in m.items() if k.startswith("cost/") and k.endswith("_seconds")}
    products = tmp_path / "products"
    # the product directory, not its lock file (proposals-<hash>.lock sits beside it)
    proposals_dir = next(p for p in products.glob("proposals-*") if p.is_dir())
    size_kb = sum(f.stat().st_size for f in proposals_dir.rglob("*") if f.is_file()) / 1024
    print("ccgr coco128 (4 images per split):", json.dumps({"seconds": timing, "proposal_cache_kib": round(size_kb),
                                                            "test/map_r50": m.get("test/mask_rcnn/map_r50")}))
    props = torch.load(proposals_dir / "proposals.pt", weights_only=False)
    assert len(props) == 12
    for key, boxes in props.items():
        rec = source.records[int(key.split(":")[1])]
        assert 0 < len(boxes) <= 100
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= rec.width).all() and (boxes[:, 3] <= rec.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    peaks = torch.load(next(products.glob("peaks-*/peaks.pt")), weights_only=False)
    for key, v in peaks.items():
        labelled = set(np.flatnonzero(source.image_labels(int(key.split(":")[1]))).tolist())
        assert set(np.asarray(v["peak_classes"]).tolist()) <= labelled, key
    refined = torch.load(next(products.glob("refine_r1-*/refined.pt")), weights_only=False)
    from weakbench.methods.bbam import _unrle

    for key, e in refined.items():
        for rle, box in zip(e["fg"], e["boxes_fg"]):
            mask = _unrle(rle)
            ys, xs = np.nonzero(mask)
            assert xs.min() + 0.5 >= box[0] and xs.max() + 0.5 < box[2] + 1e-6, key
            assert ys.min() + 0.5 >= box[1] and ys.max() + 0.5 < box[3] + 1e-6, key
    for k in (f"val/{PSEUDO}/map_r50", f"val/{PSEUDO}/box_iou_before", "test/mask_rcnn/map_r50",
              "test/proposals/proposal_recall"):
        assert 0 <= m[k] <= 100, k


def test_next_round_from_pseudo_masks_seeds_bags_and_labels(tmp_path):
    """``next_round_from: pseudo_masks``: round r's refined boxes give the next round's bags (the
    proposals of highest IoU with each, best first) and its pseudo masks its SS labels, a higher
    MIL score winning an overlapping pixel; an image without pseudo masks gets no bags (it keeps
    its round-1 ones). The plan's instances stage reads the refine product for it."""
    from types import SimpleNamespace

    from weakbench.methods.bbam import _rle
    from weakbench.methods.ccgr import _unpng

    m = build_method("ccgr", {"rounds": 2, "bag_size": 2, "next_round_from": "pseudo_masks"}, num_classes=3)
    st = {s.name: s for s in m.stages()}
    assert "refine_r1" in st["instances_r1"].inputs and "next_round_from" in st["instances_r1"].reads
    a = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6, 2:6] = True
    (tmp_path / "refine").mkdir()
    torch.save({"train:0": {"boxes_fg": [[0, 0, 4, 4], [2, 2, 6, 6]], "classes_fg": [0, 2], "scores_fg": [0.4, 0.9],
                            "fg": [_rle(a), _rle(b)]},
                "train:1": {"boxes_fg": [], "classes_fg": [], "scores_fg": [], "fg": []}},
               tmp_path / "refine" / "refined.pt")
    records = [SimpleNamespace(width=8, height=8)] * 2
    ctx = SimpleNamespace(inputs={"refine_r1": tmp_path / "refine"}, source=SimpleNamespace(records=records))
    props = {"train:0": np.array([[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 5, 5], [6, 6, 8, 8]], np.float32),
             "train:1": np.array([[0, 0, 8, 8]], np.float32)}
    out = m._instances_from_pseudo_masks(1, ["train:0", "train:1"], ctx, props)
    e = out["train:0"]
    assert e["bag_classes"] == [0, 2] and e["detections"] == 2
    assert e["bags"][0] == [0, 2] and e["bags"][1] == [1, 2]  # IoU 1, then 16/25; and 1, then 9/32
    label = _unpng(e["label"])
    assert label[0, 0] == 1 and label[3, 3] == 3 and label[5, 5] == 3 and label[7, 7] == 0  # 0.9 wins (3, 3)
    assert out["train:1"]["bags"] == [] and out["train:1"]["label"] is None


def test_instance_branch_metrics_log_each_number_once():
    """The IS branch's VOC mAP^r and box AP take the paper's names; COCOeval's own summary keeps its
    ``segm_``/``bbox_`` names; the VOC box AP at 0.25 (not reported by the paper) is dropped."""
    from weakbench.methods.ccgr import instance_branch_metrics

    coco = {"val/segm_map_r50": 1.0, "val/segm_map_r25": 2.0, "val/bbox_map_r50": 3.0, "val/bbox_map_r25": 4.0,
            "val/segm_ap50": 5.0, "val/abo": 6.0, "test/segm_map_r50": 7.0}
    assert instance_branch_metrics(coco) == {"val/map_r50": 1.0, "val/map_r25": 2.0, "val/box_map50": 3.0,
                                             "val/segm_ap50": 5.0, "val/abo": 6.0, "test/map_r50": 7.0}


def test_proposal_recall_and_bag_quality_by_hand(tmp_path):
    """Image 0 (val) has GT boxes [0, 0, 10, 10] (class 0) and [20, 20, 30, 30] (class 1); its
    proposals are [0, 0, 10, 12] (IoU 10/12 with the first) and [40, 40, 50, 50] (with neither):
    proposal recall 1 of 2 = 50 %. Its one bag (class 0) holds proposals 1 then 0 (best IoU 10/12,
    top-1 0), its random twin proposal 1 (0 and 0)."""
    from types import SimpleNamespace

    m = build_method("ccgr", {}, num_classes=2)
    props = {"val:0": np.array([[0, 0, 10, 12], [40, 40, 50, 50]], np.float32)}
    (tmp_path / "p").mkdir()
    torch.save(props, tmp_path / "p" / "proposals.pt")
    gt = (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float64), np.array([0, 1]))
    ctx = SimpleNamespace(inputs={"proposals": tmp_path / "p"}, source=SimpleNamespace(gt_boxes=lambda i: gt))
    assert m._proposal_recall(props, ctx) == {"val/proposal_recall": pytest.approx(50.0)}
    peaks = {"val:0": {"bags": [[1, 0]], "random_bags": [[1]], "bag_classes": [0]}}
    q = m._bag_quality(peaks, ctx, "val")
    assert q["bag_best_iou"] == [pytest.approx(10 / 12)] and q["bag_top1_iou"] == [0.0]
    assert q["random_bag_best_iou"] == [0.0] and q["random_bag_top1_iou"] == [0.0]


def test_instance_branch_uses_the_backbones_normalisation_and_freezes_pretrained_batch_norm(tmp_path):
    """The IS branch's Mask R-CNN normalises with the backbone's own statistics (Lite: mean = std =
    0.5, not ImageNet's) and freezes the batch norms of a body given pretrained weights
    (``weights_path``); a body from scratch keeps trainable batch norms."""
    import timm
    from torchvision.ops.misc import FrozenBatchNorm2d

    from weakbench.methods.ccgr import InstanceFit

    lite = build_method("ccgr", {"backbone": "tf_efficientnet_lite0"}, num_classes=2)
    model = InstanceFit(lite, 1, None).build_model()
    assert list(model.transform.image_mean) == pytest.approx([0.5] * 3)
    assert list(model.transform.image_std) == pytest.approx([0.5] * 3)
    scratch = InstanceFit(build_method("ccgr", {"backbone": "resnet18"}, num_classes=2), 1, None).build_model()
    assert list(scratch.transform.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in scratch.backbone.body.modules())
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    pre = InstanceFit(build_method("ccgr", {"backbone": "resnet18", "weights_path": str(weights)}, num_classes=2), 1,
                      None).build_model()
    body = list(pre.backbone.body.modules())
    assert any(isinstance(mod, FrozenBatchNorm2d) for mod in body)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in body)


def test_instance_branch_starts_with_a_mask_loss_near_ln2_on_a_pretrained_one_class_body():
    """With one class (coco128 ``person``) torchvision's mask-logit init (Kaiming, fan_out = 2:
    weight std 1) on the packaged pretrained Lite0 body gave initial mask logits of std ≈ 33, a
    mask loss ≈ 17 and SGD divergence (NaN) within 3 epochs; Detectron2's init (std 0.001, zero
    bias) starts the loss at ≈ ln 2 whatever the feature scale."""
    from weakbench.methods.bbam import _image_tensor
    from weakbench.methods.ccgr import InstanceFit

    torch.manual_seed(0)
    method = build_method("ccgr", {"backbone": "tf_efficientnet_lite0", "pretrained": True, "input_size": 96},
                          num_classes=1)
    model = InstanceFit(method, 1, None).build_model().train()
    source = open_dataset(None)
    images, targets = [], []
    for i in range(4):
        a = source.annotations(i)
        images.append(_image_tensor(source.load_image(i)))
        targets.append({"boxes": torch.as_tensor(np.asarray(a.boxes, np.float32)).reshape(-1, 4),
                        "labels": torch.ones(len(a.box_classes), dtype=torch.int64),
                        "masks": torch.from_numpy(np.asarray(a.instance_masks, np.uint8))})
    losses = model(images, targets)
    assert float(losses["loss_mask"]) < 1.0  # BCE of logits near 0 is ln 2 = 0.69; torchvision's init gave ≈ 17
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    assert float(logits.weight.std()) < 0.01 and float(logits.bias.abs().max()) == 0.0
