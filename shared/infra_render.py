"""Settings + the trigger declaration -> the Terraform variables of infra/.

`render` is pure: the same Settings the functions and the local router use become
the names Terraform creates, so local wiring and production cannot drift. The
committed infra/fedpipe.auto.tfvars.json is `render(Settings())`; regenerate it
(or one for a real project) with

    python -m shared.infra_render > infra/fedpipe.auto.tfvars.json
    FEDPIPE_PROJECT=acme-fl python -m shared.infra_render --out infra/fedpipe.auto.tfvars.json

Terraform reads *.auto.tfvars.json by itself; every key here is a variable
declared in infra/variables.tf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from shared.attestation import NodePolicy, node_audience
from shared.config import Settings
from shared.key_release import terraform_vars
from shared.triggers import triggers

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "infra" / "fedpipe.auto.tfvars.json"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `Settings.from_env()` equal `settings`.

    Terraform sets it on every function and worker, so deployed code computes
    exactly the bucket, topic and collection names Terraform created.
    """
    env = {
        "FEDPIPE_PROJECT": settings.project,
        "FEDPIPE_REGION": settings.region,
        "FEDPIPE_NODES": ",".join(settings.nodes),
        "FEDPIPE_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
    }
    if settings.bucket_prefix:
        env["FEDPIPE_BUCKET_PREFIX"] = settings.bucket_prefix
    return env


def render(settings: Settings) -> dict:
    """Terraform variables (JSON-able) for one deployment of `settings`."""
    return {
        "project": settings.project,
        "region": settings.region,
        # node -> its buckets; the node's region is infra's var.node_regions.
        "nodes": {
            node: {
                "raw_bucket": settings.raw_bucket(node),
                "processed_bucket": settings.processed_bucket(node),
                "quarantine_bucket": settings.quarantine_bucket(node),
            }
            for node in settings.nodes
        },
        "hub_bucket": settings.hub_bucket,
        "topics": {
            "shard_ready": settings.shard_ready_topic,
            "tick": settings.tick_topic,
            "dead_letter": settings.dead_letter_topic,
        },
        "collections": {
            "jobs": settings.jobs_collection,
            "datasets": settings.datasets_collection,
            "quarantine": settings.quarantine_collection,
            "federations": settings.federations_collection,
        },
        "settings_env": settings_env(settings),
        # One Eventarc trigger -> one deployed function (a function has one trigger).
        "triggers": [dataclasses.asdict(t) for t in triggers(settings)],
        # Each node's key-release policy, rendered from the one CEL declaration the local broker evaluates.
        "key_release": terraform_vars(
            NodePolicy(node=node, audience=node_audience(settings.project, node), image_digests=(digest,))
            for node, digest in settings.worker_image_digests.items()
        ),
    }


def dumps(settings: Settings) -> str:
    return json.dumps(render(settings), indent=2) + "\n"


def write(path: str | Path = DEFAULT_PATH, settings: Settings | None = None) -> Path:
    path = Path(path)
    path.write_text(dumps(settings or Settings.from_env()))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.infra_render",
        description="Print infra/'s Terraform variables for the Settings in the environment (FEDPIPE_*).",
    )
    parser.add_argument("--out", type=Path, help="write to this file instead of standard output")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.out:
        write(args.out, settings)
    else:
        sys.stdout.write(dumps(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
