"""Trivial baselines beside every WSOL sweep: which are missing (a real SQLite MLflow store) and
the sweep options that add them."""

from __future__ import annotations

from pathlib import Path

from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.platform.search_space import load_search_space
from weakbench.platform.sweep import SweepOptions
from weakbench.platform.trivial import applies_to, baseline_sweep_options, missing_baselines

REPO = Path(__file__).resolve().parents[1]


def _trial_run(client, exp, method, fingerprint, input_size, status="FINISHED"):
    run = client.create_run(exp, tags={C.TAG_METHOD: method, C.TAG_DATASET_FINGERPRINT: fingerprint,
                                       C.TAG_KIND: C.KIND_TRIAL})
    client.log_param(run.info.run_id, "input_size", input_size)
    client.set_terminated(run.info.run_id, status=status)


def test_missing_baselines_by_dataset_size_and_status(tmp_path):
    client = tracking.client_for(tracking.default_tracking_uri(tmp_path))
    exp = tracking.ensure_experiment(client, "weakbench")
    assert missing_baselines(client, exp, fingerprint="abc", input_size=128) == list(C.TRIVIAL_BASELINES)
    _trial_run(client, exp, "center_gaussian", "abc", 128)
    _trial_run(client, exp, "whole_image", "abc", 128, status="FAILED")  # a failed run is no baseline
    _trial_run(client, exp, "whole_image", "other", 128)                 # another dataset
    _trial_run(client, exp, "whole_image", "abc", 224)                   # another frame
    assert missing_baselines(client, exp, fingerprint="abc", input_size=128) == ["whole_image"]
    _trial_run(client, exp, "whole_image", "abc", 128)
    assert missing_baselines(client, exp, fingerprint="abc", input_size=128) == []


def test_baseline_sweep_keeps_data_split_and_frame():
    opts = SweepOptions(space=str(REPO / "search_spaces" / "cam.yaml"), data="/d", split_seed=3, output_dir="/o",
                        trials=4, name="mine", overrides={"epochs": 1, "input_size": 64}, num_workers=2)
    b = baseline_sweep_options(opts, "center_gaussian", input_size=64)
    space = load_search_space(b.space)
    assert space.method == "center_gaussian"
    assert (b.data, b.split_seed, b.output_dir, b.name, b.num_workers) == ("/d", 3, "/o", None, 1)
    assert b.overrides == {"input_size": 64} and b.trials == space.num_grid_points() >= 5  # every σ of the grid
    assert b.searcher == "random"  # crosses the grid: each σ exactly once
    assert opts.name == "mine" and opts.trials == 4  # the sweep's own options are untouched
    assert applies_to("cam") and applies_to("minmaxcam") and not applies_to("center_gaussian") and not applies_to("bbam")


def test_run_sweep_follows_up_with_the_missing_baselines(tmp_path):
    """The follow-up sweeps are the driver's (run_sweep's, from Python as from the CLI): one per
    baseline missing at the best run's dataset and frame, named after the sweep; refused input is
    reported, not raised; --no-baselines, an interrupted sweep or another method's board add none.
    ``run`` stands for run_sweep here (the Ray sweeps are in test_live's main job)."""
    from weakbench.core.errors import ConfigError
    from weakbench.platform.reconcile import SweepSummary, follow_up_baselines

    uri = tracking.default_tracking_uri(tmp_path)
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "weakbench")
    best = client.create_run(exp, tags={C.TAG_METHOD: "cam", C.TAG_DATASET_FINGERPRINT: "abc", C.TAG_KIND: C.KIND_TRIAL})
    client.log_param(best.info.run_id, "input_size", 64)
    client.set_terminated(best.info.run_id, status="FINISHED")
    _trial_run(client, exp, "whole_image", "abc", 64)  # already on the board
    s = SweepSummary(sweep_name="cam-x", sweep_dir=str(tmp_path), tracking_uri=uri, experiment="weakbench",
                     parent_run_id="p", method="cam", dataset="d", num_trials=1, num_finished=1, num_failed=0,
                     num_stopped=0, wall_seconds=1.0, best_run_id=best.info.run_id, metric="val/max_box_acc_v2")
    opts = SweepOptions(space=str(REPO / "search_spaces" / "cam.yaml"), output_dir=str(tmp_path))
    asked = []

    def run(bopts):
        asked.append(bopts)
        return s.model_copy(update={"sweep_name": bopts.name, "best_params": {"sigma": 0.5, "seed": 0},
                                    "best_metrics": {"val/max_box_acc_v2": 60.0, "test/max_box_acc_v2": 58.0}})

    out = follow_up_baselines(opts, s, run=run)
    assert [b.name for b in out] == ["center_gaussian"] and [o.name for o in asked] == ["center_gaussian-after-cam-x"]
    assert asked[0].overrides == {"input_size": 64}
    assert (out[0].value, out[0].test, out[0].chosen, out[0].input_size) == (60.0, 58.0, {"sigma": 0.5}, 64)

    def refused(bopts):
        raise ConfigError("no such data")

    assert follow_up_baselines(opts, s, run=refused)[0].error == "no such data"
    for o, summary in [(opts.model_copy(update={"baselines": False}), s), (opts, s.model_copy(update={"interrupted": True})),
                       (opts, s.model_copy(update={"method": "bbam"}))]:
        assert follow_up_baselines(o, summary, run=run) == []
