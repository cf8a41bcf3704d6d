"""CCGR's stop rule and rounds on test, with 95 % intervals over test images and seeds.

Not a speed benchmark: the reproducible measurement behind the stop-rule and rounds tables of
docs/ccgr.md (and the CCGR docstring / README). Parts (``--part``):

* ``stop``: ``peak_stop`` any / region / off × the synthetic default and ``synthetic:touching`` ×
  ``--seeds``, one round. Per variant the trials share one products folder (what a sweep's
  trials share): the classifier, proposals, peaks and round-1 MIL and SS branches are computed
  once per seed and read from the cache by the other two rules (the runner prints "cache hit").
* ``rounds``: ``rounds: 3`` with ``next_round_from`` instance_branch / pseudo_masks (``peak_stop``
  any; round 1 is the ``stop`` part's ``any`` trial, from the cache), ``--round-seeds``.
* ``person``: coco128 restricted to ``person`` (``--classes person``), the packaged pretrained
  EfficientNet-Lite0 classifier, one round, ``--person-seeds``.

Per trial and round, on the **test** split, the script keeps per-image records: each box's IoU
with the best GT box of its class before and after refinement, and each prediction's VOC
true/false-positive call at IoU 0.5 (:func:`weakbench.core.metrics.instance.voc_hits`) for
the pseudo masks (made with the image's labels: a diagnostic) and for the instance branch (the
round's Mask R-CNN on the test images, no labels: the paper's measure; its round-``rounds`` value
is checked against the logged ``test/mask_rcnn/map_r50``). Intervals: a two-stage bootstrap
(as :mod:`weakbench.platform.verdicts`: images drawn with replacement, then seeds drawn with
replacement; the value is the mean over drawn seeds of the metric recomputed exactly on the
weighted images, mAP^r by
:func:`weakbench.core.metrics.per_image.weighted_voc_map_of_calls`), 95 %
percentile intervals; rows of one table share the image and seed draws, so the difference of
two rules is a paired interval.

    python benchmarks/quality_ccgr_stop_rule.py --part stop --seeds 0 1 2 --out /tmp/ccgr-stop
    python benchmarks/quality_ccgr_stop_rule.py --part rounds --round-seeds 0 --out /tmp/ccgr-stop
    python benchmarks/quality_ccgr_stop_rule.py --part person --coco /path/to/coco128 --out /tmp/ccgr-stop
    python benchmarks/quality_ccgr_stop_rule.py --part report --out /tmp/ccgr-stop   # the tables only

Trials already recorded under ``--out`` are not run again (``records/*.pkl``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from weakbench.platform import tracking
from weakbench.core.data import load_splits, make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial, stage_products

#: the scale that fits the shared 2-core machine (stated with every table)
SETTINGS = {"backbone": "resnet18", "input_size": 64, "epochs": 4, "batch_size": 16, "lr": 0.02, "rounds": 1,
            "max_proposals": 150, "mil_epochs": 2, "mil_lr": 0.001, "semantic_epochs": 3, "semantic_lr": 0.001,
            "mask_rcnn_epochs": 3, "refinement_steps": 150, "max_images_per_split": 20}
PERSON = {"backbone": "tf_efficientnet_lite0", "pretrained": True, "input_size": 160, "epochs": 3, "batch_size": 16,
          "lr": 0.01, "rounds": 1, "max_proposals": 200, "mil_epochs": 2, "mil_lr": 0.001, "semantic_epochs": 3,
          "semantic_lr": 0.001, "mask_rcnn_epochs": 3, "mask_rcnn_lr": 0.002, "refinement_steps": 150,
          "max_images_per_split": 24}  # Mask R-CNN diverged (NaN) in its last epoch at lr 0.01 and 0.002 (96 px) and 0.002 (160 px)
VARIANTS = {"default": None, "touching": "synthetic:touching"}
STOPS = ("any", "region", "off")
LOGGED = ("test/mask_rcnn/map_r50", "test/mask_rcnn/map_r25", "test/proposals/proposal_recall",
          "test/peaks/bag_best_iou", "test/peaks/random_bag_best_iou", "test/peaks/bag_top1_iou",
          "test/peaks/random_bag_top1_iou", "test/peaks/peak_recall")


# ---------------------------------------------------------------------------- data checks
def variant_stats(source) -> dict[str, float]:
    """Images with ≥ 2 instances of one class, and same-class pairs whose boxes touch or overlap."""
    multi = touching = 0
    for i in range(len(source)):
        a = source.annotations(i)
        cls = np.asarray(a.box_classes)
        multi += bool(len(cls) and np.bincount(cls).max() >= 2)
        boxes = np.asarray(a.boxes, np.float64).reshape(-1, 4)
        hit = False
        for p in range(len(cls)):
            for q in range(p + 1, len(cls)):
                if cls[p] == cls[q]:  # inclusive pixel boxes: 1 px apart counts as touching
                    gap_x = max(boxes[p, 0], boxes[q, 0]) - min(boxes[p, 2], boxes[q, 2])
                    gap_y = max(boxes[p, 1], boxes[q, 1]) - min(boxes[p, 3], boxes[q, 3])
                    hit |= gap_x <= 1 and gap_y <= 1
        touching += hit
    n = len(source)
    return {"images": n, "share_2plus_same_class": 100.0 * multi / n, "share_touching_same_class": 100.0 * touching / n}


# ---------------------------------------------------------------------------- per-image records
def _instance_results(model, source, indices) -> list[dict]:
    """The instance branch's test predictions in COCO result form (as ``instance_eval``: every
    detection, masks > 0.5, the image alone, no labels)."""
    from weakbench.methods.bbam import _image_tensor, _rle

    out = []
    with torch.no_grad():
        for i in indices:
            o = model.eval()([_image_tensor(source.load_image(i))])[0]
            for k in range(len(o["boxes"])):
                x0, y0, x1, y1 = (float(v) for v in o["boxes"][k])
                out.append({"image_id": int(i), "category_id": int(o["labels"][k]), "score": float(o["scores"][k]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": _rle((o["masks"][k, 0] > 0.5).numpy())})
    return out


def trial_records(spec: TrialSpec, rounds: int) -> dict:
    """Per round, the test split's per-image records of one finished trial (from its products)."""
    from weakbench.methods import build_method
    from weakbench.methods.ccgr import _best_iou, _table
    from weakbench.core.metrics import coco_gt_from_source

    source = open_dataset(spec.data, cache_dir=spec.data_cache, classes=spec.classes)
    splits = load_splits(spec.splits_path, source)
    method = build_method("ccgr", spec.params, num_classes=source.num_classes, multilabel=source.multilabel)
    plan = method.stages()  # the plan with each stage's reads, as the engine hashes it
    products = stage_products(spec, method, plan, source, splits)
    if not (products["refine_r1"].dir / "refined.pt").is_file():  # product hashes include the code digest
        raise SystemExit(f"{spec.trial_id}: its products are not under {spec.products_dir} for this code "
                         "(weakbench.methods changed since the trial ran, so every product hash differs); fix: "
                         "run the script with the weakbench the trial ran with (PYTHONPATH), or remove the "
                         "trial's MLflow run and products to recompute it")
    test_all = [int(i) for i in splits["test"]]
    gt_all = coco_gt_from_source(source, test_all, masks=True)
    out: dict = {"test_images": test_all}
    for r in range(1, rounds + 1):
        table = _table(products[f"refine_r{r}"].dir / "refined.pt")
        keys = [k for k in table if k.startswith("test:")]
        idx = [int(k.split(":")[1]) for k in keys]
        before, after, pseudo = {}, {}, []
        for key, i in zip(keys, idx):
            e = table[key]
            gb, gc = source.gt_boxes(i)
            before[i] = _best_iou(e["boxes_before"], e["classes"], gb, gc)
            after[i] = _best_iou(e["boxes_after"], e["classes"], gb, gc)
            for rle, box, k, s in zip(e["fg"], e["boxes_fg"], e["classes_fg"], e["scores_fg"]):
                x0, y0, x1, y1 = box
                pseudo.append({"image_id": i, "category_id": int(k) + 1, "score": float(s), "segmentation": rle,
                               "bbox": [x0, y0, x1 - x0, y1 - y0]})
        st = next(s for s in plan if s.name == f"instance_r{r}")
        model = method.fit_task(st).build_model()
        model.load_state_dict(torch.load(products[f"instance_r{r}"].dir / "model.pt", map_location="cpu",
                                         weights_only=True))
        inst = _instance_results(model, source, test_all)
        out[r] = {"box_before": before, "box_after": after,
                  "pseudo": voc_matches(coco_gt_from_source(source, idx, masks=True), pseudo, 0.5),
                  "instance": voc_matches(gt_all, inst, 0.5),
                  "instance_r25": voc_matches(gt_all, inst, 0.25)}
    return out


