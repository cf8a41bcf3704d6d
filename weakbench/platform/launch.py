"""The Ray adapter of the sweep driver (issue #17, "plan → launch → reconcile"): connecting to Ray,
building Tune's objects from a :class:`~weakbench.platform.sweep_plan.SweepPlan` and running them,
the Tune trial function, and every use of a private Ray API in weakbench.

The private Ray APIs weakbench relies on, each used only here (checked against ray 2.60.0; a Ray
upgrade re-checks this list — ``tests/test_faults_train.py``, ``tests/test_schedulers.py``,
``tests/test_sweep_outcome.py`` and the Ray sweep tests fail when one moves):

* ``ray._private.services.find_gcs_addresses`` (and its ``cache_clear``): the live Ray instances
  of this machine (:func:`running_ray_instances`);
* ``ray._private.utils.read_ray_address``: the cluster ``ray start`` recorded (:func:`recorded_ray_cluster`);
* ``ray._private.services.canonicalize_bootstrap_address_or_die``: ``--address`` to ``host:port`` (:func:`ensure_ray`);
* ``ray._common.constants.HEAD_NODE_RESOURCE_NAME``, ``ray._private.ray_constants.DASHBOARD_ADDRESS``
  / ``KV_NAMESPACE_DASHBOARD`` and ``ray.experimental.internal_kv._internal_kv_get``: whether the
  head's State API answers (:func:`check_state_api`);
* ``ray.train.v2._internal.execution.failure_handling`` (``DefaultFailurePolicy``,
  ``FailureDecision``) and ``TorchTrainer._initialize_and_run_controller``: Ray Train's failure
  policy, which has no public option (:class:`LocalFaultPolicy`, :func:`local_fault_trainer`);
* ``UserExceptionWithTraceback._base_exc``: a Train worker's own error (:func:`local_fault_error`);
* ``AsyncHyperBandScheduler``'s private state (``_brackets[0]._rungs``, ``_time_attr``,
  ``_metric``, ``_metric_op``, ``_max_t``, ``_stop_last_trials``, ``_reduction_factor``,
  ``_trial_info``, ``_num_stopped``): :class:`ConfigurationASHA`;
* Tune's ``Trial`` (developer API): ``get_pickled_error``, ``get_error``, ``error_file``,
  ``num_failures`` (:func:`tune_error_text`);
* Tune's environment switches ``TUNE_DISABLE_SIGINT_HANDLER`` (and its SIGUSR1 stop, which Tune
  always handles) and ``TUNE_DISABLE_STRICT_METRIC_CHECKING`` (:func:`graceful_interrupt`, :func:`launch`);
  Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` and the dashboard's ``RAY_API_SERVER_ADDRESS``
  (:func:`ensure_ray`).

Nothing else in weakbench imports ``ray._private``, ``ray._common``, ``ray.train.v2._internal`` or
``internal_kv``, nor reads an underscore attribute of a Ray object; ``tests/test_sweep_plan.py``
checks it by grep.

Each Tune trial is a plain function (:func:`_trial`). Executors
(:func:`weakbench.platform.sweep_plan.resolve_executor`):

* ``"inline"``: a one-worker CPU trial trains inside the trial function, holding
  ``cpus_per_worker`` CPUs and reporting to Tune directly; Tune reuses the trial actor (a process
  that has imported torch and MLflow) for the next trial (``reuse_actors``);
* ``"train"``: the trial function builds a ``TorchTrainer`` per plan segment and fits it, with
  ``TuneReportCallback`` forwarding the workers' reports to Tune (Ray ≥ 2.51: ``Tuner(trainer)``
  is deprecated); the trial function itself holds only ``{"cpu": 0.01}`` so that the Train
  workers get the CPUs (a ``{"cpu": 0}`` request is refused by Ray). Each trial starts a Train
  controller and its workers, fresh processes: ~15-20 s per trial on a 2-core machine
  (``benchmarks/bench_sweep_overhead.py``), so it is for DDP and GPU trials.

Search: ``OptunaSearch`` (TPE, seeded) over the sampled axes; the ``seed`` grid axis is realised
with Tune's ``Repeater`` (each suggested configuration is run once per seed and Optuna sees the
mean), other grid axes become categorical choices for Optuna. ``searcher="random"`` uses Tune's
own variant generator, where grid axes are crossed natively. ASHA over configurations
(:class:`ConfigurationASHA`, time attribute ``progress``) stops poor configurations early, all
their seed repeats together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from weakbench.core.errors import ConfigError
from weakbench.platform.run_spec import SweepOptions, trial_fields
from weakbench.platform.search_space import Distribution
from weakbench.platform.sweep_plan import SweepPlan, configuration_key, ray_address, resolve_executor
from weakbench.platform.sweep_state import note_scheduler_stop


# ------------------------------------------------------------------ connecting to Ray
def running_ray_instances() -> list[str]:
    """GCS addresses of the Ray instances running on this machine (any user): Ray's own discovery
    of live ``gcs_server`` processes (not ``ray start``'s address file, which outlives its cluster)."""
    from ray._private import services

    services.find_gcs_addresses.cache_clear()  # Ray caches a non-empty answer for the process's lifetime
    return sorted(set(services.find_gcs_addresses()))


def recorded_ray_cluster(running: list[str]) -> str | None:
    """The cluster ``ray start`` recorded on this machine (Ray's address file,
    ``/tmp/ray/ray_current_cluster``) when it is one of the ``running`` instances, else None."""
    from ray._private import utils

    recorded = utils.read_ray_address()
    if not recorded:
        return None
    port = recorded.rsplit(":", 1)[-1]
    return next((a for a in running if a == recorded or a.rsplit(":", 1)[-1] == port), None)


def check_ray_target(opts: SweepOptions) -> None:
    """Refuse, before anything is created, a sweep without ``--address`` (nor ``RAY_ADDRESS``) only
    where Ray's own default would be ambiguous.

    The rule is Ray's: ``ray.init()`` with no address joins ``RAY_ADDRESS``, else the cluster the
    last ``ray start`` recorded on this machine, else starts a private instance; it never joins an
    instance that another driver started with ``ray.init()`` (another weakbench sweep, a notebook).
    So beside such instances this sweep starts its own private one. A live ``ray start`` cluster is
    the case Ray would join and weakbench (private by default) would not: the sweep asks which.
    """
    import ray

    if ray.is_initialized() or ray_address(opts):
        return
    running = running_ray_instances()
    started = recorded_ray_cluster(running)
    if started:
        raise ConfigError(f"a Ray cluster started with `ray start` runs on this machine ({started}); pass --address auto "
                          f"(or --address {started}) to run the sweep on it, or --address local to start a "
                          f"private instance beside it")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(opts: SweepOptions) -> None:
    """Connect this driver to Ray: ``--address ADDR|auto`` (or ``RAY_ADDRESS``) joins a cluster;
    ``--address local``, or no address, starts a private local instance of ``--num-cpus``, beside
    any other driver's instance (:func:`check_ray_target` refuses only where a ``ray start``
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
    address = ray_address(opts)
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
        check_ray_target(opts)
        local: dict[str, Any] = {}
        if executor == "inline":  # nothing asks the State API: no dashboard to start (1-3 s of start-up)
            kwargs["include_dashboard"] = False
        else:
            port = free_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            local = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
        os.environ.update(env)  # inherited by the local instance's raylet and workers
        ray.init(address="local", num_cpus=opts.num_cpus or os.cpu_count(), **local, **kwargs)
    if executor != "inline":
        check_state_api(address if address and address != "local" else "the local Ray instance")


def check_state_api(where: str, timeout_s: float = 120.0) -> None:
    """Ask Ray's State API from the head node, as Train's placement-group cleaner does; refuse the
    sweep (ConfigError) when it does not answer. See :func:`ensure_ray`."""
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


def cluster_resources() -> dict[str, float]:
    """``ray.cluster_resources()`` of the connected cluster (``{"CPU": n, "GPU": m, ...}``)."""
    import ray

    return dict(ray.cluster_resources())


# ------------------------------------------------------------------ Ray's errors
#: the result key with which a trial reports a local fault that a retry cannot fix (it then
#: returns instead of raising, so that Tune does not retry it; the driver records it failed)
FATAL_KEY = "weakbench_fatal_error"
#: errno values of local faults that a retry on the same storage cannot fix
FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.ENOENT, errno.EDQUOT}


def local_fault_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` whose errno is in :data:`FATAL_ERRNOS` (a full disk or quota, a read-only
    file system, a missing file) that ``exc`` is or was caused by (``__cause__``/``__context__``,
    a Ray task error's ``cause``, a Train worker group's ``worker_failures`` and the user error
    each wraps); None when there is none."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FATAL_ERRNOS:
            return e
        todo += [getattr(e, "__cause__", None), getattr(e, "__context__", None), getattr(e, "cause", None),
                 getattr(e, "_base_exc", None)]  # Ray Train's UserExceptionWithTraceback (a worker's own error)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


def local_fault(exc: BaseException) -> str | None:
    """``"OSError: [Errno 28] No space left on device: '…'"`` for :func:`local_fault_error`'s
    error, None when ``exc`` is not a local fault."""
    e = local_fault_error(exc)
    return None if e is None else f"{type(e).__name__}: {e}"


def end_on_local_fault(exc: BaseException) -> None:
    """In a Tune trial function's ``except``: re-raise ``exc`` (Tune retries it, up to
    ``max_failures``) unless it is a :func:`local_fault`; then report it under :data:`FATAL_KEY`
    and return, so the trial ends without a retry and the driver records it failed with that error."""
    from ray import tune

    fault = local_fault(exc)
    if fault is None:
        raise exc
    tune.report({FATAL_KEY: f"{fault} (a local fault a retry cannot fix: not retried)"})


class LocalFaultPolicy(DefaultFailurePolicy):
    """Ray Train's failure policy, except that a worker group that failed on a
    :func:`local_fault` (a full disk, a read-only file system, a missing file) is not restarted:
    the error is raised at once (``FailureDecision.RAISE``), whatever ``max_failures`` says, and
    the trial function ends the trial without a Tune retry either (:func:`end_on_local_fault`).
    Every other failure is Ray's default decision (``max_failures`` restarts)."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if local_fault(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def local_fault_trainer(**kwargs):
    """A ``ray.train.torch.TorchTrainer(**kwargs)`` whose controller uses :class:`LocalFaultPolicy`.

    Ray 2.60's Train V2 takes its policy from ``create_failure_policy(run_config.failure_config)``
    with no public option; the trainer's ``_initialize_and_run_controller`` (a private method,
    checked by ``tests/test_faults_train.py``) is given this policy instead. Raises
    ``RuntimeError`` when that method is gone (a Ray upgrade): the policy would silently not apply.
    """
    from ray.train.torch import TorchTrainer

    if not hasattr(TorchTrainer, "_initialize_and_run_controller"):
        raise RuntimeError("ray.train.torch.TorchTrainer has no _initialize_and_run_controller in this Ray version: "
                           "weakbench cannot keep Ray Train from retrying a local fault (update weakbench/platform/launch.py)")

    class LocalFaultTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_kwargs):
            controller_kwargs["failure_policy"] = LocalFaultPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_kwargs)

    return LocalFaultTorchTrainer(**kwargs)


