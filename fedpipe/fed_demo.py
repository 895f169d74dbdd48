"""The federated demo: a real data set split non-IID across nodes, trained by federation.

Each node's share is uploaded to its own raw bucket and preprocessed there; the
federation is started by dropping its config into the hub bucket; each node's
worker trains on its own shards only. A model trained centrally on the pooled data
(the baseline a federation tries to match) is trained in the same run for comparison.
With privacy, the same federation runs again with client-level DP, so the accuracy DP
costs is measured on the same shares in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from google.cloud import firestore, storage
from rich.console import Console

from fedpipe import fed_views
from fedpipe.demo import csv_bytes, load_table
from shared.config import Settings
from shared.datasets import SPEC_OBJECT, FeatureStats
from shared.federation import FederationConfig
from shared.jobs import DatasetRef, utcnow
from shared.manifest import dataset_doc_id
from shared.privacy import PrivacyConfig


def dirichlet_split(labels: np.ndarray, n_nodes: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed shares: each class is divided among nodes by Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    shares: list[list[int]] = [[] for _ in range(n_nodes)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_nodes))[:-1] * len(idx)).astype(int)
        for node, part in enumerate(np.split(idx, cuts)):
            shares[node].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


def upload_node_shares(gcs: storage.Client, settings: Settings, nodes: list[str], dataset: str, source: str, alpha: float, seed: int) -> dict[str, dict]:
    """Upload each node's share as its own data set (declared not to train on its own)."""
    table, features, num_classes = load_table(source)
    labels = table.column("label").to_numpy()
    summary = {}
    for node, rows in zip(nodes, dirichlet_split(labels, len(nodes), alpha, seed)):
        share = table.take(rows)
        half = share.num_rows // 2
        files = {"part-0.csv": share.slice(0, half), "part-1.csv": share.slice(half)}
        spec = {"features": features, "label": "label", "num_classes": num_classes, "expected_files": list(files), "train_on_complete": False}
        bucket = gcs.bucket(settings.raw_bucket(node))
        bucket.blob(f"{dataset}/{SPEC_OBJECT}").upload_from_string(json.dumps(spec), content_type="application/json")
        for name, part in files.items():
            bucket.blob(f"{dataset}/{name}").upload_from_string(csv_bytes(part), content_type="text/csv")
        summary[node] = {"rows": share.num_rows, "labels": np.bincount(labels[rows], minlength=num_classes).tolist()}
    return summary


