"""Search-space YAML parser: valid files, Tune conversion, and errors that name file and key."""

from pathlib import Path

import pytest
import yaml

from weakbench.core.errors import ConfigError, UnknownNameError
from weakbench.platform.search_space import load_search_space, parse_search_space

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_search_spaces_are_valid(path):
    space = load_search_space(path)
    # <method>.yaml is the method's default space; <method>_<setting>.yaml a named setting of it
    assert path.stem == space.method or path.stem.startswith(space.method + "_")
    assert space.metric.startswith("val/")
    cfg = space.defaults_config()
    from weakbench.methods import validate_config

    validate_config(space.method, cfg)  # a concrete point of the space passes the schema


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_search_spaces_fix_only_what_differs_from_the_schema(path):
    """A shipped space's ``fixed`` holds only values that differ from the method's schema
    defaults: the defaults live in one place (the config class), *_official.yaml included (their
    comments name the paper's settings; tests/test_bbam.py and tests/test_lr_schedule.py check
    that the resolved configurations run them)."""
    from weakbench.methods import get_method_class

    space = load_search_space(path)
    fields = get_method_class(space.method).Config.model_fields
    same = sorted(k for k, v in space.fixed.items()
                  if not fields[k].is_required() and fields[k].get_default(call_default_factory=True) == v)
    assert not same, f"{path.name}: fixed {', '.join(same)} equal the {space.method} schema default(s); drop them"


IMAGENET_METHODS = ("cam", "minmaxcam", "puzzlecam", "topgap")


@pytest.mark.parametrize("method", IMAGENET_METHODS)
def test_imagenet_protocol_spaces_fine_tune_the_packaged_classifier(method):
    """<method>_imagenet.yaml: the paper-protocol fine-tuning of the packaged pretrained
    EfficientNet-Lite0 at 224 px, one configuration over 3 seeds with no early stopping, and every
    seed's config passes the method's schema."""
    from weakbench.methods import validate_config

    space = load_search_space(REPO / "search_spaces" / f"{method}_imagenet.yaml")
    assert space.method == method and space.asha is None
    assert set(space.search) == {"seed"} and space.grid_axes() == {"seed": [0, 1, 2]}
    for seed in (0, 1, 2):
        cfg = validate_config(method, {**space.fixed, "seed": seed})
        assert cfg.backbone == "tf_efficientnet_lite0" and cfg.pretrained and cfg.input_size == 224
        assert cfg.epochs >= 1 and cfg.backbone_lr_mult < 1  # fine-tuning: the backbone below the head's lr
        if hasattr(cfg, "classifier_init"):  # the CAMNet methods reuse the pretrained 1000-way head
            assert cfg.features == "full" and cfg.classifier_init == "pretrained_head"


def test_tune_conversion_and_grid():
    space = parse_search_space({
        "method": "cam", "fixed": {"epochs": 2},
        "search": {"lr": {"loguniform": [0.001, 0.1]}, "batch_size": {"int": [4, 8]},
                   "weight_decay": {"choice": [0.0, 0.0001]}, "seed": {"grid": [0, 1, 2]}},
    })
    from weakbench.platform.launch import tune_param_space

    ps = tune_param_space(space.fixed, space.search)
    assert ps["epochs"] == 2
    assert ps["seed"] == {"grid_search": [0, 1, 2]}
    assert space.num_grid_points() == 3
    # int bounds are inclusive: Tune's randint upper bound is exclusive
    assert ps["batch_size"].upper == 9 and ps["batch_size"].lower == 4
    cfg = space.defaults_config()
    assert cfg["lr"] == pytest.approx(0.01) and cfg["batch_size"] == 6 and cfg["seed"] == 0


def write(tmp_path, data) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize("data, fragments", [
    ({"method": "cam", "search": {"lr": {"uniform": [-1.0, 0.1]}}}, ["search.lr.uniform", "-1.0", "out of range", "greater than 0"]),
    ({"method": "cam", "search": {"lr": {"uniform": [0.1, 0.01]}}}, ["search.lr.uniform", "low must be < high"]),
    ({"method": "cam", "search": {"lr": {"loguniform": [0.0, 0.1]}}}, ["search.lr.loguniform", "> 0"]),
    ({"method": "cam", "search": {"lr": {"normal": [0, 1]}}}, ["search.lr", "unknown distribution 'normal'", "loguniform"]),
    ({"method": "cam", "search": {"lr": [0.1, 0.2]}}, ["search.lr", "expected a mapping"]),
    ({"method": "cam", "search": {"batch_size": {"int": [1.5, 4]}}}, ["search.batch_size.int", "integers"]),
    ({"method": "cam", "search": {"learning_rate": {"uniform": [0.1, 0.2]}}}, ["search.learning_rate", "not a hyperparameter", "lr"]),
    ({"method": "cam", "fixed": {"epochs": -1}}, ["fixed", "epochs", "greater than or equal to 0"]),  # 0: evaluate only
    ({"method": "cam", "fixed": {"lr": 0.1}, "search": {"lr": {"choice": [0.1]}}}, ["lr", "both fixed and search"]),
    ({"method": "cam", "metric": "test/max_box_acc_v2"}, ["metric", "validation metric"]),
    ({"method": "cam", "mode": "min"}, ["mode", "higher-is-better"]),
    ({"method": "cam", "scheduler": {"hyperband": {}}}, ["scheduler", "asha"]),
    ({"method": "cam", "scheduler": {"asha": {"grace_period": 0}}}, ["scheduler.asha", "grace_period"]),
    ({"method": "cam", "serach": {}}, ["unknown top-level key", "serach"]),
    ({"search": {}}, ["missing key 'method'"]),
])
def test_errors_name_file_and_key(tmp_path, data, fragments):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_search_space(p)
    msg = str(exc.value)
    assert str(p) in msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown method 'gradcam'.*known methods: .*cam"):
        load_search_space(write(tmp_path, {"method": "gradcam"}))
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2"):
        load_search_space(write(tmp_path, "method: cam\nsearch: {lr: [1, 2}\n"))
    with pytest.raises(ConfigError, match="search-space file not found"):
        load_search_space(tmp_path / "nope.yaml")
