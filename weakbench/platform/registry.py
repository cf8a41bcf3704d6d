"""Model registry workflow on MLflow ≥ 3: register the validation-selected model, move aliases,
roll back, load by name.

* :func:`register_best` picks, for one (dataset, method), the configuration with the best mean
  validation metric over its seeds (the leaderboard's rule, see
  :mod:`weakbench.platform.leaderboard`), then the seed run of that configuration with the best
  validation metric among those that logged a model (tag ``weakbench.model_uri``). It registers
  that model as a new version of ``weakbench-<method>-<dataset>`` with tags (the run's ``val/*``
  and ``test/*`` metrics as ``metric.<key>``, its params as ``param.<key>``, dataset name and
  fingerprint, method, backbone, run id, config group) and points an alias (``champion`` by
  default) at it. Aliases, not stages: stages are deprecated in MLflow 3.
* Every alias move made here is appended to the registered-model tag
  ``weakbench.alias_history.<alias>`` (comma-separated versions), so :func:`rollback` can return
  the alias to the version it pointed at before; without history (an alias set by hand) rollback
  takes the highest existing version below the current one.
* :func:`load_predictor` loads ``models:/<name>@<alias>`` (or any model URI) as the
  :class:`weakbench.methods.classifier.CamPredictor` the engine logged, from its JSON spec and
  safetensors weights (:mod:`weakbench.platform.model_format`); a pickled model is refused, by
  ``register`` too, and ``registry list`` marks it.

The ``weakbench registry list`` / ``rollback`` commands are in :mod:`weakbench.cli`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any

from weakbench.core import conventions as C
from weakbench.core.errors import DataError, UnknownNameError, is_finite_metrics
from weakbench.methods.metric_declarations import DEFAULT_SELECT_METRIC, higher_is_better

HISTORY_TAG = "weakbench.alias_history."


@dataclasses.dataclass(frozen=True)
class RegisteredModelInfo:
    """Result of :func:`register_best`: registered model ``name``, new ``version`` (int), the
    source ``run_id`` and its value of the selection metric (``metric_value``, metric units); ``new`` is
    False when the run already was a version of the model (that version, nothing added)."""

    name: str
    version: int
    run_id: str
    metric_value: float
    new: bool = True  # False: the run already was this version; nothing was added


@dataclasses.dataclass(frozen=True)
class ModelVersionRow:
    """One registered model version as listed by :func:`list_registered`."""

    name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str | None
    status: str
    created: _dt.datetime
    tags: dict[str, str]
    #: ``"weakbench-model v1"`` when the version holds a model spec this weakbench loads; else
    #: why it is refused (``"refused: pickled model"``, ...): read from the spec file, never unpickled
    model_format: str = ""


def _tracking(tracking_uri: str | None):
    """Point the fluent ``mlflow`` API at ``tracking_uri`` for a block and restore it after (the
    registry URI follows the tracking URI unless ``MLFLOW_REGISTRY_URI`` is set)."""
    from weakbench.platform.tracking import using_tracking_uri

    return using_tracking_uri(tracking_uri)


def _client(tracking_uri: str | None):
    from weakbench.platform.tracking import client_for

    return client_for(tracking_uri)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _select_run(runs: list[Any], select_metric: str) -> tuple[Any, float]:
    """The leaderboard rule: best configuration by mean ``select_metric`` over seeds, then its best
    seed run among those with a logged model. Returns ``(run, value)``."""
    from weakbench.platform.results import config_group

    hib = higher_is_better(select_metric)
    configs: dict[str, list[Any]] = {}
    for r in runs:
        # the leaderboard rule: FINISHED runs only, and never one with a NaN/inf metric (diverged)
        if (r.info.status == "FINISHED" and select_metric in r.data.metrics
                and is_finite_metrics(r.data.metrics)):
            configs.setdefault(config_group(r.data.params), []).append(r)
    if not configs:
        raise DataError(f"no FINISHED trial run with finite metrics logged {select_metric!r}; fix: pass --select-metric "
                        f"with a logged metric (runs with NaN/inf metrics diverged and are never registered)")

    from weakbench.platform.selection import Candidate, select

    cands = [Candidate(r, g, r.data.tags.get(C.TAG_SEED, r.data.params.get("seed")),
                       float(r.data.metrics[select_metric]), (r.info.start_time or 0, r.info.run_id))
             for g, group in configs.items() for r in group]
    g, _ = select(cands, hib)  # the one rule (weakbench.platform.selection)
    with_model = [r for r in configs[g] if r.data.tags.get(C.TAG_MODEL_URI)]
    if not with_model:
        ids = ", ".join(r.info.run_id for r in configs[g])
        raise DataError(
            f"runs {ids} (the selected configuration) have no tag {C.TAG_MODEL_URI!r}: no model was logged; "
            f"fix: rerun the sweep with model logging enabled"
        )
    best = min(with_model, key=lambda r: (-(1 if hib else -1) * r.data.metrics[select_metric],
                                          r.info.start_time or 0, r.info.run_id))
    return best, float(best.data.metrics[select_metric])


def register_best(
    tracking_uri: str,
    method: str,
    select_metric: str = DEFAULT_SELECT_METRIC,
    dataset: str | None = None,
    model_name: str | None = None,
    alias: str = "champion",
    experiment: str | None = None,
) -> RegisteredModelInfo:
    """Register the validation-selected model of ``method`` on ``dataset`` and set ``@alias``.

    Args:
        tracking_uri: MLflow tracking (and registry) URI.
        method: method name (tag ``weakbench.method``).
        select_metric: validation metric key that selects (higher is better except losses).
        dataset: dataset name (tag ``weakbench.dataset``); may be omitted when the runs of
            ``method`` cover exactly one dataset.
        model_name: registered model name; default ``weakbench-<method>-<dataset>``.
        alias: alias pointed at the new version (``champion``; pass e.g. ``challenger``).
        experiment: restrict to one experiment name (default: all experiments).

    Returns:
        :class:`RegisteredModelInfo`.

    Raises:
        UnknownNameError: no trial run of ``method`` (on ``dataset``), or unknown experiment.
        DataError: several datasets and none chosen; the selected runs have no logged model.
    """
    import mlflow
    from mlflow.entities import ViewType

    client = _client(tracking_uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise UnknownNameError(f"{tracking_uri}: no experiment named {experiment!r}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    flt = (f"tags.`{C.TAG_KIND}` = '{C.KIND_TRIAL}' and tags.`{C.TAG_METHOD}` = '{_quote(method)}' "
           f"and attributes.status = 'FINISHED'")
    if dataset is not None:
        flt += f" and tags.`{C.TAG_DATASET}` = '{_quote(dataset)}'"
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(exp_ids, filter_string=flt, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not runs:
        where = f" on dataset {dataset!r}" if dataset else ""
        raise UnknownNameError(f"{tracking_uri}: no finished trial run of method {method!r}{where}; fix: run a sweep first")
    datasets = sorted({r.data.tags.get(C.TAG_DATASET, "") for r in runs})
    if dataset is None:
        if len(datasets) > 1:
            raise DataError(f"method {method!r} has runs on datasets {datasets}; fix: pass --dataset with one of them")
        dataset = datasets[0]
    run, value = _select_run(runs, select_metric)
    name = model_name or f"weakbench-{method}-{dataset}"
    tags = {
        "weakbench.method": method, "weakbench.dataset": dataset,
        "weakbench.dataset_fingerprint": run.data.tags.get(C.TAG_DATASET_FINGERPRINT, ""),
        "weakbench.backbone": run.data.tags.get(C.TAG_BACKBONE, run.data.params.get("backbone", "")),
        "weakbench.run_id": run.info.run_id, "weakbench.select_metric": select_metric,
        "weakbench.select_value": repr(value), "weakbench.config_hash": run.data.tags.get(C.TAG_CONFIG_HASH, ""),
    }
    tags.update({f"metric.{k}": repr(v) for k, v in sorted(run.data.metrics.items()) if k.split("/")[0] in ("val", "test")})
    tags.update({f"param.{k}": str(v)[:5000] for k, v in sorted(run.data.params.items())})
    from weakbench.platform.model_format import fetch_spec

    fetch_spec(run.data.tags[C.TAG_MODEL_URI], tracking_uri)  # a pickled or foreign model is refused, never read
    existing = _version_of_run(client, name, run.info.run_id)
    if existing is not None:  # registering the same run again adds no version; the alias still moves to it
        _move_alias(client, name, alias, existing)
        return RegisteredModelInfo(name=name, version=existing, run_id=run.info.run_id, metric_value=value, new=False)
    with _tracking(tracking_uri):
        mv = mlflow.register_model(run.data.tags[C.TAG_MODEL_URI], name, tags=tags)
    version = int(mv.version)
    _move_alias(client, name, alias, version)
    return RegisteredModelInfo(name=name, version=version, run_id=run.info.run_id, metric_value=value)


def _version_of_run(client, name: str, run_id: str) -> int | None:
    """The version of registered model ``name`` made from run ``run_id`` (the latest, if several), or None."""
    try:
        versions = client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{_quote(run_id)}'")
    except Exception:  # noqa: BLE001 - no such model yet (MLflow raises for an unknown name on some stores)
        return None
    return max((int(v.version) for v in versions), default=None)


def _history(client: Any, name: str, alias: str) -> list[int]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG + alias, "")
    return [int(v) for v in raw.split(",") if v.strip()]


def _move_alias(client: Any, name: str, alias: str, version: int) -> None:
    hist = _history(client, name, alias)
    if not hist or hist[-1] != version:
        hist.append(version)
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG + alias, ",".join(str(v) for v in hist[-500:]))


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    """Point ``name@alias`` at ``version`` and record the move for :func:`rollback`."""
    _move_alias(_client(tracking_uri), name, alias, int(version))


def rollback(tracking_uri: str, name: str, alias: str = "champion") -> int:
    """Move ``name@alias`` back to the version it pointed at before its last move; returns it.

    Raises:
        UnknownNameError: no registered model ``name`` or no alias ``alias`` on it.
        DataError: no earlier version exists to roll back to.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        current = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise UnknownNameError(f"{tracking_uri}: registered model {name!r} has no alias {alias!r} ({e.message})") from None
    existing = {int(v.version) for v in client.search_model_versions(f"name = '{_quote(name)}'")}
    hist = _history(client, name, alias)
    while hist and hist[-1] == current:
        hist.pop()
    while hist and hist[-1] not in existing:  # skip deleted versions
        hist.pop()
    if hist:
        previous = hist[-1]
    else:
        older = sorted(v for v in existing if v < current)
        if not older:
            raise DataError(f"registered model {name!r}@{alias} is at version {current}, the oldest; nothing to roll back to")
        previous = older[-1]
        hist = [previous]
    client.set_registered_model_alias(name, alias, str(previous))
    client.set_registered_model_tag(name, HISTORY_TAG + alias, ",".join(str(v) for v in hist))
    return previous


