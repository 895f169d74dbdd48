"""A whole federation, fedpipe vs Flower's simulation engine: round overhead, total time, accuracy.

    .venv/bin/python bench/federation.py                  # 2 and 8 nodes, 10 rounds x 2 local epochs
    .venv/bin/python bench/federation.py --nodes 2 --rounds 5 --rounds-8 5

It runs ``.venv-bench/bin/python bench/flower_sim.py`` as a subprocess for the Flower side.
One-time setup of that venv (Flower's pins clash with the google-cloud libraries in .venv)::

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install "flwr[simulation]==1.42.0" jax==0.10.2 jaxlib==0.10.2 optax==0.2.8

(jax/jaxlib/optax at the versions in .venv, so both sides run the same XLA.) Without it the
Flower fields are null. Takes about 2 minutes on a 2-core machine; nothing else should run
(each side records the 1-minute load average it started under).

The federation: scikit-learn digits split non-IID over N nodes (``dirichlet_split``, alpha 0.5,
seed 0, exactly as ``fedpipe demo``), model "mlp" hidden (64,), FedAvg, R rounds x E local
epochs, batch 32, Adam lr 3e-3, seed 0 (FederationConfig's defaults). For each N in turn
(2, then 8), with nothing else running while a side is timed:

* ours    A fresh local cloud (emulators, router, functions; FEDPIPE_NODES=n0..n{N-1}, set
          before the stack starts), each node's share uploaded and preprocessed in its own
          buckets (untimed), then the config dropped in the hub bucket. The stack is stopped
          before Flower runs.
          total_s = config upload -> federation ``completed_at`` (R train rounds plus the
          final evaluate-only round; worker launch and start-up included).
          round r wall = ``closed_at - opened_at`` of its round document; overhead = wall -
          max over nodes of the node's ``compute_s`` (evaluate + train, JIT included).
          Steady overhead = median over rounds 2..R; round 1 (worker launch, process and
          JAX start-up, data load, subscription) is reported on its own.
          accuracy = the federation's ``final.accuracy`` (all nodes' held-out rows pooled).
* flower  ``flwr.simulation.run_simulation`` (Ray backend with Flower's default 2 CPUs per
          client actor: one actor on 2 cores runs the clients in turn) with FedAvg over the
          same R rounds; each ClientApp ``train`` evaluates the received model on its held-out rows and ``Trainer.fit``s from it, with fedpipe's own
          Trainer and TrainConfig (details in bench/flower_sim.py). total_s = the whole
          ``run_simulation`` call (Ray start included). Round r = ``configure_train(r)`` ->
          after its aggregation; overhead = round time - max client compute (measured inside
          the client, same span as ``compute_s``); as clients sharing an actor run back to back,
          ``flower_round_overhead_actor_s`` also subtracts the busiest actor's summed compute
          (round time - what that actor computed). accuracy: the final global model evaluated
          centrally on all nodes' held-out rows pooled (the same rows as ours).

Same data on both sides: this script rebuilds each node's rows the way the product does
(``dirichlet_split`` on the digits table, the node's rows stored as part-0 then part-1 halves,
float32 as the shards store them, the hub's merged per-file statistics for standardization,
``load_dataset``'s seeded permutation for the 80/20 split) and checks the result against what
``load_dataset`` actually reads back from the stack after our federation (``data_check``).

Targets (from the product issue): steady round overhead <= Flower's, total time <= Flower's,
final accuracy within 0.5 points of Flower's. Reported as met or not, never tuned for.

Where our overhead goes (``breakdown_median_s``, per steady round, for the node that reported
last): ``hub_close_aggregate`` (round opened -> previous global model written: the closing
handler's record, close, aggregate), ``hub_finish_broadcast`` (-> the round's broadcast: round
docs, move-on transaction, publish; from the hub function's log, or the router's when the
reaper's deadline sweep had to close the round), ``broadcast_to_compute`` (worker wake, global-model
download; workers wake on the federation document's listener as soon as the hub commits the round,
usually before the broadcast is logged, so this can be negative), ``compute`` and ``worker_to_hub`` (upload ->
fake-gcs notification -> Pub/Sub -> router -> hub function). ``compute_skew`` = max compute
minus the last node's. Timestamps are the emulators' and processes' own (one clock); an
update's upload time is its object's ``timeCreated``. ``stack_events`` counts the slow paths
seen in the stack's logs (Firestore transaction lock timeouts, rounds closed by the sweep,
handlers that found the round already closed, global-model writes: one per round is normal).

Per-round details go to results/bench/federation.json. The LAST line printed is one JSON
object: the 2-node fields at top level, the 8-node ones under ``nodes_8``, and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

from fedpipe.demo import load_table  # noqa: E402
from fedpipe.fed_demo import dirichlet_split  # noqa: E402
from shared.datasets import FeatureStats  # noqa: E402
from shared.federation import FederationConfig  # noqa: E402

DATASET = "digits"
SPLIT_SEED = 0  # upload_node_shares(seed=0) in the demo


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# The nodes' data, rebuilt as the product stores and splits it
# ---------------------------------------------------------------------------

def _file_stats(x: np.ndarray, y: np.ndarray, num_classes: int) -> FeatureStats:
    """What shared.preprocess computes for one uploaded file (float64, two passes)."""
    columns = [np.ascontiguousarray(x[:, j], dtype=np.float64) for j in range(x.shape[1])]
    means = [float(c.mean(dtype=np.float64)) for c in columns]
    return FeatureStats(
        count=len(y), mean=means, m2=[float(np.square(c - m, dtype=np.float64).sum()) for c, m in zip(columns, means)],
        label_counts=np.bincount(y, minlength=num_classes).tolist(),
    )


def node_splits(n_nodes: int, alpha: float, config: FederationConfig) -> dict:
    """Each node's (x_train, y_train, x_test, y_test) as its fedpipe worker sees them."""
    from workers.trainer.training import standardize  # NumPy only; jax is imported with it, unused here

    table, features, num_classes = load_table(DATASET)
    x_all = np.stack([table.column(f).to_numpy().astype(np.float64) for f in features], axis=1)
    labels = table.column("label").to_numpy().astype(np.int32)
    per_node, node_stats = [], []
    for rows in dirichlet_split(labels, n_nodes, alpha, SPLIT_SEED):
        half = len(rows) // 2
        parts = [rows[:half], rows[half:]]  # part-0.csv, part-1.csv (upload_node_shares)
        file_stats = [_file_stats(x_all[p], labels[p], num_classes) for p in parts]
        total = file_stats[0]  # shared.manifest.merged_stats: files in name order
        for s in file_stats[1:]:
            total = total.merge(s)
        node_stats.append(total)
        per_node.append((np.concatenate([x_all[p] for p in parts]).astype(np.float32), np.concatenate([labels[p] for p in parts])))
    merged = node_stats[0]  # shared.hub._node_inputs: nodes in config order
    for s in node_stats[1:]:
        merged = merged.merge(s)
    mean, std = merged.mean_std()
    out = {"n_features": np.int64(len(features)), "n_classes": np.int64(num_classes)}
    for i, (x, y) in enumerate(per_node):
        x = standardize(x, np.asarray(mean, np.float32), np.asarray(std, np.float32))
        order = np.random.default_rng(config.seed).permutation(len(y))  # workers/trainer/data.py load_dataset
        n_test = max(1, int(round(len(y) * config.test_fraction)))
        test, train = order[:n_test], order[n_test:]
        out |= {f"n{i}_x_train": x[train], f"n{i}_y_train": y[train], f"n{i}_x_test": x[test], f"n{i}_y_test": y[test]}
    return out


