"""The embedded synthetic dataset: COCO validity, determinism, caching, learnability."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from weakbench.core.data import (
    SHAPES, ClassificationDataset, CocoSource, ensure_synthetic, generate_synthetic_coco, make_splits, open_dataset,
)
from weakbench.core.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DEFAULT_8_SEED0_SHA256 = "545ac7413917b2b935b38242326c76ff5e865ebef8f19df92c4b3bc081a074b3"


def _tree(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", num_images=6, seed=3)
    b = generate_synthetic_coco(tmp_path / "b", num_images=6, seed=3)
    c = generate_synthetic_coco(tmp_path / "c", num_images=6, seed=4)
    assert _tree(a) == _tree(b) == _tree(c)
    assert len(_tree(a)) == 6 + 2
    for rel in _tree(a):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    assert (a / "annotations/instances.json").read_bytes() != (c / "annotations/instances.json").read_bytes()
    assert (a / "fingerprint").read_text() != (c / "fingerprint").read_text()


def test_valid_coco_with_real_masks_and_boxes(synthetic_dir):
    coco = COCO(str(synthetic_dir / "annotations" / "instances.json"))
    assert len(coco.getImgIds()) == 96
    assert [coco.cats[c]["name"] for c in sorted(coco.getCatIds())] == list(SHAPES[:4])
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 3
    assert sum(n > 1 for n in per_image) > 30  # several instances are common
    counts = np.bincount([a["category_id"] - 1 for a in coco.loadAnns(coco.getAnnIds())], minlength=4)
    assert (counts >= 20).all()
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["iscrowd"] == 0
        m = coco.annToMask(ann).astype(bool)
        assert m.sum() == ann["area"] > 50
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    src = CocoSource(synthetic_dir, name="synthetic")
    assert src.fingerprint == (synthetic_dir / "fingerprint").read_text().strip()
    assert src.has_masks and src.multilabel


def test_classes_differ_by_colour(synthetic_dir):
    # nearest-centroid on the mean colour of each instance separates the classes perfectly
    src = CocoSource(synthetic_dir)
    feats, classes = [], []
    for i in range(40):
        img = np.asarray(src.load_image(i), dtype=np.float32)
        ann = src.annotations(i)
        for m, c in zip(ann.instance_masks, ann.box_classes):
            feats.append(img[m].mean(axis=0))
            classes.append(int(c))
    feats, classes = np.array(feats), np.array(classes)
    centroids = np.stack([feats[classes == c].mean(axis=0) for c in range(4)])
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == classes).mean() == 1.0


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions are slower with thread hand-offs on a busy CPU
    yield
    torch.set_num_threads(n)


def test_tiny_cnn_learns_it(synthetic_dir, one_thread):
    torch.manual_seed(0)
    src = CocoSource(synthetic_dir)
    sp = make_splits(src, 0)
    train = torch.utils.data.DataLoader(ClassificationDataset(src, sp["train"], 48, train=True), batch_size=16, shuffle=True)
    held = ClassificationDataset(src, sp["val"] + sp["test"], 48)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 1),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(15):
        for b in train:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(b["image"]), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    b = torch.utils.data.default_collate([held[i] for i in range(len(held))])
    with torch.no_grad():
        acc = ((net(b["image"]) > 0).float() == b["labels"]).float().mean().item()
    majority = max(b["labels"].mean().item(), 1 - b["labels"].mean().item())
    assert acc >= 0.95 > majority


def test_open_dataset_none_generates_once_and_regenerates_when_corrupt(tmp_path):
    src = open_dataset(None, cache_dir=tmp_path, seed=0)
    assert src.name == "synthetic" and len(src) == 96 and src.num_classes == 4
    root = tmp_path / "synthetic-v1-seed0"
    assert src.root == root.resolve()
    stamp = (root / "annotations/instances.json").stat().st_mtime_ns
    again = open_dataset(None, cache_dir=tmp_path, seed=0)
    assert again.fingerprint == src.fingerprint
    assert (root / "annotations/instances.json").stat().st_mtime_ns == stamp  # re-used, not rewritten
    (root / "images" / "000005.png").write_bytes(b"broken")  # size changes → fingerprint mismatch
    fixed = ensure_synthetic(tmp_path, seed=0)
    assert fixed == root
    assert CocoSource(root).fingerprint == src.fingerprint
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary dirs left
    other = open_dataset(None, cache_dir=tmp_path, seed=1)
    assert other.fingerprint != src.fingerprint


def test_bad_arguments():
    with pytest.raises(ConfigError, match="num_classes"):
        generate_synthetic_coco("/nonexistent-never-written", num_classes=7)
    with pytest.raises(ConfigError, match="image_size"):
        generate_synthetic_coco("/nonexistent-never-written", image_size=8)


def test_info_records_parameters(synthetic_dir):
    info = json.loads((synthetic_dir / "annotations/instances.json").read_text())["info"]
    assert info["seed"] == 0 and info["num_images"] == 96 and info["image_size"] == 96


def test_default_bytes_are_unchanged_by_the_variants(tmp_path):
    import hashlib

    d = generate_synthetic_coco(tmp_path / "d", num_images=8, seed=0)
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    # the hash of this output before the touching / hard variants existed (commit db8a3bf)
    assert h.hexdigest() == DEFAULT_8_SEED0_SHA256


@pytest.mark.parametrize("variant", ["touching", "hard"])
def test_variants_touch_overlap_and_repeat_a_class(tmp_path, variant):
    from weakbench.core.data import HARD_SHAPES

    d = generate_synthetic_coco(tmp_path / variant, num_images=48, seed=1, variant=variant)
    again = generate_synthetic_coco(tmp_path / "again", num_images=48, seed=1, variant=variant)
    assert (d / "annotations/instances.json").read_bytes() == (again / "annotations/instances.json").read_bytes()
    coco = COCO(str(d / "annotations" / "instances.json"))
    names = [coco.cats[c]["name"] for c in sorted(coco.getCatIds())]
    assert names == list((HARD_SHAPES if variant == "hard" else SHAPES)[:4])
    repeated = touching_same_class = 0
    for i in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i))
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        for a, m in zip(anns, masks):  # annotations are the visible masks and their extents
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]
            assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] and m.sum() >= 40
        for j in range(len(masks)):
            for k in range(j):
                assert not (masks[j] & masks[k]).any()  # visible masks never share a pixel
        cats = [a["category_id"] for a in anns]
        if len(cats) > len(set(cats)):
            repeated += 1
            grown = [np.pad(m, 1)[:-2, 1:-1] | np.pad(m, 1)[2:, 1:-1] | np.pad(m, 1)[1:-1, :-2] | np.pad(m, 1)[1:-1, 2:] | m
                     for m in masks]
            if any(cats[j] == cats[k] and (grown[j] & masks[k]).any() for j in range(len(anns)) for k in range(j)):
                touching_same_class += 1
    assert repeated >= 48 * 0.3 and touching_same_class >= 48 * 0.15


def test_synthetic_variant_through_open_dataset(tmp_path):
    src = open_dataset("synthetic:hard", cache_dir=tmp_path)
    assert src.name == "synthetic-hard" and src.root.name == "synthetic-v1-hard-seed0" and len(src) == 96
    assert open_dataset("synthetic", cache_dir=tmp_path).name == "synthetic"
    assert open_dataset("synthetic", cache_dir=tmp_path).fingerprint == open_dataset(None, cache_dir=tmp_path).fingerprint
    with pytest.raises(ConfigError, match="unknown synthetic variant 'soft'"):
        open_dataset("synthetic:soft", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="variant"):
        generate_synthetic_coco(tmp_path / "x", variant="soft")
