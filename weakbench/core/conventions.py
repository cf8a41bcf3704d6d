"""Names shared by the engine, tracking, results tables, leaderboard and registry.

One place for each fact: every module that writes or reads an MLflow run uses these names.

MLflow layout (DESIGN.md, "Tracking conventions"):

* one **parent run** per sweep: tag ``weakbench.kind = "sweep"``, tag ``weakbench.sweep_id``;
* one **child run** per trial: tag ``mlflow.parentRunId`` = parent id, ``weakbench.kind =
  "trial"``, plus the :data:`TRIAL_TAGS` below; params = the trial's resolved hyperparameters
  (flat, ``str(value)``); an artifact ``config.yaml`` with the resolved config;
* metrics are keyed ``<split>/<name>`` (``val/max_box_acc_v2``, ``test/pxap``,
  ``train/loss``); per-epoch metrics use ``step = epoch`` (1-based), final metrics are logged
  once at the last step; cost metrics are ``cost/<name>``;
* the trained model is logged as data under artifact ``MODEL_ARTIFACT`` (a JSON spec and
  safetensors weights, :mod:`weakbench.platform.model_format`); its URI is stored in tag
  ``weakbench.model_uri``;
* CAM overlay PNGs are artifacts under ``overlays/``.
"""

from __future__ import annotations

# ---------------------------------------------------------------- tags
TAG_KIND = "weakbench.kind"  # "sweep" | "trial"
TAG_SWEEP_ID = "weakbench.sweep_id"
TAG_TRIAL_ID = "weakbench.trial_id"
TAG_METHOD = "weakbench.method"
TAG_BACKBONE = "weakbench.backbone"
TAG_DATASET = "weakbench.dataset"  # a short name (directory name or "synthetic")
TAG_DATASET_FINGERPRINT = "weakbench.dataset_fingerprint"  # sha256 hex prefix (16 chars)
TAG_SPLIT = "weakbench.selection_split"  # split that selects hyperparameters: "val"
TAG_SEED = "weakbench.seed"
TAG_GIT_COMMIT = "weakbench.git_commit"
TAG_CONFIG_HASH = "weakbench.config_hash"  # sha256 of the sorted-keys JSON of the config, 16 chars
TAG_VERSION = "weakbench.version"
TAG_ERROR = "weakbench.error"  # set on FAILED runs: "<ExceptionType>: message"
TAG_MODEL_URI = "weakbench.model_uri"
TAG_INTERRUPTED = "weakbench.interrupted"  # set on runs ended KILLED because the sweep was interrupted
TAG_RESTARTS = "weakbench.restarts"  # how many times Tune restarted the trial (worker / node loss)
TAG_DEVICE = "weakbench.device"  # "cpu" | "cuda"
TAG_NUM_WORKERS = "weakbench.num_workers"

TRIAL_TAGS = (
    TAG_METHOD, TAG_BACKBONE, TAG_DATASET, TAG_DATASET_FINGERPRINT, TAG_SPLIT, TAG_SEED,
    TAG_GIT_COMMIT, TAG_CONFIG_HASH, TAG_VERSION, TAG_SWEEP_ID, TAG_TRIAL_ID,
)

KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"

DEFAULT_EXPERIMENT = "weakbench"
# the environment variables of --tracking-uri, for every command: weakbench's own first, then MLflow's
# (the one MLflow's tools read), kept as an alias
TRACKING_URI_ENVVARS = ("WEAKBENCH_TRACKING_URI", "MLFLOW_TRACKING_URI")
MODEL_ARTIFACT = "model"
OVERLAY_DIR = "overlays"
#: artifact folder of a run's per-image results, ``per_image/<split>/per_image.parquet`` per evaluated split
#: (:mod:`weakbench.core.metrics.per_image`); an eval stage's product holds :data:`PER_IMAGE_FILE`
PER_IMAGE_DIR = "per_image"
PER_IMAGE_FILE = "per_image.parquet"
CONFIG_ARTIFACT = "config.yaml"

# ---------------------------------------------------------------- metrics
SPLITS = ("train", "val", "test")

# Keys in MLflow are f"{split}/{name}". What each name means, its direction (higher or lower is
# better), unit and display name are declared once in weakbench.methods.metric_declarations.

COST_TRAIN_SECONDS = "cost/train_seconds"  # wall seconds of the training stage
COST_CPU_HOURS = "cost/cpu_hours"  # wall hours × CPUs held (all workers)
COST_GPU_HOURS = "cost/gpu_hours"  # wall hours × GPUs held (all workers)


def metric_key(split: str, name: str) -> str:
    """``metric_key("val", "pxap") == "val/pxap"``."""
    return f"{split}/{name}"


# ---------------------------------------------------------------- evaluation runs (`weakbench evaluate`)
KIND_EVALUATION = "evaluation"  # weakbench.kind of a run that scores a model on a whole dataset
EVAL_SPLIT = "all"  # metric keys of an evaluation run: f"all/{name}" (every image, no split)
TAG_EVALUATED_MODEL = "weakbench.evaluated_model"  # the model URI, or "method:<name>" for a no-training method
TAG_EVALUATED_RUN = "weakbench.evaluated_run_id"  # the run that logged the evaluated model (when known)
TAG_EVALUATED_VERSION = "weakbench.evaluated_model_version"  # registered model version (models:/name@alias)

#: methods that need no training and localise by a fixed prior; the board marks every row that does
#: not beat the best of them beyond seed noise (Choe et al. 2020: the centre Gaussian baseline)
TRIVIAL_BASELINES = ("center_gaussian", "whole_image")
