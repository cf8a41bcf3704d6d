"""Evaluate a trained classifier → CAM model on one split.

WSOL samples are (image, present class) pairs (DESIGN.md, multi-label images); the map of the
ground-truth class ("GT-known") is resized to the evaluation frame (the input size ``S``) and
min-max normalised (wsolevaluation: resize, then ``normalize_scoremap``); GT boxes are scaled
into the frame with ``int()`` truncation by the data layer. Metrics, all in percent:

* ``max_box_acc`` (δ = 0.5, largest contour), ``max_box_acc_v2`` (mean over δ ∈ {0.3, 0.5, 0.7},
  all contours) with its per-δ values and best thresholds, ``top1_loc`` / ``top5_loc`` —
  :class:`weakbench.core.metrics.WsolEvaluator`;
* ``pxap`` over per-class GT masks with crowd regions ignored (when the data has masks);
* ``miou`` of semantic pseudo-masks with the background threshold swept
  (:class:`~weakbench.core.metrics.SemanticEvaluator`), and its best threshold;
* ``cls_map`` (multi-label mAP) or ``cls_acc`` (single-label top-1 accuracy).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from weakbench.methods.base import Method, normalize_maps, resize_maps
from weakbench.core.accel import autocast
from weakbench.core.loading import make_loader
from weakbench.core.overlay import cam_overlay, denormalize


@torch.no_grad()
def evaluate_split(
    method: Method,
    model: torch.nn.Module,
    source,
    indices: list[int],
    *,
    input_size: int,
    device: torch.device,
    cam_curve_interval: float = 0.01,
    batch_size: int = 16,
    max_images: int | None = None,
    num_overlays: int = 0,
    extra_batches: int = 0,
    progress: Callable[[int, int], None] | None = None,
    loader_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float], list[tuple[str, Image.Image]], dict[str, Any]]:
    """Run the model over ``indices`` of ``source`` and compute the split's metrics.

    Args:
        method: the method (its ``cams_and_scores`` gives raw CAMs and logits).
        model: the bare (not DDP-wrapped) model; put in eval mode here.
        source: a ``weakbench.core.data.DatasetSource``.
        indices: record indices of the split.
        input_size: S, the input side and the WSOL evaluation frame (pixels).
        cam_curve_interval: threshold step of the CAM curve (0.01 or 0.001).
        max_images: evaluate only the first ``max_images`` indices (None: all).
        num_overlays: how many (image, class) overlay pictures to return.
        extra_batches: how many batches to keep for ``method.extra_metrics``.
        progress: called after each batch with ``(images done, images in all)`` (a progress bar).
        loader_workers: ``DataLoader`` worker processes decoding the images (0: in this process);
            on a CUDA ``device`` batches are pinned and copied ``non_blocking``. Results do not
            depend on it (evaluation draws nothing at random).
        autocast_dtype: run the model's forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` on a GPU); maps and logits are cast to float32 before any metric.

    Returns:
        ``(metrics, overlays, details)``: metrics in percent keyed by bare name
        (``max_box_acc_v2``…), overlays as ``(file name, PIL image)``, details with curves and
        best thresholds, and ``details["per_image"]``: the split's per-image table
        (:mod:`weakbench.core.metrics.per_image`, split name left empty for the caller), from
        which the box metrics, top-1/top-5 loc and PxAP are recomputed exactly on any resample.
    """
    from weakbench.core.data import EvalDataset, collate_eval
    from weakbench.core.metrics import (
        PxAPEvaluator,
        WsolEvaluator,
        SemanticEvaluator,
        multilabel_average_precision,
        top1_accuracy,
    )

    model.eval()
    if max_images is not None:
        indices = list(indices)[:max_images]
    mean, std = method.input_normalization
    dataset = EvalDataset(source, indices, input_size, mean=mean, std=std)
    loader = make_loader(dataset, workers=loader_workers, device=device, batch_size=batch_size, collate_fn=collate_eval,
                         persistent=False)
    box_eval = WsolEvaluator(cam_curve_interval=cam_curve_interval, device=device)
    pxap_eval = PxAPEvaluator(cam_curve_interval=cam_curve_interval)
    sem_eval = SemanticEvaluator(source.num_classes)
    sem_entries: dict[str, tuple] = {}  # image id -> its semantic confusion counts
    any_masks = False
    all_scores, all_labels = [], []
    overlays: list[tuple[str, Image.Image]] = []
    kept_batches: list[dict[str, Any]] = []
    class_names = source.class_names

    sample_images: list[str] = []  # per (image, class) sample, in the evaluators' order
    sample_classes: list[int] = []
    sample_pos: dict[int, tuple] = {}  # sample position -> its PxAP histograms
    batch_images: list[str] = []  # every image, in loader order (the per-image "image" rows)
    done = 0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"]
        if progress is not None:
            progress(done, len(dataset))
        done += len(images)
        with autocast(device, autocast_dtype):
            cams, logits = method.cams_and_scores(model, images)
        cams = cams.float()
        all_scores.append(logits.float().cpu())
        all_labels.append(labels)
        batch_images += [str(source.records[int(i)].image_id) for i in batch["index"].tolist()]
        b, c = cams.shape[:2]
        pair_img, pair_cls = torch.nonzero(labels > 0.5, as_tuple=True)
        if bool(batch["has_masks"].any()):
            # every class's map in the frame, normalised per (image, class), for the semantic masks
            frame = normalize_maps(resize_maps(cams.reshape(b * c, *cams.shape[2:]), input_size)).reshape(b, c, input_size, input_size).cpu()
            first_sem = len(sem_eval.per_image)
            sem_eval.accumulate(frame, labels, batch["semantic"])
            for j, entry in enumerate(sem_eval.per_image[first_sem:]):
                sem_entries[batch_images[len(batch_images) - b + j]] = entry
            maps = frame[pair_img, pair_cls]
        else:
            # box-only data: the semantic masks are all ignore (255), so only the present
            # classes' maps are needed (1000 classes at 224 px would be 3 GB a batch)
            maps = normalize_maps(resize_maps(cams[pair_img.to(cams.device), pair_cls.to(cams.device)], input_size)).cpu()
        if len(pair_img) == 0:
            continue
        gt_boxes = []
        for i, cls in zip(pair_img.tolist(), pair_cls.tolist()):
            boxes, box_classes = batch["boxes"][i], batch["box_classes"][i]
            gt_boxes.append(boxes[box_classes == cls].numpy())
        top5 = logits.float().cpu().topk(min(5, c), dim=1).indices
        top1_ok = (top5[pair_img, 0] == pair_cls).numpy()
        top5_ok = (top5[pair_img] == pair_cls[:, None]).any(dim=1).numpy()
        box_eval.accumulate(maps.numpy(), gt_boxes, class_correct_top1=top1_ok, class_correct_top5=top5_ok)
        first = len(sample_images)
        sample_images += [str(source.records[int(batch["index"][i])].image_id) for i in pair_img.tolist()]
        sample_classes += pair_cls.tolist()
        has_masks = batch["has_masks"][pair_img]
        if bool(has_masks.any()):
            any_masks = True
            sel = has_masks.nonzero(as_tuple=True)[0]
            pi, pc = pair_img[sel], pair_cls[sel]
            pxap_eval.accumulate(maps[sel].numpy(), batch["masks"][pi, pc].numpy(), batch["ignore"][pi].numpy())
            k = len(sel)
            for j, s in enumerate(sel.tolist()):
                sample_pos[first + s] = (pxap_eval.sample_pos[-k + j], pxap_eval.sample_neg[-k + j])
        if len(overlays) < num_overlays:
            for k in range(len(pair_img)):
                if len(overlays) >= num_overlays:
                    break
                i, cls = int(pair_img[k]), int(pair_cls[k])
                img = denormalize(batch["image"][i].numpy(), mean, std)
                idx = int(batch["index"][i])
                name = f"{idx:05d}_{class_names[cls]}.png".replace("/", "_").replace(" ", "_")
                overlays.append((name, cam_overlay(img, maps[k].numpy(), gt_boxes=gt_boxes[k].tolist(), title=class_names[cls])))
        if len(kept_batches) < extra_batches:
            kept_batches.append({k: batch[k] for k in ("image", "labels", "index", "masks", "ignore", "has_masks")})

    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if box_eval.v1.cnt:
        box = box_eval.compute()
        metrics.update({k: float(v) for k, v in box.items()})
        details["box"] = box
        details["per_image"] = _per_image_table(box_eval, sample_images, sample_classes, sample_pos)
    if any_masks:
        px = pxap_eval.compute()
        metrics["pxap"] = float(px["pxap"])
        sem = sem_eval.compute()
        metrics["miou"] = float(sem["miou"])
        metrics["best_bg_threshold"] = float(sem["best_bg_threshold"])
        details["semantic"] = sem
    scores = torch.cat(all_scores) if all_scores else torch.zeros(0, source.num_classes)
    labels_all = torch.cat(all_labels) if all_labels else torch.zeros(0, source.num_classes)
    if batch_images and (sem_entries or source.multilabel):
        # per-image rows behind miou (each image's confusion counts) and cls_map (its scores)
        from weakbench.core.metrics.per_image import image_rows, merge_tables

        ths = sem_eval.thresholds
        sem = [(ths, *sem_entries[im]) if im in sem_entries else None for im in batch_images] if sem_entries else None
        rows = image_rows("", batch_images, sem=sem,
                          cls_scores=scores.numpy() if source.multilabel else None,
                          cls_labels=labels_all.numpy() if source.multilabel else None)
        details["per_image"] = merge_tables([t for t in (details.get("per_image"), rows) if t is not None])
    if len(scores):
        if source.multilabel:
            metrics["cls_map"] = float(multilabel_average_precision(scores.numpy(), labels_all.numpy()))
        else:
            metrics["cls_acc"] = float(top1_accuracy(scores.numpy(), labels_all.numpy()))
            metrics["cls_chance"] = 100.0 / source.num_classes  # the board's check against chance
    metrics["num_images"] = float(len(dataset))
    if progress is not None:
        progress(len(dataset), len(dataset))
    if extra_batches and kept_batches:
        # method metrics may need input gradients (Top-GAP's ERF distance, PGD robust accuracy)
        with torch.enable_grad():
            for k, v in method.extra_metrics(model, kept_batches, device).items():
                metrics[k] = float(v)
    return metrics, overlays, details


def _per_image_table(box_eval, images: list[str], classes: list[int], hists: dict[int, tuple]):
    """The split's per-image table (:mod:`weakbench.core.metrics.per_image`) from the
    evaluators' per-sample records, in the same sample order."""
    import numpy as np

    from weakbench.core.metrics.per_image import build_table

    v1, v2 = box_eval.v1, box_eval.v2
    bits = {"box_iou50": np.concatenate(v1.sample_bits[50])}
    for d in (30, 50, 70):
        if d in v2.sample_bits and v2.sample_bits[d]:
            bits[f"box_v2_iou{d}"] = np.concatenate(v2.sample_bits[d])
    top1 = np.concatenate(v1.sample_top1) if v1.sample_top1 else None
    top5 = np.concatenate(v1.sample_top5) if v1.sample_top5 else None
    pos = neg = None
    if hists:
        pos = [hists[i][0] if i in hists else None for i in range(len(images))]
        neg = [hists[i][1] if i in hists else None for i in range(len(images))]
    return build_table("", v1.thresholds, images, classes, bits, top1, top5, pos, neg)
