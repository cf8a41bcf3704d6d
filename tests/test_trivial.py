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
