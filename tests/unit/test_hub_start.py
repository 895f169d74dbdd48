"""shared.hub starting: a request becomes a running federation once; a rejected id stays rejected."""

from __future__ import annotations

import pytest

from shared.datasets import FeatureStats
from shared.fedstore import FederationStatus, RoundStatus
from shared.hub import StartKind
from shared.hub.starting import start_from_request
from shared.ingest import RawObject
from tests.unit.hub_fakes import CONFIG, NOW, FakeHub

pytestmark = pytest.mark.unit
STATS = {"us": FeatureStats(count=100, mean=[0.0] * 3, m2=[1.0] * 3, label_counts=[50, 50]),
         "eu": FeatureStats(count=50, mean=[1.0] * 3, m2=[1.0] * 3, label_counts=[25, 25])}


class Snap:
    def __init__(self, path: str, doc: dict | None) -> None:
        self.reference, self.doc, self.exists = Ref(path), doc, doc is not None

    def to_dict(self) -> dict | None:
        return self.doc

    def get(self, key: str):
        return self.doc[key]


class Ref:
    def __init__(self, path: str) -> None:
        self.path = path

    def collection(self, name: str) -> Ref:
        return Ref(f"{self.path}/{name}")

    def document(self, name: str) -> Ref:
        return Ref(f"{self.path}/{name}")


class Db(Ref):
    """Data sets and the node registry, as their owners write them."""

    def __init__(self, docs: dict[str, dict]) -> None:
        super().__init__("")
        self.docs = docs

    def collection(self, name: str) -> Ref:
        return Ref(name)

    def get_all(self, refs: list[Ref]) -> list[Snap]:
        return [Snap(ref.path, self.docs.get(ref.path)) for ref in refs]


def datasets(**overrides) -> dict[str, dict]:
    spec = {"features": ["a", "b", "c"], "label": "y", "num_classes": 2, "expected_files": ["x.csv"]}
    return {f"datasets/{node}~d": {"status": "complete", "spec": spec, "stats": s.model_dump(), "version": f"v-{node}"} | overrides
            for node, s in STATS.items()}


def hub_with(docs: dict[str, dict]) -> FakeHub:
    h = FakeHub(r=0)  # no federation yet
    object.__setattr__(h.hub, "db", Db(docs))
    return h


def request(h: FakeHub, config_json: str, fid: str = "f") -> RawObject:
    blob = h.gcs.bucket("hub").blob(f"requests/{fid}.json")
    blob.upload_from_string(config_json.encode())
    return RawObject("hub", blob.name, blob.generation, len(config_json), {})


def test_a_request_starts_the_federation_with_each_nodes_rows_version_and_job():
    h = hub_with(datasets())
    outcome = start_from_request(h.hub, request(h, CONFIG.model_dump_json()), "f", NOW)
    assert (outcome.kind, outcome.message) == (StartKind.STARTED, "started")
    fed = h.store.federation("f")
    assert (fed.status, fed.round, fed.node_rows, fed.versions) == (FederationStatus.RUNNING, 1, {"us": 100, "eu": 50}, {"us": "v-us", "eu": "v-eu"})
    assert fed.stats.count == 150 and h.store.round("f", 1).status is RoundStatus.OPEN
    assert [(j.id, j.spec.dataset.version) for j in h.jobs.created] == [("fed.f.us", "v-us"), ("fed.f.eu", "v-eu")]


def test_a_repeated_request_only_makes_sure_of_the_stored_federations_jobs():
    h = hub_with(datasets())
    start_from_request(h.hub, request(h, CONFIG.model_dump_json()), "f", NOW)
    h.jobs.created.clear()  # as if the first try died before creating them
    other = CONFIG.model_copy(update={"nodes": [*CONFIG.nodes, CONFIG.nodes[0].model_copy(update={"name": "asia"})]})
    outcome = start_from_request(h.hub, request(h, other.model_dump_json()), "f", NOW)
    assert outcome.kind is StartKind.DUPLICATE
    assert [j.id for j in h.jobs.created] == ["fed.f.us", "fed.f.eu"]  # never asia: the stored config rules
    assert h.store.federation("f").config == CONFIG


def test_a_rejected_id_stays_rejected_and_starts_nothing():
    h = hub_with(datasets(status="collecting"))
    first = start_from_request(h.hub, request(h, CONFIG.model_dump_json()), "f", NOW)
    assert (first.kind, first.error) == (StartKind.REJECTED, "data set us/d is not complete")
    object.__setattr__(h.hub, "db", Db(datasets()))  # the data is complete now: still the id was rejected
    again = start_from_request(h.hub, request(h, CONFIG.model_dump_json()), "f", NOW)
    assert (again.kind, again.message) == (StartKind.REJECTED_EARLIER, "rejected earlier: data set us/d is not complete; choose a new id")
    assert h.jobs.created == [] and h.store.federation("f").status is FederationStatus.REJECTED


def test_an_invalid_config_is_rejected_naming_fields_not_values():
    h = hub_with(datasets())
    config_json = CONFIG.model_dump_json().replace('"round_deadline_s":600.0', '"round_deadline_s":123456789012')
    outcome = start_from_request(h.hub, request(h, config_json), "f", NOW)
    assert outcome.kind is StartKind.REJECTED and "round_deadline_s" in outcome.error and "123456789012" not in outcome.error


def test_a_config_declaring_another_id_is_rejected():
    h = hub_with(datasets())
    outcome = start_from_request(h.hub, request(h, CONFIG.model_dump_json(), fid="g"), "g", NOW)
    assert (outcome.kind, outcome.error) == (StartKind.REJECTED, "the file is named g.json but declares another id")


def test_a_node_without_a_signing_key_is_refused_and_one_with_a_key_is_admitted():
    signed = CONFIG.model_copy(update={"signed_updates": True})
    h = hub_with(datasets() | {"nodes/us": {"public_key": "k"}, "nodes/eu": {"identity": "eu@x"}})
    outcome = start_from_request(h.hub, request(h, signed.model_dump_json()), "f", NOW)
    assert outcome.error == "no registered signing key for eu (fedpipe nodes register)"


def test_a_request_that_is_gone_is_acknowledged():
    h = hub_with(datasets())
    obj = request(h, CONFIG.model_dump_json())
    h.gcs.bucket("hub").blob(obj.name).delete()
    assert start_from_request(h.hub, obj, "f", NOW).kind is StartKind.IGNORED
    assert h.store.federation("f") is None
