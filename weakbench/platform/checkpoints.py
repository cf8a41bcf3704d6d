"""A trial's checkpoint store: its own ``wb-ckpt-*/trial_state.pt`` directories under the trial
directory, beside the checkpoint the executor (Ray Train or Tune) restores.

A checkpoint carries the stage cursor (stage name and index, the epoch within the stage), model,
optimiser and lr-scheduler state, the run id, the cost history, the metrics of its epoch not yet
logged (``pending_metrics``) and the latest metrics (``carry``). It is read as data
(:func:`weakbench.methods.pipeline.load_data`: nothing in it runs code).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from weakbench.core.io import atomic_write
from weakbench.methods.pipeline import load_data, save_data

CHECKPOINT_FILE = "trial_state.pt"


@contextlib.contextmanager
def removed_on_error(path: str | Path):
    """Remove ``path`` (a checkpoint or staging directory being written) when the block raises:
    on a full disk the partly written file would otherwise keep the space that the run's FAILED
    status, the sweep's record and its MLflow store need (issue 19). A local fault (a full disk,
    a read-only file system: :func:`weakbench.platform.tune_record.local_fault_error`) behind the
    error is raised as itself, so that neither Tune nor Train retries it."""
    try:
        yield Path(path)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        # the failed writer (and its open file, whose space the unlink does not free while it is
        # open) is a local of the traceback's frames: drop them; the traceback's lines remain
        traceback.clear_frames(e.__traceback__)
        from weakbench.platform.tune_record import local_fault_error

        fault = local_fault_error(e)
        if fault is not None and fault is not e:
            # torch reports a full disk as "RuntimeError: unexpected pos" with the OSError as its
            # context, which Ray drops when it sends the error to the driver: raise the OSError
            raise fault from e
        raise


def latest_local_checkpoint(trial_dir: Path) -> dict[str, Any] | None:
    """The newest readable ``wb-ckpt-*/trial_state.pt`` of a trial, or None."""
    dirs = sorted(trial_dir.glob("wb-ckpt-*"), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        f = d / CHECKPOINT_FILE
        if f.is_file():
            try:
                return load_data(f)
            except Exception:  # noqa: BLE001 - an unreadable file: try the one before
                continue
    return None


def checkpoint_order(state: dict[str, Any]) -> tuple[int, int]:
    """``(stage cursor, epoch)`` of a checkpoint: the later of two is the larger."""
    return int(state.get("cursor", 0)), int(state.get("epoch", 0))


class CheckpointStore:
    """The checkpoints of one trial (directory ``trial_dir``) on one worker."""

    def __init__(self, trial_dir: Path, runtime):
        self.trial_dir, self.runtime = Path(trial_dir), runtime

    def restore(self) -> dict[str, Any] | None:
        """The latest checkpoint: the executor's, or the trial's own when it is newer (Tune
        records a trial's checkpoints in its experiment state only every few seconds, so a sweep
        killed right after a report can restore the trial without it; the trial's own checkpoint
        is written before every report). None: start afresh."""
        state = None
        ckpt = self.runtime.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = load_data(Path(d) / CHECKPOINT_FILE)
        local = latest_local_checkpoint(self.trial_dir)
        if local is not None and (state is None or checkpoint_order(local) > checkpoint_order(state)):
            state = local
        return state

    def write(self, state: dict[str, Any], *, atomic: bool = True) -> str:
        """Write ``state`` into a new ``wb-ckpt-*`` directory and return it. ``atomic``: through a
        temporary file renamed into place (a kill never leaves half a checkpoint); in both cases a
        failed write (a full disk) leaves no directory (:func:`removed_on_error`)."""
        ckpt_dir = tempfile.mkdtemp(prefix="wb-ckpt-", dir=self.trial_dir)
        if atomic:
            with removed_on_error(ckpt_dir), atomic_write(Path(ckpt_dir) / CHECKPOINT_FILE) as f:
                torch.save(state, f)
        else:
            with removed_on_error(ckpt_dir):
                save_data(state, Path(ckpt_dir) / CHECKPOINT_FILE)
        return ckpt_dir

    def prune(self, keep: str | Path) -> None:
        """Remove the trial's older local checkpoints once ``keep`` has been reported."""
        for d in self.trial_dir.glob("wb-ckpt-*"):
            if d != Path(keep):
                shutil.rmtree(d, ignore_errors=True)

    def remove_private_products(self) -> None:
        """Remove a finished trial's private stage products, ``<trial dir>/products`` (the sweep's
        shared products live under ``TrialSpec.products_dir`` and stay for the other trials)."""
        shutil.rmtree(self.trial_dir / "products", ignore_errors=True)
