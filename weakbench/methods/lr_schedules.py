"""Learning-rate schedules of a fit stage, built from torch's own schedulers (no Ray, no MLflow).

A schedule multiplies each parameter group's *own* initial learning rate by a factor of the
training step ``t`` (0-based, one step per mini-batch, ``T = epochs * steps_per_epoch``), so
per-group multipliers (``backbone_lr_mult``) keep their ratio throughout training:

* ``"constant"`` — no scheduler (the lr never changes).
* ``"poly"`` — :class:`torch.optim.lr_scheduler.LambdaLR` with factor ``(1 − t/T)^power``
  (Puzzle-CAM's official ``PolyOptimizer``, power 0.9).
* ``"step"`` — :class:`torch.optim.lr_scheduler.MultiStepLR`: the factor is multiplied by
  ``gamma`` at each milestone; a milestone given as the fraction ``f`` of training is the first
  step ``t`` with ``t/T ≥ f`` (:func:`milestone_steps`). MinMaxCAM's official code decays ×0.1
  after epochs 50 and 100 of 200: fractions (0.25, 0.5).
* ``"cosine"`` — :class:`torch.optim.lr_scheduler.CosineAnnealingLR` over ``T`` steps to 0.

The engine (:mod:`weakbench.platform.engine`) steps every scheduler of a stage once after each
training step and saves their ``state_dict`` in the trial checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

LRSchedule = Literal["constant", "poly", "step", "cosine"]

__all__ = ["LRSchedule", "milestone_steps", "poly_factor", "build_lr_scheduler", "scheduler_from_config", "describe_setting"]


def milestone_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """Milestones as fractions of training → step indices.

    Args:
        fractions: values in (0, 1), increasing.
        total_steps: ``T ≥ 0`` (0 is treated as 1).

    Returns:
        For each fraction ``f`` the first step ``t`` with ``t / T ≥ f``, i.e. ``ceil(f·T)``
        (a tolerance of 1e-9 absorbs float error: 0.3 · 10 is step 3). Steps that coincide (short
        training) are kept twice, so both decays apply there (``MultiStepLR`` counts them).
    """
    t = max(1, int(total_steps))
    return [max(1, math.ceil(float(f) * t - 1e-9)) for f in fractions]


def poly_factor(step: int, total_steps: int, power: float) -> float:
    """Poly decay factor ``max(0, 1 − step/T)^power`` (``T = max(1, total_steps)``)."""
    return max(0.0, 1.0 - step / max(1, int(total_steps))) ** float(power)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, schedule: LRSchedule,
                       poly_power: float = 0.9, milestones: Sequence[float] = (0.5, 0.75),
                       gamma: float = 0.1) -> LRScheduler | None:
    """A torch scheduler for ``optimizer`` over ``total_steps`` steps, or ``None`` for ``"constant"``.

    Build it **before** loading the optimiser's state dict when resuming (the constructor sets each
    group's lr to its initial value; the loaded state then restores the lr reached), then load the
    scheduler's own state dict.

    Raises:
        ValueError: an unknown ``schedule``.
    """
    t = max(1, int(total_steps))
    if schedule == "constant":
        return None
    if schedule == "poly":
        power = float(poly_power)
        return LambdaLR(optimizer, lambda step: poly_factor(step, t, power))
    if schedule == "step":
        return MultiStepLR(optimizer, milestones=milestone_steps(milestones, t), gamma=float(gamma))
    if schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=t)
    raise ValueError(f"unknown lr_schedule {schedule!r}; use one of constant, poly, step, cosine")


def scheduler_from_config(optimizer: torch.optim.Optimizer, total_steps: int, config: Any) -> LRScheduler | None:
    """:func:`build_lr_scheduler` with the ``lr_schedule``, ``poly_power``, ``lr_milestones`` and
    ``lr_gamma`` fields of a method config (:class:`weakbench.methods.base.MethodConfig`)."""
    return build_lr_scheduler(optimizer, total_steps, schedule=config.lr_schedule, poly_power=config.poly_power,
                              milestones=config.lr_milestones, gamma=config.lr_gamma)


def describe_setting(setting: Mapping[str, Any]) -> str:
    """``"key=value, …"`` of a named setting, for schema descriptions (one source for the values)."""
    return ", ".join(f"{k}={v}" for k, v in setting.items())
