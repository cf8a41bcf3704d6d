"""Hyperparameter sweeps on Ray Tune (Train V2 pattern) with Optuna and ASHA.

Each Tune trial is a plain function (:func:`_trial`) that builds a ``TorchTrainer`` for its
configuration and fits it, with ``TuneReportCallback`` forwarding the workers' reports to Tune
(Ray ≥ 2.51: ``Tuner(trainer)`` is deprecated). The trial function itself holds only
``{"cpu": 0.01}`` so that the Train workers get the CPUs (a ``{"cpu": 0}`` request is refused by
Ray). With ``executor="inline"`` a one-worker CPU trial trains inside the trial function instead,
holding ``cpus_per_worker`` CPUs.

Search: ``OptunaSearch`` (TPE, seeded) over the sampled axes; the ``seed`` grid axis is realised
with Tune's ``Repeater`` (each suggested configuration is run once per seed and Optuna sees the
mean), other grid axes become categorical choices for Optuna. ``searcher="random"`` uses Tune's
own variant generator, where grid axes are crossed natively. ``ASHAScheduler`` (time attribute
``epoch``) stops poor trials early.

Layout of a sweep directory ``<output>/sweeps/<sweep name>/``::

    splits.json     the stored split (same for every trial)
    sweep.json      options of the sweep (for --resume)
    tune/           Ray Tune experiment state (restored by --resume)
    train/<trial>-<stage>/  Ray Train runs, one per trial and plan segment (a fit stage and the
                    map/eval stages after it), deterministic names → a restarted job resumes
    products/       shared stage products (weakbench.platform.products), reused by every trial
                    whose upstream settings agree (a BBAM sweep trains its detector once)
    trials/<trial>/ trial scratch space (checkpoint staging, error.txt)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from weakbench.platform import conventions as C
from weakbench.platform.errors import ConfigError
from weakbench.platform.search_space import SearchSpace, load_search_space


class SweepOptions(BaseModel):
    """Options of :func:`run_sweep` (the CLI's ``weakbench sweep`` flags)."""

    model_config = ConfigDict(extra="forbid")

    space: str = Field(description="search-space YAML file")
    data: str | None = Field(None, description="dataset directory; None = embedded synthetic default")
    output_dir: str = "weakbench_runs"
    tracking_uri: str | None = Field(None, description="MLflow URI; default sqlite:///<output_dir>/mlflow.db")
    experiment: str = C.DEFAULT_EXPERIMENT
    trials: int = Field(4, ge=1, description="total Tune trials (seed repeats included)")
    name: str | None = Field(None, description="sweep name; default <method>-<dataset>-<time>")
    resume: bool = False
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_concurrent: int | None = Field(None, ge=1)
    searcher: Literal["optuna", "random"] = "optuna"
    search_seed: int = 0
    split_seed: int = 0
    executor: Literal["train", "inline"] = "train"
    early_stopping: bool = Field(True, description="use the space file's ASHA scheduler (False: every trial runs all epochs)")
    eval_max_images: int | None = Field(None, ge=1)
    num_overlays: int = Field(6, ge=0)
    log_model: bool = True
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local instance")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed values overriding the space file")


class SweepSummary(BaseModel):
    sweep_name: str
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    method: str
    dataset: str
    num_trials: int
    num_finished: int
    num_failed: int
    num_stopped: int
    wall_seconds: float
    best_run_id: str | None = None
    best_params: dict[str, Any] = Field(default_factory=dict)
    best_metrics: dict[str, float] = Field(default_factory=dict)
    metric: str


