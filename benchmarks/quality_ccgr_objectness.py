"""CCGR's proposals and round-1 bags: proposal recall at IoU 0.5 (the ceiling of any box picked
among the proposals) and each bag's best IoU with GT against random bags of the same size drawn
from the same candidates, for Eq. 4's objectness ``rank`` (1 − i/n over selective search's
order) and ``cam_contrast`` (the CAM's centre-surround contrast).

Not a speed benchmark: a reproducible measurement for the CCGR issue notes. On the synthetic
default it runs one CCGR trial per objectness setting (one round, the branches cut to one epoch:
only the classifier, the proposals and the peaks matter here; they are shared products, so the
second trial recomputes the peaks only); ``--data`` runs them on a COCO-format directory instead.
With ``--proposals-only`` it runs the proposals stage's own code alone and prints the proposal
recall per split.

    python benchmarks/quality_ccgr_objectness.py --seeds 0 --out /tmp/ccgr-objectness
    python benchmarks/quality_ccgr_objectness.py --data /path/to/coco128 --proposals-only --out /tmp/ccgr-objectness-coco
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from weakbench.platform import tracking
from weakbench.core.data import load_splits, make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial

SETTINGS = {"backbone": "resnet18", "input_size": 96, "epochs": 8, "batch_size": 16, "lr": 0.02, "rounds": 1,
            "max_proposals": 200, "mil_epochs": 1, "mil_lr": 0.001, "semantic_epochs": 1, "semantic_lr": 0.001,
            "mask_rcnn_epochs": 1, "refinement_steps": 20, "max_images_per_split": 40}
KEYS = ("proposals/proposal_recall", "proposals/mean_proposals", "peaks/bag_best_iou", "peaks/random_bag_best_iou",
        "peaks/bag_top1_iou", "peaks/random_bag_top1_iou",
        "peaks/peak_recall", "peaks/peaks_per_image")


def proposals_only(data: str, out: Path, settings: dict) -> None:
    from weakbench.methods import build_method

    source = open_dataset(data, cache_dir=out / "cache")
    splits_path = out / "splits.json"
    if not splits_path.exists():
        save_splits(make_splits(source, seed=0), splits_path)
    splits = load_splits(splits_path)
    m = build_method("ccgr", {k: v for k, v in settings.items() if k != "max_images_per_split"},
                     num_classes=source.num_classes)
    ctx = SimpleNamespace(source=source, splits=splits)
    t0 = time.time()
    keys = m._keys(ctx)
    props = m._proposals(keys, ctx)
    row = {"data": data, "images": len(keys), "max_proposals": settings["max_proposals"],
           "seconds": round(time.time() - t0), **{k: round(v, 2) for k, v in m._proposal_recall(props, ctx).items()}}
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data", default=None, help="a COCO-format directory (default: the synthetic default)")
    ap.add_argument("--proposals-only", action="store_true", help="only the proposal recall (no training)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ccgr-objectness"))
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of SETTINGS (JSON values)")
    args = ap.parse_args()
    settings = dict(SETTINGS)
    for kv in args.set:
        k, v = kv.split("=", 1)
        settings[k] = json.loads(v)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.proposals_only:
        proposals_only(args.data, out, settings)
        return
    source = open_dataset(args.data, cache_dir=out / "cache")
    splits = out / "splits.json"
    if not splits.exists():
        save_splits(make_splits(source, seed=0), splits)
    for seed in args.seeds:
        for objectness in ("rank", "cam_contrast"):
            name = f"s{seed}-{objectness}"
            spec = TrialSpec(method="ccgr", params={**settings, "seed": seed, "objectness": objectness}, data=args.data,
                             data_cache=str(out / "cache"), splits_path=str(splits), trial_dir=str(out / name),
                             tracking_uri=tracking.default_tracking_uri(out), sweep_id="objectness", trial_id=name,
                             run_name=name, eval_max_images=None, num_overlays=0, log_model=False,
                             products_dir=str(out / "products"))
            t0 = time.time()
            m = run_trial(spec, executor="inline")
            row = {"seed": seed, "objectness": objectness, "seconds": round(time.time() - t0)}
            for split in ("train", "val", "test"):
                row.update({f"{split}/{k}": round(m[f"{split}/{k}"], 2) for k in KEYS if f"{split}/{k}" in m})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
