"""Worker container entry point: `python -m workers.trainer` with FEDPIPE_JOB_ID and FEDPIPE_JOB_ATTEMPT."""

from __future__ import annotations

import logging
import os
import sys

import jax

from shared import clients
from workers.trainer.job import run_job
from workers.trainer.node_client import NodeClient


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id = os.environ["FEDPIPE_JOB_ID"]
    attempt = int(os.environ.get("FEDPIPE_JOB_ATTEMPT", "1"))
    heartbeat_s = float(os.environ.get("FEDPIPE_HEARTBEAT_S", "5"))
    logging.getLogger("fedpipe.worker").info("devices: %s", jax.devices())
    status = run_job(job_id, attempt, clients.settings(), NodeClient.from_env(), clients.gcs(), heartbeat_s)
    return 0 if status is not None and status.value == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
