"""Learning-rate schedules: hand-computed lrs of the poly and step schedules, per-group multipliers
kept in ratio, a checkpoint restore that continues the schedule exactly (the engine's own save and
restore functions, and an inline trial killed after epoch 1 and resumed), the refusals, and the
methods' official settings in their search-space files."""

from pathlib import Path

import pytest
import torch
import yaml

from weakbench.methods import build_method, validate_config
from weakbench.methods.lr_schedules import build_lr_scheduler, milestone_steps
from weakbench.methods.pipeline import Stage
from weakbench.platform.loops import optimization_state, restore_optimization
from weakbench.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class TinyNet(torch.nn.Module):
    """Two parameter groups as the classifier methods build them: ``backbone.*`` and the new layer."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(3, 4)
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.backbone(x)))


def method_with(**params):
    return build_method("cam", {"backbone": "resnet18", **params}, num_classes=2)


def fresh(method, total_steps, seed=0):
    """Model, optimisers and schedulers from the method's own hooks, as the engine builds them."""
    torch.manual_seed(seed)
    model = TinyNet()
    opts = method.configure_optimizers(model)
    return model, opts, method.configure_schedulers(opts, total_steps)


def train_steps(model, opts, scheds, n, start=0):
    """Steps ``start … start + n − 1`` as the engine takes them: the step (an SGD update on batch
    number ``t``), then every scheduler. Returns the lr of each group as used by each step."""
    used = []
    for t in range(start, start + n):
        used.append([grp["lr"] for grp in opts["main"].param_groups])
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(t))
        opts["main"].zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opts["main"].step()
        for s in scheds.values():
            s.step()
    return used


def test_constant_schedule_configures_no_scheduler():
    m = method_with(lr=0.1)
    _, opts, scheds = fresh(m, 10)
    assert scheds == {}
    assert not opts["main"].param_groups[0]["nesterov"]


def test_poly_schedule_gives_hand_computed_lr():
    # lr 0.1, T = 10, power 0.9: lr_t = 0.1 · (1 − t/10)^0.9
    m = method_with(lr=0.1, lr_schedule="poly", poly_power=0.9)
    model, opts, scheds = fresh(m, 10)
    assert set(scheds) == {"main"} and isinstance(scheds["main"], torch.optim.lr_scheduler.LambdaLR)
    head = [lrs[-1] for lrs in train_steps(model, opts, scheds, 10)]
    assert head[0] == pytest.approx(0.1)
    assert head[5] == pytest.approx(0.1 * 0.535887, rel=1e-5)   # 0.5^0.9
    assert head[9] == pytest.approx(0.1 * 0.125893, rel=1e-5)   # 0.1^0.9
    assert opts["main"].param_groups[-1]["lr"] == pytest.approx(0.0)  # after the last step: (1 − 10/10)^0.9


def test_step_schedule_milestones_are_fractions_of_training():
    assert milestone_steps((0.5, 0.75), 8) == [4, 6]
    assert milestone_steps((0.3,), 10) == [3]          # 0.3 · 10 is step 3 despite float error
    assert milestone_steps((0.25, 0.5), 800) == [200, 400]  # MinMaxCAM: epochs 50, 100 of 200
    assert milestone_steps((0.5,), 3) == [2]           # the first step at or past half of training
    m = method_with(lr=0.2, lr_schedule="step", lr_milestones=(0.5, 0.75), lr_gamma=0.1)
    model, opts, scheds = fresh(m, 8)
    head = [lrs[-1] for lrs in train_steps(model, opts, scheds, 8)]
    assert head == pytest.approx([0.2] * 4 + [0.02] * 2 + [0.002] * 2)


