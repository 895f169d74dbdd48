"""The worker images (workers/trainer/Dockerfile, .gpu, .tpu, .confidential) and their locks, by value.

No Docker engine runs here, so the images are never built in CI: these tests read the
Dockerfiles and the requirements locks and hold them to what a reproducible, attestable
image needs (pinned base, pinned packages, the JAX the tests run with, non-root, one entry point).
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "workers" / "trainer"
IMAGES = {"cpu": "Dockerfile", "gpu": "Dockerfile.gpu", "tpu": "Dockerfile.tpu"}
DIGEST_FROM = re.compile(r"FROM (\S+)@sha256:[0-9a-f]{64}( AS \S+)?")
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)")
ENTRYPOINT = 'ENTRYPOINT ["python", "-m", "workers.trainer"]'
# What an accelerator lock may add to the CPU lock: JAX's CUDA plugin and the CUDA wheels, or libtpu.
ACCELERATOR_ONLY = {"gpu": re.compile(r"jax-cuda12-(plugin|pjrt)|nvidia-.*-cu12"), "tpu": re.compile(r"libtpu")}


def instructions(name: str) -> list[str]:
    """The Dockerfile's instructions, one string each: comments dropped, continuation lines joined."""
    lines, current = [], ""
    for raw in (TRAINER / name).read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current = f"{current} {line.rstrip(chr(92)).strip()}".strip()
        if not line.endswith("\\"):
            lines.append(re.sub(r"\s+", " ", current))
            current = ""
    assert not current, f"{name} ends inside a continued line"
    return lines


def lock(kind: str) -> dict[str, str]:
    """requirements-<kind>.txt as {canonical name: version}; every non-comment line must be `name==version`."""
    pins: dict[str, str] = {}
    for line in (TRAINER / f"requirements-{kind}.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.fullmatch(line)
        assert m, f"requirements-{kind}.txt: {line!r} is not pinned as name==version (no ranges, extras, markers or URLs)"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"requirements-{kind}.txt pins {name} twice"
        pins[name] = m.group(2)
    return pins


@pytest.mark.parametrize("kind", IMAGES)
def test_every_requirement_is_pinned_with_double_equals(kind):
    pins = lock(kind)  # asserts the format line by line
    assert len(pins) > 50, f"requirements-{kind}.txt has only {len(pins)} pins: is it the whole closure?"


@pytest.mark.parametrize("kind", IMAGES)
def test_lock_has_the_jax_the_project_runs_and_tests_with(kind):
    pins = lock(kind)
    assert pins["jax"] == version("jax"), (kind, pins["jax"], version("jax"))
    assert pins["jaxlib"] == version("jaxlib"), (kind, pins["jaxlib"], version("jaxlib"))


def test_gpu_lock_has_the_cuda_plugin_of_that_jax():
    pins = lock("gpu")
    assert pins["jax-cuda12-plugin"] == pins["jax-cuda12-pjrt"] == pins["jax"] == version("jax")
    # The CUDA user space comes as wheels (the plugin's "with-cuda" extra): cuBLAS, cuDNN, and ptxas for XLA.
    for lib in ("nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime-cu12"):
        assert lib in pins, lib


def test_tpu_lock_has_libtpu_and_cpu_lock_has_no_accelerator_runtime():
    assert "libtpu" in lock("tpu")
    cpu = lock("cpu")
    assert not [n for n in cpu if n == "libtpu" or n.startswith(("nvidia-", "jax-cuda"))]


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_accelerator_locks_are_the_cpu_lock_plus_their_runtime(kind):
    cpu, acc = lock("cpu"), lock(kind)
    added = set(acc) - set(cpu)
    assert added and all(ACCELERATOR_ONLY[kind].fullmatch(n) for n in added), sorted(added)
    assert not set(cpu) - set(acc), sorted(set(cpu) - set(acc))
    assert {n: v for n, v in acc.items() if n in cpu} == cpu  # same versions of everything they share


@pytest.mark.parametrize("kind", IMAGES)
def test_lock_satisfies_pyproject(kind):
    """Every runtime dependency and the build backend are in the lock, at versions pyproject allows."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = lock(kind)
    for spec in [*project["project"]["dependencies"], *project["build-system"]["requires"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements-{kind}.txt lacks {req.name} (pyproject: {spec!r}): regenerate it (its header says how)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {spec!r}"


@pytest.mark.parametrize("kind, dockerfile", IMAGES.items())
def test_image_is_pinned_non_root_and_runs_the_worker(kind, dockerfile):
    steps = instructions(dockerfile)
    froms = [s for s in steps if s.startswith("FROM ")]
    assert froms and all(DIGEST_FROM.fullmatch(s) for s in froms), froms
    assert steps[0] == froms[0], "nothing before FROM (an ARG there could swap the base)"
    users = [s for s in steps if s.startswith("USER ")]
    assert users and users[-1].split()[1].split(":")[0] not in ("0", "root"), users
    assert steps[-1] == ENTRYPOINT
    assert not [s for s in steps if s.startswith("CMD ")]


@pytest.mark.parametrize("kind, dockerfile", IMAGES.items())
def test_image_installs_exactly_its_lock_then_the_project(kind, dockerfile):
    runs = [s for s in instructions(dockerfile) if s.startswith("RUN ")]
    lock_install = f"RUN pip install --no-deps --only-binary=:all: -r workers/trainer/requirements-{kind}.txt"
    assert lock_install in runs, runs
    project = [s for s in runs if s.startswith("RUN pip install . ")]
    assert len(project) == 1 and "--no-deps" in project[0] and "pip check" in project[0], project
    assert runs.index(lock_install) < runs.index(project[0])
    assert not [s for s in runs if "pip install" in s and s not in (lock_install, project[0])], runs
    assert "EXTRA_PIP" not in (TRAINER / dockerfile).read_text()  # nothing unpinned can be slipped in at build time


def test_the_three_images_differ_only_in_their_lock_and_gpu_environment():
    def normalised(name: str) -> list[str]:
        return [re.sub(r"requirements-(cpu|gpu|tpu)\.txt", "requirements-X.txt", s) for s in instructions(name) if not s.startswith("ENV ")]

    cpu = normalised("Dockerfile")
    assert normalised("Dockerfile.gpu") == cpu
    assert normalised("Dockerfile.tpu") == cpu
    gpu_env = next(s for s in instructions("Dockerfile.gpu") if s.startswith("ENV "))
    # Where Cloud Run, GKE and Confidential Space mount the host's driver.
    assert "LD_LIBRARY_PATH=/usr/local/nvidia/lib64" in gpu_env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in gpu_env


def test_confidential_image_builds_on_a_worker_image_by_digest():
    steps = instructions("Dockerfile.confidential")
    # The base is an ARG without a default (a build without it fails), given by digest (the header's example).
    assert steps[:2] == ["ARG TRAINER", "FROM ${TRAINER}"], steps[:2]
    text = (TRAINER / "Dockerfile.confidential").read_text()
    assert re.search(r"--build-arg TRAINER=\S+/trainer@sha256:", text)
    for name in ("Dockerfile", "Dockerfile.gpu"):
        assert f"./{name}" in text, f"Dockerfile.confidential should name the worker image it builds on: {name}"
    # It inherits the worker's user and entry point: nothing may override them.
    assert not [s for s in steps if s.split()[0] in ("USER", "ENTRYPOINT", "CMD", "RUN", "COPY", "ADD")], steps
    assert '"tee.launch_policy.allow_cmd_override"="false"' in text
