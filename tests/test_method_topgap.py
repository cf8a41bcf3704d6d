"""Top-GAP: pooling, ℓ1 term, k resolution, IoU, ERF distance and PGD robust accuracy on
hand-computed cases; the FPN-style head's CAM size; training smoke and the paper's metrics;
``top_k_fraction: object_size`` (the train split's relative object size) on a hand-made source."""

from __future__ import annotations

import copy
import io
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from weakbench.methods import build_method
from weakbench.methods.base import StepContext
from weakbench.methods.classifier import CamPredictor
from weakbench.methods.pipeline import Stage
from weakbench.methods.topgap import (
    TopGAPFitTask, cam_mask_iou, erf_center_corner, erf_distance, l1_sparsity, pgd_robust_correct, relative_object_size,
    resolve_k, top1_correct, top_gap, union_box_area,
)
from weakbench.core.data.source import DatasetSource, ImageRecord
from weakbench.core.errors import ConfigError, DataError

SMALL = {"backbone": "resnet10t", "input_size": 64, "batch_size": 4, "lr": 0.05, "head_channels": 32,
         "top_k_fraction": 0.1, "eval_images": 4, "pgd_steps": 2}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _ctx() -> StepContext:
    return StepContext(epoch=0, step=0, steps_per_epoch=2, total_steps=2, device=torch.device("cpu"), unwrap=lambda m: m)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    return {"image": torch.randn(4, 3, 64, 64, generator=g), "labels": labels, "index": torch.arange(4)}


def test_top_gap_hand_values():
    x = torch.tensor([[[[1.0, 5.0], [3.0, 2.0]]]])
    assert top_gap(x, 2).item() == pytest.approx(4.0)       # (5 + 3) / 2
    assert top_gap(x, 1).item() == pytest.approx(5.0)       # k = 1: global max pooling
    assert top_gap(x, 4).item() == pytest.approx(11 / 4)    # k = h·w: GAP
    assert top_gap(x, 100).item() == pytest.approx(11 / 4)  # clamped to h·w
    y = torch.randn(2, 3, 5, 7)
    assert torch.allclose(top_gap(y, 35), y.mean(dim=(2, 3)))
    assert torch.allclose(top_gap(y, 1), y.amax(dim=(2, 3)))


def test_l1_sparsity_and_k_resolution():
    assert l1_sparsity(torch.tensor([-1.0, 2.0, 0.0, -3.0])).item() == pytest.approx(1.5)
    cfg = build_method("topgap", {}, num_classes=2).config
    assert (cfg.top_k, cfg.l1_weight, cfg.num_feature_maps, cfg.head_channels) == (256, 1.0, 4, 256)
    assert resolve_k(cfg, 1024) == 256 and resolve_k(cfg, 100) == 100
    frac = build_method("topgap", {"top_k_fraction": 0.25}, num_classes=2).config
    assert resolve_k(frac, 100) == 25 and resolve_k(frac, 2) == 1
    with pytest.raises(ConfigError, match="top_k_fraction"):
        build_method("topgap", {"top_k_fraction": 1.5}, num_classes=2)


