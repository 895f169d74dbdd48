"""A job's accelerator as a user writes it: parsed, bounded, and stored as that string."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.accelerators import CPU, parse
from shared.jobs import DatasetRef, FederationRef, Job, JobSpec, utcnow

DATASET = DatasetRef(node="us", dataset="scans")


@pytest.mark.parametrize(("text", "kind", "type_", "count", "hosts", "per_host"), [
    ("cpu", "cpu", None, 0, 1, 0),
    ("gpu", "gpu", "nvidia-l4", 1, 1, 0),
    ("gpu:nvidia-h100-80gb:8", "gpu", "nvidia-h100-80gb", 8, 1, 0),
    ("tpu:v5e:1x1", "tpu", "v5e", 1, 1, 1),
    ("tpu:v5e:2x4", "tpu", "v5e", 8, 1, 8),  # one host drives 8 v5e chips
    ("tpu:v6e:4x4", "tpu", "v6e", 16, 4, 4),
    ("tpu:v5p:2x2x1", "tpu", "v5p", 4, 1, 4),
    ("tpu:v4:2x2x4", "tpu", "v4", 16, 4, 4),
])
def test_each_form_parses_to_its_shape_and_hosts(text, kind, type_, count, hosts, per_host):
    accelerator = parse(text)
    assert (accelerator.kind, accelerator.type, accelerator.count, accelerator.hosts, accelerator.chips_per_host) == (
        kind, type_, count, hosts, per_host)
    assert parse(str(accelerator)) == accelerator


@pytest.mark.parametrize(("text", "says"), [
    ("gpu:nvidia-l4:3", "count one of"),
    ("gpu:nvidia-quantum:1", "type one of"),
    ("gpu:nvidia-l4", "gpu:<type>:<count>"),
    ("tpu", "tpu:<version>:<topology>"),
    ("tpu:v9:2x2", "version one of"),
    ("tpu:v5e:2x2x2", "2 dimensions"),
    ("tpu:v4:2x2", "3 dimensions"),
    ("tpu:v5e:0x4", "2 dimensions"),
    ("tpu:v5e:32x32", "at most 256 chips"),
    ("tpu:v5e:3x3", "multiple of 4"),
    ("tpu:v6e:16x16x16", "2 dimensions"),
    ("fpga", "unknown accelerator"),
    ("cpu:8", "unknown accelerator"),
    ("gpu:" + "x" * 100, "short string"),
])
def test_anything_else_is_refused_naming_what_is_allowed(text, says):
    with pytest.raises(ValueError, match=says):
        parse(text)


def test_a_job_stores_its_accelerator_as_the_string_and_reads_it_back():
    job = Job.new("j", JobSpec(dataset=DATASET, accelerator="tpu:v6e:4x4"), utcnow())
    doc = job.to_doc()
    assert doc["spec"]["accelerator"] == "tpu:v6e:4x4" and doc["spec"]["hosts"] == 4
    assert Job.from_doc("j", doc).spec == job.spec
    assert JobSpec(dataset=DATASET).accelerator == CPU


def test_hosts_are_bounded_and_a_slice_sets_its_own():
    assert JobSpec(dataset=DATASET, accelerator="gpu:nvidia-h100-80gb:8", hosts=4).hosts == 4
    with pytest.raises(ValidationError, match="4 hosts, not 2"):
        JobSpec(dataset=DATASET, accelerator="tpu:v6e:4x4", hosts=2)
    with pytest.raises(ValidationError):
        JobSpec(dataset=DATASET, hosts=65)
    with pytest.raises(ValidationError):
        JobSpec(dataset=DATASET, hosts=0)
    with pytest.raises(ValidationError, match="one host"):
        JobSpec(dataset=DATASET, hosts=2, federation=FederationRef(id="f", node="us"))
    with pytest.raises(ValidationError, match="accelerator"):
        JobSpec(dataset=DATASET, accelerator="tpu:v5e:3x3")
