"""The database and broker of one policy, resolved from its Secrets at every sweep.

The Secrets are read through the operator's short cache (``kube.read_secret_value``) and
checked where their names are known, so an error names the Secret to fix. The connections
are switched only when a Secret's value changes, and both are shared with the other
policies that name the same DSN or broker URL (``pools``, ``publishers``). The pod-restart
hook borrows from a reserve of connections of its own: it runs while a sweep may hold one
inside a transaction, and must not queue behind sweeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from celery_reconciler import broker, kube, ledger, pools, publishers, reconcile
from celery_reconciler import policy as policy_module


@dataclasses.dataclass
class Connections:
    dsn: str | None = None
    shared: pools.SharedDatabase | None = None
    db: reconcile.Sessions | None = None
    rescue_db: reconcile.Sessions | None = None
    broker_url: str | None = None
    transport_options: dict[str, Any] | None = None
    shared_publisher: publishers.SharedPublisher | None = None
    publisher: broker.Publisher | None = None

    def read_secrets(
        self, policy: policy_module.Policy, *, namespace: str, afresh: bool
    ) -> tuple[str, str]:
        """The DSN and broker URL the policy's Secrets hold now; ``afresh`` skips the cache."""
        database, broker_ref = policy.source.database_secret, policy.task.broker_secret
        assert database is not None and broker_ref is not None  # parse_policy requires them
        database_at = {
            "namespace": namespace,
            "name": database.name,
            "key": database.key,
            "field": "spec.source.databaseSecretRef",
        }
        broker_at = {
            "namespace": namespace,
            "name": broker_ref.name,
            "key": broker_ref.key,
            "field": "spec.task.brokerSecretRef",
        }
        max_age_seconds = 0.0 if afresh else kube.SECRET_MAX_AGE_SECONDS
        dsn = kube.read_secret_value(**database_at, max_age_seconds=max_age_seconds)
        url = kube.read_secret_value(**broker_at, max_age_seconds=max_age_seconds)
        # Checked here, where the Secret's name is known, so the error can name it; a value
        # in use passed already (parsing a DSN at every sweep showed in an idle one's CPU).
        if dsn != self.dsn:
            ledger.check_dsn(dsn, where=kube.secret_value_description(**database_at))
        if url != self.broker_url:
            broker.check_broker_url(url, where=kube.secret_value_description(**broker_at))
        return dsn, url

    def use(
        self, *, dsn: str, broker_url: str, transport_options: dict[str, Any] | None = None
    ) -> None:
        if dsn != self.dsn:
            self.close_databases()
            self.dsn = dsn
            self.shared = pools.attach(dsn)
            self.db = self.shared.sweeps
            self.rescue_db = self.shared.rescues
        if broker_url != self.broker_url or transport_options != self.transport_options:
            self.close_publisher()
            self.shared_publisher = publishers.attach(
                broker_url, transport_options=transport_options
            )
            self.publisher = self.shared_publisher
            self.broker_url = broker_url
            self.transport_options = transport_options

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the DSN, the broker URL and their passwords."""
        found: tuple[str, ...] = ()
        if self.dsn is not None:
            found += ledger.dsn_secrets(self.dsn)
        if self.broker_url is not None:
            found += broker.url_secrets(self.broker_url)
        return found

    def close_databases(self) -> None:
        if self.shared is not None:
            pools.detach(self.shared)
        self.shared = self.db = self.rescue_db = None

    def close_publisher(self) -> None:
        if self.shared_publisher is not None:
            publishers.detach(self.shared_publisher)
        self.shared_publisher = self.publisher = None
        self.broker_url = self.transport_options = None

    def close(self) -> None:
        self.close_databases()
        self.close_publisher()
