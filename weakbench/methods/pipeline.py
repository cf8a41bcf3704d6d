"""The pipeline contract: a method's ordered plan of typed stages (no Ray, no MLflow, no DDP here).

A method declares its pipeline from its config with :meth:`Method.plan`: a tuple of
:class:`Stage` objects, each of one of three kinds:

* ``fit`` — a model trained with Lightning-style hooks (:class:`FitTask`: build the model, the
  optimisers and their lr schedulers, a training dataset and collate of its own, one step,
  per-epoch validation). The
  engine runs the epoch loop, DDP, checkpoints and logging. Its product is the trained state
  dict (``model.pt``).
* ``map`` — per-item work (BBAM's per-box mask optimisation, pseudo-mask generation): the method
  lists item keys (:meth:`Method.map_items`), computes results for a list of keys
  (:meth:`Method.map_batch`) and writes the stage's product from all results
  (:meth:`Method.map_reduce`). The engine shards the keys over the ranks, saves results chunk by
  chunk (a killed stage resumes at the first unsaved chunk) and calls ``map_reduce`` on rank 0.
* ``eval`` — rank 0 computes metrics from earlier products (:meth:`Method.evaluate_stage`).

Cache keys come from *field groups* declared once. A method's config class names a group for
each of its fields (``field_groups``, merged along the config's bases, :func:`field_groups`),
its class says which groups each stage reads (:attr:`Method.stage_groups`, by stage name or
:attr:`Stage.role`), and :func:`resolve_plan` fills each stage's ``reads``: the fields of its own
groups and of every stage it takes as input, transitively (a stage reading an earlier stage's
product reads that stage's groups too, so a field an upstream computation uses is never missing
from a downstream key). Fields that no product depends on sit in the reserved groups of
:data:`NON_PRODUCT_GROUPS`; every other group must be read by some stage, or the method's
registration fails (:func:`check_field_groups`).

The engine keys a product by the hash of the ``reads`` values, of its inputs' hashes, of the
dataset fingerprint and of the stored split (:mod:`weakbench.platform.products`); a stage whose
product is complete is not recomputed, and a ``shared`` stage's product is shared by every trial
of a sweep with the same upstream hash (a sweep over BBAM's θ_fg trains its detector once).

Rounds (CCGR) are expressed by repeating stages with distinct names in the plan
(``"mil_r1"``, ``"mil_r2"``, …): the plan is built from the config, so the number of rounds is a
hyperparameter.

Progress: each epoch of a ``fit`` stage and each ``map``/``eval`` stage is one *unit*; the
engine reports ``progress`` = units done (ASHA's time attribute) and ``epoch`` = fit epochs done.

Data, not code: map results, product files written with ``torch.save`` (``model.pt``, tables) and
trial checkpoints hold plain data only — tensors, numpy arrays and scalars, dicts, lists, tuples,
strings, bytes, numbers, None — written with :func:`save_data` and read back with
:func:`load_data` (``torch.load`` with ``weights_only=True``), which refuses any other class
instead of running it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import pickle

import torch

StageKind = Literal["fit", "map", "eval"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a method's plan.

    Attributes:
        name: unique in the plan; names products, Train jobs (``<trial>-<name>``) and, where
            ``namespaced``, metric keys (``val/<name>/<metric>``).
        kind: ``"fit"``, ``"map"`` or ``"eval"`` (module docstring).
        reads: config field names whose values shape this stage's product (hashed); filled by
            :func:`resolve_plan` from the method's field groups (a method's ``plan`` leaves it empty).
        inputs: names of earlier stages whose products this stage reads.
        epochs: ``fit`` only: epochs of this stage (≥ 0; 0 keeps the initial weights).
        shared: the product may be reused by other trials of the sweep whose upstream hash is
            equal (it lives in the sweep's ``products/``; otherwise under the trial).
        namespaced: metric keys carry the stage name (``val/pseudo_masks/miou``); False keeps
            the plain ``<split>/<metric>`` keys of single-model methods.
        split: ``map``/``eval``: the split the stage reads and its metrics' split by default
            (``"train"``, ``"val"``, ``"test"``); metric names that start with a split
            (``"val/miou"``) name their own, so one stage may report several splits.
        metric_ns: namespace of the stage's metric keys instead of its name (BBAM's ``evaluate``
            stage reports under ``pseudo_masks``: ``val/pseudo_masks/miou``).
        role: the entry of the method's ``stage_groups`` this stage reads (default: its name;
            CCGR's ``mil_r1``, ``mil_r2``, … share the role ``mil``).
    """

    name: str
    kind: StageKind
    reads: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    epochs: int = 0
    shared: bool = False
    namespaced: bool = True
    split: str | None = None
    metric_ns: str | None = None
    role: str | None = None

    @property
    def units(self) -> int:
        """Progress units of the stage: its epochs for ``fit``, 1 otherwise."""
        return self.epochs if self.kind == "fit" else 1


