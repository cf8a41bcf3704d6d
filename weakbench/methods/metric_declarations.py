"""Every metric weakbench logs, declared once: its direction, unit, display name and meaning.

The leaderboard (ranking, the trivial-baseline comparison, the line under the board), the
registry, the search-space parser (the default selecting metric and its ``mode``), the sweep
and the dashboard read these facts here instead of keeping their own copies.

A metric key is ``<split>/[<namespace>/…]<name>`` (``val/max_box_acc_v2``,
``test/pseudo_masks/instance_miou``; see :mod:`weakbench.core.conventions`).
:func:`lookup` resolves a key to its :class:`MetricSpec`:

1. the leading split (``train``, ``val``, ``test``, or ``all`` of an evaluation run) is dropped;
2. leading segments are dropped one at a time (they are stage namespaces: ``pseudo_masks/``,
   ``mask_rcnn/``, ``attribute/``…) until what is left is a declared name, or a **variant
   prefix** followed by a declared name:

   * ``box_filled/<name>`` — the same score for the box itself filled as the mask (BBAM, CCGR:
     the trivial baseline of a box-supervised method);
   * ``box_crf/<name>`` — the score of a CRF run from the box prior alone (BBAM);
   * ``unrefined/<name>`` — the score of the boxes before refinement (CCGR);
   * ``pseudo_masks_with_labels/<name>`` — the score of pseudo masks made with each scored
     image's own class labels (CCGR's ``evaluate`` stage: a diagnostic; a wrong-class mask is
     impossible there, so it is not comparable with a score on held-out images without labels);
   * ``r<N>/<name>`` — the score after round N (CCGR);
   * prefixes chain: ``r1/refinement_gain/box_iou`` is round 1's gain of ``box_iou``;
   * ``gain_over_box/<name>``, ``refinement_gain/<name>``, ``round_gain/<name>`` — a difference of
     two such scores, in points of the name's unit, with the name's direction.

   Cost keys (``cost/train_seconds``, ``cost/<stage>_seconds``, ``cost/gpu_hours``…) are declared
   whole.

**Undeclared metrics** (the rule, no guess): :func:`lookup` returns ``None`` and :func:`spec`
raises :class:`UnknownMetricError`. An undeclared metric is still stored and shown with its
values, but nothing ranks or selects on it: the leaderboard, the registry and the search-space
parser refuse it with a message naming this file. A metric with ``direction=None`` (a
threshold, a count, a distance without a better side) is declared but is a *diagnostic*: shown,
never ranked or selected on. A method that logs a new score declares it in the same commit, on its
class (``Method.metrics``, a tuple of :func:`metric` specs registered with the method, as timm
registers a model's default config; registration fails for a name declared differently
elsewhere), or in :data:`~weakbench.methods.metric_specs.METRICS` when several methods log it.
"""

from __future__ import annotations

from typing import Optional

from weakbench.core.errors import UnknownNameError
from weakbench.methods.base import get_method_class, registered_metrics
from weakbench.methods.metric_specs import (  # the spec types and tables, re-exported (__all__): both are public
    COSTS, DEFAULT_HEADLINE, DEFAULT_SELECT_METRIC, DISPLAY_ORDER, GAINS, METRICS, SELECTION_SPLIT, VARIANTS,
    Direction, MechanismCheck, MetricSpec, RowDiagnostic, UnknownMetricError, bare_name, metric, stage_seconds_spec,
    variant_spec)


def lookup(key: str) -> Optional[MetricSpec]:
    """The spec of a metric key or bare name (module docstring), ``None`` when undeclared.

    >>> lookup("val/pseudo_masks/instance_miou").name
    'instance_miou'
    >>> lookup("test/pseudo_masks/box_filled/instance_miou").display
    'instance mIoU (box filled)'
    """
    if key in COSTS:
        return COSTS[key]
    found = stage_seconds_spec(key)
    if found is not None:
        return found
    parts = bare_name(key).split("/")
    for i in range(len(parts)):  # leading segments that resolve to nothing are stage namespaces
        found = _resolve(parts[i:])
        if found is not None:
            return found
    return None