def tune_error_text(trial: Any) -> str:
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


# ------------------------------------------------------------------ the scheduler and the searcher
class ConfigurationASHA(AsyncHyperBandScheduler):
    """ASHA whose unit is a configuration (all its seed repeats); see :mod:`weakbench.platform.schedulers`.

    Arguments are ``AsyncHyperBandScheduler``'s (``time_attr``, ``max_t``, ``grace_period``,
    ``reduction_factor``; one bracket). Milestones are ``grace_period · reduction_factor^k`` below
    ``max_t``, in the units of ``time_attr`` (the sweep uses the plan's progress units). The state
    is pickled with the scheduler, so ``--resume`` keeps the decisions taken.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("brackets", 1)
        if kwargs["brackets"] != 1:
            raise ValueError("ConfigurationASHA uses one bracket")
        super().__init__(*args, **kwargs)
        self._milestones = [m for m, _ in self._brackets[0]._rungs]  # descending, as Ray keeps them
        self._scores: dict[float, dict[str, dict[str, float]]] = {m: {} for m in self._milestones}
        self._decisions: dict[tuple[str, float], str] = {}
        self._stopped: set[str] = set()

    def _cutoff(self, milestone: float, key: str) -> float | None:
        others = [float(np.mean(list(v.values()))) for k, v in self._scores[milestone].items() if k != key and v]
        if not others:
            return None
        return float(np.nanpercentile(others, (1 - 1 / self._reduction_factor) * 100))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        key = configuration_key(trial.config)
        if key in self._stopped:
            self._num_stopped += 1
            note_scheduler_stop(trial)
            return TrialScheduler.STOP
        t = result[self._time_attr]
        if t >= self._max_t and self._stop_last_trials:
            return TrialScheduler.STOP  # the end of the plan, as in ASHA (not an early stop)
        reward = self._metric_op * result[self._metric]
        action = TrialScheduler.CONTINUE
        for milestone in self._milestones:
            if t < milestone:
                continue
            seen = self._scores[milestone].setdefault(key, {})
            if trial.trial_id in seen:
                break  # this trial's value at its highest rung reached is already recorded
            decided = self._decisions.get((key, milestone))
            if decided is None:
                cutoff = self._cutoff(milestone, key)
                decided = TrialScheduler.STOP if cutoff is not None and reward < cutoff else TrialScheduler.CONTINUE
                self._decisions[(key, milestone)] = decided
            if reward is not None and np.isfinite(reward):
                seen[trial.trial_id] = float(reward)
            action = decided
            break
        if action == TrialScheduler.STOP:
            self._stopped.add(key)
            self._num_stopped += 1
            note_scheduler_stop(trial)  # the driver's record: "stopped early" is this decision only
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = " | ".join(f"t={m}: {len(self._scores[m])} configurations" for m in self._milestones)
        return f"ConfigurationASHA: {len(self._stopped)} configurations stopped; {rungs}"


def stage_aware(searcher_cls):
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


# ------------------------------------------------------------------ the trial function
class SweepContext(BaseModel):
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


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trial function: one configuration, one Train run.

    Its name is Tune's name of the trainable: trial directories are ``tune/_trial_<id>_…`` and
    ``Tuner.restore`` (``--resume``) finds a sweep's trials under it, so it keeps the name it had
    when it lived in ``weakbench.platform.sweep``."""
    from ray import tune

    from weakbench.platform.engine import TrialSpec, run_inline_in_tune, run_segments

    from weakbench.platform.sweep_state import TRIAL_ID_KEY

    c = SweepContext(**ctx)
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


