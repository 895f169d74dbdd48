"""Pick the launcher from FEDPIPE_LAUNCHER (local | cloud-run), imported only when used."""

from __future__ import annotations

import os
from pathlib import Path

from shared.launchers import Launcher


def launcher_from_env(env: dict[str, str] | None = None) -> Launcher:
    env = dict(os.environ if env is None else env)
    kind = env.get("FEDPIPE_LAUNCHER", "local")
    if kind == "local":
        from emulators.launcher import LocalProcessLauncher

        return LocalProcessLauncher(Path(env.get("FEDPIPE_STATE_DIR", ".fedpipe")))
    if kind == "cloud-run":
        from shared.launchers.cloud_run import CloudRunJobsLauncher

        return CloudRunJobsLauncher.from_env(env)
    raise ValueError(f"FEDPIPE_LAUNCHER={kind!r}: expected 'local' or 'cloud-run'")
