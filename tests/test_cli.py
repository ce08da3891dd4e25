"""CLI conventions: --version, global -v/-q anywhere, defaults in --help, a closed pipe,
exit codes (0 ok, 1 data error, 2 usage error, a bug shows its traceback), and a
light ``import polymap``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import polymap
from polymap import cli
from polymap.cli import main

POLYMAP = [sys.executable, "-m", "polymap"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"polymap {polymap.__version__}"


def test_global_flags_before_or_after_the_verb(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_describe", lambda args: seen.append((args.verbose, args.quiet)) or 0)
    parser = cli.build_parser()
    for argv, expected in (
        (["-v", "describe", "m"], (True, False)),
        (["describe", "m", "-v"], (True, False)),
        (["describe", "-q", "m"], (False, True)),
        (["-q", "describe", "m", "--verbose"], (True, True)),
        (["describe", "m"], (False, False)),
    ):
        args = parser.parse_args(argv)
        assert (args.verbose, args.quiet) == expected, argv


def test_defaults_shown_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "(default: 5)" in text and "(default: diag)" in text  # --restarts, --covariance
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "(default: 0.05)" in capsys.readouterr().out  # --alpha


def test_every_flag_has_help():
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse internals
    missing = []
    for name, verb in verbs.items():
        for action in verb._actions:
            if not action.help and action.dest not in ("help", "evals_command"):
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing


def test_closed_pipe_is_quiet():
    done = subprocess.run(
        " ".join(POLYMAP) + " features | head -1", shell=True, capture_output=True, text=True
    )
    assert done.stdout.strip() and "Traceback" not in done.stderr and "Broken" not in done.stderr


def test_exit_codes_data_usage_bug(tmp_path, capsys, monkeypatch):
    # usage: a bad flag (argparse) or a bad flag value found later
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "x.parquet", "--out", str(tmp_path / "m"), "--restarts", "zero"])
    assert exit_info.value.code == 2
    assert main(["backtest", "x.parquet", "--labels", "l.csv", "--horizons", "abc",
                 "--out", str(tmp_path / "b")]) == 2  # fmt: skip
    # data: a missing or unusable input
    assert main(["describe", str(tmp_path / "nothing")]) == 1
    assert "no model.json" in capsys.readouterr().err

    # a bug: not a PolymapError, so it is not dressed up as a usage error
    def broken(args):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(cli, "_describe", broken)
    with pytest.raises(ValueError, match="internal mistake"):
        main(["describe", str(tmp_path)])


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_describe", interrupted)
    assert main(["describe", "m"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_import_polymap_does_not_load_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, polymap, polymap.cli; "
         "print('torch' in sys.modules); polymap.read_table; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["False", "False"]


def test_help_and_describe_do_not_load_torch(tmp_path):
    code = (
        "import sys\nfrom polymap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
