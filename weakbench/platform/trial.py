"""One trial's state on one worker, and its start and end: the data, the method and its plan, the
stage products, the restored checkpoint, the tracked run, the latest metrics and the reports.

:class:`TrialState` is what the loops (:mod:`weakbench.platform.loops`) work on, over a
:class:`~weakbench.platform.runtime.Runtime`, a :class:`~weakbench.platform.trackers.Tracker`
(rank 0 only) and a :class:`~weakbench.platform.checkpoints.CheckpointStore`. :meth:`TrialState.open`
is steps 1–3 of :mod:`weakbench.platform.engine`'s description, :meth:`TrialState.finish` step 5.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from weakbench import __version__
from weakbench.core import conventions as C
from weakbench.methods.pipeline import load_data
from weakbench.platform.checkpoints import CheckpointStore

if TYPE_CHECKING:
    from weakbench.platform.callbacks import Callback
    from weakbench.platform.engine import TrialSpec
    from weakbench.platform.runtime import Runtime
    from weakbench.platform.trackers import Tracker


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def trial_tags(spec: TrialSpec, source, method) -> dict[str, str]:
    """The tags a trial's run is created with (``weakbench.core.conventions.TRIAL_TAGS``)."""
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


def splits_digest(splits) -> str:
    """16 hex chars of sha256 over the split's JSON (sorted names, integer indices)."""
    doc = json.dumps({k: [int(i) for i in v] for k, v in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def stage_products(spec: TrialSpec, method, plan, source, splits):
    """The :class:`~weakbench.platform.products.Product` of every stage, by name (hash chain
    over the plan; shared stages under ``spec.products_dir``, others under the trial)."""
    from weakbench.platform.products import Product, stage_hash

    cfg = method.config.model_dump()
    digest = splits_digest(splits)
    shared_root = Path(spec.products_dir) if spec.products_dir else Path(spec.trial_dir) / "products"
    private_root = Path(spec.trial_dir) / "products"
    out: dict[str, Any] = {}
    for st in plan:
        h = stage_hash(method=spec.method, stage=st.name, reads={f: cfg[f] for f in st.reads},
                       inputs={i: out[i].hash for i in st.inputs}, dataset_fingerprint=source.fingerprint,
                       splits_digest=digest)
        out[st.name] = Product(shared_root if st.shared else private_root, st.name, h)
    return out


class TrialState:
    """One trial on one worker: what every stage reads and what its reports carry.

    Attributes set by :meth:`open`: ``source``, ``splits``, ``method``, ``cfg``, ``plan``,
    ``products`` (stage name → product), ``total_units``, ``state`` (the restored checkpoint or
    None), ``run_id`` and ``tracker`` (rank 0). Kept across stages: ``models`` (fit stage → bare
    model), ``carry`` (latest val/test/train metrics, repeated in every report: Tune needs its
    metric), ``history`` (cost per checkpointed epoch), ``unlogged`` (an epoch's metrics reported
    but not yet logged), ``final`` (the last report)."""

    def __init__(self, spec: TrialSpec, runtime: Runtime, tracker_factory: Callable[[], Tracker],
                 callbacks: list[Callback] = ()):
        from weakbench.core.loading import default_loader_workers

        self.spec, self.runtime, self.callbacks = spec, runtime, list(callbacks)
        self._tracker_factory = tracker_factory
        self.trial_dir = Path(spec.trial_dir)
        self.store = CheckpointStore(self.trial_dir, runtime)
        self.tracker: Tracker | None = None
        self.run_id: str | None = None
        self.unlogged: dict[str, Any] | None = None
        self.models: dict[str, torch.nn.Module] = {}
        self.carry: dict[str, float] = {}
        self.state: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self.final: dict[str, float] = {}
        self.loader_workers = default_loader_workers(spec.cpus_per_worker, spec.loader_workers)
        self._mixed_ok: bool | None = None

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world(self) -> int:
        return self.runtime.world

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # ------------------------------------------------------------------ set-up
    def open(self) -> bool:
        """Open data, method, plan; restore state; find the tracked run. False when the run is
        already FINISHED (reported and nothing else to do)."""
        from weakbench.core.data import load_splits, open_dataset
        from weakbench.methods import build_method

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
        seed_everything(self.cfg.seed)

        state = self.state = self.store.restore()
        if state is not None:
            self.history = state.get("history", [])
            self.carry = dict(state.get("carry", {}))
        status = None
        if self.rank == 0:
            self.tracker = self._tracker_factory()
            self.run_id, status = self.tracker.start_trial_run(
                experiment=spec.experiment, parent_run_id=spec.parent_run_id, sweep_id=spec.sweep_id,
                trial_id=spec.trial_id, run_name=spec.run_name, tags=trial_tags(spec, self.source, self.method),
                params=self.cfg.model_dump(), known_run_id=state.get("mlflow_run_id") if state else None)
        # every rank learns whether there is anything to do
        if self.runtime.broadcast(status == "FINISHED"):
            if self.rank == 0:
                final = dict(self.tracker.latest_metrics(self.run_id))
                final["epoch"] = float(self.fit_epochs_before(len(self.plan)))
                final["progress"] = float(self.total_units)
                final["already_finished"] = 1.0
                self.final = final
            self.runtime.report(self.final, None)
            return False
        if self.rank == 0:
            pending = state.get("pending_metrics") if state is not None else None
            if pending is not None and pending["step"] not in self.tracker.metric_steps(self.run_id, "epoch"):
                # a trial killed between its report and its logging: log that epoch now (once)
                self.tracker.log_metrics(self.run_id, pending["metrics"], step=pending["step"])
            if status == "NEW":
                import yaml

                self.tracker.log_text(self.run_id, yaml.safe_dump({"method": spec.method, **self.cfg.model_dump()},
                                                                  sort_keys=True), C.CONFIG_ARTIFACT)
        return True

    # ------------------------------------------------------------------ the plan
    def units_before(self, i: int) -> int:
        return sum(st.units for st in self.plan[:i])

    def fit_epochs_before(self, i: int) -> int:
        return sum(st.epochs for st in self.plan[:i] if st.kind == "fit")

    def is_last(self, i: int) -> bool:
        return i == len(self.plan) - 1

    def mixed_precision_allowed(self) -> bool:
        """Whether every fit task of the plan allows autocast (``FitTask.mixed_precision``): then
        the stages' evaluations may run under it too."""
        if self._mixed_ok is None:
            self._mixed_ok = all(self.method.fit_task(s).mixed_precision for s in self.plan if s.kind == "fit")
        return self._mixed_ok

    def context(self, st, out_dir: Path | None = None):
        """The :class:`~weakbench.methods.pipeline.StageContext` of stage ``st``."""
        from weakbench.core.accel import autocast_dtype
        from weakbench.methods.pipeline import StageContext

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

    # ------------------------------------------------------------------ reporting / tracking
    def report(self, metrics: dict[str, float], progress: int, epoch: int, checkpoint_dir: str | None = None) -> None:
        """Report ``metrics`` with the latest carried ones, ``progress`` and ``epoch`` to the executor."""
        self.carry.update({k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "train/"))})
        out = {**self.carry, **metrics, "progress": float(progress), "epoch": float(epoch)}
        self.runtime.report(out, checkpoint_dir)
        self.final = out

    def after_stage(self, i: int, metrics: dict[str, float]) -> None:
        """Report a finished stage ``i`` (the plan's last stage reports in :meth:`finish`)."""
        if not self.is_last(i):
            self.report(metrics, progress=self.units_before(i + 1), epoch=self.fit_epochs_before(i + 1))
        else:
            self.final = {**self.carry, **metrics}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` (rank 0; nothing elsewhere)."""
        if self.rank == 0 and metrics:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def tag_stage(self, st, cache: str) -> None:
        """Tag the run with the stage running now, its product's hash and directory and ``cache`` (``hit``/``computed``)."""
        if self.rank != 0:
            return
        p = self.products[st.name]
        for key, value in (("weakbench.stage", st.name), (f"weakbench.stage.{st.name}.hash", p.hash),
                           (f"weakbench.stage.{st.name}.cache", cache), (f"weakbench.stage.{st.name}.product", str(p.dir))):
            self.tracker.set_tag(self.run_id, key, value)
        print(f"weakbench: trial {self.spec.trial_id} stage {st.name} ({st.kind}): "
              f"{'cache hit' if cache == 'hit' else 'computed'} [{p.dir}]", flush=True)

    def publish(self, i: int, staging: Path, metrics: dict[str, float], extra: dict[str, Any] | None = None) -> None:
        """Publish stage ``i``'s staging directory as its product, with its manifest."""
        st = self.plan[i]
        self.products[st.name].publish(staging, {
            "method": self.spec.method, "reads": {f: self.cfg.model_dump()[f] for f in st.reads},
            "inputs": {n: self.products[n].hash for n in st.inputs}, "kind": st.kind,
            "dataset_fingerprint": self.source.fingerprint, "trial": self.spec.trial_id, "metrics": metrics,
            **(extra or {})})

    def log_eval_artifacts(self, i: int, overlays: bool) -> None:
        """Log eval stage ``i``'s overlays (when it has them) and per-image results (artifact
        ``per_image/<split>.parquet``, what the results store copies for the board's paired
        bootstrap) from its product."""
        st = self.plan[i]
        folder = self.products[st.name].dir
        if overlays:
            self.tracker.log_artifacts(self.run_id, str(folder / C.OVERLAY_DIR), C.OVERLAY_DIR)
        if (folder / C.PER_IMAGE_FILE).is_file():
            self.tracker.log_artifact(self.run_id, str(folder / C.PER_IMAGE_FILE), f"{C.PER_IMAGE_DIR}/{st.split or 'test'}")
        if (folder / C.PER_IMAGE_DIR).is_dir():  # per_image/<split>/<stage>.parquet
            self.tracker.log_artifacts(self.run_id, str(folder / C.PER_IMAGE_DIR), C.PER_IMAGE_DIR)

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, float]:
        """After the plan's last stage: cost, the predictor, FINISHED, then the last report (Tune
        may end the trial inside it, so the run is finished first)."""
        out = dict(self.final)
        ckpt_dir = None
        if self.rank == 0:
            out.update(self._log_cost())
            if self.spec.log_model:
                self._log_predictor()
            self.tracker.end_run(self.run_id, "FINISHED")
            # a small checkpoint with the last report: Ray Train's Result.metrics are those of the
            # latest checkpointed report, and a restored trial sees the cursor past the last stage
            ckpt_dir = self.store.write({"stage": None, "cursor": len(self.plan), "epoch": 0, "mlflow_run_id": self.run_id,
                                         "history": self.history, "pending_metrics": None, "carry": self.carry},
                                        atomic=False)
            # the run is FINISHED: a restarted trial returns at once, so the earlier checkpoints
            # and (its weights being tracked) the trial's private products are not needed again
            # (Tune may end the trial inside the report below: cleaned up before it)
            if not self.spec.keep_checkpoints:
                self.store.prune(keep=ckpt_dir)
                if self.spec.log_model and self.tracker.tags(self.run_id).get(C.TAG_MODEL_URI):
                    self.store.remove_private_products()
        self.report({k: v for k, v in out.items() if k not in ("progress", "epoch")},
                    progress=self.total_units, epoch=self.fit_epochs_before(len(self.plan)), checkpoint_dir=ckpt_dir)
        if ckpt_dir is not None and not self.spec.keep_checkpoints:
            self.store.prune(keep=ckpt_dir)
        return self.final

    def _log_cost(self) -> dict[str, float]:
        seconds = self.history[-1][C.COST_TRAIN_SECONDS] if self.history else 0.0
        hours = seconds / 3600.0
        spec = self.spec
        cost = {C.COST_CPU_HOURS: hours * spec.num_workers * spec.cpus_per_worker,
                C.COST_GPU_HOURS: (hours * (spec.gpus_per_trial or spec.num_workers) if spec.use_gpu else 0.0)}
        if self.history:
            cost[C.COST_TRAIN_SECONDS] = seconds
        self.log(cost, step=self.fit_epochs_before(len(self.plan)))
        return cost

    def _log_predictor(self) -> None:
        predictor = self.method.build_predictor(self.context(self.plan[-1]))
        if predictor is None:
            return
        # which fit stage built each network: the registry rebuilds it the same way
        built_by = {id(m): name for name, m in self.models.items()}
        self.tracker.log_model(self.run_id, predictor, metadata={"dataset": self.source.name,
                                                                 "dataset_fingerprint": self.source.fingerprint},
                               stage_of=lambda module: built_by.get(id(module)))
        for m in self.models.values():
            m.to(self.device)
