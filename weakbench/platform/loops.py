"""The stage loops of a trial: fit (an epoch loop over a :class:`~weakbench.methods.pipeline.FitTask`),
map (items sharded over the ranks, saved chunk by chunk) and eval (rank 0), as Lightning's
fit/validate loops.

Each loop works on a :class:`~weakbench.platform.trial.TrialState` (its runtime, tracker,
checkpoint store, products and callbacks); rank, world size, collectives, sharding and model
wrapping come from the trial's :class:`~weakbench.platform.runtime.Runtime`, so no loop branches
on the world size itself. :func:`run_stage` is the entry: a complete product is a cache hit;
otherwise the stage is computed under the product's lock (a concurrent trial computing it: wait,
then hit).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from weakbench.core import conventions as C
from weakbench.core.errors import DivergenceError, check_finite
from weakbench.methods.pipeline import save_data
from weakbench.platform.checkpoints import removed_on_error


def stage_key(stage, split: str, name: str) -> str:
    """Tracking key of a stage metric: ``<split>/<name>``, or ``<split>/<ns>/<name>`` for a
    namespaced stage (``ns`` = ``stage.metric_ns`` or the stage name). A name that starts with a
    split (``"val/miou"``) names its own split: a stage may report several splits."""
    head, _, rest = name.partition("/")
    if rest and head in C.SPLITS:
        split, name = head, rest
    if not stage.namespaced:
        return C.metric_key(split, name)
    return C.metric_key(split, f"{stage.metric_ns or stage.name}/{name}")


def run_stage(trial, i: int) -> None:
    """Run stage ``i`` of the trial's plan: a cache hit (its product complete) or computed."""
    st = trial.plan[i]
    product = trial.products[st.name]
    with contextlib.ExitStack() as stack:
        if trial.rank == 0:
            stack.enter_context(product.lock())  # a concurrent trial computing it: wait, then hit
        man = trial.runtime.broadcast(product.manifest() if trial.rank == 0 else None)  # one answer on every rank
        if man is not None:
            cache_hit(trial, i, man)
            return
        trial.tag_stage(st, "computed")
        if st.kind == "fit":
            metrics = FitLoop(trial, i).run()
        elif st.kind == "map":
            metrics = map_stage(trial, i)
        else:
            metrics = eval_stage(trial, i)
        for cb in trial.callbacks:
            cb.on_stage_end(trial, st, metrics)


def cache_hit(trial, i: int, man: dict[str, Any]) -> None:
    """A stage whose product is complete: log and report the metrics its manifest recorded."""
    st = trial.plan[i]
    trial.tag_stage(st, "hit")
    metrics = {k: float(v) for k, v in man.get("metrics", {}).items()}
    step = trial.fit_epochs_before(i + 1)
    trial.log(metrics, step=step)
    if trial.rank == 0 and st.kind == "eval":
        trial.log_eval_artifacts(i, overlays=bool(man.get("overlays")))
    if not trial.is_last(i):
        trial.report(metrics, progress=trial.units_before(i + 1), epoch=step)
    else:
        trial.final = {**trial.carry, **metrics}


# ---------------------------------------------------------------------- fit
def learning_rates(optimizers) -> dict[str, float]:
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


