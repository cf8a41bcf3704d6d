"""The Ray side of the driver's record (:mod:`weakbench.platform.sweep_state`).

* :class:`Recorder` turns Ray Tune's events, as they happen in the driver, into the sweep's
  ``state.json``: a trial suggested (before it starts), started, each result, completed, errored
  with its retries exhausted, restarted, and the scheduler's own stop decisions;
* :class:`RecordingCallback` (a ``tune.Callback``) and :class:`ReattachingSearcher` (a
  ``Searcher`` wrapper) feed it. Tune pickles both with its run (``tuner.pkl``, the searcher's
  saved state), so they are stateless forwarders to :data:`sweep_state.ACTIVE`;
* on ``--resume``, Tune restores its state as of its last save (about every 10 s); the trials
  suggested after that save are in the record only. :class:`ReattachingSearcher` counts the
  suggestions it has made (its count is saved with Tune's searcher state, at the same moment as
  the trials), so the k-th suggestion after a restore is the k-th recorded trial when one exists:
  it is replayed with its recorded configuration and id (:data:`sweep_state.TRIAL_ID_KEY`), which
  finds its MLflow run and its checkpoint, instead of a new trial the seeded searcher would
  suggest again under a new id. The searcher is asked for new configurations only past the
  recorded ones, and Tune's ``num_samples`` still bounds the total: never more trials than planned.
  Grid, all-fixed and random sweeps keep Tune's ``BasicVariantGenerator``, which does the same by
  itself (its pre-drawn variants and counter are saved with the trials, and a trial's id is
  ``<prefix>_<counter>``): the k-th trial after a restore is the lost k-th one, id and
  configuration alike.
"""

from __future__ import annotations

import errno
import time
from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.tune import Callback
from ray.tune.search import Searcher

from weakbench.platform import sweep_state
from weakbench.platform.sweep_state import ENDED, HEARTBEAT_S, TRIAL_ID_KEY, SweepState

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
                           "weakbench cannot keep Ray Train from retrying a local fault (update tune_record.py)")

    class LocalFaultTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_kwargs):
            controller_kwargs["failure_policy"] = LocalFaultPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_kwargs)

    return LocalFaultTorchTrainer(**kwargs)


def trial_key(trial) -> str:
    """The weakbench id of a Tune trial: its recorded id when ``--resume`` replays it, else Tune's."""
    return str((getattr(trial, "config", None) or {}).get(TRIAL_ID_KEY) or trial.trial_id)


class Recorder:
    """Keeps the sweep's :class:`SweepState` as Tune's events arrive (all in the driver's thread
    that runs ``tuner.fit()``). A write that fails (a full disk) is remembered in
    :attr:`write_error` and retried at the next event; the sweep goes on."""

    def __init__(self, state: SweepState, metric: str):
        self.state = state
        self.metric = metric
        self.write_error: OSError | None = None
        self._beat = 0.0

    def save(self) -> None:
        try:
            self.state.save()
            self.write_error = None
        except OSError as e:
            self.write_error = e

    # ---------------------------------------------------------------- the searcher
    def suggested(self, tune_id: str, config: dict[str, Any], index: int) -> dict[str, Any]:
        """The searcher suggested ``config`` as its ``index``-th trial (0-based over the sweep's
        life): the recorded trial of that index when there is one (replayed under its own id),
        else ``config``, recorded now, before the trial starts."""
        order = self.state.order()
        if index < len(order):
            entry = self.state.trials[order[index]]
            entry["tune_id"] = tune_id
            if entry["status"] not in ENDED:
                entry["status"] = "pending"
            self.save()
            return {**entry["config"], TRIAL_ID_KEY: entry["trial_id"]}
        entry = self.state.trial(tune_id)
        entry.update(index=index, tune_id=tune_id, config=dict(config), suggested=time.time())
        self.save()
        return config

    # ---------------------------------------------------------------- Tune's events
    def _entry(self, trial) -> dict[str, Any]:
        entry = self.state.trial(trial_key(trial))
        if not entry.get("config"):  # a trial that reached Tune without the searcher (grid, random)
            entry["config"] = {k: v for k, v in (trial.config or {}).items() if k != TRIAL_ID_KEY}
        entry.setdefault("index", len(self.state.trials) - 1)
        entry["tune_id"] = trial.trial_id
        return entry

    def started(self, trial) -> None:
        entry = self._entry(trial)
        entry.setdefault("started", time.time())
        entry.update(status="running", error=None, ended=None)
        self.save()

    def result(self, trial, result: dict[str, Any]) -> None:
        entry = self._entry(trial)
        entry["updated"] = time.time()
        for k in ("progress", "epoch"):
            if isinstance(result.get(k), (int, float)):
                entry[k] = float(result[k])
        v = result.get(self.metric)
        if isinstance(v, (int, float)):
            entry["latest"] = float(v)
        if result.get(FATAL_KEY):
            entry["fatal"] = str(result[FATAL_KEY])
        if entry["status"] in ("pending", "restarting"):
            entry["status"] = "running"
        self.save()

    def complete(self, trial) -> None:
        entry = self._entry(trial)
        entry["ended"] = time.time()
        if entry.get("fatal"):
            entry.update(status="failed", error=entry["fatal"])
        elif entry.get("stopped_by") == "scheduler":
            entry["status"] = "stopped"
        else:
            entry["status"] = "finished"
        self.save()

    def error(self, trial) -> None:
        from weakbench.platform.sweep import _tune_error_text

        entry = self._entry(trial)
        entry.update(status="failed", ended=time.time(), error=_tune_error_text(trial))
        self.save()

    def recover(self, trial) -> None:
        entry = self._entry(trial)
        entry["restarts"] = int(entry.get("restarts", 0)) + 1
        entry["status"] = "restarting"
        self.save()

    def scheduler_stop(self, trial) -> None:
        self._entry(trial)["stopped_by"] = "scheduler"

    def heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._beat >= HEARTBEAT_S:
            self._beat = now
            self.state.driver["heartbeat"] = now
            self.save()


class RecordingCallback(Callback):
    """Ray Tune callback feeding the process's active :class:`Recorder` (stateless: Tune pickles it
    into ``tuner.pkl`` and a resumed sweep gets it back)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.error(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.recover(trial)

    def on_step_end(self, iteration, trials, **info):
        if sweep_state.ACTIVE is not None:
            sweep_state.ACTIVE.heartbeat()


class ReattachingSearcher(Searcher):
    """Wraps the sweep's searcher: records each suggestion before its trial starts and, after a
    restore, replays the recorded trials Tune's saved state lacks (module docstring)."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self._suggested = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def suggest(self, trial_id: str):
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        index = self._suggested
        self._suggested += 1
        if sweep_state.ACTIVE is not None:
            config = sweep_state.ACTIVE.suggested(trial_id, config, index)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return state

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

