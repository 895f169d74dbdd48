"""How a user declares a data set, and the statistics that travel with its shards.

A data set lives under a prefix of a node's raw bucket:

    gs://{project}-{node}-raw/{dataset}/_dataset.json   the declaration (DatasetSpec)
    gs://{project}-{node}-raw/{dataset}/{file}.csv      data files (CSV or Parquet)

It is complete when every file named in `expected_files` has been preprocessed.

A data set's name is a plain name (it appears in job ids); a file's name may be any
name Cloud Storage accepts (any UTF-8, spaces, any script) that stays directly under
its data set's prefix. Documents about a file are keyed by `file_key`, a digest of its
name, because Firestore ids cannot hold every object name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, FiniteFloat, ValidationInfo, field_validator, model_validator

from shared.jobs import DATASET_NAME, TrainSpec

SPEC_OBJECT = "_dataset.json"
MAX_SPEC_BYTES = 1024 * 1024  # a declaration is a few KiB; a bigger one is refused before it is read
MAX_OBJECT_NAME_BYTES = 1024  # Cloud Storage's limit on an object name, in UTF-8 bytes
MAX_EXPECTED_FILES = 1_000  # so that each file may make at least one shard (max_shards_per_file)
MAX_FEATURES = 10_000
MAX_COLUMN_NAME = 256  # characters of a feature's or the label's column name
# A data set's document (and each version's) holds the declaration, every file's statistics and
# shard URIs, and must stay under Firestore's 1 MiB: the declaration and statistics get this
# much, the shard URIs the rest (so each file is allowed `max_shards_per_file` shards).
DOCUMENT_BYTES = 1_000_000
DECLARATION_BUDGET = 600_000
SHARD_URI_BYTES = 300  # gs://{project}-{node}-processed/{dataset}/{file_key}/g{generation}-s{spec}/shard-NNNNN.parquet, at most
MIN_SHARD_ROWS = 64  # rows per processed shard object: not one object per row...
MAX_SHARD_ROWS = 1_048_576  # ...nor one unbounded object per file

_NAME = re.compile(DATASET_NAME)


def file_name_problem(dataset: str, name: str) -> str | None:
    """Why `name` cannot be a file of `dataset` (None if it can).

    Refused: names that leave the data set's prefix or nest below it ('/', '.', '..'),
    control characters (Cloud Storage forbids CR and LF and they break logs), text that
    is not valid UTF-8, and names that make the object name longer than Cloud Storage allows.
    """
    if not name:
        return "is empty"
    if name in (".", "..") or "/" in name:
        return "must be a file directly under the data set's prefix (no '/', '.' or '..')"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character"
    try:
        size = len(f"{dataset}/{name}".encode())
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_OBJECT_NAME_BYTES:
        return f"makes an object name of {size} bytes; Cloud Storage allows {MAX_OBJECT_NAME_BYTES}"
    return None


def _shown(name: str, limit: int = 60) -> str:
    """A file name as it appears in a refusal: quoted, escaped, and bounded."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def file_key(name: str) -> str:
    """A Firestore document id and object-path segment for a file name of any script or length.

    A digest, not the name: a document id cannot contain '/', be '.' or '..', look
    like `__x__` or pass 1,500 bytes, and a processed shard's path must stay within
    Cloud Storage's limit. The name itself is kept in the document's fields.
    """
    return "f" + hashlib.sha256(name.encode()).hexdigest()[:40]


def _valid_file_name(name: str, info: ValidationInfo) -> str:
    """One entry of `expected_files`; each refused entry is its own validation error.

    Validated with `context={"dataset": name}` (as ingest does), the object-name length
    counts the data set's prefix too.
    """
    problem = file_name_problem((info.context or {}).get("dataset", ""), name)
    if problem is None and name == SPEC_OBJECT:
        problem = "is the declaration itself"
    if problem:
        raise ValueError(f"{_shown(name)} {problem}")
    return name


ColumnName = Annotated[str, Field(min_length=1, max_length=MAX_COLUMN_NAME)]


def _document_bytes(spec: DatasetSpec) -> int:
    """What the declaration and the statistics of every file and of their merge take in a data set's document, at most.

    Firestore stores a number in 8 bytes plus its field overhead; 16 covers both.
    """
    names = sum(len(n.encode()) for n in [*spec.features, spec.label, *spec.expected_files])
    files = len(spec.expected_files)
    per_file = 300 + 3 * max((len(n.encode()) for n in spec.expected_files), default=0)  # name as key, field and in the source URI; generations, rows
    stats = (files + 1) * (2 * len(spec.features) + spec.num_classes) * 16
    return names + files * per_file + stats


