"""End to end through the CLI: sweep → leaderboard → register → predict, on real Ray and MLflow.

Runs a 2-trial sweep on the embedded synthetic default, and on ``../shared/data/coco128`` when
present, and checks the counts the spine promises: one parent run, one child run per trial with
metrics, one Parquet row per run, a registered model that loads by alias and writes overlays.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spaces import cam_space
from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.cli import app

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()



def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def runs_of(out: Path):
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_SWEEP]
    children = [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL]
    return client, parents, children


def sweep_and_check(out: Path, data: str | None, *extra: str):
    # cam.yaml with two seeds: --trials 2 is one configuration × seeds 0, 1 (the shipped file has 3)
    args = ["sweep", cam_space(out.parent), "--trials", 2, "--output-dir", out, "--name", "e2e",
            "--set", "epochs=2", "--set", "input_size=64", "--set", "batch_size=8", "--eval-max-images", 16, *extra]
    if data:
        args += ["--data", data]
    output = invoke(*args)
    assert "best (val/max_box_acc_v2)" in output
    client, parents, children = runs_of(out)
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status in ("FINISHED", "KILLED")  # KILLED: stopped early by ASHA
        assert "val/max_box_acc_v2" in child.data.metrics and "train/loss" in child.data.metrics
    assert any(c.info.status == "FINISHED" and "test/max_box_acc_v2" in c.data.metrics for c in children)
    return client, parents, children


def leaderboard_register_predict(out: Path, image: Path, dataset: str):
    from weakbench.platform.results import read_store

    output = invoke("leaderboard", "--output-dir", out, "--metric", "max_box_acc_v2")
    assert "cam" in output
    table = read_store(out / "results")  # Parquet partitioned by dataset and method
    assert table.num_rows == 2
    invoke("register", "--method", "cam", "--output-dir", out)
    name = f"weakbench-cam-{dataset}"
    preds = out / "pred"
    output = invoke("predict", "--model", f"models:/{name}@champion", "--output-dir", out, "--overlay-dir", preds, image)
    pngs = list(preds.glob("*.png"))
    assert pngs, output
    from PIL import Image

    with Image.open(pngs[0]) as im, Image.open(image) as src:
        assert im.size == src.size  # overlay at the image's original size


def test_sweep_synthetic_default_end_to_end(tmp_path, ray_local):
    out = tmp_path / "runs"
    sweep_and_check(out, None)
    # the default executor, resolved and saved for --resume: one CPU worker trains in its trial actor
    assert json.loads((out / "sweeps" / "e2e" / "sweep.json").read_text())["executor"] == "inline"
    image = next((out / "data_cache").rglob("*.png"))
    leaderboard_register_predict(out, image, "synthetic")
    # --resume of a finished sweep adds nothing and rewrites nothing
    _, _, before = runs_of(out)
    invoke("sweep", cam_space(out.parent), "--output-dir", out, "--resume", "--name", "e2e")
    _, parents, after = runs_of(out)
    assert len(parents) == 1
    assert sorted((r.info.run_id, r.info.end_time) for r in after) == sorted((r.info.run_id, r.info.end_time) for r in before)


def test_sweep_coco128_end_to_end(tmp_path, ray_local, coco128_dir):
    out = tmp_path / "runs"
    # a relative --data path (as a user types it) must reach the Ray workers, whose cwd differs
    sweep_and_check(out, os.path.relpath(coco128_dir), "--executor", "inline")
    leaderboard_register_predict(out, next((coco128_dir / "images").glob("*.jpg")), coco128_dir.name)


@pytest.mark.parametrize("args, fragments", [
    (["sweep", "search_spaces/nope.yaml"], ["nope.yaml", "not found"]),
    (["sweep", "search_spaces/cam.yaml", "--data", "/nonexistent/data"], ["/nonexistent/data"]),
    (["sweep", "search_spaces/cam.yaml", "--set", "backbone=resnet9000"], ["resnet9000", "backbone"]),
    (["sweep", "search_spaces/cam.yaml", "--set", "epochs=-1"], ["epochs", "greater than or equal to 0"]),
    (["predict", "--model", "models:/nothing@champion", "x.jpg"], ["models:/nothing@champion", "registry list"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragments):
    proc = subprocess.run([sys.executable, "-m", "weakbench", *args, "--output-dir", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.startswith("error:"), err
    for f in fragments:
        assert f in err, (f, err)
    db = tmp_path / "o" / "mlflow.db"
    if db.exists():  # nothing left RUNNING
        client = tracking.client_for(tracking.default_tracking_uri(tmp_path / "o"))
        for exp in client.search_experiments():
            assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")


def test_images_that_do_not_decode_are_refused_before_ray_starts(tmp_path):
    """Images that do not decode: the sweep is refused before Ray starts or any run is created
    (exit 2, the files named), instead of every trial failing on its first image."""
    import shutil

    from weakbench.core.data import generate_synthetic_coco

    data = generate_synthetic_coco(tmp_path / "broken", num_images=12, seed=3)
    images = sorted((data / "images").iterdir())
    for img in images[:5]:
        img.write_bytes(b"not an image")
    out = tmp_path / "runs"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "weakbench", "sweep", str(REPO / "search_spaces" / "cam.yaml"), "--data", str(data),
                           "--trials", "1", "--output-dir", str(out), "--executor", "inline", "--set", "epochs=1",
                           "--address", "local"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("error: 5 of 12 image(s)") and "cannot decode image" in err and str(images[0]) in err, err
    assert "and 2 more" in err and "Traceback" not in err
    assert not (out / "sweeps").exists() or not any((out / "sweeps").iterdir())  # nothing created
    assert not (out / "mlflow.db").exists()
    assert time.time() - t0 < 60
    shutil.rmtree(data)


def test_killed_sweep_resumes_without_duplicate_runs(tmp_path):
    """A sweep whose whole process group is killed (a dying head node) after its first
    checkpoint is continued with --resume: every trial ends FINISHED with exactly one MLflow run,
    and the interrupted trial continues its epochs instead of repeating them."""
    import os
    import signal
    import time

    from spaces import cam_space

    # two seeds: --trials 2 is one configuration x 2 seeds (the Repeater), whatever the shipped
    # file's seed count (its 3 seeds round --trials 2 up to 3 trials)
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "weakbench", "sweep", cam_space(tmp_path), "--output-dir", str(out),
            "--name", "killed"]
    first = base + ["--trials", "2", "--executor", "inline", "--no-early-stopping", "--max-concurrent", "1",
                    "--set", "epochs=3", "--set", "input_size=64", "--set", "batch_size=8", "--eval-max-images", "8",
                    "--no-model", "--num-cpus", "1", "--address", "local"]
    proc = subprocess.Popen(first, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tune_dir = out / "sweeps" / "killed" / "tune"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not list(tune_dir.glob("_trial_*/checkpoint_*")):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        assert list(tune_dir.glob("_trial_*/checkpoint_*")), "no checkpoint within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray instance and every trial
        proc.wait()
    _, _, before = runs_of(out)
    assert before and any(r.info.status == "RUNNING" for r in before)  # killed mid-trial
    resumed = subprocess.run(base + ["--resume", "--num-cpus", "1", "--address", "local"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # the first line shows what the resumed sweep runs (its sweep.json), not the command line's default 4 trials
    first_line = resumed.stdout.splitlines()[0]
    assert "resuming killed, 2 trials, executor=inline" in first_line, first_line
    client, parents, children = runs_of(out)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags[C.TAG_TRIAL_ID] for c in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2, trial_ids  # no duplicate run for the resumed trial
    for c in children:
        assert c.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert sorted(steps) == [1, 2, 3], steps  # each epoch logged once: resumed, not restarted
