"""benchmarks/quality_ccgr_stop_rule.py --part report: the trial time in a table's header is the
trials' logged cost/*_seconds, not the wall time of the run that recorded them (a trial resumed
after an interruption is recorded by a run that finds its stages done)."""

from __future__ import annotations

import argparse
import pickle

from benchmark_scripts import load_benchmark


def _bench():
    return load_benchmark("quality_ccgr_stop_rule")


def test_report_header_counts_logged_stage_time_of_resumed_trials(tmp_path):
    bench = _bench()
    calls = ({(0, 1): 1}, [(0, 1, 0.9, True)])  # one GT instance, found: mAP^r 100
    rnd = {"box_before": {0: [0.5]}, "box_after": {0: [0.6]}, "pseudo": calls, "instance": calls,
           "instance_r25": calls}
    costs = {"any": {"cost/train_seconds": 900.0, "cost/refine_r1_seconds": 200.0, "cost/instance_eval_seconds": 17.0},
             "region": {"cost/train_seconds": 400.0, "cost/instance_eval_seconds": 5.0},
             "off": {"cost/train_seconds": 300.0, "cost/instance_eval_seconds": 8.0}}
    (tmp_path / "records").mkdir()
    for stop in bench.STOPS:  # `any` was resumed: its recording run found every stage done (0 s)
        rec = {"name": f"default-s0-{stop}", "params": {**bench.SETTINGS, "seed": 0, "peak_stop": stop},
               "seconds": 0.0 if stop == "any" else 100.0, "logged": {"test/mask_rcnn/map_r50": 100.0},
               "costs": costs[stop], "rounds": {"test_images": [0], 1: rnd}}
        (tmp_path / "records" / f"default-s0-{stop}.pkl").write_bytes(pickle.dumps(rec))
    args = argparse.Namespace(seeds=[0], round_seeds=[0], boot=5)
    text = bench.report(args, tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("### synthetic default"))
    assert "1830 s of logged cost/*_seconds" in header, header  # 1117 + 405 + 308, not 0 + 100 + 100
    assert "| any | 50.0 [50.0, 50.0] | 60.0 [60.0, 60.0] | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in text
    assert "warning" not in text
