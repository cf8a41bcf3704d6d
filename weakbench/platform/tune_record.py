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

import time
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from weakbench.platform import sweep_state
# the local-fault rule and Ray Train's failure policy live in the Ray adapter (they read private
# Ray APIs); their names stay importable here (the engine and older callers import them from here)
from weakbench.platform.launch import (FATAL_ERRNOS, FATAL_KEY, LocalFaultPolicy, end_on_local_fault,  # noqa: F401
                                       local_fault, local_fault_error, local_fault_trainer, tune_error_text)
from weakbench.platform.sweep_state import ENDED, HEARTBEAT_S, TRIAL_ID_KEY, SweepState


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
        entry = self._entry(trial)
        entry.update(status="failed", ended=time.time(), error=tune_error_text(trial))
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

    @property
    def metric(self) -> str:
        """The wrapped searcher's metric (set by it, not copied: no private attribute is written)."""
        return self.searcher.metric

    @property
    def mode(self) -> str:
        return self.searcher.mode

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

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

