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

* ``classifier_cam`` — ``cam``, ``minmaxcam``, ``puzzlecam``, ``topgap``: the template
  :class:`weakbench.methods.classifier.ClassifierMethod`, plan ``train`` (fit: the classifier,
  validated on ``val`` every epoch) → ``eval`` (the ``test`` split, once); its classifier hooks
  (``build_model``, ``training_losses``, …) are the ``train`` stage's fit task.
* ``detector_attribution`` — ``bbam``: detector fit → per-box attribution (map) → pseudo masks
  (map) → eval, optionally Mask R-CNN fit → eval.
* ``multi_branch`` — ``ccgr``: rounds of fit → refine → pseudo masks.

Adding a method is one decorated class in one module::

    @register_method("cam")
    class CAM(ClassifierMethod):
        Config = ClassifierConfig
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

from weakbench.methods.lr_schedules import LRSchedule
from weakbench.methods.pipeline import FitTask, Stage, StageContext, StepContext, check_field_groups, resolve_plan
from weakbench.core.errors import ConfigError, PluginError, UnknownNameError
from weakbench.core.io import atomic_write_text
from weakbench.methods.metric_specs import DEFAULT_HEADLINE, METRICS, MechanismCheck, MetricSpec, RowDiagnostic

__all__ = ["Method", "MethodConfig", "FitTask", "Stage", "StageContext",
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
            atomic_write_text(saved, "\n".join(names))
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
    (:attr:`Method.stage_groups`) and a stage product's cache key is derived from them. The
    common fields have no group here: the classifier template puts them in its ``train`` group
    (:class:`weakbench.methods.classifier.WsolConfig`), BBAM in its ``detector`` group, and
    registration fails while a field is in no group or in a group no stage reads.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

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
        "Honoured by ClassifierMethod.configure_schedulers (the classifier_cam methods); the engine refuses a non-constant "
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
        new layers from the seed); :class:`~weakbench.methods.classifier.ClassifierConfig` knows
        better."""
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
        compared_with: the board rows (method names) this method is compared against, paired
            image by image on the same dataset (:mod:`weakbench.platform.verdicts`); a ``classifier_cam``
            method (:class:`~weakbench.methods.classifier.ClassifierMethod`): ``cam`` and the trivial
            baselines. The in-run baselines of box-supervised methods
            (``box_filled``, ``box_crf``, ``unrefined``) are metric variants, not rows:
            :attr:`compared_with_variants`.
        metrics: the method's own metrics (direction, unit, display name, meaning:
            :func:`~weakbench.methods.metric_specs.metric`), registered with the method; the
            metrics common to several methods (the WSOL protocol, masks, COCO) are declared in
            :data:`weakbench.methods.metric_specs.METRICS`.
        mechanism_checks: the diagnostics that show the method's mechanism ran
            (:class:`~weakbench.methods.metric_specs.MechanismCheck`); the board flags a row
            whose check fails. Every classifier row is also checked against chance (``cls_acc``
            against ``cls_chance``) and every trained row for seeds giving identical metrics.
        row_diagnostics: diagnostics every board row of the method shows in words, never ranked
            (:class:`~weakbench.methods.metric_specs.RowDiagnostic`; CCGR: proposal
            recall and bags against random bags).
        compared_with_variants: variant prefixes (:data:`weakbench.methods.metric_specs.VARIANTS`)
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

    Hooks: :meth:`plan` and the stage hooks it needs (:meth:`fit_task`, :meth:`map_items`,
    :meth:`map_batch`, :meth:`map_reduce`, :meth:`evaluate_stage`), :meth:`build_predictor`.
    The ``classifier_cam`` methods subclass the template
    :class:`weakbench.methods.classifier.ClassifierMethod` (its plan ``train → eval`` and the
    classifier hooks ``build_model``, ``training_step``, ``class_scores``, ``cams``).
    """

    name: ClassVar[str] = ""
    shape: ClassVar[PipelineShape] = "classifier_cam"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    headline_metric: ClassVar[str] = DEFAULT_HEADLINE  # declared in weakbench.methods.metric_specs
    compared_with: ClassVar[tuple[str, ...]] = ()
    compared_with_variants: ClassVar[tuple[str, ...]] = ()
    mechanism_checks: ClassVar[tuple[MechanismCheck, ...]] = ()
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    stage_groups: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    retired_fields: ClassVar[tuple[str, ...]] = ()
    #: map stages: item keys per :meth:`map_batch` call (a chunk, saved on its own so that a killed
    #: stage resumes at its first unsaved chunk)
    map_chunk_size: int = 16
    #: metric names the method's evaluation computes but does not report (a trivial baseline has no
    #: classifier: its classification metrics are dropped, here and in ``weakbench evaluate``)
    unreported_metrics: ClassVar[tuple[str, ...]] = ()
    row_diagnostics: ClassVar[tuple[RowDiagnostic, ...]] = ()

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

    # ------------------------------------------------------------------ the plan
    def plan(self) -> tuple[Stage, ...]:
        """The ordered stages of one trial, from the config (see :mod:`weakbench.methods.pipeline`).
        Stages leave ``reads`` empty: :meth:`stages` derives them from :attr:`stage_groups`. The
        classifier methods' plan is :meth:`weakbench.methods.classifier.ClassifierMethod.plan`."""
        raise NotImplementedError(f"method {self.name!r} declares no plan")

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
        stage's inputs (``None`` when the engine only rebuilds the model to load its weights)."""
        raise NotImplementedError(f"method {self.name!r} has no fit stage {stage.name!r}")

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
        """Eval stage, rank 0: ``(metrics by bare name, overlays as (file name, PIL image))``."""
        raise NotImplementedError(f"method {self.name!r} has no eval stage {stage.name!r}")

    def build_predictor(self, ctx: StageContext) -> torch.nn.Module | None:
        """The model logged to MLflow (and registered) after the last stage; ``None`` (default)
        logs none."""
        return None

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