class _SweepContext(BaseModel):
    """Static part of every trial's spec, handed to the trial function with ``tune.with_parameters``."""

    method: str
    data: str | None
    data_cache: str
    splits_path: str
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_id: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    executor: str
    eval_max_images: int | None
    num_overlays: int
    log_model: bool
    seed_values: list[int] | None


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trial function: one configuration, one Train run."""
    from ray import tune

    from weakbench.platform.engine import TrialSpec, run_inline_in_tune, run_segments

    c = _SweepContext(**ctx)
    params = dict(config)
    index = params.pop("__trial_index__", None)
    if c.seed_values is not None:
        params["seed"] = c.seed_values[int(index or 0) % len(c.seed_values)]
    trial_id = tune.get_context().get_trial_id()
    spec = TrialSpec(
        method=c.method, params=params, data=c.data, data_cache=c.data_cache, splits_path=c.splits_path,
        trial_dir=str(Path(c.sweep_dir) / "trials" / trial_id), tracking_uri=c.tracking_uri, experiment=c.experiment,
        parent_run_id=c.parent_run_id, sweep_id=c.sweep_id, trial_id=trial_id, run_name=f"{c.method}-{trial_id}",
        num_workers=c.num_workers, use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker,
        eval_max_images=c.eval_max_images, num_overlays=c.num_overlays, log_model=c.log_model,
        products_dir=str(Path(c.sweep_dir) / "products"),
    )
    if c.executor == "inline":
        run_inline_in_tune(spec)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    run_segments(spec, storage_path=str(Path(c.sweep_dir) / "train"), callbacks=[TuneReportCallback()])


def _stage_aware(searcher_cls):
    """``searcher_cls`` ignoring intermediate results that lack the selecting metric: a
    multi-stage trial (BBAM) reports its early stages (the detector's epochs) before the stage
    that computes the metric; its final result always carries it."""

    class StageAware(searcher_cls):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, str) and self.metric not in result:
                return
            super().on_trial_result(trial_id, result)

    StageAware.__name__ = StageAware.__qualname__ = f"StageAware{searcher_cls.__name__}"
    return StageAware


def _plan_units(method: str, params: dict[str, Any], source) -> int:
    """Progress units of one trial's plan (the search space's defaults; ASHA's ``max_t``)."""
    from weakbench.methods import build_method

    m = build_method(method, params, num_classes=source.num_classes, multilabel=source.multilabel)
    return sum(st.units for st in m.plan())


def _latest_sweep(sweeps: Path, method: str) -> Path:
    cands = sorted((p for p in sweeps.glob(f"{method}-*") if (p / "sweep.json").is_file()), key=lambda p: p.stat().st_mtime)
    if not cands:
        raise ConfigError(f"--resume: no earlier {method} sweep in {sweeps}; run without --resume first or pass --name")
    return cands[-1]


def _ensure_ray(opts: SweepOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": True, "log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if opts.address:
        ray.init(address=opts.address, **kwargs)
    else:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), **kwargs)


