"""Publishing Celery tasks by name, a batch at a time; queue depth for backpressure.

One module per concern, as kombu keeps one per transport: ``wire`` (Celery's message format,
built once per task and filled per message), ``redis_transport`` (pipelined onto kombu's
lists), ``amqp_transport`` (batched with publisher confirms, frames spliced), ``kombu_fallback``
(``send_task`` for every other broker), ``urls`` (URLs and errors that never show a
password) and ``publisher`` (what ``reconcile`` needs, and ``connect``, which picks the
transport for a URL). The names callers use are handed on here, so ``broker.connect`` and
``broker.TaskMessage`` read as before.

The operator sends no per-message time limit: a body may run as long as its worker keeps
heartbeating (``celery_reconciler_worker``), and a worker that cannot heartbeat stops its own
bodies.
"""

from __future__ import annotations

from celery_reconciler.broker.amqp_transport import (
    CONFIRM_WINDOW,
    AmqpFrames,
    AmqpPublisher,
    amqp_message,
)
from celery_reconciler.broker.kombu_fallback import KombuPublisher
from celery_reconciler.broker.publisher import Publisher, connect
from celery_reconciler.broker.redis_transport import AUDIT_QUEUE_LIMIT, RedisPublisher
from celery_reconciler.broker.urls import (
    BrokerUnavailable,
    BrokerUrlInvalid,
    check_broker_url,
    describe_broker_url,
    redact_url,
    url_secrets,
)
from celery_reconciler.broker.wire import (
    DELIVERY_MODE_PERSISTENT,
    SHORT_ID_LENGTH,
    MessageBuilder,
    TaskMessage,
    message_app,
)

__all__ = [
    "AUDIT_QUEUE_LIMIT",
    "CONFIRM_WINDOW",
    "DELIVERY_MODE_PERSISTENT",
    "SHORT_ID_LENGTH",
    "AmqpFrames",
    "AmqpPublisher",
    "BrokerUnavailable",
    "BrokerUrlInvalid",
    "KombuPublisher",
    "MessageBuilder",
    "Publisher",
    "RedisPublisher",
    "TaskMessage",
    "amqp_message",
    "check_broker_url",
    "connect",
    "describe_broker_url",
    "message_app",
    "redact_url",
    "url_secrets",
]
