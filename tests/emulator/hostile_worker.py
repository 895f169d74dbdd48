"""A hostile node's worker, for the poisoning tests: `python -m tests.emulator.hostile_worker`.

It holds what a compromised site holds (its own ID token, signing key and data) and
uses the same node API as fedpipe's worker. In the first round it tries each attack
that admission must refuse, then, every round, it sends a model that passes admission
but pulls the aggregate away: `global * POISON_SCALE`, finite and within the weight bound,
with the largest example count it may claim.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
from google.cloud import storage

from shared import signing, weights
from shared.config import Settings
from shared.envelope import Purpose
from shared.federation import update_object
from workers.trainer.keys import node_keys
from workers.trainer.node_client import NodeClient
from workers.trainer.signing_key import node_signer
from workers.trainer.training import TrainConfig, Trainer

log = logging.getLogger("fedpipe.hostile")
POISON_SCALE = -4.0
REFUSED_ATTACKS = ("nan", "scaled_1e6", "claims_2_62_examples", "oversized")


def upload(api, hub, envelope, signer, job, view, r: int, params: dict | None, examples: int, payload: bytes | None = None) -> str:
    ref = job.spec.federation
    evaluate = view.kind == "evaluate"
    metrics = {"global_accuracy": 0.5, "global_loss": 1.0, "test_examples": 1}
    if not evaluate:
        metrics |= {"train_loss": 1.0, "train_accuracy": 0.5}
    if payload is None:
        payload = json.dumps(metrics).encode() if evaluate else weights.to_bytes(params, {"federation": ref.id, "round": str(r), "node": ref.node})
    blob = hub.blob(update_object(ref.id, r, ref.node, job.attempt, evaluate))
    blob.metadata = {"examples": str(examples), "metrics": json.dumps(metrics)}
    claims = signing.update_claims(federation=ref.id, round=r, node=ref.node, attempt=job.attempt, examples=examples, metrics=metrics, payload=payload)
    blob.metadata |= signing.signature_metadata(signer, claims)
    blob.upload_from_string(envelope.seal(payload, hub.name, blob.name, Purpose.UPDATE))  # with its node's released key
    return api.report_update(ref.id, r, blob.name, blob.generation).message


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = NodeClient.from_env()
    job = api.start(os.environ["FEDPIPE_JOB_ID"], int(os.environ["FEDPIPE_JOB_ATTEMPT"]))
    if job is None or job.spec.federation is None:
        return 1
    fid = job.spec.federation.id
    hub = storage.Client(project=Settings.from_env().project).bucket(Settings.from_env().hub_bucket)
    signer = node_signer(Settings.from_env().project, job.spec.dataset.node)  # released to its attested workload, like any node's
    keys = node_keys(Settings.from_env(), job.spec.dataset.node, on_failure=lambda _: None)
    dataset = api.dataset(job.id)
    rows = dataset.stats.count
    view = api.federation(fid)
    initial = Trainer(TrainConfig.from_spec(view.train), len(dataset.spec.features), dataset.spec.num_classes).init_params()
    expected = weights.spec_of(initial)
    done = 0
    while view.status == "running":
        r = view.round
        if r > done:
            base = initial if view.global_model_round is None else weights.from_bytes(api.global_model(fid, view.global_model_round), expected)[0]
            if r == 1:
                attacks = {
                    "nan": ({k: np.full_like(v, np.nan) for k, v in base.items()}, rows, None),
                    "scaled_1e6": ({k: v * 1e6 + 1e6 for k, v in base.items()}, rows, None),
                    "claims_2_62_examples": (base, 2**62, None),
                    "oversized": (None, rows, weights.to_bytes(base) + b"\0" * 2**20),
                }
                for name in REFUSED_ATTACKS:
                    params, examples, payload = attacks[name]
                    log.info("attack %s: %s", name, upload(api, hub, keys.envelope, signer, job, view, r, params, examples, payload))
            poisoned = {k: (v * POISON_SCALE).astype(np.float32) for k, v in base.items()}
            log.info("round %d poisoned update: %s", r, upload(api, hub, keys.envelope, signer, job, view, r, poisoned, rows))
            done = r
        view = api.federation(fid, after=done, wait_s=10)
    api.finish(job.id, job.attempt, "completed" if view.status == "completed" else "failed", error=view.error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
