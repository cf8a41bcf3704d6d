"""MLflow tracking helpers on a real SQLite store: restart safety, failure marking, reconciliation."""

import pytest

from weakbench.core import conventions as C
from weakbench.platform import tracking


@pytest.fixture()
def client(tmp_path):
    return tracking.client_for(tracking.default_tracking_uri(tmp_path))


def test_trial_run_is_found_again_not_duplicated(client):
    exp = tracking.ensure_experiment(client, "t")
    parent = tracking.get_or_create_parent_run(client, exp, "sweep-a", "sweep-a", tags={}, params={"trials": 2})
    assert tracking.get_or_create_parent_run(client, exp, "sweep-a", "sweep-a", tags={}, params={}) == parent
    kw = dict(parent_run_id=parent, sweep_id="sweep-a", trial_id="t1", run_name="cam-t1", tags={C.TAG_METHOD: "cam"}, params={"lr": 0.1})
    rid, status = tracking.get_or_create_trial_run(client, exp, **kw)
    assert status == "NEW"
    # a restarted trial (no checkpoint yet) finds its run by tags; with a known id, directly
    assert tracking.get_or_create_trial_run(client, exp, **kw) == (rid, "RUNNING")
    assert tracking.get_or_create_trial_run(client, exp, **kw, known_run_id=rid)[0] == rid
    runs = tracking.child_runs(client, exp, parent)
    assert [r.info.run_id for r in runs] == [rid]
    assert runs[0].data.tags[C.TAG_KIND] == C.KIND_TRIAL and runs[0].data.params == {"lr": "0.1"}


def test_failed_run_resumes_and_finished_run_is_left_alone(client):
    exp = tracking.ensure_experiment(client, "t")
    kw = dict(parent_run_id=None, sweep_id="s", trial_id="t1", run_name="r", tags={}, params={})
    rid, _ = tracking.get_or_create_trial_run(client, exp, **kw)
    tracking.fail_run(client, rid, ValueError("boom"))
    run = client.get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags[C.TAG_ERROR] == "ValueError: boom"
    rid2, status = tracking.get_or_create_trial_run(client, exp, **kw)
    assert (rid2, status) == (rid, "FAILED")
    assert client.get_run(rid).info.status == "RUNNING"  # continued, error tag cleared
    assert C.TAG_ERROR not in client.get_run(rid).data.tags
    client.set_terminated(rid, status="FINISHED")
    assert tracking.get_or_create_trial_run(client, exp, **kw) == (rid, "FINISHED")
    assert client.get_run(rid).info.status == "FINISHED"


def test_reconcile_ends_running_children_as_killed(client):
    exp = tracking.ensure_experiment(client, "t")
    parent = tracking.get_or_create_parent_run(client, exp, "s", "s", tags={}, params={})
    ids = [tracking.get_or_create_trial_run(client, exp, parent_run_id=parent, sweep_id="s", trial_id=f"t{i}", run_name="r",
                                            tags={}, params={})[0] for i in range(3)]
    client.set_terminated(ids[0], status="FINISHED")
    assert tracking.reconcile_children(client, exp, parent) == 2
    statuses = sorted(r.info.status for r in tracking.child_runs(client, exp, parent))
    assert statuses == ["FINISHED", "KILLED", "KILLED"]


def test_log_metrics_skips_undefined_eval_metrics_keeps_diverged_losses(client):
    import math

    exp = tracking.ensure_experiment(client, "t")
    rid, _ = tracking.get_or_create_trial_run(client, exp, parent_run_id=None, sweep_id="s", trial_id="x", run_name="r", tags={}, params={})
    tracking.log_metrics(client, rid, {"val/pxap": 51.5, "val/miou": float("nan"), "x": float("inf"),
                                       "train/loss": float("nan")}, step=1)
    metrics = client.get_run(rid).data.metrics
    assert sorted(metrics) == ["train/loss", "val/pxap"] and metrics["val/pxap"] == 51.5
    assert math.isnan(metrics["train/loss"])  # the evidence of divergence is kept
    assert tracking.config_hash({"a": 1, "b": 2}) == tracking.config_hash({"b": 2, "a": 1})
    assert len(tracking.config_hash({"a": 1})) == 16


def _open_store(args):
    uri, name, barrier_path = args
    import time
    from pathlib import Path

    while not Path(barrier_path).exists():  # start together
        time.sleep(0.005)
    client = tracking.client_for(uri)
    return tracking.ensure_experiment(client, name, artifact_root=tracking.default_artifact_root(uri))


def test_fresh_database_opened_by_many_processes_at_once(tmp_path):
    """Two sweeps starting together on a fresh sqlite store: the schema is created once (under a
    file lock), the experiment once, and both get its id."""
    import multiprocessing as mp

    uri = tracking.default_tracking_uri(tmp_path / "out")
    barrier = tmp_path / "go"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pending = pool.map_async(_open_store, [(uri, "weakbench", str(barrier))] * 4)
        import time

        time.sleep(3)  # the spawned interpreters import MLflow meanwhile
        barrier.touch()
        ids = pending.get(timeout=120)
    assert len(set(ids)) == 1
    client = tracking.client_for(uri)
    exp = client.get_experiment(ids[0])
    # the sqlite default keeps artifacts under the output directory, not ./mlruns
    assert exp.artifact_location == (tmp_path / "out" / "mlartifacts").resolve().as_uri()
    assert [e.name for e in client.search_experiments()].count("weakbench") == 1


def test_server_uri_has_no_default_artifact_root():
    assert tracking.default_artifact_root("http://127.0.0.1:5000") is None
    assert tracking.default_artifact_root("postgresql+psycopg2://u:p@127.0.0.1/db") is None
