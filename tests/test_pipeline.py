"""The pipeline contract and the stage runner, proven on a tiny two-stage test method.

``toy_pipeline`` is a fit stage (a per-class colour prototype learnt by SGD on the synthetic
default) → a map stage (each training image scored against the prototypes, chunk by chunk) →
an eval stage (accuracy of the nearest prototype on the test split). The tests check, on real
MLflow (SQLite) and real data:

* the whole plan runs inline, metrics are keyed by stage, tags record computed stages;
* a second trial that differs only in the map stage's field reuses the fit product (a cache
  hit, visible in its tags) and recomputes the map stage;
* a trial killed inside the map stage resumes at its first unsaved chunk (no chunk computed
  twice) and its fit stage is not redone;
* products: checksums guard the manifest, a published product is never overwritten, and two
  concurrent computations of one product compute it once;
* plan validation and segmentation.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, ClassVar, Mapping

import pytest
import torch
from pydantic import Field

from weakbench.methods import base
from weakbench.methods.base import Method, MethodConfig, register_method
from weakbench.methods.pipeline import SPEED_ONLY, UNUSED, FitTask, Stage, validate_plan
from weakbench.core import conventions as C
from weakbench.platform import tracking
from weakbench.core.data import make_splits, open_dataset, save_splits
from weakbench.platform.engine import TrialSpec, plan_segments, run_trial
from weakbench.platform.products import Product


class ToyConfig(MethodConfig):
    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "fit": ("lr", "seed", "epochs"), "score": ("score_scale",),
        UNUSED: ("backbone", "pretrained", "weights_path", "output_stride", "backbone_lr_mult", "weight_decay", "momentum",
                 "nesterov", "lr_schedule", "poly_power", "lr_milestones", "lr_gamma", "batch_size", "input_size"),
        SPEED_ONLY: ("fail_after_chunks",)}

    score_scale: float = Field(1.0, gt=0, description="map stage: scores are divided by this")
    fail_after_chunks: int | None = Field(None, description="test hook: raise after this many chunks (once)")


class _Protos(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.protos = torch.nn.Parameter(torch.zeros(num_classes, 3))


class ToyFit(FitTask):
    def __init__(self, method: "ToyPipeline"):
        self.method = method
        self.batch_size = 8
        self.seed = method.config.seed

    def build_model(self):
        return _Protos(self.method.num_classes)

    def configure_optimizers(self, model):
        return {"main": torch.optim.SGD(model.parameters(), lr=self.method.config.lr)}

    def train_dataset(self, source, indices):
        from weakbench.core.data import ClassificationDataset

        return ClassificationDataset(source, indices, 32, train=False)

    def training_losses(self, model, batch, ctx):
        colour = batch["image"].mean(dim=(2, 3))  # (B, 3)
        w = batch["labels"] / batch["labels"].sum(1, keepdim=True).clamp(min=1)
        target = w.T @ colour / w.sum(0)[:, None].clamp(min=1e-6)  # per-class mean colour
        present = w.sum(0) > 0
        loss = ((model.protos - target) ** 2)[present].mean()
        return {"loss": loss}

    def validate(self, model, ctx, last):
        return {"proto_norm": float(model.protos.detach().norm())}


@register_method("toy_pipeline")
class ToyPipeline(Method):
    Config = ToyConfig
    headline_metric = "score/mean"
    map_chunk_size = 10
    calls: list[tuple[str, tuple[str, ...]]] = []

    stage_groups = {"fit": ("fit",), "score": ("score",), "acc": ()}

    def plan(self):
        return (Stage("fit", "fit", epochs=self.config.epochs, shared=True),
                Stage("score", "map", inputs=("fit",), split="train", shared=True),
                Stage("acc", "eval", inputs=("fit", "score"), split="test"))

    def fit_task(self, stage, inputs=None):
        return ToyFit(self)

    def map_items(self, stage, ctx):
        return [str(i) for i in ctx.splits["train"]]

    def map_batch(self, stage, keys, ctx):
        marker = Path(ctx.out_dir) / "chunks_done"  # out_dir is the trial dir outside map_reduce
        n = int(marker.read_text()) if marker.exists() else 0
        if self.config.fail_after_chunks is not None and n == self.config.fail_after_chunks and not (Path(ctx.out_dir) / "failed").exists():
            (Path(ctx.out_dir) / "failed").write_text("1")
            raise RuntimeError("injected failure inside the map stage")
        model = ctx.load_model("fit")
        out = {}
        for k in keys:
            colour = torch.tensor(list(ctx.source.load_image(int(k)).resize((8, 8)).getdata()), dtype=torch.float32).mean(0) / 255
            out[k] = float((model.protos.detach() - colour).norm(dim=1).min()) / self.config.score_scale
        marker.write_text(str(n + 1))
        with open(Path(ctx.out_dir) / "map_calls.jsonl", "a") as f:
            f.write(json.dumps(keys) + "\n")
        return out

    def map_reduce(self, stage, results, ctx):
        (ctx.out_dir / "scores.json").write_text(json.dumps(results, sort_keys=True))
        return {"mean": sum(results.values()) / len(results), "count": float(len(results))}

    def evaluate_stage(self, stage, ctx):
        scores = json.loads((ctx.inputs["score"] / "scores.json").read_text())
        return {"num_scores": float(len(scores)), "images": float(len(ctx.splits[stage.split]))}, []

    def build_predictor(self, ctx):
        return None


@pytest.fixture(autouse=True, scope="module")
def _unregister():
    yield
    base._REGISTRY.pop("toy_pipeline", None)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = open_dataset(None, cache_dir=cache)
    splits_path = cache / "splits.json"
    save_splits(make_splits(source, seed=0), splits_path)
    return cache, source, splits_path


def _spec(tmp_path, synthetic, trial_id, **params) -> TrialSpec:
    cache, _, splits_path = synthetic
    return TrialSpec(method="toy_pipeline", params={"epochs": 2, "lr": 0.5, **params}, data=None, data_cache=str(cache),
                     splits_path=str(splits_path), trial_dir=str(tmp_path / "trials" / trial_id),
                     tracking_uri=tracking.default_tracking_uri(tmp_path), sweep_id="s", trial_id=trial_id,
                     run_name=trial_id, log_model=False, products_dir=str(tmp_path / "products"))


def _run(spec):
    client = tracking.client_for(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{C.TAG_TRIAL_ID}` = '{spec.trial_id}'")
    assert len(runs) == 1
    return client, runs[0]


def _map_calls(spec) -> list[list[str]]:
    f = Path(spec.trial_dir) / "map_calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_plan_runs_inline_with_stage_keys_tags_and_progress(tmp_path, synthetic):
    spec = _spec(tmp_path, synthetic, "t0")
    final = run_trial(spec, executor="inline")
    _, source, splits_path = synthetic
    n_train = len(json.loads(splits_path.read_text())["splits"]["train"])
    assert final["progress"] == 2 + 1 + 1 and final["epoch"] == 2  # 2 fit epochs + map + eval
    assert final["train/score/count"] == n_train and final["test/acc/num_scores"] == n_train
    client, run = _run(spec)
    assert run.info.status == "FINISHED"
    for st in ("fit", "score", "acc"):
        assert run.data.tags[f"weakbench.stage.{st}.cache"] == "computed"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/fit/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/fit/proto_norm")] == [1, 2]
    # the prototypes left their zero initialisation: the fit stage really trained
    norms = [m.value for m in client.get_metric_history(run.info.run_id, "val/fit/proto_norm")]
    assert norms[0] > 0.1 and norms[1] != norms[0]
    assert len(_map_calls(spec)) == -(-n_train // ToyPipeline.map_chunk_size)


def test_second_trial_reuses_the_fit_product_and_recomputes_the_map(tmp_path, synthetic):
    first = _spec(tmp_path, synthetic, "a")
    run_trial(first, executor="inline")
    second = _spec(tmp_path, synthetic, "b", score_scale=2.0)
    final = run_trial(second, executor="inline")
    client, run = _run(second)
    assert run.data.tags["weakbench.stage.fit.cache"] == "hit"
    assert run.data.tags["weakbench.stage.score.cache"] == "computed"
    assert run.data.tags["weakbench.stage.fit.hash"] == _run(first)[1].data.tags["weakbench.stage.fit.hash"]
    assert "train/fit/loss" not in run.data.metrics  # no epoch was trained again
    first_mean = _run(first)[1].data.metrics["train/score/mean"]
    assert final["train/score/mean"] == pytest.approx(first_mean / 2)  # same prototypes, halved scores
    # a third trial identical to the first is a cache hit everywhere it may be shared
    third = _spec(tmp_path, synthetic, "c")
    run_trial(third, executor="inline")
    tags = _run(third)[1].data.tags
    assert tags["weakbench.stage.fit.cache"] == "hit" and tags["weakbench.stage.score.cache"] == "hit"
    assert _map_calls(third) == []


def test_kill_in_map_stage_resumes_at_the_first_unsaved_chunk(tmp_path, synthetic):
    spec = _spec(tmp_path, synthetic, "k", fail_after_chunks=2)
    with pytest.raises(RuntimeError, match="injected failure inside the map stage"):
        run_trial(spec, executor="inline")
    client, run = _run(spec)
    assert run.info.status == "FAILED"
    before = _map_calls(spec)
    assert len(before) == 2
    final = run_trial(spec, executor="inline")
    client, run = _run(spec)
    assert run.info.status == "FINISHED"
    after = _map_calls(spec)
    chunks = [tuple(c) for c in after]
    assert len(chunks) == len(set(chunks)), "a chunk was computed twice"
    assert after[:2] == before
    assert run.data.tags["weakbench.stage.fit.cache"] == "hit"  # the fit stage was not redone
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/fit/loss")] == [1, 2]
    assert final["train/score/count"] == sum(len(c) for c in after)


def test_products_checksums_no_overwrite_and_single_computation(tmp_path):
    p = Product(tmp_path, "stage", "0123456789abcdef")
    staging = p.new_staging_dir()
    (staging / "a.txt").write_text("one")
    man = p.publish(staging, {"metrics": {"x": 1.0}})
    assert p.complete and man["files"]["a.txt"]
    again = p.new_staging_dir()
    (again / "a.txt").write_text("two")
    p.publish(again, {})
    assert (p.dir / "a.txt").read_text() == "one"  # never overwritten
    (p.dir / "a.txt").write_text("tampered")
    assert not p.complete  # a checksum mismatch is not a product

    q = Product(tmp_path, "other", "fedcba9876543210")
    computed = []

    def worker():
        with q.lock():
            if q.complete:
                return
            computed.append(threading.get_ident())
            s = q.new_staging_dir()
            (s / "f").write_text("x")
            q.publish(s, {})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1 and q.complete


def test_plan_validation_and_segments():
    with pytest.raises(ValueError, match="appears twice"):
        validate_plan([Stage("a", "fit"), Stage("a", "eval")])
    with pytest.raises(ValueError, match="reads 'b', which is not an earlier stage"):
        validate_plan([Stage("a", "fit", inputs=("b",))])
    with pytest.raises(ValueError, match="unknown config field"):
        validate_plan([Stage("a", "fit", reads=("nope",))], {"lr"})
    classifier = (Stage("train", "fit", epochs=3), Stage("eval", "eval"))
    assert plan_segments(classifier) == [[0, 1]]
    bbam_like = (Stage("detector", "fit", epochs=2), Stage("attribute", "map"), Stage("pseudo", "map"), Stage("e1", "eval"),
                 Stage("mask_rcnn", "fit", epochs=2), Stage("e2", "eval"))
    assert plan_segments(bbam_like) == [[0, 1, 2, 3], [4, 5]]
    assert plan_segments((Stage("m", "map"), Stage("f", "fit"))) == [[0], [1]]


def test_stage_hash_covers_the_code(tmp_path, monkeypatch):
    """A product made by other method code is not reused: the hash covers code_digest, which
    changes when any weakbench.methods source changes."""
    import shutil

    import weakbench.methods as methods
    from weakbench.platform import products

    kw = dict(method="m", stage="s", reads={"a": 1}, inputs={}, dataset_fingerprint="f", splits_digest="d")
    assert products.stage_hash(**kw) == products.stage_hash(**kw, code=products.code_digest())
    assert products.stage_hash(**kw, code="other") != products.stage_hash(**kw)
    # the digest reads the package's sources: a copy with one edited file digests differently
    pkg = tmp_path / "weakbench_methods_copy"
    shutil.copytree(Path(methods.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    products.code_digest.cache_clear()
    try:
        monkeypatch.setattr(methods, "__file__", str(pkg / "__init__.py"))
        same = products.code_digest()
        products.code_digest.cache_clear()
        (pkg / "cam.py").write_text((pkg / "cam.py").read_text() + "\n# edited\n")
        assert products.code_digest() != same
    finally:
        products.code_digest.cache_clear()
    monkeypatch.undo()
    assert products.code_digest() == same  # the installed sources again
