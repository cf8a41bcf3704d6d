"""The method contract and the method registry.

A *method* is a plugin: a name, a validated hyperparameter schema (pydantic), a default search
space file (``search_spaces/<name>.yaml``), a pipeline *shape* and the *stages* it runs. The
engine (``weakbench.platform.engine``) owns loops, devices, DDP, checkpoints and logging; a
method only answers the hooks below, in the spirit of PyTorch Lightning's ``LightningModule``.
No method module imports Ray or MLflow.

Every method runs as a *plan* of typed stages (:mod:`weakbench.methods.pipeline`): ``fit``
(a model trained with Lightning-style hooks), ``map`` (per-item work, sharded and resumable) and
``eval`` (metrics from earlier products). The engine (``weakbench.platform.engine``) executes
the plan, caches products, runs each trainable stage as its own Ray Train job and carries the
stage cursor in its checkpoints. Three pipeline shapes (DESIGN.md, "The five methods as
pipelines"):

* ``classifier_cam`` — ``cam``, ``minmaxcam``, ``puzzlecam``, ``topgap``: the default plan
  ``train`` (fit: the classifier, validated on ``val`` every epoch) → ``eval`` (the ``test``
  split, once). Their hooks below (:meth:`Method.build_model`, :meth:`Method.training_losses`,
  …) are the ``train`` stage's fit task (:class:`ClassifierFitTask`).
* ``detector_attribution`` — ``bbam``: detector fit → per-box attribution (map) → pseudo masks
  (map) → eval, optionally Mask R-CNN fit → eval.
* ``multi_branch`` — ``ccgr``: rounds of fit → refine → pseudo masks.

Adding a method is one decorated class in one module::

    @register_method("cam")
    class CAM(Method):
        Config = CAMConfig
        ...

and one package entry point naming it, in the ``weakbench.methods`` group of the distribution's
``pyproject.toml`` (weakbench's own methods are declared the same way)::

    [project.entry-points."weakbench.methods"]
    cam = "weakbench.methods.cam:CAM"

``build_method("cam", {"lr": 0.01})`` validates the config and returns an instance; the registry
imports a method's module when the method is first asked for (:func:`method_entry_points`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weakbench.methods.lr_schedules import LRSchedule, scheduler_from_config
from weakbench.methods.pipeline import FitTask, Stage, StageContext, StepContext, check_field_groups, resolve_plan
from weakbench.core.errors import ConfigError, PluginError, UnknownNameError
from weakbench.methods.metric_declarations import DEFAULT_HEADLINE, MechanismCheck

__all__ = ["Method", "MethodConfig", "WsolConfig", "ClassifierConfig", "ClassifierFitTask", "CamPredictor", "FitTask", "Stage", "StageContext",
           "StepContext", "register_method", "build_method", "get_method_class", "list_methods", "validate_config",
           "describe_hyperparameters", "normalize_maps", "resize_maps", "search_space_dir", "method_entry_points",
           "ENTRY_POINT_GROUP"]

PipelineShape = Literal["classifier_cam", "detector_attribution", "multi_branch"]


def timm_lists_model(name: str) -> bool:
    """Whether ``timm.list_models()`` names ``name``, without importing timm (2-3 s: it imports
    torchvision) where an earlier call saved timm's list for the installed timm version
    (``timm-<version>-models.txt`` in :data:`~weakbench.core.data.DEFAULT_CACHE_DIR`): a
    sweep's driver validates its configs without timm. A name not in the saved list, or timm
    already imported (models registered at run time), asks timm itself."""
    import importlib.metadata
    import os
    import sys

    from weakbench.core.data.open import DEFAULT_CACHE_DIR

    saved = None
    try:
        saved = DEFAULT_CACHE_DIR.expanduser() / f"timm-{importlib.metadata.version('timm')}-models.txt"
    except importlib.metadata.PackageNotFoundError:
        pass
    if saved is not None and "timm" not in sys.modules:
        try:
            if name in saved.read_text().split("\n"):
                return True
        except OSError:
            pass
    import timm

    names = timm.list_models()
    if saved is not None:
        try:  # best effort: another process may write the same list at once
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text("\n".join(names))
            os.replace(tmp, saved)
        except OSError:
            pass
    return name in names


class MethodConfig(BaseModel):
    """Hyperparameters common to every method (DESIGN.md: "Common: backbone, learning rate,
    batch size, epochs, input size, seed").

    Subclasses add the method's own fields (with the paper's default) and may override these
    defaults. Unknown keys are refused (``extra="forbid"``) so that a misspelt search-space key
    is an error, not a silently ignored value.

    Every field belongs to one *field group* (``field_groups``, merged along the bases by
    :func:`weakbench.methods.pipeline.field_groups`): the stages of the method read groups
    (:attr:`Method.stage_groups`) and a stage product's cache key is derived from them. Here the
    common fields are the ``train`` group of the classifier template; a method of another shape
    moves each of them to a group of its own stages (BBAM's ``detector``), and registration fails
    while a field sits in a group no stage reads.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"train": (
        "backbone", "pretrained", "weights_path", "output_stride", "lr", "backbone_lr_mult", "weight_decay", "momentum",
        "nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma", "batch_size", "epochs", "input_size",
        "seed")}

    backbone: str = Field("resnet18", description="timm model name (features_only must work)")
    pretrained: bool = Field(False, description="load pretrained weights: the packaged offline file where the backbone has "
                             "one (weakbench.methods.backbones.PACKAGED_WEIGHTS, e.g. tf_efficientnet_lite0), else "
                             "timm's hub (off by default)")
    weights_path: str | None = Field(None, description="local .pth/.safetensors state dict for the backbone")
    output_stride: Literal[8, 16, 32] = Field(32, description="backbone output stride (8/16 give larger CAMs)")
    lr: float = Field(0.01, gt=0, le=10, description="learning rate of the new layers (SGD)")
    backbone_lr_mult: float = Field(1.0, gt=0, le=10, description="backbone lr = lr * this (0.1 with pretrained weights)")
    weight_decay: float = Field(1e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(False, description="Nesterov momentum for SGD (needs momentum > 0; the engine refuses it for a "
                           "stage whose optimiser is not Nesterov SGD)")
    lr_schedule: LRSchedule = Field(
        "constant", description="learning-rate schedule, stepped after every training step and multiplying each "
        "parameter group's own lr (weakbench.methods.lr_schedules): 'constant'; 'poly' = (1 - t/T)^poly_power; 'step' "
        "= x lr_gamma at each of lr_milestones; 'cosine' = cosine annealing to 0 over the T steps of the stage. "
        "Honoured by Method.configure_schedulers (the classifier_cam methods); the engine refuses a non-constant "
        "schedule for a fit stage that configures no scheduler")
    poly_power: float = Field(0.9, gt=0, le=10, description="power of the 'poly' schedule")
    lr_milestones: tuple[float, ...] = Field(
        (0.5, 0.75), min_length=1, description="'step' schedule: fractions of training (increasing, in (0, 1)) at "
        "which the lr is multiplied by lr_gamma")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="'step' schedule: factor applied at each milestone")
    batch_size: int = Field(16, ge=1, le=4096, description="images per worker per step")
    epochs: int = Field(4, ge=0, le=1000, description="training epochs; 0 evaluates the initial (e.g. pretrained) model")
    input_size: int = Field(128, ge=32, le=1024, description="square input side in pixels; also the WSOL evaluation frame")
    seed: int = Field(0, ge=0, description="seeds torch, numpy, python and the data order")

    def seed_free(self) -> bool:
        """Whether this configuration gives the same maps and metrics for every seed (see
        :meth:`Method.seed_free`). Here: never (training draws the data order, augmentation and
        new layers from the seed); :class:`ClassifierConfig` and the trivial baselines' config
        know better."""
        return False

    @field_validator("weights_path")
    @classmethod
    def _weights_file_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"file {v!r} not found; give a local state dict (.pth, .pt or .safetensors)")
        return v

    @field_validator("lr_milestones")
    @classmethod
    def _milestones_are_fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        v = tuple(float(f) for f in v)
        if any(not 0 < f < 1 for f in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"lr_milestones must be increasing fractions of training in (0, 1), e.g. [0.5, 0.75]; "
                             f"got {list(v)}")
        return v

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "MethodConfig":
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov: true needs momentum > 0 (e.g. 0.9), or set nesterov: false")
        return self

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if not timm_lists_model(v):
            import timm

            from weakbench.core.errors import nearest

            raise ValueError(f"unknown backbone {v!r} (not a timm model name); nearest: {', '.join(nearest(v, timm.list_models()))}")
        return v


