"""Leaderboard at scale: from the Parquet results store versus straight from MLflow.

1. Parquet path: ``--n-parquet`` (10,000) synthetic runs written to a results store
   (one file per (dataset, method) partition), then timed: ``read_store`` + ``build_leaderboard``
   (2000 bootstrap resamples). Target: under 2 s.
2. MLflow path: ``--n-mlflow`` real runs (default 1,500; one ``create_run`` + one ``log_batch``
   + ``set_terminated`` each) in a fresh sqlite store, then timed: ``fetch_trial_runs`` (paged
   ``search_runs`` and, unless ``--no-overlays``, one ``list_artifacts`` per run) + ``build_leaderboard``.
   Measured at two sizes (half and full) to check that the cost is linear in runs before
   extrapolating to ``--n-parquet`` runs.

Both paths run in the same process; the ratio MLflow / Parquet is printed. Usage::

    python benchmarks/bench_leaderboard.py [--n-parquet 10000] [--n-mlflow 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from weakbench.dashboards.synthetic import log_synthetic_sweeps, synthetic_table
from weakbench.platform.leaderboard import build_leaderboard
from weakbench.platform.results import fetch_trial_runs, read_store, write_table


def _time(fn, repeat: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def bench_parquet(n: int, tmp: Path, repeat: int) -> dict:
    t0 = time.perf_counter()
    table = synthetic_table(n)
    write_table(table, tmp / "store")
    prep = time.perf_counter() - t0

    def run():
        return build_leaderboard(read_store(tmp / "store"))

    med, times, lb = _time(run, repeat)
    t_read, _, _ = _time(lambda: read_store(tmp / "store"), repeat)
    return {"runs": n, "rows": lb.num_rows, "prepare_s": prep, "read_plus_leaderboard_s": med,
            "read_only_s": t_read, "all_s": times}


def bench_mlflow(n: int, tmp: Path, overlays: bool) -> dict:
    uri = f"sqlite:///{tmp}/mlflow.db"
    methods = ("cam", "minmaxcam", "puzzlecam", "topgap")
    n_seeds = 3
    half = n // 2
    results = {}
    logged = 0
    for size in (half, n):
        per = size - logged
        n_configs = max(1, per // (len(methods) * n_seeds))
        t0 = time.perf_counter()
        ids = log_synthetic_sweeps(uri, methods=methods, n_configs=n_configs, n_seeds=n_seeds, seed=size,
                                   artifact_location=(tmp / "artifacts").as_uri())
        log_s = time.perf_counter() - t0
        logged += len(ids)
        t0 = time.perf_counter()
        table = fetch_trial_runs(uri, list_overlays=overlays)
        fetch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lb = build_leaderboard(table)
        lb_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fetch_trial_runs(uri, list_overlays=False)
        search_only_s = time.perf_counter() - t0
        results[logged] = {"log_s": log_s, "log_runs": len(ids), "fetch_s": fetch_s, "leaderboard_s": lb_s,
                           "search_only_s": search_only_s, "rows": lb.num_rows, "runs_in_table": table.num_rows}
    return {"uri": uri, "by_size": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-parquet", type=int, default=10_000)
    ap.add_argument("--n-mlflow", type=int, default=1_500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-overlays", action="store_true", help="skip list_artifacts per run on the MLflow path")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pq_res = bench_parquet(args.n_parquet, tmp, args.repeat)
        print(f"Parquet: {pq_res['runs']} runs -> {pq_res['rows']} leaderboard rows; read_store + build_leaderboard "
              f"median {pq_res['read_plus_leaderboard_s']:.3f} s over {args.repeat} (read alone {pq_res['read_only_s']:.3f} s); "
              f"target < 2 s: {'met' if pq_res['read_plus_leaderboard_s'] < 2 else 'MISSED'}")
        ml = bench_mlflow(args.n_mlflow, tmp, overlays=not args.no_overlays)
        sizes = sorted(ml["by_size"])
        for s in sizes:
            r = ml["by_size"][s]
            print(f"MLflow ({s} runs in sqlite): logging {r['log_runs']} runs took {r['log_s']:.1f} s "
                  f"({1000 * r['log_s'] / max(1, r['log_runs']):.1f} ms/run); MLflow -> table {r['fetch_s']:.2f} s "
                  f"(again without listing overlays: {r['search_only_s']:.2f} s), "
                  f"build_leaderboard {r['leaderboard_s']:.3f} s")
        (s1, s2) = sizes
        t1 = ml["by_size"][s1]["fetch_s"] + ml["by_size"][s1]["leaderboard_s"]
        t2 = ml["by_size"][s2]["fetch_s"] + ml["by_size"][s2]["leaderboard_s"]
        slope = (t2 - t1) / max(1, s2 - s1)
        extrap = t2 + slope * (args.n_parquet - s2)
        per_run = t2 / s2
        print(f"MLflow path per run: {1000 * per_run:.2f} ms at {s2} runs, marginal {1000 * slope:.2f} ms/run between "
              f"{s1} and {s2}; extrapolated to {args.n_parquet} runs: {extrap:.1f} s "
              f"(linear; MLflow/Parquet ratio ≈ {extrap / pq_res['read_plus_leaderboard_s']:.0f}×)")
        if args.json:
            args.json.write_text(json.dumps({"parquet": pq_res, "mlflow": ml, "mlflow_extrapolated_s": extrap}, indent=2,
                                            default=str))


if __name__ == "__main__":
    main()
