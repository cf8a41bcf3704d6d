"""Per-box time of BBAM's mask optimisation: batched (many boxes per forward) against one box at a time.

Same process, same detector (eval mode), same boxes, same iterations. Two runs of
``weakbench.methods.bbam_ops.optimise_box_masks``:

* **sequential**: ``chunk_size=1``, the official code's loop (one perturbed image per backbone
  forward, one box after the other);
* **batched**: ``chunk_size=--chunk`` (default: all boxes), every iteration one forward over the
  stacked perturbed images of all boxes (from several images), one Adam step over all masks.

It prints wall time per box per iteration for each, their ratio, and the largest difference
between the two sets of masks (they are the same optimisation; expect float rounding only).
The detector is untrained and the images random: the cost does not depend on the weights. Each
box gets ``--proposals`` positive proposals (the code caps O⁺ at 100).

On a CPU the ratio depends mostly on threading: the work is compute-bound (convolution and
RoIAlign backward), so with ``--threads 1`` batching saves only per-call overhead; with several
OpenMP threads on a loaded machine, batch-1 kernels lose far more to thread synchronisation than
batched ones, which inflates the ratio. The batching is meant for accelerators, where one small
image leaves the device mostly idle.

Run: ``python benchmarks/bench_bbam_batching.py [--backbone resnet18 --size 160 --boxes 16 --threads 1]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from weakbench.methods.bbam_ops import BoxJob, jitter_proposals, mask_stride, optimise_box_masks
from weakbench.methods.detection import build_detector, detector_forward_heads

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jobs(det, images: torch.Tensor, boxes_per_image: int, proposals: int, num_classes: int) -> list[BoxJob]:
    g = torch.Generator().manual_seed(0)
    b, _, h, w = images.shape
    jobs = []
    for i in range(b):
        for _ in range(boxes_per_image):
            wh = torch.rand(2, generator=g) * 0.5 + 0.2  # boxes of 20–70 % of the side
            xy = torch.rand(2, generator=g) * (1 - wh)
            box = torch.tensor([xy[0] * w, xy[1] * h, (xy[0] + wh[0]) * w, (xy[1] + wh[1]) * h])
            c = int(torch.randint(num_classes, (1,), generator=g))
            props = jitter_proposals(box, proposals, image_size=(h, w), generator=g)
            with torch.no_grad():
                p, r = detector_forward_heads(det, images[i:i + 1], [props])
            r = r.reshape(len(props), -1, 4)
            stride = mask_stride(float(wh[0] * wh[1]), scale=min(h, w) / 800)
            jobs.append(BoxJob(i, box, c, props, p[:, c + 1], r[:, c + 1], stride, None, (h, w)))
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=160, help="detector input side (square images)")
    p.add_argument("--boxes", type=int, default=16, help="boxes in all")
    p.add_argument("--images", type=int, default=4, help="images the boxes are spread over")
    p.add_argument("--proposals", type=int, default=30, help="positive proposals per box (|O+|, at most 100 in the code)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--chunk", type=int, default=0, help="boxes per batched forward (0: all)")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--box-head", type=int, default=1024, help="width of the two-layer box head")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.boxes % args.images:
        p.error("--boxes must be a multiple of --images")
    dev = torch.device(args.device)
    torch.manual_seed(0)
    det = build_detector("faster_rcnn", args.backbone, args.classes, min_size=args.size, max_size=args.size,
                         image_mean=MEAN, image_std=STD, fpn_channels=args.fpn_channels,
                         box_representation_size=args.box_head).to(dev).eval()
    images = torch.randn((args.images, 3, args.size, args.size), generator=torch.Generator().manual_seed(1)).to(dev)
    jobs = _jobs(det, images, args.boxes // args.images, args.proposals, args.classes)

    def run(chunk: int) -> tuple[float, list[torch.Tensor]]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        masks = optimise_box_masks(det, images, jobs, iterations=args.iterations, chunk_size=chunk)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, masks

    optimise_box_masks(det, images, jobs[:2], iterations=1)  # warm-up (allocator, kernels)
    t_seq, m_seq = run(1)
    t_bat, m_bat = run(args.chunk or len(jobs))
    diff = max(float((a - b).abs().max()) for a, b in zip(m_seq, m_bat))
    per = args.boxes * args.iterations
    print(f"backbone={args.backbone} input={args.size}px boxes={args.boxes} over {args.images} images "
          f"|O+|={args.proposals} iterations={args.iterations} fpn={args.fpn_channels} box_head={args.box_head} "
          f"threads={torch.get_num_threads()} device={dev}")
    print(f"{'mode':<11} {'total s':>8} {'ms/box/iter':>12}")
    print(f"{'sequential':<11} {t_seq:>8.2f} {1000 * t_seq / per:>12.1f}")
    print(f"{'batched':<11} {t_bat:>8.2f} {1000 * t_bat / per:>12.1f}   (chunk {args.chunk or len(jobs)})")
    print(f"per-box speed-up batched/sequential: {t_seq / t_bat:.2f}x; max |mask difference| {diff:.2e}")


if __name__ == "__main__":
    main()
