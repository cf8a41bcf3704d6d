"""Trivial baselines beside every WSOL sweep, so that every board carries them.

Choe et al. (CVPR 2020, Sec. 5) show that a centre Gaussian with no training is a strong WSOL
baseline; a board without it cannot say whether a method localises at all. After a sweep of a
classifier → CAM method, :func:`missing_baselines` names the trivial baselines
(:data:`~weakbench.core.conventions.TRIVIAL_BASELINES`) that have no finished run yet on the
same dataset (fingerprint), selection split and input size in the sweep's MLflow experiment, and
:func:`baseline_sweep_options` gives the sweep that adds each one: its own search space
(``search_spaces/<baseline>.yaml``, σ selected on val), the sweep's data, split seed, tracking
and output directory, and the sweep's input size, so the rows go through the same sweep,
tracking, results store and leaderboard as every method. They need no training (two eval stages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weakbench.core import conventions as C


def applies_to(method: str) -> bool:
    """True for the methods whose board is a WSOL board (classifier → CAM methods, the baselines
    excluded): box metrics that a centre Gaussian also gets."""
    from weakbench.methods import get_method_class

    cls = get_method_class(method)
    return getattr(cls, "shape", None) == "classifier_cam" and method not in C.TRIVIAL_BASELINES


def missing_baselines(client, experiment_id: str, *, fingerprint: str, input_size: int) -> list[str]:
    """The trivial baselines without a FINISHED trial run on this dataset ``fingerprint`` at
    ``input_size`` in ``experiment_id`` (``input_size`` compared as MLflow stores params, text)."""
    missing = []
    for name in C.TRIVIAL_BASELINES:
        runs = client.search_runs(
            [experiment_id],
            filter_string=(f"tags.`{C.TAG_METHOD}` = '{name}' and tags.`{C.TAG_DATASET_FINGERPRINT}` = '{fingerprint}' "
                           f"and tags.`{C.TAG_KIND}` = '{C.KIND_TRIAL}' and attributes.status = 'FINISHED' "
                           f"and params.input_size = '{int(input_size)}'"),
            max_results=1)
        if not runs:
            missing.append(name)
    return missing


def baseline_space(name: str) -> Path:
    """The search space of trivial baseline ``name`` (its method's default space file)."""
    from weakbench.methods import get_method_class

    return Path(get_method_class(name).default_search_space())


def baseline_sweep_options(opts, name: str, *, input_size: int):
    """``SweepOptions`` of the sweep that adds baseline ``name`` beside sweep ``opts``: same data,
    split seed, output directory, tracking URI, experiment and Ray target; the baseline's own
    space with every grid point run once (the ``random`` searcher crosses grid axes; Optuna would
    sample the σ grid as a categorical and could miss a value), σ chosen on val; ``input_size``
    fixed to the sweep's."""
    from weakbench.platform.search_space import load_search_space

    space = load_search_space(baseline_space(name))
    update: dict[str, Any] = {
        "space": str(baseline_space(name)), "name": None, "resume": False, "trials": max(1, space.num_grid_points()),
        "overrides": {"input_size": int(input_size)}, "num_workers": 1, "use_gpu": False, "executor": "auto",
        "log_model": True, "searcher": "random",  # Tune's variant generator crosses the σ grid: every σ once
    }
    return opts.model_copy(update=update)


AFTER = "-after-"


def automatic_sweep_name(baseline: str, after: str) -> str:
    """The name of the sweep that adds ``baseline`` after the user's sweep ``after``
    (``center_gaussian-after-cam-synthetic-20261206-101500-ab12``): it says where it came from,
    and :func:`is_automatic_sweep` tells it from a sweep the user started."""
    return f"{baseline}{AFTER}{after}"


def is_automatic_sweep(name: str) -> bool:
    """Whether sweep ``name`` is one that ``weakbench sweep`` started by itself to add a trivial
    baseline (:func:`automatic_sweep_name`), not one the user started."""
    head, sep, _ = name.partition(AFTER)
    return bool(sep) and head in C.TRIVIAL_BASELINES
