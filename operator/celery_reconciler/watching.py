"""One list-then-watch loop for the objects the operator watches beside kopf: Pods, Leases.

kopf watches the objects its handlers are attached to; the worker pods of a policy (one
label selector each, chosen at run time: ``podwatch``) and the member Leases of the
replicas (``membership``) are watched here, with the official client in a thread of their
own. Both need the same loop, which kopf's own watcher (``_cogs/clients/watching.py``)
shows: list, report every listed object, then watch from the listing's resourceVersion, and
keep that version current from every event — bookmarks included — so a watch the server
ended by its timeout continues where it stopped. Kept in one place, the rules cannot drift
apart again:

- **410 Gone** (our resourceVersion is older than the server keeps), as an exception or as
  an ``ERROR`` event in the stream, means relist now: not a failure, nothing waits.
- **Any other refusal** — an HTTP error on the listing or the watch, or an ``ERROR`` event
  with another code — is reported to ``on_refused`` (once per distinct refusal) and logged
  once; ``on_refused(None)`` follows only when a watch is accepted again. A listing alone
  does not clear it: with ``list`` granted and ``watch`` refused the listing works every
  time, and the report must not flap between the two.
- **No answer** (a dropped connection, a timeout) is logged once and retried, unreported:
  watches are cut routinely, and the callers' other calls report an API server that is away.
- **Back-off**: retries after a failure wait ``RETRY_BACKOFF_SECONDS`` (equal jitter: at least
  half of each step, so many watches failing at once do not retry at once); an accepted
  watch resets it.

Every relist reports the listed objects again as ``ADDED``, so a caller's baseline survives
a gap; objects deleted during a gap produce no event (absence from a listing proves
nothing, so no ``DELETED`` is made up).
"""

from __future__ import annotations

import dataclasses
import logging
import random as random_module
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kubernetes

logger = logging.getLogger(__name__)

# The server ends each watch after this long (then we watch again from the last version):
# a short watch finds a half-open connection soon without a read deadline shorter than it.
WATCH_TIMEOUT_SECONDS = 5
# Each watch's (connect, read) deadline: longer than the server-side watch timeout, so a
# healthy watch ends by the server's choice and only a dead connection meets it.
WATCH_READ_TIMEOUT_SECONDS = (5.0, 20.0)
LIST_TIMEOUT_SECONDS = (5.0, 20.0)
# The wait after the n-th failure in a row (then the last step, for as long as it fails).
RETRY_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0)
RETRY_JITTER_LOW_FRACTION = 0.5
HTTP_GONE = 410

