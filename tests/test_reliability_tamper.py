"""Tampering with a recorded run folder: what ``ledger verify``, ``ledger show`` and ``model get`` say.

One real run (fedavg, 6 rounds, 3 institutions, the embedded chain) is recorded per module; each
test tampers with a copy of it. docs/reliability.md lists every case with what the tool says.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from fedmdh.cli import main
from fedmdh.config import ExperimentConfig
from fedmdh.errors import InputError
from fedmdh.experiment.runner import load_tables, run_experiment
from fedmdh.audit import get_model, show, verify
from fedmdh.ledger.options import LedgerOptions

ROUNDS = 6
TX = "transactions.jsonl"
ONE_PARTY = "signed by keys held by one party: shows what happened, not who agreed"


@pytest.fixture(scope="module")
def recorded(perovskite, tmp_path_factory) -> Path:
    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                           target=perovskite["target"], rounds=ROUNDS, algorithms=("fedavg",), seeds=1)
    out = tmp_path_factory.mktemp("tamper") / "run"
    run_experiment(cfg, "fedavg", out)
    return out


@pytest.fixture
def run(recorded, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------ helpers


def _log(run: Path) -> Path:
    return run / "ledger" / TX


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in _log(run).read_text().splitlines()]


def _write_records(run: Path, recs: list[dict]) -> None:
    _log(run).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))


def _find(recs: list[dict], fn: str, rnd: int | None = None, actor: str | None = None) -> int:
    return next(i for i, r in enumerate(recs) if r["fn"] == fn and (rnd is None or r.get("round") == rnd)
                and (actor is None or r.get("actor") == actor))


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def _keep_lines(run: Path, n: int) -> None:
    lines = _log(run).read_text().splitlines(keepends=True)
    _log(run).write_text("".join(lines[:n]))


def _drop_archive(run: Path) -> None:
    """Remove the log's last 4 lines: the participants' model attestations and the archive."""
    lines = _log(run).read_text().splitlines(keepends=True)
    assert [json.loads(x)["fn"] for x in lines[-4:]] == ["attest_model"] * 3 + ["archive"]
    _log(run).write_text("".join(lines[:-4]))


def _cut_mid_line(run: Path) -> None:
    text = _log(run).read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    _log(run).write_text(text[: last + (len(text) - last) // 2])


def _blob(run: Path, digest: str) -> Path:
    return run / "ledger" / "blobs" / digest


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _aggregate(run: Path, rnd: int) -> Path:
    return _blob(run, show(run)["rounds"][rnd - 1]["finalized"][2:])


def _edit_record(fn: str, rnd: int | None, actor: str | None, edit):
    def tamper(run: Path) -> None:
        recs = _records(run)
        edit(recs[_find(recs, fn, rnd, actor)])
        _write_records(run, recs)
    return tamper


def _set(key, value):
    def edit(obj):
        obj[key] = value(obj[key]) if callable(value) else value
    return edit


def _task(edit):
    return lambda run: _edit_json(run / "ledger" / "task.json", edit)


def _replace_in(rel: str, old: str, new: str):
    def tamper(run: Path) -> None:
        path = run / rel
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
    return tamper


# ------------------------------------------------------------------ ledger verify: each tamper case

#: (case, tamper, what the report must say)
CASES = [
    ("log-last-lines-removed", _drop_archive, "incomplete: 6 of 6 rounds finalized, no archive"),
    ("log-cut-mid-line", _cut_mid_line, "incomplete: 6 of 6 rounds finalized, no archive"),
    ("log-cut-to-40-lines", lambda run: _keep_lines(run, 40), "incomplete: 5 of 6 rounds finalized, no archive"),
    ("archive-removed-and-model-altered",
     lambda run: (_drop_archive(run), _flip(run / "models" / "train_part0" / "params.npz")),
     "incomplete: 6 of 6 rounds finalized, no archive"),
    ("archive-tx-hash-removed", _edit_record("archive", None, None, lambda r: r.pop("tx_hash")),
     "archive by submitter (line 48 of transactions.jsonl): recorded as accepted, yet it has no transaction hash"),
    ("task-rounds-6-to-4", _task(_set("rounds", 4)),
     "task.json says rounds 4, the task was created on chain with 6 (TaskCreated event)"),
    ("task-algorithm-changed", _task(_set("algorithm", "fedprox")),
     "task.json says algorithm 'fedprox', the task was created on chain with 'fedavg'"),
    ("task-lr-changed", _task(lambda t: t["hyperparameters"].update(lr=0.05)),
     "task.json's hyperparameters entry differs from the task manifest committed on chain at task creation: lr 0.05 "
     "here vs 0.2 committed"),
    ("task-initial-state-changed", _task(_set("initial_state", "ab" * 32)),
     "task.json's initial_state entry differs from the task manifest committed on chain at task creation"),
    ("task-contract-changed", _task(_set("contract", "0x" + "12" * 20)),
     "task.json names contract 0x1212121212121212121212121212121212121212, the log deployed 0x"),
    ("task-chain-switched-to-an-unreachable-node",
     _task(lambda t: t.update(chain="rpc", rpc_url="http://127.0.0.1:9")),
     "task.json says the task was recorded on the chain node at http://127.0.0.1:9, yet its transactions are signed "
     "for chain 131277322940537, the embedded chain's: the task file was edited"),
    ("config-lr-changed", _replace_in("config.toml", "lr = 0.2", "lr = 0.05"),
     "config.toml differs from the config committed on chain at task creation"),
    ("config-algorithm-changed", _replace_in("config.toml", '"fedavg",\n]', '"fedprox",\n]'),
     "config.toml differs from the config committed on chain at task creation"),
    ("config-deleted", lambda run: (run / "config.toml").unlink(), "config.toml is missing"),
    ("record-round-edited", _edit_record("commit", 2, "train_part1", _set("round", 3)),
     "commit of round 3 by train_part1 (line 16 of transactions.jsonl): its recorded round is 3, its signed bytes "
     "say 2"),
    ("record-gas-used-edited", _edit_record("attest", 4, "train_part0", _set("gas_used", lambda g: g + 1)),
     "attest of round 4 by train_part0 (line 30 of transactions.jsonl): its recorded gas_used is"),
    ("record-actor-edited", _edit_record("commit", 2, "train_part1", _set("actor", "train_part2")),
     "its recorded actor is 'train_part2', the account is train_part1's"),
    ("event-sample-count-edited",
     _edit_record("commit", 2, "train_part1",
                  lambda r: r["logs"][0].update(data=r["logs"][0]["data"][:-1]
                                                + ("e" if r["logs"][0]["data"][-1] == "f" else "f"))),
     "commit of round 2 by train_part1 (line 16 of transactions.jsonl) does not replay to its recorded receipt: "
     "its Committed event differs: num_examples"),
    ("aggregate-blob-altered", lambda run: _flip(_aggregate(run, 3)), "round 3: aggregate blob"),
    ("aggregate-blob-deleted", lambda run: _aggregate(run, 3).unlink(), "round 3: aggregate blob"),
    ("model-file-deleted", lambda run: (run / "models" / "train_part1" / "params.npz").unlink(),
     "model file models/train_part1/params.npz is missing from the run folder (the archive holds it)"),
    ("models-folder-deleted", lambda run: shutil.rmtree(run / "models"),
     "models/ is missing from the run folder; the archive holds its 6 files"),
    ("extra-file-in-models", lambda run: (run / "models" / "train_part0" / "extra.npz").write_bytes(b"x"),
     "models/train_part0/extra.npz is in the run folder's models/ but not in the archived model"),
    ("final-metrics-altered", _replace_in("final_metrics.json", '"best_round": ', '"best_round": 1'),
     "final_metrics.json in the run folder differs from the one archived with the model"),
    ("final-metrics-deleted", lambda run: (run / "final_metrics.json").unlink(),
     "final_metrics.json is missing from the run folder (its sha256 was archived with the model)"),
    ("metrics-jsonl-altered", _replace_in("metrics.jsonl", '"round": 3,', '"round": 3, "note": 1,'),
     "metrics.jsonl in the run folder differs from the one archived with the model"),
    ("federation-json-altered", _replace_in("federation.json", '"target"', '"target_"'),
     "federation.json in the run folder differs from the one archived with the model"),
]


@pytest.mark.parametrize("case,tamper,says", CASES, ids=[c[0] for c in CASES])
def test_verify_catches_the_tampered_run_and_says_what(run, case, tamper, says):
    # Prepare
    tamper(run)

    # Execute
    report = verify(run)

    # Assert
    assert not report.ok, str(report)
    assert says in str(report)
    assert not str(report).startswith("OK")


def test_the_untouched_copy_verifies_and_says_what_it_covers(run):
    # Execute
    report = verify(run)

    # Assert
    text = str(report)
    assert report.ok and report.complete and report.rounds_verified == ROUNDS, text
    assert text.startswith(f"OK: {ROUNDS} of {ROUNDS} rounds finalized and verified; archived model")
    assert ONE_PARTY in report.notes
    assert ("covered: config.toml and the hyperparameters (committed at task creation), models/ (6 files), "
            "federation.json, final_metrics.json, metrics.jsonl; not covered: run.log") in text


def test_a_cut_log_says_so_and_names_what_the_run_folder_still_holds(run):
    # Prepare
    _drop_archive(run)
    _flip(run / "models" / "train_part0" / "params.npz")

    # Execute
    strict = verify(run)
    accepted = verify(run, partial=True)

    # Assert: not OK without --partial; with it, said plainly that the models are not covered
    assert not strict.ok and strict.status == "incomplete"
    assert accepted.ok and str(accepted).startswith("OK (partial): 6 of 6 rounds finalized and verified, no archive")
    assert any("yet the run folder holds models/ and final_metrics.json" in n and "not covered" in n
               for n in accepted.notes)


def test_an_incomplete_run_exits_non_zero_unless_partial_is_given(run, capsys):
    # Prepare: the log cut to 40 lines (round 6 half committed)
    _keep_lines(run, 40)

    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "verify", str(run)])
    strict = capsys.readouterr().out
    main(["ledger", "verify", str(run), "--partial"])
    accepted = capsys.readouterr().out

    # Assert
    assert exc.value.code == 1
    assert strict.startswith("incomplete: 5 of 6 rounds finalized, no archive (rounds 1-5 verified; pass --partial")
    assert accepted.startswith("OK (partial): 5 of 6 rounds finalized and verified, no archive")


# ------------------------------------------------------------------ a flipped byte in a raw transaction


def _flip_commit_calldata(run: Path) -> None:
    """Break the ABI encoding of round 2's commit by train_part1: its vector's offset word."""
    recs = _records(run)
    rec = recs[_find(recs, "commit", 2, "train_part1")]
    import rlp

    raw = bytes.fromhex(rec["raw"][2:])
    assert raw[0] >= 0xC0, "the embedded chain's transactions are legacy (RLP) ones"
    data = rlp.decode(raw)[5].hex()
    at = rec["raw"].index(data) + 2 * (4 + 3 * 32)  # the first byte of the dynamic array's offset
    rec["raw"] = rec["raw"][:at] + "ff" + rec["raw"][at + 2:]
    _write_records(run, recs)


def test_a_flipped_byte_in_a_raw_transaction_fails_verify_naming_the_transaction(run):
    # Prepare
    _flip_commit_calldata(run)

    # Execute
    report = verify(run)

    # Assert
    assert not report.ok
    assert report.problem.startswith("transaction commit of round 2 by train_part1 (line 16 of transactions.jsonl): ")


def test_a_flipped_byte_in_a_raw_transaction_does_not_crash_show(run, capsys):
    # Prepare
    _flip_commit_calldata(run)

    # Execute
    main(["ledger", "show", str(run)])
    out = capsys.readouterr().out

    # Assert: shown as logged, and said to be unchecked
    assert "round 2: finalized" in out
    assert "shown as logged, not checked" in out


def test_a_flipped_byte_in_a_raw_transaction_makes_model_get_refuse_in_one_line(run, tmp_path, capsys):
    # Prepare
    _flip_commit_calldata(run)

    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["model", "get", str(run), "--out", str(tmp_path / "got")])
    err = capsys.readouterr().err

    # Assert
    assert exc.value.code == 2
    assert "the ledger does not verify, so its archive is not trusted" in err
    assert "Traceback" not in err
    assert not (tmp_path / "got").exists()


def test_an_event_that_no_longer_decodes_makes_show_say_so_in_one_line(run, capsys):
    # Prepare
    _edit_record("commit", 2, "train_part1", lambda r: r["logs"][0].update(data="0x12"))(run)

    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "show", str(run)])
    err = capsys.readouterr().err

    # Assert
    assert exc.value.code == 2
    assert "transaction commit of round 2 by train_part1 (line 16 of transactions.jsonl): its receipt does not decode" \
        in " ".join(err.split())


# ------------------------------------------------------------------ model get


def _forge_archived_event(run: Path) -> bytes:
    """Point the log's Archived event at a forged manifest (stored as a blob); returns the forged bytes."""
    from fedmdh.ledger.blobs import DirBlobStore

    blobs = DirBlobStore(run / "ledger" / "blobs")
    recs = _records(run)
    rec = recs[_find(recs, "archive")]
    real = rec["logs"][0]["data"][2:66]
    manifest = json.loads(blobs.get(real))
    forged = b"a model from another run"
    manifest["files"]["models/train_part0/params.npz"] = blobs.put(forged)
    digest = blobs.put(json.dumps(manifest).encode())
    rec["logs"][0]["data"] = "0x" + digest + rec["logs"][0]["data"][66:]
    _write_records(run, recs)
    return forged


