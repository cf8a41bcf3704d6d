"""The live view of a sweep, and its quiet terminal.

One row per trial: the searched parameters, status, stage (``train epoch 2/3``, ``eval``), the
latest and the best value of the selecting validation metric, elapsed time and an estimate of
what is left. Two sources feed the same :class:`SweepView`:

* a running sweep's driver: :class:`SweepObserver` hands Ray Tune a :class:`LiveCallback`
  (``on_trial_start`` / ``on_trial_result`` / ``on_trial_complete`` / ``on_trial_error``) and
  draws the view with rich ``Live`` (on a terminal) or one line per trial event (a pipe, CI);
* ``weakbench status``: :func:`load_view` reads the driver's own record of the sweep
  (``<sweep dir>/state.json``, :mod:`weakbench.platform.sweep_state`: written as Tune's events
  happen, with the driver's heartbeat, so that a sweep whose driver is gone is told from a running
  one; the sweep's plan, :class:`~weakbench.platform.sweep_plan.SweepPlan`, is recorded there too),
  and the sweep's MLflow runs (stage tags, errors; the only source when the sweep directory is on a
  cluster). Tune's own files are never read.

Every report to Tune carries ``progress`` (plan units done: one per fit epoch, one per map/eval
stage) and ``epoch`` (fit epochs done); the stage is read off the method's plan.

:class:`QuietOutput` sends everything written to file descriptors 1 and 2 of the driver (Ray's,
Tune's, MLflow's, pycocotools' and the workers' forwarded output) to ``<sweep dir>/sweep.log``;
the view and one line per error go to the terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

LOG_NAME = "sweep.log"


# ---------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class PlanStage:
    """One stage of a trial's plan as the view needs it: name, kind, progress units, epochs."""

    name: str
    kind: str
    units: int
    epochs: int = 0


def plan_of(method: str, params: dict[str, Any], *, num_classes: int = 2, multilabel: bool = True) -> list[PlanStage]:
    """The plan of one trial (:meth:`weakbench.methods.base.Method.plan`), or [] when the config does
    not build (the view then shows progress units without stage names)."""
    try:
        from weakbench.methods import build_method
        from weakbench.methods.base import stored_config

        config = stored_config(method, {k: v for k, v in params.items() if not k.startswith("__")})
        m = build_method(method, config, num_classes=num_classes, multilabel=multilabel)
        return [PlanStage(st.name, st.kind, int(st.units), int(getattr(st, "epochs", 0) or 0)) for st in m.plan()]
    except Exception:  # noqa: BLE001 - a display aid only
        return []


def stage_label(plan: list[PlanStage], progress: float) -> str:
    """What a running trial is doing after ``progress`` plan units: ``train epoch 2/3`` (epoch 2 of
    the fit stage ``train`` is running), ``eval``; ``finishing`` past the last unit."""
    done = int(progress)
    cum = 0
    for st in plan:
        if done < cum + st.units:
            return f"{st.name} epoch {done - cum + 1}/{st.epochs}" if st.kind == "fit" else st.name
        cum += st.units
    return "finishing" if plan else f"{done} units"


@dataclass
class TrialRow:
    """One trial in the view. Times are Unix seconds; ``status`` is one of ``pending``, ``starting``,
    ``running``, ``finished``, ``stopped`` (early, by the scheduler), ``failed``, ``paused``."""

    trial_id: str
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    progress: float = 0.0
    epoch: int = 0
    total_units: int = 0
    stage: str = ""
    latest: float | None = None
    best: float | None = None
    started: float | None = None
    updated: float | None = None
    ended: float | None = None
    error: str | None = None
    plan: list[PlanStage] = field(default_factory=list)

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return max(0.0, (self.ended or now) - self.started)

    def left(self, now: float) -> float | None:
        """Seconds left: elapsed per unit so far times the units left (None before the first
        report, 0 once ended)."""
        if self.ended is not None or self.status in ("finished", "stopped", "failed"):
            return 0.0
        el = self.elapsed(now)
        if el is None or self.progress <= 0 or not self.total_units:
            return None
        return el / self.progress * max(0.0, self.total_units - self.progress)


