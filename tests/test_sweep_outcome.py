"""A sweep's outcome is the truth: exit codes, Tune errors reconciled into MLflow, distinct names,
a clear refusal when a `ray start` cluster runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.platform.search_space import load_search_space
from weakbench.core.errors import ConfigError
from weakbench.platform.sweep import SweepOptions, SweepSummary, prepare_sweep_dir, resolve_executor
from weakbench.platform.reconcile import reconcile
from weakbench.platform.sweep_state import SweepState

REPO = Path(__file__).resolve().parents[1]


def _summary(**kw) -> SweepSummary:
    base = dict(sweep_name="s", sweep_dir="d", tracking_uri="u", experiment="e", parent_run_id="p", method="cam",
                dataset="x", num_trials=4, num_finished=4, num_failed=0, num_stopped=0, wall_seconds=1.0, metric="m",
                num_planned=4)
    return SweepSummary(**{**base, **kw})


@pytest.mark.parametrize("kw, code", [
    ({}, 0),
    ({"num_finished": 2, "num_stopped": 2}, 0),                    # ASHA stopped two: still a success
    ({"num_finished": 3, "num_failed": 1}, 1),                      # one failed
    ({"num_finished": 3, "num_trials": 3}, 1),                      # a planned trial never ran
    ({"num_finished": 0, "num_stopped": 4}, 1),                     # nothing finished
    ({"interrupted": True}, 130),
    ({"interrupted": True, "interrupt_signal": 15}, 143),         # SIGTERM (timeout, systemd, Kubernetes)
])
def test_exit_code_rule(kw, code):
    assert _summary(**kw).exit_code == code


@pytest.mark.parametrize("kw, executor", [
    ({}, "inline"),                                  # the README's job: one CPU worker trains in its trial actor
    ({"num_workers": 2}, "train"),                   # DDP
    ({"use_gpu": True}, "train"),
    ({"executor": "train"}, "train"),                # asked for: kept
    ({"executor": "inline", "cpus_per_worker": 2}, "inline"),
])
def test_auto_executor_is_inline_for_one_cpu_worker(kw, executor):
    assert resolve_executor(SweepOptions(space="s.yaml", **kw)) == executor


@pytest.mark.parametrize("kw", [{"num_workers": 2}, {"use_gpu": True}])
def test_inline_executor_with_ddp_or_gpu_is_refused(kw):
    with pytest.raises(ConfigError, match="--executor inline runs one CPU worker per trial.*--executor train"):
        resolve_executor(SweepOptions(space="s.yaml", executor="inline", **kw))


def test_two_sweeps_in_the_same_second_get_distinct_names(tmp_path):
    space = load_search_space(REPO / "search_spaces" / "cam.yaml")
    opts = SweepOptions(space=str(REPO / "search_spaces" / "cam.yaml"), output_dir=str(tmp_path))
    names = {prepare_sweep_dir(opts, space)[1] for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("cam-synthetic-") for n in names)


def _toy_trial(config):
    """x=0 errors before any MLflow run exists; x=1 leaves a RUNNING run behind, then errors;
    x=2 finishes its run."""
    from ray import tune

    from weakbench.platform import tracking as T

    tid = tune.get_context().get_trial_id()
    if config["x"] == 0:
        raise ValueError("boom before any run [x, y, w, h]")
    client = T.client_for(config["uri"])
    exp = T.ensure_experiment(client, "weakbench")
    rid, _ = T.get_or_create_trial_run(client, exp, parent_run_id=config["parent"], sweep_id="toy", trial_id=tid,
                                       run_name=tid, tags={}, params={"x": config["x"]})
    if config["x"] == 1:
        raise RuntimeError("worker died")
    client.set_terminated(rid, "FINISHED")
    tune.report({"m": 1.0})


@pytest.mark.slow
def test_tune_errors_are_failed_in_mlflow(tmp_path, ray_local):
    import ray.cloudpickle
    from ray import tune

    from weakbench.core.data import open_dataset

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    uri = tracking.default_tracking_uri(tmp_path)
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "weakbench")
    from weakbench.platform import sweep_state
    from weakbench.platform.tune_record import Recorder, RecordingCallback

    parent = tracking.get_or_create_parent_run(client, exp, "toy", "toy", tags={}, params={})
    state = SweepState(tmp_path / "state.json")
    sweep_state.ACTIVE = Recorder(state, "m")
    try:
        tuner = tune.Tuner(tune.with_resources(_toy_trial, {"cpu": 0.5}),
                           param_space={"x": tune.grid_search([0, 1, 2]), "uri": uri, "parent": parent},
                           run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0,
                                                     callbacks=[RecordingCallback()],
                                                     failure_config=tune.FailureConfig(max_failures=1)))
        tuner.fit()
    finally:
        sweep_state.ACTIVE = None
    assert sorted(t["status"] for t in SweepState.load(tmp_path).trials.values()) == ["failed", "failed", "finished"]
    source = open_dataset(None, cache_dir=tmp_path / "cache")
    outcome = reconcile(client, exp, parent, "toy", state, "cam", source, interrupted=False)
    runs = {r.data.params.get("x"): r for r in tracking.child_runs(client, exp, parent)}
    assert sorted(runs) == ["0", "1", "2"]  # the trial that never created a run has one now
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags[C.TAG_ERROR] == "ValueError: boom before any run [x, y, w, h]"
    assert runs["0"].data.tags[C.TAG_KIND] == C.KIND_TRIAL and runs["0"].data.tags[C.TAG_METHOD] == "cam"
    assert runs["1"].info.status == "FAILED" and runs["1"].data.tags[C.TAG_ERROR] == "RuntimeError: worker died"
    assert runs["2"].info.status == "FINISHED"
    assert outcome["restarts"] == 2  # x=0 and x=1 each retried once (max_failures=1)
    # idempotent: a second reconciliation creates nothing
    reconcile(client, exp, parent, "toy", state, "cam", source, interrupted=False)
    assert len(tracking.child_runs(client, exp, parent)) == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sweep_without_address_beside_a_ray_start_cluster_is_refused_clearly(tmp_path, monkeypatch):
    """A live cluster that `ray start` recorded in Ray's address file is the one case where Ray's
    default (join it) and weakbench's (a private instance) differ: the sweep asks which. The file in
    /tmp/ray, which other Ray users of this machine read, is not written: the check reads the
    address this test's (real) cluster would have recorded."""
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from weakbench.platform.launch import check_ray_target

    # the suite's session-wide instance (the ray_local fixture) may already be up in this process;
    # the check is about a sweep's own driver, which is not connected yet
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    address = cluster.address
    try:
        check_ray_target(SweepOptions(space="x.yaml"))  # another driver's private instance: no refusal
        monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *a, **k: address)
        with pytest.raises(ConfigError) as e:
            check_ray_target(SweepOptions(space="x.yaml"))
        check_ray_target(SweepOptions(space="x.yaml", address="local"))  # the user said which
    finally:
        cluster.shutdown()
    err = str(e.value)
    assert err.startswith("a Ray cluster started with `ray start` runs on this machine") and address in err, err
    assert "--address auto" in err and "--address local" in err


