"""Bad input: one clear line naming the file, column or row, and a non-zero exit without traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmdh.cli import main
from fedmdh.data.io import load_institution
from fedmdh.errors import InputError


def _write(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def _good(n: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "y": rng.normal(size=n)})


def _cli_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    # one message (rich may soft-wrap nothing: soft_wrap=True keeps it on one line)
    assert len(lines) == 1, err
    return lines[0]


def test_missing_target_names_file_and_column(tmp_path):
    # Prepare
    path = _write(tmp_path / "inst.csv", _good())
    # Execute / Assert
    with pytest.raises(InputError, match=r"inst\.csv: target column 'e_form' not found"):
        load_institution(path, "e_form")


def test_non_numeric_feature_names_column_and_line(tmp_path):
    df = _good()
    df["b"] = df["b"].astype(object)
    df.loc[3, "b"] = "n/a?"
    path = _write(tmp_path / "inst.csv", df)
    with pytest.raises(InputError, match=r"column 'b' is not numeric \(line 5 holds 'n/a\?'\)"):
        load_institution(path, "y")


def test_all_nan_column(tmp_path):
    df = _good()
    df["c"] = np.nan
    path = _write(tmp_path / "inst.csv", df)
    with pytest.raises(InputError, match=r"column 'c' is empty"):
        load_institution(path, "y")


def test_constant_target(tmp_path):
    df = _good()
    df["y"] = 1.5
    path = _write(tmp_path / "inst.csv", df)
    with pytest.raises(InputError, match=r"target column 'y' is constant"):
        load_institution(path, "y")


def test_nan_labels_name_lines(tmp_path):
    df = _good()
    df.loc[[2, 7], "y"] = np.nan
    path = _write(tmp_path / "inst.csv", df)
    with pytest.raises(InputError, match=r"missing or not finite at lines 4, 9 \(2 rows\)"):
        load_institution(path, "y")


def test_duplicate_column_names(tmp_path):
    path = tmp_path / "inst.csv"
    path.write_text("a,b,a,y\n" + "\n".join("1,2,3,4" for _ in range(12)) + "\n")
    with pytest.raises(InputError, match=r"duplicate column name 'a'"):
        load_institution(path, "y")


def test_too_few_rows(tmp_path):
    path = _write(tmp_path / "tiny.csv", _good(n=9))
    with pytest.raises(InputError, match=r"tiny\.csv: has 9 rows; an institution needs at least 10"):
        load_institution(path, "y")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(InputError, match=r"empty\.csv: the file is empty"):
        load_institution(path, "y")


def test_header_only_file(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("a,b,y\n")
    with pytest.raises(InputError, match=r"has a header but no data rows"):
        load_institution(path, "y")


def test_binary_file_is_not_csv(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)))
    with pytest.raises(InputError, match=r"data\.xlsx: is not a CSV file"):
        load_institution(path, "y")


def test_missing_values_are_imputed_from_own_training_means(tmp_path):
    from fedmdh.data.federation import prepare_federation

    a = _good(40, seed=1)
    a.loc[[0, 5, 9], "a"] = np.nan
    b = _good(40, seed=2)
    test = _good(30, seed=3)
    ta = load_institution(_write(tmp_path / "a.csv", a), "y")
    tb = load_institution(_write(tmp_path / "b.csv", b), "y")
    tt = load_institution(_write(tmp_path / "t.csv", test), "y", name="test")
    fed = prepare_federation([ta, tb], tt, "y", seed=0, val_fraction=0.0)
    inst_a = fed.institutions[0]
    assert inst_a.n_imputed == 3
    assert fed.institutions[1].n_imputed == 0
    # the imputed value is a's own observed mean, standardised with the pooled moments
    own_mean = np.nanmean(a["a"].to_numpy())
    j = fed.features.index("a")
    expected = (own_mean - fed.scaler.mean[j]) / fed.scaler.scale[j]
    np.testing.assert_allclose(inst_a.X[[0, 5, 9], j], expected, rtol=1e-6)


def test_with_clipping_inputs_outside_an_institutions_training_range_are_clipped_to_it(tmp_path):
    from fedmdh.data.federation import prepare_federation
    from fedmdh.models import load_model, save_model

    # Prepare: a test row far above every training value of column "a", one far below
    a, b = _good(40, seed=1), _good(40, seed=2)
    test = _good(30, seed=3)
    test.loc[0, "a"] = 1e6
    test.loc[1, "a"] = -1e6
    ta = load_institution(_write(tmp_path / "a.csv", a), "y")
    tb = load_institution(_write(tmp_path / "b.csv", b), "y")
    tt = load_institution(_write(tmp_path / "t.csv", test), "y", name="test")

    # Execute
    fed = prepare_federation([ta, tb], tt, "y", seed=0, val_fraction=0.0, clip_margin=0.0)
    wide = prepare_federation([ta, tb], tt, "y", seed=0, val_fraction=0.0, clip_margin=0.5)
    off = prepare_federation([ta, tb], tt, "y", seed=0, val_fraction=0.0)
    inst = fed.institutions[0]
    j = fed.features.index("a")
    model = load_model(save_model(tmp_path / "m", inst, "fedavg", (8,), fed.scaler, {}))
    X_new, _ = model.design_matrix(test)

    # Assert: clipped to the standardised min and max of a's own training rows; in range, untouched
    lo = (a["a"].min() - fed.scaler.mean[j]) / fed.scaler.scale[j]
    hi = (a["a"].max() - fed.scaler.mean[j]) / fed.scaler.scale[j]
    np.testing.assert_allclose(inst.X_test[[0, 1], j], [hi, lo], rtol=1e-6)
    inside = (test["a"] >= a["a"].min()) & (test["a"] <= a["a"].max())
    np.testing.assert_allclose(inst.X_test[inside.to_numpy(), j],
                               (test["a"][inside] - fed.scaler.mean[j]) / fed.scaler.scale[j], rtol=1e-5)
    np.testing.assert_array_equal(X_new, inst.X_test)  # a saved model clips new data the same way
    # a margin widens the range by that fraction of it on each side; no margin given: no clipping
    np.testing.assert_allclose(wide.institutions[0].X_test[[0, 1], j], [hi + 0.5 * (hi - lo), lo - 0.5 * (hi - lo)],
                               rtol=1e-5)
    far = (1e6 - fed.scaler.mean[j]) / fed.scaler.scale[j]
    np.testing.assert_allclose(off.institutions[0].X_test[0, j], far, rtol=1e-5)


def test_test_set_lacking_an_institution_column(tmp_path):
    from fedmdh.data.federation import prepare_federation

    a = _good(20)
    a["extra"] = np.arange(20.0)
    ta = load_institution(_write(tmp_path / "a.csv", a), "y")
    tb = load_institution(_write(tmp_path / "b.csv", _good(20, 1)), "y")
    tt = load_institution(_write(tmp_path / "t.csv", _good(20, 2)), "y", name="test")
    with pytest.raises(InputError, match=r"t\.csv: the test set lacks column 'extra' of institution a"):
        prepare_federation([ta, tb], tt, "y")


@pytest.mark.parametrize("value, expected", [("abc", "takes a margin >= 0 or off"), ("-1", "margin >= 0")])
def test_cli_bad_clip_margin(tmp_path, capsys, value, expected):
    a = _write(tmp_path / "a.csv", _good(20))
    b = _write(tmp_path / "b.csv", _good(20, 1))
    t = _write(tmp_path / "t.csv", _good(20, 2))
    line = _cli_error(capsys, ["benchmark", "--institutions", a, b, "--test", t, "--target", "y", "--algorithms",
                               "fedavg", "--clip-inputs", value, "--out", str(tmp_path / "out")])
    assert expected in line


def test_cli_unknown_algorithm(tmp_path, capsys):
    a = _write(tmp_path / "a.csv", _good(20))
    b = _write(tmp_path / "b.csv", _good(20, 1))
    t = _write(tmp_path / "t.csv", _good(20, 2))
    line = _cli_error(
        capsys,
        ["benchmark", "--institutions", a, b, "--test", t, "--target", "y", "--algorithms", "fedavg,fedfoo",
         "--out", str(tmp_path / "out")],
    )
    assert "unknown algorithm 'fedfoo'" in line and "fedavg" in line


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_text(""), "the file is empty"),
        (lambda p: p.write_text("a,b,c\n" + "1,2,3\n" * 12), "target column 'y' not found"),
        (lambda p: p.write_text("a,y\n" + "1,2\n" * 5), "an institution needs at least 10"),
    ],
)
def test_cli_run_bad_file_exits_2_with_one_line(tmp_path, capsys, make, expected):
    bad = tmp_path / "bad.csv"
    make(bad)
    good = _write(tmp_path / "good.csv", _good(20))
    t = _write(tmp_path / "t.csv", _good(20, 2))
    line = _cli_error(
        capsys,
        ["run", "--institutions", str(bad), good, "--test", t, "--target", "y", "--out", str(tmp_path / "o")],
    )
    assert "bad.csv" in line and expected in line


def test_cli_missing_file(tmp_path, capsys):
    line = _cli_error(capsys, ["heterogeneity", "--target", "y", str(tmp_path / "nope.csv")])
    assert "nope.csv: file not found" in line