class SweepView:
    """Everything the live view shows; thread-safe (Tune's callbacks write, a refresh thread draws)."""

    def __init__(self, name: str, *, metric: str, mode: str = "max", searched: Iterable[str] = (),
                 planned: int = 0, concurrency: int = 1, started: float | None = None, method: str = ""):
        self.name, self.metric, self.mode, self.method = name, metric, mode, method
        self.searched = [k for k in searched]
        self.planned, self.concurrency = planned, max(1, concurrency)
        self.started = started or time.time()
        self.ended: float | None = None
        self.rows: dict[str, TrialRow] = {}
        self.note = ""
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- updates
    def row(self, trial_id: str) -> TrialRow:
        with self._lock:
            if trial_id not in self.rows:
                self.rows[trial_id] = TrialRow(trial_id)
            return self.rows[trial_id]

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def on_result(self, row: TrialRow, result: dict[str, Any], now: float | None = None) -> None:
        """Fold one Tune report (``progress``, ``epoch``, metrics) into ``row``."""
        now = now or time.time()
        row.updated = now
        if row.started is None:
            row.started = now
        if row.status in ("pending", "starting"):
            row.status = "running"
        if "progress" in result:
            row.progress = float(result["progress"])
        if "epoch" in result:
            row.epoch = int(result["epoch"])
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            row.latest = float(v)
            if self.better(row.latest, row.best):
                row.best = row.latest
        row.stage = stage_label(row.plan, row.progress)

    def best_row(self) -> TrialRow | None:
        """The trial with the best value seen in any report (running trials and early epochs
        included): "best so far"."""
        best = None
        for r in list(self.rows.values()):
            if r.best is not None and (best is None or self.better(r.best, best.best)):
                best = r
        return best

    def selected_row(self) -> TrialRow | None:
        """The trial the sweep selects, by the one selection rule of the sweep summary, the board
        and ``register`` (:func:`weakbench.platform.selection.select`): among *finished* trials
        (a trial's best earlier epoch and trials ASHA stopped do not count; None while none has
        finished), the configuration (its params but ``seed``) with the best mean final value
        over its seeds, and its best trial; ties go to the trial that started first (rows are
        kept in start order)."""
        from weakbench.platform.results import config_group
        from weakbench.platform.selection import Candidate, select

        cands = [Candidate(r, config_group(r.params), r.params.get("seed"), float(r.latest), (i,))
                 for i, r in enumerate(list(self.rows.values())) if r.status == "finished" and r.latest is not None]
        out = select(cands, self.mode == "max")
        return out[1].ref if out else None

    def left(self, now: float) -> float | None:
        """Seconds left of the sweep: the longest running trial's estimate plus the trials not yet
        started, run ``concurrency`` at a time at the mean trial duration (None when unknown)."""
        rows = list(self.rows.values())
        ended = [r.elapsed(now) for r in rows if r.status == "finished" and r.elapsed(now)]
        running = [r for r in rows if r.status in ("running", "starting")]
        ests = [r.elapsed(now) + r.left(now) for r in running if r.left(now) is not None]
        per_trial = (sum(ended) / len(ended)) if ended else (sum(ests) / len(ests) if ests else None)
        waiting = max(0, self.planned - len([r for r in rows if r.status != "pending"]))
        if per_trial is None:
            return None if (waiting or running) else 0.0
        run_left = max([r.left(now) or 0.0 for r in running], default=0.0)
        return run_left + math.ceil(waiting / self.concurrency) * per_trial

    # ---------------------------------------------------------------- rendering
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in list(self.rows.values()):
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def header(self, now: float | None = None) -> Text:
        now = now or time.time()
        c = self.counts()
        seen = len(self.rows)
        c["running"] = c.get("running", 0) + c.pop("starting", 0)
        parts = [f"{c.get(s, 0)} {s}" for s in ("running", "finished", "stopped", "failed", "paused") if c.get(s)]
        waiting = max(0, self.planned - seen) + c.get("pending", 0)
        if waiting:
            parts.append(f"{waiting} waiting")
        left = None if self.ended else self.left(now)
        t = Text()
        t.append(f"sweep {self.name}", style="bold")
        t.append(f"  {', '.join(parts) or 'starting'} of {max(self.planned, seen)} trials"
                 f"  elapsed {fmt_seconds((self.ended or now) - self.started)}")
        if left is not None and not self.ended:
            t.append(f"  ~{fmt_seconds(left)} left")
        sel = self.selected_row()
        b = self.best_row()
        if sel is not None:
            t.append(f"  best {self.metric} {sel.latest:.2f} ({sel.trial_id}, finished)", style="green")
        elif b is not None:
            t.append(f"  best so far {self.metric} {b.best:.2f} ({b.trial_id})", style="green")
        return t

    def table(self, now: float | None = None) -> Table:
        now = now or time.time()
        t = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
        t.add_column("trial")
        for k in self.searched:
            t.add_column(k, justify="right")
        t.add_column("status")
        t.add_column("epoch / stage")
        short = self.metric.split("/", 1)[-1]
        t.add_column(short, justify="right")
        t.add_column("best", justify="right")
        t.add_column("elapsed", justify="right")
        t.add_column("left", justify="right")
        best = self.selected_row() or self.best_row()
        for r in sorted(list(self.rows.values()), key=lambda r: (r.started or float("inf"), r.trial_id)):
            status = Text(r.status, style=_STATUS_STYLE.get(r.status, ""))
            stage = r.stage if r.status in ("running", "starting") else (
                f"{r.epoch} epoch{'s' if r.epoch != 1 else ''}" if r.status in ("finished", "stopped", "failed") else "")
            if r.status == "starting" and not r.stage:
                stage = "start-up"
            left = r.left(now)
            t.add_row(r.trial_id, *[fmt_value(r.params.get(k)) for k in self.searched], status, stage,
                      fmt_metric(r.latest), Text(fmt_metric(r.best), style="green" if r is best else ""),
                      fmt_seconds(r.elapsed(now)), "" if left in (None, 0.0) else fmt_seconds(left))
        return t

    def records(self, now: float | None = None) -> list[dict[str, Any]]:
        """The trials as plain records for :func:`weakbench.platform.output.render` (the rows of
        :meth:`table`, raw: seconds as numbers, the searched parameters under their names)."""
        now = now or time.time()
        out = []
        for r in sorted(list(self.rows.values()), key=lambda r: (r.started or float("inf"), r.trial_id)):
            stage = r.stage if r.status in ("running", "starting") else (
                f"{r.epoch} epoch{'s' if r.epoch != 1 else ''}" if r.status in ("finished", "stopped", "failed") else "")
            left = r.left(now)
            out.append({"trial": r.trial_id, **{k: r.params.get(k) for k in self.searched}, "status": r.status,
                        "stage": stage or ("start-up" if r.status == "starting" else ""), "latest": r.latest,
                        "best": r.best, "elapsed_s": r.elapsed(now), "left_s": None if left in (None, 0.0) else left,
                        "error": r.error})
        return out

    def columns(self) -> list:
        """The columns of :meth:`records` (the live table's), for :func:`weakbench.platform.output.render`."""
        from weakbench.platform.output import Column

        def secs(key: str):
            return lambda r: "" if r.get(key) is None else fmt_seconds(r[key])

        return ([Column("trial", "trial")]
                + [Column(k, k, kind="number", text=(lambda r, k=k: fmt_value(r.get(k)))) for k in self.searched]
                + [Column("status", "status", style=lambda r: _STATUS_STYLE.get(r["status"])), Column("stage", "epoch / stage"),
                   Column("latest", self.metric.split("/", 1)[-1], kind="number", text=lambda r: fmt_metric(r["latest"])),
                   Column("best", "best", kind="number", text=lambda r: fmt_metric(r["best"])),
                   Column("elapsed_s", "elapsed", kind="number", text=secs("elapsed_s")),
                   Column("left_s", "left", kind="number", text=secs("left_s"))])

    def renderable(self):
        now = time.time()
        parts: list[Any] = [self.header(now), self.table(now)]
        if self.note:
            parts.append(Text(self.note, style="dim"))
        return Group(*parts)