def fed_config(fid: str, nodes: list[str], rounds: int, local_epochs: int) -> FederationConfig:
    # As fedpipe/fed_demo.py run_federated_demo builds it.
    return FederationConfig(id=fid, nodes=[{"name": n, "dataset": DATASET} for n in nodes], model="mlp", rounds=rounds,
                            local_epochs=local_epochs, strategy="fedavg", prox_mu=0.0, round_deadline_s=120, lease_seconds=60)


# ---------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------

def _s(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def run_ours(n_nodes: int, rounds: int, local_epochs: int, alpha: float, state_dir: Path, timeout_s: float, expected: dict) -> dict:
    nodes = [f"n{i}" for i in range(n_nodes)]
    os.environ["FEDPIPE_NODES"] = ",".join(nodes)  # before the stack: buckets and triggers for these nodes
    from google.cloud import firestore, storage

    from emulators.stack import LocalCloud, StackOptions
    from fedpipe import fed_views
    from fedpipe.fed_demo import start_by_upload, upload_node_shares, wait_datasets
    from shared.config import Settings
    from shared.federation import global_model_object

    settings = Settings.from_env()
    assert settings.nodes == tuple(nodes), settings.nodes
    config = fed_config(f"bench-{n_nodes}n", nodes, rounds, local_epochs)
    t_stack = time.monotonic()
    with LocalCloud(StackOptions(state_dir=state_dir / f"nodes-{n_nodes}", settings=settings)) as cloud:
        log(f"ours: local cloud with {n_nodes} nodes up in {time.monotonic() - t_stack:.1f}s ({cloud.endpoints.state_dir})")
        db, gcs = firestore.Client(project=settings.project), storage.Client(project=settings.project)
        t_up = time.monotonic()
        upload_node_shares(gcs, settings, nodes, DATASET, DATASET, alpha, seed=SPLIT_SEED)
        wait_datasets(db, settings, nodes, DATASET, timeout_s)
        log(f"ours: shares uploaded and preprocessed in {time.monotonic() - t_up:.1f}s; dropping the config")
        fed_ref = db.collection(settings.federations_collection).document(config.id)
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        start_by_upload(gcs, settings, config)
        deadline = t0 + timeout_s
        fed = None
        while time.monotonic() < deadline:  # only the federation document, 4x a second: light on the emulator
            fed = fed_ref.get().to_dict()
            if fed and fed.get("status") in ("completed", "failed", "rejected"):
                break
            time.sleep(0.25)
        observed_s = time.monotonic() - t0
        if not fed or fed.get("status") != "completed":
            return {"status": (fed or {}).get("status", "timeout"), "error": (fed or {}).get("error"), "observed_s": round(observed_s, 2)}
        log(f"ours: federation completed (seen after {observed_s:.1f}s)")

        fed, round_docs = fed_views.load(db, settings, config.id)
        blobs = {b.name: b.time_created for b in gcs.bucket(settings.hub_bucket).list_blobs() if f"/{config.id}/" in b.name}
        jobs = {}
        for node, job_id in fed["jobs"].items():
            jd = db.collection(settings.jobs_collection).document(job_id).get().to_dict()
            jobs[node] = {t["status"]: t["at"] for t in jd.get("history", []) if t.get("attempt") == 1} | {"attempts": jd.get("attempt")}
        data_check = check_data(db, gcs, settings, config, fed, expected)
    events = stack_log_events(Path(cloud.endpoints.state_dir) / "logs", config.id)  # after the stack stopped: logs flushed
    result = analyze_ours(config, fed, round_docs, blobs, jobs, started_at, events, global_model_object)
    result |= {"observed_s": round(observed_s, 2), "data_check": data_check, "stack_events": events["counts"]}
    return result


def _log_time(stamp: str) -> float:
    """A Python logging asctime ('2026-01-02 03:04:05,678', local time) as a Unix timestamp."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stack_log_events(logs: Path, fid: str) -> dict:
    """When each round was broadcast, and by whom, from the hub function's and the router's logs;
    plus counts of the slow paths seen (Firestore transaction lock timeouts, closes left to the sweep)."""
    broadcasts: dict[int, tuple[float, str]] = {}
    counts = {"hub_events": 0, "handler_already_closed": 0, "handler_duplicate": 0, "sweep_closes": 0, "firestore_lock_timeouts": 0,
              "global_model_writes": 0}

    def note(r: int, t: float, by: str) -> None:
        if r not in broadcasts or t < broadcasts[r][0]:
            broadcasts[r] = (t, by)

    hub_log = logs / "function-on_hub_upload.log"
    for line in hub_log.read_text(errors="replace").splitlines() if hub_log.exists() else []:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg = entry.get("message", "")
        if f"/{fid}/" not in msg:  # federations/{fid}/... (hub's own writes) and updates/{node}/{fid}/...
            continue
        if "/global/" in msg:
            counts["global_model_writes"] += 1
            continue
        counts["hub_events"] += 1
        counts["handler_already_closed"] += "already closed" in msg
        counts["handler_duplicate"] += "duplicate" in msg
        if m := re.search(r"round (\d+) broadcast", msg):
            note(int(m[1]), _log_time(entry["time"]), "hub")
    router_log = logs / "router.log"
    for line in router_log.read_text(errors="replace").splitlines() if router_log.exists() else []:
        if "deadline sweep" in line and f"{fid}:" in line and "closed" in line:
            counts["sweep_closes"] += 1
            if m := re.search(r"round (\d+) broadcast", line):
                note(int(m[1]), _log_time(line[:23]), "sweep")
    fs_log = logs / "firestore.log"
    if fs_log.exists():
        counts["firestore_lock_timeouts"] = fs_log.read_text(errors="replace").count("WARNING: Operation failed: Transaction lock timeout")
    return {"broadcasts": broadcasts, "counts": counts}


def check_data(db, gcs, settings, config: FederationConfig, fed: dict, expected: dict) -> dict:
    """Do the rows given to Flower equal what each fedpipe worker loaded?"""
    from shared.jobs import DatasetRef
    from workers.trainer.data import load_dataset

    stats = FeatureStats.model_validate(fed["stats"])
    max_diff, same_labels = 0.0, True
    for i, node in enumerate(config.nodes):
        split = load_dataset(db, gcs, settings, DatasetRef(node=node.name, dataset=node.dataset), config.test_fraction, config.seed, stats)
        for key, got in (("x_train", split.x_train), ("x_test", split.x_test)):
            want = expected[f"n{i}_{key}"]
            if got.shape != want.shape:
                return {"identical": False, "error": f"{node.name} {key}: shape {got.shape} vs {want.shape}"}
            max_diff = max(max_diff, float(np.max(np.abs(got - want))) if got.size else 0.0)
        same_labels &= bool(np.array_equal(split.y_train, expected[f"n{i}_y_train"]) and np.array_equal(split.y_test, expected[f"n{i}_y_test"]))
    return {"identical": same_labels and max_diff == 0.0, "labels_equal": same_labels, "max_abs_diff_x": max_diff}


def analyze_ours(config, fed, round_docs, blobs, jobs, started_at, events, global_model_object) -> dict:
    fid = config.id
    rounds, breakdown = [], []
    for rd in round_docs:
        if rd.get("closed_at") is None:
            continue
        ups = rd["updates"]
        computes = {n: u["metrics"]["compute_s"] for n, u in ups.items()}
        wall = _s(rd["opened_at"], rd["closed_at"])
        row = {"round": rd["round"], "kind": rd["kind"], "wall_s": round(wall, 4), "max_compute_s": round(max(computes.values()), 4),
               "overhead_s": round(wall - max(computes.values()), 4), "compute_s": {n: round(c, 4) for n, c in sorted(computes.items())}}
        # The node whose update closed the round (reported last).
        crit = max(ups, key=lambda n: ups[n]["at"])
        u = ups[crit]
        uploaded = blobs.get(u["object"].split("/", 3)[3])
        comp = computes[crit]
        parts = {"critical_node": crit}
        if uploaded is not None:
            compute_start = uploaded.timestamp() - comp
            parts["worker_to_hub_s"] = round(_s(uploaded, u["at"]), 4)
            parts["compute_s"] = round(comp, 4)
            if rd["round"] == 1:
                j = jobs.get(crit, {})
                if "scheduled" in j and "running" in j:
                    parts["launch_s"] = round(_s(rd["opened_at"], j["scheduled"]), 4)  # job created -> job-written -> launcher
                    parts["worker_boot_s"] = round(_s(j["scheduled"], j["running"]), 4)  # process, imports (jax), clients, lease
                    parts["worker_setup_s"] = round(compute_start - j["running"].timestamp(), 4)  # data load, Trainer, subscribe, reads
            else:
                g = blobs.get(global_model_object(fid, rd["round"] - 1))
                b = events["broadcasts"].get(rd["round"])
                if g is not None:
                    parts["hub_close_aggregate_s"] = round(_s(rd["opened_at"], g), 4)
                    if b is not None:
                        parts["hub_finish_broadcast_s"] = round(b[0] - g.timestamp(), 4)  # round docs, move-on transaction, publish
                        parts["broadcast_to_compute_s"] = round(compute_start - b[0], 4)  # Pub/Sub push, wake, reads, download
                        parts["broadcast_by"] = b[1]
                    else:
                        parts["hub_to_worker_s"] = round(compute_start - g.timestamp(), 4)
            parts["compute_skew_s"] = round(max(computes.values()) - comp, 4)  # overhead = sum of the parts above minus compute, minus this
        row["parts"] = parts
        rounds.append(row)
        if rd["kind"] == "train" and rd["round"] >= 2:
            breakdown.append(parts)
    train = [r for r in rounds if r["kind"] == "train"]
    steady = [r["overhead_s"] for r in train if r["round"] >= 2]
    evaluate = next((r for r in rounds if r["kind"] == "evaluate"), None)
    keys = ("hub_close_aggregate_s", "hub_finish_broadcast_s", "broadcast_to_compute_s", "hub_to_worker_s", "compute_s", "worker_to_hub_s", "compute_skew_s")
    return {
        "status": fed["status"],
        "total_s": round(_s(started_at, fed["completed_at"]), 3),
        "start_to_round1_open_s": round(_s(started_at, round_docs[0]["opened_at"]), 4),
        "accuracy": fed["final"]["accuracy"],
        "steady_overhead_s": _median(steady),
        "steady_overhead_mean_s": round(statistics.fmean(steady), 4) if steady else None,
        "steady_wall_s": _median([r["wall_s"] for r in train if r["round"] >= 2]),
        "steady_max_compute_s": _median([r["max_compute_s"] for r in train if r["round"] >= 2]),
        "round1_wall_s": train[0]["wall_s"] if train else None,
        "round1_overhead_s": train[0]["overhead_s"] if train else None,
        "round1_parts": train[0]["parts"] if train else None,
        "final_eval_round_wall_s": evaluate["wall_s"] if evaluate else None,
        "breakdown_median_s": {k.removesuffix("_s"): v for k in keys if (v := _median([b[k] for b in breakdown if k in b])) is not None},
        "rounds_broadcast_by_sweep": sorted(r for r, (_, by) in events["broadcasts"].items() if by == "sweep"),
        "rounds": rounds,
        "worker_attempts": {n: j.get("attempts") for n, j in jobs.items()},
    }


# ---------------------------------------------------------------------------
# Flower
# ---------------------------------------------------------------------------

def run_flower(data: dict, config: FederationConfig, workdir: Path, client_cpus: float, timeout_s: float) -> dict:
    if not BENCH_PYTHON.exists():
        return {"status": "skipped", "error": f"{BENCH_PYTHON} not found (see the module docstring for the setup)"}
    data_path, cfg_path, out_path = workdir / f"flower-{len(config.nodes)}n.npz", workdir / f"flower-{len(config.nodes)}n.json", workdir / f"flower-{len(config.nodes)}n-out.json"
    np.savez(data_path, **data)
    cfg = {"nodes": len(config.nodes), "rounds": config.rounds, "local_epochs": config.local_epochs, "model": config.model,
           "hidden": list(config.hidden), "batch_size": config.batch_size, "learning_rate": config.learning_rate, "seed": config.seed}
    cfg_path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST") and k != "FEDPIPE_NODES"}
    env |= {"RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BENCH_PYTHON), str(ROOT / "bench" / "flower_sim.py"), "--data", str(data_path), "--config", str(cfg_path),
           "--out", str(out_path), "--client-cpus", str(client_cpus)]
    t0 = time.monotonic()
    log_path = workdir / f"flower-{len(config.nodes)}n.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=str(ROOT))
    process_s = time.monotonic() - t0
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        return {"status": "failed", "error": f"flower_sim exited {proc.returncode}; log tail:\n{tail}"}
    res = json.loads(out_path.read_text())
    rounds = res["rounds"]
    steady = [r["overhead_s"] for r in rounds if r["round"] >= 2]
    return {
        "status": "completed" if res.get("final") and len(rounds) == config.rounds and not res["errors"] else "incomplete",
        "flwr_version": res["flwr_version"], "client_cpus": res["client_cpus"], "actor_processes": len(res["actor_pids"]),
        "total_s": res["total_s"], "process_s": round(process_s, 2), "engine_start_s": res["engine_start_s"],
        "shutdown_s": res["shutdown_s"], "accuracy": (res.get("final") or {}).get("accuracy"),
        "steady_overhead_s": _median(steady), "steady_overhead_mean_s": round(statistics.fmean(steady), 4) if steady else None,
        "steady_overhead_actor_s": _median([r["overhead_actor_s"] for r in rounds if r["round"] >= 2]),
        "steady_wall_s": _median([r["wall_s"] for r in rounds if r["round"] >= 2]),
        "steady_max_compute_s": _median([r["max_compute_s"] for r in rounds if r["round"] >= 2]),
        "round1_wall_s": rounds[0]["wall_s"] if rounds else None, "round1_overhead_s": rounds[0]["overhead_s"] if rounds else None,
        "final_eval_s": res.get("final_eval_s"), "errors": res["errors"],
        "rounds": [{k: v for k, v in r.items() if k != "clients"} | {"compute_s": {c["node"]: round(c["compute-s"], 4) for c in r["clients"]}} for r in rounds],
    }


# ---------------------------------------------------------------------------

def machine() -> dict:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    except OSError:
        pass
    import jax

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": model or platform.processor(),
            "cpus": len(os.sched_getaffinity(0)), "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def compare(n: int, rounds: int, ours: dict, flower: dict, rounds_note: str | None) -> dict:
    def get(d, k):
        return d.get(k) if d else None

    out = {
        "nodes": n, "rounds": rounds,
        "ours_round_overhead_s": get(ours, "steady_overhead_s"), "flower_round_overhead_s": get(flower, "steady_overhead_s"),
        "ours_total_s": get(ours, "total_s"), "flower_total_s": get(flower, "total_s"),
        "ours_accuracy": get(ours, "accuracy"), "flower_accuracy": get(flower, "accuracy"),
        "flower_round_overhead_actor_s": get(flower, "steady_overhead_actor_s"),
        "ours_round_overhead_mean_s": get(ours, "steady_overhead_mean_s"), "flower_round_overhead_mean_s": get(flower, "steady_overhead_mean_s"),
        "ours_round1_overhead_s": get(ours, "round1_overhead_s"), "flower_round1_overhead_s": get(flower, "round1_overhead_s"),
        "ours_round_wall_s": get(ours, "steady_wall_s"), "flower_round_wall_s": get(flower, "steady_wall_s"),
        "ours_round_max_compute_s": get(ours, "steady_max_compute_s"), "flower_round_max_compute_s": get(flower, "steady_max_compute_s"),
        "ours_round1_wall_s": get(ours, "round1_wall_s"), "flower_round1_wall_s": get(flower, "round1_wall_s"),
        "ours_final_eval_round_wall_s": get(ours, "final_eval_round_wall_s"), "flower_engine_start_s": get(flower, "engine_start_s"),
        "ours_overhead_breakdown_median_s": get(ours, "breakdown_median_s"), "ours_round1_parts_s": get(ours, "round1_parts"),
        "ours_per_round_overhead_s": [r["overhead_s"] for r in (ours or {}).get("rounds", []) if r["kind"] == "train"],
        "flower_per_round_overhead_s": [r["overhead_s"] for r in (flower or {}).get("rounds", [])],
        "ours_final_eval_round_parts_s": next((r["parts"] for r in (ours or {}).get("rounds", []) if r["kind"] == "evaluate"), None),
        "ours_rounds_broadcast_by_sweep": get(ours, "rounds_broadcast_by_sweep"), "ours_stack_events": get(ours, "stack_events"),
        "loadavg_1m_before": {"ours": get(ours, "loadavg_1m_before"), "flower": get(flower, "loadavg_1m_before")},
        "data_identical": get(get(ours, "data_check"), "identical"),
        "ours_status": get(ours, "status"), "flower_status": get(flower, "status"),
    }
    if rounds_note:
        out["rounds_note"] = rounds_note
    o, f = out["ours_round_overhead_s"], out["flower_round_overhead_s"]
    out["target_overhead_met"] = None if o is None or f is None else o <= f
    o, f = out["ours_total_s"], out["flower_total_s"]
    out["target_total_met"] = None if o is None or f is None else o <= f
    o, f = out["ours_accuracy"], out["flower_accuracy"]
    out["accuracy_gap_points"] = None if o is None or f is None else round(100 * (f - o), 2)
    out["target_accuracy_met"] = None if o is None or f is None else abs(100 * (f - o)) <= 0.5
    return out


def summary_lines(c: dict) -> list[str]:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    def met(x):
        return "n/a" if x is None else ("met" if x else "NOT met")

    lines = [f"--- {c['nodes']} nodes, {c['rounds']} rounds" + (f" ({c['rounds_note']})" if c.get("rounds_note") else "") + " ---",
             f"{'':28}{'fedpipe':>12}{'flower':>12}",
             f"{'steady round overhead (s)':28}{f(c['ours_round_overhead_s']):>12}{f(c['flower_round_overhead_s']):>12}   target {met(c['target_overhead_met'])}",
             f"{'  flower, busiest actor (s)':28}{'':>12}{f(c['flower_round_overhead_actor_s']):>12}   (round - its clients' compute run back to back)",
             f"{'  mean, rounds 2..R (s)':28}{f(c['ours_round_overhead_mean_s']):>12}{f(c['flower_round_overhead_mean_s']):>12}",
             f"{'steady round wall (s)':28}{f(c['ours_round_wall_s']):>12}{f(c['flower_round_wall_s']):>12}",
             f"{'  of which max compute (s)':28}{f(c['ours_round_max_compute_s']):>12}{f(c['flower_round_max_compute_s']):>12}",
             f"{'round 1 wall (s)':28}{f(c['ours_round1_wall_s']):>12}{f(c['flower_round1_wall_s']):>12}",
             f"{'round 1 overhead (s)':28}{f(c['ours_round1_overhead_s']):>12}{f(c['flower_round1_overhead_s']):>12}",
             f"{'total (s)':28}{f(c['ours_total_s'], '{:.2f}'):>12}{f(c['flower_total_s'], '{:.2f}'):>12}   target {met(c['target_total_met'])}",
             f"{'final accuracy':28}{f(c['ours_accuracy'], '{:.4f}'):>12}{f(c['flower_accuracy'], '{:.4f}'):>12}   "
             f"gap {f(c['accuracy_gap_points'], '{:+.2f}')} points, target {met(c['target_accuracy_met'])}",
             f"same data on both sides: {c['data_identical']}"]
    b = c.get("ours_overhead_breakdown_median_s")
    if b:
        lines.append("fedpipe steady round, median (s): " + ", ".join(f"{k} {f(v)}" for k, v in b.items()))
    for label, key in (("round 1", "ours_round1_parts_s"), ("final evaluate-only round", "ours_final_eval_round_parts_s")):
        if p := c.get(key):
            lines.append(f"fedpipe {label} (s): " + ", ".join(f"{k.removesuffix('_s')} {v if isinstance(v, str) else f(v)}" for k, v in p.items()))
    if c.get("ours_stack_events"):
        lines.append(f"fedpipe slow paths: rounds broadcast by the deadline sweep instead of the hub handler {c['ours_rounds_broadcast_by_sweep']}; "
                     + ", ".join(f"{k} {v}" for k, v in c["ours_stack_events"].items()))
    lines.append(f"1-min load average before each side: {c['loadavg_1m_before']}")
    if c.get("flower_engine_start_s") is not None:
        lines.append(f"flower engine start (Ray, actors) before round 1: {c['flower_engine_start_s']:.2f}s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,8", help="node counts, comma separated (the first is reported at top level)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rounds-8", type=int, default=None, help="rounds for counts above 2 nodes (default: --rounds)")
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--client-cpus", type=float, default=2.0, help="Flower: Ray CPUs per client actor (2 = Flower's default)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per side and node count")
    ap.add_argument("--skip", choices=["ours", "flower"], default=None, help="debugging: run one side only")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (stack logs, worker logs, Flower log) and print its path")
    ap.add_argument("--details", type=Path, default=ROOT / "results" / "bench" / "federation.json")
    args = ap.parse_args()
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]

    mach = machine()
    log(f"machine: {mach['cpu_model']}, {mach['cpus']} CPUs, {mach['mem_gib']} GiB, {mach['platform']}; load {mach['loadavg_at_start']}")
    workdir = Path(tempfile.mkdtemp(prefix="fedpipe-bench-federation-"))
    results, details = {}, {"machine": mach, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        for n in counts:
            rounds = args.rounds if n <= 2 or args.rounds_8 is None else args.rounds_8
            note = f"reduced from {args.rounds} to keep the bench short" if rounds != args.rounds else None
            config = fed_config(f"bench-{n}n", [f"n{i}" for i in range(n)], rounds, args.local_epochs)
            data = node_splits(n, args.alpha, config)
            rows = [len(data[f"n{i}_y_train"]) + len(data[f"n{i}_y_test"]) for i in range(n)]
            log(f"{n} nodes: rows per node {rows}; {rounds} rounds x {args.local_epochs} local epochs")
            ours = flower = None
            if args.skip != "ours":
                load = round(os.getloadavg()[0], 2)
                ours = run_ours(n, rounds, args.local_epochs, args.alpha, workdir / "stack", args.timeout, data)
                ours["loadavg_1m_before"] = load
                log(f"ours: {ours.get('status')}, total {ours.get('total_s')}s, steady overhead {ours.get('steady_overhead_s')}s, accuracy {ours.get('accuracy')}")
            if args.skip != "flower":
                log(f"flower: run_simulation with {n} supernodes")
                load = round(os.getloadavg()[0], 2)
                flower = run_flower(data, config, workdir, args.client_cpus, args.timeout) | {"loadavg_1m_before": load}
                log(f"flower: {flower.get('status')}, total {flower.get('total_s')}s, steady overhead {flower.get('steady_overhead_s')}s, accuracy {flower.get('accuracy')}")
                if flower.get("error"):
                    log(flower["error"])
            results[n] = compare(n, rounds, ours, flower, note)
            details[f"nodes_{n}"] = {"ours": ours, "flower": flower}
    finally:
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        os.environ.pop("FEDPIPE_NODES", None)

    args.details.parent.mkdir(parents=True, exist_ok=True)
    args.details.write_text(json.dumps(details, indent=1, default=str))
    print()
    for n in counts:
        print("\n".join(summary_lines(results[n])))
    print(f"per-round details: {args.details}")
    first, rest = counts[0], counts[1:]
    out = {**results[first], **{f"nodes_{n}": results[n] for n in rest}, "dataset": DATASET, "alpha": args.alpha,
           "local_epochs": args.local_epochs, "machine": mach}
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
