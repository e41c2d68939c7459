"""Proof that worker processes died, from what Kubernetes says of their Pods.

Two sources, one rule (proof of death, never silence): the pod watch of the policy's
workers (``podwatch``, one per selector however many policies share it) turns each pod
event into the incarnations it proves dead (``planning.pod_ending``: by pod uid and
container instance, never by name or by absence from a listing); and a worker process in a
Pod that stopped heartbeating is judged by reading its Pod (``planning.judge_silent``) — it
is ended only on proof, and what it still holds shows as a condition. Each proof becomes a
rescue (``rescues.RescueQueue``), run at once.

The watch's callbacks run in its thread; they hand over to the event loop and return.
"""

from __future__ import annotations

import asyncio
import time

from celery_reconciler import kube, planning, podwatch, reconcile
from celery_reconciler import policy as policy_module
from celery_reconciler.loop import rescues


class PodProofs:
    def __init__(
        self,
        *,
        namespace: str,
        rescue_queue: rescues.RescueQueue,
        waker: asyncio.Event,
    ) -> None:
        self.namespace = namespace
        self.rescue_queue = rescue_queue
        self.waker = waker  # the loop's: a watch failure is reported at once
        self.subscription: podwatch.Subscription | None = None
        self.pod_selector = ""
        self.watch_failure: str | None = None  # set from the watch thread
        # The last container statuses seen per pod uid: what the next event is judged against.
        self.containers_seen: dict[str, tuple[planning.ContainerStatus, ...]] = {}
        # The phase and running container instances last seen per pod uid: only a change in
        # them (or a pod's first event, or its end) can prove a process dead.
        self.instances_seen: dict[str, tuple[str | None, frozenset[object]]] = {}
        # Why running entries wait on silent worker processes in Pods (a condition), if any.
        self.silent_held: str | None = None

    # -- the pod watch ------------------------------------------------------------------

    def follow(self, policy: policy_module.Policy) -> None:
        """Hear the pod events of the policy's workers (a new selector, a new watch)."""
        selector = kube.label_selector(policy.workers)
        if selector == self.pod_selector:
            return
        self.stop()
        self.pod_selector = selector
        self.watch_failure = None
        self.containers_seen.clear()
        self.instances_seen.clear()
        if not selector:
            return
        loop = asyncio.get_running_loop()

        def on_event(event_type: str, pod: kube.WorkerPod) -> None:
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.on_pod_event(event_type, pod))
            )

        def on_health(failure: str | None) -> None:
            loop.call_soon_threadsafe(self.note_watch_health, selector, failure)

        # Shared with every policy of this namespace that selects the same pods.
        self.subscription = podwatch.subscribe(
            namespace=self.namespace,
            label_selector=selector,
            on_event=on_event,
            on_health=on_health,
        )

    def note_watch_health(self, selector: str, failure: str | None) -> None:
        """What the pod watch says about itself; a watch of a replaced selector has no say."""
        if selector == self.pod_selector and failure != self.watch_failure:
            self.watch_failure = failure
            self.waker.set()  # report it now, not at the next sweep

    def stop(self) -> None:
        if self.subscription is not None:
            podwatch.unsubscribe(self.subscription)
            self.subscription = None
        self.pod_selector = ""

    async def on_pod_event(self, event_type: str, pod: kube.WorkerPod) -> None:
        """Judge the pod's incarnations by this event whenever it can prove a death: the
        pod's first event here (``ADDED``: at start, after a watch gap, a new pod), a change
        in the container instances it runs, its end. Steady events cost nothing."""
        deleted = event_type == "DELETED"
        previous = self.containers_seen.get(pod.uid)
        running = (pod.phase, planning.running_instances(pod.containers))
        changed = self.instances_seen.get(pod.uid) != running
        if deleted:
            self.containers_seen.pop(pod.uid, None)
            self.instances_seen.pop(pod.uid, None)
        else:
            self.containers_seen[pod.uid] = pod.containers
            self.instances_seen[pod.uid] = running
        if not (deleted or changed or event_type == "ADDED"):
            return
        ending = planning.pod_ending(
            pod_uid=pod.uid,
            old=previous,
            new=pod.containers,
            deleted=deleted,
            phase=pod.phase,
        )
        if ending is not None:
            self.rescue_queue.add(
                rescues.PendingRescue(pod=pod.name, ending=ending, started=time.monotonic())
            )
            await self.rescue_queue.finish()

    # -- silent workers -----------------------------------------------------------------

    async def judge_silent_workers(
        self, policy: policy_module.Policy, *, db: reconcile.Sessions
    ) -> None:
        """Silence never moves the work of a process in a Pod: read its Pod, and end it only
        on proof (``planning.judge_silent``); what is held shows as a condition."""
        silent = await asyncio.to_thread(reconcile.silent_pod_workers, policy, db=db)
        lookups: dict[tuple[str, str], planning.PodLookup] = {}
        proven: dict[str, list[planning.EndedIncarnation]] = {}
        held: list[planning.HeldIncarnation] = []
        for found in silent:
            lookup = None
            if found.pod_namespace and found.pod_name:
                where = (found.pod_namespace, found.pod_name)
                if where not in lookups:
                    lookups[where] = await asyncio.to_thread(
                        kube.look_up_worker_pod, namespace=where[0], name=where[1]
                    )
                lookup = lookups[where]
            verdict = planning.judge_silent(silent=found, lookup=lookup)
            if isinstance(verdict, planning.EndedIncarnation):
                proven.setdefault(found.pod_name or found.pod_uid, []).append(verdict)
            else:
                held.append(verdict)
        self.silent_held = planning.held_summary(held)
        for pod, ended in proven.items():
            self.rescue_queue.add(
                rescues.PendingRescue(
                    pod=pod, ending=None, started=time.monotonic(), proven=tuple(ended)
                )
            )
        if proven:
            await self.rescue_queue.finish()
