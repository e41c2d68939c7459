"""manifests/ is rendered from the chart and never edited by hand: prove both, with real tools.

Drift is caught by rendering again with the same script `make manifests` runs and comparing
bytes; the rendered files are then applied to the real apiserver the way the README tells a
person to (crds.yaml first, then install.yaml).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devstack import kube as devstack_kube

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
RENDERED = ("crds.yaml", "install.yaml")


def _render(kube: devstack_kube.ControlPlane, out: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "render-manifests.sh"), str(out)],
        check=True,
        capture_output=True,
        env={**kube.env(), "HELM": str(kube.bin_dir / "helm")},
    )


def test_committed_manifests_match_the_chart(
    kube: devstack_kube.ControlPlane, tmp_path: Path
) -> None:
    _render(kube, tmp_path)
    drifted = [
        name for name in RENDERED if (tmp_path / name).read_text() != (MANIFESTS / name).read_text()
    ]
    assert drifted == [], f"{drifted} drifted from charts/celery-reconciler: run `make manifests`"


def test_crds_then_install_apply_to_the_real_apiserver(kube: devstack_kube.ControlPlane) -> None:
    kube.kubectl("apply", "-f", str(MANIFESTS / "crds.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    # The Namespace is in install.yaml, but a dry run creates nothing for the objects in it.
    if kube.kubectl("get", "namespace", "celery-reconciler", check=False).returncode != 0:
        kube.kubectl("create", "namespace", "celery-reconciler")
    applied = kube.kubectl(
        "apply", "--dry-run=server", "-f", str(MANIFESTS / "install.yaml"), check=False
    )
    assert applied.returncode == 0, applied.stderr
    for kind in ("deployment.apps/celery-reconciler", "clusterrole.rbac.authorization.k8s.io"):
        assert kind in applied.stdout


def test_samples_are_valid_and_tiny(kube: devstack_kube.ControlPlane, namespace: str) -> None:
    kube.kubectl("apply", "-f", str(MANIFESTS / "crds.yaml"))
    kube.kubectl(
        "wait", "--for=condition=Established",
        "crd/processingpolicies.celery-reconciler.io", "--timeout=30s",
    )  # fmt: skip
    applied = kube.kubectl(
        "-n", namespace, "apply", "--dry-run=server", "-f", str(MANIFESTS / "samples"), check=False
    )
    assert applied.returncode == 0, applied.stderr
    for sample in sorted((MANIFESTS / "samples").glob("*.yaml")):
        text = sample.read_text()
        assert text.startswith("#"), f"{sample.name} must open with a comment saying what it is"
        assert len(text.splitlines()) <= 30, f"{sample.name} is not tiny"


def _leaf_paths(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_documented_and_the_chart_readme_is_current() -> None:
    readme_script = ROOT / "scripts" / "chart-readme.py"
    values_text = (ROOT / "charts" / "celery-reconciler" / "values.yaml").read_text()
    spec = importlib.util.spec_from_file_location("chart_readme", readme_script)
    assert spec is not None and spec.loader is not None
    chart_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart_readme)
    documented = {key for key, _ in chart_readme.documented_keys(values_text.splitlines())}
    undocumented = [
        leaf
        for leaf in _leaf_paths(yaml.safe_load(values_text))
        if not any(leaf == key or leaf.startswith(f"{key}.") for key in documented)
    ]
    assert undocumented == [], "give each of these a `# --` comment in values.yaml"
    checked = subprocess.run(
        [sys.executable, str(readme_script), "--check"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
