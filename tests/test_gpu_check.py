"""benchmarks/gpu_check.sh on a machine without a GPU (CI): every step runs its code path — the
torch WSOL engine against the CPU one, the --gpu and --gpus-per-trial sweeps refused in one line
with exit 2, DDP skipped, the throughput benchmark on the CPU — and prints one summary line each."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ILSVRC = next((p / "shared" / "data" / "ilsvrc_val1300" / "metadata" for p in (REPO.parent, REPO.parent.parent)
               if (p / "shared" / "data" / "ilsvrc_val1300" / "metadata").is_dir()), REPO / "no-ilsvrc")


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_paths(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run benchmarks/gpu_check.sh itself")
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path), "GPU_CHECK_QUICK": "1",
           "GPU_CHECK_DATA": str(ILSVRC)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=900)
    lines = {ln.split(":")[1].strip(): ln for ln in r.stdout.splitlines() if ln.startswith("gpu_check: ") and ":" in ln[11:]}
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "wsol: PASS" in lines["wsol"] and "tables identical" in lines["wsol"]
    for name in ("sweep", "fractional"):
        assert "PASS (no GPU: refused, exit 2)" in lines[name] and "no GPU is visible" in lines[name], lines[name]
    assert "SKIP" in lines["ddp"]
    expected = "throughput: PASS cpu: engine epoch" if ILSVRC.is_dir() else "throughput: SKIP"
    assert expected in lines["throughput"], lines["throughput"]
