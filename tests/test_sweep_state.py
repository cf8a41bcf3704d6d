"""The driver's record of a sweep (``state.json``, issue 19): atomic writes, a dead driver told from
a running one, a failed start never "the latest sweep", the replay of recorded trials on
``--resume``, local faults that are not retried."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weakbench.core.io import atomic_write_text
from weakbench.platform.sweep_state import STATE_NAME, TRIAL_ID_KEY, SweepState, driver_gone

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "state.json"
    atomic_write_text(f, "old")
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "missing" / "state.json", "x")


def test_driver_gone_tells_a_dead_driver_from_a_running_one(tmp_path):
    s = SweepState(tmp_path / STATE_NAME)
    s.start_driver()
    assert driver_gone(s) is None  # this process, heartbeat now
    s.driver["pid"] = _dead_pid()
    assert "not running" in driver_gone(s)
    s.start_driver()
    s.driver.update(host="another-host", heartbeat=time.time() - 3600)  # a driver elsewhere, silent for an hour
    assert "heartbeat" in driver_gone(s)
    s.end_driver(0)
    assert driver_gone(s) is None  # ended: not gone, done


def test_a_sweep_whose_start_failed_is_not_the_latest(tmp_path):
    """``--resume`` without ``--name`` and ``weakbench status`` take the latest sweep that started,
    not a newer folder left by a start that failed (sweep.json but no record, no Tune state)."""
    from weakbench.platform.live import find_sweep_dir
    from weakbench.platform.sweep import SweepOptions, resume_target

    sweeps = tmp_path / "sweeps"
    good, bad = sweeps / "cam-synthetic-1", sweeps / "cam-synthetic-2"
    for d in (good, bad):
        d.mkdir(parents=True)
        (d / "sweep.json").write_text("{}")
    SweepState(good / STATE_NAME).save()
    os.utime(good, (time.time() - 60, time.time() - 60))
    opts = SweepOptions(space=str(REPO / "search_spaces" / "cam.yaml"), output_dir=str(tmp_path), resume=True)
    assert resume_target(opts, "cam") == good
    assert find_sweep_dir(tmp_path, None) == good


def _counting_searcher():
    """A deterministic searcher: the n-th suggestion is {"x": n}."""
    from ray.tune.search import Searcher

    class Counting(Searcher):
        def __init__(self):
            super().__init__(metric="m", mode="max")
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"x": self.n - 1}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    return Counting()


def test_resume_replays_recorded_trials_then_asks_the_searcher(tmp_path):
    """Tune's saved searcher state knows 1 suggestion, the record 3: the next two suggestions are
    the recorded trials 1 and 2 under their own ids and configurations; only then new ones."""
    from weakbench.platform import sweep_state
    from weakbench.platform.tune_record import ReattachingSearcher, Recorder

    state = SweepState(tmp_path / STATE_NAME)
    for i, (tid, x) in enumerate([("a", 10), ("b", 11), ("c", 12)]):
        state.trial(tid).update(index=i, config={"x": x}, status="finished" if tid == "b" else "running")
    wrapped = ReattachingSearcher(_counting_searcher())
    wrapped.set_state({**wrapped.get_state(), "_suggested": 1})  # as restored from Tune's last save
    sweep_state.ACTIVE = Recorder(state, "m")
    try:
        got = [wrapped.suggest(f"tune{i}") for i in range(3)]
    finally:
        sweep_state.ACTIVE = None
    assert got[0] == {"x": 11, TRIAL_ID_KEY: "b"} and got[1] == {"x": 12, TRIAL_ID_KEY: "c"}
    assert TRIAL_ID_KEY not in got[2]
    saved = json.loads((tmp_path / STATE_NAME).read_text())["trials"]
    assert list(saved) == ["a", "b", "c", "tune2"] and saved["tune2"]["index"] == 3  # recorded before it starts
    assert saved["b"]["status"] == "finished" and saved["c"]["tune_id"] == "tune1"


def test_local_faults_are_told_from_retryable_errors():
    from weakbench.platform.tune_record import local_fault

    full = OSError(errno.ENOSPC, "No space left on device", "/out/ckpt")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("checkpoint failed") from e
    except RuntimeError as wrapped:
        assert local_fault(wrapped).startswith("OSError: [Errno 28] No space left on device")
    assert local_fault(FileNotFoundError(errno.ENOENT, "No such file", "x.jpg")).startswith("FileNotFoundError")
    assert local_fault(OSError(errno.EROFS, "Read-only file system")) is not None
    group = RuntimeError("worker group failed")
    group.worker_failures = {0: OSError(errno.ENOSPC, "No space left on device")}
    assert local_fault(group) is not None
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    group.worker_failures = {0: UserExceptionWithTraceback(OSError(errno.EROFS, "Read-only file system"), "tb")}
    assert local_fault(group) is not None  # a Train worker's own error, as the controller holds it
    assert local_fault(ConnectionError("node died")) is None and local_fault(ValueError("nan")) is None


def test_status_reads_the_record_and_says_the_driver_is_gone(tmp_path):
    from weakbench.platform.live import load_view

    sweep = tmp_path / "sweeps" / "cam-x"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"space": str(REPO / "search_spaces" / "cam.yaml"), "overrides": {"epochs": 3},
                                                  "trials": 3, "name": "cam-x",
                                                  "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    s = SweepState(sweep / STATE_NAME)
    s.start_driver()
    s.trial("a").update(index=0, status="finished", config={"lr": 0.01, "weight_decay": 0.0, "__trial_index__": 0},
                        progress=4.0, epoch=3.0, latest=20.0, started=100.0, ended=130.0)
    s.trial("b").update(index=1, status="running", config={"lr": 0.02, "weight_decay": 0.0, "__trial_index__": 1},
                        progress=1.0, epoch=1.0, latest=5.0, started=140.0, updated=150.0)
    s.save()
    v = load_view(None, output_dir=tmp_path)
    assert (v.rows["a"].status, v.rows["a"].latest, v.rows["b"].status) == ("finished", 20.0, "running")
    assert v.rows["b"].params["seed"] == 1 and v.ended is None
    s.driver["pid"] = _dead_pid()  # SIGKILLed: the record still says running
    s.save()
    v = load_view(None, output_dir=tmp_path)
    assert v.rows["b"].status == "paused" and "not running" in v.note and "--resume" in v.note
    assert v.ended is not None and "1 running" not in v.header().plain


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_local_fault_is_not_retried(tmp_path, ray_local):
    """A trial that hits ENOSPC with ``max_failures=2`` runs once: it ends without a retry and the
    driver's record says failed, with the error."""
    import ray.cloudpickle
    from ray import tune

    from weakbench.platform import sweep_state
    from weakbench.platform.tune_record import Recorder, RecordingCallback

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    state = SweepState(tmp_path / STATE_NAME)
    sweep_state.ACTIVE = Recorder(state, "m")
    try:
        tune.Tuner(tune.with_resources(_full_disk_trial, {"cpu": 0.5}), param_space={"log": str(tmp_path / "starts")},
                   run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0, callbacks=[RecordingCallback()],
                                             failure_config=tune.FailureConfig(max_failures=2))).fit()
    finally:
        sweep_state.ACTIVE = None
    assert (tmp_path / "starts").read_text() == "x"  # one start, no retry
    (entry,) = SweepState.load(tmp_path).trials.values()
    assert entry["status"] == "failed" and "No space left on device" in entry["error"] and entry["restarts"] == 0


def _full_disk_trial(config):
    from weakbench.platform.tune_record import end_on_local_fault

    with open(config["log"], "a") as f:
        f.write("x")
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/checkpoint")
    except OSError as e:
        end_on_local_fault(e)


def test_a_replayed_trial_keeps_its_configuration_for_asha():
    """The id a replayed trial carries does not make it another configuration for ASHA: its seed
    repeats are still stopped together."""
    from weakbench.platform.schedulers import configuration_key

    assert configuration_key({"lr": 0.1, "seed": 0, TRIAL_ID_KEY: "a1"}) == configuration_key({"lr": 0.1, "seed": 1})
