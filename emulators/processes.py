"""Child processes of the local cloud: each in its own process group, logs to a file.

A process group per child lets `stop` take down what the child spawned too (the
gcloud emulator scripts start a JVM), so Ctrl-C leaves no orphans.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests


class StartupError(RuntimeError):
    """A local service did not become ready; the message names its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the group, wait for the child, then SIGKILL whatever of the group is left."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # e.g. the JVM an emulator script started
        except ProcessLookupError:
            pass
        self.popen.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def kill_group(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process group led by `pid` (not our child), then SIGKILL whatever is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    return probe


def wait_ready(proc: ManagedProcess, probe: Callable[[], bool], timeout_s: float) -> None:
    """Poll `probe` until it passes; fail fast with the log tail if the child died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(f"{proc.name} exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        if probe():
            return
        time.sleep(0.1)
    raise StartupError(f"{proc.name} not ready after {timeout_s:.0f}s; log {proc.log_path}:\n{proc.log_tail()}")
