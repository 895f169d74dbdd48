"""Pick the launcher from FEDPIPE_LAUNCHER (local | cloud-run | confidential-space | confidential-batch), imported only when used."""

from __future__ import annotations

import os
from pathlib import Path

from shared.launchers import Launcher

KINDS = ("local", "cloud-run", "confidential-space", "confidential-batch")


def launcher_from_env(env: dict[str, str] | None = None) -> Launcher:
    env = dict(os.environ if env is None else env)
    kind = env.get("FEDPIPE_LAUNCHER", "local")
    if kind == "local":
        from emulators.launcher import LocalProcessLauncher

        return LocalProcessLauncher(Path(env.get("FEDPIPE_STATE_DIR", ".fedpipe")))
    if kind == "cloud-run":
        from shared.launchers.cloud_run import CloudRunJobsLauncher

        return CloudRunJobsLauncher.from_env(env)
    if kind == "confidential-space":
        from shared.launchers.confidential_space import ConfidentialSpaceLauncher

        return ConfidentialSpaceLauncher.from_env(env)
    if kind == "confidential-batch":
        from shared.launchers.batch import ConfidentialBatchLauncher

        return ConfidentialBatchLauncher.from_env(env)
    raise ValueError(f"FEDPIPE_LAUNCHER={kind!r}: expected one of {', '.join(KINDS)}")
