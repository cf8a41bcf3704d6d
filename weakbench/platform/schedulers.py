"""Early stopping that acts on configurations, not on seed repeats.

Tune's ASHA decides per trial. A sweep runs every configuration once per seed (the ``seed`` grid
axis, through Tune's ``Repeater``), so plain ASHA stops individual seed repeats: a configuration
can finish with one seed of three, and its "mean over seeds" on the leaderboard is one number.
:class:`ConfigurationASHA` is ASHA (Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020) over configurations:

* a configuration's key is its trial config without ``seed`` and the repeater's
  ``__trial_index__``; every seed repeat of it shares its fate;
* at each rung the configuration's score is the mean of the values its seeds reported there
  (the first report at or past the rung's milestone, as in ASHA);
* the decision at a rung is taken once per configuration, by the first of its seeds to reach
  it, against the rung's cutoff over the *other* configurations' scores (ASHA's
  ``1 − 1/reduction_factor`` quantile; no cutoff while no other configuration is recorded);
  later seeds reaching that rung get the same decision;
* once a configuration is stopped, each of its other seeds stops at its next report (a repeat
  that starts later stops at its first report), so a configuration either reaches the end with
  every seed or is stopped with every seed.

The choice that the first seed decides (rather than waiting for all seeds at each rung) keeps
trials asynchronous: a trial cannot wait for its siblings without being paused, which costs a
checkpoint round trip per rung. Its score at the rung still becomes the seed mean as siblings
arrive, which is what later configurations are compared with.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from weakbench.platform.sweep_state import note_scheduler_stop

#: config keys that distinguish seed repeats of one configuration (and the id with which
#: ``--resume`` replays a recorded trial, :data:`weakbench.platform.sweep_state.TRIAL_ID_KEY`)
REPEAT_KEYS = ("seed", "__trial_index__", "__trial_id__")


def configuration_key(config: dict[str, Any]) -> str:
    """A stable key of ``config`` without its seed (``REPEAT_KEYS``): equal for the seed repeats
    of one configuration, different otherwise."""
    return json.dumps({k: config[k] for k in sorted(config) if k not in REPEAT_KEYS}, sort_keys=True, default=repr)


class ConfigurationASHA(AsyncHyperBandScheduler):
    """ASHA whose unit is a configuration (all its seed repeats); see the module docstring.

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