# ------------------------------------------------------------------ running Tune
class StopRequest:
    requested = False
    at: float | None = None  # time.time() of the first SIGINT or SIGTERM
    signum: int = signal.SIGINT  # which of the two


@contextlib.contextmanager
def graceful_interrupt(stop: StopRequest | None = None):
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

    stop = stop if stop is not None else StopRequest()
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


def tune_domain(d: Distribution):
    """The Ray Tune sampler of one search dimension (``grid`` → ``tune.grid_search``, crossed by
    Tune's variant generator; ``int`` bounds inclusive, as the space file writes them)."""
    from ray import tune

    v = d.values
    if d.kind == "uniform":
        return tune.uniform(float(v[0]), float(v[1]))
    if d.kind == "loguniform":
        return tune.loguniform(float(v[0]), float(v[1]))
    if d.kind == "int":
        return tune.randint(int(v[0]), int(v[1]) + 1)  # Tune's upper bound is exclusive
    if d.kind == "choice":
        return tune.choice(list(v))
    return tune.grid_search(list(v))


def tune_param_space(fixed: dict[str, Any], axes: dict[str, Distribution]) -> dict[str, Any]:
    """``fixed`` values plus a Tune sampler per axis (:func:`tune_domain`), for ``Tuner(param_space=...)``."""
    return {**fixed, **{k: tune_domain(d) for k, d in axes.items()}}


