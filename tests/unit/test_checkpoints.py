"""Checkpoints: exact round trip, sealed at rest, what is skipped on resume, and how often they are written."""

from __future__ import annotations

import logging
from dataclasses import replace

import jax
import numpy as np
import pytest
from google.api_core import exceptions as gcs_errors

from shared.envelope import MAGIC, Envelope, LocalKeyStore, Purpose
from workers.trainer import checkpoints
from workers.trainer.checkpoints import Checkpointer, CheckpointMismatch, CheckpointPolicy, CheckpointStore
from workers.trainer.training import TrainConfig, Trainer

pytestmark = pytest.mark.unit

CONFIG = TrainConfig(model="mlp", hidden=(8,), epochs=4, batch_size=16, learning_rate=1e-2, seed=1)


class FakeBlob:
    def __init__(self, bucket: FakeBucket, name: str) -> None:
        self.bucket, self.name = bucket, name

    def upload_from_string(self, data: bytes, content_type: str | None = None) -> None:
        if self.bucket.fail_uploads:
            raise gcs_errors.ServiceUnavailable("storage is down")
        self.bucket.objects[self.name] = bytes(data)

    @property
    def size(self) -> int:
        return len(self.bucket.objects[self.name])

    generation = 1

    def download_as_bytes(self, if_generation_match: int | None = None) -> bytes:
        if self.name not in self.bucket.objects:
            raise gcs_errors.NotFound(self.name)
        return self.bucket.objects[self.name]

    def delete(self) -> None:
        if self.bucket.objects.pop(self.name, None) is None:
            raise gcs_errors.NotFound(self.name)


class FakeBucket:
    """The few calls of google.cloud.storage.Bucket the store makes, in memory."""

    def __init__(self, name: str = "fedpipe-us-processed") -> None:
        self.name, self.objects, self.fail_uploads = name, {}, False

    def blob(self, name: str) -> FakeBlob:
        return FakeBlob(self, name)

    def get_blob(self, name: str) -> FakeBlob | None:
        return FakeBlob(self, name) if name in self.objects else None

    def list_blobs(self, prefix: str) -> list[FakeBlob]:
        return [FakeBlob(self, n) for n in sorted(self.objects) if n.startswith(prefix)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 6)).astype(np.float32)  # ragged batches of 16
    return x, (x[:, 0] > 0).astype(np.int32)


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer(CONFIG, 6, 2)


@pytest.fixture
def keys(tmp_path) -> LocalKeyStore:
    return LocalKeyStore(tmp_path / "keys")


@pytest.fixture
def store(keys) -> CheckpointStore:
    return CheckpointStore(FakeBucket(), Envelope(keys.kek("us")), "job-1")


def _fingerprint(trainer: Trainer, job: str = "job-1") -> str:
    return checkpoints.job_fingerprint(job, trainer, 101)


