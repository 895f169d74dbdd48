"""How the Google Cloud launchers call their APIs: each kind of failure mapped once.

A launch that meets its own earlier run (AlreadyExists) is that run; a state read of
a run the API no longer knows is GONE; a stop of a run that is gone or already over
is done. Everything else the client raises becomes a LaunchError naming what failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions

from shared.launchers import LaunchError, RunState

T = TypeVar("T")

# What a client call raises for a failed call: an API error (PermissionDenied, InvalidArgument, ...),
# transient errors past the client's retry deadline, and missing or bad credentials where a client is made.
CALL_ERRORS = (api_exceptions.GoogleAPICallError, api_exceptions.RetryError, auth_exceptions.GoogleAuthError)


def is_already_exists(exc: Exception) -> bool:
    """A 409 for the deterministic name: this attempt was launched before.

    Compute's REST API answers 409 Conflict (api_core raises `Conflict`, not its
    `AlreadyExists` subclass); only its "already exists" reason is a launch we
    made; any other conflict is an error.
    """
    if isinstance(exc, api_exceptions.AlreadyExists):
        return True
    return isinstance(exc, api_exceptions.Conflict) and "already exists" in str(exc.message).lower()


def call(fn: Callable[[], T], failure: str) -> T:
    """`fn()`, its failure a LaunchError: `failure` says what failed (e.g. "job j1: could not create X")."""
    try:
        return fn()
    except CALL_ERRORS as exc:
        raise LaunchError(f"{failure}: {exc}") from exc


def create(call: Callable[[], object], failure: str) -> None:
    """Send a create whose name derives from (job id, attempt); AlreadyExists means it was sent before.

    `failure` says what failed (e.g. "job j1: could not create X"); the client's error follows it.
    """
    try:
        call()
    except CALL_ERRORS as exc:
        if is_already_exists(exc):
            return
        raise LaunchError(f"{failure}: {exc}") from exc


def read_state(get: Callable[[], T], to_state: Callable[[T], RunState], what: str) -> RunState:
    """The run's state from its resource; GONE when the API no longer knows it."""
    try:
        resource = get()
    except api_exceptions.NotFound:
        return RunState.GONE
    except CALL_ERRORS as exc:
        raise LaunchError(f"could not read the state of {what}: {exc}") from exc
    return to_state(resource)


def stop(call: Callable[[], object], what: str) -> None:
    """Cancel or delete a run, without waiting: one that is gone (NotFound) or already over (FailedPrecondition) needs nothing."""
    try:
        call()
    except (api_exceptions.NotFound, api_exceptions.FailedPrecondition):
        return
    except CALL_ERRORS as exc:
        raise LaunchError(f"could not stop {what}: {exc}") from exc
