"""Both Python distributions and the Helm chart, built as an index would take them.

Nothing is published: the operator's distribution (``pyproject.toml`` at the root) and the
worker's (``celery_app/pyproject.toml``) are built by the real ``python -m build`` — the sdist
first, then the wheel from that sdist, so a file the sdist forgets breaks the wheel — and
checked by the real ``twine check --strict``, which is what PyPI's upload refuses. The chart is
archived by the real ``helm package`` (the cached control-plane binary) and rendered from the
archive, as a user of a chart repository would install it.

Each build runs on a copy of the sources, so it leaves nothing (``build/``, ``*.egg-info``) in
the checkout, and without build isolation: setuptools comes from the test bed's lock, not from
a download per test run.
"""

from __future__ import annotations

import ast
import email.message
import email.parser
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from devstack import kube

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
CHART = REPOSITORY / "charts" / "celery-reconciler"
# What each distribution's build reads, relative to its project folder.
SOURCES = {
    "operator": (REPOSITORY, ("pyproject.toml", "README.md", "LICENSE", "operator", "celery_app")),
    "worker": (REPOSITORY / "celery_app", ("pyproject.toml", "README.md", "LICENSE", ".")),
}
# Metadata fields a project page on an index shows, each of which must be filled in.
REQUIRED_FIELDS = (
    "Name",
    "Version",
    "Summary",
    "Author",
    "License-Expression",
    "License-File",
    "Requires-Python",
    "Keywords",
    "Description-Content-Type",
)
PROJECT_URLS = ("Homepage", "Documentation", "Source", "Issues")


@dataclass(frozen=True)
class Built:
    """One distribution's project table and the sdist and wheel built from it."""

    project: dict[str, object]
    readme: str
    sdist: Path
    wheel: Path


def _run(command: list[str], *, cwd: Path) -> str:
    result = subprocess.run(
        command, cwd=cwd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}"
    )
    return result.stdout


def _copy_sources(name: str, destination: Path) -> Path:
    folder, entries = SOURCES[name]
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    if entries == ("pyproject.toml", "README.md", "LICENSE", "."):
        shutil.copytree(folder, destination, ignore=ignore)
        return destination
    destination.mkdir()
    for entry in entries:
        source = folder / entry
        if not source.exists():
            continue  # what the build then lacks, the checks below name
        if source.is_dir():
            shutil.copytree(source, destination / entry, ignore=ignore)
        else:
            shutil.copy2(source, destination / entry)
    return destination


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("distributions")
    found: dict[str, Built] = {}
    for name, (folder, _) in SOURCES.items():
        source = _copy_sources(name, root / f"{name}-source")
        out = root / f"{name}-dist"
        _run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
            cwd=root,
        )
        (sdist,) = out.glob("*.tar.gz")
        (wheel,) = out.glob("*.whl")
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        readme = (folder / project["readme"]).read_text() if "readme" in project else ""
        found[name] = Built(project=project, readme=readme, sdist=sdist, wheel=wheel)
    return found


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(path).decode())


def _sdist_metadata(sdist: Path) -> email.message.Message:
    with tarfile.open(sdist) as archive:
        (member,) = [
            m
            for m in archive.getmembers()
            if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")
        ]
        extracted = archive.extractfile(member)
        assert extracted is not None
        return email.parser.Parser().parsestr(extracted.read().decode())


def test_twine_accepts_both_sdists_and_wheels(built: dict[str, Built]) -> None:
    files = [str(path) for b in built.values() for path in (b.sdist, b.wheel)]
    output = _run([sys.executable, "-m", "twine", "check", "--strict", *files], cwd=REPOSITORY)
    assert output.count("PASSED") == 4, output


