"""One value per key, shared by everyone who names that key, closed when the last one leaves.

The operator shares what is costly to hold once per policy: the database connections of a
DSN (``pools``), the broker publisher of a URL (``publishers``), the pod watch of a
(namespace, label selector) (``podwatch``). Each is opened by the first ``attach`` of its
key and closed after the last matching ``detach``; this module is that reference count,
written once. Closing runs outside the lock (it may wait on the network), and only the
value still registered under its key is removed, so a key opened again meanwhile keeps its
new value.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _nothing(_: object) -> None:
    pass


@dataclasses.dataclass
class _Entry(Generic[V]):
    value: V
    users: int = 0


class SharedByKey(Generic[K, V]):
    def __init__(self, *, close_value: Callable[[V], None]) -> None:
        self._close = close_value
        self._lock = threading.Lock()
        self._entries: dict[K, _Entry[V]] = {}

    def attach(
        self, key: K, *, open_value: Callable[[], V], joining: Callable[[V], None] = _nothing
    ) -> V:
        """The value of ``key``, opened by ``open_value`` if nobody uses it yet; every
        ``attach`` is matched by one ``detach``. ``joining`` runs under the lock, before
        anyone can leave: a late joiner catches up with the value's state there."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(open_value())
            joining(entry.value)
            entry.users += 1
            return entry.value

    def detach(self, key: K, value: V, *, leaving: Callable[[V], None] = _nothing) -> None:
        """One user of ``value`` leaves (``leaving`` runs under the lock); the last closes it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.value is not value:
                return  # closed already: a detach too many
            leaving(value)
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        self._close(value)

    def values(self) -> list[V]:
        with self._lock:
            return [entry.value for entry in self._entries.values()]