def test_model_get_refuses_an_edited_archived_event(run, tmp_path):
    # Prepare
    _forge_archived_event(run)

    # Execute / Assert
    with pytest.raises(InputError, match="archive by submitter .* does not replay to its recorded receipt: its "
                                         "Archived event differs: model_hash"):
        get_model(tmp_path / "got", run_dir=run)
    assert not (tmp_path / "got").exists()


def test_model_get_delivers_the_archived_model_and_says_it_was_replayed(run, tmp_path, capsys):
    # Execute
    main(["model", "get", str(run), "--out", str(tmp_path / "got")])
    out = capsys.readouterr().out

    # Assert
    assert (tmp_path / "got" / "train_part1" / "params.npz").read_bytes() == (
        run / "models" / "train_part1" / "params.npz").read_bytes()
    assert "verified; wrote 6 files to" in out
    assert "replayed 48 signed transactions on a fresh embedded chain" in out


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_model_get_out_that_is_a_file_is_one_line(run, tmp_path, capsys, where):
    # Prepare
    (tmp_path / "f").write_text("not a folder")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"

    # Execute
    with pytest.raises(SystemExit) as exc:
        main(["model", "get", str(run), "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())

    # Assert
    assert exc.value.code == 2
    assert (f"--out {out}: is a file, not a folder" if where == "file" else f"--out {out}: lies under") in err
    assert (tmp_path / "f").read_text() == "not a folder"


def test_model_get_never_writes_through_a_symbolic_link_under_out(run, tmp_path):
    # Prepare: an institution's folder under --out is a link to a folder elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "got"
    out.mkdir()
    (out / "train_part1").symlink_to(elsewhere, target_is_directory=True)

    # Execute / Assert
    with pytest.raises(InputError, match="train_part1: is a symbolic link or not a folder"):
        get_model(out, run_dir=run)
    assert list(elsewhere.iterdir()) == []


def test_model_get_replaces_a_linked_file_instead_of_writing_into_its_target(run, tmp_path):
    # Prepare: the model file's name under --out is a link to a file elsewhere
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "got" / "train_part0").mkdir(parents=True)
    (tmp_path / "got" / "train_part0" / "params.npz").symlink_to(victim)

    # Execute
    get_model(tmp_path / "got", run_dir=run)

    # Assert
    got = tmp_path / "got" / "train_part0" / "params.npz"
    assert victim.read_text() == "keep me"
    assert not got.is_symlink()
    assert got.read_bytes() == (run / "models" / "train_part0" / "params.npz").read_bytes()


def _crafted_archive(perovskite, perovskite_fed, run: Path, files: dict[str, bytes],
                     manifest_bytes: bytes | None = None) -> None:
    """A one-round task (with its committed config.toml, so that every round verifies) whose participants
    attest, and whose submitter archives, a crafted manifest (``manifest_bytes``, else one of ``files``)."""
    from fedmdh.algorithms.base import FederationSpec
    from fedmdh.ledger.artifacts import call_data
    from fedmdh.ledger.chain import GAS
    from fedmdh.ledger.recorder import open_ledger
    from fedmdh.runtime.simulator import simulate

    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"], target="e_form",
                           rounds=1, algorithms=("fedavg",), seeds=1)
    run.mkdir(parents=True)
    cfg.write_toml(run / "config.toml")
    algo = cfg.build_algorithm("fedavg")
    rec = open_ledger(LedgerOptions(pipeline=False), run / "ledger", algo, perovskite_fed.names, "e_form", 1,
                      algo.init(FederationSpec.from_federation(perovskite_fed), 0), config_path="../config.toml")
    try:
        simulate(perovskite_fed, algo, 1, seed=0, round_hook=rec.round_hook)
        manifest = {"kind": "model-archive", "files": {rel: rec.blobs.put(data) for rel, data in files.items()}}
        digest = rec.blobs.put(manifest_bytes if manifest_bytes is not None else json.dumps(manifest).encode())
        rec.chain.submit([(acct, "attest_model", rec.address, call_data("attest_model", bytes.fromhex(digest)),
                           {"gas": GAS["attest_model"], "actor": name}) for name, acct in sorted(rec.accounts.items())])
        rec.chain.transact(rec.submitter, "archive", rec.address,
                           call_data("archive", bytes.fromhex(digest), rec.blobs.locator(digest)[:256]),
                           gas=GAS["archive"], actor="submitter")
    finally:
        rec.close()


