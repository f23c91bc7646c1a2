"""How `pmakit` ends on an error: a pmakit error exits 2, anything else exits 1; one line each, the
traceback only with ``--debug``."""

from __future__ import annotations

import pytest

from pmakit import cli
from pmakit.io.hub import HubDownloadError


def _fail_with(monkeypatch, error: Exception) -> None:
    def inspect(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_inspect", inspect)


def test_a_pmakit_error_that_is_not_input_exits_2_in_one_line(monkeypatch, capsys):
    _fail_with(
        monkeypatch, HubDownloadError("Cannot reach the Hub for\nowner/name.", repo_id="owner/name", revision=None)
    )
    assert cli.main(["inspect", "run"]) == 2
    err = capsys.readouterr().err
    assert err == "pmakit: error: Cannot reach the Hub for owner/name.\n"


def test_an_unexpected_error_exits_1_in_one_line_without_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, ZeroDivisionError("float division by zero\n" + "x" * 10_000))
    assert cli.main(["inspect", "run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and len(err) < 400
    assert err.startswith("pmakit: internal error: ZeroDivisionError: float division by zero x")
    assert "--debug" in err


@pytest.mark.parametrize("argv", [["--debug", "inspect", "run"], ["inspect", "run", "--debug"]])
def test_debug_prints_the_traceback(monkeypatch, capsys, argv):
    _fail_with(monkeypatch, ZeroDivisionError("float division by zero"))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "in inspect\n    raise error\n" in err
    assert err.endswith("pmakit: internal error: ZeroDivisionError: float division by zero\n")
