"""The driver dies or is told to stop (issue 19): real Ray, real MLflow, loopback, bounded in time.

* SIGKILL of the driver (and its local Ray instance) while trials are starting, between two saves
  of Tune's experiment state: ``--resume`` re-attaches the recorded trials instead of letting the
  seeded searcher suggest them again under new ids, so there are never more runs than planned, no
  configuration or trial id twice, none left RUNNING; ``weakbench status`` meanwhile tells the dead
  sweep from a running one. For an Optuna sweep and for a grid space under ``--searcher random``;
* SIGTERM (what ``timeout``, systemd and Kubernetes send) is an interrupt like Ctrl-C: the summary
  is printed, exit 143, the parent run KILLED, the runs it ended tagged interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from spaces import cam_space
from test_faults import LOOPBACK_ENV, _runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
# lr searched by Optuna, two seeds per configuration (the Repeater): 4 trials = 2 configurations × 2 seeds
TINY = ["--executor", "inline", "--no-model", "--eval-max-images", "8", "--set", f"epochs={EPOCHS}", "--set", "input_size=64",
        "--set", "batch_size=8", "--set", "weight_decay=0", "--no-early-stopping"]


def _cmd(out: Path, data: Path, name: str, *args: str, seeds: tuple[int, ...] = (0, 1)) -> list[str]:
    # two seeds per configuration unless told, whatever the shipped cam.yaml runs (the trial counts assume them)
    return [sys.executable, "-m", "weakbench", "sweep", cam_space(out.parent, seeds), "--data", str(data),
            "--output-dir", str(out), "--name", name, "--address", "local", "--num-cpus", "1", "--max-concurrent", "1",
            *TINY, *args]


def _tune_saved_trials(tune_dir: Path) -> set[str] | None:
    files = sorted(tune_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    try:
        data = json.loads(files[-1].read_text())
    except ValueError:
        return None
    return {(json.loads(t) if isinstance(t, str) else t)["trial_id"] for t, _ in data.get("trial_data", [])}


def _recorded(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / "state.json").read_text())["trials"]
    except (OSError, ValueError, KeyError):
        return {}


# (extra arguments, the parameters that make a trial's configuration, the seed grid): Optuna over
# lr with two seeds per configuration (the Repeater: re-attached through the driver's record),
# 2 configurations x 2 seeds; the same grid space under --searcher random (Tune's
# BasicVariantGenerator, which re-attaches by itself: the seed grid crossed twice, lr drawn per
# grid point; the drawn values must come back with their trials)
KILL_CASES = {
    "optuna": ([], ("lr", "seed"), (0, 1)),
    "grid": (["--searcher", "random"], ("lr", "seed"), (0, 1)),
}


@pytest.mark.timeout(540)
@pytest.mark.parametrize("case", list(KILL_CASES))
def test_sigkill_while_trials_start_then_resume_reattaches(tmp_path, case):
    from weakbench.core.data import generate_synthetic_coco
    from weakbench.platform.live import load_view

    extra, keys, seeds = KILL_CASES[case]
    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    out = tmp_path / "runs"
    sweep_dir = out / "sweeps" / "kill9"
    log = tmp_path / "sweep.log"
    # Tune saves its state every 30 s here (about every 10 s by default): a wide window to kill in
    env = {**LOOPBACK_ENV, "TUNE_GLOBAL_CHECKPOINT_S": "30"}
    proc = subprocess.Popen(_cmd(out, data, "kill9", "--trials", "4", *extra, seeds=seeds), cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            saved = _tune_saved_trials(sweep_dir / "tune")
            # trials/<id>/ is made by the trial itself when it starts
            started = {d.name for d in (sweep_dir / "trials").glob("*")} if (sweep_dir / "trials").is_dir() else set()
            # a trial running that Tune's last save does not know
            if saved is not None and started - saved:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no trial started between two saves of Tune's state within 300 s; {log.read_text()[-3000:]}")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    recorded_before = _recorded(sweep_dir)
    v = load_view("kill9", output_dir=out)  # `weakbench status` of the dead sweep (checked below)

    t0 = time.time()
    proc = subprocess.run(_cmd(out, data, "kill9", "--resume", seeds=seeds), cwd=REPO, capture_output=True, text=True, timeout=400,
                          env=LOOPBACK_ENV)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    client, parents, children = _runs(out)
    figures = {"case": case, "started_at_kill": len(started), "saved_by_tune_at_kill": len(saved), "runs": len(children),
               "resume_seconds": round(time.time() - t0, 1)}
    print("sigkill-resume figures:", json.dumps(figures))
    assert "4 of 4 planned (4 finished" in output, output[-3000:]
    assert len(children) == 4, [(c.data.tags[C.TAG_TRIAL_ID], c.info.status) for c in children]
    ids = [c.data.tags[C.TAG_TRIAL_ID] for c in children]
    assert len(set(ids)) == 4 and started <= set(ids)  # the trials that had started, re-attached
    configs = [tuple(c.data.params[k] for k in keys) for c in children]
    assert len(set(configs)) == 4, configs
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (c.data.tags[C.TAG_TRIAL_ID], steps)
    assert parents[0].info.status == "FINISHED"
    # the driver had recorded every trial that started, Tune's last save did not
    assert started - saved and set(recorded_before) >= started, (saved, started, recorded_before)
    # the driver was gone: status said so instead of "1 running", and `status --watch` stopped
    assert "not running" in v.note and not [r for r in v.rows.values() if r.status in ("running", "starting")], \
        (v.note, [(r.trial_id, r.status) for r in v.rows.values()])
    assert v.ended is not None


@pytest.mark.timeout(300)
def test_sigterm_is_an_interrupt_with_exit_143(tmp_path):
    from weakbench.core.data import generate_synthetic_coco

    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    out = tmp_path / "runs"
    log = tmp_path / "sweep.log"
    proc = subprocess.Popen(_cmd(out, data, "term", "--trials", "2", "--set", "lr=0.01", "--set", "epochs=6"), cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=LOOPBACK_ENV, start_new_session=True)
    tune_dir = out / "sweeps" / "term" / "tune"
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not list(tune_dir.glob("_trial_*/checkpoint_*")):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert list(tune_dir.glob("_trial_*/checkpoint_*")), "no checkpoint within 200 s"
        proc.send_signal(signal.SIGTERM)  # the driver only, as `timeout` does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 143, output[-4000:]
    assert "of 2 planned" in output and "interrupted" in output and "--resume" in output, output[-3000:]
    client, parents, children = _runs(out)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert children and not [c for c in children if c.info.status == "RUNNING"]
    assert any(c.info.status == "KILLED" and c.data.tags.get(C.TAG_INTERRUPTED) for c in children), \
        [(c.info.status, c.data.tags) for c in children]
    assert not [c for c in children if c.data.tags.get("weakbench.stopped") == "stopped early by the scheduler"]
