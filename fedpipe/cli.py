"""`fedpipe`: run the local cloud, drop data, submit and watch jobs, inspect events."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from emulators.endpoints import REPLAY_TOPIC, Endpoints, default_state_dir
from fedpipe import context, views
from fedpipe.audit import audit_app
from fedpipe.smoke import smoke_app
from shared.jobs import MAX_HOSTS, NODE_NAME, DatasetRef, Job, JobSpec, JobStatus, TrainSpec, utcnow
from shared.jobstore import JobStore
from shared.privacy import MAX_CLIP_NORM, MAX_NOISE_MULTIPLIER, PrivacyConfig

app = typer.Typer(help="fedpipe: event-driven federated training on Google Cloud, locally and for real.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and follow jobs.", no_args_is_help=True)
events_app = typer.Typer(help="What the trigger router delivered, and replays.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
fed_app = typer.Typer(help="Federations: start one, follow its rounds, plot them.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(fed_app, name="fed")
console = Console()
err = Console(stderr=True)

StateDir = Annotated[Path | None, typer.Option(help="where the local cloud keeps logs and its endpoints [env FEDPIPE_STATE_DIR, default ./.fedpipe]")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


def _options(state_dir: Path | None, reload: bool, ports: dict[str, int]):
    from emulators.stack import StackOptions

    return StackOptions(state_dir=state_dir or default_state_dir(), reload=reload, ports={k: v for k, v in ports.items() if v})


def _print_endpoints(ep: Endpoints) -> None:
    from shared.config import Settings

    settings = Settings.from_env()
    console.print("\n[bold]Point your tools at the local cloud[/] (paste into a shell, or `eval $(fedpipe env)`):")
    for key, value in ep.client_env().items():
        console.print(f"  export {key}={value}", highlight=False, soft_wrap=True)
    console.print("\n[bold]Buckets[/]")
    for node in settings.nodes:
        console.print(f"  {node}: gs://{settings.raw_bucket(node)} (drop data here)  gs://{settings.processed_bucket(node)}  gs://{settings.quarantine_bucket(node)}")
    console.print(f"  hub: gs://{settings.hub_bucket}")
    console.print(f"[bold]Topics[/]  {settings.tick_topic} (publish to run the clock now), {settings.dead_letter_topic} (events that failed "
                  f"every attempt); {settings.shard_ready_topic} is fedpipe's own")
    console.print("[bold]Functions[/]  " + ", ".join(f"{n} :{p}" for n, p in ep.function_ports.items()))
    console.print(f"[bold]Identity[/]  LOCAL STAND-IN metadata server and ID-token issuer (not Google's; valid for this stack only): "
                  f"issuer :{ep.issuer_port}, " + ", ".join(f"{n} :{p}" for n, p in ep.metadata_ports.items()))
    console.print(f"[bold]Keys[/]  Confidential Space ATTESTATION SIMULATOR :{ep.attestation_port} and key broker :{ep.key_broker_port} "
                  "(LOCAL STAND-INS for the launcher and Cloud KMS; they prove nothing); `fedpipe audit` lists releases and refusals")
    console.print(f"[bold]Logs[/]  {ep.state_dir}/logs/")


@app.command()
def up(
    state_dir: StateDir = None,
    reload: Annotated[bool, typer.Option(help="restart the functions when functions/ or shared/ change")] = True,
    pubsub_port: int = 0, firestore_port: int = 0, gcs_port: int = 0, router_port: int = 0,
) -> None:
    """Run the local cloud in the foreground until Ctrl-C (or `fedpipe down`)."""
    from emulators.processes import StartupError
    from emulators.stack import LocalCloud

    options = _options(state_dir, reload, {"pubsub": pubsub_port, "firestore": firestore_port, "gcs": gcs_port, "router": router_port})
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    started = time.monotonic()
    try:
        with LocalCloud(options, on_step=lambda s: console.print(f"[dim]{time.monotonic() - started:5.1f}s[/] {s}")) as cloud:
            console.print(f"[green]local cloud ready[/] in {time.monotonic() - started:.1f}s")
            _print_endpoints(cloud.endpoints)
            console.print("\nCtrl-C or `fedpipe down` stops everything.")
            try:
                while not done.wait(2.0):
                    cloud.revive_functions()
            except KeyboardInterrupt:
                pass
            console.print("stopping...")
    except StartupError as exc:
        raise _fail(str(exc)) from None


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop a local cloud started by `fedpipe up` in another terminal."""
    from emulators.stack import stop_recorded

    try:
        stopped = stop_recorded(state_dir or default_state_dir())
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    console.print(f"stopped {', '.join(stopped)}")


