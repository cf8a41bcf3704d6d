"""Shared pytest fixtures.

* ``coco128_dir``: the real COCO128 subset (``WEAKBENCH_COCO128`` env var, default
  ``<repo>/../shared/data/coco128``); tests using it are skipped when it is absent.
* ``synthetic_dir``: the synthetic COCO-format dataset, generated once per session with the
  default arguments into a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# `weakbench sweep` adds the trivial baselines after a CAM sweep (--baselines, the default); the
# CLI sweeps of the tests skip that step (about a minute each on 2 cores) except the tests about
# it, which pass --baselines (a flag given on the command line wins over the variable)
os.environ.setdefault("WEAKBENCH_BASELINES", "0")


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    path = Path(os.environ.get("WEAKBENCH_COCO128", REPO_ROOT.parent / "shared" / "data" / "coco128"))
    if not (path / "annotations" / "instances.json").is_file() or not (path / "images").is_dir():
        pytest.skip(f"COCO128 not found at {path} (needs annotations/instances.json and images/); "
                    f"set WEAKBENCH_COCO128 to its directory")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from weakbench.core.data import generate_synthetic_coco

    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic") / "synthetic", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the session (2 CPUs, as in CI).

    The dashboard is started because Ray Train's placement-group cleaner queries actor state
    through the State API it serves; without it a finished trial's placement group can stay
    reserved inside a Tune sweep.
    """
    import ray

    from weakbench.platform.launch import free_port

    # as `weakbench sweep --address local` does: the dashboard on a free port and every process of
    # the instance told where it is, so Train's placement-group cleaner never looks for "the" Ray
    # instance of the machine (other tests start their own beside this one)
    # (through the job's runtime env, not this process's environment, which the clusters and
    # subprocess sweeps of other tests inherit)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """Every test leaves MLflow's global tracking and registry URIs, and the environment variables
    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` write for subprocesses, as it found them.

    ``MLFLOW_TRACKING_URI`` is the alias of ``WEAKBENCH_TRACKING_URI``: a test that set it (MLflow
    writes it whenever its global URI is set, e.g. back to its default ``sqlite:///mlflow.db`` in
    the working directory) pointed every later in-process ``weakbench`` command of the session at
    that store instead of its ``--output-dir``."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    variables = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {v: os.environ.get(v) for v in variables}
    uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    yield
    for v, value in env.items():
        if value is None:
            os.environ.pop(v, None)
        else:
            os.environ[v] = value
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris
