"""Registry round trip on a real MLflow sqlite store: register the val-selected run's CamPredictor,
load it by alias, predict, register a second version, roll back."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from weakbench.methods import build_method
from weakbench.methods.classifier import CamPredictor
from weakbench.core import conventions as C
from weakbench import cli
from weakbench.platform import model_format, registry
from weakbench.core.errors import DataError, UnknownNameError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _log_trial(client: MlflowClient, exp_id: str, parent: str, lr: float, seed: int, val: float, test: float,
               with_model: bool, method: str = "cam", dataset: str = "toy") -> str:
    params = {"backbone": "resnet10t", "input_size": 64, "lr": lr, "seed": seed}
    tags = {
        C.TAG_KIND: C.KIND_TRIAL, "mlflow.parentRunId": parent, C.TAG_METHOD: method, C.TAG_BACKBONE: "resnet10t",
        C.TAG_DATASET: dataset, C.TAG_DATASET_FINGERPRINT: "abcdef0123456789", C.TAG_SPLIT: "val",
        C.TAG_SEED: str(seed), C.TAG_SWEEP_ID: parent, C.TAG_CONFIG_HASH: f"h{lr}{seed}",
    }
    with mlflow.start_run(experiment_id=exp_id, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"val/max_box_acc_v2": val, "test/max_box_acc_v2": test, "train/loss": 0.5})
        if with_model:
            m = build_method(method, {"backbone": "resnet10t", "input_size": 64, "lr": lr, "seed": seed}, num_classes=3)
            predictor = CamPredictor(m, m.build_model().eval(), ["a", "b", "c"], 64, IMAGENET_MEAN, IMAGENET_STD)
            model_format.log_predictor(mlflow.get_tracking_uri(), run.info.run_id, predictor, metadata={},
                               stage_of=lambda module: "train")
    return run.info.run_id


def _artifacts(uri: str):
    from pathlib import Path

    return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(old)
    mlflow.set_registry_uri(old)


def test_register_load_predict_rollback(store):
    client = MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment(C.DEFAULT_EXPERIMENT, _artifacts(store).as_uri())
    parent = client.create_run(exp_id, tags={C.TAG_KIND: C.KIND_SWEEP}).info.run_id
    # config lr=0.1: mean val 60 over seeds 0,1 (seed 1 better → it is registered);
    # config lr=0.01: one seed with val 59.5 (a single lucky-looking run does not win: its mean is lower)
    _log_trial(client, exp_id, parent, 0.1, 0, 58.0, 50.0, with_model=False)
    best_run = _log_trial(client, exp_id, parent, 0.1, 1, 62.0, 51.0, with_model=True)
    _log_trial(client, exp_id, parent, 0.01, 0, 59.5, 70.0, with_model=True)
    client.set_terminated(parent)

    info = registry.register_best(store, "cam")
    assert info.name == "weakbench-cam-toy"
    assert (info.version, info.run_id, info.metric_value) == (1, best_run, 62.0)
    mv = client.get_model_version_by_alias(info.name, "champion")
    assert int(mv.version) == 1
    assert mv.tags["metric.val/max_box_acc_v2"] == "62.0"
    assert mv.tags["param.lr"] == "0.1"
    assert mv.tags["weakbench.dataset_fingerprint"] == "abcdef0123456789"

    predictor = registry.load_predictor(f"models:/{info.name}@champion", tracking_uri=store)
    assert isinstance(predictor, CamPredictor) and predictor.class_names == ["a", "b", "c"]
    logits, cams = predictor(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and cams.shape[:2] == (2, 3) and torch.isfinite(cams).all()

    # a better run arrives: the second registration moves @champion to version 2
    newer = _log_trial(client, exp_id, parent, 0.1, 2, 70.0, 52.0, with_model=True)
    info2 = registry.register_best(store, "cam", dataset="toy")  # still the lr=0.1 config, now its best seed
    assert (info2.version, info2.run_id, info2.new) == (2, newer, True)
    assert int(client.get_model_version_by_alias(info.name, "champion").version) == 2
    # registering the run that already is a version adds none, and says so
    again = registry.register_best(store, "cam")
    assert (again.version, again.run_id, again.new) == (2, newer, False)
    assert len(client.search_model_versions(f"name = '{info.name}'")) == 2
    # another alias does not touch @champion
    info3 = registry.register_best(store, "cam", alias="challenger")
    assert int(client.get_model_version_by_alias(info.name, "challenger").version) == info3.version == 2
    assert int(client.get_model_version_by_alias(info.name, "champion").version) == 2

    assert registry.rollback(store, info.name) == 1
    assert int(client.get_model_version_by_alias(info.name, "champion").version) == 1
    with pytest.raises(DataError, match="nothing to roll back"):
        registry.rollback(store, info.name)

    rows = registry.list_registered(store)
    assert [(r.version, r.aliases, r.run_id) for r in rows] == [(2, ("challenger",), newer), (1, ("champion",), best_run)]

    # through the real entry point, in a pipe at 80 columns: every column, run ids and model URIs whole
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "weakbench", "registry", "list", "--tracking-uri", store],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    for h in ("name", "version", "aliases", "run id", "selected by", "value", "created (UTC)", "model URI"):
        assert h in out.stdout, h
    for s in ("weakbench-cam-toy", "@champion", "@challenger", best_run, newer, "models:/weakbench-cam-toy/2"):
        assert s in out.stdout, s
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    env["MLFLOW_TRACKING_URI"] = store  # the alias of WEAKBENCH_TRACKING_URI
    out = subprocess.run([sys.executable, "-m", "weakbench", "registry", "list", "--format", "json"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [(r["version"], r["aliases"], r["run_id"]) for r in listed] == [(2, ["@challenger"], newer), (1, ["@champion"], best_run)]
    assert listed[0]["select_value"] == 70.0 and listed[0]["uri"] == "models:/weakbench-cam-toy/2"
    registry.set_alias(store, info.name, "champion", 2)
    out = CliRunner().invoke(cli.app, ["registry", "rollback", info.name, "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    assert "version 1" in out.output


def test_register_errors(store):
    client = MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment(C.DEFAULT_EXPERIMENT, _artifacts(store).as_uri())
    parent = client.create_run(exp_id, tags={C.TAG_KIND: C.KIND_SWEEP}).info.run_id
    with pytest.raises(UnknownNameError, match="no finished trial run of method 'cam'"):
        registry.register_best(store, "cam")
    _log_trial(client, exp_id, parent, 0.1, 0, 58.0, 50.0, with_model=False, dataset="a")
    _log_trial(client, exp_id, parent, 0.1, 0, 58.0, 50.0, with_model=False, dataset="b")
    with pytest.raises(DataError, match="pass --dataset"):
        registry.register_best(store, "cam")
    with pytest.raises(DataError, match="no tag 'weakbench.model_uri'"):
        registry.register_best(store, "cam", dataset="a")
    with pytest.raises(UnknownNameError, match="no alias"):
        registry.rollback(store, "weakbench-cam-a")


def test_diverged_run_is_never_registered(store):
    """A FINISHED run whose loss went NaN (or a metric inf) is skipped even with the best val; with
    nothing else left the registry refuses."""
    client = MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment(C.DEFAULT_EXPERIMENT, _artifacts(store).as_uri())
    parent = client.create_run(exp_id, tags={C.TAG_KIND: C.KIND_SWEEP}).info.run_id
    diverged = _log_trial(client, exp_id, parent, 10.0, 0, 99.0, 90.0, with_model=True)
    client.log_metric(diverged, "train/loss", float("nan"), step=2)  # MLflow stores NaN as is
    assert client.get_run(diverged).info.status == "FINISHED"
    with pytest.raises(DataError, match="finite metrics"):
        registry.register_best(store, "cam")
    good = _log_trial(client, exp_id, parent, 0.1, 0, 50.0, 40.0, with_model=True)
    inf_run = _log_trial(client, exp_id, parent, 5.0, 0, 98.0, 91.0, with_model=True)
    client.log_metric(inf_run, "val/max_box_acc_v2", float("inf"), step=1)
    failed = _log_trial(client, exp_id, parent, 3.0, 0, 97.0, 92.0, with_model=True)
    client.set_terminated(failed, status="FAILED")
    info = registry.register_best(store, "cam")
    assert info.run_id == good and info.metric_value == 50.0
