"""Backbones from timm, one factory for every method.

``create_backbone(name, ...)`` returns a timm ``features_only`` model; ``out_indices`` selects
which stages are returned (default: the last). ``output_stride`` 8 or 16 dilates the last
stages, giving the larger CAMs used by the papers (supported by ResNet-family timm models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch

from weakbench.platform.errors import ConfigError, UnknownNameError


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights_path: str | None = None,
    output_stride: int = 32,
    out_indices: Sequence[int] | None = None,
) -> torch.nn.Module:
    """Create a timm ``features_only`` backbone.

    Args:
        name: a timm model name, e.g. ``"resnet18"``, ``"resnet50"``, ``"efficientnet_b0"``.
        pretrained: ask timm for pretrained weights (needs network access to a hub).
        weights_path: a local state dict (``.pth``/``.pt``/``.safetensors``) loaded with
            ``strict=False`` after creation; keys that do not match are reported in the error
            if *none* match.
        output_stride: 8, 16 or 32.
        out_indices: feature stages to return (timm semantics); default the last stage only.

    Returns:
        A module whose ``forward(x)`` returns a list of float32 feature maps (B, C_i, H/r_i,
        W/r_i) and whose ``feature_info.channels()`` gives ``C_i``.

    Raises:
        UnknownNameError: ``name`` is not a timm model.
        ConfigError: ``weights_path`` missing or unreadable, or ``output_stride`` unsupported.
    """
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UnknownNameError(f"unknown backbone {name!r} (not a timm model); similar: {', '.join(close) or 'none'}")
    kwargs: dict = {"features_only": True, "pretrained": pretrained}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"backbone {name!r} cannot be built with output_stride={output_stride}: {e}") from None
    if out_indices is None:
        # keep only the last stage
        n = len(model.feature_info)
        model = timm.create_model(name, out_indices=(n - 1,), **kwargs)
    if weights_path:
        _load_weights(model, Path(weights_path))
    return model


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