def test_interrupt_reconciliation_tells_interrupted_from_stopped(tmp_path):
    """After Ctrl-C, a run the interrupt ended is KILLED and tagged interrupted, however it ended:
    still RUNNING, KILLED by Tune's stop inside ``tune.report`` (tagged ``weakbench.stopped`` like a
    scheduler stop), or FAILED with a KeyboardInterrupt in its worker. A run ASHA stopped before the
    interrupt, and a run that failed for a real reason, keep their endings."""
    import time

    from weakbench.core.data import open_dataset

    uri = tracking.default_tracking_uri(tmp_path)
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "weakbench")
    parent = tracking.get_or_create_parent_run(client, exp, "toy", "toy", tags={}, params={})
    ids = {}
    for name in ("running", "report_stop", "worker_sigint", "asha_before", "real_failure"):
        ids[name], _ = tracking.get_or_create_trial_run(client, exp, parent_run_id=parent, sweep_id="toy", trial_id=name,
                                                        run_name=name, tags={}, params={})
    before = time.time() - 60
    client.set_tag(ids["asha_before"], "weakbench.stopped", "stopped early by the scheduler")
    client.set_terminated(ids["asha_before"], status="KILLED", end_time=int(before * 1000))
    t_int = time.time()
    client.set_tag(ids["report_stop"], "weakbench.stopped", "stopped early by the scheduler")
    client.set_terminated(ids["report_stop"], status="KILLED")
    tracking.fail_run(client, ids["worker_sigint"], KeyboardInterrupt())
    tracking.fail_run(client, ids["real_failure"], ValueError("bad pixel"))
    source = open_dataset(None, cache_dir=tmp_path / "cache")
    reconcile(client, exp, parent, "toy", SweepState(tmp_path / "state.json"), "cam", source, interrupted=True,
               interrupted_at=t_int)
    runs = {r.info.run_name: r for r in tracking.child_runs(client, exp, parent)}
    for name in ("running", "report_stop", "worker_sigint"):
        assert runs[name].info.status == "KILLED" and runs[name].data.tags.get(C.TAG_INTERRUPTED), name
        assert C.TAG_ERROR not in runs[name].data.tags, name
    assert runs["asha_before"].info.status == "KILLED" and C.TAG_INTERRUPTED not in runs["asha_before"].data.tags
    assert runs["real_failure"].info.status == "FAILED" and C.TAG_INTERRUPTED not in runs["real_failure"].data.tags
    assert runs["real_failure"].data.tags[C.TAG_ERROR] == "ValueError: bad pixel"


