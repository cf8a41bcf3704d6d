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
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from weakbench import __version__
from weakbench.core import conventions as C
from weakbench.core.errors import DivergenceError, check_finite
from weakbench.core.io import atomic_write
from weakbench.methods.pipeline import load_data, save_data

CHECKPOINT_FILE = "trial_state.pt"


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


def _trial_tags(spec: TrialSpec, source, method) -> dict[str, str]:
    from weakbench.platform.tracking import config_hash, git_commit

    cfg = method.config
    return {
        C.TAG_METHOD: spec.method,
        C.TAG_BACKBONE: method.backbone_name,
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
    """Ray Train worker entry point; ``config = {"spec": TrialSpec.model_dump(), "reporter": mode,
    "segment": index of the plan segment this job runs (None: every stage)}``.

    Returns the final metrics on rank 0 (``None`` elsewhere).
    """
    spec = TrialSpec(**config["spec"])
    reporter = _Reporter(config.get("reporter", "train"))
    return _run(spec, reporter, segment=config.get("segment"))


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


def _splits_digest(splits) -> str:
    import hashlib

    doc = json.dumps({k: [int(i) for i in v] for k, v in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def stage_products(spec: TrialSpec, method, plan, source, splits):
    """The :class:`~weakbench.platform.products.Product` of every stage, by name (hash chain
    over the plan; shared stages under ``spec.products_dir``, others under the trial)."""
    from weakbench.platform.products import Product, stage_hash

    cfg = method.config.model_dump()
    digest = _splits_digest(splits)
    shared_root = Path(spec.products_dir) if spec.products_dir else Path(spec.trial_dir) / "products"
    private_root = Path(spec.trial_dir) / "products"
    out: dict[str, Any] = {}
    for st in plan:
        h = stage_hash(method=spec.method, stage=st.name, reads={f: cfg[f] for f in st.reads},
                       inputs={i: out[i].hash for i in st.inputs}, dataset_fingerprint=source.fingerprint,
                       splits_digest=digest)
        out[st.name] = Product(shared_root if st.shared else private_root, st.name, h)
    return out


def _stage_key(stage, split: str, name: str) -> str:
    """MLflow key of a stage metric: ``<split>/<name>``, or ``<split>/<ns>/<name>`` for a
    namespaced stage (``ns`` = ``stage.metric_ns`` or the stage name). A name that starts with a
    split (``"val/miou"``) names its own split: a stage may report several splits."""
    head, _, rest = name.partition("/")
    if rest and head in C.SPLITS:
        split, name = head, rest
    if not stage.namespaced:
        return C.metric_key(split, name)
    return C.metric_key(split, f"{stage.metric_ns or stage.name}/{name}")


class _Runner:
    """Executes stages of one trial on one worker (rank 0 logs, all ranks compute)."""

    def __init__(self, spec: TrialSpec, reporter: _Reporter, rank: int, world: int, device: torch.device):
        self.spec, self.reporter, self.rank, self.world, self.device = spec, reporter, rank, world, device
        self.trial_dir = Path(spec.trial_dir)
        self.client = None
        self.run_id: str | None = None
        self.unlogged: dict[str, Any] | None = None  # epoch metrics reported but not yet in MLflow
        self.models: dict[str, torch.nn.Module] = {}
        self.carry: dict[str, float] = {}  # latest metrics, repeated in every report (Tune needs its metric)
        self.state: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        from weakbench.core.loading import default_loader_workers

        self.loader_workers = default_loader_workers(spec.cpus_per_worker, spec.loader_workers)
        self._mixed_ok: bool | None = None

    # ------------------------------------------------------------------ set-up
    def open(self) -> bool:
        """Open data, method, plan; restore state; find the MLflow run. False when the run is
        already FINISHED (reported and nothing else to do)."""
        from weakbench.methods import build_method
        from weakbench.platform import tracking
        from weakbench.core.data import load_splits, open_dataset

        spec = self.spec
        self.source = open_dataset(spec.data, cache_dir=spec.data_cache, classes=spec.classes)
        self.splits = load_splits(spec.splits_path, self.source)
        self.method = build_method(spec.method, spec.params, num_classes=self.source.num_classes,
                                   multilabel=self.source.multilabel)
        self.cfg = self.method.config
        self.plan = self.method.stages()
        self.products = stage_products(spec, self.method, self.plan, self.source, self.splits)
        if self.rank == 0:
            from weakbench.platform.products import clean_stale_staging

            for root in {p.root for p in self.products.values()}:
                clean_stale_staging(root)  # staging dirs of trials killed more than an hour ago
        self.total_units = sum(st.units for st in self.plan)
        _seed_everything(self.cfg.seed)

        state = None
        ckpt = self.reporter.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_data(Path(d) / CHECKPOINT_FILE)
        # Tune records a trial's checkpoints in its experiment state only every few seconds, so a
        # sweep killed right after a report can restore the trial without it: the trial's own
        # latest checkpoint (written before every report) is used when it is newer
        local = _latest_local_checkpoint(self.trial_dir)
        if local is not None and (state is None or _ckpt_order(local) > _ckpt_order(state)):
            state = local
        self.state = state
        if state is not None:
            self.history = state.get("history", [])
            self.carry = dict(state.get("carry", {}))
        if self.rank == 0:
            self.client = tracking.client_for(spec.tracking_uri)
            exp_id = tracking.ensure_experiment(self.client, spec.experiment, artifact_root=None)
            self.run_id, status = tracking.get_or_create_trial_run(
                self.client, exp_id, parent_run_id=spec.parent_run_id, sweep_id=spec.sweep_id, trial_id=spec.trial_id,
                run_name=spec.run_name, tags=_trial_tags(spec, self.source, self.method), params=self.cfg.model_dump(),
                known_run_id=state.get("mlflow_run_id") if state else None)
            finished = status == "FINISHED"
        else:
            finished = False
        if self.world > 1:  # every rank learns whether there is anything to do
            import torch.distributed as dist

            box = [finished]
            dist.broadcast_object_list(box, src=0)
            finished = box[0]
        if finished:
            if self.rank == 0:
                final = {k: v for k, v in self.client.get_run(self.run_id).data.metrics.items()}
                final["epoch"] = float(self.fit_epochs_before(len(self.plan)))
                final["progress"] = float(self.total_units)
                final["already_finished"] = 1.0
                self.final = final
            else:
                self.final = {}
            self.reporter.report(self.final, None)
            return False
        if self.rank == 0:
            if state is not None and state.get("pending_metrics") is not None:
                _log_pending(self.client, self.run_id, state["pending_metrics"])
            if status == "NEW":
                import yaml

                self.client.log_text(self.run_id, yaml.safe_dump({"method": spec.method, **self.cfg.model_dump()},
                                                                 sort_keys=True), C.CONFIG_ARTIFACT)
        self.final = {}
        return True

    def units_before(self, i: int) -> int:
        return sum(st.units for st in self.plan[:i])

    def fit_epochs_before(self, i: int) -> int:
        return sum(st.epochs for st in self.plan[:i] if st.kind == "fit")

    def mixed_precision_allowed(self) -> bool:
        """Whether every fit task of the plan allows autocast (``FitTask.mixed_precision``): then
        the stages' evaluations may run under it too."""
        if self._mixed_ok is None:
            self._mixed_ok = all(self.method.fit_task(s).mixed_precision for s in self.plan if s.kind == "fit")
        return self._mixed_ok

    def context(self, st, out_dir: Path | None = None):
        from weakbench.methods.pipeline import StageContext
        from weakbench.core.accel import autocast_dtype

        return StageContext(stage=st, config=self.cfg, source=self.source, splits=self.splits,
                            inputs={i: self.products[i].dir for i in st.inputs}, out_dir=out_dir or self.trial_dir,
                            device=self.device, load_model=self.load_model, max_images=self.spec.eval_max_images,
                            num_overlays=self.spec.num_overlays, eval_batch_size=self.spec.eval_batch_size,
                            loader_workers=self.loader_workers,
                            autocast_dtype=autocast_dtype(self.spec.precision, self.device,
                                                          self.mixed_precision_allowed()))

    def load_model(self, name: str) -> torch.nn.Module:
        """The trained model of fit stage ``name`` (in memory, or rebuilt from its product)."""
        if name not in self.models:
            st = next(s for s in self.plan if s.name == name)
            if st.kind != "fit":
                raise ValueError(f"stage {name!r} is a {st.kind} stage, not a fit stage: it has no model")
            model = self.method.fit_task(st).build_model()
            model.load_state_dict(load_data(self.products[name].dir / "model.pt"))
            self.models[name] = model
        return self.models[name].to(self.device).eval()

    # ------------------------------------------------------------------ reporting / tags
    def report(self, metrics: dict[str, float], progress: int, epoch: int, checkpoint_dir: str | None = None) -> None:
        self.carry.update({k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "train/"))})
        out = {**self.carry, **metrics, "progress": float(progress), "epoch": float(epoch)}
        self.reporter.report(out, checkpoint_dir)
        self.final = out

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0 and metrics:
            from weakbench.platform import tracking

            tracking.log_metrics(self.client, self.run_id, metrics, step=step)

    def tag_stage(self, st, cache: str) -> None:
        if self.rank != 0:
            return
        p = self.products[st.name]
        self.client.set_tag(self.run_id, "weakbench.stage", st.name)
        self.client.set_tag(self.run_id, f"weakbench.stage.{st.name}.hash", p.hash)
        self.client.set_tag(self.run_id, f"weakbench.stage.{st.name}.cache", cache)
        self.client.set_tag(self.run_id, f"weakbench.stage.{st.name}.product", str(p.dir))
        print(f"weakbench: trial {self.spec.trial_id} stage {st.name} ({st.kind}): "
              f"{'cache hit' if cache == 'hit' else 'computed'} [{p.dir}]", flush=True)

    def _decide(self, product) -> dict[str, Any] | None:
        """Rank 0 reads the manifest; every rank gets the same answer."""
        man = product.manifest() if self.rank == 0 else None
        if self.world > 1:
            import torch.distributed as dist

            box = [man]
            dist.broadcast_object_list(box, src=0)
            man = box[0]
        return man

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ stages
    def run_stage(self, i: int) -> None:
        st = self.plan[i]
        product = self.products[st.name]
        import contextlib

        with contextlib.ExitStack() as stack:
            if self.rank == 0:
                stack.enter_context(product.lock())  # a concurrent trial computing it: wait, then hit
            man = self._decide(product)
            if man is not None:
                self._cache_hit(i, man)
                return
            self.tag_stage(st, "computed")
            if st.kind == "fit":
                self._fit(i)
            elif st.kind == "map":
                self._map(i)
            else:
                self._eval(i)

    def _cache_hit(self, i: int, man: dict[str, Any]) -> None:
        st = self.plan[i]
        self.tag_stage(st, "hit")
        metrics = {k: float(v) for k, v in man.get("metrics", {}).items()}
        step = self.fit_epochs_before(i + 1)
        self.log(metrics, step=step)
        if self.rank == 0 and st.kind == "eval" and man.get("overlays"):
            self.client.log_artifacts(self.run_id, str(self.products[st.name].dir / C.OVERLAY_DIR), C.OVERLAY_DIR)
        if self.rank == 0 and st.kind == "eval":
            self._log_per_image(i)
        if i < len(self.plan) - 1:
            self.report(metrics, progress=self.units_before(i + 1), epoch=step)
        else:
            self.final = {**self.carry, **metrics}

    def _publish(self, i: int, staging: Path, metrics: dict[str, float], extra: dict[str, Any] | None = None) -> None:
        st = self.plan[i]
        p = self.products[st.name]
        p.publish(staging, {"method": self.spec.method, "reads": {f: self.cfg.model_dump()[f] for f in st.reads},
                            "inputs": {n: self.products[n].hash for n in st.inputs}, "kind": st.kind,
                            "dataset_fingerprint": self.source.fingerprint, "trial": self.spec.trial_id,
                            "metrics": metrics, **(extra or {})})

    def _fit(self, i: int) -> None:
        from weakbench.methods.pipeline import StepContext
        from weakbench.core.accel import autocast, autocast_dtype, use_channels_last
        from weakbench.core.loading import SeededDataset, SeededSampler, make_loader

        spec, st, rank, world, device = self.spec, self.plan[i], self.rank, self.world, self.device
        task = self.method.fit_task(st, {n: self.products[n].dir for n in st.inputs})
        torch.manual_seed(self.cfg.seed)
        model = task.build_model()
        optimizers = task.configure_optimizers(model)
        start_epoch = 0
        state = self.state
        resuming = state is not None and state.get("stage", "train") == st.name
        if resuming:
            model.load_state_dict(state["model"])
            start_epoch = state["epoch"]
            torch.set_rng_state(state["torch_rng"])
        train_ds = task.train_dataset(self.source, self.splits["train"])
        # every sample's augmentation is drawn under a seed of (trial seed, epoch, sample key), so
        # the batches do not depend on the number of loader workers (weakbench.core.loading)
        batch_sampler = task.batch_sampler(self.source, self.splits["train"], rank, world)
        if batch_sampler is None:
            sampler = SeededSampler(torch.utils.data.DistributedSampler(
                train_ds, num_replicas=world, rank=rank, shuffle=True, seed=task.seed, drop_last=world > 1), task.seed)
            loader = make_loader(SeededDataset(train_ds), workers=self.loader_workers, device=device,
                                 batch_size=task.batch_size, sampler=sampler, collate_fn=task.collate, seed=task.seed)
        else:
            sampler = SeededSampler(batch_sampler, task.seed, batched=True)
            loader = make_loader(SeededDataset(train_ds), workers=self.loader_workers, device=device,
                                 batch_sampler=sampler, collate_fn=task.collate, seed=task.seed)
        amp_dtype = autocast_dtype(spec.precision, device, task.mixed_precision)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(task.fixed_input_size)
        steps_per_epoch = max(1, len(loader))
        total_steps = st.epochs * steps_per_epoch
        # schedulers are built before the optimisers' state is loaded (torch's documented order):
        # their constructor resets each group's lr to its initial value, the loaded state then
        # restores the lr reached, and each scheduler's own state its step count
        schedulers = dict(task.configure_schedulers(optimizers, total_steps) or {})
        self.method.check_fit(st, optimizers, schedulers)
        if resuming:
            restore_optimization(state, optimizers, schedulers, stage=st.name)
        model.to(device)
        if use_channels_last(spec.memory_format, device):
            model.to(memory_format=torch.channels_last)
        for opt in optimizers.values():  # move restored optimiser state
            for stt in opt.state.values():
                for k, v in stt.items():
                    if torch.is_tensor(v):
                        stt[k] = v.to(device)
        bare = model
        if world > 1:
            import ray.train.torch as rtt

            model = rtt.prepare_model(model, move_to_device=False,
                                      parallel_strategy_kwargs={"find_unused_parameters": task.find_unused_parameters})

        def unwrap(m):
            return getattr(m, "module", m)

        ctx_stage = self.context(st)
        epochs_before = self.fit_epochs_before(i)
        units_before = self.units_before(i)
        t_start = time.time()
        prev_seconds = self.history[-1][C.COST_TRAIN_SECONDS] if self.history else 0.0
        last_metrics: dict[str, float] = {}
        for epoch in range(start_epoch, st.epochs):
            sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            seen: list[int] = []
            n = 0
            epoch_lrs = _learning_rates(optimizers)  # the lr the epoch's first step uses
            for step, batch in enumerate(loader):
                batch = task.to_device(batch, device)
                sctx = StepContext(epoch=epoch, step=epoch * steps_per_epoch + step, steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps, device=device, unwrap=unwrap)
                with autocast(device, amp_dtype):
                    losses = task.training_step(model, batch, optimizers, sctx)
                for sched in schedulers.values():  # step-wise: once per training step
                    sched.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                if spec.record_shards:
                    seen.extend(task.batch_indices(batch))
            train_metrics = {_stage_key(st, "train", k): v / max(1, n) for k, v in sums.items()}
            train_metrics.update({_stage_key(st, "train", k): v for k, v in epoch_lrs.items()})
            try:
                check_finite(train_metrics, f"stage {st.name}, epoch {epoch + 1} train losses")
            except DivergenceError:
                self.log(train_metrics, step=epochs_before + epoch + 1)  # the evidence, then FAILED
                raise
            if spec.record_shards:
                (self.trial_dir / f"shard_rank{rank}_epoch{epoch}.json").write_text(json.dumps(seen))
            last = epoch == st.epochs - 1
            metrics: dict[str, float] = dict(train_metrics)
            ckpt_dir = None
            step_no = epochs_before + epoch + 1
            if rank == 0:
                val = task.validate(bare, ctx_stage, last)
                metrics.update({_stage_key(st, "val", k): v for k, v in val.items()})
                check_finite(metrics, f"stage {st.name}, epoch {epoch + 1} validation metrics")
                metrics[C.COST_TRAIN_SECONDS] = (time.time() - t_start) + prev_seconds
                last_metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
                # logged after the checkpoint is reported; carried in the checkpoint so that a
                # trial killed in between logs it on resume: every epoch lands exactly once
                self.unlogged = {"step": step_no, "metrics": {**metrics, "epoch": float(step_no)}}
                self.history.append({C.COST_TRAIN_SECONDS: metrics[C.COST_TRAIN_SECONDS]})
                ckpt_dir = tempfile.mkdtemp(prefix="wb-ckpt-", dir=self.trial_dir)
                # a kill never leaves half a checkpoint; a full disk leaves none (_removed_on_error)
                with _removed_on_error(ckpt_dir), atomic_write(Path(ckpt_dir) / CHECKPOINT_FILE) as f:
                    torch.save({"stage": st.name, "cursor": i, "model": bare.state_dict(),
                                **optimization_state(optimizers, schedulers),
                                "epoch": epoch + 1, "mlflow_run_id": self.run_id, "history": self.history,
                                "pending_metrics": self.unlogged, "torch_rng": torch.get_rng_state(),
                                "carry": {**self.carry, **last_metrics}}, f)
            if last and i == len(self.plan) - 1:
                # the plan ends with this fit stage: finish() makes the last report, after the
                # run is FINISHED (Tune may end the trial inside a report)
                self.carry.update(metrics)
            else:
                self.report(metrics, progress=units_before + epoch + 1, epoch=step_no, checkpoint_dir=ckpt_dir)
            if rank == 0:
                _prune_local_checkpoints(self.trial_dir, keep=Path(ckpt_dir))
                tracking_metrics = self.unlogged["metrics"]
                self.unlogged = None
                self.log(tracking_metrics, step=step_no)
            if spec.fail_at_epoch is not None and epoch + 1 == spec.fail_at_epoch:
                marker = self.trial_dir / "failed_once"
                if not marker.exists():
                    marker.write_text("1")
                    raise RuntimeError(f"injected failure after epoch {epoch + 1} (fail_at_epoch)")
        if st.epochs == 0 and rank == 0:  # no training: validate the initial (e.g. pretrained) model once
            val = task.validate(bare, ctx_stage, True)
            last_metrics = {_stage_key(st, "val", k): v for k, v in val.items()}
            self.log(last_metrics, step=epochs_before)
            self.carry.update(last_metrics)
        if spec.record_shards:
            import hashlib

            # parameters only: DDP keeps them identical across ranks; BatchNorm buffers are
            # broadcast from rank 0 at each forward, so after the last step a rank's running
            # statistics include its own last batch (the checkpoint is rank 0's).
            digest = hashlib.sha256()
            for k, v in sorted(bare.named_parameters()):
                digest.update(k.encode())
                digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            (self.trial_dir / f"weights_rank{rank}.sha256").write_text(digest.hexdigest())
        if rank == 0:
            staging = self.products[st.name].new_staging_dir()
            with _removed_on_error(staging):
                save_data(bare.state_dict(), staging / "model.pt")
                if not last_metrics and self.state is not None and self.state.get("stage") == st.name:
                    last_metrics = {k: v for k, v in self.carry.items() if k.startswith("val/")}
                self._publish(i, staging, last_metrics)
        self._barrier()
        self.models[st.name] = bare
        self.state = None  # a later fit stage starts fresh

    def _map(self, i: int) -> None:
        st, p = self.plan[i], self.products[self.plan[i].name]
        t0 = time.time()
        ctx = self.context(st)
        keys = [str(k) for k in self.method.map_items(st, ctx)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"method {self.spec.method!r} stage {st.name!r}: map_items returned duplicate keys")
        done = p.saved_keys()
        todo = [k for k in keys if k not in done]
        size = max(1, int(self.method.map_chunk_size))
        chunks = [todo[j:j + size] for j in range(0, len(todo), size)]
        if done and self.rank == 0:
            print(f"weakbench: trial {self.spec.trial_id} stage {st.name}: resuming, {len(keys) - len(todo)}/{len(keys)} "
                  f"item(s) already saved", flush=True)
            self.client.set_tag(self.run_id, f"weakbench.stage.{st.name}.resumed_items", str(len(keys) - len(todo)))
        finished = len(keys) - len(todo)
        for j in range(self.rank, len(chunks), self.world):
            results = self.method.map_batch(st, chunks[j], ctx)
            missing = [k for k in chunks[j] if k not in results]
            if missing:
                raise RuntimeError(f"method {self.spec.method!r} stage {st.name!r}: map_batch returned no result for "
                                   f"{missing[0]!r}")
            p.save_chunk({k: results[k] for k in chunks[j]})
            finished += len(chunks[j]) * self.world
            ctx.progress(min(finished, len(keys)), len(keys))
        self._barrier()
        metrics: dict[str, float] = {}
        if self.rank == 0:
            results = p.load_chunks()
            missing = [k for k in keys if k not in results]
            if missing:
                raise RuntimeError(f"stage {st.name}: {len(missing)} item(s) have no saved result (e.g. {missing[0]!r})")
            staging = p.new_staging_dir()
            with _removed_on_error(staging):
                raw = self.method.map_reduce(st, {k: results[k] for k in keys}, self.context(st, out_dir=staging)) or {}
                metrics = {_stage_key(st, st.split or "train", k): float(v) for k, v in raw.items()}
                check_finite(metrics, f"stage {st.name} metrics")
                metrics[f"cost/{st.name}_seconds"] = time.time() - t0
                self._publish(i, staging, metrics, {"items": len(keys)})
            self.log(metrics, step=self.fit_epochs_before(i + 1))
        self._barrier()
        self._after(i, metrics)

    def _eval(self, i: int) -> None:
        st, p = self.plan[i], self.products[self.plan[i].name]
        metrics: dict[str, float] = {}
        if self.rank == 0:
            t0 = time.time()
            staging = p.new_staging_dir()
            # the hook may write its per-image results (C.PER_IMAGE_FILE) into the product
            raw, overlays = self.method.evaluate_stage(st, self.context(st, out_dir=staging))
            metrics = {_stage_key(st, st.split or "test", k): float(v) for k, v in raw.items()}
            check_finite(metrics, f"stage {st.name} metrics")
            metrics[f"cost/{st.name}_seconds"] = time.time() - t0
            if overlays:
                (staging / C.OVERLAY_DIR).mkdir()
                for name, img in overlays:
                    img.save(staging / C.OVERLAY_DIR / name)
            self._publish(i, staging, metrics, {"overlays": len(overlays)})
            self.log(metrics, step=self.fit_epochs_before(i + 1))
            if overlays:
                self.client.log_artifacts(self.run_id, str(p.dir / C.OVERLAY_DIR), C.OVERLAY_DIR)
            self._log_per_image(i)
        self._barrier()
        self._after(i, metrics)

    def _log_per_image(self, i: int) -> None:
        """Log eval stage ``i``'s per-image results, when its product has them, as the run's
        artifact ``per_image/<split>.parquet`` (what the results store copies for the board's
        paired bootstrap)."""
        st = self.plan[i]
        path = self.products[st.name].dir / C.PER_IMAGE_FILE
        if path.is_file():
            self.client.log_artifact(self.run_id, str(path), f"{C.PER_IMAGE_DIR}/{st.split or 'test'}")
        folder = self.products[st.name].dir / C.PER_IMAGE_DIR  # per_image/<split>/<stage>.parquet
        if folder.is_dir():
            self.client.log_artifacts(self.run_id, str(folder), C.PER_IMAGE_DIR)

    def _after(self, i: int, metrics: dict[str, float]) -> None:
        """Report a finished map/eval stage (the plan's last stage reports in :meth:`finish`)."""
        if i < len(self.plan) - 1:
            self.report(metrics, progress=self.units_before(i + 1), epoch=self.fit_epochs_before(i + 1))
        else:
            self.final = {**self.carry, **metrics}

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, float]:
        """After the plan's last stage: cost, the predictor, FINISHED, then the last report (Tune
        may end the trial inside it, so the run is finished first)."""
        from weakbench.platform import tracking

        out = dict(self.final)
        if self.rank == 0:
            seconds = self.history[-1][C.COST_TRAIN_SECONDS] if self.history else 0.0
            hours = seconds / 3600.0
            cost = {C.COST_CPU_HOURS: hours * self.spec.num_workers * self.spec.cpus_per_worker,
                    C.COST_GPU_HOURS: (hours * (self.spec.gpus_per_trial or self.spec.num_workers)
                                       if self.spec.use_gpu else 0.0)}
            if self.history:
                cost[C.COST_TRAIN_SECONDS] = seconds
            step = self.fit_epochs_before(len(self.plan))
            self.log(cost, step=step)
            out.update(cost)
            if self.spec.log_model:
                predictor = self.method.build_predictor(self.context(self.plan[-1]))
                if predictor is not None:
                    # which fit stage built each network: the registry rebuilds it the same way
                    built_by = {id(m): name for name, m in self.models.items()}
                    tracking.log_model(self.spec.tracking_uri, self.run_id, predictor, metadata={
                        "dataset": self.source.name, "dataset_fingerprint": self.source.fingerprint},
                        stage_of=lambda module: built_by.get(id(module)))
                    for m in self.models.values():
                        m.to(self.device)
            self.client.set_terminated(self.run_id, status="FINISHED")
        ckpt_dir = None
        if self.rank == 0:
            # a small checkpoint with the last report: Ray Train's Result.metrics are those of the
            # latest checkpointed report, and a restored trial sees the cursor past the last stage
            ckpt_dir = tempfile.mkdtemp(prefix="wb-ckpt-", dir=self.trial_dir)
            with _removed_on_error(ckpt_dir):
                save_data({"stage": None, "cursor": len(self.plan), "epoch": 0, "mlflow_run_id": self.run_id,
                           "history": self.history, "pending_metrics": None, "carry": self.carry},
                          Path(ckpt_dir) / CHECKPOINT_FILE)
            # the run is FINISHED: a restarted trial returns at once, so the earlier checkpoints
            # and (its weights being in MLflow) the trial's private products are not needed again
            # (Tune may end the trial inside the report below: cleaned up before it)
            if not self.spec.keep_checkpoints:
                _prune_local_checkpoints(self.trial_dir, keep=Path(ckpt_dir))
                if self.spec.log_model and self.run_logged_model():
                    _remove_private_products(self.trial_dir)
        self.report({k: v for k, v in out.items() if k not in ("progress", "epoch")},
                    progress=self.total_units, epoch=self.fit_epochs_before(len(self.plan)), checkpoint_dir=ckpt_dir)
        if ckpt_dir is not None and not self.spec.keep_checkpoints:
            _prune_local_checkpoints(self.trial_dir, keep=Path(ckpt_dir))
        return self.final

    def run_logged_model(self) -> bool:
        """Whether this trial's MLflow run has its model (tag ``weakbench.model_uri``)."""
        return bool(self.client.get_run(self.run_id).data.tags.get(C.TAG_MODEL_URI))


