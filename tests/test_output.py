"""Tables for terminals and pipes: each table of the command line, run through the real entry point
in a pipe at ``COLUMNS=80``, keeps every column header and every path in full, and no line is
wider than 80 columns; ``--format json`` gives the records; the renderer's layouts on their own."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from weakbench.platform import output

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def _env(columns: int = 80) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": str(columns)}
    for k in ("WEAKBENCH_TRACKING_URI", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    return env


def weakbench(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "weakbench", *args], capture_output=True, text=True, env=_env(columns),
                       cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _fits(text: str, width: int = 80, allow: tuple[str, ...] = ()) -> None:
    """No line wider than ``width`` except those holding one of ``allow`` (a path kept whole)."""
    for line in text.splitlines():
        assert len(line) <= width or any(a in line for a in allow), line


# ------------------------------------------------------------------------------ the renderer
COLS = [output.Column("name", "name"), output.Column("value", "value", kind="number"),
        output.Column("path", "a long path", kind="path"), output.Column("note", "a note")]
LONG = "/very/long/directory/" + "x" * 70 + "/mlflow.db"
RECS = [{"name": "a", "value": 1.5, "path": "/tmp/a", "note": "short"},
        {"name": "b", "value": float("nan"), "path": LONG, "note": "a much longer note " * 4}]


def _render(fmt: str, width: int = 80, records=RECS) -> str:
    buf = io.StringIO()
    output.render(records, COLS, fmt=fmt, title="T", notes=["a legend"], out=Console(file=buf, width=width))
    return buf.getvalue()


def test_narrow_table_stacks_and_keeps_every_column_and_path_whole():
    text = _render("table", 80)
    assert LONG in text and "/tmp/a" in text  # never cut
    for h in ("name", "value", "a long path", "a note"):
        assert h in text
    assert "-- 1 of 2" in text  # stacked: the table could not fit without cutting the path
    _fits(text, 80, allow=(LONG,))


def test_stacked_multi_line_cell_keeps_one_line_per_item():
    """A cell with several lines (a row's paired verdicts, one a line) keeps each item on a line of
    its own under the value column when stacked, instead of running them together."""
    recs = [{**RECS[1], "note": "+3.37 [-5.2, +12.0]: not shown different from center_gaussian (none)\n"
                                "+14.48 [+10.5, +21.3]: beats whole_image (none)"}]
    text = _render("table", 80, records=recs)
    lines = [ln.strip() for ln in text.splitlines()]
    assert "+14.48 [+10.5, +21.3]: beats whole_image (none)" in lines, text
    _fits(text, 80, allow=(LONG,))


def test_wide_table_is_one_table():
    text = _render("table", 200)
    assert LONG in text and "-- 1 of 2" not in text and text.count("a long path") == 1


def test_json_csv_markdown_keep_raw_values():
    rows = json.loads(_render("json"))
    assert rows == [{"name": "a", "value": 1.5, "path": "/tmp/a", "note": "short"},
                    {"name": "b", "value": None, "path": LONG, "note": "a much longer note " * 4}]
    csv_text = _render("csv")
    assert csv_text.splitlines()[0] == "name,value,path,note" and "b,," in csv_text
    md = _render("markdown")
    assert "| name | value | a long path | a note |" in md and f"| {LONG} |" in md and "a legend" in md


# ------------------------------------------------------------------------------ the CLI's tables
@pytest.fixture(scope="module")
def board_dir(tmp_path_factory) -> Path:
    """An output directory whose results store holds the leaderboard tests' hand-built runs."""
    from test_leaderboard import _rows

    from weakbench.platform import tracking
    from weakbench.platform.results import rows_to_table, write_table

    d = tmp_path_factory.mktemp("board")
    write_table(rows_to_table(_rows()), d / "results")
    tracking.ensure_experiment(tracking.client_for(tracking.default_tracking_uri(d)), "weakbench")
    return d


BOARD_HEADERS = ("dataset", "method", "backbone", "seeds/trials", "val/max_box_acc_v2 (mean)", "MaxBoxAccV2",
                 "test/max_box_acc_v2", "PxAP", "test/pxap", "GPU-h / CPU-h", "vs cam", "vs best trivial baseline")


def test_leaderboard_at_80_columns_keeps_every_column(board_dir):
    p = weakbench("leaderboard", "--output-dir", str(board_dir))
    flat = " ".join(p.stdout.split())
    for h in BOARD_HEADERS:
        assert h in flat, h
    for m in ("minmaxcam", "puzzlecam", "topgap", "cam"):
        assert m in p.stdout
    store = str(board_dir / "results")
    assert store in p.stdout  # the results store's path, whole
    _fits(p.stdout, allow=(store,))
    assert "\x1b[" not in p.stdout  # plain text in a pipe


def test_leaderboard_json(board_dir):
    doc = json.loads(weakbench("leaderboard", "--output-dir", str(board_dir), "--format", "json").stdout)
    rows = doc["boards"][0]["rows"]
    cam = next(r for r in rows if r["method"] == "cam" and r["backbone"] == "r18")
    assert doc["boards"][0]["select_metric"] == "val/max_box_acc_v2" and cam["n_seeds"] == 3 and cam["n_trials"] == 6
    assert cam["test/max_box_acc_v2.mean"] == pytest.approx(42.0)
    assert {"test/max_box_acc_v2.ci_low", "gpu_hours", "baseline_verdict", "trivial_verdict"} <= set(cam)
    # issue 18: each row's interval, the images and seeds behind it, its flags and its verdicts
    assert {"test/max_box_acc_v2.ci_high", "n_images", "n_seeds", "noise", "flags", "verdicts"} <= set(cam)
    assert isinstance(cam["flags"], list) and isinstance(cam["verdicts"], list)
    csv_text = weakbench("leaderboard", "--output-dir", str(board_dir), "--format", "csv").stdout
    header = csv_text.splitlines()[0].split(",")
    assert header[:3] == ["board", "dataset", "method"] and "test/max_box_acc_v2.ci_high" in header
    assert len(csv_text.splitlines()) == 1 + len(rows)


def test_methods_at_80_columns_and_json():
    p = weakbench("methods")
    for h in ("method", "shape", "description", "default search space"):
        assert h in p.stdout
    path = str(REPO / "search_spaces" / "minmaxcam.yaml")
    assert path in p.stdout
    _fits(p.stdout, allow=(str(REPO),))
    rows = json.loads(weakbench("methods", "--format", "json").stdout)
    assert {"name": "minmaxcam", "shape": "classifier_cam", "search_space": path}.items() <= next(
        r for r in rows if r["name"] == "minmaxcam").items()


def test_methods_name_lists_hyperparameters_with_paper_names_defaults_and_ranges():
    p = weakbench("methods", "minmaxcam")
    for h in ("name", "paper", "type", "default", "range", "in minmaxcam.yaml", "description"):
        assert h in p.stdout
    _fits(p.stdout)
    rows = {r["name"]: r for r in json.loads(weakbench("methods", "minmaxcam", "--format", "json").stdout)}
    assert rows["crr_weight"] == {**rows["crr_weight"], "paper": "λ1", "type": "float", "default": 1.0, "range": "[0, 1000]",
                                  "search": "loguniform [0.1, 10.0]"}
    assert rows["frr_weight"]["paper"] == "λ2" and rows["set_size"]["paper"] == "S" and rows["set_size"]["range"] == "[2, 64]"
    assert rows["lr"]["range"] == "(0, 10]"
    assert list(rows)[:3] == ["crr_weight", "frr_weight", "set_size"]  # the method's own first


def _recorded_sweep(root: Path, name: str, space: str = "cam.yaml") -> None:
    """A sweep directory as the driver leaves it: sweep.json and its record (state.json), ended."""
    from weakbench.platform.sweep_state import STATE_NAME, SweepState

    sweep = root / "sweeps" / name
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"space": str(REPO / "search_spaces" / space), "trials": 2, "name": name,
                                                  "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}))
    state = SweepState(sweep / STATE_NAME)
    state.start_driver()
    for i in range(2):
        state.trial(f"{name}_t{i}").update(index=i, status="finished", started=100.0, ended=130.0, updated=130.0,
                                          config={"lr": 0.01, "weight_decay": 0.0, "__trial_index__": i},
                                          progress=4.0, epoch=3.0, latest=20.0)
    state.end_driver(0)
    state.save()


def test_status_shows_the_users_sweep_not_the_automatic_baseline(tmp_path):
    import time

    _recorded_sweep(tmp_path, "cam-synthetic-20261206-100000-abcd")
    time.sleep(0.05)
    _recorded_sweep(tmp_path, "center_gaussian-after-cam-synthetic-20261206-100000-abcd", "center_gaussian.yaml")
    p = weakbench("status", "--output-dir", str(tmp_path))
    assert "sweep cam-synthetic-20261206-100000-abcd" in p.stdout and "center_gaussian-after" not in p.stdout
    for h in ("trial", "lr", "weight_decay", "seed", "status", "epoch / stage", "max_box_acc_v2", "best", "elapsed", "left"):
        assert h in p.stdout, h
    _fits(p.stdout)
    rows = json.loads(weakbench("status", "--output-dir", str(tmp_path), "--format", "json").stdout)
    assert [r["trial"] for r in rows] == ["cam-synthetic-20261206-100000-abcd_t0", "cam-synthetic-20261206-100000-abcd_t1"]
    assert rows[0]["best"] == 20.0 and rows[0]["status"] == "finished"
    # by name, the automatic sweep is still there
    assert "center_gaussian-after" in weakbench("status", "center_gaussian-after-cam-synthetic-20261206-100000-abcd",
                                                "--output-dir", str(tmp_path)).stdout


def test_sweep_dry_run_prints_the_resolved_space_and_starts_nothing(tmp_path):
    out = tmp_path / "o"
    p = weakbench("sweep", "search_spaces/cam.yaml", "--dry-run", "--set", "epochs=1", "--output-dir", str(out))
    flat = " ".join(p.stdout.split())
    from weakbench.platform.search_space import load_search_space
    from weakbench.platform.sweep import planned_trials

    space = load_search_space(REPO / "search_spaces" / "cam.yaml")
    n = planned_trials(space, __import__("weakbench.platform.run_spec", fromlist=["x"]).SweepOptions(space="cam.yaml"))
    seeds = space.search["seed"].values
    assert n == -(-4 // len(seeds)) * len(seeds)  # --trials 4 rounded up to whole seed repeats (Optuna's Repeater)
    for s in ("method", "cam", "epochs", "1 (--set)", "lr", "loguniform [0.003, 0.1]", f"grid {seeds}", "trials planned",
              f"{n} (--trials 4; {space.num_grid_points()} grid point(s))", "ASHA (grace period 1", "inline (auto)",
              "1 worker(s) × 1 CPU", f"sqlite:///{out.resolve()}/mlflow.db"):
        assert s in flat, s
    # no sweep directory, no MLflow store (the output directory itself may exist: its writability is checked)
    assert not (out / "sweeps").exists() and not (out / "mlflow.db").exists()
    _fits(p.stdout, allow=(str(out.resolve()),))


def test_piped_progress_prints_lines(capsys):
    from weakbench.platform.evaluation import _progress_bar

    with _progress_bar(True, "scoring x") as advance:
        for done in (16, 32, 48):
            advance(done, 48)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("scoring x: 16/48 images") and err[-1].startswith("scoring x: 48/48 images")


def test_data_at_the_folder_above_a_dataset_names_the_subfolder(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "image_ids.txt").write_text("")
    (tmp_path / "images").mkdir()
    p = subprocess.run([sys.executable, "-m", "weakbench", "data", str(tmp_path)], capture_output=True, text=True,
                       env=_env(), cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert f"but {tmp_path / 'metadata'} is one; fix: use {tmp_path / 'metadata'} as the dataset directory" in p.stderr