@app.command()
def env(state_dir: StateDir = None) -> None:
    """Print export lines for the running local cloud: `eval $(fedpipe env)`."""
    try:
        ep = Endpoints.load(state_dir or default_state_dir())
    except FileNotFoundError as exc:
        raise _fail(str(exc)) from None
    for key, value in ep.client_env().items():
        print(f"export {key}={value}")


@app.command()
def demo(
    state_dir: StateDir = None,
    dataset: Annotated[str, typer.Option(help="scikit-learn data set: digits, breast_cancer, wine, iris")] = "digits",
    single: Annotated[bool, typer.Option("--single", help="one node's chain only: upload -> preprocess -> job -> trained model")] = False,
    rounds: int = 10,
    local_epochs: int = 2,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, fedadam or fedyogi")] = "fedavg",
    alpha: Annotated[float, typer.Option(help="Dirichlet label skew across nodes (smaller = more skewed)")] = 0.5,
    model: Annotated[str, typer.Option(help="logreg, mlp, or cnn (square images such as digits' 8x8)")] = "mlp",
    epochs: Annotated[int, typer.Option(help="with --single: training epochs")] = 40,
    results: Annotated[Path, typer.Option(help="where plots and summaries are written")] = Path("results"),
    nodes: Annotated[int | None, typer.Option(min=2, max=MAX_DEMO_NODES, help="how many nodes share the data set: us, eu, site3, ... [default: FEDPIPE_NODES, else us and eu]")] = None,
    timeout: float = 600.0,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary as the last line")] = False,
    dp_noise: Annotated[float | None, typer.Option(min=0, max=MAX_NOISE_MULTIPLIER, help="also run the federation with client-level "
                                                   "differential privacy at this noise multiplier z, and compare")] = None,
    dp_clip: Annotated[float, typer.Option(min=0, max=MAX_CLIP_NORM, help="with --dp-noise: the L2 norm C each node's change "
                                           "is clipped to per round")] = 1.0,
    attested_aggregation: Annotated[bool, typer.Option(help="seal every training update to the attested aggregator: the hub sees "
                                                       "only aggregates (its attestation is simulated locally)")] = False,
) -> None:
    """Start the local cloud and run the whole thing on a real data set.

    By default: the data set split non-IID across the us and eu nodes, each node
    preprocessing its share in its own buckets, then a federation of N rounds, next to
    a model trained centrally on the pooled data. With --dp-noise: the same federation
    again with client-level DP. With --single: one node's chain.
    """
    from emulators.processes import StartupError
    from emulators.stack import LocalCloud

    if (dp_noise is not None or attested_aggregation) and single:
        raise _fail("--dp-noise and --attested-aggregation apply to the federated demo, not to --single")
    try:
        privacy = None if dp_noise is None else PrivacyConfig(clip_norm=dp_clip, noise_multiplier=dp_noise)
    except ValidationError as exc:
        raise _fail(f"invalid --dp-noise/--dp-clip:\n{exc}") from None
    if nodes is not None:
        # Read by every process of the stack (shared.config.Settings), so set before it starts.
        os.environ["FEDPIPE_NODES"] = ",".join(demo_node_names(nodes))
    started = time.monotonic()
    try:
        with LocalCloud(_options(state_dir, False, {}), on_step=lambda s: console.print(f"[dim]{time.monotonic() - started:5.1f}s[/] {s}")) as cloud:
            console.print(f"[green]local cloud ready[/] in {time.monotonic() - started:.1f}s (logs in {cloud.endpoints.state_dir}/logs)")
            context.local_endpoints.cache_clear()
            if single:
                code, summary = _single_demo(dataset, model, epochs, timeout)
            else:
                code, summary = _federated_demo(dataset, model, rounds, local_epochs, strategy, alpha, results, timeout, privacy,
                                                attested_aggregation)
    except (StartupError, ValidationError) as exc:
        raise _fail(str(exc)) from None
    if json_out:
        print(json.dumps(summary, default=str))
    raise typer.Exit(code)


