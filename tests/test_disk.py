"""Disk: what a finished trial leaves (its final weights once, the MLflow model; no epoch
checkpoint and no private stage product; ``keep_checkpoints`` keeps them), and a sweep on a real
full disk (a small tmpfs as ``--output-dir``): the trial fails at once without a retry, the sweep
exits 1 with its runs FAILED, not RUNNING; a driver that cannot write its final statuses says so
in one line with the fix, and ``--resume`` then records them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, run_trial

pytestmark = pytest.mark.slow

TINY = {"backbone": "resnet10t", "input_size": 48, "epochs": 2, "batch_size": 8, "lr": 0.02}


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.mark.parametrize("keep", [False, True])
def test_finished_trial_keeps_its_weights_once(tmp_path, keep):
    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    save_splits(make_splits(source, seed=0), cache / "splits.json")
    spec = TrialSpec(method="cam", params=dict(TINY), data=None, data_cache=str(cache),
                     splits_path=str(cache / "splits.json"), trial_dir=str(tmp_path / "trial"),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id="t0", run_name="cam-t0",
                     eval_max_images=4, num_overlays=0, log_model=True, keep_checkpoints=keep)
    client = tracking.client_for(spec.tracking_uri)  # artifacts under tmp_path, as a sweep lays them out
    tracking.ensure_experiment(client, spec.experiment, artifact_root=tracking.default_artifact_root(spec.tracking_uri))
    run_trial(spec, executor="inline")
    run = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags.get(C.TAG_MODEL_URI)
    weights = sorted(Path(tmp_path / "mlartifacts").rglob("*.safetensors"))
    assert len(weights) == 1
    trial = Path(spec.trial_dir)
    ckpts = sorted(trial.glob("wb-ckpt-*"))
    products = trial / "products"
    if keep:
        assert products.is_dir() and list(products.rglob("model.pt"))
        assert _size(trial) > weights[0].stat().st_size  # the product's weights and the last epoch's checkpoint
    else:
        assert not products.exists(), sorted(products.rglob("*"))
        assert len(ckpts) == 1  # the final cursor only: a restarted trial returns at once
        assert _size(trial) < 100_000, _size(trial)
        from weakbench.platform.predict import load_predictor

        assert load_predictor(run.data.tags[C.TAG_MODEL_URI], spec.tracking_uri).class_names == source.class_names
        again = run_trial(spec, executor="inline")  # restarted after the clean-up: nothing to redo
        assert again.get("already_finished") == 1.0


REPO = Path(__file__).resolve().parents[1]
LOOPBACK_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(REPO)}
SWEEP = ["--address", "local", "--num-cpus", "1", "--executor", "inline", "--no-model", "--eval-max-images", "8",
         "--set", "epochs=2", "--set", "input_size=64", "--set", "batch_size=8", "--set", "weight_decay=0",
         "--set", "lr=0.01", "--no-early-stopping", "--max-failures", "2"]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a fresh tmpfs of ``size`` (e.g. ``"30m"``) under ``tmp_path``, unmounted after
    the test. Skipped where this process may not mount (not root, or no mount namespace rights)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                              text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (uid {os.getuid()}): {made.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=True)


def _sweep_data(tmp_path: Path) -> tuple[str, Path]:
    from spaces import cam_space
    from weakbench.core.data import generate_synthetic_coco

    data = generate_synthetic_coco(tmp_path / "data", num_images=32, image_size=64, seed=0)
    return cam_space(tmp_path, (0,)), data  # one seed, every axis fixed: one trial


def _runs(out: Path):
    client = tracking.client_for(tracking.default_tracking_uri(out))
    runs = client.search_runs([client.get_experiment_by_name(C.DEFAULT_EXPERIMENT).experiment_id])
    return ([r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_SWEEP],
            [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL])


@pytest.mark.timeout(400)
def test_full_disk_fails_the_trial_once_and_the_sweep_cleanly(tmp_path, tmpfs):
    """The issue's case: a 30 MB tmpfs as ``--output-dir``, a ResNet-18 trial whose first
    checkpoint does not fit. Exit 1 (documented), a one-line summary and no traceback, the trial's
    run and the parent FAILED (not RUNNING) with the ENOSPC named, no Tune retry although
    ``--max-failures 2``, and ``weakbench status`` shows the trial failed, not running."""
    from weakbench.platform.live import load_view

    space, data = _sweep_data(tmp_path)
    out = tmpfs("30m")
    proc = subprocess.run([sys.executable, "-m", "weakbench", "sweep", space, "--data", str(data), "--output-dir",
                           str(out), "--name", "full", *SWEEP], cwd=REPO, capture_output=True, text=True, timeout=360,
                          env=LOOPBACK_ENV)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "1 of 1 planned (0 finished, 0 stopped early, 1 failed)" in output, output[-3000:]
    assert "Traceback" not in output and "stopped early at" not in output, output[-3000:]
    assert "No space left on device" in output, output[-3000:]
    parents, children = _runs(out)
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [c.info.status for c in children] == ["FAILED"], [(c.info.status, c.data.tags) for c in children]
    assert "No space left on device" in children[0].data.tags[C.TAG_ERROR]
    record = json.loads((out / "sweeps" / "full" / "state.json").read_text())
    (entry,) = record["trials"].values()
    assert entry["status"] == "failed" and entry.get("restarts", 0) == 0, entry  # not retried
    assert "No space left on device" in entry["error"]
    v = load_view("full", output_dir=out)
    assert [r.status for r in v.rows.values()] == ["failed"], [(r.trial_id, r.status) for r in v.rows.values()]


FILL_AT_THE_END = textwrap.dedent("""
    # `weakbench sweep`, whose disk fills up as Tune ends (the live view's `ended`, which runs right
    # before the driver writes the final statuses): nothing of weakbench's own code is replaced
    import errno, sys
    from pathlib import Path
    from weakbench.platform import live

    fill, ended = Path(sys.argv.pop(1)), live.SweepObserver.ended

    def ended_then_full(self):
        ended(self)
        with open(fill, "wb") as f:
            try:
                while True:
                    f.write(b"\\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e

    live.SweepObserver.ended = ended_then_full
    from weakbench.cli import main
    sys.argv[0] = "weakbench"
    main()
""")


@pytest.mark.timeout(500)
def test_final_statuses_unwritable_says_so_then_resume_records_them(tmp_path, tmpfs):
    """The store fills up between the end of Tune and the driver's final writes (a real SQLite
    store and ``state.json`` on a real full tmpfs): exit 1 and one line on stderr naming the store,
    the state file and the fix (free the space, then ``--resume``); once the space is freed,
    ``--resume`` writes the statuses: the parent ends FINISHED, no run is left RUNNING."""
    space, data = _sweep_data(tmp_path)
    out = tmpfs("200m")
    fill = out / "filler"
    args = [space, "--data", str(data), "--output-dir", str(out), "--name", "late", *SWEEP, "--set", "backbone=resnet10t"]
    proc = subprocess.run([sys.executable, "-c", FILL_AT_THE_END, str(fill), "sweep", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=360, env=LOOPBACK_ENV)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    assert fill.stat().st_size > 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = errors[0]
    for needle in ("could not write the trials' final statuses", "database or disk is full",
                   f"sqlite:///{out}/mlflow.db", str(out / "sweeps" / "late" / "state.json"), "Free space on",
                   "--resume --name late"):
        assert needle in line, (needle, line)
    parents, children = _runs(out)
    assert [p.info.status for p in parents] == ["RUNNING"]  # what the line warns of

    fill.unlink()  # the fix the line names
    proc = subprocess.run([sys.executable, "-m", "weakbench", "sweep", *args, "--resume"], cwd=REPO,
                          capture_output=True, text=True, timeout=360, env=LOOPBACK_ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    parents, children = _runs(out)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert [c.info.status for c in children] == ["FINISHED"]
