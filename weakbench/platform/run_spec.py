"""The run specification of a sweep: every option of ``weakbench sweep`` declared once.

:class:`SweepOptions` is the one declaration. Each field says, beside its type, default and
constraints, two things in its metadata (``json_schema_extra["weakbench"]``, written by
:func:`option`):

* its **role** (:class:`Role`):

  - ``Role.TRIAL``: it shapes the sweep's trials or their checkpoints (the data, the tracking
    store, the search, the executor, the resources of a trial, what a trial logs). It is saved
    in ``sweep.json`` and ``--resume`` keeps the saved value whatever the command line says
    (:func:`resumed_options`);
  - ``Role.PLACE``: where and how the sweep runs (the Ray cluster, its CPUs, how many trials at
    once, timeouts, the terminal output). ``--resume`` takes the command line's value;
  - ``Role.SWEEP``: which sweep this is (the space file, the output directory, the name,
    ``--resume`` itself). Always the command line's;

  and whether it is **per trial**: handed to every trial as the field of the same name of
  :class:`weakbench.platform.engine.TrialSpec` (:func:`trial_fields`);

* its **command-line form** (or ``cli=None`` for an option of the Python API only): the flag
  names, the help text, and how the flag's value becomes the field's (a negated flag such as
  ``--no-model``, repeatable ``--set KEY=VALUE`` items, a path argument).
  :mod:`weakbench.cli` builds the ``weakbench sweep`` command from it.

This module imports pydantic only: the CLI reads it when it starts.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from weakbench.core import conventions as C

#: the most trials one sweep plans (``--trials``): every finished trial keeps its final weights
#: (about 45 MB for a ResNet-18) and a row in MLflow; split a larger search into several sweeps
MAX_TRIALS = 1000


class Role(str, Enum):
    """What an option of :class:`SweepOptions` is to a sweep, and what ``--resume`` does with it."""

    TRIAL = "trial"  # shapes the trials: saved in sweep.json, fixed on --resume
    PLACE = "place"  # where and how it runs: may change on --resume
    SWEEP = "sweep"  # which sweep: space file, output directory, name, --resume


_META = "weakbench"


def option(default: Any = PydanticUndefined, *, role: Role, cli: dict[str, Any] | None, per_trial: bool = False,
           description: str | None = None, **constraints: Any) -> Any:
    """A :class:`SweepOptions` field: pydantic's ``Field(default, description=..., **constraints)``
    with the run-spec metadata in ``json_schema_extra["weakbench"]``.

    Args:
        default: the field's default (omitted: required).
        role: see :class:`Role`.
        cli: the command-line form (:func:`flag` or :func:`argument`), or None for an option of
            the Python API only.
        per_trial: the value is handed to every trial, as the :class:`~weakbench.platform.engine.TrialSpec`
            field of the same name (``Role.TRIAL`` fields only).
        description: what the field is (default: the CLI help).
        constraints: pydantic's (``ge``, ``gt``, ``default_factory`` ...).

    Raises:
        ValueError: ``per_trial`` on a field that is not ``Role.TRIAL`` (a resumed sweep would
            hand its trials other values than their checkpoints were made with).
    """
    if per_trial and role is not Role.TRIAL:
        raise ValueError("a per-trial option shapes the trials: its role must be Role.TRIAL")
    meta = {"role": role.value, "per_trial": per_trial, "cli": cli}
    return Field(default, description=description or (cli or {}).get("help"), json_schema_extra={_META: meta},
                 **constraints)


def flag(*names: str, help: str = "", envvar: str | tuple[str, ...] | None = None, min: int | float | None = None,
         negate: bool = False, key_value: bool = False) -> dict[str, Any]:
    """The command-line option of a field.

    Args:
        names: click's declarations: ``"--trials", "-n"``, or a boolean's ``"--on/--off"``.
        help: the help text of ``weakbench sweep --help``.
        envvar: an environment variable (or several, the first set wins) read when the flag is absent.
        min: the smallest value the CLI accepts (a usage error below it).
        negate: a boolean flag that sets the field to False (``--no-model`` for ``log_model``).
        key_value: a repeatable ``KEY=VALUE`` option whose items (values parsed as YAML) make the
            field's dict (``--set``).
    """
    return {"kind": "option", "names": list(names), "help": help, "envvar": envvar, "min": min,
            "negate": negate, "key_value": key_value}


def argument(*, help: str, path: bool = False) -> dict[str, Any]:
    """The positional command-line argument of a field (``path``: typed as a path, stored as a string)."""
    return {"kind": "argument", "help": help, "path": path}


class SweepOptions(BaseModel):
    """Options of :func:`weakbench.platform.sweep.run_sweep`, the ``weakbench sweep`` flags (one
    declaration: the CLI, ``--resume`` and each trial's spec are derived from it; see the module
    docstring). Constraints are checked when it is built (``pydantic.ValidationError``)."""

    model_config = ConfigDict(extra="forbid")

    space: str = option(role=Role.SWEEP, description="search-space YAML file",
                        cli=argument(help="Search-space YAML, e.g. search_spaces/cam.yaml.", path=True))
    data: str | None = option(
        None, role=Role.TRIAL, per_trial=True, description="dataset directory; None = embedded synthetic default",
        cli=flag("--data", "-d", help="Dataset directory (COCO: annotations/instances.json + images/; or wsolevaluation "
                                      "metadata). Omit for the embedded synthetic default; synthetic:touching or "
                                      "synthetic:hard for its variants."))
    classes: str | None = option(
        None, role=Role.TRIAL, per_trial=True,
        description="keep only these classes of the dataset, comma-separated names; None: the space file's "
                    "classes, else all",
        cli=flag("--classes", help="Keep only these classes of the dataset, e.g. person,dog (default: the space "
                                   "file's classes key, else every class)."))
    trials: int = option(4, ge=1, le=MAX_TRIALS, role=Role.TRIAL,
                         description=f"total Tune trials (seed repeats included), at most {MAX_TRIALS}",
                         cli=flag("--trials", "-n", help=f"Total number of trials (seed repeats included), 1 to {MAX_TRIALS}."))
    output_dir: str = option(
        "weakbench_runs", role=Role.SWEEP, description="where sweeps/, mlflow.db and results/ live",
        cli=flag("--output-dir", "-o", help="Where sweeps, the MLflow database and the results store live."))
    tracking_uri: str | None = option(
        None, role=Role.TRIAL, per_trial=True, description="MLflow URI; default sqlite:///<output_dir>/mlflow.db",
        cli=flag("--tracking-uri", envvar=C.TRACKING_URI_ENVVARS,
                 help="MLflow tracking URI, e.g. http://mlflow:5000 (default: sqlite:///<output-dir>/mlflow.db); "
                      "env WEAKBENCH_TRACKING_URI, or its alias MLFLOW_TRACKING_URI."))
    experiment: str = option(C.DEFAULT_EXPERIMENT, role=Role.TRIAL, per_trial=True,
                             cli=flag("--experiment", help="MLflow experiment name."))
    name: str | None = option(None, role=Role.SWEEP, description="sweep name; default <method>-<dataset>-<time>",
                              cli=flag("--name", help="Sweep name (default <method>-<dataset>-<time>)."))
    resume: bool = option(
        False, role=Role.SWEEP, description="continue the named (or latest) sweep of the method",
        cli=flag("--resume", help="Continue the named (or latest) sweep of this method: finished trials are kept, "
                                  "interrupted ones resume from their checkpoints."))
    num_workers: int = option(1, ge=1, role=Role.TRIAL, per_trial=True, description="Ray Train workers per trial",
                              cli=flag("--num-workers", help="Ray Train workers per trial (DDP)."))
    use_gpu: bool = option(False, role=Role.TRIAL, per_trial=True, description="one GPU per worker",
                           cli=flag("--gpu", help="One GPU per worker (NCCL)."))
    cpus_per_worker: float = option(1.0, gt=0, role=Role.TRIAL, per_trial=True,
                                    cli=flag("--cpus-per-worker", help="CPUs each worker (an inline trial) holds."))
    gpus_per_trial: float | None = option(
        None, gt=0, role=Role.TRIAL, per_trial=True,
        description="share of one GPU each one-worker trial holds (0 < G <= 1, e.g. 0.25 packs four trials on a GPU, "
                    "through Ray's fractional resources); None: --gpu gives one whole GPU per worker",
        cli=flag("--gpus-per-trial", help="Share of one GPU per trial, e.g. 0.25 packs 4 one-worker trials on each GPU "
                                          "(inline executor). DDP trials hold whole GPUs: use --gpu --num-workers N."))
    loader_workers: int | None = option(
        None, ge=0, role=Role.TRIAL, per_trial=True,
        description="DataLoader worker processes per trial worker; None: one per CPU it holds beyond the first "
                    "(0 with the default --cpus-per-worker 1)",
        cli=flag("--loader-workers", min=0, help="Processes decoding and augmenting images for each trial worker "
                                                 "(default: --cpus-per-worker minus 1). Results do not depend on it."))
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", role=Role.TRIAL, per_trial=True,
        description="autocast dtype of the classifier methods' forward passes: auto = bf16 on a GPU that supports it, "
                    "fp32 on the CPU (weakbench.core.accel)",
        cli=flag("--precision", help="auto (bf16 autocast on a GPU with bf16 support, fp32 on the CPU), fp32 or bf16."))
    memory_format: Literal["auto", "channels_last", "contiguous"] = option(
        "auto", role=Role.TRIAL, per_trial=True,
        description="model memory layout: auto = channels_last on a GPU, contiguous on the CPU",
        cli=flag("--memory-format", help="auto (channels_last on a GPU, contiguous on the CPU), channels_last or "
                                         "contiguous."))
    max_concurrent: int | None = option(
        None, ge=1, role=Role.PLACE, description="trials at once; None: as many as the cluster's CPUs allow",
        cli=flag("--max-concurrent", help="Trials at once (default: as many as the CPUs allow)."))
    searcher: Literal["optuna", "random"] = option(
        "optuna", role=Role.TRIAL, cli=flag("--searcher", help="optuna (TPE, seeded) or random (grid axes crossed)."))
    search_seed: int = option(0, role=Role.TRIAL, cli=flag("--search-seed", help="Seed of the Optuna sampler."))
    executor: Literal["auto", "train", "inline"] = option(
        "auto", role=Role.TRIAL,
        description="inline: one-worker CPU trials train in their (reused) Tune trial actor; train: a Ray Train "
                    "TorchTrainer per trial (DDP, GPUs); auto: inline for one CPU worker, else train",
        cli=flag("--executor", help="inline (a 1-worker CPU trial trains inside its Tune trial actor, reused from trial "
                                    "to trial), train (a Ray Train TorchTrainer per trial: DDP, GPUs; a controller and "
                                    "worker processes start per trial) or auto: inline for one CPU worker, train otherwise."))
    eval_max_images: int | None = option(
        None, ge=1, role=Role.TRIAL, per_trial=True, description="cap on images per evaluated split (None: all)",
        cli=flag("--eval-max-images", help="Evaluate at most this many images per split."))
    early_stopping: bool = option(
        True, role=Role.TRIAL, description="use the space file's ASHA scheduler (False: every trial runs all epochs)",
        cli=flag("--early-stopping/--no-early-stopping",
                 help="Stop poor configurations early (all their seeds together) with the space file's ASHA "
                      "scheduler; off runs every trial to the end."))
    baselines: bool = option(
        True, role=Role.PLACE,
        description="after a sweep of a classifier → CAM method, sweep the trivial baselines (center_gaussian, "
                    "whole_image) that its dataset and input size have no finished run of yet",
        cli=flag("--baselines/--no-baselines", envvar="WEAKBENCH_BASELINES",
                 help="After a sweep of a classifier → CAM method, also sweep the trivial baselines its dataset and "
                      "input size lack (center_gaussian over its σ grid, whole_image; no training, seconds), so the "
                      "board shows whether the method beats them."))
    overrides: dict[str, Any] = option(
        role=Role.TRIAL, default_factory=dict, description="fixed values overriding the space file",
        cli=flag("--set", key_value=True, help="Override a hyperparameter for every trial, KEY=VALUE (repeatable)."))
    address: str | None = option(
        None, role=Role.PLACE,
        description="Ray cluster address ('auto' joins the local one, 'local' starts a private one); None: RAY_ADDRESS, "
                    "else a private local instance beside any other driver's, refused only where a `ray start` "
                    "cluster runs on this machine (Ray's own default would join it)",
        cli=flag("--address", help="Ray cluster address (or RAY_ADDRESS); 'auto' joins the `ray start` cluster of this "
                                   "machine, 'local' starts a private one. Default: a private local instance, beside "
                                   "other sweeps' instances; asks which when a `ray start` cluster runs here."))
    max_failures: int = option(
        2, ge=0, role=Role.TRIAL,
        description="restarts of a trial whose worker, actor or node died (Tune's FailureConfig); each restart resumes "
                    "from the trial's latest checkpoint",
        cli=flag("--max-failures", help="Restarts of a trial whose worker, actor or node died; each restart "
                                               "resumes from the trial's latest checkpoint."))
    worker_start_timeout_s: float = option(
        120.0, gt=0, role=Role.PLACE,
        description="seconds a Train worker group may wait for its resources before the attempt fails "
                    "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)",
        cli=flag("--worker-start-timeout", help="Seconds a trial's Ray Train worker group may wait for its resources "
                                                "before the attempt fails."))
    num_cpus: int | None = option(None, ge=1, role=Role.PLACE, description="CPUs of a locally started Ray instance",
                                  cli=flag("--num-cpus", help="CPUs of the local Ray instance."))
    log_model: bool = option(True, role=Role.TRIAL, per_trial=True, description="log each trial's trained model to MLflow",
                             cli=flag("--no-model", negate=True, help="Do not log trained models to MLflow."))
    keep_checkpoints: bool = option(
        False, role=Role.TRIAL, per_trial=True,
        description="keep every checkpoint of every trial (Tune's and the engine's) and finished trials' private stage "
                    "products; default: a finished trial keeps its final weights once (the MLflow model) and an "
                    "unfinished one its latest checkpoint",
        cli=flag("--keep-checkpoints", help="Keep every epoch's checkpoint and finished trials' stage products (by "
                                            "default a finished trial keeps only its logged model, about 45 MB for a "
                                            "ResNet-18, and an unfinished one its latest checkpoint for --resume)."))
    verbose: bool = option(
        False, role=Role.PLACE, description="show Ray's, Tune's and MLflow's output on the terminal (the CLI's live "
                                            "view; run_sweep itself ignores it)",
        cli=flag("--verbose", "-v", help="Show Ray's, Tune's and MLflow's own output here instead of in "
                                         "<sweep dir>/sweep.log."))
    split_seed: int = option(0, role=Role.TRIAL, cli=None, description="seed of the stored train/val/test split")
    num_overlays: int = option(6, ge=0, role=Role.TRIAL, per_trial=True, cli=None,
                               description="CAM overlay images each trial logs")


def _meta(name: str) -> dict[str, Any]:
    """The run-spec metadata of field ``name`` (KeyError: no such field)."""
    extra = SweepOptions.model_fields[name].json_schema_extra
    return extra[_META]  # type: ignore[index]


def role_of(name: str) -> Role:
    """The :class:`Role` of field ``name`` of :class:`SweepOptions` (KeyError: no such field)."""
    return Role(_meta(name)["role"])


def cli_of(name: str) -> dict[str, Any] | None:
    """The command-line form of field ``name`` (:func:`flag` / :func:`argument`), None for an option of the API only."""
    return _meta(name)["cli"]


def fields_with_role(role: Role) -> tuple[str, ...]:
    """Names of the :class:`SweepOptions` fields of ``role``, in declaration order."""
    return tuple(n for n in SweepOptions.model_fields if role_of(n) is role)


def per_trial_fields() -> tuple[str, ...]:
    """Names of the fields handed to every trial (TrialSpec fields of the same name), in declaration order."""
    return tuple(n for n in SweepOptions.model_fields if _meta(n)["per_trial"])


def resumed_options(opts: SweepOptions, saved: dict[str, Any]) -> SweepOptions:
    """The options a resumed sweep runs with: ``opts`` (the command line) with every ``Role.TRIAL``
    field that ``saved`` (the sweep's ``sweep.json``) holds set to the saved value, so that the
    resumed trials and their checkpoints are the ones it started with (an inline trial's checkpoint
    is a Tune one, a Train trial's a Train one); where it runs (``Role.PLACE``) and which sweep
    (``Role.SWEEP``) stay the command line's. A key missing from an older ``sweep.json`` keeps the
    command line's value; keys that are no field are ignored.

    Raises:
        pydantic.ValidationError: a saved value the field refuses (a hand-edited sweep.json).
    """
    kept = {k: saved[k] for k in fields_with_role(Role.TRIAL) if k in saved}
    return SweepOptions.model_validate({**opts.model_dump(), **kept})


def trial_fields(opts: SweepOptions) -> dict[str, Any]:
    """The per-trial fields of ``opts`` (:func:`per_trial_fields`) as TrialSpec keyword arguments."""
    return opts.model_dump(include=set(per_trial_fields()))