def run_one(name: str, data: str | None, classes: str | None, params: dict, out: Path, group: str) -> dict:
    """One trial (resumed from ``records/<name>.pkl`` when recorded) and its per-image records."""
    rec_path = out / "records" / f"{name}.pkl"
    if rec_path.is_file():
        return pickle.loads(rec_path.read_bytes())
    gdir = out / group
    gdir.mkdir(parents=True, exist_ok=True)
    source = open_dataset(data, cache_dir=out / "cache", classes=classes)
    splits = gdir / "splits.json"
    if not splits.exists():
        save_splits(make_splits(source, seed=0), splits)
    spec = TrialSpec(method="ccgr", params=params, data=data, classes=classes, data_cache=str(out / "cache"),
                     splits_path=str(splits), trial_dir=str(gdir / name), tracking_uri=tracking.default_tracking_uri(gdir),
                     sweep_id=group, trial_id=name, run_name=name, eval_max_images=None, num_overlays=0,
                     log_model=False, products_dir=str(gdir / "products"))
    t0 = time.time()
    m = run_trial(spec, executor="inline")
    seconds = time.time() - t0
    rec = {"name": name, "params": params, "seconds": seconds, "logged": {k: m[k] for k in LOGGED if k in m},
           "costs": {k: round(v, 1) for k, v in m.items() if k.startswith("cost/") and k.endswith("_seconds")},
           "rounds": trial_records(spec, int(params["rounds"]))}
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    rec_path.write_bytes(pickle.dumps(rec))
    print(json.dumps({"trial": name, "seconds": round(seconds), "costs": rec["costs"], "logged": rec["logged"]}),
          flush=True)
    return rec