OnEvent = Callable[[str, Any, float], None]
OnRefused = Callable[["Refused | None"], None]
# ``stream(list_method, namespace, **arguments)``: the events of one watch request, as the
# official client's ``Watch().stream`` yields them (dicts with ``type``, ``object``,
# ``raw_object``); raises ``ApiException`` when the server refuses the request.
Stream = Callable[..., Iterable[Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Refused:
    """The API server answered the listing or the watch with an error status."""

    status: int | None
    reason: str

    def text(self) -> str:
        return f"HTTP {self.status} {self.reason}"


def retry_delay_seconds(
    failures: int, *, random: Callable[[], float] = random_module.random
) -> float:
    """The wait after ``failures`` failures in a row (at least one), jittered."""
    step = RETRY_BACKOFF_SECONDS[min(failures, len(RETRY_BACKOFF_SECONDS)) - 1]
    return step * (RETRY_JITTER_LOW_FRACTION + (1 - RETRY_JITTER_LOW_FRACTION) * random())


def official_stream(list_method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return kubernetes.watch.Watch().stream(list_method, *args, **kwargs)


def list_then_watch(
    *,
    list_method: Callable[..., Any],
    namespace: str,
    label_selector: str,
    what: str,
    consequence: str,
    rights: str,
    on_event: OnEvent,
    stopping: threading.Event,
    on_refused: OnRefused | None = None,
    stream: Stream = official_stream,
    random: Callable[[], float] = random_module.random,
) -> None:
    """Report every version of the selected objects as it arrives, until ``stopping``.

    ``list_method`` is the official client's namespaced list call (``list_namespaced_pod``).
    ``on_event(event_type, obj, seen_at)``: ``ADDED``, ``MODIFIED`` or ``DELETED``, the
    client's model of the object, and the monotonic time it was read. ``what`` names the
    watch in the log, ``consequence`` says what the operator loses while it fails, and
    ``rights`` what to grant when the API answers 403. Blocking: run it in a thread.
    """
    watcher = _Watcher(
        what=what,
        consequence=consequence,
        rights=rights,
        on_refused=on_refused,
        stopping=stopping,
        random=random,
    )
    while not stopping.is_set():
        try:
            listing = list_method(
                namespace,
                label_selector=label_selector,
                _request_timeout=LIST_TIMEOUT_SECONDS,
            )
            seen_at = time.monotonic()
            for obj in listing.items:
                on_event("ADDED", obj, seen_at)
            resource_version = str(listing.metadata.resource_version)
            while not stopping.is_set():
                events = stream(
                    list_method,
                    namespace,
                    label_selector=label_selector,
                    resource_version=resource_version,
                    timeout_seconds=WATCH_TIMEOUT_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=WATCH_READ_TIMEOUT_SECONDS,
                )
                for event in events:
                    resource_version = _follow(event, resource_version, on_event=on_event)
                    watcher.accepted()
                    if stopping.is_set():
                        break
                else:  # the server ended the watch at its timeout: it was accepted
                    watcher.accepted()
        except kubernetes.client.ApiException as error:
            if error.status == HTTP_GONE:  # our resourceVersion is too old: relist now
                continue
            watcher.refused(Refused(status=error.status, reason=str(error.reason)))
        except Exception as error:  # a dropped connection must not end the watch
            watcher.unanswered(type(error).__name__)


def _follow(event: Mapping[str, Any], resource_version: str, *, on_event: OnEvent) -> str:
    """Hand one watch event on; the resourceVersion to watch from after it."""
    event_type = event.get("type")
    raw = event.get("raw_object") or {}
    if event_type == "ERROR":  # what the client raises, when it does not (410: relist)
        raise kubernetes.client.ApiException(
            status=raw.get("code"), reason=f"{raw.get('reason')}: {raw.get('message')}"
        )
    resource_version = str((raw.get("metadata") or {}).get("resourceVersion") or resource_version)
    if event_type in ("ADDED", "MODIFIED", "DELETED"):
        on_event(str(event_type), event["object"], time.monotonic())
    return resource_version


class _Watcher:
    """What one watch has told its caller and the log, and how long it waits next."""

    def __init__(
        self,
        *,
        what: str,
        consequence: str,
        rights: str,
        on_refused: OnRefused | None,
        stopping: threading.Event,
        random: Callable[[], float],
    ) -> None:
        self.what = what
        self.consequence = consequence
        self.rights = rights
        self.on_refused = on_refused
        self.stopping = stopping
        self.random = random
        self.failures = 0  # in a row, since a watch was last accepted
        self.logged: str | None = None  # log a failure once, not every retry
        self.reported: Refused | None = None

    def accepted(self) -> None:
        self.failures = 0
        self.logged = None
        if self.reported is not None:
            self.reported = None
            if self.on_refused is not None:
                self.on_refused(None)

    def refused(self, refusal: Refused) -> None:
        if refusal.text() != self.logged:
            logger.warning(
                "watching %s failed (%s)%s; retrying with back-off (up to %.0f s) — %s",
                self.what,
                refusal.text(),
                f": {self.rights}" if refusal.status == 403 else "",
                RETRY_BACKOFF_SECONDS[-1],
                self.consequence,
            )
            self.logged = refusal.text()
        if refusal != self.reported:
            self.reported = refusal
            if self.on_refused is not None:
                self.on_refused(refusal)
        self.back_off()

    def unanswered(self, failure: str) -> None:
        if failure != self.logged:
            logger.warning("watching %s: %s; retrying with back-off", self.what, failure)
            self.logged = failure
        self.back_off()

    def back_off(self) -> None:
        self.failures += 1
        self.stopping.wait(retry_delay_seconds(self.failures, random=self.random))
