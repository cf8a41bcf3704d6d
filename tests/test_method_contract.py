"""The contract every registered method keeps, checked over ``list_methods()`` (no training): it
builds from its schema's defaults, its plan of stages validates against its own config fields, and
its config refuses an unknown key with a ConfigError naming the method and the key."""

from __future__ import annotations

import pytest

from weakbench.methods import build_method, list_methods, validate_config
from weakbench.methods.base import Method, MethodConfig
from weakbench.methods.pipeline import validate_plan
from weakbench.core.errors import ConfigError

METHODS = list_methods()


def test_the_builtin_methods_are_all_covered():
    assert {"cam", "minmaxcam", "puzzlecam", "topgap", "bbam", "ccgr", "center_gaussian", "whole_image"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_builds_from_its_defaults_and_its_plan_validates(name):
    m = build_method(name, {}, num_classes=3)
    assert isinstance(m, Method) and isinstance(m.config, MethodConfig) and m.name == name
    plan = validate_plan(m.plan(), set(type(m.config).model_fields))
    assert plan and all(st.kind in ("fit", "map", "eval") for st in plan)


@pytest.mark.parametrize("name", METHODS)
def test_config_refuses_an_unknown_key_naming_it(name):
    with pytest.raises(ConfigError, match=rf"method '{name}': .*lr_typo: not a hyperparameter of '{name}'; "
                                          rf"nearest: lr, .*; valid: .*\bepochs\b"):
        validate_config(name, {"lr_typo": 0.1})
    with pytest.raises(ConfigError, match="lr_typo"):
        build_method(name, {"lr_typo": 0.1}, num_classes=3)