MAX_DEMO_NODES = 32


def demo_node_names(n: int) -> list[str]:
    """The demo's nodes: the us and eu sites, then site3, site4, ..."""
    return ["us", "eu", *(f"site{i}" for i in range(3, n + 1))][:n]


def _single_demo(dataset: str, model: str, epochs: int, timeout: float) -> tuple[int, dict]:
    from fedpipe.demo import run_chain

    report = run_chain(context.db(), context.gcs(), context.settings(), console, node="us", dataset=dataset,
                       source=dataset, parts=3, train=TrainSpec(model=model, epochs=epochs), timeout_s=timeout)
    if report.status == JobStatus.COMPLETED:
        console.print(f"[green]completed[/]: held-out accuracy [bold]{report.results['accuracy']:.4f}[/] on {report.results['test_examples']} examples; "
                      f"upload -> running {report.timings_s.get('running:1', float('nan')):.2f}s, -> completed {report.timings_s.get('completed:1', float('nan')):.2f}s")
        console.print(f"model: {report.results['model_uri']}")
    else:
        err.print(f"[red]chain did not complete[/]: {report.status} {report.error or ''}")
    return (0 if report.status == JobStatus.COMPLETED else 1), report.to_json()


def _federated_demo(dataset: str, model: str, rounds: int, local_epochs: int, strategy: str, alpha: float, results: Path, timeout: float,
                    privacy: PrivacyConfig | None, attested_aggregation: bool = False) -> tuple[int, dict]:
    from fedpipe.fed_demo import run_federated_demo
    from fedpipe.fed_views import epsilon_text

    settings = context.settings()
    report = run_federated_demo(context.db(), context.gcs(), settings, console, source=dataset, nodes=list(settings.nodes), rounds=rounds,
                                local_epochs=local_epochs, strategy=strategy, alpha=alpha, results_dir=results, timeout_s=timeout, model=model,
                                privacy=privacy, attested_aggregation=attested_aggregation)
    summary = report.to_json()
    if report.status != "completed":
        err.print(f"[red]federation {report.status}[/]: {report.error or ''}")
        return 1, summary
    console.print(f"[green]federation completed[/]: accuracy [bold]{report.federated_accuracy:.4f}[/] (federated, {len(report.nodes)} nodes) vs "
                  f"[bold]{report.centralized_accuracy:.4f}[/] (centralized on pooled data): gap {summary['gap_points']:+.2f} points")
    console.print(f"per-round plot: {report.plot}")
    dp = report.private
    if dp is None:
        return 0, summary
    if dp.status != "completed":
        err.print(f"[red]federation {dp.federation} (with DP) {dp.status}[/]: {dp.error or ''}")
        return 1, summary
    spent = epsilon_text({"epsilon": dp.epsilon, "delta": dp.delta})
    console.print(f"[green]with client-level DP[/] (clip {dp.clip_norm:g}, noise multiplier {dp.noise_multiplier:g}): accuracy "
                  f"[bold]{dp.accuracy:.4f}[/] against {report.federated_accuracy:.4f} without (DP costs {summary['dp_cost_points']:.2f} points); "
                  f"[bold]{spent}[/] after {dp.rounds} rounds, every node in every round")
    return 0, summary


