"""Time of each BBAM stage per image or box, through the method's own stage hooks (no Ray, no MLflow).

Stages, in order, on the first ``--images`` images (with GT boxes) of the dataset:

* **detector**: ``--detector-steps`` SGD steps of the detector fit task at batch 4 (seconds per
  training image); 0 leaves the detector untrained (then O⁺ is empty for every box, as the issue
  measured on coco128, and the attribution is skipped box by box);
* **attribute**: ``BBAM._attribute`` over the images (seconds per GT box, O⁺ share printed);
* **attribution per box, batched against one box at a time**: ``optimise_box_masks`` on jobs of
  the same boxes whose O⁺ is forced to ``--proposals`` jittered proposals, all boxes per forward
  against ``chunk_size=1`` (the official loop), same iterations, in the same process;
* **pseudo_masks**: ``BBAM._pseudo_masks`` (rank cut, blur, dense CRF and the box-prior fallbacks)
  on the attribute stage's output (seconds per image), and the part of it spent in the dense CRF
  (``ImageCRF``: lattice builds and mean-field inferences, their counts and time each); ``--random-attribution`` replaces each
  box's mask by a random map inside the box, so the non-empty path is timed whatever the detector;
  ``--crf-engines numba,pydensecrf --repeats 3`` runs the stage with each ``ImageCRF`` engine in
  turn, in the same process, and prints the CPU time per image and per inference against the
  last engine, and the mask pixels that differ from the first run; numba's first call (compile
  or cache load) is timed apart;
* **evaluate**: ``BBAM._evaluate_pseudo_masks`` (metrics, and with the CRF on the ``box_crf``
  baseline: one box-prior CRF per box) in seconds per image.

It runs on old commits too (only the stage hooks are used), so a before / after pair is two runs
of this script: ``git archive <commit> | tar -x -C /tmp/old`` and ``PYTHONPATH=/tmp/old``.

Run: ``python benchmarks/bench_bbam_stages.py`` (synthetic default), or
``python benchmarks/bench_bbam_stages.py --data ../shared/data/coco128 --classes person --input-size 480
--images 2 --detector-steps 0 --random-attribution`` (with ``NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1`` and
``--crf-engines numba,pydensecrf --repeats 3`` for the CRF engines' figures in docs/bbam.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch


def _count_crf(ops) -> dict[str, list]:
    """Count and time the dense CRF's lattice builds and inferences (``ImageCRF``; absent on
    commits before it, then nothing is counted)."""
    calls: dict[str, list] = {"lattice builds": [0, 0.0, 0.0], "inferences": [0, 0.0, 0.0]}
    if not hasattr(ops, "ImageCRF"):
        return {}
    cls = ops.ImageCRF
    cls._bench_orig = (cls.__init__, cls.__call__)

    def timed(fn, name):
        def wrapper(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                calls[name][0] += 1
                calls[name][1] += time.perf_counter() - t0
                calls[name][2] += time.process_time() - c0
        return wrapper

    cls.__init__, cls.__call__ = timed(cls.__init__, "lattice builds"), timed(cls.__call__, "inferences")
    return calls


def _mask_difference(a, b) -> tuple[int, int]:
    """Pixels that differ between two ``_pseudo_masks`` outputs (nested dicts / lists of boolean
    tensors or arrays), and the pixels compared."""
    if isinstance(a, dict) and "counts" in a and "size" in a:  # a COCO RLE
        from pycocotools import mask as mask_utils

        x, y = (mask_utils.decode({"size": r["size"], "counts": r["counts"].encode("ascii")
                                   if isinstance(r["counts"], str) else r["counts"]}) for r in (a, b))
        return int((x != y).sum()), int(x.size)
    if isinstance(a, dict):
        pairs = [_mask_difference(a[k], b[k]) for k in a]
    elif isinstance(a, (list, tuple)):
        pairs = [_mask_difference(x, y) for x, y in zip(a, b, strict=True)]
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        x, y = np.asarray(a), np.asarray(b)
        return (int((x != y).sum()), int(x.size)) if x.dtype == bool or x.dtype == np.uint8 else (0, 0)
    else:
        return 0, 0
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def _uncount_crf(ops) -> None:
    if hasattr(ops, "ImageCRF") and hasattr(ops.ImageCRF, "_bench_orig"):
        ops.ImageCRF.__init__, ops.ImageCRF.__call__ = ops.ImageCRF._bench_orig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="dataset directory (default: the synthetic default)")
    p.add_argument("--classes", default=None, help="class filter, e.g. person")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--detector-steps", type=int, default=20)
    p.add_argument("--iterations", type=int, default=20, help="mask iterations (300 in the paper)")
    p.add_argument("--num-proposals", type=int, default=200)
    p.add_argument("--proposals", type=int, default=30, help="forced |O+| of the batched / one-box comparison")
    p.add_argument("--random-attribution", action="store_true")
    p.add_argument("--no-crf", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crf-engines", default=None,
                   help="comma list of bbam_ops.CRF_ENGINES to time in turn, e.g. numba,pydensecrf (the last is "
                        "the ratio's baseline; masks compared to the first); default: the module's engine")
    p.add_argument("--repeats", type=int, default=1, help="runs of the pseudo-mask stage per engine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from weakbench.methods import build_method
    from weakbench.methods import bbam_ops as ops
    from weakbench.methods.bbam import DetectorFit
    from weakbench.methods.detection import DetectionDataset, collate_detection, detector_forward_heads, detector_inputs
    from weakbench.core.data import open_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_bbam_"))
    kw = {"classes": args.classes} if args.classes else {}
    source = open_dataset(args.data, cache_dir=tmp / "cache", **kw)
    idx = [i for i in range(len(source)) if len(source.gt_boxes(i)[0])][: args.images]
    n_boxes = sum(len(source.gt_boxes(i)[0]) for i in idx)
    params = {"backbone": args.backbone, "input_size": args.input_size, "fpn_channels": 64, "box_head_size": 256,
              "num_proposals": args.num_proposals, "mask_iterations": args.iterations, "use_crf": not args.no_crf,
              "attribution_splits": ["val"]}
    method = build_method("bbam", params, num_classes=source.num_classes, multilabel=source.multilabel)
    sizes = sorted({(source.records[i].width, source.records[i].height) for i in idx})
    print(f"dataset {source.name}: {len(idx)} images ({', '.join(f'{w}x{h}' for w, h in sizes)}), {n_boxes} boxes; "
          f"{args.backbone} at {args.input_size} px, {args.iterations} iterations, {args.num_proposals} proposals, "
          f"CRF {'off' if args.no_crf else 'on'}, {torch.get_num_threads()} thread(s)")
    rows = []

    # detector
    torch.manual_seed(0)
    task = DetectorFit(method, "faster_rcnn")
    det = task.build_model()
    if args.detector_steps:
        opt = task.configure_optimizers(det)["main"]
        ds = DetectionDataset(source, idx, train=True)
        det.train()
        t0 = time.perf_counter()
        for s in range(args.detector_steps):
            batch = collate_detection([ds[(4 * s + k) % len(ds)] for k in range(4)])
            loss = task.training_losses(det, batch, None)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = time.perf_counter() - t0
        rows.append(("detector (train)", t, 4 * args.detector_steps, "image"))
    det.eval()
    ctx = types.SimpleNamespace(source=source, device=torch.device("cpu"), load_model=lambda name: det,
                                splits={"train": [], "val": idx, "test": []}, num_overlays=0,
                                stage=types.SimpleNamespace(split="val", name="evaluate", metric_ns="pseudo_masks"), inputs={},
                                out_dir=tmp / "out", max_images=None)
    keys = [f"val:{i}" for i in idx]

    # attribute
    t0 = time.perf_counter()
    table = method._attribute(keys, ctx)
    t = time.perf_counter() - t0
    pos = [q for k in keys for q in table[k]["positives"]]
    rows.append(("attribute", t, n_boxes, f"box (O+ non-empty for {sum(q > 0 for q in pos)}/{len(pos)})"))

    # per box: batched against one box at a time (forced O+)
    gen = torch.Generator().manual_seed(0)
    images, jobs = [], []
    for b, i in enumerate(idx):
        img = torch.from_numpy(np.asarray(source.load_image(i), dtype=np.float32) / 255).permute(2, 0, 1)
        boxes, classes = source.gt_boxes(i)
        x, s, br = detector_inputs(det, [img], [torch.as_tensor(boxes, dtype=torch.float32)])
        images.append(x)
        for box, c in zip(br[0], classes):
            props = ops.jitter_proposals(box, args.proposals, image_size=s[0], generator=gen)
            with torch.no_grad():
                pr, rg = detector_forward_heads(det, x, [props], image_sizes=s)
            rg = rg.reshape(len(props), -1, 4)
            area = float((box[2] - box[0]) * (box[3] - box[1])) / (s[0][0] * s[0][1])
            jobs.append(ops.BoxJob(b, box, int(c), props, pr[:, int(c) + 1], rg[:, int(c) + 1],
                                   ops.mask_stride(area, scale=min(s[0]) / 800), None, s[0]))
    same = len({tuple(x.shape) for x in images}) == 1
    imgs = torch.cat(images) if same else [x[0] for x in images]  # the old code takes one padded tensor
    if not same:
        try:
            ops.optimise_box_masks(det, imgs, jobs[:1], iterations=1)
        except (AttributeError, TypeError):  # before the fix: images padded to one size
            from torch.nn.functional import pad
            H, W = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
            imgs = torch.cat([pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2])) for x in images])
    ops.optimise_box_masks(det, imgs, jobs[:1], iterations=1)  # warm-up
    t0 = time.perf_counter()
    ops.optimise_box_masks(det, imgs, jobs, iterations=args.iterations, chunk_size=1)
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    ops.optimise_box_masks(det, imgs, jobs, iterations=args.iterations)
    t_all = time.perf_counter() - t0
    rows.append(("  optimisation, one box at a time", t_one, len(jobs), "box"))
    rows.append(("  optimisation, all boxes batched", t_all, len(jobs), f"box ({t_one / t_all:.2f}x)"))

    # pseudo masks
    if args.random_attribution:
        rng = np.random.default_rng(0)
        for k, key in enumerate(keys):
            table[key]["masks"] = [torch.from_numpy(rng.uniform(0.2, 1, tuple(m.shape)).astype(np.float16))
                                   for m in table[key]["masks"]]
    (tmp / "attribute").mkdir()
    torch.save(table, tmp / "attribute" / "attributions.pt")
    ctx.inputs = {"attribute": tmp / "attribute"}
    engines = [e for e in (args.crf_engines or "").split(",") if e] or [None]
    if engines != [None] and not hasattr(ops, "CRF_ENGINE"):
        raise SystemExit("--crf-engines: this commit's bbam_ops has one CRF engine (no CRF_ENGINE)")
    default_engine = getattr(ops, "CRF_ENGINE", None)
    if "numba" in engines or (engines == [None] and default_engine == "numba" and not args.no_crf):
        # the first call compiles or loads numba's cache: timed apart from the stage
        c0 = time.process_time()
        ops.ImageCRF(np.zeros((8, 8, 3), np.uint8), engine="numba")(np.full((8, 8), 0.5))
        rows.append(("numba CRF first call (compile/cache)", time.process_time() - c0, 1, "process (CPU s)"))
    per_engine: dict = {}
    masks = first_masks = None
    for rep in range(args.repeats):
        for engine in engines:
            if engine is not None:
                ops.CRF_ENGINE = engine
            crf_calls = _count_crf(ops)
            t0, c0 = time.perf_counter(), time.process_time()
            masks, per_image = {}, []
            for key in keys:  # image by image, for the CPU time of each
                c1 = time.process_time()
                masks.update(method._pseudo_masks([key], ctx))
                per_image.append(time.process_time() - c1)
            t, c = time.perf_counter() - t0, time.process_time() - c0
            _uncount_crf(ops)
            label = f"pseudo_masks [{engine or 'default'}, run {rep + 1}]"
            rows.append((label, t, len(idx), "image"))
            rows.append((f"  CPU time", c, len(idx), "image (process time: one core's share on a loaded machine)"))
            for i, ci in zip(idx, per_image):
                rows.append((f"  CPU time, {source.records[i].width}x{source.records[i].height}", ci, 1,
                             f"image ({len(source.gt_boxes(i)[0])} boxes)"))
            for name, (n, tc, cc) in crf_calls.items():
                rows.append((f"  of which CRF {name}", tc, len(idx), f"image ({n} calls, {tc / max(n, 1):.3f} s each; "
                                                                     f"CPU {cc / max(n, 1):.3f} s each)"))
            inf = crf_calls.get("inferences", [0, 0.0, 0.0])
            per_engine.setdefault(engine, []).append((c / len(idx), inf[2] / max(inf[0], 1)))
            if first_masks is None:
                first_masks = masks
            else:
                diff, total = _mask_difference(first_masks, masks)
                rows.append((f"  masks differing from [{engines[0] or 'default'}, run 1]", diff, 1,
                             f"pixels (of {total} mask pixels)"))
    if default_engine is not None:
        ops.CRF_ENGINE = default_engine
    if len(per_engine) > 1:
        base = engines[-1]
        print(f"CPU time per image of the pseudo-mask stage and per CRF inference, against [{base}] "
              f"in the same run (one line per repeat):")
        for rep in range(args.repeats):
            cells = []
            for engine in engines:
                img_s, inf_s = per_engine[engine][rep]
                b_img, b_inf = per_engine[base][rep]
                cells.append(f"{engine}: {img_s:.3f} s/image ({b_img / img_s:.2f}x), {inf_s:.3f} s/inference "
                             f"({b_inf / max(inf_s, 1e-12):.2f}x)")
            print(f"  run {rep + 1}: " + "; ".join(cells))
    (tmp / "pseudo").mkdir()
    torch.save(masks, tmp / "pseudo" / "pseudo_masks.pt")
    ctx.inputs = {"pseudo_masks": tmp / "pseudo"}
    if source.has_masks:
        t0 = time.perf_counter()
        metrics, _ = method._evaluate_pseudo_masks(ctx)
        t = time.perf_counter() - t0
        rows.append(("evaluate", t, len(idx), "image"))
    print(f"{'stage':<36} {'total s':>8} {'s per unit':>11}  unit")
    for name, t, n, unit in rows:
        print(f"{name:<36} {t:>8.2f} {t / max(n, 1):>11.3f}  {unit}")


if __name__ == "__main__":
    main()
