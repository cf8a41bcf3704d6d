"""Hyperparameter sweeps on Ray Tune (Train V2 pattern) with Optuna and ASHA.

Each Tune trial is a plain function (:func:`_trial`). Executors (:func:`resolve_executor`):

* ``"inline"``: a one-worker CPU trial trains inside the trial function, holding
  ``cpus_per_worker`` CPUs and reporting to Tune directly; Tune reuses the trial actor (a process
  that has imported torch and MLflow) for the next trial (``reuse_actors``);
* ``"train"``: the trial function builds a ``TorchTrainer`` per plan segment and fits it, with
  ``TuneReportCallback`` forwarding the workers' reports to Tune (Ray ≥ 2.51: ``Tuner(trainer)``
  is deprecated); the trial function itself holds only ``{"cpu": 0.01}`` so that the Train
  workers get the CPUs (a ``{"cpu": 0}`` request is refused by Ray). Each trial starts a Train
  controller and its workers, fresh processes: ~15-20 s per trial on a 2-core machine
  (``benchmarks/bench_sweep_overhead.py``), so it is for DDP and GPU trials;
* ``"auto"`` (the default): ``inline`` for one worker without GPU, ``train`` otherwise.

Search: ``OptunaSearch`` (TPE, seeded) over the sampled axes; the ``seed`` grid axis is realised
with Tune's ``Repeater`` (each suggested configuration is run once per seed and Optuna sees the
mean), other grid axes become categorical choices for Optuna. ``searcher="random"`` uses Tune's
own variant generator, where grid axes are crossed natively. ASHA over configurations
(:class:`weakbench.platform.schedulers.ConfigurationASHA`, time attribute ``progress``) stops poor
configurations early, all their seed repeats together.

Layout of a sweep directory ``<output>/sweeps/<sweep name>/``::

    splits.json     the stored split (same for every trial)
    sweep.json      options of the sweep (for --resume)
    state.json      the driver's record of what happened (weakbench.platform.sweep_state): every
                    trial's id and configuration before it starts, its outcome from Tune's events,
                    the driver's heartbeat; the sweep's outcome and --resume's re-attaching read it
    tune/           Ray Tune experiment state (restored by --resume)
    train/<trial>-<stage>/  Ray Train runs, one per trial and plan segment (a fit stage and the
                    map/eval stages after it), deterministic names → a restarted job resumes
    products/       shared stage products (weakbench.platform.products), reused by every trial
                    whose upstream settings agree (a BBAM sweep trains its detector once)
    trials/<trial>/ trial scratch space (checkpoint staging, error.txt)

What stays once a trial finishes (unless ``--keep-checkpoints``): its model in MLflow (the final
weights, once), its small final checkpoint cursor, Tune's state; Tune and Train keep only each
trial's latest checkpoint (what a restart needs), and a finished trial's epoch checkpoints, private
products and Train checkpoints are removed (:meth:`weakbench.platform.engine._Runner.finish`,
:func:`_remove_train_checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from weakbench.core import conventions as C
from weakbench.core.errors import ConfigError, DivergenceError, WeakbenchError, check_finite, is_finite_metrics
from weakbench.platform.run_spec import SweepOptions, resumed_options, trial_fields  # noqa: F401 - SweepOptions: this module's API too
from weakbench.platform.search_space import SearchSpace, load_search_space


class SweepSummary(BaseModel):
    """What a sweep did. Counts come from the driver's record of Tune's events (errors, completions,
    the scheduler's decisions, :mod:`weakbench.platform.sweep_state`) reconciled with MLflow: a
    trial whose retries are exhausted is failed even when it never created a run (one is created
    FAILED); "stopped early" is the scheduler's decision only."""

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
    num_planned: int = 0
    num_restarts: int = 0
    interrupted: bool = False
    interrupt_signal: int = Field(2, description="the signal that interrupted the sweep (2 SIGINT, 15 SIGTERM)")
    warnings: list[str] = Field(default_factory=list, description="what the driver could not record (printed on stderr)")

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 128 + the signal when interrupted (130 for SIGINT / Ctrl-C, 143
        for SIGTERM); 0 when every planned trial finished or was stopped early by the scheduler
        (ASHA) and at least one finished; 1 otherwise (a trial failed, a planned trial never ran, or
        no trial finished)."""
        if self.interrupted:
            return 128 + self.interrupt_signal
        if self.num_finished == 0 or self.num_failed or self.num_finished + self.num_stopped < self.num_planned:
            return 1
        return 0


class _SweepContext(BaseModel):
    """Static part of every trial's spec, handed to the trial function with ``tune.with_parameters``:
    the sweep's options as it runs them (after ``--resume``, with the tracking URI and the executor
    resolved) and what the sweep made for its trials."""

    opts: SweepOptions
    method: str
    data_cache: str = Field(description="where the synthetic default is generated")
    splits_path: str = Field(description="the sweep's splits.json")
    sweep_dir: str
    parent_run_id: str
    sweep_id: str
    seed_values: list[int] | None = Field(description="the seed grid axis the trial index picks from (Repeater); None: "
                                                      "the seed, if any, is in the configuration")

    def trial_fields(self) -> dict[str, Any]:
        """The TrialSpec keyword arguments every trial of the sweep shares: the per-trial options
        (:func:`weakbench.platform.run_spec.trial_fields`) and the sweep's method, data cache,
        split, parent run, sweep id and products directory."""
        return {**trial_fields(self.opts), "method": self.method, "data_cache": self.data_cache,
                "splits_path": self.splits_path, "parent_run_id": self.parent_run_id, "sweep_id": self.sweep_id,
                "products_dir": str(Path(self.sweep_dir) / "products")}


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
    local = opts.address == "local" or (opts.address is None and not os.environ.get("RAY_ADDRESS"))
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


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trial function: one configuration, one Train run."""
    from ray import tune

    from weakbench.platform.engine import TrialSpec, run_inline_in_tune, run_segments

    from weakbench.platform.sweep_state import TRIAL_ID_KEY
    from weakbench.platform.tune_record import end_on_local_fault

    c = _SweepContext(**ctx)
    params = dict(config)
    index = params.pop("__trial_index__", None)
    # a trial --resume replays keeps its recorded id: its MLflow run and its checkpoints are found by it
    trial_id = str(params.pop(TRIAL_ID_KEY, None) or tune.get_context().get_trial_id())
    if c.seed_values is not None:
        params["seed"] = c.seed_values[int(index or 0) % len(c.seed_values)]
    spec = TrialSpec(**c.trial_fields(), params=params, trial_dir=str(Path(c.sweep_dir) / "trials" / trial_id),
                     trial_id=trial_id, run_name=f"{c.method}-{trial_id}")
    try:
        if c.opts.executor == "inline":
            run_inline_in_tune(spec)
            return
        from ray.tune.integration.ray_train import TuneReportCallback

        run_segments(spec, storage_path=str(Path(c.sweep_dir) / "train"), callbacks=[TuneReportCallback()],
                     max_failures=c.opts.max_failures)
    except Exception as e:
        # a full disk, a read-only file system, a missing file: a retry on the same storage fails
        # the same way, so the trial ends here (Tune retries only what raises) and the driver
        # records it failed with this error (the engine has already ended its run FAILED)
        end_on_local_fault(e)
        return
    if not c.opts.keep_checkpoints:  # run_segments returned: the trial finished
        _remove_train_checkpoints(Path(c.sweep_dir) / "train", trial_id)