class WsolConfig(MethodConfig):
    """Hyperparameters of a method whose maps are scored by the WSOL protocol (the
    ``classifier_cam`` methods and the trivial baselines): the threshold step of the CAM curve,
    in the ``evaluation`` field group (it shapes validation and test metrics, not the weights)."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"evaluation": ("cam_curve_interval",)}

    cam_curve_interval: float = Field(0.01, gt=0, lt=1, description="WSOL threshold step (0.01 validation, 0.001 reference)")


class ClassifierConfig(WsolConfig):
    """Hyperparameters of the ``classifier_cam`` methods that build their network on
    :class:`weakbench.methods.cam.CAMNet`: which features the CAM reads and how its 1×1
    classifier starts."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("features", "classifier_init")}

    def seed_free(self) -> bool:
        """True when nothing is trained or drawn at random: ``epochs`` 0 with the pretrained
        backbone and its pretrained head as the CAM classifier (``pretrained`` True,
        ``classifier_init`` ``pretrained_head``); the splits are the sweep's, not the seed's. A new
        head is initialised from the seed, so any other ``classifier_init`` is not seed-free; nor is
        any training (data order, augmentation, dropout)."""
        return self.epochs == 0 and self.pretrained and self.classifier_init == "pretrained_head"

    features: Literal["stages", "full"] = Field(
        "stages", description="CAM features: 'stages' = the last timm features_only stage; 'full' = the backbone's "
        "forward_features (for EfficientNet the 1280-channel conv_head output the pretrained head reads)")
    classifier_init: Literal["random", "pretrained_head"] = Field(
        "random", description="'pretrained_head' copies the backbone's pretrained classifier (weight and bias) into the "
        "1x1 classifier; needs pretrained: true, features: full and the dataset's classes to be the backbone's "
        "(ILSVRC's 1000 in the standard order)")


