"""A real tracking server: ``mlflow server`` backed by PostgreSQL (Debian's ``postgresql``, as
``.ci/run`` installs it) on 127.0.0.1, and a small sweep with several concurrent trials against it.

Skipped when PostgreSQL's ``initdb`` or ``psycopg2`` is not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, mlflow_server as start_mlflow_server
from spaces import cam_space
from weakbench.core import conventions as C
from weakbench.platform import tracking

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: the Debian package's postgres user runs it
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres(tmp_path):
    pytest.importorskip("psycopg2")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL (initdb, pg_ctl) not installed; .ci/run installs Debian's postgresql")
    import tempfile

    # pytest's tmp dirs are private to their owner; the postgres user needs a directory of its own
    root = Path(tempfile.mkdtemp(prefix="weakbench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    made = subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
                                 "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"]),
                   check=True, capture_output=True, timeout=120)
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    with start_mlflow_server(postgres, tmp_path, workers=2, log_name="mlflow-server.log", timeout_s=300) as url:
        yield url


@pytest.mark.timeout(700)
def test_sweep_against_mlflow_server_on_postgresql(tmp_path, mlflow_server):
    from weakbench.core.data import generate_synthetic_coco

    data = generate_synthetic_coco(tmp_path / "data", num_images=24, image_size=64, seed=0)
    out = tmp_path / "runs"
    t0 = time.time()
    # 8 trials (4 Optuna configurations × seeds 0, 1), all 8 at once on 2 CPUs (the 8
    # concurrent writers on one server)
    proc = subprocess.run([sys.executable, "-m", "weakbench", "sweep", cam_space(tmp_path),
                           "--data", str(data), "--trials", "8", "--output-dir", str(out), "--name", "server",
                           "--tracking-uri", mlflow_server, "--executor", "inline", "--no-model", "--no-early-stopping",
                           "--cpus-per-worker", "0.25", "--max-concurrent", "8", "--num-cpus", "2", "--address", "local",
                           "--eval-max-images", "8", "--set", "epochs=1", "--set", "input_size=64", "--set", "batch_size=8"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 of 8 planned (8 finished" in proc.stdout
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()  # the server decides
    client = tracking.client_for(mlflow_server)
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's own artifact store
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_SWEEP]
    children = [r for r in runs if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8 and len({c.data.tags[C.TAG_TRIAL_ID] for c in children}) == 8
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "val/max_box_acc_v2" in c.data.metrics and "test/max_box_acc_v2" in c.data.metrics
        assert [a.path for a in client.list_artifacts(c.info.run_id) if a.path == C.CONFIG_ARTIFACT]
    # the trials overlapped in time (concurrent writers on one server): the most runs open at once
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    most = max(sum(s0 <= t < s1 for s0, s1 in spans) for t, _ in spans)
    assert most >= 4, spans
    print(f"tracking-server sweep: 8 trials, at most {most} open at once, wall {wall:.0f} s")
