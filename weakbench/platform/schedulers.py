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

The class lives in the Ray adapter (:class:`weakbench.platform.launch.ConfigurationASHA`: it reads
the private state of Ray's ``AsyncHyperBandScheduler``) and the configuration key in the plan
(:func:`weakbench.platform.sweep_plan.configuration_key`). This module keeps their names: Tune
pickles the scheduler of a running sweep under ``weakbench.platform.schedulers.ConfigurationASHA``,
and ``--resume`` of such a sweep unpickles it from here.
"""

from weakbench.platform.launch import ConfigurationASHA  # noqa: F401
from weakbench.platform.sweep_plan import REPEAT_KEYS, configuration_key  # noqa: F401
