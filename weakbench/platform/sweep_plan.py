"""Planning a sweep: what it will run, decided without Ray (issue #17, "plan → launch → reconcile").

:func:`plan_sweep` turns the search space (after ``--set`` overrides), the sweep's options, the
plan's progress units and the cluster's resources into a :class:`SweepPlan`: a plain, JSON-
serialisable record of the parameter space (fixed values and searched axes as
:class:`~weakbench.platform.search_space.Distribution` data), the searcher, the seed repeats, the
scheduler, the resources of one trial and how many trials run at once. The Ray adapter
(:mod:`weakbench.platform.launch`) builds Tune's objects from it; the driver records it in the
sweep's ``state.json`` (:mod:`weakbench.platform.sweep_state`), which ``weakbench status`` reads.

Nothing here imports Ray (``tests/test_sweep_plan.py`` imports this module in a fresh interpreter
and checks ``sys.modules``; the import-linter contract ``plan-without-ray`` in ``pyproject.toml``
forbids it): a plan can be made, checked and printed (``weakbench sweep --dry-run``) on a laptop.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from weakbench.core.errors import ConfigError
from weakbench.platform.run_spec import SweepOptions
from weakbench.platform.search_space import Distribution, SearchSpace, load_search_space

#: config keys that distinguish seed repeats of one configuration (and the id with which
#: ``--resume`` replays a recorded trial, :data:`weakbench.platform.sweep_state.TRIAL_ID_KEY`)
REPEAT_KEYS = ("seed", "__trial_index__", "__trial_id__")

def configuration_key(config: dict[str, Any]) -> str:
    """A stable key of ``config`` without its seed (``REPEAT_KEYS``): equal for the seed repeats
    of one configuration, different otherwise."""
    return json.dumps({k: config[k] for k in sorted(config) if k not in REPEAT_KEYS}, sort_keys=True, default=repr)


def ray_address(opts: SweepOptions) -> str | None:
    """The Ray cluster a sweep joins: ``--address`` (``auto``, ``local`` or an address), else the
    environment variable ``RAY_ADDRESS``, else None (a private local instance). The one rule
    every part of the driver reads."""
    return opts.address or os.environ.get("RAY_ADDRESS") or None


def resolve_executor(opts: SweepOptions) -> Literal["train", "inline"]:
    """The executor a sweep runs: ``opts.executor``, with ``"auto"`` resolved to ``"inline"`` for
    one-worker CPU trials (the Train executor would add a controller and a worker process per
    trial and nothing a single worker uses) and to ``"train"`` for DDP or GPU trials.

    A one-worker trial holding a share of a GPU (``gpus_per_trial``) runs inline too.

    Raises:
        ConfigError: ``"inline"`` with several workers or a whole GPU (names the flags and the fix).
    """
    share = opts.gpus_per_trial is not None
    if opts.executor == "auto":
        return "inline" if opts.num_workers == 1 and (share or not opts.use_gpu) else "train"
    if opts.executor == "inline" and (opts.num_workers != 1 or (opts.use_gpu and not share)):
        raise ConfigError(f"--executor inline runs one CPU worker per trial, but --num-workers is {opts.num_workers}"
                          f"{' and --gpu is set' if opts.use_gpu else ''}; use --executor train (or auto) for DDP or GPUs")
    return opts.executor  # type: ignore[return-value]


def check_gpu_request(opts: SweepOptions, *, cuda_visible: bool | None = None) -> None:
    """Refuse, before anything is created, a GPU request that cannot be placed.

    * ``--gpus-per-trial G`` shares one GPU among one-worker trials: ``0 < G <= 1``, one worker,
      the inline executor (``auto`` picks it); a DDP trial holds one whole GPU per worker
      (``--gpu --num-workers N``).
    * ``--gpu`` or ``--gpus-per-trial`` on a private local Ray instance (no ``--address``, no
      ``RAY_ADDRESS``, or ``--address local``) where no GPU is visible (``cuda_visible``, default
      ``torch.cuda.is_available()``). On a cluster named by ``--address`` the cluster's GPUs are
      checked once connected (:func:`trial_placement`).

    Raises:
        ConfigError: one line naming the flags and the fix.
    """
    g = opts.gpus_per_trial
    if g is not None:
        if g > 1:
            raise ConfigError(f"--gpus-per-trial {g:g}: a trial shares at most one GPU (0 < G <= 1); for several GPUs "
                              f"per trial use DDP: --gpu --num-workers N (one whole GPU per worker)")
        if opts.num_workers != 1:
            raise ConfigError(f"--gpus-per-trial {g:g} shares a GPU among one-worker trials, but --num-workers is "
                              f"{opts.num_workers}: DDP trials hold one whole GPU per worker; drop --gpus-per-trial "
                              f"and pass --gpu --num-workers {opts.num_workers}")
        if opts.executor == "train":
            raise ConfigError(f"--gpus-per-trial {g:g} runs one-worker trials inline, in their Tune trial actor; drop "
                              f"--executor train (or pass --executor auto), or pass --gpu for one whole GPU per Train "
                              f"worker")
    if not (opts.use_gpu or g is not None):
        return
    local = ray_address(opts) in (None, "local")
    if cuda_visible is None:
        import torch

        cuda_visible = torch.cuda.is_available()
    if local and not cuda_visible:
        flag = "--gpus-per-trial" if g is not None else "--gpu"
        raise ConfigError(f"{flag}: no GPU is visible on this machine (torch.cuda.is_available() is False, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); drop {flag} to "
                          f"train on the CPU, or pass --address of a Ray cluster with GPUs")


def trial_placement(opts: SweepOptions, executor: str, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """The Tune resources of one trial and how many trials run at once, on a cluster with
    ``cluster`` resources (``ray.cluster_resources()``: ``{"CPU": n, "GPU": m, ...}``).

    * inline: the trial actor holds the worker's CPUs, plus ``{"gpu": G}`` with ``--gpus-per-trial
      G`` (Ray's fractional resources: four trials of 0.25 share one GPU, each process sees it
      through ``CUDA_VISIBLE_DEVICES``);
    * train: the trial function holds 0.01 CPU; its ``TorchTrainer`` workers hold
      ``cpus_per_worker`` CPUs and, with ``--gpu``, one whole GPU each.

    Concurrency (unless ``--max-concurrent``) is what the CPUs allow, and with GPUs also what the
    GPUs allow (``floor(GPUs / G)``).

    Raises:
        ConfigError: one trial needs more CPUs or GPUs than the cluster has (names the fix).
    """
    per_trial_cpu = opts.num_workers * opts.cpus_per_worker
    total_cpu = cluster.get("CPU", 1)
    # the Train executor's trial function holds 0.01 CPU beside its workers: count it, or the
    # last trial's workers wait for a CPU inside Train (and time out) instead of in Tune's queue
    overhead = 0.0 if executor == "inline" else 0.01
    need = per_trial_cpu + overhead
    if need > total_cpu + 1e-9:
        raise ConfigError(f"one trial needs {need:g} CPUs ({opts.num_workers} worker(s) × {opts.cpus_per_worker:g}"
                          f"{' + 0.01 for the trial function' if executor != 'inline' else ''}) but the Ray cluster has "
                          f"{total_cpu:g}; lower --num-workers or --cpus-per-worker, raise --num-cpus, or use --executor inline")
    total_gpu = cluster.get("GPU", 0)
    gpus = opts.gpus_per_trial if opts.gpus_per_trial is not None else (opts.num_workers if opts.use_gpu else 0)
    if gpus and gpus > total_gpu + 1e-9:
        flag = f"--gpus-per-trial {gpus:g}" if opts.gpus_per_trial is not None else "--gpu"
        raise ConfigError(f"{flag} asks for {gpus:g} GPU(s) per trial but the Ray cluster has {total_gpu:g}; run on a "
                          f"GPU cluster (--address) or drop {flag.split()[0]}")
    max_conc = opts.max_concurrent or max(1, int(total_cpu // need))
    if gpus and not opts.max_concurrent:
        max_conc = max(1, min(max_conc, int(total_gpu / gpus + 1e-9)))
    if executor == "inline":
        resources = {"cpu": opts.cpus_per_worker, **({"gpu": gpus} if gpus else {})}
    else:
        resources = {"cpu": 0.01}
    return resources, max_conc


def with_overrides(space: SearchSpace, overrides: dict[str, Any]) -> SearchSpace:
    """``space`` with command-line ``--set`` values fixed (and dropped from the search)."""
    if not overrides:
        return space
    return space.model_copy(update={"fixed": {**space.fixed, **overrides},
                                    "search": {k: v for k, v in space.search.items() if k not in overrides}})


def planned_trials(space: SearchSpace, opts: SweepOptions) -> int:
    """How many trials a sweep of ``space`` with ``opts`` plans, by :func:`plan_sweep`'s rule: every
    axis fixed → once per seed; Optuna → ``--trials`` rounded up to whole seed repeats; random/grid
    → ``--trials`` rounded up to whole passes over the grid points."""
    return _search(space, opts)["num_planned"]


class AshaSpec(BaseModel):
    """ASHA over configurations (:class:`weakbench.platform.launch.ConfigurationASHA`): its clock is
    the plan's progress units (fit epochs + one per map/eval stage), so it means the same across
    stages; the plan's last report (``progress == max_t``) comes after the trial's run is FINISHED."""

    time_attr: str = "progress"
    max_t: int
    grace_period: int
    reduction_factor: float


class SweepPlan(BaseModel):
    """What a sweep runs, as plain data (see the module docstring); made by :func:`plan_sweep`.

    ``fixed`` plus ``axes`` is Tune's parameter space (an axis of kind ``grid`` is crossed by
    Tune's variant generator, any other is sampled); ``searcher`` is ``"optuna"`` (TPE seeded with
    ``search_seed``, over ``axes``; each suggestion repeated once per value of ``seed_values`` when
    it holds two or more) or ``"variants"`` (Tune's own ``BasicVariantGenerator``: grid, random and
    all-fixed sweeps). ``num_samples`` is Tune's; ``num_planned`` the trials it makes."""

    method: str
    metric: str = Field(description="the selecting validation metric, e.g. val/max_box_acc_v2")
    mode: Literal["max", "min"]
    fixed: dict[str, Any]
    axes: dict[str, Distribution]
    searched: list[str] = Field(description="the searched axes as the space file names them (seed last)")
    searcher: Literal["optuna", "variants"]
    search_seed: int
    seed_values: list[int] | None = Field(
        description="the seed grid axis a trial's repeat index picks from (Optuna's repeats); None: the seed, if any, "
                    "is in the configuration")
    num_samples: int = Field(ge=1)
    num_planned: int = Field(ge=1)
    scheduler: AshaSpec | None = Field(description="None: every trial runs to its end (FIFO)")
    units: int = Field(ge=1, description="progress units of one trial's plan (the search space's defaults)")
    executor: Literal["inline", "train"]
    resources: dict[str, float] = Field(description="Tune resources of one trial (lower-case keys: cpu, gpu)")
    max_concurrent: int = Field(ge=1)
    reuse_actors: bool
    max_failures: int
    keep_checkpoints: bool