#: field group of settings that change speed or memory, never a result (BBAM's
#: ``attribution_batch_images``: its attribution is chunk-independent)
SPEED_ONLY = "speed_only"
#: field group read only by ``Method.build_predictor`` (the logged model), after the last stage
PREDICTOR = "predictor"
#: field group of common-schema fields a method ignores (a trivial baseline's ``lr``: nothing is trained)
UNUSED = "unused"
#: the groups no stage product depends on: no stage reads them, and changing them reuses every product
NON_PRODUCT_GROUPS = (SPEED_ONLY, PREDICTOR, UNUSED)


def field_groups(config_cls: type) -> dict[str, tuple[str, ...]]:
    """The field groups of a config class: ``{group: field names}``, each field of the schema in
    exactly one group.

    Each class of the config's bases may declare ``field_groups: ClassVar[dict[str, tuple[str, ...]]]``
    (only its own, not inherited, declaration counts); they are merged from the root base down,
    and a subclass naming a field again moves it to the subclass's group (BBAM puts the common
    ``lr`` in its ``detector`` group). Groups left empty by such moves are dropped.

    Raises:
        ValueError: a field of the schema in no group, a group naming a field the schema does not
            have, or one class naming a field in two groups; the message names the config class,
            the field and the fix.
    """
    owner: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        own = klass.__dict__.get("field_groups")
        if not own:
            continue
        seen: dict[str, str] = {}
        for group, names in dict(own).items():
            if isinstance(names, str):
                raise ValueError(f"{klass.__name__}.field_groups[{group!r}] must be a tuple of field names, not the "
                                 f"string {names!r}")
            for f in names:
                if f in seen:
                    raise ValueError(f"{klass.__name__}.field_groups names field {f!r} in two groups ({seen[f]!r} and "
                                     f"{group!r}); keep it in one")
                seen[f] = group
        owner.update(seen)
    fields = set(getattr(config_cls, "model_fields", {}))
    unknown = sorted(set(owner) - fields)
    if unknown:
        raise ValueError(f"{config_cls.__name__}.field_groups names {unknown}, which are not fields of the schema; "
                         f"remove them or fix their spelling")
    missing = sorted(fields - set(owner))
    if missing:
        raise ValueError(f"{config_cls.__name__}: field(s) {missing} belong to no field group; add each to the "
                         f"field_groups of the stage(s) whose product it shapes, or to {SPEED_ONLY!r} / {PREDICTOR!r} / "
                         f"{UNUSED!r} if no stage product depends on it")
    out: dict[str, list[str]] = {}
    for f in getattr(config_cls, "model_fields", {}):  # schema order
        out.setdefault(owner[f], []).append(f)
    return {g: tuple(fs) for g, fs in out.items()}


