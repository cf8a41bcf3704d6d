"""Time the fast WSOL box metrics against the slow OpenCV reference, in the same process.

Both evaluate the same maps (224×224): smooth random maps (7×7 noise, bicubic upsampling, the
shape of a CAM) and, when COCO128 is present, CAMs of a randomly initialised ResNet-18 on its
images (7×7 class maps bilinearly upsampled, as methods produce them) with their GT boxes. For
100 and 1000 thresholds and for the largest-contour (MaxBoxAcc) and all-contours
(MaxBoxAccV2) rules it prints the time per map of each path, the speed ratio, and asserts that
the per-threshold correct counts are identical.

    python benchmarks/bench_wsol_metrics.py [--maps 500] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from wsol_reference import ReferenceBoxEvaluator  # noqa: E402

from weakbench.core.data.transforms import resize_boxes_wsol  # noqa: E402
from weakbench.core.metrics import BoxEvaluator, WsolEvaluator  # noqa: E402

SIZE = 224


def smooth_maps(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(n):
        m = cv2.resize(rng.random((7, 7)).astype(np.float32), (SIZE, SIZE),
                       interpolation=cv2.INTER_CUBIC)
        maps.append(np.clip((m - m.min()) / (m.max() - m.min()), 0, 1))
        x0, y0 = rng.integers(0, SIZE // 2, 2)
        x1, y1 = x0 + rng.integers(20, SIZE // 2), y0 + rng.integers(20, SIZE // 2)
        gts.append(np.array([[x0, y0, x1, y1]]))
    return np.stack(maps).astype(np.float32), gts


def coco_cams(n: int, coco_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """CAMs of the first annotated class of each COCO128 image from a random ResNet-18."""
    import timm
    from PIL import Image

    data = json.loads((coco_dir / "annotations" / "instances.json").read_text())
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            anns.setdefault(a["image_id"], []).append(a)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=80).eval()
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    maps, gts = [], []
    images = [im for im in data["images"] if im["id"] in anns]
    for im in images:
        if len(maps) >= n:
            break
        img = Image.open(coco_dir / "images" / im["file_name"]).convert("RGB").resize((SIZE, SIZE))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            feats = model.forward_features(x)[0]  # (512, 7, 7)
        cat = anns[im["id"]][0]["category_id"]
        w = model.get_classifier().weight[cat_index[cat]]
        cam = torch.einsum("c,chw->hw", w, feats).detach().numpy().astype(np.float32)
        cam = cv2.resize(cam, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        cam = (cam - cam.min()) / max(float(cam.max() - cam.min()), 1e-12)
        maps.append(np.clip(cam, 0, 1).astype(np.float32))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns[im["id"]]
                          if a["category_id"] == cat])
        gts.append(resize_boxes_wsol(boxes, (im["width"], im["height"]), (SIZE, SIZE)))
    return np.stack(maps), gts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=500)
    ap.add_argument("--device", default=None, help="torch device for the fast path (cuda)")
    ap.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco128")
    ap.add_argument("--intervals", default="0.01,0.001")
    args = ap.parse_args()

    maps, gts = [], []
    if (args.coco / "annotations" / "instances.json").is_file():
        cm, cg = coco_cams(min(128, args.maps // 4), args.coco)
        maps.append(cm)
        gts += cg
    sm, sg = smooth_maps(args.maps - sum(len(m) for m in maps), seed=0)
    maps.append(sm)
    gts += sg
    maps_np = np.concatenate(maps)
    cuda = bool(args.device and str(args.device).startswith("cuda"))
    engine = "torch" if cuda else "numba"
    print(f"{len(maps_np)} maps of {SIZE}x{SIZE} ({len(maps_np) - len(sm)} COCO128 CAMs, "
          f"{len(sm)} smooth random); fast path: {engine} on {args.device or 'cpu'}")
    if engine == "numba":
        # one-time cost, not timed below: numba compiles the sweep on the very first call
        # (or loads it from its on-disk cache, ~1 s)
        t0 = time.perf_counter()
        WsolEvaluator(0.01).accumulate(maps_np[:2], gts[:2])
        print(f"warm-up (JIT compile or cache load): {time.perf_counter() - t0:.2f} s")

    rows = []
    # wall-clock and CPU-time ratios are both printed: on a shared machine the CPU time of
    # this process is the steadier of the two
    for interval in (float(s) for s in args.intervals.split(",")):
        for multi, ious in ((False, (50,)), (True, (30, 50, 70))):
            ref = ReferenceBoxEvaluator(interval, ious, multi_contour_eval=multi)
            t0, c0 = time.perf_counter(), time.process_time()
            for m, g in zip(maps_np, gts):
                ref.accumulate(m, g)
            t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
            fast = BoxEvaluator(interval, ious, multi_contour=multi, device=args.device)
            if cuda:
                fast.accumulate(maps_np[:32], gts[:32])  # warm-up
                fast = BoxEvaluator(interval, ious, multi_contour=multi, device=args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            fast.accumulate(maps_np, gts)
            t_fast, c_fast = time.perf_counter() - t0, time.process_time() - c0
            for d in ious:
                assert np.array_equal(fast.counts[d], ref.num_correct[d].astype(np.int64)), \
                    f"counts differ at interval {interval}, multi={multi}, delta={d}"
            n = len(maps_np)
            rule = "all contours (V2)" if multi else "largest contour"
            rows.append((len(fast.thresholds), rule, t_ref / n * 1e3, t_fast / n * 1e3,
                         t_ref / t_fast, fast.compute()))
            print(f"{len(fast.thresholds):5d} thresholds, {rule:18s}: reference "
                  f"{t_ref / n * 1e3:7.2f} ms/map, fast {t_fast / n * 1e3:6.2f} ms/map, "
                  f"speed-up {t_ref / t_fast:5.1f}x (CPU time {c_ref / c_fast:5.1f}x), "
                  f"counts identical; "
                  f"MaxBoxAcc(δ=50) {fast.compute()['max_box_acc_iou50']:.2f}", flush=True)


if __name__ == "__main__":
    main()
