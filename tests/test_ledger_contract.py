"""The FedLedger contract on the embedded chain: access control, round rules, quorum, archive, replay."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from eth_account import Account

from fedmdh.ledger import codec
from fedmdh.ledger.artifacts import compile_source, load_artifact
from fedmdh.ledger.chain import GAS, Chain
from fedmdh.ledger.errors import LedgerRevert
from fedmdh.ledger.events import decode_logs

H = [bytes([i]) * 32 for i in range(1, 9)]


class Task:
    """A deployed task with three registered participants (quorum 2, 2 rounds, vectors of 2)."""

    def __init__(self, quorum: int = 2, rounds: int = 2, vector_len: int = 2, timeout: int = 0) -> None:
        self.chain = Chain.embedded()
        self.submitter = Account.create()
        self.members = [Account.create() for _ in range(3)]
        self.outsider = Account.create()
        self.chain.fund([a.address for a in (self.submitter, self.outsider, *self.members)])
        data = self.chain.deploy_data("e_form", "fedavg", rounds, quorum, vector_len, H[0],
                                      [a.address for a in self.members], timeout)
        self.address = self.chain.transact(self.submitter, "deploy", None, data, gas=GAS["deploy"]).receipt[
            "contractAddress"]
        self.c = self.chain.contract(self.address)
        for i, a in enumerate(self.members):
            self.tx(a, "register", f"inst{i}")

    def tx(self, account, fn: str, *args, gas: int = 600_000):
        if fn == "commit":  # vectors are given as plain fixed-point values; the contract takes them packed
            args = (*args[:3], codec.pack(args[3]))
        return self.chain.transact(account, fn, self.address, self.c.encode_abi(fn, list(args)), gas=gas)

    def commit_all(self, rnd: int, vectors=None, counts=(10, 20, 30)):
        vectors = vectors or [[1, 2]] * 3
        for a, v, n, h in zip(self.members, vectors, counts, H[1:]):
            self.tx(a, "commit", rnd, h, n, v)

    def attest_all(self, rnd: int, hashes):
        return [self.tx(a, "attest", rnd, h) for a, h in zip(self.members, hashes)]


@pytest.fixture
def task() -> Task:
    return Task()


def test_recompiling_the_source_reproduces_the_shipped_artifact():
    # Prepare
    shipped = load_artifact()

    # Execute
    fresh = compile_source()

    # Assert
    assert fresh["abi"] == shipped["abi"]
    assert fresh["bytecode"] == shipped["bytecode"]
    assert fresh["source_sha256"] == shipped["source_sha256"]


def test_an_account_off_the_allowlist_can_neither_register_nor_commit(task):
    # Execute / Assert
    with pytest.raises(LedgerRevert, match="not on the task's allowlist"):
        task.tx(task.outsider, "register", "intruder")
    with pytest.raises(LedgerRevert, match="not a registered participant"):
        task.tx(task.outsider, "commit", 1, H[1], 10, [1, 2])
    assert task.c.functions.commit_count(1).call() == 0


def test_a_second_commit_in_a_round_is_rejected(task):
    # Prepare
    task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])

    # Execute / Assert
    with pytest.raises(LedgerRevert, match="already committed this round"):
        task.tx(task.members[0], "commit", 1, H[2], 10, [1, 2])
    assert task.c.functions.update_hash(1, task.members[0].address).call() == H[1]


def test_a_commit_for_another_round_is_rejected(task):
    # Execute / Assert
    with pytest.raises(LedgerRevert, match="wrong round"):
        task.tx(task.members[0], "commit", 2, H[1], 10, [1, 2])
    with pytest.raises(LedgerRevert, match="wrong round"):
        task.tx(task.members[0], "commit", 0, H[1], 10, [1, 2])


def test_a_commit_after_the_task_ended_is_rejected(task):
    # Prepare: both rounds finalized
    for r in (1, 2):
        task.commit_all(r)
        task.attest_all(r, [H[5]] * 3)
    assert task.c.functions.ended().call()

    # Execute / Assert
    with pytest.raises(LedgerRevert, match="task has ended"):
        task.tx(task.members[0], "commit", 3, H[1], 10, [1, 2])
    with pytest.raises(LedgerRevert, match="task has ended"):
        task.tx(task.members[0], "commit", 2, H[1], 10, [1, 2])


def test_a_dissenting_participant_is_named_and_the_quorum_finalizes(task):
    # Prepare
    task.commit_all(1)

    # Execute: the third participant attests another aggregate
    sent = task.attest_all(1, [H[5], H[5], H[6]])

    # Assert
    events = decode_logs(sent[-1].record["logs"])
    dissent = [a for n, a in events if n == "Dissent"]
    assert [d["participant"] for d in dissent] == [task.members[2].address]
    assert dissent[0]["attested_hash"] == "0x" + H[6].hex()
    assert task.c.functions.finalized_hash(1).call() == H[5]
    assert task.c.functions.current_round().call() == 2


def test_a_round_without_quorum_does_not_finalize_and_stops_the_task(task):
    # Prepare
    task.commit_all(1)

    # Execute: three different aggregates, quorum 2
    sent = task.attest_all(1, [H[5], H[6], H[7]])

    # Assert
    names = [n for n, _ in decode_logs(sent[-1].record["logs"])]
    assert "RoundFailed" in names and "RoundFinalized" not in names
    assert task.c.functions.finalized_hash(1).call() == b"\x00" * 32
    with pytest.raises(LedgerRevert, match="task has ended"):
        task.tx(task.members[0], "commit", 2, H[1], 10, [1, 2])


def test_attesting_before_everyone_committed_is_rejected(task):
    # Prepare
    task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])

    # Execute / Assert
    with pytest.raises(LedgerRevert, match="still waiting for commitments"):
        task.tx(task.members[0], "attest", 1, H[5])


def test_only_the_hash_a_quorum_attested_can_be_archived(task):
    # Prepare: finish the task, two of three attest model H[7]
    for r in (1, 2):
        task.commit_all(r)
        task.attest_all(r, [H[5]] * 3)
    task.tx(task.members[0], "attest_model", H[7])
    task.tx(task.members[1], "attest_model", H[7])
    task.tx(task.members[2], "attest_model", H[6])

    # Execute / Assert
    with pytest.raises(LedgerRevert, match="not the one a quorum attested"):
        task.tx(task.submitter, "archive", H[6], "file:///elsewhere")
    with pytest.raises(LedgerRevert, match="only the task's submitter"):
        task.tx(task.members[0], "archive", H[7], "file:///x")
    task.tx(task.submitter, "archive", H[7], "file:///models")
    assert task.c.functions.archived_hash().call() == H[7]
    assert task.c.functions.archived_locator().call() == "file:///models"


def test_the_archive_names_who_attested_and_who_is_missing_and_only_a_missing_one_adds_its_model_late(task):
    # Prepare: finish the task; two of three attest the manifest, the third is down
    for r in (1, 2):
        task.commit_all(r)
        task.attest_all(r, [H[5]] * 3)
    task.tx(task.members[0], "attest_model", H[7])
    task.tx(task.members[1], "attest_model", H[7])
    gone = task.members[2]
    with pytest.raises(LedgerRevert, match="not archived yet"):
        task.tx(gone, "attest_late", H[6])

    # Execute: the archive goes ahead with the quorum
    sent = task.tx(task.submitter, "archive", H[7], "file:///models", gas=GAS["archive"] + 30_000 * 3)

    # Assert: on chain, who attested and who is missing
    events = dict(decode_logs(sent.receipt["logs"]))
    assert events["ArchiveAttendance"]["attested"] == [task.members[0].address.lower(), task.members[1].address.lower()]
    assert events["ArchiveAttendance"]["missing"] == [gone.address.lower()]
    assert task.c.functions.archive_missing(gone.address).call()
    assert not task.c.functions.archive_missing(task.members[0].address).call()
    # the archive is closed to ordinary votes; only the missing institution adds its model, once
    with pytest.raises(LedgerRevert, match="archived already"):
        task.tx(gone, "attest_model", H[7])
    for who in (task.members[0], task.outsider, task.submitter):
        with pytest.raises(LedgerRevert, match="not a participant the archive names missing"):
            task.tx(who, "attest_late", H[6])
    late = task.tx(gone, "attest_late", H[6])
    assert dict(decode_logs(late.receipt["logs"]))["LateModel"] == {"participant": gone.address, "model_hash": "0x" + H[6].hex()}
    assert task.c.functions.late_model(gone.address).call() == H[6]
    with pytest.raises(LedgerRevert, match="added its model already"):
        task.tx(gone, "attest_late", H[5])


def test_a_replayed_transaction_is_rejected(task):
    # Prepare
    sent = task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])
    raw = bytes.fromhex(sent.record["raw"][2:])

    # Execute / Assert: the same signed bytes again (nonce used), then the same call re-signed
    with pytest.raises(Exception, match="(?i)nonce"):
        task.chain.send_raw(raw)
    with pytest.raises(LedgerRevert, match="already committed this round"):
        task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])
    assert task.c.functions.commit_count(1).call() == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_onchain_weighted_mean_is_the_float64_weighted_mean_within_the_resolution(seed):
    # Prepare
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=rng.uniform(0.01, 100.0), size=(3, 5))
    n = rng.integers(1, 5000, size=3)
    t = Task(vector_len=5)
    for a, xi, ni, h in zip(t.members, x, n, H[1:]):
        t.tx(a, "commit", 1, h, int(ni), codec.to_fixed(xi))

    # Execute
    onchain = codec.from_fixed(codec.unpack(t.c.functions.weighted_mean(1).call(), 5))

    # Assert: encoding rounds by <= 1/2 unit, the mean rounds down by < 1 unit (closed form)
    expected = (n[0] * x[0] + n[1] * x[1] + n[2] * x[2]) / (n[0] + n[1] + n[2])
    tol = 1.5 / codec.SCALE + 4 * np.finfo(np.float64).eps * np.abs(x).max()
    assert np.all(np.abs(onchain - expected) <= tol)
    exact = [math.floor(sum(Fraction(codec.to_fixed(x[i])[j]) * int(n[i]) for i in range(3)) / int(n.sum()))
             for j in range(5)]
    assert codec.unpack(t.c.functions.weighted_mean(1).call(), 5) == exact


def test_packed_vectors_at_the_range_limits_aggregate_exactly_without_overflow():
    # Prepare: the largest magnitudes the contract takes, the largest sample counts, an odd length
    top = codec.LIMIT - 1
    vectors = [[top, -top, 5], [-top, -top, -7], [top, top, 0]]
    counts = (2**32 - 1, 2**32 - 2, 3)
    t = Task(vector_len=3)

    # Execute
    t.commit_all(1, vectors, counts)

    # Assert: the exact floor of the weighted mean, value by value
    total = sum(counts)
    expected = [sum(v[j] * n for v, n in zip(vectors, counts)) // total for j in range(3)]
    assert codec.unpack(t.c.functions.weighted_mean(1).call(), 3) == expected
    assert codec.unpack(codec.pack([top, -top, 5]), 3) == [top, -top, 5]


def test_out_of_range_values_and_sample_counts_are_refused_with_a_message(task):
    # Prepare: a word whose low half is 2**88 (a value of 2**87: one past the limit)
    bad_word = 2**88 | (codec.BIAS << 128)

    # Execute / Assert
    with pytest.raises(LedgerRevert, match="out of range"):
        task.chain.transact(task.members[0], "commit", task.address,
                            task.c.encode_abi("commit", [1, H[1], 10, [bad_word]]), gas=600_000)
    with pytest.raises(LedgerRevert, match="below 2\\*\\*32"):
        task.tx(task.members[0], "commit", 1, H[1], 2**32, [1, 2])
    with pytest.raises(Exception, match="strictly between"):
        codec.pack([codec.LIMIT])


def test_only_the_latest_two_rounds_sums_are_kept_and_earlier_means_live_in_the_events():
    # Prepare: rounds 1 and 2 complete, round 3 gets one commitment
    task = Task(rounds=3)
    for r in (1, 2):
        task.commit_all(r, [[r, 2 * r]] * 3)
        task.attest_all(r, [H[5]] * 3)
    task.tx(task.members[0], "commit", 3, H[1], 10, [3, 4])

    # Execute / Assert
    assert codec.unpack(task.c.functions.weighted_mean(3).call(), 2) == [3, 4]
    assert codec.unpack(task.c.functions.weighted_mean(2).call(), 2) == [2, 4]
    with pytest.raises(Exception, match="only the latest two rounds are kept"):
        task.c.functions.weighted_mean(1).call()


# ------------------------------------------------------------------ deadlines and commit-ahead


def _later(task: Task, seconds: int) -> None:
    """Move the embedded chain's clock forward (the next block is mined that much later)."""
    task.chain.tester.time_travel(int(task.chain.w3.eth.get_block("latest")["timestamp"]) + seconds)


