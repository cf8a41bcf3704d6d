"""The training engine: one trial of one method, on Ray Train (DDP over gloo on CPU, NCCL on GPU).

The engine owns loops, devices, DDP, data sharding, checkpoints, evaluation and logging; methods
only answer the hooks of :class:`weakbench.methods.base.Method`.

A trial runs :func:`train_loop_per_worker` on every worker of a ``TorchTrainer``:

1. open the dataset and the sweep's stored split (every trial sees the same split);
2. build the method and model; restore model, optimiser state, epoch and the MLflow run id from
   the latest checkpoint (``ray.train.get_checkpoint()``) if the trial is being resumed;
3. rank 0 finds or creates the trial's MLflow child run (found again by its tags if no
   checkpoint exists yet; a FINISHED run is never written again and the trial returns at once);
4. each epoch: train on this rank's shard (``DistributedSampler`` or the method's batch
   sampler); rank 0 evaluates on the validation split and saves a checkpoint that also carries
   the epoch's metrics; every rank calls ``ray.train.report`` (rank 0 with the checkpoint); then
   rank 0 logs the metrics to MLflow. A trial killed between the report and the logging logs
   them when it resumes from that checkpoint, and one killed before the report redoes the epoch:
   each epoch lands in MLflow exactly once;
5. at the last epoch rank 0 evaluates the test split once, logs overlays and the model and ends
   the run FINISHED *before* the last report (Tune may end a trial inside ``report``). Any
   exception ends the run FAILED with the error as a tag; a trial stopped early by the scheduler
   ends KILLED.

Executors: ``"train"`` (default) runs the loop in a ``TorchTrainer`` with ``num_workers``
workers. ``"inline"`` runs the same loop in the calling process (the Tune trial actor) for
one-worker CPU trials, reporting to Tune directly; it saves the start-up of the Train controller
and worker actors (each a fresh process importing torch), measured in
``benchmarks/bench_trial_startup.py``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from weakbench import __version__
from weakbench.platform import conventions as C

CHECKPOINT_FILE = "trial_state.pt"


class TrialSpec(BaseModel):
    """Everything a trial needs besides its hyperparameters; serialisable to Ray workers."""

    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict[str, Any] = Field(description="the trial's hyperparameters (validated by the method's schema)")
    data: str | None = Field(None, description="dataset directory; None = embedded synthetic default")
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
    eval_max_images: int | None = Field(None, ge=1, description="cap on images per evaluated split (None: all)")
    eval_batch_size: int = Field(16, ge=1)
    num_overlays: int = Field(6, ge=0)
    log_model: bool = True
    record_shards: bool = Field(False, description="write the indices each rank trained on and a hash of its final weights (tests)")
    fail_at_epoch: int | None = Field(None, description="raise after this epoch once (restart tests)")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class _Reporter:
    """Hides whether we report to Ray Train (workers) or to Ray Tune directly (inline)."""

    def __init__(self, mode: str):
        self.mode = mode  # "train" | "tune" | "none"

    def get_checkpoint(self):
        if self.mode == "train":
            import ray.train

            return ray.train.get_checkpoint()
        if self.mode == "tune":
            from ray import tune

            return tune.get_checkpoint()
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if self.mode == "none":
            return
        if self.mode == "train":
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
        else:
            from ray import tune

            ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            tune.report(metrics, checkpoint=ckpt)


def _world() -> tuple[int, int]:
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # noqa: BLE001 - not inside a Train worker
        return 0, 1


def _trial_tags(spec: TrialSpec, source, cfg) -> dict[str, str]:
    from weakbench.platform.tracking import config_hash, git_commit

    return {
        C.TAG_METHOD: spec.method,
        C.TAG_BACKBONE: cfg.backbone,
        C.TAG_DATASET: source.name,
        C.TAG_DATASET_FINGERPRINT: source.fingerprint,
        C.TAG_SPLIT: "val",
        C.TAG_SEED: str(cfg.seed),
        C.TAG_GIT_COMMIT: git_commit(),
        C.TAG_CONFIG_HASH: config_hash(cfg.model_dump()),
        C.TAG_VERSION: __version__,
        C.TAG_DEVICE: "cuda" if spec.use_gpu else "cpu",
        C.TAG_NUM_WORKERS: str(spec.num_workers),
    }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float] | None:
    """Ray Train worker entry point; ``config = {"spec": TrialSpec.model_dump(), "reporter": mode}``.

    Returns the final metrics on rank 0 (``None`` elsewhere).
    """
    spec = TrialSpec(**config["spec"])
    reporter = _Reporter(config.get("reporter", "train"))
    return _run(spec, reporter)


def _run(spec: TrialSpec, reporter: _Reporter) -> dict[str, float] | None:
    from weakbench.methods import build_method
    from weakbench.platform import tracking
    from weakbench.platform.data import ClassificationDataset, load_splits, open_dataset
    from weakbench.platform.evaluate import evaluate_split

    rank, world = _world()
    trial_dir = Path(spec.trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    if spec.use_gpu and torch.cuda.is_available():
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))

    client = run_id = None
    unlogged: dict[str, Any] | None = None
    try:
        source = open_dataset(spec.data, cache_dir=spec.data_cache)
        splits = load_splits(spec.splits_path, source)
        method = build_method(spec.method, spec.params, num_classes=source.num_classes, multilabel=source.multilabel)
        cfg = method.config
        _seed_everything(cfg.seed)
        model = method.build_model()
        optimizers = method.configure_optimizers(model)

        # ---------------------------------------------------------- resume
        start_epoch, known_run_id, history, pending = 0, None, [], None
        state = None
        ckpt = reporter.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        # Tune records a trial's checkpoints in its experiment state only every few seconds, so a
        # sweep killed right after a report can restore the trial without it: the trial's own
        # latest checkpoint (written before every report) is used when it is newer
        local = _latest_local_checkpoint(trial_dir)
        if local is not None and (state is None or local["epoch"] > state["epoch"]):
            state = local
        if state is not None:
            model.load_state_dict(state["model"])
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            start_epoch, known_run_id, history = state["epoch"], state.get("mlflow_run_id"), state.get("history", [])
            pending = state.get("pending_metrics")
            torch.set_rng_state(state["torch_rng"])

        # ---------------------------------------------------------- tracking (rank 0)
        if rank == 0:
            client = tracking.client_for(spec.tracking_uri)
            exp_id = tracking.ensure_experiment(client, spec.experiment, artifact_root=None)
            run_id, status = tracking.get_or_create_trial_run(
                client, exp_id, parent_run_id=spec.parent_run_id, sweep_id=spec.sweep_id, trial_id=spec.trial_id,
                run_name=spec.run_name, tags=_trial_tags(spec, source, cfg), params=cfg.model_dump(), known_run_id=known_run_id)
            if status == "FINISHED":
                final = {k: v for k, v in client.get_run(run_id).data.metrics.items()}
                final["epoch"] = float(cfg.epochs)
                final["already_finished"] = 1.0
                reporter.report(final, None)
                return final
            if pending is not None:
                _log_pending(client, run_id, pending)
            if status == "NEW":
                import yaml

                client.log_text(run_id, yaml.safe_dump({"method": spec.method, **cfg.model_dump()}, sort_keys=True), C.CONFIG_ARTIFACT)
        if start_epoch >= cfg.epochs and rank != 0:
            return None

        # ---------------------------------------------------------- data
        train_idx = splits["train"]
        train_ds = ClassificationDataset(source, train_idx, cfg.input_size, train=True)
        labels = torch.from_numpy(source.labels_matrix()[train_idx])
        batch_sampler = method.train_batch_sampler(labels, cfg.batch_size, cfg.seed, rank, world)
        sampler = None
        if batch_sampler is None:
            sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=world > 1)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, drop_last=False)
        else:
            loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batch_sampler, num_workers=0)
        steps_per_epoch = max(1, len(loader))

        # ---------------------------------------------------------- model on device / DDP
        model.to(device)
        for opt in optimizers.values():  # move restored optimiser state
            for st in opt.state.values():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        st[k] = v.to(device)
        bare = model
        if world > 1:
            import ray.train.torch as rtt

            model = rtt.prepare_model(model, move_to_device=False,
                                      parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters})
        unwrap = (lambda m: getattr(m, "module", m))

        from weakbench.methods.base import StepContext

        t_start = time.time()
        final: dict[str, float] = {}
        unlogged: dict[str, Any] | None = None
        for epoch in range(start_epoch, cfg.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            elif hasattr(batch_sampler, "set_epoch"):
                batch_sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            seen: list[int] = []
            n = 0
            for step, batch in enumerate(loader):
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                ctx = StepContext(epoch=epoch, step=epoch * steps_per_epoch + step, steps_per_epoch=steps_per_epoch,
                                  total_steps=cfg.epochs * steps_per_epoch, device=device, unwrap=unwrap)
                losses = method.training_step(model, batch, optimizers, ctx)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                if spec.record_shards:
                    seen.extend(int(i) for i in batch["index"].tolist())
            train_metrics = {C.metric_key("train", k): v / max(1, n) for k, v in sums.items()}
            if spec.record_shards:
                (trial_dir / f"shard_rank{rank}_epoch{epoch}.json").write_text(json.dumps(seen))
            last = epoch == cfg.epochs - 1
            metrics: dict[str, float] = dict(train_metrics)
            metrics["epoch"] = float(epoch + 1)
            ckpt_dir = None
            if rank == 0:
                val, _, _ = evaluate_split(method, bare, source, splits["val"], input_size=cfg.input_size, device=device,
                                           cam_curve_interval=cfg.cam_curve_interval, batch_size=spec.eval_batch_size,
                                           max_images=spec.eval_max_images, extra_batches=2 if last else 0)
                metrics.update({C.metric_key("val", k): v for k, v in val.items()})
                elapsed = time.time() - t_start
                metrics[C.COST_TRAIN_SECONDS] = elapsed + (history[-1][C.COST_TRAIN_SECONDS] if history else 0.0)
                if last:
                    # finish the run before the last report: Tune may end the trial inside it
                    tracking.log_metrics(client, run_id, metrics, step=epoch + 1)
                    metrics.update(_finalize(spec, method, bare, source, splits, device, client, run_id, metrics))
                    unlogged = None
                else:
                    # logged after the checkpoint is reported; carried in the checkpoint so that a
                    # trial killed in between logs it on resume: every epoch lands exactly once
                    unlogged = {"step": epoch + 1, "metrics": dict(metrics)}
                history.append({k: metrics[k] for k in (C.COST_TRAIN_SECONDS,)})
                ckpt_dir = tempfile.mkdtemp(prefix="wb-ckpt-", dir=trial_dir)
                tmp = Path(ckpt_dir) / (CHECKPOINT_FILE + ".tmp")
                torch.save({"model": bare.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                            "epoch": epoch + 1, "mlflow_run_id": run_id, "history": history, "pending_metrics": unlogged,
                            "torch_rng": torch.get_rng_state()}, tmp)
                os.replace(tmp, Path(ckpt_dir) / CHECKPOINT_FILE)  # a kill never leaves half a checkpoint
            reporter.report(metrics, ckpt_dir)
            if rank == 0:
                _prune_local_checkpoints(trial_dir, keep=Path(ckpt_dir))
            if rank == 0 and unlogged is not None:
                tracking.log_metrics(client, run_id, unlogged["metrics"], step=unlogged["step"])
                unlogged = None
            final = metrics
            if spec.fail_at_epoch is not None and epoch + 1 == spec.fail_at_epoch:
                marker = trial_dir / "failed_once"
                if not marker.exists():
                    marker.write_text("1")
                    raise RuntimeError(f"injected failure after epoch {epoch + 1} (fail_at_epoch)")
        if spec.record_shards:
            import hashlib

            # parameters only: DDP keeps them identical across ranks; BatchNorm buffers are
            # broadcast from rank 0 at each forward, so after the last step a rank's running
            # statistics include its own last batch (the checkpoint is rank 0's).
            digest = hashlib.sha256()
            for k, v in sorted(bare.named_parameters()):
                digest.update(k.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            (trial_dir / f"weights_rank{rank}.sha256").write_text(digest.hexdigest())
        if rank == 0 and start_epoch >= cfg.epochs:
            # resumed after the last checkpoint but before the run was finished: finish it now
            final = _finalize(spec, method, bare.to(device), source, splits, device, client, run_id, {})
            reporter.report({**final, "epoch": float(cfg.epochs)}, None)
        return final if rank == 0 else None
    except SystemExit as e:
        # Tune ends a function trial by raising SystemExit(0) from tune.report: after the last
        # report, or when the scheduler (ASHA) stops it early. A finished run stays FINISHED.
        if rank == 0 and client is not None and run_id is not None:
            if e.code in (0, None):
                if unlogged is not None:  # stopped inside the report of a checkpointed epoch
                    tracking.log_metrics(client, run_id, unlogged["metrics"], step=unlogged["step"])
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, "weakbench.stopped", "stopped early by the scheduler")
                    client.set_terminated(run_id, status="KILLED")
            else:
                tracking.fail_run(client, run_id, f"SystemExit: {e.code}")
        raise
    except BaseException as e:
        if rank == 0 and client is not None and run_id is not None:
            tracking.fail_run(client, run_id, e)
            (trial_dir / "error.txt").write_text(traceback.format_exc())
        raise


def _latest_local_checkpoint(trial_dir: Path) -> dict[str, Any] | None:
    """The newest readable ``wb-ckpt-*/trial_state.pt`` of a trial, or None."""
    dirs = sorted(trial_dir.glob("wb-ckpt-*"), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        f = d / CHECKPOINT_FILE
        if f.is_file():
            try:
                return torch.load(f, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - an unreadable file: try the one before
                continue
    return None


def _prune_local_checkpoints(trial_dir: Path, keep: Path) -> None:
    """Remove a trial's older local checkpoints once ``keep`` has been reported."""
    import shutil

    for d in trial_dir.glob("wb-ckpt-*"):
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def _log_pending(client, run_id: str, pending: dict[str, Any]) -> None:
    """Log a checkpoint's epoch metrics unless MLflow already has that step (idempotent)."""
    steps = {m.step for m in client.get_metric_history(run_id, "epoch")}
    if pending["step"] not in steps:
        from weakbench.platform import tracking

        tracking.log_metrics(client, run_id, pending["metrics"], step=pending["step"])