class DatasetSpec(BaseModel, frozen=True):
    """The declaration a user uploads as `{dataset}/_dataset.json`."""

    features: list[ColumnName] = Field(min_length=1, max_length=MAX_FEATURES)
    label: ColumnName
    num_classes: int = Field(ge=2, le=10_000)
    expected_files: list[Annotated[str, AfterValidator(_valid_file_name)]] = Field(min_length=1, max_length=MAX_EXPECTED_FILES)
    shard_rows: int = Field(default=4096, ge=MIN_SHARD_ROWS, le=MAX_SHARD_ROWS)  # 1 would make one object per row
    train: TrainSpec = TrainSpec()
    train_on_complete: bool = Field(default=True, description="queue a training job when complete; false for data kept for federations")

    @field_validator("expected_files")
    @classmethod
    def _listed_once(cls, files: list[str]) -> list[str]:
        if twice := sorted({_shown(name) for i, name in enumerate(files) if name in files[:i]}):
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return files

    @model_validator(mode="after")
    def _label_is_not_a_feature(self) -> DatasetSpec:
        if self.label in self.features:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        if len(set(self.features)) != len(self.features):
            raise ValueError("features lists a column twice")
        return self

    @model_validator(mode="after")
    def _fits_a_document(self) -> DatasetSpec:
        """Refused now rather than when the complete data set's document cannot be written (a retry loop)."""
        if (size := _document_bytes(self)) > DECLARATION_BUDGET:
            raise ValueError(
                f"{len(self.features)} features, {self.num_classes} classes and {len(self.expected_files)} files make a data set record of "
                f"about {size} bytes; the limit is {DECLARATION_BUDGET} (fewer files or features)"
            )
        return self

    @property
    def max_shards_per_file(self) -> int:
        """How many shards one file may make, so that every file's shard URIs fit the data set's document."""
        return (DOCUMENT_BYTES - DECLARATION_BUDGET) // SHARD_URI_BYTES // len(self.expected_files)


def split_object_name(name: str) -> tuple[str, str] | None:
    """`dataset/file` -> (dataset, file); None for names outside that layout or refused by `file_name_problem`."""
    dataset, sep, file = name.partition("/")
    if not sep or not _NAME.fullmatch(dataset) or file_name_problem(dataset, file):
        return None
    return dataset, file


class FeatureStats(BaseModel, frozen=True):
    """Per-feature count, mean and M2 (sum of squared deviations from the mean) of a set
    of rows, plus its label counts.

    Mean and M2 rather than raw sums and sums of squares: sumsq/count - mean**2 cancels
    catastrophically when a feature's mean is large next to its spread (a constant column
    at 98765.4321 came out with std 0.002, 1e8 + N(0, 1) with std 2). Files compute their
    own mean and M2 in two passes; `merge` combines them with Chan et al.'s parallel
    formula, which never subtracts two large, nearly equal quantities.

    A file always has at least one row (empty files are rejected), so count >= 1 and
    `merge` never divides by zero.
    """

    count: int = Field(ge=1)
    mean: list[FiniteFloat]
    m2: list[Annotated[FiniteFloat, Field(ge=0.0)]]
    label_counts: list[Annotated[int, Field(ge=0)]]

    @model_validator(mode="after")
    def _one_entry_per_feature(self) -> FeatureStats:
        if len(self.mean) != len(self.m2):
            raise ValueError(f"mean has {len(self.mean)} features but m2 has {len(self.m2)}")
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets of rows (Chan, Golub & LeVeque's pairwise update).

        The operands are put in a canonical order first (larger count first), so
        a.merge(b) == b.merge(a) exactly, not just to rounding; merging many parts in a
        different grouping agrees to rounding.
        """
        if len(self.mean) != len(other.mean) or len(self.label_counts) != len(other.label_counts):
            raise ValueError("cannot merge statistics of different schemas")
        a, b = sorted((self, other), key=lambda s: (-s.count, s.mean, s.m2, s.label_counts))
        n = a.count + b.count
        mean, m2 = [], []
        for mean_a, m2_a, mean_b, m2_b in zip(a.mean, a.m2, b.mean, b.m2):
            delta = mean_b - mean_a
            mean.append(mean_a + delta * (b.count / n))
            m2.append(m2_a + m2_b + delta * delta * (a.count * b.count / n))
        return FeatureStats(
            count=n,
            mean=mean,
            m2=m2,
            label_counts=[x + y for x, y in zip(a.label_counts, b.label_counts)],
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-feature mean and population standard deviation (1.0 where a feature is constant).

        A feature counts as constant when var <= 1e-12 * max(1, 1e-12 * mean**2), i.e.
        std <= max(1e-6, 1e-12 * |mean|):
        - the absolute floor (std 1e-6) keeps near-zero-mean features that barely vary
          from being blown up by standardization, as before;
        - the relative part covers large constants: the two-pass mean and the merge are
          exact only to a few float64 ulps of the mean (~1e-16 * |mean| times log2 of the
          row count), so a truly constant column can show a spurious std of that size.
          1e-12 * |mean| is thousands of ulps above that noise yet far below any real
          spread (1e8 + N(0, 1) keeps its std of ~1).
        Standardizing by 1.0 then only centres a constant feature.
        """
        std = []
        for m, m2 in zip(self.mean, self.m2):
            var = m2 / self.count
            std.append(1.0 if var <= 1e-12 * max(1.0, 1e-12 * m * m) else var**0.5)
        return list(self.mean), std
