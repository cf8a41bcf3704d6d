"""The training engine on real Ray Train and real MLflow (SQLite), on the synthetic default.

* a 2-worker DDP trial over gloo: the ranks see disjoint shards and end with identical weights;
* restart of a trial: a worker failure after epoch 1 restarts the worker group, which resumes
  from the checkpoint and continues the same MLflow run (no duplicate, no lost epoch);
* the inline executor finishes a trial with test metrics, overlays and a loadable model.
"""

import json
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.callbacks import CallbackRef, FailOnce, RecordShards
from weakbench.platform.engine import TrialSpec, run_trial

pytestmark = pytest.mark.slow

TINY = {"backbone": "resnet18", "input_size": 64, "epochs": 2, "batch_size": 8, "lr": 0.02}



@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = open_dataset(None, cache_dir=cache)
    splits_path = cache / "splits.json"
    save_splits(make_splits(source, seed=0), splits_path)
    return cache, source, splits_path


def make_spec(tmp_path, synthetic, **kw) -> TrialSpec:
    cache, _, splits_path = synthetic
    base = dict(method="cam", params=dict(TINY), data=None, data_cache=str(cache), splits_path=str(splits_path),
                trial_dir=str(tmp_path / "trial"), tracking_uri=tracking.default_tracking_uri(tmp_path),
                sweep_id="s", trial_id="t0", run_name="cam-t0", eval_max_images=12, num_overlays=2, log_model=False)
    base.update(kw)
    return TrialSpec(**base)


def only_run(spec):
    client = tracking.client_for(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_ddp_two_workers_disjoint_shards_identical_weights(tmp_path, synthetic, ray_local):
    spec = make_spec(tmp_path, synthetic, num_workers=2, callbacks=[CallbackRef.of(RecordShards)])
    metrics = run_trial(spec, executor="train", storage_path=str(tmp_path / "ray"))
    assert metrics["epoch"] == 2
    trial = Path(spec.trial_dir)
    _, source, splits_path = synthetic
    train = set(json.loads(splits_path.read_text())["splits"]["train"])
    for epoch in range(2):
        r0 = json.loads((trial / f"shard_rank0_epoch{epoch}.json").read_text())
        r1 = json.loads((trial / f"shard_rank1_epoch{epoch}.json").read_text())
        assert r0 and r1 and len(r0) == len(r1)
        assert not set(r0) & set(r1), "ranks trained on overlapping images"
        assert set(r0) | set(r1) <= train
        assert len(set(r0) | set(r1)) >= len(train) - 1  # DistributedSampler drops at most world-1
    w0 = (trial / "weights_rank0.sha256").read_text()
    w1 = (trial / "weights_rank1.sha256").read_text()
    assert w0 == w1, "DDP ranks ended with different weights"
    client, run = only_run(spec)
    assert run.info.status == "FINISHED"
    assert run.data.tags[C.TAG_NUM_WORKERS] == "2"


def test_restart_resumes_from_checkpoint_and_continues_the_run(tmp_path, synthetic, ray_local):
    spec = make_spec(tmp_path, synthetic, callbacks=[CallbackRef.of(FailOnce, after_epoch=1)])
    metrics = run_trial(spec, executor="train", storage_path=str(tmp_path / "ray"), max_failures=1)
    assert (Path(spec.trial_dir) / "failed_once").exists(), "the injected failure did not happen"
    assert metrics["epoch"] == 2 and f"test/{'max_box_acc_v2'}" in metrics
    client, run = only_run(spec)  # the restarted trial continued its own run: no duplicate
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/max_box_acc_v2")
    assert sorted(m.step for m in history) == [1, 2], "an epoch was lost or logged twice"
    # the epoch-1 weights were restored, not re-initialised: training loss of epoch 2 was logged once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]


def test_inline_trial_logs_everything_and_model_loads(tmp_path, synthetic):
    spec = make_spec(tmp_path, synthetic, log_model=True)
    metrics = run_trial(spec, executor="inline")
    for key in ("val/max_box_acc", "val/max_box_acc_v2", "val/pxap", "val/miou", "val/cls_map",
                "test/max_box_acc_v2", "test/pxap", C.COST_TRAIN_SECONDS):
        assert key in metrics or key.replace("test/", "val/") in metrics, key
    client, run = only_run(spec)
    assert run.info.status == "FINISHED"
    for tag in C.TRIAL_TAGS:
        assert tag in run.data.tags, tag
    assert 0 <= run.data.metrics["test/max_box_acc_v2"] <= 100
    arts = [a.path for a in client.list_artifacts(run.info.run_id, C.OVERLAY_DIR)]
    assert len(arts) == 2 and all(a.endswith(".png") for a in arts)
    from weakbench.platform.predict import load_predictor

    predictor = load_predictor(run.data.tags[C.TAG_MODEL_URI], spec.tracking_uri)
    import torch

    logits, cams = predictor(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, len(predictor.class_names)) and cams.shape[:2] == (1, len(predictor.class_names))
    # running the same finished trial again never rewrites it
    again = run_trial(spec, executor="inline")
    assert again.get("already_finished") == 1.0
    _, run2 = only_run(spec)
    assert run2.info.end_time == run.info.end_time


def test_failure_marks_run_failed_with_error_tag(tmp_path, synthetic):
    spec = make_spec(tmp_path, synthetic, callbacks=[CallbackRef.of(FailOnce, after_epoch=1)])
    with pytest.raises(RuntimeError, match="injected failure"):
        run_trial(spec, executor="inline")
    _, run = only_run(spec)
    assert run.info.status == "FAILED"
    assert "injected failure" in run.data.tags[C.TAG_ERROR]


@pytest.mark.parametrize("error, attempts", [("ENOSPC", 1), ("RuntimeError", 2)])
def test_train_does_not_restart_a_local_fault(tmp_path, synthetic, ray_local, error, attempts):
    """A worker that fails on a local fault (here ENOSPC) is not restarted by Ray Train, whatever
    ``max_failures`` says (a retry on the same storage fails the same way); any other failure still
    gets its ``max_failures`` restarts. The trainer class is the one the engine builds (real Ray
    Train controller and failure policy; the training function only counts its attempts)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from weakbench.platform.engine import build_trainer
    from weakbench.platform.tune_record import local_fault

    trainer_cls = type(build_trainer(make_spec(tmp_path, synthetic), storage_path=str(tmp_path / "ray"), name="probe"))
    log = tmp_path / "attempts.txt"

    def train_fn(config):
        import errno
        import os

        with open(config["log"], "a") as f:
            f.write("attempt\n")
        if config["error"] == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), config["log"])
        raise RuntimeError("a crash that a restart can fix")

    trainer = trainer_cls(train_loop_per_worker=train_fn, train_loop_config={"log": str(log), "error": error},
                          scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name=f"local-fault-{error}", storage_path=str(tmp_path / "ray"),
                                               failure_config=FailureConfig(max_failures=1)))
    with pytest.raises(Exception) as failed:
        trainer.fit()
    assert len(log.read_text().splitlines()) == attempts, (error, log.read_text())
    assert (local_fault(failed.value) is not None) == (error == "ENOSPC"), repr(failed.value)
