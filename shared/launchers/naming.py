"""Names, labels and environment every cloud launcher derives from (job id, attempt).

Pure and free of cloud libraries, so each launcher module imports only its own
client. A name derived from (job id, attempt) is what makes a retried launch of one
attempt meet the run it already started (AlreadyExists, 409) instead of a second run.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping

from shared.jobs import Job

# Environment every execution gets (read by the worker).
ENV_JOB_ID = "FEDPIPE_JOB_ID"
ENV_JOB_ATTEMPT = "FEDPIPE_JOB_ATTEMPT"

# A pinned image: registry host, repository path, and a sha256 digest (no tag).
DIGEST_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+@sha256:[0-9a-f]{64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Compute instance names, Batch job ids and Kubernetes object names (RFC 1123 labels) all fit this.
RESOURCE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_NAME = 63
MIN_NAME = 32  # room for a prefix, some of the job id, the attempt and the hash


def require_digest(image: str) -> str:
    """`image` if it names its content by sha256 digest; a tag is refused (it can move between review and launch)."""
    if not DIGEST_REFERENCE.fullmatch(image):
        raise ValueError(
            f"image {image!r} is not pinned by digest (expected REGISTRY/PATH@sha256:<64 hex>): "
            "a key-release policy allowlists image digests, and a tag can move"
        )
    return image


def resource_name(prefix: str, job_id: str, attempt: int, max_length: int = MAX_NAME) -> str:
    """The name of one attempt's run: `<prefix>-<job slug>-a<attempt>-<hash>`.

    Lowercase letters, digits and '-', at most `max_length` characters (Compute,
    Batch and Kubernetes share this rule; a JobSet needs shorter names, as its pods'
    host names add to it). The job id is slugged and cut to fit; the hash of the full
    id keeps two ids that slug alike ("Job_1", "job-1") or share a long prefix apart.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not MIN_NAME <= max_length <= MAX_NAME:
        raise ValueError(f"max_length must be {MIN_NAME}..{MAX_NAME}, got {max_length}")
    if not RESOURCE_NAME.fullmatch(prefix) or len(prefix) > 24:
        raise ValueError(f"name prefix {prefix!r}: 1-24 lowercase letters, digits or '-', starting with a letter")
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    suffix = f"-a{attempt}-{digest}"
    slug = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")
    head = f"{prefix}-{slug}"[: max_length - len(suffix)].rstrip("-")
    return head + suffix


def request_id(kind: str, *parts: str) -> str:
    """A UUID derived from what is being created: the API drops a repeated insert with it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "fedpipe:" + kind + ":" + "/".join(parts)))


def label_value(value: str) -> str:
    """A Google Cloud label value (lowercase letters, digits, '_' and '-', at most 63 characters)."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def job_labels(job: Job, name: str) -> dict[str, str]:
    """Labels that find an attempt's run again (billing, cleanup, audit, Vertex's look-up before a create)."""
    return {
        "app": "fedpipe",
        "fedpipe-job": label_value(job.id),
        "fedpipe-attempt": str(job.attempt),
        "fedpipe-node": label_value(job.spec.dataset.node),
        "fedpipe-name": name,  # exact, even where the job id label was cut
    }


def job_env(job: Job, worker_env: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: its node's settings, then this attempt's job id and attempt."""
    for key in worker_env:
        if not ENV_NAME.fullmatch(key):
            raise ValueError(f"environment variable name {key!r} is not valid")
        if key in (ENV_JOB_ID, ENV_JOB_ATTEMPT):
            raise ValueError(f"{key} is set per attempt by the launcher, not by the worker environment")
    return {**dict(sorted(worker_env.items())), ENV_JOB_ID: job.id, ENV_JOB_ATTEMPT: str(job.attempt)}


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """`"us=us-central1-a,eu=europe-west4-a"` -> `{"us": "us-central1-a", ...}`."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: expected node=value, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs
