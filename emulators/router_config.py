"""Settings of the local trigger router (local Eventarc)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class RetryPolicy(BaseModel, frozen=True):
    """Exponential backoff between delivery attempts, then dead-letter.

    Eventarc backs off from 10 s to 600 s; locally the defaults are shorter so a
    broken function shows up in seconds, and tests shrink them further.
    """

    min_backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=5, ge=1)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.min_backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


class RouterConfig(BaseModel, frozen=True):
    port: int = 0
    function_urls: dict[str, str] = {}
    retry: RetryPolicy = RetryPolicy()
    delivery_timeout_s: float = 300.0
    reaper_interval_s: float = 2.0
