"""The training engine: one trial of one method, as a plan of stages, on Ray Train (DDP over
gloo on CPU, NCCL on GPU).

The engine owns loops, devices, DDP, data sharding, stage products, checkpoints, evaluation and
logging; methods only answer the hooks of :class:`weakbench.methods.base.Method` and
:mod:`weakbench.methods.pipeline` (no Ray, MLflow or DDP in method code).

A trial executes its method's plan (``Method.plan()``): ``fit`` stages (an epoch loop over the
stage's :class:`~weakbench.methods.pipeline.FitTask`), ``map`` stages (items sharded over the
ranks, results saved chunk by chunk) and ``eval`` stages (rank 0). Every stage's product is
keyed by the hash of what shapes it (:mod:`weakbench.platform.products`); a complete product is
a cache hit and is not recomputed (tags ``weakbench.stage.<name>.cache = hit|computed`` record
which), and ``shared`` products are reused across the trials of a sweep.

Under the Train executor each *segment* of the plan — a fit stage and the map/eval stages after
it (:func:`plan_segments`) — runs as its own ``TorchTrainer`` named ``<trial>-<stage>``; the
inline executor runs the whole plan in the calling process. On every worker:

1. open the dataset and the sweep's stored split (every trial sees the same split);
2. build the method, its plan and the products' hashes; restore the latest checkpoint (it
   carries the stage cursor: stage name and index, the epoch within the stage, model,
   optimiser and lr-scheduler state, the MLflow run id);
3. rank 0 finds or creates the trial's MLflow child run (found again by its tags if no
   checkpoint exists yet; a FINISHED run is never written again and the trial returns at once);
4. each stage of the segment: cache hit, or compute under the product's lock. In a fit stage,
   each epoch trains on this rank's shard (the task's lr schedulers,
   ``FitTask.configure_schedulers``, step after every training step; the lr of the epoch's first
   step is logged as ``train/lr``), rank 0 validates and saves a checkpoint that also
   carries the epoch's metrics, every rank reports (rank 0 with the checkpoint), then rank 0
   logs the metrics to MLflow; a trial killed between report and logging logs them when it
   resumes from that checkpoint, so each epoch lands in MLflow exactly once;
5. after the plan's last stage rank 0 logs the cost and the method's predictor and ends the
   run FINISHED *before* the last report (Tune may end a trial inside ``report``). Any
   exception ends the run FAILED with the error as a tag (a non-finite loss or metric raises
   :class:`DivergenceError`); a trial Tune stops (the scheduler, an interrupt) ends KILLED.

Reports carry ``progress`` (plan units done: one per fit epoch and per map/eval stage; ASHA's
clock) and ``epoch`` (fit epochs done), plus the latest val/test metrics.

Executors: ``"train"`` runs each segment in a ``TorchTrainer`` with ``num_workers`` workers
(:func:`run_trial`'s default; a sweep uses it for DDP and GPU trials). ``"inline"`` runs the plan
in the calling process (the Tune trial actor) for one-worker CPU trials, reporting to Tune
directly (a sweep's default for them); it saves the start-up of the Train controller and worker
actors (each a fresh process importing torch), measured in ``benchmarks/bench_trial_startup.py``
and ``benchmarks/bench_sweep_overhead.py``.

The parts, as Lightning splits Trainer, Strategy, Logger and Callback (this module wires them):

* :mod:`weakbench.platform.runtime` — where the loops run (inline, Tune, Ray Train): rank, world
  size, device, barrier, broadcast, sharding, model wrapping, reports;
* :mod:`weakbench.platform.trackers` — the tracker interface, on MLflow or in memory
  (``run_trial(..., executor="inline", tracker=InMemoryTracker())``);
* :mod:`weakbench.platform.trial` — one trial's state, its start (:meth:`TrialState.open`) and end;
* :mod:`weakbench.platform.loops` — the fit, map and eval loops;
* :mod:`weakbench.platform.checkpoints` — the trial's checkpoint store;
* :mod:`weakbench.platform.callbacks` — callbacks (``TrialSpec.callbacks``, by import path).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from weakbench.core import conventions as C
from weakbench.core.errors import DivergenceError
from weakbench.platform.callbacks import CallbackRef, build_callbacks
from weakbench.platform.checkpoints import CHECKPOINT_FILE
from weakbench.platform.loops import optimization_state, restore_optimization, run_stage
from weakbench.platform.runtime import make_runtime
from weakbench.platform.trial import TrialState, stage_products

# re-exported: what callers of the engine used from here before the split (issue #17)
__all__ = ["CHECKPOINT_FILE", "TrialSpec", "build_trainer", "optimization_state", "plan_segments",
           "restore_optimization", "run_inline_in_tune", "run_segments", "run_trial", "segment_job_name",
           "stage_products", "train_loop_per_worker", "trial_plan"]


class TrialSpec(BaseModel):
    """Everything a trial needs besides its hyperparameters; serialisable to Ray workers.

    In a sweep, the fields named as a per-trial option of
    :class:`~weakbench.platform.run_spec.SweepOptions` (``data``, ``tracking_uri``,
    ``num_workers`` ...) are that option's value (:func:`weakbench.platform.run_spec.trial_fields`)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict[str, Any] = Field(description="the trial's hyperparameters (validated by the method's schema)")
    data: str | None = Field(None, description="dataset directory; None = embedded synthetic default")
    classes: str | None = Field(None, description="class filter of the dataset, comma-separated names (None: all)")
    data_cache: str = Field(description="where the synthetic default is generated")
    splits_path: str = Field(description="JSON file of the stored train/val/test split")
    trial_dir: str = Field(description="a directory private to this trial")
    tracking_uri: str
    experiment: str = C.DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    sweep_id: str = "adhoc"
    trial_id: str = "trial"
    run_name: str = "trial"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_trial: float | None = Field(None, gt=0, le=1, description="a share of one GPU held by a one-worker trial "
                                                                       "(None: one whole GPU per worker with use_gpu)")
    loader_workers: int | None = Field(None, ge=0, description="DataLoader worker processes per trial worker (None: "
                                                               "one per CPU held beyond the first, "
                                                               "weakbench.core.loading.default_loader_workers)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="autocast dtype (weakbench.core.accel)")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="model memory layout (weakbench.core.accel)")
    eval_max_images: int | None = Field(None, ge=1, description="cap on images per evaluated split (None: all)")
    eval_batch_size: int = Field(16, ge=1)
    num_overlays: int = Field(6, ge=0)
    log_model: bool = True
    keep_checkpoints: bool = Field(False, description="keep every checkpoint and, once finished, the private stage "
                                                      "products (default: only what --resume and the registry need)")
    products_dir: str | None = Field(None, description="where shared stage products live (the sweep's products/); None: under the trial")
    callbacks: list[CallbackRef] = Field(default_factory=list, description=(
        "callbacks of the loops, by import path and JSON keyword arguments (weakbench.platform.callbacks; "
        "e.g. CallbackRef.of(FailOnce, after_epoch=1), CallbackRef.of(RecordShards))"))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float] | None:
    """Ray Train worker entry point; ``config = {"spec": TrialSpec.model_dump(), "reporter": mode,
    "segment": index of the plan segment this job runs (None: every stage)}``.

    Returns the final metrics on rank 0 (``None`` elsewhere).
    """
    spec = TrialSpec(**config["spec"])
    return _run(spec, config.get("reporter", "train"), segment=config.get("segment"))


def plan_segments(plan) -> list[list[int]]:
    """Split a plan into the stage-index lists run by one Ray Train job each: a new job starts at
    every ``fit`` stage and carries the ``map``/``eval`` stages that follow it (so the classifier
    plan ``train → eval`` is one job, as BBAM's ``detector → attribute → pseudo_masks → eval``)."""
    segments: list[list[int]] = []
    for i, st in enumerate(plan):
        if not segments or (st.kind == "fit" and segments[-1]):
            segments.append([])
        segments[-1].append(i)
    return segments


def segment_job_name(trial_id: str, plan, segment: int) -> str:
    """Ray Train run name of a segment: ``<trial id>-<first stage>`` (deterministic, so a
    restarted job finds its own checkpoints)."""
    return f"{trial_id}-{plan[plan_segments(plan)[segment][0]].name}"


def _run(spec: TrialSpec, mode: str, segment: int | None = None, tracker=None) -> dict[str, float] | None:
    """Run plan segment ``segment`` (None: the whole plan) of one trial on this worker, under the
    runtime of executor ``mode`` (``"none"``, ``"tune"``, ``"train"``), tracked by ``tracker``
    (None: MLflow at ``spec.tracking_uri``). Returns the final metrics on rank 0. The run ends
    FAILED on an exception, KILLED when Tune stops the trial or an interrupt reaches it."""
    callbacks = build_callbacks(spec.callbacks)
    runtime = make_runtime(mode, use_gpu=spec.use_gpu)
    Path(spec.trial_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    if tracker is None:
        def tracker_factory():
            from weakbench.platform.trackers import MlflowTracker

            return MlflowTracker(spec.tracking_uri)
    else:
        def tracker_factory():
            return tracker
    trial = TrialState(spec, runtime, tracker_factory, callbacks)
    try:
        if not trial.open():
            return trial.final if runtime.rank == 0 else None
        segments = plan_segments(trial.plan)
        stage_ids = [i for seg in segments for i in seg] if segment is None else segments[segment]
        for i in stage_ids:
            run_stage(trial, i)
        if trial.is_last(stage_ids[-1]):
            trial.finish()
        return trial.final if runtime.rank == 0 else None
    except BaseException as e:
        if runtime.rank == 0 and trial.tracker is not None and trial.run_id is not None:
            _end_run_on(e, trial)
        raise


def _end_run_on(e: BaseException, trial: TrialState) -> None:
    """End rank 0's run after ``e`` ended the trial.

    * ``SystemExit(0)``: Tune ends a function trial so from ``tune.report``, after the last report
      or when the scheduler (ASHA) stops it early; a finished run stays FINISHED, a running one
      ends KILLED (the driver, which knows which, writes the final reason:
      :func:`weakbench.platform.reconcile.reconcile`), its last checkpointed epoch logged first;
    * ``KeyboardInterrupt``: a SIGINT reached the worker (Ctrl-C to a terminal's whole process
      group): the run was interrupted, not broken; it ends KILLED and ``--resume`` continues it;
    * anything else (another ``SystemExit`` code included): FAILED with the error as a tag (and
      ``weakbench.diverged`` for a :class:`DivergenceError`), the traceback in ``error.txt``.
    """
    tracker, run_id = trial.tracker, trial.run_id
    if isinstance(e, SystemExit) and e.code in (0, None):
        if trial.unlogged is not None:  # stopped inside the report of a checkpointed epoch
            tracker.log_metrics(run_id, trial.unlogged["metrics"], step=trial.unlogged["step"])
        if tracker.status(run_id) == "RUNNING":
            tracker.set_tag(run_id, "weakbench.stopped", "stopped by Ray Tune")
            tracker.end_run(run_id, "KILLED")
    elif isinstance(e, SystemExit):
        tracker.fail_run(run_id, f"SystemExit: {e.code}")
    elif isinstance(e, KeyboardInterrupt):
        try:
            tracker.set_tag(run_id, C.TAG_INTERRUPTED, "the sweep was interrupted; --resume continues it")
            tracker.end_run(run_id, "KILLED")
        except Exception:  # noqa: BLE001 - reporting must not mask the interrupt
            pass
    else:
        tracker.fail_run(run_id, e)
        if isinstance(e, DivergenceError):
            tracker.set_tag(run_id, "weakbench.diverged", "true")
        (Path(trial.spec.trial_dir) / "error.txt").write_text(traceback.format_exc())


# ---------------------------------------------------------------------- executors
def trial_plan(spec: TrialSpec):
    """The validated plan of ``spec``'s method and config (what the driver needs to start jobs)."""
    from weakbench.methods import build_method
    from weakbench.core.data import open_dataset

    source = open_dataset(spec.data, cache_dir=spec.data_cache, classes=spec.classes)
    method = build_method(spec.method, spec.params, num_classes=source.num_classes, multilabel=source.multilabel)
    return method.stages()


def build_trainer(spec: TrialSpec, *, storage_path: str, name: str, callbacks: list | None = None, max_failures: int = 0,
                  segment: int | None = None):
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` with ``spec.num_workers`` workers
    over plan segment ``segment`` (``None``: the whole plan in one job).

    ``name`` and ``storage_path`` are deterministic per trial and segment, so a restarted job
    finds its own checkpoints (Train V2 restores the latest one for a run of the same name).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from weakbench.platform.tune_record import local_fault_trainer

    # a local fault (full disk, read-only file system, missing file) is not restarted by Train
    # either: a retry on the same storage fails the same way
    return local_fault_trainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "reporter": "train", "segment": segment},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             # the latest checkpoint is what a restart needs (every one with --keep-checkpoints)
                             checkpoint_config=CheckpointConfig(num_to_keep=None if spec.keep_checkpoints else 1),
                             # a bounded controller: Train V2's default (-1) retries a worker group
                             # that cannot start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) forever
                             failure_config=FailureConfig(max_failures=max_failures,
                                                          controller_failure_limit=max(1, max_failures))),
    )


def run_segments(spec: TrialSpec, *, storage_path: str, callbacks: list | None = None, max_failures: int = 0) -> dict[str, float]:
    """Run a trial's plan on Ray Train: one ``TorchTrainer`` per segment (a fit stage and the
    map/eval stages after it), named ``<trial id>-<first stage>``, in plan order. Products of
    finished stages are cache hits in later jobs, so a restarted trial redoes no finished stage.
    Returns the last job's final metrics."""
    plan = trial_plan(spec)
    metrics: dict[str, float] = {}
    for seg in range(len(plan_segments(plan))):
        trainer = build_trainer(spec, storage_path=storage_path, name=segment_job_name(spec.trial_id, plan, seg),
                                callbacks=callbacks, max_failures=max_failures, segment=seg)
        metrics = dict(trainer.fit().metrics or {})
        if metrics.get("already_finished"):
            break
    return metrics


def run_trial(spec: TrialSpec, *, executor: str = "train", storage_path: str | None = None,
              max_failures: int = 0, tracker=None) -> dict[str, float]:
    """Run one trial outside a sweep and return its final metrics (rank 0's last report).

    ``executor="train"`` runs each plan segment as a ``TorchTrainer`` (Ray must be initialised or
    will be started locally); ``"inline"`` runs every stage in this process without checkpoint
    reporting. ``tracker`` (inline only): a :class:`~weakbench.platform.trackers.Tracker` to record
    the run in instead of MLflow at ``spec.tracking_uri``, e.g. an
    :class:`~weakbench.platform.trackers.InMemoryTracker`.

    Raises:
        ray.train.TrainingFailedError (train) or the original exception (inline); in both cases
        the trial's run is FAILED. ValueError: ``num_workers`` > 1 inline, or a ``tracker`` with
        the train executor (its workers are other processes).
    """
    if executor == "inline":
        if spec.num_workers != 1:
            raise ValueError("the inline executor runs one worker; use executor='train' for DDP")
        return _run(spec, "none", tracker=tracker) or {}
    if tracker is not None:
        raise ValueError("a tracker object can only record an inline trial (executor='inline'); the train "
                         "executor's workers log to MLflow at spec.tracking_uri")
    storage = storage_path or str(Path(spec.trial_dir).parent / "ray_train")
    return run_segments(spec, storage_path=storage, max_failures=max_failures)


def run_inline_in_tune(spec: TrialSpec) -> dict[str, float]:
    """Run a one-worker trial inside the current Tune trial, reporting and checkpointing
    through ``ray.tune`` directly (the ``inline`` executor of a sweep; on the GPU share the trial
    holds with ``gpus_per_trial``)."""
    if spec.num_workers != 1:
        raise ValueError("the inline executor runs one worker; use executor='train' for DDP")
    return _run(spec, "tune") or {}