def plan_units(method: str, params: dict[str, Any], source) -> int:
    """Progress units of one trial's plan under ``params`` (ASHA's ``max_t``): the sum of its
    stages' units (fit epochs + one per map/eval stage) for dataset ``source``."""
    from weakbench.methods import build_method

    m = build_method(method, params, num_classes=source.num_classes, multilabel=source.multilabel)
    return sum(st.units for st in m.plan())


def _search(space: SearchSpace, opts: SweepOptions) -> dict[str, Any]:
    """The search part of :func:`plan_sweep`'s plan (the one rule for how many trials a sweep makes)."""
    grid = space.grid_axes()
    seeds = [int(s) for s in grid["seed"]] if "seed" in grid else None
    fixed: dict[str, Any] = dict(space.fixed)
    axes: dict[str, Distribution] = {}
    seed_values: list[int] | None = None
    searcher: Literal["optuna", "variants"] = "variants"
    if not [k for k in space.search if k != "seed"]:
        if seeds:
            axes["seed"] = Distribution(kind="grid", values=seeds)
        num_samples, num_planned = 1, len(seeds or [0])
    elif opts.searcher == "optuna":
        searcher = "optuna"
        for k, d in space.search.items():
            if k == "seed" and d.kind == "grid":
                continue
            axes[k] = Distribution(kind="choice", values=list(d.values)) if d.kind == "grid" else d
        num_samples = opts.trials
        if seeds and len(seeds) > 1:
            seed_values = seeds
            num_samples = max(1, math.ceil(opts.trials / len(seeds))) * len(seeds)
        elif seeds:
            fixed["seed"] = seeds[0]
        num_planned = num_samples
    else:
        axes = dict(space.search)
        num_samples = max(1, math.ceil(opts.trials / space.num_grid_points()))
        num_planned = num_samples * space.num_grid_points()
    return dict(fixed=fixed, axes=axes, seed_values=seed_values, searcher=searcher, num_samples=num_samples,
                num_planned=num_planned)


