"""GPU requests of a sweep on a machine without a GPU: what is refused (one line, exit 2), what
a fractional request becomes in Ray (a local Ray instance with a *logical* GPU: ``num_gpus=1``
declares the resource without any device, so the placement is real and nothing runs on a GPU)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weakbench.core.errors import ConfigError
from weakbench.platform.sweep import SweepOptions, check_gpu_request, resolve_executor, trial_placement

REPO = Path(__file__).resolve().parents[1]


def opts(**kw) -> SweepOptions:
    return SweepOptions(space="s.yaml", **kw)


def test_fractional_gpu_trials_run_inline_and_pack_on_one_gpu():
    o = opts(gpus_per_trial=0.25, use_gpu=True, cpus_per_worker=0.5)
    assert resolve_executor(o) == "inline"
    resources, conc = trial_placement(o, "inline", {"CPU": 16, "GPU": 1})
    assert resources == {"cpu": 0.5, "gpu": 0.25} and conc == 4  # four trials on the one GPU
    assert trial_placement(o, "inline", {"CPU": 1, "GPU": 1})[1] == 2  # the CPUs bound it first
    assert trial_placement(opts(gpus_per_trial=0.3, use_gpu=True), "inline", {"CPU": 16, "GPU": 2})[1] == 6


def test_ddp_gpu_trials_hold_whole_gpus():
    o = opts(use_gpu=True, num_workers=2)
    assert resolve_executor(o) == "train"
    resources, conc = trial_placement(o, "train", {"CPU": 8, "GPU": 4})
    assert resources == {"cpu": 0.01} and conc == 2  # 2 GPUs per trial (Train's workers hold them)


@pytest.mark.parametrize("kw, match", [
    ({"gpus_per_trial": 2.0}, r"--gpus-per-trial 2: a trial shares at most one GPU.*--gpu --num-workers N"),
    ({"gpus_per_trial": 0.5, "num_workers": 2}, r"DDP trials hold one whole GPU per worker.*--gpu --num-workers 2"),
    ({"gpus_per_trial": 0.5, "executor": "train"}, r"runs one-worker trials inline.*--executor auto"),
])
def test_unplaceable_gpu_requests_are_refused_with_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        check_gpu_request(opts(**kw), cuda_visible=True)


@pytest.mark.parametrize("kw, flag", [({"use_gpu": True}, "--gpu"), ({"gpus_per_trial": 0.25}, "--gpus-per-trial")])
def test_gpu_refused_where_none_is_visible(kw, flag, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=f"{flag}: no GPU is visible on this machine.*drop {flag}"):
        check_gpu_request(opts(**kw), cuda_visible=False)
    check_gpu_request(opts(address="ray://gpu-head:10001", **kw), cuda_visible=False)  # a cluster: checked on it


def test_a_cluster_without_enough_gpus_is_refused():
    with pytest.raises(ConfigError, match=r"--gpus-per-trial 0.5 asks for 0.5 GPU\(s\) per trial but the Ray cluster has 0"):
        trial_placement(opts(gpus_per_trial=0.5, use_gpu=True), "inline", {"CPU": 4})
    with pytest.raises(ConfigError, match=r"--gpu asks for 2 GPU\(s\) per trial but the Ray cluster has 1"):
        trial_placement(opts(use_gpu=True, num_workers=2), "train", {"CPU": 4, "GPU": 1})


def test_cli_refuses_gpu_without_a_gpu_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "weakbench", "sweep", str(REPO / "search_spaces" / "cam.yaml"), "--gpu",
                        "-o", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "no GPU is visible" in errors[0], r.stderr


_FAKE_GPU_SWEEP = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray import tune
    from weakbench.platform.sweep import SweepOptions, resolve_executor, trial_placement

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    o = SweepOptions(space="s.yaml", gpus_per_trial=0.25, use_gpu=True, cpus_per_worker=0.5)
    executor = resolve_executor(o)
    resources, conc = trial_placement(o, executor, ray.cluster_resources())

    import pathlib
    meet = pathlib.Path(sys.argv[1]) / "meet"
    meet.mkdir(parents=True, exist_ok=True)

    def trial(config):
        # a barrier: each trial waits (up to 120 s) until all four trials are running at once
        (meet / str(config["i"])).touch()
        t0 = time.time()
        while len(list(meet.iterdir())) < 4 and time.time() - t0 < 120:
            time.sleep(0.2)
        tune.report({"together": len(list(meet.iterdir())),
                     "gpu": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
                     "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()])})

    grid = tune.Tuner(tune.with_resources(trial, resources), param_space={"i": tune.grid_search([0, 1, 2, 3])},
                      tune_config=tune.TuneConfig(max_concurrent_trials=conc),
                      run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0)).fit()
    rows = [r.metrics for r in grid]
    print("RESULT " + json.dumps({"executor": executor, "resources": resources, "conc": conc,
                                  "rows": [{k: r[k] for k in ("together", "gpu", "gpu_ids")} for r in rows]}))
""")


@pytest.mark.slow
def test_fractional_request_becomes_ray_gpu_shares_on_a_local_instance(tmp_path):
    """Four trials of ``--gpus-per-trial 0.25`` on a Ray instance with one (logical) GPU: each
    trial holds 0.25 GPU of GPU 0 and all four run at the same time."""
    script = tmp_path / "fake_gpu_sweep.py"
    script.write_text(_FAKE_GPU_SWEEP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "tune")], capture_output=True, text=True, env=env,
                       timeout=240)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["executor"] == "inline" and out["resources"] == {"cpu": 0.5, "gpu": 0.25} and out["conc"] == 4
    rows = out["rows"]
    assert len(rows) == 4
    assert all(row["gpu"] == 0.25 and json.loads(row["gpu_ids"]) == ["0"] for row in rows), rows
    assert all(row["together"] == 4 for row in rows), rows  # all four at once on the one GPU
