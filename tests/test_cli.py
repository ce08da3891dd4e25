"""CLI conventions: --version, global -v/-q anywhere, defaults in --help, a closed pipe,
exit codes (0 ok, 1 data error, 2 usage error, a bug shows its traceback), and a
light ``import polymap``."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
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
    # conflicting or out-of-range flags: usage errors before any file is read
    for argv in (
        ["--horizon", "0.25", "--until-step", "50"],
        ["--alpha", "2"],
        ["--alpha", "0"],
        ["--horizon", "1.5"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "missing.parquet", "--out", str(tmp_path / "s.csv"), *argv])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "must be in (0, 1)" in err
    assert not (tmp_path / "s.csv").exists()
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


# -- API round trips --------------------------------------------------------------------------
@pytest.mark.slow
def test_phase_model_save_is_a_complete_model_dir(tmp_path, capsys):
    from test_scoring import runs_table

    from polymap.phases import PhaseModel
    from polymap.scoring import score_runs

    table = runs_table()
    model = PhaseModel(n_states=3, restarts=1).fit(table)
    model.save(tmp_path / "m")
    assert main(["describe", str(tmp_path / "m")]) == 0
    assert "Training map: 3 states" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "report"),
                 "--format", "json,png"]) == 0  # fmt: skip
    assert (tmp_path / "report" / "training_map.json").exists()
    features = tmp_path / "features.parquet"
    table.to_parquet(features)
    assert main(["score", str(features), "--model", str(tmp_path / "m"), "--horizon", "0.25",
                 "--out", str(tmp_path / "s.csv")]) == 0  # fmt: skip
    # the first scorer takes the model (or its directory) instead of a bare K
    by_model = score_runs(table, model, horizon=0.25)
    by_dir = score_runs(table, tmp_path / "m", horizon=0.25)
    assert by_model["run"].tolist() == by_dir["run"].tolist()


def test_predict_is_aligned_to_the_input_index():
    from test_scoring import runs_table

    from polymap.phases import PhaseModel

    table = runs_table()
    model = PhaseModel(n_states=3, restarts=1).fit(table)
    shuffled = table.sample(frac=1.0, random_state=0)
    shuffled.loc[shuffled.index[0], "syn.f0"] = float("nan")  # one row cannot be decoded
    paths = model.predict(shuffled)
    assert paths.index.equals(shuffled.index)
    assert (paths[["run", "step"]].values == shuffled[["run", "step"]].values).all()
    assert paths["state"].isna().sum() == 1 and pd.isna(paths["state"].iloc[0])
    sorted_paths = model.decode(table).set_index(["run", "step"])["state"]
    by_key = paths.dropna().set_index(["run", "step"])["state"].astype(int)
    assert (by_key == sorted_paths.loc[by_key.index]).all()
    proba = model.predict_proba(shuffled)
    assert proba.index.equals(shuffled.index) and proba["p0"].isna().sum() == 1


def test_one_meaning_per_flag_with_deprecated_aliases(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--n-seeds", "5", "--train-steps", "30"])
    assert (args.n_seeds, args.train_steps) == (5, 30)
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["demo", "--seeds", "5", "--steps", "30"])  # old spellings
    assert (old.n_seeds, old.train_steps) == (5, 30)
    err = capsys.readouterr().err
    assert "--seeds is deprecated here, use --n-seeds" in err and "use --train-steps" in err
    suite = parser.parse_args(["suite", "--out", "s", "--seeds", "0-4", "--train-steps", "40"])
    assert (suite.seeds, suite.train_steps) == ("0-4", 40)  # --seeds: a list, everywhere


def test_label_missing_metric_lists_metric_columns(tmp_path, capsys):
    table = pd.DataFrame({"run": ["a", "b"], "step": [1, 1], "seed": [0, 1],
                          "eval.piqa.acc": [0.5, 0.6], "val_loss": [3.0, 3.1]})  # fmt: skip
    table.to_csv(tmp_path / "t.csv", index=False)
    assert main(["label", str(tmp_path / "t.csv"), "--metric", "eval.arc.acc",
                 "--out", str(tmp_path / "l.csv")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "eval.piqa.acc" in err and "seed" not in err


def test_registries_refuse_a_second_meaning_for_a_name():
    from polymap.errors import UsageError
    from polymap.features import FeatureSet, feature_sets, register_feature_set
    from polymap.features.base import _REGISTRY

    class Mine(FeatureSet):
        name = "test_mine"

    class Other(FeatureSet):
        name = "test_mine"

    try:
        register_feature_set(Mine)
        register_feature_set(Mine)  # the same class again (a re-imported module): fine
        with pytest.raises(UsageError, match="taken by"):
            register_feature_set(Other)
        assert feature_sets()["test_mine"] is Mine
        register_feature_set(replace=True)(Other)
        assert feature_sets()["test_mine"] is Other
    finally:
        _REGISTRY.pop("test_mine", None)

    from polymap.roles import _REGISTRY as ARCHS
    from polymap.roles import architectures, register_architecture

    neox = architectures()["gpt_neox"]
    assert register_architecture(neox) is neox  # the same table: fine
    changed = type(neox)(**{**neox.__dict__, "rules": neox.rules[:1]})
    with pytest.raises(UsageError, match="already registered"):
        register_architecture(changed)
    assert ARCHS["gpt_neox"] is neox
