"""MLflow tracking: parent sweep runs, child trial runs, restart safety.

Conventions (names in :mod:`weakbench.core.conventions`): one parent run per sweep, one
child run per trial (``mlflow.parentRunId``), only rank 0 of a Train job logs. Everything goes
through an explicit :class:`mlflow.MlflowClient` (no global active run), so Ray workers and the
driver never share hidden state.

Restart safety:

* a trial's child run is found again by its tags (sweep id + trial id), and its id is also kept
  in the trial checkpoint, so a restarted trial continues its own run instead of creating a
  duplicate;
* a run that is already FINISHED is never written again (:func:`get_or_create_trial_run`
  reports it and the engine skips the trial);
* a failing trial ends its run FAILED with the error in tag ``weakbench.error``;
* after a sweep, the sweep's driver ends every child run from its record of what happened
  (:func:`weakbench.platform.reconcile.reconcile`: FAILED, KILLED when stopped early by the scheduler
  or interrupted), so no run is left RUNNING; :func:`reconcile_children` ends those still RUNNING
  as KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from weakbench import __version__
from weakbench.core import conventions as C
from weakbench.core.errors import ConfigError


@contextlib.contextmanager
def using_tracking_uri(tracking_uri: str | None):
    """Point MLflow's fluent API at ``tracking_uri`` for the ``with`` block, then restore both
    MLflow's global URI and the ``MLFLOW_TRACKING_URI`` environment variable (which
    ``mlflow.set_tracking_uri`` also writes) as they were. ``None`` changes nothing."""
    if tracking_uri is None:
        yield
        return
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    uri_before = mlflow.get_tracking_uri() if env_before is not None else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        if env_before is None:
            mlflow.set_tracking_uri(None)  # back to MLflow's own default
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            mlflow.set_tracking_uri(uri_before)
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def default_tracking_uri(output_dir: str | Path, *, create: bool = True) -> str:
    """``sqlite:///<absolute output_dir>/mlflow.db`` (the plain file store is refused by MLflow 3);
    ``create``: make ``output_dir`` (False: only name it, as ``sweep --dry-run`` does)."""
    p = Path(output_dir).resolve()
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store (a server)."""
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def default_artifact_root(tracking_uri: str) -> Path | None:
    """Where new experiments keep their artifacts: ``<dir of mlflow.db>/mlartifacts`` for the
    sqlite default (so that everything stays under ``--output-dir``, not in ``./mlruns`` of the
    working directory); None for a tracking server, which decides its own."""
    db = sqlite_path(tracking_uri)
    return db.resolve().parent / "mlartifacts" if db is not None else None


@contextlib.contextmanager
def _db_lock(db: Path):
    """An exclusive ``flock`` on ``<db>.lock`` for the ``with`` block (POSIX).

    A store that exists where no lock file can be made (a read-only mount, a directory of
    another user) is opened without the lock: the lock only guards the creation and migration
    of a schema, which nobody can write there anyway, and reading needs none."""
    import errno
    import fcntl

    if db.is_file() and not os.access(db.parent, os.W_OK):
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = open(db.with_name(db.name + ".lock"), "a+")
    except OSError as e:
        if db.is_file() and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def client_for(tracking_uri: str | None) -> MlflowClient:
    """An ``MlflowClient`` for ``tracking_uri``, its store opened — the one door through which
    weakbench's engine, sweeps, results store, registry and dashboards reach MLflow (``None``:
    MLflow's own default URI, e.g. ``MLFLOW_TRACKING_URI``).

    For ``sqlite:///`` the parent directory is created and the store is opened under a file lock
    (``<db>.lock``): MLflow creates and migrates the schema of a fresh database when the store
    is first opened, and two processes doing that at once corrupt it (``AttributeError:
    dimension_attributes`` inside the migration), e.g. two sweeps started together.
    """
    db = sqlite_path(tracking_uri) if tracking_uri else None
    if db is None:
        return MlflowClient(tracking_uri=tracking_uri)
    with _db_lock(db):
        client = MlflowClient(tracking_uri=tracking_uri)  # opens the store: schema created / upgraded here
        client.search_experiments(max_results=1)
    return client


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | Path | None = None) -> str:
    """Return the id of experiment ``name``, creating it (artifacts under ``artifact_root``).

    Safe when several processes create the same experiment at once (the loser finds the
    winner's). An existing experiment keeps its own artifact location.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created meanwhile by another sweep
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {name!r} is deleted; restore it or pass another --experiment")
    return exp.experiment_id


def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex chars of sha256 over the sorted-keys JSON of ``config``."""
    blob = json.dumps(dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit() -> str:
    """The commit of the weakbench checkout (``+dirty`` if modified), or ``"unknown"``."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _search_one(client: MlflowClient, experiment_id: str, filter_string: str):
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=10, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, sweep_id: str, run_name: str,
                             tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """The sweep's parent run: found by tag ``weakbench.sweep_id`` (resume) or created."""
    found = _search_one(client, experiment_id, f"tags.`{C.TAG_KIND}` = '{C.KIND_SWEEP}' and tags.`{C.TAG_SWEEP_ID}` = '{sweep_id}'")
    if found is not None:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={C.TAG_KIND: C.KIND_SWEEP, C.TAG_SWEEP_ID: sweep_id, C.TAG_VERSION: __version__,
                                  C.TAG_GIT_COMMIT: git_commit(), **tags})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def find_trial_run(client: MlflowClient, experiment_id: str, sweep_id: str, trial_id: str):
    """The child run of trial ``trial_id`` of sweep ``sweep_id`` (found by its tags), or None."""
    return _search_one(client, experiment_id, f"tags.`{C.TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{C.TAG_TRIAL_ID}` = '{trial_id}'")


