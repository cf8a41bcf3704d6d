"""BBAM on the stage runner: the plan, pseudo-mask quality on the synthetic default, one mask per
box inside its box on COCO128, a sweep that trains its detector once, a sweep killed during the
attribution stage that resumes there, and the instance predictor through ``weakbench predict``.

Real Ray, real MLflow (SQLite), real data (the synthetic default and ``../shared/data/coco128``).
The unit tests of the algorithm itself (stride, TV, L1, the perturbation loss, the rank cut, mean
fill, batched ≡ sequential optimisation) are in ``tests/test_bbam_ops.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from weakbench.methods import build_method, validate_config
from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial
from weakbench.core.errors import ConfigError
from weakbench.methods.metric_declarations import undeclared

REPO = Path(__file__).resolve().parents[1]
#: a detector that learns the shapes in ~8 epochs on 2 CPU cores; 40 mask iterations
TINY = {"backbone": "resnet18", "input_size": 96, "epochs": 8, "batch_size": 4, "lr": 0.02, "fpn_channels": 64,
        "box_head_size": 256, "num_proposals": 200, "mask_iterations": 40}


def test_plan_stages_products_and_config_errors():
    m = build_method("bbam", {"fpn_channels": 64}, num_classes=4)
    names = [(s.name, s.kind, s.shared) for s in m.plan()]
    assert names == [("detector", "fit", True), ("attribute", "map", True), ("pseudo_masks", "map", True),
                     ("evaluate", "eval", False)]
    plan = {s.name: s for s in m.stages()}
    assert "theta_fg" not in plan["attribute"].reads and "theta_fg" in plan["pseudo_masks"].reads
    assert "mask_l1_weight" in plan["attribute"].reads and "mask_l1_weight" not in plan["detector"].reads
    with_mrcnn = build_method("bbam", {"mask_rcnn_epochs": 2}, num_classes=4).plan()
    assert [s.name for s in with_mrcnn][-2:] == ["mask_rcnn", "instance_eval"]
    with pytest.raises(ConfigError, match="theta_bg .* must be <= theta_fg"):
        validate_config("bbam", {"theta_fg": 0.3, "theta_bg": 0.5})
    assert m.headline_metric == "pseudo_masks/instance_miou"


def test_detector_warmup_follows_torchvisions_reference_and_keeps_lr_schedule_refused():
    """The detector's lr rises linearly from lr/1000 over min(1000, steps per epoch − 1) steps
    (torchvision's detection reference), each parameter group from its own lr, then stays; the
    Mask R-CNN stage counts its own epochs; warmup_iters 0 (or factor 1) configures none; a
    non-constant lr_schedule is still refused although the stage now has a scheduler."""
    from weakbench.methods.bbam import DetectorFit
    from weakbench.methods.pipeline import Stage

    m = build_method("bbam", {"lr": 0.02, "backbone_lr_mult": 0.1, "epochs": 3, "mask_rcnn_epochs": 2}, num_classes=2)
    assert m.config.warmup_iters is None and m.config.warmup_factor == 0.001
    task = DetectorFit(m, "faster_rcnn")
    assert task.warmup_steps(3 * 5) == 4 and task.warmup_steps(3 * 5000) == 1000 and task.warmup_steps(3) == 0
    assert DetectorFit(m, "mask_rcnn").warmup_steps(2 * 5) == 4
    body = torch.nn.Parameter(torch.zeros(1))
    head = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [body], "lr": 0.002}, {"params": [head], "lr": 0.02}], lr=0.02, momentum=0.9)
    sched = task.configure_schedulers({"main": opt}, 3 * 5)["main"]
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    f = [0.001 + (1 - 0.001) * t / 4 for t in range(4)] + [1.0] * 3
    assert np.allclose(seen, [[0.002 * x, 0.02 * x] for x in f], rtol=1e-9, atol=0)
    assert DetectorFit(build_method("bbam", {"warmup_iters": 0}, num_classes=2), "faster_rcnn") \
        .configure_schedulers({"main": opt}, 100) == {}
    assert DetectorFit(build_method("bbam", {"warmup_factor": 1.0}, num_classes=2), "faster_rcnn") \
        .configure_schedulers({"main": opt}, 100) == {}
    assert "warmup_iters" in {s.name: s for s in m.stages()}["detector"].reads
    poly = build_method("bbam", {"lr_schedule": "poly"}, num_classes=2)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheds = DetectorFit(poly, "faster_rcnn").configure_schedulers({"main": opt2}, 50)
    assert scheds
    with pytest.raises(ConfigError, match=r"stage 'detector': lr_schedule is 'poly'.*lr_schedule: constant"):
        poly.check_fit(Stage("detector", "fit", epochs=2), {"main": opt2}, scheds)


def _spec(tmp: Path, source_dir: str | None, cache: Path, splits: Path, params: dict, trial: str = "t0") -> TrialSpec:
    return TrialSpec(method="bbam", params=params, data=source_dir, data_cache=str(cache), splits_path=str(splits),
                     trial_dir=str(tmp / trial), tracking_uri=tracking.default_tracking_uri(tmp), sweep_id="s",
                     trial_id=trial, run_name=trial, eval_max_images=16, num_overlays=2, log_model=True,
                     products_dir=str(tmp / "products"))


@pytest.mark.slow
def test_bbam_pseudo_masks_beat_the_box_on_the_synthetic_default(tmp_path):
    """BBAM's foreground pseudo masks score at least 10 points of per-instance mIoU above the
    box-filled mask on the val split, with a detector whose O⁺ is non-empty for most boxes."""
    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    splits = tmp_path / "splits.json"
    save_splits(make_splits(source, seed=0), splits)
    spec = _spec(tmp_path, None, cache, splits, {**TINY, "attribution_splits": ["val"], "max_images_per_split": 10})
    m = run_trial(spec, executor="inline")
    # every val/test key the real run logged is declared (direction, unit, meaning)
    assert not undeclared(m), undeclared(m)
    ours, box = m["val/pseudo_masks/instance_miou"], m["val/pseudo_masks/box_filled/instance_miou"]
    print(f"val instance mIoU: BBAM {ours:.1f}, box-filled {box:.1f}, CRF from the box prior "
          f"{m['val/pseudo_masks/box_crf/instance_miou']:.1f}; O+ non-empty for "
          f"{m['val/attribute/positive_share']:.0f}% of {m['val/attribute/boxes']:.0f} boxes")
    assert m["val/attribute/positive_share"] >= 50, "the detector did not learn enough for BBAM to attribute"
    assert ours >= box + 10
    client = tracking.client_for(spec.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])[0]
    assert run.info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(run.info.run_id, C.OVERLAY_DIR)]
    assert len(arts) == 2, arts
    # the registered-model path: the logged InstancePredictor loads and draws masks
    from weakbench.platform.predict import load_predictor, predict_images

    predictor = load_predictor(run.data.tags[C.TAG_MODEL_URI], spec.tracking_uri)
    image = Path(source.records[0].path)
    preds = predict_images(predictor, [image], tmp_path / "pred")
    assert preds[0].overlays[0].is_file() and preds[0].classes, "the detector found nothing on a training image"


@pytest.mark.slow
def test_coco128_one_mask_per_box_inside_its_box(tmp_path, coco128_dir):
    """On a capped COCO128 subset the pipeline makes exactly one pseudo mask per GT box, inside
    its box (a detector trained from scratch on 77 images finds little; quality is not asserted)."""
    from weakbench.methods.bbam_ops import box_pixels
    from pycocotools import mask as mask_utils

    cache = tmp_path / "cache"
    source = open_dataset(str(coco128_dir), cache_dir=cache)
    splits = tmp_path / "splits.json"
    save_splits(make_splits(source, seed=0), splits)
    params = {**TINY, "input_size": 128, "epochs": 1, "mask_iterations": 5, "num_proposals": 100,
              "attribution_splits": ["train"], "max_images_per_split": 3}
    spec = _spec(tmp_path, str(coco128_dir), cache, splits, params)
    m = run_trial(spec, executor="inline")
    table = torch.load(next((tmp_path / "products").glob("pseudo_masks-*/pseudo_masks.pt")), weights_only=False)
    assert len(table) == 3
    n = 0
    for key, entry in table.items():
        index = int(key.split(":")[1])
        boxes, _ = source.gt_boxes(index)
        assert len(entry["fg"]) == len(boxes) == len(entry["ignore"])
        rec = source.records[index]
        for box, rle in zip(boxes, entry["fg"]):
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            x0, y0, x1, y1 = box_pixels(box, rec.height, rec.width)
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert mask.any() and not (mask & ~inside).any(), f"{key}: a mask leaves its box"
            n += 1
    assert m["train/attribute/boxes"] == n


def _runs(out: Path):
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a sweep and every process below it (Ray's raylet and trial workers start their own
    sessions, so a process-group kill would leave them computing)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=10)


SWEEP_SETS = ["--set", "epochs=2", "--set", "mask_iterations=5", "--set", "num_proposals=60", "--set", "max_images_per_split=4",
              "--set", "use_crf=false", "--set", "attribution_batch_images=2", "--eval-max-images", "8"]


@pytest.mark.slow
def test_sweep_trains_the_detector_once_and_resumes_in_the_attribution_stage(tmp_path):
    """A 2-trial sweep of bbam.yaml (Train executor) trains its detector once (one trial tags the
    detector stage "computed", the other "hit"), trials differ in θ_fg/λ. A second sweep killed
    inside its attribution stage resumes there with --resume: saved chunks are not recomputed,
    the detector is not retrained, one MLflow run per trial, none left RUNNING."""
    out = tmp_path / "runs"
    space = str(REPO / "search_spaces" / "bbam.yaml")
    done = subprocess.run([sys.executable, "-m", "weakbench", "sweep", space, "--trials", "2", "--output-dir", str(out),
                           "--name", "once", "--num-cpus", "2", "--address", "local", "--executor", "train", "--no-model",
                           *SWEEP_SETS],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, trials = _runs(out)
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    caches = sorted(t.data.tags["weakbench.stage.detector.cache"] for t in trials)
    assert caches == ["computed", "hit"], caches
    assert len({t.data.tags["weakbench.stage.detector.hash"] for t in trials}) == 1
    assert len({(t.data.params["theta_fg"], t.data.params["mask_l1_weight"]) for t in trials}) == 2
    assert all("val/pseudo_masks/instance_miou" in t.data.metrics for t in trials)

    # kill during attribution, then --resume
    out2 = tmp_path / "runs2"
    base = [sys.executable, "-m", "weakbench", "sweep", space, "--output-dir", str(out2), "--name", "killed", "--address", "local"]
    first = base + ["--trials", "1", "--executor", "inline", "--num-cpus", "1", "--no-model", *SWEEP_SETS,
                    "--set", "max_images_per_split=8", "--set", "mask_iterations=30"]
    proc = subprocess.Popen(first, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    products = out2 / "sweeps" / "killed" / "products"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not list(products.glob("attribute-*.partial/*.keys.json")):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.3)
        saved = list(products.glob("attribute-*.partial/*.keys.json"))
        assert saved, "no attribution chunk within 600 s"
    finally:
        _kill_tree(proc)
    saved_keys = {k for f in products.glob("attribute-*.partial/*.keys.json") for k in json.loads(f.read_text())}
    assert list(products.glob("detector-*/manifest.json")) and not list(products.glob("attribute-*/manifest.json"))
    resumed = subprocess.run(base + ["--resume", "--num-cpus", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, trials = _runs(out2)
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    tags = trials[0].data.tags
    assert int(tags["weakbench.stage.attribute.resumed_items"]) >= len(saved_keys) > 0
    assert tags["weakbench.stage.detector.cache"] == "hit"  # the detector was not retrained
    steps = [m.step for m in client.get_metric_history(trials[0].info.run_id, "train/detector/loss")]
    assert sorted(steps) == [1, 2], steps


OFFICIAL_ATTRIBUTION = ("mask_iterations", "mask_lr", "mask_l1_weight", "tv_weight", "stride_s0", "stride_s1",
                        "num_proposals", "jitter_ratio", "max_positives", "loss_variant", "indicator_box",
                        "indicator_cls", "theta_fg", "theta_bg", "use_crf", "mask_loss", "seed_growing_threshold")


def test_official_space_runs_the_schema_defaults():
    """bbam_official.yaml validates and its attribution settings are BBAMConfig's defaults (300
    iterations, λ 0.007, θ 0.85 / 0.2 ...; one place for each value): the file overrides none of
    them, so its trials run them."""
    from weakbench.methods.bbam import BBAMConfig
    from weakbench.platform.search_space import load_search_space

    space = load_search_space(REPO / "search_spaces" / "bbam_official.yaml")
    assert space.search["seed"].values == [0, 1, 2]
    assert not set(OFFICIAL_ATTRIBUTION) & set(space.fixed)
    cfg, defaults = validate_config("bbam", {**space.fixed, "seed": 0}), BBAMConfig()
    for k in OFFICIAL_ATTRIBUTION:
        assert getattr(cfg, k) == getattr(defaults, k), k
    assert (cfg.mask_iterations, cfg.mask_l1_weight, cfg.theta_fg, cfg.theta_bg) == (300, 0.007, 0.85, 0.2)
    # the official solver per image (configs/pascal_voc/BBAM_VOC_aug_FPN_R101_{FasterRCNN,MaskRCNN}.yaml:
    # lr 0.01 at 16 images, 0.008 at 8; weight decay 1e-4; maskrcnn-benchmark's warm-up factor 1/3),
    # scaled linearly to the file's batch size
    assert cfg.lr == pytest.approx(0.01 * cfg.batch_size / 16)
    assert cfg.mask_rcnn_lr == pytest.approx(0.008 * cfg.batch_size / 8)
    assert (cfg.weight_decay, round(cfg.warmup_factor, 4)) == (1e-4, 0.3333)
    with pytest.raises(ConfigError, match="indicator_box and indicator_cls"):
        validate_config("bbam", {"indicator_box": False, "indicator_cls": False})
    plan = {s.name: s for s in build_method("bbam", {"mask_rcnn_epochs": 1}, num_classes=2).stages()}
    assert {"indicator_box", "indicator_cls"} <= set(plan["attribute"].reads)
    assert {"mask_loss", "seed_growing_threshold"} <= set(plan["mask_rcnn"].reads)


@pytest.mark.slow
def test_official_space_runs_on_a_capped_subset(tmp_path):
    """One trial of bbam_official.yaml (300 iterations, 1000 proposals, the pretrained Lite0 body)
    runs end to end on the synthetic default with the images capped (2 per split, 1 detector
    epoch, 64 px, a narrow FPN): about a minute on the shared 2 cores."""
    from weakbench.platform.search_space import load_search_space

    space = load_search_space(REPO / "search_spaces" / "bbam_official.yaml")
    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    splits = tmp_path / "splits.json"
    save_splits(make_splits(source, seed=0), splits)
    capped = {**space.defaults_config(), "epochs": 1, "max_images_per_split": 2, "input_size": 64,
              "fpn_channels": 32, "box_head_size": 64}
    m = run_trial(_spec(tmp_path, None, cache, splits, capped), executor="inline")
    assert {"val/pseudo_masks/instance_miou", "test/pseudo_masks/instance_miou"} <= set(m)
    assert m["train/attribute/boxes"] >= 2
