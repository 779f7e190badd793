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


def test_old_command_module_names_still_import_the_library_functions():
    """`run_ches`, `edit_similarity`, `run_displacement`, `run_probe` moved from `preflens.commands` to
    `preflens.diagnostics`; the old imports keep working, and building these commands imports no torch."""
    import subprocess

    from preflens.commands import ches as ches_cmd
    from preflens.commands import displacement as displacement_cmd
    from preflens.commands.ches import edit_similarity, run_ches  # noqa: F401
    from preflens.commands.displacement import run_displacement  # noqa: F401
    from preflens.commands.probe import run_probe  # noqa: F401
    from preflens.diagnostics import ches_scan
    from preflens.diagnostics import displacement as displacement_lib

    assert edit_similarity is ches_scan.edit_similarity
    assert ches_cmd.top_indices is ches_scan.top_indices
    assert displacement_cmd.single_token_id is displacement_lib.single_token_id
    # the command repeats the library's defaults so that --help needs no torch: they must agree
    assert (displacement_cmd.DEFAULT_LR, displacement_cmd.DEFAULT_STEPS) == (
        displacement_lib.DEFAULT_LR,
        displacement_lib.DEFAULT_STEPS,
    )
    mine = ("ches", "compare", "demo", "displacement", "make_data", "probe", "report")
    code = "import sys\n" + "".join(f"import preflens.commands.{m}\n" for m in mine)
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
