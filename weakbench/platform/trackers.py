"""Where a trial's run lives: the tracker interface of the engine, with the MLflow tracker (the
platform's store, through :mod:`weakbench.platform.tracking`) and an in-memory one.

The engine (:mod:`weakbench.platform.trial`, :mod:`weakbench.platform.loops`) writes a trial's
run only through :class:`Tracker`: find or create the trial's run, log metrics at a step, set
tags, log text, files and the predictor, end the run with a status. Only rank 0 holds a tracker.

* :class:`MlflowTracker` — one ``MlflowClient`` on ``TrialSpec.tracking_uri`` (what every sweep
  and ``weakbench train`` use; restart safety as :mod:`weakbench.platform.tracking` describes).
* :class:`InMemoryTracker` — a plain Python object holding runs (params, tags, metric histories,
  artifacts as bytes, the predictor object) in dicts, with MLflow's semantics for what the engine
  relies on (a run found again by sweep and trial id, a FINISHED run never rewritten, non-finite
  evaluation metrics skipped). For tests and Python users of the ``inline`` executor
  (``run_trial(spec, executor="inline", tracker=InMemoryTracker())``); a Ray executor runs the
  trial in other processes, which cannot share it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from weakbench.core import conventions as C

#: The statuses of a run, as MLflow names them; ``"NEW"`` is what :meth:`Tracker.start_trial_run`
#: answers for a run it has just created.
RUN_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


class Tracker(Protocol):
    """What the engine needs of a tracking store (every method takes the run id it acts on)."""

    def start_trial_run(self, *, experiment: str, parent_run_id: str | None, sweep_id: str, trial_id: str,
                        run_name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                        known_run_id: str | None = None) -> tuple[str, str]:
        """Find (by ``known_run_id``, else by sweep and trial id) or create the trial's run;
        returns ``(run_id, status before the call)``, ``"NEW"`` when created. A run found that
        is not FINISHED is set RUNNING again (its error and interruption tags removed); a
        FINISHED one is returned untouched and must not be written."""

    def status(self, run_id: str) -> str: ...

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of the run."""

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which metric ``key`` was logged (empty: never)."""

    def tags(self, run_id: str) -> dict[str, str]: ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; non-finite values are skipped except ``train/*`` (the
        evidence of a divergence), :func:`weakbench.platform.tracking.loggable_metrics`."""

    def set_tag(self, run_id: str, key: str, value: str) -> None: ...

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str) -> None:
        """Copy file ``local_path`` into the run's artifact folder ``artifact_path``."""

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        """Copy every file under ``local_dir`` into the run's artifact folder ``artifact_path``."""

    def log_model(self, run_id: str, predictor, *, metadata: Mapping[str, Any],
                  stage_of: Callable[[Any], str | None]) -> str:
        """Log the trial's predictor as the run's model; returns its URI (also tag ``weakbench.model_uri``)."""

    def end_run(self, run_id: str, status: str) -> None:
        """End the run with ``status`` (``"FINISHED"`` or ``"KILLED"``)."""

    def fail_run(self, run_id: str, error: BaseException | str) -> None:
        """End the run FAILED with tag ``weakbench.error = "<Type>: message"``; never raises."""


class MlflowTracker:
    """:class:`Tracker` on an MLflow store (``tracking_uri``: ``sqlite:///…`` or a server), through
    one ``MlflowClient`` (:func:`weakbench.platform.tracking.client_for`)."""

    def __init__(self, tracking_uri: str):
        from weakbench.platform import tracking

        self.tracking_uri = tracking_uri
        self.client = tracking.client_for(tracking_uri)

    def start_trial_run(self, *, experiment, parent_run_id, sweep_id, trial_id, run_name, tags, params,
                        known_run_id=None):
        from weakbench.platform import tracking

        exp_id = tracking.ensure_experiment(self.client, experiment, artifact_root=None)
        return tracking.get_or_create_trial_run(self.client, exp_id, parent_run_id=parent_run_id, sweep_id=sweep_id,
                                                trial_id=trial_id, run_name=run_name, tags=tags, params=params,
                                                known_run_id=known_run_id)

    def status(self, run_id):
        return self.client.get_run(run_id).info.status

    def latest_metrics(self, run_id):
        return dict(self.client.get_run(run_id).data.metrics)

    def metric_steps(self, run_id, key):
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def tags(self, run_id):
        return dict(self.client.get_run(run_id).data.tags)

    def log_metrics(self, run_id, metrics, step):
        from weakbench.platform import tracking

        tracking.log_metrics(self.client, run_id, metrics, step=step)

    def set_tag(self, run_id, key, value):
        self.client.set_tag(run_id, key, value)

    def log_text(self, run_id, text, artifact_file):
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id, local_path, artifact_path):
        self.client.log_artifact(run_id, local_path, artifact_path)

    def log_artifacts(self, run_id, local_dir, artifact_path):
        self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_model(self, run_id, predictor, *, metadata, stage_of):
        from weakbench.platform import model_format

        return model_format.log_predictor(self.tracking_uri, run_id, predictor, metadata=metadata, stage_of=stage_of)

    def end_run(self, run_id, status):
        self.client.set_terminated(run_id, status=status)

    def fail_run(self, run_id, error):
        from weakbench.platform import tracking

        tracking.fail_run(self.client, run_id, error)


