"""Fault tests on real Ray and MLflow, loopback only, bounded in time.

* a two-node local cluster (``ray.cluster_utils.Cluster``: a head and a second node, one CPU
  each) where the node running a trial is killed: the sweep finishes, the trial resumes from its
  checkpoint, MLflow holds exactly one run per trial and none RUNNING.

The figures of each run (trials planned / finished, restarts, MLflow runs, wall time) are printed
(``pytest -s``) and written to ``<tmp>/figures.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spaces import cam_space
from weakbench.core import conventions as C
from weakbench.platform import tracking

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6  # long enough that a quiet machine cannot finish both trials before the kill
TINY = ["--executor", "inline", "--no-model", "--eval-max-images", "8", "--set", f"epochs={EPOCHS}", "--set", "input_size=64",
        "--set", "batch_size=8", "--set", "lr=0.01", "--set", "weight_decay=0"]  # fixed: one trial per seed (0, 1)


# the driver resolves 127.0.0.1 to the machine's address unless Ray is told it runs on one host
LOOPBACK_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _runs(out: Path):
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    return (client, [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_SWEEP],
            [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL])


@pytest.fixture
def private_cluster(monkeypatch):
    """A head and a second node (1 CPU each) on loopback; Ray's address file in /tmp/ray, which
    other Ray users of this machine read, is neither written nor deleted."""
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        cluster.shutdown()


@pytest.mark.timeout(300)
def test_node_running_a_trial_dies_and_the_sweep_finishes(tmp_path, private_cluster):
    from ray import tune

    from weakbench.core.data import generate_synthetic_coco

    cluster, second = private_cluster
    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "weakbench", "sweep", cam_space(tmp_path), "--data", str(data),
           "--output-dir", str(out), "--name", "nodekill", "--no-early-stopping", "--max-failures", "2",
           "--address", cluster.address, *TINY]
    t0 = time.time()
    log = tmp_path / "sweep.log"  # a file, not a pipe: a full pipe would block the driver
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=LOOPBACK_ENV)
    tune_dir = out / "sweeps" / "nodekill" / "tune"
    try:
        # both trials run at once, one per node; kill the second node once each has a checkpoint
        # of an unfinished trial (epoch 1 to EPOCHS - 2)
        deadline = time.time() + 150
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            # epochs checkpointed: the newest checkpoint's index + 1 (Tune keeps the latest two)
            counts = [max((int(c.name.rsplit("_", 1)[-1]) + 1 for c in d.glob("checkpoint_*")), default=0)
                      for d in tune_dir.glob("_trial_*")]
            if len(counts) == 2 and all(1 <= c < EPOCHS - 1 for c in counts):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no checkpoint of both trials within 150 s: {counts}; {log.read_text()[-3000:]}")
        t_kill = time.time()
        cluster.remove_node(second, allow_graceful=False)  # SIGKILL of the node's raylet and workers
        proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.time() - t0
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]

    trials = tune.ExperimentAnalysis(str(tune_dir)).trials
    client, parents, children = _runs(out)
    restarts = sum(t.num_failures for t in trials)
    figures = {"trials_planned": 2, "trials_finished": sum(c.info.status == "FINISHED" for c in children),
               "restarts": restarts, "mlflow_trial_runs": len(children), "mlflow_parent_runs": len(parents),
               "wall_seconds": round(wall, 1), "seconds_after_kill": round(time.time() - t_kill, 1)}
    print("node-kill figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))

    assert sorted(t.status for t in trials) == ["TERMINATED", "TERMINATED"]
    assert restarts == 1, [(t.trial_id, t.num_failures) for t in trials]  # the trial on the killed node, once
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["weakbench.trial_restarts"] == "1"
    assert len(children) == 2 and len({c.data.tags[C.TAG_TRIAL_ID] for c in children}) == 2  # one run per trial
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert all(c.info.status == "FINISHED" for c in children)
    restarted = [c for c in children if c.data.tags.get(C.TAG_RESTARTS) == "1"]
    assert len(restarted) == 1
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (c.data.tags[C.TAG_TRIAL_ID], steps)  # resumed, not redone
    assert "2 of 2 planned (2 finished" in output and "1 restart(s)" in output


def _sweep(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "weakbench", "sweep", cam_space(out.parent), "--output-dir", str(out),
           "--address", "local", "--num-cpus", "1", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=LOOPBACK_ENV)


@pytest.mark.timeout(300)
def test_ctrl_c_ends_the_sweep_killed_with_exit_130(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) after the
    first checkpoint: exit 130, the parent run KILLED, no run RUNNING, the sweep resumable."""
    import signal

    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "weakbench", "sweep", cam_space(out.parent), "--output-dir", str(out),
           "--name", "ctrlc", "--address", "local", "--num-cpus", "1", "--max-concurrent", "1", "--no-early-stopping", *TINY]
    log = tmp_path / "sweep.log"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=LOOPBACK_ENV,
                            start_new_session=True)
    tune_dir = out / "sweeps" / "ctrlc" / "tune"
    try:
        deadline = time.time() + 150
        while time.time() < deadline and not list(tune_dir.glob("_trial_*/checkpoint_*")):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert list(tune_dir.glob("_trial_*/checkpoint_*")), "no checkpoint within 150 s"
        t_int = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
        stop_seconds = time.time() - t_int
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 130, output[-4000:]
    assert "interrupted" in output and "--resume" in output
    client, parents, children = _runs(out)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert children and not [c for c in children if c.info.status == "RUNNING"]
    assert any(c.info.status == "KILLED" and c.data.tags.get(C.TAG_INTERRUPTED) for c in children), \
        [(c.info.status, c.data.tags) for c in children]
    print("ctrl-c figures:", json.dumps({"seconds_to_stop": round(stop_seconds, 1), "runs": len(children)}))