def model_format_of(model_uri: str, tracking_uri: str | None) -> str:
    """``"weakbench-model v<N>"`` when ``model_uri`` holds a model spec this weakbench loads, else
    ``"refused: <reason>"``: only the spec file is read (a pickled model is never unpickled)."""
    from weakbench.core.errors import WeakbenchError
    from weakbench.platform.model_format import FORMAT, SPEC_FILE, fetch_spec

    try:
        spec = fetch_spec(model_uri, tracking_uri)
    except WeakbenchError as e:
        msg = str(e)
        return "refused: pickled model" if "pickled model" in msg else ("refused: no " + SPEC_FILE if "no " + SPEC_FILE in msg else "refused: invalid spec")
    return f"{FORMAT} v{spec['format_version']}"


def list_registered(tracking_uri: str, name: str | None = None, check_format: bool = True) -> list[ModelVersionRow]:
    """Every version of every registered model (or of ``name``), newest first per model; with
    ``check_format`` each row says whether its model loads (:func:`model_format_of`)."""
    client = _client(tracking_uri)
    models = [client.get_registered_model(name)] if name else list(_paged(client.search_registered_models))
    rows: list[ModelVersionRow] = []
    for rm in sorted(models, key=lambda m: m.name):
        by_version: dict[int, list[str]] = {}
        for a, v in (rm.aliases or {}).items():
            by_version.setdefault(int(v), []).append(a)
        versions = client.search_model_versions(f"name = '{_quote(rm.name)}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(ModelVersionRow(
                name=rm.name, version=int(mv.version), aliases=tuple(sorted(by_version.get(int(mv.version), []))),
                run_id=mv.run_id or (mv.tags or {}).get("weakbench.run_id"), status=str(mv.status),
                created=_dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=_dt.timezone.utc),
                tags=dict(mv.tags or {}),
                model_format=model_format_of(f"models:/{rm.name}/{mv.version}", tracking_uri) if check_format else "",
            ))
    return rows


