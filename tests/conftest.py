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


# -- tiers -----------------------------------------------------------------------------------------
#: The slow tiers by test module (markers registered in pyproject.toml). ``make test-fast`` (``pytest -m
#: "not slow"``) leaves every one of them out; ``make test`` and CI run everything.
#:
#: - ``deploy``: real processes (SuperLink, SuperNodes, nodes, a chain);
#: - ``openfhe``: threshold CKKS through OpenFHE's interpreter;
#: - ``browser``: Playwright driving Debian's chromium against a real service;
#: - ``chain``: a real anvil node;
#: - ``slow``: every test of the above, and the modules whose tests train for minutes.
TIERS: dict[str, tuple[str, ...]] = {
    "test_deploy": ("deploy",),
    "test_deploy_cli": ("deploy",),
    "test_failover": ("deploy",),
    "test_availability": ("deploy",),
    "test_chaos": ("deploy",),
    "test_secure_deploy": ("deploy", "openfhe"),
    "test_secure": ("openfhe",),
    "test_service_browser": ("browser",),
    "test_ledger_anvil": ("chain",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem if hasattr(item, "path") else ""
        tiers = TIERS.get(module, ())
        for tier in tiers:
            item.add_marker(getattr(pytest.mark, tier))
        if tiers or module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)


#: modules and single tests (by module) that take minutes without any of the tiers' services (``--durations``:
#: the service's reliability tests start real servers, one waits 90 s for a task to run; the wolverton
#: presets featurize 4,000 compositions in their fixture, about 2 minutes)
SLOW_MODULES: frozenset[str] = frozenset({"test_reliability_service"})
SLOW_TESTS: dict[str, tuple[str, ...]] = {
    "test_partition": ("test_presets_reached_on_wolverton", "test_same_seed_gives_identical_files"),
}