@app.command()
def submit(
    node: Annotated[str, typer.Option(help="the node whose data set to train on")],
    dataset: Annotated[str, typer.Option(help="data set name (its prefix in the raw bucket)")],
    model: str = "mlp",
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    max_attempts: int = 3,
    lease_seconds: float = 60.0,
    accelerator: Annotated[str, typer.Option(help="cpu, gpu, gpu:<type>:<count> or tpu:<version>:<topology> (e.g. tpu:v5e:2x4)")] = "cpu",
    hosts: Annotated[int, typer.Option(min=1, max=MAX_HOSTS, help="worker processes of a multi-host run (a TPU slice sets its own)")] = 1,
    job_id: Annotated[str | None, typer.Option(help="default: a new unique id")] = None,
    watch: bool = False,
) -> None:
    """Submit a training job by hand (validated; the data set must be complete)."""
    try:
        spec = JobSpec(
            dataset=DatasetRef(node=node, dataset=dataset),
            train=TrainSpec(model=model, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed),
            accelerator=accelerator, hosts=hosts, max_attempts=max_attempts, lease_seconds=lease_seconds,
        )
        job = Job.new(job_id or f"manual-{node}-{dataset}-{uuid.uuid4().hex[:8]}", spec, utcnow())
    except ValidationError as exc:
        raise _fail(f"invalid job:\n{exc}") from None
    settings = context.settings()
    ds = context.db().collection(settings.datasets_collection).document(spec.dataset.id).get()
    if not ds.exists or ds.get("status") != "complete":
        raise _fail(f"data set {node}/{dataset} is not complete (declare it and upload its files first)")
    if not JobStore(context.db(), settings).create(job):
        raise _fail(f"job {job.id} already exists")
    console.print(f"submitted [bold]{job.id}[/]")
    if watch:
        jobs_watch(job.id)


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    status: JobStatus | None = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON array of job documents")] = False,
) -> None:
    """The newest jobs."""
    jobs = JobStore(context.db(), context.settings()).list(limit, status)
    if json_out:
        print(json.dumps([job.model_dump(mode="json") for job in jobs], indent=2))
    else:
        console.print(views.jobs_table(jobs, console.width))


def _job(job_id: str) -> Job:
    job = JobStore(context.db(), context.settings()).get(job_id)
    if job is None:
        raise _fail(f"no job {job_id!r}")
    return job


