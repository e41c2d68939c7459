"""Fixtures shared by every test level: the real servers of devstack, started once per session.

Each server runs in the session's temporary directory on a free loopback port and is stopped
by PID at the end. A component that is missing raises ``ComponentMissing`` (an error, never
a skip). Tests that take ``broker_url`` or ``private_broker`` run once per broker (Redis,
RabbitMQ). When a test fails, the tail of every running server's log is attached to its report.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_client

from devstack import kube as devstack_kube
from devstack import node as devstack_node
from devstack import postgres as devstack_postgres
from devstack import processes
from devstack import rabbitmq as devstack_rabbitmq
from devstack import redis as devstack_redis

BROKERS = ("redis", "rabbitmq")

_database_numbers = itertools.count()
_redis_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[devstack_postgres.PostgresServer]:
    server = devstack_postgres.start(tmp_path_factory.mktemp("postgres"))
    yield server
    server.remove()


@pytest.fixture
def postgres(postgres_server: devstack_postgres.PostgresServer) -> devstack_postgres.PostgresServer:
    """The session's PostgreSQL server, (re)started if a test stopped it."""
    if not postgres_server.process.running():
        postgres_server.start()
    return postgres_server


@pytest.fixture
def database_dsn(postgres: devstack_postgres.PostgresServer) -> str:
    """A fresh, empty database per test, so tests never see each other's rows."""
    return postgres.create_database(f"test_{next(_database_numbers)}_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack_redis.RedisServer]:
    server = devstack_redis.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: devstack_redis.RedisServer) -> str:
    """A database of its own on the session's Redis: each test starts with empty queues and
    never touches another test's (no FLUSHALL of a shared server)."""
    if not redis_server.process.running():
        redis_server.start()
    url = redis_server.database_url(1 + next(_redis_numbers) % (devstack_redis.DATABASES - 1))
    redis_client.Redis.from_url(url).flushdb()  # a number reused after DATABASES - 1 tests
    return url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[devstack_redis.RedisServer]:
    """A Redis of the test's own, which it may kill or restart."""
    server = devstack_redis.start(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[devstack_rabbitmq.RabbitMQServer]:
    server = devstack_rabbitmq.start(tmp_path_factory.mktemp("rabbitmq"))
    yield server
    server.remove()


@pytest.fixture
def amqp_url(rabbitmq_server: devstack_rabbitmq.RabbitMQServer) -> str:
    """A virtual host of its own on the session's RabbitMQ: each test starts with no queues."""
    if not rabbitmq_server.process.running():
        rabbitmq_server.start()
    return rabbitmq_server.add_vhost(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once on Redis and once on RabbitMQ: the promise does not
    depend on the broker, and neither may the tests that prove it."""
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url")
    return url


PrivateBroker = devstack_redis.RedisServer | devstack_rabbitmq.RabbitMQServer


@pytest.fixture(params=BROKERS)
def private_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker of the test's own (Redis, then RabbitMQ), which it may kill or restart."""
    server: PrivateBroker
    if request.param == "redis":
        server = devstack_redis.start(tmp_path)
        yield server
        server.stop()
    else:
        server = devstack_rabbitmq.start(tmp_path)
        yield server
        server.remove()


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack_kube.ControlPlane]:
    plane = devstack_kube.start(tmp_path_factory.mktemp("kube"))
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def node(
    kube: devstack_kube.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[devstack_node.Node]:
    """A real node (containerd, runc, kubelet, kube-scheduler) running the project's image."""
    workdir = tmp_path_factory.mktemp("node")
    started = devstack_node.start(kube, workdir)
    yield started
    started.stop()
    devstack_node.remove_state(workdir)


@pytest.fixture
def namespace(kube: devstack_kube.ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def other_namespace(kube: devstack_kube.ControlPlane) -> Iterator[str]:
    """A second namespace of the test's own, for what crosses namespaces."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed:
        for name, process in sorted(processes.RUNNING.items()):
            report.sections.append(
                (f"log of {name} ({process.log_path})", processes.log_tail(process.log_path))
            )
    return report  # type: ignore[return-value]
