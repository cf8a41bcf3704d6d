"""COCO reader against pycocotools on the real COCO128 subset (skipped when absent)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from weakbench.core.data import CocoSource, EvalDataset, collate_eval, open_dataset

# pycocotools 2.0.x under numpy 2 warns on every mask decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def source(coco128_dir):
    return open_dataset(coco128_dir)


@pytest.fixture(scope="module")
def coco(coco128_dir):
    return COCO(str(coco128_dir / "annotations" / "instances.json"))


def test_counts_and_classes(source, coco):
    assert isinstance(source, CocoSource)
    assert source.name == "coco128"
    assert len(source.records) == 128
    assert source.num_classes == 80
    assert source.multilabel is True
    assert source.has_masks is True
    assert len(coco.getAnnIds()) == 939
    assert len(coco.getAnnIds(iscrowd=True)) == 10
    cat_ids = sorted(coco.getCatIds())
    assert source.class_names == [coco.cats[c]["name"] for c in cat_ids]
    assert source.class_names[0] == "person"
    assert re.fullmatch(r"[0-9a-f]{16}", source.fingerprint)
    assert [r.index for r in source.records] == list(range(128))
    assert [r.image_id for r in source.records] == sorted(coco.getImgIds())


def test_images_without_labels(source):
    empty = [r.image_id for r in source.records if source.labels_matrix()[r.index].sum() == 0]
    assert empty == [250, 508]
    a = source.annotations(source.index_of(250))
    assert a.boxes.shape == (0, 4) and a.box_classes.shape == (0,)
    assert a.instance_masks.shape == (0, source.records[source.index_of(250)].height, source.records[source.index_of(250)].width)
    assert (a.semantic_mask == 0).all() and a.ignore_mask is None


def test_labels_boxes_masks_match_pycocotools(source, coco):
    cat_ids = sorted(coco.getCatIds())
    n_boxes = n_crowd_images = 0
    for rec in source.records:
        a = source.annotations(rec.index)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec.image_id, iscrowd=False))
        crowd = coco.loadAnns(coco.getAnnIds(imgIds=rec.image_id, iscrowd=True))
        want_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (an["bbox"] for an in anns)], dtype=np.float32).reshape(-1, 4)
        want_classes = np.array([cat_ids.index(an["category_id"]) for an in anns], dtype=np.int64)
        np.testing.assert_array_equal(a.boxes, want_boxes)
        np.testing.assert_array_equal(a.box_classes, want_classes)
        want_labels = np.zeros(80, np.float32)
        want_labels[want_classes] = 1
        np.testing.assert_array_equal(a.labels, want_labels)
        np.testing.assert_array_equal(source.labels_matrix()[rec.index], want_labels)
        masks = np.stack([coco.annToMask(an).astype(bool) for an in anns]) if anns else np.zeros((0, rec.height, rec.width), bool)
        np.testing.assert_array_equal(a.instance_masks, masks)
        # semantic mask: every class pixel lies in that class's annToMask union; pixels covered by
        # exactly one class (and not ignored) carry that class; uncovered pixels are 0 or 255 (crowd)
        sem = a.semantic_mask
        assert sem.shape == (rec.height, rec.width) and sem.dtype == np.uint8
        covered = np.zeros(sem.shape, np.int32)
        unions = {}
        for c in np.unique(want_classes):
            unions[c] = masks[want_classes == c].any(axis=0)
            covered += unions[c]
        for c, u in unions.items():
            assert not ((sem == c + 1) & ~u).any()
            assert (sem[u & (covered == 1)] == c + 1).all()
        crowd_union = np.zeros(sem.shape, bool)
        for an in crowd:
            crowd_union |= coco.annToMask(an).astype(bool)
        want_ignore = crowd_union & ~(covered > 0)
        if crowd:
            n_crowd_images += 1
            np.testing.assert_array_equal(a.ignore_mask, want_ignore)
            assert want_ignore.any()
        else:
            assert a.ignore_mask is None
        np.testing.assert_array_equal(sem == 255, want_ignore)
        np.testing.assert_array_equal(sem == 0, (covered == 0) & ~want_ignore)
        n_boxes += len(a.boxes)
    assert n_boxes == 939 - 10
    assert n_crowd_images == 9  # 10 crowd annotations on 9 images (image 315 has two)


def test_load_image_rgb_and_size(source):
    for i in (0, 77):
        img = source.load_image(i)
        assert img.mode == "RGB"
        assert img.size == (source.records[i].width, source.records[i].height)


def test_eval_dataset_boxes_follow_resize_bbox(source, coco):
    s = 100
    idx = [source.index_of(257), source.index_of(9)]
    ds = EvalDataset(source, idx, s)
    batch = collate_eval([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, s, s) and batch["masks"].shape == (2, 80, s, s)
    assert batch["has_masks"].tolist() == [True, True]
    for k, i in enumerate(idx):
        rec = source.records[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec.image_id, iscrowd=False))
        want = [[int(x * s / rec.width), int(y * s / rec.height), int((x + w) * s / rec.width), int((y + h) * s / rec.height)]
                for x, y, w, h in (an["bbox"] for an in anns)]
        assert batch["boxes"][k].dtype == torch.int64
        assert batch["boxes"][k].tolist() == want
        # every class with a box has a non-empty mask, every other class an empty one
        present = set(batch["box_classes"][k].tolist())
        for c in range(80):
            assert bool(batch["masks"][k, c].any()) == (c in present)
    assert batch["ignore"][0].any()  # image 257 has a crowd region
    assert (batch["semantic"][0][batch["ignore"][0]] == 255).all()