def test_round_two_can_be_committed_once_round_ones_commitments_close(task):
    # Prepare
    with pytest.raises(LedgerRevert, match="wrong round"):
        task.tx(task.members[0], "commit", 2, H[1], 10, [1, 2])
    task.commit_all(1)
    # Execute: round 1 is still being attested; round 2's commitments are already open
    task.tx(task.members[0], "commit", 2, H[1], 10, [5, 6])
    task.attest_all(1, [H[5]] * 3)
    task.tx(task.members[1], "commit", 2, H[2], 20, [5, 6])
    # Assert: round 1 finalized with its own sums; round 2 accumulates in the other set
    assert task.c.functions.current_round().call() == 2
    assert task.c.functions.finalized_hash(1).call() == H[5]
    assert codec.unpack(task.c.functions.weighted_mean(2).call(), 2) == [5, 6]
    with pytest.raises(LedgerRevert, match="wrong round"):
        task.tx(task.members[2], "commit", 3, H[3], 30, [1, 2])


def test_a_round_closes_without_a_silent_participant_after_its_timeout():
    # Prepare: two of three commit; the third is silent
    task = Task(timeout=60)
    for a, h, n in zip(task.members[:2], H[1:], (10, 20)):
        task.tx(a, "commit", 1, h, n, [10, 40])
    with pytest.raises(LedgerRevert, match="timeout has not passed"):
        task.tx(task.outsider, "close_commits", 1)
    # Execute: after the timeout anyone closes the commitments; the mean covers the committers only
    _later(task, 61)
    sent = task.tx(task.outsider, "close_commits", 1)
    # Assert
    (mean,) = [a for e, a in decode_logs(sent.record["logs"]) if e == "Aggregated"]
    assert mean["total_examples"] == 30 and codec.unpack(mean["mean"], 2) == [10, 40]
    with pytest.raises(LedgerRevert, match="commitments have closed"):
        task.tx(task.members[2], "commit", 1, H[3], 30, [1, 2])
    with pytest.raises(LedgerRevert, match="did not commit"):
        task.tx(task.members[2], "attest", 1, H[5])
    # the two committers attest: every committer has, so the round finalizes with a quorum of 2
    task.tx(task.members[0], "attest", 1, H[5])
    sent = task.tx(task.members[1], "attest", 1, H[5])
    assert [e for e, _ in decode_logs(sent.record["logs"])] == ["Attested", "RoundFinalized"]
    assert task.c.functions.current_round().call() == 2


