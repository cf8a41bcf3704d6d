"""DivergenceError and check_finite: non-finite losses and metrics are named, pickling survives Ray."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from weakbench.core.errors import DivergenceError, WeakbenchError, check_finite, is_finite_metrics


def test_finite_metrics_pass():
    check_finite({"train/loss": 0.3, "val/max_box_acc_v2": 61.0, "epoch": 2, "note": "x", "none": None}, "epoch 2")
    check_finite({}, "nothing")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan"), torch.tensor(float("inf"))])
def test_each_non_finite_kind_is_caught(bad):
    with pytest.raises(DivergenceError) as e:
        check_finite({"train/loss": bad, "train/cls": 1.0}, "epoch 1 train losses")
    assert e.value.keys == ["train/loss"]
    msg = str(e.value)
    assert msg.startswith("epoch 1 train losses: ") and "train/loss" in msg and "train/cls" not in msg


def test_every_bad_key_is_named_sorted():
    with pytest.raises(DivergenceError) as e:
        check_finite({"z": math.nan, "a": math.inf, "m": 3.0}, "val")
    assert e.value.keys == ["a", "z"]
    assert "a=inf" in str(e.value) and "z=nan" in str(e.value)
    assert isinstance(e.value, WeakbenchError) and isinstance(e.value, ArithmeticError)


def test_pickles_with_its_fields():
    err = DivergenceError("epoch 3", ["train/loss"], {"train/loss": math.nan})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DivergenceError and back.keys == ["train/loss"] and str(back) == str(err)


def test_is_finite_metrics():
    assert is_finite_metrics({"a": 1.0})
    assert not is_finite_metrics({"a": 1.0, "b": float("-inf")})


def test_mlflow_infinity_counts_as_infinite():
    import sys

    # MLflow's SQL stores hand ±inf back as ±DBL_MAX
    assert not is_finite_metrics({"val/x": sys.float_info.max}) and not is_finite_metrics({"val/x": -sys.float_info.max})
    assert is_finite_metrics({"val/x": 1e300})
