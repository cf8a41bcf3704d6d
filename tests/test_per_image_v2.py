"""Per-image results, schema version 2 (weakbench.core.metrics.per_image): mIoU, multi-label
cls mAP, instance mIoU and mAP^r / box AP recomputed exactly on resamples of hand-built tables,
version-1 tables still read, and variant comparisons on the paired image and seed bootstrap."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from weakbench.core.metrics.classification import multilabel_average_precision
from weakbench.core.metrics.instance import per_image_tables, voc_instance_ap
from weakbench.core.metrics.per_image import (
    PER_IMAGE_SCHEMA_V1, PerImage, build_table, image_rows, instance_rows, merge_tables, metric_at_threshold_on_images,
    metric_on_images,
)
from weakbench.core.metrics.segmentation import SemanticEvaluator


def _counts(order, rep):
    """Image multiplicities (1, I) over ``order`` of the image list ``rep``."""
    pos = {im: k for k, im in enumerate(order.tolist())}
    c = np.zeros((1, len(order)))
    for im in rep:
        c[0, pos[im]] += 1
    return c


def test_miou_of_a_resample_equals_the_evaluator_on_the_repeated_images():
    """Per-image confusion counts give SemanticEvaluator's mIoU (max over background thresholds)
    on the split, on a subset and on images repeated; and the mIoU at a fixed threshold."""
    rng = np.random.default_rng(1)
    n, c, s = 6, 3, 10
    cams = rng.random((n, c, s, s)).astype(np.float32)
    labels = (rng.random((n, c)) > 0.4).astype(np.float32)
    labels[:, 0] = 1
    sem = rng.integers(0, c + 1, size=(n, s, s)).astype(np.int64)
    sem[:, 0, :3] = 255
    ev = SemanticEvaluator(c, bg_thresholds=[0.2, 0.4, 0.6, 0.8])
    ev.accumulate(cams, labels, sem)
    images = [f"im{i}" for i in range(n)]
    table = image_rows("", images, sem=[(ev.thresholds, *e) for e in ev.per_image])
    data = PerImage(table)
    assert "miou" in data.available()
    order = data.universe
    assert metric_on_images(data, "miou", order, np.ones((1, n)))[0] == pytest.approx(ev.compute()["miou"])
    rep = [0, 0, 3, 5, 5, 5]
    ev2 = SemanticEvaluator(c, bg_thresholds=[0.2, 0.4, 0.6, 0.8])
    ev2.accumulate(cams[rep], labels[rep], sem[rep])
    w = _counts(order, [images[i] for i in rep])
    assert metric_on_images(data, "miou", order, w)[0] == pytest.approx(ev2.compute()["miou"])
    curve = dict(ev2.compute()["curve"])
    assert metric_at_threshold_on_images(data, "miou", 0.6, order, w)[0] == pytest.approx(curve[0.6])


def test_cls_map_of_a_resample_equals_the_metric_on_the_repeated_images():
    """Multi-label AP over images with tied scores: the weighted form equals the metric on the
    images repeated; a class without a positive in the resample drops out of the mean."""
    rng = np.random.default_rng(2)
    n, c = 9, 4
    scores = np.round(rng.random((n, c)), 1)  # ties
    labels = (rng.random((n, c)) > 0.5).astype(int)
    labels[0, 3] = 1
    labels[1:, 3] = 0  # class 3: one positive, on image 0
    data = PerImage(image_rows("", [f"i{k}" for k in range(n)], cls_scores=scores, cls_labels=labels))
    order = data.universe
    for rep in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 2, 8, 8, 8, 4], [0, 0, 5, 6]):
        want = multilabel_average_precision(scores[rep], labels[rep])
        got = metric_on_images(data, "cls_map", order, _counts(order, [f"i{k}" for k in rep]))[0]
        assert got == pytest.approx(want), rep


def _coco(n_images=5, seed=3):
    """A small COCO ground truth (two classes, box and mask instances) and predictions with ties,
    misses, duplicates and a class without ground truth."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(n_images):
        images.append({"id": i, "width": 32, "height": 32})
        for k in range(int(rng.integers(0, 3))):
            x, y = (int(v) for v in rng.integers(0, 16, 2))
            m = np.zeros((32, 32), np.uint8)
            m[y:y + 12, x:x + 12] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            cat = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "area": 144.0,
                         "bbox": [x, y, 12, 12], "iscrowd": 0, "segmentation": rle})
            for _ in range(int(rng.integers(1, 3))):  # duplicates and shifted guesses
                dx, dy = (int(v) for v in rng.integers(-5, 6, 2))
                p = np.zeros((32, 32), np.uint8)
                p[max(0, y + dy):y + dy + 12, max(0, x + dx):x + dx + 12] = 1
                prle = mask_utils.encode(np.asfortranarray(p))
                prle["counts"] = prle["counts"].decode()
                results.append({"image_id": i, "category_id": int(rng.integers(1, 4)), "score": float(np.round(rng.random(), 1)),
                                "segmentation": prle, "bbox": [max(0, x + dx), max(0, y + dy), 12, 12]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    gt.createIndex()
    return gt, results


def _subset(gt, results, rep):
    """The ground truth and predictions of images ``rep`` (repeats get new image ids)."""
    images, anns, res = [], [], []
    for new, old in enumerate(rep):
        images.append({"id": new, "width": 32, "height": 32})
        anns += [{**a, "id": len(anns) + 1 + j, "image_id": new}
                 for j, a in enumerate(a for a in gt.dataset["annotations"] if a["image_id"] == old)]
        res += [{**r, "image_id": new} for r in results if r["image_id"] == old]
    g = COCO()
    g.dataset = {"images": images, "annotations": anns, "categories": gt.dataset["categories"]}
    g.createIndex()
    return g, res


@pytest.mark.parametrize("seed", [3, 4])
def test_map_r_of_a_resample_is_recomputed_exactly(seed):
    """mAP^r (masks, IoU 0.25 and 0.5) and box AP from the stored per-detection flags equal
    voc_instance_ap on the whole set, on a subset of images and on images repeated (AP recomputed
    on each resample, not averaged per image)."""
    gt, results = _coco(seed=seed)
    ious = np.random.default_rng(seed).random(len(gt.dataset["annotations"]))
    data = PerImage(per_image_tables(gt, results, "mask_rcnn", ("segm", "bbox"), ious=ious))
    order = data.universe
    assert {"mask_rcnn/map_r50", "mask_rcnn/map_r25", "mask_rcnn/box_map50", "mask_rcnn/instance_miou"} <= set(
        data.available())
    for rep in (list(range(5)), [0, 2, 4], [1, 1, 3, 3, 3, 4], [2, 2]):
        g, res = _subset(gt, results, rep)
        w = _counts(order, [str(i) for i in rep])
        for name, (t, thr) in (("map_r50", ("segm", 0.5)), ("map_r25", ("segm", 0.25)), ("box_map50", ("bbox", 0.5))):
            want = voc_instance_ap(g, res, thr, t)
            assert metric_on_images(data, f"mask_rcnn/{name}", order, w)[0] == pytest.approx(want), (rep, name)
        keep = [k for k, a in enumerate(gt.dataset["annotations"]) for _ in range(rep.count(a["image_id"]))]
        want = 100 * ious[keep].mean() if keep else 0.0
        assert metric_on_images(data, "mask_rcnn/instance_miou", order, w)[0] == pytest.approx(want)


def test_stop_rule_benchmark_recomputes_map_r_with_the_core_arithmetic():
    """benchmarks/quality_ccgr_stop_rule.py keeps per-prediction VOC calls in its records and
    recomputes mAP^r on a resample through the core's weighted_voc_map_of_calls: equal to
    voc_instance_ap on the repeated images, at IoU 0.25 and 0.5."""
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("quality_ccgr_stop_rule")
    gt, results = _coco(seed=4)
    for thr in (0.25, 0.5):
        n_gt, matches = bench.voc_matches(gt, results, thr)
        assert bench.voc_map_from_matches(n_gt, matches) == pytest.approx(voc_instance_ap(gt, results, thr, "segm"))
        for rep in ([0, 2, 4], [1, 1, 3, 3, 3, 4]):
            g, res = _subset(gt, results, rep)
            w = {i: float(rep.count(i)) for i in set(rep)}
            assert bench.voc_map_from_matches(n_gt, matches, w) == pytest.approx(voc_instance_ap(g, res, thr, "segm"))


def test_version_1_tables_are_read_and_merged():
    """A version-1 table (no kind/scope columns) still recomputes its box metric, alone and merged
    with version-2 rows of the same images."""
    bits = {"box_iou50": np.array([[1, 0], [0, 0], [1, 1]], bool)}
    v2 = build_table("test", np.array([0.1, 0.5]), ["a", "b", "c"], [0, 0, 1], bits)
    v1 = pa.Table.from_arrays([v2[f.name] for f in PER_IMAGE_SCHEMA_V1],
                              schema=PER_IMAGE_SCHEMA_V1.with_metadata({**v2.schema.metadata,
                                                                        b"weakbench.per_image_version": b"1"}))
    for t in (v1, merge_tables([v1, instance_rows("pm", ["a", "c"], [0, 1], [0.5, 1.0])])):
        data = PerImage(t)
        assert data.universe.tolist() == ["a", "b", "c"]
        assert metric_on_images(data, "max_box_acc", data.universe, np.ones((1, 3)))[0] == pytest.approx(200 / 3)
    assert metric_on_images(data, "pm/instance_miou", data.universe, np.array([[2.0, 1.0, 0.0]]))[0] == pytest.approx(50)


def test_variant_comparison_shares_image_and_seed_draws():
    """BBAM against its box-filled variant: the same runs, so the paired difference's interval is
    that of the per-instance differences (narrow), where unpaired draws would be wide; the board's
    Holm family includes it."""
    from weakbench.platform.verdicts import Bootstrap, RowRuns, compare, decide

    rng = np.random.default_rng(5)
    runs = []
    for s in range(3):
        n = 200
        base = rng.random(n)
        ours = np.clip(base + 0.02, 0, 1)  # 2 points above its box-filled variant on every instance
        imgs = [f"im{k}" for k in range(n)]
        runs.append(PerImage(merge_tables([instance_rows("pseudo_masks", imgs, [0] * n, ours.tolist()),
                                           instance_rows("pseudo_masks/box_filled", imgs, [0] * n, base.tolist())])))
    row = RowRuns(runs)
    boot = Bootstrap(500, np.random.default_rng(0))
    c = compare(boot, row, row, "pseudo_masks/instance_miou", "bbam", "box_filled",
                metric_b="pseudo_masks/box_filled/instance_miou")
    decide([c], True)
    assert c.diff == pytest.approx(2.0, abs=0.2) and c.ci_low > 1.5 and c.ci_high < 2.5
    assert c.verdict == "beats box_filled"


@pytest.mark.slow
def test_bbam_trial_stores_per_instance_results_and_the_board_compares_its_variants(tmp_path):
    """A tiny BBAM trial (synthetic default, pseudo masks and Mask R-CNN) logs per-image tables of
    both eval stages; the store merges them; they recompute the logged test instance mIoU, mAP^r of
    the pseudo masks and of their box-filled variant, and Mask R-CNN's mAP^r; the board compares
    BBAM with box_filled on the paired image bootstrap."""
    from weakbench.platform import tracking
    from weakbench.core.data import open_dataset
    from weakbench.core.data.splits import make_splits, save_splits
    from weakbench.platform.engine import TrialSpec, run_trial
    from weakbench.platform.leaderboard import build_leaderboard
    from weakbench.platform.results import read_per_image, read_store, update_store

    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    save_splits(make_splits(source, seed=0), cache / "splits.json")
    params = {"backbone": "resnet18", "input_size": 64, "epochs": 1, "batch_size": 4, "fpn_channels": 32,
              "box_head_size": 64, "num_proposals": 40, "mask_iterations": 3, "use_crf": False,
              "attribution_splits": ["val", "test"], "max_images_per_split": 4, "attribution_batch_images": 2,
              "mask_rcnn_epochs": 1}
    spec = TrialSpec(method="bbam", params=params, data=None, data_cache=str(cache),
                     splits_path=str(cache / "splits.json"), trial_dir=str(tmp_path / "trial"),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id="t0", run_name="t0",
                     eval_max_images=4, num_overlays=0, log_model=False, products_dir=str(tmp_path / "products"))
    m = run_trial(spec, executor="inline")
    store = tmp_path / "store"
    update_store(spec.tracking_uri, store)
    table = read_store(store)
    (rid,) = table["run_id"].to_pylist()
    data = PerImage(read_per_image(store, [rid], "test")[rid])
    ones = np.ones((1, len(data.universe)))
    for name in ("pseudo_masks/instance_miou", "pseudo_masks/map_r50", "pseudo_masks/map_r25",
                 "pseudo_masks/box_filled/instance_miou", "pseudo_masks/box_filled/map_r50",
                 "mask_rcnn/segm_map_r50", "mask_rcnn/bbox_map_r50"):
        got = metric_on_images(data, name, data.universe, ones)[0]
        assert got == pytest.approx(m[f"test/{name}"], abs=1e-9), name
    board = build_leaderboard(table, select_metric="val/pseudo_masks/instance_miou", n_boot=200,
                              per_image=read_per_image(store, [rid], "test"))
    row = board.to_pylist()[0]
    assert row["n_images"] == len(data.universe)
    against = {v["against"]: v for v in row["verdicts"]}
    assert set(against) == {"box_filled"}, row["verdicts"]
    v = against["box_filled"]
    assert v["diff"] == pytest.approx(m["test/pseudo_masks/instance_miou"] - m["test/pseudo_masks/box_filled/instance_miou"])
    assert v["ci_low"] <= v["diff"] <= v["ci_high"] and np.isfinite(v["p_holm"])


def test_variant_pair_finds_ccgr_variants_of_its_pseudo_masks():
    """CCGR's headline (Mask R-CNN's mAP^r) has no unrefined variant; its pseudo masks' mAP^r has
    both; BBAM's headline has its own."""
    from weakbench.platform.leaderboard import variant_pair

    ccgr = ["mask_rcnn/map_r50", "pseudo_masks_with_labels/map_r50", "pseudo_masks_with_labels/unrefined/map_r50",
            "pseudo_masks_with_labels/box_filled/map_r50", "pseudo_masks_with_labels/r1/map_r50"]
    assert variant_pair("mask_rcnn/map_r50", "unrefined", ccgr) == (
        "pseudo_masks_with_labels/map_r50", "pseudo_masks_with_labels/unrefined/map_r50")
    assert variant_pair("mask_rcnn/map_r50", "box_filled", ccgr)[1] == "pseudo_masks_with_labels/box_filled/map_r50"
    assert variant_pair("pseudo_masks/instance_miou", "box_crf", ["pseudo_masks/instance_miou"]) is None


def test_board_reports_miou_at_the_val_background_threshold_and_bbam_variant_verdicts():
    """From hand-built tables: a Puzzle-CAM row gets ``test/miou_at_val_tau`` (the test mIoU at
    its run's ``val/best_bg_threshold``, beside the test-optimal ``test/miou``) with an interval over
    test images; a BBAM row gets paired verdicts against box_filled and box_crf, Holm over both."""
    from weakbench.platform.leaderboard import build_leaderboard
    from weakbench.platform.results import rows_to_table

    rng = np.random.default_rng(7)
    n, c, s = 30, 2, 8
    ths = [0.2, 0.5, 0.8]
    per_image, rows = {}, []
    for seed in (0, 1):
        cams = rng.random((n, c, s, s)).astype(np.float32)
        labels = np.ones((n, c), np.float32)
        sem = rng.integers(0, c + 1, size=(n, s, s))
        ev = SemanticEvaluator(c, bg_thresholds=ths)
        ev.accumulate(cams, labels, sem)
        rid = f"pz{seed}"
        per_image[rid] = image_rows("", [f"im{i}" for i in range(n)], sem=[(ev.thresholds, *e) for e in ev.per_image])
        res = ev.compute()
        rows.append({"run_id": rid, "method": "puzzlecam", "backbone": "r18", "dataset": "d", "seed": seed,
                     "status": "FINISHED", "params": {"seed": seed},
                     "metrics": {"val/max_box_acc_v2": 50.0, "test/max_box_acc_v2": 40.0, "test/miou": res["miou"],
                                 "val/best_bg_threshold": 0.8}})
        curve = dict(res["curve"])
        rows[-1]["_want"] = curve[0.8]
    want = np.mean([r.pop("_want") for r in rows])
    lb = build_leaderboard(rows_to_table(rows), n_boot=200, per_image=per_image).to_pylist()[0]
    assert lb["test/miou_at_val_tau.mean"] == pytest.approx(want)
    assert lb["test/miou_at_val_tau.ci_low"] < want < lb["test/miou_at_val_tau.ci_high"]
    assert lb["test/miou.ci_low"] < lb["test/miou.mean"] < lb["test/miou.ci_high"]

    per_image, rows = {}, []
    for seed in (0, 1, 2):
        base = rng.random(80)
        imgs = [f"im{i // 2}" for i in range(80)]  # two instances per image
        parts = [instance_rows("pseudo_masks", imgs, [0] * 80, np.clip(base + 0.1, 0, 1).tolist()),
                 instance_rows("pseudo_masks/box_filled", imgs, [0] * 80, base.tolist()),
                 instance_rows("pseudo_masks/box_crf", imgs, [0] * 80, np.clip(base + 0.1 + rng.normal(0, 0.3, 80), 0, 1).tolist())]
        rid = f"bb{seed}"
        per_image[rid] = merge_tables(parts)
        data = PerImage(per_image[rid])
        vals = {k: float(metric_on_images(data, k, data.universe, np.ones((1, 40)))[0]) for k in
                ("pseudo_masks/instance_miou", "pseudo_masks/box_filled/instance_miou", "pseudo_masks/box_crf/instance_miou")}
        rows.append({"run_id": rid, "method": "bbam", "backbone": "r18", "dataset": "d", "seed": seed,
                     "status": "FINISHED", "params": {"seed": seed},
                     "metrics": {"val/pseudo_masks/instance_miou": 50.0, **{f"test/{k}": v for k, v in vals.items()}}})
    lb = build_leaderboard(rows_to_table(rows), select_metric="val/pseudo_masks/instance_miou", n_boot=300,
                           per_image=per_image).to_pylist()[0]
    got = {v["against"]: v for v in lb["verdicts"]}
    assert set(got) == {"box_filled", "box_crf"}
    assert got["box_filled"]["verdict"] == "beats box_filled" and got["box_filled"]["diff"] == pytest.approx(
        np.mean([r["metrics"]["test/pseudo_masks/instance_miou"] - r["metrics"]["test/pseudo_masks/box_filled/instance_miou"]
                 for r in rows]))
    assert lb["noise"] == "test images (40) x seeds (3)"
    assert lb["trivial_verdict"].startswith("beats box_filled (paired over test images and seeds, Holm)")


def test_evaluate_split_stores_what_recomputes_miou_and_cls_map(tmp_path):
    """A CAM model on the synthetic default (masks, multi-label images): the split's mIoU and
    cls mAP equal those recomputed from its per-image table (after a Parquet round trip), and the
    box metrics still do."""
    import torch

    from weakbench.methods import build_method
    from weakbench.core.data import open_dataset
    from weakbench.methods.evaluate import evaluate_split
    from weakbench.core.metrics.per_image import read_table, write_table

    source = open_dataset(None, cache_dir=tmp_path)
    torch.manual_seed(0)
    m = build_method("cam", {"input_size": 32, "backbone": "resnet18", "pretrained": False},
                     num_classes=source.num_classes, multilabel=source.multilabel)
    metrics, _, details = evaluate_split(m, m.build_model(), source, list(range(20)), input_size=32,
                                         device=torch.device("cpu"), batch_size=6)
    write_table(details["per_image"], tmp_path / "t.parquet", "test")
    data = PerImage(read_table(tmp_path / "t.parquet"))
    ones = np.ones((1, len(data.universe)))
    names = ["miou", "max_box_acc_v2", "pxap"] + (["cls_map"] if source.multilabel else ["cls_acc"])
    for name in names:
        assert metric_on_images(data, name, data.universe, ones)[0] == pytest.approx(metrics[name], abs=1e-9), name


@pytest.mark.slow
def test_ccgr_trial_stores_per_detection_results_and_the_board_compares_its_variants(tmp_path):
    """A tiny one-round CCGR trial: the store's test table recomputes the logged mAP^r of the
    pseudo masks, of their unrefined and box-filled variants, and of the IS branch (Mask R-CNN);
    the board compares CCGR with ``unrefined`` and ``box_filled`` on its pseudo masks' mAP^r."""
    from weakbench.platform import tracking
    from weakbench.core.data import open_dataset
    from weakbench.core.data.splits import make_splits, save_splits
    from weakbench.platform.engine import TrialSpec, run_trial
    from weakbench.platform.leaderboard import build_leaderboard
    from weakbench.platform.results import read_per_image, read_store, update_store

    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    save_splits(make_splits(source, seed=0), cache / "splits.json")
    params = {"backbone": "resnet18", "input_size": 64, "epochs": 1, "batch_size": 8, "rounds": 1,
              "max_proposals": 40, "mil_epochs": 1, "semantic_epochs": 1, "mask_rcnn_epochs": 1,
              "refinement_steps": 5, "max_images_per_split": 6}
    spec = TrialSpec(method="ccgr", params=params, data=None, data_cache=str(cache),
                     splits_path=str(cache / "splits.json"), trial_dir=str(tmp_path / "trial"),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id="t0", run_name="t0",
                     eval_max_images=6, num_overlays=0, log_model=False, products_dir=str(tmp_path / "products"))
    m = run_trial(spec, executor="inline")
    store = tmp_path / "store"
    update_store(spec.tracking_uri, store)
    table = read_store(store)
    (rid,) = table["run_id"].to_pylist()
    data = PerImage(read_per_image(store, [rid], "test")[rid])
    ones = np.ones((1, len(data.universe)))
    ns = "pseudo_masks_with_labels"
    for name in (f"{ns}/map_r50", f"{ns}/map_r25", f"{ns}/box_map50", f"{ns}/unrefined/map_r50",
                 f"{ns}/box_filled/map_r50", "mask_rcnn/map_r50", "mask_rcnn/box_map50"):
        got = metric_on_images(data, name, data.universe, ones)[0]
        assert got == pytest.approx(m[f"test/{name}"], abs=1e-9), name
    board = build_leaderboard(table, select_metric="val/mask_rcnn/map_r50", n_boot=200,
                              per_image=read_per_image(store, [rid], "test"))
    row = board.to_pylist()[0]
    got = {v["against"]: v for v in row["verdicts"]}
    assert set(got) == {"unrefined", "box_filled"} and {v["metric"] for v in got.values()} == {f"{ns}/map_r50"}
    assert got["unrefined"]["diff"] == pytest.approx(m[f"test/{ns}/map_r50"] - m[f"test/{ns}/unrefined/map_r50"])
