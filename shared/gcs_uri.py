"""`gs://bucket/object` URIs, as the manifests, jobs and federation documents record them."""

from __future__ import annotations

from google.cloud import storage


def split(uri: str) -> tuple[str, str]:
    """(bucket, object name) of `gs://bucket/name`; a URI without a name gives an empty one."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


def read(gcs: storage.Client, uri: str, generation: int | None = None) -> bytes:
    """The object's bytes; with `generation`, exactly that version (kept by a versioned bucket if replaced since)."""
    bucket, name = split(uri)
    return gcs.bucket(bucket).blob(name, generation=generation).download_as_bytes()
