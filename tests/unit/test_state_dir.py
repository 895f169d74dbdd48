"""A new start of the local cloud empties its state dir, all but JAX's compilation cache."""

from __future__ import annotations

import pytest

from emulators.launcher import KEPT_CACHE, compilation_cache
from emulators.stack import clear_state_dir

pytestmark = pytest.mark.unit


def test_a_new_start_keeps_only_the_compilation_cache(tmp_path):
    cache = tmp_path / KEPT_CACHE / "jax"
    cache.mkdir(parents=True)
    (cache / "entry").write_bytes(b"compiled")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "router.log").write_text("old run")
    (tmp_path / "stack.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "logs")

    clear_state_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [KEPT_CACHE]
    assert (cache / "entry").read_bytes() == b"compiled"
    assert compilation_cache(tmp_path)["jax_compilation_cache_dir"] == str(cache)


def test_a_missing_state_dir_is_created(tmp_path):
    clear_state_dir(tmp_path / "new")
    assert (tmp_path / "new").is_dir()