class FitLoop:
    """Fit stage ``i`` of a trial: build (or restore) model, optimisers and lr schedulers, then
    one epoch at a time on this rank's shard — train, rank 0 validates and checkpoints, every
    rank reports (rank 0 with the checkpoint), rank 0 logs — and publish the model as the stage's
    product (``model.pt``).

    The task's lr schedulers (``FitTask.configure_schedulers``) step after every training step;
    the lr of an epoch's first step is logged as ``train/lr``. A trial killed between an epoch's
    report and its logging logs it when it resumes from that checkpoint (``pending_metrics``), so
    each epoch is logged exactly once."""

    def __init__(self, trial, i: int):
        self.trial, self.i, self.st = trial, i, trial.plan[i]
        self.task = trial.method.fit_task(self.st, {n: trial.products[n].dir for n in self.st.inputs})
        state = trial.state
        self.resume = state if state is not None and state.get("stage", "train") == self.st.name else None

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        from weakbench.core.accel import autocast_dtype, use_channels_last

        trial, task, st, device = self.trial, self.task, self.st, self.trial.device
        torch.manual_seed(trial.cfg.seed)
        model = task.build_model()
        self.optimizers = task.configure_optimizers(model)
        self.start_epoch = 0
        if self.resume is not None:
            model.load_state_dict(self.resume["model"])
            self.start_epoch = self.resume["epoch"]
            torch.set_rng_state(self.resume["torch_rng"])
        self._build_loader()
        self.amp_dtype = autocast_dtype(trial.spec.precision, device, task.mixed_precision)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(task.fixed_input_size)
        self.steps_per_epoch = max(1, len(self.loader))
        self.total_steps = st.epochs * self.steps_per_epoch
        # schedulers are built before the optimisers' state is loaded (torch's documented order):
        # their constructor resets each group's lr to its initial value, the loaded state then
        # restores the lr reached, and each scheduler's own state its step count
        self.schedulers = dict(task.configure_schedulers(self.optimizers, self.total_steps) or {})
        trial.method.check_fit(st, self.optimizers, self.schedulers)
        if self.resume is not None:
            restore_optimization(self.resume, self.optimizers, self.schedulers, stage=st.name)
        model.to(device)
        if use_channels_last(trial.spec.memory_format, device):
            model.to(memory_format=torch.channels_last)
        for opt in self.optimizers.values():  # move restored optimiser state
            for stt in opt.state.values():
                for k, v in stt.items():
                    if torch.is_tensor(v):
                        stt[k] = v.to(device)
        self.bare = model
        self.model = trial.runtime.wrap_model(model, find_unused_parameters=self.task.find_unused_parameters)

    def _build_loader(self) -> None:
        from weakbench.core.loading import SeededDataset, SeededSampler, make_loader

        trial, task = self.trial, self.task
        train_ds = task.train_dataset(trial.source, trial.splits["train"])
        # every sample's augmentation is drawn under a seed of (trial seed, epoch, sample key), so
        # the batches do not depend on the number of loader workers (weakbench.core.loading)
        sampler, batched = trial.runtime.train_sampler(task, trial.source, trial.splits["train"], train_ds)
        self.sampler = SeededSampler(sampler, task.seed, batched=batched)
        kw = {"batch_sampler": self.sampler} if batched else {"batch_size": task.batch_size, "sampler": self.sampler}
        self.loader = make_loader(SeededDataset(train_ds), workers=trial.loader_workers, device=trial.device,
                                  collate_fn=task.collate, seed=task.seed, **kw)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        """Train, publish the product; returns the stage's last val metrics (rank 0)."""
        trial, st = self.trial, self.st
        self._build()
        self.ctx_stage = trial.context(st)
        self.epochs_before = trial.fit_epochs_before(self.i)
        self.t_start = time.time()
        self.prev_seconds = trial.history[-1][C.COST_TRAIN_SECONDS] if trial.history else 0.0
        last_metrics: dict[str, float] = {}
        for epoch in range(self.start_epoch, st.epochs):
            metrics = self._epoch(epoch)
            if trial.rank == 0:
                last_metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
            for cb in trial.callbacks:
                cb.on_epoch_end(trial, st, epoch, metrics)
        if st.epochs == 0 and trial.rank == 0:  # no training: validate the initial (e.g. pretrained) model once
            val = self.task.validate(self.bare, self.ctx_stage, True)
            last_metrics = {stage_key(st, "val", k): v for k, v in val.items()}
            trial.log(last_metrics, step=self.epochs_before)
            trial.carry.update(last_metrics)
        for cb in trial.callbacks:
            cb.on_fit_end(trial, st, self.bare)
        if trial.rank == 0:
            if not last_metrics and trial.state is not None and trial.state.get("stage") == st.name:
                # resumed after the stage's last epoch: its metrics were carried
                last_metrics = {k: v for k, v in trial.carry.items() if k.startswith("val/")}
            staging = trial.products[st.name].new_staging_dir()
            with removed_on_error(staging):
                save_data(self.bare.state_dict(), staging / "model.pt")
                trial.publish(self.i, staging, last_metrics)
        trial.runtime.barrier()
        trial.models[st.name] = self.bare
        trial.state = None  # a later fit stage starts fresh
        return last_metrics

    def _epoch(self, epoch: int) -> dict[str, float]:
        """One epoch: train, validate and checkpoint (rank 0), report, log. Returns its metrics."""
        trial, st = self.trial, self.st
        step_no = self.epochs_before + epoch + 1
        metrics = self._train(epoch)
        try:
            check_finite(metrics, f"stage {st.name}, epoch {epoch + 1} train losses")
        except DivergenceError:
            trial.log(metrics, step=step_no)  # the evidence, then FAILED
            raise
        ckpt_dir = self._validate_and_checkpoint(epoch, metrics) if trial.rank == 0 else None
        if epoch == st.epochs - 1 and trial.is_last(self.i):
            # the plan ends with this fit stage: finish() makes the last report, after the
            # run is FINISHED (Tune may end the trial inside a report)
            trial.carry.update(metrics)
        else:
            trial.report(metrics, progress=trial.units_before(self.i) + epoch + 1, epoch=step_no, checkpoint_dir=ckpt_dir)
        if trial.rank == 0:
            trial.store.prune(keep=ckpt_dir)
            tracking_metrics = trial.unlogged["metrics"]
            trial.unlogged = None
            trial.log(tracking_metrics, step=step_no)
        return metrics

    def _train(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's shard; the mean of each loss and each optimiser's lr at the epoch's first step."""
        from weakbench.core.accel import autocast
        from weakbench.methods.pipeline import StepContext

        trial, task, st, device = self.trial, self.task, self.st, self.trial.device
        self.sampler.set_epoch(epoch)
        self.model.train()
        sums: dict[str, float] = {}
        n = 0
        epoch_lrs = learning_rates(self.optimizers)  # the lr the epoch's first step uses
        for step, batch in enumerate(self.loader):
            batch = task.to_device(batch, device)
            sctx = StepContext(epoch=epoch, step=epoch * self.steps_per_epoch + step, steps_per_epoch=self.steps_per_epoch,
                               total_steps=self.total_steps, device=device, unwrap=_unwrap)
            with autocast(device, self.amp_dtype):
                losses = task.training_step(self.model, batch, self.optimizers, sctx)
            for sched in self.schedulers.values():  # step-wise: once per training step
                sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            for cb in trial.callbacks:
                cb.on_train_batch_end(trial, st, task, epoch, batch)
        metrics = {stage_key(st, "train", k): v / max(1, n) for k, v in sums.items()}
        metrics.update({stage_key(st, "train", k): v for k, v in epoch_lrs.items()})
        return metrics

    def _validate_and_checkpoint(self, epoch: int, metrics: dict[str, float]) -> str:
        """Rank 0: validate (into ``metrics``), add the cost so far, write the checkpoint that
        carries the epoch's metrics until they are logged; returns its directory."""
        trial, st = self.trial, self.st
        step_no = self.epochs_before + epoch + 1
        val = self.task.validate(self.bare, self.ctx_stage, epoch == st.epochs - 1)
        metrics.update({stage_key(st, "val", k): v for k, v in val.items()})
        check_finite(metrics, f"stage {st.name}, epoch {epoch + 1} validation metrics")
        metrics[C.COST_TRAIN_SECONDS] = (time.time() - self.t_start) + self.prev_seconds
        # logged after the checkpoint is reported; carried in the checkpoint so that a trial
        # killed in between logs it on resume: every epoch lands exactly once
        trial.unlogged = {"step": step_no, "metrics": {**metrics, "epoch": float(step_no)}}
        trial.history.append({C.COST_TRAIN_SECONDS: metrics[C.COST_TRAIN_SECONDS]})
        # a kill never leaves half a checkpoint; a full disk leaves none (removed_on_error)
        return trial.store.write({"stage": st.name, "cursor": self.i, "model": self.bare.state_dict(),
                                  **optimization_state(self.optimizers, self.schedulers),
                                  "epoch": epoch + 1, "mlflow_run_id": trial.run_id, "history": trial.history,
                                  "pending_metrics": trial.unlogged, "torch_rng": torch.get_rng_state(),
                                  "carry": {**trial.carry, **{k: v for k, v in metrics.items() if k.startswith("val/")}}})


def _unwrap(m):
    """The bare module of a (DDP-)wrapped model."""
    return getattr(m, "module", m)


# ---------------------------------------------------------------------- map
def map_stage(trial, i: int) -> dict[str, float]:
    """Map stage ``i``: the method's items in chunks, chunk ``j`` on rank ``j mod world``, each
    chunk's results saved as it is done (a resumed stage skips saved items); then rank 0 reduces
    them into the product and its metrics."""
    st, p, method, name = trial.plan[i], trial.products[trial.plan[i].name], trial.method, trial.spec.method
    t0 = time.time()
    ctx = trial.context(st)
    keys = [str(k) for k in method.map_items(st, ctx)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"method {name!r} stage {st.name!r}: map_items returned duplicate keys")
    done = p.saved_keys()
    todo = [k for k in keys if k not in done]
    size = max(1, int(method.map_chunk_size))
    chunks = [todo[j:j + size] for j in range(0, len(todo), size)]
    if done and trial.rank == 0:
        print(f"weakbench: trial {trial.spec.trial_id} stage {st.name}: resuming, {len(keys) - len(todo)}/{len(keys)} "
              f"item(s) already saved", flush=True)
        trial.tracker.set_tag(trial.run_id, f"weakbench.stage.{st.name}.resumed_items", str(len(keys) - len(todo)))
    finished = len(keys) - len(todo)
    for j in trial.runtime.shard(len(chunks)):
        results = method.map_batch(st, chunks[j], ctx)
        missing = [k for k in chunks[j] if k not in results]
        if missing:
            raise RuntimeError(f"method {name!r} stage {st.name!r}: map_batch returned no result for {missing[0]!r}")
        p.save_chunk({k: results[k] for k in chunks[j]})
        finished += len(chunks[j]) * trial.world
        ctx.progress(min(finished, len(keys)), len(keys))
    trial.runtime.barrier()
    metrics: dict[str, float] = {}
    if trial.rank == 0:
        results = p.load_chunks()
        missing = [k for k in keys if k not in results]
        if missing:
            raise RuntimeError(f"stage {st.name}: {len(missing)} item(s) have no saved result (e.g. {missing[0]!r})")
        staging = p.new_staging_dir()
        with removed_on_error(staging):
            raw = method.map_reduce(st, {k: results[k] for k in keys}, trial.context(st, out_dir=staging)) or {}
            metrics = {stage_key(st, st.split or "train", k): float(v) for k, v in raw.items()}
            check_finite(metrics, f"stage {st.name} metrics")
            metrics[f"cost/{st.name}_seconds"] = time.time() - t0
            trial.publish(i, staging, metrics, {"items": len(keys)})
        trial.log(metrics, step=trial.fit_epochs_before(i + 1))
    trial.runtime.barrier()
    trial.after_stage(i, metrics)
    return metrics


# ---------------------------------------------------------------------- eval
def eval_stage(trial, i: int) -> dict[str, float]:
    """Eval stage ``i`` on rank 0: the method's evaluation (metrics, overlays, per-image results)
    into the product, logged with its artifacts."""
    st, p = trial.plan[i], trial.products[trial.plan[i].name]
    metrics: dict[str, float] = {}
    if trial.rank == 0:
        t0 = time.time()
        staging = p.new_staging_dir()
        # the hook may write its per-image results (C.PER_IMAGE_FILE) into the product
        raw, overlays = trial.method.evaluate_stage(st, trial.context(st, out_dir=staging))
        metrics = {stage_key(st, st.split or "test", k): float(v) for k, v in raw.items()}
        check_finite(metrics, f"stage {st.name} metrics")
        metrics[f"cost/{st.name}_seconds"] = time.time() - t0
        if overlays:
            (staging / C.OVERLAY_DIR).mkdir()
            for name, img in overlays:
                img.save(staging / C.OVERLAY_DIR / name)
        trial.publish(i, staging, metrics, {"overlays": len(overlays)})
        trial.log(metrics, step=trial.fit_epochs_before(i + 1))
        trial.log_eval_artifacts(i, overlays=bool(overlays))
    trial.runtime.barrier()
    trial.after_stage(i, metrics)
    return metrics
