"""Shared fixtures: the real datasets beside the checkout (../shared/datasets), skipped if absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PEROVSKITE = SHARED_DATASETS / "fedmdh_perovskite_split"


def require(path: Path) -> Path:
    """Return ``path`` or skip the test, printing why."""
    if not path.exists():
        reason = f"optional dataset not found: {path} (tests read ../shared/datasets beside the checkout)"
        print(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def perovskite() -> dict[str, object]:
    """Paths of the FedMDH paper's perovskite split: three institutions and the test file."""
    folder = require(PEROVSKITE)
    return {
        "institutions": [str(folder / f"train_part{i}.csv") for i in range(3)],
        "test": str(folder / "test_data1.csv"),
        "target": "e_form",
    }


@pytest.fixture(scope="session")
def perovskite_tables(perovskite):
    from fedmdh.data.io import load_institution

    tables = [load_institution(p, "e_form") for p in perovskite["institutions"]]
    test = load_institution(perovskite["test"], "e_form", name="test")
    return tables, test


@pytest.fixture(scope="session")
def perovskite_fed(perovskite_tables):
    from fedmdh.data.federation import prepare_federation

    tables, test = perovskite_tables
    return prepare_federation(tables, test, "e_form", seed=0)
