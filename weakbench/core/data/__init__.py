"""Data layer: dataset readers, splits, torch datasets and the synthetic default.

Entry points::

    src = open_dataset(None)                       # synthetic COCO-format default (generated, cached)
    src = open_dataset("/data/coco128")            # COCO: annotations/instances.json + images/
    src = open_dataset("metadata/CUB/test", image_root="dataset/CUB")   # wsolevaluation metadata
    splits = load_or_make_splits(src, seed=0, path=split_path(workdir, src, 0))
    train = ClassificationDataset(src, splits["train"], input_size=128, train=True)
    val = EvalDataset(src, splits["val"], input_size=128)       # DataLoader(..., collate_fn=collate_eval)

Conventions (class order, crowd regions, box and mask geometry) are documented in
:mod:`.coco`, :mod:`.wsol` and :mod:`.transforms`.
"""

from weakbench.core.data.check import check_images, resolve_path
from weakbench.core.data.coco import CocoSource, load_coco_json
from weakbench.core.data.datasets import (
    ClassificationDataset, EvalDataset, collate_classification, collate_eval,
)
from weakbench.core.data.open import DEFAULT_CACHE_DIR, open_dataset
from weakbench.core.data.source import Annotations, DatasetSource, ImageRecord, fingerprint_files
from weakbench.core.data.splits import (
    SPLIT_NAMES, Splits, load_or_make_splits, load_splits, make_splits, save_splits, split_path,
)
from weakbench.core.data.synthetic import (
    HARD_SHAPES, SHAPES, SYNTHETIC_VARIANTS, ensure_synthetic, generate_synthetic_coco,
)
from weakbench.core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from weakbench.core.data.wsol import WsolMetadataSource

__all__ = [
    "Annotations", "ClassificationDataset", "CocoSource", "DEFAULT_CACHE_DIR", "DatasetSource", "EvalDataset",
    "HARD_SHAPES", "IMAGENET_MEAN", "IMAGENET_STD", "ImageRecord", "SHAPES", "SYNTHETIC_VARIANTS", "SPLIT_NAMES", "Splits", "WsolMetadataSource",
    "collate_classification", "collate_eval", "ensure_synthetic", "fingerprint_files", "generate_synthetic_coco",
    "load_coco_json", "load_or_make_splits", "load_splits", "make_splits", "open_dataset", "save_splits",
    "split_path", "check_images", "resolve_path",
]
