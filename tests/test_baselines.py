"""Trivial baselines (center_gaussian, whole_image): hand values of the priors, the protocol's
answer on hand-built boxes, and the whole path on real Ray and MLflow: sweep → leaderboard
(marks) → register → ``weakbench evaluate`` of the champion, equal to evaluating the method."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from weakbench.methods import build_method, get_method_class, list_methods
from weakbench.methods.baselines import PriorNet, gaussian_prior, whole_image_prior
from weakbench.core import conventions as C
from weakbench.core.metrics import WsolEvaluator

REPO = Path(__file__).resolve().parents[1]


def test_registered_with_eval_only_plans_and_search_spaces():
    from weakbench.platform.search_space import load_search_space

    assert {"center_gaussian", "whole_image"} <= set(list_methods())
    for name in C.TRIVIAL_BASELINES:
        m = build_method(name, {}, num_classes=3)
        plan = m.plan()
        assert [(st.name, st.kind, st.split) for st in plan] == [("val", "eval", "val"), ("test", "eval", "test")]
        assert m.config.backbone == "none" and m.config.epochs == 0
        assert load_search_space(get_method_class(name).default_search_space()).method == name
    with pytest.raises(Exception, match="epochs"):
        build_method("center_gaussian", {"epochs": 2}, num_classes=3)


def test_gaussian_prior_hand_values():
    g = gaussian_prior(2, 0.5)  # pixel centres at ±0.25 of the side: d² = 0.125, 2σ² = 0.5
    assert torch.allclose(g, torch.full((2, 2), math.exp(-0.25)))
    g = gaussian_prior(3, 0.25)
    assert g[1, 1] == 1.0 and torch.isclose(g[1, 0], torch.tensor(math.exp(-(1 / 3) ** 2 / (2 * 0.0625))))
    w = whole_image_prior(4)
    assert w[0, 0] == 0 and w.sum() == 15


def test_priors_under_the_protocol():
    """The whole-image map gives the whole-frame box at every threshold; a centre Gaussian
    localises a centred box and misses a corner one."""
    s = 32
    net = PriorNet("whole_image", 2)
    logits, cams = net(torch.zeros(2, 3, s, s))
    assert logits.shape == (2, 2) and cams.shape == (2, 2, s, s) and cams.stride(1) == 0  # a view, no C·S² memory
    ev = WsolEvaluator(cam_curve_interval=0.1)
    maps = cams[:, 0].numpy()
    ev.accumulate(maps, [np.array([[0, 0, s - 1, s - 1]]), np.array([[0, 0, 7, 7]])])
    out = ev.compute()
    assert out["max_box_acc"] == pytest.approx(50.0)  # the full-frame GT, never the small one
    g = PriorNet("center_gaussian", 1, sigma=0.2)(torch.zeros(2, 3, s, s))[1][:, 0].numpy()
    ev = WsolEvaluator(cam_curve_interval=0.01)
    ev.accumulate(g, [np.array([[8, 8, 23, 23]]), np.array([[0, 0, 5, 5]])])
    assert ev.compute()["max_box_acc"] == pytest.approx(50.0)


@pytest.mark.slow
def test_baselines_sweep_board_register_and_evaluate(tmp_path, ray_local):
    from weakbench.platform import tracking
    from weakbench.cli import app
    from weakbench.platform.leaderboard import build_leaderboard
    from weakbench.platform.results import read_store

    runner = CliRunner()

    def invoke(*args):
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    out = tmp_path / "runs"
    common = ["--output-dir", out, "--executor", "inline", "--eval-max-images", 24, "--set", "input_size=64"]
    invoke("sweep", REPO / "search_spaces" / "center_gaussian.yaml", "--trials", 2, "--name", "cg", *common)
    invoke("sweep", REPO / "search_spaces" / "whole_image.yaml", "--trials", 1, "--name", "wi", *common)
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        assert {"val/max_box_acc_v2", "test/max_box_acc_v2"} <= set(r.data.metrics)
        assert "test/cls_acc" not in r.data.metrics and "test/cls_map" not in r.data.metrics
    text = invoke("leaderboard", "--output-dir", out)  # updates the results store from MLflow
    assert "center_gaussian" in text and "whole_image" in text  # the board's columns: test_leaderboard.py
    lb = build_leaderboard(read_store(out / "results"))
    verdicts = {r["method"]: r["trivial_verdict"] for r in lb.to_pylist()}
    assert set(verdicts) == {"center_gaussian", "whole_image"}

    invoke("register", "--method", "center_gaussian", "--output-dir", out)
    name = f"weakbench-center_gaussian-{lb.to_pylist()[0]['dataset']}"
    best = [r for r in lb.to_pylist() if r["method"] == "center_gaussian"][0]
    sigma = __import__("json").loads(best["params_json"])["sigma"]
    text = invoke("evaluate", "--model", f"models:/{name}@champion", "--output-dir", out, "--max-images", 40)
    assert "max_box_acc_v2" in text and "40 images" in text
    text2 = invoke("evaluate", "--method", "center_gaussian", "--set", f"sigma={sigma}", "--set", "input_size=64",
                   "--output-dir", out, "--max-images", 40, "--no-log")
    evals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(C.TAG_KIND) == C.KIND_EVALUATION]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    ev = evals[0]
    assert ev.data.tags[C.TAG_EVALUATED_MODEL] == f"models:/{name}@champion"
    assert ev.data.tags[C.TAG_EVALUATED_VERSION] == "1"
    assert ev.data.tags[C.TAG_EVALUATED_RUN] in {r.info.run_id for r in trials}
    assert ev.data.metrics["all/num_images"] == 40
    # the champion and the method with the same sigma score the same on the same images
    line = [ln for ln in text2.splitlines() if "max_box_acc_v2 " in ln][0]
    value = re.findall(r"\d+\.\d\d", line)[-1]  # the value cell, whatever the table's rules
    assert float(value) == pytest.approx(ev.data.metrics["all/max_box_acc_v2"], abs=0.005)
    # evaluation runs never reach the results store
    assert read_store(out / "results").num_rows == 3


def test_evaluate_reports_progress_to_the_end(tmp_path):
    """``weakbench evaluate``'s progress bar: evaluate_split reports (done, total) per batch,
    monotone, ending at (total, total); the metrics do not depend on it."""
    from weakbench.core.data import open_dataset
    from weakbench.methods.evaluate import evaluate_split

    source = open_dataset(None, cache_dir=tmp_path)
    m = build_method("center_gaussian", {"input_size": 32}, num_classes=source.num_classes, multilabel=source.multilabel)
    model = m.build_model()
    seen: list[tuple[int, int]] = []
    idx = list(range(10))
    with_bar, _, _ = evaluate_split(m, model, source, idx, input_size=32, device=torch.device("cpu"), batch_size=4,
                                    progress=lambda done, total: seen.append((done, total)))
    without, _, _ = evaluate_split(m, model, source, idx, input_size=32, device=torch.device("cpu"), batch_size=4)
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert with_bar == without
