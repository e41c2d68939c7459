"""The worker package's README install lines, run as written, each in a fresh venv.

A new user copies the line for their broker from ``celery_app/README.md`` (the page an index
shows) into their worker image. One such line once named plain ``redis`` where Celery's
Redis transport needs ``celery[redis]``, and the worker failed on import. Here each line —
Redis, RabbitMQ — is read from the README and installed into a fresh venv (no system site
packages), with one change only: the name ``celery-reconciler-worker`` points at the wheel
built from this checkout (it is not published, and a name resolved against an index could be
someone else's package). A user's app of a few lines then takes the recommended settings and
sends and receives a message through the real broker of that line, and psycopg finds libpq.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from test_worker_wheel import _build_wheel, _clean_env, _run

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "celery_app" / "README.md"
DISTRIBUTION = "celery-reconciler-worker"

PROBE = """
import os

import psycopg
from celery import Celery

from celery_reconciler_worker import reliable

app = Celery("readme_user_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(reliable.recommended_settings(lease_seconds=60))
with app.connection_for_write() as connection:
    connection.ensure_connection(max_retries=3)
    queue = connection.SimpleQueue("readme-probe")
    queue.put({"sent": "by the README's install"})
    message = queue.get(timeout=10)
    message.ack()
print("received", message.payload["sent"], "libpq", psycopg.pq.version())
"""


def install_lines() -> dict[str, list[str]]:
    """``{"redis": [requirement, ...], "rabbitmq": [...], ...}`` from the Install section: each
    ``pip install`` line under the comment that names its broker."""
    section = re.search(r"^## Install\n(.*?)^## ", README.read_text(), re.S | re.M)
    assert section, "celery_app/README.md has no Install section"
    block = re.search(r"```sh\n(.*?)```", section[1], re.S)
    assert block, "the Install section has no sh block"
    lines: dict[str, list[str]] = {}
    label = ""
    for line in block[1].splitlines():
        if line.startswith("#"):
            label = line.lstrip("# ").split()[0].lower()
        elif line.startswith("pip install "):
            lines[label] = shlex.split(line)[2:]
    return lines


def test_the_readme_has_an_install_line_for_each_broker() -> None:
    lines = install_lines()
    assert {"redis", "rabbitmq"} <= set(lines), lines
    for requirements in lines.values():
        assert any(r.split("[")[0] == DISTRIBUTION for r in requirements), requirements


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_readme_install_line_runs_a_worker_app_on_its_broker(
    broker: str, tmp_path: Path, redis_url: str, amqp_url: str
) -> None:
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=_clean_env(venv))
    requirements = [
        f"{r} @ {wheel.as_uri()}" if r.split("[")[0] == DISTRIBUTION else r
        for r in install_lines()[broker]
    ]
    env = _clean_env(venv)
    uv = Path(sys.executable).with_name("uv")
    _run(
        [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *requirements],
        cwd=tmp_path,
        env=env,
    )
    env["CELERY_BROKER_URL"] = redis_url if broker == "redis" else amqp_url
    (tmp_path / "readme_user_app.py").write_text(PROBE)
    output = _run([str(venv / "bin" / "python"), "readme_user_app.py"], cwd=tmp_path, env=env)
    assert "received by the README's install" in output, output
