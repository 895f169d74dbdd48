"""Envelope encryption: what opens, what does not, and key rotation."""

from __future__ import annotations

import pytest

from shared.envelope import Envelope, EnvelopeError, LocalKeyStore, Purpose, cloud_kms_kek, local_key_id


@pytest.fixture
def keys(tmp_path) -> LocalKeyStore:
    return LocalKeyStore(tmp_path)


def test_a_sealed_object_opens_under_its_own_name_purpose_and_key(keys):
    us = Envelope(keys.kek("us"))
    sealed = us.seal(b"rows of us", "us-processed", "ds/f/shard-00000.parquet", Purpose.SHARD)

    assert b"rows of us" not in sealed
    assert us.open(sealed, "us-processed", "ds/f/shard-00000.parquet", Purpose.SHARD) == b"rows of us"


@pytest.mark.parametrize(("bucket", "name", "purpose"), [
    ("us-processed", "ds/f/shard-00001.parquet", Purpose.SHARD),  # copied under another name
    ("eu-processed", "ds/f/shard-00000.parquet", Purpose.SHARD),  # into another bucket
    ("us-processed", "ds/f/shard-00000.parquet", Purpose.UPDATE),  # offered as another kind of object
])
def test_a_sealed_object_does_not_open_anywhere_else(keys, bucket, name, purpose):
    us = Envelope(keys.kek("us"))
    sealed = us.seal(b"rows of us", "us-processed", "ds/f/shard-00000.parquet", Purpose.SHARD)

    with pytest.raises(EnvelopeError, match="does not open"):
        us.open(sealed, bucket, name, purpose)


def test_another_nodes_key_does_not_open_it_and_says_so_without_its_contents(keys):
    sealed = Envelope(keys.kek("us")).seal(b"rows of us", "b", "o", Purpose.SHARD)

    with pytest.raises(EnvelopeError) as refused:
        Envelope(keys.kek("eu")).open(sealed, "b", "o", Purpose.SHARD)
    assert "rows of us" not in str(refused.value) and "gs://b/o" in str(refused.value)


def test_altered_or_plain_bytes_are_refused(keys):
    us = Envelope(keys.kek("us"))
    sealed = bytearray(us.seal(b"rows", "b", "o", Purpose.SHARD))
    sealed[-1] ^= 1

    with pytest.raises(EnvelopeError, match="does not open"):
        us.open(bytes(sealed), "b", "o", Purpose.SHARD)
    with pytest.raises(EnvelopeError, match="is not a sealed processed-shard"):
        us.open(b"PAR1 plain parquet", "b", "o", Purpose.SHARD)


def test_after_a_rotation_old_objects_still_open_and_new_ones_use_the_new_key(keys, tmp_path):
    first = keys.primary_key_id("us")
    old = Envelope(keys.kek("us")).seal(b"before", "b", "old", Purpose.SHARD)
    before_rotation = LocalKeyStore(tmp_path / "copy")
    before_rotation.ensure("us").write_text(keys.path("us").read_text())

    second = keys.rotate("us")
    rotated = Envelope(keys.kek("us"))
    new = rotated.seal(b"after", "b", "new", Purpose.SHARD)

    assert second != first and keys.primary_key_id("us") == second
    assert (local_key_id(old), local_key_id(new)) == (first, second)
    assert rotated.open(old, "b", "old", Purpose.SHARD) == b"before"
    with pytest.raises(EnvelopeError):  # a reader holding only the old key cannot open what the new one sealed
        Envelope(before_rotation.kek("us")).open(new, "b", "new", Purpose.SHARD)


def test_a_cloud_kms_key_is_named_by_its_tink_uri():
    with pytest.raises(ValueError, match="gcp-kms://"):
        cloud_kms_kek("projects/p/locations/l/keyRings/r/cryptoKeys/k")
