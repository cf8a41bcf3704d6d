"""The deploy/ files are checked: the Ray launcher config against the autoscaler schema shipped in
the ``ray`` package, the KubeRay manifests and the MLflow compose file for the fields their tools
require, and every ``weakbench`` command they run against the CLI itself."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml

from weakbench.cli import app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _check_weakbench_command(cmdline: str) -> None:
    """``cmdline`` is ``weakbench <subcommand> …`` with only options that subcommand has."""
    argv = shlex.split(cmdline)
    assert argv[0] == "weakbench", argv
    root = typer.main.get_command(app)
    sub = root.commands[argv[1]]
    # typer vendors its own click: options are recognised by their kind, not by click's class
    known = {o for p in sub.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
    used = [a for a in argv[2:] if a.startswith("--")]
    assert set(used) <= known, sorted(set(used) - known)
    ctx = sub.make_context(argv[1], argv[2:], resilient_parsing=False)  # click parses it as the CLI would
    assert ctx.params


def test_cluster_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    schema = _ray_schema()
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))  # what `ray up` runs: defaults filled in, then every check
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for name, node in cfg["available_node_types"].items():
        assert node.get("min_workers", 0) <= node.get("max_workers", cfg["max_workers"]) <= cfg["max_workers"], name
    assert cfg["docker"]["image"].startswith("weakbench")


def test_the_schema_check_is_not_vacuous():
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    bad = dict(cfg, max_worker=3)  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())
    del bad["max_worker"]
    bad["available_node_types"] = {k: {kk: vv for kk, vv in v.items() if kk != "resources"}
                                   for k, v in cfg["available_node_types"].items()}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    assert spec["containers"], template
    for c in spec["containers"]:
        assert c["name"] and c["image"], c
    mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert mounts <= volumes, (mounts, volumes)
    return spec["containers"]


def test_kuberay_raycluster_has_the_fields_kuberay_requires():
    doc = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    spec = doc["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__  # the image's Ray and the one the operator expects
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    assert _containers(head["template"])[0]["image"].startswith("weakbench")
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert _containers(group["template"])[0]["image"].startswith("weakbench")


def test_kuberay_rayjob_runs_the_cli():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-sweep.yaml").read_text())
    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "rayClusterSpec" in spec or spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    _check_weakbench_command(spec["entrypoint"])
    assert "--address" in spec["entrypoint"] and "--tracking-uri" in spec["entrypoint"]


def test_mlflow_compose_file():
    doc = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yaml").read_text())
    services = doc["services"]
    assert {"postgres", "mlflow"} <= set(services)
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
    env = services["postgres"]["environment"]
    cmd = services["mlflow"]["command"]
    m = re.search(r"--backend-store-uri\s+(\S+)", cmd)
    assert m, cmd
    uri = m.group(1)
    # the scheme that works with psycopg2-binary (plain postgresql:// looks for another driver)
    assert uri.startswith("postgresql+psycopg2://"), uri
    assert f"{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}" in uri
    assert "postgres" in services["mlflow"]["depends_on"]
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith("/")}
    assert named <= set(doc.get("volumes", {})), named
    assert shlex.split(cmd)[:2] == ["mlflow", "server"]


def test_container_image_runs_the_same_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:", text, re.M)
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in text  # the image's Ray matches the tested one
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), "the image installs this package"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "weakbench.cli:main"
    assert not re.search(r"^ENTRYPOINT", text, re.M)  # launchers pass their own commands


def test_readme_cluster_command_is_valid():
    text = (DEPLOY / "README.md").read_text()
    block = re.search(r"```bash\n(weakbench sweep .*?)```", text, re.S).group(1)
    _check_weakbench_command(" ".join(line.rstrip("\\").strip() for line in block.splitlines()))
