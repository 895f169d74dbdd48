"""How a user declares a data set, and the statistics that travel with its shards.

A data set lives under a prefix of a node's raw bucket:

    gs://{project}-{node}-raw/{dataset}/_dataset.json   the declaration (DatasetSpec)
    gs://{project}-{node}-raw/{dataset}/{file}.csv      data files (CSV or Parquet)

It is complete when every file named in `expected_files` has been preprocessed.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator, model_validator

from shared.jobs import TrainSpec

SPEC_OBJECT = "_dataset.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class DatasetSpec(BaseModel, frozen=True):
    """The declaration a user uploads as `{dataset}/_dataset.json`."""

    features: list[str] = Field(min_length=1)
    label: str
    num_classes: int = Field(ge=2, le=10_000)
    expected_files: list[str] = Field(min_length=1)
    shard_rows: int = Field(default=4096, ge=1)
    train: TrainSpec = TrainSpec()

    @field_validator("expected_files")
    @classmethod
    def _plain_names(cls, files: list[str]) -> list[str]:
        for name in files:
            if not _NAME.match(name) or name == SPEC_OBJECT:
                raise ValueError(f"expected file {name!r} must be a plain file name")
        if len(set(files)) != len(files):
            raise ValueError("expected_files lists a file twice")
        return files

    @model_validator(mode="after")
    def _label_is_not_a_feature(self) -> DatasetSpec:
        if self.label in self.features:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        if len(set(self.features)) != len(self.features):
            raise ValueError("features lists a column twice")
        return self


def split_object_name(name: str) -> tuple[str, str] | None:
    """`dataset/file` -> (dataset, file); None for names outside that layout."""
    parts = name.split("/")
    if len(parts) != 2 or not _NAME.match(parts[0]) or not parts[1]:
        return None
    return parts[0], parts[1]


class FeatureStats(BaseModel, frozen=True):
    """Sufficient statistics of a set of rows: merged exactly, in any order."""

    count: int
    sum: list[float]
    sumsq: list[float]
    label_counts: list[int]

    def merge(self, other: FeatureStats) -> FeatureStats:
        if len(self.sum) != len(other.sum) or len(self.label_counts) != len(other.label_counts):
            raise ValueError("cannot merge statistics of different schemas")
        return FeatureStats(
            count=self.count + other.count,
            sum=[a + b for a, b in zip(self.sum, other.sum)],
            sumsq=[a + b for a, b in zip(self.sumsq, other.sumsq)],
            label_counts=[a + b for a, b in zip(self.label_counts, other.label_counts)],
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-feature mean and standard deviation (1.0 where a feature is constant)."""
        mean = [s / self.count for s in self.sum]
        std = []
        for s2, m in zip(self.sumsq, mean):
            var = max(s2 / self.count - m * m, 0.0)
            std.append(var**0.5 if var > 1e-12 else 1.0)
        return mean, std
