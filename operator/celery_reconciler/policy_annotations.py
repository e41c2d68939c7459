"""The annotations the operator reads from a ProcessingPolicy, read as untrusted input.

Anyone who may ``kubectl annotate`` a policy (the ``edit`` role) writes these, so a value is
input like a spec field: checked for size, control characters (a NUL byte reaches
PostgreSQL as an error, not as an id) and shape before anything acts on it. A bad value is
never a reason for the policy to stop: the loop clears it and says why in a Warning Event
(``InvalidRequest``) naming the annotation, and the policy sweeps on.

The same holds for kopf's own bookkeeping annotation (``DIFFBASE``: the last spec kopf
handled, as JSON): a person can overwrite it too, and kopf reads it at every event.

Pure: no I/O, so every rule is unit-tested.
"""

from __future__ import annotations

import dataclasses
import json
import re

GROUP = "celery-reconciler.io"
SWEEP_NOW = f"{GROUP}/sweep-now"
RETRY_DEAD = f"{GROUP}/retry-dead"
DIFFBASE_KEY = "last-handled-configuration"
DIFFBASE = f"{GROUP}/{DIFFBASE_KEY}"

# The apiserver allows 256 KiB of annotations per object; a retry-dead request names ids,
# and ids of real tables (bigint, uuid, short text keys) are far shorter than these bounds.
MAX_RETRY_DEAD_BYTES = 64 * 1024
MAX_ENTRY_ID_CHARACTERS = 256
# Shown in an Event: enough to recognise the value, never the whole of it.
SHOWN_CHARACTERS = 40

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ALL = ("", "all", "*")


class InvalidAnnotation(ValueError):
    """An annotation's value the operator will not act on; the message says why."""


@dataclasses.dataclass(frozen=True)
class RetryDeadRequest:
    """Which dead entries to revive: every one (``entry_ids is None``) or the named ones."""

    entry_ids: tuple[str, ...] | None


def shown(value: str) -> str:
    """A value as an Event may show it: escaped (no control character reaches a terminal)
    and cut short."""
    text = value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS] + "..."
    return ascii(text)


def parse_retry_dead(value: str) -> RetryDeadRequest:
    """``all`` (or ``*``, or empty) revives every dead entry; otherwise a comma-separated
    list of entry ids. Raises ``InvalidAnnotation`` for anything else."""
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_RETRY_DEAD_BYTES:
        raise InvalidAnnotation(
            f"{RETRY_DEAD} is longer than {MAX_RETRY_DEAD_BYTES} bytes: name fewer ids at a "
            "time, or 'all'"
        )
    if _CONTROL_CHARACTERS.search(value):
        raise InvalidAnnotation(
            f"{RETRY_DEAD}={shown(value)} holds a control character: expected 'all' or "
            "entry ids separated by commas"
        )
    if value.strip() in _ALL:
        return RetryDeadRequest(entry_ids=None)
    ids = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    long_ids = [entry_id for entry_id in ids if len(entry_id) > MAX_ENTRY_ID_CHARACTERS]
    if long_ids:
        raise InvalidAnnotation(
            f"{RETRY_DEAD} names an id of {len(long_ids[0])} characters ({shown(long_ids[0])}); "
            f"ids are at most {MAX_ENTRY_ID_CHARACTERS}"
        )
    if not ids:
        raise InvalidAnnotation(
            f"{RETRY_DEAD}={shown(value)} names no entry id: expected 'all' or ids separated "
            "by commas"
        )
    return RetryDeadRequest(entry_ids=ids)


def diffbase_problem(value: str | None) -> str | None:
    """Why kopf's diff-base annotation cannot be what kopf wrote (a JSON object), or
    ``None`` when it can (or is absent)."""
    if value is None:
        return None
    try:
        decoded = json.loads(value)
    except ValueError:
        return f"{DIFFBASE}={shown(value)} is not JSON"
    if not isinstance(decoded, dict):
        return f"{DIFFBASE}={shown(value)} is not a JSON object"
    return None
