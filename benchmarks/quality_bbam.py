"""BBAM quality benchmark: what the attribution adds over the box and over the box-prior CRF.

Runs BBAM's own stage hooks in one process (no Ray, no MLflow), per detector seed:

1. **detector**: the method's ``DetectorFit`` task (its model, optimiser, dataset and losses),
   ``--epochs`` epochs at batch ``--batch-size`` on the train split, shuffled by the seed
   (the task's linear lr warm-up, then constant, as the engine runs this task); its COCO box AP50
   on test (``detection_metrics``), and per test box whether the detector finds it (a detection
   of its class with score ≥ 0.5 and IoU ≥ 0.5) and, while O⁺ is selected, the best truncated IoU
   of a regressed proposal whose arg-max is the GT class (why an O⁺ is empty);
2. **attribute**, once per attribution configuration (the ablations below), on the val and test
   images (the first ``--images`` of each split with a GT box): ``BBAM._attribute``;
   the λ grid (``base``, ``lambda_0.002``, ``lambda_0.02``) on val and test, the other ablations
   on test only; ``it300`` runs 300 iterations and also keeps every mask after iteration 60
   (``it300@60``), which is the 60-iteration run (Adam has no schedule; the first 60 steps do not
   depend on the count: ``it300@60`` equal to ``base`` checks the run);
3. **pseudo_masks**: ``BBAM._pseudo_masks`` with the CRF on and off, for each θ_fg of
   ``--thetas``;
4. per GT box, the mask IoU with its GT instance mask (``mask_iou``, the quantity
   ``PseudoMaskEvaluator.instance_miou`` averages), for BBAM and for the two baselines:
   ``box_filled`` (the box) and ``box_crf`` (the dense CRF from the box prior alone: BBAM's own
   fallback, which every box with an empty O⁺ receives).

``--select-epochs 10,20,30,40`` chooses the detector's training budget on val, per seed: the
detector trains to the largest count and, after each listed epoch, its val box AP50 (every val
image with a GT box) and its val O⁺ share (the boxes of the attributed val images with a non-empty
O⁺; the O⁺ rule does not depend on the iteration count, so one iteration is run) are measured and
its weights copied; the epoch with the largest val O⁺ share (then val AP50, then fewer epochs) is
kept for steps 2–4 and the test AP50. The probe restores torch's RNG state, and the warm-up (one
epoch) and the constant lr after it do not depend on the total count, so the copy after epoch E is
the detector ``--epochs E`` trains. Nothing is chosen on test.

``--detector-splits train,val,test`` trains the detector on the GT boxes of every split (the
boxes are the weak supervision, given for every image; the GT masks are only scored): the
paper's setting, where the detector explains boxes it was trained on (its pseudo masks are made
for its training images). The default trains on the train split only (held-out images).

Selection: for BBAM + CRF and BBAM without CRF separately, the (λ, θ_fg) of the λ grid
(``base``, ``lambda_0.002``, ``lambda_0.02``) × ``--thetas`` with the best val instance mIoU
(mean over seeds) is reported on test. The ablations are reported on test at θ_fg = 0.85 (the
code's), CRF on and off, against ``base``:

* ``fixed_stride``: s = 16 for every box (s1 = 0: the code's s0 without the area term) against the
  adaptive s(a) = 16 + 48·√a (both scaled by input size / 800 as the method does);
* λ (``mask_l1_weight``) 0.002 / 0.007 (base) / 0.02;
* ``it300``: 300 iterations against 60 (base);
* ``box_only`` / ``cls_only``: 𝟙_cls = 0 / 𝟙_box = 0 of Eq. 3.

Intervals: 95 % percentile intervals of a two-stage bootstrap (as ``weakbench.platform.verdicts``):
each resample draws the test images with replacement (multinomial counts, shared by all rows, so
differences are paired image by image) and the seeds with replacement (shared by all rows: each
seed's detector is common to every row), and recomputes the metric as the mean over drawn seeds of
(Σ IoU over the drawn images' boxes) / (number of those boxes). Differences use the same draws.

Commands (the README's tables):

* ``python benchmarks/quality_bbam.py --data synthetic:hard --seeds S --images 6 --select-epochs
  10,20,30,40 --out hard_seedS.json`` for S = 0, 1, 2, then ``--report
  hard_seed0.json,hard_seed1.json,hard_seed2.json`` (the README's ``synthetic:hard`` table)
* ``python benchmarks/quality_bbam.py --data ../shared/data/coco128 --classes person --backbone
  tf_efficientnet_lite0 --pretrained --input-size 320 ... --out bbam_person.json``

``--report FILE.json`` prints the tables again from a saved run without computing anything;
``--report s0.json,s1.json,s2.json`` merges runs of one command on different ``--seeds`` (run side
by side; the baselines are taken once) and prints the tables of the merged run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

#: attribution configurations (overrides of the base parameters)
CONFIGS: dict[str, dict] = {
    "it300": {"mask_iterations": 300},  # also gives "it300@60", its masks after iteration 60
    "lambda_0.002": {"mask_l1_weight": 0.002},
    "lambda_0.02": {"mask_l1_weight": 0.02},
    "fixed_stride": {"stride_s0": 16.0, "stride_s1": 0.0},
    "box_only": {"indicator_cls": False},
    "cls_only": {"indicator_box": False},
}
LAMBDA_GRID = ("base", "lambda_0.002", "lambda_0.02")
BASE_ITERATIONS = 60


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_detector(method, source, train_idx, epochs: int, seed: int, on_epoch=None):
    """The task's detector trained ``epochs`` epochs; ``on_epoch(epoch, det)`` (optional) runs after
    each epoch (1-based) with the torch RNG state restored after it, so a probe does not change
    the training that follows (the loader shuffles with its own generator)."""
    from weakbench.methods.bbam import DetectorFit

    torch.manual_seed(seed)
    task = DetectorFit(method, "faster_rcnn")
    det = task.build_model()
    opt = task.configure_optimizers(det)
    loader = torch.utils.data.DataLoader(task.train_dataset(source, train_idx), batch_size=task.batch_size,
                                         shuffle=True, collate_fn=task.collate,
                                         generator=torch.Generator().manual_seed(seed))
    # the task's own warm-up (as the engine: built on the optimisers, stepped after every step)
    scheds = task.configure_schedulers(opt, epochs * max(1, len(loader)))
    det.train()
    losses = []
    for epoch in range(epochs):
        for batch in loader:
            losses.append(task.training_step(det, batch, opt, None)["loss"])
            for sch in scheds.values():
                sch.step()
            if not np.isfinite(losses[-1]):
                _log(f"seed {seed}: detector loss {losses[-1]} in epoch {epoch + 1}, step {len(losses)}: diverged")
                det.eval()
                return det, losses
        if on_epoch is not None:
            state = torch.get_rng_state()
            det.eval()
            on_epoch(epoch + 1, det)
            det.train()
            torch.set_rng_state(state)
    det.eval()
    return det, losses


def attribute(method, keys, ctx, chunk: int, snapshot_at: int | None = None):
    """``BBAM._attribute`` over ``keys`` in chunks; with ``snapshot_at`` also the table of the masks
    after that iteration (the optimiser's own tensors, copied)."""
    from weakbench.methods import bbam_ops as ops

    table, table_snap = {}, {}
    original = ops.optimise_box_masks
    for s in range(0, len(keys), chunk):
        part = keys[s:s + chunk]
        snaps: dict[int, torch.Tensor] = {}
        if snapshot_at is not None:
            def hook(iteration, job_indices, masks):
                if iteration == snapshot_at:
                    for i, m in zip(job_indices, masks):
                        snaps[i] = m.detach().to("cpu", torch.float32).clone()
            ops.optimise_box_masks = functools.partial(original, on_iteration=hook)
        try:
            out = method._attribute(part, ctx)
        finally:
            ops.optimise_box_masks = original
        table.update(out)
        if snapshot_at is not None:
            snap = copy.deepcopy(out)
            j = 0
            for key in part:
                for k, m in enumerate(out[key]["masks"]):
                    if j in snaps:
                        snap[key]["masks"][k] = snaps[j].to(torch.float16)
                    j += 1
            table_snap.update(snap)
    return table, table_snap


def detector_finds(det, source, keys) -> dict[str, list[dict]]:
    """Per key, per GT box: the best IoU (float, original pixels) of the detector's own
    detections of the box's class with score ≥ 0.5, and that detection's score (0, 0 if none):
    whether the detector *finds* the box, to read the O⁺ share against."""
    from torchvision.ops import box_iou

    from weakbench.methods.bbam import _image_tensor

    out = {}
    det.eval()
    with torch.no_grad():
        for key in keys:
            index = int(key.split(":")[1])
            o = det([_image_tensor(source.load_image(index))])[0]
            boxes, classes = source.gt_boxes(index)
            gt = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
            keep = o["scores"] >= 0.5
            iou = box_iou(gt, o["boxes"][keep]) if keep.any() else torch.zeros((len(gt), 0))
            rows = []
            for k, c in enumerate(classes):
                same = (o["labels"][keep] == int(c) + 1)
                v = torch.where(same, iou[k], torch.zeros_like(iou[k])) if iou.shape[1] else iou[k]
                j = int(v.argmax()) if v.numel() else -1
                rows.append({"iou": float(v[j]) if j >= 0 else 0.0,
                             "score": float(o["scores"][keep][j]) if j >= 0 and v[j] > 0 else 0.0})
            out[key] = rows
    return out


class PositiveProbe:
    """Wraps ``bbam_ops.select_positive_proposals`` (which ``make_box_jobs`` calls once per GT box,
    in order) and records, per box, the share of its jittered proposals whose arg-max class is the
    GT class and the best truncated IoU of their regressed boxes with the GT box: why an O⁺ is
    empty (the rule wants both, IoU > 0.8 at least)."""

    def __init__(self):
        from weakbench.methods import bbam_ops as ops

        self.ops, self.original, self.records = ops, ops.select_positive_proposals, []

    def __enter__(self):
        ops = self.ops

        def probe(proposals, class_probs, box_regression, gt_box, cls, *, box_coder, **kw):
            n, ncls = class_probs.shape
            with torch.no_grad():
                dec = box_coder.decode(box_regression.detach(), [proposals.detach().to(box_regression.dtype)])
                dec = dec.reshape(n, ncls, 4)[:, int(cls) + 1]
                hit = class_probs.detach().argmax(1) == int(cls) + 1
                iou = ops.truncated_iou(torch.as_tensor(gt_box, dtype=torch.float64), dec)
            self.records.append({"argmax_share": float(hit.double().mean()),
                                 "best_iou": float(iou[hit].max()) if hit.any() else 0.0,
                                 "best_iou_any": float(iou.max()) if n else 0.0})
            return self.original(proposals, class_probs, box_regression, gt_box, cls, box_coder=box_coder, **kw)

        ops.select_positive_proposals = probe
        return self

    def __exit__(self, *exc):
        self.ops.select_positive_proposals = self.original


def box_ious(source, key, masks) -> list[float]:
    from weakbench.core.metrics.instance import mask_iou

    a = source.annotations(int(key.split(":")[1]))
    return [float(mask_iou(np.asarray(m, bool), a.instance_masks[k])) for k, m in enumerate(masks)]


def run(args) -> dict:
    from weakbench.methods import build_method
    from weakbench.methods import bbam_ops as ops
    from weakbench.methods.bbam import _unrle, detection_metrics
    from weakbench.core.data import make_splits, open_dataset

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="quality_bbam_"))
    kw = {"classes": args.classes} if args.classes else {}
    source = open_dataset(args.data, cache_dir=args.cache_dir or tmp / "cache", **kw)
    splits = make_splits(source, 0)
    has_box = lambda i: len(source.gt_boxes(int(i))[0]) > 0  # noqa: E731
    idx = {s: [int(i) for i in splits[s] if has_box(i)] for s in ("train", "val", "test")}
    idx_all = {s: list(v) for s, v in idx.items()}  # the detector's boxes (--detector-splits) are not capped
    for s in ("val", "test"):
        idx[s] = idx[s][: args.images] if args.images else idx[s]
    if args.no_val:  # one configuration, nothing to choose: test only
        idx["val"] = []
    keys = [f"{s}:{i}" for s in ("val", "test") for i in idx[s]]
    params = {"backbone": args.backbone, "pretrained": args.pretrained, "input_size": args.input_size,
              "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "fpn_channels": args.fpn_channels,
              "box_head_size": args.box_head_size, "num_proposals": args.num_proposals,
              "mask_iterations": BASE_ITERATIONS, "attribution_splits": ["val", "test"],
              **({"warmup_iters": args.warmup_iters} if args.warmup_iters is not None else {})}
    configs = [c for c in args.configs.split(",") if c]
    thetas = [float(t) for t in args.thetas.split(",")]
    n_boxes = {s: sum(len(source.gt_boxes(i)[0]) for i in idx[s]) for s in ("val", "test")}
    _log(f"{source.name}: train {len(idx['train'])} images, val {len(idx['val'])} ({n_boxes['val']} boxes), "
         f"test {len(idx['test'])} ({n_boxes['test']} boxes); {params}; configs {configs}; θ_fg {thetas}")
    result: dict = {"dataset": source.name, "params": params, "detector_splits": args.detector_splits, "configs": configs, "thetas": thetas,
                    "images": {s: idx[s] for s in ("val", "test")}, "seeds": args.seeds,
                    "select_epochs": list(getattr(args, "select_epochs", [])), "boxes": [], "times": {},
                    "detector": {}}
    ctx = types.SimpleNamespace(source=source, device=torch.device("cpu"), splits=idx, num_overlays=0,
                                stage=types.SimpleNamespace(split="val"), inputs={})

    # baselines: independent of the seed and the attribution
    t0 = time.perf_counter()
    for key in keys:
        index = int(key.split(":")[1])
        rec = source.records[index]
        boxes, _ = source.gt_boxes(index)
        image = np.asarray(source.load_image(index), dtype=np.uint8)
        filled = [ops.box_filled_mask(b, rec.height, rec.width) for b in boxes]
        crf = ops.ImageCRF(image)
        zero = np.zeros((rec.height, rec.width), np.float32)
        prior = [ops.pseudo_mask_from_attribution(zero, b, stride_scale=max(rec.height, rec.width) / 500.0,
                                                  use_crf=True, crf=crf)[0] for b in boxes]
        for name, masks in (("box_filled", filled), ("box_crf", prior)):
            for k, iou in enumerate(box_ious(source, key, masks)):
                result["boxes"].append({"row": name, "key": key, "box": k, "iou": iou})
    result["times"]["baselines_s"] = time.perf_counter() - t0
    _log(f"baselines {result['times']['baselines_s']:.0f} s")

    for seed in args.seeds:
        base = build_method("bbam", {**params, "seed": seed}, num_classes=source.num_classes,
                            multilabel=source.multilabel)
        t0 = time.perf_counter()
        det_idx = sorted({i for sp in args.detector_splits.split(",") for i in idx_all[sp]})
        probe_rows: list[dict] = []
        snaps: dict[int, dict] = {}
        probe_s = [0.0]

        def on_epoch(epoch, det, seed=seed, probe_rows=probe_rows, snaps=snaps, probe_s=probe_s, t0=t0):
            if epoch not in result["select_epochs"]:
                return
            t1 = time.perf_counter()
            # val box AP50 on every val image with a box; the O+ share on the attributed val images
            ap_v = detection_metrics(det, source, idx_all["val"], torch.device("cpu"), masks=False).get("bbox_ap50")
            pm = build_method("bbam", {**params, "mask_iterations": 1, "seed": seed},
                              num_classes=source.num_classes, multilabel=source.multilabel)
            ctx.load_model = lambda name, det=det: det
            val_keys = [k for k in keys if k.startswith("val:")]
            tab, _ = attribute(pm, val_keys, ctx, args.chunk)  # O+ does not depend on the iterations
            pos = [p for k in val_keys for p in tab[k]["positives"]]
            snaps[epoch] = copy.deepcopy(det.state_dict())
            probe_s[0] += time.perf_counter() - t1
            probe_rows.append({"epochs": epoch, "val_bbox_ap50": ap_v, "val_boxes": len(pos),
                               "val_positive_share": 100.0 * sum(p > 0 for p in pos) / max(len(pos), 1),
                               "train_s": time.perf_counter() - t0 - probe_s[0]})
            _log(f"seed {seed}: epoch {epoch}: val box AP50 {ap_v:.1f}, val O+ non-empty "
                 f"{sum(p > 0 for p in pos)}/{len(pos)} ({time.perf_counter() - t1:.0f} s)")

        det, losses = train_detector(base, source, det_idx, args.epochs, seed,
                                     on_epoch if result["select_epochs"] else None)
        t_det = time.perf_counter() - t0 - probe_s[0]
        chosen_epochs = args.epochs
        if probe_rows:  # the most val boxes with a non-empty O+, then the val box AP50, then fewer epochs
            best = max(probe_rows, key=lambda r: (r["val_positive_share"], r["val_bbox_ap50"], -r["epochs"]))
            chosen_epochs = best["epochs"]
            det.load_state_dict(snaps[chosen_epochs])
            det.eval()
            _log(f"seed {seed}: {chosen_epochs} epochs chosen on val")
        ap = detection_metrics(det, source, idx["test"], torch.device("cpu"), masks=False)
        result["detector"][str(seed)] = {"train_s": t_det, "loss_first": losses[0] if losses else None,
                                         "loss_last": float(np.mean(losses[-5:])) if losses else None,
                                         "test_bbox_ap50": ap.get("bbox_ap50"), "test_bbox_ap": ap.get("bbox_ap"),
                                         "epochs": chosen_epochs, "epoch_probe": probe_rows, "probe_s": probe_s[0]}
        _log(f"seed {seed}: detector {t_det:.0f} s, loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, "
             f"test box AP50 {ap.get('bbox_ap50')}")
        if not np.isfinite(losses[-1]):  # a diverged detector: no attribution is measured for it
            result["detector"][str(seed)]["diverged"] = True
            continue
        found = detector_finds(det, source, [k for k in keys if k.startswith("test:")])
        result.setdefault("found", {})[str(seed)] = found
        n_found = sum(r["iou"] >= 0.5 for rows in found.values() for r in rows)
        _log(f"seed {seed}: detector finds {n_found}/{sum(len(r) for r in found.values())} test boxes "
             f"(IoU >= 0.5, score >= 0.5)")
        ctx.load_model = lambda name, det=det: det
        for cfg in configs:
            over = CONFIGS.get(cfg, {})
            # the λ grid is chosen on val: only it is attributed on val and test, the rest on test
            cfg_keys = keys if cfg in LAMBDA_GRID else [k for k in keys if k.startswith("test:")]
            m = build_method("bbam", {**params, **over, "seed": seed}, num_classes=source.num_classes,
                             multilabel=source.multilabel)
            t0 = time.perf_counter()
            with PositiveProbe() as probe:
                table, snap = attribute(m, cfg_keys, ctx, args.chunk, BASE_ITERATIONS if cfg == "it300" else None)
            t_att = time.perf_counter() - t0
            if cfg == "base":  # make_box_jobs' order: keys in order, boxes in order
                nb = [len(source.gt_boxes(int(k.split(":")[1]))[0]) for k in cfg_keys]
                starts = np.cumsum([0] + nb)
                result.setdefault("probe", {})[str(seed)] = {
                    k: probe.records[starts[i]:starts[i + 1]] for i, k in enumerate(cfg_keys)}
            result["times"][f"attribute_{cfg}_seed{seed}_s"] = t_att
            tables = {cfg: table}
            if cfg == "it300":
                tables["it300@60"] = snap
            for name, tab in tables.items():
                t0 = time.perf_counter()
                ths = thetas if name in LAMBDA_GRID else [ops.THETA_FG]
                for use_crf in (True, False):
                    for theta in ths:
                        pm = build_method("bbam", {**params, **CONFIGS.get(name, {}), "seed": seed, "use_crf": use_crf,
                                                   "theta_fg": theta}, num_classes=source.num_classes,
                                          multilabel=source.multilabel)
                        path = tmp / f"att-{seed}-{name}-{use_crf}-{theta}"
                        path.mkdir()
                        torch.save(tab, path / "attributions.pt")
                        ctx.inputs = {"attribute": path}
                        masks = pm._pseudo_masks(cfg_keys, ctx)
                        row = f"bbam{'_crf' if use_crf else ''}"
                        for key in cfg_keys:
                            fg = [_unrle(r) for r in masks[key]["fg"]]
                            for k, iou in enumerate(box_ious(source, key, fg)):
                                result["boxes"].append({"row": row, "config": name, "theta": theta, "seed": seed,
                                                        "key": key, "box": k, "iou": iou,
                                                        "positives": tab[key]["positives"][k]})
                result["times"][f"pseudo_{name}_seed{seed}_s"] = time.perf_counter() - t0
            pos = [p for k in cfg_keys if k.startswith("test:") for p in table[k]["positives"]]
            if args.out:  # after every configuration, so a cut run keeps what it measured
                Path(args.out).write_text(json.dumps(result))
            _log(f"seed {seed} {cfg}: attribute {t_att:.0f} s ({t_att / max(len(keys), 1):.1f} s/image), "
                 f"test O+ non-empty {sum(p > 0 for p in pos)}/{len(pos)}")
    return result


