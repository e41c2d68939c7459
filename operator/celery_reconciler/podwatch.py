"""One pod watch per (namespace, label selector), shared by every policy that names it.

A policy's pod-restart hook needs the events of its workers' pods. Policies often share
their workers (one Celery deployment serving several tasks, hence several policies), and a
watch per policy then means as many identical watch connections and threads as policies:
hundreds of streams to the API server saying the same thing. Here the first policy to ask
for a (namespace, selector) starts its watch (``kube.watch_worker_pods`` in a thread) and
later ones join it; the last to leave stops it.

A policy that joins a running watch first hears the pods the watch knows, as ``ADDED``,
and the watch's current failure if any — what a watch of its own would have told it on its
first listing — so its baseline of container restarts is the same either way. Events go to
every subscriber in the order the watch saw them; each policy decides alone what a pod
event means for its own entries.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from celery_reconciler import kube

OnEvent = Callable[[str, kube.WorkerPod], None]
OnHealth = Callable[[str | None], None]


@dataclasses.dataclass(eq=False)
class Subscription:
    key: tuple[str, str]
    on_event: OnEvent
    on_health: OnHealth


class _Watch:
    def __init__(self, *, namespace: str, label_selector: str) -> None:
        self.lock = threading.Lock()
        self.subscribers: list[Subscription] = []
        self.pods: dict[str, kube.WorkerPod] = {}  # by uid: what a late subscriber is told
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=kube.watch_worker_pods,
            kwargs={
                "namespace": namespace,
                "label_selector": label_selector,
                "on_event": self.on_event,
                "on_health": self.on_health,
                "stopping": self.stopping,
            },
            name=f"pods:{namespace}:{label_selector}",
            daemon=True,
        )

    def on_event(self, event_type: str, pod: kube.WorkerPod) -> None:
        with self.lock:
            if event_type == "DELETED":
                self.pods.pop(pod.uid, None)
            else:
                self.pods[pod.uid] = pod
            for subscriber in self.subscribers:
                subscriber.on_event(event_type, pod)

    def on_health(self, failure: str | None) -> None:
        with self.lock:
            self.failure = failure
            for subscriber in self.subscribers:
                subscriber.on_health(failure)


_lock = threading.Lock()
_watches: dict[tuple[str, str], _Watch] = {}


def subscribe(
    *, namespace: str, label_selector: str, on_event: OnEvent, on_health: OnHealth
) -> Subscription:
    """Hear the pod events of ``label_selector`` in ``namespace`` until ``unsubscribe``.
    The callbacks run in the watch's thread and must return quickly."""
    key = (namespace, label_selector)
    subscription = Subscription(key=key, on_event=on_event, on_health=on_health)
    with _lock:
        watch = _watches.get(key)
        started = watch is None
        if watch is None:
            watch = _watches[key] = _Watch(namespace=namespace, label_selector=label_selector)
        with watch.lock:
            for pod in watch.pods.values():
                on_event("ADDED", pod)
            if watch.failure is not None:
                on_health(watch.failure)
            watch.subscribers.append(subscription)
    if started:
        watch.thread.start()
    return subscription


def unsubscribe(subscription: Subscription) -> None:
    with _lock:
        watch = _watches.get(subscription.key)
        if watch is None:
            return
        with watch.lock:
            if subscription in watch.subscribers:
                watch.subscribers.remove(subscription)
            if watch.subscribers:
                return
        del _watches[subscription.key]
    watch.stopping.set()
