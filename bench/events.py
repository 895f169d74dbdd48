"""Event latency of the local cloud: upload -> function invoked, against the emulator's own floor.

One command: `python bench/events.py [--uploads 100 --burst 200]`. In one run it:
1. starts the local cloud and swaps the raw-upload function for a probe that notes
   when each CloudEvent arrives (same port, so the router is unchanged);
2. uploads N objects one by one; for each, times upload -> probe invoked, and, on a
   plain subscription to fake-gcs-server's notification topic, upload -> notification
   (the floor: what the emulators cost before the router does anything);
3. uploads a burst concurrently and counts what never reached the function;
4. runs the demo chain with the real functions: upload -> job running / completed.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from google.cloud import firestore, pubsub_v1, storage
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulators.endpoints import GCS_NOTIFICATIONS_TOPIC  # noqa: E402
from emulators.processes import ManagedProcess, http_ok, wait_ready  # noqa: E402
from emulators.stack import LocalCloud, StackOptions  # noqa: E402
from fedpipe.demo import run_chain  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.jobs import TrainSpec  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def swap_in_probe(cloud: LocalCloud, log_path: Path) -> ManagedProcess:
    ep = cloud.endpoints
    port = ep.function_ports["on_raw_upload"]
    cloud.stop_function("on_raw_upload")
    ff = str(Path(sys.executable).parent / "functions-framework")
    probe = ManagedProcess(
        "probe", [ff, "--target", "probe", "--source", str(Path(__file__).parent / "probe_function.py"), "--port", str(port), "--host", "127.0.0.1"],
        Path(ep.state_dir) / "logs" / "probe.log", {"FEDPIPE_PROBE_LOG": str(log_path)},
    )
    probe.start()
    wait_ready(probe, http_ok(f"http://127.0.0.1:{port}/"), 60)
    return probe


def arrivals(log_path: Path) -> dict[str, float]:
    if not log_path.exists():
        return {}
    return {(e := json.loads(line))["subject"].removeprefix("objects/"): e["t"] for line in log_path.read_text().splitlines() if line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100, help="sequential uploads for latency")
    parser.add_argument("--burst", type=int, default=200, help="concurrent uploads for loss and throughput")
    parser.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for stragglers")
    args = parser.parse_args()
    console = Console(stderr=True)

    with tempfile.TemporaryDirectory() as tmp, LocalCloud(StackOptions(state_dir=Path(tmp) / "state")) as cloud:
        settings = Settings.from_env()
        gcs = storage.Client(project=settings.project)
        bucket = gcs.bucket(settings.raw_bucket("us"))
        probe_log = Path(tmp) / "probe.jsonl"
        probe = swap_in_probe(cloud, probe_log)

        # The floor: a plain subscription on the topic fake-gcs-server publishes to.
        subscriber = pubsub_v1.SubscriberClient()
        floor_sub = subscriber.subscription_path(settings.project, "bench-floor")
        subscriber.create_subscription(name=floor_sub, topic=subscriber.topic_path(settings.project, GCS_NOTIFICATIONS_TOPIC))
        notified: dict[str, float] = {}
        lock = threading.Lock()

        def on_notification(message) -> None:
            t = time.time()
            with lock:
                notified.setdefault(message.attributes.get("objectId", ""), t)
            message.ack()

        streaming = subscriber.subscribe(floor_sub, on_notification)

        def upload(name: str) -> float:
            t0 = time.time()
            bucket.blob(name).upload_from_string(b"x,y\n1,0\n")
            return t0

        # Warm both paths (first connections, JIT of the JVMs) before measuring.
        for i in range(10):
            upload(f"bench/warm-{i}")
        time.sleep(2)

        console.print(f"latency: {args.uploads} sequential uploads")
        started: dict[str, float] = {}
        for i in range(args.uploads):
            name = f"bench/seq-{i:04d}"
            started[name] = upload(name)
            time.sleep(0.02)
        deadline = time.time() + args.settle_s
        while time.time() < deadline and not set(started) <= arrivals(probe_log).keys():
            time.sleep(0.1)
        seen = arrivals(probe_log)
        router_ms = [(seen[n] - t0) * 1000 for n, t0 in started.items() if n in seen]
        floor_ms = [(notified[n] - t0) * 1000 for n, t0 in started.items() if n in notified]

        console.print(f"burst: {args.burst} concurrent uploads")
        names = [f"bench/burst-{i:04d}" for i in range(args.burst)]
        burst_start = time.time()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(upload, names))
        uploaded_s = time.time() - burst_start
        deadline = time.time() + args.settle_s
        while time.time() < deadline and not set(names) <= arrivals(probe_log).keys():
            time.sleep(0.1)
        seen = arrivals(probe_log)
        lost = [n for n in names if n not in seen]
        delivered_s = max(seen[n] for n in names if n in seen) - burst_start
        streaming.cancel()

        console.print("demo chain with the real functions")
        probe.stop()
        cloud.start_function("on_raw_upload")
        quiet = Console(file=io.StringIO())
        chain = run_chain(firestore.Client(project=settings.project), gcs, settings, quiet, node="us", dataset="bench-chain",
                          source="digits", parts=3, train=TrainSpec(epochs=40), timeout_s=300)

    result = {
        "p50_ms": round(statistics.median(router_ms), 2),
        "p95_ms": round(percentile(router_ms, 0.95), 2),
        "floor_p50_ms": round(statistics.median(floor_ms), 2),
        "floor_p95_ms": round(percentile(floor_ms, 0.95), 2),
        "router_overhead_p50_ms": round(statistics.median(router_ms) - statistics.median(floor_ms), 2),
        "uploads": args.uploads,
        "burst": args.burst,
        "uploads_per_s": round(args.burst / delivered_s, 1),
        "burst_upload_s": round(uploaded_s, 2),
        "lost": len(lost) + (args.uploads - len(router_ms)),
        "chain_status": chain.status,
        "chain_upload_to_running_s": chain.timings_s.get("running:1"),
        "chain_upload_to_completed_s": chain.timings_s.get("completed:1"),
        "chain_accuracy": chain.results.get("accuracy"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}",
    }
    console.print(f"router p50 {result['p50_ms']} ms vs floor {result['floor_p50_ms']} ms "
                  f"(+{result['router_overhead_p50_ms']} ms); {result['uploads_per_s']} uploads/s; lost {result['lost']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
