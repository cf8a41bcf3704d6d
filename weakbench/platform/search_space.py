"""Search spaces as YAML: one file per method in ``search_spaces/``.

File format::

    method: cam                       # a registered method name
    metric: val/max_box_acc_v2        # validation metric that selects (never a test metric)
    mode: max                         # max | min; default: the metric's declared direction
    fixed:                            # values for every trial (override schema defaults)
      backbone: resnet18
      epochs: 3
    search:                           # one Tune distribution per hyperparameter
      lr: {loguniform: [0.001, 0.1]}
      weight_decay: {uniform: [0.0, 0.001]}
      set_size: {int: [2, 6]}         # inclusive bounds
      backbone: {choice: [resnet18, resnet34]}
      seed: {grid: [0, 1, 2]}         # every value, crossed with the samples (seeds as a grid axis)
    scheduler:
      asha: {grace_period: 1, reduction_factor: 2}   # or `none`
    classes: [person]                 # optional: keep only these classes of the dataset (as --classes;
                                      # the command line's --classes wins)

Validation is strict and every error names the file, the key and what is allowed: unknown
top-level keys, unknown hyperparameters (checked against the method's pydantic schema), malformed
distributions, bounds in the wrong order, and bounds outside the schema's range (each bound is
validated through the schema, so ``lr: {uniform: [-1, 0.1]}`` fails with the schema's "> 0").
Defaults are never repeated here: they live in the method's schema.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weakbench.methods.base import get_method_class, validate_config
from weakbench.methods import metric_declarations as D
from weakbench.core.errors import ConfigError, UnknownNameError

DIST_KINDS = ("uniform", "loguniform", "int", "choice", "grid")


class Distribution(BaseModel):
    """One search dimension: ``kind`` in :data:`DIST_KINDS` and its ``values`` (bounds or options)."""

    kind: Literal["uniform", "loguniform", "int", "choice", "grid"]
    values: list[Any]

    def endpoints(self) -> list[Any]:
        """Values to check against the schema: both bounds, or every option."""
        return list(self.values)


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class SearchSpace(BaseModel):
    """A validated search-space file. Build with :func:`load_search_space`."""

    model_config = ConfigDict(extra="forbid")

    method: str
    metric: str = D.DEFAULT_SELECT_METRIC
    mode: Literal["max", "min"] = "max"
    fixed: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Distribution] = Field(default_factory=dict)
    asha: SchedulerSpec | None = None
    classes: str | None = Field(None, description="class filter of the dataset, comma-separated names (None: all)")
    source: str = "<memory>"

    @field_validator("metric")
    @classmethod
    def _metric_is_validation(cls, v: str) -> str:
        split, _, name = v.partition("/")
        if split != "val" or not name:
            raise ValueError(f"must be a validation metric 'val/<name>' (selection never uses {split or 'a bare name'}); e.g. val/max_box_acc_v2")
        return v

    # ------------------------------------------------------------------ views
    def grid_axes(self) -> dict[str, list[Any]]:
        return {k: d.values for k, d in self.search.items() if d.kind == "grid"}

    def sampled_axes(self) -> dict[str, Distribution]:
        return {k: d for k, d in self.search.items() if d.kind != "grid"}

    def num_grid_points(self) -> int:
        return math.prod(len(v) for v in self.grid_axes().values()) if self.grid_axes() else 1

    def defaults_config(self) -> dict[str, Any]:
        """A concrete config: ``fixed`` plus, for each searched key, its first grid value, the
        geometric (loguniform) or arithmetic midpoint, or the first choice."""
        cfg = dict(self.fixed)
        for k, d in self.search.items():
            v = d.values
            if d.kind in ("grid", "choice"):
                cfg[k] = v[0]
            elif d.kind == "loguniform":
                cfg[k] = math.sqrt(float(v[0]) * float(v[1]))
            elif d.kind == "uniform":
                cfg[k] = (float(v[0]) + float(v[1])) / 2
            else:
                cfg[k] = (int(v[0]) + int(v[1])) // 2
        return cfg


def _parse_distribution(src: str, key: str, raw: Any) -> Distribution:
    where = f"{src}: search.{key}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: expected a mapping with one of {', '.join(DIST_KINDS)}, e.g. {{loguniform: [0.001, 0.1]}}; got {raw!r}")
    (kind, values), = raw.items()
    if kind not in DIST_KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; allowed: {', '.join(DIST_KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "int"):
        if len(values) != 2:
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
        lo, hi = values
        numeric = (int,) if kind == "int" else (int, float)
        if not all(isinstance(x, numeric) and not isinstance(x, bool) for x in values):
            raise ConfigError(f"{where}.{kind}: bounds must be {'integers' if kind == 'int' else 'numbers'}, got {values!r}")
        if not lo < hi:
            raise ConfigError(f"{where}.{kind}: low must be < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.loguniform: bounds must be > 0, got [{lo}, {hi}]")
    return Distribution(kind=kind, values=values)


def parse_search_space(data: Any, source: str = "<memory>") -> SearchSpace:
    """Validate a loaded YAML mapping; see the module docstring for the format.

    Raises:
        ConfigError: with ``source``, the key, and what is allowed.
        UnknownNameError: unknown method.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level with keys method, metric, mode, fixed, search, scheduler")
    allowed = {"method", "metric", "mode", "fixed", "search", "scheduler", "description", "classes"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "method" not in data:
        raise ConfigError(f"{source}: missing key 'method' (one of the registered methods)")
    method = data["method"]
    try:
        cls = get_method_class(str(method))
    except UnknownNameError as e:
        raise UnknownNameError(f"{source}: method: {e}") from None
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: fixed: expected a mapping of hyperparameter: value")
    search_raw = data.get("search") or {}
    if not isinstance(search_raw, dict):
        raise ConfigError(f"{source}: search: expected a mapping of hyperparameter: distribution")
    fields = cls.Config.model_fields
    for section, keys in (("fixed", fixed), ("search", search_raw)):
        for k in keys:
            if k not in fields:
                raise ConfigError(f"{source}: {section}.{k}: not a hyperparameter of method {method!r}; known: {', '.join(sorted(fields))}")
    both = sorted(set(fixed) & set(search_raw))
    if both:
        raise ConfigError(f"{source}: {', '.join(both)} appear in both fixed and search; keep each in one place")
    search = {k: _parse_distribution(source, k, v) for k, v in search_raw.items()}

    # every fixed value and every bound / option must pass the method's schema
    validate_config(method, fixed, source=f"{source} (fixed)")
    for k, d in search.items():
        for v in d.endpoints():
            try:
                cls.Config(**{**fixed, k: v})
            except ValidationError as e:
                msgs = "; ".join(err["msg"] for err in e.errors() if err["loc"] and err["loc"][0] == k) or "; ".join(err["msg"] for err in e.errors())
                raise ConfigError(f"{source}: search.{k}.{d.kind}: value {v!r} is out of range for {method!r}: {msgs}") from None

    scheduler = data.get("scheduler")
    asha = None
    if scheduler not in (None, "none", {}):
        if not isinstance(scheduler, dict) or set(scheduler) != {"asha"}:
            raise ConfigError(f"{source}: scheduler: expected 'none' or {{asha: {{grace_period: 1, reduction_factor: 2}}}}, got {scheduler!r}")
        try:
            asha = SchedulerSpec(**(scheduler["asha"] or {}))
        except ValidationError as e:
            raise ConfigError(f"{source}: scheduler.asha: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    classes = data.get("classes")
    if classes is not None:
        if isinstance(classes, list) and all(isinstance(c, str) and c.strip() and "," not in c for c in classes) and classes:
            classes = ",".join(c.strip() for c in classes)
        elif not (isinstance(classes, str) and all(c.strip() for c in classes.split(","))):
            raise ConfigError(f"{source}: classes: expected a list of class names (e.g. [person, dog]) or 'person,dog', "
                              f"got {classes!r}")
    try:
        metric = data.get("metric", D.default_select_metric(method))  # the method names its headline
        declared = D.lookup(metric) if isinstance(metric, str) else None
        mode = data.get("mode", declared.direction if declared and declared.direction else "max")
        space = SearchSpace(method=method, metric=metric, mode=mode, fixed=fixed, search=search, asha=asha,
                            classes=classes, source=source)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{source}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    try:
        direction = D.direction(space.metric)  # undeclared or diagnostic metrics never select
    except ConfigError as e:
        raise ConfigError(f"{source}: metric: {e}") from None
    if direction != space.mode:
        better = "higher" if direction == "max" else "lower"
        raise ConfigError(f"{source}: mode: {space.metric} is {better}-is-better; use mode: {direction}")
    return space


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Raises:
        ConfigError: file missing, not YAML, or invalid (message names file and key).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search-space file not found; see search_spaces/*.yaml for examples")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_search_space(data, source=str(p))
