"""Bad input, tried as a new user and as an attacker would: each gets one clear line (exit 2, no traceback).

The table in docs/reliability.md ("Bad input") lists every case here with what the tool says;
rerun them all with ``.venv/bin/python -m pytest tests/test_reliability_inputs.py -v``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmdh.cli import main

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "y": rng.normal(size=n)})


def _write(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def fed(tmp_path) -> dict[str, str]:
    """Two small institutions and a test set (columns a, b; target y)."""
    return {
        "A": _write(tmp_path / "A.csv", _frame(40, 1)),
        "B": _write(tmp_path / "B.csv", _frame(40, 2)),
        "T": _write(tmp_path / "T.csv", _frame(30, 3)),
    }


def _run_args(fed: dict[str, str], out: Path, *extra: str, rounds: int = 3) -> list[str]:
    return ["run", "--institutions", fed["A"], fed["B"], "--test", fed["T"], "--target", "y",
            "--rounds", str(rounds), "--ledger", "off", "--out", str(out), *extra]


def _cli_error(capsys, args: list[str]) -> str:
    """Run the CLI expecting a user error: exit status 2, one line on stderr, no traceback; the line."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _cli_ok(capsys, args: list[str]) -> tuple[str, str]:
    main(args)
    cap = capsys.readouterr()
    return cap.out, cap.err


