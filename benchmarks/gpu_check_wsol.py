"""GPU check, WSOL part: the torch (CUDA) box-metric engine against the CPU one on the same maps.

Scores ``--maps`` smooth random 224 x 224 maps (the shape of an upsampled CAM, from
``bench_wsol_metrics.smooth_maps``) with :func:`weakbench.core.metrics.box_scores` on the CPU
(``engine="auto"``: the compiled numba sweep) and with the torch engine on ``--device`` (CUDA when
visible; on a machine without a GPU the torch engine on the CPU, the code path a GPU runs), then
prints one line: whether the per-level best-IoU tables (hence every count of MaxBoxAcc and
MaxBoxAccV2 at every threshold) are identical, and the speed ratio. Exit 1 when they differ.

    PYTHONPATH=. python benchmarks/gpu_check_wsol.py [--maps 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wsol_metrics import smooth_maps  # noqa: E402

from weakbench.core.metrics import box_scores  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    maps, gts = smooth_maps(args.maps, seed=0)
    box_scores(maps[:2], gts[:2], engine="auto")  # compile / warm up both paths
    box_scores(maps[:2], gts[:2], device=args.device, engine="torch")
    t0 = time.perf_counter()
    cpu = box_scores(maps, gts, engine="auto")
    t_cpu = time.perf_counter() - t0
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dev = box_scores(maps, gts, device=args.device, engine="torch")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_dev = time.perf_counter() - t0
    same = all(np.array_equal(np.asarray(cpu[k]), np.asarray(dev[k])) for k in ("multi", "largest", "max_byte"))
    print(f"wsol engine: torch on {args.device} vs CPU on {args.maps} maps of 224x224: tables "
          f"{'identical' if same else 'DIFFER'}; CPU {1000 * t_cpu / args.maps:.2f} ms/map, {args.device} "
          f"{1000 * t_dev / args.maps:.2f} ms/map, speed-up {t_cpu / t_dev:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
