import threading
import time

import pytest

from emulators.code_watch import CodeWatcher

pytestmark = pytest.mark.unit


def test_a_changed_source_file_triggers_one_restart(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "handler.py"
    source.write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("ignored")
    changes: list[list] = []
    seen = threading.Event()
    watcher = CodeWatcher([tmp_path], lambda paths: (changes.append(paths), seen.set()), interval_s=0.05)
    watcher.start()
    try:
        time.sleep(0.2)
        assert changes == []  # nothing changed yet
        (tmp_path / "notes.txt").write_text("still ignored")
        source.write_text("x = 2\n")
        import os

        os.utime(source, (time.time() + 5, time.time() + 5))  # a distinct mtime even on coarse clocks
        assert seen.wait(5)
    finally:
        watcher.stop()
    assert changes == [[source]]
