"""Pick the launcher from FEDPIPE_LAUNCHER, its client library imported only when used.

`cloud` routes each job to the engine its accelerator needs (routing.py); the others
name one engine: local | cloud-run | gke | vertex | batch | confidential-space | confidential-batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.launchers import Launcher
from shared.launchers.routing import Backend, RoutingLauncher, engine_factories

KINDS = ("local", "cloud", *(b.value for b in Backend), "confidential-space", "confidential-batch")


def launcher_from_env(env: dict[str, str] | None = None) -> Launcher:
    env = dict(os.environ if env is None else env)
    kind = env.get("FEDPIPE_LAUNCHER", "local")
    if kind == "local":
        from emulators.launcher import LocalProcessLauncher

        return LocalProcessLauncher(Path(env.get("FEDPIPE_STATE_DIR", ".fedpipe")))
    if kind == "cloud":
        return RoutingLauncher.from_env(env)
    if kind in Backend.__members__.values():
        return engine_factories(env)[Backend(kind)]()
    if kind == "confidential-space":
        from shared.launchers.confidential_space import ConfidentialSpaceLauncher

        return ConfidentialSpaceLauncher.from_env(env)
    if kind == "confidential-batch":
        from shared.launchers.batch import ConfidentialBatchLauncher

        return ConfidentialBatchLauncher.from_env(env)
    raise ValueError(f"FEDPIPE_LAUNCHER={kind!r}: expected one of {', '.join(KINDS)}")
