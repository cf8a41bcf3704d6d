"""Training throughput: is the input pipeline or the engine the bottleneck? (issue 22)

One run measures, on the same model, batch and images (ILSVRC validation JPEGs, decoded and
resized to ``--size``, random flips):

1. **input pipeline alone**: images/s of the engine's training ``DataLoader`` (decode, resize,
   flip, normalise, collate; seeded per sample) with 0, 1, ... loader workers, nothing else;
2. **bare forward + backward**: images/s of the method's ``training_step`` (CAM: ResNet-18,
   multi-label soft-margin loss, SGD) on batches already in memory on the device, in fp32 and,
   for the choice of defaults, under bf16 autocast and in ``channels_last``;
3. **engine training epoch**: images/s of a real inline trial
   (:func:`weakbench.platform.engine.run_trial`) over the same training images, with
   ``--loader-workers 0`` (the loop as it was before loader workers) and with the default for a
   trial holding ``--cpus`` CPUs. An epoch's time is the difference of the trial's
   ``cost/train_seconds`` between consecutive epochs (the training loop plus the validation of
   one image), averaged over the epochs after the first (which starts the loader workers).

The figure to watch is **engine / bare** (the time an engine epoch takes over the bare forward
and backward passes of the same images): 1.0 means the engine adds nothing. On a CUDA device the
bare and engine figures run on the GPU and the share of the engine's epoch the GPU waited for
data is estimated as ``1 - bare / engine``.

Run (about 3-6 minutes on the 2-core development machine)::

    PYTHONPATH=. python benchmarks/throughput.py --data ../shared/data/ilsvrc_val1300/metadata

Compare only ratios measured in one run: the machine is shared, absolute images/s move with
the load of other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def pipeline_rate(source, indices, size: int, batch: int, workers: int, device, epochs: int = 2) -> float:
    """Images/s of the engine's training loader alone (first epoch, which starts the workers, excluded)."""
    from weakbench.core.data import ClassificationDataset, collate_classification
    from weakbench.core.loading import SeededDataset, SeededSampler, make_loader

    ds = ClassificationDataset(source, indices, size, train=True)
    sampler = SeededSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0), 0)
    loader = make_loader(SeededDataset(ds), workers=workers, device=device, batch_size=batch, sampler=sampler,
                         collate_fn=collate_classification)
    times = []
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(b["image"]) for b in loader)
        times.append(time.perf_counter() - t0)
    return n / statistics.mean(times[1:])


def bare_rate(method, images, labels, steps: int, device, dtype=None, channels_last: bool = False) -> float:
    """Images/s of ``method.training_step`` on one in-memory batch repeated ``steps`` times (after 2 warm-up steps)."""
    from weakbench.methods.pipeline import StepContext
    from weakbench.core.accel import autocast

    torch.manual_seed(0)
    model = method.build_model().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opts = method.configure_optimizers(model)
    model.train()
    batch = {"image": images.to(device), "labels": labels.to(device), "index": torch.arange(len(images))}
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=steps, total_steps=steps, device=device, unwrap=lambda m: m)

    def step():
        with autocast(device, dtype):
            method.training_step(model, batch, opts, ctx)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(images) / (time.perf_counter() - t0)


