"""Event latency of the local cloud: upload -> function invoked, against the emulator's own floor.

One command: `python bench/events.py [--uploads 100 --burst 200]`. In one run it:
1. starts the local cloud and swaps the raw-upload function for a probe that notes
   when each CloudEvent arrives (same port, so the router is unchanged);
2. uploads N objects one by one; for each, times upload -> probe invoked, and, on a
   plain subscription to fake-gcs-server's notification topic, upload -> notification
   (the floor: what the emulators cost before the router does anything);
3. uploads a burst concurrently and counts what never reached the function;
4. splits each delivery into stages (p50/p95 of each, sequential and burst), from the
   times the router keeps on its delivery record, the probe's arrival time and the
   record's commit time: notify (upload -> notification published), receive (-> router
   callback), post (-> function invoked), answer (-> router has the answer), record
   (-> delivery record committed, off the event's path); the floor's receive is the same
   hop on the plain subscription;
5. runs the demo chain with the real functions: upload -> job running / completed.
The last line printed is one JSON object. It records the load average before and after:
other processes on the same cores show up in every stage.
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
from google.cloud.firestore import FieldFilter
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulators.endpoints import DELIVERIES_COLLECTION, GCS_NOTIFICATIONS_TOPIC  # noqa: E402
from emulators.processes import ManagedProcess, http_ok, wait_ready  # noqa: E402
from emulators.stack import LocalCloud, StackOptions  # noqa: E402
from fedpipe.demo import run_chain  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.jobs import TrainSpec  # noqa: E402

# One upload's path, each stage from one instant to the next: (stage, from, to).
STAGES = (
    ("notify", "uploaded", "published_at"),  # the upload request, then fake-gcs-server publishing its notification
    ("receive", "published_at", "received_at"),  # the Pub/Sub emulator hands it to the router's callback
    ("post", "posted_at", "arrived"),  # the POST until the function's handler runs
    ("answer", "arrived", "answered_at"),  # the handler, functions-framework, the answer back to the router
    ("record", "answered_at", "recorded_at"),  # the delivery record committed (the ack waits for it, the next event not)
)
FLOOR_STAGES = (("floor", "uploaded", "notified"), ("floor_receive", "published_at", "notified"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stage_ms(points: dict[str, float], stages: tuple[tuple[str, str, str], ...]) -> dict[str, float]:
    """Each stage's duration in ms, for the stages whose both instants (epoch seconds) are known."""
    return {name: (points[b] - points[a]) * 1000 for name, a, b in stages if a in points and b in points}