def _remove_train_checkpoints(train_dir: Path, trial_id: str) -> None:
    """Remove the Ray Train checkpoints of a finished trial's jobs (``train/<trial>-<stage>/``):
    its run is FINISHED and its model in MLflow, so a restart returns at once without them."""
    import shutil

    for d in train_dir.glob(f"{trial_id}-*"):
        for ckpt in d.glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)


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
    from weakbench.platform.sweep_state import started_sweeps

    cands = started_sweeps(sweeps, f"{method}-*")
    if not cands:
        raise ConfigError(f"--resume: no earlier {method} sweep in {sweeps}; run without --resume first or pass --name")
    return cands[-1]


def _running_ray_instances() -> list[str]:
    """GCS addresses of the Ray instances running on this machine (any user): Ray's own discovery
    of live ``gcs_server`` processes (not ``ray start``'s address file, which outlives its cluster)."""
    from ray._private import services

    services.find_gcs_addresses.cache_clear()  # Ray caches a non-empty answer for the process's lifetime
    return sorted(set(services.find_gcs_addresses()))


def _recorded_ray_cluster(running: list[str]) -> str | None:
    """The cluster ``ray start`` recorded on this machine (Ray's address file,
    ``/tmp/ray/ray_current_cluster``) when it is one of the ``running`` instances, else None."""
    from ray._private import utils

    recorded = utils.read_ray_address()
    if not recorded:
        return None
    port = recorded.rsplit(":", 1)[-1]
    return next((a for a in running if a == recorded or a.rsplit(":", 1)[-1] == port), None)


