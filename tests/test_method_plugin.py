"""Methods are plugins found through package entry points (group ``weakbench.methods``).

A toy method package is written into the test's folder with its own ``pyproject.toml``, installed
with pip into a folder the test owns (``pip install --target``; nothing is installed into the
environment), and put on ``PYTHONPATH`` of ``python -m weakbench`` subprocesses: it is listed by
``weakbench methods`` and completes a 2-trial sweep on real Ray and MLflow. A package whose entry
point does not import makes ``weakbench methods`` exit 2 with one line naming the entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weakbench.core import conventions as C
from weakbench.platform import tracking

REPO = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""A toy out-of-tree method: the centre-Gaussian baseline under its own name."""
from weakbench.methods.base import register_method
from weakbench.methods.baselines import CenterGaussian


@register_method("toy_prior")
class ToyPrior(CenterGaussian):
    """Toy plugin: the centre Gaussian prior (no training), from an out-of-tree package."""
'''

TOY_SPACE = """
method: toy_prior
metric: val/max_box_acc_v2
mode: max
fixed:
  input_size: 64
search:
  sigma: {grid: [0.2, 0.3]}
  seed: {grid: [0]}
scheduler: none
"""


def _package(src: Path, dist: str, module: str, body: str, entry_points: dict[str, str]) -> Path:
    src.mkdir(parents=True)
    eps = "\n".join(f'{name} = "{value}"' for name, value in entry_points.items())
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.1.0"

        [project.entry-points."weakbench.methods"]
        """) + eps + f'\n\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    (src / f"{module}.py").write_text(body)
    return src


def _install(src: Path, target: Path) -> None:
    # offline, no build isolation (setuptools from this environment), into a folder of the test's own
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("WEAKBENCH_TRACKING_URI", None)
    return env


def _weakbench(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weakbench", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_plugin")
    site = root / "site"
    _install(_package(root / "src", "weakbench-toy-method", "weakbench_toy_method", TOY_MODULE,
                      {"toy_prior": "weakbench_toy_method:ToyPrior"}), site)
    return site


def test_an_installed_plugin_is_listed(toy_site, tmp_path):
    done = _weakbench(["methods", "--format", "json"], _env(toy_site), tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert "toy_prior" in rows and "cam" in rows  # beside the built-ins
    assert rows["toy_prior"]["description"].startswith("Toy plugin")
    # without the package on the path the method is unknown: the listing came from its entry point
    done = _weakbench(["methods", "--format", "json"], _env(), tmp_path)
    assert done.returncode == 0 and "toy_prior" not in {r["name"] for r in json.loads(done.stdout)}


def test_a_broken_plugin_is_one_line_naming_its_entry_point(toy_site, tmp_path):
    broken = tmp_path / "broken_site"
    _install(_package(tmp_path / "src", "weakbench-broken-method", "weakbench_broken_method",
                      "import weakbench_no_such_dependency\n", {"broken": "weakbench_broken_method:Broken"}), broken)
    done = _weakbench(["methods"], _env(toy_site, broken), tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'broken'" in lines[0] and "weakbench-broken-method" in lines[0] and "weakbench_no_such_dependency" in lines[0]


@pytest.mark.slow
def test_an_installed_plugin_completes_a_two_trial_sweep(toy_site, tmp_path):
    space = tmp_path / "toy_prior.yaml"
    space.write_text(TOY_SPACE)
    out = tmp_path / "runs"
    done = _weakbench(["sweep", str(space), "--trials", "2", "--output-dir", str(out), "--name", "toy",
                       "--address", "local", "--num-cpus", "2", "--eval-max-images", "16"], _env(toy_site), tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = tracking.client_for(tracking.default_tracking_uri(out))
    exp = client.get_experiment_by_name(C.DEFAULT_EXPERIMENT)
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(C.TAG_KIND) == C.KIND_TRIAL]
    assert len(trials) == 2
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags[C.TAG_METHOD] == "toy_prior"
        assert "test/max_box_acc_v2" in run.data.metrics


def test_entry_point_values_a_class_or_a_module_and_must_name_the_method(tmp_path, monkeypatch):
    """In-process: a class value without ``@register_method`` is registered under the entry point's
    name; an entry point whose class registers under another name is refused in one line."""
    from importlib.metadata import EntryPoint

    from weakbench.core.errors import PluginError
    from weakbench.methods import base

    (tmp_path / "weakbench_toy_inline.py").write_text(textwrap.dedent('''
        from weakbench.methods.base import register_method
        from weakbench.methods.baselines import CenterGaussian

        class Undecorated(CenterGaussian):
            """Toy: no decorator."""

        @register_method("toy_inline_named")
        class Named(CenterGaussian):
            """Toy: registered under its own name."""
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        base._load_entry_point(EntryPoint("toy_inline", "weakbench_toy_inline:Undecorated", base.ENTRY_POINT_GROUP))
        assert base.get_method_class("toy_inline").__name__ == "Undecorated"
        with pytest.raises(PluginError, match=r"'toy_other' = 'weakbench_toy_inline:Named'.*registers as 'toy_inline_named'") as err:
            base._load_entry_point(EntryPoint("toy_other", "weakbench_toy_inline:Named", base.ENTRY_POINT_GROUP))
        assert "\n" not in str(err.value)
    finally:
        for name in ("toy_inline", "toy_inline_named", "toy_other"):
            base._REGISTRY.pop(name, None)
            base._LOADED.discard(name)
        sys.modules.pop("weakbench_toy_inline", None)