def plan_sweep(space: SearchSpace, opts: SweepOptions, *, units: int, cluster: dict[str, float]) -> SweepPlan:
    """The plan of a sweep of ``space`` (``--set`` overrides applied, :func:`with_overrides`) run with
    ``opts`` (executor resolved) on a cluster with ``cluster`` resources (``{"CPU": n, "GPU": m}``);
    ``units``: progress units of one trial (ASHA's ``max_t``).

    * every axis fixed (by the file or by ``--set``): nothing to search (Optuna refuses an empty
      space); the fixed configuration runs once per seed (a ``grid`` seed axis);
    * ``--searcher optuna``: sampled axes as they are, grid axes other than ``seed`` as categorical
      choices; the seed grid axis repeats each suggestion once per seed (Tune's ``Repeater``;
      ``--trials`` rounded up to whole repeats), a single seed is fixed;
    * ``--searcher random``: Tune's variant generator crosses the grid axes and samples the others,
      ``--trials`` rounded up to whole passes over the grid points.

    Raises:
        ConfigError: one trial needs more CPUs or GPUs than ``cluster`` has (:func:`trial_placement`).
    """
    search = _search(space, opts)
    scheduler = (AshaSpec(max_t=units, grace_period=min(space.asha.grace_period, units),
                          reduction_factor=space.asha.reduction_factor)
                 if space.asha and opts.early_stopping else None)
    executor = resolve_executor(opts)
    resources, max_conc = trial_placement(opts, executor, cluster)
    return SweepPlan(method=space.method, metric=space.metric, mode=space.mode, **search,
                     searched=[k for k in space.search if k != "seed"] + (["seed"] if "seed" in space.search else []),
                     search_seed=opts.search_seed, scheduler=scheduler, units=units, executor=executor, resources=resources,
                     max_concurrent=max_conc, reuse_actors=executor == "inline", max_failures=opts.max_failures,
                     keep_checkpoints=opts.keep_checkpoints)


