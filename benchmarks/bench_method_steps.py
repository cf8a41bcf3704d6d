"""Training-step cost of each classifier→CAM method as a ratio to the ``cam`` baseline.

Same process, same backbone, batch and input size for every method (default: resnet18, batch 10,
128 px, CPU). For each method it reports

* the measured wall time of one ``training_step`` (median of ``--repeats`` after ``--warmup``),
  and its ratio to ``cam``;
* the expected ratio from counting passes (a forward F, a full backward ≈ 2F; a backward that
  only needs input gradients ≈ F):

  - cam: F + 2F = 3F;
  - minmaxcam: Stage I 3F + Stage II: B*(I) without gradient (F), B*(I ⊙ H) forward (F) and its
    backward to the input through the frozen backbone (≈ F) = 6F → 2.0 (two extra frozen
    forwards alone would give 5F/3F ≈ 1.67);
  - puzzlecam: the full image 3F + the tiles (same pixels) 3F = 6F → 2.0;
  - topgap: the backbone's 3F plus the head's 3×3 convolutions (not counted by passes; see FLOPs);

* the ratio of FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` over one step
  (convolutions and matmuls, forward and backward), which refines the pass count.

Run: ``python benchmarks/bench_method_steps.py [--backbone resnet18 --batch 10 --size 128]``.
``--batch`` must be a multiple of MinMaxCAM's ``--set-size`` (default 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from weakbench.methods import build_method
from weakbench.methods.base import StepContext

EXPECTED_PASSES = {"cam": 3.0, "minmaxcam": 6.0, "puzzlecam": 6.0, "topgap": 3.0}


def _batch(batch: int, size: int, classes: int, set_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(batch, classes)
    for i in range(batch):  # consecutive set_size images share class (i // set_size) % classes
        labels[i, (i // set_size) % classes] = 1
        labels[i, torch.randint(classes, (1,), generator=g)] = 1
    return {"image": torch.randn(batch, 3, size, size, generator=g), "labels": labels, "index": torch.arange(batch)}


def _setup(name: str, args):
    params = {"backbone": args.backbone, "input_size": args.size, "batch_size": args.batch}
    if name == "minmaxcam":
        params["set_size"] = args.set_size
    m = build_method(name, params, num_classes=args.classes)
    torch.manual_seed(0)
    model = m.build_model().train()
    return m, model, m.configure_optimizers(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--set-size", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--methods", default="cam,minmaxcam,puzzlecam,topgap")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if methods[0] != "cam":
        methods = ["cam"] + [m for m in methods if m != "cam"]
    batch = _batch(args.batch, args.size, args.classes, args.set_size)
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=10, total_steps=20, device=torch.device("cpu"), unwrap=lambda m: m)

    setups = {name: _setup(name, args) for name in methods}
    flops: dict[str, int] = {}
    for name, (m, model, opts) in setups.items():
        with FlopCounterMode(display=False) as fc:
            m.training_step(model, batch, opts, ctx)
        flops[name] = fc.get_total_flops()
        for _ in range(args.warmup):
            m.training_step(model, batch, opts, ctx)
    # interleave the methods so that load changes on a shared machine hit all of them alike
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, (m, model, opts) in setups.items():
            t0 = time.perf_counter()
            m.training_step(model, batch, opts, ctx)
            samples[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(v) for name, v in samples.items()}

    print(f"backbone={args.backbone} batch={args.batch} input={args.size}px classes={args.classes} "
          f"threads={torch.get_num_threads()} device=cpu repeats={args.repeats} (median, interleaved)")
    print(f"{'method':<10} {'step s':>8} {'ratio':>7} {'passes':>7} {'FLOPs G':>9} {'FLOP ratio':>10}")
    for name in methods:
        print(f"{name:<10} {times[name]:>8.3f} {times[name] / times['cam']:>7.2f} "
              f"{EXPECTED_PASSES[name] / EXPECTED_PASSES['cam']:>7.2f} {flops[name] / 1e9:>9.1f} "
              f"{flops[name] / flops['cam']:>10.2f}")


if __name__ == "__main__":
    main()
