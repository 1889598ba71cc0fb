"""Reading a recorded ledger back: ``show`` (what happened), ``verify`` (was it right), ``get_model``.

``verify`` replays the signed transactions on a fresh embedded chain (or reads the receipts back from
the node of an RPC run) and checks that every receipt is the recorded one; then, round by round in
order, it checks each commitment against its stored blob, each committed on-chain vector against the
update, the contract's weighted mean against an exact recomputation, and the finalized aggregate
hash against the algorithm's own ``aggregate`` recomputed from the blobs. It stops at the first
mismatch and names its round and institution. Rounds that never finalized (an interrupted run) are
reported, not failed: a run is verified up to its last finalized round.
"""

from __future__ import annotations

import json
from collections import defaultdict

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account

from fedmdh.algorithms.base import Algorithm
from fedmdh.errors import InputError
from fedmdh.ledger import codec
from fedmdh.ledger.blobs import DirBlobStore, sha256_hex
from fedmdh.ledger.chain import Chain, receipt_logs
from fedmdh.ledger.events import decode_logs
from fedmdh.ledger.recorder import TASK_FILE, TX_FILE
from fedmdh.runtime.protocol import aggregate_rng


def locate(path: str | Path) -> Path:
    """The ledger folder of a run folder (``RUN/ledger``) or the ledger folder itself."""
    p = Path(path)
    for cand in (p / "ledger", p):
        if (cand / TASK_FILE).exists():
            return cand
    if (p / "ledger" / TX_FILE).exists() or (p / TX_FILE).exists():
        raise InputError(f"{p}: the run stopped before its task was created on chain; nothing to inspect.")
    raise InputError(f"{p}: no ledger found (expected {p}/ledger/{TASK_FILE}); was the run made with --ledger off?")


def load_task(ledger_dir: Path) -> dict[str, Any]:
    return json.loads((ledger_dir / TASK_FILE).read_text(encoding="utf-8"))


def load_records(ledger_dir: Path) -> list[dict[str, Any]]:
    path = ledger_dir / TX_FILE
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # an interrupted run can leave a partial last line; anything else is damage
            if i == len(path.read_text(encoding="utf-8").splitlines()):
                break
            raise InputError(f"{path}: line {i} is not JSON; the transaction log is damaged.") from None
    return out


def _describe(rec: dict[str, Any]) -> str:
    where = f" of round {rec['round']}" if "round" in rec else ""
    return f"{rec['fn']}{where} by {rec.get('actor', rec['from'])}"


@dataclass
class Rounds:
    """The task's state as its events tell it."""

    created: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # address -> institution
    commits: dict[int, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    means: dict[int, dict[str, Any]] = field(default_factory=dict)
    attests: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    dissent: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    finalized: dict[int, str] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)
    gas: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    ended: bool = False
    archived: dict[str, Any] | None = None
    model_votes: dict[str, str] = field(default_factory=dict)
    setup_gas: int = 0


