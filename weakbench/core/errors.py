"""Errors raised by weakbench for bad user input.

Every message names the file (when there is one), the field, and the fix, so that the CLI can
print it on one line and exit non-zero.
"""

from __future__ import annotations

import math
import sys
from typing import Iterable, Mapping


_DBL_MAX = sys.float_info.max  # what MLflow's SQL stores return for ±inf


class WeakbenchError(Exception):
    """Base class of every user-facing error; the CLI prints ``str(err)`` and exits with 2."""


class DataError(WeakbenchError):
    """A dataset file is missing, malformed, or an image does not decode."""


class ConfigError(WeakbenchError):
    """A configuration or search-space file is invalid (unknown key, value out of range, …)."""


class UnknownNameError(WeakbenchError):
    """An unknown method, backbone, metric or model name was requested."""


class PluginError(WeakbenchError):
    """A method plugin (a ``weakbench.methods`` package entry point) does not load or registers no
    method of its name; the message names the entry point and its distribution."""


class DivergenceError(WeakbenchError, ArithmeticError):
    """Training diverged: a loss or metric is NaN or infinite.

    The trial must fail (its MLflow run ends FAILED with the message in tag ``weakbench.error``)
    and never reach the leaderboard or the registry. Raised by :func:`check_finite`.

    Attributes:
        where: what was checked, e.g. ``"epoch 3 train losses"``.
        keys: the non-finite metric names, sorted.
    """

    def __init__(self, where: str, keys: list[str], values: dict[str, float] | None = None):
        self.where, self.keys, self.values = where, list(keys), dict(values or {})
        shown = ", ".join(f"{k}={self.values[k]!r}" if k in self.values else k for k in self.keys)
        super().__init__(f"{where}: non-finite value(s) {shown}; training diverged (lower the learning rate, "
                         f"clip gradients, or check the data)")

    def __reduce__(self):  # Ray pickles exceptions between processes: keep the constructor's arguments
        return (type(self), (self.where, self.keys, self.values))


def check_finite(metrics: Mapping[str, float], where: str) -> None:
    """Raise :class:`DivergenceError` naming every key of ``metrics`` whose value is NaN or ±inf.

    ±``sys.float_info.max`` counts as infinite: MLflow's SQL stores write ±inf as that value, so
    a metric read back from MLflow keeps its meaning.

    Args:
        metrics: name → number (Python floats/ints, NumPy scalars or 0-d tensors; anything
            ``float()`` accepts). Non-numeric values (strings, None) are not checked.
        where: what is checked, quoted in the message (``"epoch 3 train losses"``).

    Raises:
        DivergenceError: at least one value is non-finite; ``.keys`` lists them sorted.
    """
    bad: dict[str, float] = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, (str, bytes, bool)):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(f) or abs(f) >= _DBL_MAX:
            bad[str(k)] = f
    if bad:
        raise DivergenceError(where, sorted(bad), bad)


def is_finite_metrics(metrics: Mapping[str, float]) -> bool:
    """True when every numeric value of ``metrics`` is finite (the rule that keeps diverged runs
    off the leaderboard and out of the registry)."""
    try:
        check_finite(metrics, "metrics")
    except DivergenceError:
        return False
    return True


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between ``a`` and ``b`` (insertions, deletions and substitutions cost 1);
    e.g. ``edit_distance("resnet19", "resnet18") == 1``."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates closest to ``name`` by :func:`edit_distance` (ties: alphabetical), for a
    "did you mean" in an error: ``nearest("resnet19", timm.list_models())[0] == "resnet18"``."""
    return sorted(set(candidates), key=lambda c: (edit_distance(name, c), c))[:n]
