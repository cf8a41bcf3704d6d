"""The README's main job (``weakbench sweep search_spaces/cam.yaml && weakbench leaderboard``),
shrunk, while another driver's Ray instance runs on the machine (as another weakbench sweep holds
one): the sweep starts a private instance beside it and completes, no ``--address`` needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_main_job_runs_beside_another_ray_instance(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_AUTH_MODE": "disabled", "COLUMNS": "80"}
    env.pop("RAY_ADDRESS", None)
    # the other instance: a driver's private `ray.init()` (Ray records no address for it), on loopback
    other = subprocess.Popen([sys.executable, "-c",
                              "import ray, sys, time; ray.init(address='local', num_cpus=1, include_dashboard=False, "
                              "_node_ip_address='127.0.0.1'); print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "up"
        from weakbench.platform.launch import running_ray_instances

        assert running_ray_instances()  # the machine does hold another Ray instance
        out = str(tmp_path / "o")
        sweep = subprocess.run([sys.executable, "-m", "weakbench", "sweep", "search_spaces/cam.yaml", "--trials", "2",
                                "--output-dir", out, "--set", "epochs=1", "--set", "input_size=64",
                                "--eval-max-images", "8", "--no-model"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        board = subprocess.run([sys.executable, "-m", "weakbench", "leaderboard", "--output-dir", out],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert board.returncode == 0, board.stderr[-3000:]
        assert "cam" in board.stdout
        assert other.poll() is None  # the other driver's instance was left alone
    finally:
        other.stdin.close()
        other.wait(timeout=60)