def build_rounds(records: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> Rounds:
    st = Rounds()
    for rec, logs in records:
        if rec.get("status") != 1:
            continue
        if "round" in rec:
            st.gas[int(rec["round"])] += int(rec.get("gas_used", 0))
        else:
            st.setup_gas += int(rec.get("gas_used", 0))
        for name, a in decode_logs(logs):
            if name == "TaskCreated":
                st.created = a
            elif name == "Registered":
                st.names[a["participant"]] = a["name"]
            elif name == "Committed":
                st.commits[a["round"]][a["participant"]] = {**a, "vector": codec.committed_vector(rec["raw"])}
            elif name == "Aggregated":
                st.means[a["round"]] = a
            elif name == "Attested":
                st.attests[a["round"]][a["participant"]] = a["aggregate_hash"]
            elif name == "Dissent":
                st.dissent[a["round"]].append(a)
            elif name == "RoundFinalized":
                st.finalized[a["round"]] = a["aggregate_hash"]
            elif name == "RoundFailed":
                st.failed[a["round"]] = a["best_votes"]
            elif name == "TaskEnded":
                st.ended = True
            elif name == "ModelAttested":
                st.model_votes[a["participant"]] = a["model_hash"]
            elif name == "Archived":
                st.archived = a
    return st


# ------------------------------------------------------------------ show


def show(path: str | Path) -> dict[str, Any]:
    """Task, participants, rounds (commitments, on-chain means, attestations, gas) and the archive."""
    ledger_dir = locate(path)
    task = load_task(ledger_dir)
    records = load_records(ledger_dir)
    st = build_rounds([(r, r.get("logs", [])) for r in records])
    layout = task.get("vector_layout", [])
    labels = [f"{n}[{i}]" if s > 1 else n for n, s in layout for i in range(s)]
    rounds = []
    for r in sorted(set(st.commits) | set(st.attests)):
        mean = st.means.get(r)
        rounds.append({
            "round": r,
            "commitments": {st.names.get(a, a): {"update_hash": c["update_hash"], "num_examples": c["num_examples"]}
                            for a, c in sorted(st.commits[r].items(), key=lambda kv: st.names.get(kv[0], kv[0]))},
            "onchain_mean": (dict(zip(labels, codec.from_fixed(codec.unpack(mean["mean"], len(labels))).tolist()))
                             if mean else None),
            "attestations": {st.names.get(a, a): h for a, h in st.attests[r].items()},
            "dissent": [st.names.get(d["participant"], d["participant"]) for d in st.dissent[r]],
            "finalized": st.finalized.get(r),
            "failed": r in st.failed,
            "gas": st.gas[r],
        })
    rejected = [_describe(r) + f": {r.get('error')}" for r in records if r.get("status") != 1]
    return {
        "ledger": str(ledger_dir),
        "task": {k: task[k] for k in ("chain", "rpc_url", "chain_id", "contract", "algorithm", "target", "rounds",
                                      "quorum", "submitter")},
        "participants": task["participants"],
        "rounds": rounds,
        "ended": st.ended,
        "archive": st.archived,
        "setup_gas": st.setup_gas,
        "total_gas": st.setup_gas + sum(st.gas.values()),
        "transactions": len(records),
        "rejected": rejected,
    }


# ------------------------------------------------------------------ verify


@dataclass
class VerifyReport:
    ok: bool
    problem: str | None
    rounds_verified: int
    rounds_total: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (f"OK: {self.rounds_verified} finalized round(s) verified" if self.ok
                else f"FAILED: {self.problem}")
        return "\n".join([head, *self.notes])


def _replayed_logs(task: dict[str, Any], records: list[dict[str, Any]], rpc_url: str | None,
                   notes: list[str]) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], str | None]:
    """Re-execute (embedded) or re-read (rpc) every recorded transaction; the first mismatch is a problem."""
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    sent = [r for r in records if r.get("tx_hash")]
    for rec in sent:
        try:
            signer = Account.recover_transaction(rec["raw"])
        except Exception:  # noqa: BLE001
            return out, f"transaction {_describe(rec)}: its signed bytes do not decode"
        if signer != rec["from"]:
            return out, f"transaction {_describe(rec)}: signed by {signer}, not by {rec['from']}"
    if task["chain"] == "embedded":
        chain = Chain.embedded()
        replayed: dict[str, str | None] = {}  # tx hash -> revert reason, for the blocks replayed at once
        tried: set[Any] = set()
        blocks: dict[Any, list[dict[str, Any]]] = {}
        for r in sent:
            blocks.setdefault(r.get("block"), []).append(r)

        def source(rec: dict[str, Any]) -> Any:
            block_no = rec.get("block")
            if rec["tx_hash"] not in replayed and block_no is not None and block_no not in tried:
                # replay the whole recorded block at once, as recorded
                tried.add(block_no)
                replayed.update(chain.mine_batch([bytes.fromhex(r["raw"][2:]) for r in blocks[block_no]]) or [])
            if rec["tx_hash"] not in replayed:  # the chain refused the block: one by one
                return chain.receipt(chain.send_raw(bytes.fromhex(rec["raw"][2:])))
            return chain.receipt(rec["tx_hash"])

        notes.append(f"replayed {len(sent)} signed transactions on a fresh embedded chain")
    else:
        url = rpc_url or task.get("rpc_url")
        try:
            chain = Chain.rpc(url)
        except InputError:
            notes.append(f"node {url} unreachable: checked the recorded receipts without re-reading them from the chain")
            return [(r, r.get("logs", [])) for r in sent], None
        if chain.chain_id != task["chain_id"]:
            return out, f"the node at {url} is chain {chain.chain_id}, the task was recorded on chain {task['chain_id']}"
        source = lambda rec: chain.w3.eth.get_transaction_receipt(rec["tx_hash"])  # noqa: E731
        notes.append(f"read {len(sent)} transaction receipts back from the node at {url}")
    for rec in sent:
        try:
            receipt = source(rec)
        except Exception as exc:  # noqa: BLE001 - a replay that the chain refuses is a mismatch
            status, logs = 0, []
            err = str(exc)
        else:
            status, logs, err = int(receipt["status"]), receipt_logs(receipt), ""
        if status != rec.get("status") or logs != rec.get("logs", []):
            return out, (f"transaction {_describe(rec)} does not replay to its recorded receipt "
                         f"(status {status} vs {rec.get('status')}{'; ' + err if err else ''})")
        out.append((rec, logs))
    return out, None