def _learning_rates(optimizers) -> dict[str, float]:
    """The lr of each optimiser's first parameter group, keyed ``lr`` (optimiser ``"main"``) or
    ``lr_<name>`` (the classifier methods' first group is the backbone's, ``lr * backbone_lr_mult``)."""
    return {("lr" if name == "main" else f"lr_{name}"): float(opt.param_groups[0]["lr"])
            for name, opt in optimizers.items() if opt.param_groups}


def optimization_state(optimizers, schedulers) -> dict[str, Any]:
    """The optimisation part of a fit stage's checkpoint: ``{"optimizers": {name: state_dict},
    "schedulers": {name: state_dict}}`` (``schedulers`` is ``{}`` for a constant lr; checkpoints
    written before lr schedules existed have no ``"schedulers"`` key)."""
    return {"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: sch.state_dict() for k, sch in schedulers.items()}}


def restore_optimization(state: dict[str, Any], optimizers, schedulers, stage: str = "train") -> None:
    """Load a checkpoint's optimiser states, then its scheduler states (:func:`optimization_state`).

    ``schedulers`` must have been built on ``optimizers`` *before* this call (torch's order: a
    scheduler's constructor resets each group's lr; the optimiser's loaded state restores the lr
    reached, the scheduler's its step count), so the next step continues the schedule exactly.

    Raises:
        RuntimeError: the checkpoint has no state for a configured scheduler (written without that
            schedule: resuming would restart it).
    """
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    saved = state.get("schedulers") or {}
    for name, sched in schedulers.items():
        if name not in saved:
            raise RuntimeError(f"stage {stage!r}: the trial checkpoint has no state for lr scheduler {name!r} (it was "
                               f"written without this schedule); start the trial afresh (remove its trial directory)")
        sched.load_state_dict(saved[name])


def _ckpt_order(state: dict[str, Any]) -> tuple[int, int]:
    return int(state.get("cursor", 0)), int(state.get("epoch", 0))


def _run(spec: TrialSpec, reporter: _Reporter, segment: int | None = None) -> dict[str, float] | None:
    from weakbench.platform import tracking

    rank, world = _world()
    Path(spec.trial_dir).mkdir(parents=True, exist_ok=True)
    if spec.use_gpu and torch.cuda.is_available():
        if reporter.mode == "train":
            import ray.train.torch as rtt

            device = rtt.get_device()
        else:  # an inline trial: Ray set CUDA_VISIBLE_DEVICES to the GPU (share) the trial holds
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    runner = _Runner(spec, reporter, rank, world, device)
    try:
        if not runner.open():
            return runner.final if rank == 0 else None
        segments = plan_segments(runner.plan)
        stage_ids = [i for seg in segments for i in seg] if segment is None else segments[segment]
        for i in stage_ids:
            runner.run_stage(i)
        if stage_ids[-1] == len(runner.plan) - 1:
            runner.finish()
        return runner.final if rank == 0 else None
    except SystemExit as e:
        # Tune ends a function trial by raising SystemExit(0) from tune.report: after the last
        # report, or when the scheduler (ASHA) stops it early. A finished run stays FINISHED.
        client, run_id = runner.client, runner.run_id
        if rank == 0 and client is not None and run_id is not None:
            if e.code in (0, None):
                if runner.unlogged is not None:  # stopped inside the report of a checkpointed epoch
                    tracking.log_metrics(client, run_id, runner.unlogged["metrics"], step=runner.unlogged["step"])
                if client.get_run(run_id).info.status == "RUNNING":
                    # the scheduler's decision or the sweep ending (an interrupt): the driver, which
                    # knows which, writes the final reason (weakbench.platform.sweep._reconcile)
                    client.set_tag(run_id, "weakbench.stopped", "stopped by Ray Tune")
                    client.set_terminated(run_id, status="KILLED")
            else:
                tracking.fail_run(client, run_id, f"SystemExit: {e.code}")
        raise
    except KeyboardInterrupt:
        # a SIGINT reached the worker (Ctrl-C to a terminal's whole process group): the run was
        # interrupted, not broken; it ends KILLED and ``--resume`` continues it from its checkpoint
        if rank == 0 and runner.client is not None and runner.run_id is not None:
            try:
                runner.client.set_tag(runner.run_id, C.TAG_INTERRUPTED, "the sweep was interrupted; --resume continues it")
                runner.client.set_terminated(runner.run_id, status="KILLED")
            except Exception:  # noqa: BLE001 - reporting must not mask the interrupt
                pass
        raise
    except BaseException as e:
        if rank == 0 and runner.client is not None and runner.run_id is not None:
            tracking.fail_run(runner.client, runner.run_id, e)
            if isinstance(e, DivergenceError):
                runner.client.set_tag(runner.run_id, "weakbench.diverged", "true")
            (Path(spec.trial_dir) / "error.txt").write_text(traceback.format_exc())
        raise


@contextlib.contextmanager
def _removed_on_error(path: str | Path):
    """Remove ``path`` (a checkpoint or staging directory being written) when the block raises:
    on a full disk the partly written file would otherwise keep the space that the run's FAILED
    status, the sweep's record and its MLflow store need (issue 19). A local fault (a full disk,
    a read-only file system: :func:`weakbench.platform.tune_record.local_fault_error`) behind the
    error is raised as itself, so that neither Tune nor Train retries it."""
    try:
        yield Path(path)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        # the failed writer (and its open file, whose space the unlink does not free while it is
        # open) is a local of the traceback's frames: drop them; the traceback's lines remain
        traceback.clear_frames(e.__traceback__)
        from weakbench.platform.tune_record import local_fault_error

        fault = local_fault_error(e)
        if fault is not None and fault is not e:
            # torch reports a full disk as "RuntimeError: unexpected pos" with the OSError as its
            # context, which Ray drops when it sends the error to the driver: raise the OSError
            raise fault from e
        raise


def _latest_local_checkpoint(trial_dir: Path) -> dict[str, Any] | None:
    """The newest readable ``wb-ckpt-*/trial_state.pt`` of a trial, or None."""
    dirs = sorted(trial_dir.glob("wb-ckpt-*"), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        f = d / CHECKPOINT_FILE
        if f.is_file():
            try:
                return load_data(f)
            except Exception:  # noqa: BLE001 - an unreadable file: try the one before
                continue
    return None


def _prune_local_checkpoints(trial_dir: Path, keep: Path) -> None:
    """Remove a trial's older local checkpoints once ``keep`` has been reported."""
    import shutil

    for d in trial_dir.glob("wb-ckpt-*"):
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def _remove_private_products(trial_dir: Path) -> None:
    """Remove a finished trial's private stage products, ``<trial dir>/products`` (the sweep's
    shared products live under ``TrialSpec.products_dir`` and stay for the other trials)."""
    import shutil

    shutil.rmtree(trial_dir / "products", ignore_errors=True)


def _log_pending(client, run_id: str, pending: dict[str, Any]) -> None:
    """Log a checkpoint's epoch metrics unless MLflow already has that step (idempotent)."""
    steps = {m.step for m in client.get_metric_history(run_id, "epoch")}
    if pending["step"] not in steps:
        from weakbench.platform import tracking

        tracking.log_metrics(client, run_id, pending["metrics"], step=pending["step"])


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
              max_failures: int = 0) -> dict[str, float]:
    """Run one trial outside a sweep and return its final metrics (rank 0's last report).

    ``executor="train"`` runs each plan segment as a ``TorchTrainer`` (Ray must be initialised or
    will be started locally); ``"inline"`` runs every stage in this process without checkpoint
    reporting.

    Raises:
        ray.train.TrainingFailedError (train) or the original exception (inline); in both cases
        the trial's MLflow run is FAILED.
    """
    if executor == "inline":
        if spec.num_workers != 1:
            raise ValueError("the inline executor runs one worker; use executor='train' for DDP")
        return _run(spec, _Reporter("none")) or {}
    storage = storage_path or str(Path(spec.trial_dir).parent / "ray_train")
    return run_segments(spec, storage_path=storage, max_failures=max_failures)


def run_inline_in_tune(spec: TrialSpec) -> dict[str, float]:
    """Run a one-worker trial inside the current Tune trial, reporting and checkpointing
    through ``ray.tune`` directly (the ``inline`` executor of a sweep; on the GPU share the trial
    holds with ``gpus_per_trial``)."""
    if spec.num_workers != 1:
        raise ValueError("the inline executor runs one worker; use executor='train' for DDP")
    return _run(spec, _Reporter("tune")) or {}
