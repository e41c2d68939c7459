"""docs/api-reference.md is generated from the CRDs and never edited by hand: prove it.

Rendering again with the script `make docs` runs and comparing the text catches a CRD change
without a regenerated page (or a hand edit of the page), the way test_manifests_in_sync.py
does for manifests/.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "api-reference.py"
PAGE = ROOT / "docs" / "api-reference.md"
CRDS = ROOT / "charts" / "celery-reconciler" / "files" / "crds"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_page_matches_the_crds() -> None:
    assert PAGE.read_text() == generator().render(), (
        "docs/api-reference.md drifted from the CRDs: run `make docs`"
    )


def test_every_field_and_cel_message_is_on_the_page() -> None:
    module = generator()
    page = PAGE.read_text()
    for crd_file in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        [version] = crd["spec"]["versions"]
        root = version["schema"]["openAPIV3Schema"]
        for path, schema, _ in module.fields(root):
            assert f"| `{path}` |" in page, f"{crd_file.name}: {path} is missing"
            for rule in schema.get("x-kubernetes-validations", ()):
                assert rule["message"] in page, f"{crd_file.name}: CEL message of {path}"
        for column in version.get("additionalPrinterColumns", ()):
            assert f"| {column['name']} |" in page, f"{crd_file.name}: column {column['name']}"
