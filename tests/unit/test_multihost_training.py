"""Data-parallel training over several processes, as a multi-host run does it, on this machine's CPU.

Each test spawns real worker processes with the launcher's multi-host variables
(shared/multihost.py), so JAX's distributed runtime, Gloo's collectives and the
per-process feeding of batches all run for real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from shared.multihost import HostRole
from workers.trainer.training import TrainConfig, Trainer

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CONFIG = TrainConfig(model="mlp", hidden=(16,), epochs=4, batch_size=30, learning_rate=1e-2, seed=3)  # 30: ragged, not a multiple of 2


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 16)).astype(np.float32)  # 203 rows: the last batch is ragged
    return x, ((x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)).astype(np.int32)


# One process of the run: train, resume from a mid-run checkpoint the leader shares, and save what it got.
_PROCESS = textwrap.dedent(
    """
    import os, sys, numpy as np
    from shared.multihost import role_from_env
    from workers.trainer.distributed import join
    group = join(role_from_env(os.environ), heartbeat_timeout_s=int(os.environ.get("HEARTBEAT_TIMEOUT_S", "30")))
    import jax
    from tests.unit.test_multihost_training import CONFIG, _data
    from workers.trainer import checkpoints
    from workers.trainer.training import Trainer
    assert jax.process_count() == group.size == 2 and len(jax.devices()) == 2 * len(jax.local_devices())
    x, y = _data()
    trainer = Trainer(CONFIG, 16, 4)
    assert trainer.multi_process and trainer.mesh is not None
    if os.environ.get("DIE_AFTER_EPOCH"):
        if not group.is_leader:
            trainer.train(trainer.start(trainer.init_params()), x, y, epochs=1, on_epoch=lambda e, m: None)  # its epoch done
            os._exit(3)  # a host lost mid-run: the leader must not wait for it forever
        trainer.train(trainer.start(trainer.init_params()), x, y, epochs=1000, on_epoch=lambda e, m: group.verdict(0))
        print("NOT STOPPED", flush=True)
    end = trainer.train(trainer.start(trainer.init_params()), x, y, on_epoch=lambda e, m: group.verdict(0))
    test = trainer.evaluate(end.params, x, y)
    # Half way, the leader's checkpoint bytes reach every process, which all resume from them.
    half = trainer.train(trainer.start(trainer.init_params()), x, y, epochs=2)
    payload = group.share(checkpoints.encode(half, "fp") if group.is_leader else None)
    resumed = trainer.train(checkpoints.decode(payload, half, "fp"), x, y)
    assert all(np.array_equal(np.asarray(resumed.params[k]), np.asarray(end.params[k])) for k in end.params)
    assert group.verdict(group.role.process_id) == 1  # the largest code any process gives
    if group.is_leader:
        np.savez(sys.argv[1], loss=test["loss"], **{k: np.asarray(v) for k, v in end.params.items()})
    print("OK", group.role.process_id, flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(count: int, out: Path, extra: dict[str, str] | None = None) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    base.pop("XLA_FLAGS", None)  # one CPU device per process
    return [
        subprocess.Popen([sys.executable, "-c", _PROCESS, str(out)], env={**base, **HostRole(coordinator, count, i).env(), **(extra or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for i in range(count)
    ]


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str]]:
    try:
        return [(p.wait(timeout=timeout_s), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_processes_train_to_the_parameters_of_one(tmp_path: Path) -> None:
    out = tmp_path / "two.npz"
    results = _wait(_spawn(2, out), timeout_s=240)
    assert [code for code, _ in results] == [0, 0], "\n".join(text[-3000:] for _, text in results)
    two = np.load(out)

    x, y = _data()
    one = Trainer(CONFIG, 16, 4, devices=jax.devices()[:1])
    params, _ = one.fit(one.init_params(), x, y)
    # Not bit for bit: the gradient of a batch is summed in another order when its rows sit on two
    # processes (a partial sum each, then Gloo's all-reduce) than on one device. Float32 rounding of a
    # few hundred terms over 28 Adam steps stays far below 1e-5 of these O(0.1) weights.
    for name, value in params.items():
        np.testing.assert_allclose(two[name], np.asarray(value), rtol=1e-5, atol=1e-5, err_msg=name)
    assert abs(float(two["loss"]) - one.evaluate(params, x, y)["loss"]) < 1e-5


def test_a_lost_process_does_not_leave_the_others_waiting(tmp_path: Path) -> None:
    started = time.monotonic()
    results = _wait(_spawn(2, tmp_path / "none.npz", {"DIE_AFTER_EPOCH": "1", "HEARTBEAT_TIMEOUT_S": "3"}), timeout_s=120)
    (leader_code, leader_log), (lost_code, _) = results
    assert lost_code == 3
    # The leader waits in its next collective until the coordinator declares the silent process dead
    # and terminates the group (or sooner, when Gloo sees the peer's connection close).
    assert leader_code != 0 and "NOT STOPPED" not in leader_log, leader_log[-3000:]
    assert "heartbeat" in leader_log or "Connection closed" in leader_log, leader_log[-3000:]
    assert time.monotonic() - started < 60
