"""Callbacks of the engine's loops: code that watches (or, in tests, disturbs) a trial without
living in the loops, as Lightning's ``Callback``.

A :class:`Callback` overrides any of its hooks; the fit loop (:mod:`weakbench.platform.loops`)
calls them on every rank, in the order the callbacks are listed:

* ``on_train_batch_end(trial, stage, task, epoch, batch)`` after each training step (the batch as
  the loader gave it; ``task.batch_indices(batch)`` names its samples);
* ``on_epoch_end(trial, stage, epoch, metrics)`` after epoch ``epoch`` (0-based) of a fit stage
  is checkpointed, reported and logged (``metrics``: the epoch's train metrics on every rank,
  with val metrics and cost on rank 0);
* ``on_fit_end(trial, stage, model)`` once a fit stage's training is over, with the bare
  (unwrapped) model, before its product is published;
* ``on_stage_end(trial, stage, metrics)`` after any stage computed (not on a cache hit).

``trial`` is the :class:`~weakbench.platform.trial.TrialState` (``rank``, ``world``,
``trial_dir``, ``spec`` ...). An exception raised by a hook fails the trial like any other.

**How a trial carries them.** ``TrialSpec.callbacks`` is a list of :class:`CallbackRef`: an
import path ``"package.module:Name"`` of a :class:`Callback` subclass and its keyword arguments
as JSON values. We chose references over callback objects because a ``TrialSpec`` travels as
data (``model_dump()`` into Ray Train's ``train_loop_config``, Tune's trial config and its
experiment state): a reference stays a small JSON value, every worker process (and every restart
of it) builds its own fresh instance, and no object state is shipped between processes. The
module named is imported on each worker, so it must be importable there (installed, or on the
workers' ``PYTHONPATH``).

The two test hooks that ``TrialSpec`` used to carry are callbacks here: :class:`FailOnce`
(was ``fail_at_epoch``) and :class:`RecordShards` (was ``record_shards``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Callback:
    """Base class of the engine's callbacks; every hook does nothing unless overridden."""

    def on_train_batch_end(self, trial, stage, task, epoch: int, batch) -> None:
        pass

    def on_epoch_end(self, trial, stage, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trial, stage, model) -> None:
        pass

    def on_stage_end(self, trial, stage, metrics: dict[str, float]) -> None:
        pass


class CallbackRef(BaseModel):
    """A callback by import path: ``target = "package.module:ClassName"`` (a :class:`Callback`
    subclass), built as ``ClassName(**kwargs)`` on each worker (:meth:`build`)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="'package.module:ClassName' of a weakbench.platform.callbacks.Callback subclass")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments (JSON values)")

    @field_validator("target")
    @classmethod
    def _module_colon_name(cls, v: str) -> str:
        mod, sep, name = v.partition(":")
        if not sep or not mod or not name.isidentifier():
            raise ValueError(f"callback target {v!r} is not 'package.module:ClassName'")
        return v

    @classmethod
    def of(cls, callback_class: type[Callback], **kwargs: Any) -> "CallbackRef":
        """The reference of ``callback_class`` (defined at a module's top level) with ``kwargs``."""
        return cls(target=f"{callback_class.__module__}:{callback_class.__qualname__}", kwargs=kwargs)

    def build(self) -> Callback:
        """Import the target and instantiate it.

        Raises:
            ValueError: the module or name cannot be imported, or it is not a Callback subclass.
        """
        mod, _, name = self.target.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"callback {self.target!r} cannot be imported ({e}); check the TrialSpec's callbacks") from e
        if not (isinstance(obj, type) and issubclass(obj, Callback)):
            raise ValueError(f"callback {self.target!r} is not a subclass of weakbench.platform.callbacks.Callback")
        return obj(**self.kwargs)


def build_callbacks(refs: list[CallbackRef]) -> list[Callback]:
    """Every reference built, in order."""
    return [r.build() for r in refs]


class FailOnce(Callback):
    """Raise ``RuntimeError("injected failure after epoch N")`` after fit epoch ``after_epoch``
    (1-based) once per trial directory (a marker file ``failed_once`` records it), so a restarted
    or resumed trial goes on (restart tests)."""

    def __init__(self, after_epoch: int):
        self.after_epoch = int(after_epoch)

    def on_epoch_end(self, trial, stage, epoch, metrics):
        if epoch + 1 == self.after_epoch:
            marker = trial.trial_dir / "failed_once"
            if not marker.exists():
                marker.write_text("1")
                raise RuntimeError(f"injected failure after epoch {epoch + 1} (FailOnce)")


class RecordShards(Callback):
    """Write, per rank, the sample indices each epoch trained on, ``shard_rank<r>_epoch<e>.json``
    (a JSON list, e 0-based), and a sha256 of the final parameters, ``weights_rank<r>.sha256``,
    into the trial directory (DDP tests: disjoint shards, identical weights).

    Parameters only: DDP keeps them identical across ranks; BatchNorm buffers are broadcast from
    rank 0 at each forward, so after the last step a rank's running statistics include its own
    last batch."""

    def __init__(self):
        self.seen: list[int] = []

    def on_train_batch_end(self, trial, stage, task, epoch, batch):
        self.seen.extend(task.batch_indices(batch))

    def on_epoch_end(self, trial, stage, epoch, metrics):
        (trial.trial_dir / f"shard_rank{trial.rank}_epoch{epoch}.json").write_text(json.dumps(self.seen))
        self.seen = []

    def on_fit_end(self, trial, stage, model):
        digest = hashlib.sha256()
        for k, v in sorted(model.named_parameters()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        (trial.trial_dir / f"weights_rank{trial.rank}.sha256").write_text(digest.hexdigest())
