"""MinMaxCAM: CRR/FRR on hand-computed tensors, the set sampler, Stage II freezing, training smoke
(also through a one-process DDP wrapper, as the engine runs it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from weakbench.methods import build_method
from weakbench.methods.base import StepContext
from weakbench.methods.minmaxcam import ClassSetBatchSampler, crr_loss, frr_loss, shared_set_classes
from weakbench.platform.errors import ConfigError, DataError

SMALL = {"backbone": "resnet10t", "input_size": 64, "batch_size": 6, "set_size": 3, "lr": 0.05}


def _ctx() -> StepContext:
    return StepContext(epoch=0, step=0, steps_per_epoch=2, total_steps=2, device=torch.device("cpu"),
                       unwrap=lambda m: getattr(m, "module", m))


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 0]] * 3 + [[0, 1, 1]] * 3, dtype=torch.float32)
    return {"image": torch.randn(6, 3, 64, 64, generator=g), "labels": labels, "index": torch.arange(6)}


# ---------------------------------------------------------------------- losses
def test_crr_identical_features_is_zero():
    f = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)[None]  # one set of S=4 identical features
    assert crr_loss(f).item() == 0.0
    assert crr_loss(f, "sum").item() == 0.0


def test_crr_hand_computed():
    # S=2, D=2: ‖f0 − f1‖² = 1 + 1 = 2 for each ordered pair → 2·2 / (2·1) = 2 (sum), /D = 1 (mean)
    f = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert crr_loss(f, "sum").item() == pytest.approx(2.0)
    assert crr_loss(f, "mean").item() == pytest.approx(1.0)
    # S=3, D=1, values 0, 1, 3: pairs 1, 9, 4 (each twice) → 28 / 6
    f3 = torch.tensor([[[0.0], [1.0], [3.0]]])
    assert crr_loss(f3).item() == pytest.approx(28 / 6)
    # two sets averaged; weight 0 drops the second
    both = torch.cat([f, torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])])  # second set: 9 (mean)
    assert crr_loss(both).item() == pytest.approx((1 + 9) / 2)
    assert crr_loss(both, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)


def test_frr_hand_computed_and_f_orig_gets_no_gradient():
    f = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], requires_grad=True)
    f_orig = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    # image 0: 1 + 4 = 5, image 1: 4 → mean over S: 4.5 (sum), 2.25 (mean over D)
    assert frr_loss(f, f_orig, "sum").item() == pytest.approx(4.5)
    loss = frr_loss(f, f_orig, "mean")
    assert loss.item() == pytest.approx(2.25)
    loss.backward()
    assert f_orig.grad is None
    assert torch.allclose(f.grad, torch.tensor([[[0.5, 1.0], [0.0, -1.0]]]))  # d/df mean_{S,D}(f-f°)² = (f-f°)/2


def test_shared_set_classes_lowest_shared_index():
    labels = torch.tensor([
        [0, 1, 1, 0], [0, 1, 1, 1],  # set 0 shares 1 and 2 → 1
        [1, 0, 0, 0], [0, 0, 0, 1],  # set 1 shares nothing
        [0, 0, 0, 1], [1, 0, 0, 1],  # set 2 shares 3
        [1, 0, 0, 0],                # trailing image, no full set
    ], dtype=torch.float32)
    classes, valid = shared_set_classes(labels, 2)
    assert classes.tolist() == [1, 0, 3]
    assert valid.tolist() == [True, False, True]


def test_config_batch_must_be_sets():
    with pytest.raises(ConfigError, match=r"batch_size \(16\).*set_size \(5\).*15 or 20"):
        build_method("minmaxcam", {"batch_size": 16}, num_classes=3)
    cfg = build_method("minmaxcam", {}, num_classes=3).config
    assert (cfg.batch_size, cfg.set_size, cfg.num_sets, cfg.crr_weight, cfg.frr_weight) == (60, 5, 12, 1.0, 10.0)


# ---------------------------------------------------------------------- sampler
def _labels() -> torch.Tensor:
    lab = torch.zeros(23, 4)
    lab[:10, 0] = 1
    lab[8:18, 1] = 1      # images 8, 9 carry classes 0 and 1
    lab[18:20, 2] = 1     # class 2 has 2 images < S = 3: sampled with replacement
    lab[20, 3] = 1        # class 3 has a single image
    return lab            # images 21, 22 have no label


def test_sampler_sets_share_a_class_and_are_deterministic():
    lab = _labels()
    s = ClassSetBatchSampler(lab, set_size=3, num_sets=2, seed=7)
    batches = list(s)
    assert len(batches) == len(s) == math.ceil(math.ceil(21 / 3) / 2)
    seen = set()
    for b in batches:
        assert len(b) == 6
        for k in range(0, 6, 3):
            members = lab[b[k:k + 3]]
            assert (members.prod(0) > 0).any(), f"set {b[k:k + 3]} shares no class"
        seen.update(b)
    assert not seen & {21, 22}
    assert batches != list(s)  # the next epoch is reshuffled
    s2 = ClassSetBatchSampler(lab, set_size=3, num_sets=2, seed=7)
    assert list(s2) == batches
    s2.set_epoch(0)
    assert list(s2) == batches


def test_sampler_small_class_with_replacement():
    lab = torch.zeros(5, 2)
    lab[0, 0] = 1
    lab[1:, 1] = 1
    s = ClassSetBatchSampler(lab, set_size=3, num_sets=1, seed=0)
    sets = s.epoch_sets(0)
    assert (0, [0, 0, 0]) in sets  # the only image of class 0, three times


def test_sampler_shards_ranks_equally_and_disjointly():
    lab = _labels()
    r0 = list(ClassSetBatchSampler(lab, 3, 2, seed=1, rank=0, world_size=2))
    r1 = list(ClassSetBatchSampler(lab, 3, 2, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) >= 1
    assert r0 != r1


def test_sampler_without_labels_is_a_data_error():
    with pytest.raises(DataError, match="no training image has a label"):
        ClassSetBatchSampler(torch.zeros(4, 3), 2, 1)


def test_method_returns_sampler_of_config_shape():
    m = build_method("minmaxcam", SMALL, num_classes=4)
    batches = list(m.train_batch_sampler(_labels(), 6, seed=0, rank=0, world_size=1))
    assert all(len(b) == 6 for b in batches)


# ---------------------------------------------------------------------- training
def test_stage2_updates_classifier_only_and_keeps_bn_statistics():
    m = build_method("minmaxcam", {**SMALL, "weight_decay": 0.0}, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    opt = m.configure_optimizers(net)["main"]
    before = copy.deepcopy(net.state_dict())
    losses = m.regularization_step(net, _batch(), opt, _ctx())
    assert torch.isfinite(losses["loss"]) and losses["loss"].item() > 0
    after = net.state_dict()
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)
    for k in backbone_keys:  # weights AND BatchNorm running statistics
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert net.backbone.training  # train mode restored after the frozen forwards


def test_training_steps_smoke():
    m = build_method("minmaxcam", SMALL, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    opts = m.configure_optimizers(net)
    before = copy.deepcopy(net.state_dict())
    for i in range(2):
        out = m.training_step(net, _batch(i), opts, _ctx())
        assert all(math.isfinite(v) for v in out.values())
        assert out["sets"] == 2.0
        assert out["loss"] == pytest.approx(out["cls"] + out["stage2"])
    after = net.state_dict()
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and k.endswith("weight"))
    cams, logits = m.cams_and_scores(net.eval(), _batch()["image"])
    assert logits.shape == (6, 3) and cams.shape == (6, 3, 2, 2)


def test_training_step_through_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m = build_method("minmaxcam", SMALL, num_classes=3)
        torch.manual_seed(0)
        inner = m.build_model().train()
        opts = m.configure_optimizers(inner)
        net = DDP(inner, find_unused_parameters=m.find_unused_parameters)
        before = inner.classifier.weight.detach().clone()
        for i in range(2):
            out = m.training_step(net, _batch(i), opts, _ctx())
            assert math.isfinite(out["loss"])
        assert not torch.equal(before, inner.classifier.weight)
    finally:
        dist.destroy_process_group()
