"""``weakbench evaluate``: score a registered model, or a method that needs no training, on a
whole dataset directory (every image, no split) and log the result as an MLflow evaluation run.

The metrics are exactly those of a trial's eval stage
(:func:`weakbench.methods.evaluate.evaluate_split`, Choe et al. 2020's protocol) over all the
dataset's records, keyed ``all/<name>`` in MLflow (:data:`~weakbench.core.conventions.EVAL_SPLIT`),
in a run tagged ``weakbench.kind = "evaluation"`` with the evaluated model's URI, its run and
registered version, and its per-image results (artifact ``per_image/all/per_image.parquet``). The
registry and the trial boards read only ``trial`` runs, so an evaluation never selects anything;
the results store keeps evaluations apart and :func:`weakbench.platform.leaderboard.build_evaluation_board`
sets them on a board of their own (seed-free rows, paired intervals over the images).

A method "needs no training" when its plan has no fit stage with epochs > 0: the trivial
baselines (``center_gaussian``, ``whole_image``), or ``cam`` with ``epochs: 0``,
``pretrained: true``, ``features: full``, ``classifier_init: pretrained_head`` on ImageNet data.
"""

from __future__ import annotations

import contextlib

import dataclasses
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from weakbench.core import conventions as C
from weakbench.core.errors import ConfigError

__all__ = ["EvaluationResult", "evaluate_dataset"]


@dataclasses.dataclass
class EvaluationResult:
    """What :func:`evaluate_dataset` measured.

    Attributes:
        metrics: bare metric names → values (percent for accuracies/AP; ``num_images`` a count).
        method: the method's registry name; params: its hyperparameters.
        dataset: the dataset's short name; fingerprint: its fingerprint; num_images: images scored.
        evaluated: the model URI, or ``"method:<name>"``.
        run_id: the MLflow evaluation run (``None`` when not logged).
        seconds: wall time of the evaluation.
    """

    metrics: dict[str, float]
    method: str
    params: dict[str, Any]
    dataset: str
    fingerprint: str
    num_images: int
    evaluated: str
    run_id: str | None
    seconds: float


def _model_version(model_uri: str, tracking_uri: str) -> tuple[str | None, str | None]:
    """``(run id, version)`` behind a ``models:/name@alias`` or ``models:/name/<version>`` URI."""
    if not model_uri.startswith("models:/"):
        if model_uri.startswith("runs:/"):
            return model_uri[len("runs:/"):].split("/", 1)[0], None
        return None, None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = model_uri[len("models:/"):]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except Exception:  # noqa: BLE001 - the model loaded; its lineage is extra information
        return None, None
    return mv.run_id, str(mv.version)