def test_best_run_ties_go_to_the_first_started_and_diverged_runs_never_win(tmp_path):
    """Four centre-Gaussian σ tie on val (as on coco128): the summary names the one that started
    first, whatever order MLflow returns them in; a run with a NaN metric never wins; min mode
    picks the smallest."""
    import math

    from weakbench.platform.sweep import select_best_run

    client = tracking.client_for(tracking.default_tracking_uri(tmp_path))
    exp = client.create_experiment("e")
    made = {}
    for name, start, val, other in [("late", 3000, 11.65, 1.0), ("first", 1000, 11.65, 1.0), ("mid", 2000, 11.65, 1.0),
                                    ("low", 500, 11.24, 1.0), ("nan", 100, 99.0, math.nan)]:
        run = client.create_run(exp, start_time=start, run_name=name)
        client.log_metric(run.info.run_id, "val/m", val)
        client.log_metric(run.info.run_id, "train/loss", other)
        made[run.info.run_id] = name
    runs = client.search_runs([exp])
    assert made[select_best_run(runs, "val/m", "max").info.run_id] == "first"
    assert made[select_best_run(list(reversed(runs)), "val/m", "max").info.run_id] == "first"
    assert made[select_best_run(runs, "val/m", "min").info.run_id] == "low"
    assert select_best_run(runs, "val/absent", "max") is None


def test_a_scheduler_stop_is_marked_in_the_run_name_and_tag(tmp_path):
    """An ASHA-stopped trial's run: tag weakbench.stopped and "[stopped early]" in its name (once), KILLED."""
    client = tracking.client_for(tracking.default_tracking_uri(tmp_path))
    exp = tracking.ensure_experiment(client, "weakbench")
    rid, _ = tracking.get_or_create_trial_run(client, exp, parent_run_id=None, sweep_id="s", trial_id="t1",
                                              run_name="cam-t1", tags={}, params={})
    tracking.mark_stopped_early(client, rid)
    tracking.mark_stopped_early(client, rid)  # the driver may record the stop twice: one suffix
    run = client.get_run(rid)
    assert run.info.run_name == "cam-t1 [stopped early]" and run.info.status == "KILLED"
    assert run.data.tags["weakbench.stopped"] == "stopped early by the scheduler"


def test_error_text_read_from_the_local_error_file_when_storage_has_none(tmp_path):
    """Tune's ``on_trial_error`` runs right after the error is written to the trial's local
    directory, before it reaches the storage path: the reason comes from the local ``error.txt``
    (its latest failure's last line), not the generic text."""
    from weakbench.platform.launch import tune_error_text

    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at 2026-12-06_17-00-00)\nray::ImplicitFunc.train()\n"
                          "  File \"x.py\", line 3, in f\nValueError: first\n"
                          "Failure # 2 (occurred at 2026-12-06_17-00-05)\nray::ImplicitFunc.train()\n"
                          "  File \"x.py\", line 9, in f\nRuntimeError: worker died\n\n")

    class StorageHasNoError:  # a Trial whose storage copy is not synced yet
        num_failures = 2
        error_file = str(tmp_path / "error.txt")

        def get_pickled_error(self):
            return None

        def get_error(self):
            return None

    assert tune_error_text(StorageHasNoError()) == "RuntimeError: worker died"
    StorageHasNoError.error_file = str(tmp_path / "missing.txt")
    assert tune_error_text(StorageHasNoError()).startswith("the trial errored inside Ray Tune (after 2 failure(s))")
