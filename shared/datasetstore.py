"""A node's data sets, typed, and the store that owns their Firestore paths.

    datasets/{node}~{dataset}                          Dataset (declaration, status, current version)
    datasets/{node}~{dataset}/versions/{version}       DatasetVersion (exactly what a job trains on)
    datasets/{node}~{dataset}/manifest/{file_key}      FileEntry (one file's shards, written by shard-ready)
    datasets/{node}~{dataset}/files/{file_key}         FileRecord (ingest's claim on one upload)

A data set's status and a file record's status change only along their transition
tables. The store is a small Protocol with a Firestore implementation and an in-memory
one beside it, so ingest's claims and races are tested in milliseconds and the emulator
tests check the real thing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from google.api_core.exceptions import FailedPrecondition
from google.cloud import firestore
from pydantic import BaseModel, Field

from shared.config import Settings
from shared.datasets import DatasetSpec, FeatureStats, file_key
from shared.jobs import DatasetRef


class DatasetStatus(StrEnum):
    COLLECTING = "collecting"  # a declaration is stored; its files are not all in under it
    COMPLETE = "complete"  # every expected file is in, as `version`


class FileStatus(StrEnum):
    AWAITING_DECLARATION = "awaiting_declaration"  # the file came before its data set's declaration
    PROCESSING = "processing"  # a delivery claimed the upload and is sharding it
    PUBLISHING = "publishing"  # shards written; the shard-ready message's digest is recorded before it is sent
    PROCESSED = "processed"
    QUARANTINED = "quarantined"


D, FS = DatasetStatus, FileStatus
# (None, X): the document is created in status X.
DATASET_TRANSITIONS: frozenset[tuple[DatasetStatus | None, DatasetStatus]] = frozenset({
    (None, D.COLLECTING),  # declared
    (D.COLLECTING, D.COLLECTING),  # declared again before its files were all in
    (D.COLLECTING, D.COMPLETE),  # the last expected file came in
    (D.COMPLETE, D.COMPLETE),  # a file was uploaded again: a new version
    (D.COMPLETE, D.COLLECTING),  # declared again: every file is processed again under the new declaration
})
FILE_TRANSITIONS: frozenset[tuple[FileStatus | None, FileStatus]] = frozenset({
    (None, FS.AWAITING_DECLARATION), (None, FS.PROCESSING),
    (FS.AWAITING_DECLARATION, FS.AWAITING_DECLARATION), (FS.AWAITING_DECLARATION, FS.PROCESSING),
    # A claim is taken back by its own retry, taken over after its lease, or replaced by a newer upload or declaration.
    (FS.PROCESSING, FS.PROCESSING), (FS.PROCESSING, FS.PUBLISHING), (FS.PROCESSING, FS.QUARANTINED),
    (FS.PUBLISHING, FS.PROCESSING), (FS.PUBLISHING, FS.PROCESSED),
    (FS.PROCESSED, FS.PROCESSING), (FS.QUARANTINED, FS.PROCESSING),  # a newer upload or declaration
})
FILE_DONE = frozenset({FS.PROCESSED, FS.QUARANTINED})


class InvalidTransition(ValueError):
    def __init__(self, what: str, current: StrEnum | None, target: StrEnum) -> None:
        super().__init__(f"{what}: cannot go from {current or 'nothing'} to {target}")
        self.current, self.target = current, target


def check_dataset_transition(current: DatasetStatus | None, target: DatasetStatus) -> None:
    if (current, target) not in DATASET_TRANSITIONS:
        raise InvalidTransition("data set", current, target)


def check_file_transition(current: FileStatus | None, target: FileStatus) -> None:
    if (current, target) not in FILE_TRANSITIONS:
        raise InvalidTransition("file record", current, target)


class FileEntry(BaseModel, frozen=True):
    """One file of a data set as shard-ready recorded it; a version holds one per expected file."""

    file: str
    generation: int = Field(ge=1)
    spec_generation: int = Field(default=0, ge=0)
    rows: int = Field(ge=1)
    shards: list[str] = Field(min_length=1)
    stats: FeatureStats
    source: str


class DatasetVersion(BaseModel, frozen=True):
    """Exactly the content a job pinned to this version trains on, whatever is uploaded later."""

    spec: DatasetSpec
    files: dict[str, FileEntry]
    stats: FeatureStats
    rows: int = Field(ge=1)
    completed_at: datetime

    def shard_uris(self) -> dict[str, list[str]]:
        """Each expected file's shards, in the declaration's order."""
        return {name: self.files[name].shards for name in self.spec.expected_files}


class Dataset(BaseModel, frozen=True):
    """A node's data set: its declaration and, once complete, its current version's summary.

    A re-declared data set keeps its last version's summary while it collects again.
    """

    node: str
    dataset: str
    status: DatasetStatus
    spec: DatasetSpec
    spec_generation: int = Field(default=0, ge=0)
    created_at: datetime
    updated_at: datetime
    version: str | None = None
    files: dict[str, FileEntry] = {}
    stats: FeatureStats | None = None
    rows: int | None = None
    completed_at: datetime | None = None
    job_id: str | None = None

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(node=self.node, dataset=self.dataset, version=self.version)

    def to_doc(self) -> dict:
        return self.model_dump(mode="python", exclude_none=True) | {"spec": self.spec.model_dump(mode="json")}


class FileRecord(BaseModel, frozen=True):
    """Ingest's record of one file: which upload it handled, under which declaration, and how far."""

    name: str
    generation: int = Field(ge=0)
    spec_generation: int | None = None  # None while the file awaits its declaration
    status: FileStatus
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    updated_at: datetime
    rows: int | None = None
    shards: int | None = None
    manifest_sha256: str | None = None  # the shard-ready message ingest published (shared.manifest.shard_ready_problem)
    reason: str | None = None  # why it was quarantined: a code and a detail, never a cell

    def moved(self, target: FileStatus, now: datetime, **changes: Any) -> FileRecord:
        """This record in status `target`; raises InvalidTransition if the table forbids it."""
        check_file_transition(self.status, target)
        return self.model_copy(update={"status": target, "updated_at": now, **changes})

    def to_doc(self) -> dict:
        return self.model_dump(mode="python", exclude_none=True)