def wait_datasets(db: firestore.Client, settings: Settings, nodes: list[str], dataset: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    refs = [db.collection(settings.datasets_collection).document(dataset_doc_id(n, dataset)) for n in nodes]
    while time.monotonic() < deadline:
        if all((s := r.get()).exists and s.get("status") == "complete" for r in refs):
            return
        time.sleep(0.1)
    raise TimeoutError(f"data sets {dataset} on {nodes} not complete after {timeout_s:.0f}s")


def start_by_upload(gcs: storage.Client, settings: Settings, config: FederationConfig) -> str:
    """Drop the config into the hub bucket: the hub-upload function starts the federation."""
    blob = gcs.bucket(settings.hub_bucket).blob(f"requests/{config.id}.json")
    blob.upload_from_string(config.model_dump_json(indent=2), content_type="application/json")
    return f"gs://{settings.hub_bucket}/{blob.name}"


WATCH_POLL_S = 0.5  # how soon a line appears; its time is when Firestore recorded the event, whatever the poll


def _since(origin: datetime, ts: datetime) -> str:
    return f"[dim]{(ts - origin).total_seconds():7.2f}s[/]"


def watch_federation(db: firestore.Client, settings: Settings, fid: str, console: Console, timeout_s: float,
                     origin: datetime | None = None) -> dict:
    """Print each node's report and each round's close as the hub records them; return the final document.

    A line's time is when Firestore recorded its event (the hub counting an update, a round's
    close being committed), in seconds since `origin`: the caller's clock (the demo passes its
    own start, so these lines and its others agree), by default the federation's start. So the
    times are the federation's, not the poll's. Closed rounds are not read again, so a poll
    costs the emulator the same in round 20 as in round 1.
    """
    deadline = time.monotonic() + timeout_s
    next_round, printed = 1, set()
    while time.monotonic() < deadline:
        fed, rounds = fed_views.load(db, settings, fid, from_round=next_round, late=False)
        if fed is None:
            time.sleep(WATCH_POLL_S)
            continue
        if fed["status"] == "rejected":
            return fed
        origin = origin or fed["created_at"]
        for rd in rounds:
            for node, update in sorted(rd["updates"].items(), key=lambda kv: kv[1]["counted_at"]):
                if (rd["round"], node) not in printed:
                    printed.add((rd["round"], node))
                    m = update["metrics"]
                    train = f", local train loss {m['train_loss']:.4f}" if "train_loss" in m else ""
                    console.print(f"{_since(origin, update['counted_at'])} round {rd['round']:>2} {node}: "
                                  f"global model acc {m['global_accuracy']:.4f} on its {m['test_examples']} held-out{train}")
            if rd["status"] != "open":
                gm = rd.get("global_metrics") or {}
                console.print(f"{_since(origin, rd['committed_at'])} [bold]round {rd['round']} {rd['status']}[/] ({rd['reason']}): "
                              f"global model after round {rd['round'] - 1}: accuracy [bold]{gm.get('accuracy', float('nan')):.4f}[/]")
                next_round = rd["round"] + 1
        if fed["status"] in ("completed", "failed"):
            return fed
        time.sleep(WATCH_POLL_S)
    raise TimeoutError(f"federation {fid} did not finish within {timeout_s:.0f}s")


def round_clock(rounds: list[dict], dropped: datetime, started: datetime) -> dict:
    """The federation's times as the demo printed them: each round's close (s since the demo
    started), each round's time (since the previous close; round 1 since the config drop),
    the steady round (median over training rounds 2..R) and drop -> last close (completion)."""
    closes = [rd["committed_at"] for rd in rounds if rd.get("committed_at")]
    steps = [(b - a).total_seconds() for a, b in zip([dropped, *closes], closes)]
    training = sum(rd["kind"] == "train" for rd in rounds)
    return {
        "round_closed_s": [round((c - started).total_seconds(), 3) for c in closes], "round_s": [round(s, 3) for s in steps],
        "first_round_s": round(steps[0], 3) if steps else None,
        "steady_round_s": round(statistics.median(steps[1:training]), 3) if steps[1:training] else None,
        "federation_s": round((closes[-1] - dropped).total_seconds(), 3) if closes else None,
    }


def centralized_baseline(db: firestore.Client, gcs: storage.Client, settings: Settings, fed: dict) -> dict:
    """The same model trained on the pooled data (each node's own train/test split), same total epochs.

    Only this baseline pools data; it is the yardstick, not part of the federation.
    """
    from shared.dataset_shards import pinned_dataset
    from shared.envelope import Envelope, node_kek
    from workers.trainer.data import read_split
    from workers.trainer.training import TrainConfig, Trainer

    config = FederationConfig.model_validate(fed["config"])
    stats = FeatureStats.model_validate(fed["stats"])
    splits = [
        read_split(
            gcs, Envelope(node_kek(settings, n.name)), pinned_dataset(db, settings, DatasetRef(node=n.name, dataset=n.dataset)),
            config.test_fraction, config.seed, stats,
        )
        for n in config.nodes
    ]
    x_train = np.concatenate([s.x_train for s in splits])
    y_train = np.concatenate([s.y_train for s in splits])
    spec = config.train_spec().model_copy(update={"epochs": config.rounds * config.local_epochs, "prox_mu": 0.0})
    trainer = Trainer(TrainConfig.from_spec(spec), x_train.shape[1], splits[0].n_classes)
    params, _ = trainer.fit(trainer.init_params(), x_train, y_train)
    return trainer.evaluate(params, np.concatenate([s.x_test for s in splits]), np.concatenate([s.y_test for s in splits]))


@dataclass
class PrivateRun:
    """The same federation with client-level DP: its accuracy and the (epsilon, delta) its models spent."""

    federation: str
    status: str
    clip_norm: float
    noise_multiplier: float
    accuracy: float | None = None
    epsilon: float | None = None  # None once completed: no finite bound (noise multiplier 0)
    delta: float | None = None
    rounds: int | None = None
    error: str | None = None


@dataclass
class FedDemoReport:
    federation: str
    status: str
    nodes: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    federated_accuracy: float | None = None
    centralized_accuracy: float | None = None
    config_dropped_s: float | None = None  # the times below are those the demo printed (see round_clock)
    round_closed_s: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    first_round_s: float | None = None
    steady_round_s: float | None = None
    federation_s: float | None = None
    plot: str | None = None
    error: str | None = None
    total_s: float | None = None
    private: PrivateRun | None = None

    def to_json(self) -> dict:
        gap = None if self.federated_accuracy is None or self.centralized_accuracy is None else self.centralized_accuracy - self.federated_accuracy
        dp = self.private
        cost = None if dp is None or dp.accuracy is None or self.federated_accuracy is None else self.federated_accuracy - dp.accuracy
        return {**asdict(self), "gap_points": None if gap is None else round(100 * gap, 2),
                "dp_cost_points": None if cost is None else round(100 * cost, 2)}


def run_federated_demo(db: firestore.Client, gcs: storage.Client, settings: Settings, console: Console, *, source: str, nodes: list[str],
                       rounds: int, local_epochs: int, strategy: str, alpha: float, results_dir: Path, timeout_s: float,
                       model: str = "mlp", privacy: PrivacyConfig | None = None, attested_aggregation: bool = False) -> FedDemoReport:
    """The federation on non-IID shares, the centralized baseline, and with `privacy` the same federation with DP.
    With `attested_aggregation`, the updates are sealed to the attested aggregator, which the hub cannot open."""
    fid = f"{source.replace('_', '-')}-{model}-{strategy}"
    started = utcnow()  # every printed time is on this clock, Firestore's recorded times included

    def say(ts: datetime, message: str) -> None:
        console.print(f"{_since(started, ts)} {message}")

    shares = upload_node_shares(gcs, settings, nodes, source, source, alpha, seed=0)
    for node, share in shares.items():
        console.print(f"uploaded {share['rows']} rows of {source} to gs://{settings.raw_bucket(node)}/{source}/ (labels {share['labels']})")
    wait_datasets(db, settings, nodes, source, timeout_s)
    say(utcnow(), "every node's data set is preprocessed in its own buckets")
    config = FederationConfig(
        id=fid, nodes=[{"name": n, "dataset": source} for n in nodes], model=model, rounds=rounds, local_epochs=local_epochs,
        strategy=strategy, prox_mu=0.01 if strategy == "fedprox" else 0.0, round_deadline_s=120, lease_seconds=60,
        confidential_aggregation=attested_aggregation,
    )
    # Validated now (a robust strategy refuses privacy), not after the first federation's minutes.
    private_config = None if privacy is None else FederationConfig.model_validate(
        config.model_dump() | {"id": f"{fid}-dp", "privacy": privacy.model_dump()})
    dropped = utcnow()
    say(dropped, f"federation {fid}: {rounds} rounds x {local_epochs} local epochs, {strategy}; "
                 f"config dropped at {start_by_upload(gcs, settings, config)}")
    fed = watch_federation(db, settings, fid, console, timeout_s, origin=started)
    report = FedDemoReport(federation=fid, status=fed["status"], nodes=shares, error=fed.get("error"))
    if fed["status"] != "completed":
        return report
    _, round_docs = fed_views.load(db, settings, fid)
    clock = round_clock(round_docs, dropped, started)
    for key, value in clock.items():
        setattr(report, key, value)
    report.config_dropped_s = round((dropped - started).total_seconds(), 3)
    steady = "" if clock["steady_round_s"] is None else f", then {clock['steady_round_s']:.3f}s each (median of rounds 2..{rounds})"
    console.print(f"rounds: the first {clock['first_round_s']:.2f}s after the config drop (workers start, compile){steady}; "
                  f"completed {clock['federation_s']:.2f}s after the drop")
    report.history = fed_views.history(round_docs)
    report.federated_accuracy = fed["final"]["accuracy"]
    report.plot = str(fed_views.plot(fed, round_docs, results_dir / fid / "rounds.png"))
    say(utcnow(), "training the centralized baseline on the pooled data (yardstick only)")
    report.centralized_accuracy = centralized_baseline(db, gcs, settings, fed)["accuracy"]
    if private_config is not None:
        report.private = run_private(db, gcs, settings, console, private_config, started, timeout_s)
    report.total_s = round((utcnow() - started).total_seconds(), 2)
    return report


def run_private(db: firestore.Client, gcs: storage.Client, settings: Settings, console: Console, config: FederationConfig,
                started: datetime, timeout_s: float) -> PrivateRun:
    """The demo's federation again, on the same shares, with client-level DP."""
    dp = config.privacy
    assert dp is not None
    console.print(f"{_since(started, utcnow())} federation {config.id}: the same with client-level DP (clip {dp.clip_norm:g}, "
                  f"noise multiplier {dp.noise_multiplier:g}); config dropped at {start_by_upload(gcs, settings, config)}")
    fed = watch_federation(db, settings, config.id, console, timeout_s, origin=started)
    run = PrivateRun(federation=config.id, status=fed["status"], clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
                     error=fed.get("error"))
    if fed["status"] == "completed":
        spent = fed["privacy"]
        run.accuracy, run.epsilon, run.delta, run.rounds = fed["final"]["accuracy"], spent.get("epsilon"), spent["delta"], spent["rounds"]
    return run
