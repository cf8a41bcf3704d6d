"""Reconciling a sweep: what Tune's run amounted to (issue #17, "plan → launch → reconcile").

The driver records Tune's events as they happen (:mod:`weakbench.platform.sweep_state`); once Tune
returns (or fails, or is interrupted) :func:`finish` makes MLflow agree with that record
(:func:`reconcile`: statuses, trials lost before they created a run, diverged runs, interrupted
runs), selects the best run by the one selection rule (:func:`select_best_run`), ends the parent
run and the record, and returns the :class:`SweepSummary`. :func:`follow_up_baselines` then sweeps
the trivial baselines the sweep's board lacks (:mod:`weakbench.platform.trivial`), the same from
Python (``run_sweep(opts, baselines=...)``) as from ``weakbench sweep``.

Nothing here imports Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from weakbench.core import conventions as C
from weakbench.core.errors import DivergenceError, WeakbenchError, check_finite, is_finite_metrics

class BaselineOutcome(BaseModel):
    """One trivial-baseline sweep :func:`follow_up_baselines` ran (or could not run: ``error``)."""

    name: str = Field(description="the baseline method, e.g. center_gaussian")
    input_size: int = Field(description="the evaluation frame in pixels, the sweep's")
    sweep_name: str | None = None
    metric: str | None = Field(None, description="its selecting metric, e.g. val/max_box_acc_v2")
    value: float | None = Field(None, description="the best run's value of the selecting metric (val)")
    test: float | None = Field(None, description="the same run's test value of that metric")
    chosen: dict[str, Any] = Field(default_factory=dict, description="the searched values chosen on val (seed excluded)")
    error: str | None = Field(None, description="why it was not added (bad input); the sweep's exit status is unchanged")


class SweepSummary(BaseModel):
    """What a sweep did. Counts come from the driver's record of Tune's events (errors, completions,
    the scheduler's decisions, :mod:`weakbench.platform.sweep_state`) reconciled with MLflow: a
    trial whose retries are exhausted is failed even when it never created a run (one is created
    FAILED); "stopped early" is the scheduler's decision only."""

    sweep_name: str
    sweep_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    method: str
    dataset: str
    num_trials: int
    num_finished: int
    num_failed: int
    num_stopped: int
    wall_seconds: float
    best_run_id: str | None = None
    best_params: dict[str, Any] = Field(default_factory=dict)
    best_metrics: dict[str, float] = Field(default_factory=dict)
    metric: str
    num_planned: int = 0
    num_restarts: int = 0
    interrupted: bool = False
    interrupt_signal: int = Field(2, description="the signal that interrupted the sweep (2 SIGINT, 15 SIGTERM)")
    warnings: list[str] = Field(default_factory=list, description="what the driver could not record (printed on stderr)")
    baselines: list[BaselineOutcome] = Field(default_factory=list, description="the trivial-baseline sweeps added after "
                                                                                "this one (follow_up_baselines)")

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 128 + the signal when interrupted (130 for SIGINT / Ctrl-C, 143
        for SIGTERM); 0 when every planned trial finished or was stopped early by the scheduler
        (ASHA) and at least one finished; 1 otherwise (a trial failed, a planned trial never ran, or
        no trial finished)."""
        if self.interrupted:
            return 128 + self.interrupt_signal
        if self.num_finished == 0 or self.num_failed or self.num_finished + self.num_stopped < self.num_planned:
            return 1
        return 0


def select_best_run(runs: list, metric: str, mode: str):
    """The run the sweep reports as best, by the one selection rule
    (:func:`weakbench.platform.selection.select`): among ``runs`` (MLflow runs) that logged
    ``metric`` and whose metrics are all finite, the configuration with the best mean over its
    seeds in ``mode`` ("max" or "min"), and its best run (ties: the run that started first, then
    the smaller run id) — the configuration the board and ``register`` name, and the run
    ``register`` registers. None when no run qualifies."""
    from weakbench.platform.results import config_group
    from weakbench.platform.selection import Candidate, select

    cands = [Candidate(r, config_group(r.data.params), r.data.tags.get(C.TAG_SEED, r.data.params.get("seed")),
                       float(r.data.metrics[metric]), (r.info.start_time or 0, r.info.run_id))
             for r in runs if metric in r.data.metrics and is_finite_metrics(r.data.metrics)]
    out = select(cands, mode == "max")
    return out[1].ref if out else None


def reconcile(client, exp_id: str, parent: str, sweep_id: str, state, method: str, source,
               *, interrupted: bool, interrupted_at: float | None = None) -> dict[str, int]:
    """Make MLflow agree with what happened, as the driver recorded it (``state``, a
    :class:`~weakbench.platform.sweep_state.SweepState`), not with Tune's periodically saved state.

    * a FINISHED run is never written again (below: unless its metrics are not finite);
    * a trial recorded ``failed`` (Tune's retries exhausted, or a local fault a retry cannot fix)
      ends FAILED with ``weakbench.error`` (its run is created FAILED when it failed before
      creating one: a worker that died, an actor that could not start);
    * a trial recorded ``stopped`` (the scheduler's own decision) ends KILLED with
      ``weakbench.stopped = stopped early by the scheduler``; nothing else is called stopped early;
    * a trial recorded ``finished`` whose run did not finish, and a trial still running when a
      sweep that was not interrupted ended (its driver failed), end FAILED saying so;
    * a FINISHED run with a non-finite metric (a NaN loss) ends FAILED with a ``DivergenceError``;
    * when the sweep was interrupted, a run still RUNNING, or one that ended after the interrupt
      (``interrupted_at``) because of it (Tune's stop reached it inside ``tune.report`` and it ended
      KILLED as if the scheduler had stopped it, or a worker got the SIGINT and it ended FAILED
      with a KeyboardInterrupt), is KILLED and tagged ``weakbench.interrupted``: the interrupt, not
      the scheduler or the code, ended it, and ``--resume`` continues it;
    * any other run still RUNNING (no outcome recorded) ends FAILED;
    * a trial Tune restarted gets tag ``weakbench.restarts``; the record's statuses are set from
      the runs' final ones.

    Returns ``{"restarts": total restarts over all trials}``.
    """
    from weakbench.platform import tracking

    restarts, scheduler_stopped = 0, set()
    for tid in state.order():
        entry = state.trials[tid]
        restarts += int(entry.get("restarts") or 0)
        if entry.get("status") == "stopped":
            scheduler_stopped.add(tid)
        _settle_recorded_trial(client, exp_id, parent, sweep_id, tid, entry, method, source, interrupted=interrupted)
    _fail_diverged(client, tracking.child_runs(client, exp_id, parent))
    if interrupted:
        _mark_interrupted(client, tracking.child_runs(client, exp_id, parent), scheduler_stopped, interrupted_at)
        tracking.reconcile_children(client, exp_id, parent, reason="the sweep was interrupted")
    else:
        for r in tracking.child_runs(client, exp_id, parent):
            if r.info.status == "RUNNING":
                tracking.fail_run(client, r.info.run_id, "the run was left RUNNING when the sweep ended (no outcome "
                                                         "was recorded for its trial)")
    _record_final_statuses(state, tracking.child_runs(client, exp_id, parent))
    return {"restarts": restarts}


def _settle_recorded_trial(client, exp_id: str, parent: str, sweep_id: str, tid: str, entry: dict, method: str, source,
                           *, interrupted: bool) -> None:
    """Make trial ``tid``'s run say what the record (``entry``) says happened to it (:func:`reconcile`'s
    first four rules and its restarts tag); a FINISHED run is never written."""
    from weakbench.platform import tracking

    run = tracking.find_trial_run(client, exp_id, sweep_id, tid)
    status = run.info.status if run is not None else None
    what = entry.get("status")
    if status == "FINISHED":
        pass  # finished results are never overwritten
    elif what == "failed":
        error = entry.get("error") or "the trial failed in Ray Tune; see its error.txt"
        if run is None:
            run_id, _ = tracking.get_or_create_trial_run(
                client, exp_id, parent_run_id=parent, sweep_id=sweep_id, trial_id=tid, run_name=f"{method}-{tid}",
                tags={C.TAG_METHOD: method, C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
                      C.TAG_SPLIT: "val"},
                params={k: v for k, v in (entry.get("config") or {}).items() if not k.startswith("__")})
            tracking.fail_run(client, run_id, error)
        elif status != "FAILED" or not run.data.tags.get(C.TAG_ERROR):
            if "weakbench.stopped" in run.data.tags:
                client.delete_tag(run.info.run_id, "weakbench.stopped")
            tracking.fail_run(client, run.info.run_id, run.data.tags.get(C.TAG_ERROR) or error)
    elif what == "stopped":
        if status in ("RUNNING", "KILLED"):  # tag, "[stopped early]" in the run name, KILLED
            tracking.mark_stopped_early(client, run.info.run_id)
    elif run is not None and status in ("RUNNING", "KILLED") and not interrupted:
        if "weakbench.stopped" in run.data.tags:
            client.delete_tag(run.info.run_id, "weakbench.stopped")
        tracking.fail_run(client, run.info.run_id, "the trial ended in Ray Tune but its run did not finish"
                          if what == "finished" else "the sweep's driver ended before this trial did")
    if int(entry.get("restarts") or 0) > 0 and run is not None:
        client.set_tag(run.info.run_id, C.TAG_RESTARTS, str(entry["restarts"]))


def _fail_diverged(client, runs: list) -> None:
    """A run that finished with a non-finite loss or metric diverged: it fails (the engine may
    already have failed it at the epoch it diverged; this catches any run that slipped through)."""
    from weakbench.platform import tracking

    for r in runs:
        if r.info.status == "FINISHED" and not is_finite_metrics(r.data.metrics):
            try:
                check_finite(r.data.metrics, f"run {r.info.run_id} (trial {r.data.tags.get(C.TAG_TRIAL_ID, '?')})")
            except DivergenceError as e:
                tracking.fail_run(client, r.info.run_id, e)


def _mark_interrupted(client, runs: list, scheduler_stopped: set[str], interrupted_at: float | None) -> None:
    """Tag ``weakbench.interrupted`` (and end KILLED) each run the interrupt ended: still RUNNING,
    or ended after ``interrupted_at`` as if stopped early or with a KeyboardInterrupt; a run the
    scheduler stopped stays stopped early."""
    since_ms = int(((interrupted_at or time.time()) - 2.0) * 1000)  # 2 s: clocks of one host, a report in flight
    for r in runs:
        if r.data.tags.get(C.TAG_TRIAL_ID) in scheduler_stopped:
            continue
        ended_by_interrupt = r.info.status == "RUNNING" or (
            (r.info.end_time or 0) >= since_ms
            and ((r.info.status == "KILLED" and r.data.tags.get("weakbench.stopped"))
                 or (r.info.status == "FAILED" and str(r.data.tags.get(C.TAG_ERROR, "")).startswith("KeyboardInterrupt"))))
        if ended_by_interrupt:
            client.set_tag(r.info.run_id, C.TAG_INTERRUPTED, "the sweep was interrupted; --resume continues it")
            if "weakbench.stopped" in r.data.tags:
                client.set_tag(r.info.run_id, "weakbench.stopped", "the sweep was interrupted")
            if r.info.status == "FAILED":
                client.delete_tag(r.info.run_id, C.TAG_ERROR)
                client.set_terminated(r.info.run_id, status="KILLED", end_time=r.info.end_time)


def _record_final_statuses(state, runs: list) -> None:
    """The record ends as MLflow does (what ``weakbench status`` reads)."""
    for r in runs:
        tid = r.data.tags.get(C.TAG_TRIAL_ID)
        if tid in state.trials:
            st = r.info.status
            state.trials[tid]["status"] = ("interrupted" if st == "KILLED" and r.data.tags.get(C.TAG_INTERRUPTED) else
                                           {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped"}.get(st, "failed"))
            if st == "FAILED":
                state.trials[tid]["error"] = r.data.tags.get(C.TAG_ERROR)


class FinalStatusError(WeakbenchError):
    """The driver could not write the trials' final statuses (a full disk, a read-only mount, an
    unreachable tracking store); the message names where and the fix. Exit status 1 (not 2: the
    input was fine)."""

    exit_code = 1


# lines of an error's text that say where it happened, not what: SQLAlchemy's autoflush preamble,
# the statement and the link
_NOISE = ("(raised as a result of", "[SQL", "[parameters", "(Background on")


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s text that says what failed (``(sqlite3.OperationalError) database
    or disk is full`` rather than SQLAlchemy's autoflush preamble), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_NOISE)] or lines
    return lines[0][:300] if lines else ""


@dataclass
class SweepTarget:
    """Where a running sweep lives and what it runs: its name and directory, the search space it
    runs (overrides applied), the dataset, its options as resolved, and its MLflow experiment and
    parent run; ``state`` is the driver's record (:class:`~weakbench.platform.sweep_state.SweepState`)."""

    name: str
    sweep_dir: Path
    space: Any
    source: Any
    opts: Any
    tracking_uri: str
    client: Any
    exp_id: str
    parent: str
    state: Any


def finish(t: SweepTarget, *, num_planned: int, t0: float, error: BaseException | None, interrupted: bool,
           interrupted_at: float | None, interrupt_signal: int) -> SweepSummary:
    """Reconcile MLflow with the record (:func:`reconcile`), count, select the best run, end the
    parent run and the record; returns the summary. Raises whatever MLflow or the file system raise."""
    from weakbench.platform import tracking

    client, exp_id, parent, state, space = t.client, t.exp_id, t.parent, t.state, t.space
    outcome = reconcile(client, exp_id, parent, t.name, state, space.method, t.source,
                        interrupted=interrupted, interrupted_at=interrupted_at)
    runs = tracking.child_runs(client, exp_id, parent)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    killed = [r for r in runs if r.info.status == "KILLED" and not r.data.tags.get(C.TAG_INTERRUPTED)]
    best = select_best_run(finished, space.metric, space.mode)
    if best is not None:
        tracking.log_metrics(client, parent, {f"best/{k}": v for k, v in best.data.metrics.items()}, step=0)
        client.set_tag(parent, "weakbench.best_run_id", best.info.run_id)
    summary = SweepSummary(
        sweep_name=t.name, sweep_dir=str(t.sweep_dir), tracking_uri=t.tracking_uri, experiment=t.opts.experiment,
        parent_run_id=parent, method=space.method, dataset=t.source.name, num_trials=len(runs),
        num_finished=len(finished), num_failed=len(failed), num_stopped=len(killed), wall_seconds=time.time() - t0,
        best_run_id=best.info.run_id if best else None, best_params=dict(best.data.params) if best else {},
        best_metrics=dict(best.data.metrics) if best else {}, metric=space.metric,
        num_planned=num_planned, num_restarts=outcome["restarts"], interrupted=interrupted,
        interrupt_signal=interrupt_signal)
    tracking.set_tags(client, parent, {"weakbench.trials_planned": num_planned, "weakbench.trials_finished": len(finished),
                                       "weakbench.trials_failed": len(failed), "weakbench.trials_stopped": len(killed),
                                       "weakbench.trial_restarts": outcome["restarts"]})
    # the parent says what happened: KILLED when interrupted, FINISHED only when every planned
    # trial finished (or was stopped early by the scheduler), FAILED otherwise
    code = summary.exit_code if error is None else 1
    if error is not None:
        client.set_tag(parent, C.TAG_ERROR, f"{type(error).__name__}: {error}"[:5000])
    elif code == 1:
        client.set_tag(parent, C.TAG_ERROR, f"{len(finished)} of {num_planned} planned trial(s) finished, "
                                            f"{len(failed)} failed, {len(killed)} stopped early")
    elif C.TAG_ERROR in client.get_run(parent).data.tags:
        client.delete_tag(parent, C.TAG_ERROR)  # a resumed sweep that succeeded: yesterday's error no longer holds
    client.set_terminated(parent, status="FINISHED" if code == 0 else "KILLED" if interrupted else "FAILED")
    state.end_driver(code)
    try:
        state.save()
    except OSError as e:  # MLflow has the outcome; the record is what `weakbench status` reads
        summary.warnings.append(f"could not write {state.path} ({e}); `weakbench status` may show this sweep as "
                                f"running: free space on (or make writable) the disk of {t.sweep_dir}")
    return summary


def searched_params(space_file, params: dict) -> dict:
    """``params`` restricted to the axes the space file searches (all of them when it cannot be read)."""
    from weakbench.platform.search_space import load_search_space

    try:
        keys = set(load_search_space(space_file).search)
    except Exception:  # noqa: BLE001 - a summary never fails on it
        return dict(params)
    return {k: v for k, v in params.items() if k in keys} or dict(params)


def follow_up_baselines(opts, s: SweepSummary, run: Callable[[Any], SweepSummary]) -> list[BaselineOutcome]:
    """After sweep ``s`` of a classifier → CAM method run with ``opts`` (``opts.baselines``, not
    interrupted, a run finished): sweep each trivial baseline that its dataset (fingerprint) and
    input size have no finished run of in its experiment (:mod:`weakbench.platform.trivial`), so the
    board that groups runs by dataset and input size carries them. ``run`` runs one sweep
    (:func:`weakbench.platform.sweep.run_sweep`); a baseline refused as bad input
    (:class:`~weakbench.core.errors.WeakbenchError`) is returned with its ``error`` and does not
    change the sweep's outcome. Returns one :class:`BaselineOutcome` per baseline swept."""
    from weakbench.platform import tracking, trivial

    if not opts.baselines or s.interrupted or not s.num_finished or not s.best_run_id or not trivial.applies_to(s.method):
        return []
    client = tracking.client_for(s.tracking_uri)
    best = client.get_run(s.best_run_id)
    fingerprint = best.data.tags.get(C.TAG_DATASET_FINGERPRINT)
    size = best.data.params.get("input_size")
    if not fingerprint or size is None:
        return []
    size = int(float(size))
    out = []
    for name in trivial.missing_baselines(client, best.info.experiment_id, fingerprint=fingerprint, input_size=size):
        bopts = trivial.baseline_sweep_options(opts, name, input_size=size).model_copy(
            update={"name": trivial.automatic_sweep_name(name, s.sweep_name)})
        try:
            b = run(bopts)
        except WeakbenchError as e:
            out.append(BaselineOutcome(name=name, input_size=size, error=str(e)))
            continue
        out.append(BaselineOutcome(
            name=name, input_size=size, sweep_name=b.sweep_name, metric=b.metric, value=b.best_metrics.get(b.metric),
            test=b.best_metrics.get("test/" + b.metric.split("/", 1)[-1]),
            chosen={k: v for k, v in searched_params(bopts.space, b.best_params).items() if k != "seed"}))
    return out
