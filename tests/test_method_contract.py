"""The contract every registered method keeps, checked over ``list_methods()`` (no training): it
builds from its schema's defaults, its plan of stages validates against its own config fields, its
config refuses an unknown key with a ConfigError naming the method and the key, and every config
field sits in one field group from which the stages' cache keys are derived (a field added to a
stage's group changes that stage's product hash, not an earlier one's; a field no stage reads fails
registration)."""

from __future__ import annotations

import types
from typing import ClassVar

import pytest
from pydantic import Field

from weakbench.core.errors import ConfigError
from weakbench.methods import build_method, get_method_class, list_methods, register_method, validate_config
from weakbench.methods.base import Method, MethodConfig
from weakbench.methods.classifier import ClassifierConfig, ClassifierMethod
from weakbench.methods.bbam import BBAM, BBAMConfig
from weakbench.methods.pipeline import NON_PRODUCT_GROUPS, field_groups, validate_plan

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


# ---------------------------------------------------------------------- field groups and stage keys
@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_in_one_group_and_each_stage_key_covers_its_groups_and_inputs(name):
    m = build_method(name, {}, num_classes=3)
    groups = field_groups(type(m.config))
    owner = [f for fs in groups.values() for f in fs]
    assert sorted(owner) == sorted(type(m.config).model_fields)  # each field exactly once
    stages = {st.name: st for st in m.stages()}
    for st in stages.values():
        own = {f for g in m.stage_groups[st.role or st.name] for f in groups.get(g, ())}
        assert own <= set(st.reads), st.name
        for inp in st.inputs:  # a stage's key holds every field its inputs' keys hold
            assert set(stages[inp].reads) <= set(st.reads), (st.name, inp)
        assert not set(st.reads) & {f for g in NON_PRODUCT_GROUPS for f in groups.get(g, ())}, st.name


def _hashes(method) -> dict[str, str]:
    """Product hash of every stage, as the engine computes them (one dataset, one split)."""
    from weakbench.platform.engine import TrialSpec, stage_products

    spec = TrialSpec(method=method.name, params={}, data_cache="/nonexistent", splits_path="/nonexistent",
                     trial_dir="/nonexistent/trial", tracking_uri="sqlite:///nonexistent.db")
    source = types.SimpleNamespace(fingerprint="fingerprint")
    plan = method.stages()
    return {name: p.hash for name, p in stage_products(spec, method, plan, source, {"train": [0, 1], "val": [2]}).items()}


class _BBAMPlusConfig(BBAMConfig):
    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"attribution": ("attribution_extra",)}

    attribution_extra: float = Field(1.0, description="a test field in the attribute stage's group")


class _BBAMPlus(BBAM):
    Config = _BBAMPlusConfig
    name = "bbam"  # not registered: the hashes below name the same method as BBAM's


def test_a_field_added_to_a_stage_group_changes_that_stage_hash_and_not_earlier_ones():
    base = _hashes(build_method("bbam", {"mask_rcnn_epochs": 1}, num_classes=3))
    plus = _hashes(_BBAMPlus(_BBAMPlusConfig(mask_rcnn_epochs=1), num_classes=3))
    assert plus["detector"] == base["detector"]  # before the group's stage: unchanged
    for later in ("attribute", "pseudo_masks", "evaluate", "mask_rcnn", "instance_eval"):
        assert plus[later] != base[later], later  # the stage and everything downstream of it
    other = _hashes(_BBAMPlus(_BBAMPlusConfig(mask_rcnn_epochs=1, attribution_extra=2.0), num_classes=3))
    assert other["detector"] == plus["detector"] and other["attribute"] != plus["attribute"]
    # a speed-only field changes no product (BBAM's attribution is chunk-independent)
    fast = _hashes(build_method("bbam", {"mask_rcnn_epochs": 1, "attribution_batch_images": 3}, num_classes=3))
    assert fast == base
    # a field of a later group leaves the earlier stages' products shared
    theta = _hashes(build_method("bbam", {"mask_rcnn_epochs": 1, "theta_fg": 0.8}, num_classes=3))
    assert (theta["detector"], theta["attribute"]) == (base["detector"], base["attribute"])
    assert theta["pseudo_masks"] != base["pseudo_masks"]


class _OrphanConfig(ClassifierConfig):
    field_groups: ClassVar[dict[str, tuple[str, ...]]] = {"orphan": ("orphan",)}

    orphan: int = Field(0, description="read by no stage")


class _UngroupedConfig(ClassifierConfig):
    ungrouped: int = Field(0, description="in no group")


def test_registration_fails_for_a_field_no_stage_reads_or_in_no_group():
    class Orphan(ClassifierMethod):
        Config = _OrphanConfig

    with pytest.raises(ValueError, match=r"method 'contract_orphan': no stage reads group 'orphan' \(orphan\); name the "
                                         r"group in stage_groups"):
        register_method("contract_orphan")(Orphan)

    class Ungrouped(ClassifierMethod):
        Config = _UngroupedConfig

    with pytest.raises(ValueError, match=r"method 'contract_ungrouped': _UngroupedConfig: field\(s\) \['ungrouped'\] "
                                         r"belong to no field group"):
        register_method("contract_ungrouped")(Ungrouped)

    class BadStage(ClassifierMethod):
        Config = ClassifierConfig
        stage_groups = {"train": ("train", "evaluation"), "eval": ("evaluation", "typo")}

    with pytest.raises(ValueError, match=r"stage 'eval' reads group 'typo', which ClassifierConfig.field_groups does "
                                         r"not declare"):
        register_method("contract_bad_stage")(BadStage)

    class NoStages(Method):
        Config = ClassifierConfig

    with pytest.raises(ValueError, match=r"method 'contract_no_stages' declares no stage_groups"):
        register_method("contract_no_stages")(NoStages)
    assert not {"contract_orphan", "contract_ungrouped", "contract_bad_stage", "contract_no_stages"} & set(list_methods())


def test_a_method_declares_its_own_metrics_and_a_conflicting_declaration_fails_registration():
    from weakbench.methods import metric_declarations as D

    # Top-GAP's robust accuracy is declared on its class, not in the common table
    assert "robust_accuracy" not in D.METRICS
    assert get_method_class("topgap").metrics and D.spec("test/robust_accuracy").display == "robust accuracy"
    assert D.declared()["positive_share"] in get_method_class("bbam").metrics

    class Clash(ClassifierMethod):
        Config = ClassifierConfig
        metrics = (D.metric("robust_accuracy", "min", "%", "robust accuracy", "a different meaning"),)

    with pytest.raises(ValueError, match=r"method 'contract_clash' declares metric 'robust_accuracy', which method "
                                         r"'topgap' declares differently"):
        register_method("contract_clash")(Clash)

    class ClashCommon(ClassifierMethod):
        Config = ClassifierConfig
        metrics = (D.metric("pxap", "min", "%", "PxAP", "a different meaning"),)

    with pytest.raises(ValueError, match=r"declares metric 'pxap', which .*metric_specs.py \(METRICS\) declares "
                                         r"differently"):
        register_method("contract_clash_common")(ClashCommon)
    assert not {"contract_clash", "contract_clash_common"} & set(list_methods())