@jobs_app.command("show")
def jobs_show(job_id: str, json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One job: status, attempts, progress, results, history, and what its engine says of its run."""
    job = _job(job_id)
    if json_out:
        print(job.model_dump_json(indent=2))
    else:
        console.print(views.job_detail(job, _engine_state(job)))


def _engine_state(job: Job) -> str | None:
    """The run's state as the launcher FEDPIPE_LAUNCHER names reads it (one call), for a job that is not over."""
    if job.execution is None or job.is_terminal:
        return None
    from shared.launchers.select import launcher_from_env
    from shared.timekeeper import read_state

    try:
        state, why = read_state(launcher_from_env(), job.execution)
    except (ValueError, ImportError) as exc:  # no launcher configured here
        return f"unknown ({exc})"
    return str(state) if state is not None else f"unknown ({why})"


@jobs_app.command("watch")
def jobs_watch(job_id: str, interval: float = 0.5) -> None:
    """Follow a job until it ends; exit 0 only if it completed."""
    last = None
    while True:
        job = _job(job_id)
        line = f"{views.status_text(job.status)} attempt {job.attempt}/{job.spec.max_attempts} {views.progress_text(job)}"
        if line != last:
            console.print(f"[dim]{views.when(job.updated_at)}[/] {line}")
            last = line
        if job.is_terminal:
            if job.results:
                console.print_json(json.dumps(job.results))
            if job.error:
                err.print(f"[red]{job.error}[/]")
            raise typer.Exit(0 if job.status is JobStatus.COMPLETED else 1)
        time.sleep(interval)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job that has not ended; its worker stops at its next heartbeat."""
    job = JobStore(context.db(), context.settings()).cancel(job_id, utcnow())
    if job is None:
        raise _fail(f"job {job_id!r} does not exist or has already ended")
    console.print(f"cancelled {job_id}")


@app.command("quarantine")
def quarantine(limit: int = 50) -> None:
    """Files and messages that were refused, why, and where a refused file's copy is kept."""
    from shared.quarantine import QuarantineStore

    console.print(views.quarantine_table(QuarantineStore(context.db(), context.settings()).recent(limit)))


def _deliveries():
    from emulators.deliveries import DeliveryLog

    if context.local_endpoints() is None:
        raise _fail("no local cloud is running; events are the local router's (start one with `fedpipe up`)")
    return DeliveryLog(context.db())


@events_app.command("tail")
def events_tail(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    status: Annotated[str | None, typer.Option(help="delivered, retrying or dead_lettered (local cloud only)")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    project: Annotated[str | None, typer.Option(help="read a deployed project's dead letters instead of the local router's deliveries")] = None,
    subscription: Annotated[str | None, typer.Option(help="the dead-letter subscription to read (projects/P/subscriptions/S) [default: the --project's <dead-letter topic>-hold]")] = None,
) -> None:
    """Recent deliveries: event, trigger, function, status, attempts; with --project, the deployed dead letters."""
    if project or subscription:
        _dead_letters_tail(project, subscription, limit, follow)
        return
    log = _deliveries()
    records = log.recent(limit, status)
    console.print(views.deliveries_table(list(reversed(records))))
    seen = {(r["id"], r["status"], r["attempts"]) for r in records}
    while follow:
        time.sleep(1)
        fresh = [r for r in reversed(log.recent(limit, status)) if (r["id"], r["status"], r["attempts"]) not in seen]
        if fresh:
            console.print(views.deliveries_table(fresh))
            seen.update((r["id"], r["status"], r["attempts"]) for r in fresh)


def _dead_letters_tail(project: str | None, subscription: str | None, limit: int, follow: bool) -> None:
    """Production: what Pub/Sub dead-lettered after each trigger's retry budget (infra/delivery.tf), left in place."""
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    from fedpipe import dead_letters

    try:
        path = dead_letters.check_subscription(subscription) if subscription else dead_letters.subscription_path(project, context.settings())
    except ValueError as exc:
        raise _fail(str(exc)) from None
    subscriber = pubsub_v1.SubscriberClient()
    seen: set[str] = set()
    while True:
        try:
            letters = [d for d in dead_letters.peek(subscriber, path, limit) if d.message_id not in seen]
        except exceptions.GoogleAPICallError as exc:
            raise _fail(f"could not read {path}: {exc.message}") from None
        if letters or not seen:
            console.print(dead_letters.table(letters))
        seen.update(d.message_id for d in letters)
        if not follow:
            return
        time.sleep(5)


@events_app.command("replay")
def events_replay(delivery_id: Annotated[str, typer.Argument(help="a delivery id from `events tail`, or an event id")]) -> None:
    """Deliver a recorded event (delivered or dead-lettered) to its function again, with the same id."""
    record = _deliveries().find(delivery_id)
    if record is None:
        raise _fail(f"no delivery {delivery_id!r}")
    pub = context.publisher()
    data = json.dumps({"trigger": record["trigger"], "event": record["event"]}).encode()
    pub.publish(pub.topic_path(context.settings().project, REPLAY_TOPIC), data).result(timeout=30)
    console.print(f"replaying {record['event_id']} to {record['function']} (trigger {record['trigger']})")


@fed_app.command("start")
def fed_start(
    config_file: Annotated[Path, typer.Argument(help="federation config (JSON), see README")],
    watch: bool = False,
) -> None:
    """Start a federation: the config is dropped into the hub bucket, where the hub function picks it up."""
    from shared.federation import FederationConfig

    try:
        config = FederationConfig.model_validate_json(config_file.read_text())
    except (OSError, ValidationError) as exc:
        raise _fail(f"invalid federation config {config_file}:\n{exc}") from None
    from fedpipe.fed_demo import start_by_upload

    console.print(f"requested federation [bold]{config.id}[/] at {start_by_upload(context.gcs(), context.settings(), config)}")
    if watch:
        fed_watch(config.id)


@fed_app.command("show")
def fed_show(fid: str) -> None:
    """Per-round, per-node status and metrics of a federation."""
    from fedpipe import fed_views

    fed, rounds = fed_views.load(context.db(), context.settings(), fid)
    if fed is None:
        raise _fail(f"no federation {fid!r}")
    if fed["status"] == "rejected":
        raise _fail(f"federation {fid} was rejected: {fed['error']}")
    console.print(fed_views.rounds_table(fed, rounds))
    if privacy := fed_views.privacy_line(fed):
        console.print(privacy)
    if fed.get("final"):
        console.print(f"final accuracy {fed['final']['accuracy']:.4f}, model {fed['global_model_uri']}")
    if fed.get("error"):
        err.print(f"[red]{fed['error']}[/]")


@fed_app.command("watch")
def fed_watch(fid: str, timeout: float = 3600.0) -> None:
    """Follow a federation round by round until it ends; exit 0 only if it completed."""
    from fedpipe.fed_demo import watch_federation

    fed = watch_federation(context.db(), context.settings(), fid, console, timeout)
    if fed["status"] == "completed":
        console.print(f"[green]completed[/]: accuracy {fed['final']['accuracy']:.4f}")
        raise typer.Exit(0)
    err.print(f"[red]federation {fed['status']}[/]: {fed.get('error', '')}")
    raise typer.Exit(1)


@fed_app.command("plot")
def fed_plot(fid: str, out: Annotated[Path | None, typer.Option(help="PNG path")] = None) -> None:
    """Write a PNG of the global model's accuracy and loss per round."""
    from fedpipe import fed_views

    fed, rounds = fed_views.load(context.db(), context.settings(), fid)
    if not fed or not fed_views.history(rounds):
        raise _fail(f"federation {fid!r} has no finished rounds yet")
    console.print(f"wrote {fed_views.plot(fed, rounds, out or Path('results') / fid / 'rounds.png')}")


def main() -> None:
    app()


nodes_app = typer.Typer(help="The node registry: each node's worker identity and update-signing key.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")


@nodes_app.command("register")
def nodes_register(
    node: str,
    public_key: Annotated[str | None, typer.Option(help="base64 of the node's 32-byte Ed25519 public key")] = None,
    kms: Annotated[str | None, typer.Option(help="the node's Cloud KMS key version (projects/.../cryptoKeyVersions/N); its public key is fetched")] = None,
    identity: Annotated[str | None, typer.Option(help="the service account NODE's workers run as: its ID tokens speak for NODE")] = None,
) -> None:
    """Admit NODE: its workers' identity (the node API answers them as NODE) and the key its updates must be signed with."""
    from shared import signing
    from shared.node_registry import NodeRegistry

    if public_key is not None and kms is not None:
        raise _fail("give at most one of --public-key and --kms")
    if public_key is None and kms is None and identity is None:
        raise _fail("give --identity, and --public-key or --kms")
    if not re.fullmatch(NODE_NAME, node):
        raise _fail(f"node names are letters, digits, '-' and '_' (they appear in update paths); got {node!r}")
    source, registry = "cli", NodeRegistry(context.db(), context.settings())
    if kms is not None:
        try:
            public_key, source = signing.KmsSigner(kms).public_key(), f"kms:{kms}"
        except Exception as exc:  # the KMS error as the user should see it
            raise _fail(f"could not read the public key of {kms}: {exc}") from exc
    try:
        if identity is not None:
            registry.register_identity(node, identity, utcnow())
            console.print(f"registered {node}'s worker identity {identity.lower()}")
        if public_key is not None:
            registry.register_key(node, public_key, source, utcnow())
            console.print(f"registered {node}'s signing key {public_key} ({source})")
    except ValueError as exc:
        raise _fail(str(exc)) from exc


@nodes_app.command("list")
def nodes_list() -> None:
    """Every registered node: its workers' identity and its update-signing key."""
    from rich.table import Table

    from shared.node_registry import NodeRegistry

    table = Table("node", "worker identity", "public key", "source", "registered")
    for node, record in NodeRegistry(context.db(), context.settings()).list().items():
        table.add_row(node, record.identity or "", record.public_key or "", record.source, str(record.registered_at or ""))
    console.print(table)


app.add_typer(audit_app, name="audit")
app.add_typer(smoke_app, name="smoke")


if __name__ == "__main__":
    sys.exit(main())

