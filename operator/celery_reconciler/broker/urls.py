"""Broker URLs as the operator handles them: checked, described and redacted, and the
error every broker failure becomes, which never quotes a password.

A broker URL comes from a Secret (``spec.task.brokerSecretRef``), the ``--broker`` flag or
``CELERY_BROKER_URL``: whatever a transport's error or a URL parser says about it is
scrubbed of the URL and its password before it reaches a log, an Event or a status
(``redact_url``).
"""

from __future__ import annotations

import contextlib
import urllib.parse

import kombu.transport


class BrokerUnavailable(RuntimeError):
    """The broker refused or failed a publish or a depth query; the message has no secrets."""


class BrokerUrlInvalid(BrokerUnavailable):
    """The broker URL does not parse. It came from a Secret, so the message quotes none of
    it (URL parsers quote the offending part, e.g. a port that is really a password)."""


def check_broker_url(url: str, *, where: str) -> None:
    """Raise ``BrokerUrlInvalid`` naming ``where`` the URL came from — never what it says."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
        if "://" not in url or not parts.scheme:
            problem = "it has no scheme"
        elif parts.scheme.partition("+")[0] not in kombu.transport.TRANSPORT_ALIASES:
            # e.g. a DSN in the broker's Secret: no broker at all, and kombu would only fail
            # later, inside a publish, with an error that quotes the URL.
            problem = "its scheme names no broker kombu knows"
    except ValueError:
        problem = "it does not parse"
    if problem is not None:
        raise BrokerUrlInvalid(
            f"{where} is not a broker URL ({problem}; expected e.g. redis://host:6379/0; its "
            "content is not shown because it came from a Secret)"
        )


def describe_broker_url(url: str) -> str:
    """``redis 127.0.0.1:6379/0``, ``amqp rabbit:5672 vhost "/"``: enough for a person to
    tell two brokers apart, never a user name or password."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port
    except ValueError:
        return "the configured broker (its URL does not parse)"
    scheme = parts.scheme.partition("+")[0] or "broker"
    where = f"{host}:{port}" if port else host
    path = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else parts.path
    if scheme in ("redis", "rediss"):
        return f"{scheme} {where}/{path or '0'}"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return f'{scheme} {where} vhost "{path or "/"}"'
    return f"{scheme} {where}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (``redis://:***@host:6379/0``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None and "@" not in parts.netloc:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = urllib.parse.quote(parts.username or "", safe="")
        userinfo = f"{user}:***" if parts.password is not None else user
        return urllib.parse.urlunsplit(
            (parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, "")
        )
    except ValueError:
        return "the configured broker URL (it does not parse)"


def url_secrets(url: str) -> tuple[str, ...]:
    found = [url]
    with contextlib.suppress(ValueError):
        password = urllib.parse.urlsplit(url).password
        if password:
            found.extend({password, urllib.parse.unquote(password)})
    return tuple(found)


def _scrub(text: str, url: str) -> str:
    for secret in url_secrets(url):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def unavailable(error: BaseException, *, url: str, doing: str) -> BrokerUnavailable:
    reason = _scrub(str(error).strip() or type(error).__name__, url)
    return BrokerUnavailable(
        f"broker unavailable while {doing} ({redact_url(url)}): {reason} — check that the "
        "broker is up and that its URL (spec.task.brokerSecretRef, --broker or "
        "CELERY_BROKER_URL) is right"
    )


URL_WHERE = "the broker URL (spec.task.brokerSecretRef, --broker or CELERY_BROKER_URL)"