@pytest.mark.parametrize("name", list(SOURCES))
def test_the_metadata_an_index_shows_is_complete(built: dict[str, Built], name: str) -> None:
    distribution = built[name]
    for metadata in (_wheel_metadata(distribution.wheel), _sdist_metadata(distribution.sdist)):
        missing = [field for field in REQUIRED_FIELDS if not (metadata.get(field) or "").strip()]
        assert missing == [], f"{name}: {missing}"
        assert metadata["Name"] == distribution.project["name"]
        assert metadata["Version"] == distribution.project["version"]
        assert metadata["License-Expression"] == "Apache-2.0"
        assert metadata["Description-Content-Type"] == "text/markdown"
        assert metadata.get_payload().strip() == distribution.readme.strip()
        urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL") or [])
        assert sorted(urls) == sorted(PROJECT_URLS), urls
        assert all(url.startswith("https://") for url in urls.values()), urls
        assert any(
            c.startswith("Development Status ::") for c in metadata.get_all("Classifier") or []
        )
    # The license travels with both archives, not only its name.
    with zipfile.ZipFile(distribution.wheel) as archive:
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    with tarfile.open(distribution.sdist) as archive:
        assert any(n.count("/") == 1 and n.endswith("/LICENSE") for n in archive.getnames())


def test_the_operator_requires_the_worker_it_is_built_with(built: dict[str, Built]) -> None:
    requires = _wheel_metadata(built["operator"].wheel).get_all("Requires-Dist") or []
    worker = built["worker"].project
    assert f"{worker['name']}=={worker['version']}" in requires, requires


def test_the_worker_readme_is_what_an_index_user_needs(built: dict[str, Built]) -> None:
    """The page a user of an index reads: install lines for both brokers, the three lines
    that make a task reconciled, ``fenced_transaction``, and links that work off this
    repository (an index renders no relative link)."""
    readme = _wheel_metadata(built["worker"].wheel).get_payload()
    assert re.search(r'^pip install celery-reconciler-worker "celery\[redis\]"', readme, re.M)
    assert re.search(r"^pip install celery-reconciler-worker celery ", readme, re.M)
    for name in (
        "from celery_reconciler_worker import reliable",
        "reliable.recommended_settings(",
        "base=reliable.ReconciledTask",
        "reliable.fenced_transaction(conn)",
        "fenced_atomic()",
        "CELERY_RECONCILER_DSN",
    ):
        assert name in readme, name
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links and all(link.startswith("https://") for link in links), links
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        ast.parse(block)


def test_helm_package_archives_the_chart_with_its_version_and_image(tmp_path: Path) -> None:
    helm = str(kube.bin_dir() / "helm")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    output = _run([helm, "package", str(CHART), "--destination", str(tmp_path)], cwd=tmp_path)
    archive = tmp_path / f"{chart['name']}-{chart['version']}.tgz"
    assert archive.is_file(), output

    with tarfile.open(archive) as packaged:
        extracted = packaged.extractfile(f"{chart['name']}/Chart.yaml")
        assert extracted is not None
        packaged_chart = yaml.safe_load(extracted.read())
    assert packaged_chart["version"] == chart["version"]
    # The image's tag is the chart's appVersion: the operator's version, which the image
    # built from this repository's Dockerfile installs.
    operator_version = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"][
        "version"
    ]
    assert packaged_chart["appVersion"] == operator_version

    # Installed from the archive, the chart renders what it renders from this folder.
    for values in ([], ["--set", "demoWorker.enabled=true"]):
        from_archive = _run([helm, "template", "release", str(archive), *values], cwd=tmp_path)
        from_folder = _run([helm, "template", "release", str(CHART), *values], cwd=tmp_path)
        assert from_archive == from_folder
        images = set(re.findall(r'^\s*image:\s*"?([^"\s]+)"?', from_archive, re.M))
        assert images == {f"{chart['name']}:{operator_version}"}, images


def test_what_building_leaves_in_a_checkout_stays_out_of_git_status() -> None:
    """The README's ``pip wheel ... --wheel-dir dist ./celery_app`` and ``python -m build``
    write these; none may show as untracked in the user's checkout."""
    leftovers = [
        "dist/celery_reconciler_worker-0.1.0-py3-none-any.whl",
        "celery_app/dist/celery_reconciler_worker-0.1.0.tar.gz",
        "celery_app/build/lib/celery_reconciler_worker/task.py",
        "celery_app/celery_reconciler_worker.egg-info/PKG-INFO",
        "build/lib/celery_reconciler/broker.py",
        "operator/celery_reconciler.egg-info/PKG-INFO",
    ]
    ignored = _run(["git", "check-ignore", "--no-index", *leftovers], cwd=REPOSITORY)
    assert sorted(ignored.split()) == sorted(leftovers)