def declared() -> dict[str, MetricSpec]:
    """Every declared metric by bare name: the common :data:`METRICS` and the ``Method.metrics`` of
    every registered method (registered with the method, as timm registers a model's default
    config; :func:`weakbench.methods.base.registered_metrics`)."""
    from weakbench.methods.base import registered_metrics

    return {**METRICS, **registered_metrics()}


def _resolve(parts: list[str]) -> Optional[MetricSpec]:
    """``[name]`` → its spec; ``[prefix, …, name]`` → the variant chain (``r1/refinement_gain/box_iou``)."""
    if len(parts) == 1:
        return METRICS.get(parts[0]) or _method_metric(parts[0])
    inner = _resolve(parts[1:])
    return variant_spec(parts[0], inner) if inner is not None else None


def _method_metric(name: str) -> Optional[MetricSpec]:
    return registered_metrics().get(name)


def spec(key: str) -> MetricSpec:
    """:func:`lookup` that raises :class:`UnknownMetricError` for an undeclared key."""
    s = lookup(key)
    if s is None:
        raise UnknownMetricError(
            f"metric {key!r} is not declared: add its direction, unit and meaning to the metrics of the method that "
            f"logs it (Method.metrics), or to METRICS in weakbench/methods/metric_specs.py for a metric "
            f"common to several methods (undeclared metrics are shown but never rank or select)")
    return s


def direction(key: str) -> Direction:
    """``"max"`` or ``"min"`` of a metric that can rank; raises :class:`ConfigError` for an
    undeclared metric or a diagnostic."""
    return "max" if spec(key).higher_is_better else "min"


def higher_is_better(key: str) -> bool:
    """True when a larger value of ``key`` is better (raises like :func:`direction`)."""
    return spec(key).higher_is_better


def headline_metric(method: str) -> str:
    """The bare name a method is ranked by when none is given (``Method.headline_metric``, checked
    to be declared and rankable); :data:`DEFAULT_HEADLINE` for an unknown method."""
    try:
        name = get_method_class(method).headline_metric
    except UnknownNameError:
        return DEFAULT_HEADLINE
    spec(name).higher_is_better  # noqa: B018 - raises for an undeclared or diagnostic headline
    return name


def default_select_metric(method: str) -> str:
    """``"val/<headline>"``: the validation key that selects ``method``'s configurations by default."""
    return f"{SELECTION_SPLIT}/{headline_metric(method)}"


def baseline_metric(key: str) -> Optional[str]:
    """For a box-supervised headline with a ``box_filled`` variant logged beside it, the key of that
    variant (``"test/pseudo_masks/instance_miou"`` → ``"test/pseudo_masks/box_filled/instance_miou"``);
    ``None`` for other keys. The caller checks the key was logged."""
    s = lookup(key)
    if s is None or s.base or s.name not in ("instance_miou", "map_r50", "map_r25"):
        return None
    head, _, name = key.rpartition("/")
    return f"{head}/box_filled/{name}" if head else f"box_filled/{name}"


def undeclared(keys) -> list[str]:
    """The ``val/`` and ``test/`` keys among ``keys`` that :func:`lookup` does not resolve (the keys
    selection and the board read; ``train/`` losses and ``cost/`` are not checked), sorted."""
    return sorted(k for k in keys if k.split("/", 1)[0] in ("val", "test") and lookup(k) is None)

__all__ = ("MetricSpec", "MechanismCheck", "RowDiagnostic", "metric", "declared", "METRICS", "COSTS", "VARIANTS", "GAINS", "UnknownMetricError", "lookup", "spec", "direction",
           "higher_is_better", "headline_metric", "undeclared", "default_select_metric", "baseline_metric", "bare_name",
           "DEFAULT_HEADLINE", "DEFAULT_SELECT_METRIC", "SELECTION_SPLIT", "DISPLAY_ORDER")