def algorithm_for(ledger_dir: Path, task: dict[str, Any]) -> Algorithm:
    """The run's algorithm with its settings, rebuilt from the run's config.toml."""
    from fedmdh.config import ExperimentConfig, read_toml

    if not task.get("config"):
        raise InputError(f"{ledger_dir}: the task names no config file; pass the algorithm to verify().")
    path = (ledger_dir / task["config"]).resolve()
    return ExperimentConfig(**read_toml(path)).build_algorithm(task["algorithm"])


def verify(path: str | Path, algorithm: Algorithm | None = None, rpc_url: str | None = None) -> VerifyReport:
    """Replay and check a recorded task; see the module docstring."""
    ledger_dir = locate(path)
    task = load_task(ledger_dir)
    records = load_records(ledger_dir)
    notes: list[str] = []
    replayed, problem = _replayed_logs(task, records, rpc_url, notes)
    st = build_rounds(replayed)
    total = len(set(st.commits) | set(st.attests))
    if problem:
        return VerifyReport(False, problem, 0, total, notes)
    if algorithm is None:
        algorithm = algorithm_for(ledger_dir, task)
    blobs = DirBlobStore(ledger_dir / task.get("blobs", "blobs"))
    names = {a: n for n, a in task["participants"].items()}
    if st.names and st.names != names:
        return VerifyReport(False, "the registered participants differ from task.json", 0, total, notes)

    def fail(msg: str, done: int) -> VerifyReport:
        return VerifyReport(False, msg, done, total, notes)

    init_hash = st.created.get("initial_state_hash", "0x")[2:]
    try:
        state = codec.decode_payload(_checked_blob(blobs, init_hash))
    except _BlobProblem as exc:
        return fail(f"initial state: {exc}", 0)
    layout = [tuple(x) for x in task["vector_layout"]]
    seed = int(task.get("seed", 0))
    done = 0
    for r in range(1, int(task["rounds"]) + 1):
        if r not in st.finalized:
            if r in st.failed:
                notes.append(f"round {r} did not reach the quorum: the task stopped there")
            elif r in st.commits or r in st.attests:
                notes.append(f"round {r} was not finalized (run interrupted?): verified up to round {done}")
            elif not st.ended and r <= total + 1 and done < int(task["rounds"]):
                notes.append(f"rounds {r}..{task['rounds']} were never recorded (run interrupted?)")
            break
        updates = []
        for addr, c in sorted(st.commits[r].items(), key=lambda kv: names.get(kv[0], kv[0])):
            inst = names.get(addr, addr)
            try:
                upd = codec.decode_update(_checked_blob(blobs, c["update_hash"][2:]))
            except _BlobProblem as exc:
                return fail(f"round {r}, institution {inst}: update {exc}", done)
            if upd.institution != inst or upd.num_examples != c["num_examples"]:
                return fail(f"round {r}, institution {inst}: the update blob's institution or sample count differs "
                            "from the commitment", done)
            lay, flat = codec.flatten(codec.onchain_vectors(algorithm, upd))
            if [tuple(x) for x in lay] != layout or codec.pack(codec.to_fixed(flat)) != list(c["vector"]):
                return fail(f"round {r}, institution {inst}: the committed on-chain vector is not the update's", done)
            updates.append(upd)
        mean = st.means.get(r)
        total_n = sum(int(c["num_examples"]) for c in st.commits[r].values())
        size = sum(int(n) for _, n in layout)
        values = [(codec.unpack(c["vector"], size), int(c["num_examples"])) for c in st.commits[r].values()]
        # the contract's mean rounds down (floor), exactly
        expected = [sum(v[i] * n for v, n in values) // total_n for i in range(size)]
        if mean is None or list(mean["mean"]) != codec.pack(expected):
            return fail(f"round {r}: the contract's weighted mean differs from the exact recomputation", done)
        state = algorithm.aggregate(state, updates, aggregate_rng(seed, r), r)
        agg_hash = sha256_hex(codec.encode_payload(state))
        if "0x" + agg_hash != st.finalized[r]:
            return fail(f"round {r}: {algorithm.name}.aggregate recomputed from the blobs gives {agg_hash[:16]}, "
                        f"the round finalized {st.finalized[r][2:18]}", done)
        for d in st.dissent[r]:
            notes.append(f"round {r}: institution {names.get(d['participant'], '?')} attested a different aggregate "
                         f"({d['attested_hash'][2:18]}); the quorum finalized the recomputed one")
        done = r
    if st.archived is not None:
        problem = _check_archive(ledger_dir, blobs, st.archived["model_hash"][2:])
        if problem:
            return fail(problem, done)
        notes.append(f"archived model {st.archived['model_hash'][2:18]} matches the run's models/")
    return VerifyReport(True, None, done, total, notes)


class _BlobProblem(Exception):
    pass


def _checked_blob(blobs: DirBlobStore, digest: str) -> bytes:
    try:
        data = blobs.get(digest)
    except Exception:  # noqa: BLE001
        raise _BlobProblem(f"blob {digest[:16]} is missing from {blobs.root}") from None
    if sha256_hex(data) != digest:
        raise _BlobProblem(f"blob {digest[:16]} was altered: its sha256 is not the on-chain commitment") from None
    return data


def _check_archive(ledger_dir: Path, blobs: DirBlobStore, digest: str) -> str | None:
    try:
        manifest = json.loads(_checked_blob(blobs, digest))
    except _BlobProblem as exc:
        return f"archived model manifest: {exc}"
    run_dir = ledger_dir.parent
    for rel, h in manifest["files"].items():
        try:
            _checked_blob(blobs, h)
        except _BlobProblem as exc:
            return f"archived model file {rel}: {exc}"
        local = run_dir / rel
        if local.exists() and sha256_hex(local.read_bytes()) != h:
            return f"model file {rel} in the run folder differs from the archived model"
    return None


# ------------------------------------------------------------------ model get


def get_model(out: str | Path, run_dir: str | Path | None = None, rpc_url: str | None = None,
              task: str | None = None, blobs_dir: str | Path | None = None) -> dict[str, Any]:
    """Retrieve the archived model of a task into ``out`` and verify every hash on the way.

    From a run folder (its recorded ledger), or from a node (``rpc_url`` and the task's contract
    address ``task``), reading blobs from ``blobs_dir`` or the archive's locator.
    """
    if run_dir is not None:
        ledger_dir = locate(run_dir)
        st = build_rounds([(r, r.get("logs", [])) for r in load_records(ledger_dir)])
        if st.archived is None:
            raise InputError(f"{run_dir}: no model was archived for this task (interrupted run?).")
        digest, locator = st.archived["model_hash"][2:], st.archived["locator"]
        blobs = DirBlobStore(blobs_dir or ledger_dir / load_task(ledger_dir).get("blobs", "blobs"))
    else:
        if not (rpc_url and task):
            raise InputError("give RUN_DIR, or --chain-rpc URL with --task ADDRESS.")
        chain = Chain.rpc(rpc_url)
        if not chain.w3.is_address(task) or not chain.w3.eth.get_code(chain.w3.to_checksum_address(task)):
            raise InputError(f"--task {task}: no contract at that address on the node at {rpc_url}.")
        c = chain.contract(task)
        digest = bytes(c.functions.archived_hash().call()).hex()
        locator = c.functions.archived_locator().call()
        if digest == "00" * 32:
            raise InputError(f"task {task} has no archived model yet.")
        if blobs_dir is None:
            if not locator.startswith("file://"):
                raise InputError(f"the archive's locator {locator} is not a local file; pass --blobs DIR.")
            from urllib.parse import unquote, urlparse

            blobs_dir = Path(unquote(urlparse(locator).path)).parent
        blobs = DirBlobStore(blobs_dir)
    try:
        manifest = json.loads(_checked_blob(blobs, digest))
        out = Path(out)
        for rel, h in manifest["files"].items():
            data = _checked_blob(blobs, h)
            dest = out / Path(rel).relative_to(Path(rel).parts[0]) if Path(rel).parts[0] == "models" else out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    except _BlobProblem as exc:
        raise InputError(f"archived model {digest[:16]}: {exc}.") from None
    return {"model_hash": digest, "locator": locator, "files": sorted(manifest["files"])}


