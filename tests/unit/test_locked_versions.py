"""The test bed runs exactly the locked versions (requirements/test-bed.txt), no more, no
fewer: the lock is what `make setup` installs and what a new lock is proven against, and the
broker code copies wire formats of kombu and py-amqp, whose versions it therefore pins."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging import markers
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
# Ours (installed editable from the checkout, not from the lock) and the installer itself.
NOT_LOCKED = {"celery-reconciler", "celery-reconciler-worker", "pip"}


def locked(lock: Path) -> dict[str, str]:
    """Name -> version of every pin whose environment marker holds here."""
    pins = re.findall(
        r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?", lock.read_text(), re.M
    )
    return {
        canonicalize_name(name): version
        for name, version, marker in pins
        if not marker.strip() or markers.Marker(marker.strip()).evaluate()
    }


def test_every_locked_requirement_has_hashes() -> None:
    for lock in LOCKS.glob("*.txt"):
        text = lock.read_text()
        assert locked(lock)
        for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[-1]):
            if "==" in block.splitlines()[0]:
                assert "--hash=sha256:" in block, f"{lock.name}: {block.splitlines()[0]}"


def test_the_locks_pin_what_the_broker_code_copies() -> None:
    for lock in ("test-bed.txt", "image.txt"):
        pins = locked(LOCKS / lock)
        for package in ("celery", "kombu", "amqp", "redis", "psycopg"):
            assert package in pins, f"{lock} does not pin {package}"


def test_the_image_lock_agrees_with_the_test_bed_lock() -> None:
    image, test_bed = locked(LOCKS / "image.txt"), locked(LOCKS / "test-bed.txt")
    assert {name: test_bed.get(name) for name in image} == image


def test_the_venv_holds_exactly_the_locked_versions() -> None:
    pins = locked(LOCKS / "test-bed.txt")
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    unlocked = sorted(set(installed) - set(pins) - NOT_LOCKED)
    missing = sorted(set(pins) - set(installed))
    differing = {
        name: (installed[name], version)
        for name, version in pins.items()
        if name in installed and installed[name] != version
    }
    assert (unlocked, missing, differing) == ([], [], {})