def voc_matches(gt, results: list[dict], thr: float) -> tuple[dict, list]:
    """``(n_gt, matches)``: GT instances per (image, category) and one ``(image, category, score,
    hit)`` per prediction of a class with GT, in the order ``voc_instance_ap`` ranks them (its own
    matching, :func:`weakbench.core.metrics.instance.voc_hits`; matching never crosses images)."""
    from collections import Counter

    from weakbench.core.metrics.instance import voc_hits

    hits, seq, _ = voc_hits(gt, results, [thr])
    n_gt = Counter((a["image_id"], a["category_id"]) for a in gt.dataset["annotations"] if not a.get("iscrowd", 0))
    return dict(n_gt), [(results[i]["image_id"], results[i]["category_id"], float(results[i]["score"]),
                         bool(hits[i, 0])) for i in seq]


# ---------------------------------------------------------------------------- bootstrap
def voc_map_from_matches(n_gt: dict, matches: list, weights: dict | None = None) -> float:
    """mAP^r (%) of :func:`voc_matches`' calls with each image counted ``weights[image]`` times
    (``None``: once each, = ``voc_instance_ap``): the records handed to
    :func:`weakbench.core.metrics.per_image.weighted_voc_map_of_calls`, the arithmetic the
    board's bootstrap uses on stored per-image tables."""
    from weakbench.core.metrics.per_image import weighted_voc_map_of_calls

    gt_images = [img for (img, _), n in n_gt.items() for _ in range(int(n))]
    gt_classes = [cat for (_, cat), n in n_gt.items() for _ in range(int(n))]
    order = sorted(set(gt_images) | {m[0] for m in matches})
    counts = np.ones((1, len(order))) if weights is None else \
        np.asarray([[float(weights.get(img, 0.0)) for img in order]])
    ap = weighted_voc_map_of_calls(np.asarray(gt_images, dtype=object), np.asarray(gt_classes, np.int64),
                                   np.asarray([m[0] for m in matches], dtype=object),
                                   np.asarray([m[1] for m in matches], np.int64),
                                   np.asarray([m[2] for m in matches], np.float64),
                                   np.asarray([m[3] for m in matches], bool), np.asarray(order, dtype=object), counts)
    return float(ap[0])


