"""The demo app on a priority queue: the alternative to the rescue queue, measured only.

``benchmarks.rescue_ahead`` times rescued work on RabbitMQ both ways: the rescue queue we
ship, and ``x-max-priority`` on the workers' queue with re-dispatches published at a higher
priority (``PRIORITY_QUEUE_LEVELS``), which we do not ship (``celery_reconciler_worker.
rescue_queue`` says why). Every party that declares the queue must carry the same argument,
so the workers run this app and the benchmark's publisher sets the same value.
"""

from celery_app.demo import tasks as tasks
from celery_app.demo.app import app

PRIORITY_QUEUE_LEVELS = 10

app.conf.task_queue_max_priority = PRIORITY_QUEUE_LEVELS
