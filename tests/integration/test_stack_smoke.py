"""Proof that the database and broker the suite relies on are real servers, not stand-ins."""

from __future__ import annotations

import psycopg
import redis as redis_client

from devstack import postgres as devstack_postgres


def test_postgres_round_trip(database_dsn: str) -> None:
    with psycopg.connect(database_dsn) as conn:
        conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, note text)")
        conn.execute("INSERT INTO t (note) VALUES (%s)", ("hello",))
        row = conn.execute("SELECT note, version() FROM t").fetchone()
    assert row is not None
    assert row[0] == "hello"
    assert row[1].startswith("PostgreSQL ")


def test_postgres_requires_the_password(postgres: devstack_postgres.PostgresServer) -> None:
    wrong = postgres.dsn.replace(postgres.password, "wrong-password")
    try:
        psycopg.connect(wrong, connect_timeout=3).close()
    except psycopg.OperationalError as error:
        assert "password authentication failed" in str(error)
    else:
        raise AssertionError("a wrong password was accepted: this is not our throwaway server")


def test_redis_ping_and_lpush(redis_url: str) -> None:
    client = redis_client.Redis.from_url(redis_url)
    assert client.ping() is True
    assert client.lpush("smoke", b"one", b"two") == 2
    assert client.rpop("smoke") == b"one"
