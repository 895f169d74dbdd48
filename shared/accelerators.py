"""What a job runs on, named as a user writes it: `cpu`, `gpu:<type>:<count>` or `tpu:<version>:<topology>`.

One parsed, bounded value that every launcher reads: the kind picks the backend, the GPU
type and count or the TPU version and topology shape its request, and `hosts` says how
many worker processes a multi-host run needs (a TPU slice's hosts follow from its
topology). Stored in job documents as the string it was parsed from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

# GPU types a job may ask for, as Google Cloud names them (Compute Engine accelerator types,
# which GKE's cloud.google.com/gke-accelerator label and Batch use too).
GPU_TYPES = frozenset({
    "nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-a100", "nvidia-a100-80gb",
    "nvidia-h100-80gb", "nvidia-h100-mega-80gb", "nvidia-h200-141gb", "nvidia-b200",
})
GPU_COUNTS = (1, 2, 4, 8)  # GPUs one host can carry
DEFAULT_GPU = "nvidia-l4"  # plain `gpu`: Cloud Run's GPU

# The Compute Engine machine that carries each GPU shape (type, GPUs per host): Vertex AI and
# Batch ask for machines, not GPUs. N1 machines take attached T4s; the others come with theirs.
GPU_MACHINES: dict[tuple[str, int], str] = {
    **{("nvidia-l4", n): f"g2-standard-{cpus}" for n, cpus in ((1, 8), (2, 24), (4, 48), (8, 96))},
    **{("nvidia-tesla-t4", n): f"n1-standard-{8 * n}" for n in (1, 2, 4)},
    **{("nvidia-tesla-a100", n): f"a2-highgpu-{n}g" for n in GPU_COUNTS},
    **{("nvidia-a100-80gb", n): f"a2-ultragpu-{n}g" for n in GPU_COUNTS},
    **{("nvidia-h100-80gb", n): f"a3-highgpu-{n}g" for n in GPU_COUNTS},
    ("nvidia-h100-mega-80gb", 8): "a3-megagpu-8g",
    ("nvidia-h200-141gb", 8): "a3-ultragpu-8g",
    ("nvidia-b200", 8): "a4-highgpu-8g",
}


@dataclass(frozen=True)
class TpuVersion:
    """A TPU generation: how its slices are shaped and how many chips one host drives."""

    dims: int  # topology dimensions: 2 (v5e, v6e) or 3 (v4, v5p)
    chips_per_host: int  # on a multi-host slice
    single_host_max: int  # the most chips one host may drive alone
    max_chips: int


TPU_VERSIONS = {
    "v4": TpuVersion(dims=3, chips_per_host=4, single_host_max=4, max_chips=4096),
    "v5p": TpuVersion(dims=3, chips_per_host=4, single_host_max=4, max_chips=8960),
    "v5e": TpuVersion(dims=2, chips_per_host=4, single_host_max=8, max_chips=256),
    "v6e": TpuVersion(dims=2, chips_per_host=4, single_host_max=8, max_chips=256),
}
_TOPOLOGY = re.compile(r"[1-9][0-9]{0,2}(x[1-9][0-9]{0,2}){1,2}\Z")


@dataclass(frozen=True)
class Accelerator:
    kind: Literal["cpu", "gpu", "tpu"]
    type: str | None = None  # the GPU type, or the TPU version
    count: int = 0  # GPUs per host; for a TPU, chips in the slice
    topology: str | None = None  # a TPU slice's shape, e.g. "2x4"

    @property
    def hosts(self) -> int:
        """Worker processes the accelerator needs: more than one only for a multi-host TPU slice."""
        if self.kind != "tpu":
            return 1
        version = TPU_VERSIONS[self.type or ""]
        return 1 if self.count <= version.single_host_max else self.count // version.chips_per_host

    @property
    def chips_per_host(self) -> int:
        """TPU chips each host of the slice drives (0 for other kinds)."""
        return self.count // self.hosts if self.kind == "tpu" else 0

    def __str__(self) -> str:
        if self.kind == "gpu":
            return f"gpu:{self.type}:{self.count}"
        if self.kind == "tpu":
            return f"tpu:{self.type}:{self.topology}"
        return "cpu"


CPU = Accelerator("cpu")


def gpu_machine_type(accelerator: Accelerator) -> str | None:
    """The machine type that carries this GPU shape, or None where Compute Engine has none."""
    return GPU_MACHINES.get((accelerator.type or "", accelerator.count)) if accelerator.kind == "gpu" else None


def gpu_shapes() -> str:
    """The GPU shapes machines carry, for a refusal's message: `nvidia-l4:1|2|4|8, ...`."""
    counts: dict[str, list[int]] = {}
    for gpu, count in GPU_MACHINES:
        counts.setdefault(gpu, []).append(count)
    return ", ".join(f"{gpu}:{'|'.join(map(str, n))}" for gpu, n in counts.items())


def parse(text: str) -> Accelerator:
    """`cpu`, `gpu` (one L4), `gpu:<type>:<count>` or `tpu:<version>:<topology>`; ValueError says what is allowed."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("an accelerator is a short string: cpu, gpu:<type>:<count> or tpu:<version>:<topology>")
    kind, *rest = text.split(":")
    if kind == "cpu" and not rest:
        return CPU
    if kind == "gpu":
        if not rest:
            return Accelerator("gpu", DEFAULT_GPU, 1)
        if len(rest) != 2 or rest[0] not in GPU_TYPES or rest[1] not in {str(c) for c in GPU_COUNTS}:
            raise ValueError(f"a GPU is gpu:<type>:<count>, type one of {', '.join(sorted(GPU_TYPES))} and count one of {GPU_COUNTS}")
        return Accelerator("gpu", rest[0], int(rest[1]))
    if kind == "tpu":
        if len(rest) != 2 or rest[0] not in TPU_VERSIONS:
            raise ValueError(f"a TPU is tpu:<version>:<topology>, version one of {', '.join(sorted(TPU_VERSIONS))}, e.g. tpu:v5e:2x4")
        version, topology = TPU_VERSIONS[rest[0]], rest[1]
        if not _TOPOLOGY.match(topology) or topology.count("x") + 1 != version.dims:
            raise ValueError(f"a {rest[0]} topology has {version.dims} dimensions, each 1 to 999, e.g. {'x'.join(['2'] * version.dims)}")
        chips = math.prod(int(d) for d in topology.split("x"))
        if chips > version.max_chips:
            raise ValueError(f"a {rest[0]} slice has at most {version.max_chips} chips, not {chips}")
        if chips > version.single_host_max and chips % version.chips_per_host:
            raise ValueError(f"a multi-host {rest[0]} slice has a multiple of {version.chips_per_host} chips, not {chips}")
        return Accelerator("tpu", rest[0], chips, topology)
    raise ValueError(f"unknown accelerator {text!r}: cpu, gpu:<type>:<count> or tpu:<version>:<topology>")


def _coerce(value: object) -> Accelerator:
    return value if isinstance(value, Accelerator) else parse(value)  # type: ignore[arg-type]


# The field type for documents: parsed and bounded on the way in, its string on the way out.
AcceleratorField = Annotated[
    Accelerator, BeforeValidator(_coerce), PlainSerializer(str, return_type=str), WithJsonSchema({"type": "string"})
]
