"""``weakbench evaluate`` as a user runs it: ``--space FILE``, the warning for a random network
that nothing trained, distinct MLflow run names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "80"}
    for k in ("WEAKBENCH_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "weakbench", "evaluate", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_space_file_gives_method_and_fixed_values_and_runs_get_distinct_names(tmp_path):
    from weakbench.core import conventions as C
    from weakbench.platform import tracking

    out = str(tmp_path / "o")
    refused = _run("--space", "search_spaces/center_gaussian.yaml", "--max-images", "4", "-o", out)
    assert refused.returncode == 2 and "searches sigma" in refused.stderr and "--set sigma=" in refused.stderr
    for _ in range(2):
        p = _run("--space", "search_spaces/center_gaussian.yaml", "--set", "sigma=0.25", "--max-images", "4",
                 "--input-size", "64", "-o", out)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "method:center_gaussian on synthetic: 4 images" in p.stdout and "warning" not in p.stderr
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{C.TAG_KIND}` = '{C.KIND_EVALUATION}'")
    assert len(runs) == 2 and all(r.data.params["sigma"] == "0.25" for r in runs)
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 2 and all(n.startswith("evaluate-center_gaussian-synthetic-") for n in names)


def test_random_untrained_network_warns_in_one_line(tmp_path):
    p = _run("--method", "cam", "--set", "epochs=0", "--set", "input_size=64", "--set", "backbone=resnet10t",
             "--max-images", "2", "--no-log", "-o", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr[-2000:]
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "resnet10t with random weights and no training" in warnings[0]
    assert "--set pretrained=true" in warnings[0]
