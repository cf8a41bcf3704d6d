"""Command-line usage errors through the real entry points (``python -m weakbench`` and the
installed ``weakbench`` console script): one line on stderr naming the command and the option, the
fix, exit status 2; never a traceback. ``weakbench`` alone prints the help and exits 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "80"}


def _entry_points() -> list[list[str]]:
    out = [[sys.executable, "-m", "weakbench"]]
    script = Path(sys.executable).parent / "weakbench"
    if script.is_file():
        out.append([str(script)])
    elif shutil.which("weakbench"):
        out.append([shutil.which("weakbench")])
    return out


ENTRY_POINTS = _entry_points()

# (arguments, words the one line must hold)
CASES = [
    (["registry"], ["weakbench registry", "list", "rollback"]),
    (["dashboard"], ["weakbench dashboard", "build", "serve"]),
    (["sweep", "search_spaces/cam.yaml", "--trails", "2"], ["--trails", "--trials"]),
    (["sweep"], ["weakbench sweep", "SPACE"]),
    (["sweep", "search_spaces/cam.yaml", "--trials", "0"], ["--trials", "0"]),
    (["leaderboard", "--metric"], ["--metric"]),
    (["status", "a", "b"], ["weakbench status", "unexpected extra argument"]),
    (["registry", "list", "--bogus"], ["weakbench registry list", "--bogus"]),
    (["dashboard", "build", "--bogus"], ["weakbench dashboard build", "--bogus"]),
    (["evaluate", "--batch-size", "x"], ["--batch-size", "integer"]),
    (["nosuchcommand"], ["nosuchcommand"]),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: Path(e[-1]).name)
@pytest.mark.parametrize("args,words", CASES, ids=lambda c: " ".join(c) if isinstance(c[0], str) else None)
def test_usage_error_is_one_line_and_exit_2(entry, args, words):
    p = subprocess.run(entry + args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    line = lines[0].lower()
    assert line.startswith("error:")
    for w in words:
        assert w.lower() in line, (w, line)
    assert "--help" in line or "fix:" in line  # the fix, or where to read the options


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: Path(e[-1]).name)
def test_bare_command_prints_help_and_exits_0(entry):
    p = subprocess.run(entry, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    for command in ("sweep", "leaderboard", "status", "register", "registry", "dashboard", "methods"):
        assert command in p.stdout
    assert "Traceback" not in p.stderr


def test_nearest_ranks_by_edit_distance():
    from weakbench.core.errors import edit_distance, nearest

    assert edit_distance("resnet19", "resnet18") == 1 and edit_distance("", "abc") == 3
    assert nearest("resnet19", ["cspresnet50", "resnet18", "resnet101", "eca_resnet33ts"])[0] == "resnet18"


def test_unknown_backbone_suggests_the_nearest_first():
    from weakbench.methods import validate_config
    from weakbench.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet19'.*nearest: resnet18,"):
        validate_config("cam", {"backbone": "resnet19"})


def test_misspelled_set_key_lists_the_nearest_and_valid_keys():
    p = subprocess.run([sys.executable, "-m", "weakbench", "evaluate", "--method", "cam", "--set", "epoch=1", "--no-log"],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert "epoch: not a hyperparameter of 'cam'; nearest: epochs" in p.stderr and "valid: backbone," in p.stderr


@pytest.mark.parametrize("command", [["sweep"], ["evaluate"], ["leaderboard"], ["registry", "list"], ["dashboard", "build"]])
def test_help_fits_80_columns_and_cuts_no_option_name(command):
    p = subprocess.run([sys.executable, "-m", "weakbench", *command, "--help"], capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "…" not in p.stdout and all(len(line) <= 80 for line in p.stdout.splitlines())
    if command == ["sweep"]:
        for name in ("--no-early-stopping", "WEAKBENCH_TRACKING_URI", "MLFLOW_TRACKING_URI", "--dry-run"):
            assert name in p.stdout


def _commands():
    """Every (name, click command) of ``weakbench``, sub-apps included."""
    import typer.main

    from weakbench.cli import app

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield prefix, cmd
            return
        for name, sub in subs.items():
            yield from walk(sub, f"{prefix} {name}".strip())

    yield from walk(typer.main.get_command(app), "")


def test_shared_options_are_declared_once_with_one_precedence():
    from weakbench.core.conventions import TRACKING_URI_ENVVARS

    seen = {}
    for name, cmd in _commands():
        for p in cmd.params:
            if "--tracking-uri" in p.opts:
                # every command: --tracking-uri, then WEAKBENCH_TRACKING_URI, then MLFLOW_TRACKING_URI
                assert list(p.envvar) == list(TRACKING_URI_ENVVARS), name
                seen[name] = p.help
    assert {"sweep", "status", "leaderboard", "register", "predict", "evaluate", "dashboard build"} <= set(seen)
    assert len(set(seen.values())) == 1  # one declaration, one help text
    # no command declares a shared flag of its own: the flags' text appears only where they are declared
    src = {p.name: p.read_text() for p in [REPO / "weakbench" / "cli.py", REPO / "weakbench" / "dashboards" / "cli.py"]}
    for flag in ('"--tracking-uri"', '"--experiment"', '"--output-dir"', '"--report-split"', '"--baseline"', '"--format"'):
        assert not [n for n, text in src.items() if flag in text], flag
