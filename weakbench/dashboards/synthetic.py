"""Synthetic trial runs for tests, benchmarks and demos of the leaderboard and dashboard.

Two entry points, both deterministic given ``seed``:

* :func:`synthetic_table` — a results table (:data:`weakbench.platform.results.SCHEMA`) built in
  memory, for scale benchmarks of the Parquet path;
* :func:`log_synthetic_sweeps` — real MLflow runs that follow :mod:`weakbench.core.conventions`
  (one parent sweep run per (dataset, method), child trial runs with the trial tags, params,
  ``val/*``, ``test/*`` and ``cost/*`` metrics, optional ``overlays/*.png``), logged with
  ``MlflowClient.log_batch``.

The numbers are invented: a latent quality per configuration plus Gaussian seed noise. They
exercise the code paths; they say nothing about the methods.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from weakbench.core import conventions as C
from weakbench.platform.results import rows_to_table

METHODS = ("cam", "minmaxcam", "puzzlecam", "topgap")
_METHOD_BONUS = {"cam": 0.0, "minmaxcam": 4.0, "puzzlecam": 2.5, "topgap": 1.0, "center_gaussian": -3.0, "whole_image": -12.0}


def _config_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True).encode()).hexdigest()[:16]


#: the validation/test metric family each method logs (keys as the real methods log them)
_BOX_METHODS = {"bbam": "instance_miou", "ccgr": "map_r50"}
#: where each of those methods logs its headline (CCGR: the IS branch on held-out images, no labels)
_HEAD_NS = {"bbam": "pseudo_masks", "ccgr": "mask_rcnn"}


def trial_record(method: str, backbone: str, dataset: str, config_id: int, seed: int, rng: np.random.Generator,
                 sweep_id: str, noise: float = 1.0) -> dict[str, Any]:
    """One synthetic trial: ``{"params", "metrics", "tags"}`` following the conventions.

    The metric keys follow the method's shape: the CAM methods and the trivial baselines log the
    WSOL family (``val/max_box_acc_v2``, ``…/max_box_acc``, ``…/pxap``, ``…/cls_acc``) and the
    diagnostics ``…/best_threshold`` and ``test/num_images``; ``bbam`` logs
    ``<split>/pseudo_masks/instance_miou`` with its ``box_filled/`` baseline, ``map_r50`` and the
    count ``num_instances``; ``ccgr`` logs ``<split>/mask_rcnn/map_r50`` (its instance branch) with
    ``map_r25``, ``box_map50``, the proposal recall and the pseudo-mask diagnostic
    ``pseudo_masks_with_labels/map_r50``.

    Args:
        config_id: index of the configuration; the learning rate and (for MinMaxCAM) λ1/λ2 derive
            from it, so equal ``config_id`` means equal params apart from ``seed``.
        noise: standard deviation of the seed noise, in metric points.
    """
    crng = np.random.default_rng([zlib.crc32(f"{method}|{backbone}|{dataset}".encode()), config_id])
    lr = float(10 ** crng.uniform(-3, -1))
    params: dict[str, Any] = {"backbone": backbone, "lr": round(lr, 6), "batch_size": int(crng.choice([8, 16, 32])),
                              "epochs": 4, "input_size": 128, "seed": seed}
    if method == "minmaxcam":
        params.update(crr_weight=round(float(crng.uniform(0, 2)), 4), frr_weight=round(float(crng.uniform(0, 2)), 4))
    quality = 55.0 + _METHOD_BONUS.get(method, 0.0) - 12.0 * abs(np.log10(lr) + 2.0) + crng.normal(0, 2)
    val = quality + rng.normal(0, noise)
    test = quality - 1.0 + rng.normal(0, noise)
    hours = float(rng.uniform(0.05, 0.2))
    if method in _BOX_METHODS:
        head = _BOX_METHODS[method]
        params.update(theta_fg=round(float(crng.uniform(0.5, 0.9)), 3)) if method == "bbam" else \
            params.update(context_scale=round(float(crng.uniform(1.2, 2.0)), 3))
        metrics = {}
        for split, v in (("val", val - 10), ("test", test - 10)):
            ns = f"{split}/{_HEAD_NS[method]}"
            metrics[f"{ns}/{head}"] = v
            if method == "ccgr":  # three draws, as before: every other number stays the same
                metrics[f"{ns}/map_r25"] = v + 9 + rng.normal(0, 0.5)
                metrics[f"{ns}/box_map50"] = v + 5 + rng.normal(0, 0.5)
                metrics[f"{split}/pseudo_masks_with_labels/map_r50"] = v + 20 + rng.normal(0, 0.5)
                metrics[f"{split}/proposals/proposal_recall"] = 45.0
                continue
            metrics[f"{ns}/box_filled/{head}"] = v - 4 + rng.normal(0, 0.5)
            metrics[f"{ns}/map_r50"] = v - 8 + rng.normal(0, 0.5)
            metrics[f"{ns}/num_instances"] = 120.0
    else:
        metrics = {
            "val/max_box_acc_v2": val, "test/max_box_acc_v2": test,
            "val/max_box_acc": val + 3 + rng.normal(0, 0.5), "test/max_box_acc": test + 3 + rng.normal(0, 0.5),
            "val/pxap": val - 5 + rng.normal(0, 0.5), "test/pxap": test - 5 + rng.normal(0, 0.5),
            "val/cls_acc": 80.0 - 0.3 * (val - 50) + rng.normal(0, 0.5),
            "test/cls_acc": 80.0 - 0.3 * (test - 50) + rng.normal(0, 0.5),
        }
        # the diagnostics the real evaluation logs beside the scores (no draw: other numbers unchanged)
        metrics.update({"val/best_threshold": 0.35, "test/best_threshold": 0.4, "test/num_images": 260.0})
    metrics.update({"train/loss": float(rng.uniform(0.1, 0.5)),
                    C.COST_TRAIN_SECONDS: hours * 3600, C.COST_GPU_HOURS: 0.0, C.COST_CPU_HOURS: hours * 2})
    tags = {
        C.TAG_KIND: C.KIND_TRIAL, C.TAG_METHOD: method, C.TAG_BACKBONE: backbone, C.TAG_DATASET: dataset,
        C.TAG_DATASET_FINGERPRINT: hashlib.sha256(dataset.encode()).hexdigest()[:16], C.TAG_SPLIT: "val",
        C.TAG_SEED: str(seed), C.TAG_GIT_COMMIT: "0" * 40, C.TAG_CONFIG_HASH: _config_hash(params),
        C.TAG_VERSION: "0.1.0", C.TAG_SWEEP_ID: sweep_id, C.TAG_TRIAL_ID: f"{sweep_id}-{config_id:04d}-s{seed}",
        C.TAG_DEVICE: "cpu", C.TAG_NUM_WORKERS: "1",
    }
    return {"params": params, "metrics": {k: float(v) for k, v in metrics.items()}, "tags": tags}


def synthetic_table(n_runs: int, datasets: Sequence[str] = ("cub", "ilsvrc", "openimages"),
                    methods: Sequence[str] = METHODS, backbones: Sequence[str] = ("resnet18", "resnet50"),
                    n_seeds: int = 3, seed: int = 0, failed_fraction: float = 0.02) -> pa.Table:
    """A results table of about ``n_runs`` synthetic runs (exactly ``n_runs``, cut at the end),
    spread over every (dataset, method, backbone), ``n_seeds`` seeds per configuration."""
    rng = np.random.default_rng(seed)
    groups = [(d, m, b) for d in datasets for m in methods for b in backbones]
    per_group = -(-n_runs // len(groups))
    n_configs = -(-per_group // n_seeds)
    t0 = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
    rows = []
    for d, m, b in groups:
        sweep = f"sweep-{d}-{m}-{b}"
        for c in range(n_configs):
            for s in range(n_seeds):
                if len(rows) >= n_runs:
                    break
                rec = trial_record(m, b, d, c, s, rng, sweep)
                failed = rng.random() < failed_fraction
                start = t0 + _dt.timedelta(seconds=len(rows) * 60)
                dur = rec["metrics"][C.COST_TRAIN_SECONDS] * 1.1
                tags = rec["tags"]
                rows.append({
                    "run_id": hashlib.sha256(f"{seed}-{len(rows)}".encode()).hexdigest()[:32],
                    "run_name": f"{m}-{c}-s{s}", "experiment_id": "1", "sweep_id": sweep, "parent_run_id": sweep,
                    "trial_id": tags[C.TAG_TRIAL_ID], "method": m, "backbone": b, "dataset": d,
                    "dataset_fingerprint": tags[C.TAG_DATASET_FINGERPRINT], "selection_split": "val", "seed": s,
                    "status": "FAILED" if failed else "FINISHED", "start_time": start,
                    "end_time": start + _dt.timedelta(seconds=dur), "duration_s": dur,
                    "git_commit": tags[C.TAG_GIT_COMMIT], "config_hash": tags[C.TAG_CONFIG_HASH],
                    "weakbench_version": "0.1.0", "device": "cpu", "num_workers": 1,
                    "error": "RuntimeError: synthetic failure" if failed else None,
                    "params": rec["params"],
                    "metrics": {"train/loss": 1.0} if failed else rec["metrics"],
                    "artifact_uri": f"file:///tmp/mlruns/1/{len(rows)}/artifacts", "overlay_uris": [],
                })
    return rows_to_table(rows)


def overlay_png(size: int, rng: np.random.Generator) -> bytes:
    """A small RGB PNG (``size``×``size``) that looks like a CAM overlay: a smooth blob in a
    jet-like colour map over grey noise."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)
    base = rng.uniform(90, 150, size=(size, size, 1))
    rgb = np.concatenate([base + 120 * heat[..., None], base + 60 * np.sin(np.pi * heat)[..., None],
                          base + 100 * (1 - heat)[..., None]], axis=2)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def log_synthetic_sweeps(
    tracking_uri: str,
    experiment: str = C.DEFAULT_EXPERIMENT,
    methods: Sequence[str] = ("cam", "minmaxcam"),
    backbones: Sequence[str] = ("resnet18",),
    dataset: str = "synthetic",
    n_configs: int = 2,
    n_seeds: int = 2,
    overlays_per_run: int = 0,
    failed_runs: int = 0,
    seed: int = 0,
    run_name_prefix: str = "",
    artifact_location: str | None = None,
    epochs: int = 0,
    stopped_runs: int = 0,
    per_image_images: int = 0,
    extra_metrics: Mapping[str, Mapping[str, float]] | None = None,
) -> list[str]:
    """Log synthetic sweeps to MLflow: per (method, backbone) a parent run tagged
    ``weakbench.kind=sweep`` with ``n_configs × n_seeds`` finished child trial runs, plus
    ``failed_runs`` FAILED children and ``stopped_runs`` children stopped early by the scheduler
    (KILLED with the tag ``weakbench.stopped``, as :mod:`weakbench.platform.engine` ends them,
    validation metrics only, up to epoch 1); each finished trial gets ``overlays_per_run`` PNGs
    under ``overlays/``. A trivial baseline method (``center_gaussian``, ``whole_image``) gets one
    seed-free configuration on backbone ``none`` and no noise.

    With ``epochs`` = 0 every metric is logged once at step 4 (one ``log_batch`` per run); with
    ``epochs`` ≥ 1 the ``val/*`` metrics are logged at steps 1…``epochs`` (a rising curve that ends
    at the run's final values; steps are epochs, as the engine logs them) and the others at the
    last step. Returns the child run ids.

    ``per_image_images`` > 0: each finished trial of a WSOL method (CAM methods, trivial
    baselines) also logs a per-image ``test`` table of that many images
    (:func:`synthetic_per_image`), so the board's intervals cover test images and seeds and its
    verdicts are paired. ``extra_metrics``: ``{method: {metric key: value}}`` logged by every
    finished trial of that method (e.g. ``{"minmaxcam": {"train/one_image_sets": 64.0}}`` for a
    failed mechanism check).

    ``run_name_prefix`` is prepended to run names (tests use it to check HTML escaping).
    ``artifact_location`` is used when the experiment has to be created (default: MLflow's,
    ``./mlruns`` under the working directory for a sqlite store).
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment, artifact_location)
    rng = np.random.default_rng(seed)
    hrng = np.random.default_rng([seed, 7])  # the curves' own draws: the final numbers do not depend on epochs
    child_ids: list[str] = []
    now_ms = int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            trivial = m in C.TRIVIAL_BASELINES
            for b in (("none",) if trivial else backbones):
                parent = client.create_run(exp_id, run_name=f"{run_name_prefix}sweep-{m}-{b}",
                                           tags={C.TAG_KIND: C.KIND_SWEEP})
                sweep_id = parent.info.run_id
                client.set_tag(sweep_id, C.TAG_SWEEP_ID, sweep_id)
                jobs = [(c, s, "FINISHED") for c in range(1 if trivial else n_configs) for s in range(n_seeds)]
                if not trivial:
                    jobs += [(n_configs + k, 0, "FAILED") for k in range(failed_runs)]
                    jobs += [(n_configs + failed_runs + k, 0, "KILLED") for k in range(stopped_runs)]
                for c, s, status in jobs:
                    rec = trial_record(m, b, dataset, c, s, rng, sweep_id, noise=0.0 if trivial else 1.0)
                    if trivial:
                        rec["params"] = {"input_size": 128, "seed": s}
                    tags = dict(rec["tags"], **{"mlflow.parentRunId": sweep_id})
                    run = client.create_run(exp_id, run_name=f"{run_name_prefix}{m}-c{c}-s{s}", tags=tags)
                    rid = run.info.run_id
                    metrics = {"train/loss": 1.0} if status == "FAILED" else rec["metrics"]
                    table = None
                    if status == "FINISHED":
                        metrics = dict(metrics, **dict((extra_metrics or {}).get(m, {})))
                        if per_image_images and m not in _BOX_METHODS:
                            metrics, table = _with_per_image(metrics, "test", per_image_images, dataset,
                                                             [zlib.crc32(f"{m}|{b}".encode()), c, s, seed])
                    last = epochs if status != "KILLED" else 1
                    if status == "KILLED":
                        metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
                    logged = []
                    for k, v in metrics.items():
                        if epochs and k.startswith("val/"):
                            logged += [Metric(k, v - 3.0 * (epochs - e) + float(hrng.normal(0, 0.3)) * (e < epochs),
                                              now_ms + e, e) for e in range(1, last + 1)]
                        else:
                            logged.append(Metric(k, v, now_ms, last if epochs else 4))
                    run_tags = {"FAILED": [RunTag(C.TAG_ERROR, "RuntimeError: synthetic failure")],
                                "KILLED": [RunTag("weakbench.stopped", "stopped early by the scheduler")]}.get(status, [])
                    client.log_batch(rid, metrics=logged, params=[Param(k, str(v)) for k, v in rec["params"].items()],
                                     tags=run_tags)
                    if status == "FINISHED":
                        for k in range(overlays_per_run):
                            p = Path(tmp) / f"img{k:03d}_class{k % 3}.png"
                            p.write_bytes(overlay_png(48, rng))
                            client.log_artifact(rid, str(p), C.OVERLAY_DIR)
                        if table is not None:
                            _log_per_image(client, rid, Path(tmp), "test", table)
                    client.set_terminated(rid, status)
                    child_ids.append(rid)
                client.set_terminated(sweep_id, "FINISHED")
    return child_ids


#: thresholds of the synthetic per-image tables (τ of the CAM curve)
_SYNTH_THRESHOLDS = np.linspace(0.0, 1.0, 11)


def synthetic_per_image(split: str, accuracy: Mapping[str, float], n_images: int, dataset: str,
                        key: Sequence[int]) -> pa.Table:
    """An invented per-image table (:mod:`weakbench.core.metrics.per_image`) whose recomputed
    MaxBoxAcc / MaxBoxAccV2 are close to ``accuracy`` (``{"max_box_acc": %, "max_box_acc_v2": %}``):
    image i is correct at τ_t when its difficulty u_i (one draw per image of ``dataset``, shared by
    every run, so rows are correlated as real ones are) plus a small per-run jitter (from ``key``)
    is below the accuracy scaled by a curve that peaks at the middle threshold. ``n_images`` images,
    one class each (``i % 3``); no classifier or mask columns."""
    from weakbench.core.metrics.per_image import BOX_COLUMNS, build_table

    u = np.random.default_rng(zlib.crc32(dataset.encode())).uniform(size=n_images)
    u = u + np.random.default_rng(list(key)).normal(0, 0.03, n_images)
    t = len(_SYNTH_THRESHOLDS)
    curve = 1.0 - 0.6 * np.abs(np.arange(t) - t // 2) / (t // 2)
    bits = {}
    for name in BOX_COLUMNS:
        acc = accuracy.get("max_box_acc" if name == "box_iou50" else "max_box_acc_v2", 50.0) / 100.0
        bits[name] = u[:, None] < acc * curve[None, :]
    return build_table(split, _SYNTH_THRESHOLDS, [f"img{i:04d}" for i in range(n_images)],
                       [i % 3 for i in range(n_images)], bits)


def _with_per_image(metrics: Mapping[str, float], split: str, n_images: int, dataset: str,
                    key: Sequence[int]) -> tuple[dict[str, float], pa.Table]:
    """The run's per-image table (:func:`synthetic_per_image`) and its metrics with
    ``<split>/max_box_acc`` and ``<split>/max_box_acc_v2`` replaced by the values recomputed from
    it, so the logged numbers and the per-image results agree exactly."""
    from weakbench.core.metrics.per_image import PerImage, metric_on_weights

    acc = {n: metrics[f"{split}/{n}"] for n in ("max_box_acc", "max_box_acc_v2") if f"{split}/{n}" in metrics}
    table = synthetic_per_image(split, acc, n_images, dataset, key)
    data = PerImage(table)
    out = dict(metrics)
    for n in acc:
        out[f"{split}/{n}"] = float(np.asarray(metric_on_weights(data, n, np.ones((1, n_images)))).ravel()[0])
    return out, table


def _log_per_image(client: Any, run_id: str, tmp: Path, split: str, table: pa.Table) -> None:
    from weakbench.core.metrics.per_image import write_table

    folder = tmp / f"per_image_{run_id}"
    folder.mkdir()
    path = folder / f"{split}.parquet"
    write_table(table, path, split)
    client.log_artifact(run_id, str(path), f"{C.PER_IMAGE_DIR}/{split}")


def log_synthetic_evaluations(tracking_uri: str, methods: Sequence[str] = ("cam", "center_gaussian"),
                              backbone: str = "resnet18", dataset: str = "synthetic", n_images: int = 400,
                              experiment: str = C.DEFAULT_EXPERIMENT, seed: int = 2) -> list[str]:
    """Log one invented ``weakbench evaluate`` run per method (``weakbench.kind=evaluation``, keys
    ``all/<metric>``, a per-image table of split ``all`` over ``n_images`` images), as the
    evaluation board reads them. A trivial baseline gets backbone ``none``. Returns the run ids."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    rng = np.random.default_rng(seed)
    now_ms = int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            b = "none" if m in C.TRIVIAL_BASELINES else backbone
            rec = trial_record(m, b, dataset, 0, 0, rng, "", noise=0.0)
            params = {"input_size": 128, "epochs": 0} if m in C.TRIVIAL_BASELINES else dict(rec["params"], epochs=0)
            params.pop("seed", None)
            metrics = {f"{C.EVAL_SPLIT}/{k.split('/', 1)[1]}": v for k, v in rec["metrics"].items()
                       if k.startswith("test/")}
            tags = {k: v for k, v in rec["tags"].items() if k not in (C.TAG_SWEEP_ID, C.TAG_TRIAL_ID, C.TAG_SEED)}
            tags.update({C.TAG_KIND: C.KIND_EVALUATION, C.TAG_SPLIT: C.EVAL_SPLIT,
                         C.TAG_CONFIG_HASH: _config_hash(params)})
            run = client.create_run(exp_id, run_name=f"evaluate-{m}-{b}", tags=tags)
            rid = run.info.run_id
            metrics, table = _with_per_image(metrics, C.EVAL_SPLIT, n_images, f"{dataset}-all",
                                             [zlib.crc32(f"{m}|{b}".encode()), seed])
            client.log_batch(rid, metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("weakbench.demo", "1")])
            _log_per_image(client, rid, Path(tmp), C.EVAL_SPLIT, table)
            client.set_terminated(rid, "FINISHED")
            out.append(rid)
    return out