def _finalize(spec: TrialSpec, method, model, source, splits, device, client, run_id, val_metrics) -> dict[str, float]:
    """Rank 0, after the last epoch: evaluate test once, log overlays and the model, end FINISHED."""
    from weakbench.methods.base import CamPredictor
    from weakbench.platform import tracking
    from weakbench.platform.data import IMAGENET_MEAN, IMAGENET_STD
    from weakbench.platform.evaluate import evaluate_split

    cfg = method.config
    test, overlays, _ = evaluate_split(method, model, source, splits["test"], input_size=cfg.input_size, device=device,
                                       cam_curve_interval=cfg.cam_curve_interval, batch_size=spec.eval_batch_size,
                                       max_images=spec.eval_max_images, num_overlays=spec.num_overlays)
    out = {C.metric_key("test", k): v for k, v in test.items()}
    hours = (val_metrics.get(C.COST_TRAIN_SECONDS, 0.0)) / 3600.0
    out[C.COST_CPU_HOURS] = hours * spec.num_workers * spec.cpus_per_worker
    out[C.COST_GPU_HOURS] = hours * spec.num_workers if spec.use_gpu else 0.0
    tracking.log_metrics(client, run_id, out, step=cfg.epochs)
    with tempfile.TemporaryDirectory() as d:
        for name, img in overlays:
            img.save(Path(d) / name)
        if overlays:
            client.log_artifacts(run_id, d, C.OVERLAY_DIR)
    if spec.log_model:
        predictor = CamPredictor(method, model.cpu().eval(), source.class_names, cfg.input_size, IMAGENET_MEAN, IMAGENET_STD)
        tracking.log_model(spec.tracking_uri, run_id, predictor, metadata={
            "method": spec.method, "class_names": source.class_names, "input_size": cfg.input_size,
            "dataset": source.name, "dataset_fingerprint": source.fingerprint})
        model.to(device)
    client.set_terminated(run_id, status="FINISHED")
    return out