@pytest.mark.parametrize("entry", ["models/../../../escaped.txt", "models/a/../../../escaped.txt", "ABSOLUTE"])
def test_model_get_refuses_a_manifest_entry_outside_its_folder(perovskite, perovskite_fed, tmp_path, entry):
    # Prepare: every participant attested this manifest on chain (the keys are one party's)
    target = tmp_path / "escaped.txt"
    entry = str(target) if entry == "ABSOLUTE" else entry
    _crafted_archive(perovskite, perovskite_fed, tmp_path / "run", {"models/ok/params.npz": b"fine", entry: b"escaped"})
    out = tmp_path / "deep" / "er" / "out"

    # Execute / Assert
    with pytest.raises(InputError, match="is not a plain relative path under models/; refused"):
        get_model(out, run_dir=tmp_path / "run")
    assert not target.exists()
    assert not (out / "ok" / "params.npz").exists()


# ------------------------------------------------------------------ keys


def test_an_embedded_run_keeps_its_keys_out_of_the_run_folder_in_0600_files(recorded, fedmdh_home):
    # Assert
    keys = sorted((fedmdh_home / "keystore" / "embedded").glob("*.json"))
    assert not (recorded / "ledger" / "keystore").exists()
    # (other tests of the session add their institutions' keys to the same keystore)
    assert {"submitter.json", "train_part0.json", "train_part1.json", "train_part2.json"} <= {k.name for k in keys}
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)


