"""The engine's loops on the in-memory tracker (no MLflow, no Ray): a CAM trial inline on the
synthetic default, its logged metrics and tags, a failure and the resume after it, and the
callbacks (issue #17: the engine split; the MLflow and Ray paths are tests/test_engine.py).
"""

import math

import pytest
from pydantic import ValidationError

from weakbench.core import conventions as C
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.callbacks import Callback, CallbackRef, FailOnce
from weakbench.platform.engine import TrialSpec, run_trial
from weakbench.platform.trackers import InMemoryTracker

TINY = {"backbone": "resnet18", "input_size": 32, "epochs": 2, "batch_size": 16, "lr": 0.02}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = open_dataset(None, cache_dir=cache)
    splits_path = cache / "splits.json"
    save_splits(make_splits(source, seed=0), splits_path)
    return cache, splits_path


def make_spec(tmp_path, synthetic, **kw) -> TrialSpec:
    cache, splits_path = synthetic
    base = dict(method="cam", params=dict(TINY), data=None, data_cache=str(cache), splits_path=str(splits_path),
                trial_dir=str(tmp_path / "trial"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                sweep_id="s", trial_id="t0", run_name="cam-t0", eval_max_images=8, num_overlays=2, log_model=False)
    base.update(kw)
    return TrialSpec(**base)


class Recorder(Callback):
    """Appends every hook call to the class list ``events`` (inline: same process as the test)."""

    events: list[tuple] = []

    def __init__(self, tag: str):
        self.tag = tag

    def on_train_batch_end(self, trial, stage, task, epoch, batch):
        Recorder.events.append((self.tag, "batch", stage.name, epoch, len(task.batch_indices(batch))))

    def on_epoch_end(self, trial, stage, epoch, metrics):
        Recorder.events.append((self.tag, "epoch", stage.name, epoch, sorted(metrics)))

    def on_fit_end(self, trial, stage, model):
        Recorder.events.append((self.tag, "fit_end", stage.name, type(model).__name__))

    def on_stage_end(self, trial, stage, metrics):
        Recorder.events.append((self.tag, "stage_end", stage.name, sorted(metrics)))


class NotACallback:
    pass


def test_inline_cam_trial_on_the_in_memory_tracker(tmp_path, synthetic):
    tracker = InMemoryTracker()
    spec = make_spec(tmp_path, synthetic)
    final = run_trial(spec, executor="inline", tracker=tracker)
    assert not (tmp_path / "mlflow.db").exists(), "the in-memory tracker wrote an MLflow store"
    run = tracker.run()
    assert run.status == "FINISHED"
    for tag in C.TRIAL_TAGS:
        assert tag in run.tags, tag
    assert run.tags[C.TAG_METHOD] == "cam" and run.tags[C.TAG_TRIAL_ID] == "t0"
    assert run.tags["weakbench.stage.train.cache"] == "computed"
    assert run.tags["weakbench.stage"] == "eval"  # the last stage run
    assert run.params["epochs"] == "2" and C.CONFIG_ARTIFACT in run.artifacts
    # one value per epoch, at steps 1 and 2; the eval stage's metrics at the last fit epoch
    for key in ("train/loss", "train/lr", "val/max_box_acc_v2", "epoch"):
        assert [s for s, _ in run.metrics[key]] == [1, 2], key
    # the training seconds after each epoch, then the trial's total with its cost at the end
    assert [s for s, _ in run.metrics[C.COST_TRAIN_SECONDS]] == [1, 2, 2]
    assert [s for s, _ in run.metrics["test/max_box_acc_v2"]] == [2]
    assert 0 <= run.latest["test/max_box_acc_v2"] <= 100 and 0 <= run.latest["test/pxap"] <= 100
    assert final["test/max_box_acc_v2"] == run.latest["test/max_box_acc_v2"] and final["epoch"] == 2
    assert run.latest[C.COST_CPU_HOURS] > 0
    assert len([a for a in run.artifacts if a.startswith(f"{C.OVERLAY_DIR}/")]) == 2
    # a FINISHED run is never written again: the trial returns at once
    again = run_trial(spec, executor="inline", tracker=tracker)
    assert again["already_finished"] == 1.0 and len(tracker.runs) == 1
    assert [s for s, _ in run.metrics["train/loss"]] == [1, 2]


def test_fail_once_then_resume_continues_the_run_and_logs_each_epoch_once(tmp_path, synthetic):
    tracker = InMemoryTracker()
    spec = make_spec(tmp_path, synthetic, num_overlays=0, callbacks=[CallbackRef.of(FailOnce, after_epoch=1)])
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        run_trial(spec, executor="inline", tracker=tracker)
    run = tracker.run()
    assert run.status == "FAILED" and "injected failure" in run.tags[C.TAG_ERROR]
    assert [s for s, _ in run.metrics["train/loss"]] == [1]
    final = run_trial(spec, executor="inline", tracker=tracker)  # resumes from the trial's checkpoint
    assert len(tracker.runs) == 1 and run.status == "FINISHED" and C.TAG_ERROR not in run.tags
    assert [s for s, _ in run.metrics["train/loss"]] == [1, 2], "an epoch was lost or logged twice"
    assert [s for s, _ in run.metrics["val/max_box_acc_v2"]] == [1, 2]
    assert final["epoch"] == 2


def test_callbacks_see_every_hook_in_order(tmp_path, synthetic):
    Recorder.events.clear()
    spec = make_spec(tmp_path, synthetic, num_overlays=0, params={**TINY, "epochs": 1},
                     callbacks=[CallbackRef.of(Recorder, tag="a"), CallbackRef.of(Recorder, tag="b")])
    run_trial(spec, executor="inline", tracker=InMemoryTracker())
    kinds = [(e[0], e[1], e[2]) for e in Recorder.events if e[1] != "batch"]
    assert kinds == [("a", "epoch", "train"), ("b", "epoch", "train"), ("a", "fit_end", "train"),
                     ("b", "fit_end", "train"), ("a", "stage_end", "train"), ("b", "stage_end", "train"),
                     ("a", "stage_end", "eval"), ("b", "stage_end", "eval")]
    batches = [e for e in Recorder.events if e[1] == "batch" and e[0] == "a"]
    n_train = len(__import__("json").loads(synthetic[1].read_text())["splits"]["train"])
    assert batches and sum(e[4] for e in batches) == n_train  # one epoch sees every training sample once
    epoch = next(e for e in Recorder.events if e[1] == "epoch")
    assert "train/loss" in epoch[4] and "val/max_box_acc_v2" in epoch[4]


def test_callback_references_are_checked(tmp_path, synthetic):
    with pytest.raises(ValidationError, match="package.module:ClassName"):
        CallbackRef(target="not a path")
    with pytest.raises(ValueError, match="cannot be imported"):
        CallbackRef(target="weakbench.platform.callbacks:Nope").build()
    with pytest.raises(ValueError, match="not a subclass"):
        CallbackRef.of(NotACallback).build()
    # a bad reference stops the trial before any run is created
    tracker = InMemoryTracker()
    spec = make_spec(tmp_path, synthetic, callbacks=[CallbackRef(target="weakbench.platform.callbacks:Nope")])
    with pytest.raises(ValueError, match="cannot be imported"):
        run_trial(spec, executor="inline", tracker=tracker)
    assert tracker.runs == {}
    # a reference is data: the spec survives a JSON round trip (what Ray workers receive)
    spec = make_spec(tmp_path, synthetic, callbacks=[CallbackRef.of(FailOnce, after_epoch=3)])
    again = TrialSpec.model_validate_json(spec.model_dump_json())
    assert again.callbacks[0].build().after_epoch == 3


def test_in_memory_tracker_follows_the_tracking_rules():
    t = InMemoryTracker()
    kw = dict(experiment="e", parent_run_id="p", sweep_id="s", trial_id="t", run_name="r", tags={"a": "1"},
              params={"lr": 0.1})
    run_id, status = t.start_trial_run(**kw)
    assert status == "NEW" and t.tags(run_id)["mlflow.parentRunId"] == "p" and t.run(run_id).params == {"lr": "0.1"}
    t.log_metrics(run_id, {"val/x": math.nan, "train/loss": math.nan, "val/y": 2, "note": "text"}, step=1)
    assert set(t.run(run_id).metrics) == {"train/loss", "val/y"}  # NaN kept only as a loss's evidence
    t.log_metrics(run_id, {"val/y": 3}, step=2)
    t.log_metrics(run_id, {"val/y": 1}, step=1)
    assert t.latest_metrics(run_id)["val/y"] == 3 and t.metric_steps(run_id, "val/y") == {1, 2}
    t.fail_run(run_id, ValueError("boom"))
    assert t.status(run_id) == "FAILED" and t.tags(run_id)[C.TAG_ERROR] == "ValueError: boom"
    again, status = t.start_trial_run(**kw)  # found by sweep and trial id, running again
    assert (again, status) == (run_id, "FAILED") and t.status(run_id) == "RUNNING" and C.TAG_ERROR not in t.tags(run_id)
    t.end_run(run_id, "FINISHED")
    assert t.start_trial_run(**kw, known_run_id=run_id) == (run_id, "FINISHED") and t.status(run_id) == "FINISHED"
    with pytest.raises(ValueError, match="unknown run status"):
        t.end_run(run_id, "DONE")
