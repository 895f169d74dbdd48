"""Starting a federation from a config dropped at requests/{id}.json.

A bad request is recorded as rejected, never retried, and its id stays rejected: the same
id uploaded again (even with a valid config) starts nothing, so no id loops between
rejected and running. A request for an id that exists only makes sure the stored
federation's jobs exist (a first try may have died between creating the federation and
its jobs); it never adds nodes or changes the federation.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

from google.api_core.exceptions import NotFound, PreconditionFailed
from pydantic import ValidationError

from shared.datasets import DatasetSpec, FeatureStats
from shared.federation import FederationConfig, member_id
from shared.fedstore import Federation, FederationStatus, Round
from shared.hub.context import Hub
from shared.hub.outcomes import StartKind, StartOutcome
from shared.ingest import RawObject
from shared.io_pool import parallel
from shared.jobs import DatasetRef, FederationRef, Job, JobSpec
from shared.model_spec import param_spec
from shared.node_registry import NodeRegistry

log = logging.getLogger("fedpipe.hub")


class FederationError(ValueError):
    """The federation cannot start as declared (e.g. a node's data set is not complete)."""


def start_from_request(hub: Hub, obj: RawObject, fid: str, now: datetime) -> StartOutcome:
    existing = hub.store.federation(fid)
    if existing is not None:
        return _already(hub, existing, now)
    try:
        data = hub.gcs.bucket(obj.bucket).blob(obj.name).download_as_bytes(if_generation_match=obj.generation)
    except (NotFound, PreconditionFailed):
        # Deleted or replaced since (a replacement has its own event): no retry can read this
        # version, so the event is acknowledged with the reason instead of failing until dead-lettered.
        log.warning("request gs://%s/%s#%d is gone; ignored", obj.bucket, obj.name, obj.generation)
        return StartOutcome(StartKind.IGNORED)
    try:
        config = FederationConfig.model_validate_json(data)
        if config.id != fid:
            raise FederationError(f"the file is named {fid}.json but declares another id")
        fed = started_federation(hub, config, now)
    except (ValidationError, FederationError) as exc:
        error = _reason(exc)
        if hub.store.create_rejected(Federation.rejected(fid, error, now)):
            return StartOutcome(StartKind.REJECTED, error)
        return _already(hub, hub.store.federation(fid), now)  # another delivery decided first
    if not hub.store.create_federation(fed, Round.opened(config, 1, now)):
        return _already(hub, hub.store.federation(fid), now)
    _create_jobs(hub, fed, now)
    return StartOutcome(StartKind.STARTED)


def _reason(exc: ValidationError | FederationError) -> str:
    """Why a request was rejected. A config's validation errors quote its values, so they are
    named by field and pydantic's message, which leaves the input out; FederationErrors name nodes and data sets."""
    if isinstance(exc, ValidationError):
        problems = sorted({f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()})
        return f"invalid config ({'; '.join(problems[:10])})"
    return str(exc)


def _already(hub: Hub, fed: Federation | None, now: datetime) -> StartOutcome:
    if fed is None or fed.status is FederationStatus.REJECTED:
        return StartOutcome(StartKind.REJECTED_EARLIER, fed.error if fed else None)
    _create_jobs(hub, fed, now)
    return StartOutcome(StartKind.DUPLICATE)


def _create_jobs(hub: Hub, fed: Federation, now: datetime) -> None:
    """One job per node of the stored federation; creating one that exists is a no-op."""
    if fed.status is not FederationStatus.RUNNING:
        return
    config = fed.config
    jobs = [
        Job.new(
            fed.jobs[node.name],
            JobSpec(
                dataset=DatasetRef(node=node.name, dataset=node.dataset, version=fed.versions.get(node.name)), train=config.train_spec(),
                federation=FederationRef(id=config.id, node=node.name), max_attempts=config.max_attempts, lease_seconds=config.lease_seconds,
            ),
            now,
        )
        for node in config.nodes
    ]
    parallel(*(partial(hub.jobs.create, job) for job in jobs))  # each launches its node's worker: none waits on another


def started_federation(hub: Hub, config: FederationConfig, now: datetime) -> Federation:
    """The running federation `config` declares, from its nodes' data sets; FederationError if it cannot start.

    Every node needs a registered signing key (if updates are signed) and a complete data set,
    all of one schema. Only aggregate statistics (count, mean, M2 per feature) leave a node, so
    every node standardizes with the same global mean and std, as centralized training would.
    """
    registry = NodeRegistry(hub.db, hub.settings)
    key_refs = [registry.ref(n.name) for n in config.nodes] if config.signed_updates else []
    datasets = hub.db.collection(hub.settings.datasets_collection)
    refs = [*key_refs, *(datasets.document(DatasetRef(node=n.name, dataset=n.dataset).id) for n in config.nodes)]
    by_path = {snap.reference.path: snap for snap in hub.db.get_all(refs)}
    snaps = [by_path[ref.path] for ref in refs]
    keys, dataset_snaps = snaps[: len(key_refs)], snaps[len(key_refs):]
    unregistered = [n.name for n, key in zip(config.nodes, keys) if not (key.to_dict() or {}).get("public_key")]
    if unregistered:
        raise FederationError(f"no registered signing key for {', '.join(unregistered)} (fedpipe nodes register)")
    schemas, stats, versions = set(), {}, {}
    for node, snap in zip(config.nodes, dataset_snaps):
        if not snap.exists or snap.get("status") != "complete":
            raise FederationError(f"data set {node.name}/{node.dataset} is not complete")
        try:
            spec = DatasetSpec.model_validate(snap.get("spec"))
            stats[node.name] = FeatureStats.model_validate(snap.get("stats"))
        except (KeyError, ValidationError):
            raise FederationError(f"data set {node.name}/{node.dataset} has no readable spec and statistics") from None
        schemas.add((tuple(spec.features), spec.num_classes))
        versions[node.name] = snap.get("version")
    if len(schemas) != 1:
        raise FederationError("the nodes' data sets differ in features or classes")
    (features, num_classes), = schemas
    merged = stats[config.nodes[0].name]
    for node in config.nodes[1:]:
        merged = merged.merge(stats[node.name])
    try:
        param_spec(config.model, len(features), num_classes, config.hidden)  # e.g. a cnn on non-square data
    except ValueError as exc:
        raise FederationError(str(exc)) from exc
    return Federation(
        id=config.id, status=FederationStatus.RUNNING, config=config, round=1, n_features=len(features), num_classes=num_classes,
        stats=merged, node_rows={name: s.count for name, s in stats.items()}, versions=versions,
        jobs={n.name: member_id(config.id, n.name) for n in config.nodes}, created_at=now, updated_at=now,
    )