def prepare_sweep_dir(opts: SweepOptions, space: SearchSpace) -> tuple[Path, str]:
    """Resolve the sweep directory and name (new, or the one to resume)."""
    out = Path(opts.output_dir).resolve()
    sweeps = out / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        sweep_dir = sweeps / opts.name if opts.name else _latest_sweep(sweeps, space.method)
        if not (sweep_dir / "sweep.json").is_file():
            raise ConfigError(f"--resume: {sweep_dir} holds no sweep (sweep.json missing); check --name and --output-dir")
        return sweep_dir, sweep_dir.name
    data_name = Path(opts.data).resolve().name if opts.data else "synthetic"
    name = opts.name or f"{space.method}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = sweeps / name
    if (sweep_dir / "sweep.json").exists():
        raise ConfigError(f"sweep {name!r} already exists in {sweeps}; pass --resume to continue it or another --name (finished results are never overwritten)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir, name


def _with_overrides(space: SearchSpace, overrides: dict[str, Any]) -> SearchSpace:
    """``space`` with command-line ``--set`` values fixed (and dropped from the search)."""
    if not overrides:
        return space
    return space.model_copy(update={"fixed": {**space.fixed, **overrides},
                                    "search": {k: v for k, v in space.search.items() if k not in overrides}})


def run_sweep(opts: SweepOptions) -> SweepSummary:
    """Run (or resume) a sweep; returns its summary. See the module docstring.

    Raises:
        ConfigError / DataError / UnknownNameError: bad input, before any run is created.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from weakbench.methods import validate_config
    from weakbench.platform import tracking
    from weakbench.platform.data import load_splits, make_splits, open_dataset, save_splits

    t0 = time.time()
    # Ray workers run in other working directories: hand them absolute paths
    if opts.data is not None:
        opts = opts.model_copy(update={"data": str(Path(opts.data).expanduser().resolve())})
    space = _with_overrides(load_search_space(opts.space), opts.overrides)
    if opts.overrides:
        validate_config(space.method, space.fixed, source=f"{opts.space} (with command-line overrides)")
    out = Path(opts.output_dir).resolve()
    data_cache = str(out / "data_cache")
    if not opts.resume:  # bad data fails before anything is created
        open_dataset(opts.data, cache_dir=data_cache)
    sweep_dir, sweep_name = prepare_sweep_dir(opts, space)
    if opts.resume:
        saved = json.loads((sweep_dir / "sweep.json").read_text())
        # a resumed sweep keeps everything that shapes its trials and their checkpoints (an inline
        # trial's checkpoint is a Tune checkpoint, a Train trial's a Train one); only where it
        # runs (--address, --num-cpus, --max-concurrent) may change
        for key in ("data", "split_seed", "tracking_uri", "experiment", "trials", "searcher", "search_seed", "overrides",
                    "executor", "num_workers", "use_gpu", "cpus_per_worker", "eval_max_images", "num_overlays",
                    "log_model", "early_stopping"):
            if key in saved:
                setattr(opts, key, saved[key])
        space = _with_overrides(load_search_space(opts.space), opts.overrides)
    tracking_uri = opts.tracking_uri or tracking.default_tracking_uri(out)

    source = open_dataset(opts.data, cache_dir=data_cache)
    splits_path = sweep_dir / "splits.json"
    if splits_path.exists():
        load_splits(splits_path, source)
    else:
        save_splits(make_splits(source, seed=opts.split_seed), splits_path)
    if not opts.resume:
        (sweep_dir / "sweep.json").write_text(json.dumps({**opts.model_dump(), "tracking_uri": tracking_uri, "name": sweep_name}, indent=2))

    client = tracking.client_for(tracking_uri)
    exp_id = tracking.ensure_experiment(client, opts.experiment)
    parent = tracking.get_or_create_parent_run(
        client, exp_id, sweep_name, run_name=sweep_name,
        tags={C.TAG_METHOD: space.method, C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
              C.TAG_SPLIT: "val"},
        params={"space_file": opts.space, "trials": opts.trials, "searcher": opts.searcher, "metric": space.metric,
                "num_workers": opts.num_workers, "executor": opts.executor,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
                **{f"search.{k}": f"{d.kind}{d.values}" for k, d in space.search.items()}})

    status = "FAILED"
    # results of a multi-stage trial's early stages lack the selecting metric (it comes with the
    # stage that computes it); Tune's controller would refuse them. ASHA skips such results and
    # the searcher is wrapped to skip them (_stage_aware)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    try:
        _ensure_ray(opts)
        units = _plan_units(space.method, space.defaults_config(), source)
        grid = space.grid_axes()
        seed_values = [int(s) for s in grid["seed"]] if "seed" in grid else None
        param_space: dict[str, Any] = dict(space.fixed)
        search_alg = None
        num_samples = opts.trials
        if opts.searcher == "optuna":
            import optuna
            from ray.tune.search import Repeater

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" chatter
            from ray.tune.search.optuna import OptunaSearch

            for k, d in space.search.items():
                if k == "seed" and d.kind == "grid":
                    continue
                param_space[k] = tune.choice(list(d.values)) if d.kind == "grid" else d.to_tune()
            search_alg = _stage_aware(OptunaSearch)(metric=space.metric, mode=space.mode,
                                      sampler=optuna.samplers.TPESampler(seed=opts.search_seed))
            if seed_values and len(seed_values) > 1:
                search_alg = Repeater(search_alg, repeat=len(seed_values), set_index=True)
                num_samples = max(1, math.ceil(opts.trials / len(seed_values))) * len(seed_values)
            elif seed_values:
                param_space["seed"] = seed_values[0]
                seed_values = None
        else:
            seed_values = None
            param_space.update(space.tune_param_space())
            num_samples = max(1, math.ceil(opts.trials / space.num_grid_points()))
        # ASHA's clock is the plan's progress units (fit epochs + one per map/eval stage), so it
        # means the same across stages; the plan's last report (progress == max_t) comes after
        # the trial's run is FINISHED
        scheduler = (ASHAScheduler(time_attr="progress", max_t=units, grace_period=min(space.asha.grace_period, units),
                                   reduction_factor=space.asha.reduction_factor)
                     if space.asha and opts.early_stopping else FIFOScheduler())

        per_trial_cpu = opts.num_workers * opts.cpus_per_worker
        total_cpu = ray.cluster_resources().get("CPU", 1)
        need = per_trial_cpu + (0.0 if opts.executor == "inline" else 0.01)
        if need > total_cpu + 1e-9:
            raise ConfigError(f"one trial needs {need:g} CPUs ({opts.num_workers} worker(s) × {opts.cpus_per_worker:g}"
                              f"{' + 0.01 for the trial function' if opts.executor != 'inline' else ''}) but the Ray cluster has "
                              f"{total_cpu:g}; lower --num-workers or --cpus-per-worker, raise --num-cpus, or use --executor inline")
        if opts.use_gpu and opts.num_workers > ray.cluster_resources().get("GPU", 0):
            raise ConfigError(f"--gpu asks for {opts.num_workers} GPU(s) per trial but the Ray cluster has "
                              f"{ray.cluster_resources().get('GPU', 0):g}; run on a GPU cluster (--address) or drop --gpu")
        # the Train executor's trial function holds 0.01 CPU beside its workers: count it, or the
        # last trial's workers wait for a CPU inside Train (and time out) instead of in Tune's queue
        overhead = 0.0 if opts.executor == "inline" else 0.01
        max_conc = opts.max_concurrent or max(1, int(total_cpu // (per_trial_cpu + overhead)))
        trial_resources = {"cpu": opts.cpus_per_worker} if opts.executor == "inline" else {"cpu": 0.01}
        ctx = _SweepContext(method=space.method, data=opts.data, data_cache=data_cache, splits_path=str(splits_path),
                            sweep_dir=str(sweep_dir), tracking_uri=tracking_uri, experiment=opts.experiment,
                            parent_run_id=parent, sweep_id=sweep_name, num_workers=opts.num_workers,
                            use_gpu=opts.use_gpu, cpus_per_worker=opts.cpus_per_worker, executor=opts.executor,
                            eval_max_images=opts.eval_max_images, num_overlays=opts.num_overlays,
                            log_model=opts.log_model, seed_values=seed_values).model_dump()
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), trial_resources)
        tune_path = sweep_dir / "tune"
        if opts.resume and tune.Tuner.can_restore(str(tune_path)):
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                                            num_samples=num_samples, max_concurrent_trials=max_conc),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.reconcile_children(client, exp_id, parent)
        runs = tracking.child_runs(client, exp_id, parent)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        failed = [r for r in runs if r.info.status == "FAILED"]
        killed = [r for r in runs if r.info.status == "KILLED"]
        if status == "FINISHED" and not finished:
            status = "FAILED"
        best = None
        key = space.metric
        cands = [r for r in finished if key in r.data.metrics]
        if cands:
            best = (max if space.mode == "max" else min)(cands, key=lambda r: r.data.metrics[key])
            tracking.log_metrics(client, parent, {f"best/{k}": v for k, v in best.data.metrics.items()}, step=0)
            client.set_tag(parent, "weakbench.best_run_id", best.info.run_id)
        client.set_terminated(parent, status=status)
    summary = SweepSummary(
        sweep_name=sweep_name, sweep_dir=str(sweep_dir), tracking_uri=tracking_uri, experiment=opts.experiment,
        parent_run_id=parent, method=space.method, dataset=source.name, num_trials=len(runs),
        num_finished=len(finished), num_failed=len(failed), num_stopped=len(killed), wall_seconds=time.time() - t0,
        best_run_id=best.info.run_id if best else None, best_params=dict(best.data.params) if best else {},
        best_metrics=dict(best.data.metrics) if best else {}, metric=space.metric)
    return summary
