"""The engine's input pipeline (weakbench.core.loading) and device settings (weakbench.core.accel).

* a sample's augmentation depends on (seed, epoch, sample) only: 0 and 2 loader workers give the
  same batches, and a 1-epoch trial gives the same losses and metrics with 0 and 2 workers;
* drawing a batch in the training process leaves its own random stream untouched;
* the precision and memory-format defaults keep a CPU run in float32, contiguous;
* the classifier losses stay float32 under bf16 autocast.
"""

import os

import pytest
import torch

from weakbench.core.accel import autocast, autocast_dtype, use_channels_last
from weakbench.core.data import ClassificationDataset, collate_classification, make_splits, open_dataset, save_splits
from weakbench.core.loading import SeededDataset, SeededSampler, default_loader_workers, make_loader, sample_seed


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = open_dataset(None, cache_dir=cache)
    splits_path = cache / "splits.json"
    save_splits(make_splits(source, seed=0), splits_path)
    return cache, source, splits_path


def _batches(source, workers: int, epochs: int = 2) -> list[torch.Tensor]:
    ds = ClassificationDataset(source, list(range(24)), 32, train=True)
    sampler = SeededSampler(torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3), 3)
    loader = make_loader(SeededDataset(ds), workers=workers, batch_size=8, sampler=sampler,
                         collate_fn=collate_classification, seed=3)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [torch.cat([b["image"].flatten(1), b["index"][:, None].float()], 1) for b in loader]
    return out


def test_batches_do_not_depend_on_loader_workers(synthetic):
    _, source, _ = synthetic
    zero, two = _batches(source, 0), _batches(source, 2)
    assert len(zero) == len(two) == 6
    for a, b in zip(zero, two):
        assert torch.equal(a, b)
    # the flips differ between epochs (a fresh draw per epoch, not one per sample for ever)
    ds = ClassificationDataset(source, [0], 32, train=True)
    flipped = {bool(torch.equal(SeededDataset(ds)[(0, sample_seed(3, e, 0))]["image"], ds[0]["image"]))
               for e in range(12)}
    assert flipped == {True, False}


def test_loading_leaves_the_training_stream_alone(synthetic):
    _, source, _ = synthetic
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    _batches(source, 0, epochs=1)
    assert torch.equal(torch.rand(4), expected)


def test_sample_seed_and_default_workers():
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5)
    assert len({sample_seed(0, e, k) for e in range(3) for k in range(50)}) == 150
    assert sample_seed(0, 0, (3, 7)) != sample_seed(0, 0, (3, 8))  # a method's tuple keys
    assert default_loader_workers(1.0) == 0  # the default trial: decoding in the training process
    assert default_loader_workers(1.0, requested=3) == 3
    assert default_loader_workers(2.0) == min(1, (os.cpu_count() or 1) - 1)


def test_cpu_defaults_are_float32_and_contiguous():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu", allowed=False) is None
    assert not use_channels_last("auto", "cpu") and use_channels_last("auto", "cuda")
    assert use_channels_last("channels_last", "cpu") and not use_channels_last("contiguous", "cuda")


def test_classifier_losses_stay_float32_under_bf16_autocast():
    from weakbench.methods.cam import classification_loss
    from weakbench.methods.minmaxcam import crr_loss, frr_loss
    from weakbench.methods.puzzlecam import reconstruction_loss
    from weakbench.methods.topgap import l1_sparsity

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(6, 8)
    labels = (torch.rand(6, 4) > 0.5).float()
    with autocast("cpu", torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16  # the forward did run in bf16
        f = logits.reshape(2, 3, 4)
        cams = logits.reshape(6, 4, 1, 1)
        losses = [classification_loss(logits, labels, True), classification_loss(logits, labels, False),
                  crr_loss(f), frr_loss(f, f.detach() + 1), reconstruction_loss(cams, cams * 0.5, labels),
                  l1_sparsity(cams)]
    assert all(v.dtype == torch.float32 for v in losses), [v.dtype for v in losses]


@pytest.mark.slow
def test_trial_losses_identical_with_zero_and_two_loader_workers(tmp_path, synthetic):
    """The issue's check: a 1-epoch CAM trial on the synthetic default gives identical losses and
    validation metrics with 0 and 2 loader workers (flips drawn per sample and epoch)."""
    from weakbench.platform import tracking
    from weakbench.platform.engine import TrialSpec, run_trial

    cache, _, splits_path = synthetic
    results = []
    # batch 19: the 57 training images make 3 full batches (a last batch of one image would stop
    # BatchNorm on the 1x1 feature map of a 32 px input)
    for workers in (0, 2):
        spec = TrialSpec(method="cam", params={"backbone": "resnet18", "input_size": 32, "epochs": 1, "batch_size": 19,
                                               "lr": 0.02, "seed": 1},
                         data=None, data_cache=str(cache), splits_path=str(splits_path),
                         trial_dir=str(tmp_path / f"w{workers}"), tracking_uri=tracking.default_tracking_uri(tmp_path / f"w{workers}"),
                         eval_max_images=4, num_overlays=0, log_model=False, loader_workers=workers)
        results.append(run_trial(spec, executor="inline"))
    zero, two = results
    assert zero["train/loss"] == two["train/loss"]
    for k in ("val/max_box_acc_v2", "val/pxap", "test/max_box_acc_v2"):
        assert zero[k] == two[k], k


def test_evaluation_does_not_depend_on_loader_workers(synthetic):
    from weakbench.methods import build_method
    from weakbench.methods.evaluate import evaluate_split

    _, source, _ = synthetic
    method = build_method("cam", {"backbone": "resnet18", "input_size": 32}, num_classes=source.num_classes,
                          multilabel=source.multilabel)
    torch.manual_seed(0)
    model = method.build_model()
    runs = [evaluate_split(method, model, source, list(range(8)), input_size=32, device=torch.device("cpu"),
                           batch_size=4, loader_workers=w)[0] for w in (0, 2)]
    assert runs[0] == runs[1] and "max_box_acc_v2" in runs[0]
