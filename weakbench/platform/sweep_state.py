"""The sweep driver's own record of what happened: ``<sweep dir>/state.json``.

Ray Tune saves its experiment state about every 10 s; it is not a record of what happened (a
trial that errored can still read RUNNING there at the end of the sweep, and a trial that started
after the last save is missing from it). The driver therefore keeps its own record, written
atomically (a temporary file, ``fsync``, ``os.replace``) at every event, as the event happens:

* ``trials``: one entry per trial, keyed by the trial's id (Tune's id when the trial was first
  suggested; a trial continued by ``--resume`` keeps it, :data:`TRIAL_ID_KEY`), in the order the
  searcher suggested them. Each holds the configuration (recorded *before* the trial starts), its
  ``status`` (``pending``, ``running``, ``restarting``, ``finished``, ``stopped`` — by the
  scheduler's own decision only —, ``failed``), the error, restarts, progress and the latest value
  of the selecting metric. The trial's MLflow run is found by its tags (sweep id + trial id).
* ``driver``: the process that runs the sweep (``pid``, ``host``), its ``heartbeat`` (Unix time,
  renewed every :data:`HEARTBEAT_S` while Tune runs), ``ended`` and ``exit_code`` once it ends.
  :func:`driver_gone` tells a sweep whose driver died (SIGKILL, a lost machine) from a running one.

Nothing here imports Ray: ``weakbench status`` reads the file on a laptop. The Ray side (the Tune
callback, the searcher wrapper that replays recorded trials on ``--resume``) is
:mod:`weakbench.platform.tune_record`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from weakbench.core.io import atomic_write_text

STATE_NAME = "state.json"
VERSION = 1
#: seconds between two heartbeats of a running driver
HEARTBEAT_S = 5.0
#: a heartbeat older than this (seconds) means the driver is gone (on another host, where its
#: process cannot be looked up); Tune's loop renews it every few seconds even when nothing happens
STALE_S = 60.0
#: the configuration key that carries a recorded trial's id into a trial that ``--resume`` replays
#: under a new Tune trial (the trial function and the callback use it as the trial's identity)
TRIAL_ID_KEY = "__trial_id__"
ENDED = ("finished", "stopped", "failed")


class SweepState:
    """The record of one sweep (see the module docstring); ``data`` is the JSON document."""

    def __init__(self, path: Path, data: dict[str, Any] | None = None):
        self.path = Path(path)
        self.data: dict[str, Any] = data or {"version": VERSION, "driver": {}, "trials": {}}
        self.data.setdefault("trials", {})
        self.data.setdefault("driver", {})

    @classmethod
    def load(cls, sweep_dir: Path) -> "SweepState | None":
        """The record in ``sweep_dir``, or None when there is none (a sweep of an older weakbench,
        or one whose start failed) or it cannot be read."""
        path = Path(sweep_dir) / STATE_NAME
        try:
            return cls(path, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    @property
    def trials(self) -> dict[str, dict[str, Any]]:
        return self.data["trials"]

    @property
    def driver(self) -> dict[str, Any]:
        return self.data["driver"]

    def save(self) -> None:
        """Write the record atomically and fsync'ed (:func:`weakbench.core.io.atomic_write_text`).
        Raises OSError."""
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str), fsync=True)

    # ------------------------------------------------------------------ the driver
    def start_driver(self, now: float | None = None) -> None:
        """This process now drives the sweep (a fresh start or a ``--resume``)."""
        now = now or time.time()
        self.data["driver"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now,
                               "ended": None, "exit_code": None}

    def end_driver(self, exit_code: int, now: float | None = None) -> None:
        self.driver.update(ended=now or time.time(), exit_code=exit_code)

    # ------------------------------------------------------------------ trials
    def trial(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.trials:
            self.trials[trial_id] = {"trial_id": trial_id, "status": "pending", "config": {}, "restarts": 0}
        return self.trials[trial_id]

    def order(self) -> list[str]:
        """Trial ids in the order the searcher suggested them."""
        return sorted(self.trials, key=lambda t: (self.trials[t].get("index", 1 << 30), t))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials.values():
            out[t["status"]] = out.get(t["status"], 0) + 1
        return out


def driver_gone(state: SweepState, now: float | None = None) -> str | None:
    """Why the driver of a sweep that never recorded its end is gone (its process is not alive on
    this host, or its heartbeat is older than :data:`STALE_S`), or None when it runs or ended."""
    d = state.driver
    if not d or d.get("ended"):
        return None
    now = now or time.time()
    beat = float(d.get("heartbeat") or d.get("started") or 0)
    if d.get("host") == socket.gethostname() and d.get("pid"):
        try:
            os.kill(int(d["pid"]), 0)
            alive = _same_process(int(d["pid"]), float(d.get("started") or 0))
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's process of that id: alive
            alive = True
        if not alive:
            return f"its driver (pid {d['pid']} on {d['host']}) is not running"
        return None  # its process runs here: a slow heartbeat is a busy driver, not a dead one
    if now - beat > STALE_S:
        return f"its driver's last heartbeat was {now - beat:.0f} s ago (pid {d.get('pid')} on {d.get('host')})"
    return None


def _same_process(pid: int, started: float) -> bool:
    """Whether process ``pid`` started before ``started`` (else the id was reused), on Linux;
    True where the start time cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        proc_start = boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
        return proc_start <= started + 5.0
    except (OSError, ValueError, IndexError, StopIteration):
        return True


# ------------------------------------------------------------------ the active recorder
#: the recorder of the sweep this process drives (set by run_sweep while Tune runs), for the
#: objects Tune pickles with its run (callback, searcher wrapper, scheduler): they stay stateless
#: and forward here, so a resumed sweep's unpickled copies reach the new driver's recorder
ACTIVE: Any = None


def note_scheduler_stop(trial) -> None:
    """The scheduler decided to stop ``trial`` early (called by
    :class:`weakbench.platform.schedulers.ConfigurationASHA`); a no-op outside a sweep's driver."""
    if ACTIVE is not None:
        ACTIVE.scheduler_stop(trial)


def started_sweeps(sweeps: Path, pattern: str = "*") -> list[Path]:
    """The sweep directories under ``sweeps`` (matching ``pattern``) whose start succeeded, oldest
    first (by the directory's time): a record of the driver (``state.json``, written once the sweep's
    MLflow parent run exists) or, for sweeps of an older weakbench, Tune's directory. A folder whose
    start failed (an unreachable tracking server, bad data found late) is never "the latest sweep"."""
    cands = [p for p in Path(sweeps).glob(pattern)
             if (p / "sweep.json").is_file() and ((p / STATE_NAME).is_file() or (p / "tune").is_dir())]
    return sorted(cands, key=lambda p: p.stat().st_mtime)
