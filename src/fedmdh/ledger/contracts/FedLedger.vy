# pragma version ~=0.4.3
"""
@title FedLedger: one federated training task on chain
@notice A submitter creates the task (target, algorithm, rounds, quorum, participant allowlist,
        round timeout). Allowlisted institutions register, then each round every participant
        commits the sha256 of its canonical serialized update, its sample count and a small vector
        (at most 128 values, fixed point, two per 256-bit word: see commit). A round's commitments
        close when every participant has committed, or, once the round's timeout has passed since
        they opened, when at least a quorum has (anyone may call close_commits then); the contract
        computes the sample-weighted mean of the committed vectors itself and publishes it in the
        Aggregated event. The committers then attest the sha256 of the aggregate they computed off
        chain; when every committer has attested, the round is finalized if a quorum agrees on one
        hash (those who disagree are named in a Dissent event) or fails otherwise; once the
        timeout has passed since the commitments closed, anyone may finalize it with the quorum's
        hash (close_round). A participant may commit round r + 1 once round r's commitments have
        closed (training goes on while round r is attested). A round below its quorum stays open:
        it can still finish when the missing participants come back. After the last round, the
        participants attest the final model's hash and the submitter archives it (hash + locator)
        once a quorum attested it; the archive names who attested it and who is missing (did not
        attest). A missing participant, when it is back, adds the hash of its own model
        (attest_late), once.
"""

MAX_PARTICIPANTS: constant(uint256) = 32
MAX_VECTOR: constant(uint256) = 128
MAX_WORDS: constant(uint256) = 64  # MAX_VECTOR values, two per word
# A word holds two values, each as value + BIAS in one 128-bit half (both halves non-negative).
HALF: constant(uint256) = 2**128 - 1
BIAS: constant(uint256) = 2**87
# bits that must be clear in a committed word: each half below 2**88, i.e. |value| < 2**87
OUT_OF_RANGE: constant(uint256) = ~((2**88 - 1) | ((2**88 - 1) << 128))

event TaskCreated:
    submitter: indexed(address)
    target: String[64]
    algorithm: String[64]
    num_rounds: uint256
    quorum: uint256
    vector_len: uint256
    initial_state_hash: bytes32
    round_timeout: uint256

event Registered:
    participant: indexed(address)
    name: String[64]

event Committed:
    round: indexed(uint256)
    participant: indexed(address)
    update_hash: bytes32
    num_examples: uint256

event Aggregated:
    round: indexed(uint256)
    total_examples: uint256
    mean: DynArray[uint256, MAX_WORDS]  # packed like the committed vectors

event Attested:
    round: indexed(uint256)
    participant: indexed(address)
    aggregate_hash: bytes32

event Dissent:
    round: indexed(uint256)
    participant: indexed(address)
    attested_hash: bytes32
    agreed_hash: bytes32

event RoundFinalized:
    round: indexed(uint256)
    aggregate_hash: bytes32
    votes: uint256

event RoundFailed:
    round: indexed(uint256)
    best_votes: uint256

event TaskEnded:
    rounds_finalized: uint256

event ModelAttested:
    participant: indexed(address)
    model_hash: bytes32

event Archived:
    model_hash: bytes32
    locator: String[256]

event ArchiveAttendance:
    attested: DynArray[address, MAX_PARTICIPANTS]
    missing: DynArray[address, MAX_PARTICIPANTS]

event LateModel:
    participant: indexed(address)
    model_hash: bytes32

submitter: public(address)
target: public(String[64])
algorithm: public(String[64])
num_rounds: public(uint256)
quorum: public(uint256)
vector_len: public(uint256)
initial_state_hash: public(bytes32)
round_timeout: public(uint256)  # seconds; 0: a round waits for every participant

allowed: public(HashMap[address, bool])
registered: public(HashMap[address, bool])
participant_name: public(HashMap[address, String[64]])
participants: public(DynArray[address, MAX_PARTICIPANTS])

current_round: public(uint256)
started: public(bool)
ended: public(bool)
failed: public(bool)

