"""Federation status for people: per-round, per-node tables and the accuracy/loss plot."""

from __future__ import annotations

from pathlib import Path

from google.cloud import firestore
from rich.table import Table

from shared.config import Settings


def load(db: firestore.Client, settings: Settings, fid: str, from_round: int = 1, late: bool = True) -> tuple[dict | None, list[dict]]:
    """The federation document and its rounds from `from_round` on, each with its `updates` (node -> update)
    and, with `late`, the updates it did not count (late or refused, each with its reason code).

    Firestore's own times ride along: each update's `counted_at` (when the hub counted it) and
    a closed round's `committed_at` (when its close was committed, which opened the next round).
    The federation document is read first: once it says completed or failed, the rounds read
    after it include the closing one, which was committed in the same batch.
    """
    ref = db.collection(settings.federations_collection).document(fid)
    fed = ref.get().to_dict()
    rounds = []
    query = ref.collection("rounds").where(filter=firestore.FieldFilter("round", ">=", from_round)).order_by("round")
    for snap in query.stream() if fed else []:
        rd = snap.to_dict()
        if rd["status"] != "open":
            rd["committed_at"] = snap.update_time  # nothing writes a round document after its close
        rd["updates"] = {u.id: u.to_dict() | {"counted_at": u.create_time} for u in snap.reference.collection("updates").stream()}
        if late:
            rd["late"] = [u.to_dict() for u in snap.reference.collection("late").stream()]
        rounds.append(rd)
    return fed, rounds


def history(rounds: list[dict]) -> list[dict]:
    """Accuracy and loss of the global model after each round (0 = the initial model)."""
    return [rd["global_metrics"] for rd in rounds if rd.get("global_metrics")]


def epsilon_text(spent: dict | None) -> str:
    """A spent (epsilon, delta) as people read it; an unbounded epsilon (no noise) says so."""
    if spent is None:
        return ""
    epsilon = "∞ (no noise)" if spent.get("epsilon") is None else f"{spent['epsilon']:.2f}"
    return f"ε {epsilon} at δ {spent['delta']:.0e}"


def privacy_line(fed: dict) -> str | None:
    """What a DP federation's released models have spent so far; None without privacy."""
    dp = fed["config"].get("privacy")
    if dp is None:
        return None
    spent = fed.get("privacy")
    what = f"{epsilon_text(spent)} after {spent['rounds']} round(s)" if spent else "nothing released yet"
    return (f"client-level DP (clip {dp['clip_norm']:g}, noise multiplier {dp['noise_multiplier']:g}): {what}; "
            "every node counted in every round (RDP accountant, an upper bound)")


def rounds_table(fed: dict, rounds: list[dict]) -> Table:
    nodes = [n["name"] for n in fed["config"]["nodes"]]
    private = fed["config"].get("privacy") is not None
    table = Table("round", "kind", "status", *nodes, "global model (after previous round)", *(["privacy spent"] if private else []), "note",
                  title=f"federation {fed['config']['id']}: {fed['status']}, {fed['config']['strategy']}, round {fed['round']}")
    for rd in rounds:
        cells = []
        for node in nodes:
            update = rd["updates"].get(node)
            if update is None:
                cells.append("[dim]waiting[/]" if rd["status"] == "open" else "[red]missing[/]")
            else:
                m = update["metrics"]
                train = f" train loss {m['train_loss']:.3f}" if "train_loss" in m else ""
                cells.append(f"[green]✓[/] acc {m['global_accuracy']:.3f}{train}")
        gm = rd.get("global_metrics")
        refused = ", ".join(f"{x['node']} ({x['reason']})" for x in rd.get("late") or [])
        late = f"; not counted: {refused}" if refused else ""
        table.add_row(
            str(rd["round"]), rd["kind"], rd["status"], *cells,
            f"acc {gm['accuracy']:.4f} loss {gm['loss']:.4f}" if gm else "", *([epsilon_text(rd.get("privacy"))] if private else []),
            (rd.get("reason") or "") + late,
        )
    return table


def plot(fed: dict, rounds: list[dict], path: Path) -> Path:
    """Accuracy and loss of the global model per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = history(rounds)
    x = [h["round"] for h in points]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(x, [h["accuracy"] for h in points], marker="o")
    acc_ax.set(title="global model accuracy (held-out, all nodes)", xlabel="round", ylabel="accuracy")
    loss_ax.plot(x, [h["loss"] for h in points], marker="o", color="tab:red")
    loss_ax.set(title="global model loss", xlabel="round", ylabel="cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"federation {fed['config']['id']} ({fed['config']['strategy']}, {len(fed['config']['nodes'])} nodes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