def test_below_the_quorum_a_round_stays_open_until_the_missing_come_back():
    # Prepare: one of three commits (quorum 2), the timeout passes
    task = Task(timeout=60)
    task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])
    _later(task, 61)
    # Execute / Assert: nobody can close it short of the quorum; a returning participant still commits
    with pytest.raises(LedgerRevert, match="fewer commitments than the quorum"):
        task.tx(task.outsider, "close_commits", 1)
    task.tx(task.members[1], "commit", 1, H[2], 20, [1, 2])
    task.tx(task.outsider, "close_commits", 1)
    assert task.c.functions.commits_closed(1).call()
    assert not task.c.functions.failed().call()


def test_after_the_timeout_a_round_still_needs_a_quorum_on_one_hash():
    # Prepare: all three commit; two attest different hashes, the third is silent so far
    task = Task(timeout=60)
    task.commit_all(1)
    task.tx(task.members[0], "attest", 1, H[5])
    with pytest.raises(LedgerRevert, match="timeout has not passed"):
        task.tx(task.outsider, "close_round", 1)
    task.tx(task.members[1], "attest", 1, H[6])
    _later(task, 61)
    # Execute / Assert: one vote each, short of the quorum of 2: not yet
    with pytest.raises(LedgerRevert, match="no aggregate has a quorum"):
        task.tx(task.outsider, "close_round", 1)
    assert not task.c.functions.failed().call()
    # the third agrees with the first: every committer attested, 2 votes of 3, finalized with dissent
    sent = task.tx(task.members[2], "attest", 1, H[5])
    events = [e for e, _ in decode_logs(sent.record["logs"])]
    assert events == ["Attested", "Dissent", "RoundFinalized"]