def summary(per_event: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 and p95 of each stage over the events."""
    names = dict.fromkeys(name for stages in per_event for name in stages)
    return {
        name: {"p50": round(statistics.median(v), 2), "p95": round(percentile(v, 0.95), 2)}
        for name in names
        if (v := [stages[name] for stages in per_event if name in stages])
    }


def delivery_points(db: firestore.Client, trigger: str, names: set[str]) -> dict[str, dict[str, float]]:
    """Per object name, the instants its delivery record holds, and its commit as recorded_at."""
    points = {}
    for snap in db.collection(DELIVERIES_COLLECTION).where(filter=FieldFilter("trigger", "==", trigger)).stream():
        record = snap.to_dict()
        name = record["subject"].removeprefix("objects/")
        if name in names:
            stamps = {k: record[k].timestamp() for k in ("published_at", "received_at", "posted_at", "answered_at") if record.get(k)}
            points[name] = {**stamps, "recorded_at": snap.update_time.timestamp()}
    return points


def cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def swap_in_probe(cloud: LocalCloud, log_path: Path) -> None:
    """Run the probe in on_raw_upload's place and under its name, so the cloud stops it like the function, however the run ends."""
    ep = cloud.endpoints
    port = ep.function_ports["on_raw_upload"]
    cloud.stop_function("on_raw_upload")
    ff = str(Path(sys.executable).parent / "functions-framework")
    probe = ManagedProcess(
        "function-on_raw_upload",
        [ff, "--target", "probe", "--source", str(Path(__file__).parent / "probe_function.py"), "--port", str(port), "--host", "127.0.0.1"],
        Path(ep.state_dir) / "logs" / "probe.log", {"FEDPIPE_PROBE_LOG": str(log_path)},
    )
    probe.start()
    cloud.processes.append(probe)
    wait_ready(probe, http_ok(f"http://127.0.0.1:{port}/"), 60)


def arrivals(log_path: Path) -> dict[str, float]:
    if not log_path.exists():
        return {}
    return {(e := json.loads(line))["name"]: e["t"] for line in log_path.read_text().splitlines() if line}


def wait_for_records(db: firestore.Client, trigger: str, names: set[str], timeout_s: float) -> dict[str, dict[str, float]]:
    """The delivery records' instants, once every delivered name has its record (they are committed just after)."""
    deadline = time.time() + timeout_s
    while (points := delivery_points(db, trigger, names)).keys() < names and time.time() < deadline:
        time.sleep(0.2)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100, help="sequential uploads for latency")
    parser.add_argument("--burst", type=int, default=200, help="concurrent uploads for loss and throughput")
    parser.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for stragglers")
    parser.add_argument("--no-chain", dest="chain", action="store_false", help="skip the demo chain (step 5)")
    args = parser.parse_args()
    console = Console(stderr=True)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp, LocalCloud(StackOptions(state_dir=Path(tmp) / "state")) as cloud:
        settings = Settings.from_env()
        gcs = storage.Client(project=settings.project)
        bucket = gcs.bucket(settings.raw_bucket("us"))
        probe_log = Path(tmp) / "probe.jsonl"
        swap_in_probe(cloud, probe_log)

        # The floor: a plain subscription on the topic fake-gcs-server publishes to.
        subscriber = pubsub_v1.SubscriberClient()
        floor_sub = subscriber.subscription_path(settings.project, "bench-floor")
        subscriber.create_subscription(name=floor_sub, topic=subscriber.topic_path(settings.project, GCS_NOTIFICATIONS_TOPIC))
        notified: dict[str, tuple[float, float]] = {}  # name -> (floor callback, publish time)
        lock = threading.Lock()

        def on_notification(message) -> None:
            t = time.time()
            with lock:
                notified.setdefault(message.attributes.get("objectId", ""), (t, message.publish_time.timestamp()))
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

        router_pid = next(p.pid for p in cloud.processes if p.name == "router")
        console.print(f"latency: {args.uploads} sequential uploads")
        cpu_before = cpu_s(router_pid)
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
        floor_ms = [(notified[n][0] - t0) * 1000 for n, t0 in started.items() if n in notified]
        cpu_after = cpu_s(router_pid)

        console.print(f"burst: {args.burst} concurrent uploads")
        names = [f"bench/burst-{i:04d}" for i in range(args.burst)]
        burst_start = time.time()
        with ThreadPoolExecutor(max_workers=16) as pool:
            started.update(zip(names, pool.map(upload, names), strict=True))
        uploaded_s = time.time() - burst_start
        deadline = time.time() + args.settle_s
        while time.time() < deadline and not set(names) <= arrivals(probe_log).keys():
            time.sleep(0.1)
        seen = arrivals(probe_log)
        lost = [n for n in names if n not in seen]
        delivered_s = max(seen[n] for n in names if n in seen) - burst_start
        floor_delivered_s = max(notified[n][0] for n in names if n in notified) - burst_start
        streaming.cancel()
        stages = {"sequential": [], "burst": []}
        records = wait_for_records(firestore.Client(project=settings.project), trigger="raw-upload-us", names=set(seen), timeout_s=args.settle_s)
        for name, t0 in started.items():
            points = {"uploaded": t0, **records.get(name, {})}
            if name in seen:
                points["arrived"] = seen[name]
            if name in notified:
                points["notified"] = notified[name][0]
                points.setdefault("published_at", notified[name][1])
            stages["burst" if name.startswith("bench/burst-") else "sequential"].append(stage_ms(points, STAGES + FLOOR_STAGES))

        chain = None
        if args.chain:
            console.print("demo chain with the real functions")
            cloud.stop_function("on_raw_upload")  # the probe
            cloud.start_function("on_raw_upload")
            quiet = Console(file=io.StringIO())
            chain = run_chain(firestore.Client(project=settings.project), gcs, settings, quiet, node="us", dataset="bench-chain",
                              source="digits", parts=3, train=TrainSpec(epochs=40), timeout_s=300)

    stage_tables = {run: summary(per_event) for run, per_event in stages.items()}
    result = {
        "p50_ms": round(statistics.median(router_ms), 2),
        "p95_ms": round(percentile(router_ms, 0.95), 2),
        "floor_p50_ms": round(statistics.median(floor_ms), 2),
        "floor_p95_ms": round(percentile(floor_ms, 0.95), 2),
        "router_overhead_p50_ms": round(statistics.median(router_ms) - statistics.median(floor_ms), 2),
        "uploads": args.uploads,
        "burst": args.burst,
        "uploads_per_s": round(args.burst / delivered_s, 1),
        "floor_uploads_per_s": round(args.burst / floor_delivered_s, 1),
        "uploads_per_s_vs_floor": round(floor_delivered_s / delivered_s, 2),
        "burst_upload_s": round(uploaded_s, 2),
        "lost": len(lost) + (args.uploads - len(router_ms)),
        # The router's own CPU per upload: on 2 shared cores, a router that needs more CPU than it
        # gets between two uploads falls behind, and its `receive` stage grows past the floor's.
        "router_cpu_ms_per_upload": None if cpu_before is None else round((cpu_after - cpu_before) * 1000 / args.uploads, 2),
        "stages_ms": stage_tables,
        # The same hop, Pub/Sub emulator -> callback, on the router's subscription and on the plain one.
        "receive_minus_floor_receive_p50_ms": {run: round(t["receive"]["p50"] - t["floor_receive"]["p50"], 2) for run, t in stage_tables.items()},
        "chain_status": chain and chain.status,
        "chain_upload_to_running_s": chain and chain.timings_s.get("running:1"),
        "chain_upload_to_completed_s": chain and chain.timings_s.get("completed:1"),
        "chain_accuracy": chain and chain.results.get("accuracy"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}",
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for run, table in result["stages_ms"].items():
        console.print(f"{run:>10}: " + ", ".join(f"{k} {v['p50']:.1f}/{v['p95']:.1f}" for k, v in table.items()) + " ms (p50/p95)")
    console.print(f"router p50 {result['p50_ms']} ms vs floor {result['floor_p50_ms']} ms "
                  f"({result['router_overhead_p50_ms']:+} ms); {result['uploads_per_s']} uploads/s "
                  f"({result['uploads_per_s_vs_floor']} of the floor's {result['floor_uploads_per_s']}); lost {result['lost']}; "
                  f"load average {result['load_avg_1m'][0]} -> {result['load_avg_1m'][1]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
