"""Chaos on a multi-node loopback cluster (issue 19), bounded in time.

``ray.cluster_utils.Cluster`` (a head and extra nodes, one CPU each, all on 127.0.0.1) runs a
CLI sweep of tiny CAM trials (64 px, 32 synthetic images, a few epochs) while nodes are killed
(SIGKILL of the node's raylet and workers) and added back:

* ``--max-failures 0`` and the node running a trial killed: that trial's run ends FAILED with its
  error, the summary counts it failed, the parent run is FAILED and the sweep exits 1 (it used to
  read Tune's saved state, where the trial was still RUNNING, and exit 0 calling it "stopped
  early"); ``--resume`` then continues the failed trial from its checkpoint, exits 0 and clears the
  parent's stale ``weakbench.error``;
* 8 trials with random node kills and restarts: planned = finished + failed + stopped early, one
  run per trial, no duplicate steps, none RUNNING, and the exit code says whether any failed.

The figures of each run are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from spaces import cam_space
from test_faults import LOOPBACK_ENV, _runs, private_cluster  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _tiny(epochs: int) -> list[str]:
    return ["--executor", "inline", "--no-model", "--eval-max-images", "8", "--set", f"epochs={epochs}",
            "--set", "input_size=64", "--set", "batch_size=8", "--set", "weight_decay=0"]


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    # a file, not a pipe: a full pipe would block the driver
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=LOOPBACK_ENV)


def _checkpointed(tune_dir: Path) -> list[int]:
    """Epochs checkpointed per trial directory of Tune (the newest checkpoint's index + 1)."""
    return [max((int(c.name.rsplit("_", 1)[-1]) + 1 for c in d.glob("checkpoint_*")), default=0)
            for d in tune_dir.glob("_trial_*")]


def _assert_sound(client, children, epochs: int) -> None:
    """One run per trial id, none RUNNING, every finished run's train/loss steps exactly 1..epochs."""
    ids = [c.data.tags[C.TAG_TRIAL_ID] for c in children]
    assert len(ids) == len(set(ids)), ids
    assert not [c for c in children if c.info.status == "RUNNING"]
    for c in children:
        if c.info.status == "FINISHED":
            steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
            assert sorted(steps) == list(range(1, epochs + 1)), (c.data.tags[C.TAG_TRIAL_ID], steps)


@pytest.mark.timeout(420)
def test_max_failures_0_node_killed_fails_the_sweep_then_resume_succeeds(tmp_path, private_cluster):
    from weakbench.core.data import generate_synthetic_coco

    cluster, second = private_cluster
    epochs = 5
    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "weakbench", "sweep", cam_space(tmp_path), "--data", str(data),
            "--output-dir", str(out), "--name", "mf0", "--no-early-stopping", "--address", cluster.address,
            *_tiny(epochs), "--set", "lr=0.01"]  # every axis fixed: one trial per seed (0, 1)
    log = tmp_path / "sweep.log"
    proc = _popen([*base, "--max-failures", "0"], log)
    tune_dir = out / "sweeps" / "mf0" / "tune"
    try:
        deadline = time.time() + 200
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            counts = _checkpointed(tune_dir)
            if len(counts) == 2 and all(1 <= c < epochs - 1 for c in counts):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no checkpoint of both trials within 200 s; {log.read_text()[-3000:]}")
        cluster.remove_node(second, allow_graceful=False)  # SIGKILL of the node's raylet and workers
        proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 1, output[-4000:]
    assert "2 of 2 planned (1 finished, 0 stopped early, 1 failed)" in output, output[-3000:]
    client, parents, children = _runs(out)
    assert len(parents) == 1 and parents[0].info.status == "FAILED" and parents[0].data.tags.get(C.TAG_ERROR)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    failed = next(c for c in children if c.info.status == "FAILED")
    assert failed.data.tags.get(C.TAG_ERROR) and "weakbench.stopped" not in failed.data.tags, failed.data.tags
    _assert_sound(client, children, epochs)
    state = json.loads((out / "sweeps" / "mf0" / "state.json").read_text())
    assert sorted(t["status"] for t in state["trials"].values()) == ["failed", "finished"]
    assert state["driver"]["exit_code"] == 1

    # --resume on the head alone: the failed trial continues from its checkpoint under its own id
    t0 = time.time()
    proc = subprocess.run([*base, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=200, env=LOOPBACK_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, parents, children = _runs(out)
    assert parents[0].info.status == "FINISHED" and C.TAG_ERROR not in parents[0].data.tags, parents[0].data.tags
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert failed.data.tags[C.TAG_TRIAL_ID] in {c.data.tags[C.TAG_TRIAL_ID] for c in children}
    _assert_sound(client, children, epochs)
    print("max-failures-0 figures:", json.dumps({"resume_seconds": round(time.time() - t0, 1)}))


@pytest.mark.timeout(600)
def test_chaos_random_node_kills_and_restarts(tmp_path, private_cluster):
    """8 trials (4 configurations × 2 seeds, Optuna over lr) on a head and a second node, one CPU
    each; the second node is killed at a random moment twice and added back ~5 s later."""
    from weakbench.core.data import generate_synthetic_coco

    cluster, second = private_cluster
    epochs = 2
    rng = random.Random(19)
    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "weakbench", "sweep", cam_space(tmp_path), "--data", str(data),
           "--output-dir", str(out), "--name", "chaos", "--trials", "8", "--max-failures", "3",
           "--address", cluster.address, *_tiny(epochs)]
    log = tmp_path / "sweep.log"
    t0 = time.time()
    proc = _popen(cmd, log)
    tune_dir = out / "sweeps" / "chaos" / "tune"
    kills = 0
    try:
        node = second
        while kills < 2 and proc.poll() is None and time.time() - t0 < 400:
            # wait for a trial to have a checkpoint, then a random 0-6 s more: mid-trial
            while proc.poll() is None and not any(_checkpointed(tune_dir)):
                time.sleep(0.5)
            time.sleep(rng.uniform(0, 6))
            if proc.poll() is not None:
                break
            cluster.remove_node(node, allow_graceful=False)
            kills += 1
            time.sleep(5)
            node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            time.sleep(rng.uniform(10, 20))
        proc.wait(timeout=max(30, 560 - (time.time() - t0)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.time() - t0
    output = log.read_text()
    client, parents, children = _runs(out)
    statuses = [c.info.status for c in children]
    finished, failed = statuses.count("FINISHED"), statuses.count("FAILED")
    stopped = sum(1 for c in children if c.info.status == "KILLED" and not c.data.tags.get(C.TAG_INTERRUPTED))
    figures = {"kills": kills, "planned": 8, "runs": len(children), "finished": finished, "failed": failed,
               "stopped_early": stopped, "exit": proc.returncode, "wall_seconds": round(wall, 1)}
    print("chaos figures:", json.dumps(figures))
    assert kills >= 1, output[-3000:]
    assert len(children) == 8 and finished + failed + stopped == 8, (figures, output[-3000:])
    _assert_sound(client, children, epochs)
    configs = [(c.data.params["lr"], c.data.params["seed"]) for c in children]
    assert len(configs) == len(set(configs)), configs  # no configuration ran twice
    assert proc.returncode == (1 if failed else 0), (figures, output[-3000:])
    assert parents[0].info.status == ("FAILED" if failed else "FINISHED")
    assert f"8 of 8 planned ({finished} finished, {stopped} stopped early, {failed} failed" in output, output[-3000:]
