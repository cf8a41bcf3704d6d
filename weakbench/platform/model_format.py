"""A logged or registered model as data: a versioned JSON spec and safetensors weights.

A trial logs its predictor (:class:`~weakbench.methods.classifier.CamPredictor` or
:class:`~weakbench.methods.instance.InstancePredictor`) as the MLflow artifact directory
``model/``::

    model/weakbench_model.json           the spec (below)
    model/weights/<key>.safetensors      the state dict of each network of the predictor

The spec (``format`` ``"weakbench-model"``, ``format_version`` :data:`FORMAT_VERSION`) holds the
method name, its validated hyperparameters (``config``), ``num_classes``, ``multilabel``,
``class_names``, ``input_size`` (pixels), the input normalisation (``mean``/``std``, classifier
predictors) or ``score_threshold`` (instance predictors), and per network key (``"model"`` for a
CAM predictor; ``"detector"``, ``"mask_rcnn"`` for an instance predictor) the plan's fit stage
that built it (``null``: the method's :meth:`~weakbench.methods.classifier.ClassifierMethod.build_model`, e.g.
a trivial baseline's prior). Loading rebuilds the method through the method registry
(:func:`weakbench.methods.build_method`, the config validated again by the method's schema),
builds each network as the engine does (``method.fit_task(stage).build_model()``) and loads its
weights with ``safetensors`` (``strict``): nothing is unpickled and no class named by the
artifact is instantiated.

Models logged before this format (MLflow's pickle flavour of a weakbench class) are refused,
because unpickling runs whatever code the pickle names: the error names the opt-in
``WEAKBENCH_UNSAFE_PICKLE=1`` (:data:`UNSAFE_PICKLE_ENV`), which loads them through MLflow's
pickle loader. Set it only for a store whose every writer you trust.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from weakbench import __version__
from weakbench.core import conventions as C
from weakbench.core.errors import DataError, UnknownNameError

FORMAT = "weakbench-model"
FORMAT_VERSION = 1
SPEC_FILE = "weakbench_model.json"
WEIGHTS_DIR = "weights"
#: the opt-in that loads a pickled model (a model logged by weakbench before the spec format)
UNSAFE_PICKLE_ENV = "WEAKBENCH_UNSAFE_PICKLE"
_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _refuse_pickle(where: str) -> DataError:
    return DataError(f"{where}: a pickled model (logged before weakbench's model format {FORMAT_VERSION}); loading it "
                     f"would run code stored in the model, so it is refused; fix: register a model logged by this "
                     f"weakbench version, or, only if you trust every writer of this store, set "
                     f"{UNSAFE_PICKLE_ENV}=1 (unsafe)")


def predictor_spec(predictor: torch.nn.Module, stage_of: Callable[[torch.nn.Module], str | None],
                   metadata: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.nn.Module]]:
    """The spec of ``predictor`` and its networks by key (``{key: module}``).

    Args:
        predictor: a ``CamPredictor`` or an ``InstancePredictor``.
        stage_of: the fit stage that built a network (``None``: ``method.build_model()``).
        metadata: extra JSON-able facts kept under ``"metadata"`` (dataset, fingerprint ...).

    Raises:
        TypeError: ``predictor`` is neither.
    """
    from weakbench.methods.classifier import CamPredictor
    from weakbench.methods.instance import InstancePredictor

    method = predictor.method
    spec: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "weakbench_version": __version__,
        "method": method.name, "config": method.config.model_dump(mode="json"),
        "num_classes": int(method.num_classes), "multilabel": bool(method.multilabel),
        "class_names": list(predictor.class_names), "input_size": int(predictor.input_size),
    }
    if isinstance(predictor, CamPredictor):
        nets = {"model": predictor.model}
        spec.update(predictor="cam", mean=[float(v) for v in predictor.mean], std=[float(v) for v in predictor.std])
    elif isinstance(predictor, InstancePredictor):
        nets = dict(predictor.models.items())
        spec.update(predictor="instance", score_threshold=float(predictor.score_threshold))
    else:
        raise TypeError(f"cannot describe a {type(predictor).__name__}: not a CamPredictor or InstancePredictor")
    for k in nets:
        if not _KEY.match(k):
            raise ValueError(f"network key {k!r} of the predictor is not a plain identifier")
    spec["networks"] = {k: {"stage": stage_of(m), "weights": f"{WEIGHTS_DIR}/{k}.safetensors"} for k, m in nets.items()}
    spec["metadata"] = dict(metadata or {})
    return spec, nets


def save_predictor(predictor: torch.nn.Module, directory: str | Path, *,
                   stage_of: Callable[[torch.nn.Module], str | None],
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``predictor`` as ``directory/weakbench_model.json`` plus one safetensors file per
    network (shared tensors stored once, ``safetensors.torch.save_model``); returns ``directory``."""
    from safetensors.torch import save_model

    spec, nets = predictor_spec(predictor, stage_of, metadata)
    d = Path(directory)
    (d / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    for k, m in nets.items():
        f = d / spec["networks"][k]["weights"]
        save_model(m, str(f))
        f.chmod(0o644)  # safetensors writes 0600; a shared store's other readers need it
    (d / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    _write_mlmodel(d)
    return d



def log_predictor(tracking_uri: str, run_id: str, predictor, *, metadata: Mapping[str, Any],
                  stage_of=lambda module: None) -> str:
    """Log a predictor (:class:`~weakbench.methods.classifier.CamPredictor`,
    :class:`~weakbench.methods.instance.InstancePredictor`) as the run's model, artifact
    ``model/``, and return its URI ``runs:/<run id>/model`` (also in tag ``weakbench.model_uri``).

    The model is data (:func:`save_predictor`): a versioned JSON spec (method, validated config,
    classes, input size, which fit stage built each network, as told by ``stage_of``) and
    safetensors weights, written into a temporary directory and uploaded through a client of
    ``tracking_uri`` (no global tracking URI is set and no run is re-opened). Loading it never
    unpickles anything.
    """
    from weakbench.platform.tracking import client_for

    client = client_for(tracking_uri)
    with tempfile.TemporaryDirectory() as d:
        path = save_predictor(predictor, Path(d) / C.MODEL_ARTIFACT, stage_of=stage_of, metadata=metadata)
        client.log_artifacts(run_id, str(path), C.MODEL_ARTIFACT)
    uri = f"runs:/{run_id}/{C.MODEL_ARTIFACT}"
    client.set_tag(run_id, C.TAG_MODEL_URI, uri)
    return uri


def _write_mlmodel(d: Path) -> None:
    """An ``MLmodel`` file naming only a ``weakbench`` flavour (no ``python_function``: MLflow's
    generic loaders have nothing to load), so that ``mlflow.register_model`` accepts the directory."""
    from mlflow.models import Model

    Model(flavors={"weakbench": {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": SPEC_FILE,
                                 "weakbench_version": __version__}}).save(str(d / "MLmodel"))


def read_spec(directory: str | Path, where: str | None = None) -> dict[str, Any]:
    """The validated spec of a model directory.

    Raises:
        DataError: a pickled (legacy) model, no spec, an unknown format or version, or a
            malformed spec (names ``where`` and the fix).
    """
    d = Path(directory)
    where = where or str(d)
    f = d / SPEC_FILE
    if not f.is_file():
        if (d / "MLmodel").is_file() or (d / "data").is_dir():
            raise _refuse_pickle(where)
        raise DataError(f"{where}: no {SPEC_FILE}: not a weakbench model; fix: give the URI of a model logged by weakbench")
    try:
        spec = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: {SPEC_FILE} is not valid JSON ({e}); fix: re-log the model") from None
    return check_spec(spec, where)


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """``spec`` if it is a weakbench model spec this version reads (format, version, fields, types).

    Raises:
        DataError: naming ``where``, the field and the fix.
    """
    def bad(field: str, why: str) -> DataError:
        return DataError(f"{where}: {SPEC_FILE} field {field!r} {why}; fix: re-log the model with this weakbench version")

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise bad("format", f"is not {FORMAT!r}")
    if spec.get("format_version") != FORMAT_VERSION:
        raise bad("format_version", f"is {spec.get('format_version')!r}, this weakbench reads {FORMAT_VERSION}")
    types = {"method": str, "config": dict, "num_classes": int, "multilabel": bool, "class_names": list,
             "input_size": int, "predictor": str, "networks": dict}
    for k, t in types.items():
        if not isinstance(spec.get(k), t):
            raise bad(k, f"is missing or not a {t.__name__}")
    if spec["predictor"] not in ("cam", "instance"):
        raise bad("predictor", "is neither 'cam' nor 'instance'")
    for k, net in spec["networks"].items():
        if not _KEY.match(k) or not isinstance(net, dict) or net.get("weights") != f"{WEIGHTS_DIR}/{k}.safetensors":
            raise bad(f"networks.{k}", "is malformed")
        if net.get("stage") is not None and not isinstance(net["stage"], str):
            raise bad(f"networks.{k}.stage", "is not a stage name")
    if spec["predictor"] == "cam" and (set(spec["networks"]) != {"model"} or len(spec.get("mean") or []) != 3
                                       or len(spec.get("std") or []) != 3):
        raise bad("networks/mean/std", "do not describe a CAM predictor")
    return spec


def load_predictor_dir(directory: str | Path, where: str | None = None) -> torch.nn.Module:
    """Rebuild the predictor stored in ``directory`` (on CPU, eval mode) without unpickling.

    Raises:
        DataError: as :func:`read_spec`; a missing weights file; weights that do not fit the
            rebuilt networks.
        UnknownNameError / ConfigError: the spec names an unknown method or a config its schema refuses.
    """
    from safetensors.torch import load_model

    from weakbench.methods import build_method
    from weakbench.methods.base import stored_config
    from weakbench.methods.classifier import CamPredictor
    from weakbench.methods.instance import InstancePredictor

    d = Path(directory)
    where = where or str(d)
    spec = read_spec(d, where)
    config = stored_config(spec["method"], spec["config"], where)
    method = build_method(spec["method"], config, num_classes=spec["num_classes"], multilabel=spec["multilabel"])
    stages = {s.name: s for s in method.plan()}
    nets: dict[str, torch.nn.Module] = {}
    for k, net in spec["networks"].items():
        stage = net.get("stage")
        if stage is not None and (stage not in stages or stages[stage].kind != "fit"):
            raise DataError(f"{where}: network {k!r} names stage {stage!r}, not a fit stage of method {spec['method']!r}; "
                            f"fix: re-log the model with this weakbench version")
        module = method.fit_task(stages[stage]).build_model() if stage is not None else method.build_model()
        f = d / net["weights"]
        if not f.is_file():
            raise DataError(f"{where}: weights file {net['weights']} is missing; fix: re-log the model")
        try:
            load_model(module, str(f), strict=True, device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise DataError(f"{where}: weights {net['weights']} do not fit network {k!r} of method {spec['method']!r} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); fix: re-log the model") from None
        nets[k] = module.eval()
    if spec["predictor"] == "cam":
        p: torch.nn.Module = CamPredictor(method, nets["model"], spec["class_names"], spec["input_size"],
                                          tuple(spec["mean"]), tuple(spec["std"]))
    else:
        p = InstancePredictor(method, nets, spec["class_names"], spec["input_size"],
                              score_threshold=float(spec.get("score_threshold", 0.5)))
    return p.eval()


# ---------------------------------------------------------------------- MLflow URIs
def _repo(model_uri: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(model_uri)


def fetch_spec(model_uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download only ``weakbench_model.json`` of ``model_uri`` (``models:/…``, ``runs:/…``) and
    validate it (a pickled model is refused here, its files never read).

    Raises:
        UnknownNameError: the URI does not resolve.
        DataError: as :func:`read_spec`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        names = _list(model_uri, tracking_uri)
        if SPEC_FILE not in names:
            return read_spec(tmp, model_uri) if not names else _classify_without_spec(names, model_uri)
        _download(model_uri, tracking_uri, tmp, SPEC_FILE)
        return read_spec(tmp, model_uri)


def _classify_without_spec(names: list[str], where: str) -> dict[str, Any]:
    if "MLmodel" in names or "data" in names:
        raise _refuse_pickle(where)
    raise DataError(f"{where}: no {SPEC_FILE}: not a weakbench model; fix: give the URI of a model logged by weakbench")


def _list(model_uri: str, tracking_uri: str | None) -> list[str]:
    from weakbench.platform.tracking import using_tracking_uri

    try:
        with using_tracking_uri(tracking_uri):
            return [Path(f.path).name for f in _repo(model_uri).list_artifacts("")]
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a URI that does not resolve
        import mlflow

        first = str(e).splitlines()[0] if str(e) else ""
        raise UnknownNameError(f"cannot load model {model_uri!r} from {tracking_uri or mlflow.get_tracking_uri()}: "
                               f"{type(e).__name__}: {first[:300]}; list registered models with `weakbench registry list`") from None


def _download(model_uri: str, tracking_uri: str | None, dst: str, path: str | None = None) -> Path:
    from weakbench.platform.tracking import using_tracking_uri

    with using_tracking_uri(tracking_uri):
        repo = _repo(model_uri)
        return Path(repo.download_artifacts(path or "", dst_path=dst))


def load_predictor_uri(model_uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """Load ``model_uri``'s predictor as data (:func:`load_predictor_dir`); a pickled model only
    with ``WEAKBENCH_UNSAFE_PICKLE=1`` (:func:`_load_pickled`), else refused before any of its
    files is read."""
    names = _list(model_uri, tracking_uri)
    if SPEC_FILE not in names:
        if ("MLmodel" in names or "data" in names) and os.environ.get(UNSAFE_PICKLE_ENV) == "1":
            return _load_pickled(model_uri, tracking_uri)
        _classify_without_spec(names, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        _download(model_uri, tracking_uri, tmp)
        return load_predictor_dir(tmp, model_uri)


def _load_pickled(model_uri: str, tracking_uri: str | None) -> torch.nn.Module:
    """UNSAFE (runs code in the pickle): MLflow's pickle loader, for models logged before the
    spec format, reached only through the ``WEAKBENCH_UNSAFE_PICKLE=1`` opt-in."""
    import sys

    import mlflow.pytorch

    from weakbench.methods.classifier import CamPredictor
    from weakbench.methods.instance import InstancePredictor
    from weakbench.platform.tracking import using_tracking_uri

    print(f"weakbench: {UNSAFE_PICKLE_ENV}=1: unpickling {model_uri} (runs code stored in the model)", file=sys.stderr)
    with using_tracking_uri(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location=torch.device("cpu"))
    if not isinstance(model, (CamPredictor, InstancePredictor)):
        raise DataError(f"{model_uri}: holds a {type(model).__name__}, not a CamPredictor or InstancePredictor; "
                        f"fix: register a model logged by weakbench")
    return model.eval()