def evaluate_dataset(
    data: str | None,
    *,
    tracking_uri: str,
    model_uri: str | None = None,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    experiment: str = C.DEFAULT_EXPERIMENT,
    cache_dir: str | Path | None = None,
    classes: str | None = None,
    input_size: int | None = None,
    cam_curve_interval: float | None = None,
    batch_size: int = 16,
    max_images: int | None = None,
    num_overlays: int = 6,
    log: bool = True,
    device: str | None = None,
    progress: bool = False,
    loader_workers: int = 0,
    notice: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Score a model (``model_uri``) or a no-training ``method`` on every image of ``data``.

    Args:
        data: a dataset directory (COCO or wsolevaluation metadata); ``None``: the synthetic default
            (``"synthetic:<variant>"`` a variant).
        classes: keep only these classes of the dataset (``"person,dog"``; None: all).
        tracking_uri: the MLflow tracking (and registry) URI.
        model_uri: e.g. ``models:/weakbench-cam-ilsvrc@champion`` or ``runs:/<id>/model``.
        method, params: instead of a model, a registered method and its hyperparameters; its plan
            must train nothing (every fit stage ``epochs == 0``).
        input_size: the evaluation frame S in pixels (default: the model's / method's).
        cam_curve_interval: threshold step (default: the model's / method's config).
        batch_size: images per batch; max_images: score only the first N images (``None``: all).
        num_overlays: overlay pictures logged under ``overlays/``.
        log: create the MLflow evaluation run (False: only compute).
        device: ``"cpu"``, ``"cuda"``… (default: CUDA when available).
        progress: show the images scored on stderr: a rich bar on a terminal (removed when done), a
            line at least every :data:`PROGRESS_EVERY_S` seconds in a pipe or a log.
        loader_workers: processes decoding the images (0: in this process); metrics do not depend on it.
        notice: called with a one-line warning before scoring (a network with random weights
            that nothing trained: its maps say nothing about the method).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        ConfigError: neither or both of ``model_uri`` / ``method``; a method that needs training
            or is not a classifier → CAM method; one whose settings come from a train split
            (``Method.check_untrained``); the model's classes differ from the dataset's.
        UnknownNameError: the URI or the method does not resolve.
        DataError: the dataset does not open.
    """
    from weakbench.methods import build_method
    from weakbench.core.data import open_dataset
    from weakbench.methods.evaluate import evaluate_split

    if (model_uri is None) == (method is None):
        raise ConfigError("weakbench evaluate: give exactly one of --model (a models:/ or runs:/ URI) and --method")
    predictor = None
    if model_uri is not None:  # a model that cannot load (or is refused) is named before any image is read
        from weakbench.platform.registry import load_predictor

        predictor = load_predictor(model_uri, tracking_uri)
    source = open_dataset(data, cache_dir=cache_dir, classes=classes)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_id_src = version = None
    if predictor is not None:
        if predictor.kind == "instance":
            raise ConfigError(f"{model_uri}: an instance-segmentation model; weakbench evaluate scores CAM models")
        if list(predictor.class_names) != list(source.class_names):
            raise ConfigError(f"{model_uri}: the model's {len(predictor.class_names)} classes are not the dataset's "
                              f"{source.num_classes} ({source.name}) in the same order; evaluate it on data with its "
                              f"classes")
        m, model = predictor.method, predictor.model
        size = input_size or predictor.input_size
        evaluated = model_uri
        run_id_src, version = _model_version(model_uri, tracking_uri)
    else:
        m = build_method(method, dict(params or {}), num_classes=source.num_classes, multilabel=source.multilabel)
        if m.shape != "classifier_cam":
            raise ConfigError(f"method {method!r} ({m.shape}): weakbench evaluate scores classifier → CAM methods")
        trains = [st.name for st in m.plan() if st.kind == "fit" and st.epochs > 0]
        if trains:
            raise ConfigError(f"method {method!r} trains (stage {trains[0]!r} has epochs > 0): evaluate needs a "
                              f"method that needs no training (--set epochs=0), or a trained model with --model")
        m.check_untrained()
        torch.manual_seed(m.config.seed)
        model = m.build_model()
        random_net = any(True for _ in model.parameters()) and m.random_weights
        if random_net and notice is not None:
            notice(f"{method}: a {m.backbone_name} with random weights and no training "
                   f"(pretrained: false, epochs: 0) scores a random network's maps, not the method's; set "
                   f"--set pretrained=true (or weights_path), use --space with a zero-epoch pretrained space, or --model")
        size = input_size or m.config.input_size
        evaluated = f"method:{method}"
    interval = cam_curve_interval or m.config.cam_curve_interval
    t0 = time.time()
    with _progress_bar(progress, f"scoring {source.name}") as advance:
        metrics, overlays, details = evaluate_split(m, model.to(dev), source, list(range(len(source.records))), input_size=size,
                                              device=dev, cam_curve_interval=interval, batch_size=batch_size,
                                              max_images=max_images, num_overlays=num_overlays, progress=advance,
                                              loader_workers=loader_workers)
    metrics = {k: v for k, v in metrics.items() if k not in m.unreported_metrics}
    seconds = time.time() - t0
    params_out = {**m.config.model_dump(), "input_size": size, "cam_curve_interval": interval}
    run_id = None
    if log:
        run_id = _log(tracking_uri, experiment, m.name, params_out, source, metrics, overlays, evaluated,
                      run_id_src, version, seconds, max_images, details.get("per_image"))
    return EvaluationResult(metrics=metrics, method=m.name, params=params_out, dataset=source.name,
                            fingerprint=source.fingerprint, num_images=int(metrics.get("num_images", 0)),
                            evaluated=evaluated, run_id=run_id, seconds=seconds)


PROGRESS_EVERY_S = 15.0


@contextlib.contextmanager
def _progress_bar(show: bool, description: str):
    """Yields ``advance(done, total)`` for :func:`evaluate_split` when ``show`` (None otherwise): a
    transient rich bar on stderr when stderr is a terminal; in a pipe or a log file one line
    (``scoring x: 320/1300 images, 120 s, ~370 s left``) at the first batch, then at least every
    :data:`PROGRESS_EVERY_S` seconds a batch ends in, and at the end."""
    if not show:
        yield None
        return
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not sys.stderr.isatty():
        t0 = time.time()
        last = [-float("inf")]

        def line(done: int, total: int) -> None:
            now = time.time()
            if now - last[0] < PROGRESS_EVERY_S and done < total:
                return
            last[0] = now
            el = now - t0
            left = f", ~{el / done * (total - done):.0f} s left" if 0 < done < total else ""
            print(f"{description}: {done}/{total} images, {el:.0f} s{left}", file=sys.stderr, flush=True)

        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def _log(tracking_uri, experiment, method, params, source, metrics, overlays, evaluated, run_id_src, version,
         seconds, max_images, per_image=None) -> str:
    from weakbench import __version__
    from weakbench.platform import tracking

    client = tracking.client_for(tracking_uri)
    exp_id = tracking.ensure_experiment(client, experiment, artifact_root=None)
    tags = {C.TAG_KIND: C.KIND_EVALUATION, C.TAG_METHOD: method, C.TAG_BACKBONE: str(params.get("backbone", "")),
            C.TAG_DATASET: source.name, C.TAG_DATASET_FINGERPRINT: source.fingerprint,
            C.TAG_EVALUATED_MODEL: evaluated, C.TAG_VERSION: __version__, C.TAG_GIT_COMMIT: tracking.git_commit(),
            C.TAG_CONFIG_HASH: tracking.config_hash(params)}
    if run_id_src:
        tags[C.TAG_EVALUATED_RUN] = run_id_src
    if version:
        tags[C.TAG_EVALUATED_VERSION] = version
    # distinct names, as sweeps get: evaluate-<method>-<dataset>-<time>-<4 hex>
    run = client.create_run(exp_id, run_name=f"evaluate-{method}-{source.name}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                             f"{secrets.token_hex(2)}", tags=tags)
    rid = run.info.run_id
    try:
        tracking.log_params(client, rid, params)
        tracking.log_metrics(client, rid, {C.metric_key(C.EVAL_SPLIT, k): float(v) for k, v in metrics.items()},
                             step=0)
        tracking.log_metrics(client, rid, {"cost/eval_seconds": seconds}, step=0)
        if max_images is not None:
            client.set_tag(rid, "weakbench.eval_max_images", str(max_images))
        if overlays:
            with tempfile.TemporaryDirectory() as d:
                for name, img in overlays:
                    img.save(Path(d) / name)
                client.log_artifacts(rid, d, C.OVERLAY_DIR)
        if per_image is not None:  # the per-image results of every image (the board's paired intervals)
            from weakbench.core.metrics.per_image import write_table

            with tempfile.TemporaryDirectory() as d:
                write_table(per_image, Path(d) / C.PER_IMAGE_FILE, C.EVAL_SPLIT)
                client.log_artifact(rid, str(Path(d) / C.PER_IMAGE_FILE), f"{C.PER_IMAGE_DIR}/{C.EVAL_SPLIT}")
    except BaseException as e:
        tracking.fail_run(client, rid, e)
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid
