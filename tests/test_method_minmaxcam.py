"""MinMaxCAM: CRR/FRR on hand-computed tensors, λ1/λ2 pinned, the set sampler (the drawn class carried
through the batch, disjoint shards), Stage II freezing, training smoke (also through a one-process DDP
wrapper, as the engine runs it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from weakbench.methods import build_method
from weakbench.methods.base import StepContext
from weakbench.methods.minmaxcam import (
    ClassSetBatchSampler, MinMaxCAMFitTask, SetClassDataset, crr_loss, frr_loss, set_classes, shared_set_classes,
)
from weakbench.core.errors import ConfigError, DataError

SMALL = {"backbone": "resnet10t", "input_size": 64, "batch_size": 6, "set_size": 3, "lr": 0.05}


def _ctx() -> StepContext:
    return StepContext(epoch=0, step=0, steps_per_epoch=2, total_steps=2, device=torch.device("cpu"),
                       unwrap=lambda m: getattr(m, "module", m))


def _batch(seed: int = 0) -> dict:
    """Two sets of S = 3: set 0 drawn for class 0; set 1's images carry classes 1 and 2 and the set
    was drawn for class 2 (the lowest shared index would be 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1, 0, 0]] * 3 + [[0, 1, 1]] * 3, dtype=torch.float32)
    return {"image": torch.randn(6, 3, 64, 64, generator=g), "labels": labels, "index": torch.arange(6),
            "set_class": torch.tensor([0, 0, 0, 2, 2, 2])}


def _positions(batch: list[tuple[int, int]]) -> list[int]:
    return [i for i, _ in batch]


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


def test_set_classes_take_the_drawn_class_over_the_lowest_shared_one():
    labels = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.float32)  # both sets share 0
    classes, valid = set_classes({"labels": labels, "set_class": torch.tensor([2, 2, 1, 1])}, 2)
    assert classes.tolist() == [2, 1] and valid.tolist() == [True, True]
    # without set_class (a hand-built batch): the lowest shared index; -1 marks one set unknown
    assert set_classes({"labels": labels}, 2)[0].tolist() == [0, 0]
    assert set_classes({"labels": labels, "set_class": torch.tensor([-1, -1, 1, 1])}, 2)[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"set 0 carry different set_class values \[2, 1\]"):
        set_classes({"labels": labels, "set_class": torch.tensor([2, 1, 1, 1])}, 2)
    with pytest.raises(ValueError, match="set 0 was drawn for class 1 but not all its images carry"):
        set_classes({"labels": labels, "set_class": torch.tensor([1, 1, 1, 1])}, 2)
    with pytest.raises(ValueError, match="outside"):
        set_classes({"labels": labels, "set_class": torch.tensor([3, 3, 1, 1])}, 2)


def test_stage2_regularises_the_drawn_class_cam():
    """H is the CAM of the drawn class: Stage II's gradient reaches exactly those rows of fc."""
    m = build_method("minmaxcam", SMALL, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    batch = _batch()
    assert shared_set_classes(batch["labels"], 3)[0].tolist() == [0, 1]  # what the lowest-index rule picks
    m.stage2_losses(net, batch)["loss"].backward()
    per_class = net.classifier.weight.grad.flatten(1).abs().sum(1)
    assert per_class[0] > 0 and per_class[2] > 0
    assert per_class[1] == 0  # class 1 is shared by set 1's images but is not the class it was drawn for


def test_config_batch_must_be_sets():
    with pytest.raises(ConfigError, match=r"batch_size \(16\).*set_size \(5\).*15 or 20"):
        build_method("minmaxcam", {"batch_size": 16}, num_classes=3)
    cfg = build_method("minmaxcam", {}, num_classes=3).config
    assert (cfg.batch_size, cfg.set_size, cfg.num_sets, cfg.crr_weight, cfg.frr_weight) == (60, 5, 12, 1.0, 10.0)
    fields = type(cfg).model_fields  # the descriptions say whose value each default is
    assert "official code" in fields["crr_weight"].description
    assert "VGG16 optimum (Fig. 6)" in fields["frr_weight"].description and "official code's default is 1" in fields["frr_weight"].description


def test_stage2_loss_is_lambda1_crr_plus_lambda2_frr():
    """L_S2 = λ1·CRR + λ2·FRR (eq. 5) with CRR, FRR recomputed here from the same features."""
    lam1, lam2 = 0.3, 2.5
    m = build_method("minmaxcam", {**SMALL, "crr_weight": lam1, "frr_weight": lam2}, num_classes=3)
    torch.manual_seed(0)
    net = m.build_model().train()
    batch = _batch()
    out = m.stage2_losses(net, batch)
    with torch.no_grad():  # B* runs in eval mode: the same features again
        f, f_orig = net.regularization_features(batch["image"], batch["set_class"])
    s, sets = 3, 2
    crr = frr = 0.0
    for n in range(sets):
        fs, fo = f[n * s:(n + 1) * s], f_orig[n * s:(n + 1) * s]
        crr += sum(((fs[i] - fs[j]) ** 2).mean() for i in range(s) for j in range(s) if i != j) / (s * (s - 1)) / sets
        frr += sum(((fs[i] - fo[i]) ** 2).mean() for i in range(s)) / s / sets
    crr, frr = float(crr), float(frr)
    assert float(out["crr"]) == pytest.approx(crr, rel=1e-4)
    assert float(out["frr"]) == pytest.approx(frr, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(lam1 * crr + lam2 * frr, rel=1e-4)
    swapped = lam2 * crr + lam1 * frr
    assert abs(swapped - (lam1 * crr + lam2 * frr)) > 1e-2 * abs(swapped)  # swapping λ1 and λ2 is visible
    # the logged losses: stage2 is the weighted sum of the logged (unweighted) crr and frr
    logged = m.training_step(net, batch, m.configure_optimizers(net), _ctx())
    assert logged["stage2"] == pytest.approx(lam1 * logged["crr"] + lam2 * logged["frr"], rel=1e-5)
    assert logged["loss"] == pytest.approx(logged["cls"] + logged["stage2"], rel=1e-6)


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
            (cls, *others) = {c for _, c in b[k:k + 3]}
            assert not others, f"set {b[k:k + 3]} carries several set classes"
            members = lab[_positions(b[k:k + 3])]
            assert (members[:, cls] > 0).all(), f"set {b[k:k + 3]}: not every image has its drawn class"
        seen.update(_positions(b))
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


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_shards_are_disjoint_and_cover_the_epoch(world_size):
    """Single-label classes of 9, 6, 12 and 9 images, S = 3, N = 2: 12 sets, a multiple of
    N × world_size, so no set is filled up or cycled and each labelled image belongs to exactly
    one set of the epoch. Every rank's shard must then be disjoint from every other's and the
    shards together must be the whole epoch."""
    lab = torch.zeros(38, 4)
    for c, (lo, hi) in enumerate([(0, 9), (9, 15), (15, 27), (27, 36)]):
        lab[lo:hi, c] = 1  # images 36, 37 have no label
    for epoch in (0, 1):
        shards = []
        for rank in range(world_size):
            sampler = ClassSetBatchSampler(lab, 3, 2, seed=1, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            shards.append([i for b in sampler for i in _positions(b)])
        assert all(len(sh) == len(shards[0]) == 36 // world_size for sh in shards)
        for r in range(world_size):
            assert len(set(shards[r])) == len(shards[r]), f"rank {r} sees an image twice"
            for q in range(r + 1, world_size):
                assert not set(shards[r]) & set(shards[q]), f"ranks {r} and {q} share images in epoch {epoch}"
        assert sorted(i for sh in shards for i in sh) == list(range(36))  # together: every labelled image once


def test_sampler_shards_are_disjoint_slices_of_one_epoch_order():
    """With filled-up and cycled sets an image can recur, so the ranks' batches are checked as
    slices of the epoch: every batch of the epoch goes to exactly one rank."""
    lab = _labels()
    epoch_batches = ClassSetBatchSampler(lab, 3, 2, seed=1).epoch_batches(0)
    shards = [list(ClassSetBatchSampler(lab, 3, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) >= 1
    positions = [[epoch_batches.index(b, r) for b in sh] for r, sh in enumerate(shards)]
    assert positions == [list(range(0, len(epoch_batches), 2)), list(range(1, len(epoch_batches), 2))]


def test_sampler_without_labels_is_a_data_error():
    with pytest.raises(DataError, match="no training image has a label"):
        ClassSetBatchSampler(torch.zeros(4, 3), 2, 1)


def test_method_returns_sampler_of_config_shape():
    m = build_method("minmaxcam", SMALL, num_classes=4)
    batches = list(m.train_batch_sampler(_labels(), 6, seed=0, rank=0, world_size=1))
    assert all(len(b) == 6 for b in batches)


def test_fit_task_batches_carry_the_drawn_class(synthetic_dir):
    """The engine's path (the fit task's dataset and batch sampler in a DataLoader) delivers
    ``set_class``: one class per set, carried by each of its images."""
    from weakbench.core.data import make_splits, open_dataset

    source = open_dataset(synthetic_dir)
    train = list(make_splits(source, seed=0)["train"])
    m = build_method("minmaxcam", {**SMALL, "input_size": 32}, num_classes=source.num_classes)
    task = m.fit_task(m.plan()[0])
    assert isinstance(task, MinMaxCAMFitTask)
    ds = task.train_dataset(source, train)
    assert isinstance(ds, SetClassDataset) and ds[3]["set_class"].item() == -1  # a bare position: unknown
    sampler = task.batch_sampler(source, train, 0, 1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=task.collate)
    n = 0
    for batch, keys in zip(loader, sampler.epoch_batches(0)):
        assert batch["set_class"].dtype == torch.int64 and batch["set_class"].tolist() == [c for _, c in keys]
        assert batch["index"].tolist() == [train[i] for i, _ in keys]
        sc = batch["set_class"].reshape(2, 3)
        assert (sc == sc[:, :1]).all()
        assert (batch["labels"].gather(1, batch["set_class"][:, None]) == 1).all()
        n += 1
    assert n == len(sampler) >= 1


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


def test_search_space_reaches_small_frr_weights():
    """λ2 from 0.1 (MobileNetV2 degrades for large FRR weights, Fig. 6) past the paper's VGG16 optimum 10."""
    from weakbench.methods import get_method_class
    from weakbench.platform.search_space import load_search_space

    space = load_search_space(get_method_class("minmaxcam").default_search_space())
    frr = space.search["frr_weight"]
    assert frr.kind == "loguniform" and frr.values[0] <= 0.1 and frr.values[1] >= 10
