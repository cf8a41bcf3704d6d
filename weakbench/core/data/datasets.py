"""``torch.utils.data.Dataset`` views of a :class:`~.source.DatasetSource`.

Every image is resized to a square ``S x S`` (``input_size``) with PIL bilinear filtering, with
no crop and *without* keeping the aspect ratio (wsolevaluation evaluates on ``Resize((224,
224))`` the same way), then normalised with the backbone's mean / std (ImageNet statistics by default). ``S x S`` is also the WSOL
evaluation frame: GT boxes are scaled into it with the ``int()`` truncation of
``resize_bbox`` and GT masks are resized with pixel-centre nearest neighbour.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from weakbench.core.data.source import DatasetSource
from weakbench.core.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, hflip_image, image_to_tensor, resize_boxes_wsol, resize_image, resize_masks,
)

__all__ = ["ClassificationDataset", "EvalDataset", "collate_classification", "collate_eval", "EVAL_LIST_FIELDS"]

#: EvalDataset fields of variable length, kept as lists by :func:`collate_eval`.
EVAL_LIST_FIELDS = ("boxes", "box_classes")


def _check_indices(source: DatasetSource, indices: Sequence[int]) -> list[int]:
    idx = [int(i) for i in indices]
    n = len(source.records)
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise IndexError(f"record index {bad[0]} outside [0, {n}) of dataset {source.name!r}")
    return idx


class ClassificationDataset(Dataset):
    """Images and image-level labels for classifier training / validation.

    Args:
        source: the dataset.
        indices: record indices (a split).
        input_size: ``S``, side of the square input in pixels.
        train: when True, a random horizontal flip with probability 0.5, drawn with
            ``torch.rand`` (so ``torch.manual_seed`` and DataLoader worker seeding control it).
        mean, std: per-channel input statistics (0–1 RGB units), the backbone's
            (``Method.input_normalization``); default ImageNet's.

    Item: ``{"image": float32 (3, S, S) normalised with mean/std,
    "labels": float32 (C,) multi-hot in {0, 1}, "index": int64 () record index}``.

    Raises:
        IndexError: an index outside the dataset. Items raise DataError for undecodable images.
    """

    def __init__(self, source: DatasetSource, indices: Sequence[int], input_size: int, train: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.source = source
        self.mean, self.std = tuple(mean), tuple(std)
        self.indices = _check_indices(source, indices)
        self.input_size = int(input_size)
        self.train = bool(train)
        self._labels = source.labels_matrix()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.indices[i]
        img = resize_image(self.source.load_image(idx), self.input_size)
        if self.train and torch.rand(()) < 0.5:
            img = hflip_image(img)
        return {
            "image": image_to_tensor(img, self.mean, self.std),
            "labels": torch.from_numpy(np.array(self._labels[idx], dtype=np.float32)),
            "index": torch.tensor(idx, dtype=torch.int64),
        }


class EvalDataset(Dataset):
    """Images with every localisation label, in the ``S x S`` evaluation frame.

    Args:
        source: the dataset.
        indices: record indices (a split).
        input_size: ``S``, side of the square input and evaluation frame, pixels.
        mean, std: per-channel input statistics (0–1 RGB units); default ImageNet's.

    Item::

        image       float32 (3, S, S)  normalised
        labels      float32 (C,)       multi-hot
        index       int64 ()           record index
        boxes       int64 (K, 4)       GT boxes x0,y0,x1,y1 in the S x S frame,
                                       int(x·S/w) as wsolevaluation's resize_bbox
        box_classes int64 (K,)         class index of each box
        masks       bool (C, S, S)     per-class union of instance masks (zeros without masks)
        ignore      bool (S, S)        pixels excluded from PxAP / mIoU (crowd / ignore regions)
        semantic    uint8 (S, S)       0 background, c+1 class c, 255 ignore (all 255 without masks)
        has_masks   bool ()            whether masks / semantic are real

    Memory: ``masks`` is C·S² bytes per item with masks (80 classes at 224 px: 4 MB); without
    masks it is an all-False ``expand``ed view of no memory (read-only: do not write into it).
    """

    def __init__(self, source: DatasetSource, indices: Sequence[int], input_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.source = source
        self.mean, self.std = tuple(mean), tuple(std)
        self.indices = _check_indices(source, indices)
        self.input_size = int(input_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = self.indices[i]
        rec = self.source.records[idx]
        s = self.input_size
        c = self.source.num_classes
        img = resize_image(self.source.load_image(idx), s)
        ann = self.source.annotations(idx)
        gt_boxes, _ = self.source.gt_boxes(idx)  # float64: exact x + w before int() truncation
        boxes = resize_boxes_wsol(gt_boxes, (rec.width, rec.height), (s, s))
        if ann.instance_masks is None:  # an all-False view: no C·S² bytes (1000 classes at 224 px: 50 MB)
            masks = torch.zeros((), dtype=torch.bool).expand(c, s, s)
        else:
            masks = torch.zeros((c, s, s), dtype=torch.bool)
        if ann.instance_masks is not None and len(ann.instance_masks):
            present = np.unique(ann.box_classes)
            unions = np.stack([ann.instance_masks[ann.box_classes == k].any(axis=0) for k in present])
            masks[torch.from_numpy(present)] = resize_masks(unions, s)
        ignore = (resize_masks(ann.ignore_mask, s) if ann.ignore_mask is not None
                  else torch.zeros((s, s), dtype=torch.bool))
        semantic = (resize_masks(ann.semantic_mask, s) if ann.semantic_mask is not None
                    else torch.full((s, s), 255, dtype=torch.uint8))
        return {
            "image": image_to_tensor(img, self.mean, self.std),
            "labels": torch.from_numpy(ann.labels.astype(np.float32)),
            "index": torch.tensor(idx, dtype=torch.int64),
            "boxes": torch.from_numpy(boxes),
            "box_classes": torch.from_numpy(ann.box_classes.astype(np.int64)),
            "masks": masks,
            "ignore": ignore,
            "semantic": semantic,
            "has_masks": torch.tensor(ann.instance_masks is not None),
        }


def collate_classification(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ClassificationDataset items: image (B, 3, S, S), labels (B, C), index (B,)."""
    return default_collate(batch)


def collate_eval(batch: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack EvalDataset items; ``boxes`` and ``box_classes`` stay lists of B tensors
    ((K_i, 4) and (K_i,)); every other field is stacked along a new first dimension
    (``has_masks`` becomes bool (B,)). When no item has masks, ``masks`` is an all-False
    ``expand``ed (B, C, S, S) view of no memory (box-only data with 1000 classes)."""
    out: dict[str, Any] = {k: [item[k] for item in batch] for k in EVAL_LIST_FIELDS}
    no_masks = "has_masks" in batch[0] and not any(bool(item["has_masks"]) for item in batch)
    for k in batch[0]:
        if k == "masks" and no_masks:
            out[k] = torch.zeros((), dtype=torch.bool).expand(len(batch), *batch[0][k].shape)
        elif k not in EVAL_LIST_FIELDS:
            out[k] = torch.stack([item[k] for item in batch])
    return out
