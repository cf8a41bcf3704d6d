"""The metric specs and the common metric tables: the types a method declares its metrics with
(:class:`MetricSpec`, :func:`metric`, :class:`MechanismCheck`, :class:`RowDiagnostic`) and the
metrics several methods log (:data:`METRICS`, :data:`COSTS`, the variant prefixes).

This module knows no method: :mod:`weakbench.methods.base` imports it to register a method's own
metrics, and :mod:`weakbench.methods.metric_declarations` resolves a logged key against these
tables and the registered methods (the rules are in that module's docstring). Keeping the two apart
keeps the import graph one-way (``base`` → ``metric_specs`` ← ``metric_declarations`` → ``base``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal, Optional

from weakbench.core.errors import ConfigError

Direction = Literal["max", "min"]

#: the metric that selects when a method names none (``Method.headline_metric``'s default)
DEFAULT_HEADLINE = "max_box_acc_v2"
#: the split every selection is made on (never ``test``)
SELECTION_SPLIT = "val"
DEFAULT_SELECT_METRIC = f"{SELECTION_SPLIT}/{DEFAULT_HEADLINE}"

_SPLIT_HEADS = ("train", "val", "test", "all")


class UnknownMetricError(ConfigError):
    """A metric key that :data:`METRICS` does not declare (see the module docstring's rule)."""


@dataclass(frozen=True)
class MetricSpec:
    """What one metric is.

    Attributes:
        name: the bare name (``max_box_acc_v2``); a variant's name keeps its prefix
            (``box_filled/instance_miou``).
        direction: ``"max"`` (higher is better), ``"min"`` (lower is better) or ``None`` (a
            diagnostic: shown, never ranked or selected on).
        unit: ``"%"`` (0–100), ``"points"`` (a difference of percentages), ``"ratio"``,
            ``"threshold"`` (a map value in [0, 1]), ``"count"``, ``"s"``, ``"h"``, ``"loss"``.
        display: the short name a paper uses (``"MaxBoxAccV2"``).
        description: one plain sentence for a reader who does not know the field.
        selects_on: the split a configuration is selected on with this metric (``"val"``).
        base: for a variant, the declared name it is derived from; else ``""``.
    """

    name: str
    direction: Optional[Direction]
    unit: str
    display: str
    description: str
    selects_on: str = SELECTION_SPLIT
    base: str = ""

    @property
    def higher_is_better(self) -> bool:
        """True for ``max``; raises :class:`ConfigError` for a diagnostic (no direction)."""
        if self.direction is None:
            raise ConfigError(f"metric {self.name!r} ({self.display}) is a diagnostic with no better direction; "
                              f"it cannot rank or select (weakbench/methods/metric_specs.py)")
        return self.direction == "max"

    def explain(self) -> str:
        """The description with its range and direction: ``"share of images … (%, 0–100; higher is
        better)"``."""
        unit = {"%": "%, 0–100", "points": "difference in percentage points"}.get(self.unit, self.unit)
        way = {"max": "higher is better", "min": "lower is better", None: "a diagnostic, not a score"}[self.direction]
        return f"{self.description} ({unit}; {way})"


@dataclass(frozen=True)
class MechanismCheck:
    """A diagnostic that shows a method's mechanism ran (``Method.mechanism_checks``); the board
    flags a row whose check fails, in words.

    Attributes:
        metric: a declared bare name, matched against the run's logged keys ending in
            ``/<metric>`` (test first, then val, then train).
        fails_below, fails_above: the check fails when the value (mean over the row's runs) is
            below / above this (in the metric's unit).
        words: the flag, formatted with ``value``, e.g. ``"CRR inactive: {value:.0f} % of sets
            hold one image"``.
    """

    metric: str
    words: str
    fails_below: Optional[float] = None
    fails_above: Optional[float] = None

    def fails(self, value: float) -> bool:
        """Whether ``value`` fails the check (NaN never does)."""
        if value != value:
            return False
        return ((self.fails_below is not None and value < self.fails_below)
                or (self.fails_above is not None and value > self.fails_above))


@dataclass(frozen=True)
class RowDiagnostic:
    """A diagnostic every board row of a method shows in words (``Method.row_diagnostics``), beside
    its scores and never ranked: e.g. CCGR's proposal recall (the ceiling of its boxes) and its bags
    against random bags of the same size.

    Attributes:
        metrics: declared bare names, each matched as :class:`MechanismCheck` does (the run's
            logged key ending in ``/<metric>``, test first, then val, then train; mean over the
            row's runs).
        words: formatted with each metric's value by name, e.g. ``"proposal recall@0.5
            {proposal_recall:.0f} %"``.
    """

    metrics: tuple[str, ...]
    words: str

    def text(self, values: dict[str, float]) -> Optional[str]:
        """The words with ``values`` filled in; None when one of :attr:`metrics` is missing or NaN."""
        if any(values.get(m) is None or values[m] != values[m] for m in self.metrics):
            return None
        return self.words.format(**{m: values[m] for m in self.metrics})


def metric(name: str, direction: Optional[Direction], unit: str, display: str, description: str) -> MetricSpec:
    """A :class:`MetricSpec` selected on :data:`SELECTION_SPLIT` (what a method lists in its
    ``Method.metrics``)."""
    return MetricSpec(name, direction, unit, display, description)


_m = metric


_BOX_IOU = "overlaps a true box by IoU ≥ {d} (intersection over union: the shared area divided by the joint area)"

_DECLARED: list[MetricSpec] = [
    # ---------------------------------------------------------------- WSOL (Choe et al. 2020)
    _m("max_box_acc_v2", "max", "%", "MaxBoxAccV2",
       "share of images where a box drawn around the method's map overlaps a true box by IoU ≥ 0.3, 0.5 and 0.7, "
       "averaged over the three, each at the map threshold that works best"),
    _m("max_box_acc", "max", "%", "MaxBoxAcc",
       "share of images where the box around the largest region of the method's map overlaps a true box by "
       "IoU ≥ 0.5, at the map threshold that works best"),
    *[_m(f"max_box_acc_v2_iou{d}", "max", "%", f"MaxBoxAccV2@{d}",
         f"share of images where a box drawn around the method's map {_BOX_IOU.format(d=f'0.{d // 10}')}, "
         "at the map threshold that works best") for d in (30, 50, 70)],
    _m("best_threshold", None, "threshold", "best threshold",
       "the map threshold at which MaxBoxAcc is reached"),
    *[_m(f"best_threshold_v2_iou{d}", None, "threshold", f"best threshold@{d}",
         f"the map threshold at which MaxBoxAccV2@{d} is reached") for d in (30, 50, 70)],
    _m("pxap", "max", "%", "PxAP",
       "how well the map's values rank object pixels above background pixels against the true masks "
       "(area under the precision-recall curve over all thresholds)"),
    _m("top1_loc", "max", "%", "Top-1 Loc",
       "share of images whose top predicted class is right and whose box overlaps a true box by IoU ≥ 0.5"),
    _m("top5_loc", "max", "%", "Top-5 Loc",
       "share of images whose true class is among the top 5 predicted and whose box overlaps a true box by IoU ≥ 0.5"),
    # ---------------------------------------------------------------- segmentation and classification
    _m("miou", "max", "%", "mIoU",
       "the overlap (intersection over union) of the predicted masks with the true masks, averaged over the "
       "classes and the background"),
    _m("best_bg_threshold", None, "threshold", "best background threshold",
       "the background threshold at which the semantic mIoU is reached"),
    _m("cls_map", "max", "%", "classification mAP",
       "how well the image-level class scores rank the images that contain each class above those that do not, "
       "averaged over the classes"),
    _m("cls_acc", "max", "%", "top-1 accuracy", "share of images whose top predicted class is right"),
    _m("num_images", None, "count", "images", "how many images were scored"),
    _m("loss", "min", "loss", "loss", "the training objective the method minimises"),
    # ---------------------------------------------------------------- instance masks (BBAM, CCGR) and counts
    _m("instance_miou", "max", "%", "instance mIoU",
       "the overlap (IoU) of each object's pseudo mask with its true mask, averaged over the objects"),
    _m("num_instances", None, "count", "instances", "how many object masks were scored"),
    _m("abo", "max", "%", "ABO",
       "for each true object, the best overlap (IoU) of any predicted mask with it, averaged over the objects"),
    _m("boxes", None, "count", "boxes", "how many boxes were processed"),
    _m("images", None, "count", "images", "how many images the stage processed"),
    _m("cls_chance", None, "%", "chance top-1", "top-1 accuracy of guessing a class uniformly at random (100 / classes)"),
    _m("max_box_acc_at_val_tau", "max", "%", "MaxBoxAcc@val τ",
       "share of images localised (IoU ≥ 0.5, largest region) at the map threshold chosen on the validation split: "
       "the accuracy a user who deploys the model gets"),
    _m("max_box_acc_v2_at_val_tau", "max", "%", "MaxBoxAccV2@val τ",
       "MaxBoxAccV2 with each IoU level's map threshold chosen on the validation split instead of on the scored "
       "images"),
    _m("miou_at_val_tau", "max", "%", "mIoU@val bg threshold",
       "the semantic mIoU at the background threshold chosen on the validation split (the test split's own best "
       "threshold gives mIoU)"),
]

#: COCO instance metrics: (name, display, what counts as a hit)
_COCO = [
    ("ap", "AP", "averaged over IoU thresholds 0.5 to 0.95"), ("ap50", "AP50", "at IoU ≥ 0.5"),
    ("ap75", "AP75", "at IoU ≥ 0.75"), ("ap70", "AP70", "at IoU ≥ 0.7"),
    ("ap_s", "AP (small)", "for small objects, averaged over IoU 0.5 to 0.95"),
    ("ap_m", "AP (medium)", "for medium objects, averaged over IoU 0.5 to 0.95"),
    ("ap_l", "AP (large)", "for large objects, averaged over IoU 0.5 to 0.95"),
    ("map_r25", "mAP^r@0.25", "at IoU ≥ 0.25"), ("map_r50", "mAP^r@0.5", "at IoU ≥ 0.5"),
]
#: mAP^r is PASCAL VOC's per-class AP (weakbench.core.metrics.voc_instance_ap), not COCOeval's
_VOC = ("map_r25", "map_r50")
for _prefix, _what, _thing in (("", "mask", "masks"), ("segm_", "mask", "masks"), ("bbox_", "box", "boxes")):
    for _name, _disp, _hit in _COCO:
        _DECLARED.append(_m(f"{_prefix}{_name}", "max", "%", f"{_what} {_disp}",
                            f"how well the predicted {_thing} find the true objects, ranked by confidence, counting a "
                            f"hit {_hit} ("
                            + ("PASCAL VOC average precision per class, averaged over the classes" if _name in _VOC
                               else "COCO average precision") + ")"))

#: the metrics common to several methods (the WSOL protocol, masks, classification, COCO), by bare
#: name; a method's own metrics are declared on its class (``Method.metrics``): :func:`declared`
METRICS: dict[str, MetricSpec] = {s.name: s for s in _DECLARED}
assert len(METRICS) == len(_DECLARED), "a metric is declared twice"

#: cost keys, declared whole (``cost/<stage>_seconds`` is matched by :data:`_STAGE_SECONDS`)
COSTS: dict[str, MetricSpec] = {
    "cost/train_seconds": _m("cost/train_seconds", "min", "s", "train seconds", "wall-clock seconds of training"),
    "cost/cpu_hours": _m("cost/cpu_hours", "min", "h", "CPU-hours", "wall-clock hours times the CPUs held"),
    "cost/gpu_hours": _m("cost/gpu_hours", "min", "h", "GPU-hours", "wall-clock hours times the GPUs held"),
}
_STAGE_SECONDS = re.compile(r"^cost/(\w+)_seconds$")


def stage_seconds_spec(key: str) -> Optional[MetricSpec]:
    """The spec of a ``cost/<stage>_seconds`` key (lower is better, seconds); ``None`` for another key."""
    m = _STAGE_SECONDS.match(key)
    if m is None:
        return None
    return _m(key, "min", "s", f"{m.group(1)} seconds", f"wall-clock seconds of the {m.group(1)} stage")

#: variant prefixes: (display format, description format); ``{d}`` display, ``{s}`` description
VARIANTS: dict[str, tuple[str, str]] = {
    "box_filled": ("{d} (box filled)", "the same score for the box itself filled as the mask, the baseline a "
                                       "box-supervised method must beat: {s}"),
    "box_crf": ("{d} (CRF from the box)", "the same score for a CRF run from the box alone, without attribution: {s}"),
    "unrefined": ("{d} (unrefined boxes)", "the same score for the boxes before refinement: {s}"),
    "pseudo_masks_with_labels": ("{d} (pseudo masks, image labels given)",
                                 "a diagnostic: the same score for pseudo masks made with each scored image's own class "
                                 "labels, so no mask can have a wrong class (not the paper's protocol, which scores the "
                                 "instance branch on held-out images without labels): {s}"),
}
_ROUND = re.compile(r"^r(\d+)$")
#: difference prefixes: what is subtracted from what
GAINS: dict[str, str] = {
    "gain_over_box": "how much the method's score exceeds the box-filled baseline's",
    "refinement_gain": "how much refinement raises the score",
    "round_gain": "how much the last round raises the score over round 1",
}


def variant_spec(prefix: str, base: MetricSpec) -> Optional[MetricSpec]:
    """The spec of ``<prefix>/<base>``: a :data:`VARIANTS` prefix, a round ``r<N>`` or a :data:`GAINS`
    difference of ``base``; ``None`` for an unknown prefix."""
    name, root = f"{prefix}/{base.name}", base.base or base.name
    if prefix in VARIANTS:
        d, s = VARIANTS[prefix]
        return dataclasses.replace(base, name=name, display=d.format(d=base.display),
                                   description=s.format(s=base.description), base=root)
    m = _ROUND.match(prefix)
    if m:
        return dataclasses.replace(base, name=name, display=f"{base.display} (round {m.group(1)})",
                                   description=f"{base.description}, after round {m.group(1)}", base=root)
    if prefix in GAINS and base.direction is not None:
        return dataclasses.replace(base, name=name, unit="points" if base.unit == "%" else base.unit,
                                   display=f"Δ {base.display}", base=root,
                                   description=f"{GAINS[prefix]} ({base.display}: {base.description})")
    return None


def bare_name(key: str) -> str:
    """``"val/pseudo_masks/instance_miou"`` → ``"pseudo_masks/instance_miou"`` (the split dropped)."""
    head, sep, rest = key.partition("/")
    return rest if sep and head in _SPLIT_HEADS else key


#: order in which reported metrics follow the selecting one on the board (the scores people quote)
DISPLAY_ORDER: tuple[str, ...] = ("max_box_acc_v2", "max_box_acc", "pxap", "miou", "instance_miou", "map_r50",
                                  "map_r25", "box_map50", "proposal_recall", "pseudo_mask_miou", "robust_accuracy", "cam_iou", "cls_map", "cls_acc",
                                  "top1_loc", "top5_loc")