def describe_sweep(opts: SweepOptions) -> list[dict[str, str]]:
    """What ``weakbench sweep`` would run, resolved and validated but started nothing (no Ray, no
    MLflow run, no sweep directory): one record (``section``, ``key``, ``value``) per fixed value
    (``--set`` marked), per searched distribution, the planned trials, searcher, scheduler,
    executor and resources, data and tracking.

    Raises:
        ConfigError / UnknownNameError: the space file or a ``--set`` value is refused, as the sweep would.
    """
    from weakbench.methods import validate_config
    from weakbench.platform.tracking import default_tracking_uri

    space = with_overrides(load_search_space(opts.space), opts.overrides)
    validate_config(space.method, space.defaults_config(), source=f"{opts.space} (with command-line overrides)")
    executor = resolve_executor(opts)
    rows = [{"section": "space", "key": "file", "value": str(opts.space)},
            {"section": "space", "key": "method", "value": space.method},
            {"section": "space", "key": "metric", "value": f"{space.metric} ({space.mode}), selected on val"}]
    rows += [{"section": "fixed", "key": k, "value": f"{v}{'  (--set)' if k in opts.overrides else ''}"}
             for k, v in space.fixed.items()]
    rows += [{"section": "search", "key": k, "value": f"{d.kind} {d.values}"} for k, d in space.search.items()]
    asha = (f"ASHA (grace period {space.asha.grace_period}, reduction factor {space.asha.reduction_factor:g}) on "
            f"configurations" if space.asha and opts.early_stopping else
            "none" + (" (--no-early-stopping)" if space.asha else ""))
    searcher = f"{opts.searcher} (seed {opts.search_seed})" if opts.searcher == "optuna" else "random (grid axes crossed)"
    trial = (f"{opts.num_workers} worker(s) × {opts.cpus_per_worker:g} CPU" + (", 1 GPU each" if opts.use_gpu else ""))
    rows += [{"section": "run", "key": "trials planned", "value": f"{planned_trials(space, opts)} (--trials {opts.trials}; "
                                                                   f"{space.num_grid_points()} grid point(s))"},
             {"section": "run", "key": "searcher", "value": searcher},
             {"section": "run", "key": "scheduler", "value": asha},
             {"section": "run", "key": "executor", "value": executor + (" (auto)" if opts.executor == "auto" else "")},
             {"section": "run", "key": "per trial", "value": trial},
             {"section": "run", "key": "at once", "value": str(opts.max_concurrent) if opts.max_concurrent else
                                                          "as many as the cluster's CPUs allow"},
             {"section": "run", "key": "Ray", "value": ray_address(opts) or
                                                      f"a private local instance ({opts.num_cpus or os.cpu_count()} CPUs)"},
             {"section": "data", "key": "data", "value": opts.data or "the embedded synthetic default"},
             {"section": "data", "key": "classes", "value": (f"{opts.classes} (--classes)" if opts.classes else
                                                            f"{space.classes} (the space file's classes)" if space.classes
                                                            else "every class of the dataset")},
             {"section": "data", "key": "split seed", "value": str(opts.split_seed)},
             {"section": "tracking", "key": "output dir", "value": str(Path(opts.output_dir).resolve())},
             {"section": "tracking", "key": "MLflow", "value": opts.tracking_uri or
                                                              default_tracking_uri(opts.output_dir, create=False)},
             {"section": "tracking", "key": "experiment", "value": opts.experiment}]
    return rows
