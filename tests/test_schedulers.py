"""ConfigurationASHA: early stopping acts on a configuration (all its seed repeats), with ASHA's
cutoff over configurations. Driven with Tune's own Trial objects, no cluster needed."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from weakbench.platform.schedulers import ConfigurationASHA, configuration_key

CONT, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _trial(lr: float, seed: int, index: int) -> Trial:
    return Trial("__fake", config={"lr": lr, "seed": seed, "__trial_index__": index}, stub=True)


def _sched(**kw) -> ConfigurationASHA:
    s = ConfigurationASHA(time_attr="progress", metric="val/m", mode="max", max_t=8, grace_period=1,
                          reduction_factor=2, **kw)
    return s


def _report(s, trial, t, value):
    return s.on_trial_result(None, trial, {"progress": t, "val/m": value})


def test_key_ignores_seed_and_repeat_index_only():
    assert configuration_key({"lr": 0.1, "seed": 0, "__trial_index__": 0}) == \
        configuration_key({"seed": 1, "__trial_index__": 1, "lr": 0.1})
    assert configuration_key({"lr": 0.1, "seed": 0}) != configuration_key({"lr": 0.2, "seed": 0})


def test_seed_repeats_share_their_fate():
    s = _sched()
    a0, a1, b0, b1 = _trial(0.1, 0, 0), _trial(0.1, 1, 1), _trial(0.2, 0, 2), _trial(0.2, 1, 3)
    for t in (a0, a1, b0, b1):
        s.on_trial_add(None, t)
    # Ray's rungs 1, 2, 4, 8 (the one at max_t is never reached: max_t ends the trial)
    assert s._milestones == [8, 4, 2, 1]
    assert _report(s, a0, 1, 50.0) == CONT  # nothing to compare with
    assert _report(s, a1, 1, 10.0) == CONT  # same configuration: same decision, though it is poor
    # configuration a's score at rung 1 is the seed mean, 30; b0 at 20 is below the median of {30}
    assert _report(s, b0, 1, 20.0) == STOP
    # b's other seed stops at its next report, whatever its value
    assert _report(s, b1, 1, 99.0) == STOP
    # a keeps going; at rung 2 it is alone, so it continues
    assert _report(s, a0, 2, 55.0) == CONT and _report(s, a1, 2, 12.0) == CONT
    # end of the plan: ASHA's normal stop at max_t
    assert _report(s, a0, 8, 60.0) == STOP


def test_plain_asha_would_stop_a_seed_repeat():
    """The difference that motivates it: Ray's ASHA stops the poor seed of a good configuration."""
    from ray.tune.schedulers import ASHAScheduler

    ray_asha = ASHAScheduler(time_attr="progress", metric="val/m", mode="max", max_t=8, grace_period=1,
                             reduction_factor=2)
    a0, a1 = _trial(0.1, 0, 0), _trial(0.1, 1, 1)
    for t in (a0, a1):
        ray_asha.on_trial_add(None, t)
    assert _report(ray_asha, a0, 1, 50.0) == CONT
    assert _report(ray_asha, a1, 1, 10.0) == STOP
    ours = _sched()
    for t in (a0, a1):
        ours.on_trial_add(None, t)
    assert _report(ours, a0, 1, 50.0) == CONT and _report(ours, a1, 1, 10.0) == CONT


def test_min_mode_and_state_survives_pickling(tmp_path):
    s = ConfigurationASHA(time_attr="progress", metric="val/loss", mode="min", max_t=4, grace_period=1,
                          reduction_factor=2)
    a, b = _trial(0.1, 0, 0), _trial(0.2, 0, 1)
    s.on_trial_add(None, a)
    s.on_trial_add(None, b)
    assert s.on_trial_result(None, a, {"progress": 1, "val/loss": 1.0}) == CONT
    assert s.on_trial_result(None, b, {"progress": 1, "val/loss": 2.0}) == STOP  # higher loss is worse
    path = tmp_path / "sched.pkl"
    s.save(str(path))
    r = ConfigurationASHA(time_attr="progress", metric="val/loss", mode="min", max_t=4, grace_period=1,
                          reduction_factor=2)
    r.restore(str(path))
    b2 = _trial(0.2, 1, 2)
    r.on_trial_add(None, b2)
    assert r.on_trial_result(None, b2, {"progress": 1, "val/loss": 0.1}) == STOP  # its configuration was stopped


def test_one_bracket_only():
    with pytest.raises(ValueError, match="one bracket"):
        ConfigurationASHA(time_attr="progress", metric="m", mode="max", max_t=4, brackets=2)
