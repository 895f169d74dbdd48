"""A whole federation as a user sees it, fedpipe vs Flower's simulation engine: round time, total, accuracy.

    .venv/bin/python bench/federation.py                      # 2 and 8 nodes, 20 rounds x 1 local epoch
    .venv/bin/python bench/federation.py --nodes 2 --rounds 5 --repeat 3

It runs ``.venv-bench/bin/python bench/flower_sim.py`` as a subprocess for the Flower side
(``make .venv-bench/.installed`` creates that venv: Flower's pins clash with the
google-cloud libraries in .venv; jax/jaxlib/optax there are .venv's versions, so both sides
run the same XLA). Without it the Flower fields are null. Each side records the 1-minute
load average it started under: other work on the same cores shows in every number.

The federation: scikit-learn digits split non-IID over N nodes (``dirichlet_split``, alpha 0.5,
seed 0), model "mlp" hidden (64,), FedAvg, R rounds x E local epochs, batch 32, Adam lr 3e-3,
seed 0: exactly what ``fedpipe demo --rounds R --local-epochs E`` runs with N nodes.

* fedpipe: a fresh local cloud per run (FEDPIPE_NODES=n0..n{N-1}), then the demo's own code,
  ``run_federated_demo``: upload and preprocess each node's share (untimed), drop the config in
  the hub bucket, follow the federation as the demo does (its printed lines go to the work
  dir), train the centralized yardstick. The numbers are the round closes as Firestore
  recorded them (each closing commit's time: the moment the next round became visible to
  the workers), the same times the demo prints:
  ``first_round_s`` = config dropped -> round 1 closed (worker launch, start-up and the JIT
  compiles included); ``round_s`` = between consecutive closes, ``steady_round_s`` = its median
  over rounds 2..R; ``total_s`` = config dropped -> federation completed (R training rounds and
  the final evaluate-only round). accuracy = the federation's ``final.accuracy`` (every node's
  held-out rows pooled).
* flower: ``flwr.simulation.run_simulation`` (Ray backend, Flower's default 2 CPUs per client
  actor: on 2 cores one actor runs the clients in turn) with FedAvg; each client evaluates the
  received model on its held-out rows and ``Trainer.fit``s from it, with fedpipe's own Trainer
  (bench/flower_sim.py). Round r closes when its aggregate is ready (the ``evaluate_fn(r)``
  call); ``first_round_s`` = run_simulation called -> round 1 closed (Ray start included),
  ``total_s`` = the whole run_simulation call (Ray start and shutdown included, as a user times
  ``flwr run``). accuracy: the final model on every node's held-out rows pooled (ours' rows).

Same data on both sides: the bench rebuilds each node's rows as the product stores and splits
them and checks them against what ``read_split`` reads back from the stack (``data_identical``).

Where a steady fedpipe round goes (``stages_median_s``, rounds 2..R, for the node whose update
closed the round), each stage from one recorded instant to the next, so they add up to the
round: ``worker`` (previous round closed -> this node's update uploaded: the node API's long
poll waking, the global model's download through it, evaluate + train (``compute``, which the
worker reports), sign, upload), ``notify`` (upload -> the hub invoked on the node's report: the
report's request, token check, the object's metadata read), ``hub_record`` (-> update counted:
admission, verify signature, record), ``hub_close``
(-> close marker created: who reported), ``hub_aggregate`` (-> new global model written),
``hub_commit`` (-> the close, next round and federation committed in one batch). Instants come
from the emulators (object creation times, document create/update times) and the hub (when it
was invoked), all on this machine's clock. ``floors`` are the emulators' own costs on that
path, measured on the same stack after the federation (bench/floors.py).

Targets (from the product issue): steady round and total time no worse than Flower's, final
accuracy within 0.5 points of Flower's. Reported as met or not, never tuned for.

Details of every run go to results/bench/federation.json. The LAST line printed is one JSON
object: the first node count's fields at top level, the others under ``nodes_{N}``, and ``machine``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
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
STAGES = ("worker", "notify", "hub_record", "hub_close", "hub_aggregate", "hub_commit")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def round_times(closes: list[float], started: float, rounds: int) -> dict:
    """First round, steady round (median of training rounds 2..R) and total from close times (s since `started`)."""
    steps = [b - a for a, b in zip([started, *closes], closes)]
    return {"first_round_s": round(steps[0], 3) if steps else None, "steady_round_s": _median(steps[1:rounds]),
            "round_s": [round(s, 4) for s in steps], "last_close_s": round(closes[-1] - started, 3) if closes else None}


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


def fed_config(nodes: list[str], rounds: int, local_epochs: int) -> FederationConfig:
    # As fedpipe/fed_demo.py run_federated_demo builds it.
    return FederationConfig(id=f"{DATASET}-mlp-fedavg", nodes=[{"name": n, "dataset": DATASET} for n in nodes], model="mlp",
                            rounds=rounds, local_epochs=local_epochs, strategy="fedavg", round_deadline_s=120, lease_seconds=60)


# ---------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------

def run_ours(n_nodes: int, rounds: int, local_epochs: int, alpha: float, workdir: Path, timeout_s: float, expected: dict) -> dict:
    nodes = [f"n{i}" for i in range(n_nodes)]
    os.environ["FEDPIPE_NODES"] = ",".join(nodes)  # before the stack: buckets and triggers for these nodes
    from google.cloud import firestore, storage
    from rich.console import Console

    from bench import floors
    from emulators.stack import LocalCloud, StackOptions
    from fedpipe.fed_demo import run_federated_demo
    from shared.config import Settings

    settings = Settings.from_env()
    assert settings.nodes == tuple(nodes), settings.nodes
    t_stack = time.monotonic()
    with LocalCloud(StackOptions(state_dir=workdir / f"stack-{n_nodes}n", settings=settings)) as cloud:
        log(f"ours: local cloud with {n_nodes} nodes up in {time.monotonic() - t_stack:.1f}s ({cloud.endpoints.state_dir})")
        settings = Settings.from_env()  # now with what the stack set: e.g. its stand-in key store, for the yardstick's reads
        db, gcs = firestore.Client(project=settings.project), storage.Client(project=settings.project)
        printed = io.StringIO()
        report = run_federated_demo(db, gcs, settings, Console(file=printed, width=200), source=DATASET, nodes=nodes, rounds=rounds,
                                    local_epochs=local_epochs, strategy="fedavg", alpha=alpha, results_dir=workdir / "results",
                                    timeout_s=timeout_s)
        (workdir / f"demo-{n_nodes}n.txt").write_text(printed.getvalue())
        if report.status != "completed":
            return {"status": report.status, "error": report.error}
        log("ours: federation completed; measuring the emulator floors on the same stack")
        config = fed_config(nodes, rounds, local_epochs)
        recorded = recorded_rounds(db, gcs, settings, config.id)
        result = {"status": report.status, "accuracy": report.federated_accuracy, **analyze_ours(recorded, rounds)}
        result |= {"demo_printed": {k: getattr(report, k, None) for k in ("first_round_s", "steady_round_s", "federation_s")},
                   "floors": floors.measure(settings), "data_check": check_data(db, gcs, settings, config, expected)}
    return result


def recorded_rounds(db, gcs, settings, fid: str) -> dict:
    """Every instant the stack recorded about the federation (datetimes, as the emulators wrote them)."""
    fed_ref = db.collection(settings.federations_collection).document(fid)
    hub = gcs.bucket(settings.hub_bucket)
    blobs = {b.name: b.time_created for b in hub.list_blobs() if f"/{fid}" in b.name or b.name == f"requests/{fid}.json"}
    rounds = []
    for snap in fed_ref.collection("rounds").order_by("round").stream():
        rd = snap.to_dict() | {"committed": snap.update_time}
        rd["updates"] = {u.id: u.to_dict() | {"counted": u.create_time} for u in snap.reference.collection("updates").stream()}
        marker = snap.reference.collection("outcome").document("close").get()
        rd["marker_created"] = marker.create_time if marker.exists else None
        rounds.append(rd)
    return {"dropped": blobs[f"requests/{fid}.json"], "blobs": blobs, "rounds": rounds, "fed": fed_ref.get().to_dict()}


def analyze_ours(recorded: dict, rounds: int) -> dict:
    from shared.federation import global_model_object

    def ts(dt: datetime) -> float:
        return dt.timestamp()

    closed = [rd for rd in recorded["rounds"] if rd.get("status") != "open"]
    dropped = ts(recorded["dropped"])
    times = round_times([ts(rd["committed"]) for rd in closed], dropped, rounds)
    fid = recorded["fed"]["config"]["id"]
    per_round = []
    for prev, rd in zip(closed, closed[1:]):
        if rd["kind"] != "train":
            continue
        node, update = max(rd["updates"].items(), key=lambda kv: kv[1]["counted"])  # the update that closed the round
        instants = [ts(prev["committed"]), ts(recorded["blobs"][update["object"].split("/", 3)[3]]), ts(update["at"]),
                    ts(update["counted"]), ts(rd["marker_created"]), ts(recorded["blobs"][global_model_object(fid, rd["round"])]),
                    ts(rd["committed"])]
        stages = {name: round(b - a, 4) for name, a, b in zip(STAGES, instants, instants[1:])}
        per_round.append({"round": rd["round"], "closed_by": node, **stages, "compute": update["metrics"]["compute_s"],
                          "max_compute": max(u["metrics"]["compute_s"] for u in rd["updates"].values())})
    return {
        **times, "total_s": times["last_close_s"],  # the last close is the completion, committed with it
        "stages_median_s": {k: _median([r[k] for r in per_round]) for k in (*STAGES, "compute", "max_compute")},
        "stages": per_round,
    }


def check_data(db, gcs, settings, config: FederationConfig, expected: dict) -> dict:
    """Do the rows given to Flower equal what each fedpipe worker loaded?"""
    from shared.dataset_shards import pinned_dataset
    from shared.envelope import Envelope, node_kek
    from shared.jobs import DatasetRef
    from workers.trainer.data import read_split

    fed = db.collection(settings.federations_collection).document(config.id).get().to_dict()
    stats = FeatureStats.model_validate(fed["stats"])
    max_diff, same_labels = 0.0, True
    for i, node in enumerate(config.nodes):
        dataset = pinned_dataset(db, settings, DatasetRef(node=node.name, dataset=node.dataset))
        split = read_split(gcs, Envelope(node_kek(settings, node.name)), dataset, config.test_fraction, config.seed, stats)
        for key, got in (("x_train", split.x_train), ("x_test", split.x_test)):
            want = expected[f"n{i}_{key}"]
            if got.shape != want.shape:
                return {"identical": False, "error": f"{node.name} {key}: shape {got.shape} vs {want.shape}"}
            max_diff = max(max_diff, float(np.max(np.abs(got - want))) if got.size else 0.0)
        same_labels &= bool(np.array_equal(split.y_train, expected[f"n{i}_y_train"]) and np.array_equal(split.y_test, expected[f"n{i}_y_test"]))
    return {"identical": same_labels and max_diff == 0.0, "labels_equal": same_labels, "max_abs_diff_x": max_diff}


# ---------------------------------------------------------------------------
# Flower
# ---------------------------------------------------------------------------

def run_flower(data: dict, config: FederationConfig, workdir: Path, client_cpus: float, timeout_s: float) -> dict:
    if not BENCH_PYTHON.exists():
        return {"status": "skipped", "error": f"{BENCH_PYTHON} not found (make .venv-bench/.installed)"}
    n = len(config.nodes)
    data_path, cfg_path, out_path, log_path = (workdir / f"flower-{n}n{suffix}" for suffix in (".npz", ".json", "-out.json", ".log"))
    np.savez(data_path, **data)
    cfg = {"nodes": n, "rounds": config.rounds, "local_epochs": config.local_epochs, "model": config.model,
           "hidden": list(config.hidden), "batch_size": config.batch_size, "learning_rate": config.learning_rate, "seed": config.seed}
    cfg_path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST") and k != "FEDPIPE_NODES"}
    env |= {"RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BENCH_PYTHON), str(ROOT / "bench" / "flower_sim.py"), "--data", str(data_path), "--config", str(cfg_path),
           "--out", str(out_path), "--client-cpus", str(client_cpus)]
    with open(log_path, "wb") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=str(ROOT))
    if proc.returncode != 0 or not out_path.exists():
        return {"status": "failed", "error": f"flower_sim exited {proc.returncode}; log tail:\n{log_path.read_text(errors='replace')[-3000:]}"}
    res = json.loads(out_path.read_text())
    complete = res.get("final") and len(res["round_close_s"]) == config.rounds and not res["errors"]
    return {
        "status": "completed" if complete else "incomplete", "flwr_version": res["flwr_version"], "client_cpus": res["client_cpus"],
        **round_times(res["round_close_s"], 0.0, config.rounds), "total_s": res["total_s"],
        "accuracy": (res.get("final") or {}).get("accuracy"), "engine_start_s": res["engine_start_s"], "shutdown_s": res["shutdown_s"],
        "max_compute_median_s": _median([r["max_compute_s"] for r in res["rounds"][1:]]), "errors": res["errors"],
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


METRICS = ("first_round_s", "steady_round_s", "total_s", "accuracy")


def pooled(runs: list[dict]) -> dict:
    """The median of each headline metric over the completed runs (one run: its own values)."""
    done = [r for r in runs if r.get("status") == "completed"]
    return {k: _median([r[k] for r in done if r.get(k) is not None]) for k in METRICS} | {"runs": len(done), "of": len(runs)}


def compare(n: int, rounds: int, ours: list[dict], flower: list[dict]) -> dict:
    o, f = pooled(ours), pooled(flower)
    out = {"nodes": n, "rounds": rounds}
    for k in METRICS:
        out[f"ours_{k}"], out[f"flower_{k}"] = o[k], f[k]
    last = next((r for r in reversed(ours) if r.get("status") == "completed"), {})
    out |= {
        "ours_round_s": last.get("round_s"), "flower_round_s": next((r.get("round_s") for r in reversed(flower) if r.get("round_s")), None),
        "ours_stages_median_s": last.get("stages_median_s"), "ours_floors": last.get("floors"), "ours_demo_printed": last.get("demo_printed"),
        "per_run": {"ours": [{k: r.get(k) for k in (*METRICS, "loadavg_1m_before", "status")} for r in ours],
                    "flower": [{k: r.get(k) for k in (*METRICS, "loadavg_1m_before", "status")} for r in flower]},
        "data_identical": (last.get("data_check") or {}).get("identical"),
    }
    for metric, key in (("steady_round_s", "target_steady_round_met"), ("total_s", "target_total_met")):
        a, b = out[f"ours_{metric}"], out[f"flower_{metric}"]
        out[key] = None if a is None or b is None else a <= b
    a, b = out["ours_accuracy"], out["flower_accuracy"]
    out["accuracy_gap_points"] = None if a is None or b is None else round(100 * (b - a), 2)
    out["target_accuracy_met"] = None if a is None or b is None else abs(100 * (b - a)) <= 0.5
    return out


def summary_lines(c: dict) -> list[str]:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    def met(x):
        return "n/a" if x is None else ("met" if x else "NOT met")

    runs = c["per_run"]
    lines = [f"--- {c['nodes']} nodes, {c['rounds']} rounds (median of {len(runs['ours'])} / {len(runs['flower'])} runs) ---",
             f"{'':26}{'fedpipe':>10}{'flower':>10}",
             f"{'steady round (s)':26}{f(c['ours_steady_round_s']):>10}{f(c['flower_steady_round_s']):>10}   target {met(c['target_steady_round_met'])}",
             f"{'first round (s)':26}{f(c['ours_first_round_s'], '{:.2f}'):>10}{f(c['flower_first_round_s'], '{:.2f}'):>10}",
             f"{'total (s)':26}{f(c['ours_total_s'], '{:.2f}'):>10}{f(c['flower_total_s'], '{:.2f}'):>10}   target {met(c['target_total_met'])}",
             f"{'final accuracy':26}{f(c['ours_accuracy'], '{:.4f}'):>10}{f(c['flower_accuracy'], '{:.4f}'):>10}   "
             f"gap {f(c['accuracy_gap_points'], '{:+.2f}')} points, target {met(c['target_accuracy_met'])}",
             f"same data on both sides: {c['data_identical']}; 1-min load before each run: "
             f"ours {[r['loadavg_1m_before'] for r in runs['ours']]}, flower {[r['loadavg_1m_before'] for r in runs['flower']]}"]
    if s := c.get("ours_stages_median_s"):
        lines.append("fedpipe steady round, median (s): " + ", ".join(f"{k} {f(v)}" for k, v in s.items()))
    if fl := c.get("ours_floors"):
        lines.append("emulator floors, p50/p95 (ms): " + ", ".join(f"{k} {v['p50_ms']}/{v['p95_ms']}" for k, v in fl.items()))
    if p := c.get("ours_demo_printed"):
        lines.append(f"the demo printed: {p}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,8", help="node counts, comma separated (the first is reported at top level)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=1, help="runs per side and node count, alternating; medians are reported")
    ap.add_argument("--client-cpus", type=float, default=2.0, help="Flower: Ray CPUs per client actor (2 = Flower's default)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per side and run")
    ap.add_argument("--skip", choices=["ours", "flower"], default=None, help="debugging: run one side only")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (stack logs, the demo's output, Flower's log) and print its path")
    ap.add_argument("--details", type=Path, default=ROOT / "results" / "bench" / "federation.json")
    args = ap.parse_args()
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]

    mach = machine()
    log(f"machine: {mach['cpu_model']}, {mach['cpus']} CPUs, {mach['mem_gib']} GiB, {mach['platform']}; load {mach['loadavg_at_start']}")
    workdir = Path(tempfile.mkdtemp(prefix="fedpipe-bench-federation-"))
    results, details = {}, {"machine": mach, "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        for n in counts:
            nodes = [f"n{i}" for i in range(n)]
            config = fed_config(nodes, args.rounds, args.local_epochs)
            data = node_splits(n, args.alpha, config)
            log(f"{n} nodes: rows per node {[len(data[f'n{i}_y_train']) + len(data[f'n{i}_y_test']) for i in range(n)]}; "
                f"{args.rounds} rounds x {args.local_epochs} local epochs")
            ours, flower = [], []
            for k in range(args.repeat):
                run_dir = workdir / f"{n}n-{k}"
                run_dir.mkdir()
                if args.skip != "ours":
                    load = round(os.getloadavg()[0], 2)
                    ours.append(run_ours(n, args.rounds, args.local_epochs, args.alpha, run_dir, args.timeout, data) | {"loadavg_1m_before": load})
                    log(f"ours: {ours[-1].get('status')}, first round {ours[-1].get('first_round_s')}s, steady {ours[-1].get('steady_round_s')}s, "
                        f"total {ours[-1].get('total_s')}s, accuracy {ours[-1].get('accuracy')} (load {load})")
                if args.skip != "flower":
                    load = round(os.getloadavg()[0], 2)
                    flower.append(run_flower(data, config, run_dir, args.client_cpus, args.timeout) | {"loadavg_1m_before": load})
                    log(f"flower: {flower[-1].get('status')}, first round {flower[-1].get('first_round_s')}s, steady {flower[-1].get('steady_round_s')}s, "
                        f"total {flower[-1].get('total_s')}s, accuracy {flower[-1].get('accuracy')} (load {load})")
                    if flower[-1].get("error"):
                        log(flower[-1]["error"])
            results[n] = compare(n, args.rounds, ours, flower)
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