#: batches of the split that :meth:`Method.extra_metrics` sees, after the last epoch (val) and in
#: the eval stage (test)
EXTRA_METRIC_BATCHES = 2


class Method:
    """Base class of every method. Subclass, set the class variables, implement the hooks.

    Class variables:
        name: registry name (set by :func:`register_method`).
        shape: one of ``classifier_cam``, ``detector_attribution``, ``multi_branch``.
        Config: the pydantic schema of this method's hyperparameters.
        headline_metric: the metric (bare name, as in ``<split>/<name>``) the leaderboard and
            registry rank this method by when no metric is given; it must be declared (with its
            direction) in :mod:`weakbench.methods.metric_declarations`, which also gives the
            search space its default selecting metric.
        find_unused_parameters: passed to DDP for the classifier's ``train`` stage (True when a
            step updates only part of the model, as MinMaxCAM's Stage II does).
        compared_with: the board rows (method names) this method is compared against, paired
            image by image on the same dataset (:mod:`weakbench.platform.verdicts`); a ``classifier_cam``
            method: ``cam`` and the trivial baselines. The in-run baselines of box-supervised methods
            (``box_filled``, ``box_crf``, ``unrefined``) are metric variants, not rows:
            :attr:`compared_with_variants`.
        mechanism_checks: the diagnostics that show the method's mechanism ran
            (:class:`~weakbench.methods.metric_declarations.MechanismCheck`); the board flags a row
            whose check fails. Every classifier row is also checked against chance (``cls_acc``
            against ``cls_chance``) and every trained row for seeds giving identical metrics.
        compared_with_variants: variant prefixes (:mod:`weakbench.methods.metric_declarations`)
            of the headline that the same run logs as its own baselines (BBAM: ``box_filled``,
            ``box_crf``; CCGR: ``unrefined``, ``box_filled``).
        stage_groups: the field groups of :attr:`Config` (``Config.field_groups``) each stage of
            the plan reads, keyed by stage name (or :attr:`Stage.role`); a stage's cache key is
            derived from them (:meth:`stages`). Checked at registration: every field in one group,
            every group read by a stage or declared as no product's
            (:data:`~weakbench.methods.pipeline.NON_PRODUCT_GROUPS`).
        retired_fields: fields an earlier schema of this method had and no longer has; dropped
            from stored configs (a registered model's, a logged run's) before validation
            (:func:`stored_config`), refused anywhere else.

    Hooks a ``classifier_cam`` method implements:
        :meth:`build_model`, :meth:`training_step` (or :meth:`training_losses`),
        :meth:`class_scores`, :meth:`cams`. Other shapes override :meth:`plan` and the stage
        hooks (:meth:`fit_task`, :meth:`map_items`, :meth:`map_batch`, :meth:`map_reduce`,
        :meth:`evaluate_stage`, :meth:`build_predictor`).
    """

    name: ClassVar[str] = ""
    shape: ClassVar[PipelineShape] = "classifier_cam"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    headline_metric: ClassVar[str] = DEFAULT_HEADLINE  # declared in weakbench.methods.metric_declarations
    find_unused_parameters: ClassVar[bool] = False
    compared_with: ClassVar[tuple[str, ...]] = ("cam", "center_gaussian", "whole_image")
    compared_with_variants: ClassVar[tuple[str, ...]] = ()
    mechanism_checks: ClassVar[tuple[MechanismCheck, ...]] = ()
    stage_groups: ClassVar[Mapping[str, tuple[str, ...]]] = {"train": ("train", "evaluation"), "eval": ("evaluation",)}
    retired_fields: ClassVar[tuple[str, ...]] = ()
    #: map stages: item keys per :meth:`map_batch` call (a chunk, saved on its own so that a killed
    #: stage resumes at its first unsaved chunk)
    map_chunk_size: int = 16
    #: metric names the method's evaluation computes but does not report (a trivial baseline has no
    #: classifier: its classification metrics are dropped, here and in ``weakbench evaluate``)
    unreported_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig, num_classes: int, multilabel: bool = True):
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.multilabel = multilabel

    @property
    def backbone_name(self) -> str:
        """The backbone a run is tagged and grouped by on boards: the config's ``backbone``
        (``"none"`` for a parameter-free prior)."""
        return str(self.config.backbone)

    @property
    def random_weights(self) -> bool:
        """Whether :meth:`build_model` starts from random weights (neither ``pretrained`` nor a
        ``weights_path``): ``weakbench evaluate`` warns before scoring such a model untrained."""
        return not (self.config.pretrained or self.config.weights_path)

    @property
    def input_normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean, std)`` of the input images (3 floats each, units of the 0–1 RGB image): the
        backbone's ``pretrained_cfg`` statistics (:func:`weakbench.methods.backbones.input_normalization`;
        ImageNet statistics for backbones without a cfg). Used by training, evaluation,
        overlays and the logged predictor alike."""
        from weakbench.methods.backbones import DEFAULT_MEAN, DEFAULT_STD, input_normalization

        name = getattr(self.config, "backbone", None)
        if not name or name == "none":
            return DEFAULT_MEAN, DEFAULT_STD
        return input_normalization(name)

    # ------------------------------------------------------------------ model and optimiser
    def build_model(self) -> torch.nn.Module:
        """Return a fresh ``nn.Module`` (weights initialised, on CPU)."""
        raise NotImplementedError

    def configure_optimizers(self, model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
        """Return named optimisers. Default: one SGD ``"main"`` (``momentum``, ``weight_decay``,
        ``nesterov``) over all parameters in two groups: backbone parameters (those whose name
        starts with ``backbone.``) at ``lr * backbone_lr_mult``, then the new layers at ``lr``
        (a schedule scales both, keeping their ratio)."""
        c = self.config
        backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups = [g for g in (
            {"params": backbone, "lr": c.lr * c.backbone_lr_mult},
            {"params": head, "lr": c.lr},
        ) if g["params"]]
        return {"main": torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                        nesterov=c.nesterov)}

    def configure_schedulers(self, optimizers: Mapping[str, torch.optim.Optimizer],
                             total_steps: int) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Named lr schedulers (keys: optimiser names), stepped by the engine after every training
        step. Default: one scheduler per optimiser from ``lr_schedule``, ``poly_power``,
        ``lr_milestones`` and ``lr_gamma`` (:func:`weakbench.methods.lr_schedules.scheduler_from_config`);
        none for ``lr_schedule: constant``.

        Args:
            optimizers: those of :meth:`configure_optimizers`.
            total_steps: ``T``, training steps of the stage on this worker (``epochs * steps_per_epoch``).
        """
        out = {name: scheduler_from_config(opt, total_steps, self.config) for name, opt in optimizers.items()}
        return {name: s for name, s in out.items() if s is not None}

    # ------------------------------------------------------------------ training
    def training_losses(self, model: torch.nn.Module, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Return named scalar losses; the key ``"loss"`` is the one optimised.

        Args:
            model: the (possibly DDP-wrapped) model in train mode.
            batch: ``{"image": float32 (B, 3, S, S) normalised, "labels": float32 (B, C) multi-hot
                in {0, 1}, "index": int64 (B,) record indices}``.
        """
        raise NotImplementedError

    def training_step(
        self,
        model: torch.nn.Module,
        batch: Mapping[str, Any],
        optimizers: Mapping[str, torch.optim.Optimizer],
        ctx: StepContext,
    ) -> dict[str, float]:
        """One optimisation step; returns the named losses as floats for logging.

        The default does ``training_losses`` → ``backward`` → ``step`` on ``optimizers["main"]``.
        Methods with several updates per mini-batch (MinMaxCAM's Stage I / Stage II) override it.
        """
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        losses = self.training_losses(model, batch, ctx)
        losses["loss"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def train_batch_sampler(self, labels: torch.Tensor, batch_size: int, seed: int, rank: int, world_size: int):
        """Optional: return an iterable of index lists (a batch sampler) for training, already
        sharded to ``rank`` of ``world_size``; ``None`` (default) lets the engine use a
        ``DistributedSampler``. MinMaxCAM uses this for its N sets × S images batches (its keys
        are ``(position, set_class)`` pairs, which its own fit task's dataset accepts).

        Args:
            labels: float32 (num_train_images, C) multi-hot labels of the training split.
        """
        return None

    # ------------------------------------------------------------------ inference
    # The defaults below follow the house model convention: ``model(images)`` returns
    # ``(logits (B, C), cams (B, C, h, w))``. A method whose inference differs (Puzzle-CAM's
    # multi-scale flipped CAMs) overrides ``cams`` / ``cams_and_scores``.
    def class_scores(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Classification logits, float32 (B, C)."""
        return model(images)[0]

    def cams(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps of every class, float32 (B, C, h, w) at the model's
        feature resolution (not normalised, may be negative). The engine min-max normalises
        and resizes them per the WSOL protocol."""
        return model(images)[1]

    def cams_and_scores(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cams (B, C, h, w), logits (B, C))`` from one forward pass."""
        logits, cams = model(images)
        return cams, logits

    def localization_maps(self, model: torch.nn.Module, images: torch.Tensor, class_ids: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Localisation maps for (image, class) pairs, float32 (B, H, W) in [0, 1].

        ``class_ids`` is int64 (B,). Each map is the CAM of its class, resized (bicubic) to
        ``size`` (default: the input size) and min-max normalised per map (a constant map
        becomes all zeros), as in Choe et al. (CVPR 2020)'s protocol.
        """
        cams = self.cams(model, images)
        sel = cams[torch.arange(cams.shape[0], device=cams.device), class_ids]
        size = size or images.shape[-2:]
        return normalize_maps(resize_maps(sel, size))

    def extra_metrics(self, model: torch.nn.Module, batches: list[Mapping[str, Any]], device: torch.device) -> dict[str, float]:
        """Optional method-specific evaluation (e.g. Top-GAP's ERF distance and robust accuracy).

        Called by rank 0 after training on a few validation batches, and in the ``eval`` stage on
        a few test batches, so the board (which reports ``test/*``) shows them like the other
        metrics; each batch is like a training batch, plus ``"masks"``: bool (B, C, S, S) per-class GT masks at the input size,
        ``"ignore"``: bool (B, S, S) and ``"has_masks"``: bool (B,) whether the image's masks are
        real — on box-only data ``masks`` is an all-False placeholder and ``has_masks`` False).
        Returns ``{name: value}``; the engine logs them as ``val/<name>`` and ``test/<name>``.
        Every name is declared in :mod:`weakbench.methods.metric_declarations`. Default: no
        extra metrics.
        """
        return {}

    # ------------------------------------------------------------------ the plan
    def plan(self) -> tuple[Stage, ...]:
        """The ordered stages of one trial, from the config (see :mod:`weakbench.methods.pipeline`).

        Default (``classifier_cam``): ``train`` (fit, ``epochs`` epochs, validated on ``val``
        after every epoch; its product is private to the trial) → ``eval`` (the ``test`` split,
        evaluated once). Keys stay un-namespaced (``val/max_box_acc_v2``, ``test/pxap``).

        Stages leave ``reads`` empty: :meth:`stages` derives them from :attr:`stage_groups`.
        """
        return (
            Stage("train", "fit", epochs=self.config.epochs, namespaced=False),
            Stage("eval", "eval", inputs=("train",), split="test", namespaced=False),
        )

    def stages(self) -> tuple[Stage, ...]:
        """The plan as the engine runs it: :meth:`plan`, validated, with each stage's ``reads``
        (the config fields of its cache key) derived from :attr:`stage_groups` and the config's
        field groups (:func:`weakbench.methods.pipeline.resolve_plan`).

        Raises:
            ValueError: a malformed plan, or a stage with no :attr:`stage_groups` entry.
        """
        return resolve_plan(self.plan(), type(self.config), self.stage_groups)

    def fit_task(self, stage: Stage, inputs: Mapping[str, Path] | None = None) -> FitTask:
        """The hooks of fit stage ``stage``; ``inputs`` are the product directories of the
        stage's inputs (``None`` when the engine only rebuilds the model to load its weights).
        Default: the classifier's ``train`` stage."""
        if stage.name != "train":
            raise NotImplementedError(f"method {self.name!r} has no fit stage {stage.name!r}")
        return ClassifierFitTask(self)

    def map_items(self, stage: Stage, ctx: StageContext) -> list[str]:
        """Map stage: every item key of the stage, in a deterministic order (e.g. box ids)."""
        raise NotImplementedError(f"method {self.name!r} has no map stage {stage.name!r}")

    def map_batch(self, stage: Stage, keys: list[str], ctx: StageContext) -> dict[str, Any]:
        """Map stage: results for ``keys`` (any picklable values), ``{key: result}``."""
        raise NotImplementedError(f"method {self.name!r} has no map stage {stage.name!r}")

    def map_reduce(self, stage: Stage, results: dict[str, Any], ctx: StageContext) -> dict[str, float]:
        """Map stage, rank 0: write the product's files into ``ctx.out_dir`` from every result;
        return metrics of the stage (bare names, keyed ``<split>/<stage>/<name>`` by the engine)."""
        raise NotImplementedError(f"method {self.name!r} has no map stage {stage.name!r}")

    def evaluate_stage(self, stage: Stage, ctx: StageContext) -> tuple[dict[str, float], list]:
        """Eval stage, rank 0: ``(metrics by bare name, overlays as (file name, PIL image))``.

        Default (``classifier_cam``): the WSOL, pixel, segmentation and classification metrics
        of :func:`weakbench.methods.evaluate.evaluate_split` on ``stage.split`` with the model
        of the ``train`` stage, and the method's :meth:`extra_metrics` on
        :data:`EXTRA_METRIC_BATCHES` batches of that split (as validation does after the last epoch).
        """
        from weakbench.methods.evaluate import evaluate_split

        model = ctx.load_model("train")
        metrics, overlays, details = evaluate_split(
            self, model, ctx.source, ctx.splits[stage.split], input_size=self.config.input_size, device=ctx.device,
            cam_curve_interval=self.config.cam_curve_interval, batch_size=ctx.eval_batch_size,
            max_images=ctx.max_images, num_overlays=ctx.num_overlays, extra_batches=EXTRA_METRIC_BATCHES,
            loader_workers=ctx.loader_workers, autocast_dtype=ctx.autocast_dtype)
        save_per_image(details, ctx, stage.split)
        return metrics, overlays

    def build_predictor(self, ctx: StageContext) -> torch.nn.Module | None:
        """The model logged to MLflow (and registered) after the last stage; ``None`` logs none.
        Default: a :class:`CamPredictor` around the ``train`` stage's model."""
        model = ctx.load_model("train")
        mean, std = self.input_normalization
        return CamPredictor(self, model.cpu().eval(), ctx.source.class_names, self.config.input_size, mean, std)

    def check_fit(self, stage: Stage, optimizers: Mapping[str, torch.optim.Optimizer],
                  schedulers: Mapping[str, Any]) -> None:
        """Refuse common config fields fit stage ``stage`` would silently ignore, once its task has
        built its optimisers and schedulers (the engine calls this before the first step): a
        non-constant ``lr_schedule`` whose task configures no scheduler, ``nesterov: true`` with an
        optimiser that is not Nesterov SGD.

        Raises:
            ConfigError: naming the method, the stage, the field and the fix.
        """
        schedule = self.config.lr_schedule
        if schedule != "constant" and not schedulers and stage.epochs > 0:
            raise ConfigError(f"method {self.name!r}, stage {stage.name!r}: lr_schedule is {schedule!r}, but this stage's "
                              f"fit task configures no learning-rate scheduler (FitTask.configure_schedulers); set "
                              f"lr_schedule: constant for this method")
        if self.config.nesterov:
            plain = [n for n, opt in optimizers.items() if not all(g.get("nesterov", False) for g in opt.param_groups)]
            if plain:
                raise ConfigError(f"method {self.name!r}, stage {stage.name!r}: nesterov is true, but optimiser(s) {plain} "
                                  f"of this stage are not Nesterov SGD "
                                  f"({', '.join(type(optimizers[n]).__name__ for n in plain)}); set nesterov: false for "
                                  f"this method")

    def check_untrained(self) -> None:
        """Raise :class:`~weakbench.core.errors.ConfigError` when this configuration cannot
        be used without a train stage (``weakbench evaluate --method``), naming the field and the
        fix; before any image is read. The default accepts every configuration (a method whose
        settings are resolved from the train split overrides this, e.g. Top-GAP's
        ``top_k_fraction: object_size``)."""

    # ------------------------------------------------------------------ seeds
    @classmethod
    def seed_free(cls, config: MethodConfig) -> bool:
        """Whether a run of this typed ``config`` gives the same maps and metrics for every seed,
        so that its value is a constant to compare with rather than a sample of seed noise
        (:mod:`weakbench.platform.leaderboard`, which builds the config from a run's MLflow
        params). Default: the config's own answer (:meth:`MethodConfig.seed_free`); a method that
        knows better overrides this."""
        return bool(config.seed_free())

    # ------------------------------------------------------------------ search space
    @classmethod
    def default_search_space(cls) -> Path:
        """Path of ``search_spaces/<name>.yaml`` in the source tree (or next to the package)."""
        return search_space_dir() / f"{cls.name}.yaml"


def save_per_image(details: Mapping[str, Any], ctx: StageContext, split: str) -> None:
    """Write ``details["per_image"]`` of :func:`weakbench.methods.evaluate.evaluate_split` (the
    split's per-image results, :mod:`weakbench.core.metrics.per_image`) into the stage's
    product directory as ``per_image.parquet``; the engine logs it with the run. Nothing when the
    split had no WSOL sample."""
    from weakbench.core.metrics.per_image import write_table

    table = details.get("per_image")
    if table is not None:
        write_table(table, Path(ctx.out_dir) / "per_image.parquet", split)


class ClassifierFitTask(FitTask):
    """The ``train`` stage of a ``classifier_cam`` method: delegates to the method's hooks
    (:meth:`Method.build_model`, :meth:`Method.configure_optimizers`, :meth:`Method.configure_schedulers`,
    :meth:`Method.training_step`, :meth:`Method.train_batch_sampler`) and validates the CAMs
    on the ``val`` split after every epoch (Top-GAP's method metrics on two batches after the
    last one)."""

    #: images are resized to ``input_size``: every batch has one shape (cudnn.benchmark on a GPU)
    fixed_input_size = True
    #: the classifier losses (:func:`weakbench.methods.cam.classification_loss`, MinMaxCAM's CRR/FRR,
    #: Puzzle-CAM's reconstruction loss, Top-GAP's L1) cast their inputs to float32
    mixed_precision = True

    def __init__(self, method: "Method"):
        self.method = method
        self.find_unused_parameters = method.find_unused_parameters
        self.batch_size = method.config.batch_size
        self.seed = method.config.seed

    def build_model(self) -> torch.nn.Module:
        return self.method.build_model()

    def configure_optimizers(self, model):
        return self.method.configure_optimizers(model)

    def configure_schedulers(self, optimizers, total_steps):
        return self.method.configure_schedulers(optimizers, total_steps)

    def train_dataset(self, source, indices):
        from weakbench.core.data import ClassificationDataset

        mean, std = self.method.input_normalization
        return ClassificationDataset(source, indices, self.method.config.input_size, train=True, mean=mean, std=std)

    def batch_sampler(self, source, indices, rank, world_size):
        labels = torch.from_numpy(source.labels_matrix()[list(indices)])
        return self.method.train_batch_sampler(labels, self.batch_size, self.seed, rank, world_size)

    def training_step(self, model, batch, optimizers, ctx):
        return self.method.training_step(model, batch, optimizers, ctx)

    def validate(self, model, ctx: StageContext, last: bool) -> dict[str, float]:
        from weakbench.methods.evaluate import evaluate_split

        c = self.method.config
        metrics, _, _ = evaluate_split(self.method, model, ctx.source, ctx.splits["val"], input_size=c.input_size,
                                       device=ctx.device, cam_curve_interval=c.cam_curve_interval,
                                       batch_size=ctx.eval_batch_size, max_images=ctx.max_images,
                                       extra_batches=EXTRA_METRIC_BATCHES if last else 0,
                                       loader_workers=ctx.loader_workers, autocast_dtype=ctx.autocast_dtype)
        return metrics


class CamPredictor(torch.nn.Module):
    """A trained model packaged for inference: what the engine logs to MLflow and ``predict`` loads.

    ``forward(images)`` takes float32 (B, 3, S, S) images normalised with ``mean``/``std``
    (the backbone's ``pretrained_cfg`` statistics, :attr:`Method.input_normalization`) and returns ``(logits (B, C) float32, cams (B, C, h, w) float32 raw)``
    using the method's own inference (e.g. Puzzle-CAM's multi-scale, flipped CAMs).

    Attributes:
        kind: ``"cam"`` (an :class:`~weakbench.methods.instance.InstancePredictor` is ``"instance"``;
            ``predict`` and ``evaluate`` branch on it).
        method_name, class_names (list of C str), input_size (S, pixels), mean, std (3 floats),
        multilabel (bool), config (dict of hyperparameters).
    """

    kind = "cam"

    def __init__(self, method: "Method", model: torch.nn.Module, class_names: list[str], input_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.method = method
        self.model = model
        self.method_name = method.name
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.multilabel = method.multilabel
        self.config = method.config.model_dump()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cams, logits = self.method.cams_and_scores(self.model, images)
        return logits, cams


def resize_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of float (B, h, w) maps to (B, H, W), ``align_corners=False``.

    wsolevaluation resizes each CAM with ``cv2.resize(cam, size, interpolation=cv2.INTER_CUBIC)``
    before ``normalize_scoremap``; torch's bicubic uses the same kernel (a = −0.75) and pixel
    centres, but replicates the border where OpenCV reflects it, so values can differ in the
    outermost pixels. Overshoot outside the input range is removed by the min-max normalisation
    that follows.
    """
    if isinstance(size, int):
        size = (size, size)
    return torch.nn.functional.interpolate(maps[:, None].float(), size=tuple(size), mode="bicubic", align_corners=False)[:, 0]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation of (B, H, W) maps to [0, 1]; constant maps become 0.

    This is wsolevaluation's ``normalize_scoremap``: ``(m - min) / (max - min)``.
    """
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    out = (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out)).clamp_(0, 1)


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Method]] = {}
#: the package entry-point group methods register under (``[project.entry-points."weakbench.methods"]``)
ENTRY_POINT_GROUP = "weakbench.methods"
_ENTRY_POINTS: list[importlib.metadata.EntryPoint] | None = None
_LOADED: set[str] = set()  # entry-point names loaded in this process


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register ``cls`` under ``name`` (timm's ``register_model`` pattern).

    Raises:
        ValueError: ``name`` is taken by another class, or the method's field groups do not cover
            its config (:func:`weakbench.methods.pipeline.check_field_groups`: a field in no group,
            a group no stage reads).
    """

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__module__}")
        check_field_groups(name, cls.Config, cls.stage_groups)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _checkout_entry_points() -> list[importlib.metadata.EntryPoint] | None:
    """The built-in methods' entry points from ``pyproject.toml`` of the source checkout this package
    is imported from; None when there is none (an installed wheel)."""
    import tomllib

    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != "weakbench":
        return None
    declared = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return [importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in declared.items()]


def method_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Every method entry point: the built-ins first, then other installed distributions'.

    The built-ins are weakbench's own ``[project.entry-points."weakbench.methods"]``. When the
    package is imported from a source checkout (``pyproject.toml`` beside it, as for
    ``search_spaces/``), they are read from that file, so a checkout run with ``PYTHONPATH`` or an
    editable install whose metadata predates the checkout still finds its own methods; an
    installed wheel reads them from its metadata. Other distributions' entry points in the group
    (out-of-tree method packages) come from ``importlib.metadata``. Read once per process.
    """
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        installed = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

        def own(ep: importlib.metadata.EntryPoint) -> bool:
            return ep.dist is not None and ep.dist.name == "weakbench"

        builtins = _checkout_entry_points()
        if builtins is None:
            builtins = [ep for ep in installed if own(ep)]
        _ENTRY_POINTS = builtins + [ep for ep in installed if not own(ep)]
    return _ENTRY_POINTS


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    """Import one method entry point and check that it registers a method named like it.

    The value is a :class:`Method` subclass (``module:Class``; registered under the entry point's
    name unless its ``@register_method`` already did) or a module whose classes register
    themselves.

    Raises:
        PluginError: one line naming the entry point, its distribution and what failed.
    """
    if ep.name in _LOADED:
        return
    dist = f" of {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
    where = f"method entry point {ep.name!r} = {ep.value!r}{dist} (group {ENTRY_POINT_GROUP!r})"
    try:
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method) and obj not in _REGISTRY.values():
            register_method(ep.name)(obj)
    except Exception as e:  # the plugin's own failure, whatever it is: one line that names the plugin
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise PluginError(f"{where} failed to load: {detail}; fix or uninstall the package that declares it") from e
    if _REGISTRY.get(ep.name) is None or (isinstance(obj, type) and _REGISTRY[ep.name] is not obj):
        got = getattr(obj, "name", None) if isinstance(obj, type) else None
        raise PluginError(f"{where} registers no method named {ep.name!r}"
                          + (f" (its class registers as {got!r})" if got else "")
                          + "; name the entry point after the method (@register_method(NAME))")
    _LOADED.add(ep.name)


def _load_methods(name: str | None = None) -> None:
    """Load the entry point called ``name`` (None: every entry point)."""
    for ep in method_entry_points():
        if name is None or ep.name == name:
            _load_entry_point(ep)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted: every entry point loaded (:func:`method_entry_points`).

    Raises:
        PluginError: an entry point does not load or registers no method of its name.
    """
    _load_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """Return the registered class, loading the entry point of that name first.

    Raises:
        UnknownNameError: no method of that name (the message lists the known ones).
        PluginError: an entry point does not load (:func:`list_methods`).
    """
    if name not in _REGISTRY:
        _load_methods(name)
    if name not in _REGISTRY:
        _load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def validate_config(name: str, params: Mapping[str, Any], source: str = "config") -> MethodConfig:
    """Validate ``params`` against method ``name``'s schema.

    Raises:
        ConfigError: naming ``source`` (a file path or "config"), each bad field and what is
            allowed there.
    """
    cls = get_method_class(name)
    try:
        return cls.Config(**dict(params))
    except ValidationError as e:
        from weakbench.core.errors import nearest

        def problem(err) -> str:
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":  # a misspelled key: the nearest and every valid one
                return (f"{key}: not a hyperparameter of {name!r}; nearest: {', '.join(nearest(key, cls.Config.model_fields, 2))}"
                        f"; valid: {', '.join(sorted(cls.Config.model_fields))}")
            return f"{key}: {err['msg']}"

        problems = "; ".join(problem(err) for err in e.errors())
        raise ConfigError(f"{source}: invalid hyperparameters for method {name!r}: {problems}") from None


def _type_name(annotation: Any) -> str:
    """``float``, ``int | None``, ``one of constant, poly`` (a Literal), ``tuple[float, ...]``."""
    import typing

    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _range(field: Any) -> str:
    """The bounds a field's constraints set, as an interval: ``[0, 1000]``, ``(0, 10]``, ``≥ 2``;
    ``""`` without bounds (a Literal's values are in its type)."""
    lo = hi = None
    for m in field.metadata:
        for attr, side, closed in (("ge", "lo", True), ("gt", "lo", False), ("le", "hi", True), ("lt", "hi", False)):
            v = getattr(m, attr, None)
            if v is not None:
                if side == "lo":
                    lo = (v, closed)
                else:
                    hi = (v, closed)
    if lo and hi:
        return f"{'[' if lo[1] else '('}{lo[0]:g}, {hi[0]:g}{']' if hi[1] else ')'}"
    if lo:
        return f"{'≥' if lo[1] else '>'} {lo[0]:g}"
    if hi:
        return f"{'≤' if hi[1] else '<'} {hi[0]:g}"
    return ""


def paper_name(field: Any) -> str:
    """The paper's symbol of a hyperparameter (``λ1``, ``S``, ``α``): ``json_schema_extra={"paper":
    ...}`` when the field declares it, else the description's leading symbol before a comma (the
    schemas' convention: ``"λ1, weight of CRR (eq. 5)"``); ``""`` for the engine's common fields."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if extra.get("paper"):
        return str(extra["paper"])
    head, sep, _ = (field.description or "").partition(",")
    head = head.strip()
    symbol = 0 < len(head) <= 4 and " " not in head and (not head.isascii() or not head.isalpha() or len(head) <= 2)
    return head if sep and symbol else ""


def describe_hyperparameters(name: str) -> list[dict[str, Any]]:
    """One record per hyperparameter of method ``name``'s schema: ``name``, ``paper`` (the paper's
    symbol, :func:`paper_name`), ``type``, ``default``, ``range`` (the schema's bounds), ``own``
    (declared by the method rather than by the base schema it extends) and ``description``; the method's
    own fields first, each group in declaration order.

    Raises:
        UnknownNameError: ``name`` is not a registered method.
    """
    cls = get_method_class(name)
    parent = next((b for b in cls.Config.__mro__[1:] if isinstance(b, type) and issubclass(b, MethodConfig)), MethodConfig)
    common = set(parent.model_fields)
    rows = []
    for key, f in cls.Config.model_fields.items():
        default = f.get_default(call_default_factory=True)
        rows.append({"name": key, "paper": paper_name(f), "type": _type_name(f.annotation),
                     "default": list(default) if isinstance(default, tuple) else default, "range": _range(f),
                     "own": key not in common, "description": f.description or ""})
    return sorted(rows, key=lambda r: not r["own"])


def stored_config(name: str, params: Mapping[str, Any], source: str = "config") -> MethodConfig:
    """:func:`validate_config` of a config stored by an earlier run or registered model: the
    method's :attr:`Method.retired_fields` are dropped first (BBAM's stored configs carry the
    ``cam_curve_interval`` its schema no longer has).

    Raises:
        ConfigError: as :func:`validate_config`.
    """
    retired = set(get_method_class(name).retired_fields)
    return validate_config(name, {k: v for k, v in dict(params).items() if k not in retired}, source)


def build_method(name: str, params: Mapping[str, Any] | MethodConfig | None = None, *, num_classes: int, multilabel: bool = True) -> Method:
    """Validate the config and instantiate method ``name`` (timm's ``create_model`` pattern)."""
    cls = get_method_class(name)
    cfg = params if isinstance(params, MethodConfig) else validate_config(name, params or {})
    return cls(cfg, num_classes=num_classes, multilabel=multilabel)


def search_space_dir() -> Path:
    """``search_spaces/`` of the source checkout (the package's parent directory)."""
    return Path(__file__).resolve().parents[2] / "search_spaces"
