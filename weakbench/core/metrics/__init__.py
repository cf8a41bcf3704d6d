"""Evaluation metrics: WSOL boxes and PxAP (Choe et al. 2020), classification, semantic
pseudo-masks (mIoU) and instances (COCO AP, mAP^r, ABO).

All WSOL numbers follow DESIGN.md, "Evaluation protocol", count for count with the reference
implementation (clovaai/wsolevaluation); see :mod:`weakbench.core.metrics.wsol`.
"""

from weakbench.core.metrics.classification import average_precision, multilabel_average_precision, top1_accuracy
from weakbench.core.metrics.segmentation import SemanticEvaluator
from weakbench.core.boxes import iou_inclusive
from weakbench.core.metrics.instance import (
    PseudoMaskEvaluator, average_best_overlap, coco_gt_from_source, coco_instance_eval, mask_iou, voc_ap,
    voc_instance_ap,
)
from weakbench.core.metrics.wsol import (
    BoxEvaluator,
    PxAPEvaluator,
    WsolEvaluator,
    box_scores,
    threshold_list,
)

__all__ = [
    "PseudoMaskEvaluator",
    "SemanticEvaluator",
    "coco_gt_from_source",
    "mask_iou",
    "voc_ap",
    "voc_instance_ap",
    "average_best_overlap",
    "average_precision",
    "coco_instance_eval",
    "multilabel_average_precision",
    "top1_accuracy",
    "BoxEvaluator",
    "PxAPEvaluator",
    "WsolEvaluator",
    "box_scores",
    "iou_inclusive",
    "threshold_list",
]
