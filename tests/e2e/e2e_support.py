"""Helpers shared by the e2e tests (a plain module: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from devstack import kube as devstack_kube
from devstack import processes


@dataclasses.dataclass
class OperatorProcess:
    process: processes.ManagedProcess
    liveness_port: int
    metrics_port: int

    def metrics_text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop(timeout_seconds=20)


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        return bool(response.status == 200)


def get_json(kube: devstack_kube.ControlPlane, *args: str) -> Any:
    return json.loads(kube.kubectl(*args, "-o", "json").stdout)


def wait_for(
    condition: Callable[[], Any], *, timeout_seconds: float, what: str, interval: float = 0.5
) -> Any:
    """Poll until ``condition()`` is truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout_seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout_seconds:.0f}s waiting for {what}; last: {last!r}"
    )