def test_the_keystore_folder_follows_the_environment(monkeypatch, tmp_path):
    from fedmdh.ledger.recorder import keystore_settings

    # Prepare
    monkeypatch.setenv("FEDMDH_KEYSTORE", str(tmp_path / "ks"))

    # Execute
    embedded = keystore_settings(LedgerOptions(), tmp_path / "run" / "ledger")
    rpc = keystore_settings(LedgerOptions(mode="rpc", rpc_url="http://127.0.0.1:8545"), tmp_path / "run" / "ledger")

    # Assert
    assert embedded.directory == tmp_path / "ks" / "embedded"
    assert rpc.directory == tmp_path / "ks"


def test_keystore_files_are_created_0600_from_the_start(monkeypatch, tmp_path):
    from fedmdh.ledger.keys import KeystoreSettings, load_or_create

    # Prepare: a permissive umask, and a spy on how files are created
    created, chmods = [], []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kw):
        if flags & os.O_CREAT:
            created.append((Path(path).name, mode, bool(flags & os.O_EXCL)))
        return real_open(path, flags, mode, *args, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: chmods.append(a))
    old_umask = os.umask(0)
    try:
        # Execute
        load_or_create("inst", KeystoreSettings(tmp_path / "keys", kdf="pbkdf2", iterations=1000, passphrase="pw"))
    finally:
        os.umask(old_umask)

    # Assert
    assert stat.S_IMODE((tmp_path / "keys" / "inst.json").stat().st_mode) == 0o600
    assert created and all(mode == 0o600 and excl for _, mode, excl in created), created
    assert chmods == []
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["inst.json"]  # no temporary file left