def get_or_create_trial_run(client: MlflowClient, experiment_id: str, *, parent_run_id: str | None, sweep_id: str,
                            trial_id: str, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                            known_run_id: str | None = None) -> tuple[str, str]:
    """Find or create the child run of one trial.

    Returns:
        ``(run_id, status)``; ``status`` is the run's status before this call (``"NEW"`` when
        created). A FINISHED run is returned untouched: the caller must not write to it.
    """
    run = None
    if known_run_id:
        run = client.get_run(known_run_id)
    if run is None:
        run = _search_one(client, experiment_id,
                          f"tags.`{C.TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{C.TAG_TRIAL_ID}` = '{trial_id}'")
    if run is not None:
        status = run.info.status
        if status != "FINISHED" and status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
            for tag in (C.TAG_ERROR, C.TAG_INTERRUPTED):  # the run goes on: yesterday's ending no longer holds
                if tag in run.data.tags:
                    client.delete_tag(run.info.run_id, tag)
        return run.info.run_id, status
    all_tags = {C.TAG_KIND: C.KIND_TRIAL, C.TAG_SWEEP_ID: sweep_id, C.TAG_TRIAL_ID: trial_id, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    created = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    log_params(client, created.info.run_id, params)
    return created.info.run_id, "NEW"


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params (``str(value)``, truncated to MLflow's 6000 chars), skipping keys already set."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log numeric metrics at ``step`` in one batch.

    A non-finite evaluation metric (NaN: undefined, e.g. no positive pixels) is skipped; a
    non-finite ``train/*`` value (a loss) is logged as it is: it is the evidence that training
    diverged, and it keeps the run off the leaderboard and out of the registry.
    """
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in sorted(loggable_metrics(metrics).items())]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def loggable_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` a tracker logs (:func:`log_metrics`' rule), as floats: numbers
    only; a non-finite value only under ``train/``."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and (k.startswith("train/") or (v == v and abs(float(v)) != float("inf")))}


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def fail_run(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """End ``run_id`` as FAILED with ``weakbench.error = "<Type>: message"`` (never raises)."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    try:
        client.set_tag(run_id, C.TAG_ERROR, msg[:5000])
        client.set_terminated(run_id, status="FAILED")
    except Exception:  # noqa: BLE001 - reporting a failure must not mask the original error
        pass


STOPPED_EARLY_SUFFIX = " [stopped early]"


def mark_stopped_early(client: MlflowClient, run_id: str) -> None:
    """Record that the scheduler (ASHA) stopped trial run ``run_id`` early: tag ``weakbench.stopped``,
    the run name suffixed ``[stopped early]`` (so the MLflow UI's name column tells it from an
    interrupted or failed run), and KILLED if it is still RUNNING (a KILLED run keeps its end time)."""
    client.set_tag(run_id, "weakbench.stopped", "stopped early by the scheduler")
    info = client.get_run(run_id).info
    name = info.run_name or ""
    if not name.endswith(STOPPED_EARLY_SUFFIX):
        client.update_run(run_id, name=name + STOPPED_EARLY_SUFFIX)
    if info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")


def reconcile_children(client: MlflowClient, experiment_id: str, parent_run_id: str,
                       reason: str = "stopped early by the scheduler or interrupted") -> int:
    """End every child run of ``parent_run_id`` still RUNNING as KILLED; returns how many."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
                              max_results=10000)
    for r in runs:
        client.set_tag(r.info.run_id, "weakbench.stopped", reason)
        client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str):
    """All child runs of a sweep's parent run."""
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)
