"""Bad input to ``weakbench sweep`` and friends: exit 2 and one line naming the value, the flag and
the fix, before anything starts (no sweep folder, no Ray, no MLflow run); stores on a read-only
mount can still be read."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPACE = str(REPO / "search_spaces" / "cam.yaml")


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from weakbench import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["weakbench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def _one_line_refusal(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "fix" in lines[0], lines[0]


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for the block: a read-only bind mount as root (root ignores file
    modes), the write bits removed otherwise."""
    if os.geteuid() == 0:
        made = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {made.stderr.strip()}")
        try:
            yield
        finally:  # lazily when a store is still open in this process
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, m in modes.items():
            p.chmod(m & ~0o222)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)


@pytest.mark.parametrize("args, needles", [
    (["--trials", "0"], ["--trials", "0", "1 and 1000"]),
    (["--trials", "-5"], ["--trials", "-5"]),
    (["--trials", "1000000000"], ["--trials", "1000000000", "1 and 1000"]),
    (["--max-failures", "-1"], ["--max-failures", "-1"]),
    (["--name", "../../x"], ["--name", "'../../x'", "<output-dir>/sweeps"]),
    (["--name", "{tmp}/abs-sweep"], ["--name", "abs-sweep'"]),
])
def test_bad_sweep_values(tmp_path, monkeypatch, capsys, args, needles):
    out = tmp_path / "runs"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "-o", str(out), "--address", "local", *args)
    _one_line_refusal(code, o, e, *needles)
    assert not (out / "sweeps").exists() or not any((out / "sweeps").iterdir())
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs-sweep").exists()


def test_output_dir_is_a_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "-o", str(f), "--address", "local")
    _one_line_refusal(code, o, e, "--output-dir", str(f), "is a file")


def test_read_only_output_dir(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "-o", str(ro), "--address", "local")
    _one_line_refusal(code, o, e, "--output-dir", str(ro), "cannot write")


def test_non_utf8_data_dir(tmp_path, monkeypatch, capsys):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xffname")
    os.makedirs(bad)
    out = tmp_path / "runs"
    code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "--data", bad, "-o", str(out), "--address", "local")
    _one_line_refusal(code, o, e, "--data", "not valid UTF-8")
    assert not (out / "sweeps").exists() or not any((out / "sweeps").iterdir())


def test_unreachable_tracking_server_fails_fast(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    t0 = time.time()
    code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "-o", str(out), "--address", "local",
                      "--tracking-uri", "http://127.0.0.1:9")
    took = time.time() - t0
    _one_line_refusal(code, o, e, "--tracking-uri", "http://127.0.0.1:9", "does not answer")
    assert took < 15, took
    # no sweep folder that a later --resume would take as the latest sweep
    assert not (out / "sweeps").exists() or not [p for p in (out / "sweeps").iterdir() if p.is_dir()]
    t0 = time.time()
    code, o, e = _cli(monkeypatch, capsys, "leaderboard", "-o", str(out), "--tracking-uri", "http://127.0.0.1:9")
    _one_line_refusal(code, o, e, "--tracking-uri")
    assert time.time() - t0 < 15


def _dataset_with_link_loop(tmp_path: Path) -> Path:
    from weakbench.core.data import generate_synthetic_coco

    d = generate_synthetic_coco(tmp_path / "ds", num_images=8, image_size=48, seed=0)
    img = sorted((d / "images").iterdir())[0]
    img.unlink()
    os.symlink(img.name + ".b", img)
    os.symlink(img.name, img.with_name(img.name + ".b"))
    return d


def test_symlink_loop_in_images(tmp_path, monkeypatch, capsys):
    d = _dataset_with_link_loop(tmp_path)
    code, o, e = _cli(monkeypatch, capsys, "data", str(d), "-o", str(tmp_path / "runs"))
    _one_line_refusal(code, o, e, "000000", "symbolic links")
    out = tmp_path / "runs2"
    code, o, e = _cli(monkeypatch, capsys, "sweep", SPACE, "--data", str(d), "-o", str(out), "--address", "local")
    _one_line_refusal(code, o, e, "000000", "symbolic links")
    assert not (out / "sweeps").exists() or not [p for p in (out / "sweeps").iterdir() if p.is_dir()]


def _store(out: Path, name: str = "cam-toy") -> str:
    """A small store as ``weakbench sweep`` lays it out: ``mlflow.db`` with a sweep's parent run
    and two finished trial runs, and ``sweeps/<name>/sweep.json``."""
    from weakbench.core import conventions as C
    from weakbench.platform import tracking

    uri = tracking.default_tracking_uri(out)
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, C.DEFAULT_EXPERIMENT, artifact_root=tracking.default_artifact_root(uri))
    parent = client.create_run(exp, run_name=name, tags={C.TAG_KIND: C.KIND_SWEEP, C.TAG_SWEEP_ID: name,
                                                         C.TAG_METHOD: "cam"}).info.run_id
    for seed, val in ((0, 40.0), (1, 44.0)):
        rid = client.create_run(exp, tags={
            C.TAG_KIND: C.KIND_TRIAL, "mlflow.parentRunId": parent, C.TAG_METHOD: "cam", C.TAG_DATASET: "toy",
            C.TAG_DATASET_FINGERPRINT: "0123456789abcdef", C.TAG_SEED: str(seed), C.TAG_SWEEP_ID: name,
            C.TAG_TRIAL_ID: f"t{seed}", C.TAG_BACKBONE: "resnet18", C.TAG_CONFIG_HASH: "h"}).info.run_id
        for k, v in {"lr": "0.1", "seed": str(seed), "backbone": "resnet18", "input_size": "64"}.items():
            client.log_param(rid, k, v)
        for k, v in {"val/max_box_acc_v2": val, "test/max_box_acc_v2": val - 2, "val/pxap": 30.0,
                     "test/pxap": 29.0}.items():
            client.log_metric(rid, k, v, step=1)
        client.set_terminated(rid)
    client.set_terminated(parent)
    d = out / "sweeps" / name
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"name": name, "space": SPACE, "tracking_uri": uri,
                                              "experiment": C.DEFAULT_EXPERIMENT, "trials": 2}))
    return uri


def test_read_only_store_can_be_read(tmp_path, monkeypatch, capsys):
    """leaderboard, status and dashboard build read a store on a read-only mount (no lock file
    beside mlflow.db, the results store not written)."""
    out = tmp_path / "runs"
    out.mkdir()
    _store(out)
    code, o, e = _cli(monkeypatch, capsys, "leaderboard", "-o", str(out))  # the results store, written once
    assert code == 0, o + e
    monkeypatch.setenv("COLUMNS", "250")
    with read_only(out):
        code, o, e = _cli(monkeypatch, capsys, "leaderboard", "-o", str(out))
        assert code == 0, o + e
        assert "read-only" in o and "cam" in o
        code, o, e = _cli(monkeypatch, capsys, "status", "cam-toy", "-o", str(out))
        assert code == 0, o + e
        assert "cam-toy" in o
        html = tmp_path / "dash.html"
        code, o, e = _cli(monkeypatch, capsys, "dashboard", "build", "--store", str(out / "results"), "--out", str(html))
        assert code == 0, o + e
        assert html.stat().st_size > 1000
        code, o, e = _cli(monkeypatch, capsys, "dashboard", "build", "--store", str(out / "results"))
        _one_line_refusal(code, o, e, "--store", "--out")
