"""Issue independent cloud calls at once: each is a network round trip, and several sit
on every round's critical path (hub and workers)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

IO = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fedpipe-io")


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls concurrently; results in order, the first error raised."""
    return [future.result() for future in [IO.submit(call) for call in calls]]
