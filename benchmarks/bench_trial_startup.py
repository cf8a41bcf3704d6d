"""Per-trial start-up cost of a sweep: the Ray Train executor against the inline executor.

Runs the same tiny 2-trial sweep of the CAM baseline on the synthetic default twice in one
process (same Ray instance): once with a ``TorchTrainer`` per trial (``--executor train``: a Train
controller and a worker actor, each a fresh process importing torch), once with the trial
trained inside the Tune trial actor (``--executor inline``). Prints wall time per trial, the
training time the trials logged (``cost/train_seconds``), the difference (start-up + evaluation
+ logging), and the ratio. Not a test: run it by hand.

    python benchmarks/bench_trial_startup.py [--trials 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()

    import ray

    from weakbench.platform import tracking
    from weakbench.platform.sweep import SweepOptions, run_sweep

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        space = Path(d) / "space.yaml"
        space.write_text(yaml.safe_dump({
            "method": "cam", "fixed": {"epochs": 1, "input_size": 64, "batch_size": 16, "backbone": "resnet18"},
            "search": {"lr": {"loguniform": [0.005, 0.05]}}, "scheduler": "none"}))
        # warm the synthetic data cache so neither executor pays for generating it
        from weakbench.core.data import open_dataset

        open_dataset(None, cache_dir=Path(d) / "out" / "data_cache")
        for executor in ("train", "inline"):
            t0 = time.time()
            s = run_sweep(SweepOptions(space=str(space), output_dir=str(Path(d) / "out"), name=f"bench-{executor}",
                                       trials=args.trials, executor=executor, eval_max_images=8, num_overlays=0,
                                       log_model=False, max_concurrent=1, baselines=False))
            wall = time.time() - t0
            client = tracking.client_for(s.tracking_uri)
            exp = client.get_experiment_by_name(s.experiment)
            runs = tracking.child_runs(client, exp.experiment_id, s.parent_run_id)
            train_s = sum(r.data.metrics.get("cost/train_seconds", 0.0) for r in runs)
            rows[executor] = (wall / args.trials, train_s / args.trials, s.num_finished)
    ray.shutdown()
    print(f"{'executor':<8} {'wall/trial s':>12} {'train/trial s':>13} {'overhead/trial s':>16} finished")
    for k, (w, t, n) in rows.items():
        print(f"{k:<8} {w:12.1f} {t:13.1f} {w - t:16.1f} {n}")
    print(f"wall-time ratio train/inline: {rows['train'][0] / rows['inline'][0]:.2f}x; "
          f"start-up saved per trial: {rows['train'][0] - rows['inline'][0]:.1f} s")


if __name__ == "__main__":
    main()
