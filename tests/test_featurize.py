"""Tests of fedmdh.data.featurize and the ``fedmdh featurize`` command."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmdh.cli import main
from fedmdh.data.featurize import PRESETS, featurize_frame
from fedmdh.errors import InputError

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
WOLVERTON = DATASETS / "wolverton_oxides" / "wolverton_oxides.csv"


def _wolverton() -> pd.DataFrame:
    if not WOLVERTON.exists():
        reason = f"shared dataset {WOLVERTON} not found (the checkout's parent has no shared/datasets)"
        print(reason)
        pytest.skip(reason)
    return pd.read_csv(WOLVERTON)


def _matminer(formulas, preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from matminer.featurizers.composition import ElementProperty
        from pymatgen.core import Composition

        ep = ElementProperty.from_preset(preset)
        return ep.feature_labels(), np.array([ep.featurize(Composition(f)) for f in formulas], dtype=float)


@pytest.mark.parametrize("preset", ["magpie", "deml", "megnet_el"])
def test_features_equal_matminer_called_directly(preset):
    formulas = _wolverton()["formula"].iloc[[0, 1, 500, 2000, 4913]].tolist()
    frame = pd.DataFrame({"formula": formulas + [formulas[0]], "y": np.arange(6.0)})
    out, report = featurize_frame(frame, "formula", preset)
    labels, expected = _matminer(formulas + [formulas[0]], preset)
    assert list(out.columns) == ["formula", "y", *labels]
    assert report.features == tuple(labels)
    assert report.n_bad == 0 and report.rows_out == 6
    np.testing.assert_array_equal(out[labels].to_numpy(), expected)
    pd.testing.assert_frame_equal(out[["formula", "y"]], frame)


def test_repeated_formulas_are_featurized_once():
    frame = pd.DataFrame({"formula": ["NaCl", "Fe2O3", "NaCl", "Fe2O3", "BaTiO3", "NaCl"], "y": range(6)})
    calls = []
    out, report = featurize_frame(frame, "formula", "deml", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (3, 3)
    assert report.unique_formulas == 3
    np.testing.assert_array_equal(out.iloc[0, 2:].to_numpy(), out.iloc[5, 2:].to_numpy())


def test_unparseable_formulas_reported_with_line_numbers():
    # data rows 1, 3 and 4 are bad -> file lines 3, 5 and 6 (header = line 1)
    frame = pd.DataFrame({
        "formula": ["NaCl", "Xx2O3", "Fe2O3", None, "Na(Cl", "BaTiO3"],
        "y": np.arange(6.0),
    })
    out, report = featurize_frame(frame, "formula", "magpie", source="t.csv")
    assert report.n_bad == 3
    assert report.bad_lines == (3, 5, 6)
    assert list(out["formula"]) == ["NaCl", "Fe2O3", "BaTiO3"]
    assert list(out.index) == [0, 2, 5]
    line = report.warning_line()
    assert "\n" not in line and "3 rows" in line and "lines 3, 5, 6" in line
    with pytest.raises(InputError, match=r"3 formulas could not be parsed \(lines 3, 5, 6"):
        featurize_frame(frame, "formula", "magpie", source="t.csv", strict=True)


def test_bad_preset_missing_column_and_clash():
    frame = pd.DataFrame({"formula": ["NaCl"], "y": [1.0]})
    with pytest.raises(InputError) as exc:
        featurize_frame(frame, "formula", "nope")
    for p in PRESETS:
        assert p in str(exc.value)
    with pytest.raises(InputError, match="formula column 'comp' not found"):
        featurize_frame(frame, "comp", "magpie")
    clash = frame.assign(**{"DemlData minimum atom_num": [0.0]})
    with pytest.raises(InputError, match="DemlData minimum atom_num"):
        featurize_frame(clash, "formula", "deml")


def test_cli_featurize_warns_and_strict_exits_2(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("formula,y\nNaCl,1\nQq3,2\nFe2O3,3\n")
    dst = tmp_path / "out.csv"
    main(["featurize", "--preset", "deml", str(src), str(dst)])
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warn) == 1 and "1 row" in warn[0] and "line 3" in warn[0]
    written = pd.read_csv(dst)
    assert list(written["formula"]) == ["NaCl", "Fe2O3"] and written.shape[1] == 2 + 80

    with pytest.raises(SystemExit) as exc:
        main(["featurize", "--strict", str(src), str(tmp_path / "o2.csv")])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "line 3" in err[0] and "Qq3" in err[0]
    assert not (tmp_path / "o2.csv").exists()
