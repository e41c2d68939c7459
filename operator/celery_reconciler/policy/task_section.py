"""``spec.task``: the Celery task name, its queue, the broker Secret, and the Redis key names
the workers' ``broker_transport_options`` give their queues."""

from __future__ import annotations

import re
from typing import Any

from celery_reconciler.policy import fields, records

# Celery accepts any string as a task or queue name; we accept the conventional subset so a
# name can never smuggle whitespace or control characters into logs or broker keys.
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,254}$")
QUEUE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")
# The options of Celery's ``broker_transport_options`` that name the Redis keys kombu uses for
# a queue: the operator publishes onto those keys and reads them, so it must use the workers'
# names. The other options (visibility_timeout, ...) are the workers' business.
BROKER_KEY_OPTIONS = (
    "global_keyprefix",
    "unacked_key",
    "unacked_index_key",
    "sep",
    "priority_steps",
)
# A key name or prefix: printable, no whitespace (kombu's separator is the exception: its
# default is two control characters).
REDIS_KEY_NAME_PATTERN = re.compile(r"^[!-~]{1,200}$")
MAX_REDIS_SEPARATOR_LENGTH = 16
DEFAULT_QUEUE = "celery"
DEFAULT_BROKER_SECRET_KEY = "url"


def parse(value: Any, *, reader: fields.FieldReader, require_secrets: bool) -> records.Task:
    path = "spec.task"
    raw = reader.mapping(
        value, path, allowed=("name", "brokerSecretRef", "queue", "brokerTransportOptions")
    )
    task_name = raw.get("name")
    if not isinstance(task_name, str) or not TASK_NAME_PATTERN.fullmatch(task_name):
        reader.problem(
            f"{path}.name",
            f"{fields.describe(task_name)} is not a Celery task name; it is required, e.g. "
            "insights.tasks.extract_insights_task (letters, digits, _ . : -)",
        )
        task_name = "invalid"
    secret = reader.secret_ref(
        raw.get("brokerSecretRef"),
        f"{path}.brokerSecretRef",
        default_key=DEFAULT_BROKER_SECRET_KEY,
        required=require_secrets,
    )
    queue = raw.get("queue", DEFAULT_QUEUE)
    if not isinstance(queue, str) or not QUEUE_NAME_PATTERN.fullmatch(queue):
        reader.problem(
            f"{path}.queue",
            f"{fields.describe(queue)} is not a queue name (letters, digits, _ . : -)",
        )
        queue = DEFAULT_QUEUE
    return records.Task(
        name=task_name,
        broker_secret=secret,
        queue=queue,
        broker_transport_options=broker_transport_options(
            raw.get("brokerTransportOptions"),
            reader=reader,
            path=f"{path}.brokerTransportOptions",
        ),
    )


def broker_transport_options(
    value: Any, *, reader: fields.FieldReader, path: str
) -> tuple[tuple[str, str | tuple[int, ...]], ...]:
    raw = reader.mapping(value, path, allowed=BROKER_KEY_OPTIONS)
    options: list[tuple[str, str | tuple[int, ...]]] = []
    for name in BROKER_KEY_OPTIONS:
        if name not in raw:
            continue
        item = raw[name]
        if name == "priority_steps":
            if (
                isinstance(item, list)
                and item
                and all(isinstance(s, int) and not isinstance(s, bool) for s in item)
                and item[0] == 0
                and item == sorted(set(item))
                and item[-1] <= 255
            ):
                options.append((name, tuple(item)))
            else:
                reader.problem(
                    f"{path}.{name}",
                    f"{fields.describe(item)} is not kombu's priority steps: ascending integers "
                    "from 0 to 255, the first 0 (kombu's default is [0, 3, 6, 9])",
                )
        elif name == "sep":
            if isinstance(item, str) and 0 < len(item) <= MAX_REDIS_SEPARATOR_LENGTH:
                options.append((name, item))
            else:
                reader.problem(
                    f"{path}.{name}",
                    f"{fields.describe(item)} is not a separator of priority queues: 1 to "
                    f"{MAX_REDIS_SEPARATOR_LENGTH} characters",
                )
        elif isinstance(item, str) and REDIS_KEY_NAME_PATTERN.fullmatch(item):
            options.append((name, item))
        else:
            reader.problem(
                f"{path}.{name}",
                f"{fields.describe(item)} is not a Redis key name: 1 to 200 printable characters, "
                "no spaces",
            )
    return tuple(options)
