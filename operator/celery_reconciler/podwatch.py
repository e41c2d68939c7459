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

from celery_reconciler import kube, shared_by_key

OnEvent = Callable[[str, kube.WorkerPod], None]
OnHealth = Callable[[str | None], None]


@dataclasses.dataclass(eq=False)
class Subscription:
    key: tuple[str, str]
    on_event: OnEvent
    on_health: OnHealth
    watch: _Watch | None = None  # until ``unsubscribe``


class _Watch:
    def __init__(self, *, namespace: str, label_selector: str) -> None:
        self.lock = threading.Lock()
        self.subscribers: list[Subscription] = []
        self.pods: dict[str, kube.WorkerPod] = {}  # by uid: what a late subscriber is told
        self.failure: str | None = None
        self.started = False
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

    def join(self, subscription: Subscription) -> None:
        """Tell a new subscriber what a watch of its own would have told it first."""
        with self.lock:
            for pod in self.pods.values():
                subscription.on_event("ADDED", pod)
            if self.failure is not None:
                subscription.on_health(self.failure)
            self.subscribers.append(subscription)

    def leave(self, subscription: Subscription) -> None:
        with self.lock:
            if subscription in self.subscribers:
                self.subscribers.remove(subscription)

    def start_once(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

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


_watches: shared_by_key.SharedByKey[tuple[str, str], _Watch] = shared_by_key.SharedByKey(
    close_value=_Watch.stop
)


def subscribe(
    *, namespace: str, label_selector: str, on_event: OnEvent, on_health: OnHealth
) -> Subscription:
    """Hear the pod events of ``label_selector`` in ``namespace`` until ``unsubscribe``.
    The callbacks run in the watch's thread and must return quickly."""
    subscription = Subscription(
        key=(namespace, label_selector), on_event=on_event, on_health=on_health
    )
    watch = _watches.attach(
        subscription.key,
        open_value=lambda: _Watch(namespace=namespace, label_selector=label_selector),
        joining=lambda watch: watch.join(subscription),
    )
    subscription.watch = watch
    watch.start_once()  # after the first subscriber joined: it hears the first listing
    return subscription


def unsubscribe(subscription: Subscription) -> None:
    watch, subscription.watch = subscription.watch, None
    if watch is not None:
        _watches.detach(subscription.key, watch, leaving=lambda watch: watch.leave(subscription))
