"""One hostile node among three, on the real stack: what admission refuses, and what robust aggregation outvotes.

`mallory` is a registered node whose worker is tests/emulator/hostile_worker.py: it
speaks through the node API with its own token and signs with its own key, as a
compromised site could. In round 1 it sends NaN weights, weights scaled by 1e6, a
claim of 2^62 examples and an oversized object, each of which must be refused and
recorded with its reason. Then, every round, it sends `-4 x` the global model with
the largest example count it may claim: finite, within bounds, counted.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from fedpipe import fed_views
from fedpipe.fed_demo import start_by_upload, upload_node_shares, wait_datasets, watch_federation
from shared.federation import FederationConfig, FedNode
from shared.fedstore import FirestoreFederationStore

pytestmark = pytest.mark.emulator
QUIET = Console(file=io.StringIO())
HONEST = ["us", "eu"]
DATASET = "poison-digits"
TOLERANCE = 0.02  # the target: robust aggregation within 2 points of the honest run


@pytest.fixture(scope="module")
def poison_shares(cloud, clients):
    upload_node_shares(clients.gcs, clients.settings, [*HONEST, "mallory"], DATASET, "digits", alpha=100.0, seed=3)
    wait_datasets(clients.db, clients.settings, [*HONEST, "mallory"], DATASET, 90)


def run(clients, fid: str, nodes: list[str], strategy: str) -> tuple[dict, list[dict]]:
    config = FederationConfig(
        id=fid, nodes=[FedNode(name=n, dataset=DATASET) for n in nodes], rounds=4, local_epochs=2, strategy=strategy,
        trim_fraction=0.34, round_deadline_s=120, lease_seconds=60,
    )
    start_by_upload(clients.gcs, clients.settings, config)
    watch_federation(clients.db, clients.settings, fid, QUIET, 240)
    return fed_views.load(clients.db, clients.settings, fid)


def honest_accuracy(rounds: list[dict]) -> float:
    """The final model's accuracy on the honest nodes' held-out rows: what mallory reports does not count."""
    final = rounds[-1]["updates"]
    examples = sum(final[n]["metrics"]["test_examples"] for n in HONEST)
    return sum(final[n]["metrics"]["global_accuracy"] * final[n]["metrics"]["test_examples"] for n in HONEST) / examples


def test_a_hostile_nodes_refused_attacks_are_recorded_and_robust_aggregation_outvotes_the_rest(cloud, clients, poison_shares):
    fed, rounds = run(clients, "poison-honest", HONEST, "fedavg")
    assert fed["status"] == "completed"
    accuracy = {"honest": honest_accuracy(rounds)}
    refused = {}
    for strategy in ("fedavg", "median", "trimmed_mean"):
        fid = f"poison-{strategy.replace('_', '-')}"
        fed, rounds = run(clients, fid, [*HONEST, "mallory"], strategy)
        assert fed["status"] == "completed", fed.get("error")
        accuracy[strategy] = honest_accuracy(rounds)
        refused[strategy] = sorted(r.reason.value for r in FirestoreFederationStore(clients.db, clients.settings).refusals(fid, 1))
        assert all("mallory" in rd["participants"] for rd in rounds)  # its finite poison passed admission every round
    print("\nfinal accuracy on the honest nodes' held-out rows: " + json.dumps({k: round(v, 4) for k, v in accuracy.items()}))

    for strategy, reasons in refused.items():
        assert reasons == ["not_finite", "out_of_bounds", "too_big", "too_many_examples"], strategy
    assert accuracy["honest"] > 0.85
    assert accuracy["fedavg"] < accuracy["honest"] - 0.2  # the attack works on a plain mean...
    assert accuracy["median"] >= accuracy["honest"] - TOLERANCE  # ...and not on robust statistics
    assert accuracy["trimmed_mean"] >= accuracy["honest"] - TOLERANCE
