"""One parse of the user's ``spec`` into a ``Policy``: the spec's sections, in order, each read
by its own module with one ``FieldReader`` that collects the problems of all of them.

Why a hand-written parser rather than a schema library: the errors are the product here. A
user who typed ``table: "journal; drop"`` must read ``spec.source.table: ... is not a SQL
identifier`` with the field path, and must see *every* problem of the spec at once, not the
first one. ``InvalidPolicy`` carries the full list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_reconciler.policy import (
    fields,
    limits_section,
    records,
    source_section,
    task_section,
    timing_sections,
    workers_section,
)

SECTIONS = ("source", "task", "schedule", "retry", "lease", "workers", "limits", "history")


def parse_policy(
    spec: Mapping[str, Any],
    *,
    namespace: str,
    name: str,
    require_secret_refs: bool = True,
) -> records.Policy:
    """Validate ``spec`` and build a ``Policy``, or raise ``InvalidPolicy`` listing every problem.

    ``require_secret_refs=False`` is for the CLI, where the DSN and broker URL come from
    flags or the environment instead of Kubernetes Secrets.
    """
    reader = fields.FieldReader()
    policy = _policy(
        spec, reader=reader, namespace=namespace, name=name, require_secrets=require_secret_refs
    )
    if reader.problems or policy is None:
        raise records.InvalidPolicy(f"{namespace}/{name}", reader.problems)
    return policy


def _policy(
    spec: Any, *, reader: fields.FieldReader, namespace: str, name: str, require_secrets: bool
) -> records.Policy | None:
    if not namespace or not name:
        reader.problem("metadata", "namespace and name are required")
    if not isinstance(spec, Mapping):
        reader.problem("spec", f"must be an object, got {fields.describe(spec)}")
        return None
    top = reader.mapping(spec, "spec", allowed=SECTIONS)
    if "source" not in top:
        reader.problem("spec.source", "is required")
    if "task" not in top:
        reader.problem("spec.task", "is required")
    # Keyword arguments are evaluated in the order written, so the problems are listed in the
    # order of the sections below, whatever order the user wrote them in.
    return records.Policy(
        namespace=namespace,
        name=name,
        source=source_section.parse(
            top.get("source"), reader=reader, require_secrets=require_secrets
        ),
        task=task_section.parse(top.get("task"), reader=reader, require_secrets=require_secrets),
        schedule=timing_sections.schedule(top.get("schedule"), reader=reader),
        retry=timing_sections.retry(top.get("retry"), reader=reader),
        lease=timing_sections.lease(top.get("lease"), reader=reader),
        history=timing_sections.history(top.get("history"), reader=reader),
        workers=workers_section.parse(top.get("workers"), reader=reader),
        limits=limits_section.parse(top.get("limits"), reader=reader),
    )
