"""Worker container entry point: `python -m workers.trainer` with FEDPIPE_JOB_ID and FEDPIPE_JOB_ATTEMPT.

In a multi-host run (the FEDPIPE_* variables of shared/multihost.py) the process joins the
run first, before anything touches a JAX device; only the leader gets a node API client.
"""

from __future__ import annotations

import logging
import os
import sys

import jax

from shared import clients
from shared.jobs import JobStatus
from shared.multihost import role_from_env
from workers.trainer.distributed import join
from workers.trainer.job import run_job
from workers.trainer.node_client import NodeClient


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    group = join(role_from_env(os.environ))
    job_id = os.environ["FEDPIPE_JOB_ID"]
    attempt = int(os.environ.get("FEDPIPE_JOB_ATTEMPT", "1"))
    heartbeat_s = float(os.environ.get("FEDPIPE_HEARTBEAT_S", "5"))
    logging.getLogger("fedpipe.worker").info("devices: %s (this process: %s)", jax.devices(), jax.local_devices())
    api = NodeClient.from_env() if group.is_leader else None  # the leader alone speaks for the run
    status = run_job(job_id, attempt, clients.settings(), api, clients.gcs(), heartbeat_s, group)
    code = 0 if status is JobStatus.COMPLETED else 1
    if code and group.size > 1:
        # At exit JAX waits for every process of the run, for a dead one until the coordinator's heartbeat
        # timeout; a failed run has reported what it could and has nothing to wait for.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