def check_field_groups(method_name: str, config_cls: type, stage_groups: Mapping[str, tuple[str, ...]]) -> None:
    """Check a method's field groups against the groups its stages read (at registration).

    Every field must be in one group (:func:`field_groups`); every group a stage names must exist;
    every group outside :data:`NON_PRODUCT_GROUPS` must be read by some stage (a field no stage
    reads could change a result while every product is reused); no stage may read a
    non-product group.

    Raises:
        ValueError: naming the method, the group or field, and the fix.
    """
    try:
        groups = field_groups(config_cls)
    except ValueError as e:
        raise ValueError(f"method {method_name!r}: {e}") from None
    if not stage_groups:
        raise ValueError(f"method {method_name!r} declares no stage_groups; map each stage (name or role) of its plan "
                         f"to the field groups it reads")
    read: set[str] = set()
    for role, names in stage_groups.items():
        if isinstance(names, str):
            raise ValueError(f"method {method_name!r}: stage_groups[{role!r}] must be a tuple of group names, not the "
                             f"string {names!r}")
        for g in names:
            if g in NON_PRODUCT_GROUPS:
                raise ValueError(f"method {method_name!r}: stage {role!r} reads the group {g!r}, which by its name no "
                                 f"stage product depends on; move the fields it uses to a group of that stage")
            if g not in groups and g not in _declared_groups(config_cls):
                raise ValueError(f"method {method_name!r}: stage {role!r} reads group {g!r}, which "
                                 f"{config_cls.__name__}.field_groups does not declare (groups: {', '.join(sorted(groups))})")
            read.add(g)
    unread = {g: fs for g, fs in groups.items() if g not in read and g not in NON_PRODUCT_GROUPS}
    if unread:
        detail = "; ".join(f"group {g!r} ({', '.join(fs)})" for g, fs in sorted(unread.items()))
        raise ValueError(f"method {method_name!r}: no stage reads {detail}; name the group in stage_groups of the stage "
                         f"whose product it shapes, or move its fields to {SPEED_ONLY!r} / {PREDICTOR!r} / {UNUSED!r} if "
                         f"no result depends on them")


def _declared_groups(config_cls: type) -> set[str]:
    """Every group name any class of the config's bases declares (a group may be emptied by moves)."""
    return {g for klass in config_cls.__mro__ for g in (klass.__dict__.get("field_groups") or {})}


def resolve_plan(plan: tuple[Stage, ...] | list[Stage], config_cls: type,
                 stage_groups: Mapping[str, tuple[str, ...]]) -> tuple[Stage, ...]:
    """A validated plan whose stages' ``reads`` are derived from the field groups: the fields of the
    groups ``stage_groups[stage.role or stage.name]`` and the ``reads`` of every input stage
    (transitively), sorted.

    Raises:
        ValueError: a stage whose name (or role) has no ``stage_groups`` entry, a stage that lists
            ``reads`` itself (derive them from groups instead), or any :func:`validate_plan` error.
    """
    plan = validate_plan(plan, set(getattr(config_cls, "model_fields", {})))
    groups = field_groups(config_cls)
    out: dict[str, Stage] = {}
    for st in plan:
        role = st.role or st.name
        if st.reads:
            raise ValueError(f"stage {st.name!r} lists reads {list(st.reads)}; declare its fields as field groups and "
                             f"name them in stage_groups[{role!r}] instead")
        if role not in stage_groups:
            raise ValueError(f"stage {st.name!r}: no stage_groups entry {role!r}; add one naming the field groups it "
                             f"reads (() for none)")
        reads = {f for g in stage_groups[role] for f in groups.get(g, ())}
        for inp in st.inputs:
            reads.update(out[inp].reads)
        out[st.name] = dataclasses.replace(st, reads=tuple(sorted(reads)))
    return tuple(out[st.name] for st in plan)


def validate_plan(plan: tuple[Stage, ...] | list[Stage], config_fields: set[str] | None = None) -> tuple[Stage, ...]:
    """Check a plan: non-empty, unique names, inputs name earlier stages, known config fields.

    Raises:
        ValueError: naming the stage and the bad entry.
    """
    plan = tuple(plan)
    if not plan:
        raise ValueError("a method's plan needs at least one stage")
    seen: set[str] = set()
    for st in plan:
        if st.kind not in ("fit", "map", "eval"):
            raise ValueError(f"stage {st.name!r}: kind {st.kind!r} is not one of fit, map, eval")
        if st.name in seen:
            raise ValueError(f"stage name {st.name!r} appears twice in the plan")
        for inp in st.inputs:
            if inp not in seen:
                raise ValueError(f"stage {st.name!r} reads {inp!r}, which is not an earlier stage")
        if config_fields is not None:
            unknown = [f for f in st.reads if f not in config_fields]
            if unknown:
                raise ValueError(f"stage {st.name!r} reads unknown config field(s) {unknown}")
        if st.kind == "fit" and st.epochs < 0:
            raise ValueError(f"stage {st.name!r}: epochs must be >= 0")
        seen.add(st.name)
    return plan