@pytest.mark.timeout(300)
def test_diverging_fixed_configuration_fails_and_never_ranks(tmp_path):
    """Every axis fixed (by --set) runs the fixed configuration once per seed, no OptunaSearch
    error; with lr=10 the loss goes NaN: the run ends FAILED with a DivergenceError, the sweep
    exits 1, the leaderboard and the registry never pick it."""
    from weakbench.platform import leaderboard, registry, results
    from weakbench.core.errors import DataError, UnknownNameError

    out = tmp_path / "runs"
    proc = _sweep(out, "--name", "nan", "--executor", "inline", "--eval-max-images", "8", "--set", "epochs=2",
                  "--set", "input_size=64", "--set", "batch_size=8", "--set", "lr=10", "--set", "momentum=0.99",
                  "--set", "weight_decay=1", "--set", "backbone_lr_mult=10", "--set", "seed=0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RuntimeError" not in proc.stderr and "1 of 1 planned" in proc.stdout
    client, parents, children = _runs(out)
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FAILED", run.data.tags
    assert run.data.tags[C.TAG_ERROR].startswith("DivergenceError: ") and "train/loss" in run.data.tags[C.TAG_ERROR]
    assert parents[0].info.status == "FAILED" and "weakbench.best_run_id" not in parents[0].data.tags
    uri = tracking.default_tracking_uri(out)
    results.update_store(uri, out / "results")
    assert leaderboard.build_leaderboard(results.read_store(out / "results")).num_rows == 0
    with pytest.raises((DataError, UnknownNameError)):
        registry.register_best(uri, "cam")


@pytest.mark.timeout(300)
def test_two_sweeps_started_together_into_one_output_directory(tmp_path):
    """Two full sweeps started at the same moment into one fresh ``--output-dir`` (each its own
    local Ray instance, inline executor): distinct sweep names, parent runs and trial runs, both
    exit 0, and the one SQLite database (created by whichever came first) is sound afterwards."""
    import sqlite3

    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "weakbench", "sweep", cam_space(out.parent), "--output-dir", str(out),
           "--address", "local", "--num-cpus", "1", "--max-concurrent", "1", "--trials", "1",
           "--no-early-stopping", "--executor", "inline", "--no-model", "--eval-max-images", "8", "--set", "epochs=1",
           "--set", "input_size=64", "--set", "batch_size=8", "--set", "lr=0.01", "--set", "weight_decay=0",
           "--set", "seed=0"]
    logs = [tmp_path / f"sweep{i}.log" for i in range(2)]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=LOOPBACK_ENV)
             for log in logs]
    try:
        for p in procs:
            p.wait(timeout=260)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.time() - t0
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-3000:] for o in outputs)
    names = sorted(d.name for d in (out / "sweeps").iterdir() if (d / "sweep.json").is_file())
    assert len(names) == 2, names  # distinct names, though started in the same second
    client, parents, children = _runs(out)
    assert sorted(p.info.run_name for p in parents) == names
    assert all(p.info.status == "FINISHED" for p in parents)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {p.info.run_id for p in parents}  # one trial run under each parent
    db = out / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1  # migrated once, to one head
        assert con.execute("SELECT COUNT(*) FROM experiments WHERE name = ?", (C.DEFAULT_EXPERIMENT,)).fetchone()[0] == 1
    figures = {"wall_seconds": round(wall, 1), "sweeps": names, "parent_runs": len(parents), "trial_runs": len(children)}
    print("two-sweeps figures:", json.dumps(figures))
