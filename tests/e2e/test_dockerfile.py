"""The image's commands exist in the installed package, the wheel the Dockerfile installs
holds what the image runs, and the Dockerfile passes hadolint.

The tests run the project as an editable install, which finds every module in the checkout,
so they cannot see a package the wheel leaves out: that is how ``celery_app.demo`` once went
missing from the image. Hence one test builds the two wheels (the operator's and the
worker's) from exactly the files the Dockerfile copies into its builder stage and reads their
file lists. The image itself is
built and run in test_image.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from devstack import kube as devstack_kube

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def _instruction(name: str) -> list[str]:
    """The exec-form (JSON) argument of the final stage's ENTRYPOINT or CMD."""
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert found, f"Dockerfile has no exec-form {name}"
    value: list[str] = json.loads(found[-1])
    return value


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_is_clean() -> None:
    linted = _run(str(VENV_BIN / "hadolint"), str(DOCKERFILE))
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), users


def test_entrypoint_and_cmd_run_from_the_installed_package() -> None:
    entrypoint, command = _instruction("ENTRYPOINT"), _instruction("CMD")
    assert entrypoint == ["celery-reconciler"]
    executable = VENV_BIN / entrypoint[0]
    assert executable.exists(), f"{executable} missing: is the console script in pyproject?"
    top = _run(str(executable), "--help")
    assert top.returncode == 0, top.stderr
    sub = _run(str(executable), *command[:1], "--help")
    assert sub.returncode == 0, sub.stderr
    for flag in command[1:]:
        assert flag in sub.stdout, f"CMD passes {flag}, which `{command[0]} --help` lacks"


def test_every_flag_the_chart_passes_is_known_to_the_cli(
    kube: devstack_kube.ControlPlane,
) -> None:
    flags: set[str] = set()
    for values in ([], ["--set-json", 'watch.namespaces=["a"]', "--set", "peering.enabled=false"]):
        rendered = kube.helm("template", "r", str(ROOT / "charts" / "celery-reconciler"), *values)
        for doc in yaml.safe_load_all(rendered.stdout):
            if doc and doc["kind"] == "Deployment" and "demo-worker" not in doc["metadata"]["name"]:
                args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
                assert args[0] == "run"
                flags.update(arg for arg in args if arg.startswith("--"))
    assert flags >= {"--all-namespaces", "--namespace", "--liveness", "--metrics-port"}
    help_text = _run(str(VENV_BIN / "celery-reconciler"), "run", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert sorted(flag for flag in flags if flag not in help_text.stdout) == []


def test_the_demo_worker_command_finds_its_app() -> None:
    """The chart runs `celery -A celery_app.demo worker`: resolve the app the way -A does."""
    assert (VENV_BIN / "celery").exists()
    probe = _run(
        sys.executable, "-c",
        "import celery; from celery.app.utils import find_app; "
        "app = find_app('celery_app.demo'); "
        "assert isinstance(app, celery.Celery), app",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr


def _builder_context() -> list[str]:
    """What the builder stage COPYs from the build context (not ``--from`` another stage)."""
    builder = DOCKERFILE.read_text().split("\nFROM ")[1]
    sources: list[str] = []
    for line in re.findall(r"^COPY\s+(?!--)(.+)$", builder, flags=re.MULTILINE):
        sources += line.split()[:-1]
    return sources


def test_the_wheels_hold_every_package_the_image_runs_and_no_test_harness(
    tmp_path: Path,
) -> None:
    """The builder stage builds two wheels, the operator's (.) and the worker's
    (./celery_app); between them they hold every package of the source tree, each once."""
    context = tmp_path / "context"
    for source in _builder_context():
        origin = ROOT / source
        if origin.is_dir():
            # What .dockerignore keeps out: local build leftovers.
            ignored = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
            shutil.copytree(origin, context / source, ignore=ignored)
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, context / source)
    contents: dict[str, list[str]] = {}
    for project, distribution in (
        (".", "celery_reconciler"),
        ("celery_app", "celery_reconciler_worker"),
    ):
        wheels = tmp_path / "wheels" / distribution
        built = _run(
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--wheel-dir", str(wheels), str(context / project),
        )  # fmt: skip
        assert built.returncode == 0, built.stdout + built.stderr
        (wheel,) = wheels.glob(f"{distribution}-*.whl")
        contents[distribution] = zipfile.ZipFile(wheel).namelist()
    packages = {
        distribution: {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
        for distribution, names in contents.items()
    }
    # Every package of the source tree, found by walking it, not by a list that could go
    # stale the same way pyproject's did; the worker's package belongs to the worker wheel.
    worker_root = ROOT / "celery_app" / "celery_reconciler_worker"
    wanted: dict[str, set[str]] = {"celery_reconciler": set(), "celery_reconciler_worker": set()}
    for init in (ROOT / "operator" / "celery_reconciler").rglob("__init__.py"):
        wanted["celery_reconciler"].add(str(init.parent.relative_to(ROOT / "operator")))
    for init in (ROOT / "celery_app").rglob("__init__.py"):
        if "build" in init.relative_to(ROOT).parts:
            continue  # a local `pip wheel ./celery_app` leaves a copy of the package there
        if init.parent.is_relative_to(worker_root):
            wanted["celery_reconciler_worker"].add(
                str(init.parent.relative_to(ROOT / "celery_app"))
            )
        else:
            wanted["celery_reconciler"].add(str(init.parent.relative_to(ROOT)))
    assert "celery_app/demo" in wanted["celery_reconciler"]
    assert packages == wanted
    for names in contents.values():
        assert [name for name in names if name.startswith(("devstack/", "tests/"))] == []
    assert "celery_reconciler/py.typed" in contents["celery_reconciler"]
    assert "celery_reconciler_worker/py.typed" in contents["celery_reconciler_worker"]
