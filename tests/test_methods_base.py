"""Method contract helpers: registry errors, map normalisation and the reference's bicubic resize."""

import numpy as np
import pytest
import torch

from weakbench.methods import build_method, list_methods, validate_config
from weakbench.methods.base import normalize_maps, resize_maps
from weakbench.core.errors import ConfigError, UnknownNameError


def test_registry_lists_builtin_methods_and_refuses_unknown():
    assert {"cam", "minmaxcam", "puzzlecam", "topgap"} <= set(list_methods())
    with pytest.raises(UnknownNameError, match="unknown method 'gradcam'; known methods: .*minmaxcam"):
        build_method("gradcam", {}, num_classes=3)


def test_config_errors_name_the_field_and_the_rule():
    # unknown keys: every method, in test_method_contract.py
    with pytest.raises(ConfigError, match=r"my.yaml: invalid hyperparameters for method 'cam': lr: .*greater than 0"):
        validate_config("cam", {"lr": -1}, source="my.yaml")
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet9000'"):
        validate_config("cam", {"backbone": "resnet9000"})


def test_backbone_names_are_validated_without_importing_timm_once_its_list_is_saved(tmp_path):
    """A sweep's driver validates configs without timm (2-3 s of imports): the first validation
    saves timm's model list for its version under ~/.cache/weakbench, later processes read it; a
    name not in the list still asks timm and is refused."""
    import os
    import subprocess
    import sys

    code = ("import sys; from weakbench.methods import validate_config; from weakbench.core.errors import ConfigError\n"
            "validate_config('cam', {'backbone': 'resnet18'}); print('timm' in sys.modules)\n"
            "try: validate_config('cam', {'backbone': 'resnet9000'})\nexcept ConfigError as e: print('refused', 'resnet9000' in str(e))")
    env = {**os.environ, "HOME": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
                     for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert first.stdout.split() == ["True", "refused", "True"]    # no saved list yet: timm asked, list saved
    assert second.stdout.split() == ["False", "refused", "True"]  # resnet18 from the saved list, resnet9000 from timm
    assert list((tmp_path / ".cache" / "weakbench").glob("timm-*-models.txt"))


def test_normalize_maps_min_max_and_constant_maps():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]]])
    out = normalize_maps(maps)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # a constant map carries no localisation


def test_resize_matches_opencv_bicubic_away_from_the_border():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    cam = rng.random((7, 7)).astype(np.float32)
    ours = resize_maps(torch.from_numpy(cam)[None], 56)[0].numpy()
    ref = cv2.resize(cam, (56, 56), interpolation=cv2.INTER_CUBIC)
    inner = (slice(8, -8), slice(8, -8))  # OpenCV reflects the border, torch replicates it
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-5)
