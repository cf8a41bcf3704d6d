"""benchmarks/quality_bbam.py: runs on different --seeds merge into the one-run report, and the
per-epoch val probe of --select-epochs neither changes the training that follows nor makes the
snapshot after epoch E differ from a detector trained E epochs."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmark_scripts import load_benchmark


def _bench():
    return load_benchmark("quality_bbam")


def _result(seeds):
    """A hand-made saved run: 2 val and 3 test images (one box each), ``base`` at θ_fg 0.85."""
    boxes = []
    for split, images in (("val", (0, 1)), ("test", (2, 3, 4))):
        for i in images:
            key = f"{split}:{i}"
            boxes += [{"row": "box_filled", "key": key, "box": 0, "iou": 0.3 + 0.01 * i},
                      {"row": "box_crf", "key": key, "box": 0, "iou": 0.6 + 0.02 * i}]
            for s in seeds:
                for row, gain in (("bbam_crf", 0.1), ("bbam", -0.1)):
                    boxes.append({"row": row, "config": "base", "theta": 0.85, "seed": s, "key": key, "box": 0,
                                  "iou": 0.6 + 0.02 * i + gain * (s + 1) / 3, "positives": (i + s) % 2})
    return {"dataset": "synthetic-hard", "detector_splits": "train", "configs": ["base"], "thetas": [0.85],
            "params": {"backbone": "resnet18", "input_size": 96, "epochs": 4, "num_proposals": 300},
            "images": {"val": [0, 1], "test": [2, 3, 4]}, "seeds": list(seeds), "select_epochs": [2, 4],
            "boxes": boxes, "times": {"baselines_s": 1.0, **{f"attribute_base_seed{s}_s": 2.0 for s in seeds}},
            "detector": {str(s): {"train_s": 10.0, "loss_first": 2.0, "loss_last": 0.1, "test_bbox_ap50": 50.0 + s,
                                  "epochs": 2 + 2 * s, "epoch_probe": [
                                      {"epochs": e, "val_bbox_ap50": 40.0, "val_positive_share": 50.0,
                                       "val_boxes": 2, "train_s": 5.0 * e} for e in (2, 4)]} for s in seeds}}


def _split(res):
    return [dict(res, seeds=[s], boxes=[b for b in res["boxes"] if b.get("seed", s) == s],
                 detector={str(s): res["detector"][str(s)]},
                 times={k: v for k, v in res["times"].items() if f"seed{s}" in k or "seed" not in k})
            for s in res["seeds"]]


def test_merged_seed_runs_report_as_one_run():
    bench = _bench()
    whole = _result([0, 1, 2])
    merged = bench.merge(_split(whole))
    assert merged["seeds"] == [0, 1, 2]
    assert sorted(map(str, merged["boxes"])) == sorted(map(str, whole["boxes"]))  # baselines once
    drop_times = lambda text: [ln for ln in text.splitlines() if not ln.startswith("times")]  # noqa: E731
    assert drop_times(bench.report(merged, n_boot=50)) == drop_times(bench.report(whole, n_boot=50))
    text = bench.report(merged, n_boot=50)
    assert "epochs chosen on val per seed from [2, 4]: 2, 4, 6" in text
    assert "seed 1: after 4 epochs (20 s): val box AP50 40.0, val O+ non-empty 50 % of 2 boxes <- chosen" in text


def test_merge_refuses_repeated_seeds_and_different_settings():
    bench = _bench()
    part = _split(_result([0, 1]))
    with pytest.raises(ValueError, match="seeds repeat"):
        bench.merge([part[0], part[0]])
    other = copy.deepcopy(part[1])
    other["params"]["epochs"] = 8
    with pytest.raises(ValueError, match="'params'"):
        bench.merge([part[0], other])


def test_epoch_probe_leaves_training_unchanged(tmp_path):
    """A probe that draws from torch's RNG and runs the detector after epoch 1 of a 2-epoch run:
    the snapshot after epoch 1 equals a 1-epoch run, and the 2-epoch result equals an unprobed one."""
    from weakbench.core.data import make_splits, open_dataset
    from weakbench.methods import build_method

    bench = _bench()
    torch.set_num_threads(1)
    source = open_dataset("synthetic", cache_dir=tmp_path / "cache")
    train = [int(i) for i in make_splits(source, 0)["train"]][:8]  # 2 steps per epoch, a 1-step warm-up
    image = torch.rand(3, 96, 96)

    def method(epochs):
        return build_method("bbam", {"backbone": "resnet18", "input_size": 96, "epochs": epochs, "lr": 0.02,
                                     "batch_size": 4, "fpn_channels": 16, "box_head_size": 32, "seed": 0},
                            num_classes=source.num_classes, multilabel=source.multilabel)

    snaps = {}

    def probe(epoch, det):
        torch.rand(1000)  # what the RPN's and RoI heads' samplers would draw
        with torch.no_grad():
            det([image])
        snaps[epoch] = copy.deepcopy(det.state_dict())

    one, _ = bench.train_detector(method(1), source, train, 1, seed=0)
    two_probed, _ = bench.train_detector(method(2), source, train, 2, seed=0, on_epoch=probe)
    two, _ = bench.train_detector(method(2), source, train, 2, seed=0)
    for name, value in one.state_dict().items():
        assert torch.equal(value, snaps[1][name]), name
    changed = 0
    for name, value in two.state_dict().items():
        assert torch.equal(value, two_probed.state_dict()[name]), name
        changed += not torch.equal(value, snaps[1][name])
    assert changed > 0  # epoch 2 trained