def test_training_loss_is_ce_plus_lambda_l1():
    """L = CE + λ‖X‖₁ (eq. 1) with λ = 2.5, both terms recomputed here from the model's own outputs."""
    lam = 2.5
    m = build_method("topgap", {**SMALL, "l1_weight": lam}, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().eval()  # eval: the second forward below gives the same tensors
    batch = _batch()
    out = m.training_losses(net, batch, _ctx())
    with torch.no_grad():
        logits, cams = net(batch["image"])
    ce = float(torch.nn.functional.multilabel_soft_margin_loss(logits, batch["labels"]))
    l1 = float(cams.abs().mean())
    assert float(out["cls"]) == pytest.approx(ce, rel=1e-5) and float(out["l1"]) == pytest.approx(l1, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(ce + lam * l1, rel=1e-5)
    assert abs((ce + l1) - (ce + lam * l1)) > 1e-3 * (ce + lam * l1)  # dropping λ is visible
    logged = m.training_step(net.train(), batch, m.configure_optimizers(net), _ctx())
    assert logged["loss"] == pytest.approx(logged["cls"] + lam * logged["l1"], rel=1e-5)


def test_cam_mask_iou_hand():
    maps = torch.tensor([[[0.9, 0.1], [0.6, 0.4]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    assert cam_mask_iou(maps, mask, 0.5).item() == pytest.approx(1 / 3)
    ignore = torch.tensor([[[False, True], [False, False]]])
    assert cam_mask_iou(maps, mask, 0.5, ignore).item() == pytest.approx(1 / 2)


def test_erf_distance_hand():
    w = torch.tensor([[1.0, 1.0], [1.0, 2.0]])  # the centre (h/2, w/2) = (1, 1) weighs 2, the corner 1

    def cam_fn(x):
        return x.sum(1, keepdim=True) * w

    x = torch.zeros(1, 3, 2, 2)
    center, corner = erf_center_corner(cam_fn, x)
    # signed gradients: the centre's is 2 at pixel (1, 1) in each of the 3 channels, the corner's
    # 1 at (0, 0); both maps z-normalised together (24 values, mean 9/24 = 0.375)
    values = [2] * 3 + [0] * 9 + [1] * 3 + [0] * 9
    sd = statistics.stdev(values)
    # centre: pixel (1, 1) 3·|2 − 0.375|, three pixels 3·0.375 each, averaged over 4 pixels
    assert center.item() == pytest.approx((3 * 1.625 + 3 * 3 * 0.375) / 4 / sd, rel=1e-5)
    assert corner.item() == pytest.approx((3 * 0.625 + 3 * 3 * 0.375) / 4 / sd, rel=1e-5)
    assert erf_distance(cam_fn, x).item() == pytest.approx(center.item() - corner.item(), rel=1e-6)
    assert center.item() != pytest.approx(-corner.item())  # no longer forced to centre = −corner
    assert erf_distance(lambda x: x.sum(1, keepdim=True), torch.zeros(1, 3, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)


class _RedGreen(torch.nn.Module):
    """Class 0 scores the red channel, class 1 the green one; returns (logits, cams)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])

    def forward(self, x):
        cams = self.conv(x)
        return cams.mean(dim=(2, 3)), cams


def test_pgd_robust_accuracy_small_and_large_epsilon():
    x01 = torch.zeros(2, 3, 8, 8)
    x01[:, 0], x01[:, 1] = 0.8, 0.2  # clearly red: class 0
    images = (x01 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    model = _RedGreen()
    assert top1_correct(model(images)[0], labels).all()
    assert pgd_robust_correct(model, images, labels, 8 / 255, 20, 2 / 255).all()
    assert not pgd_robust_correct(model, images, labels, 1.0, 20, 0.1).any()  # the attacker may repaint the image
    assert pgd_robust_correct(model, images, labels, 1 / 255, 40, None).all()  # the imagenet setting, Foolbox's step
    # FGSM: one step of ε; red 0.8 vs green 0.2 survives ε = 0.2 (0.6 vs 0.4), not ε = 0.4 (0.4 vs 0.6)
    assert pgd_robust_correct(model, images, labels, 0.2, 0, None, attack="fgsm").all()
    assert not pgd_robust_correct(model, images, labels, 0.4, 0, None, attack="fgsm").any()


def test_attack_settings_are_the_papers_and_overridable():
    c = build_method("topgap", {}, num_classes=3).config
    assert c.attack_setting == "imagenet" and c.attack() == (1 / 255, 40, None)  # Table A3
    c = build_method("topgap", {"attack_setting": "cifar"}, num_classes=3).config
    assert c.attack() == (8 / 255, 20, 2 / 255)  # Table 3
    c = build_method("topgap", {"attack_setting": "cifar", "pgd_steps": 50}, num_classes=3).config
    assert c.attack() == (8 / 255, 50, 2 / 255)
    with pytest.raises(Exception, match="attack_setting"):
        build_method("topgap", {"attack_setting": "mnist"}, num_classes=3)


def test_head_cam_resolution_is_largest_feature_map():
    for n, stride in ((4, 4), (3, 8)):
        m = build_method("topgap", {**SMALL, "num_feature_maps": n}, num_classes=3)
        logits, cams = m.build_model().eval()(torch.zeros(1, 3, 64, 64))
        assert cams.shape == (1, 3, 64 // stride, 64 // stride) and logits.shape == (1, 3)


def test_training_steps_smoke_and_paper_metrics():
    m = build_method("topgap", SMALL, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    opts = m.configure_optimizers(net)
    before = copy.deepcopy(net.state_dict())
    for i in range(2):
        out = m.training_step(net, _batch(i), opts, _ctx())
        assert all(math.isfinite(v) for v in out.values())
        assert out["loss"] == pytest.approx(out["cls"] + m.config.l1_weight * out["l1"], rel=1e-5)
    after = net.state_dict()
    for prefix in ("backbone.", "laterals.", "classifier."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix) and k.endswith("weight")), prefix

    batch = _batch()
    masks = torch.zeros(4, 3, 64, 64, dtype=torch.bool)
    masks[:, :, 16:48, 16:48] = batch["labels"][:, :, None, None].bool()
    batch.update(masks=masks, ignore=torch.zeros(4, 64, 64, dtype=torch.bool))
    metrics = m.extra_metrics(net, [batch], torch.device("cpu"))
    acc = ("clean_accuracy", "robust_accuracy", "fgsm_accuracy")
    assert set(metrics) == {"cam_iou", "erf_center", "erf_corner", "erf_distance", "attack_images",
                            *acc, *(f"{a}_ci95" for a in acc)}
    assert 0 <= metrics["cam_iou"] <= 100 and metrics["erf_center"] >= 0 and metrics["erf_corner"] >= 0
    assert metrics["erf_distance"] == pytest.approx(metrics["erf_center"] - metrics["erf_corner"], abs=1e-6)
    n = metrics["attack_images"]
    assert n == 4
    for a in acc:
        p = metrics[a] / 100
        assert 0 <= p <= 1 and metrics[f"{a}_ci95"] == pytest.approx(100 * 1.96 * math.sqrt(p * (1 - p) / n))
    assert net.training


# ---------------------------------------------------------------------- top_k_fraction: object_size
class _BoxSource(DatasetSource):
    """A hand-made source: records of the given sizes with the given boxes (no image files)."""

    def __init__(self, images: list[tuple[int, int, list[tuple[float, float, float, float]]]]):
        self.name, self.root, self.fingerprint = "hand", Path("/nonexistent"), "0" * 16
        self.num_classes, self.class_names, self.multilabel, self.has_masks = 3, ["a", "b", "c"], True, False
        self.records = [ImageRecord(i, i, Path(f"/nonexistent/{i}.png"), w, h) for i, (w, h, _) in enumerate(images)]
        self._boxes = [np.array(b, dtype=np.float64).reshape(-1, 4) for _, _, b in images]

    def labels_matrix(self):
        return np.zeros((len(self.records), self.num_classes), dtype=np.float32)

    def gt_boxes(self, index):
        return self._boxes[index].copy(), np.zeros(len(self._boxes[index]), dtype=np.int64)


#: train 0-2, val 3, test 4. Image 0 (100×50 = 5000 px²): boxes 40×25 = 1000 and 30×20 = 600
#: overlapping in 20×15 = 300, union 1300 (the sum would be 1600) → 0.26. Image 1 (200×100):
#: one box 50×40 = 2000 → 0.1. Image 2: no box (left out). Val and test: a box covering the image.
HAND = [(100, 50, [(10, 5, 50, 30), (30, 15, 60, 35)]), (200, 100, [(0, 0, 50, 40)]), (64, 64, []),
        (64, 64, [(0, 0, 64, 64)]), (80, 60, [(-5, -5, 90, 70)])]
SPLITS = {"train": [0, 1, 2], "val": [3], "test": [4]}
HAND_FRACTION = (1300 / 5000 + 2000 / 20000) / 2  # 0.18


def test_union_box_area_counts_overlaps_once_hand():
    assert union_box_area(np.array(HAND[0][2]), 100, 50) == pytest.approx(1300)  # not 1000 + 600 = 1600
    assert union_box_area(np.zeros((0, 4)), 10, 10) == 0.0
    assert union_box_area(np.array([[-5, -5, 90, 70]]), 80, 60) == pytest.approx(80 * 60)  # clipped to the image
    assert union_box_area(np.array([[0, 0, 4, 4], [1, 1, 2, 2], [3, 0, 6, 1]]), 10, 10) == pytest.approx(18)  # nested
    assert union_box_area(np.array([[5, 5, 5, 9], [3, 3, 1, 1]]), 10, 10) == 0.0  # empty and inverted boxes


def test_relative_object_size_hand():
    src = _BoxSource(HAND)
    assert relative_object_size(src, SPLITS["train"]) == pytest.approx(HAND_FRACTION)
    assert relative_object_size(src, SPLITS["train"]) != pytest.approx((1600 / 5000 + 0.1) / 2)  # the sum of boxes
    assert relative_object_size(src, [1, 0]) == relative_object_size(src, [0, 1, 2])  # order and box-less images
    with pytest.raises(ConfigError, match="no.*box|none of"):
        relative_object_size(src, [2])


def _object_size_task(src=None, **params):
    m = build_method("topgap", {**SMALL, "top_k_fraction": "object_size", **params}, num_classes=3)
    return m, m.fit_task(Stage("train", "fit", epochs=1, namespaced=False))


def test_object_size_reads_the_train_split_only():
    """As the engine does: build the model, then the dataset of splits["train"]. Val and test
    images covered by a box (fraction 1) must not move the value; with them it would."""
    src = _BoxSource(HAND)
    _, task = _object_size_task()
    assert isinstance(task, TopGAPFitTask)
    torch.manual_seed(0)
    model = task.build_model()
    assert model.k_fraction is None
    ds = task.train_dataset(src, SPLITS["train"])
    assert ds.indices == SPLITS["train"]
    assert task.object_size == pytest.approx(HAND_FRACTION) and model.k_fraction == task.object_size
    everything = relative_object_size(src, range(len(HAND)))
    assert everything != pytest.approx(HAND_FRACTION)  # the val/test boxes would have changed it
    # the same split again (a resumed trial): the same float, and a changed split is refused
    task.train_dataset(src, list(reversed(SPLITS["train"])))
    assert model.k_fraction == task.object_size
    with pytest.raises(DataError, match="changed"):
        task.train_dataset(src, [0, 1, 3])


def test_object_size_k_is_round_fraction_times_hw_and_travels_with_the_model():
    src = _BoxSource(HAND)
    m, task = _object_size_task()
    torch.manual_seed(0)
    net = task.build_model().eval()
    with pytest.raises(ConfigError, match="not resolved"):  # never a silent default k
        net(torch.zeros(1, 3, 64, 64))
    task.train_dataset(src, SPLITS["train"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cams = net(x)
    hw = cams.shape[-2] * cams.shape[-1]  # 16 × 16 at stride 4
    k = round(HAND_FRACTION * hw)
    assert hw == 256 and k == 46 and net.last_k == k == resolve_k(m.config, hw, net.k_fraction)
    assert torch.allclose(logits, top_gap(cams, k)) and not torch.allclose(logits, top_gap(cams, k + 5))
    # the state dict carries it: a model rebuilt for evaluation (the engine's load_model) scores the same
    rebuilt = m.fit_task(Stage("train", "fit", epochs=1, namespaced=False)).build_model().eval()
    assert rebuilt.k_fraction is None
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.k_fraction == net.k_fraction
    with torch.no_grad():
        assert torch.allclose(rebuilt(x)[0], logits) and rebuilt.last_k == k
    # and so does the pickled predictor (what MLflow logs and `predict` / the registry load)
    buf = io.BytesIO()
    torch.save(CamPredictor(m, net, src.class_names, 64, MEAN, STD), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.model.k_fraction == net.k_fraction
    assert torch.allclose(loaded(x)[0], logits) and loaded.model.last_k == k
    with pytest.raises(ConfigError, match="object_size"):
        resolve_k(m.config, hw)  # resolve_k needs the resolved value


def test_object_size_is_logged_with_validation(monkeypatch):
    from weakbench.methods import classifier

    monkeypatch.setattr(classifier.ClassifierFitTask, "validate", lambda self, model, ctx, last: {"max_box_acc_v2": 1.0})
    src = _BoxSource(HAND)
    _, task = _object_size_task()
    net = task.build_model().eval()
    task.train_dataset(src, SPLITS["train"])
    with torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    out = task.validate(net, None, last=True)
    assert out == {"max_box_acc_v2": 1.0, "train/top_k_fraction": HAND_FRACTION, "train/top_k": 46.0}
    from weakbench.methods import metric_declarations as D

    assert D.lookup("train/top_k_fraction").direction is None and D.lookup("train/top_k").unit == "count"


def test_top_k_fraction_accepts_object_size_and_refuses_other_strings():
    assert build_method("topgap", {"top_k_fraction": "object_size"}, num_classes=2).config.top_k_fraction == "object_size"
    assert build_method("topgap", {"top_k_fraction": 0.5}, num_classes=2).config.top_k_fraction == 0.5
    for bad in ("objectsize", "median", True, 0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"top_k_fraction.*number in \(0, 1\].*'object_size'.*got"):
            build_method("topgap", {"top_k_fraction": bad}, num_classes=2)


@pytest.mark.slow
def test_object_size_through_an_inline_trial(tmp_path, monkeypatch):
    """A real trial (inline executor, synthetic data, MLflow on SQLite): the run logs the train
    split's value, which differs from the value over every record, and the logged predictor pools
    with the k it implies."""
    from weakbench.core import conventions as C
    from weakbench.platform import tracking
    from weakbench.core.data import make_splits, open_dataset, save_splits
    from weakbench.platform.engine import TrialSpec, run_trial
    from weakbench.platform.predict import load_predictor

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    splits = make_splits(source, seed=0)
    save_splits(splits, cache / "splits.json")
    params = {**SMALL, "top_k_fraction": "object_size", "epochs": 1, "batch_size": 8, "eval_images": 2, "pgd_steps": 1}
    spec = TrialSpec(method="topgap", params=params, data=None, data_cache=str(cache),
                     splits_path=str(cache / "splits.json"), trial_dir=str(tmp_path / "trial"),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id="t0",
                     run_name="topgap-t0", eval_max_images=8, num_overlays=0, log_model=True)
    run_trial(spec, executor="inline")
    expected = relative_object_size(source, splits["train"])
    assert expected != relative_object_size(source, range(len(source.records)))
    client = tracking.client_for(spec.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["top_k_fraction"] == "object_size"
    assert run.data.metrics["train/top_k_fraction"] == expected
    predictor = load_predictor(run.data.tags[C.TAG_MODEL_URI], spec.tracking_uri)
    logits, cams = predictor(torch.zeros(1, 3, 64, 64))
    k = round(expected * cams.shape[-2] * cams.shape[-1])
    assert predictor.model.k_fraction == expected and predictor.model.last_k == k
    assert run.data.metrics["train/top_k"] == k


def test_evaluate_refuses_object_size_before_reading_any_image(tmp_path):
    """``weakbench evaluate --method topgap`` has no train split to measure the object size on:
    the fraction is refused up front, naming the field and the fix, with no MLflow run left."""
    import sqlite3

    from weakbench.core.errors import ConfigError
    from weakbench.platform.evaluation import evaluate_dataset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"top_k_fraction.*--set top_k_fraction=0\.5"):
        evaluate_dataset(None, tracking_uri=uri, method="topgap", cache_dir=tmp_path / "cache",
                         params={"epochs": 0, "top_k_fraction": "object_size", "backbone": "resnet18",
                                 "pretrained": False, "input_size": 32})
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0
    # a number is accepted and scores (the fix the message gives)
    res = evaluate_dataset(None, tracking_uri=uri, method="topgap", cache_dir=tmp_path / "cache", max_images=4,
                           log=False, params={"epochs": 0, "top_k_fraction": 0.5, "backbone": "resnet18",
                                              "pretrained": False, "input_size": 32})
    assert "max_box_acc_v2" in res.metrics
