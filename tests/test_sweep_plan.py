"""The sweep driver as plan → launch → reconcile (issue #17): planning is pure (no Ray), the plan
is plain data, and every private Ray API is used in the Ray adapter only. Fast: no Ray started."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from weakbench.core.errors import ConfigError
from weakbench.platform.run_spec import SweepOptions
from weakbench.platform.search_space import load_search_space
from weakbench.platform.sweep_plan import SweepPlan, plan_sweep, planned_trials, with_overrides

REPO = Path(__file__).resolve().parents[1]
CAM = REPO / "search_spaces" / "cam.yaml"
CLUSTER = {"CPU": 4.0}


def _plan(space=CAM, overrides=None, **kw) -> SweepPlan:
    opts = SweepOptions(space=str(space), **kw)
    sp = with_overrides(load_search_space(space), overrides or {})
    return plan_sweep(sp, opts, units=5, cluster=CLUSTER)


def test_planning_imports_no_ray():
    # a fresh interpreter: the driver's pure parts load without Ray (and the CLI's --dry-run with them)
    code = ("import sys; import weakbench.platform.sweep_plan, weakbench.platform.sweep, weakbench.platform.reconcile, "
            "weakbench.platform.sweep_state, weakbench.platform.live; print('ray' in sys.modules, 'optuna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# what counts as a private Ray API (see the list at the top of weakbench/platform/launch.py)
_PRIVATE = re.compile(r"ray\._private|ray\._common|ray\.train\.v2\._internal|internal_kv|_initialize_and_run_controller|"
                      r"_base_exc|tune\.impl|experiment_state|\._brackets|\._rungs|\._metric\b|\._mode\b")


def test_every_private_ray_api_is_in_the_adapter():
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "weakbench").rglob("*.py")
                   if _PRIVATE.search(p.read_text()))
    assert users == ["weakbench/platform/launch.py"]


def test_optuna_plan_repeats_each_suggestion_per_seed():
    plan = _plan(trials=4)
    # cam.yaml: lr (loguniform), weight_decay (choice), seed grid [0, 1, 2]: 4 trials → 2 configurations × 3 seeds
    assert (plan.searcher, plan.num_samples, plan.num_planned, plan.seed_values) == ("optuna", 6, 6, [0, 1, 2])
    assert set(plan.axes) == {"lr", "weight_decay"} and plan.searched == ["lr", "weight_decay", "seed"]
    assert plan.scheduler is not None and (plan.scheduler.max_t, plan.scheduler.grace_period) == (5, 1)
    assert (plan.executor, plan.resources, plan.max_concurrent, plan.reuse_actors) == ("inline", {"cpu": 1.0}, 4, True)
    # plain data: what the driver records in state.json and `weakbench status` reads back
    assert SweepPlan.model_validate(json.loads(json.dumps(plan.model_dump(mode="json")))) == plan


def test_random_plan_crosses_grid_axes_and_all_fixed_runs_once_per_seed():
    plan = _plan(trials=4, searcher="random")
    assert (plan.searcher, plan.num_samples, plan.num_planned, plan.seed_values) == ("variants", 2, 6, None)
    assert plan.axes["seed"].kind == "grid"
    fixed = _plan(overrides={"lr": 0.01, "weight_decay": 0.0}, trials=7)
    assert (fixed.searcher, fixed.num_samples, fixed.num_planned) == ("variants", 1, 3)
    assert fixed.axes == {"seed": fixed.axes["seed"]} and fixed.axes["seed"].values == [0, 1, 2]
    assert fixed.fixed["lr"] == 0.01
    one_seed = _plan(overrides={"seed": 5}, trials=3)  # a --set seed is fixed, no repeater
    assert (one_seed.seed_values, one_seed.fixed["seed"], one_seed.num_planned) == (None, 5, 3)


@pytest.mark.parametrize("kw", [dict(trials=4), dict(trials=5, searcher="random"), dict(trials=1),
                                dict(trials=4, early_stopping=False)])
def test_planned_trials_is_the_plans_count(kw):
    opts = SweepOptions(space=str(CAM), **kw)
    assert planned_trials(load_search_space(CAM), opts) == _plan(**kw).num_planned
    assert (_plan(**kw).scheduler is None) == (kw.get("early_stopping") is False)


def test_a_trial_larger_than_the_cluster_is_refused_at_planning():
    with pytest.raises(ConfigError, match="--num-workers or --cpus-per-worker"):
        _plan(cpus_per_worker=8.0)


def test_dry_run_names_the_class_filter_and_where_it_comes_from(tmp_path):
    """``--dry-run`` shows the class filter the sweep would run with: the space file's ``classes``
    key, the command line's ``--classes`` (which wins), or every class."""
    from weakbench.platform.run_spec import SweepOptions
    from weakbench.platform.sweep_plan import describe_sweep

    def classes(space: str, **kw) -> str:
        rows = describe_sweep(SweepOptions(space=str(REPO / "search_spaces" / space), output_dir=str(tmp_path), **kw))
        return next(r["value"] for r in rows if (r["section"], r["key"]) == ("data", "classes"))

    assert classes("bbam_coco_person.yaml") == "person (the space file's classes)"
    assert classes("bbam_coco_person.yaml", classes="dog,cat") == "dog,cat (--classes)"
    assert classes("cam.yaml") == "every class of the dataset"