_STATUS_STYLE = {"running": "cyan", "starting": "cyan", "finished": "green", "stopped": "yellow", "failed": "red",
                 "paused": "yellow", "pending": "dim"}


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def fmt_metric(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


# ------------------------------------------------------------------------ rows from the record
# statuses of the driver's record (weakbench.platform.sweep_state) as the view shows them
_RECORD_STATUS = {"pending": "pending", "running": "running", "restarting": "starting", "finished": "finished",
                  "stopped": "stopped", "failed": "failed", "interrupted": "paused"}


def trial_params(config: dict[str, Any], seed_values: list[int] | None) -> dict[str, Any]:
    """A trial's configuration as the user sees it: the Repeater's ``__trial_index__`` becomes the
    seed it stands for (as the sweep's trial function does)."""
    params = {k: v for k, v in (config or {}).items() if not k.startswith("__")}
    if seed_values and "__trial_index__" in (config or {}):
        params["seed"] = seed_values[int(config["__trial_index__"] or 0) % len(seed_values)]
    return params


def _ended_status(row: TrialRow) -> str:
    """A Tune TERMINATED trial: finished when its plan ran to the end, else stopped early."""
    if row.total_units and row.progress < row.total_units:
        return "stopped"
    return "finished"


# ------------------------------------------------------------------------ the driver's callback
_ACTIVE: "SweepObserver | None" = None


def _make_live_callback():
    from ray.tune import Callback

    class LiveCallback(Callback):
        """Ray Tune callback feeding the process's active :class:`SweepObserver`.

        Stateless on purpose: Tune pickles its run config (callbacks included) into ``tuner.pkl``
        and a resumed sweep gets this object back; it forwards to whatever observer is active (or
        does nothing).
        """

        def on_trial_start(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_started(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_ended(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_ended(trial, error=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            if _ACTIVE is not None:
                _ACTIVE.trial_recovering(trial)

    LiveCallback.__module__, LiveCallback.__qualname__ = __name__, "LiveCallback"
    return LiveCallback


def __getattr__(name: str):
    # ``LiveCallback`` is built on first use: importing Ray Tune costs seconds, and `weakbench
    # status` (this module, on a laptop) needs none of it. Pickle finds the class here by name.
    if name == "LiveCallback":
        if "LiveCallback" not in globals():
            globals()["LiveCallback"] = _make_live_callback()
        return globals()["LiveCallback"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QuietOutput:
    """Redirect this process's file descriptors 1 and 2 to a log file (children inherit them: Ray's
    own processes, pycocotools' prints, MLflow's warnings all land there); :attr:`terminal` is the
    original stdout, for the live view.

    ``move(path)`` moves the log once its final place (the sweep directory) is known.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.terminal = None
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> "QuietOutput":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self._redirect(self.path, "a")
        return self

    def _redirect(self, path: Path, mode: str) -> None:
        with open(path, mode, encoding="utf-8") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)

    def move(self, path: Path) -> None:
        """Continue the log at ``path`` (what was written so far is copied to its start)."""
        path = Path(path)
        if path == self.path:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as dst, open(self.path, "rb") as src:
            dst.write(src.read())
        self._redirect(path, "a")
        try:
            self.path.unlink()
        except OSError:
            pass
        self.path = path

    def __exit__(self, *exc) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        if self._saved is not None:
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None
        if self.terminal is not None:
            self.terminal.flush()
            self.terminal.close()
            self.terminal = None


class SweepObserver:
    """What ``weakbench sweep`` shows while :func:`weakbench.platform.sweep.run_sweep` runs.

    ``run_sweep(opts, observer=...)`` calls :meth:`prepared` once the sweep directory, the search
    space and the plan are known (it returns the Tune callbacks to install) and :meth:`ended`
    at the end. ``console`` is where the view goes (the terminal); ``log_path`` is the log file
    (None: nothing is redirected, as with ``--verbose``).
    """

    def __init__(self, console: Console, *, quiet: QuietOutput | None = None, live: bool | None = None,
                 refresh_per_second: float = 2.0):
        self.console = console
        self.quiet = quiet
        self.use_live = console.is_terminal if live is None else live
        self.view: SweepView | None = None
        self.live = None
        self.seed_values: list[int] | None = None
        self.method = ""
        self.num_classes, self.multilabel = 2, True
        self.sweep_dir: Path | None = None
        self._refresh = refresh_per_second

    # ---------------------------------------------------------------- called by run_sweep
    def prepared(self, *, sweep_dir: Path, name: str, space, source, num_planned: int, concurrency: int,
                 seed_values: list[int] | None) -> list:
        """The sweep is about to start Tune: move the log into the sweep directory, print its path
        once, start the view; returns ``[LiveCallback()]``."""
        global _ACTIVE
        self.sweep_dir = Path(sweep_dir)
        self.method = space.method
        self.num_classes, self.multilabel = source.num_classes, source.multilabel
        self.seed_values = seed_values
        searched = [k for k in space.search if k != "seed"]
        if "seed" in space.search:
            searched.append("seed")
        self.view = SweepView(name, metric=space.metric, mode=space.mode, searched=searched, planned=num_planned,
                              concurrency=concurrency, method=space.method)
        if self.quiet is not None:
            self.quiet.move(self.sweep_dir / LOG_NAME)
            self.console.print(Text(f"Ray, Tune and MLflow output: {self.quiet.path} (--verbose shows it here)", style="dim"))
        if self.use_live:
            from rich.live import Live

            self.live = Live(get_renderable=self.view.renderable, console=self.console,
                             refresh_per_second=self._refresh, redirect_stdout=False, redirect_stderr=False,
                             transient=False)
            self.live.start()
        _ACTIVE = self
        return [__getattr__("LiveCallback")()]

    def ended(self) -> None:
        """The sweep ended (or failed): stop the view, leaving its final state on the terminal."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if self.view is not None:
            self.view.ended = time.time()
        if self.live is not None:
            self.live.stop()
            self.live = None
        elif self.view is not None and self.view.rows:
            self.console.print(self.view.renderable())

    # ---------------------------------------------------------------- Tune events
    def _row(self, trial) -> TrialRow:
        row = self.view.row(trial.trial_id)
        if not row.params:
            row.params = trial_params(getattr(trial, "config", {}) or {}, self.seed_values)
            row.plan = plan_of(self.method, row.params, num_classes=self.num_classes, multilabel=self.multilabel)
            row.total_units = sum(s.units for s in row.plan)
        return row

    def _event(self, text: Text) -> None:
        """One line per trial event when there is no live table (a pipe, a log)."""
        if self.live is None:
            self.console.print(text)

    def trial_started(self, trial) -> None:
        if self.view is None:
            return
        row = self._row(trial)
        if row.started is None:
            row.started = time.time()
        row.status, row.ended, row.error = "starting", None, None
        row.stage = stage_label(row.plan, row.progress) if row.progress else "start-up"
        params = ", ".join(f"{k}={fmt_value(row.params.get(k))}" for k in self.view.searched)
        self._event(Text(f"trial {row.trial_id} started: {params}"))

    def trial_recovering(self, trial) -> None:
        if self.view is None:
            return
        row = self._row(trial)
        row.status = "starting"
        self.console.print(Text(f"trial {row.trial_id}: a worker, actor or node died; restarting from its latest "
                                f"checkpoint (full log: {self._log_hint()})", style="yellow"))

    def trial_result(self, trial, result: dict[str, Any]) -> None:
        if self.view is not None:
            self.view.on_result(self._row(trial), result)

    def trial_ended(self, trial, *, error: bool) -> None:
        if self.view is None:
            return
        row = self._row(trial)
        row.ended = time.time()
        last = getattr(getattr(trial, "run_metadata", None), "last_result", None) or {}
        if last:
            self.view.on_result(row, last, now=row.updated or row.ended)
        from weakbench.platform.tune_record import FATAL_KEY

        if error or last.get(FATAL_KEY):  # a local fault ends the trial without a retry: failed all the same
            row.status = "failed"
            from weakbench.platform.launch import tune_error_text

            row.error = str(last[FATAL_KEY]) if last.get(FATAL_KEY) else tune_error_text(trial)
            where = getattr(trial, "error_file", None) or (self.sweep_dir / "trials" / row.trial_id / "error.txt"
                                                           if self.sweep_dir else None)
            self.console.print(Text(f"trial {row.trial_id} failed: {_one_line(row.error)} "
                                    f"(traceback: {where}; full log: {self._log_hint()})", style="red"))
            return
        row.status = _ended_status(row)
        what = "finished" if row.status == "finished" else f"stopped early at epoch {row.epoch}"
        self._event(Text(f"trial {row.trial_id} {what}: {self.view.metric} {fmt_metric(row.latest) or '-'} "
                         f"in {fmt_seconds(row.elapsed(row.ended))}"))

    def _log_hint(self) -> str:
        return str(self.quiet.path) if self.quiet is not None else "the output above"


def _one_line(s: str, limit: int = 200) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ------------------------------------------------------------------------ weakbench status
def _space_of(saved: dict[str, Any]):
    from weakbench.platform.search_space import load_search_space
    from weakbench.platform.sweep_plan import with_overrides

    try:
        return with_overrides(load_search_space(saved["space"]), saved.get("overrides") or {})
    except Exception:  # noqa: BLE001 - the space file moved: MLflow's parent params still tell the metric
        return None


@dataclass
class _Shape:
    """What the view needs to know of a sweep: its method, selecting metric and direction, the
    searched axes, the seed grid (for a repeat index), the fixed values and the planned trials."""

    method: str
    metric: str
    mode: str
    searched: list[str]
    seed_values: list[int] | None
    fixed: dict[str, Any]
    planned: int


def _shape(record, saved: dict[str, Any], parent) -> _Shape:
    """The sweep's shape from the plan the driver recorded (``state.json``), else its space file
    (``sweep.json`` names it; a record of an older weakbench has no plan), else the MLflow parent
    run's params (the sweep directory is elsewhere)."""
    from weakbench.core import conventions as C
    from weakbench.methods.metric_declarations import DEFAULT_SELECT_METRIC, lookup

    pp = parent.data.params if parent is not None else {}
    planned = int(parent.data.tags.get("weakbench.trials_planned") or 0) if parent is not None else 0
    planned = planned or int((record.data.get("planned") if record is not None else 0) or 0)
    planned = planned or int(saved.get("trials") or pp.get("trials") or 0)
    plan = (record.data.get("plan") if record is not None else None) or {}
    if plan:
        seeds = (plan.get("axes") or {}).get("seed") or {}
        seed_values = plan.get("seed_values") or ([int(v) for v in seeds["values"]] if seeds.get("kind") == "grid" else None)
        return _Shape(plan["method"], plan["metric"], plan["mode"], list(plan.get("searched") or []), seed_values,
                      dict(plan.get("fixed") or {}), planned)
    space = _space_of(saved) if saved else None
    if space is not None:
        grid = space.grid_axes()
        return _Shape(space.method, space.metric, space.mode,
                      [k for k in space.search if k != "seed"] + (["seed"] if "seed" in space.search else []),
                      [int(v) for v in grid["seed"]] if "seed" in grid else None, dict(space.fixed), planned)
    metric = pp.get("metric", DEFAULT_SELECT_METRIC)
    declared = lookup(metric)
    mode = pp.get("mode") or (declared.direction if declared and declared.direction else "max")
    return _Shape(parent.data.tags.get(C.TAG_METHOD, "") if parent is not None else "", metric, mode,
                  [k[len("search."):] for k in pp if k.startswith("search.")], None, {}, planned)


def _mlflow_sweep(uri: str, experiment: str, name: str) -> tuple[Any, list]:
    """The sweep's MLflow parent run and its trial runs, ``(None, [])`` when MLflow has none or
    cannot be reached (the driver's record alone then)."""
    from weakbench.core import conventions as C
    from weakbench.platform import tracking

    try:
        client = tracking.client_for(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None, []
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{C.TAG_KIND}` = '{C.KIND_SWEEP}' and "
                                                                      f"tags.`{C.TAG_SWEEP_ID}` = '{name}'", max_results=1)
        if not found:
            return None, []
        return found[0], tracking.child_runs(client, exp.experiment_id, found[0].info.run_id)
    except Exception:  # noqa: BLE001 - MLflow unreachable: the record alone
        return None, []


def _rows_from_record(view: "SweepView", record, shape: _Shape) -> None:
    """One row per trial the driver recorded, in the order the searcher suggested them."""
    for tid in (record.order() if record is not None else []):
        entry = record.trials[tid]
        row = view.row(tid)
        row.params = trial_params(entry.get("config") or {}, shape.seed_values)
        row.plan = plan_of(shape.method, {**shape.fixed, **row.params})
        row.total_units = sum(s.units for s in row.plan)
        row.started = entry.get("started")
        if entry.get("progress") is not None or entry.get("latest") is not None:
            view.on_result(row, {k: entry[k] for k in ("progress", "epoch") if entry.get(k) is not None}
                           | ({shape.metric: entry["latest"]} if entry.get("latest") is not None else {}),
                           now=entry.get("updated") or entry.get("started"))
        row.status = _RECORD_STATUS.get(entry.get("status"), "pending")
        row.ended = entry.get("ended")
        row.error = entry.get("error")
        if row.status == "starting":
            row.stage = "start-up"


def _rows_from_mlflow(view: "SweepView", runs: list, shape: _Shape) -> None:
    """Trials the record does not show (no sweep directory here), the stage tag, errors, the runs'
    own times and statuses."""
    from weakbench.core import conventions as C

    for tid, r in {r.data.tags.get(C.TAG_TRIAL_ID): r for r in runs}.items():
        if not tid:
            continue
        row = view.row(tid)
        if not row.params:
            row.params = {k: _parse(v) for k, v in r.data.params.items() if k in shape.searched}
            row.plan = plan_of(shape.method, {k: _parse(v) for k, v in r.data.params.items()})
            row.total_units = sum(s.units for s in row.plan)
        if row.started is None:
            row.started = r.info.start_time / 1000.0
        v = r.data.metrics.get(view.metric)
        if v is not None and math.isfinite(v):
            if row.latest is None or (r.info.status != "RUNNING"):
                row.latest = float(v)
            if view.better(float(v), row.best):
                row.best = float(v)
        status = r.info.status
        if status == "RUNNING":
            if row.status in ("pending", "paused"):
                row.status = "running"
            stage = r.data.tags.get("weakbench.stage")
            if stage and row.status == "running" and not row.stage.startswith(stage):
                row.stage = stage
        else:
            row.ended = row.ended or (r.info.end_time / 1000.0 if r.info.end_time else None)
            row.status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped"}.get(status, row.status)
            if status == "KILLED" and r.data.tags.get(C.TAG_INTERRUPTED):
                row.status = "paused"
            if status == "FAILED":
                row.error = r.data.tags.get(C.TAG_ERROR) or row.error
        if row.best is None and row.latest is not None:
            row.best = row.latest


def _sweep_times(view: "SweepView", parent, sweep_dir: Path | None) -> None:
    """When the sweep started and ended: its parent run's times; without a readable parent run,
    its trials' (else ``sweep.json``'s), never "elapsed 0 s" from the time of this call."""
    if parent is not None:
        view.started = parent.info.start_time / 1000.0
        if parent.info.status != "RUNNING" and parent.info.end_time:
            view.ended = parent.info.end_time / 1000.0
        return
    starts = [r.started for r in view.rows.values() if r.started]
    sweep_json = sweep_dir / "sweep.json" if sweep_dir is not None else None
    view.started = min(starts) if starts else (
        sweep_json.stat().st_mtime if sweep_json is not None and sweep_json.is_file() else view.started)
    rows = list(view.rows.values())
    if rows and len(rows) >= view.planned and all(r.status in ("finished", "stopped", "failed", "paused") for r in rows):
        view.ended = max((r.ended or r.updated or r.started or view.started) for r in rows)


def _note(view: "SweepView", record, parent, uri: str) -> None:
    """The line under the table: a driver that is gone (its running trials shown paused, and
    ``--watch`` stops), where a running sweep is tracked, and each failed trial's error."""
    from weakbench.platform.sweep_state import driver_gone

    gone = driver_gone(record) if record is not None else None
    if gone:
        for row in view.rows.values():
            if row.status in ("running", "starting", "pending"):
                row.status = "paused"
        view.ended = view.ended or float(record.driver.get("heartbeat") or time.time())
        view.note = (f"the sweep is not running: {gone}; `weakbench sweep <space> --resume --name {view.name}` continues it")
    elif parent is not None and parent.info.status == "RUNNING":
        view.note = f"MLflow {uri}, parent run {parent.info.run_id}"
    failed = [r for r in view.rows.values() if r.status == "failed" and r.error]
    if failed:
        view.note = "\n".join([view.note] * bool(view.note) + [f"trial {r.trial_id} failed: {_one_line(r.error)}" for r in failed])


def find_sweep_dir(output_dir: str | Path, name: str | None) -> Path | None:
    """``<output_dir>/sweeps/<name>``, or, when ``name`` is None, the most recently started sweep there
    (a folder whose start failed is skipped: :func:`weakbench.platform.sweep_state.started_sweeps`) that
    the user started (not a trivial-baseline sweep that ``weakbench sweep`` added after it,
    :func:`weakbench.platform.trivial.is_automatic_sweep`)."""
    from weakbench.platform.sweep_state import started_sweeps
    from weakbench.platform.trivial import is_automatic_sweep

    sweeps = Path(output_dir) / "sweeps"
    if name:
        return sweeps / name
    cands = [p for p in started_sweeps(sweeps) if not is_automatic_sweep(p.name)]
    return cands[-1] if cands else None


def load_view(name: str | None, *, output_dir: str | Path, tracking_uri: str | None = None,
              experiment: str | None = None) -> SweepView:
    """The view of sweep ``name`` (default: the latest under ``output_dir``) from the driver's own
    record (``state.json``, when the sweep directory is readable here) and MLflow (always). Reads no
    file of Ray Tune's and imports no Ray.

    Raises:
        ConfigError: no such sweep in the sweep directory nor in MLflow.
    """
    from weakbench.core import conventions as C
    from weakbench.core.errors import ConfigError
    from weakbench.platform import tracking
    from weakbench.platform.sweep_state import SweepState

    sweep_dir = find_sweep_dir(output_dir, name)
    saved: dict[str, Any] = {}
    if sweep_dir is not None and (sweep_dir / "sweep.json").is_file():
        saved = json.loads((sweep_dir / "sweep.json").read_text())
    record = SweepState.load(sweep_dir) if sweep_dir is not None else None
    name = name or (saved.get("name") or (sweep_dir.name if sweep_dir else None))
    if not name:
        raise ConfigError(f"no sweep in {Path(output_dir) / 'sweeps'}; pass the sweep's name (weakbench status NAME) "
                          f"and --tracking-uri for a sweep that runs elsewhere")
    uri = tracking_uri or saved.get("tracking_uri") or tracking.default_tracking_uri(output_dir)
    exp_name = experiment or saved.get("experiment") or C.DEFAULT_EXPERIMENT
    parent, runs = _mlflow_sweep(uri, exp_name, name)
    if parent is None and not saved and record is None:
        raise ConfigError(f"sweep {name!r}: not in {Path(output_dir) / 'sweeps'} nor in MLflow {uri} (experiment "
                          f"{exp_name}); check the name, --output-dir and --tracking-uri")
    shape = _shape(record, saved, parent)
    view = SweepView(name, metric=shape.metric, mode=shape.mode, searched=shape.searched, planned=shape.planned,
                     method=shape.method)
    _rows_from_record(view, record, shape)
    _rows_from_mlflow(view, runs, shape)
    _sweep_times(view, parent, sweep_dir)
    _note(view, record, parent, uri)
    return view


def _parse(v: str) -> Any:
    """An MLflow param string back to a number where it is one."""
    for cast in (int, float):
        try:
            return cast(v)
        except (TypeError, ValueError):
            pass
    return v