def test_cosine_schedule_reaches_zero_at_the_end():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = build_lr_scheduler(opt, 4, schedule="cosine")
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([1.0, 0.853553, 0.5, 0.146447], rel=1e-5)  # (1 + cos(π t/4)) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("schedule", ["poly", "step", "cosine"])
def test_group_multipliers_keep_their_ratio(schedule):
    m = method_with(lr=0.05, backbone_lr_mult=0.1, lr_schedule=schedule, lr_milestones=(0.3, 0.6))
    model, opts, scheds = fresh(m, 12)
    groups = opts["main"].param_groups
    assert [len(g["params"]) for g in groups] == [2, 2]  # backbone first, then the new layer
    for backbone_lr, head_lr in train_steps(model, opts, scheds, 11):
        assert backbone_lr == pytest.approx(0.1 * head_lr, rel=1e-9)
    assert groups[1]["lr"] < 0.05  # the schedule did move


@pytest.mark.parametrize("schedule", ["poly", "step", "cosine"])
def test_checkpoint_restore_continues_the_schedule(tmp_path, schedule):
    m = method_with(lr=0.05, backbone_lr_mult=0.1, lr_schedule=schedule, lr_milestones=(0.3, 0.6),
                    nesterov=True, weight_decay=5e-4)
    total, k = 10, 4
    model, opts, scheds = fresh(m, total)
    uninterrupted = train_steps(model, opts, scheds, total)
    final = {name: v.clone() for name, v in model.state_dict().items()}

    model, opts, scheds = fresh(m, total)
    before = train_steps(model, opts, scheds, k)
    torch.save({"model": model.state_dict(), **optimization_state(opts, scheds)}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    model2, opts2, scheds2 = fresh(m, total, seed=1)  # fresh objects, other initial weights
    model2.load_state_dict(state["model"])
    restore_optimization(state, opts2, scheds2)
    after = train_steps(model2, opts2, scheds2, total - k, start=k)
    lrs = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(lrs(before), lrs(uninterrupted[:k]))
    # the next lr is the uninterrupted run's, and so is every later one
    torch.testing.assert_close(lrs(after[0]), lrs(uninterrupted[k]))
    torch.testing.assert_close(lrs(after), lrs(uninterrupted[k:]))
    for name, v in model2.state_dict().items():  # momentum buffers came back too: the same weights
        torch.testing.assert_close(v, final[name])


def test_restore_refuses_a_checkpoint_without_the_schedule():
    m = method_with(lr=0.05, lr_schedule="poly")
    _, opts, scheds = fresh(m, 10)
    old = {"optimizers": {k: o.state_dict() for k, o in opts.items()}}  # written before lr schedules
    _, opts2, scheds2 = fresh(m, 10)
    with pytest.raises(RuntimeError, match="no state for lr scheduler 'main'.*start the trial afresh"):
        restore_optimization(old, opts2, scheds2, stage="train")
    # a constant schedule restores such a checkpoint as before
    c = method_with(lr=0.05)
    _, opts3, scheds3 = fresh(c, 10)
    restore_optimization(old, opts3, scheds3)


def test_fields_a_stage_would_ignore_are_refused():
    st = Stage("detector", "fit", epochs=2)
    m = build_method("bbam", {"lr_schedule": "poly"}, num_classes=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match=r"method 'bbam', stage 'detector': lr_schedule is 'poly'.*lr_schedule: constant"):
        m.check_fit(st, {"main": opt}, {})
    m = build_method("bbam", {"nesterov": True}, num_classes=2)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=r"nesterov is true, but optimiser\(s\) \['main'\].*Adam.*nesterov: false"):
        m.check_fit(st, {"main": adam}, {})
    with pytest.raises(ConfigError, match="nesterov: true needs momentum > 0"):
        validate_config("cam", {"nesterov": True, "momentum": 0.0})
    with pytest.raises(ConfigError, match="lr_milestones must be increasing fractions"):
        validate_config("cam", {"lr_milestones": [0.75, 0.5]})
    with pytest.raises(ConfigError, match="lr_milestones must be increasing fractions"):
        validate_config("cam", {"lr_milestones": [0.5, 1.0]})