def _check_ray_target(opts: SweepOptions) -> None:
    """Refuse, before anything is created, a sweep without ``--address`` (nor ``RAY_ADDRESS``) only
    where Ray's own default would be ambiguous.

    The rule is Ray's: ``ray.init()`` with no address joins ``RAY_ADDRESS``, else the cluster the
    last ``ray start`` recorded on this machine, else starts a private instance; it never joins an
    instance that another driver started with ``ray.init()`` (another weakbench sweep, a notebook).
    So beside such instances this sweep starts its own private one. A live ``ray start`` cluster is
    the case Ray would join and weakbench (private by default) would not: the sweep asks which.
    """
    import ray

    if ray.is_initialized() or opts.address or os.environ.get("RAY_ADDRESS"):
        return
    running = _running_ray_instances()
    started = _recorded_ray_cluster(running)
    if started:
        raise ConfigError(f"a Ray cluster started with `ray start` runs on this machine ({started}); pass --address auto "
                          f"(or --address {started}) to run the sweep on it, or --address local to start a "
                          f"private instance beside it")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_ray(opts: SweepOptions) -> None:
    """Connect this driver to Ray: ``--address ADDR|auto`` (or ``RAY_ADDRESS``) joins a cluster;
    ``--address local``, or no address, starts a private local instance of ``--num-cpus``, beside
    any other driver's instance (:func:`_check_ray_target` refuses only where a ``ray start``
    cluster runs here, which Ray itself would join).

    Ray's State API (served by the head's dashboard) must answer on the head node for the Train
    executor: Ray Train's ``PlacementGroupCleaner`` (a detached actor on the head) asks it whether a
    trial's Train controller still lives, and removes the worker group's placement group when it
    does not. Tune kills a trial's actor, and the controller it owns, when it stops the trial (ASHA,
    or at its last report, ``progress == max_t``) before the controller has released that group; a
    placement group outlives its creator actor, so without the cleaner the CPUs stay reserved and
    the next trial waits for them forever. The cleaner finds the State API by discovering "the" Ray
    instance of its machine, which fails when several run there ("Found multiple active Ray
    instances") or names another one; so this driver tells every process of the job where it is:
    ``RAY_ADDRESS`` (a cluster) or ``RAY_API_SERVER_ADDRESS`` (a local instance, whose dashboard gets
    a free port rather than 8265, which another instance may hold). A local instance for the
    inline executor starts without a dashboard: none of its trials asks the State API.

    Raises:
        ConfigError: no ``--address`` while a ``ray start`` cluster runs on this machine (Ray's
            default would join it, weakbench's would not: the user says which);
            ``--num-cpus`` with a cluster address; no State API on the cluster's head (Train
            executor).
    """
    import ray

    if ray.is_initialized():
        return
    executor = resolve_executor(opts)
    # Ray Train's controller reads this in its own process: a bounded wait for a worker group
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{opts.worker_start_timeout_s:g}"}
    kwargs: dict[str, Any] = {"include_dashboard": True, "log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        if opts.num_cpus is not None:
            raise ConfigError(f"--num-cpus {opts.num_cpus} sizes a local Ray instance, but --address {address} joins a "
                              f"cluster that has its own CPUs; drop --num-cpus (or use --address local)")
        if "://" not in address:  # not a Ray Client address: pin the cluster for State API calls
            from ray._private import services

            try:
                address = services.canonicalize_bootstrap_address_or_die(address)
            except (ConnectionError, ValueError) as e:
                raise ConfigError(f"--address {opts.address or address}: {e}") from None
            env["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    else:
        _check_ray_target(opts)
        local: dict[str, Any] = {}
        if executor == "inline":  # nothing asks the State API: no dashboard to start (1-3 s of start-up)
            kwargs["include_dashboard"] = False
        else:
            port = _free_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            local = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        os.environ.update(env)  # inherited by the local instance's raylet and workers
        ray.init(address="local", num_cpus=opts.num_cpus or os.cpu_count(), **local, **kwargs)
    if executor != "inline":
        _check_state_api(address if address and address != "local" else "the local Ray instance")


def _check_state_api(where: str, timeout_s: float = 120.0) -> None:
    """Ask Ray's State API from the head node, as Train's placement-group cleaner does; refuse the
    sweep (ConfigError) when it does not answer. See :func:`_ensure_ray`."""
    import ray
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    @ray.remote(num_cpus=0, resources={HEAD_NODE_RESOURCE_NAME: 0.001}, max_retries=0)
    def probe() -> int:
        from ray.util.state import list_nodes

        return len(list_nodes(limit=10, timeout=10, raise_on_missing_output=False))

    from ray._private import ray_constants
    from ray.experimental import internal_kv

    def refuse(reason: str):
        ray.shutdown()
        return ConfigError(
            f"{where}: Ray's State API (the head node's dashboard) does not answer on its head node ({reason[:300]}). "
            f"Ray Train frees the CPUs of a trial that Tune stopped through it; without it they stay reserved and later "
            f"trials wait forever. Start the head with `ray start --head --include-dashboard=true --dashboard-port=<free "
            f"port>` (needs ray[default]), or use --executor inline")

    # no dashboard registered at all: say so soon (the State API client would retry for 40 s); a
    # local instance's dashboard may register a moment after ray.init returns
    deadline = time.time() + 20
    while internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD) is None:
        if time.time() > deadline:
            raise refuse("no dashboard is registered in the cluster") from None
        time.sleep(1)
    ref = probe.remote()
    try:
        ray.get(ref, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure means the cleaner would fail the same way
        ray.cancel(ref, force=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise refuse(reason) from None


def select_best_run(runs: list, metric: str, mode: str):
    """The run the sweep reports as best, by the one selection rule
    (:func:`weakbench.platform.selection.select`): among ``runs`` (MLflow runs) that logged
    ``metric`` and whose metrics are all finite, the configuration with the best mean over its
    seeds in ``mode`` ("max" or "min"), and its best run (ties: the run that started first, then
    the smaller run id) — the configuration the board and ``register`` name, and the run
    ``register`` registers. None when no run qualifies."""
    from weakbench.platform.results import config_group
    from weakbench.platform.selection import Candidate, select

    cands = [Candidate(r, config_group(r.data.params), r.data.tags.get(C.TAG_SEED, r.data.params.get("seed")),
                       float(r.data.metrics[metric]), (r.info.start_time or 0, r.info.run_id))
             for r in runs if metric in r.data.metrics and is_finite_metrics(r.data.metrics)]
    out = select(cands, mode == "max")
    return out[1].ref if out else None


def resume_target(opts: SweepOptions, method: str) -> Path:
    """The sweep directory ``--resume`` continues: ``--name``'s, else the latest ``method`` sweep
    under ``<output-dir>/sweeps`` (creates nothing; ConfigError when there is none)."""
    sweeps = Path(opts.output_dir).resolve() / "sweeps"
    return sweeps / opts.name if opts.name else _latest_sweep(sweeps, method)


def prepare_sweep_dir(opts: SweepOptions, space: SearchSpace) -> tuple[Path, str]:
    """Resolve the sweep directory and name (new, or the one to resume)."""
    out = Path(opts.output_dir).resolve()
    sweeps = out / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        sweep_dir = resume_target(opts, space.method)
        if not (sweep_dir / "sweep.json").is_file():
            raise ConfigError(f"--resume: {sweep_dir} holds no sweep (sweep.json missing); check --name and --output-dir")
        return sweep_dir, sweep_dir.name
    if opts.name:
        sweep_dir = sweeps / opts.name
        if (sweep_dir / "sweep.json").exists():
            raise ConfigError(f"sweep {opts.name!r} already exists in {sweeps}; pass --resume to continue it or another --name (finished results are never overwritten)")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return sweep_dir, opts.name
    # <method>-<dataset>-<time>-<4 hex>: two sweeps started in the same second into one output
    # directory (or one tracking server) get distinct names; the exclusive mkdir settles a clash
    from weakbench.core.data.synthetic import parse_synthetic, synthetic_name

    variant = parse_synthetic(opts.data)
    data_name = synthetic_name(variant) if variant else Path(opts.data).resolve().name
    if opts.classes:  # a class subset is another dataset: say so in the name (coco128-person)
        from weakbench.core.data.source import parse_classes

        data_name += "-" + "+".join("".join(ch if ch.isalnum() else "_" for ch in c) for c in parse_classes(opts.classes))
    while True:
        name = f"{space.method}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            (sweeps / name).mkdir()
            return sweeps / name, name
        except FileExistsError:
            continue


def _with_overrides(space: SearchSpace, overrides: dict[str, Any]) -> SearchSpace:
    """``space`` with command-line ``--set`` values fixed (and dropped from the search)."""
    if not overrides:
        return space
    return space.model_copy(update={"fixed": {**space.fixed, **overrides},
                                    "search": {k: v for k, v in space.search.items() if k not in overrides}})


def planned_trials(space: SearchSpace, opts: SweepOptions) -> int:
    """How many trials a sweep of ``space`` with ``opts`` plans, by :func:`run_sweep`'s rule: every
    axis fixed → once per seed; Optuna → ``--trials`` rounded up to whole seed repeats; random/grid
    → ``--trials`` rounded up to whole passes over the grid points."""
    seeds = space.grid_axes().get("seed")
    if not [k for k in space.search if k != "seed"]:
        return len(seeds or [0])
    if opts.searcher == "optuna":
        return max(1, math.ceil(opts.trials / len(seeds))) * len(seeds) if seeds and len(seeds) > 1 else opts.trials
    return max(1, math.ceil(opts.trials / space.num_grid_points())) * space.num_grid_points()


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

    space = _with_overrides(load_search_space(opts.space), opts.overrides)
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
             {"section": "run", "key": "Ray", "value": opts.address or os.environ.get("RAY_ADDRESS") or
                                                      f"a private local instance ({opts.num_cpus or os.cpu_count()} CPUs)"},
             {"section": "data", "key": "data", "value": opts.data or "the embedded synthetic default"},
             {"section": "data", "key": "split seed", "value": str(opts.split_seed)},
             {"section": "tracking", "key": "output dir", "value": str(Path(opts.output_dir).resolve())},
             {"section": "tracking", "key": "MLflow", "value": opts.tracking_uri or
                                                              default_tracking_uri(opts.output_dir, create=False)},
             {"section": "tracking", "key": "experiment", "value": opts.experiment}]
    return rows


def run_sweep(opts: SweepOptions, observer=None) -> SweepSummary:
    """Run (or resume) a sweep; returns its summary. See the module docstring.

    ``observer`` (a :class:`weakbench.platform.live.SweepObserver`) is told when Tune starts, with
    what it needs to show the sweep, and returns the Tune callbacks to install; it is told when
    the sweep ends.

    Raises:
        ConfigError / DataError / UnknownNameError: bad input, before any run is created
            (:func:`weakbench.platform.validation.check_sweep_options` first).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from weakbench.platform.schedulers import ConfigurationASHA

    from weakbench.methods import validate_config
    from weakbench.platform import tracking
    from weakbench.core.data import load_splits, make_splits, open_dataset, save_splits

    t0 = time.time()
    from weakbench.core.data import check_images, resolve_path
    from weakbench.platform.validation import check_sweep_options

    check_sweep_options(opts)  # name, paths, output directory, tracking server: before anything is created

    from weakbench.core.data.synthetic import parse_synthetic

    # Ray workers run in other working directories: hand them absolute paths
    if parse_synthetic(opts.data) is None:
        opts = opts.model_copy(update={"data": str(resolve_path(opts.data))})
    space = _with_overrides(load_search_space(opts.space), opts.overrides)
    if opts.classes is None and space.classes and not opts.resume:  # the command line's --classes wins
        opts = opts.model_copy(update={"classes": space.classes})
    if opts.overrides:
        validate_config(space.method, space.fixed, source=f"{opts.space} (with command-line overrides)")
    resolve_executor(opts)  # --executor inline with DDP or a GPU is refused before anything is created
    check_gpu_request(opts)  # so is a GPU request that cannot be placed, or --gpu where no GPU is visible
    if opts.gpus_per_trial is not None:  # a GPU share is a GPU trial
        opts = opts.model_copy(update={"use_gpu": True})
    out = Path(opts.output_dir).resolve()
    data_cache = str(out / "data_cache")
    if not opts.resume:  # bad data fails before anything is created
        check_images(open_dataset(opts.data, cache_dir=data_cache, classes=opts.classes), data_cache)
    _check_ray_target(opts)  # after the input: a wrong --data is named whatever Ray does
    sweep_dir, sweep_name = prepare_sweep_dir(opts, space)
    if opts.resume:
        # a resumed sweep keeps everything that shapes its trials and their checkpoints (the
        # Role.TRIAL options); only where it runs (Role.PLACE: --address, --num-cpus, --max-concurrent...) may change
        opts = resumed_options(opts, json.loads((sweep_dir / "sweep.json").read_text()))
        space = _with_overrides(load_search_space(opts.space), opts.overrides)
    # a concrete executor is saved in sweep.json: --resume continues with the one that wrote the
    # checkpoints (an inline trial's checkpoint is a Tune one, a Train trial's a Train one)
    opts = opts.model_copy(update={"executor": resolve_executor(opts)})
    tracking_uri = opts.tracking_uri or tracking.default_tracking_uri(out)

    source = open_dataset(opts.data, cache_dir=data_cache, classes=opts.classes)
    check_images(source, data_cache)  # cached by fingerprint: free after the first check
    if not opts.resume:
        try:  # exclusive: of two sweeps given the same --name at once, the second stops here
            with open(sweep_dir / "sweep.json", "x") as f:
                f.write(json.dumps({**opts.model_dump(), "tracking_uri": tracking_uri, "name": sweep_name}, indent=2))
        except FileExistsError:
            raise ConfigError(f"sweep {sweep_name!r} was just created in {sweep_dir.parent} by another process; "
                              f"pass another --name") from None
    splits_path = sweep_dir / "splits.json"
    if splits_path.exists():
        load_splits(splits_path, source)
    else:
        save_splits(make_splits(source, seed=opts.split_seed), splits_path)

    client = tracking.client_for(tracking_uri)
    # artifacts of the sqlite default under <output-dir>/mlartifacts (a tracking server decides its own)
    exp_id = tracking.ensure_experiment(client, opts.experiment, artifact_root=tracking.default_artifact_root(tracking_uri))
    parent = tracking.get_or_create_parent_run(
        client, exp_id, sweep_name, run_name=sweep_name,
        tags={C.TAG_METHOD: space.method, C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
              C.TAG_SPLIT: "val"},
        params={"space_file": opts.space, "trials": opts.trials, "searcher": opts.searcher, "metric": space.metric,
                "num_workers": opts.num_workers, "executor": opts.executor,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
                **{f"search.{k}": f"{d.kind}{d.values}" for k, d in space.search.items()}})

    # the driver's own record (state.json): loaded on --resume (the trials recorded so far are
    # replayed, not suggested again), the driver and its heartbeat, written before Tune starts
    from weakbench.platform import sweep_state

    state = sweep_state.SweepState.load(sweep_dir) or sweep_state.SweepState(sweep_dir / sweep_state.STATE_NAME)
    state.start_driver()
    state.data.update(name=sweep_name, method=space.method, metric=space.metric, mode=space.mode, parent_run_id=parent,
                      tracking_uri=tracking_uri, experiment=opts.experiment)
    state.save()

    # results of a multi-stage trial's early stages lack the selecting metric (it comes with the
    # stage that computes it); Tune's controller would refuse them. ASHA skips such results and
    # the searcher is wrapped to skip them (_stage_aware)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    interrupted = False
    interrupted_at: float | None = None
    interrupt_signal = signal.SIGINT
    error: BaseException | None = None
    recorder = None
    num_planned = opts.trials
    tune_path = sweep_dir / "tune"
    try:
        _ensure_ray(opts)
        units = _plan_units(space.method, space.defaults_config(), source)
        grid = space.grid_axes()
        seed_values = [int(s) for s in grid["seed"]] if "seed" in grid else None
        param_space: dict[str, Any] = dict(space.fixed)
        search_alg = None
        num_samples = opts.trials
        if not [k for k in space.search if k != "seed"]:
            # every axis fixed (by the file or by --set): nothing to search, the fixed
            # configuration runs once per seed (OptunaSearch refuses an empty space)
            if seed_values:
                param_space["seed"] = tune.grid_search(seed_values)
            num_samples, num_planned, seed_values = 1, len(seed_values or [0]), None
        elif opts.searcher == "optuna":
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
            num_planned = num_samples
        else:
            seed_values = None
            param_space.update(space.tune_param_space())
            num_samples = max(1, math.ceil(opts.trials / space.num_grid_points()))
            num_planned = num_samples * space.num_grid_points()
        # ASHA's clock is the plan's progress units (fit epochs + one per map/eval stage), so it
        # means the same across stages; the plan's last report (progress == max_t) comes after
        # the trial's run is FINISHED
        # ASHA acts on configurations: a configuration's seed repeats are stopped together or not at all
        scheduler = (ConfigurationASHA(time_attr="progress", max_t=units, grace_period=min(space.asha.grace_period, units),
                                       reduction_factor=space.asha.reduction_factor)
                     if space.asha and opts.early_stopping else FIFOScheduler())

        trial_resources, max_conc = trial_placement(opts, opts.executor, ray.cluster_resources())
        ctx = _SweepContext(opts=opts.model_copy(update={"tracking_uri": tracking_uri}), method=space.method,
                            data_cache=data_cache, splits_path=str(splits_path), sweep_dir=str(sweep_dir),
                            parent_run_id=parent, sweep_id=sweep_name, seed_values=seed_values).model_dump()
        from weakbench.platform.tune_record import Recorder, ReattachingSearcher, RecordingCallback

        if search_alg is not None:  # every suggestion recorded before its trial starts; replayed on --resume
            search_alg = ReattachingSearcher(search_alg)
        # grid, all-fixed and random sweeps keep Tune's BasicVariantGenerator: it re-attaches by
        # itself. Its variants are drawn ahead and saved with Tune's trials (the remaining list, its
        # counter and random state) and its trial ids are <prefix>_<counter>, so after a restore
        # the k-th trial has the lost k-th trial's id and configuration: its run, checkpoint and
        # record entry are found (tests/test_sweep_resume.py, the grid case)
        state.data["planned"] = num_planned
        recorder = Recorder(state, space.metric)
        sweep_state.ACTIVE = recorder
        recorder.heartbeat(force=True)
        callbacks = [RecordingCallback()] + (observer.prepared(sweep_dir=sweep_dir, name=sweep_name, space=space, source=source,
                                                               num_planned=num_planned, concurrency=max_conc,
                                                               seed_values=seed_values) if observer is not None else [])
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), trial_resources)
        if opts.resume and tune.Tuner.can_restore(str(tune_path)):
            tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                # inline trials reuse their trial actor (a process that has imported torch and
                # opened the dataset) for the next trial; a Train trial's workers are Train's own
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                                            num_samples=num_samples, max_concurrent_trials=max_conc,
                                            reuse_actors=opts.executor == "inline"),
                # an inline trial's checkpoints are Tune's (model and optimiser state, ~90 MB for a
                # resnet18): the latest is what a restart needs, and a finished trial's latest is
                # the small final one (every checkpoint with --keep-checkpoints)
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=None if opts.keep_checkpoints else 1)),
            )
        with _graceful_interrupt() as stop:
            try:
                tuner.fit()
            finally:
                interrupted_at, interrupt_signal = stop.at, stop.signum
        interrupted = stop.requested
    except KeyboardInterrupt:
        interrupted = True
        interrupted_at = interrupted_at or time.time()
        raise
    except Exception as e:
        error = e
        raise
    finally:
        if observer is not None:
            observer.ended()
        if sweep_state.ACTIVE is recorder:
            sweep_state.ACTIVE = None
        try:
            summary = _finish(client, exp_id, parent, sweep_name, sweep_dir, space, source, opts, tracking_uri, state,
                              num_planned=num_planned, t0=t0, error=error, interrupted=interrupted,
                              interrupted_at=interrupted_at, interrupt_signal=int(interrupt_signal))
        except Exception as e:  # noqa: BLE001 - said plainly; the original error, if any, is chained
            raise FinalStatusError(
                f"sweep {sweep_name}: could not write the trials' final statuses ({type(e).__name__}: {_first_line(e)}) "
                f"to MLflow {tracking_uri} or {state.path}; runs may still read RUNNING there. Free space on (or make "
                f"writable) the disk of --output-dir {out} and of the tracking store, then run `weakbench sweep "
                f"{opts.space} --resume --name {sweep_name}`, which records them") from (error or e)
        if recorder is not None and recorder.write_error is not None:
            summary.warnings.append(f"could not write {state.path} ({recorder.write_error}); `weakbench status` may "
                                    f"misread this sweep until a --resume rewrites it: free space on (or make writable) "
                                    f"the disk of --output-dir {out}")
    return summary


class _StopRequest:
    requested = False
    at: float | None = None  # time.time() of the first SIGINT or SIGTERM
    signum: int = signal.SIGINT  # which of the two


@contextlib.contextmanager
def _graceful_interrupt():
    """Ctrl-C (SIGINT) or SIGTERM (what ``timeout``, systemd and Kubernetes send) during
    ``tuner.fit()`` stops the sweep gracefully and is remembered: the summary is printed, the
    parent run ends KILLED, the runs it ended are tagged interrupted, and the CLI exits with
    128 + the signal (130, 143).

    Tune's own SIGINT handler would stop the experiment but make ``fit()`` return as if it had
    ended normally (the sweep would exit 0, its parent run FINISHED), and Ray's driver turns
    SIGTERM into an abrupt exit. Here Tune's handler is disabled (``TUNE_DISABLE_SIGINT_HANDLER``)
    and the first SIGINT or SIGTERM asks Tune for the same graceful stop through SIGUSR1, which
    Tune always handles; a second one raises KeyboardInterrupt. Outside the main thread nothing
    changes.
    """
    import threading

    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame):
        if stop.requested or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt
        stop.requested = True
        stop.at = time.time()
        stop.signum = signum
        import sys

        how = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"weakbench: interrupted ({signal.Signals(signum).name}); stopping the sweep (send {how} again to stop at once)",
              file=sys.stderr)
        os.kill(os.getpid(), signal.SIGUSR1)

    env_before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if env_before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env_before


def _tune_error_text(trial: Any) -> str:
    """The last line of a Tune trial's error (``ValueError: …``), or a generic reason.

    Tune writes the error into the trial's local directory first (``Trial.handle_error``) and
    syncs it to the storage path later, while ``on_trial_error`` runs right after the write: the
    storage copy read by ``get_pickled_error`` can still be missing then, so the local text file
    (``error.txt``, plain text, nothing unpickled) is read as well."""
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001
        err = None
    if err is None:
        local = _last_error_line(getattr(trial, "error_file", None))
        if local:
            return local
        return f"the trial errored inside Ray Tune (after {trial.num_failures} failure(s)); see its error.txt"
    cause = getattr(err, "cause", None) or err
    lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else cause}"


def _last_error_line(path: str | None) -> str | None:
    """The last non-empty line of the latest failure in Tune's ``error.txt`` (``Name: message``, the
    traceback's final line), or None where the file is absent or unreadable."""
    if not path:
        return None
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    latest = text.rsplit("Failure # ", 1)[-1]
    lines = [ln.strip() for ln in latest.splitlines()[1:] if ln.strip()]
    return lines[-1] if lines else None


def _reconcile(client, exp_id: str, parent: str, sweep_id: str, state, method: str, source,
               *, interrupted: bool, interrupted_at: float | None = None) -> dict[str, int]:
    """Make MLflow agree with what happened, as the driver recorded it (``state``, a
    :class:`~weakbench.platform.sweep_state.SweepState`), not with Tune's periodically saved state.

    * a FINISHED run is never written again (below: unless its metrics are not finite);
    * a trial recorded ``failed`` (Tune's retries exhausted, or a local fault a retry cannot fix)
      ends FAILED with ``weakbench.error`` (its run is created FAILED when it failed before
      creating one: a worker that died, an actor that could not start);
    * a trial recorded ``stopped`` (the scheduler's own decision) ends KILLED with
      ``weakbench.stopped = stopped early by the scheduler``; nothing else is called stopped early;
    * a trial recorded ``finished`` whose run did not finish, and a trial still running when a
      sweep that was not interrupted ended (its driver failed), end FAILED saying so;
    * a FINISHED run with a non-finite metric (a NaN loss) ends FAILED with a ``DivergenceError``;
    * when the sweep was interrupted, a run still RUNNING, or one that ended after the interrupt
      (``interrupted_at``) because of it (Tune's stop reached it inside ``tune.report`` and it ended
      KILLED as if the scheduler had stopped it, or a worker got the SIGINT and it ended FAILED
      with a KeyboardInterrupt), is KILLED and tagged ``weakbench.interrupted``: the interrupt, not
      the scheduler or the code, ended it, and ``--resume`` continues it;
    * any other run still RUNNING (no outcome recorded) ends FAILED;
    * a trial Tune restarted gets tag ``weakbench.restarts``; the record's statuses are set from
      the runs' final ones.

    Returns ``{"restarts": total restarts over all trials}``.
    """
    from weakbench.platform import tracking

    restarts = 0
    scheduler_stopped: set[str] = set()
    for tid in state.order():
        entry = state.trials[tid]
        restarts += int(entry.get("restarts") or 0)
        run = tracking.find_trial_run(client, exp_id, sweep_id, tid)
        status = run.info.status if run is not None else None
        what = entry.get("status")
        if what == "stopped":
            scheduler_stopped.add(tid)
        if status == "FINISHED":
            pass  # finished results are never overwritten
        elif what == "failed":
            error = entry.get("error") or "the trial failed in Ray Tune; see its error.txt"
            if run is None:
                run_id, _ = tracking.get_or_create_trial_run(
                    client, exp_id, parent_run_id=parent, sweep_id=sweep_id, trial_id=tid, run_name=f"{method}-{tid}",
                    tags={C.TAG_METHOD: method, C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
                          C.TAG_SPLIT: "val"},
                    params={k: v for k, v in (entry.get("config") or {}).items() if not k.startswith("__")})
                tracking.fail_run(client, run_id, error)
            elif status != "FAILED" or not run.data.tags.get(C.TAG_ERROR):
                if "weakbench.stopped" in run.data.tags:
                    client.delete_tag(run.info.run_id, "weakbench.stopped")
                tracking.fail_run(client, run.info.run_id, run.data.tags.get(C.TAG_ERROR) or error)
        elif what == "stopped":
            if status in ("RUNNING", "KILLED"):  # tag, "[stopped early]" in the run name, KILLED
                tracking.mark_stopped_early(client, run.info.run_id)
        elif run is not None and status in ("RUNNING", "KILLED") and not interrupted:
            if "weakbench.stopped" in run.data.tags:
                client.delete_tag(run.info.run_id, "weakbench.stopped")
            tracking.fail_run(client, run.info.run_id, "the trial ended in Ray Tune but its run did not finish"
                              if what == "finished" else "the sweep's driver ended before this trial did")
        if int(entry.get("restarts") or 0) > 0 and run is not None:
            client.set_tag(run.info.run_id, C.TAG_RESTARTS, str(entry["restarts"]))
    # a run that finished with a non-finite loss or metric diverged: it fails (the engine may
    # already have failed it at the epoch it diverged; this catches any run that slipped through)
    for r in tracking.child_runs(client, exp_id, parent):
        if r.info.status == "FINISHED" and not is_finite_metrics(r.data.metrics):
            try:
                check_finite(r.data.metrics, f"run {r.info.run_id} (trial {r.data.tags.get(C.TAG_TRIAL_ID, '?')})")
            except DivergenceError as e:
                tracking.fail_run(client, r.info.run_id, e)
    if interrupted:
        since_ms = int(((interrupted_at or time.time()) - 2.0) * 1000)  # 2 s: clocks of one host, a report in flight
        for r in tracking.child_runs(client, exp_id, parent):
            if r.data.tags.get(C.TAG_TRIAL_ID) in scheduler_stopped:
                continue
            ended_by_interrupt = r.info.status == "RUNNING" or (
                (r.info.end_time or 0) >= since_ms
                and ((r.info.status == "KILLED" and r.data.tags.get("weakbench.stopped"))
                     or (r.info.status == "FAILED" and str(r.data.tags.get(C.TAG_ERROR, "")).startswith("KeyboardInterrupt"))))
            if ended_by_interrupt:
                client.set_tag(r.info.run_id, C.TAG_INTERRUPTED, "the sweep was interrupted; --resume continues it")
                if "weakbench.stopped" in r.data.tags:
                    client.set_tag(r.info.run_id, "weakbench.stopped", "the sweep was interrupted")
                if r.info.status == "FAILED":
                    client.delete_tag(r.info.run_id, C.TAG_ERROR)
                    client.set_terminated(r.info.run_id, status="KILLED", end_time=r.info.end_time)
        tracking.reconcile_children(client, exp_id, parent, reason="the sweep was interrupted")
    else:
        for r in tracking.child_runs(client, exp_id, parent):
            if r.info.status == "RUNNING":
                tracking.fail_run(client, r.info.run_id, "the run was left RUNNING when the sweep ended (no outcome "
                                                         "was recorded for its trial)")
    # the record ends as MLflow does (what `weakbench status` reads)
    for r in tracking.child_runs(client, exp_id, parent):
        tid = r.data.tags.get(C.TAG_TRIAL_ID)
        if tid in state.trials:
            st = r.info.status
            state.trials[tid]["status"] = ("interrupted" if st == "KILLED" and r.data.tags.get(C.TAG_INTERRUPTED) else
                                           {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped"}.get(st, "failed"))
            if st == "FAILED":
                state.trials[tid]["error"] = r.data.tags.get(C.TAG_ERROR)
    return {"restarts": restarts}


class FinalStatusError(WeakbenchError):
    """The driver could not write the trials' final statuses (a full disk, a read-only mount, an
    unreachable tracking store); the message names where and the fix. Exit status 1 (not 2: the
    input was fine)."""

    exit_code = 1


# lines of an error's text that say where it happened, not what: SQLAlchemy's autoflush preamble,
# the statement and the link
_NOISE = ("(raised as a result of", "[SQL", "[parameters", "(Background on")


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s text that says what failed (``(sqlite3.OperationalError) database
    or disk is full`` rather than SQLAlchemy's autoflush preamble), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_NOISE)] or lines
    return lines[0][:300] if lines else ""


def _finish(client, exp_id: str, parent: str, sweep_name: str, sweep_dir: Path, space, source, opts, tracking_uri: str,
            state, *, num_planned: int, t0: float, error: BaseException | None, interrupted: bool,
            interrupted_at: float | None, interrupt_signal: int) -> SweepSummary:
    """Reconcile MLflow with the record, count, select the best run, end the parent run and the
    record; returns the summary. Raises whatever MLflow or the file system raise."""
    from weakbench.platform import tracking

    outcome = _reconcile(client, exp_id, parent, sweep_name, state, space.method, source,
                         interrupted=interrupted, interrupted_at=interrupted_at)
    runs = tracking.child_runs(client, exp_id, parent)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    killed = [r for r in runs if r.info.status == "KILLED" and not r.data.tags.get(C.TAG_INTERRUPTED)]
    best = select_best_run(finished, space.metric, space.mode)
    if best is not None:
        tracking.log_metrics(client, parent, {f"best/{k}": v for k, v in best.data.metrics.items()}, step=0)
        client.set_tag(parent, "weakbench.best_run_id", best.info.run_id)
    summary = SweepSummary(
        sweep_name=sweep_name, sweep_dir=str(sweep_dir), tracking_uri=tracking_uri, experiment=opts.experiment,
        parent_run_id=parent, method=space.method, dataset=source.name, num_trials=len(runs),
        num_finished=len(finished), num_failed=len(failed), num_stopped=len(killed), wall_seconds=time.time() - t0,
        best_run_id=best.info.run_id if best else None, best_params=dict(best.data.params) if best else {},
        best_metrics=dict(best.data.metrics) if best else {}, metric=space.metric,
        num_planned=num_planned, num_restarts=outcome["restarts"], interrupted=interrupted,
        interrupt_signal=interrupt_signal)
    tracking.set_tags(client, parent, {"weakbench.trials_planned": num_planned, "weakbench.trials_finished": len(finished),
                                       "weakbench.trials_failed": len(failed), "weakbench.trials_stopped": len(killed),
                                       "weakbench.trial_restarts": outcome["restarts"]})
    # the parent says what happened: KILLED when interrupted, FINISHED only when every planned
    # trial finished (or was stopped early by the scheduler), FAILED otherwise
    code = summary.exit_code if error is None else 1
    if error is not None:
        client.set_tag(parent, C.TAG_ERROR, f"{type(error).__name__}: {error}"[:5000])
    elif code == 1:
        client.set_tag(parent, C.TAG_ERROR, f"{len(finished)} of {num_planned} planned trial(s) finished, "
                                            f"{len(failed)} failed, {len(killed)} stopped early")
    elif C.TAG_ERROR in client.get_run(parent).data.tags:
        client.delete_tag(parent, C.TAG_ERROR)  # a resumed sweep that succeeded: yesterday's error no longer holds
    client.set_terminated(parent, status="FINISHED" if code == 0 else "KILLED" if interrupted else "FAILED")
    state.end_driver(code)
    try:
        state.save()
    except OSError as e:  # MLflow has the outcome; the record is what `weakbench status` reads
        summary.warnings.append(f"could not write {state.path} ({e}); `weakbench status` may show this sweep as "
                                f"running: free space on (or make writable) the disk of {sweep_dir}")
    return summary
