"""Every fedpipe Cloud Function entry point, for `gcloud functions deploy --entry-point`.

| entry point     | trigger (shared/triggers.py)              | logic                           |
| --------------- | ----------------------------------------- | ------------------------------- |
| on_raw_upload   | object finalized in a node's raw bucket   | shared.ingest.handle_raw_object |
| on_shard_ready  | Pub/Sub topic shard-ready                 | shared.manifest.handle_shard_ready |
| on_job_written  | Firestore document jobs/{jobId} written   | shared.launch.launch_pending_job|
| on_hub_upload   | object finalized in the hub bucket        | shared.hub.handle_hub_object    |
| on_tick         | Pub/Sub topic fedpipe-tick (each minute)  | shared.timekeeper.tick          |
| node_api        | HTTP, from workers with an ID token       | shared.node_api.NodeApi         |
"""

from shared import logs

logs.configure()

from functions.hub_upload import on_hub_upload  # noqa: E402
from functions.job_written import on_job_written  # noqa: E402
from functions.node_api import node_api  # noqa: E402
from functions.raw_upload import on_raw_upload  # noqa: E402
from functions.shard_ready import on_shard_ready  # noqa: E402
from functions.tick import on_tick  # noqa: E402

__all__ = ["node_api", "on_hub_upload", "on_job_written", "on_raw_upload", "on_shard_ready", "on_tick"]