def declared(current: Dataset | None, node: str, dataset: str, spec: DatasetSpec, spec_generation: int, now: datetime) -> Dataset | None:
    """Pure: the data set after declaration `spec_generation` arrives; None when it changes nothing
    (the same declaration again) or is older than the one held."""
    if current is not None and current.spec_generation >= spec_generation:
        return None
    check_dataset_transition(current.status if current else None, DatasetStatus.COLLECTING)
    if current is None:
        return Dataset(node=node, dataset=dataset, status=DatasetStatus.COLLECTING, spec=spec, spec_generation=spec_generation,
                       created_at=now, updated_at=now)
    return current.model_copy(update={"status": DatasetStatus.COLLECTING, "spec": spec, "spec_generation": spec_generation, "updated_at": now})


class Stored(BaseModel, frozen=True):
    """A data set as read, with the token a conditional write checks it against."""

    dataset: Dataset
    token: Any


class DatasetStore(Protocol):
    """A node's data set documents. Implementations MUST run `update_dataset` and `update_file`
    as transactions (the change sees the document as written), MUST write an entry in
    `put_entry` only over an older one, and MUST refuse `replace_if_unchanged` when the data
    set changed since `stored` read it: ingest's once-only claims and versions rest on these."""

    def dataset(self, node: str, dataset: str) -> Dataset | None: ...
    def stored(self, node: str, dataset: str) -> Stored | None: ...
    def version(self, node: str, dataset: str, version: str) -> DatasetVersion | None: ...
    def pinned(self, ref: DatasetRef) -> DatasetVersion | None: ...
    def file_record(self, node: str, dataset: str, file_name: str) -> FileRecord | None: ...
    def update_dataset(self, node: str, dataset: str, change: Callable[[Dataset | None], Dataset | None]) -> Dataset | None: ...
    def update_file(
        self, node: str, dataset: str, file_name: str, change: Callable[[FileRecord | None, Dataset | None], FileRecord | None],
    ) -> FileRecord | None: ...
    def put_entry(self, node: str, dataset: str, entry: FileEntry) -> bool: ...
    def entries(self, node: str, dataset: str) -> list[FileEntry]: ...
    def put_version(self, node: str, dataset: str, version: str, content: DatasetVersion) -> None: ...
    def replace_if_unchanged(self, stored: Stored, new: Dataset) -> bool: ...


