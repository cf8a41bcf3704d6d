"""Torch datasets: item fields, normalisation, seeded flips, evaluation-frame labels, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from weakbench.core.data import (
    IMAGENET_MEAN, IMAGENET_STD, ClassificationDataset, CocoSource, EvalDataset, collate_classification, collate_eval,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def src(synthetic_dir):
    return CocoSource(synthetic_dir, name="synthetic")


def _denormalise(t):
    return t * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def test_classification_item(src):
    ds = ClassificationDataset(src, [5, 9, 11], input_size=64, train=False)
    assert len(ds) == 3
    item = ds[1]
    assert item["image"].dtype == torch.float32 and tuple(item["image"].shape) == (3, 64, 64)
    assert item["labels"].dtype == torch.float32 and tuple(item["labels"].shape) == (4,)
    assert item["index"].dtype == torch.int64 and item["index"].dim() == 0 and item["index"].item() == 9
    np.testing.assert_array_equal(item["labels"].numpy(), src.labels_matrix()[9])
    want = np.asarray(src.load_image(9).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(_denormalise(item["image"]), torch.from_numpy(want).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_train_flip_follows_torch_seed(src):
    ds = ClassificationDataset(src, [0], input_size=48, train=True)
    plain = ClassificationDataset(src, [0], input_size=48, train=False)[0]["image"]
    flipped = torch.flip(plain, dims=(-1,))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = ds[0]["image"]
        torch.manual_seed(seed)
        b = ds[0]["image"]
        assert torch.equal(a, b)
        assert torch.equal(a, plain) or torch.equal(a, flipped)
        seen.add(torch.equal(a, flipped))
    assert seen == {True, False}


def test_classification_loader_batches(src):
    loader = DataLoader(ClassificationDataset(src, range(10), 32, train=True), batch_size=4,
                        collate_fn=collate_classification)
    b = next(iter(loader))
    assert tuple(b["image"].shape) == (4, 3, 32, 32) and tuple(b["labels"].shape) == (4, 4)
    assert b["index"].tolist() == [0, 1, 2, 3]


def test_eval_item_at_native_size_equals_pycocotools(src, synthetic_dir):
    # input_size = image size (96): masks are the exact per-class unions of annToMask
    coco = COCO(str(synthetic_dir / "annotations" / "instances.json"))
    ds = EvalDataset(src, list(range(6)), input_size=96)
    for k in range(6):
        item = ds[k]
        rec = src.records[k]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=rec.image_id))
        for c in range(4):
            want = np.zeros((96, 96), bool)
            for a in anns:
                if a["category_id"] - 1 == c:
                    want |= coco.annToMask(a).astype(bool)
            np.testing.assert_array_equal(item["masks"][c].numpy(), want)
        assert item["boxes"].tolist() == [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in (a["bbox"] for a in anns)]
        assert item["box_classes"].tolist() == [a["category_id"] - 1 for a in anns]
        assert not item["ignore"].any() and item["has_masks"].item() is True
        sem = item["semantic"].numpy()
        assert set(np.unique(sem)) <= {0, 1, 2, 3, 4}
        np.testing.assert_array_equal(sem > 0, item["masks"].numpy().any(axis=0))


def test_eval_resized_masks_and_collate(src):
    ds = EvalDataset(src, [0, 1, 2], input_size=40)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_eval)
    b = next(iter(loader))
    assert tuple(b["image"].shape) == (3, 3, 40, 40)
    assert b["masks"].dtype == torch.bool and tuple(b["masks"].shape) == (3, 4, 40, 40)
    assert b["ignore"].dtype == torch.bool and tuple(b["ignore"].shape) == (3, 40, 40)
    assert b["semantic"].dtype == torch.uint8 and tuple(b["semantic"].shape) == (3, 40, 40)
    assert b["has_masks"].dtype == torch.bool and b["has_masks"].tolist() == [True] * 3
    assert isinstance(b["boxes"], list) and len(b["boxes"]) == 3
    for k in range(3):
        ann = src.annotations(k)
        assert tuple(b["boxes"][k].shape) == (len(ann.boxes), 4) and b["boxes"][k].dtype == torch.int64
        # nearest resize of the native-size class union, pixel centres: output i ← input floor((i+.5)·96/40)
        idx = ((2 * np.arange(40) + 1) * 96) // 80
        for c in range(4):
            union = ann.instance_masks[ann.box_classes == c].any(axis=0) if (ann.box_classes == c).any() else np.zeros((96, 96), bool)
            np.testing.assert_array_equal(b["masks"][k, c].numpy(), union[idx][:, idx])
        np.testing.assert_array_equal(b["semantic"][k].numpy(), ann.semantic_mask[idx][:, idx])
        # each GT box encloses its resized instance mask up to truncation
        for (x0, y0, x1, y1), m in zip(b["boxes"][k].tolist(), ann.instance_masks):
            ys, xs = np.nonzero(m[idx][:, idx])
            assert x0 <= xs.min() + 1 and y0 <= ys.min() + 1 and x1 >= xs.max() and y1 >= ys.max()


def test_bad_index(src):
    with pytest.raises(IndexError, match="outside"):
        EvalDataset(src, [0, 96], 32)
