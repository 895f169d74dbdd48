"""functions.main stays light: no worker stack (JAX, optax, scikit-learn) and no emulator code on cold start.

Checked in a fresh interpreter, so modules imported by other tests cannot hide a heavy import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("jax", "jaxlib", "optax", "sklearn", "emulators")

PROBE = f"""
import json, sys, time
start = time.perf_counter()
import functions.main as main
elapsed = time.perf_counter() - start
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
entry_points = {{name: callable(getattr(main, name, None)) for name in main.__all__}}
sys.stdout.flush()
print("FEDPIPE-PROBE " + json.dumps({{"heavy": heavy, "seconds": elapsed, "entry_points": entry_points}}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FEDPIPE-PROBE ")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0].removeprefix("FEDPIPE-PROBE "))
    print(f"functions.main imported in {result['seconds']:.3f} s")
    return result


def test_functions_main_does_not_import_heavy_modules(probe):
    assert probe["heavy"] == []


@pytest.mark.parametrize("module", HEAVY)
def test_probe_can_see_each_heavy_module(module):
    """The probe's check is real: importing the module in a fresh interpreter does show up."""
    code = f"import sys, {module}; print({module!r} in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_entry_points_are_exported(probe):
    assert probe["entry_points"] == {
        "node_api": True, "on_hub_upload": True, "on_job_written": True, "on_raw_upload": True, "on_shard_ready": True, "on_tick": True,
    }


def test_entry_points_match_the_triggers(probe):
    from shared.config import Settings
    from shared.triggers import HTTP_FUNCTIONS, function_names

    assert sorted([*function_names(Settings()), *HTTP_FUNCTIONS]) == sorted(probe["entry_points"])