def test_an_empty_passphrase_is_refused_outside_the_embedded_chain(monkeypatch, tmp_path):
    from fedmdh.ledger.keys import load_or_create
    from fedmdh.ledger.recorder import keystore_settings

    # Prepare
    monkeypatch.setenv("FEDMDH_KEY_PASSPHRASE", "")
    settings = keystore_settings(LedgerOptions(mode="rpc", rpc_url="http://127.0.0.1:8545", keystore=tmp_path / "k"),
                                 tmp_path / "run" / "ledger")

    # Execute / Assert
    with pytest.raises(InputError, match="passphrase for the keystore in .* is empty"):
        load_or_create("inst", settings)
    assert not (tmp_path / "k" / "inst.json").exists()


def test_institution_names_that_would_share_a_key_are_refused_naming_both(perovskite, tmp_path, capsys):
    # Prepare: "x y" and "x_y" map to one keystore file
    a, b = tmp_path / "x y.csv", tmp_path / "x_y.csv"
    shutil.copy(perovskite["institutions"][0], a)
    shutil.copy(perovskite["institutions"][1], b)
    cfg = ExperimentConfig(institutions=(str(a), str(b)), test=perovskite["test"], target="e_form", rounds=1,
                           algorithms=("fedavg",), seeds=1)

    # Execute / Assert: the library and the command line
    with pytest.raises(InputError, match="institutions 'x y' and 'x_y' would share one signing key"):
        load_tables(cfg)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--institutions", str(a), str(b), "--test", perovskite["test"], "--target", "e_form",
              "--rounds", "1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "'x y' and 'x_y'" in capsys.readouterr().err