# ------------------------------------------------------------------------------ report
def merge(results: list[dict]) -> dict:
    """One result from runs of the same command on different ``--seeds`` (run in parallel): the
    seed-independent rows (``box_filled``, ``box_crf``) from the first, every seed's rows, detector,
    probe and times. Raises ``ValueError`` naming the field when the runs' settings differ or a
    seed repeats."""
    first = results[0]
    if len(results) == 1:
        return first
    for r in results[1:]:
        for field in ("dataset", "params", "detector_splits", "configs", "thetas", "images", "select_epochs"):
            if r.get(field) != first.get(field):
                raise ValueError(f"runs differ in {field!r}: {r.get(field)!r} against {first.get(field)!r}; "
                                 "merge only runs of one command that differ in --seeds")
    seeds = [s for r in results for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat across the runs: {seeds}; merge runs of different --seeds")
    out = {**first, "seeds": seeds, "boxes": [b for b in first["boxes"] if "seed" not in b],
           "times": {}, "detector": {}, "found": {}, "probe": {}}
    for r in results:
        out["boxes"] += [b for b in r["boxes"] if "seed" in b]
        for field in ("detector", "found", "probe"):
            out[field].update(r.get(field, {}))
        out["times"].update({k if "seed" in k else f"{k}_seeds{'+'.join(map(str, r['seeds']))}": v
                             for k, v in r["times"].items()})
    return out


class Boot:
    """Two-stage bootstrap over the test images and the seeds (shared draws: paired rows)."""

    def __init__(self, images: list[str], seeds: list[int], n_boot: int, rng_seed: int = 0):
        rng = np.random.default_rng(rng_seed)
        self.images, self.seeds = images, seeds
        self.pos = {k: i for i, k in enumerate(images)}
        draws = rng.integers(0, len(images), size=(n_boot, len(images)))
        self.counts = np.zeros((n_boot, len(images)))
        np.add.at(self.counts, (np.repeat(np.arange(n_boot), len(images)), draws.ravel()), 1.0)
        self.seed_draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))

    def value(self, recs_by_seed: dict[int, list[dict]], field: str = "iou") -> tuple[float, np.ndarray]:
        """``(estimate, resampled values (B,))``: mean over seeds of Σ field / number of boxes."""
        sums = np.zeros((len(self.seeds), len(self.images)))
        cnts = np.zeros_like(sums)
        for si, s in enumerate(self.seeds):
            for r in recs_by_seed.get(s, []):
                i = self.pos[r["key"]]
                sums[si, i] += float(r[field])
                cnts[si, i] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            est = float(np.nanmean(sums.sum(1) / cnts.sum(1)))
            per = (self.counts @ sums.T) / (self.counts @ cnts.T)  # (B, S)
            boot = per[np.arange(len(per))[:, None], self.seed_draws].mean(1)
        return est, boot


