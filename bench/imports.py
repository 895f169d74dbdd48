"""Cold-start cost of each function: import time in a fresh interpreter, next to the framework's own.

One command: `python bench/imports.py [--repeats 5]`. A Cloud Function pays its module's
import on every cold start, so JAX and other heavy imports must stay in the workers.
The baseline is `import functions_framework` alone, measured the same way in the same run.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys, time
t = time.perf_counter()
import {module}
elapsed = time.perf_counter() - t
heavy = sorted(m for m in ("jax", "jaxlib", "optax", "sklearn", "matplotlib") if m in sys.modules)
print(json.dumps({{"seconds": elapsed, "heavy": heavy}}))
"""


def measure(module: str, repeats: int) -> tuple[float, list[str]]:
    times, heavy = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, cwd=ROOT, check=True)
        probe = json.loads(out.stdout.splitlines()[-1])
        times.append(probe["seconds"])
        heavy = probe["heavy"]
    return statistics.median(times), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline, _ = measure("functions_framework", args.repeats)
    modules = sorted(p.stem for p in (ROOT / "functions").glob("*.py") if p.stem not in ("__init__", "main"))
    result = {"functions_framework_s": round(baseline, 3), "functions": {}}
    for module in [*modules, "main"]:
        seconds, heavy = measure(f"functions.{module}", args.repeats)
        result["functions"][module] = {"import_s": round(seconds, 3), "vs_framework": round(seconds / baseline, 2), "heavy_modules": heavy}
        print(f"functions.{module:<12} {seconds:6.3f}s ({seconds / baseline:.1f}x functions_framework alone) heavy: {heavy or 'none'}", file=sys.stderr)
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, CPython {platform.python_version()}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
