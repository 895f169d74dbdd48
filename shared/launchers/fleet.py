"""Where, as whom and from which image each node's workers run on GKE, Vertex AI and Cloud Batch.

One configuration for the three accelerator engines, read from the environment once
(infra/accelerators.tf outputs the values). Every node's workers run in the node's own
region as the node's worker service account, so a node's data never leaves its region
and no node's worker can act as another's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from shared.config import Settings
from shared.jobs import Job
from shared.launchers import LaunchRefused
from shared.launchers.naming import job_env, parse_pairs, require_digest

ENV_NODE_REGIONS = "FEDPIPE_NODE_REGIONS"  # "us=us-central1,eu=europe-west4" (the Cloud Run launcher reads it too)
ENV_IMAGES = {  # the worker image of each accelerator kind, by digest (workers/trainer/Dockerfile, .gpu, .tpu)
    "cpu": "FEDPIPE_WORKER_IMAGE_CPU",
    "gpu": "FEDPIPE_WORKER_IMAGE_GPU",
    "tpu": "FEDPIPE_WORKER_IMAGE_TPU",
}
ENV_SERVICE_ACCOUNTS = "FEDPIPE_WORKER_SERVICE_ACCOUNTS"  # "us=fedpipe-worker-us@p.iam.gserviceaccount.com,..."
ENV_WORKER_ENV = "FEDPIPE_WORKER_ENV"  # JSON {node: {NAME: value}}: each node's worker settings
ENV_INFRA_PREFIX = "FEDPIPE_NAME_PREFIX"  # infra's var.name_prefix, default "fedpipe"
ENV_MAX_RUN_SECONDS = "FEDPIPE_MAX_RUN_SECONDS"

DEFAULT_MAX_RUN = timedelta(hours=6)
MAX_RUN = timedelta(days=7)  # DWS flex-start's bound, and the longest a stray run may cost


@dataclass(frozen=True)
class Fleet:
    project: str
    regions: dict[str, str]  # node -> region
    images: dict[str, str]  # accelerator kind -> worker image by digest
    service_accounts: dict[str, str] = field(default_factory=dict)  # a node not named here: infra's <prefix>-worker-<node>
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    infra_prefix: str = "fedpipe"
    max_run: timedelta = DEFAULT_MAX_RUN  # a run's wall-clock bound, queueing not counted

    def __post_init__(self) -> None:
        for kind, image in self.images.items():
            if kind not in ENV_IMAGES:
                raise ValueError(f"worker image for {kind!r}: kinds are {', '.join(ENV_IMAGES)}")
            require_digest(image)
        if not timedelta(0) < self.max_run <= MAX_RUN:
            raise ValueError(f"max run {self.max_run} is not within (0, {MAX_RUN}]")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, settings: Settings | None = None) -> Fleet:
        env = os.environ if env is None else env
        settings = settings or Settings.from_env(dict(env))
        regions = parse_pairs(env.get(ENV_NODE_REGIONS, ""), ENV_NODE_REGIONS)
        if not regions:
            raise ValueError(f"{ENV_NODE_REGIONS} is not set (node=region pairs: where each node's workers run)")
        return cls(
            project=settings.project,
            regions=regions,
            images={kind: env[name] for kind, name in ENV_IMAGES.items() if env.get(name)},
            service_accounts=parse_pairs(env.get(ENV_SERVICE_ACCOUNTS, ""), ENV_SERVICE_ACCOUNTS),
            worker_env=json.loads(env.get(ENV_WORKER_ENV) or "{}"),
            infra_prefix=env.get(ENV_INFRA_PREFIX) or "fedpipe",
            max_run=timedelta(seconds=int(env.get(ENV_MAX_RUN_SECONDS) or DEFAULT_MAX_RUN.total_seconds())),
        )

    def region(self, job: Job) -> str:
        node = job.spec.dataset.node
        if node not in self.regions:
            raise LaunchRefused(f"job {job.id}: node {node!r} has no worker region (known: {', '.join(sorted(self.regions)) or 'none'})")
        return self.regions[node]

    def service_account(self, node: str) -> str:
        """The node's worker Google service account."""
        return self.service_accounts.get(node) or f"{self.infra_prefix}-worker-{node}@{self.project}.iam.gserviceaccount.com"

    def image(self, job: Job) -> str:
        kind = job.spec.accelerator.kind
        if kind not in self.images:
            raise LaunchRefused(f"job {job.id}: no {kind} worker image is deployed ({ENV_IMAGES[kind]} is not set)")
        return self.images[kind]

    def env(self, job: Job) -> dict[str, str]:
        """The worker's environment: its node's settings, then the attempt's job id and attempt."""
        try:
            return job_env(job, self.worker_env.get(job.spec.dataset.node, {}))
        except ValueError as exc:
            raise LaunchRefused(f"job {job.id}: {exc}") from exc
