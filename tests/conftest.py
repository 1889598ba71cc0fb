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


@pytest.fixture(scope="session", autouse=True)
def fedmdh_home(tmp_path_factory):
    """Keys and other per-user state go to a temporary $FEDMDH_HOME, never to the real home."""
    home = tmp_path_factory.mktemp("fedmdh_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMDH_HOME", str(home))
        mp.delenv("FEDMDH_KEYSTORE", raising=False)
        yield home


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


def _chain_processes() -> list[str]:
    """The embedded chain processes this test process started and has not stopped (Linux /proc)."""
    import os

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and "fedmdh.ledger.node" in cmd:
            out.append(f"{stat.parent.name}: {cmd.strip()}")
    return out


@pytest.fixture(autouse=True)
def no_chain_process_left_behind(request):
    """Every test that starts the embedded chain's process stops it (checked after each test)."""
    before = set(_chain_processes())
    yield
    left = [p for p in _chain_processes() if p not in before]
    assert not left, f"{request.node.nodeid} left chain processes running: {left}"
