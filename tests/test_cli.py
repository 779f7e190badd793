"""The console script: user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from preflens.cli import COMMAND_MODULES, main


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["preflens", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out + out.err


def test_unknown_option_is_a_usage_error_without_traceback(monkeypatch, capsys):
    code, text = _run(monkeypatch, capsys, "train", "--no-such-flag")
    assert code == 2
    assert "No such option" in text and "Traceback" not in text


def test_missing_data_file_names_the_file(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    code, text = _run(
        monkeypatch, capsys, "train", "--data", str(missing), "--output-dir", str(tmp_path / "run")
    )
    assert code == 2
    assert str(missing) in text and "Traceback" not in text


def test_every_command_is_registered_and_has_help():
    out = subprocess.run(
        [sys.executable, "-m", "preflens.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in COMMAND_MODULES:
        assert name.replace("_", "-") in out, name
