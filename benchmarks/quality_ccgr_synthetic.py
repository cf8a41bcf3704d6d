"""CCGR on the synthetic default: what the refinement and the second round add, with seed spread.

Not a speed benchmark: a reproducible measurement for the CCGR issue notes. For each seed, one
trial with the refinement on and one with it off (``refine: false``), sharing every product
before the refinement; prints, per seed and as mean ± std over seeds, the val and test numbers:
peak recall, the MIL boxes' IoU with GT before and after refinement (mean over boxes and mean
over GT instances), pseudo-mask mAP^r at 0.5 with and without refinement, and round 2 against
round 1.

    python benchmarks/quality_ccgr_synthetic.py --seeds 0 1 2 --out /tmp/ccgr-quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial

SETTINGS = {"backbone": "resnet18", "input_size": 96, "epochs": 8, "batch_size": 16, "lr": 0.02, "rounds": 2,
            "max_proposals": 150, "mil_epochs": 4, "mil_lr": 0.001, "semantic_epochs": 8, "semantic_lr": 0.001,
            "mask_rcnn_epochs": 10, "max_images_per_split": 40}
P = "pseudo_masks_with_labels"  # the pseudo-mask diagnostics (made with each image's own labels)
KEYS = ("peaks/peak_recall", "peaks/peaks_per_image", f"{P}/r1/box_iou_before", f"{P}/r1/box_iou_after",
        f"{P}/r1/gt_box_iou_before", f"{P}/r1/gt_box_iou_after", f"{P}/r1/map_r50",
        f"{P}/r1/unrefined/map_r50", f"{P}/r2/map_r50", f"{P}/r2/unrefined/map_r50",
        f"{P}/round_gain/map_r50", f"{P}/r1/box_filled/map_r50", "mask_rcnn/map_r50", "mask_rcnn/map_r25",
        "mask_rcnn/box_map50", "proposals/proposal_recall", "peaks/bag_best_iou", "peaks/random_bag_best_iou")

#: the SS branch's mIoU on val, and how many detections of the IS branch seeded round 2
EXTRA = ("val/semantic_r1/miou", "val/semantic_r2/miou", "train/instances_r1/detections")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ccgr-quality"))
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of SETTINGS (JSON values)")
    args = ap.parse_args()
    settings = dict(SETTINGS)
    for kv in args.set:
        k, v = kv.split("=", 1)
        settings[k] = json.loads(v)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    source = open_dataset(None, cache_dir=out / "cache")
    splits = out / "splits.json"
    if not splits.exists():
        save_splits(make_splits(source, seed=0), splits)
    rows = []
    for seed in args.seeds:
        for refine in (True, False):
            name = f"s{seed}-{'refine' if refine else 'norefine'}"
            spec = TrialSpec(method="ccgr", params={**settings, "seed": seed, "refine": refine}, data=None,
                             data_cache=str(out / "cache"), splits_path=str(splits), trial_dir=str(out / name),
                             tracking_uri=tracking.default_tracking_uri(out), sweep_id="quality", trial_id=name,
                             run_name=name, eval_max_images=None, num_overlays=0, log_model=False,
                             products_dir=str(out / "products"))
            t0 = time.time()
            m = run_trial(spec, executor="inline")
            row = {"seed": seed, "refine": refine, "seconds": round(time.time() - t0)}
            for split in ("val", "test"):
                row.update({f"{split}/{k}": round(m[f"{split}/{k}"], 2) for k in KEYS if f"{split}/{k}" in m})
            row.update({k: round(m[k], 2) for k in EXTRA if k in m})
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    for refine in (True, False):
        sel = [r for r in rows if r["refine"] == refine]
        print(f"\nrefine={refine}, {len(sel)} seeds: mean ± std")
        for k in sorted(k for k in sel[0] if "/" in k):
            vals = [r[k] for r in sel if k in r]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"  {k:45s} {statistics.mean(vals):7.2f} ± {sd:5.2f}")


if __name__ == "__main__":
    main()