def _metric(rnd: dict, name: str, w: dict | None) -> float:

    if name in ("box_before", "box_after"):
        vals, wts = [], []
        for img, ious in rnd[name].items():
            vals += ious
            wts += [1.0 if w is None else float(w.get(img, 0.0))] * len(ious)
        wts = np.asarray(wts)
        return 100.0 * float(np.dot(vals, wts) / wts.sum()) if wts.sum() > 0 else float("nan")
    return voc_map_from_matches(*rnd[name], weights=w)


def bootstrap_table(rows: dict[str, list[dict]], metrics: tuple[str, ...], images: list[int], n_boot: int,
                    seed: int = 0) -> dict:
    """``rows``: name → one round record per seed (same test images). Per row and metric the point
    value (mean over seeds) and its 95 % interval; per metric, each row minus the first row, paired
    (the same image and seed draws)."""
    rng = np.random.default_rng(seed)
    names = list(rows)
    n_seeds = len(next(iter(rows.values())))
    point = {(n, m): float(np.mean([_metric(r, m, None) for r in rows[n]])) for n in names for m in metrics}
    boot = {(n, m): [] for n in names for m in metrics}
    for _ in range(n_boot):
        counts = rng.multinomial(len(images), np.full(len(images), 1.0 / len(images)))
        w = {img: float(c) for img, c in zip(images, counts) if c}
        seeds = rng.integers(0, n_seeds, n_seeds)
        for n in names:
            for m in metrics:
                boot[(n, m)].append(float(np.mean([_metric(rows[n][s], m, w) for s in seeds])))
    res: dict = {}
    for n in names:
        for m in metrics:
            b = np.asarray(boot[(n, m)])
            res[(n, m)] = (point[(n, m)], *np.nanpercentile(b, [2.5, 97.5]))
            if n != names[0]:
                d = b - np.asarray(boot[(names[0], m)])
                res[(n, m, "diff")] = (point[(n, m)] - point[(names[0], m)], *np.nanpercentile(d, [2.5, 97.5]))
    return res


def _fmt(v: tuple) -> str:
    return f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"


# ---------------------------------------------------------------------------- parts
def part_stop(args, out: Path) -> None:
    for seed in args.seeds:  # seed-major: an interrupted run leaves both variants with the same seeds
        for variant, data in VARIANTS.items():
            for stop in STOPS:
                run_one(f"{variant}-s{seed}-{stop}", data, None, {**args.settings, "seed": seed, "peak_stop": stop},
                        out, f"stop-{variant}")


def part_rounds(args, out: Path) -> None:
    for seed in args.round_seeds:
        for variant, data in VARIANTS.items():
            for nrf in ("instance_branch", "pseudo_masks"):
                # the stop part's group: round 1 comes from its cache
                run_one(f"{variant}-s{seed}-r3-{nrf}", data, None,
                        {**args.settings, "seed": seed, "peak_stop": "any", "rounds": 3, "next_round_from": nrf},
                        out, f"stop-{variant}")


