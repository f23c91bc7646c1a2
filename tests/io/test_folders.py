"""`pmakit.io.folders`: permissions under the user's umask, and temporaries of dead writers swept."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pmakit.io.folders import atomic_directory, remove_stale_temporaries


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes and writer locks")

# A writer that starts building `<parent>/<name>` and then waits to be killed (or to finish).
WRITER = """
import sys, time
from pathlib import Path
from pmakit.io.folders import atomic_directory
with atomic_directory(Path(sys.argv[1]) / sys.argv[2], overwrite=True) as tmp:
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def start_writer(parent: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """A real child process inside `atomic_directory`; returns it and its temporary folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(parent), name], stdout=subprocess.PIPE, env=env, text=True
    )
    tmp = Path(child.stdout.readline().strip())
    assert tmp.is_dir() and tmp.name.startswith(f"_{name}.") and tmp.name.endswith(".tmp")
    return child, tmp


def kill_9(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    time.sleep(0.6)  # older than the sweep's grace period for a writer that has not locked yet


def test_killed_writers_temporary_is_swept_and_nothing_else(tmp_path):
    dead, dead_tmp = start_writer(tmp_path, "pma-8")
    kill_9(dead)
    live, live_tmp = start_writer(tmp_path, "pma-16")
    try:
        unrelated = [tmp_path / "_notes", tmp_path / "_cache.abcdefgh", tmp_path / "_data.abcdefgh.tmp"]
        for folder in unrelated:
            folder.mkdir()
        (tmp_path / "_pma-9.abcdefgh.tmp").write_text("a file, not a writer's folder")
        os.utime(tmp_path / "_data.abcdefgh.tmp", (time.time() - 60, time.time() - 60))
        assert dead_tmp.is_dir()
        removed = remove_stale_temporaries(tmp_path, lambda name: name.startswith("pma"))
        assert removed == [dead_tmp] and not dead_tmp.exists()
        assert live_tmp.is_dir(), "a temporary that a live writer holds must survive"
        assert all(folder.is_dir() for folder in unrelated) and (tmp_path / "_pma-9.abcdefgh.tmp").is_file()
    finally:
        live.kill()
        live.wait(timeout=30)


def test_next_write_of_the_same_folder_sweeps_its_dead_temporaries(tmp_path):
    dead, dead_tmp = start_writer(tmp_path, "merged")
    kill_9(dead)
    with atomic_directory(tmp_path / "merged") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead_tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_output_folder_has_the_mode_makedirs_gives(tmp_path, umask):
    reference = tmp_path / "like_save_pretrained"
    os.makedirs(reference)  # what `save_pretrained` does for its folder
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "out") == mode(reference) == 0o777 & ~umask
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:  # a replaced folder too
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "out") == 0o777 & ~umask


def test_merge_output_has_the_mode_makedirs_gives(tmp_path, umask):
    from pmakit.merging.merger import merge
    from tests.helpers.folders import save_models

    inputs = save_models(tmp_path / "in", 2)
    merge([str(p) for p in inputs], tmp_path / "merged")
    assert mode(tmp_path / "merged") == 0o777 & ~umask
