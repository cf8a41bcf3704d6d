"""What a sweep costs beyond the work it schedules: the README's main job in one run.

Runs ``weakbench sweep search_spaces/cam.yaml --trials 4`` (the README's first command; ``--set
KEY=VALUE`` and the other flags shrink or change it) in this process, Ray started here and timed,
then prints the sweep's wall time against the trials' summed ``cost/train_seconds`` (training and
the per-epoch validation that selects) and where the rest went, read off Ray Tune's experiment
state and the trials' MLflow runs:

* Ray start-up: ``ray.init`` of the local instance;
* before Tune: dataset check, stored split, MLflow parent run (``run_sweep`` start → Tune start);
* per trial, summed over trials: start-up (Tune starts the trial → its MLflow run exists: the
  trial actor, for ``--executor train`` the Train controller and worker processes, imports, dataset
  opening), training + validation, test evaluation (``cost/eval_seconds``), model logging (the last
  cost metric → the run's end), teardown (the run's end → Tune's last result), the rest;
* dataset opening alone, timed in a fresh process (the synthetic default, index cached);
* after Tune: reconciling MLflow with Tune and the summary.

Concurrency makes the per-trial sums exceed the wall time; the ratio is the figure to compare.
Not a test: run it by hand, e.g. ``python benchmarks/bench_sweep_overhead.py --set epochs=1``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _open_seconds(cache_dir: Path, data: str | None) -> float:
    """Seconds to open the dataset and its split in a fresh process (imports not counted)."""
    code = ("import time,sys; from weakbench.platform.data import open_dataset; t=time.time(); "
            f"open_dataset({data!r}, cache_dir={str(cache_dir)!r}); print(time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--space", default=str(REPO / "search_spaces" / "cam.yaml"))
    ap.add_argument("--executor", default="train", choices=["train", "inline"])
    ap.add_argument("--no-model", action="store_true", help="do not log models (the README's job logs them)")
    ap.add_argument("--eval-max-images", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override, as weakbench sweep --set")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args()

    import os

    import ray
    import yaml

    from weakbench.platform import tracking
    from weakbench.platform.live import _tune_state
    from weakbench.platform.sweep import SweepOptions, run_sweep

    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = yaml.safe_load(v)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        t0 = time.time()
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=True,
                 logging_level="ERROR", log_to_driver=False)
        t_ray = time.time() - t0
        t1 = time.time()
        s = run_sweep(SweepOptions(space=args.space, output_dir=str(out), trials=args.trials, executor=args.executor,
                                   eval_max_images=args.eval_max_images, log_model=not args.no_model,
                                   overrides=overrides, num_cpus=args.num_cpus))
        t_end = time.time()
        ray.shutdown()
        wall = t_end - t0

        trials = {t["trial_id"]: (t, m) for t, m in _tune_state(Path(s.sweep_dir) / "tune")}
        client = tracking.client_for(s.tracking_uri)
        exp = client.get_experiment_by_name(s.experiment)
        runs = tracking.child_runs(client, exp.experiment_id, s.parent_run_id)
        parts = {"start-up": 0.0, "training + validation": 0.0, "test evaluation": 0.0, "model logging": 0.0,
                 "teardown": 0.0, "rest": 0.0}
        total_trial = train = 0.0
        tune_start = min((m["start_time"] for _, m in trials.values() if m.get("start_time")), default=t1)
        last_end = tune_start
        for r in runs:
            tid = r.data.tags.get("weakbench.trial_id")
            if tid not in trials:
                continue
            _, meta = trials[tid]
            start, end = meta.get("start_time"), meta.get("last_result_time")
            if not start or not end:
                continue
            last_end = max(last_end, end)
            run_start = r.info.start_time / 1000.0
            run_end = (r.info.end_time or r.info.start_time) / 1000.0
            tr = r.data.metrics.get("cost/train_seconds", 0.0)
            ev = r.data.metrics.get("cost/eval_seconds", 0.0)
            cost_hist = client.get_metric_history(r.info.run_id, "cost/cpu_hours")
            logged = cost_hist[-1].timestamp / 1000.0 if cost_hist else run_end
            pieces = {"start-up": run_start - start, "training + validation": tr, "test evaluation": ev,
                      "model logging": max(0.0, run_end - logged), "teardown": max(0.0, end - run_end)}
            pieces["rest"] = (end - start) - sum(pieces.values())
            for k, v in pieces.items():
                parts[k] += v
            total_trial += end - start
            train += tr
        opening = _open_seconds(out / "data_cache", None)

    n = max(1, len(runs))
    print(f"README main job: {s.num_trials} trials ({s.num_finished} finished, {s.num_stopped} stopped early, "
          f"{s.num_failed} failed), executor={args.executor}, overrides={overrides or 'none'}")
    print(f"sweep wall time {wall:.1f} s / summed cost/train_seconds {train:.1f} s = {wall / max(train, 1e-9):.2f}x")
    print(f"{'part':<32}{'seconds':>10}{'per trial':>11}")
    print(f"{'Ray start-up':<32}{t_ray:10.1f}")
    print(f"{'before Tune (data, split, MLflow)':<32}{tune_start - t1:10.1f}")
    for k, v in parts.items():
        print(f"{'trial ' + k:<32}{v:10.1f}{v / n:11.1f}")
    print(f"{'  of start-up: dataset opening':<32}{opening * n:10.1f}{opening:11.1f}")
    print(f"{'after Tune (reconcile, summary)':<32}{t_end - last_end:10.1f}")
    print(f"summed trial time {total_trial:.1f} s over Tune's {last_end - tune_start:.1f} s "
          f"(mean concurrency {total_trial / max(1e-9, last_end - tune_start):.2f})")


if __name__ == "__main__":
    main()
