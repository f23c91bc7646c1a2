"""`pmakit sweep` checks everything before its first merge, cleans scratch left by a killed run, and exits 130
on SIGINT with its scratch removed (real subprocesses, real signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from pmakit.cli import main
from pmakit.errors import InputError
from pmakit.io.folders import OutputBusyError, output_lock, scratch_directory
from pmakit.tools.sweep import sweep, text_loss_scorer


@pytest.fixture
def no_merge(monkeypatch):
    """Any merge fails the test: the checks must all come before the first one."""

    def merge(*args, **kwargs):
        raise AssertionError("a candidate was merged before the bad input was found")

    monkeypatch.setattr("pmakit.merging.merge", merge)


BAD_TEXTS = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"not UTF-8 text \(byte 0: b'\\x89'\)"),
    "latin-1": ("t1 t2 café".encode("latin-1"), r"not UTF-8 text \(byte 9"),
    "nul": (b"t1 t2\x00t3", r"holds NUL bytes \(offset 5\): it is binary"),
    "empty": (b" \n\t\n", r"is empty: nothing to score"),
    "one token": (b"t5", r"fewer than 2 tokens"),
}


@pytest.mark.parametrize("case", list(BAD_TEXTS))
def test_a_bad_held_out_text_exits_2_before_the_first_merge(run_dir, tmp_path, capsys, no_merge, case):
    data, expected = BAD_TEXTS[case]
    text = tmp_path / "held_out.txt"
    text.write_bytes(data)
    out = tmp_path / "out"
    code = main(["sweep", str(run_dir), "--rules", "sma", "--windows", "2", "--text", str(text), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{text}" in err and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(expected, err), err
    assert not out.exists()


def test_an_output_that_is_a_file_exits_2_before_the_first_merge(run_dir, held_out, tmp_path, capsys, no_merge):
    cases = [(tmp_path / "report.txt", "report.txt is not a folder"), (tmp_path / "report.txt" / "x", "is a file")]
    for out, named in cases:
        (tmp_path / "report.txt").write_text("keep me")
        argv = ["sweep", str(run_dir), "--rules", "sma", "--windows", "2", "--text", str(held_out), "-o", str(out)]
        assert main(argv) == 2
        assert named in capsys.readouterr().err
        assert (tmp_path / "report.txt").read_text() == "keep me"
    (tmp_path / "o" / "best").parent.mkdir()
    (tmp_path / "o" / "best").write_text("")
    with pytest.raises(InputError, match=r"best exists and is not a folder"):
        sweep(run_dir, ["sma"], [2], score=lambda f: 0.0, output_dir=tmp_path / "o")


def test_bad_settings_and_scorers_fail_before_the_first_merge(run_dir, held_out, tmp_path, no_merge):
    with pytest.raises(InputError, match=r"alpha"):
        sweep(run_dir, ["sma", "ema"], [2], score=lambda f: 0.0, alpha=1.5)
    with pytest.raises(InputError, match=r"Unknown merge setting\(s\) acumulate_dtype"):
        sweep(run_dir, ["sma"], [2], score=lambda f: 0.0, merge_options={"acumulate_dtype": "float64"})
    with pytest.raises(InputError, match=r"accumulate_dtype"):
        sweep(run_dir, ["sma"], [2], score=lambda f: 0.0, merge_options={"accumulate_dtype": "float16"})
    with pytest.raises(InputError, match=r"`score` must be a function"):
        sweep(run_dir, ["sma"], [2], score="loss")
    with pytest.raises(InputError, match=r"Cannot load a tokenizer from .*nowhere"):
        sweep(run_dir, ["sma"], [2], score=text_loss_scorer(held_out, tmp_path / "nowhere"))
    with pytest.raises(InputError, match=r"Unknown torch device 'gpu0'"):
        text_loss_scorer(held_out, device="gpu0")
    with pytest.raises(InputError, match=r"must be integers"):
        text_loss_scorer(held_out, batch_size=2.5)
    with output_lock(tmp_path / "busy"), pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        sweep(run_dir, ["sma"], [2], score=lambda f: 0.0, output_dir=tmp_path / "busy")


def _scratch(folder):
    return sorted(p.name for p in folder.iterdir() if "pmakit-sweep" in p.name)


def _start_sweep(run_dir, held_out, tmp_path, tmpdir):
    """A long CLI sweep in a child process, once its scratch folder exists in ``tmpdir``."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    argv = ["sweep", str(run_dir), "--rules", "sma", "wma", "ema", "--windows", "1", "2", "3", "4", "5", "6"]
    argv += ["--text", str(held_out), "--max-length", "32", "-o", str(tmp_path / "out")]
    child = subprocess.Popen(
        [sys.executable, "-m", "pmakit.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while not _scratch(tmpdir):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the sweep did not start"
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the candidate loop
    assert child.poll() is None, "the sweep ended before it could be stopped"
    return child


def test_sigint_exits_130_and_removes_the_scratch(run_dir, held_out, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    child = _start_sweep(run_dir, held_out, tmp_path, tmpdir)
    child.send_signal(signal.SIGINT)
    for _ in range(5):  # an impatient user: more Ctrl-C while the clean-up runs
        time.sleep(0.03)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, (child.returncode, err)
    assert "pmakit: interrupted" in err and "Traceback" not in err, err
    assert _scratch(tmpdir) == []
    assert not (tmp_path / "out" / "best").exists() and not list(tmp_path.glob(".out.lock"))


def test_scratch_of_a_killed_sweep_is_removed_by_the_next(run_dir, held_out, tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    child = _start_sweep(run_dir, held_out, tmp_path, tmpdir)
    child.kill()  # SIGKILL: no clean-up runs
    child.communicate(timeout=60)
    left = _scratch(tmpdir)
    assert len(left) == 1, left
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    with scratch_directory("pmakit-sweep") as live:  # a sweep still running in another process keeps its scratch
        time.sleep(0.6)  # older than the grace period: only the lock tells them apart
        sweep(run_dir, ["sma"], [1], score=lambda folder: 0.0)
        assert _scratch(tmpdir) == [live.name]
    assert _scratch(tmpdir) == []