def engine_rate(data: str, cache: Path, splits_path: Path, params: dict, n_train: int, *, cpus: float,
                loader_workers: int | None, use_gpu: bool, out: Path) -> tuple[float, int]:
    """Images/s of the engine's training epochs (after the first) and the loader workers it used."""
    from weakbench.platform import tracking
    from weakbench.platform.engine import TrialSpec, run_trial
    from weakbench.core.loading import default_loader_workers

    spec = TrialSpec(method="cam", params=params, data=data, data_cache=str(cache), splits_path=str(splits_path),
                     trial_dir=str(out / "trial"), tracking_uri=tracking.default_tracking_uri(out), log_model=False,
                     num_overlays=0, eval_max_images=1, cpus_per_worker=cpus, loader_workers=loader_workers,
                     use_gpu=use_gpu)
    run_trial(spec, executor="inline")
    client = tracking.client_for(spec.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])[0]
    secs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "cost/train_seconds"))
    per_epoch = [b[1] - a[1] for a, b in zip(secs, secs[1:])]
    return n_train / statistics.mean(per_epoch), default_loader_workers(cpus, loader_workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/ilsvrc_val1300/metadata")
    ap.add_argument("--images", type=int, default=96, help="training images (the first N records)")
    ap.add_argument("--size", type=int, default=160, help="input side, pixels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3, help="engine epochs (the first is not timed)")
    ap.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs the trial holds")
    ap.add_argument("--workers", default="0,1", help="loader worker counts of the pipeline-alone figure")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from weakbench.methods import build_method
    from weakbench.core.data import ClassificationDataset, collate_classification, open_dataset, save_splits
    from weakbench.core.loading import default_loader_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(args.cpus)))
    tmp = Path(tempfile.mkdtemp(prefix="wb-throughput-"))
    source = open_dataset(args.data, cache_dir=tmp / "cache")
    n = min(args.images, len(source.records) - 2)
    train = list(range(n))
    splits_path = tmp / "splits.json"
    save_splits({"train": train, "val": [n], "test": [n + 1]}, splits_path, fingerprint=source.fingerprint)
    params = {"backbone": "resnet18", "input_size": args.size, "batch_size": args.batch, "epochs": args.epochs,
              "lr": 0.01, "seed": 0}
    method = build_method("cam", params, num_classes=source.num_classes, multilabel=source.multilabel)
    steps = max(4, n // args.batch)
    res: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "cpus": args.cpus, "images": n,
                 "size": args.size, "batch": args.batch, "data": args.data}
    t_all = time.perf_counter()

    print(f"throughput: {n} ILSVRC images at {args.size} px, batch {args.batch}, ResNet-18 CAM, device {device}, "
          f"{torch.get_num_threads()} torch threads, trial holds {args.cpus:g} CPUs", flush=True)
    res["pipeline"] = {}
    for w in [int(x) for x in args.workers.split(",")]:
        r = pipeline_rate(source, train, args.size, args.batch, w, device)
        res["pipeline"][w] = r
        print(f"  input pipeline alone, {w} loader worker(s): {r:8.1f} images/s"
              f" ({r / max(1, w):.1f} per worker)", flush=True)

    first = collate_classification([ClassificationDataset(source, train[:args.batch], args.size, train=True)[i]
                                    for i in range(min(args.batch, n))])
    res["bare"] = {}
    variants = [("fp32", None, False), ("bf16 autocast", torch.bfloat16, False), ("fp32 channels_last", None, True)]
    for name, dtype, cl in variants:
        r = bare_rate(method, first["image"], first["labels"], steps, device, dtype, cl)
        res["bare"][name] = r
        print(f"  bare forward+backward, {name:18s}: {r:8.1f} images/s", flush=True)
    # the engine's default precision on this device is the bare figure it is compared with
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    bare_key, bare_dtype = ("bf16 autocast", torch.bfloat16) if gpu_bf16 else ("fp32", None)
    bare = res["bare"][bare_key]

    res["engine"] = {}
    for label, lw in (("0 loader workers (as before)", 0), ("default loader workers", None)):
        r, used = engine_rate(args.data, tmp / "cache", splits_path, params, n, cpus=args.cpus, loader_workers=lw,
                              use_gpu=device.type == "cuda", out=tmp / f"engine_{lw}")
        res["engine"][label] = {"images_per_s": r, "loader_workers": used, "engine_over_bare": bare / r}
        extra = f", GPU waited for data ~{max(0.0, 1 - r / bare):.0%} of the epoch" if device.type == "cuda" else ""
        print(f"  engine epoch, {label} ({used}): {r:8.1f} images/s, engine / bare = {bare / r:.2f}x{extra}", flush=True)
    # the machine may be shared: the bare figure again after the engine's, and the engine compared
    # with the mean of the two (a change of load during the run shows as a gap between them)
    again = bare_rate(method, first["image"], first["labels"], steps, device, bare_dtype, False)
    res["bare_again"] = again
    mean_bare = (bare + again) / 2
    print(f"  bare forward+backward, {bare_key}, again after the engine (load check): {again:8.1f} images/s", flush=True)
    for label, e in res["engine"].items():
        e["engine_over_mean_bare"] = mean_bare / e["images_per_s"]
        print(f"  engine / bare (mean of both bare runs), {label}: {e['engine_over_mean_bare']:.2f}x", flush=True)
    res["seconds"] = time.perf_counter() - t_all
    print(f"throughput: done in {res['seconds']:.0f} s; default loader workers for this trial: "
          f"{default_loader_workers(args.cpus)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
