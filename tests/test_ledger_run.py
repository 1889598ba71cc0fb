"""Runs recorded on the embedded chain: verify on fresh and tampered runs, dissent, interruption, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmdh.algorithms.base import FederationSpec, Update
from fedmdh.cli import main
from fedmdh.config import ExperimentConfig
from fedmdh.experiment.runner import run_experiment
from fedmdh.ledger import codec
from fedmdh.audit import get_model, show, verify
from fedmdh.ledger.errors import LedgerError
from fedmdh.ledger.options import LedgerOptions
from fedmdh.ledger.recorder import open_ledger
from fedmdh.runtime.simulator import simulate


def _cfg(perovskite, rounds: int) -> ExperimentConfig:
    return ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                            target=perovskite["target"], rounds=rounds, algorithms=("fedavg",), seeds=1)


@pytest.fixture(scope="module")
def recorded_run(perovskite, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ledger_run") / "run"
    run_experiment(_cfg(perovskite, 3), "fedavg", out)
    return out


@pytest.fixture
def run_copy(recorded_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded_run, dst)
    return dst


def _commit_hash(run: Path, rnd: int, inst: str) -> str:
    info = show(run)
    return info["rounds"][rnd - 1]["commitments"][inst]["update_hash"][2:]


def test_a_fresh_run_verifies(recorded_run):
    # Execute
    report = verify(recorded_run)

    # Assert
    assert report.ok, str(report)
    assert report.rounds_verified == 3


def test_show_lists_every_round_with_three_commitments_and_the_archive(recorded_run):
    # Execute
    info = show(recorded_run)

    # Assert
    assert [r["round"] for r in info["rounds"]] == [1, 2, 3]
    assert all(len(r["commitments"]) == 3 and r["finalized"] and r["gas"] > 0 for r in info["rounds"])
    assert info["archive"] is not None and info["ended"]


def test_the_onchain_mean_is_the_weighted_mean_of_the_committed_losses(recorded_run):
    # Prepare: the default on-chain vector holds each update's loss
    info = show(recorded_run)
    blobs = recorded_run / "ledger" / "blobs"
    r1 = info["rounds"][0]
    ups = [codec.decode_update((blobs / c["update_hash"][2:]).read_bytes()) for c in r1["commitments"].values()]

    # Execute
    onchain = r1["onchain_mean"]["metric:loss"]

    # Assert
    expected = sum(u.metrics["loss"] * u.num_examples for u in ups) / sum(u.num_examples for u in ups)
    assert abs(onchain - expected) <= 1.5 / codec.SCALE + 1e-15 * abs(expected)


def test_an_altered_update_blob_is_named_by_round_and_institution(run_copy):
    # Prepare
    blob = run_copy / "ledger" / "blobs" / _commit_hash(run_copy, 2, "train_part1")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))

    # Execute
    report = verify(run_copy)

    # Assert
    assert not report.ok
    assert "round 2, institution train_part1" in report.problem
    assert report.rounds_verified == 1


def test_verify_on_the_command_line_passes_then_fails_naming_the_spot(run_copy, capsys):
    # Prepare / Execute: fresh
    main(["ledger", "verify", str(run_copy)])
    fresh = capsys.readouterr().out
    (run_copy / "ledger" / "blobs" / _commit_hash(run_copy, 3, "train_part0")).write_bytes(b"forged")
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "verify", str(run_copy)])
    tampered = capsys.readouterr().out

    # Assert
    assert fresh.startswith("OK")
    assert exc.value.code == 1
    assert "FAILED" in tampered and "round 3, institution train_part0" in tampered


def test_an_altered_transaction_log_does_not_replay(run_copy):
    # Prepare: change the sample count a participant claims in its logged receipt
    path = run_copy / "ledger" / "transactions.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    i = next(k for k, r in enumerate(recs) if r["fn"] == "commit" and r["round"] == 2)
    data = recs[i]["logs"][0]["data"]
    recs[i]["logs"][0]["data"] = data[:-1] + ("e" if data[-1] == "f" else "f")  # always a change
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))

    # Execute
    report = verify(run_copy)

    # Assert
    assert not report.ok and "commit of round 2" in report.problem


def test_a_model_file_altered_after_the_run_is_caught_and_model_get_restores_it(run_copy, tmp_path):
    # Prepare
    params = run_copy / "models" / "train_part2" / "params.npz"
    original = params.read_bytes()
    params.write_bytes(original + b"\0")

    # Execute
    report = verify(run_copy)
    info = get_model(tmp_path / "got", run_dir=run_copy)

    # Assert
    assert not report.ok and "models/train_part2/params.npz" in report.problem
    assert (tmp_path / "got" / "train_part2" / "params.npz").read_bytes() == original
    assert len(info["files"]) == 6


def _ledger_sim(perovskite_fed, tmp_path, rounds, attest_hook=None, quorum=None):
    from fedmdh.config import ExperimentConfig  # noqa: F401 - same algorithm settings as a run

    algo = ExperimentConfig(institutions=("a", "b"), test="t", target="y", algorithms=("fedavg",)).build_algorithm(
        "fedavg")
    rec = open_ledger(LedgerOptions(quorum=quorum), tmp_path / "ledger", algo, perovskite_fed.names, "e_form",
                      rounds, algo.init(FederationSpec.from_federation(perovskite_fed), 0), attest_hook=attest_hook,
                      archive=False)  # these tasks end without an archived model
    return algo, rec


def test_a_dissenting_participant_is_named_and_the_run_continues_with_the_quorum_aggregate(perovskite_fed, tmp_path):
    # Prepare: train_part2 attests a forged aggregate every round
    liar = lambda inst, rnd, h: bytes(32 * [7]) if inst == "train_part2" else h  # noqa: E731
    algo, rec = _ledger_sim(perovskite_fed, tmp_path, 2, attest_hook=liar)
    plain = simulate(perovskite_fed, algo, 2, seed=0)

    # Execute
    res = simulate(perovskite_fed, algo, 2, seed=0, round_hook=rec.round_hook)
    rec.close()
    report = verify(tmp_path, algorithm=algo)

    # Assert
    assert report.ok, str(report)
    assert any("institution train_part2 attested a different aggregate" in n for n in report.notes)
    assert [r["dissent"] for r in show(tmp_path)["rounds"]] == [["train_part2"], ["train_part2"]]
    assert res.history[-1].rmse == plain.history[-1].rmse


def _majority_forges(perovskite_fed, tmp_path, pipeline: bool):
    """Two of three participants attest the hash of a forged aggregate (stored as a blob)."""
    from fedmdh.ledger.recorder import LedgerRecorder

    forged: dict[int, bytes] = {}
    payloads: dict[int, dict] = {}
    algo = ExperimentConfig(institutions=("a", "b"), test="t", target="y", algorithms=("fedavg",)).build_algorithm(
        "fedavg")
    rec: LedgerRecorder = open_ledger(LedgerOptions(pipeline=pipeline), tmp_path / "ledger", algo, perovskite_fed.names,
                                      "e_form", 3, algo.init(FederationSpec.from_federation(perovskite_fed), 0),
                                      attest_hook=lambda inst, rnd, h: forged.get(rnd, h) if inst != "train_part0" else h)
    honest_hook = rec.round_hook

    def hook(rnd, updates, aggregate):
        payloads[rnd] = {k: v + 1.0 for k, v in aggregate.items()}
        forged[rnd] = bytes.fromhex(rec.blobs.put(codec.encode_payload(payloads[rnd])))
        return honest_hook(rnd, updates, aggregate)

    hook.payloads = payloads
    return algo, rec, hook


def test_pipelined_a_round_that_finalizes_another_aggregate_stops_the_run_one_round_later(perovskite_fed, tmp_path):
    # Prepare
    algo, rec, hook = _majority_forges(perovskite_fed, tmp_path, pipeline=True)

    # Execute / Assert: round 2 had started from this process's aggregate, so the run must stop
    with pytest.raises(LedgerError, match="round 1 finalized the aggregate .* not the"):
        simulate(perovskite_fed, algo, 3, seed=0, round_hook=hook)
    rec.close()
    assert [r["dissent"] for r in show(tmp_path)["rounds"]][:1] == [["train_part0"]]


def test_unpipelined_the_run_continues_from_the_aggregate_the_quorum_finalized(perovskite_fed, tmp_path):
    # Prepare
    algo, rec, hook = _majority_forges(perovskite_fed, tmp_path, pipeline=False)
    seen = []

    def spy(rnd, updates, aggregate):
        out = hook(rnd, updates, aggregate)
        forged = hook.payloads[rnd]
        seen.append(sorted(out) == sorted(forged) and all(np.array_equal(out[k], forged[k]) for k in forged))
        return out

    # Execute
    simulate(perovskite_fed, algo, 3, seed=0, round_hook=spy)
    rec.close()

    # Assert: every round continued from the aggregate the (forging) quorum finalized
    assert seen == [True, True, True]
    assert all(r["finalized"] for r in show(tmp_path)["rounds"])


def test_without_a_quorum_the_round_does_not_finalize_and_the_run_stops(perovskite_fed, tmp_path):
    # Prepare: every participant attests something different
    algo, rec = _ledger_sim(perovskite_fed, tmp_path, 2,
                            attest_hook=lambda inst, rnd, h: bytes([1 + int(inst[-1])]) * 32)

    # Execute / Assert
    with pytest.raises(LedgerError, match="round 1 did not finalize"):
        simulate(perovskite_fed, algo, 2, seed=0, round_hook=rec.round_hook)
    rec.close()
    assert show(tmp_path)["rounds"][0]["failed"]


def test_a_run_interrupted_mid_round_is_inspected_and_verified_up_to_its_last_finalized_round(perovskite_fed, tmp_path):
    # Prepare: the process dies during round 3's attestations
    def crash(inst, rnd, h):
        if rnd == 3 and inst == "train_part1":
            raise KeyboardInterrupt
        return h

    algo, rec = _ledger_sim(perovskite_fed, tmp_path, 4, attest_hook=crash)

    # Execute
    with pytest.raises(KeyboardInterrupt):
        simulate(perovskite_fed, algo, 4, seed=0, round_hook=rec.round_hook)
    rec.close()
    with (tmp_path / "ledger" / "transactions.jsonl").open("a") as fh:
        fh.write('{"fn": "commit", "trunc')  # a torn last line
    info = show(tmp_path)
    strict = verify(tmp_path, algorithm=algo)
    report = verify(tmp_path, algorithm=algo, partial=True)

    # Assert: incomplete unless a partial run is accepted; then verified up to round 2
    assert [r["finalized"] is not None for r in info["rounds"]] == [True, True, False]
    assert not strict.ok and strict.problem.startswith("incomplete: 2 of 4 rounds finalized, no archive")
    assert report.ok and report.rounds_verified == 2 and str(report).startswith("OK (partial)")
    assert any("round 3 was not finalized" in n for n in report.notes)
    assert any("cut mid-line" in n for n in report.notes)


def test_an_algorithm_can_choose_its_onchain_vectors():
    # Prepare
    class WithMoments:
        def onchain_vectors(self, update):
            return {"moments": np.array([1.0, 2.0, 3.0])}

    upd = Update("a", {"w": np.ones((4, 4), dtype=np.float32)}, 5, {"loss": 0.5})

    # Execute
    custom = codec.flatten(codec.onchain_vectors(WithMoments(), upd))
    default = codec.flatten(codec.onchain_vectors(object(), upd))

    # Assert
    assert custom[0] == [("moments", 3)] and custom[1].tolist() == [1.0, 2.0, 3.0]
    assert default[0] == [("mean:w", 1), ("metric:loss", 1)] and default[1].tolist() == [1.0, 0.5]


def test_update_serialization_round_trips_bit_for_bit():
    # Prepare
    upd = Update("inst", {"b": np.arange(3, dtype=np.float64), "a": np.ones((2, 2), dtype=np.float32)}, 7,
                 {"loss": 0.1 + 0.2})

    # Execute
    back = codec.decode_update(codec.encode_update(upd))

    # Assert
    assert codec.encode_update(back) == codec.encode_update(upd)
    assert back.metrics["loss"] == 0.1 + 0.2 and back.payload["a"].dtype == np.float32


def test_run_on_the_command_line_records_by_default_and_not_with_ledger_off(perovskite, tmp_path, capsys):
    # Prepare
    base = ["run", "--institutions", *perovskite["institutions"], "--test", perovskite["test"],
            "--target", "e_form", "--rounds", "1"]

    # Execute
    main([*base, "--out", str(tmp_path / "on")])
    main([*base, "--out", str(tmp_path / "off"), "--ledger", "off"])
    main(["ledger", "show", str(tmp_path / "on")])
    out = capsys.readouterr().out

    # Assert
    assert (tmp_path / "on" / "ledger" / "task.json").exists()
    assert not (tmp_path / "off" / "ledger").exists()
    assert "train_part0" in out and "archive:" in out


def test_ledger_rpc_without_a_url_is_a_user_error(perovskite, tmp_path, capsys):
    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["run", "--institutions", *perovskite["institutions"], "--test", perovskite["test"],
              "--target", "e_form", "--rounds", "1", "--out", str(tmp_path / "r"), "--ledger", "rpc"])

    # Assert
    assert exc.value.code == 2
    assert "--chain-rpc" in capsys.readouterr().err


def test_the_embedded_chain_process_exits_with_the_process_that_started_it():
    # Prepare: a parent that starts the chain's process and dies without stopping it
    import os
    import subprocess
    import sys
    import time

    code = ("from fedmdh.ledger.node import EmbeddedNode; n = EmbeddedNode(); print(n.proc.pid, flush=True); "
            "import os; os._exit(0)")

    # Execute
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    # Assert: gone within seconds (its stdin closed with the parent)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"the chain process {pid} outlived its parent")


def test_show_prints_one_line_per_round_by_default_and_the_detail_of_the_rounds_asked(recorded_run, capsys):
    # Prepare
    info = show(recorded_run)
    r2 = info["rounds"][1]

    # Execute
    main(["ledger", "show", str(recorded_run)])
    compact = capsys.readouterr().out.splitlines()
    main(["ledger", "show", str(recorded_run), "--round", "2"])
    one = capsys.readouterr().out
    main(["ledger", "show", str(recorded_run), "--rounds", "2:3"])
    two = capsys.readouterr().out
    main(["ledger", "show", str(recorded_run), "--json"])
    full = json.loads(capsys.readouterr().out)

    # Assert: the compact view has a line per round and no commitment; the detail names every update hash
    assert [line.split(":")[0] for line in compact if line.startswith("round ")] == ["round 1", "round 2", "round 3"]
    assert f"round 2: finalized {r2['finalized'][2:14]}, 3 commitments, 3 attestations" in "\n".join(compact)
    assert not any("commitment " in line for line in compact)
    assert all(f"commitment {n}: update {c['update_hash']} x {c['num_examples']} examples" in one
               for n, c in r2["commitments"].items())
    assert "round 1:" not in one and "round 3:" not in one
    assert "round 2:" in two and "round 3:" in two and "round 1:" not in two
    assert [r["round"] for r in full["rounds"]] == [1, 2, 3] and full["rounds"][1]["commitments"] == r2["commitments"]


@pytest.mark.parametrize("args,says", [
    (["--rounds", "3-5"], "--rounds '3-5': give A:B with 1 <= A <= B"),
    (["--rounds", "3:2"], "--rounds '3:2': give A:B with 1 <= A <= B"),
    (["--round", "9"], "the log holds rounds 1-3; nothing in 9:9"),
    (["--round", "2", "--rounds", "1:2"], "give --round R or --rounds A:B, not both"),
])
def test_show_with_a_bad_round_range_says_so_in_one_line(recorded_run, capsys, args, says):
    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "show", str(recorded_run), *args])

    # Assert
    assert exc.value.code == 2
    assert says in " ".join(capsys.readouterr().err.split())
