"""`gs://bucket/object` URIs, as the manifests, jobs and federation documents record them."""

from __future__ import annotations

from google.cloud import storage


def read(gcs: storage.Client, uri: str) -> bytes:
    bucket, name = uri.removeprefix("gs://").split("/", 1)
    return gcs.bucket(bucket).blob(name).download_as_bytes()
