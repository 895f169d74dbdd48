"""bench/confidential.py still runs and reports what its README promises (at --quick size: seconds).

It starts the attestation simulator and the key broker as child processes on free ports (no
emulators, no network), so it is a unit test in the sense that matters here: no shared services.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.confidential import StageClock
from workers.trainer.attestation import BrokerClient, Launcher

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("key_release_ms", "key_release_ms_p95", "key_release_cold_ms", "crypto_ms_per_round", "crypto_round_fraction", "round_ms")


@pytest.fixture(scope="module")
def quick() -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "confidential.py"), "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # the last line printed is the JSON object


def test_the_last_line_has_every_headline_field_with_sane_values(quick):
    for field in FIELDS:
        assert isinstance(quick[field], float) and quick[field] > 0, (field, quick[field])
    assert quick["key_release_ms"] <= quick["key_release_ms_p95"]
    assert quick["key_release_n"] == 5 and quick["quick"] is True
    assert quick["crypto_round_fraction"] == pytest.approx(quick["crypto_ms_per_round"] / quick["round_ms"], rel=1e-3)
    assert quick["target_met"] is (quick["crypto_round_fraction"] < quick["target_fraction"])
    assert {"machine", "load_avg_1m", "crypto_assumption", "round_measure"} <= set(quick)
    assert quick["machine"]["cpus"] >= 1 and len(quick["load_avg_1m"]) == 2


def test_it_measures_the_fedavg_cnn_and_every_step_of_a_rounds_crypto(quick):
    assert quick["params"] == 1_663_370  # McMahan et al.'s CNN on 28x28
    steps = quick["crypto_breakdown_ms"]
    assert set(steps) == {"worker_seal_update", "hub_open_update", "hub_seal_global", "node_api_open_global", "worker_seal_in_process_kek"}
    assert all(v > 0 for v in steps.values())
    assert set(quick["key_release_stages_ms"]) == {"nonce", "token", "broker", "worker_local"}
    assert quick["update_bytes"] > 4 * quick["params"]  # float32 safetensors, with its header
    assert quick["seal_overhead_within_hub_bounds"] is True and quick["seal_overhead_bytes"] > 0


def test_the_stage_clock_times_the_release_calls_and_puts_them_back():
    originals = (BrokerClient.nonce, Launcher.token, BrokerClient.call)
    with StageClock():
        assert (BrokerClient.nonce, Launcher.token, BrokerClient.call) != originals
    assert (BrokerClient.nonce, Launcher.token, BrokerClient.call) == originals
