"""The template of the ``classifier_cam`` methods (``cam``, ``minmaxcam``, ``puzzlecam``,
``topgap``, and the trivial baselines that score a fixed prior the same way).

:class:`ClassifierMethod` is a :class:`~weakbench.methods.base.Method` whose plan is ``train``
(fit: the classifier, validated on ``val`` every epoch) → ``eval`` (the ``test`` split, once),
whose ``train`` stage is :class:`ClassifierFitTask` (the method's Lightning-style hooks:
:meth:`~ClassifierMethod.build_model`, :meth:`~ClassifierMethod.training_step` or
:meth:`~ClassifierMethod.training_losses`, …), whose eval stage is the WSOL protocol of
:func:`weakbench.methods.evaluate.evaluate_split` and whose predictor is a
:class:`CamPredictor`. A classifier method subclasses it and implements the model and loss hooks::

    @register_method("cam")
    class CAM(ClassifierMethod):
        Config = ClassifierConfig
        ...

Its config extends :class:`WsolConfig` (the common fields in the ``train`` field group,
``cam_curve_interval`` in ``evaluation``) or :class:`ClassifierConfig` (CAMNet's options).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field

from weakbench.methods.base import Method, MethodConfig, normalize_maps, resize_maps
from weakbench.methods.lr_schedules import scheduler_from_config
from weakbench.methods.pipeline import FitTask, Stage, StageContext, StepContext

__all__ = ["WsolConfig", "ClassifierConfig", "ClassifierMethod", "ClassifierFitTask", "CamPredictor", "save_per_image",
           "EXTRA_METRIC_BATCHES"]


class WsolConfig(MethodConfig):
    """Hyperparameters of a method whose maps are scored by the WSOL protocol (the
    ``classifier_cam`` methods and the trivial baselines): the common fields in the ``train``
    field group, and the threshold step of the CAM curve in the ``evaluation`` group (it shapes
    validation and test metrics, not the weights)."""

    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": ("backbone", "pretrained", "weights_path", "output_stride", "lr", "backbone_lr_mult", "weight_decay",
                  "momentum", "nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma", "batch_size",
                  "epochs", "input_size", "seed"),
        "evaluation": ("cam_curve_interval",)}

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


#: batches of the split that :meth:`ClassifierMethod.extra_metrics` sees, after the last epoch (val) and in
#: the eval stage (test)
EXTRA_METRIC_BATCHES = 2


class ClassifierMethod(Method):
    """The template of a ``classifier_cam`` method (module docstring).

    Class variables (beyond :class:`~weakbench.methods.base.Method`'s):
        find_unused_parameters: passed to DDP for the ``train`` stage (True when a step updates
            only part of the model, as MinMaxCAM's Stage II does).

    Hooks a classifier method implements: :meth:`build_model`, :meth:`training_step` (or
    :meth:`training_losses`), :meth:`class_scores`, :meth:`cams`.
    """

    shape = "classifier_cam"
    Config: ClassVar[type[MethodConfig]] = ClassifierConfig
    find_unused_parameters: ClassVar[bool] = False
    compared_with: ClassVar[tuple[str, ...]] = ("cam", "center_gaussian", "whole_image")
    stage_groups: ClassVar[Mapping[str, tuple[str, ...]]] = {"train": ("train", "evaluation"), "eval": ("evaluation",)}

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

        Stages leave ``reads`` empty: :meth:`stages` derives them from :attr:`stage_groups`
        (``train`` reads the ``train`` and ``evaluation`` groups: its validation metrics depend on
        the threshold step).
        """
        return (
            Stage("train", "fit", epochs=self.config.epochs, namespaced=False),
            Stage("eval", "eval", inputs=("train",), split="test", namespaced=False),
        )

    def fit_task(self, stage: Stage, inputs: Mapping[str, Path] | None = None) -> FitTask:
        """The hooks of fit stage ``stage``; ``inputs`` are the product directories of the
        stage's inputs (``None`` when the engine only rebuilds the model to load its weights).
        Default: the classifier's ``train`` stage."""
        if stage.name != "train":
            raise NotImplementedError(f"method {self.name!r} has no fit stage {stage.name!r}")
        return ClassifierFitTask(self)

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
    (:meth:`ClassifierMethod.build_model`, :meth:`ClassifierMethod.configure_optimizers`, :meth:`ClassifierMethod.configure_schedulers`,
    :meth:`ClassifierMethod.training_step`, :meth:`ClassifierMethod.train_batch_sampler`) and validates the CAMs
    on the ``val`` split after every epoch (Top-GAP's method metrics on two batches after the
    last one)."""

    #: images are resized to ``input_size``: every batch has one shape (cudnn.benchmark on a GPU)
    fixed_input_size = True
    #: the classifier losses (:func:`weakbench.methods.cam.classification_loss`, MinMaxCAM's CRR/FRR,
    #: Puzzle-CAM's reconstruction loss, Top-GAP's L1) cast their inputs to float32
    mixed_precision = True

    def __init__(self, method: "ClassifierMethod"):
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

    def __init__(self, method: "ClassifierMethod", model: torch.nn.Module, class_names: list[str], input_size: int,
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
