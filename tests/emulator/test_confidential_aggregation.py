"""The hub's aggregation as an attested workload, on the real stack: updates sealed to a key made inside
the (simulated) TEE, which the hub, its operator and the other nodes cannot open, and which releases
only aggregates of at least two nodes, once per round."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from emulators.metadata_server import IDENTITY_PATH
from fedpipe.fed_demo import start_by_upload, upload_node_shares, wait_datasets
from shared import gcs_uri
from shared.aggregator_messages import AggregateRequest
from shared.attested_seal import MAGIC
from shared.envelope import Envelope, EnvelopeError, LocalKeyStore, Purpose
from shared.federation import FederationConfig, FedNode
from shared.fedstore import Federation, Update
from tests.conftest import wait_for

pytestmark = pytest.mark.emulator
FID = "fed-attested-agg"


def hub_token(cloud, audience: str) -> str:
    port = cloud.endpoints.hub_metadata_port
    return requests.get(f"http://127.0.0.1:{port}{IDENTITY_PATH}", params={"audience": audience, "format": "full"},
                        headers={"Metadata-Flavor": "Google"}, timeout=10).text


@pytest.fixture(scope="module")
def federation(cloud, clients):
    """A confidential federation of us and eu, run to completion."""
    upload_node_shares(clients.gcs, clients.settings, ["us", "eu"], "agg-digits", "digits", alpha=100.0, seed=3)
    wait_datasets(clients.db, clients.settings, ["us", "eu"], "agg-digits", 60)
    config = FederationConfig(
        id=FID, nodes=[FedNode(name=n, dataset="agg-digits") for n in ("us", "eu")], rounds=3, local_epochs=2, confidential_aggregation=True,
    )
    start_by_upload(clients.gcs, clients.settings, config)
    doc = wait_for(lambda: (d := clients.db.collection("federations").document(FID).get().to_dict()) and d["status"] != "running" and d,
                   180, "the confidential federation to end")
    return doc


def test_a_confidential_federation_completes_and_learns(federation):
    assert federation["status"] == "completed", federation.get("error")
    assert federation["final"]["accuracy"] > 0.85


def test_updates_are_sealed_to_the_aggregator_and_do_not_open_under_any_node_or_hub_key(cloud, clients, federation):
    rounds = clients.db.collection("federations").document(FID).collection("rounds").document("0001").collection("updates").stream()
    updates = [Update.model_validate(u.to_dict()) for u in rounds]
    assert {u.node for u in updates} == {"us", "eu"}
    keys = LocalKeyStore(Path(cloud.endpoints.client_env()["FEDPIPE_LOCAL_KEYSTORE"]))
    for update in updates:
        sealed = gcs_uri.read(clients.gcs, update.object, update.generation)
        assert sealed.startswith(MAGIC)
        bucket, name = update.object.removeprefix("gs://").split("/", 1)
        for owner in ("us", "eu", "hub"):
            with pytest.raises(EnvelopeError):
                Envelope(keys.kek(owner)).open(sealed, bucket, name, Purpose.UPDATE)


def test_the_aggregator_refuses_one_nodes_aggregate_and_a_second_set_for_a_round(cloud, clients, federation):
    fed = Federation.from_doc(FID, clients.db.collection("federations").document(FID).get().to_dict())
    updates = {u.get("node"): Update.model_validate(u.to_dict()) for u in
               clients.db.collection("federations").document(FID).collection("rounds").document("0001").collection("updates").stream()}
    url = cloud.endpoints.aggregator_url
    headers = {"Authorization": f"Bearer {hub_token(cloud, url)}", "Content-Type": "application/json"}

    alone = AggregateRequest(federation=fed, round=1, participants={"us": updates["us"]})
    reply = requests.post(url + "v1/aggregate", data=alone.model_dump_json(), headers=headers, timeout=30)
    assert reply.status_code == 409 and "at least 2" in reply.json()["error"]

    both = AggregateRequest(federation=fed, round=1, participants=updates, recover=True)
    assert requests.post(url + "v1/aggregate", data=both.model_dump_json(), headers=headers, timeout=60).status_code == 200  # the same set again

    renamed = {"us": updates["us"], "eu": updates["us"].model_copy(update={"node": "eu"})}
    swapped = AggregateRequest(federation=fed, round=1, participants=renamed)
    reply = requests.post(url + "v1/aggregate", data=swapped.model_dump_json(), headers=headers, timeout=30)
    assert reply.status_code == 409  # us's update offered as eu's: refused by its path


def test_only_the_hub_identity_may_call_the_aggregator(cloud, federation):
    url = cloud.endpoints.aggregator_url
    port = cloud.endpoints.metadata_ports["us"]
    node_token = requests.get(f"http://127.0.0.1:{port}{IDENTITY_PATH}", params={"audience": url, "format": "full"},
                              headers={"Metadata-Flavor": "Google"}, timeout=10).text
    assert requests.get(url + "v1/key", headers={"Authorization": f"Bearer {node_token}"}, timeout=10).status_code == 403
    assert requests.get(url + "v1/key", timeout=10).status_code == 401
    wrong_audience = hub_token(cloud, "https://elsewhere.example")
    assert requests.get(url + "v1/key", headers={"Authorization": f"Bearer {wrong_audience}"}, timeout=10).status_code == 401
