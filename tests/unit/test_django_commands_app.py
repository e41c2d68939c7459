"""The operator's Django app (the original management command names) under its new name,
and under the old one for a release, with a DeprecationWarning saying what to write instead.

The old name, ``celery_reconciler.contrib.django``, read like the worker package's
``celery_reconciler_worker.django`` (``fenced_atomic``): a user would add the wrong one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import django
    from django.conf import settings
    settings.configure(INSTALLED_APPS=[{app!r}])
    django.setup()
    from django.core.management import get_commands, load_command_class
    commands = get_commands()
    loaded = {{name: load_command_class(app, name).help for name, app in commands.items()
              if app.startswith("celery_reconciler")}}
print(json.dumps({{
    "check_processing_status": commands.get("check_processing_status"),
    "retry_unprocessed_entries": commands.get("retry_unprocessed_entries"),
    "loaded": sorted(loaded),
    "deprecations": [str(w.message) for w in caught if w.category is DeprecationWarning
                     and "celery_reconciler" in str(w.message)],
}}))
"""


def commands_of(app: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(app=app)],
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, object] = json.loads(done.stdout)
    return found


def test_the_app_gives_the_original_command_names() -> None:
    found = commands_of("celery_reconciler.contrib.django_commands")
    assert found["check_processing_status"] == "celery_reconciler.contrib.django_commands"
    assert found["retry_unprocessed_entries"] == "celery_reconciler.contrib.django_commands"
    assert found["loaded"] == ["check_processing_status", "retry_unprocessed_entries"]
    assert found["deprecations"] == []


@pytest.mark.parametrize("command", ["check_processing_status", "retry_unprocessed_entries"])
def test_the_old_name_still_works_for_a_release_and_says_what_to_write_instead(
    command: str,
) -> None:
    found = commands_of("celery_reconciler.contrib.django")
    assert found[command] == "celery_reconciler.contrib.django"
    assert command in found["loaded"]  # type: ignore[operator]
    (warning,) = found["deprecations"]  # type: ignore[misc]
    assert "celery_reconciler.contrib.django_commands" in str(warning)
