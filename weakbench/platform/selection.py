"""The one selection rule: which configuration a sweep selects, and which of its runs stands for it.

Every surface uses :func:`select`: the sweep summary (:func:`weakbench.platform.sweep.select_best_run`),
the live header (:meth:`weakbench.platform.live.SweepView.selected_row`), the registry
(``registry._select_run``) and the leaderboard (:func:`weakbench.platform.leaderboard.build_leaderboard`).

* A **configuration** is identified by :func:`weakbench.platform.results.config_group` of its
  params (every param but ``seed``).
* Among the candidates (finished runs whose metrics are all finite and that logged the
  selecting metric), the configuration with the best **mean over its seeds** of the selecting
  metric wins (runs repeating a seed are averaged first), in the metric's direction; ties go to
  the configuration with more seeds, then to the smaller configuration key.
* Its **best run** is the one with the best value; ties go to the run that started first, then
  to the smaller run id. That run is what ``register`` registers and what the summary names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One run that may be selected.

    Attributes:
        ref: whatever the caller needs back (an MLflow run, a table row index, a trial row).
        config: the configuration key (:func:`weakbench.platform.results.config_group`).
        seed: the run's seed (``None``: a seed of its own).
        value: the selecting metric's final value (finite).
        order: tie-break among equal runs, ascending (e.g. ``(start time, run id)``).
    """

    ref: Any
    config: str
    seed: Hashable
    value: float
    order: tuple = ()


def config_means(cands: Sequence[Candidate]) -> dict[str, tuple[float, int]]:
    """``{config: (mean over seeds of the value, number of seeds)}``."""
    per: dict[str, dict[Hashable, list[float]]] = {}
    for i, c in enumerate(cands):
        seed = c.seed if c.seed is not None else ("run", i)
        per.setdefault(c.config, {}).setdefault(seed, []).append(c.value)
    return {g: (sum(sum(v) / len(v) for v in seeds.values()) / len(seeds), len(seeds)) for g, seeds in per.items()}


def select(cands: Sequence[Candidate], higher_is_better: bool) -> tuple[str, Candidate] | None:
    """The selected configuration and its best run (module docstring); ``None`` without candidates."""
    if not cands:
        return None
    means = config_means(cands)
    sign = 1.0 if higher_is_better else -1.0
    config = min(means, key=lambda g: (-sign * means[g][0], -means[g][1], g))
    runs = [c for c in cands if c.config == config]
    best = min(runs, key=lambda c: (-sign * c.value, c.order))
    return config, best