def test_a_task_without_a_timeout_waits_for_everyone(task):
    task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])
    task.tx(task.members[1], "commit", 1, H[2], 20, [1, 2])
    _later(task, 10**6)
    with pytest.raises(LedgerRevert, match="no round timeout"):
        task.tx(task.outsider, "close_commits", 1)


def test_a_batch_the_chain_refuses_changes_nothing_and_the_transactions_go_one_by_one(task):
    # Prepare: a batch holding an already-used transaction (stale nonce) after a valid one
    used = task.tx(task.members[0], "commit", 1, H[1], 10, [1, 2])
    height = task.chain.w3.eth.block_number
    fresh, _ = task.chain.sign(task.members[1], task.address,
                               task.c.encode_abi("commit", [1, H[2], 20, codec.pack([1, 2])]), 600_000)

    # Execute
    result = task.chain.mine_batch([fresh, bytes.fromhex(used.record["raw"][2:])])

    # Assert: refused whole, the chain unchanged; the valid transaction still goes through alone
    assert result is None
    assert task.chain.w3.eth.block_number == height
    task.chain.send_raw(fresh)
    assert task.c.functions.commit_count(1).call() == 2


def test_a_batch_over_the_block_gas_limit_is_mined_in_consecutive_blocks(task):
    # Prepare: three commitments whose gas limits together exceed the block gas limit
    limit = task.chain.tester.backend.chain.header.gas_limit
    items = [(a, "commit", task.address, task.c.encode_abi("commit", [1, h, 10, codec.pack([1, 2])]),
              {"gas": limit // 2, "actor": f"inst{i}", "round": 1})
             for i, (a, h) in enumerate(zip(task.members, H[1:]))]

    # Execute
    sent = task.chain.submit(items)

    # Assert: all three in order, two blocks (two fit under the limit, not three)
    assert [s.record["status"] for s in sent] == [1, 1, 1]
    blocks = [s.record["block"] for s in sent]
    assert blocks[0] == blocks[1] < blocks[2]
    assert task.c.functions.commit_count(1).call() == 3
