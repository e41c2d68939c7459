"""What the verbs print, as pure functions of what they read: the ``status`` table (ages
written the way kubectl writes them) and the story of one entry that ``explain`` tells."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery_reconciler import ledger


@dataclasses.dataclass(frozen=True)
class StatusRow:
    """One policy as ``status`` shows it; counts are ``None`` before its first status."""

    namespace: str
    policy: str
    pending: int | None = None
    in_flight: int | None = None
    retrying: int | None = None
    succeeded: int | None = None
    dead: int | None = None
    oldest_pending_seconds: int | None = None
    last_sweep_time: str | None = None
    ready: str | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "policy": self.policy,
            "pending": self.pending,
            "inFlight": self.in_flight,
            "retrying": self.retrying,
            "succeeded": self.succeeded,
            "dead": self.dead,
            "oldestPendingSeconds": self.oldest_pending_seconds,
            "lastSweepTime": self.last_sweep_time,
            "ready": self.ready,
            "reason": self.reason,
        }


def ready_condition(policy: Mapping[str, Any]) -> Mapping[str, Any]:
    conditions = (policy.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Ready"), {})


def status_rows(
    policies: Iterable[Mapping[str, Any]], statuses: Iterable[Mapping[str, Any]]
) -> list[StatusRow]:
    """Join policies with their ProcessingStatus (same namespace and name), sorted.

    Every policy gets a row, even before the operator wrote its status: a policy the
    operator never picked up is exactly what a person running ``status`` needs to see.
    """
    by_key = {
        (s["metadata"].get("namespace", ""), s["metadata"]["name"]): s.get("status") or {}
        for s in statuses
    }
    rows = []
    for policy in policies:
        namespace = policy["metadata"].get("namespace", "")
        name = policy["metadata"]["name"]
        counts = by_key.get((namespace, name), {})
        ready = ready_condition(policy)

        def count(field: str, counts: Mapping[str, Any] = counts) -> int | None:
            value = counts.get(field)
            return None if value is None else int(value)

        rows.append(
            StatusRow(
                namespace=namespace,
                policy=name,
                pending=count("pending"),
                in_flight=count("inFlight"),
                retrying=count("retrying"),
                succeeded=count("succeeded"),
                dead=count("dead"),
                oldest_pending_seconds=count("oldestPendingSeconds"),
                last_sweep_time=counts.get("lastSweepTime"),
                ready=ready.get("status"),
                reason=ready.get("reason"),
            )
        )
    return sorted(rows, key=lambda row: (row.namespace, row.policy))


def human_duration(seconds: float | None) -> str:
    """kubectl's way of writing an age: ``45s``, ``5m3s``, ``42m``, ``3h5m``, ``20h``, ``4d``."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    minutes, hours, days = total // 60, total // 3600, total // 86400
    if total < 120:
        return f"{total}s"
    if minutes < 10:
        return f"{minutes}m{total % 60}s" if total % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(text: str | None, *, now: datetime.datetime) -> str:
    moment = parse_time(text)
    return "-" if moment is None else human_duration((now - moment).total_seconds())


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns three spaces apart, like ``kubectl get``."""
    lines = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


STATUS_HEADER = (
    "POLICY",
    "PENDING",
    "IN-FLIGHT",
    "RETRYING",
    "SUCCEEDED",
    "DEAD",
    "OLDEST",
    "LAST-SWEEP",
    "READY",
    "REASON",
)


def format_status_table(
    rows: Sequence[StatusRow], *, all_namespaces: bool, now: datetime.datetime
) -> str:
    def number(value: int | None) -> str:
        return "-" if value is None else str(value)

    table = []
    for row in rows:
        cells = [
            row.policy,
            number(row.pending),
            number(row.in_flight),
            number(row.retrying),
            number(row.succeeded),
            number(row.dead),
            human_duration(row.oldest_pending_seconds),
            age(row.last_sweep_time, now=now),
            row.ready or "-",
            row.reason or "-",
        ]
        table.append([row.namespace, *cells] if all_namespaces else cells)
    header = ("NAMESPACE", *STATUS_HEADER) if all_namespaces else STATUS_HEADER
    return render_table(header, table)


def timestamp_text(moment: datetime.datetime | None) -> str:
    if moment is None:
        return "-"
    utc = moment.astimezone(datetime.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def history_as_json(history: ledger.EntryHistory) -> dict[str, Any]:
    def value(item: object) -> object:
        if isinstance(item, datetime.datetime):
            return timestamp_text(item)
        if item is None or isinstance(item, int | float | str | bool):
            return item
        return str(item)

    document = {
        field.name: value(getattr(history, field.name))
        for field in dataclasses.fields(history)
        if field.name != "attempts"
    }
    document["attempts"] = [
        {field.name: value(getattr(a, field.name)) for field in dataclasses.fields(a)}
        for a in history.attempts
    ]
    return document


def format_history(history: ledger.EntryHistory) -> str:
    """The story of one entry: its ledger row, then each attempt in order."""
    lines = [
        f"entry {history.entry_id} of policy {history.policy_key}",
        f"  state:         {history.state} (attempts used: {history.attempt})",
        f"  fence token:   {history.fence_token or '-'}",
        f"  worker:        {history.worker or '-'}",
        f"  lease until:   {timestamp_text(history.lease_deadline)}",
        f"  next attempt:  {timestamp_text(history.next_attempt_at)}",
        f"  first seen:    {timestamp_text(history.created_at)}",
        f"  updated:       {timestamp_text(history.updated_at)}",
    ]
    if history.last_error:
        lines.append(f"  last error:    {_indent(history.last_error)}")
    if not history.attempts:
        lines.append("no attempt has started yet (dispatched, not yet picked up by a worker)")
    for attempt in history.attempts:
        took = ""
        if attempt.finished_at is not None:
            took = f" ({(attempt.finished_at - attempt.started_at).total_seconds():.3f}s)"
        lines += [
            "",
            f"attempt {attempt.attempt}: {attempt.outcome}{took}",
            f"  fence token:   {attempt.fence_token}",
            f"  worker:        {attempt.worker or '-'}",
            f"  dispatched:    {timestamp_text(attempt.dispatched_at)}",
            f"  started:       {timestamp_text(attempt.started_at)}",
            f"  finished:      {timestamp_text(attempt.finished_at)}",
        ]
        if attempt.retry_at is not None:
            lines.append(f"  retry due:     {timestamp_text(attempt.retry_at)}")
        if attempt.error:
            lines.append(f"  error:         {_indent(attempt.error)}")
    return "\n".join(lines) + "\n"


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n" + " " * 17)