def _paged(fn):
    token = None
    while True:
        page = fn(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def load_predictor(model_uri: str, tracking_uri: str | None = None):
    """Load a logged predictor (e.g. ``models:/weakbench-cam-coco128@champion``) on CPU, in eval mode:
    a :class:`weakbench.methods.classifier.CamPredictor` (classifier methods) or a
    :class:`weakbench.methods.instance.InstancePredictor` (detection methods), rebuilt from the
    model's JSON spec and safetensors weights (:mod:`weakbench.platform.model_format`); nothing
    is unpickled. A pickled model (logged before that format) is refused, unless
    ``WEAKBENCH_UNSAFE_PICKLE=1`` (unsafe: only for a store whose every writer you trust).

    A ``CamPredictor``'s ``predictor(images)`` with float32 (B, 3, S, S) normalised images returns
    ``(logits (B, C), cams (B, C, h, w))``; an ``InstancePredictor`` takes a list of (3, H, W)
    images in [0, 1] and returns per-image dicts of boxes, labels, scores and masks.

    Raises:
        UnknownNameError: the URI does not resolve (no such model, version, alias or run).
        DataError: the URI holds a pickled model, or something other than a weakbench model.
    """
    from weakbench.platform.model_format import load_predictor_uri

    return load_predictor_uri(model_uri, tracking_uri)
