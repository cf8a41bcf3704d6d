"""Nothing loaded from a store runs code: a model is a JSON spec plus safetensors weights.

A malicious model (a pickle whose loading writes a marker file) is put in a store as weakbench
logged models before the spec format (MLflow's pickle flavour), as a trial's model and as a
registered version; ``register``, ``predict``, ``evaluate`` and ``registry list`` must refuse it
without unpickling it (the marker never appears), for a local SQLite store and for an MLflow
server on 127.0.0.1. A model logged by the earlier weakbench (a genuine pickle) is refused with
one line naming the opt-in, and loads with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
import torch

from servers import mlflow_server
from weakbench.methods import build_method
from weakbench.methods.classifier import CamPredictor
from weakbench.core import conventions as C
from weakbench.platform import registry, tracking
from weakbench.core.errors import DataError
from weakbench.platform.model_format import SPEC_FILE, UNSAFE_PICKLE_ENV, load_predictor_dir, save_predictor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CFG = {"backbone": "resnet10t", "input_size": 64}


def _predictor(seed: int = 0) -> CamPredictor:
    m = build_method("cam", {**CFG, "seed": seed}, num_classes=3)
    torch.manual_seed(seed)
    return CamPredictor(m, m.build_model().eval(), ["a", "b", "c"], 64, MEAN, STD)


class _Payload:
    """Unpickling this runs ``exec`` of a line that writes the marker file (names only builtins,
    so it runs in any process that unpickles it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _pickled_model_dir(d: Path, marker: Path | None) -> Path:
    """What weakbench logged before the spec format (MLflow's pickle flavour of a CamPredictor);
    with ``marker``, its pickle replaced by the payload."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(_predictor(), str(d), serialization_format="pickle", pip_requirements=["torch"])
    if marker is not None:
        pth = d / "data" / "model.pth"
        assert pth.is_file()
        torch.save(_Payload(marker), pth)
    return d


def _store_with(uri: str, model_dir: Path, tmp_path: Path) -> str:
    """A FINISHED trial run of method cam whose logged model is ``model_dir``, also registered as
    ``weakbench-cam-evil@champion`` (as anyone with write access to the store could)."""
    client = tracking.client_for(uri)
    exp_id = tracking.ensure_experiment(client, C.DEFAULT_EXPERIMENT, artifact_root=tracking.default_artifact_root(uri))
    parent = client.create_run(exp_id, tags={C.TAG_KIND: C.KIND_SWEEP}).info.run_id
    run = client.create_run(exp_id, tags={C.TAG_KIND: C.KIND_TRIAL, "mlflow.parentRunId": parent, C.TAG_METHOD: "cam",
                                          C.TAG_DATASET: "toy", C.TAG_SEED: "0", C.TAG_CONFIG_HASH: "h"})
    rid = run.info.run_id
    client.log_param(rid, "lr", "0.1")
    client.log_metric(rid, "val/max_box_acc_v2", 60.0)
    client.log_artifacts(rid, str(model_dir), C.MODEL_ARTIFACT)
    client.set_tag(rid, C.TAG_MODEL_URI, f"runs:/{rid}/{C.MODEL_ARTIFACT}")
    client.set_terminated(rid)
    client.set_terminated(parent)
    with tracking.using_tracking_uri(uri):
        mv = mlflow.register_model(f"runs:/{rid}/{C.MODEL_ARTIFACT}", "weakbench-cam-evil")
    client.set_registered_model_alias("weakbench-cam-evil", "champion", mv.version)
    return rid


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from weakbench import cli

    monkeypatch.setattr(sys, "argv", ["weakbench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def _refusals(uri: str, tmp_path: Path, marker: Path, monkeypatch, capsys) -> None:
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    model = "models:/weakbench-cam-evil@champion"
    monkeypatch.delenv(UNSAFE_PICKLE_ENV, raising=False)
    runs = tmp_path / "runs"
    capsys.readouterr()  # the set-up's own output
    for args in (["register", "--method", "cam"],
                 ["predict", "--model", model, str(img), "--out", str(tmp_path / "pred")],
                 ["evaluate", "--model", model, "--no-log", "--max-images", "2"]):
        code, out, err = _cli(monkeypatch, capsys, *args, "--tracking-uri", uri, "--output-dir", str(runs))
        assert code == 2, (args, out, err)
        assert "pickled model" in err and f"{UNSAFE_PICKLE_ENV}=1" in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not marker.exists(), f"{args[0]} ran the model's code"
    monkeypatch.setenv("COLUMNS", "250")  # the table at full width
    code, out, err = _cli(monkeypatch, capsys, "registry", "list", "--tracking-uri", uri)
    assert code == 0, out + err
    assert "refused: pickled model" in " ".join(out.split()) and UNSAFE_PICKLE_ENV in err
    assert not marker.exists(), "registry list ran the model's code"
    assert not (tmp_path / "pred").exists()


def test_malicious_model_refused_sqlite(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _store_with(uri, _pickled_model_dir(tmp_path / "evil", marker), tmp_path)
    _refusals(uri, tmp_path, marker, monkeypatch, capsys)


@pytest.fixture
def sqlite_mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts."""
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path, workers=1, log_name="server.log", timeout_s=180) as url:
        yield url


@pytest.mark.slow
def test_malicious_model_refused_server(tmp_path, monkeypatch, capsys, sqlite_mlflow_server):
    marker = tmp_path / "marker"
    _store_with(sqlite_mlflow_server, _pickled_model_dir(tmp_path / "evil", marker), tmp_path)
    _refusals(sqlite_mlflow_server, tmp_path, marker, monkeypatch, capsys)