update_hash: public(HashMap[uint256, HashMap[address, bytes32]])
commit_count: public(HashMap[uint256, uint256])
total_examples: public(HashMap[uint256, uint256])
# the running sums of the rounds being committed, packed like the vectors (one slot per word, two
# sets used in turn: round r in set r % 2, so round r + 1 can be committed while round r is attested;
# reused every other round: far cheaper than fresh slots); each round's mean is kept in its
# Aggregated event
weighted_sum: public(uint256[MAX_WORDS][2])
sum_round: public(uint256[2])
opened: public(HashMap[uint256, uint256])  # when the round's commitments opened (block time)
commits_closed: public(HashMap[uint256, bool])
closed_at: public(HashMap[uint256, uint256])  # when its commitments closed

attested_hash: public(HashMap[uint256, HashMap[address, bytes32]])
attest_count: public(HashMap[uint256, uint256])
votes: public(HashMap[uint256, HashMap[bytes32, uint256]])
finalized_hash: public(HashMap[uint256, bytes32])

model_vote: public(HashMap[address, bytes32])
model_votes: public(HashMap[bytes32, uint256])
archived_hash: public(bytes32)
archived_locator: public(String[256])
archive_missing: public(HashMap[address, bool])  # a participant that had not attested the archived hash
late_model: public(HashMap[address, bytes32])  # the model hash a missing participant added after the archive


@deploy
def __init__(
    target: String[64],
    algorithm: String[64],
    num_rounds: uint256,
    quorum: uint256,
    vector_len: uint256,
    initial_state_hash: bytes32,
    allowlist: DynArray[address, MAX_PARTICIPANTS],
    round_timeout: uint256,
):
    assert num_rounds > 0, "create: num_rounds must be at least 1"
    assert len(allowlist) > 0, "create: the allowlist is empty"
    assert quorum > 0 and quorum <= len(allowlist), "create: quorum must be between 1 and the allowlist size"
    assert vector_len <= MAX_VECTOR, "create: vector_len must be at most 128"
    self.submitter = msg.sender
    self.target = target
    self.algorithm = algorithm
    self.num_rounds = num_rounds
    self.quorum = quorum
    self.vector_len = vector_len
    self.initial_state_hash = initial_state_hash
    self.round_timeout = round_timeout
    for a: address in allowlist:
        assert not self.allowed[a], "create: an address appears twice in the allowlist"
        self.allowed[a] = True
    self.current_round = 1
    log TaskCreated(
        submitter=msg.sender, target=target, algorithm=algorithm, num_rounds=num_rounds,
        quorum=quorum, vector_len=vector_len, initial_state_hash=initial_state_hash, round_timeout=round_timeout,
    )


@external
def register(name: String[64]):
    assert self.allowed[msg.sender], "register: sender is not on the task's allowlist"
    assert not self.registered[msg.sender], "register: sender is already registered"
    assert not self.started, "register: rounds have started, registration is closed"
    self.registered[msg.sender] = True
    self.participant_name[msg.sender] = name
    self.participants.append(msg.sender)
    log Registered(participant=msg.sender, name=name)


@external
def commit(round: uint256, update_hash: bytes32, num_examples: uint256, vector: DynArray[uint256, MAX_WORDS]):
    """
    @param round the task's current round, or the next one once the current round's commitments closed
    @param vector the round's small vector, two fixed-point values per word: value i sits in the
           low half of word i // 2 when i is even, in the high half when odd, as value + 2**87
           (|value| < 2**87); an odd count leaves the last high half at 2**87 (a zero).
    """
    assert self.registered[msg.sender], "commit: sender is not a registered participant"
    assert not self.ended, "commit: the task has ended"
    assert len(self.participants) >= self.quorum, "commit: fewer participants registered than the quorum"
    assert round == self.current_round or (round == self.current_round + 1 and self.commits_closed[self.current_round]), "commit: wrong round, not the task's current round (or the next, once its commitments closed)"
    assert round <= self.num_rounds, "commit: the task has no such round"
    assert not self.commits_closed[round], "commit: the round's commitments have closed"
    assert self.update_hash[round][msg.sender] == empty(bytes32), "commit: sender already committed this round"
    assert update_hash != empty(bytes32), "commit: update_hash is zero"
    assert num_examples > 0, "commit: num_examples must be positive"
    assert num_examples < 2**32, "commit: num_examples must be below 2**32"
    assert len(vector) == (self.vector_len + 1) // 2, "commit: vector length differs from the task's vector_len"
    if not self.started:
        self.started = True
        self.opened[round] = block.timestamp
    self.update_hash[round][msg.sender] = update_hash
    self.commit_count[round] += 1
    self.total_examples[round] += num_examples
    # Multiplying a word by n and adding words adds both halves at once, without carries: a half is
    # below 2**88, n below 2**32, and a sum of at most 32 such products stays below 2**125.
    s: uint256 = round % 2
    i: uint256 = 0
    if self.commit_count[round] == 1:
        self.sum_round[s] = round
        for w: uint256 in vector:
            assert w & OUT_OF_RANGE == 0, "commit: a vector value is out of range (|value| >= 2**87)"
            self.weighted_sum[s][i] = unsafe_mul(w, num_examples)
            i = unsafe_add(i, 1)
    else:
        for w: uint256 in vector:
            assert w & OUT_OF_RANGE == 0, "commit: a vector value is out of range (|value| >= 2**87)"
            self.weighted_sum[s][i] = unsafe_add(self.weighted_sum[s][i], unsafe_mul(w, num_examples))
            i = unsafe_add(i, 1)
    log Committed(round=round, participant=msg.sender, update_hash=update_hash, num_examples=num_examples)
    if self.commit_count[round] == len(self.participants):
        self._close_commits(round)