def _newer(entry: FileEntry, held: FileEntry | None) -> bool:
    return held is None or (held.generation, held.spec_generation) < (entry.generation, entry.spec_generation)


def pinned_version(store: DatasetStore, ref: DatasetRef) -> DatasetVersion | None:
    """The version `ref` pins, else the data set's current one if it is complete."""
    if ref.version:
        return store.version(ref.node, ref.dataset, ref.version)
    ds = store.dataset(ref.node, ref.dataset)
    if ds is None or ds.status is not DatasetStatus.COMPLETE or ds.version is None:
        return None
    return store.version(ref.node, ref.dataset, ds.version)


class FirestoreDatasetStore:
    def __init__(self, db: firestore.Client, settings: Settings) -> None:
        self.db = db
        self.collection = db.collection(settings.datasets_collection)

    # -- paths ----------------------------------------------------------------------

    def dataset_ref(self, node: str, dataset: str) -> firestore.DocumentReference:
        return self.collection.document(DatasetRef(node=node, dataset=dataset).id)

    def file_ref(self, node: str, dataset: str, file_name: str) -> firestore.DocumentReference:
        return self.dataset_ref(node, dataset).collection("files").document(file_key(file_name))

    def entry_ref(self, node: str, dataset: str, file_name: str) -> firestore.DocumentReference:
        return self.dataset_ref(node, dataset).collection("manifest").document(file_key(file_name))

    def version_ref(self, node: str, dataset: str, version: str) -> firestore.DocumentReference:
        return self.dataset_ref(node, dataset).collection("versions").document(version)

    # -- reads ----------------------------------------------------------------------

    def dataset(self, node: str, dataset: str) -> Dataset | None:
        stored = self.stored(node, dataset)
        return stored.dataset if stored else None

    def stored(self, node: str, dataset: str) -> Stored | None:
        snap = self.dataset_ref(node, dataset).get()
        return Stored(dataset=Dataset.model_validate(snap.to_dict()), token=snap.update_time) if snap.exists else None

    def version(self, node: str, dataset: str, version: str) -> DatasetVersion | None:
        snap = self.version_ref(node, dataset, version).get()
        return DatasetVersion.model_validate(snap.to_dict()) if snap.exists else None

    def pinned(self, ref: DatasetRef) -> DatasetVersion | None:
        return pinned_version(self, ref)

    def file_record(self, node: str, dataset: str, file_name: str) -> FileRecord | None:
        snap = self.file_ref(node, dataset, file_name).get()
        return FileRecord.model_validate(snap.to_dict()) if snap.exists else None

    def entries(self, node: str, dataset: str) -> list[FileEntry]:
        return [FileEntry.model_validate(s.to_dict()) for s in self.dataset_ref(node, dataset).collection("manifest").stream()]

    # -- writes ---------------------------------------------------------------------

    def update_dataset(self, node: str, dataset: str, change: Callable[[Dataset | None], Dataset | None]) -> Dataset | None:
        ref = self.dataset_ref(node, dataset)

        @firestore.transactional
        def run(transaction: firestore.Transaction) -> Dataset | None:
            snap = ref.get(transaction=transaction)
            new = change(Dataset.model_validate(snap.to_dict()) if snap.exists else None)
            if new is not None:
                transaction.set(ref, new.to_doc())
            return new

        return run(self.db.transaction())

    def update_file(
        self, node: str, dataset: str, file_name: str, change: Callable[[FileRecord | None, Dataset | None], FileRecord | None],
    ) -> FileRecord | None:
        record_ref, ds_ref = self.file_ref(node, dataset, file_name), self.dataset_ref(node, dataset)

        @firestore.transactional
        def run(transaction: firestore.Transaction) -> FileRecord | None:
            record, ds = record_ref.get(transaction=transaction), ds_ref.get(transaction=transaction)
            new = change(FileRecord.model_validate(record.to_dict()) if record.exists else None,
                         Dataset.model_validate(ds.to_dict()) if ds.exists else None)
            if new is not None:
                transaction.set(record_ref, new.to_doc())
            return new

        return run(self.db.transaction())

    def put_entry(self, node: str, dataset: str, entry: FileEntry) -> bool:
        ref = self.entry_ref(node, dataset, entry.file)

        @firestore.transactional
        def run(transaction: firestore.Transaction) -> bool:
            snap = ref.get(transaction=transaction)
            if not _newer(entry, FileEntry.model_validate(snap.to_dict()) if snap.exists else None):
                return False  # a duplicate, or older than what is held
            transaction.set(ref, entry.model_dump(mode="python"))
            return True

        return run(self.db.transaction())

    def put_version(self, node: str, dataset: str, version: str, content: DatasetVersion) -> None:
        self.version_ref(node, dataset, version).set(content.model_dump(mode="python") | {"spec": content.spec.model_dump(mode="json")})

    def replace_if_unchanged(self, stored: Stored, new: Dataset) -> bool:
        try:
            # update, not set: only update takes a precondition. Every top-level field is replaced.
            self.dataset_ref(new.node, new.dataset).update(new.to_doc(), option=self.db.write_option(last_update_time=stored.token))
        except FailedPrecondition:
            return False
        return True