def test_pickled_model_needs_the_opt_in(tmp_path, monkeypatch):
    """A genuine model of the earlier format: refused with the opt-in named; loads with it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _store_with(uri, _pickled_model_dir(tmp_path / "old", None), tmp_path)
    monkeypatch.delenv(UNSAFE_PICKLE_ENV, raising=False)
    with pytest.raises(DataError, match=f"pickled model.*{UNSAFE_PICKLE_ENV}=1"):
        registry.load_predictor("models:/weakbench-cam-evil@champion", uri)
    monkeypatch.setenv(UNSAFE_PICKLE_ENV, "1")
    p = registry.load_predictor("models:/weakbench-cam-evil@champion", uri)
    assert isinstance(p, CamPredictor) and p.class_names == ["a", "b", "c"]


def test_spec_round_trip_and_no_pickle(tmp_path):
    """The spec format reproduces the predictor's outputs exactly and holds no pickle."""
    p = _predictor(seed=3)
    d = save_predictor(p, tmp_path / "m", stage_of=lambda module: "train", metadata={"dataset": "toy"})
    files = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file())
    assert files == ["MLmodel", SPEC_FILE, "weights/model.safetensors"]
    q = load_predictor_dir(d)
    x = torch.randn(2, 3, 64, 64)
    (l1, c1), (l2, c2) = p(x), q(x)
    assert torch.equal(l1, l2) and torch.equal(c1, c2)
    assert q.class_names == p.class_names and q.mean == p.mean and q.config == p.config
    # a tampered spec is refused with the field named
    import json

    spec = json.loads((d / SPEC_FILE).read_text())
    (d / SPEC_FILE).write_text(json.dumps({**spec, "format_version": 99}))
    with pytest.raises(DataError, match="format_version"):
        load_predictor_dir(d)


def test_trial_checkpoints_are_read_weights_only(tmp_path):
    """The engine reads trial checkpoints with ``weights_only=True``: a pickled object in one is
    refused (the file is skipped as unreadable), its code never runs."""
    from weakbench.platform.checkpoints import CHECKPOINT_FILE, latest_local_checkpoint as _latest_local_checkpoint

    marker = tmp_path / "marker"
    d = tmp_path / "trial" / "wb-ckpt-x"
    d.mkdir(parents=True)
    torch.save({"stage": "train", "cursor": 0, "epoch": 1, "evil": _Payload(marker)}, d / CHECKPOINT_FILE)
    assert _latest_local_checkpoint(tmp_path / "trial") is None
    assert not marker.exists()
    torch.save({"stage": "train", "cursor": 0, "epoch": 1, "model": {"w": torch.ones(2)}, "history": [{"a": 1.0}]},
               d / CHECKPOINT_FILE)
    assert _latest_local_checkpoint(tmp_path / "trial")["epoch"] == 1


def test_product_chunks_and_tables_are_read_as_data(tmp_path):
    """Stage products (map chunks, BBAM/CCGR tables, a stage's ``model.pt``) are read as data
    (:func:`weakbench.methods.pipeline.load_data`): what the methods write (tensors, numpy arrays
    and scalars, RLE dicts) round-trips, and a crafted pickle in a product is refused with one line
    naming the file while its code never runs."""
    import numpy as np

    from weakbench.methods import bbam, ccgr
    from weakbench.methods.pipeline import load_data
    from weakbench.platform.products import Product

    marker = tmp_path / "marker"
    p = Product(tmp_path / "products", "attribute", "0" * 16)
    results = {"i:0": {"masks": [torch.ones(2, 2, dtype=torch.float16)], "strides": [8], "orig_size": (5, 7)},
               "i:1": {"peaks": np.arange(6, dtype=np.int64).reshape(3, 2), "peak_scores": np.asarray([0.5], np.float32),
                       "score": np.float32(0.25), "mask": np.zeros((2, 3), np.uint8), "flag": np.bool_(True),
                       "rle": {"size": [2, 3], "counts": "06"}, "label": None, "raw": b"\x00\x01", "empty": b"",
                       "ids": {1, 2}}}
    p.save_chunk(results)
    back = p.load_chunks()
    assert back.keys() == results.keys()
    assert torch.equal(back["i:0"]["masks"][0], results["i:0"]["masks"][0])
    assert np.array_equal(back["i:1"]["peaks"], results["i:1"]["peaks"]) and back["i:1"]["score"] == np.float32(0.25)
    assert back["i:1"]["rle"] == results["i:1"]["rle"] and back["i:1"]["raw"] == b"\x00\x01"
    assert back["i:1"]["empty"] == b"" and back["i:1"]["ids"] == {1, 2}  # CCGR's refine-stage chunks hold an empty bytes

    p.save_chunk({"i:2": {"evil": _Payload(marker)}})  # a crafted chunk beside the good one
    with pytest.raises(DataError, match=r"\.pt: refused to load.*fix: delete it"):
        p.load_chunks()
    table = tmp_path / "pseudo_masks.pt"
    torch.save({"i:0": _Payload(marker)}, table)
    for read in (bbam._load_table, ccgr._table, load_data):
        with pytest.raises(DataError, match="refused to load"):
            read(table)
    model_dir = tmp_path / "classifier"
    model_dir.mkdir()
    torch.save({"w": torch.ones(1), "evil": _Payload(marker)}, model_dir / "model.pt")
    with pytest.raises(DataError, match="model.pt: refused to load"):
        ccgr._init_backbone_from(torch.nn.Linear(1, 1), model_dir)
    assert not marker.exists()