# ---------------------------------------------------------------------- executors
def build_trainer(spec: TrialSpec, *, storage_path: str, name: str, callbacks: list | None = None, max_failures: int = 0):
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` with ``spec.num_workers`` workers.

    ``name`` and ``storage_path`` are deterministic per trial, so a restarted trial finds its
    own checkpoints (Train V2 restores the latest one for a run of the same name).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "reporter": "train"},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )


def run_trial(spec: TrialSpec, *, executor: str = "train", storage_path: str | None = None, name: str | None = None,
              max_failures: int = 0) -> dict[str, float]:
    """Run one trial outside a sweep and return its final metrics (rank 0's last report).

    ``executor="train"`` uses a ``TorchTrainer`` (Ray must be initialised or will be started
    locally); ``"inline"`` runs in this process without checkpoint reporting.

    Raises:
        ray.train.TrainingFailedError (train) or the original exception (inline); in both cases
        the trial's MLflow run is FAILED.
    """
    if executor == "inline":
        if spec.num_workers != 1 or spec.use_gpu:
            raise ValueError("the inline executor runs one CPU worker; use executor='train' for DDP or GPUs")
        return _run(spec, _Reporter("none")) or {}
    storage = storage_path or str(Path(spec.trial_dir).parent / "ray_train")
    result = build_trainer(spec, storage_path=storage, name=name or spec.trial_id, max_failures=max_failures).fit()
    return dict(result.metrics or {})


def run_inline_in_tune(spec: TrialSpec) -> dict[str, float]:
    """Run a one-worker CPU trial inside the current Tune trial, reporting and checkpointing
    through ``ray.tune`` directly (the ``inline`` executor of a sweep)."""
    if spec.num_workers != 1 or spec.use_gpu:
        raise ValueError("the inline executor runs one CPU worker; use executor='train' for DDP or GPUs")
    return _run(spec, _Reporter("tune")) or {}
