"""One run specification (weakbench.platform.run_spec): the ``weakbench sweep`` flags, the
``--resume`` rule and each trial's spec all come from SweepOptions' field declarations. Fast: no
Ray instance is started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from weakbench import cli
from weakbench.platform import run_spec as RS
from weakbench.platform.engine import TrialSpec
from weakbench.platform.run_spec import Role, SweepOptions

REPO = Path(__file__).resolve().parents[1]

# what --resume kept from sweep.json before the run spec (the hand list of run_sweep): sweeps
# written then resume the same way now
OLD_RESUME_KEYS = {"data", "split_seed", "tracking_uri", "experiment", "trials", "searcher", "search_seed", "overrides",
                   "executor", "num_workers", "use_gpu", "cpus_per_worker", "eval_max_images", "num_overlays",
                   "log_model", "early_stopping", "max_failures",
                   "classes"}  # the class filter (issue 20) shapes the trials' data
#: trial-shaping options added since (issue 22: GPU shares, loader workers, precision, memory layout)
NEW_RESUME_KEYS = {"gpus_per_trial", "loader_workers", "precision", "memory_format"}


def _sweep_command():
    return typer.main.get_command(cli.app).commands["sweep"]


def _cli_fields() -> list[str]:
    return [n for n in SweepOptions.model_fields if RS.cli_of(n) is not None]


def test_every_field_with_a_cli_form_is_a_sweep_option_and_vice_versa():
    params = {p.name: p for p in _sweep_command().params if p.name not in ("help", "dry_run")}  # dry_run: the CLI's own
    assert sorted(params) == sorted(_cli_fields())
    for name, p in params.items():
        cli_form = RS.cli_of(name)
        if cli_form["kind"] == "argument":
            assert p.param_type_name == "argument"
            continue
        declared = [d for n in cli_form["names"] for d in n.split("/")]
        assert sorted(p.opts + p.secondary_opts) == sorted(declared), name
        assert (p.help or "") == cli_form["help"], name
    # the rendered help names every flag, and no option of the Python API only
    out = CliRunner().invoke(cli.app, ["sweep", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
    for name in _cli_fields():
        for flag_name in RS.cli_of(name).get("names", []):
            for decl in flag_name.split("/"):
                assert decl in out, decl
    for name in SweepOptions.model_fields:
        if RS.cli_of(name) is None:
            assert "--" + name.replace("_", "-") not in out, name


def test_the_flags_of_the_original_command_are_all_there():
    opts = {o for p in _sweep_command().params for o in p.opts + p.secondary_opts}
    assert {"--data", "-d", "--trials", "-n", "--output-dir", "-o", "--tracking-uri", "--experiment", "--name", "--resume",
            "--num-workers", "--gpu", "--cpus-per-worker", "--max-concurrent", "--searcher", "--search-seed",
            "--executor", "--eval-max-images", "--early-stopping", "--no-early-stopping", "--set", "--address",
            "--max-failures", "--worker-start-timeout", "--num-cpus", "--no-model", "--verbose", "-v"} <= opts


@pytest.fixture
def parsed(monkeypatch):
    """``weakbench sweep ARGS`` parsed into SweepOptions, nothing run."""
    got = {}

    def fake_run(opts, *, verbose):
        got["opts"], got["verbose"] = opts, verbose
        raise typer.Exit(0)

    monkeypatch.setattr(cli, "_run_sweep_with_view", fake_run)
    # parsing only: the start-up checks (they create --output-dir and probe a tracking server) are
    # tested in test_bad_input.py
    from weakbench.platform import validation

    monkeypatch.setattr(validation, "check_sweep_options", lambda opts: None)

    def parse(*args: str, env: dict | None = None) -> SweepOptions:
        res = CliRunner().invoke(cli.app, ["sweep", str(REPO / "search_spaces" / "cam.yaml"), *args], env=env)
        assert res.exit_code == 0, res.output
        assert got["verbose"] == got["opts"].verbose
        return got.pop("opts")

    return parse


def test_defaults_of_the_command_line_are_the_fields_defaults(parsed):
    opts = parsed(env={"WEAKBENCH_TRACKING_URI": None, "WEAKBENCH_BASELINES": None})
    assert opts == SweepOptions(space=str(REPO / "search_spaces" / "cam.yaml"))
    assert parsed(env={"WEAKBENCH_BASELINES": "0"}).baselines is False  # the variable, when no flag is given


def test_every_flag_sets_its_field(parsed):
    opts = parsed("-d", "/data/x", "-n", "7", "-o", "/out", "--experiment", "exp", "--name", "nm", "--resume",
                  "--num-workers", "2", "--gpu", "--cpus-per-worker", "0.5", "--max-concurrent", "3", "--searcher",
                  "random", "--search-seed", "5", "--executor", "train", "--eval-max-images", "9", "--no-early-stopping",
                  "--set", "epochs=2", "--set", "backbone=resnet18", "--address", "local", "--max-failures", "0",
                  "--worker-start-timeout", "30", "--num-cpus", "2", "--no-model", "-v", "--no-baselines",
                  "--classes", "person,dog",
                  "--gpus-per-trial", "0.5", "--loader-workers", "3", "--precision", "bf16", "--memory-format",
                  "channels_last", "--keep-checkpoints",
                  env={"WEAKBENCH_TRACKING_URI": "http://mlflow:5000", "WEAKBENCH_BASELINES": None})
    expected = dict(data="/data/x", trials=7, output_dir="/out", tracking_uri="http://mlflow:5000", experiment="exp",
                    name="nm", resume=True, num_workers=2, use_gpu=True, cpus_per_worker=0.5, max_concurrent=3,
                    searcher="random", search_seed=5, executor="train", eval_max_images=9, early_stopping=False,
                    overrides={"epochs": 2, "backbone": "resnet18"}, address="local", max_failures=0,
                    worker_start_timeout_s=30.0, num_cpus=2, log_model=False, verbose=True, baselines=False,
                    classes="person,dog",
                    gpus_per_trial=0.5, loader_workers=3, precision="bf16", memory_format="channels_last",
                    keep_checkpoints=True)
    assert sorted(expected) == sorted(n for n in _cli_fields() if n != "space")  # every flag exercised
    default = SweepOptions(space="s")
    for k, v in expected.items():
        assert getattr(default, k) != v, k  # the flag changed something
        assert getattr(opts, k) == v, k
    assert parsed("--tracking-uri", "sqlite:///x.db").tracking_uri == "sqlite:///x.db"


def test_a_bad_set_item_is_a_one_line_error(parsed):
    res = CliRunner().invoke(cli.app, ["sweep", str(REPO / "search_spaces" / "cam.yaml"), "--set", "epochs"])
    assert "expected KEY=VALUE" in str(res.exception)


def test_resume_keeps_exactly_the_trial_shaping_fields():
    assert set(RS.fields_with_role(Role.TRIAL)) == OLD_RESUME_KEYS | NEW_RESUME_KEYS | {"keep_checkpoints"}
    command_line = SweepOptions(space="cam.yaml", data="/new", trials=9, overrides={"epochs": 5}, max_concurrent=3,
                                address="local", num_cpus=2, worker_start_timeout_s=10, verbose=True, name="s",
                                resume=True, output_dir="/out", baselines=False, classes="dog")
    # a sweep.json as the code before the run spec wrote it: every option, the resolved tracking
    # URI and executor, the name
    saved = {**SweepOptions(space="old.yaml", data="/old", trials=2, overrides={"epochs": 1}, executor="train",
                            num_workers=2, cpus_per_worker=0.5, searcher="random", search_seed=3, split_seed=4,
                            experiment="e", eval_max_images=8, num_overlays=0, log_model=False, early_stopping=False,
                            max_failures=0, use_gpu=True, max_concurrent=1, num_cpus=4,
                            classes="person", gpus_per_trial=0.5, loader_workers=3, precision="bf16",
                            memory_format="channels_last", keep_checkpoints=True).model_dump(exclude={"verbose"}),
             "tracking_uri": "sqlite:////old/mlflow.db", "name": "s"}
    resumed = RS.resumed_options(command_line, saved)
    assert (resumed.trials, resumed.data, resumed.overrides) == (2, "/old", {"epochs": 1})
    assert (resumed.max_concurrent, resumed.address, resumed.num_cpus) == (3, "local", 2)
    for name in SweepOptions.model_fields:
        source = saved if RS.role_of(name) is Role.TRIAL else command_line.model_dump()
        assert getattr(resumed, name) == source[name], name
        if name != "name":  # the test can tell which one was taken
            assert saved.get(name) != getattr(command_line, name), name


def test_resume_of_an_older_sweep_json_keeps_the_command_line_for_missing_keys():
    command_line = SweepOptions(space="cam.yaml", trials=9, max_failures=1)
    resumed = RS.resumed_options(command_line, {"trials": 3, "name": "x", "some_future_key": 1})
    assert (resumed.trials, resumed.max_failures) == (3, 1)


def test_saved_sweep_json_holds_every_trial_shaping_field(tmp_path):
    # run_sweep writes opts.model_dump() (plus the resolved URI and name): each field resume keeps is in it
    dumped = json.loads(json.dumps(SweepOptions(space="s").model_dump()))
    assert set(RS.fields_with_role(Role.TRIAL)) <= set(dumped)


def test_per_trial_fields_are_the_trial_spec_fields_the_options_share():
    shared = set(SweepOptions.model_fields) & set(TrialSpec.model_fields)
    assert set(RS.per_trial_fields()) == shared
    assert set(RS.per_trial_fields()) <= set(RS.fields_with_role(Role.TRIAL))
    with pytest.raises(ValueError, match="Role.TRIAL"):
        RS.option(1, role=Role.PLACE, cli=None, per_trial=True)


@pytest.mark.parametrize("executor", ["inline", "train"])
def test_the_trial_spec_carries_every_per_trial_field(monkeypatch, tmp_path, executor):
    from ray import tune
    from ray.tune.integration import ray_train

    from weakbench.platform import engine
    from weakbench.platform import launch

    values = dict(data="/data/x", classes="person", tracking_uri="sqlite:///x.db", experiment="exp", num_workers=1,
                  use_gpu=False,
                  cpus_per_worker=0.5, eval_max_images=7, log_model=False, num_overlays=2, gpus_per_trial=0.5,
                  loader_workers=3, precision="bf16", memory_format="channels_last", keep_checkpoints=True)
    if executor == "train":
        values.update(num_workers=2, use_gpu=True)
    assert sorted(values) == sorted(RS.per_trial_fields())
    opts = SweepOptions(space="s.yaml", executor=executor, max_failures=1, **values)
    ctx = launch.SweepContext(opts=opts, method="cam", data_cache=str(tmp_path / "cache"),
                              splits_path=str(tmp_path / "splits.json"), sweep_dir=str(tmp_path), parent_run_id="p",
                              sweep_id="sw", seed_values=[10, 11]).model_dump()
    got = {}

    class _Ctx:
        def get_trial_id(self):
            return "t1"

    monkeypatch.setattr(tune, "get_context", lambda: _Ctx())
    monkeypatch.setattr(ray_train, "TuneReportCallback", lambda: "callback")  # needs a Tune session
    monkeypatch.setattr(engine, "run_inline_in_tune", lambda spec: got.update(spec=spec))
    monkeypatch.setattr(engine, "run_segments", lambda spec, **kw: got.update(spec=spec, **kw))
    launch._trial({"lr": 0.1, "__trial_index__": 1}, ctx)
    spec: TrialSpec = got["spec"]
    for name, value in values.items():
        field = TrialSpec.model_fields[name]
        if executor == "train" and not field.is_required():
            assert field.default != value, name  # the test can tell the sweep's value from TrialSpec's default
        assert getattr(spec, name) == value, name
    assert (spec.method, spec.params, spec.parent_run_id, spec.sweep_id, spec.trial_id) == ("cam", {"lr": 0.1, "seed": 11},
                                                                                            "p", "sw", "t1")
    assert (spec.trial_dir, spec.products_dir) == (str(tmp_path / "trials" / "t1"), str(tmp_path / "products"))
    assert (spec.data_cache, spec.splits_path, spec.run_name) == (str(tmp_path / "cache"), str(tmp_path / "splits.json"),
                                                                  "cam-t1")
    if executor == "train":
        assert got["max_failures"] == 1 and got["storage_path"] == str(tmp_path / "train")
