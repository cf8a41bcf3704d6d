"""Fault tests of the Train executor on clusters started as users start them (``ray start``),
loopback only, bounded in time.

* a two-node cluster (``ray start --head --num-cpus=1`` plus ``ray start --address``, one CPU
  each) runs a 2-trial Train-executor sweep to its end: the placement group of a trial Tune
  stopped is released (Ray Train's ``PlacementGroupCleaner`` reaches the State API), so the
  second trial gets the CPU (issue 12: it used to wait forever, "0.01 used of 1.01 reserved");
* a head without a dashboard (no State API) is refused before any trial starts;
* the node running a Train worker is SIGKILLed mid-trial: the trial restarts from its Train
  checkpoint on the remaining node, MLflow holds one run per trial, none RUNNING.

Every cluster gets its own ``--temp-dir`` (its address file, sessions and sockets live there) and
free ports; it is stopped by killing only the processes that name that directory, and their
descendants (``ray stop`` would stop every Ray instance of the machine).
The figures of each run are printed (``pytest -s``) and written to ``<tmp>/figures.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from spaces import cam_space
from weakbench.core import conventions as C
from test_faults import _runs  # one reader of a sweep's parent and trial runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray 2.60's `ray start --head` turns token authentication on by default (token in
# ~/.ray/auth_token) but a second `ray start --address` does not, and is then refused by the GCS
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
ENV.pop("RAY_ADDRESS", None)
TINY = ["--no-model", "--eval-max-images", "8", "--set", "input_size=64", "--set", "batch_size=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def _with_descendants(roots: list[int]) -> list[int]:
    tree, out, todo = _children(), [], list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(tree.get(p, []))
    return out


def _kill(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class RayStartCluster:
    """A head and worker nodes started with ``ray start`` on this machine, in a private temp dir."""

    def __init__(self, head_cpus: int, node_cpus: list[int], dashboard: bool = True):
        self.temp_dir = tempfile.mkdtemp(prefix="wbray", dir="/tmp")  # short: Unix socket paths ≤ 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        head = [RAY, "start", "--head", f"--num-cpus={head_cpus}", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        head += ([f"--dashboard-port={_free_port()}"] if dashboard else ["--include-dashboard=false"])
        try:
            self._start(head)
            for cpus in node_cpus:
                self._start([RAY, "start", f"--address={self.address}", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1"])
        except BaseException:
            self.shutdown()
            raise

    def _start(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def raylets(self) -> dict[int, bool]:
        """pid → is the head, for this cluster's raylets."""
        found = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                cmd = _cmdline(int(d.name))
                if "raylet/raylet " in cmd and self.temp_dir in cmd:
                    found[int(d.name)] = " --head" in cmd
        return found

    def kill_node(self, raylet_pid: int) -> None:
        """SIGKILL a node: its raylet and everything under it (workers, agents)."""
        _kill(_with_descendants([raylet_pid]), signal.SIGKILL)

    def session_logs(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def shutdown(self) -> None:
        roots = [int(d.name) for d in Path("/proc").iterdir()
                 if d.name.isdigit() and int(d.name) != os.getpid() and self.temp_dir in _cmdline(int(d.name))]
        pids = _with_descendants(roots)
        _kill(pids, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _cmdline(p) for p in pids):
            time.sleep(0.5)
        _kill(pids, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _sweep_cmd(data: Path, out: Path, name: str, address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "weakbench", "sweep", cam_space(out.parent), "--data", str(data),
            "--output-dir", str(out), "--name", name, "--address", address, "--executor", "train", *TINY, *args]


@pytest.fixture
def data(tmp_path):
    from weakbench.core.data import generate_synthetic_coco

    return generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)


@pytest.mark.timeout(420)
def test_two_trial_train_sweep_on_a_two_node_ray_start_cluster_finishes(tmp_path, data):
    """Issue 12's command: 2 trials, one at a time, on two one-CPU nodes. The first trial's Train
    controller dies with its Tune trial (ASHA stops it at its last report); its worker group's
    placement group must be released for the second trial to start."""
    t0 = time.time()
    cluster = RayStartCluster(head_cpus=1, node_cpus=[1])
    t_cluster = time.time() - t0
    out = tmp_path / "runs"
    try:
        t1 = time.time()
        proc = subprocess.run(_sweep_cmd(data, out, "twonode", cluster.address, "--trials", "2", "--set", "epochs=1",
                                         "--max-concurrent", "1"),
                              cwd=REPO, capture_output=True, text=True, timeout=330, env=ENV)
        wall = time.time() - t1
        cleaned = proc.stdout.count("Cleaning up placement group") + proc.stderr.count("Cleaning up placement group")
    finally:
        cluster.shutdown()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Failed to query Ray Train Controller actor state" not in output
    assert "Found multiple active Ray instances" not in output
    client, parents, children = _runs(out)
    figures = {"cluster_start_seconds": round(t_cluster, 1), "sweep_wall_seconds": round(wall, 1),
               "trials_finished": sum(c.info.status == "FINISHED" for c in children), "mlflow_trial_runs": len(children),
               "placement_groups_cleaned_log_lines": cleaned}
    print("two-node figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert "2 of 2 planned (2 finished" in proc.stdout


@pytest.mark.timeout(240)
def test_a_cluster_without_state_api_is_refused_before_any_trial(tmp_path, data):
    """A head started with ``--include-dashboard=false`` serves no State API: the Train sweep
    stops at once with exit 2 and says what is missing, instead of hanging after its first trial."""
    cluster = RayStartCluster(head_cpus=2, node_cpus=[], dashboard=False)
    out = tmp_path / "runs"
    try:
        t0 = time.time()
        proc = subprocess.run(_sweep_cmd(data, out, "nodash", cluster.address, "--trials", "2", "--set", "epochs=1"),
                              cwd=REPO, capture_output=True, text=True, timeout=200, env=ENV)
        wall = time.time() - t0
    finally:
        cluster.shutdown()
    output = proc.stdout + proc.stderr
    print("no-dashboard figures:", json.dumps({"seconds_to_refuse": round(wall, 1), "exit": proc.returncode}))
    assert proc.returncode == 2, output[-4000:]
    assert "State API" in output and "--include-dashboard=true" in output, output[-3000:]
    assert not list((out / "sweeps" / "nodash").glob("tune/_trial_*"))  # no trial started


@pytest.mark.timeout(480)
def test_node_running_a_train_worker_dies_and_the_trial_resumes(tmp_path, data):
    """A head without CPUs (control plane only) and two two-CPU nodes; 2 trials of 3 epochs one
    at a time. Once the first trial has a Train checkpoint, the node running its Train worker is
    SIGKILLed: the trial resumes from that checkpoint (Train restarts its worker group on the
    other node, or Tune restarts the trial there when its trial actor died too), every epoch is
    logged once, and MLflow holds one FINISHED run per trial."""
    from ray import tune

    t0 = time.time()
    cluster = RayStartCluster(head_cpus=0, node_cpus=[2, 2])
    out = tmp_path / "runs"
    log = tmp_path / "sweep.log"
    cmd = _sweep_cmd(data, out, "trainkill", cluster.address, "--trials", "2", "--set", "epochs=3", "--set", "lr=0.01",
                     "--set", "weight_decay=0", "--max-concurrent", "1", "--no-early-stopping", "--max-failures", "2")
    killed_head = None
    try:
        t_sweep = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.time() + 240
            victim = None
            while time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-4000:]
                if list((out / "sweeps" / "trainkill" / "train").glob("*/checkpoint_*")):
                    raylets = cluster.raylets()
                    workers = [p for p in _with_descendants(list(raylets)) if _cmdline(p).startswith("ray::RayTrainWorker")]
                    owners = [r for r in raylets if set(workers) & set(_with_descendants([r]))]
                    if owners:
                        victim = owners[0]
                        break
                time.sleep(0.3)
            assert victim is not None, f"no Train checkpoint with a live worker within 240 s: {log.read_text()[-4000:]}"
            killed_head = cluster.raylets()[victim]
            t_kill = time.time()
            cluster.kill_node(victim)
            proc.wait(timeout=330)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.time() - t_sweep
        # each Train worker-group start is logged by the controller into the session's worker logs
        group_starts = sum(f.read_text(errors="replace").count("Started training worker group")
                           for f in cluster.session_logs().glob("worker-*") if f.is_file())
    finally:
        cluster.shutdown()
    output = log.read_text()
    assert killed_head is False, "the Train worker ran on the head, which has no CPU"
    assert proc.returncode == 0, output[-5000:]
    tune_dir = out / "sweeps" / "trainkill" / "tune"
    trials = tune.ExperimentAnalysis(str(tune_dir)).trials
    client, parents, children = _runs(out)
    tune_restarts = sum(t.num_failures for t in trials)
    train_restarts = max(0, group_starts - 2 - tune_restarts)  # one start per (trial, attempt); cam: one segment
    figures = {"trials_planned": 2, "trials_finished": sum(c.info.status == "FINISHED" for c in children),
               "tune_restarts": tune_restarts, "train_worker_group_starts": group_starts,
               "train_restarts": train_restarts, "mlflow_trial_runs": len(children), "mlflow_parent_runs": len(parents),
               "wall_seconds": round(wall, 1), "seconds_after_kill": round(time.time() - t_kill, 1),
               "total_seconds_with_cluster": round(time.time() - t0, 1)}
    print("train node-kill figures:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert sorted(t.status for t in trials) == ["TERMINATED", "TERMINATED"]
    assert tune_restarts + train_restarts >= 1, figures
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and len({c.data.tags[C.TAG_TRIAL_ID] for c in children}) == 2  # one run per trial
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert sorted(steps) == [1, 2, 3], (c.data.tags[C.TAG_TRIAL_ID], steps)  # resumed from its checkpoint, not redone
    assert "2 of 2 planned (2 finished" in output