def _same(a, b) -> bool:
    """Same tree, same values bit for bit, same dtypes."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) and np.asarray(x).dtype == np.asarray(y).dtype for x, y in pairs)


def test_a_checkpoint_round_trips_exactly_and_is_sealed_at_rest(trainer, data, store) -> None:
    state = trainer.train(trainer.start(trainer.init_params()), *data, epochs=2)
    fp = _fingerprint(trainer)
    store.write(state.step, checkpoints.encode(state, fp))

    assert store.steps() == [state.step] == [2 * 7]  # 101 rows in batches of 16: 7 steps an epoch
    sealed = store.bucket.objects[f"checkpoints/job-1/{state.step}"]
    assert sealed.startswith(MAGIC) and b"params/" not in sealed and b"fingerprint" not in sealed
    back = checkpoints.decode(checkpoints.latest(store, trainer.start(trainer.init_params()), fp), state, fp)
    assert (back.epoch, back.step, back.history) == (2, 14, state.history)
    assert _same(back.params, state.params) and _same(back.opt_state, state.opt_state)
    assert np.asarray(jax.tree_util.tree_leaves(back.opt_state)[0]).dtype == np.int32  # Adam's step count is not cast to float


def test_training_resumed_from_a_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_does(trainer, data) -> None:
    start = trainer.start(trainer.init_params())
    straight = trainer.train(start, *data)
    fp = _fingerprint(trainer)
    half = trainer.train(start, *data, epochs=2)
    resumed = trainer.train(checkpoints.decode(checkpoints.encode(half, fp), start, fp), *data)
    assert _same(resumed.params, straight.params) and _same(resumed.opt_state, straight.opt_state)
    assert (resumed.epoch, resumed.step, resumed.history) == (straight.epoch, straight.step, straight.history)


def test_foreign_corrupt_and_misshapen_checkpoints_are_skipped_with_a_warning_that_quotes_none_of_them(
    trainer, data, store, keys, caplog
) -> None:
    fp = _fingerprint(trainer)
    good = trainer.train(trainer.start(trainer.init_params()), *data, epochs=1)
    store.write(7, checkpoints.encode(good, fp))
    bucket = store.bucket
    # Step 8: another model's tensors under this job's fingerprint (shapes checked on load).
    other = Trainer(TrainConfig(model="mlp", hidden=(5,), epochs=4, batch_size=16), 6, 2)
    store.write(8, checkpoints.encode(other.start(other.init_params()), fp))
    # Step 9: this model, but another job's (its fingerprint differs).
    store.write(9, checkpoints.encode(good, _fingerprint(trainer, "job-2")))
    # Step 10: sealed, then altered at rest.
    store.write(10, checkpoints.encode(good, fp))
    sealed = bytearray(bucket.objects["checkpoints/job-1/10"])
    sealed[-5] ^= 0xFF
    bucket.objects["checkpoints/job-1/10"] = bytes(sealed)
    # Step 11: a valid checkpoint of node eu's, sealed under eu's key for this very name.
    eu = Envelope(keys.kek("eu"))
    bucket.objects["checkpoints/job-1/11"] = eu.seal(checkpoints.encode(good, fp), bucket.name, "checkpoints/job-1/11", Purpose.CHECKPOINT)
    # Step 12: a valid checkpoint of this node's, copied from another job's path.
    bucket.objects["checkpoints/job-1/12"] = store.envelope.seal(checkpoints.encode(good, fp), bucket.name, "checkpoints/job-2/12",
                                                                 Purpose.CHECKPOINT)
    # Step 13: plain bytes, never sealed.
    secret = b"patient 4711, glucose 9.3"
    bucket.objects["checkpoints/job-1/13"] = secret
    bucket.objects["checkpoints/job-1/notes.txt"] = b"not a step"

    with caplog.at_level(logging.WARNING, logger="fedpipe.worker.checkpoints"):
        found = checkpoints.latest(store, trainer.start(trainer.init_params()), fp)

    assert checkpoints.decode(found, good, fp).step == 7
    skipped = [r.getMessage() for r in caplog.records]
    assert [m.split()[1] for m in skipped] == [f"checkpoints/job-1/{s}" for s in (13, 12, 11, 10, 9, 8)]
    assert "does not open" in skipped[0] and "another job" in skipped[4] and "not this model's" in skipped[5]
    assert "patient" not in caplog.text and "glucose" not in caplog.text


def test_no_checkpoint_or_garbage_is_none_or_a_mismatch(trainer, store) -> None:
    fp = _fingerprint(trainer)
    assert checkpoints.latest(store, trainer.start(trainer.init_params()), fp) is None
    for garbage in (b"", b"\x00" * 8, b"\xff" * 64):
        with pytest.raises(CheckpointMismatch):
            checkpoints.decode(garbage, trainer.start(trainer.init_params()), fp)


def test_the_fingerprint_names_job_model_and_data() -> None:
    base = Trainer(CONFIG, 6, 2)
    prints = {
        checkpoints.job_fingerprint("job-1", base, 101),
        checkpoints.job_fingerprint("job-2", base, 101),
        checkpoints.job_fingerprint("job-1", base, 100),
        checkpoints.job_fingerprint("job-1", Trainer(TrainConfig(**{**CONFIG.__dict__, "seed": 2}), 6, 2), 101),
    }
    assert len(prints) == 4


def test_checkpointer_keeps_the_newest_and_bounds_how_often_it_writes(trainer, data, store) -> None:
    clock = Clock()
    saver = Checkpointer(store, epochs=4, fingerprint=_fingerprint(trainer), policy=CheckpointPolicy(min_interval_s=10, keep=2), clock=clock)
    state = trainer.start(trainer.init_params())
    for epoch in range(1, 4):
        state = trainer.train(state, *data, epochs=epoch)
        clock.now += 4  # each epoch takes 4 s: a checkpoint every third epoch at most
        saver(state)
    assert saver.written == [21]  # at 12 s (epoch 3); not at 4 s or 8 s

    for step in (28, 35, 42):
        clock.now += 10
        saver(replace(state, epoch=3, step=step))
    assert store.steps() == [42, 35]  # keep=2: the older ones are deleted
    clock.now += 100
    saver(replace(state, epoch=4, step=49))
    assert 49 not in saver.written  # after the last epoch the model itself is written, not a checkpoint


def test_slow_writes_space_checkpoints_out_by_the_overhead_bound(trainer, store) -> None:
    clock = Clock()
    state = trainer.start(trainer.init_params())
    real_write = store.write

    def slow_write(step: int, payload: bytes) -> None:
        clock.now += 3  # a checkpoint takes 3 s to write
        real_write(step, payload)

    store.write = slow_write
    saver = Checkpointer(store, epochs=100, fingerprint="f", policy=CheckpointPolicy(min_interval_s=0, max_overhead=0.1), clock=clock)
    for t in range(1, 80):
        clock.now = max(clock.now, float(t))
        saver(replace(state, epoch=1, step=t))
    # 3 s writes at <= 10% overhead: at least 30 s between them.
    assert np.all(np.diff(saver.written) >= 30) and len(saver.written) == 3


def test_a_failed_write_is_a_warning_and_training_goes_on(trainer, store, caplog) -> None:
    store.bucket.fail_uploads = True
    saver = Checkpointer(store, epochs=4, fingerprint="f", policy=CheckpointPolicy(min_interval_s=0), clock=Clock())
    state = trainer.start(trainer.init_params())
    with caplog.at_level(logging.WARNING, logger="fedpipe.worker.checkpoints"):
        saver(replace(state, epoch=1, step=7))
    assert saver.written == [] and "not written: ServiceUnavailable" in caplog.text


@pytest.mark.parametrize("bad", [{"keep": 0}, {"keep": 21}, {"min_interval_s": -1}, {"min_interval_s": 4000}, {"max_overhead": 0}])
def test_policy_numbers_are_bounded(bad: dict) -> None:
    with pytest.raises(ValueError, match="keep"):
        CheckpointPolicy(**bad)


def test_a_checkpoint_bigger_than_this_model_can_write_is_skipped_before_it_is_downloaded(trainer, store, caplog) -> None:
    fp = _fingerprint(trainer)
    template = trainer.start(trainer.init_params())
    store.bucket.objects["checkpoints/job-1/5"] = b"\0" * (checkpoints.max_checkpoint_bytes(template) + 1)
    with caplog.at_level(logging.WARNING, logger="fedpipe.worker.checkpoints"):
        assert checkpoints.latest(store, template, fp) is None
    assert "larger than this model's checkpoint can be" in caplog.text