def test_show_and_verify_say_the_keys_were_held_by_one_party(run, capsys):
    # Execute
    main(["ledger", "show", str(run)])
    shown = capsys.readouterr().out
    main(["ledger", "verify", str(run)])
    verified = capsys.readouterr().out

    # Assert
    assert ONE_PARTY in shown and ONE_PARTY in verified


# ------------------------------------------------------------------ issue 21: deep JSON, FIFOs, typed task.json,
# ------------------------------------------------------------------ model get = verify's checks, the run's own blobs
#
# Each of these failed on d465001 (a crash by SIGSEGV, a hang, a traceback, or a model delivered as "verified" from a
# run that `ledger verify` calls FAILED); docs/reliability.md lists them.

import subprocess  # noqa: E402
import sys  # noqa: E402

#: deeper than the recursion limit the eth packages set (100,000): json.loads overflowed the C stack on it
DEEP = "[" * 200_000 + "]" * 200_000


def _fedmdh(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``fedmdh ARGS`` in a process of its own (a crash is a signal, a hang a timeout)."""
    return subprocess.run([sys.executable, "-m", "fedmdh.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line(proc: subprocess.CompletedProcess, code: int, says: str) -> None:
    """Exit status ``code``, no traceback, and one line (FAILED on stdout for verify, error: on stderr
    otherwise) that holds ``says``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
    assert "Traceback" not in proc.stderr
    text = proc.stdout if code == 1 else proc.stderr
    head = " ".join(text.strip().splitlines()[0].split()) if code == 1 else " ".join(text.split())
    assert says in head, head
    if code == 1:
        assert head.startswith("FAILED: ")
    else:
        assert head.startswith("error: ")


def _deep_task(run: Path) -> str:
    (run / "ledger" / "task.json").write_text(DEEP)
    return str(run / "ledger" / "task.json") + ": is nested more than 64 levels deep; the ledger's task file is damaged"


def _deep_task_field(run: Path) -> str:
    path = run / "ledger" / "task.json"
    path.write_text(path.read_text().rstrip().rstrip("}") + ', "note": ' + DEEP + "}")
    return str(path) + ": is nested more than 64 levels deep"


def _deep_log_line(run: Path) -> str:
    lines = _log(run).read_text().splitlines(keepends=True)
    _log(run).write_text("".join(lines[:3] + [DEEP + "\n"] + lines[3:]))
    return str(_log(run)) + ": line 4 is nested more than 64 levels deep; the transaction log is damaged"


DEEP_CASES = [  # (case, tamper, command, exit status)
    ("task-json-verify", _deep_task, "verify", 1),
    ("task-json-show", _deep_task, "show", 2),
    ("task-json-model-get", _deep_task, "get", 2),
    ("task-json-field-verify", _deep_task_field, "verify", 1),
    ("log-line-verify", _deep_log_line, "verify", 1),
    ("log-line-show", _deep_log_line, "show", 2),
    ("log-line-model-get", _deep_log_line, "get", 2),
]


def _command(run: Path, command: str, out: Path) -> list:
    return {"verify": ["ledger", "verify", run], "show": ["ledger", "show", run],
            "get": ["model", "get", run, "--out", out]}[command]


@pytest.mark.parametrize("case,tamper,command,code", DEEP_CASES, ids=[c[0] for c in DEEP_CASES])
def test_deeply_nested_json_in_the_ledger_is_one_line_not_a_crash(run, tmp_path, case, tamper, command, code):
    # Prepare
    says = tamper(run)

    # Execute
    proc = _fedmdh(*_command(run, command, tmp_path / "got"))

    # Assert: on d465001 the process died by SIGSEGV (returncode -11)
    _one_line(proc, code, says)
    assert not (tmp_path / "got").exists()


def test_a_deeply_nested_archive_manifest_is_one_line_not_a_crash(perovskite, perovskite_fed, tmp_path):
    # Prepare: the participants attest, and the submitter archives, a manifest nested 200,000 levels deep
    run = tmp_path / "run"
    _crafted_archive(perovskite, perovskite_fed, run, {}, manifest_bytes=DEEP.encode())

    # Execute
    verified = _fedmdh("ledger", "verify", run)
    got = _fedmdh("model", "get", run, "--out", tmp_path / "got")

    # Assert
    _one_line(verified, 1, "its manifest is nested more than 64 levels deep; refused")
    _one_line(got, 2, "its manifest is nested more than 64 levels deep; refused")
    assert not (tmp_path / "got").exists()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


FIFO_CASES = [  # (case, the file made a FIFO, command, exit status, what it says)
    ("log-verify", TX, "verify", 1, "transactions.jsonl: is not a regular file; the transaction log is damaged"),
    ("log-show", TX, "show", 2, "transactions.jsonl: is not a regular file; the transaction log is damaged"),
    ("task-verify", "task.json", "verify", 1, "task.json: is not a regular file; the ledger's task file is damaged"),
    ("task-show", "task.json", "show", 2, "task.json: is not a regular file; the ledger's task file is damaged"),
    ("task-model-get", "task.json", "get", 2, "task.json: is not a regular file"),
    ("aggregate-blob-verify", "AGGREGATE", "verify", 1, "round 3: aggregate blob"),
]


@pytest.mark.parametrize("case,name,command,code,says", FIFO_CASES, ids=[c[0] for c in FIFO_CASES])
def test_a_fifo_in_the_ledger_is_refused_instead_of_read(run, tmp_path, case, name, command, code, says):
    # Prepare
    path = _aggregate(run, 3) if name == "AGGREGATE" else run / "ledger" / name
    _fifo(path)

    # Execute: on d465001 the read blocked for ever (the timeout raises)
    proc = _fedmdh(*_command(run, command, tmp_path / "got"), timeout=120)

    # Assert
    _one_line(proc, code, says)
    if name == "AGGREGATE":
        assert "is not a regular file" in proc.stdout


TYPE_CASES = [  # (field, value, how it is said)
    ("participants", [], "participants is [], not a table of institution names to addresses"),
    ("participants", {"train_part0": 5}, "participants is {\"train_part0\": 5}, not a table of institution names"),
    ("vector_layout", "x", "vector_layout is \"x\", not a list of [name, size] pairs"),
    ("vector_layout", [["a", "b"]], "vector_layout is [[\"a\", \"b\"]], not a list of [name, size] pairs"),
    ("rounds", "6", "rounds is \"6\", not an integer"),
    ("chain_id", None, "chain_id is null, not an integer"),
    ("seed", "zero", "seed is \"zero\", not an integer"),
    ("secure", "x", "secure is \"x\", not a table (a secure task) or null"),
]


@pytest.mark.parametrize("key,value,says", TYPE_CASES, ids=[f"{c[0]}-{json.dumps(c[1])}" for c in TYPE_CASES])
def test_a_task_json_field_of_the_wrong_type_is_one_line(run, capsys, key, value, says):
    # Prepare
    _task(_set(key, value))(run)

    # Execute
    with pytest.raises(SystemExit) as shown:
        main(["ledger", "show", str(run)])
    err = " ".join(capsys.readouterr().err.split())
    report = verify(run)

    # Assert: on d465001 `ledger show` of "participants": [] ended in an AttributeError traceback
    assert shown.value.code == 2
    assert err.startswith("error: ") and says in err and "the ledger's task file is damaged" in err
    assert report.status == "failed" and says in report.problem


# model get runs the checks of verify (the same function): every case where verify says FAILED and d465001's model
# get still printed "verified" and wrote the model
MODEL_GET_CASES = ["config-lr-changed", "config-algorithm-changed", "config-deleted", "aggregate-blob-altered",
                   "aggregate-blob-deleted", "final-metrics-altered", "final-metrics-deleted", "metrics-jsonl-altered",
                   "federation-json-altered"]


def _update_blob(run: Path, rnd: int, inst: str) -> Path:
    return _blob(run, show(run)["rounds"][rnd - 1]["commitments"][inst]["update_hash"][2:])


BLOB_CASES = [  # blobs of the rounds, beyond the aggregates of CASES: (case, tamper, what verify and model get say)
    ("update-blob-altered", lambda run: _flip(_update_blob(run, 2, "train_part1")),
     "round 2, institution train_part1: update blob"),
    ("update-blob-deleted", lambda run: _update_blob(run, 2, "train_part1").unlink(),
     "round 2, institution train_part1: update blob"),
]


@pytest.mark.parametrize("case,tamper,says", [c for c in CASES if c[0] in MODEL_GET_CASES] + BLOB_CASES,
                         ids=[c[0] for c in CASES if c[0] in MODEL_GET_CASES] + [c[0] for c in BLOB_CASES])
def test_model_get_refuses_every_run_that_verify_fails(run, tmp_path, capsys, case, tamper, says):
    # Prepare
    tamper(run)

    # Execute
    report = verify(run)
    with pytest.raises(SystemExit) as exc:
        main(["model", "get", str(run), "--out", str(tmp_path / "got")])
    err = " ".join(capsys.readouterr().err.split())

    # Assert: the same verdict, said the same way, and nothing written
    assert report.status == "failed" and says in str(report)
    assert exc.value.code == 2
    assert f"the ledger does not verify, so its archive is not trusted: {' '.join(report.problem.split())}" in err
    assert not (tmp_path / "got").exists()


@pytest.fixture(scope="module")
def recorded_other(perovskite, tmp_path_factory) -> Path:
    """Another run of the same federation (4 rounds): its ledger is the one swapped in."""
    cfg = ExperimentConfig(institutions=tuple(perovskite["institutions"]), test=perovskite["test"],
                           target=perovskite["target"], rounds=4, algorithms=("fedavg",), seeds=1)
    out = tmp_path_factory.mktemp("other") / "run"
    run_experiment(cfg, "fedavg", out)
    return out


def test_model_get_refuses_a_run_whose_ledger_was_taken_from_another_run(run, recorded_other, tmp_path, capsys):
    # Prepare: the run folder keeps its own files; its ledger/ is the other run's
    shutil.rmtree(run / "ledger")
    shutil.copytree(recorded_other / "ledger", run / "ledger")

    # Execute
    report = verify(run)
    with pytest.raises(SystemExit) as exc:
        main(["model", "get", str(run), "--out", str(tmp_path / "got")])
    err = " ".join(capsys.readouterr().err.split())

    # Assert: on d465001 model get printed "model ... verified; wrote 6 files" (the other run's models)
    assert report.status == "failed"
    assert report.problem.startswith("config.toml differs from the config committed on chain at task creation")
    assert exc.value.code == 2
    assert "the ledger does not verify, so its archive is not trusted: config.toml differs" in err
    assert not (tmp_path / "got").exists()


MODELS_CASES = [  # the run folder's own models/ (what model get restores): (case, tamper, what verify says)
    ("models-folder-deleted", lambda run: shutil.rmtree(run / "models"), "models/ is missing from the run folder"),
    ("model-file-deleted", lambda run: (run / "models" / "train_part1" / "params.npz").unlink(),
     "model file models/train_part1/params.npz is missing from the run folder"),
    ("model-file-altered", lambda run: _flip(run / "models" / "train_part1" / "params.npz"),
     "model file models/train_part1/params.npz in the run folder differs from the archived model"),
    ("extra-file-in-models", lambda run: (run / "models" / "train_part0" / "extra.npz").write_bytes(b"x"),
     "models/train_part0/extra.npz is in the run folder's models/ but not in the archived model"),
]


@pytest.mark.parametrize("case,tamper,says", MODELS_CASES, ids=[c[0] for c in MODELS_CASES])
def test_model_get_restores_the_run_folders_models_and_says_how_they_differed(run, tmp_path, capsys, case, tamper,
                                                                                says):
    # Prepare: what `ledger verify` fails (and tells to retrieve with `fedmdh model get`)
    models = {p.relative_to(run / "models").as_posix(): p.read_bytes() for p in (run / "models").rglob("*")
              if p.is_file()}
    tamper(run)
    assert says in verify(run).problem

    # Execute
    main(["model", "get", str(run), "--out", str(tmp_path / "got")])
    out = " ".join(capsys.readouterr().out.split())

    # Assert: every archived file written, and the missing ones said
    got = {p.relative_to(tmp_path / "got").as_posix(): p.read_bytes() for p in (tmp_path / "got").rglob("*")
           if p.is_file()}
    assert got == models
    assert "verified; wrote 6 files to" in out
    assert f"the run folder's models/ does not match the archive: {says}" in out


def test_verify_reads_blobs_only_from_the_runs_own_folder_and_says_so(run, tmp_path):
    # Prepare: task.json names a copy of the blobs elsewhere
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "ledger" / "blobs", elsewhere)
    _task(_set("blobs", str(elsewhere)))(run)

    # Execute
    both = verify(run)
    shutil.rmtree(run / "ledger" / "blobs")
    only_elsewhere = verify(run)

    # Assert: on d465001 both were OK without a word (the blobs were read from the folder task.json named)
    said = f"task.json names the blob folder {str(elsewhere)!r}; blobs are read only from the run's own folder " \
           f"{run / 'ledger' / 'blobs'}"
    assert both.ok and said in both.notes
    assert only_elsewhere.status == "failed" and said in only_elsewhere.notes
    assert f"is missing from {run / 'ledger' / 'blobs'}" in only_elsewhere.problem


def test_a_log_record_whose_block_is_no_number_fails_verify_naming_it(run):
    # Prepare
    _edit_record("commit", 2, "train_part1", _set("block", []))(run)

    # Execute: on d465001 a TypeError traceback (unhashable type: 'list')
    report = verify(run)

    # Assert
    assert report.status == "failed"
    assert report.problem.startswith("transaction commit of round 2 by train_part1 (line 16 of transactions.jsonl)")
