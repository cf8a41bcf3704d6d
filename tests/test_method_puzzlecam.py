"""Puzzle-CAM: puzzle module, L_re and the α ramp on hand-computed tensors, tile grids refused below
2×2 tile CAMs, pseudo masks and mIoU (only on images with real masks, also through the evaluator),
multi-scale inference CAMs, training smoke."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from weakbench.methods import build_method
from weakbench.methods.base import StepContext
from weakbench.methods.puzzlecam import (
    alpha_at, merge_tiles, miou_from_confusion, pseudo_semantic_masks, reconstruction_loss,
    semantic_confusion, semantic_targets, tile_images,
)
from weakbench.core.errors import ConfigError

#: 64 px at stride 16: the 2×2 tiles' CAMs are 2×2, the smallest grid the config accepts
SMALL = {"backbone": "resnet10t", "input_size": 64, "output_stride": 16, "batch_size": 4, "lr": 0.05,
         "inference_scales": (0.5, 1.0, 2.0)}


def _ctx(step: int = 0, total: int = 4) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=total, total_steps=total, device=torch.device("cpu"),
                       unwrap=lambda m: m)


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    return {"image": torch.randn(4, 3, 64, 64, generator=g), "labels": labels, "index": torch.arange(4)}


def test_tiling_layout_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = tile_images(x, 2)
    assert t.shape == (4, 1, 2, 2)
    assert t[0, 0].tolist() == [[0, 1], [4, 5]]      # tile (0, 0)
    assert t[1, 0].tolist() == [[2, 3], [6, 7]]      # tile (0, 1)
    assert t[2, 0].tolist() == [[8, 9], [12, 13]]    # tile (1, 0)
    assert t[3, 0].tolist() == [[10, 11], [14, 15]]  # tile (1, 1)


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_tiling_then_merging_is_identity(grid):
    x = torch.randn(3, 5, 12, 24)
    assert torch.equal(merge_tiles(tile_images(x, grid), grid), x)


def test_tiling_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by grid 3"):
        tile_images(torch.zeros(1, 3, 8, 8), 3)


def test_reconstruction_loss_hand_computed():
    a_s = torch.zeros(1, 2, 1, 2)
    a_re = torch.tensor([[[[1.0, -1.0]], [[5.0, 5.0]]]])
    # class 0 present: |0-1| + |0+1| = 2; class 1 absent (masked); mean over 1·2·1·2 = 4 entries
    assert reconstruction_loss(a_s, a_re, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    assert reconstruction_loss(a_s, a_re, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(12 / 4)
    assert reconstruction_loss(a_re, a_re, torch.tensor([[1.0, 1.0]])).item() == 0.0


def test_alpha_ramp():
    assert alpha_at(0.0, 4.0, 0.5) == 0.0
    assert alpha_at(0.25, 4.0, 0.5) == pytest.approx(2.0)
    assert alpha_at(0.5, 4.0, 0.5) == pytest.approx(4.0)
    assert alpha_at(0.9, 4.0, 0.5) == pytest.approx(4.0)
    assert alpha_at(0.0, 4.0, 0.0) == pytest.approx(4.0)


def test_pseudo_masks_and_miou_by_hand():
    cams = torch.tensor([[[[0.9, 0.1]], [[0.5, 0.8]]]])  # (1, 2 classes, 1, 2)
    labels = torch.tensor([[1.0, 0.0]])                  # class 1 absent: never predicted
    assert pseudo_semantic_masks(cams, labels, 0.3).tolist() == [[[1, 0]]]
    assert pseudo_semantic_masks(cams, torch.ones(1, 2), 0.3).tolist() == [[[1, 2]]]
    masks = torch.zeros(1, 2, 1, 3, dtype=torch.bool)
    masks[0, 0, 0, :2] = True
    masks[0, 1, 0, 1:] = True  # pixel 1 claimed by two classes → ignored
    assert semantic_targets(masks).tolist() == [[[1, -1, 2]]]
    conf = semantic_confusion(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, -1]), 2)
    assert conf.tolist() == [[1, 1], [0, 1]]
    # IoU(bg) = 1 / (1 + 1) = 0.5, IoU(1) = 1 / 2 = 0.5
    assert miou_from_confusion(conf) == pytest.approx(50.0)
    assert miou_from_confusion(torch.tensor([[2, 1], [0, 1]])) == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_config_validation():
    with pytest.raises(ConfigError, match="num_tiles.*square"):
        build_method("puzzlecam", {"num_tiles": 8}, num_classes=2)
    with pytest.raises(ConfigError, match="input_size.*divisible"):
        build_method("puzzlecam", {"num_tiles": 9, "input_size": 128}, num_classes=2)
    cfg = build_method("puzzlecam", {}, num_classes=2).config
    assert (cfg.alpha, cfg.num_tiles, cfg.alpha_ramp_fraction, cfg.inference_scales) == (4.0, 4, 0.5, (0.5, 1.0, 1.5, 2.0))


@pytest.mark.parametrize("params, tile_cam, fixes", [
    ({"num_tiles": 16, "input_size": 128}, "1×1", ["input_size >= 256", "output_stride 16", "num_tiles 4 (2×2)"]),
    ({"num_tiles": 4, "input_size": 96}, "1.5×1.5", ["input_size >= 128", "output_stride 16"]),
    ({"num_tiles": 9, "input_size": 96, "output_stride": 16}, "2×2", None),  # exactly 2×2: accepted
    ({"num_tiles": 16, "input_size": 128, "output_stride": 16}, "2×2", None),
    ({"num_tiles": 64, "input_size": 64, "output_stride": 8}, "1×1", ["input_size >= 128", "num_tiles 16 (4×4)"]),
], ids=["4x4-tiles-128px-s32", "2x2-tiles-96px-s32", "3x3-tiles-96px-s16-ok", "4x4-tiles-128px-s16-ok", "8x8-tiles-64px-s8"])
def test_config_refuses_tile_cams_below_2x2(params, tile_cam, fixes):
    """input_size / output_stride / √num_tiles < 2 is refused, naming the fields and the fixes."""
    if fixes is None:
        assert build_method("puzzlecam", params, num_classes=2).config.grid ** 2 == params["num_tiles"]
        return
    with pytest.raises(ConfigError) as exc:
        build_method("puzzlecam", params, num_classes=2)
    msg = str(exc.value)
    stride = params.get("output_stride", 32)
    for fragment in (f"num_tiles={params['num_tiles']}", f"input_size={params['input_size']}", f"output_stride={stride}",
                     f"tile CAMs of {tile_cam}", "smaller than 2×2", *fixes):
        assert fragment in msg, (fragment, msg)


def test_training_steps_smoke_and_inference_cams():
    m = build_method("puzzlecam", SMALL, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    opts = m.configure_optimizers(net)
    before = copy.deepcopy(net.state_dict())
    outs = [m.training_step(net, _batch(i), opts, _ctx(step=2 * i, total=4)) for i in range(2)]
    for out in outs:
        assert all(math.isfinite(v) for v in out.values())
        assert out["loss"] == pytest.approx(out["cls"] + out["p_cls"] + out["alpha"] * out["re"], rel=1e-5)
    assert [o["alpha"] for o in outs] == [0.0, 4.0]  # progress 0 and 0.5 of a ramp over half the training
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and k.endswith("weight"))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])

    net.eval()
    images = _batch()["image"]
    # default: the board's maps are the single-scale raw CAM, as for every method
    single, lg1 = m.cams_and_scores(net, images)
    ref_logits, ref_cams = net(images)
    assert torch.equal(single, ref_cams) and torch.equal(lg1, ref_logits) and single.shape == (4, 3, 4, 4)
    cams, logits = m.multi_scale_cams(net, images)
    tta = build_method("puzzlecam", {**SMALL, "inference": "multi_scale"}, num_classes=3)
    assert torch.equal(tta.cams_and_scores(net, images)[0], cams)  # the named setting: the paper's TTA maps
    assert cams.shape == (4, 3, 8, 8)  # the largest scale (2×64 px at stride 16)
    assert logits.shape == (4, 3)
    assert torch.allclose(logits, m.class_scores(net, images), atol=1e-5)
    assert cams.min() >= 0 and cams.max() <= 1
    peak = cams.flatten(2).amax(-1)
    assert torch.all((peak == 0) | ((peak > 0.99) & (peak <= 1)))  # max-normalised per (image, class)


def _masked_batch(seed: int = 0, has_masks: tuple[bool, ...] = (True,) * 4) -> dict:
    """_batch with a centred square mask per present class, except where ``has_masks`` is False:
    there the all-empty placeholder masks of box-only data."""
    batch = _batch(seed)
    real = torch.tensor(has_masks)
    masks = torch.zeros(4, 3, 64, 64, dtype=torch.bool)
    masks[:, :, 16:48, 16:48] = (batch["labels"].bool() & real[:, None])[:, :, None, None]
    batch.update(masks=masks, ignore=torch.zeros(4, 64, 64, dtype=torch.bool), has_masks=real)
    return batch


def test_extra_metrics_pseudo_mask_miou():
    m = build_method("puzzlecam", {**SMALL, "inference_scales": (1.0,), "inference_flip": False}, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model()
    out = m.extra_metrics(net, [_masked_batch()], torch.device("cpu"))
    assert set(out) == {"pseudo_mask_miou", "pseudo_mask_bg_threshold", "pseudo_mask_miou_at_config"}
    assert 0 <= out["pseudo_mask_miou_at_config"] <= out["pseudo_mask_miou"] <= 100
    assert net.training  # mode restored
    assert m.extra_metrics(net, [_batch()], torch.device("cpu")) == {}  # no masks at all


def test_extra_metrics_skip_images_without_real_masks():
    """Box-only images carry all-empty placeholder masks (has_masks False): they never count."""
    m = build_method("puzzlecam", {**SMALL, "inference_scales": (1.0,), "inference_flip": False}, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model()
    cpu = torch.device("cpu")
    assert m.extra_metrics(net, [_masked_batch(has_masks=(False,) * 4)], cpu) == {}
    mixed = _masked_batch(has_masks=(True, True, False, False))
    only_real = {k: v[:2] for k, v in mixed.items()}
    assert m.extra_metrics(net, [mixed], cpu) == m.extra_metrics(net, [only_real], cpu) != {}
    # masks whose reality is not stated are not trusted
    assert m.extra_metrics(net, [{k: v for k, v in mixed.items() if k != "has_masks"}], cpu) == {}


def _box_only_wsol(root):
    """A box-only wsolevaluation metadata set (no masks) of 4 images 64×64 in 2 classes."""
    from PIL import Image

    meta = root / "test"
    meta.mkdir(parents=True)
    ids = [f"img/{i}.png" for i in range(4)]
    for i, name in enumerate(ids):
        (root / "img").mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (40 * i, 100, 200 - 40 * i)).save(root / name)
    (meta / "image_ids.txt").write_text("".join(f"{n}\n" for n in ids))
    (meta / "class_labels.txt").write_text("".join(f"{n},{i % 2}\n" for i, n in enumerate(ids)))
    (meta / "image_sizes.txt").write_text("".join(f"{n},64,64\n" for n in ids))
    (meta / "localization.txt").write_text("".join(f"{n},8,8,40,40\n" for n in ids))
    return meta


def test_evaluator_reports_pseudo_mask_miou_only_on_data_with_masks(tmp_path, synthetic_dir):
    from weakbench.core.data import open_dataset
    from weakbench.methods.evaluate import evaluate_split

    for data, expect in ((_box_only_wsol(tmp_path / "boxes"), False), (synthetic_dir, True)):
        source = open_dataset(data)
        assert source.has_masks is expect
        m = build_method("puzzlecam", {**SMALL, "inference_scales": (1.0,), "inference_flip": False},
                         num_classes=source.num_classes, multilabel=source.multilabel)
        torch.manual_seed(0)
        metrics, _, _ = evaluate_split(m, m.build_model(), source, list(range(4)), input_size=64,
                                       device=torch.device("cpu"), batch_size=4, extra_batches=1)
        assert "max_box_acc_v2" in metrics
        assert ("pseudo_mask_miou" in metrics) is expect, (data, metrics)
