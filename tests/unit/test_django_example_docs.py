"""The coming-from-celery-beat page shows the Django example as it is and runs as it runs.

Each code block marked ``<!-- example: PATH -->`` must appear verbatim in that file of the
repository, and the runbook block (``devstack.django_example.runbook``, which the e2e test
executes) must name what the example has: its directory, its policy file and the Secrets
that policy reads.
"""

from __future__ import annotations

import re
import shlex

import yaml

from devstack import django_example

EXAMPLE_BLOCK = re.compile(
    r"^<!-- example: (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)^```$", re.M | re.S
)


def test_every_example_block_on_the_page_is_in_the_file_it_names() -> None:
    page = django_example.RUNBOOK_PAGE.read_text()
    blocks = list(EXAMPLE_BLOCK.finditer(page))
    assert len(blocks) >= 5
    for block in blocks:
        source = (django_example.ROOT / block["path"]).read_text()
        assert block["code"] in source, f"the page's block for {block['path']} differs from it"


def test_the_runbook_runs_the_example_with_its_own_policy_and_the_secrets_it_names() -> None:
    steps = django_example.runbook()
    assert {step.cwd for step in steps} == {django_example.EXAMPLE_DIR}
    commands = [step.command for step in steps]
    assert commands[0] == "python manage.py migrate"
    workers = [step.command for step in steps if step.background]
    assert workers and all(c.startswith("celery -A mindjourney worker") for c in workers)
    applied = [shlex.split(c)[-1] for c in commands if " apply -f " in c]
    assert applied == ["processingpolicy.yaml"]
    policy = yaml.safe_load((django_example.EXAMPLE_DIR / applied[0]).read_text())
    source, task = policy["spec"]["source"], policy["spec"]["task"]
    created = {
        found.group(1) for c in commands if (found := re.search(r"create secret generic (\S+)", c))
    }
    assert created == {source["databaseSecretRef"]["name"], task["brokerSecretRef"]["name"]}
    assert task["name"] == "insights.tasks.extract_insights_task"