@dataclass
class MemoryRun:
    """One run of an :class:`InMemoryTracker`. ``metrics`` holds each key's history as
    ``[(step, value), ...]`` in logging order; ``artifacts`` maps an artifact path
    (``"overlays/x.png"``) to its bytes; ``model`` is the logged predictor object."""

    run_id: str
    experiment: str
    name: str
    status: str = "RUNNING"
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    model: Any = None

    @property
    def latest(self) -> dict[str, float]:
        """Every metric's value at its highest step (the last logged among equal steps), as MLflow's ``run.data.metrics``."""
        return {k: max(enumerate(h), key=lambda iv: (iv[1][0], iv[0]))[1][1] for k, h in self.metrics.items() if h}


class InMemoryTracker:
    """:class:`Tracker` keeping every run in this process's memory (``runs``: run id → :class:`MemoryRun`).

    Nothing is written to disk; artifacts are read into bytes when logged. The predictor is kept
    as the object (tag ``weakbench.model_uri`` = ``memory://<run id>/model``)."""

    def __init__(self):
        self.runs: dict[str, MemoryRun] = {}
        self._ids = itertools.count(1)

    def run(self, run_id: str | None = None) -> MemoryRun:
        """Run ``run_id``, or the only run when None.

        Raises:
            KeyError: no such run; ValueError: ``run_id`` None and not exactly one run.
        """
        if run_id is None:
            if len(self.runs) != 1:
                raise ValueError(f"the tracker holds {len(self.runs)} runs; name the one you want")
            return next(iter(self.runs.values()))
        return self.runs[run_id]

    def start_trial_run(self, *, experiment, parent_run_id, sweep_id, trial_id, run_name, tags, params,
                        known_run_id=None):
        run = self.runs.get(known_run_id) if known_run_id else None
        if run is None:
            run = next((r for r in self.runs.values() if r.experiment == experiment
                        and r.tags.get(C.TAG_SWEEP_ID) == sweep_id and r.tags.get(C.TAG_TRIAL_ID) == trial_id), None)
        if run is not None:
            status = run.status
            if status not in ("FINISHED", "RUNNING"):
                run.status = "RUNNING"
                for tag in (C.TAG_ERROR, C.TAG_INTERRUPTED):
                    run.tags.pop(tag, None)
            return run.run_id, status
        run_id = f"mem{next(self._ids):04d}"
        all_tags = {C.TAG_KIND: C.KIND_TRIAL, C.TAG_SWEEP_ID: sweep_id, C.TAG_TRIAL_ID: trial_id, **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.runs[run_id] = MemoryRun(run_id, experiment, run_name, tags={k: str(v) for k, v in all_tags.items()},
                                      params={k: str(v)[:6000] for k, v in params.items()})
        return run_id, "NEW"

    def status(self, run_id):
        return self.runs[run_id].status

    def latest_metrics(self, run_id):
        return self.runs[run_id].latest

    def metric_steps(self, run_id, key):
        return {s for s, _ in self.runs[run_id].metrics.get(key, [])}

    def tags(self, run_id):
        return dict(self.runs[run_id].tags)

    def log_metrics(self, run_id, metrics, step):
        from weakbench.platform.tracking import loggable_metrics

        run = self.runs[run_id]
        for k, v in loggable_metrics(metrics).items():
            run.metrics.setdefault(k, []).append((int(step), float(v)))

    def set_tag(self, run_id, key, value):
        self.runs[run_id].tags[key] = str(value)[:5000]

    def log_text(self, run_id, text, artifact_file):
        self.runs[run_id].artifacts[artifact_file] = text.encode()

    def log_artifact(self, run_id, local_path, artifact_path):
        p = Path(local_path)
        self.runs[run_id].artifacts[f"{artifact_path}/{p.name}" if artifact_path else p.name] = p.read_bytes()

    def log_artifacts(self, run_id, local_dir, artifact_path):
        root = Path(local_dir)
        for f in sorted(root.rglob("*")):
            if f.is_file():
                rel = f.relative_to(root).as_posix()
                self.runs[run_id].artifacts[f"{artifact_path}/{rel}" if artifact_path else rel] = f.read_bytes()

    def log_model(self, run_id, predictor, *, metadata, stage_of):
        run = self.runs[run_id]
        run.model = predictor
        uri = f"memory://{run_id}/{C.MODEL_ARTIFACT}"
        run.tags[C.TAG_MODEL_URI] = uri
        return uri

    def end_run(self, run_id, status):
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}; one of {RUN_STATUSES}")
        self.runs[run_id].status = status

    def fail_run(self, run_id, error):
        msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        run = self.runs.get(run_id)
        if run is not None:
            run.tags[C.TAG_ERROR] = msg[:5000]
            run.status = "FAILED"