def report(res: dict, n_boot: int = 2000) -> str:
    from weakbench.platform.verdicts import bootstrap_p, interval

    # seeds whose detector trained (a diverged one, or one a cut run did not reach, is left out and named)
    seeds = [s for s in res["seeds"] if any(r.get("seed") == s for r in res["boxes"])]
    missing = [s for s in res["seeds"] if s not in seeds]
    test_keys = [f"test:{i}" for i in res["images"]["test"]]
    val_keys = {f"val:{i}" for i in res["images"]["val"]}
    boot = Boot(test_keys, seeds, n_boot)
    recs = res["boxes"]
    base_theta = 0.85

    def select(row, config=None, theta=None, split="test"):
        keep = [r for r in recs if r["row"] == row and (config is None or r.get("config") == config)
                and (theta is None or r.get("theta") == theta)
                and (r["key"] in val_keys if split == "val" else r["key"].startswith("test:"))]
        if row in ("box_filled", "box_crf"):
            return {s: keep for s in seeds}
        return {s: [r for r in keep if r["seed"] == s] for s in seeds}

    def val_mean(row, config, theta):
        by = select(row, config, theta, "val")
        per_seed = [np.mean([r["iou"] for r in v]) for v in by.values() if v]
        return float(np.mean(per_seed)) if per_seed else -1.0  # no val (--no-val): nothing chosen

    def fmt(est, b, scale=100.0):
        lo, hi = interval(b)
        return f"{scale * est:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"

    def fmt_diff(a, b):
        est, d = a[0] - b[0], a[1] - b[1]
        lo, hi = interval(d)
        return f"{100 * est:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (p={bootstrap_p(d):.3f})"

    def nonempty(by, ref):
        """``by`` restricted to the boxes whose O⁺ is non-empty in ``ref`` (same seed, key, box)."""
        out = {}
        for s in seeds:
            ok = {(r["key"], r["box"]) for r in ref[s] if r["positives"] > 0}
            out[s] = [r for r in by[s] if (r["key"], r["box"]) in ok]
        return out

    lines = [f"dataset {res['dataset']}; test {len(test_keys)} images, seeds {seeds}; detector trained on the boxes "
             f"of {res.get('detector_splits', 'train')}: "
             f"{res['params']['backbone']}{' (pretrained)' if res['params'].get('pretrained') else ''} at "
             f"{res['params']['input_size']} px, "
             + (f"epochs chosen on val per seed from {res['select_epochs']}: "
                + ", ".join(f"{d.get('epochs')}" for d in res["detector"].values()) if res.get("select_epochs")
                else f"{res['params']['epochs']} epochs") + f"; {res['params']['num_proposals']} "
             f"proposals; 95 % intervals: {n_boot} resamples of test images and seeds"
             + (f"; seeds without results (diverged or not reached): {missing}" if missing else ""), ""]
    det = res["detector"]
    aps = [d["test_bbox_ap50"] for d in det.values() if d.get("test_bbox_ap50") is not None]
    seen = "test" in res.get("detector_splits", "train").split(",")
    lines.append("detector test box AP50 per seed" + (" (on boxes it was trained on, not held out)" if seen else "")
                 + ": " + ", ".join(f"{a:.1f}" for a in aps))
    for s_, d in det.items():
        for r in d.get("epoch_probe", []):
            lines.append(f"seed {s_}: after {r['epochs']} epochs ({r['train_s']:.0f} s): val box AP50 "
                         f"{r['val_bbox_ap50']:.1f}, val O+ non-empty {r['val_positive_share']:.0f} % of "
                         f"{r['val_boxes']} boxes" + (" <- chosen" if r["epochs"] == d.get("epochs") else ""))
    if res.get("found"):
        base_recs = [r for r in recs if r["row"] == "bbam_crf" and r.get("config") == "base"
                     and r["key"].startswith("test:")]
        pos = {(str(r["seed"]), r["key"], r["box"]): r["positives"] for r in base_recs}
        for s_, found in res["found"].items():
            rows = [(k, b, f) for k, fs in found.items() for b, f in enumerate(fs)]
            hit = [(k, b) for k, b, f in rows if f["iou"] >= 0.5]
            ne_hit = [x for x in hit if pos.get((s_, *x), 0) > 0]
            ne_all = [(k, b) for k, b, _ in rows if pos.get((s_, k, b), 0) > 0]
            pr = res.get("probe", {}).get(s_, {})
            best = [p["best_iou"] for k in pr if k.startswith("test:") for p in pr[k]]
            lines.append(f"seed {s_}: detector finds {len(hit)}/{len(rows)} test boxes (a detection of the class, "
                         f"score >= 0.5, IoU >= 0.5); O+ non-empty for {len(ne_hit)}/{len(hit)} of those and "
                         f"{len(ne_all)}/{len(rows)} of all"
                         + (f"; best truncated IoU of a regressed proposal (arg-max = GT class) per box: median "
                            f"{np.median(best):.2f}, > 0.8 for {sum(b > 0.8 for b in best)}/{len(best)}" if best else ""))
    lines.append("")
    if not any(r["row"] == "bbam_crf" for r in recs):  # --configs "": the detector only
        return "\n".join(lines)
    chosen = {}
    for row in ("bbam_crf", "bbam"):
        grid = [(c, t) for c in LAMBDA_GRID for t in res["thetas"] if any(
            r["row"] == row and r.get("config") == c and r.get("theta") == t for r in recs)]
        scores = {(c, t): val_mean(row, c, t) for c, t in grid}
        chosen[row] = max(scores, key=scores.get)
        if scores[chosen[row]] < 0:
            lines.append(f"{row}: no val images (--no-val), the one configuration {chosen[row]}")
            continue
        lines.append(f"{row} chosen on val: {chosen[row]} (val instance mIoU {100 * scores[chosen[row]]:.1f}; "
                     + ", ".join(f"{c}/{t}: {100 * v:.1f}" for (c, t), v in scores.items()) + ")")
    lines.append("")
    ref = select("bbam_crf", *chosen["bbam_crf"])
    rows = {"box_filled": select("box_filled"), "box_crf": select("box_crf"),
            "BBAM without CRF": select("bbam", *chosen["bbam"]), "BBAM + CRF": ref}
    share = boot.value({s: [dict(r, nonempty=float(r["positives"] > 0)) for r in ref[s]] for s in seeds}, "nonempty")
    lines.append(f"O+ non-empty (test boxes, chosen BBAM + CRF): {fmt(*share)} %")
    lines.append("")
    lines.append("| test | instance mIoU, all boxes | Δ vs box_crf | boxes with non-empty O+ | Δ vs box_crf |")
    lines.append("| --- | --- | --- | --- | --- |")
    vals = {n: (boot.value(by), boot.value(nonempty(by, ref))) for n, by in rows.items()}
    for n, (a, ne) in vals.items():
        lines.append(f"| {n} | {fmt(*a)} | {fmt_diff(a, vals['box_crf'][0]) if n != 'box_crf' else ''} | {fmt(*ne)} "
                     f"| {fmt_diff(ne, vals['box_crf'][1]) if n != 'box_crf' else ''} |")
    lines.append("")
    abl = [c for c in ["base", "it300@60"] + list(CONFIGS) if any(r.get("config") == c for r in recs)]
    lines.append(f"Ablations on test (θ_fg = {base_theta}); Δ against base, paired:")
    lines.append("")
    lines.append("| configuration | O+ non-empty % | BBAM + CRF, all boxes | Δ vs base | BBAM without CRF | Δ vs base |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    base_v = {row: boot.value(select(row, "base", base_theta)) for row in ("bbam_crf", "bbam")}
    for c in abl:
        v = {row: boot.value(select(row, c, base_theta)) for row in ("bbam_crf", "bbam")}
        sh = boot.value({s: [dict(r, nonempty=float(r["positives"] > 0)) for r in recs_s]
                         for s, recs_s in select("bbam_crf", c, base_theta).items()}, "nonempty")
        lines.append(f"| {c} | {fmt(*sh)} | {fmt(*v['bbam_crf'])} | "
                     f"{fmt_diff(v['bbam_crf'], base_v['bbam_crf']) if c != 'base' else ''} | {fmt(*v['bbam'])} | "
                     f"{fmt_diff(v['bbam'], base_v['bbam']) if c != 'base' else ''} |")
    lines.append("")
    lines.append("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["times"].items()))
    lines.append("detector: " + "; ".join(f"seed {s}: {d['train_s']:.0f} s, loss {d['loss_first']:.2f} -> "
                                          f"{d['loss_last']:.2f}" for s, d in det.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic:hard")
    p.add_argument("--classes", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--images", type=int, default=0, help="at most this many val and test images each (0: all)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--detector-splits", default="train",
                   help="splits whose GT boxes train the detector (default train; train,val,test: the paper's "
                        "setting, where the detector has seen the boxes it explains; GT masks are never used)")
    p.add_argument("--warmup-iters", type=int, default=None,
                   help="detector lr warm-up steps (default: the method's, min(1000, steps per epoch - 1); 0: none)")
    p.add_argument("--select-epochs", default=None,
                   help="comma-separated epoch counts: train to the largest, and after each listed epoch measure "
                        "the val box AP50 (every val image with a box) and the val O+ share (the attributed val "
                        "images); per seed, keep the detector of the epoch with the largest val O+ share (then "
                        "val AP50, then fewer epochs). Overrides --epochs; needs val (not --no-val)")
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--box-head-size", type=int, default=256)
    p.add_argument("--num-proposals", type=int, default=300)
    p.add_argument("--configs", default=",".join(["base", *CONFIGS]))
    p.add_argument("--thetas", default="0.7,0.85")
    p.add_argument("--no-val", action="store_true", help="attribute test only (one configuration: no selection)")
    p.add_argument("--chunk", type=int, default=8, help="images attributed per call (memory only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the per-box results here (JSON)")
    p.add_argument("--report", default=None, help="print the tables of a saved JSON and exit; several, comma-"
                                                   "separated: runs of one command on different --seeds, merged")
    args = p.parse_args()
    if args.report:
        try:
            res = merge([json.loads(Path(f).read_text()) for f in args.report.split(",")])
        except ValueError as e:
            p.error(f"--report {args.report}: {e}")
        print(report(res))
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.select_epochs = sorted({int(e) for e in args.select_epochs.split(",")}) if args.select_epochs else []
    if args.select_epochs:
        if args.no_val or args.select_epochs[0] < 1:
            p.error(f"--select-epochs {','.join(map(str, args.select_epochs))}: needs val images (drop --no-val) "
                    "and epoch counts >= 1")
        args.epochs = args.select_epochs[-1]
    res = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res))
    print(report(res))


if __name__ == "__main__":
    main()