class MemoryDatasetStore:
    """The same store in dicts, for tests. Documents pass through their Firestore form, so what a
    test reads back is what Firestore would hold; each data set write bumps its token."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._datasets: dict[tuple[str, str], tuple[dict, int]] = {}
        self._docs: dict[tuple[str, str, str, str], dict] = {}  # (node, dataset, kind, key)

    def dataset(self, node: str, dataset: str) -> Dataset | None:
        stored = self.stored(node, dataset)
        return stored.dataset if stored else None

    def stored(self, node: str, dataset: str) -> Stored | None:
        with self._lock:
            held = self._datasets.get((node, dataset))
            return Stored(dataset=Dataset.model_validate(held[0]), token=held[1]) if held else None

    def _set_dataset(self, ds: Dataset) -> None:
        token = self._datasets.get((ds.node, ds.dataset), ({}, 0))[1] + 1
        self._datasets[(ds.node, ds.dataset)] = (ds.to_doc(), token)

    def version(self, node: str, dataset: str, version: str) -> DatasetVersion | None:
        doc = self._docs.get((node, dataset, "versions", version))
        return DatasetVersion.model_validate(doc) if doc is not None else None

    def pinned(self, ref: DatasetRef) -> DatasetVersion | None:
        return pinned_version(self, ref)

    def file_record(self, node: str, dataset: str, file_name: str) -> FileRecord | None:
        doc = self._docs.get((node, dataset, "files", file_key(file_name)))
        return FileRecord.model_validate(doc) if doc is not None else None

    def entries(self, node: str, dataset: str) -> list[FileEntry]:
        with self._lock:
            return [FileEntry.model_validate(d) for (n, ds, kind, _), d in self._docs.items() if (n, ds, kind) == (node, dataset, "manifest")]

    def update_dataset(self, node: str, dataset: str, change: Callable[[Dataset | None], Dataset | None]) -> Dataset | None:
        with self._lock:
            new = change(self.dataset(node, dataset))
            if new is not None:
                self._set_dataset(new)
            return new

    def update_file(
        self, node: str, dataset: str, file_name: str, change: Callable[[FileRecord | None, Dataset | None], FileRecord | None],
    ) -> FileRecord | None:
        with self._lock:
            new = change(self.file_record(node, dataset, file_name), self.dataset(node, dataset))
            if new is not None:
                self._docs[(node, dataset, "files", file_key(file_name))] = new.to_doc()
            return new

    def put_entry(self, node: str, dataset: str, entry: FileEntry) -> bool:
        with self._lock:
            key = (node, dataset, "manifest", file_key(entry.file))
            if not _newer(entry, FileEntry.model_validate(self._docs[key]) if key in self._docs else None):
                return False
            self._docs[key] = entry.model_dump(mode="python")
            return True

    def put_version(self, node: str, dataset: str, version: str, content: DatasetVersion) -> None:
        with self._lock:
            self._docs[(node, dataset, "versions", version)] = content.model_dump(mode="python") | {"spec": content.spec.model_dump(mode="json")}

    def replace_if_unchanged(self, stored: Stored, new: Dataset) -> bool:
        with self._lock:
            held = self._datasets.get((new.node, new.dataset))
            if held is None or held[1] != stored.token:
                return False
            self._set_dataset(new)
            return True
