"""Where a trial's loops run, as Lightning's ``Strategy``: rank, world size, device, barrier,
broadcast, sharding, model wrapping, and the checkpointed report.

Three runtimes, one per way :mod:`weakbench.platform.engine` runs a trial:

* :class:`InlineRuntime` — the calling process, one worker, no reports (``run_trial(executor="inline")``);
* :class:`TuneRuntime` — one worker inside a Tune function trial, reporting and checkpointing
  through ``ray.tune`` (a sweep's ``inline`` executor);
* :class:`TrainRuntime` — a Ray Train worker of a ``TorchTrainer`` (DDP over gloo on CPU, NCCL on
  GPU), reporting through ``ray.train``; rank and world size from Train's context.

The loops (:mod:`weakbench.platform.loops`) call only this interface: with one worker the
collectives are no-ops, so no loop branches on the world size itself.
"""

from __future__ import annotations

from typing import Any

import torch


class Runtime:
    """One worker's place in a trial: ``rank`` (0 logs and validates), ``world`` (the number of
    workers), ``device`` (where tensors go). The base class is a single process."""

    name = "inline"

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1):
        self.device, self.rank, self.world = device, rank, world

    @property
    def is_main(self) -> bool:
        """Whether this worker is rank 0 (the one that logs, validates and checkpoints)."""
        return self.rank == 0

    # ---------------------------------------------------------------- collectives
    def barrier(self) -> None:
        """Wait until every worker reaches this call."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value)."""
        return obj

    # ---------------------------------------------------------------- sharding
    def shard(self, n: int) -> range:
        """The indices ``0 … n−1`` this rank takes of ``n`` work items (round robin: rank, rank + world, …)."""
        return range(self.rank, n, self.world)

    def train_sampler(self, task, source, indices: list[int], dataset) -> tuple[Any, bool]:
        """This rank's sampler of a fit task's training set, and whether it yields whole batches.

        The task's own batch sampler (``FitTask.batch_sampler(source, indices, rank, world)``: a
        method that composes its batches shards them itself) when it has one; otherwise a
        ``DistributedSampler`` over ``dataset`` (shuffled under the task's seed; with several
        workers the remainder is dropped so every rank takes the same number of steps)."""
        batch_sampler = task.batch_sampler(source, indices, self.rank, self.world)
        if batch_sampler is not None:
            return batch_sampler, True
        return torch.utils.data.DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                                   seed=task.seed, drop_last=self.world > 1), False

    def wrap_model(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model the training steps call (DDP-wrapped with several workers); the bare model
        stays what is validated and saved."""
        return model

    # ---------------------------------------------------------------- reporting
    def get_checkpoint(self):
        """The checkpoint the executor restored this worker from (an object with
        ``as_directory()``), or None."""
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Report ``metrics`` (with the checkpoint in ``checkpoint_dir``, if any) to the executor."""


class InlineRuntime(Runtime):
    """The calling process, without reports: ``run_trial(executor="inline")``."""


class TuneRuntime(Runtime):
    """One worker inside a Tune function trial; reports and checkpoints go to ``ray.tune``."""

    name = "tune"

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics, checkpoint_dir):
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


class TrainRuntime(Runtime):
    """A Ray Train worker; collectives over ``torch.distributed`` (set up by Train) when the
    worker group has more than one worker, reports to ``ray.train``."""

    name = "train"

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap_model(self, model, *, find_unused_parameters=False):
        if self.world == 1:
            return model
        import ray.train.torch as rtt

        return rtt.prepare_model(model, move_to_device=False,
                                 parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters})

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


RUNTIMES = {"none": InlineRuntime, "tune": TuneRuntime, "train": TrainRuntime}


def make_runtime(mode: str, *, use_gpu: bool) -> Runtime:
    """The runtime of executor ``mode`` (``"none"``: inline, ``"tune"``, ``"train"``) on this
    worker: rank and world size from Ray Train's context (0 and 1 outside a Train worker); the
    GPU Train assigned, or ``cuda:0`` for an inline trial (Ray set ``CUDA_VISIBLE_DEVICES`` to the
    GPU share it holds), when ``use_gpu`` and CUDA is available; else the CPU."""
    rank, world = 0, 1
    if mode == "train":
        try:
            import ray.train

            ctx = ray.train.get_context()
            rank, world = ctx.get_world_rank(), ctx.get_world_size()
        except Exception:  # noqa: BLE001 - not inside a Train worker
            pass
    if use_gpu and torch.cuda.is_available():
        if mode == "train":
            import ray.train.torch as rtt

            device = rtt.get_device()
        else:
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return RUNTIMES[mode](device, rank, world)