@pytest.mark.parametrize("method", ["minmaxcam", "puzzlecam"])
def test_official_settings_are_the_search_space_files(method):
    import importlib

    setting = importlib.import_module(f"weakbench.methods.{method}").OFFICIAL_OPTIMIZATION
    fixed = yaml.safe_load((REPO / "search_spaces" / f"{method}_official.yaml").read_text())["fixed"]
    cfg = validate_config(method, fixed)
    for key, value in setting.items():  # each value set in the file or the schema's default
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, (list, tuple)) else value), key
    # the method's default stays the common constant schedule; the description names the setting
    default = validate_config(method, {})
    assert default.lr_schedule == "constant" and not default.nesterov
    desc = type(default).model_fields["lr_schedule"].description
    assert "OFFICIAL_OPTIMIZATION" in desc and f"lr_schedule={setting['lr_schedule']}" in desc
    # and the setting selects the code it names: Nesterov SGD, new layers at 10x, the schedule
    m = build_method(method, cfg, num_classes=2)
    opts = m.configure_optimizers(TinyNet())
    scheds = m.configure_schedulers(opts, 100)
    backbone, head = opts["main"].param_groups
    assert backbone["nesterov"] and head["nesterov"] and backbone["lr"] == pytest.approx(0.1 * head["lr"])
    kind = {"step": torch.optim.lr_scheduler.MultiStepLR, "poly": torch.optim.lr_scheduler.LambdaLR}
    assert type(scheds["main"]) is kind[setting["lr_schedule"]]


def test_inline_trial_resumed_after_a_kill_continues_the_schedule_and_logs_lr(tmp_path):
    """A 2-epoch CAM trial with poly decay, 8 steps per epoch (57 training images, batch 8),
    T = 16: killed after epoch 1 and resumed from its checkpoint, its ``train/lr`` (the backbone
    group's, lr × backbone_lr_mult = 0.05, at each epoch's first step) is the uninterrupted
    schedule's: 0.05 at step 0, 0.05 · (1 − 8/16)^0.9 at step 8. A scheduler restarted on resume,
    or one built after the optimiser's state was loaded (its constructor resets the lr to
    0.05 · λ(0)), would give 0.05 again."""
    from weakbench.platform import tracking
    from weakbench.core.data import make_splits, open_dataset, save_splits
    from weakbench.platform.callbacks import CallbackRef, FailOnce
    from weakbench.platform.engine import TrialSpec, run_trial

    cache = tmp_path / "cache"
    source = open_dataset(None, cache_dir=cache)
    splits_path = cache / "splits.json"
    save_splits(make_splits(source, seed=0), splits_path)
    params = {"backbone": "resnet18", "input_size": 64, "epochs": 2, "batch_size": 8, "lr": 0.1,
              "backbone_lr_mult": 0.5, "lr_schedule": "poly", "poly_power": 0.9, "nesterov": True}
    spec = TrialSpec(method="cam", params=params, data=None, data_cache=str(cache), splits_path=str(splits_path),
                     trial_dir=str(tmp_path / "trial"), tracking_uri=tracking.default_tracking_uri(tmp_path),
                     sweep_id="s", trial_id="t0", run_name="cam-t0", eval_max_images=4, num_overlays=0,
                     log_model=False, callbacks=[CallbackRef.of(FailOnce, after_epoch=1)])
    with pytest.raises(RuntimeError, match="injected failure"):
        run_trial(spec, executor="inline")
    metrics = run_trial(spec, executor="inline")  # resumes from the trial's checkpoint
    assert metrics["epoch"] == 2
    client = tracking.client_for(spec.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(spec.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/lr"))
    assert [s for s, _ in history] == [1, 2]
    assert [v for _, v in history] == pytest.approx([0.05, 0.05 * 0.535887], rel=1e-5)  # 0.5^0.9
