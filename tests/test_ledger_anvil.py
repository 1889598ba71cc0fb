"""Integration: a short fedavg run recorded on a real local node (anvil on 127.0.0.1), then verified.

The binary comes from $FEDMDH_ANVIL or the project-local npm install (.tools/, done by .ci/run);
without it the test is skipped with the reason printed.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _anvil_binary() -> str | None:
    env = os.environ.get("FEDMDH_ANVIL")
    if env and Path(env).is_file():
        return env
    hits = sorted(glob.glob(str(ROOT / ".tools" / "node_modules" / "@foundry-rs" / "anvil-*" / "bin" / "anvil")))
    return hits[0] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def anvil_url():
    binary = _anvil_binary()
    if binary is None:
        reason = "anvil not found: set FEDMDH_ANVIL or run `npm install --prefix .tools @foundry-rs/anvil@1.7.1`"
        print(reason)
        pytest.skip(reason)
    port = _free_port()
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"anvil did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_short_fedavg_run_on_anvil_records_verifies_and_archives(anvil_url, perovskite, tmp_path, monkeypatch):
    # Prepare
    from fedmdh.cli import main
    from fedmdh.config import ExperimentConfig
    from fedmdh.experiment.runner import run_experiment
    from fedmdh.audit import get_model, show, verify
    from fedmdh.ledger.options import LedgerOptions

    monkeypatch.setenv("FEDMDH_KEY_PASSPHRASE", "test passphrase")
    monkeypatch.setenv("FEDMDH_KEY_KDF", "pbkdf2")
    monkeypatch.setenv("FEDMDH_KEY_KDF_ITERATIONS", "1000")
    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                           target="e_form", rounds=2, algorithms=("fedavg",), seeds=1)
    out = tmp_path / "run"

    # Execute
    run_experiment(cfg, "fedavg", out, ledger=LedgerOptions(mode="rpc", rpc_url=anvil_url, keystore=tmp_path / "keys"))
    info = show(out)
    report = verify(out)
    got = get_model(tmp_path / "got", rpc_url=anvil_url, task=info["task"]["contract"])
    main(["ledger", "verify", str(out), "--chain-rpc", anvil_url])

    # Assert
    assert info["task"]["chain"] == "rpc" and info["task"]["chain_id"] == 31337
    assert [r["finalized"] is not None for r in info["rounds"]] == [True, True]
    assert report.ok, str(report)
    assert any("read" in n and anvil_url in n for n in report.notes)
    assert (tmp_path / "got" / "train_part0" / "params.npz").read_bytes() == (
        out / "models" / "train_part0" / "params.npz").read_bytes()
    assert got["model_hash"] == info["archive"]["model_hash"][2:]
    assert len(list((tmp_path / "keys").glob("*.json"))) == 4


def test_an_rpc_run_whose_log_lost_its_end_fails_against_the_node(anvil_url, perovskite, tmp_path, monkeypatch):
    # Prepare: a 1-round run on anvil, then the log's last 4 lines (model attestations, archive) removed
    from fedmdh.config import ExperimentConfig
    from fedmdh.experiment.runner import run_experiment
    from fedmdh.audit import verify
    from fedmdh.ledger.options import LedgerOptions

    monkeypatch.setenv("FEDMDH_KEY_PASSPHRASE", "test passphrase")
    monkeypatch.setenv("FEDMDH_KEY_KDF", "pbkdf2")
    monkeypatch.setenv("FEDMDH_KEY_KDF_ITERATIONS", "1000")
    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                           target="e_form", rounds=1, algorithms=("fedavg",), seeds=1)
    out = tmp_path / "run"
    run_experiment(cfg, "fedavg", out, ledger=LedgerOptions(mode="rpc", rpc_url=anvil_url, keystore=tmp_path / "keys"))
    log = out / "ledger" / "transactions.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-4]))

    # Execute
    report = verify(out, partial=True)

    # Assert: the node's contract holds the archive the log lost
    assert not report.ok
    assert "the task's contract on the node archived model" in report.problem
    assert "the log holds no archive: the log lost its end" in report.problem