def _strict_json_lines(path: Path) -> list[dict]:
    def no_constants(name: str):
        raise AssertionError(f"{path}: bare {name} is not JSON")

    return [json.loads(ln, parse_constant=no_constants) for ln in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Data loss: output folders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ledger", ["off", "embedded"])
def test_run_into_an_existing_run_is_refused_before_anything_is_written(fed, tmp_path, capsys, ledger):
    # Prepare: a finished run
    out = tmp_path / "run"
    _cli_ok(capsys, _run_args(fed, out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = [a if a != "off" else ledger for a in _run_args(fed, out, rounds=5)]
    # Execute
    line = _cli_error(capsys, args)
    # Assert: named, with what to do; every file byte-identical (metrics.jsonl not truncated)
    assert f"{out}: --out folder is not empty" in line and "--overwrite" in line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and len(before[Path("metrics.jsonl")]) > 0


def test_overwrite_replaces_an_earlier_run(fed, tmp_path, capsys):
    out = tmp_path / "run"
    _cli_ok(capsys, _run_args(fed, out, rounds=3))
    (out / "models" / "stale").mkdir()
    _cli_ok(capsys, _run_args(fed, out, "--overwrite", rounds=4))
    assert [r["round"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["A", "B"]


def test_overwrite_does_not_delete_a_folder_fedmdh_did_not_write(fed, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    line = _cli_error(capsys, _run_args(fed, out, "--overwrite"))
    assert "was not written by fedmdh" in line
    assert (out / "chapter1.tex").read_text() == "precious"


def test_benchmark_into_an_existing_folder_is_refused(fed, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.csv").write_text("algorithm,seed\nfedavg,0\n")
    line = _cli_error(capsys, ["benchmark", "--institutions", fed["A"], fed["B"], "--test", fed["T"], "--target",
                               "y", "--algorithms", "fedavg", "--seeds", "1", "--rounds", "2", "--out", str(out)])
    assert "not empty" in line and "results.csv" in line
    assert (out / "results.csv").read_text() == "algorithm,seed\nfedavg,0\n"


def _wait_for_rounds(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n and (path.parent / "models").is_dir():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} rounds after {timeout} s")


def test_a_run_killed_mid_way_keeps_its_best_models_and_a_second_run_cannot_enter_meanwhile(fed, tmp_path, capsys):
    # Prepare: a long run in another process
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fedmdh.cli", *_run_args(fed, out, rounds=100_000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_rounds(out / "metrics.jsonl", 15, proc)
        # Execute: a second run into the same folder while the first writes; then kill -9 the first
        line = _cli_error(capsys, _run_args(fed, out, "--overwrite"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Assert: the second was refused in one line; the killed run left a complete set of models
    assert "another fedmdh process is writing" in line
    from fedmdh.models import load_model

    records = _strict_json_lines(out / "metrics.jsonl")
    for name in ("A", "B"):
        model = load_model(out / "models" / name)
        # each institution's model of its kept round on its own validation rows so far (its best, or
        # a later one within 1 SE of it: protocol.ROUND_SE), or of the round being recorded when killed
        best = min(records, key=lambda r: r["per_institution"][name]["val_mse"])["round"]
        assert best <= model.info["best_round"] <= len(records) + 1
        assert model.predict(pd.read_csv(fed["T"])).shape == (30,)
    # and once the killed run's lock is gone, the folder can be taken over explicitly
    _cli_ok(capsys, _run_args(fed, out, "--overwrite", rounds=2))
    assert [r["round"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1, 2]


def test_best_models_are_saved_at_each_improvement_through_the_simulator_callback(fed, tmp_path, monkeypatch):
    monkeypatch.setattr("fedmdh.runtime.protocol.ROUND_SE", 0.0)  # the best-round rule (the default's 1 SE: test_guard.py)
    from fedmdh.config import ExperimentConfig
    from fedmdh.experiment.runner import load_tables, prepare
    from fedmdh.runtime.simulator import simulate

    cfg = ExperimentConfig((fed["A"], fed["B"]), fed["T"], "y", algorithms=("fedavg",), rounds=12)
    fed_ = prepare(cfg, load_tables(cfg), 0)
    seen: list[int] = []
    res = simulate(fed_, cfg.build_algorithm("fedavg"), 12, on_best=lambda r, models, rounds: seen.append(r))
    # a round is reported when any institution's own validation loss improved on its best so far
    improving = []
    for i, h in enumerate(res.history):
        if any(h.per_institution[n]["val_mse"] < min((g.per_institution[n]["val_mse"] for g in res.history[:i]),
                                                    default=np.inf) for n in h.per_institution):
            improving.append(i + 1)
    assert seen == improving and seen[-1] == max(res.best_rounds.values())


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(fed, tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    _cli_ok(capsys, _run_args(fed, out))
    return out


@pytest.mark.parametrize("name", ["../../other/models/x", "../A", "/etc", "..", "a/b", "a\\b"])
def test_predict_institution_names_are_names_not_paths(run_dir, fed, tmp_path, capsys, name):
    # Prepare: a model outside the run folder where the path would lead
    (tmp_path / "other" / "models").mkdir(parents=True)
    import shutil

    shutil.copytree(run_dir / "models" / "A", tmp_path / "other" / "models" / "x")
    line = _cli_error(capsys, ["predict", "--model", str(run_dir), "--institution", name, fed["T"],
                               str(tmp_path / "p.csv")])
    assert "is not an institution name" in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_accepts_the_models_own_folder(run_dir, fed, tmp_path, capsys):
    out, _ = _cli_ok(capsys, ["predict", "--model", str(run_dir / "models" / "A"), "--institution", "A", fed["T"],
                              str(tmp_path / "p.csv")])
    assert "predicted y for 30 rows" in out
    assert "predicted_y" in pd.read_csv(tmp_path / "p.csv").columns
    line = _cli_error(capsys, ["predict", "--model", str(run_dir / "models" / "A"), "--institution", "B",
                               fed["T"], str(tmp_path / "q.csv")])
    assert "holds the model of institution 'A', not 'B'" in line


def test_output_paths_that_are_files_or_lie_under_files(fed, run_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (_run_args(fed, afile), "--out exists and is a file"),
        (_run_args(fed, afile / "sub"), "lies under"),
        (["benchmark", "--institutions", fed["A"], fed["B"], "--test", fed["T"], "--target", "y", "--algorithms",
          "fedavg", "--rounds", "2", "--out", str(afile / "b")], "lies under"),
        (["predict", "--model", str(run_dir), "--institution", "A", fed["T"], str(tmp_path)], "OUT.csv is a folder"),
        (["predict", "--model", str(run_dir), "--institution", "A", fed["T"], str(afile / "p.csv")], "lies under"),
        (["featurize", fed["T"], str(tmp_path)], "OUT.csv is a folder"),
        (["partition", "--data", fed["T"], "--target", "y", "--out", str(afile / "p")], "lies under"),
    ]
    for args, expected in cases:
        line = _cli_error(capsys, args)
        assert expected in line, (args, line)
    assert afile.read_text() == "x"


def test_an_input_that_is_a_fifo_is_refused_instead_of_blocking(fed, run_dir, tmp_path, capsys):
    fifo = tmp_path / "new.csv"
    os.mkfifo(fifo)
    line = _cli_error(capsys, ["predict", "--model", str(run_dir), "--institution", "A", str(fifo),
                               str(tmp_path / "p.csv")])
    assert f"{fifo}: is not a regular file" in line


def test_an_unreadable_input_file_is_one_line(fed, tmp_path, capsys, monkeypatch):
    # Prepare: root reads through chmod 000, so make the read itself fail as it does for other users
    bad = Path(fed["A"])
    bad.chmod(0)
    real = Path.read_bytes

    def denied(self):
        if self == bad:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    if os.geteuid() == 0:
        monkeypatch.setattr(Path, "read_bytes", denied)
    try:
        line = _cli_error(capsys, _run_args(fed, tmp_path / "o"))
    finally:
        bad.chmod(0o644)
    assert f"{bad}: cannot be read (Permission denied)" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Bad values in the tables
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, make, expected",
    [
        ("A", lambda f: f.assign(a=f["a"].where(f.index != 3, 1e308)), "column 'a' holds values too large"),
        ("A", lambda f: f.assign(y=f["y"].where(f.index != 3, 1e308)), "target column 'y' holds values too large"),
        ("A", lambda f: f.assign(b=1e200 * (2 + f["b"].abs())), "column 'b' holds values too large"),
        ("T", lambda f: f.assign(a=f["a"].where(f.index != 0, -1e308)), "column 'a' holds values too large"),
    ],
    ids=["feature-1e308", "target-1e308", "column-of-1e200", "test-set-minus-1e308"],
)
def test_values_that_overflow_standardisation_name_the_file_and_column(fed, tmp_path, capsys, which, make, expected):
    _write(Path(fed[which]), make(pd.read_csv(fed[which])))
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o"))
    assert Path(fed[which]).name in line and expected in line and "rescale" in line


def test_a_divergent_run_with_the_ledger_on_says_so_in_one_line(fed, tmp_path, capsys):
    cfg = tmp_path / "lr.toml"
    cfg.write_text("[algorithm.fedavg]\nlr = 1e6\n")
    args = [a if a != "off" else "embedded" for a in _run_args(fed, tmp_path / "o", "--config", str(cfg))]
    line = _cli_error(capsys, args)
    assert "training diverged at round 1 (loss nan); lower the learning rate" in line
    assert "not finite" not in line and "best_per" not in line


def test_a_run_that_diverges_later_keeps_the_rounds_before_it(fed, tmp_path, capsys, monkeypatch):
    # Prepare: FedAvg whose local training blows up in round 4 (each round calls it once per institution)
    from fedmdh.algorithms.fedavg import FedAvg

    real = FedAvg.client_update
    calls = {"n": 0}

    def blows_up(self, server, client, data, rng, rnd):
        calls["n"] += 1
        upd, client = real(self, server, client, data, rng, rnd)
        if calls["n"] > 6:
            upd = type(upd)(upd.institution, {k: v * np.nan for k, v in upd.payload.items()}, upd.num_examples,
                            {"loss": float("nan")})
        return upd, client

    monkeypatch.setattr(FedAvg, "client_update", blows_up)
    out = tmp_path / "o"
    # Execute
    line = _cli_error(capsys, _run_args(fed, out, rounds=50))
    # Assert: the round and the remedy; rounds 1-3 kept as strict JSON, the best models of those rounds saved
    assert "training diverged at round 4 (loss nan); lower the learning rate" in line
    assert f"rounds 1-3 are in {out / 'metrics.jsonl'}" in line
    records = _strict_json_lines(out / "metrics.jsonl")
    assert [x["round"] for x in records] == [1, 2, 3]
    from fedmdh.models import load_model

    best = min(records, key=lambda r: r["val_mse"])["round"]
    assert load_model(out / "models" / "A").info["best_round"] == best
    assert "stopped: training diverged at round 4" in (out / "run.log").read_text()
    assert not (out / "final_metrics.json").exists()


def test_a_run_whose_losses_are_finite_but_absurd_has_diverged_too(fed, tmp_path, capsys):
    cfg = tmp_path / "lr.toml"
    cfg.write_text("[algorithm.fedgen]\nlr = 1e6\n")  # gradient clipping keeps FedGen's numbers finite
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o", "--config", str(cfg), "--algorithm", "fedgen"))
    assert "training diverged at round 1 (loss " in line and "lower the learning rate" in line


def test_metrics_jsonl_is_strict_json_without_validation_rows(fed, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("val_fraction = 0\n")
    out = tmp_path / "o"
    _cli_ok(capsys, _run_args(fed, out, "--config", str(cfg)))
    records = _strict_json_lines(out / "metrics.jsonl")
    assert [r["val_mse"] for r in records] == [None, None, None]
    json.loads((out / "final_metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_the_same_csv_given_twice_is_refused(fed, tmp_path, capsys):
    line = _cli_error(capsys, ["run", "--institutions", fed["A"], fed["A"], "--test", fed["T"], "--target", "y",
                               "--out", str(tmp_path / "o")])
    assert "A.csv: is given twice as an institution" in line
    copy = tmp_path / "A_copy.csv"
    copy.write_bytes(Path(fed["A"]).read_bytes())
    line = _cli_error(capsys, ["run", "--institutions", fed["A"], str(copy), "--test", fed["T"], "--target", "y",
                               "--out", str(tmp_path / "o")])
    assert "A_copy.csv: has the same content as" in line


def test_a_feature_that_differs_from_the_target_only_by_case_is_reported(fed, tmp_path, capsys):
    for key in ("A", "T"):
        f = pd.read_csv(fed[key])
        _write(Path(fed[key]), f.rename(columns={"y": "e_form"}).assign(E_form=lambda d: d["e_form"]))
    f = pd.read_csv(fed["B"])
    _write(Path(fed["B"]), f.rename(columns={"y": "e_form"}))
    args = [a if a != "y" else "e_form" for a in _run_args(fed, tmp_path / "o")]
    line = _cli_error(capsys, args)
    assert "A.csv: column 'E_form' differs from the target 'e_form' only by case" in line and "--exclude" in line


def test_a_text_column_in_the_test_set_is_named_or_ignored_when_no_institution_uses_it(fed, tmp_path, capsys):
    t = pd.read_csv(fed["T"])
    # a column no institution has (e.g. the formula) is not needed: ignored
    _write(Path(fed["T"]), t.assign(formula="CaTiO3"))
    _cli_ok(capsys, _run_args(fed, tmp_path / "o1"))
    # a column the institutions predict from must be numeric: named with its line
    t["b"] = t["b"].astype(object)
    t.loc[4, "b"] = "n/a?"
    _write(Path(fed["T"]), t)
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o2"))
    assert "T.csv: column 'b' is not numeric (line 6 holds 'n/a?')" in line


def test_a_text_cell_in_new_materials_is_named_not_imputed(run_dir, fed, tmp_path, capsys):
    t = pd.read_csv(fed["T"])
    t["a"] = t["a"].astype(object)
    t.loc[2, "a"] = "high"
    new = _write(tmp_path / "new.csv", t)
    line = _cli_error(capsys, ["predict", "--model", str(run_dir), "--institution", "A", new,
                               str(tmp_path / "p.csv")])
    assert "new.csv: column 'a' is not numeric (line 4 holds 'high')" in line
    assert not (tmp_path / "p.csv").exists()


def test_a_test_set_lacking_columns_is_found_before_any_progress(fed, tmp_path, capsys):
    _write(Path(fed["T"]), pd.read_csv(fed["T"]).drop(columns=["b"]))
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o"))  # one line: no progress printed first
    assert "the test set lacks column 'b'" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Config files: wrong types, unknown keys, absurd budgets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('rounds = "ten"', "rounds must be >= 1 and <= 100,000 (an integer), got the string 'ten'"),
        ("rounds = 2.7", "rounds must be >= 1 and <= 100,000 (an integer), got 2.7"),
        ('val_fraction = "0.1"', "val_fraction must be a number in [0, 0.5), got the string '0.1'"),
        ('[training]\nhidden = "64,64"', "hidden must be a list of 1..16 layer widths"),
        ("[training]\nlocal_steps = 2.5", "local_steps must be >= 1 and <= 10,000 (an integer), got 2.5"),
        ("[training]\nlocal_steps = 1e9", "local_steps must be >= 1 and <= 10,000 (an integer), got 1000000000.0"),
        ("[training]\nlocal_steps = 1000000000", "local_steps must be >= 1 and <= 10,000"),
        ("training = 5", "training must be a table ([training]"),
        ('[algorithm.fedavg]\nlr = "fast"', "[algorithm.fedavg] lr must be a number, got the string 'fast'"),
        ('institutions = "a.csv"', "institutions must be a list of file paths"),
        ("[training]\nlr = 0.1", "unknown [training] setting 'lr'"),
        ("[algorithm]\nfedavg = 3", "[algorithm.fedavg] must be a table"),
    ],
    ids=["rounds-ten", "rounds-2.7", "val_fraction-string", "hidden-string", "local_steps-2.5", "local_steps-1e9",
         "local_steps-10^9", "training-5", "lr-fast", "institutions-string", "training-unknown-key",
         "algorithm-not-a-table"],
)
def test_config_values_of_the_wrong_type_are_one_line(fed, tmp_path, capsys, toml, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml + "\n")
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o", "--config", str(cfg)))
    assert f"{cfg}: " in line and expected in line  # brackets kept: printed verbatim, not as markup
    assert not (tmp_path / "o").exists()


def test_an_absurd_total_budget_is_refused_with_the_bound(fed, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[training]\nlocal_steps = 5000\n")
    line = _cli_error(capsys, _run_args(fed, tmp_path / "o", "--config", str(cfg), rounds=5000))
    assert "rounds x local_steps = 25,000,000 minibatch steps per institution exceeds the bound 10,000,000" in line


def test_the_python_api_refuses_wrong_types_too():
    from fedmdh.config import ExperimentConfig
    from fedmdh.errors import InputError

    with pytest.raises(InputError, match="institutions must be a list of file paths"):
        ExperimentConfig("a.csv", "t.csv", "y")
    with pytest.raises(InputError, match="rounds must be >= 1"):
        ExperimentConfig(("a.csv", "b.csv"), "t.csv", "y", rounds=2.7)


def test_user_text_is_never_read_as_markup(tmp_path, capsys):
    a = _frame(20, 1).rename(columns={"y": "y[eV]"})
    b = _frame(20, 2).rename(columns={"y": "y[eV]"})
    pa, pb = _write(tmp_path / "a[1].csv", a), _write(tmp_path / "b.csv", b)
    out, _ = _cli_ok(capsys, ["heterogeneity", "--target", "y[eV]", pa, pb])
    assert "y[eV] mean" in out and "a[1]" in out
    line = _cli_error(capsys, ["heterogeneity", "--target", "[bold]z[/bold]", pa, pb])
    assert "target column '[bold]z[/bold]' not found" in line


# ----------------------------------------------------------------------------------------------
# Also: one table of defaults, help, progress, readable logs
# ----------------------------------------------------------------------------------------------


def test_make_algorithm_builds_what_the_cli_runs_for_every_algorithm():
    from fedmdh.algorithms import ALGORITHMS, make_algorithm
    from fedmdh.cli import _experiment_config
    from fedmdh.defaults import ALGORITHM_NAMES

    assert set(ALGORITHM_NAMES) == set(ALGORITHMS)
    for name in ALGORITHMS:
        cfg = _experiment_config(None, ["a.csv", "b.csv"], Path("t.csv"), "y", algorithms=(name,), seeds=1)
        assert make_algorithm(name).hyperparameters() == cfg.build_algorithm(name).hyperparameters(), name
    assert make_algorithm("fedgen").hyperparameters()["max_grad_norm"] == 1.0
    assert make_algorithm("fedavg").training.lr == 0.2


def _help(capsys, *cmd: str) -> str:
    main([*cmd, "--help"])
    out = capsys.readouterr().out
    return " ".join(out.replace("│", " ").split())  # rich wraps the help in a box: compare as one line


def test_help_shows_defaults_every_algorithm_and_no_stray_spaces(capsys):
    from fedmdh.defaults import ALGORITHM_NAMES

    bench = _help(capsys, "benchmark")
    run = _help(capsys, "run")
    for name in ALGORITHM_NAMES:
        assert name in bench, name
    assert "[default: local,pooled,fedavg,fedprox,fedmdh]" in bench
    assert "[default: 3]" in bench and "[default: 400]" in bench and "[default: 1]" in bench
    assert "[default: 0]" in run and "[default: 400]" in run
    for text in (bench, run):
        assert " ." not in text and "<bool>" not in text and "BOOLEAN" not in text
        assert "--overwrite" in text


def test_a_benchmark_not_on_a_terminal_prints_plain_progress_and_whole_tables(fed, tmp_path, capsys):
    out, err = _cli_ok(capsys, ["benchmark", "--institutions", fed["A"], fed["B"], "--test", fed["T"], "--target",
                                "y", "--algorithms", "fedavg,fedmdh-no-gfam", "--seeds", "2", "--rounds", "10",
                                "--out", str(tmp_path / "b")])
    # progress: a plain line every tenth of a run's rounds (capsys is not a terminal)
    assert "fedavg seed 0: round 1/10" in err and "fedmdh-no-gfam seed 1: round 10/10" in err
    assert "run 4 of 4" in err
    # the table: title on one line, no cell cut or split
    lines = out.splitlines()
    assert "mean ± std over seeds (test set, each institution through its own columns)" in lines
    assert "…" not in out
    row = next(ln for ln in lines if "fedmdh-no-gfam" in ln)
    assert row.count("±") == 5 and "RMSE [y]" in out


def test_default_benchmark_includes_fedmdh():
    from fedmdh.config import ExperimentConfig

    assert "fedmdh" in ExperimentConfig(("a.csv", "b.csv"), "t.csv", "y").algorithms


def test_partition_error_says_what_helps_when_featurizers_are_given():
    from fedmdh.data.partition import Tolerance, _choose_features
    from fedmdh.errors import TargetUnreachableError

    with pytest.raises(TargetUnreachableError) as exc:
        _choose_features([], [["m1", "m2"], ["d1", "d2"], ["g1", "g2"]], 0.31, Tolerance())
    assert "--shared-featurizer" in str(exc.value) and "pass --featurizers" not in str(exc.value)


def test_featurize_off_a_terminal_shows_progress_lines_and_no_blank_line(tmp_path, capsys):
    pytest.importorskip("matminer")
    from conftest import SHARED_DATASETS, require

    src = require(SHARED_DATASETS / "wolverton_oxides" / "wolverton_oxides.csv")
    frame = pd.read_csv(src, nrows=260)[["formula", "e_form"]]
    inp = _write(tmp_path / "in.csv", frame)
    out, err = _cli_ok(capsys, ["featurize", inp, str(tmp_path / "out.csv")])
    lines = err.splitlines()
    assert any("featurizing in.csv (magpie), formulas: 260/260" in ln for ln in lines), err
    assert all(ln.strip() for ln in lines) and "wrote" in out


def test_curves_use_a_linear_axis_with_enough_ticks():
    from fedmdh.experiment.report import curves_figure
    from fedmdh.runtime.simulator import RoundRecord, RunResult

    def result(name: str, level: float) -> RunResult:
        hist = [RoundRecord(r, 0.0, 0.0, level + 0.5 / r, 0.0, 0.0, {}, 0, 0.0) for r in range(1, 101)]
        return RunResult(name, 0, hist, 100, {}, {}, {}, {})

    fig = curves_figure([result("fedavg", 0.25), result("fedmdh", 0.23)], "e_form")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert ax.get_yscale() == "linear" and len(ticks) >= 4
    assert hi < 1.0  # the first steep rounds do not squash the curves


def test_offline_fallback_tells_cli_users_about_data_dir(tmp_path, capsys, monkeypatch):
    import fedmdh.data.datasets as ds

    monkeypatch.setenv("FEDMDH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMDH_DATA_DIR", raising=False)
    monkeypatch.setattr(ds, "DEFAULT_BASE_URL", "http://127.0.0.1:9/unreachable")
    _, err = _cli_ok(capsys, ["demo", "--out", str(tmp_path / "demo"), "--rounds", "2", "--ledger", "off"])
    fallback = next(ln for ln in err.splitlines() if "falling back" in ln)
    assert "--data-dir DIR" in fallback and "data_dir=" not in fallback


def test_make_test_installs_anvil_so_every_test_runs():
    # -B: as on a fresh machine (nothing installed yet); -n: print the commands, run none
    dry = subprocess.run(["make", "-n", "-B", "test", "FEDMDH_ANVIL="], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "@foundry-rs/anvil@1.7.1" in dry.stdout and "FEDMDH_ANVIL=" in dry.stdout
    assert "make test" in (REPO / ".ci" / "run").read_text()


# ----------------------------------------------------------------------------------------------
# Issue 21 (A): the run/predict command line - nothing lost, no silent wrong answer
# ----------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _bench_args(fed: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--institutions", fed["A"], fed["B"], "--test", fed["T"], "--target", "y", "--algorithms",
            "fedavg", "--seeds", "1", "--rounds", "2", "--out", str(out), *extra]


@pytest.mark.parametrize("command", ["run", "benchmark"])
def test_overwrite_removes_only_what_the_earlier_run_wrote(fed, tmp_path, capsys, command):
    # Prepare: a finished run (or benchmark) with the user's own notes put in its folder
    out = tmp_path / "R"
    args = _run_args(fed, out, rounds=2) if command == "run" else _bench_args(fed, out)
    _cli_ok(capsys, args)
    assert json.loads((out / ".fedmdh-manifest.json").read_text())["complete"] is True
    (out / "notes.txt").write_text("precious")
    (out / "drafts").mkdir()
    (out / "drafts" / "paper.tex").write_text("also precious")
    # Execute: --overwrite is refused, naming the first foreign entry and the other one
    line = _cli_error(capsys, [*args, "--overwrite"])
    # Assert: nothing deleted; once the user moves them out, --overwrite replaces the run
    assert f"{out / 'drafts'}: was not written by an earlier fedmdh run (nor notes.txt)" in line
    assert (out / "notes.txt").read_text() == "precious" and (out / "drafts" / "paper.tex").exists()
    (out / "notes.txt").unlink()
    (out / "drafts" / "paper.tex").unlink()
    (out / "drafts").rmdir()
    _cli_ok(capsys, [*args, "--overwrite"])
    assert (out / "run.log").exists()


@pytest.mark.parametrize("which", ["institution", "test", "config"])
def test_overwrite_refuses_a_folder_that_holds_an_input_of_the_run(fed, tmp_path, capsys, which):
    # Prepare: a finished run; an input of the next run lies in it (a copy of A.csv, of the test set, or the
    # run's own config.toml given back as --config: all three were deleted, then read, before)
    out = tmp_path / "R"
    _cli_ok(capsys, _run_args(fed, out, rounds=2))
    inside = {"institution": out / "A.csv", "test": out / "T.csv", "config": out / "config.toml"}[which]
    if which != "config":
        inside.write_bytes(Path(fed["A" if which == "institution" else "T"]).read_bytes())
    args = {
        "institution": _run_args({**fed, "A": str(inside)}, out, "--overwrite"),
        "test": _run_args({**fed, "T": str(inside)}, out, "--overwrite"),
        "config": ["run", "--config", str(inside), "--out", str(out), "--overwrite", "--ledger", "off"],
    }[which]
    before = _tree(out)
    line = _cli_error(capsys, args)
    assert f"{inside}: is an input of this run and lies in the --out folder {out}" in line
    assert _tree(out) == before


def test_overwrite_of_a_run_folder_without_a_manifest_takes_only_known_names(fed, tmp_path, capsys):
    # Prepare: a run folder as a fedmdh without manifests left it, plus a file of the user's
    out = tmp_path / "R"
    _cli_ok(capsys, _run_args(fed, out, rounds=2))
    (out / ".fedmdh-manifest.json").unlink()
    (out / "results_by_hand.xlsx").write_text("mine")
    line = _cli_error(capsys, _run_args(fed, out, "--overwrite"))
    assert f"{out / 'results_by_hand.xlsx'}: was not written by an earlier fedmdh run" in line
    (out / "results_by_hand.xlsx").unlink()
    _cli_ok(capsys, _run_args(fed, out, "--overwrite", rounds=3))
    assert [r["round"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("where", ["model.json", "params.npz", "new-in-model-folder", "models-folder", "symlink",
                                   "run-file", "input"])
@pytest.mark.parametrize("given", ["run", "model-folder"])
def test_predict_never_writes_over_the_model_the_run_or_the_input(run_dir, fed, tmp_path, capsys, where, given):
    model = run_dir if given == "run" else run_dir / "models" / "A"
    new = tmp_path / "new.csv"
    new.write_bytes(Path(fed["T"]).read_bytes())
    link = tmp_path / "innocent.csv"
    link.symlink_to(run_dir / "models" / "A" / "model.json")
    out = {"model.json": run_dir / "models" / "A" / "model.json", "params.npz": run_dir / "models" / "A" / "params.npz",
           "new-in-model-folder": run_dir / "models" / "A" / "p.csv", "models-folder": run_dir / "models" / "p.csv",
           "symlink": link, "run-file": run_dir / "final_metrics.json", "input": new}[where]
    before, new_before = _tree(run_dir), new.read_bytes()
    line = _cli_error(capsys, ["predict", "--model", str(model), "--institution", "A", str(new), str(out)])
    assert "OUT.csv" in line and str(out) in line
    assert _tree(run_dir) == before and new.read_bytes() == new_before
    # the model still predicts, into a file beside the run
    _cli_ok(capsys, ["predict", "--model", str(model), "--institution", "A", str(new), str(tmp_path / "p.csv")])
    assert "predicted_y" in pd.read_csv(tmp_path / "p.csv").columns


def test_run_trains_the_algorithm_its_config_names(fed, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('algorithms = ["fedprox"]\n')
    out = tmp_path / "R"
    _cli_ok(capsys, _run_args(fed, out, "--config", str(cfg), rounds=2))
    assert json.loads((out / "final_metrics.json").read_text())["algorithm"] == "fedprox"
    assert "algorithm fedprox" in (out / "run.log").read_text()


@pytest.mark.parametrize(
    "toml, extra, expected",
    [
        ('algorithms = ["nosuch"]', (), "algorithms: unknown algorithm 'nosuch'; choose from local, pooled, fedavg"),
        ('algorithms = ["fedprox", "fedavg"]', (), "names 2 algorithms; `fedmdh run` trains one: give --algorithm "
                                                   "NAME, or run them all with `fedmdh benchmark --config"),
        ('algorithms = ["fedprox"]', ("--algorithm", "fedavg"), "--algorithm fedavg: "),
        ("", ("--algorithm", "fedavgg"), "--algorithm: unknown algorithm 'fedavgg'; choose from local, pooled"),
    ],
    ids=["unknown-in-config", "several-in-config", "conflict-with-flag", "unknown-flag"],
)
def test_run_refuses_algorithms_it_would_not_train(fed, tmp_path, capsys, toml, extra, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    line = _cli_error(capsys, _run_args(fed, tmp_path / "R", "--config", str(cfg), *extra))
    assert expected in line
    assert not (tmp_path / "R").exists()


def test_run_takes_one_of_a_benchmark_configs_algorithms_with_the_flag(fed, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('algorithms = ["fedavg", "fedprox"]\n')
    out = tmp_path / "R"
    _cli_ok(capsys, _run_args(fed, out, "--config", str(cfg), "--algorithm", "fedprox", rounds=2))
    assert json.loads((out / "final_metrics.json").read_text())["algorithm"] == "fedprox"


@pytest.mark.parametrize("command", ["run", "benchmark", "heterogeneity", "config"])
@pytest.mark.parametrize("column, expected", [("nosuch", "--exclude 'nosuch': no file has this column (columns: "
                                                          "'a', 'b', 'y')"),
                                              ("y", "--exclude 'y': is the target column")], ids=["missing", "target"])
def test_exclude_of_a_missing_column_or_of_the_target_is_said(fed, tmp_path, capsys, command, column, expected):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'exclude = ["{column}"]\n')
    args = {
        "run": _run_args(fed, tmp_path / "R", "--exclude", column),
        "benchmark": _bench_args(fed, tmp_path / "R", "--exclude", column),
        "heterogeneity": ["heterogeneity", "--target", "y", "--exclude", column, fed["A"], fed["B"]],
        "config": _run_args(fed, tmp_path / "R", "--config", str(cfg)),
    }[command]
    line = _cli_error(capsys, args)
    assert expected in line
    assert not (tmp_path / "R").exists()


def test_excluding_a_column_only_some_files_have_still_works(fed, tmp_path, capsys):
    _write(Path(fed["A"]), pd.read_csv(fed["A"]).assign(sample_id=range(40)))
    _cli_ok(capsys, _run_args(fed, tmp_path / "R", "--exclude", "sample_id", rounds=2))
    assert "sample_id" not in json.loads((tmp_path / "R" / "models" / "A" / "model.json").read_text())["features"]


@pytest.mark.parametrize("how", ["same-path", "same-content", "symlink"])
def test_a_test_file_that_is_an_institutions_file_is_refused(fed, tmp_path, capsys, how):
    test = {"same-path": Path(fed["B"]), "same-content": tmp_path / "held_out.csv",
            "symlink": tmp_path / "test_link.csv"}[how]
    if how == "same-content":
        test.write_bytes(Path(fed["B"]).read_bytes())
    elif how == "symlink":
        test.symlink_to(fed["B"])
    line = _cli_error(capsys, _run_args({**fed, "T": str(test)}, tmp_path / "R"))
    assert f"{test}: the test set " in line and "B.csv" in line and "give a held-out test file" in line
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("stem, problem", [
    (".", "'.' names a folder"), ("..", "'..' names a folder"), (".hidden", "starts with '.'"),
    ("x" * 240, "is 240 characters long"), ("tab\there", "unprintable"),
], ids=["dot", "dotdot", "hidden", "240-chars", "tab"])
@pytest.mark.parametrize("entry", ["cli", "config", "api"])
def test_institution_names_must_be_safe_names_at_every_entry_point(fed, tmp_path, capsys, stem, problem, entry):
    # Prepare: the CSV of institution A under the bad name (e.g. "..csv", whose stem is ".")
    bad = tmp_path / f"{stem}.csv"
    bad.write_bytes(Path(fed["A"]).read_bytes())
    out = tmp_path / "R"
    expected = f"{bad}: " if stem != "tab\there" else ".csv: "  # (the console shows a tab as spaces)
    if entry == "api":  # the Python API, as the task service calls it
        from fedmdh.config import ExperimentConfig
        from fedmdh.errors import InputError
        from fedmdh.experiment.runner import run_experiment
        from fedmdh.ledger.options import LedgerOptions

        with pytest.raises(InputError) as exc:
            run_experiment(ExperimentConfig((str(bad), fed["B"]), fed["T"], "y", algorithms=("fedavg",), rounds=2),
                           "fedavg", out, ledger=LedgerOptions(mode="off"))
        line = str(exc.value)
    else:
        if entry == "config":
            cfg = tmp_path / "c.toml"
            cfg.write_text(json.dumps({"institutions": [bad.name, fed["B"]]})[1:-1].replace('":', '" =') + "\n")
            args = ["run", "--config", str(cfg), "--test", fed["T"], "--target", "y", "--rounds", "2", "--out",
                    str(out)]
        else:  # with the ledger on: a 240-character name ended in an ENAMETOOLONG traceback
            args = ["run", "--institutions", str(bad), fed["B"], "--test", fed["T"], "--target", "y", "--rounds", "2",
                    "--out", str(out)]
        line = _cli_error(capsys, args)
    assert expected in line and "is not an institution name" in line and problem in line
    assert "names are printable text of 1 to 64 bytes in UTF-8" in line and "rename the file" in line
    assert not out.exists()


def test_the_longest_institution_name_runs_with_the_ledger_and_verifies(fed, tmp_path, capsys):
    # 64 bytes of UTF-8 (32 x 'é'): what the ledger contract's String[64] holds and a file name can carry
    name = "é" * 32
    longest = _write(tmp_path / f"{name}.csv", pd.read_csv(fed["A"]))
    out = tmp_path / "R"
    _cli_ok(capsys, ["run", "--institutions", longest, fed["B"], "--test", fed["T"], "--target", "y", "--rounds", "2",
                     "--out", str(out)])
    assert (out / "models" / name / "model.json").is_file()
    report, _ = _cli_ok(capsys, ["ledger", "verify", str(out)])
    assert report.startswith("OK:")


def test_the_predict_name_check_is_the_run_name_check(run_dir, fed, tmp_path, capsys):
    from fedmdh.data.io import NAME_RULE

    line = _cli_error(capsys, ["predict", "--model", str(run_dir), "--institution", ".hidden", fed["T"],
                               str(tmp_path / "p.csv")])
    assert "--institution '.hidden' is not an institution name" in line and NAME_RULE in line


def test_a_column_with_one_value_in_300_rows_is_named(tmp_path, capsys):
    # Prepare: 300 rows at A whose column c holds one value (299 cells empty) far from B's values of c.
    # Before: a RuntimeWarning (mean of an empty slice), huge losses, then "training diverged ... lower the
    # learning rate", which does not help
    rng = np.random.default_rng(0)
    a = pd.DataFrame({"a": rng.normal(size=300), "c": np.nan, "y": rng.normal(size=300)})
    a.loc[17, "c"] = 50.0
    b = pd.DataFrame({"a": rng.normal(size=300), "c": rng.normal(size=300), "y": rng.normal(size=300)})
    t = pd.DataFrame({"a": rng.normal(size=40), "c": rng.normal(size=40), "y": rng.normal(size=40)})
    fed = {k: _write(tmp_path / f"{k}.csv", f) for k, f in (("A", a), ("B", b), ("T", t))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        line = _cli_error(capsys, _run_args(fed, tmp_path / "R"))
    assert f"{fed['A']}: column 'c' has 1 value in 300 rows; too few to fill in its 299 empty cells from" in line
    assert "fill it in or drop the column" in line and "diverged" not in line
    # a constant column (an element never present) is fine: it standardises to 0
    _write(Path(fed["A"]), a.assign(c=0.0))
    _cli_ok(capsys, _run_args(fed, tmp_path / "R2", rounds=2))


def test_a_one_row_test_set_is_called_the_test_set(fed, tmp_path, capsys):
    _write(Path(fed["T"]), pd.read_csv(fed["T"]).head(1))
    line = _cli_error(capsys, _run_args(fed, tmp_path / "R"))
    assert f"{fed['T']}: has 1 row; the test set needs at least 10" in line and "institution" not in line


def test_a_one_row_test_set_is_called_the_test_set_on_a_deployed_node_too(fed, tmp_path, monkeypatch):
    from fedmdh.errors import InputError
    from fedmdh.runtime.node import NodeService

    monkeypatch.setenv("FEDMDH_KEY_PASSPHRASE", "trial")
    monkeypatch.setenv("FEDMDH_KEY_KDF", "pbkdf2")
    monkeypatch.setenv("FEDMDH_KEY_KDF_ITERATIONS", "2000")
    _write(Path(fed["T"]), pd.read_csv(fed["T"]).head(1))
    node = NodeService("A", fed["A"], "y", tmp_path / "state", test=fed["T"])
    with pytest.raises(InputError) as exc:
        node._load_task("t", {"target": "y"}, tmp_path / "task")
    assert f"{fed['T']}: has 1 row; the test set needs at least 10" in str(exc.value)
    assert "institution" not in str(exc.value)


def test_a_deeply_nested_model_json_is_one_line_not_a_crash(tmp_path):
    """predict reads model.json with a bounded depth: with the recursion limit the eth packages set
    (100,000), a 200,000-deep model.json crashed the interpreter (SIGSEGV) on d465001."""
    import subprocess
    import sys

    folder = tmp_path / "models" / "A"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("[" * 200_000 + "]" * 200_000)
    code = ("import sys; sys.setrecursionlimit(100_000)\n"
            "from fedmdh.errors import InputError\nfrom fedmdh.models import load_model\n"
            f"try:\n    load_model({str(folder)!r})\nexcept InputError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert "model.json: is not a model description fedmdh can read (JSON nested more than 64" in proc.stdout
