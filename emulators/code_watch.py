"""Restart the functions when their code changes, as a redeploy would, without restarting the stack.

A poll of the project's own source folders (not the virtualenv: inotify watchers on
site-packages overflow with several functions), so it works on any filesystem.
Events that arrive while a function restarts are retried by the router, not lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("fedpipe.code_watch")


def snapshot(folders: Iterable[Path]) -> dict[Path, float]:
    return {p: p.stat().st_mtime for folder in folders for p in folder.rglob("*.py")}


class CodeWatcher:
    def __init__(self, folders: list[Path], on_change: Callable[[list[Path]], None], interval_s: float = 1.0) -> None:
        self.folders, self.on_change, self.interval_s = folders, on_change, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="code-watch")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        seen = snapshot(self.folders)
        while not self._stop.wait(self.interval_s):
            now = snapshot(self.folders)
            changed = sorted(p for p in now.keys() | seen.keys() if now.get(p) != seen.get(p))
            seen = now
            if changed:
                try:
                    self.on_change(changed)
                except Exception:
                    log.exception("restarting the functions failed")