def part_person(args, out: Path) -> None:
    for seed in args.person_seeds:
        run_one(f"person-s{seed}", args.coco, "person", {**PERSON, "seed": seed}, out, "person")


def stage_seconds(rec: dict) -> float:
    """A trial's compute time, s: the sum of the ``cost/*_seconds`` in its final metrics, i.e.
    ``cost/train_seconds`` (the fit epochs of every run of the trial, resumed runs included;
    none for fit stages read from the cache) plus the stage costs reported with it (the eval
    stages; the map stages only when the recording run read them from the products, so it is
    a lower bound). ``rec["seconds"]`` is the wall time of the run that recorded the trial
    only: 0–3 s when that run found every stage done after an interruption."""
    return float(sum(v for k, v in rec["costs"].items() if k.startswith("cost/") and k.endswith("_seconds")))


def report(args, out: Path) -> str:
    recs = {p.stem: pickle.loads(p.read_bytes()) for p in sorted((out / "records").glob("*.pkl"))}
    scales = {json.dumps({k: v for k, v in r["params"].items() if k not in ("seed", "peak_stop", "rounds",
                                                                         "next_round_from")})
              for k, r in recs.items() if not k.startswith("person-")}
    lines = [f"scale (synthetic trials): {s}" for s in sorted(scales)] + [""]
    for variant, data in VARIANTS.items():
        source = open_dataset(data, cache_dir=out / "cache")
        stats = variant_stats(source)
        lines.append(f"synthetic {variant}: {stats['images']} images; {stats['share_2plus_same_class']:.0f} % hold >= 2 "
                     f"instances of one class, {stats['share_touching_same_class']:.0f} % a same-class pair whose boxes "
                     "touch or overlap")
    lines.append("")
    metrics = ("box_before", "box_after", "pseudo", "instance")
    for variant in VARIANTS:
        seeds = [s for s in args.seeds if all(f"{variant}-s{s}-{st}" in recs for st in STOPS)]
        if not seeds:
            continue
        rows = {st: [recs[f"{variant}-s{s}-{st}"]["rounds"][1] for s in seeds] for st in STOPS}
        images = recs[f"{variant}-s{seeds[0]}-any"]["rounds"]["test_images"]
        res = bootstrap_table(rows, metrics, images, args.boot)
        secs = sum(stage_seconds(recs[f"{variant}-s{s}-{st}"]) for s in seeds for st in STOPS)
        lines += [f"### synthetic {variant}: test, {len(images)} images × {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
                  f"95 % intervals (bootstrap over images and seeds, {args.boot} resamples); {secs:.0f} s of logged "
                  "cost/*_seconds (fit epochs of all runs, eval stages)", "",
                  "| peak_stop | box IoU before | box IoU after | pseudo masks (with labels) mAP^r_0.5 | "
                  "instance branch mAP^r_0.5 |", "| --- | --- | --- | --- | --- |"]
        for st in STOPS:
            lines.append(f"| {st} | " + " | ".join(_fmt(res[(st, m)]) for m in metrics) + " |")
        for st in STOPS[1:]:
            lines.append(f"| {st} − any (paired) | " + " | ".join(_fmt(res[(st, m, 'diff')]) for m in metrics) + " |")
        diag = {k: np.mean([recs[f"{variant}-s{s}-any"]["logged"].get(k, np.nan) for s in seeds]) for k in LOGGED}
        lines += ["", f"test, mean over seeds: proposal recall@0.5 {diag['test/proposals/proposal_recall']:.1f}, bag "
                  f"best IoU {diag['test/peaks/bag_best_iou']:.1f} (random {diag['test/peaks/random_bag_best_iou']:.1f}), "
                  f"top-1 {diag['test/peaks/bag_top1_iou']:.1f} (random {diag['test/peaks/random_bag_top1_iou']:.1f}), "
                  f"logged IS mAP^r_0.5 (any) {diag['test/mask_rcnn/map_r50']:.1f}", ""]
    for variant in VARIANTS:
        seeds = [s for s in args.round_seeds if all(f"{variant}-s{s}-r3-{n}" in recs
                                                    for n in ("instance_branch", "pseudo_masks"))]
        if not seeds:
            continue
        rows = {}
        for nrf in ("instance_branch", "pseudo_masks"):
            for r in (1, 2, 3):
                if r == 1 and nrf == "pseudo_masks":
                    continue  # round 1 is the same product for both settings
                rows[f"r{r}" + ("" if r == 1 else f" ({nrf})")] = [recs[f"{variant}-s{s}-r3-{nrf}"]["rounds"][r]
                                                                   for s in seeds]
        images = recs[f"{variant}-s{seeds[0]}-r3-instance_branch"]["rounds"]["test_images"]
        res = bootstrap_table(rows, metrics, images, args.boot)
        lines += [f"### rounds, synthetic {variant} (peak_stop any): test, {len(images)} images × {len(seeds)} seed(s), "
                  "95 % intervals; differences against round 1, paired", "",
                  "| round (next_round_from) | box IoU before | box IoU after | pseudo masks (with labels) mAP^r_0.5 | "
                  "instance branch mAP^r_0.5 |", "| --- | --- | --- | --- | --- |"]
        for n in rows:
            lines.append(f"| {n} | " + " | ".join(_fmt(res[(n, m)]) for m in metrics) + " |")
        for n in list(rows)[1:]:
            lines.append(f"| {n} − r1 | " + " | ".join(_fmt(res[(n, m, 'diff')]) for m in metrics) + " |")
        lines.append("")
    person = [recs[k] for k in recs if k.startswith("person-")]
    if person:
        rows = {"person": [p["rounds"][1] for p in person]}
        images = person[0]["rounds"]["test_images"]
        res = bootstrap_table(rows, ("instance", "instance_r25", "pseudo", "box_before", "box_after"), images, args.boot)
        pr = np.mean([p["logged"].get("test/proposals/proposal_recall", np.nan) for p in person])
        lines += [f"### coco128 person (packaged pretrained Lite0): test, {len(images)} images × {len(person)} seed(s), "
                  f"{sum(stage_seconds(p) for p in person):.0f} s of logged cost/*_seconds; scale {json.dumps(PERSON)}", "",
                  f"instance branch mAP^r_0.5 {_fmt(res[('person', 'instance')])}, mAP^r_0.25 "
                  f"{_fmt(res[('person', 'instance_r25')])}; proposal recall@0.5 (the ceiling) {pr:.1f}; pseudo masks "
                  f"(with labels) mAP^r_0.5 {_fmt(res[('person', 'pseudo')])}; box IoU before / after "
                  f"{_fmt(res[('person', 'box_before')])} / {_fmt(res[('person', 'box_after')])}", ""]
    # the script's own mAP^r of the last round against the logged headline (same predictions)
    for k, rec in recs.items():
        last = int(rec["params"]["rounds"])
        mine = _metric(rec["rounds"][last], "instance", None)
        logged = rec["logged"].get("test/mask_rcnn/map_r50")
        if logged is not None and abs(mine - logged) > 1e-6:
            lines.append(f"warning: {k}: recomputed instance mAP^r {mine:.3f} != logged {logged:.3f}")
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("stop", "rounds", "person", "report"), nargs="+", default=["stop", "report"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--round-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--person-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--coco", default="../shared/data/coco128", help="coco128 directory (person part)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ccgr-stop"))
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of SETTINGS (JSON values)")
    args = ap.parse_args()
    args.settings = dict(SETTINGS)
    for kv in args.set:
        k, v = kv.split("=", 1)
        args.settings[k] = json.loads(v)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.part:
        if part == "report":
            print(report(args, args.out), flush=True)
        else:
            {"stop": part_stop, "rounds": part_rounds, "person": part_person}[part](args, args.out)


if __name__ == "__main__":
    main()