@external
def close_commits(round: uint256):
    """
    @notice Close a round's commitments without the missing participants: once the round's timeout
            has passed since they opened, with at least a quorum committed. Anyone may call it.
    """
    assert not self.ended, "close_commits: the task has ended"
    assert round == self.current_round or (round == self.current_round + 1 and self.commits_closed[self.current_round]), "close_commits: not the current round (or the next)"
    assert not self.commits_closed[round], "close_commits: the round's commitments are closed already"
    assert self.round_timeout > 0, "close_commits: the task has no round timeout (every participant commits)"
    assert self.opened[round] > 0 and block.timestamp >= self.opened[round] + self.round_timeout, "close_commits: the round's timeout has not passed"
    assert self.commit_count[round] >= self.quorum, "close_commits: fewer commitments than the quorum"
    self._close_commits(round)


@internal
def _close_commits(round: uint256):
    self.commits_closed[round] = True
    self.closed_at[round] = block.timestamp
    if round < self.num_rounds:
        self.opened[round + 1] = block.timestamp
    log Aggregated(round=round, total_examples=self.total_examples[round], mean=self._mean(round))


@view
@internal
def _mean(round: uint256) -> DynArray[uint256, MAX_WORDS]:
    # a half holds sum(n * value) + BIAS * total, so floor(half / total) == floor(mean) + BIAS: the
    # weighted mean rounded down, packed like the vectors
    out: DynArray[uint256, MAX_WORDS] = []
    total: uint256 = self.total_examples[round]
    s: uint256 = round % 2
    for i: uint256 in range((self.vector_len + 1) // 2, bound=MAX_WORDS):
        w: uint256 = self.weighted_sum[s][i]
        out.append(unsafe_div(w & HALF, total) | (unsafe_div(w >> 128, total) << 128))
    return out


@view
@external
def weighted_mean(round: uint256) -> DynArray[uint256, MAX_WORDS]:
    """The sample-weighted mean of the round's committed vectors so far, rounded down, packed like them.

    Only the latest two rounds' sums are kept; every round's final mean is in its Aggregated event.
    """
    assert self.total_examples[round] > 0, "weighted_mean: no commitments for this round"
    assert round == self.sum_round[round % 2], "weighted_mean: only the latest two rounds are kept; read its Aggregated event"
    return self._mean(round)


@external
def attest(round: uint256, aggregate_hash: bytes32):
    assert self.registered[msg.sender], "attest: sender is not a registered participant"
    assert not self.ended, "attest: the task has ended"
    assert round == self.current_round, "attest: wrong round, not the task's current round"
    assert self.commits_closed[round], "attest: the round is still waiting for commitments"
    assert self.update_hash[round][msg.sender] != empty(bytes32), "attest: sender did not commit in this round"
    assert self.attested_hash[round][msg.sender] == empty(bytes32), "attest: sender already attested this round"
    assert aggregate_hash != empty(bytes32), "attest: aggregate_hash is zero"
    self.attested_hash[round][msg.sender] = aggregate_hash
    self.attest_count[round] += 1
    self.votes[round][aggregate_hash] += 1
    log Attested(round=round, participant=msg.sender, aggregate_hash=aggregate_hash)
    if self.attest_count[round] == self.commit_count[round]:
        self._close(round, False)


@external
def close_round(round: uint256):
    """
    @notice Finalize a round without the committers that did not attest: once the round's timeout
            has passed since its commitments closed, with a quorum agreeing on one hash. Anyone may
            call it.
    """
    assert not self.ended, "close_round: the task has ended"
    assert round == self.current_round, "close_round: not the task's current round"
    assert self.commits_closed[round], "close_round: the round is still waiting for commitments"
    assert self.round_timeout > 0, "close_round: the task has no round timeout (every committer attests)"
    assert block.timestamp >= self.closed_at[round] + self.round_timeout, "close_round: the round's timeout has not passed"
    self._close(round, True)


@internal
def _close(round: uint256, late: bool):
    best: bytes32 = empty(bytes32)
    best_votes: uint256 = 0
    for p: address in self.participants:
        h: bytes32 = self.attested_hash[round][p]
        if h == empty(bytes32):
            continue
        v: uint256 = self.votes[round][h]
        if v > best_votes:
            best = h
            best_votes = v
    if best_votes < self.quorum:
        # every committer attested and no hash has a quorum: the round can never be finalized
        assert not late, "close_round: no aggregate has a quorum of attestations yet"
        self.failed = True
        self.ended = True
        log RoundFailed(round=round, best_votes=best_votes)
        return
    self.finalized_hash[round] = best
    for p: address in self.participants:
        h: bytes32 = self.attested_hash[round][p]
        if h != best and h != empty(bytes32):
            log Dissent(round=round, participant=p, attested_hash=h, agreed_hash=best)
    log RoundFinalized(round=round, aggregate_hash=best, votes=best_votes)
    if round == self.num_rounds:
        self.ended = True
        log TaskEnded(rounds_finalized=round)
    else:
        self.current_round = round + 1


@external
def attest_model(model_hash: bytes32):
    assert self.registered[msg.sender], "attest_model: sender is not a registered participant"
    assert self.ended and not self.failed, "attest_model: the task has not ended with every round finalized"
    assert self.archived_hash == empty(bytes32), "attest_model: the models are archived already (a missing participant adds its model with attest_late)"
    assert self.model_vote[msg.sender] == empty(bytes32), "attest_model: sender already attested a model"
    assert model_hash != empty(bytes32), "attest_model: model_hash is zero"
    self.model_vote[msg.sender] = model_hash
    self.model_votes[model_hash] += 1
    log ModelAttested(participant=msg.sender, model_hash=model_hash)


@external
def archive(model_hash: bytes32, locator: String[256]):
    assert msg.sender == self.submitter, "archive: only the task's submitter archives the model"
    assert self.archived_hash == empty(bytes32), "archive: the model is already archived"
    assert self.model_votes[model_hash] >= self.quorum, "archive: model hash is not the one a quorum attested"
    self.archived_hash = model_hash
    self.archived_locator = locator
    attested: DynArray[address, MAX_PARTICIPANTS] = []
    missing: DynArray[address, MAX_PARTICIPANTS] = []
    for p: address in self.participants:
        v: bytes32 = self.model_vote[p]
        if v == model_hash:
            attested.append(p)
        elif v == empty(bytes32):
            missing.append(p)
            self.archive_missing[p] = True
    log Archived(model_hash=model_hash, locator=locator)
    log ArchiveAttendance(attested=attested, missing=missing)


@external
def attest_late(model_hash: bytes32):
    """
    @notice A participant the archive names missing adds the hash of its own model, once, after the archive.
    """
    assert self.archived_hash != empty(bytes32), "attest_late: the task's models are not archived yet"
    assert self.archive_missing[msg.sender], "attest_late: sender is not a participant the archive names missing"
    assert self.late_model[msg.sender] == empty(bytes32), "attest_late: sender added its model already"
    assert model_hash != empty(bytes32), "attest_late: model_hash is zero"
    self.late_model[msg.sender] = model_hash
    log LateModel(participant=msg.sender, model_hash=model_hash)


@view
@external
def participant_count() -> uint256:
    return len(self.participants)
