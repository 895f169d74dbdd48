"""A warm parent for local workers: the worker's imports loaded once, one fork per job.

A fresh `python -m workers.trainer` spends about half a second of CPU importing JAX
and the Google Cloud clients before it does anything, and the workers of a federation
start together: eight nodes on a 2-core laptop pay it eight times at once. The zygote
imports once and forks a worker per request. Nothing it preloads has initialised
JAX's backend or opened a connection, so each child sets those up itself, exactly as
a fresh process would, in its own session with its own log. The children share the
stack's persistent compilation cache (`emulators.launcher.compilation_cache`).

When the project's source changes, the zygote answers the next request with
"stale" (the launcher then starts a plain process) and re-executes itself to load
the new code. Run as `python -m emulators.worker_zygote SOCKET` (the stack does);
`emulators.launcher` is its client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import jax

import workers.trainer.__main__ as worker
from emulators.code_watch import snapshot
from emulators.launcher import compilation_cache

SOURCES = [Path(worker.__file__).parents[2] / folder for folder in ("shared", "workers")]


def _run_worker(request: dict) -> None:
    """In the child: become the worker process of one job attempt, and record its exit status where the
    launcher asked (the zygote reaps its children unseen, so nobody else could). Never returns."""
    code = 1
    try:
        os.setsid()  # its own group, as the plain launcher gives it: `fedpipe down` and the tests stop it by group
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (log, 1), (log, 2)):
            os.dup2(fd, target)
        os.environ.clear()
        os.environ.update(request["env"])
        code = worker.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if request.get("exit"):
                Path(request["exit"]).write_text(str(code))
        finally:
            os._exit(code)


def serve(socket_path: Path) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped as they exit
    # JAX read its options from the environment when it was imported, before any request
    # carried the launcher's; set here (options only, no backend), every child inherits them.
    for name, value in compilation_cache(socket_path.parent).items():
        jax.config.update(name, value)
    loaded = snapshot(SOURCES)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    server.listen(64)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                conn.settimeout(5)
                request = json.loads(conn.makefile().readline())
                if _stale(loaded):
                    conn.sendall(b'{"stale": true}\n')
                    server.close()
                    os.execv(sys.executable, [sys.executable, "-m", "emulators.worker_zygote", str(socket_path)])
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    _run_worker(request)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except Exception as exc:  # one bad request (or a client gone) must not take the zygote down
                print(f"worker zygote: request failed: {exc!r}", file=sys.stderr, flush=True)
                try:
                    conn.sendall(json.dumps({"error": repr(exc)}).encode() + b"\n")
                except OSError:
                    pass


def _stale(loaded: dict[Path, float]) -> bool:
    try:
        return snapshot(SOURCES) != loaded
    except OSError:  # a file vanished mid-scan (an editor's swap file): changed, for sure
        return True


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
