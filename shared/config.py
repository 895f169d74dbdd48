"""One typed settings object, read from the environment once per process."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field


class Settings(BaseModel, frozen=True):
    """Names of every bucket, topic and collection fedpipe uses, for one project.

    The same names are used locally (emulators) and in production (Terraform reads
    them through `fedpipe infra render`), so code never builds a name by hand.
    """

    project: str = "fedpipe-local"
    region: str = "us-central1"
    nodes: tuple[str, ...] = ("us", "eu")
    bucket_prefix: str = Field(default="", description="defaults to the project id")
    max_upload_bytes: int = 64 * 1024 * 1024

    @property
    def _prefix(self) -> str:
        return self.bucket_prefix or self.project

    def raw_bucket(self, node: str) -> str:
        return f"{self._prefix}-{node}-raw"

    def processed_bucket(self, node: str) -> str:
        return f"{self._prefix}-{node}-processed"

    def quarantine_bucket(self, node: str) -> str:
        return f"{self._prefix}-{node}-quarantine"

    @property
    def hub_bucket(self) -> str:
        return f"{self._prefix}-hub"

    def node_of_bucket(self, bucket: str) -> str | None:
        """The node owning a raw bucket, or None for any other bucket."""
        for node in self.nodes:
            if bucket == self.raw_bucket(node):
                return node
        return None

    def all_buckets(self) -> list[str]:
        per_node = [
            f(node)
            for node in self.nodes
            for f in (self.raw_bucket, self.processed_bucket, self.quarantine_bucket)
        ]
        return [*per_node, self.hub_bucket]

    # Pub/Sub topics.
    shard_ready_topic: str = "shard-ready"
    tick_topic: str = "fedpipe-tick"  # Cloud Scheduler's clock for shared/timekeeper.py
    dead_letter_topic: str = "fedpipe-dead-letter"

    # Firestore collections.
    jobs_collection: str = "jobs"
    datasets_collection: str = "datasets"
    quarantine_collection: str = "quarantine"
    federations_collection: str = "federations"
    nodes_collection: str = "nodes"  # the node registry: each node's worker identity and signing key (shared/node_registry.py)
    refusals_collection: str = "refusals"  # node API requests refused for their identity (shared/node_api.py)

    # Each node's key-encryption key (shared/envelope.py): a Cloud KMS key URI per node in
    # production; locally, the stand-in key store's directory.
    node_keks: dict[str, str] = {}
    local_keystore: str = ""
    # Each node's allowed worker image (sha256:...): its key-release policy's allowlist (shared/key_release.py).
    worker_image_digests: dict[str, str] = {}

    # The node API (functions/node_api.py): workers reach it with a Google-signed ID token
    # whose audience is its URL; it checks the token against these certificates and issuers.
    node_api_url: str = ""
    id_token_certs_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    id_token_issuers: tuple[str, ...] = ("https://accounts.google.com", "accounts.google.com")
    # The attested aggregator (workers/aggregator), for federations with confidential_aggregation: its URL (the
    # audience of the hub's ID tokens) and the hub identity, the only caller it serves.
    aggregator_url: str = ""
    hub_identity: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        if project := env.get("FEDPIPE_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT"):
            values["project"] = project
        if nodes := env.get("FEDPIPE_NODES"):
            values["nodes"] = tuple(n.strip() for n in nodes.split(",") if n.strip())
        if prefix := env.get("FEDPIPE_BUCKET_PREFIX"):
            values["bucket_prefix"] = prefix
        if region := env.get("FEDPIPE_REGION"):
            values["region"] = region
        if max_bytes := env.get("FEDPIPE_MAX_UPLOAD_BYTES"):
            values["max_upload_bytes"] = int(max_bytes)
        if keks := env.get("FEDPIPE_NODE_KEKS"):  # "us=gcp-kms://projects/...,eu=gcp-kms://..."
            values["node_keks"] = dict(item.strip().split("=", 1) for item in keks.split(",") if item.strip())
        if digests := env.get("FEDPIPE_WORKER_IMAGE_DIGESTS"):  # "us=sha256:...,eu=sha256:..."
            values["worker_image_digests"] = dict(item.strip().split("=", 1) for item in digests.split(",") if item.strip())
        if keystore := env.get("FEDPIPE_LOCAL_KEYSTORE"):
            values["local_keystore"] = keystore
        if node_api_url := env.get("FEDPIPE_NODE_API_URL"):
            values["node_api_url"] = node_api_url
        if certs_url := env.get("FEDPIPE_ID_TOKEN_CERTS_URL"):
            values["id_token_certs_url"] = certs_url
        if issuer := env.get("FEDPIPE_ID_TOKEN_ISSUER"):
            values["id_token_issuers"] = (issuer,)
        if aggregator_url := env.get("FEDPIPE_AGGREGATOR_URL"):
            values["aggregator_url"] = aggregator_url
        if hub_identity := env.get("FEDPIPE_HUB_IDENTITY"):
            values["hub_identity"] = hub_identity.lower()
        return cls(**values)
