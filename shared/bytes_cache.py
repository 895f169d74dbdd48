"""Objects a process read once and may need again, held in memory up to a byte bound.

Keys are (name, number): an object and its generation, or a federation and its round. Both
name bytes that never change, so a held copy is never stale. Oldest out first; an entry
larger than the bound is never held. Thread-safe: one function instance serves concurrent
requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class BytesCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, name: str, number: int, data: bytes) -> None:
        with self._lock:
            if (name, number) in self._held or len(data) > self.max_bytes:
                return
            self._held[(name, number)] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                self._size -= len(self._held.popitem(last=False)[1])

    def get(self, name: str, number: int) -> bytes | None:
        """The held copy, kept (and made the newest); None if there is none."""
        with self._lock:
            data = self._held.get((name, number))
            if data is not None:
                self._held.move_to_end((name, number))
            return data

    def pop(self, name: str, number: int) -> bytes | None:
        """The held copy, no longer held; None if there is none."""
        with self._lock:
            data = self._held.pop((name, number), None)
            self._size -= len(data) if data is not None else 0
            return data
