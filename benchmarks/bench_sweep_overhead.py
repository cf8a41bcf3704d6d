"""What a sweep costs beyond the work it schedules: the README's main job in one run.

Runs ``weakbench sweep search_spaces/cam.yaml --trials 4`` (the README's first command; ``--set
KEY=VALUE`` and the other flags shrink or change it) in this process, Ray started here through
the platform's own start-up (as ``--address local``) and timed, then prints one line

    overhead ratio X.XX (wall W s / train T s)

(the sweep's wall time against the trials' summed ``cost/train_seconds``: training and the
per-epoch validation that selects) and where the rest went, read off Ray Tune's experiment state
and the trials' MLflow runs:

* Ray start-up: the platform's ``ray.init`` of a local instance (and, for ``--executor train``,
  the State API check);
* driver set-up: dataset check, stored split, MLflow database and parent run, search space
  (``run_sweep`` start → ``Tuner.fit``);
* Tune start-up and the first trial's actor (``Tuner.fit`` → the first trial starts);
* per trial, summed over trials: start-up (Tune starts the trial → its MLflow run exists: for
  ``--executor train`` the Train controller and worker processes, imports, dataset opening),
  training + validation, test evaluation (``cost/eval_seconds``), model logging (the last cost
  metric → the run's end), teardown (the run's end → Tune's last result), the rest;
* between trials: trial slots left idle while Tune ran (peak concurrency × Tune's span − the
  summed trial time: stopping one trial's actor, starting the next one's, scheduling);
* dataset opening alone, timed in a fresh process (the synthetic default, index cached);
* after Tune: reconciling MLflow with Tune and the summary.

It writes the same figures, with every trial's parameters and metrics, to
``<out>/sweep_overhead.json`` next to the sweep's output (``--out``, default a new directory
under the system's temporary directory), so that a note can quote a run and two runs can be
checked for the same metrics.

Concurrency makes the per-trial sums exceed the wall time; the ratio is the figure to compare,
at equal concurrency (``--max-concurrent``). Not a test: run it by hand, e.g.
``python benchmarks/bench_sweep_overhead.py --set epochs=1``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _open_seconds(cache_dir: Path, data: str | None) -> float:
    """Seconds to open the dataset and its split in a fresh process (imports not counted)."""
    code = ("import time,sys; from weakbench.core.data import open_dataset; t=time.time(); "
            f"open_dataset({data!r}, cache_dir={str(cache_dir)!r}); print(time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--space", default=str(REPO / "search_spaces" / "cam.yaml"))
    ap.add_argument("--executor", default=None, choices=["train", "inline"], help="default: the sweep's default")
    ap.add_argument("--no-model", action="store_true", help="do not log models (the README's job logs them)")
    ap.add_argument("--eval-max-images", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override, as weakbench sweep --set")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="trials at once (default: as the sweep decides from the CPUs); compare ratios at equal concurrency")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the sweep and sweep_overhead.json go (default: a new temporary directory, kept)")
    args = ap.parse_args()

    import yaml
    from ray import tune

    from weakbench.platform import tracking
    from weakbench.platform.live import _tune_state
    from weakbench.platform.launch import ensure_ray
    from weakbench.platform.sweep import SweepOptions, resolve_executor, run_sweep

    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = yaml.safe_load(v)
    out = args.out or Path(tempfile.mkdtemp(prefix="wb-bench-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    opts = SweepOptions(space=args.space, output_dir=str(out), trials=args.trials, address="local",
                        eval_max_images=args.eval_max_images, log_model=not args.no_model, overrides=overrides,
                        num_cpus=args.num_cpus, max_concurrent=args.max_concurrent, baselines=False,
                        **({"executor": args.executor} if args.executor else {}))
    executor = resolve_executor(opts)

    fit_called: list[float] = []
    fit = tune.Tuner.fit

    def timed_fit(self):
        fit_called.append(time.time())
        return fit(self)

    tune.Tuner.fit = timed_fit
    import ray

    t0 = time.time()
    ensure_ray(opts)
    t_ray = time.time() - t0
    t1 = time.time()
    s = run_sweep(opts)
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
    t_fit = fit_called[0] if fit_called else t1
    tune_start = min((m["start_time"] for _, m in trials.values() if m.get("start_time")), default=t_fit)
    last_end = tune_start
    intervals: list[tuple[float, float]] = []
    rows = []
    for r in runs:
        tid = r.data.tags.get("weakbench.trial_id")
        if tid not in trials:
            continue
        _, meta = trials[tid]
        start, end = meta.get("start_time"), meta.get("last_result_time")
        if not start or not end:
            continue
        last_end = max(last_end, end)
        intervals.append((start, end))
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
        rows.append({"trial_id": tid, "status": r.info.status, "params": dict(r.data.params),
                     "metrics": dict(sorted(r.data.metrics.items())), "seconds": pieces, "start": start, "end": end})
    tune_span = last_end - tune_start
    peak = _peak_concurrency(intervals)
    between = max(0.0, peak * tune_span - total_trial)
    opening = _open_seconds(out / "data_cache", None)

    n = max(1, len(rows))
    ratio = wall / max(train, 1e-9)
    table = {"Ray start-up": t_ray, "driver set-up (data, split, MLflow)": t_fit - t1,
             "Tune start-up + first actor": tune_start - t_fit,
             **{f"trial {k}": v for k, v in parts.items()},
             "between trials (idle slots)": between,
             "after Tune (reconcile, summary)": t_end - last_end}
    print(f"overhead ratio {ratio:.2f} (wall {wall:.1f} s / train {train:.1f} s)")
    print(f"README main job: {s.num_trials} trials ({s.num_finished} finished, {s.num_stopped} stopped early, "
          f"{s.num_failed} failed), executor={executor}, peak concurrency {peak}, overrides={overrides or 'none'}")
    print(f"{'part':<38}{'seconds':>10}{'per trial':>11}")
    for k, v in table.items():
        per = f"{v / n:11.1f}" if k.startswith(("trial ", "between")) else ""
        print(f"{k:<38}{v:10.1f}{per}")
    print(f"{'  of trial start-up: dataset opening':<38}{opening * n:10.1f}{opening:11.1f}")
    print(f"summed trial time {total_trial:.1f} s over Tune's {tune_span:.1f} s "
          f"(mean concurrency {total_trial / max(1e-9, tune_span):.2f})")
    doc = {"ratio": ratio, "wall_seconds": wall, "train_seconds": train, "executor": executor,
           "peak_concurrency": peak, "mean_concurrency": total_trial / max(1e-9, tune_span),
           "trials": s.num_trials, "finished": s.num_finished, "stopped": s.num_stopped, "failed": s.num_failed,
           "overrides": overrides, "log_model": not args.no_model, "breakdown_seconds": table,
           "dataset_opening_seconds": opening, "summed_trial_seconds": total_trial, "tune_span_seconds": tune_span,
           "sweep_dir": s.sweep_dir, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_average": list(__import__("os").getloadavg()), "rows": rows}
    path = out / "sweep_overhead.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"written {path}")


if __name__ == "__main__":
    main()