def launch(plan: SweepPlan, ctx: dict[str, Any], *, sweep_dir: Path, resume: bool, callbacks: list,
           wrap_searcher, stop: StopRequest) -> None:
    """Run the sweep ``plan`` on the connected Ray cluster (:func:`ensure_ray`): Tune's trainable
    (:func:`_trial` with ``ctx``, a :class:`SweepContext` dump, holding the plan's resources), its
    searcher (Optuna made stage-aware, :func:`stage_aware`, repeated once per seed, then wrapped by
    ``wrap_searcher``, the driver's recording wrapper), its scheduler (:class:`ConfigurationASHA` or
    FIFO) and ``callbacks``; restores ``<sweep_dir>/tune`` instead when ``resume`` and Tune saved it
    there. Returns when Tune's ``fit()`` does; a first SIGINT/SIGTERM is a graceful stop recorded in
    ``stop`` (:func:`graceful_interrupt`), a second raises ``KeyboardInterrupt``.

    Raises whatever Tune raises.
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    # results of a multi-stage trial's early stages lack the selecting metric (it comes with the
    # stage that computes it); Tune's controller would refuse them. ASHA skips such results and
    # the searcher is wrapped to skip them (stage_aware)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    param_space = tune_param_space(plan.fixed, plan.axes)
    search_alg = None
    if plan.searcher == "optuna":
        import optuna
        from ray.tune.search import Repeater
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" chatter
        search_alg = stage_aware(OptunaSearch)(metric=plan.metric, mode=plan.mode,
                                               sampler=optuna.samplers.TPESampler(seed=plan.search_seed))
        if plan.seed_values and len(plan.seed_values) > 1:
            search_alg = Repeater(search_alg, repeat=len(plan.seed_values), set_index=True)
        # every suggestion recorded before its trial starts, replayed on --resume. Grid, all-fixed
        # and random sweeps keep Tune's BasicVariantGenerator, which re-attaches by itself: its
        # variants are drawn ahead and saved with Tune's trials, and its trial ids are
        # <prefix>_<counter>, so after a restore the k-th trial has the lost k-th trial's id and
        # configuration (tests/test_sweep_resume.py, the grid case)
        search_alg = wrap_searcher(search_alg)
    # ASHA acts on configurations: a configuration's seed repeats are stopped together or not at all
    a = plan.scheduler
    scheduler = (ConfigurationASHA(time_attr=a.time_attr, max_t=a.max_t, grace_period=a.grace_period,
                                   reduction_factor=a.reduction_factor) if a is not None else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), plan.resources)
    tune_path = Path(sweep_dir) / "tune"
    if resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            # inline trials reuse their trial actor (a process that has imported torch and
            # opened the dataset) for the next trial; a Train trial's workers are Train's own
            tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=plan.num_samples, max_concurrent_trials=plan.max_concurrent,
                                        reuse_actors=plan.reuse_actors),
            # an inline trial's checkpoints are Tune's (model and optimiser state, ~90 MB for a
            # resnet18): the latest is what a restart needs, and a finished trial's latest is
            # the small final one (every checkpoint with --keep-checkpoints)
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=None if plan.keep_checkpoints else 1)),
        )
    with graceful_interrupt(stop):
        tuner.fit()
