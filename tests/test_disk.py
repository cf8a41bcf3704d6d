"""What a finished trial leaves on disk: its final weights once (the MLflow model), no epoch
checkpoint and no private stage product; ``keep_checkpoints`` keeps them."""

from __future__ import annotations

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