def save_split_tables(tables: Mapping[str, Any], ctx: StageContext) -> None:
    """Write per-image tables (:mod:`weakbench.core.metrics.per_image`), one per split
    ``{split: pyarrow.Table}``, into the stage's product as ``per_image/<split>/<stage>.parquet``;
    the engine logs them under the run's ``per_image/`` artifacts and the results store merges a
    split's files of every stage (an instance method's eval stages score val and test at once)."""
    from weakbench.core.metrics.per_image import write_table

    for split, table in tables.items():
        if table is None:
            continue
        folder = Path(ctx.out_dir) / "per_image" / split
        folder.mkdir(parents=True, exist_ok=True)
        write_table(table, folder / f"{ctx.stage.name}.parquet", split)


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
        _check_metrics(name, cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _check_metrics(name: str, cls: type[Method]) -> None:
    """Refuse a method metric declared differently by the common table or another method."""
    for s in cls.metrics:
        other = METRICS.get(s.name)
        where = "weakbench/methods/metric_specs.py (METRICS)"
        if other is None:
            owner = next((n for n, c in _REGISTRY.items() if n != name for o in c.metrics if o.name == s.name), None)
            other = next((o for o in _REGISTRY[owner].metrics if o.name == s.name), None) if owner else None
            where = f"method {owner!r}"
        if other is not None and other != s:
            raise ValueError(f"method {name!r} declares metric {s.name!r}, which {where} declares differently; use that "
                             f"declaration or another name")


def registered_metrics() -> dict[str, MetricSpec]:
    """The ``Method.metrics`` of every registered method (every entry point loaded, as
    :func:`list_methods`), by bare name.

    Raises:
        PluginError: an entry point does not load (:func:`list_methods`).
    """
    _load_methods()
    return {s.name: s for cls in _REGISTRY.values() for s in cls.metrics}


def _checkout_entry_points() -> list[importlib.metadata.EntryPoint] | None:
    """The built-in methods' entry points from ``pyproject.toml`` of the source checkout this package
    is imported from; None when there is none (an installed wheel) or no TOML reader (Python 3.10
    without ``tomli``: the installed metadata is used)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            return None

    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text()).get("project", {})
    except (OSError, ValueError):  # TOMLDecodeError is a ValueError
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