@dataclasses.dataclass
class StepContext:
    """What the engine tells a fit task at each training step.

    Attributes:
        epoch: 0-based epoch index within the stage.
        step: 0-based global step (across epochs) on this worker.
        steps_per_epoch: number of steps of one epoch on this worker.
        total_steps: ``epochs * steps_per_epoch``.
        device: the device tensors live on.
        unwrap: returns the bare model behind a data-parallel wrapper (for hooks that must call
            sub-modules directly, as MinMaxCAM's Stage II does).
    """

    epoch: int
    step: int
    steps_per_epoch: int
    total_steps: int
    device: torch.device
    unwrap: Callable[[torch.nn.Module], torch.nn.Module]

    @property
    def progress(self) -> float:
        """Fraction of the stage's training done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


@dataclasses.dataclass
class StageContext:
    """What the engine hands a stage hook.

    Attributes:
        stage: the stage being run.
        config: the method's validated config.
        source: the dataset (``weakbench.core.data.DatasetSource``).
        splits: ``{"train"|"val"|"test": [record indices]}`` (the sweep's stored split).
        inputs: product directory of each input stage, by stage name.
        out_dir: where the stage writes its product files (``map_reduce``); published
            atomically by the engine when the hook returns.
        device: the device to compute on.
        load_model: ``load_model(stage_name)`` rebuilds the fit task of an earlier fit stage and
            loads its trained weights (eval mode, on ``device``); cached per stage.
        progress: ``progress(done, total)`` to advance the stage's progress bar (optional).
        max_images: cap on images per evaluated split (``None``: all), from the trial's options.
        num_overlays: how many overlay pictures an eval stage may return.
        eval_batch_size: images per evaluation batch.
        loader_workers: ``DataLoader`` worker processes an evaluation may use (0: load in this process).
        autocast_dtype: dtype of the evaluation forward passes under autocast (``torch.bfloat16``
            on a GPU with the engine's ``precision`` option), ``None`` for float32.
    """

    stage: Stage
    config: Any
    source: Any
    splits: Mapping[str, list[int]]
    inputs: dict[str, Path]
    out_dir: Path
    device: torch.device
    load_model: Callable[[str], torch.nn.Module]
    progress: Callable[[int, int], None] = lambda done, total: None
    max_images: int | None = None
    num_overlays: int = 0
    eval_batch_size: int = 16
    loader_workers: int = 0
    autocast_dtype: torch.dtype | None = None


class FitTask:
    """The hooks of one ``fit`` stage (PyTorch Lightning's ``LightningModule`` in spirit).

    Subclass and implement :meth:`build_model`, :meth:`configure_optimizers` (optionally
    :meth:`configure_schedulers`), :meth:`train_dataset` and :meth:`training_step` (or
    :meth:`training_losses`). The engine owns the loop, the device,
    data-parallel wrapping, the default sharding (a ``DistributedSampler``), checkpoints and
    logging. Two data-parallel facts remain the task's to declare, because only the method
    knows them: :attr:`find_unused_parameters` (a step that updates part of the model) and, for a
    task with its own :meth:`batch_sampler`, how its batches are dealt to ``rank`` of
    ``world_size`` (MinMaxCAM cycles its class sets so every rank gets equally many).
    """

    #: passed to DDP (True when a step updates only part of the model, as MinMaxCAM's Stage II).
    find_unused_parameters: bool = False
    #: every training batch has the same input size (lets the engine turn on ``cudnn.benchmark``
    #: on a GPU; detectors with images of varying sizes keep the default False).
    fixed_input_size: bool = False
    #: the task's forward passes may run under bf16 autocast on a GPU (the engine's ``precision``
    #: option) because its losses are computed in float32 (see the method's loss functions);
    #: False keeps the stage in float32 whatever the option says.
    mixed_precision: bool = False

    def build_model(self) -> torch.nn.Module:
        """A fresh ``nn.Module`` (weights initialised, on CPU)."""
        raise NotImplementedError

    def configure_optimizers(self, model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers over ``model``'s parameters."""
        raise NotImplementedError

    def configure_schedulers(self, optimizers: Mapping[str, torch.optim.Optimizer],
                             total_steps: int) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Optional: named learning-rate schedulers (torch's ``LRScheduler``; see
        :mod:`weakbench.methods.lr_schedules`), keyed like ``optimizers``, for a stage of
        ``total_steps`` training steps on this worker. The engine calls it once per fit stage,
        after :meth:`configure_optimizers` and before restoring the optimisers' state, steps every
        scheduler once after each :meth:`training_step` (however many optimiser steps the task took
        in it) and saves their state in the trial checkpoint. Default: none (constant lr)."""
        return {}

    def train_dataset(self, source, indices: list[int]) -> torch.utils.data.Dataset:
        """The stage's training dataset over record ``indices`` of ``source``."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        """Batch collation; default ``torch.utils.data.default_collate``."""
        return torch.utils.data.default_collate(items)

    def batch_sampler(self, source, indices: list[int], rank: int, world_size: int):
        """Optional: a batch sampler (an iterable of position lists into the training dataset,
        with ``set_epoch(epoch)`` if its order changes per epoch) already sharded to ``rank`` of
        ``world_size``. ``None`` (default): the engine uses a shuffled ``DistributedSampler``
        with :attr:`batch_size` items per worker."""
        return None

    #: items per worker per step (the default sampler's batch size).
    batch_size: int = 16
    #: seed of the default sampler's shuffle.
    seed: int = 0

    def training_losses(self, model: torch.nn.Module, batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named scalar losses; the key ``"loss"`` is optimised by the default step."""
        raise NotImplementedError

    def training_step(self, model: torch.nn.Module, batch: Any, optimizers: Mapping[str, torch.optim.Optimizer],
                      ctx: StepContext) -> dict[str, float]:
        """One optimisation step; returns the named losses as floats. Default: ``training_losses``
        → backward → step of ``optimizers["main"]``."""
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        losses = self.training_losses(model, batch, ctx)
        losses["loss"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def validate(self, model: torch.nn.Module, ctx: StageContext, last: bool) -> dict[str, float]:
        """Rank 0, after every epoch: validation metrics keyed by bare name (the engine adds
        ``val/`` and, for namespaced stages, the stage name). Default: none."""
        return {}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to ``device``; the default handles dicts of tensors and
        ``(list[Tensor], list[dict])`` detection batches. Copies are ``non_blocking`` (they
        overlap computation when the engine's loader pinned the batch, on a GPU; a no-op on CPU)."""
        if isinstance(batch, dict):
            return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (list, tuple)):
            images, targets = batch
            return ([im.to(device, non_blocking=True) for im in images],
                    [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                     for t in targets])
        return batch

    def batch_indices(self, batch: Any) -> list[int]:
        """Record indices of a batch (for the engine's shard records in tests)."""
        if isinstance(batch, dict) and "index" in batch:
            return [int(i) for i in batch["index"].tolist()]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return [int(t["index"]) for t in batch[1] if "index" in t]
        return []


def _numpy_globals() -> list:
    """What a pickled numpy array, scalar or dtype names (numpy 1.x and 2.x spellings), and
    ``bytes``; torch's weights-only unpickler allows the rest of plain data by itself."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    # bytes: pickle protocol 2 (torch's) writes an empty bytes object as a call of ``bytes()``
    return [bytes, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *[t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]]


def save_data(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a file this function opens and closes: on a full disk
    the ``OSError`` (ENOSPC) is the context of torch's error and the file is closed at once (a
    writer left open by the traceback would keep the space of a partly written file). Write only
    what :func:`load_data` reads: plain data."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_data(path: str | Path) -> Any:
    """``torch.load(path)`` as data: ``weights_only=True`` (tensors, containers, numbers, strings,
    bytes) with numpy arrays, scalars and dtypes allowed; tensors on the CPU. Nothing in the file
    runs: a pickle naming any other callable or class is refused.

    Raises:
        weakbench.core.errors.DataError: the file holds something other than data (a crafted
            or foreign pickle); the message names the file and the fix (delete it: products and
            checkpoints are recomputed).
        OSError / RuntimeError: the file cannot be read or is not a torch file, as ``torch.load``.
    """
    from weakbench.core.errors import DataError

    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise DataError(f"{path}: refused to load, it holds more than data ({first.strip()[:200]}); "
                            f"fix: delete it (a product or checkpoint is computed again) and do not copy "
                            f"such files in from elsewhere") from None
