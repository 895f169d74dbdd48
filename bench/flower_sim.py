"""The Flower side of bench/federation.py: the same federation in Flower's simulation engine.

    .venv-bench/bin/python bench/flower_sim.py --data DATA.npz --config CONFIG.json --out RESULT.json

Normally started by bench/federation.py (which writes DATA.npz and CONFIG.json); it needs
``flwr[simulation]`` (Ray) plus jax/jaxlib/optax at the versions in .venv, in .venv-bench.

* Engine: ``flwr.simulation.run_simulation`` (Ray backend) with a message-API ``ServerApp``
  running ``flwr.serverapp.strategy.FedAvg`` and a ``ClientApp`` whose ``train`` does what a
  fedpipe node's worker does each round: evaluate the received global model on its own
  held-out split, then ``Trainer.fit`` from it (fedpipe's own Trainer, same TrainConfig),
  and reply with the weights and its training-example count (FedAvg's weight).
* Ray backend with Flower's default client resources (2 CPUs per client actor: on a 2-core
  machine one actor runs every client in turn; ``--client-cpus 1`` gives two actors).
* One ``Trainer`` per Ray actor process (kept in a process-level cache), so its jitted
  functions are compiled once per process and data shape, not per round. Nodes are not pinned
  to actors, so an actor compiles again the first time it serves a node of a new size.
* Client-side evaluation rounds are off (fraction_evaluate=0): the client already evaluates
  the global model inside ``train``, as fedpipe's worker does. The final model is evaluated
  centrally (``evaluate_fn``) on all nodes' held-out rows pooled.
* Timing (server side, ``time.perf_counter`` in the driver): round r closes at the
  ``evaluate_fn(r)`` call that follows its aggregation (``round_close_s``: seconds since
  ``run_simulation`` was called, the way bench/federation.py times fedpipe's round closes
  from the config drop); round r runs from ``configure_train(r)`` to that close (sampling,
  sending, client work, replies and aggregation); each client measures its own
  evaluate+fit seconds (``compute-s``, fedpipe's ``compute_s``). ``total_s`` is the whole
  ``run_simulation`` call: Ray start, actor pool, all rounds, final evaluation, shutdown.

The last line printed is the result as JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _process_cache() -> types.ModuleType:
    """Per-process state that survives Ray re-sending the (pickled) ClientApp with every message."""
    return sys.modules.setdefault("_fedbench_flower_cache", types.ModuleType("_fedbench_flower_cache"))


def _client_state(data_path: str, cfg: dict):
    cache = _process_cache()
    if not hasattr(cache, "trainer"):
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from workers.trainer.training import TrainConfig, Trainer

        with np.load(data_path) as z:
            cache.data = {k: z[k] for k in z.files}
        tc = TrainConfig(model=cfg["model"], hidden=tuple(cfg["hidden"]), epochs=cfg["local_epochs"], batch_size=cfg["batch_size"],
                         learning_rate=cfg["learning_rate"], seed=cfg["seed"], prox_mu=0.0)
        cache.trainer = Trainer(tc, int(cache.data["n_features"]), int(cache.data["n_classes"]))
        cache.served = set()
    return cache


def build_apps(data_path: str, cfg: dict, timings: dict):
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        state = _client_state(data_path, cfg)
        node = int(context.node_config["partition-id"])
        d = state.data
        x_tr, y_tr, x_te, y_te = (d[f"n{node}_{k}"] for k in ("x_train", "y_train", "x_test", "y_test"))
        arrays = msg.content["arrays"]
        global_params = {k: arrays[k].numpy() for k in arrays.keys()}
        first = node not in state.served
        state.served.add(node)
        started = time.perf_counter()  # as fedpipe's worker: evaluate + train, after the model is decoded
        evaluated = state.trainer.evaluate(global_params, x_te, y_te)
        params, history = state.trainer.fit(global_params, x_tr, y_tr, on_epoch=lambda e, m: None, global_params=global_params)
        compute_s = time.perf_counter() - started
        reply = ArrayRecord({k: Array(np.asarray(v)) for k, v in params.items()})
        metrics = MetricRecord({
            "num-examples": int(len(y_tr)), "compute-s": float(compute_s), "node": node, "pid": os.getpid(),
            "first-on-this-process": int(first), "global-accuracy": float(evaluated["accuracy"]),
            "test-examples": int(evaluated["examples"]), "train-loss": float(history[-1]["loss"]),
        })
        return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)

    class TimedFedAvg(FedAvg):
        """FedAvg that records when each round starts and what each client reported."""

        def configure_train(self, server_round, arrays, config, grid):
            timings["round_start"][server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            timings["replies_in"][server_round] = time.perf_counter()
            clients = []
            for m in replies:
                if m.has_error():
                    timings["errors"].append(f"round {server_round}: {m.error}")
                    continue
                mr = m.content["metrics"]
                clients.append({k: mr[k] for k in ("node", "pid", "compute-s", "num-examples", "first-on-this-process", "global-accuracy", "test-examples")})
            timings["clients"][server_round] = clients
            out = super().aggregate_train(server_round, replies)
            timings["aggregated"][server_round] = time.perf_counter()
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from workers.trainer.training import TrainConfig, Trainer

        d = np.load(data_path)
        tc = TrainConfig(model=cfg["model"], hidden=tuple(cfg["hidden"]), epochs=cfg["local_epochs"], batch_size=cfg["batch_size"],
                         learning_rate=cfg["learning_rate"], seed=cfg["seed"], prox_mu=0.0)
        trainer = Trainer(tc, int(d["n_features"]), int(d["n_classes"]))
        n = cfg["nodes"]
        x_test = np.concatenate([d[f"n{i}_x_test"] for i in range(n)])
        y_test = np.concatenate([d[f"n{i}_y_test"] for i in range(n)])

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            timings["round_end"][server_round] = time.perf_counter()
            if server_round < cfg["rounds"]:
                return None
            started = time.perf_counter()
            res = trainer.evaluate({k: arrays[k].numpy() for k in arrays.keys()}, x_test, y_test)
            timings["final_eval_s"] = time.perf_counter() - started
            timings["final"] = {"accuracy": float(res["accuracy"]), "loss": float(res["loss"]), "examples": int(res["examples"])}
            return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

        initial = ArrayRecord({k: Array(np.asarray(v)) for k, v in trainer.init_params().items()})
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_evaluate_nodes=0, min_available_nodes=n)
        timings["strategy_start"] = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg["rounds"], evaluate_fn=evaluate_fn)
        timings["strategy_end"] = time.perf_counter()

    return server_app, client_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="npz with n{i}_x_train/y_train/x_test/y_test, n_features, n_classes")
    ap.add_argument("--config", required=True, help="JSON: nodes, rounds, local_epochs, model, hidden, batch_size, learning_rate, seed")
    ap.add_argument("--out", required=True)
    ap.add_argument("--client-cpus", type=float, default=2.0,
                    help="Ray CPUs per client actor; 2 is Flower's default (1 actor on 2 cores), 1 gives 2 actors in parallel")
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    import flwr
    from flwr.simulation import run_simulation

    timings: dict = {"round_start": {}, "replies_in": {}, "aggregated": {}, "round_end": {}, "clients": {}, "errors": []}
    server_app, client_app = build_apps(str(Path(args.data).resolve()), cfg, timings)
    backend_config = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}}
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg["nodes"], backend_config=backend_config)
    total_s = time.perf_counter() - t0

    R = cfg["rounds"]
    rounds = []
    for r in range(1, R + 1):
        if r not in timings["round_start"] or r not in timings["round_end"] or not timings["clients"].get(r):
            continue
        wall = timings["round_end"][r] - timings["round_start"][r]
        clients = timings["clients"][r]
        max_compute = max(c["compute-s"] for c in clients)
        per_actor: dict[int, float] = {}
        for c in clients:  # an actor runs its clients one after another
            per_actor[c["pid"]] = per_actor.get(c["pid"], 0.0) + c["compute-s"]
        rounds.append({
            "round": r, "wall_s": round(wall, 4), "max_compute_s": round(max_compute, 4), "overhead_s": round(wall - max_compute, 4),
            "busiest_actor_compute_s": round(max(per_actor.values()), 4), "overhead_actor_s": round(wall - max(per_actor.values()), 4),
            "sum_compute_s": round(sum(c["compute-s"] for c in clients), 4),
            "aggregate_s": round(timings["aggregated"][r] - timings["replies_in"][r], 4),
            "clients": clients,
        })
    result = {
        "flwr_version": flwr.__version__, "client_cpus": args.client_cpus, "total_s": round(total_s, 3),
        "engine_start_s": round(timings["strategy_start"] - t0, 3) if "strategy_start" in timings else None,
        "strategy_s": round(timings["strategy_end"] - timings["strategy_start"], 3) if "strategy_end" in timings else None,
        "shutdown_s": round(t0 + total_s - timings["strategy_end"], 3) if "strategy_end" in timings else None,
        "final": timings.get("final"), "final_eval_s": timings.get("final_eval_s"), "rounds": rounds,
        "round_close_s": [round(timings["round_end"][rd["round"]] - t0, 4) for rd in rounds],
        "actor_pids": sorted({c["pid"] for rd in rounds for c in rd["clients"]}), "errors": timings["errors"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
