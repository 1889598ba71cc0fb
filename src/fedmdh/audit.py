"""Reading a recorded ledger back: ``show`` (what the log says), ``verify`` (was it right), ``get_model``.

``verify`` trusts nothing in the run folder that the chain does not vouch for:

1. every logged transaction decodes, is signed by the account it names, and every field of its
   record that the signed bytes fix (hash, sender, recipient, gas limit, function, round, chain)
   equals them;
2. the signed transactions are replayed on a fresh embedded chain (or, for a run on a node, its
   receipts are read back from the node), and each record's receipt (status, gas used, block,
   created contract, events) must equal the replayed one;
3. ``task.json`` and ``config.toml`` must agree with the task the chain created: the
   ``TaskCreated`` event (target, algorithm, rounds, quorum, vector size) and the task manifest its
   ``initial_state_hash`` commits to (initial state, hyperparameters, config.toml's sha256, vector
   layout, whether the task ends with an archived model);
4. round by round, for every round the task was created with: each commitment against its blob,
   each committed on-chain vector against the update, the contract's weighted mean against an exact
   recomputation, the finalized aggregate against the algorithm's own ``aggregate`` recomputed from
   the blobs, and the aggregate's own blob;
5. the archived manifest, every archived file, and the run folder: ``models/`` must hold exactly
   the archived files, and the run files archived with them (``final_metrics.json``,
   ``metrics.jsonl``, ``federation.json``) must be unchanged.

It stops at the first mismatch and names its round, institution and what differs. A run that did
not finish (rounds not finalized, or no archive) is reported as incomplete, never as a bare "OK";
``partial=True`` accepts it. ``get_model`` relies on the same replay: it delivers only a model the
replayed chain archived, and writes only inside its target folder.

What it cannot see (design limits, also said in its output): a ledger whose signing keys one party
holds (every run of this release: the simulator drives all institutions) shows what happened, not
who agreed; that party can re-sign a whole different history. An embedded chain lives in the log
alone, so dropping the log's end cannot be told from an interrupted run (it reads as incomplete).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from fedmdh import jsonsafe
from fedmdh.algorithms.base import Algorithm
from fedmdh.errors import FedmdhError, InputError
from fedmdh.ledger import codec
from fedmdh.ledger.blobs import DirBlobStore, sha256_hex
from fedmdh.ledger.errors import LedgerError
from fedmdh.ledger.events import decode_log
from fedmdh.ledger.artifacts import HELD_BY_INSTITUTIONS, function_name
from fedmdh.ledger.recorder import SUBMITTER, TASK_FILE, TASK_MANIFEST_KIND, TX_FILE
from fedmdh.runtime.protocol import training_thread_count
from fedmdh.runtime.round import Aggregation

#: said by ``show`` and ``verify`` of every ledger whose keys one party held
ONE_PARTY = "signed by keys held by one party: shows what happened, not who agreed"
#: the fields of task.json that ``show`` and ``verify`` read
TASK_FIELDS = ("chain", "chain_id", "contract", "submitter", "participants", "algorithm", "target", "rounds",
               "quorum", "vector_layout")
#: what the run folder holds that no check covers
NOT_COVERED = "run.log"
#: where ``fedmdh deploy local`` keeps its chain's state (anvil writes it when stopped), under the run folder
TRIAL_CHAIN_STATE = Path("deploy") / "chain-state.json"
#: the exit status of ``fedmdh ledger verify`` and ``fedmdh model get`` when the ledger could not be checked
#: (its chain unreachable, OpenFHE missing): not a verdict on the run, unlike FAILED (1)
EXIT_CANNOT_CHECK = 3


class LedgerDamage(InputError):
    """A file of the ledger cannot be read as what it should be (``verify`` reports it as a failure)."""


class CannotCheck(InputError):
    """The ledger could not be checked (its chain node unreachable, OpenFHE missing): no verdict either way.

    ``fedmdh model get`` exits with :data:`EXIT_CANNOT_CHECK` on it."""


def _read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path`` (a regular file, nested at most ``jsonsafe.MAX_DEPTH`` deep), or one
    :class:`LedgerDamage` line naming the file and ``what`` it is."""
    try:
        with jsonsafe.open_regular(path, "rb") as fh:
            data = fh.read(jsonsafe.MAX_FILE_BYTES + 1)
    except ValueError:  # a FIFO, a device, a folder: reading it could block or mean nothing
        raise LedgerDamage(f"{path}: is not a regular file; {what} is damaged.") from None
    except OSError as exc:
        raise LedgerDamage(f"{path}: cannot be read ({exc.strerror or exc}); {what} is damaged.") from None
    if len(data) > jsonsafe.MAX_FILE_BYTES:
        raise LedgerDamage(f"{path}: is larger than {jsonsafe.MAX_FILE_BYTES:,} bytes; {what} is damaged.")
    try:
        return jsonsafe.loads(data.decode("utf-8"))
    except jsonsafe.JSONTooDeep as exc:
        raise LedgerDamage(f"{path}: is nested more than {exc.max_depth} levels deep; {what} is damaged.") from None
    except ValueError:  # UnicodeDecodeError, json.JSONDecodeError
        raise LedgerDamage(f"{path}: is not readable JSON; {what} is damaged.") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: what each field of task.json must be (checked before anything reads it), and how to say it
_TASK_TYPES: dict[str, tuple[Any, str]] = {
    "chain": (lambda v: isinstance(v, str), "a string"),
    "chain_id": (_is_int, "an integer"),
    "contract": (lambda v: isinstance(v, str), "a string"),
    "submitter": (lambda v: isinstance(v, str), "a string"),
    "participants": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(a, str)
                                                            for k, a in v.items()),
                     "a table of institution names to addresses"),
    "algorithm": (lambda v: isinstance(v, str), "a string"),
    "target": (lambda v: isinstance(v, str), "a string"),
    "rounds": (_is_int, "an integer"),
    "quorum": (_is_int, "an integer"),
    "vector_layout": (lambda v: isinstance(v, list) and all(
        isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and _is_int(x[1]) and 0 <= x[1] <= 10**6
        for x in v), "a list of [name, size] pairs"),
    "seed": (_is_int, "an integer"),
    "rpc_url": (lambda v: v is None or isinstance(v, str), "a URL or null"),
    "config": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "blobs": (lambda v: v is None or isinstance(v, str), "a folder name or null"),
    "secure": (lambda v: v is None or v is False or isinstance(v, dict), "a table (a secure task) or null"),
}


def locate(path: str | Path) -> Path:
    """The ledger folder of a run folder (``RUN/ledger``) or the ledger folder itself."""
    p = Path(path)
    for cand in (p / "ledger", p):
        if (cand / TASK_FILE).exists():
            return cand
    if (p / "ledger" / TX_FILE).exists() or (p / TX_FILE).exists():
        raise InputError(f"{p}: no {TASK_FILE} beside the transaction log: the run stopped before its task was created "
                         f"on chain, or {TASK_FILE} was removed; nothing to inspect.")
    raise InputError(f"{p}: no ledger found (expected {p}/ledger/{TASK_FILE}); was the run made with --ledger off?")


def load_task(ledger_dir: Path) -> dict[str, Any]:
    """task.json, read as a regular file with a bounded depth, with every field it must have of its type."""
    path = ledger_dir / TASK_FILE
    task = _read_json(path, "the ledger's task file")
    missing = [k for k in TASK_FIELDS if k not in task] if isinstance(task, dict) else list(TASK_FIELDS)
    if missing:
        raise LedgerDamage(f"{path}: lacks {', '.join(missing)}; the ledger's task file is damaged.")
    for key, (ok, kind) in _TASK_TYPES.items():
        if key in task and not ok(task[key]):
            shown = json.dumps(task[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise LedgerDamage(f"{path}: {key} is {shown}, not {kind}; the ledger's task file is damaged.")
    return task


@dataclass
class Log:
    """The transaction log: its records (each with ``_line``, its line number) and how it ends."""

    path: Path
    records: list[dict[str, Any]]
    torn_tail: bool  # the last line was cut mid-line (an interrupted write, or a cut) and is left out


def read_log(ledger_dir: Path) -> Log:
    path = ledger_dir / TX_FILE
    try:
        with jsonsafe.open_regular(path, "r", encoding="utf-8") as fh:  # never blocks on a FIFO
            text = fh.read()
    except ValueError as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise LedgerDamage(f"{path}: cannot be read as text; the transaction log is damaged.") from None
        raise LedgerDamage(f"{path}: is not a regular file; the transaction log is damaged.") from None
    except OSError:
        raise LedgerDamage(f"{path}: cannot be read as text; the transaction log is damaged.") from None
    lines = text.split("\n")
    unterminated = bool(text) and not text.endswith("\n")
    out, torn = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = jsonsafe.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except jsonsafe.JSONTooDeep as exc:
            raise LedgerDamage(f"{path}: line {i} is nested more than {exc.max_depth} levels deep; the transaction "
                               "log is damaged.") from None
        except ValueError:
            if unterminated and i == len(lines):  # an interrupted write leaves a partial last line
                torn = True
                break
            raise LedgerDamage(f"{path}: line {i} is not a JSON record; the transaction log is damaged.") from None
        rec["_line"] = i
        out.append(rec)
    return Log(path, out, torn)


def load_records(ledger_dir: Path) -> list[dict[str, Any]]:
    """The log's records, as logged (each with ``_line``)."""
    return read_log(ledger_dir).records


def _describe(rec: dict[str, Any]) -> str:
    where = f" of round {rec['round']}" if "round" in rec else ""
    line = f" (line {rec['_line']} of {TX_FILE})" if "_line" in rec else ""
    return f"{rec.get('fn', '?')}{where} by {rec.get('actor', rec.get('from', '?'))}{line}"


@dataclass
class Rounds:
    """The task's state as the events of its contract tell it."""

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
    attendance: dict[str, Any] | None = None  # the archive's ArchiveAttendance: who attested it, who is missing
    late: dict[str, str] = field(default_factory=dict)  # participant -> model hash it added after the archive
    setup_gas: int = 0


def build_rounds(records: list[tuple[dict[str, Any], list[dict[str, Any]]]], contract: str | None = None) -> Rounds:
    """The state from ``(record, logs)`` pairs, reading only the events of ``contract`` (when given).

    Raises :class:`LedgerDamage` naming the record whose events do not decode.
    """
    st = Rounds()
    want = contract.lower() if isinstance(contract, str) else None
    for rec, logs in records:
        if rec.get("status") != 1:
            continue
        try:
            if "round" in rec:
                st.gas[int(rec["round"])] += int(rec.get("gas_used", 0))
            else:
                st.setup_gas += int(rec.get("gas_used", 0))
            events = [decode_log(log) for log in logs if want is None or str(log.get("address", "")).lower() == want]
        except Exception:  # noqa: BLE001 - edited fields or event data that eth-abi cannot decode
            raise LedgerDamage(f"transaction {_describe(rec)}: its receipt does not decode; the transaction log is "
                               "damaged (`fedmdh ledger verify` names what differs).") from None
        for name, a in (e for e in events if e is not None):
            if name == "TaskCreated":
                st.created = a
            elif name == "Registered":
                st.names[a["participant"]] = a["name"]
            elif name == "Committed":
                st.commits[a["round"]][a["participant"]] = {**a, "raw": rec.get("raw")}
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
            elif name == "ArchiveAttendance":
                st.attendance = a
            elif name == "LateModel":
                st.late[a["participant"]] = a["model_hash"]
    return st


def _signer_notes(task: dict[str, Any], ledger_dir: Path, manifest: dict[str, Any] | None) -> list[str]:
    notes = []
    if task.get("chain") == "embedded" or manifest is None or manifest.get("signers") == "one party":
        notes.append(ONE_PARTY)
    if (ledger_dir / "keystore").is_dir():
        notes.append(f"this folder holds the signing keys themselves ({ledger_dir / 'keystore'}): anyone holding it "
                     "can re-sign a forged history that verify accepts")
    return notes


# ------------------------------------------------------------------ show


def show(path: str | Path) -> dict[str, Any]:
    """Task, participants, rounds (commitments, on-chain means, attestations, gas) and the archive, as logged.

    Nothing is replayed or checked here (``verify`` does that); a log that cannot be read raises
    :class:`LedgerDamage` with one line.
    """
    ledger_dir = locate(path)
    task = load_task(ledger_dir)
    records = load_records(ledger_dir)
    st = build_rounds([(r, r.get("logs") or []) for r in records], task.get("contract"))
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
    notes = _signer_notes(task, ledger_dir, None)  # every run of this release: one party held the keys
    created = st.created
    for key, onchain in (("rounds", created.get("num_rounds")), ("algorithm", created.get("algorithm")),
                         ("target", created.get("target"))):
        if created and task[key] != onchain:
            notes.append(f"task.json says {key} {task[key]!r}, the logged TaskCreated event {onchain!r}")
    notes.append("shown as logged, not checked: `fedmdh ledger verify` replays and checks it")
    return {
        "ledger": str(ledger_dir),
        "task": {k: task.get(k) for k in ("chain", "rpc_url", "chain_id", "contract", "algorithm", "target", "rounds",
                                          "quorum", "submitter")},
        "participants": task["participants"],
        "rounds": rounds,
        "ended": st.ended,
        "archive": st.archived,
        "setup_gas": st.setup_gas,
        "total_gas": st.setup_gas + sum(st.gas.values()),
        "transactions": len(records),
        "rejected": rejected,
        "notes": notes,
    }


# ------------------------------------------------------------------ verify


@dataclass
class VerifyReport:
    """What ``verify`` found.

    ``ok`` is true when nothing failed and the run is complete (or ``partial`` accepted it);
    ``problem`` says why not otherwise (the first mismatch, or the incomplete line).
    """

    ok: bool
    problem: str | None
    rounds_verified: int
    rounds_total: int
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # every round finalized and, where the task said so, the model archived
    archived: str | None = None  # the archived manifest's sha256
    partial: bool = False  # the caller accepts an incomplete run
    cannot_check: bool = False  # the check could not be made (chain unreachable, OpenFHE missing): no verdict

    @property
    def status(self) -> str:
        """``ok``, ``partial`` (incomplete, accepted), ``incomplete``, ``unchecked`` (``problem`` says why it
        could not be checked: not a verdict) or ``failed``."""
        if self.ok:
            return "ok" if self.complete else "partial"
        if self.cannot_check:
            return "unchecked"
        return "incomplete" if self.problem and self.problem.startswith("incomplete:") else "failed"

    def __str__(self) -> str:
        status = self.status
        if status == "ok":
            head = f"OK: {self.rounds_verified} of {self.rounds_total} rounds finalized and verified"
            if self.archived:
                head += f"; archived model {self.archived[:16]} verified"
        elif status == "partial":
            head = (f"OK (partial): {self.rounds_verified} of {self.rounds_total} rounds finalized and verified, "
                    f"{'archived' if self.archived else 'no archive'}")
        elif status in ("incomplete", "unchecked"):  # "incomplete: ..." / "cannot check ...": no FAILED
            head = str(self.problem)
        else:
            head = f"FAILED: {self.problem}"
        return "\n".join([head, *self.notes])


_EMBEDDED_CHAIN_ID: list[int] = []


def _embedded_chain_id() -> int:
    """The chain id of the embedded chain (eth-tester's), asked of a fresh one once."""
    if not _EMBEDDED_CHAIN_ID:
        from fedmdh.ledger.chain import Chain

        _EMBEDDED_CHAIN_ID.append(Chain.embedded().chain_id)
    return _EMBEDDED_CHAIN_ID[0]


def _norm_receipt(receipt: Any) -> dict[str, Any]:
    from fedmdh.ledger.chain import receipt_logs

    addr = receipt.get("contractAddress")
    if addr:
        from web3 import Web3

        addr = Web3.to_checksum_address(addr)
    return {"status": int(receipt["status"]), "gas_used": int(receipt["gasUsed"]),
            "block": int(receipt["blockNumber"]), "contract_address": addr or None, "logs": receipt_logs(receipt)}


def _signed_fields(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The record's fields that its signed bytes fix, or a problem."""
    from eth_account import Account
    from eth_utils import keccak

    raw = rec.get("raw")
    if not isinstance(raw, str) or not raw.startswith("0x"):
        return None, f"transaction {_describe(rec)}: it has no signed bytes"
    try:
        tx = codec.decode_transaction(raw)
        signer = Account.recover_transaction(raw)
    except Exception:  # noqa: BLE001 - LedgerError or eth-account's own on a damaged signature
        return None, f"transaction {_describe(rec)}: its signed bytes do not decode as a signed transaction"
    fn = function_name(tx)
    out = {"from": signer, "tx_hash": "0x" + keccak(bytes.fromhex(raw[2:])).hex(), "to": tx["to"],
           "gas_limit": tx["gas"], "fn": fn, "chain_id": tx["chain_id"]}
    if fn in ("commit", "attest", "close_commits", "close_round") and len(tx["data"]) >= 36:
        out["round"] = int.from_bytes(tx["data"][4:36], "big")
    return out, None


def _differs(rec: dict[str, Any], key: str, value: Any, source: str) -> str | None:
    """A problem naming ``key`` when the record's value is not ``value`` (addresses and hashes in any case)."""
    recorded = rec.get(key)
    if isinstance(recorded, str) and isinstance(value, str) and value.startswith("0x"):
        same = recorded.lower() == value.lower()
    else:
        same = recorded == value
    return None if same else f"transaction {_describe(rec)}: its recorded {key} is {recorded!r}, {source} {value!r}"


def _log_difference(recorded: Any, replayed: list[dict[str, Any]]) -> str:
    """Which event of a receipt differs, and in what."""
    recorded = recorded if isinstance(recorded, list) else []
    if len(recorded) != len(replayed):
        return f"the record holds {len(recorded)} event(s), the replay {len(replayed)}"
    for i, (a, b) in enumerate(zip(recorded, replayed)):
        if a == b:
            continue
        try:
            da, db = decode_log(a), decode_log(b)
        except Exception:  # noqa: BLE001
            da = None
            db = decode_log(b)
        name = db[0] if db else f"event {i}"
        if da is None or db is None or da[0] != db[0]:
            return f"its recorded event {i} is not the replayed {name} event"
        diffs = [f"{k} {da[1].get(k)!r} (recorded) vs {v!r} (replayed)" for k, v in db[1].items()
                 if da[1].get(k) != v]
        return f"its {name} event differs: " + ("; ".join(diffs) if diffs else "in its raw fields")
    return "its events differ"


class _Audit:
    """The steps of ``verify`` (``get_model`` runs the first two); each returns a problem or ``None``."""

    def __init__(self, ledger_dir: Path, rpc_url: str | None = None) -> None:
        self.ledger_dir = ledger_dir
        self.rpc_url = rpc_url
        self.task = load_task(ledger_dir)
        self.log = read_log(ledger_dir)
        self.notes: list[str] = []
        self.replayed: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.st = Rounds()
        self.manifest: dict[str, Any] | None = None  # the task manifest; None for runs recorded before it
        # blobs are read from the run's own folder only, whatever task.json names (they are checked by hash)
        self.blobs = DirBlobStore(ledger_dir / "blobs")
        named = self.task.get("blobs")
        if named not in (None, "blobs"):
            self.notes.append(f"task.json names the blob folder {named!r}; blobs are read only from the run's own "
                              f"folder {self.blobs.root}")
        self._node: Any = None  # the node an RPC run's receipts were read from
        self.seed: int | None = None  # the run's seed, from its (committed) config
        self.unchecked = False  # a problem returned means "cannot check", not a mismatch
        self._resources = ExitStack()  # a trial's chain brought back for the check, stopped by close()

    def close(self) -> None:
        """Stop what the check started (a trial's chain brought back from its state file)."""
        self._resources.close()

    def _cannot_check(self, problem: str) -> str:
        self.unchecked = True
        return problem

    # ------------------------------------------------------------ 1-2: the transactions

    def replay(self) -> str | None:
        task, records = self.task, self.log.records
        sent = []
        for rec in records:
            if not rec.get("tx_hash"):
                if rec.get("status") == 1:
                    return f"transaction {_describe(rec)}: recorded as accepted, yet it has no transaction hash"
                continue  # refused by the node: it changed nothing
            signed, problem = _signed_fields(rec)
            if problem:
                return problem
            if signed["from"] != rec.get("from"):
                return f"transaction {_describe(rec)}: signed by {signed['from']}, not by {rec.get('from')}"
            if signed["chain_id"] != task["chain_id"]:
                return (f"transaction {_describe(rec)}: signed for chain {signed['chain_id']}, task.json says the task "
                        f"was recorded on chain {task['chain_id']}")
            for key in ("tx_hash", "to", "gas_limit", "fn", "round"):
                problem = _differs(rec, key, signed.get(key), "its signed bytes say")
                if problem:
                    return problem
            sent.append(rec)
        receipts, problem = self._receipts(sent)
        if problem:
            return problem
        for rec, receipt in zip(sent, receipts):
            if receipt["status"] != rec.get("status"):
                err = f" ({receipt['error']})" if receipt.get("error") else ""
                return (f"transaction {_describe(rec)} does not replay to its recorded receipt: its recorded status is "
                        f"{rec.get('status')!r}, the replay's {receipt['status']}{err}")
            if receipt["logs"] != rec.get("logs", []):
                return (f"transaction {_describe(rec)} does not replay to its recorded receipt: "
                        f"{_log_difference(rec.get('logs'), receipt['logs'])}")
            for key in ("gas_used", "block", "contract_address"):
                problem = _differs(rec, key, receipt[key], "the replay gives")
                if problem:
                    return problem
            self.replayed.append((rec, receipt["logs"]))
        self.st = build_rounds(self.replayed, self.task["contract"])
        if self._node is not None:
            problem = self._node_state()
            if problem:
                return problem
        if self.log.torn_tail:
            self.notes.append(f"the last line of {TX_FILE} is cut mid-line (an interrupted write, or a cut log): it "
                              "was not read")
        return None

    def _receipts(self, sent: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
        """The replayed (embedded) or re-read (rpc) receipt of every sent record, normalized."""
        from fedmdh.ledger.chain import Chain

        task = self.task
        out: list[dict[str, Any]] = []
        if task["chain"] == "embedded":
            chain = Chain.embedded()
            replayed: dict[str, str | None] = {}  # tx hash -> revert reason, for the blocks replayed at once
            tried: set[Any] = set()
            blocks: dict[Any, list[dict[str, Any]]] = {}

            def block_of(rec: dict[str, Any]) -> int | None:  # an edited block that is no number: replayed alone
                return rec["block"] if _is_int(rec.get("block")) else None

            for r in sent:
                blocks.setdefault(block_of(r), []).append(r)

            def source(rec: dict[str, Any]) -> Any:
                block_no = block_of(rec)
                if rec["tx_hash"] not in replayed and block_no is not None and block_no not in tried:
                    # replay the whole recorded block at once, as recorded
                    tried.add(block_no)
                    replayed.update(chain.mine_batch([bytes.fromhex(r["raw"][2:]) for r in blocks[block_no]]) or [])
                if rec["tx_hash"] not in replayed:  # the chain refused the block: one by one
                    return chain.receipt(chain.send_raw(bytes.fromhex(rec["raw"][2:])))
                return chain.receipt(rec["tx_hash"])

            self.notes.append(f"replayed {len(sent)} signed transactions on a fresh embedded chain")
        else:
            url = self.rpc_url or task.get("rpc_url")
            try:
                chain = Chain.rpc(str(url))
            except InputError:
                chain, problem = None, None
                state = self.ledger_dir.parent / TRIAL_CHAIN_STATE
                if int(task["chain_id"]) == _embedded_chain_id():
                    # a task recorded on the embedded chain replays from its log alone: no node to ask
                    problem = (f"task.json says the task was recorded on the chain node at {url}, yet its "
                               f"transactions are signed for chain {task['chain_id']}, the embedded chain's: the "
                               "task file was edited")
                elif self.rpc_url is None and (state.exists() or state.is_symlink()):
                    chain, url, problem = self._bring_back(state)
                elif self.rpc_url is None and state.parent.is_dir():
                    problem = self._cannot_check(
                        f"cannot check the receipts: the node at {url} is unreachable and {state}, the trial's saved "
                        f"chain, is missing; give --chain-rpc URL of a node that holds chain {task['chain_id']}")
                else:
                    problem = self._cannot_check(
                        f"cannot check the receipts: the node at {url} is unreachable; give --chain-rpc URL of a "
                        f"node that holds chain {task['chain_id']}")
                if problem:
                    return out, problem
            if chain.chain_id != task["chain_id"]:
                return out, self._cannot_check(
                    f"cannot check the receipts: the node at {url} is chain {chain.chain_id}, task.json says the task "
                    f"was recorded on chain {task['chain_id']}; give --chain-rpc URL of a node that holds it")
            source = lambda rec: chain.w3.eth.get_transaction_receipt(rec["tx_hash"])  # noqa: E731
            self._node = chain
            self.notes.append(f"read {len(sent)} transaction receipts back from the node at {url}")
        for rec in sent:
            try:
                out.append(_norm_receipt(source(rec)))
            except Exception as exc:  # noqa: BLE001 - a replay that the chain refuses is a mismatch
                out.append({"status": 0, "gas_used": None, "block": None, "contract_address": None, "logs": [],
                            "error": f"the chain refused it: {str(exc)[:200]}"})
        return out, None

    def _bring_back(self, state: Path) -> tuple[Any, str, str | None]:
        """A ``fedmdh deploy local`` trial's chain, brought back from a copy of its state file (the run
        folder is left as it is) on a free port, as ``fedmdh deploy chain`` does; :meth:`close` stops it
        by its PID. Returns the chain, its URL and a problem (a "cannot check" one)."""
        import tempfile

        from fedmdh.deploy.processes import Services, start_anvil
        from fedmdh.ledger.chain import Chain

        tmp = Path(self._resources.enter_context(tempfile.TemporaryDirectory(prefix="fedmdh-verify-chain-")))
        copy = tmp / "chain-state.json"
        try:
            with jsonsafe.open_regular(state, "rb") as src, open(copy, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not a regular file"
            return None, "", self._cannot_check(f"cannot check the receipts: the trial's chain is not running and "
                                                f"its saved state {state} cannot be read ({why})")
        services = self._resources.enter_context(Services(tmp / "logs"))  # stopped before tmp is removed
        try:
            svc, url = start_anvil(services, state_file=copy)
            chain = Chain.rpc(url)
        except FedmdhError as exc:  # no anvil here, or it did not start from that state
            return None, "", self._cannot_check(f"cannot check the receipts: the trial's chain is not running and "
                                                f"could not be brought back from {state}: {exc}")
        self.notes.append(f"the trial's chain was not running: brought back from {state} (a copy) at {url}, "
                          f"pid {svc.pid}, and stopped after the check; a chain kept in the run folder itself "
                          "vouches for what was signed, and a history cut at its end reads as incomplete")
        return chain, url, None

    def _node_state(self) -> str | None:
        """An RPC run: the contract's state on the node must not be ahead of the log (a cut log)."""
        st = self.st
        try:
            c = self._node.contract(self.task["contract"])
            next_round = len(st.finalized) + 1
            ahead = bytes(c.functions.finalized_hash(next_round).call()) != bytes(32)
            archived = bytes(c.functions.archived_hash().call())
        except Exception:  # noqa: BLE001 - no such contract on the node: the receipts said so already
            return None
        if ahead:
            return (f"the task's contract on the node finalized round {next_round}, the log holds no such "
                    "finalization: the log lost its end")
        if archived != bytes(32) and st.archived is None:
            return (f"the task's contract on the node archived model {archived.hex()[:16]}, the log holds no "
                    "archive: the log lost its end")
        return None

    # ------------------------------------------------------------ 3: the task

    def check_task(self) -> str | None:
        """task.json against the chain: the deployment, TaskCreated, registrations and the task manifest."""
        task, st = self.task, self.st
        deploys = [r for r, _ in self.replayed if r.get("fn") == "deploy" and r.get("status") == 1]
        if len(deploys) != 1:
            if not deploys:
                return "the log holds no deployment of the task's contract"
            return (f"the log holds {len(deploys)} deployments (contracts "
                    f"{', '.join(str(r.get('contract_address')) for r in deploys)}): more than one run wrote into this "
                    "folder")
        deployed = deploys[0]
        if str(task["contract"]).lower() != str(deployed.get("contract_address")).lower():
            return f"task.json names contract {task['contract']}, the log deployed {deployed.get('contract_address')}"
        created = st.created
        if not created:
            return f"the log holds no TaskCreated event of contract {task['contract']}"
        for key, onchain in (("submitter", created["submitter"]), ("algorithm", created["algorithm"]),
                             ("target", created["target"]), ("rounds", created["num_rounds"]),
                             ("quorum", created["quorum"])):
            if str(task[key]).lower() != str(onchain).lower():
                return (f"task.json says {key} {task[key]!r}, the task was created on chain with {onchain!r} "
                        "(TaskCreated event)")
        try:
            size = sum(int(s) for _, s in task["vector_layout"])
        except (TypeError, ValueError):
            return "task.json's vector_layout is not a list of [name, size] pairs"
        if size != created["vector_len"]:
            return f"task.json's vector_layout holds {size} values, the task was created with {created['vector_len']}"
        registered = {n: a for a, n in st.names.items()}
        if registered != task["participants"]:
            return (f"task.json's participants {sorted(task['participants'])} differ from those registered on chain "
                    f"{sorted(registered)}" if sorted(registered) != sorted(task["participants"]) else
                    "task.json gives a participant another address than the one registered on chain under its name")
        for rec, _ in self.replayed:  # the actor labels of the log name the account's owner
            expected = st.names.get(rec.get("from")) or (SUBMITTER if rec.get("from") == created["submitter"] else None)
            if expected is not None and rec.get("actor") != expected:
                return (f"transaction {_describe(rec)}: its recorded actor is {rec.get('actor')!r}, the account is "
                        f"{expected}'s")
        digest = str(created["initial_state_hash"])[2:]
        try:
            blob = _checked_blob(self.blobs, digest)
        except _BlobProblem as exc:
            return f"the task manifest (TaskCreated's initial_state_hash): {exc}"
        if blob.startswith(codec.MAGIC):  # recorded before the task manifest: the hash is the initial state's
            if task.get("initial_state") != digest:
                return (f"task.json's initial_state {task.get('initial_state')} is not the one created on chain "
                        f"({digest})")
            self.notes.append("this run was recorded before config.toml and the hyperparameters were committed on "
                              "chain: they are checked against task.json only")
            return None
        try:
            manifest = jsonsafe.loads(blob)
            if not isinstance(manifest, dict) or manifest.get("kind") != TASK_MANIFEST_KIND:
                raise ValueError
        except ValueError:  # JSONTooDeep too
            return f"the task manifest {digest[:16]} committed on chain is neither a manifest nor an initial state"
        self.manifest = manifest
        if manifest.get("algorithm") != created["algorithm"]:
            return (f"the task manifest names algorithm {manifest.get('algorithm')!r}, TaskCreated "
                    f"{created['algorithm']!r}")
        for key in ("initial_state", "hyperparameters", "vector_layout"):
            if json.loads(json.dumps(task.get(key), default=str)) != manifest.get(key):
                return (f"task.json's {key} entry differs from the task manifest committed on chain at task creation"
                        f"{_dict_difference(task.get(key), manifest.get(key))}")
        return None

    def algorithm(self, given: Algorithm | None) -> tuple[Algorithm | None, str | None]:
        """The run's algorithm, from ``given`` or config.toml, checked against what the task committed."""
        task, created = self.task, self.st.created
        committed = self.manifest["hyperparameters"] if self.manifest else task.get("hyperparameters")
        if given is None:
            from fedmdh.config import ExperimentConfig, read_toml

            expected = self.manifest.get("config_sha256") if self.manifest else None
            if not task.get("config"):
                if expected:
                    return None, f"task.json names no config file, the task committed one (sha256 {expected[:16]})"
                raise InputError(f"{self.ledger_dir}: the task names no config file; pass the algorithm to verify().")
            path = (self.ledger_dir / str(task["config"])).resolve()
            if expected:
                if not path.is_file():
                    return None, f"the run's config file {path} is missing (its sha256 was committed at task creation)"
                if sha256_hex(path.read_bytes()) != expected:
                    return None, (f"{path.name} differs from the config committed on chain at task creation "
                                  f"(sha256 {expected[:16]} on chain, {sha256_hex(path.read_bytes())[:16]} here)")
            try:
                cfg = ExperimentConfig(**read_toml(path))
                given = cfg.build_algorithm(created["algorithm"])
            except InputError as exc:
                return None, f"the run's config file: {exc}"
            for key, value, onchain in (("target", cfg.target, created["target"]),
                                        ("rounds", cfg.rounds, created["num_rounds"])):
                if value != onchain:
                    return None, (f"{path.name} says {key} {value!r}, the task was created on chain with {onchain!r} "
                                  "(TaskCreated event)")
            if created["algorithm"] not in cfg.algorithms:
                return None, (f"{path.name} lists algorithms {list(cfg.algorithms)}, the task was created on chain for "
                              f"{created['algorithm']!r}")
            if "seed" in task and int(task["seed"]) != cfg.first_seed:
                return None, f"task.json says seed {task['seed']}, {path.name} first_seed {cfg.first_seed}"
            self.seed = cfg.first_seed
        if given.name != created["algorithm"]:
            return None, f"the algorithm is {given.name!r}, the task was created on chain for {created['algorithm']!r}"
        actual = json.loads(json.dumps(given.hyperparameters(), default=str))
        if committed is not None and actual != json.loads(json.dumps(committed, default=str)):
            where = "committed on chain at task creation" if self.manifest else "recorded in task.json"
            return None, (f"the algorithm's hyperparameters differ from those {where}"
                          f"{_dict_difference(actual, committed)}")
        return given, None

    # ------------------------------------------------------------ 4: the rounds

    def check_rounds(self, algorithm: Algorithm) -> tuple[int, str | None]:
        """Rounds 1.. in order; returns the last round verified and the first problem."""
        st, blobs = self.st, self.blobs
        names = {a: n for n, a in self.task["participants"].items()}
        manifest_state = (str(self.manifest.get("initial_state")) if self.manifest
                          else str(st.created["initial_state_hash"])[2:])
        try:
            state = codec.decode_payload(_checked_blob(blobs, manifest_state))
        except _BlobProblem as exc:
            return 0, f"initial state: {exc}"
        except LedgerError as exc:
            return 0, f"initial state blob {manifest_state[:16]}: {exc}"
        layout = [tuple(x) for x in self.task["vector_layout"]]
        size = sum(int(n) for _, n in layout)
        done = 0
        # the aggregation's generator of round r derives from (seed, r)
        seed = self.seed if self.seed is not None else int(self.task.get("seed", 0))
        secure = None
        if self.task.get("secure"):
            secure, problem = self._secure_checker(algorithm, seed)
            if problem:
                return 0, problem
        for r in range(1, int(st.created["num_rounds"]) + 1):
            if r not in st.finalized:
                if r in st.failed:
                    self.notes.append(f"round {r} did not reach the quorum: the task stopped there")
                elif r in st.commits or r in st.attests:
                    self.notes.append(f"round {r} was not finalized: verified up to round {done}")
                return done, None
            updates, vectors = [], []
            commits = sorted(st.commits[r].items(), key=lambda kv: names.get(kv[0], kv[0]))
            for addr, c in commits:
                inst = names.get(addr, addr)
                where = f"round {r}, institution {inst}"
                try:
                    upd = codec.decode_update(_checked_blob(blobs, c["update_hash"][2:]))
                except _BlobProblem as exc:
                    return done, f"{where}: update {exc}"
                except (LedgerError, ValueError, KeyError) as exc:
                    return done, f"{where}: update blob {c['update_hash'][2:18]} does not decode ({exc})"
                if upd.institution != inst or upd.num_examples != c["num_examples"]:
                    return done, (f"{where}: the update blob says institution {upd.institution!r} with "
                                  f"{upd.num_examples} examples, the commitment {inst!r} with {c['num_examples']}")
                try:
                    vector = codec.committed_vector(c["raw"])
                except LedgerError as exc:
                    return done, f"{where}: the commit transaction: {exc}"
                # a secure task's updates are ciphertexts: no on-chain vector (it would be in the clear)
                lay, flat = ([], np.zeros(0)) if secure is not None else \
                    codec.flatten(codec.onchain_vectors(algorithm, upd))
                if [tuple(x) for x in lay] != layout:
                    return done, f"{where}: the update's on-chain vector layout {lay} is not the task's {layout}"
                mine = codec.pack(codec.to_fixed(flat))
                if mine != vector:
                    k = next((i for i, (a, b) in enumerate(zip(mine, vector)) if a != b), min(len(mine), len(vector)))
                    return done, (f"{where}: the committed on-chain vector is not the update's (from word {k}: "
                                  f"{len(vector)} words committed, {len(mine)} computed)")
                updates.append(upd)
                vectors.append((vector, int(c["num_examples"])))
            if secure is not None:  # the released sum of the committed ciphertexts, not the updates
                try:
                    state = secure.aggregate(r, state, updates, sum(n for _, n in vectors))
                except ValueError as exc:
                    return done, f"round {r}: {exc}"
            mean = st.means.get(r)
            total_n = sum(n for _, n in vectors)
            values = [(codec.unpack(v, size), n) for v, n in vectors]
            # the contract's mean rounds down (floor), exactly
            expected = [sum(v[i] * n for v, n in values) // total_n for i in range(size)]
            if mean is None:
                return done, f"round {r}: no Aggregated event (the contract's weighted mean) for the round"
            got = codec.unpack(list(mean["mean"]), size)
            if got != expected:
                k = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                label = _labels(layout)[k]
                return done, (f"round {r}: the contract's weighted mean differs from the exact recomputation at "
                              f"{label}: {got[k]} vs {expected[k]} (fixed point)")
            if secure is None:
                state = Aggregation().combine(algorithm, state, r, seed, updates=updates)
            agg_hash = sha256_hex(codec.encode_payload(state))
            if "0x" + agg_hash != st.finalized[r]:
                return done, (f"round {r}: {algorithm.name}.aggregate recomputed from the blobs gives {agg_hash[:16]}, "
                              f"the round finalized {st.finalized[r][2:18]}")
            try:
                _checked_blob(blobs, agg_hash)
            except _BlobProblem as exc:
                return done, f"round {r}: aggregate {exc}"
            for d in st.dissent[r]:
                self.notes.append(f"round {r}: institution {names.get(d['participant'], '?')} attested a different "
                                  f"aggregate ({d['attested_hash'][2:18]}); the quorum finalized the recomputed one")
            done = r
        return done, None

    def _secure_checker(self, algorithm: Algorithm, seed: int) -> tuple[Any, str | None]:
        """A secure task's checker of released sums (it needs OpenFHE: the homomorphic sums are
        recomputed and the partial decryptions fused here)."""
        from fedmdh.secure.backend import unavailable_reason

        reason = unavailable_reason()
        if reason:
            return None, self._cannot_check(f"cannot check the secure task's sums: they can only be checked with "
                                            f"OpenFHE, which is unavailable here: {reason}")
        try:
            return _SecureCheck(self, algorithm, seed), None
        except (ValueError, KeyError, TypeError, LedgerError, _BlobProblem) as exc:
            return None, f"the secure task's record: {exc}"

    # ------------------------------------------------------------ 5: the archive and the run folder

    def archive(self) -> tuple[dict[str, Any] | None, str | None]:
        """The archived manifest, validated, with every archived blob checked."""
        if self.st.archived is None:
            return None, None
        digest = str(self.st.archived["model_hash"])[2:]
        manifest, problem = load_archive(self.blobs, digest)
        return manifest, (f"archived model {digest[:16]}: {problem}" if problem else None)

    def check_run_folder(self, manifest: dict[str, Any], missing_models_ok: bool = False) -> str | None:
        """The run folder against the archive. ``missing_models_ok`` (``model get``, which writes the archived
        model files): the run folder's own ``models/`` not matching the archive (files missing, altered or
        extra) is noted, not failed; everything else (the archived run files) is checked as by ``verify``."""
        run_dir = self.ledger_dir.parent
        files: dict[str, str] = manifest["files"]
        problem = self._check_attendance(manifest, missing_models_ok)
        if problem:
            return problem
        if manifest.get("held_by") == HELD_BY_INSTITUTIONS:
            problem = self._check_held_models(run_dir, files, missing_models_ok)
            if problem:
                return problem
            files = {}
        problem = self._models_problem(run_dir, files)
        if problem and not missing_models_ok:
            return problem
        if problem:
            self.notes.append(f"the run folder's models/ does not match the archive: {problem}; model get writes "
                              "the archived files")
        for name, h in manifest.get("run_files", {}).items():
            local = run_dir / name
            if not local.is_file() or local.is_symlink():
                return f"{name} is missing from the run folder (its sha256 was archived with the model)"
            if sha256_hex(local.read_bytes()) != h:
                return f"{name} in the run folder differs from the one archived with the model"
        covered = ["config.toml and the hyperparameters (committed at task creation)"] if self.manifest else []
        if files or manifest.get("held_by") != HELD_BY_INSTITUTIONS:
            covered.append(f"models/ ({len(files)} files)")
        covered += sorted(manifest.get("run_files", {}))
        if "run_files" not in manifest:
            self.notes.append("final_metrics.json and metrics.jsonl are not covered: this run's archive predates "
                              "their hashing")
        self.notes.append(f"covered: {', '.join(covered)}; not covered: {NOT_COVERED} and any other file")
        return None

    @staticmethod
    def _models_problem(run_dir: Path, files: dict[str, str]) -> str | None:
        """The first way the run folder's ``models/`` differs from the archived ``files``, or ``None``."""
        models = run_dir / "models"
        if files and not models.is_dir():
            return (f"models/ is missing from the run folder; the archive holds its {len(files)} files "
                    f"(`fedmdh model get {run_dir} --out DIR` retrieves them)")
        for rel, h in files.items():
            local = run_dir / rel
            if local.is_symlink():
                return f"model file {rel} in the run folder is a symbolic link, not the archived file"
            if not local.is_file():
                return f"model file {rel} is missing from the run folder (the archive holds it)"
            if sha256_hex(local.read_bytes()) != h:
                return f"model file {rel} in the run folder differs from the archived model"
        if models.is_dir():
            for p in sorted(models.rglob("*")):
                rel = p.relative_to(run_dir).as_posix()
                if (p.is_symlink() or not p.is_dir()) and rel not in files:
                    return f"{rel} is in the run folder's models/ but not in the archived model"
        return None


    def _check_attendance(self, manifest: dict[str, Any], missing_ok: bool = False) -> str | None:
        """Who the archive names missing (on chain and in its manifest), and each model a missing
        institution added after the archive (``attest_late``): its manifest blob and its files."""
        st = self.st
        named = manifest.get("missing", [])
        if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
            return "the archive manifest's 'missing' entry is not a list of institution names"
        if st.attendance is None:  # an archive by a contract that predates ArchiveAttendance
            if named or st.late:
                return ("the archive manifest names missing institutions, the archive on chain names none "
                        f"({', '.join(named)})")
            return None
        by_address = {str(a).lower(): n for a, n in st.names.items()}
        missing = [by_address.get(str(a).lower(), str(a)) for a in st.attendance.get("missing", [])]
        for n in named:
            if n not in missing:
                return f"the archive manifest names {n} missing, the archive on chain does not"
        for rel in manifest["files"]:
            inst = PurePosixPath(rel).parts[1] if len(PurePosixPath(rel).parts) > 1 else ""
            if inst in named:
                return f"the archive manifest holds model file {rel} of {inst}, which it names missing"
        archived = str(st.archived["model_hash"])[2:] if st.archived else ""
        added = []
        for address, h in sorted(st.late.items()):
            name = by_address.get(str(address).lower(), str(address))
            what = f"the model {name} added after the archive"
            try:
                doc = jsonsafe.loads(_checked_blob(self.blobs, str(h)[2:]))
            except _BlobProblem as exc:
                return f"{what}: its manifest {exc}"
            except (ValueError, jsonsafe.JSONTooDeep):
                return f"{what}: its manifest is not JSON"
            if not isinstance(doc, dict) or doc.get("kind") != "model-late" or not isinstance(doc.get("files"), dict):
                return f"{what}: its manifest is not a late model manifest"
            if doc.get("institution") != name or doc.get("archive") != archived:
                return f"{what}: its manifest names institution {doc.get('institution')!r} and archive " \
                       f"{str(doc.get('archive'))[:16]}, not {name} and {archived[:16]}"
            files = doc["files"]
            for rel in files:
                path = _safe_rel(rel, "models")
                if path is None or len(path.parts) != 3 or path.parts[1] != name:
                    return f"{what}: its manifest holds an entry {rel!r} that is not a file under models/{name}/"
            if not files:
                return f"{what}: its manifest lists no file"
            if (self.ledger_dir.parent / "nodes").is_dir():
                problem = self._check_held_models(self.ledger_dir.parent, files, missing_ok)
                if problem:
                    return f"{what}: {problem}"
            added.append(name)
        if missing:
            late = f"; added its model after it: {', '.join(added)}" if added else ""
            due = [n for n in missing if n not in added]
            self.notes.append(f"the archive names missing (they did not attest it): {', '.join(missing)}{late}"
                              + (f"; not yet added: {', '.join(due)}" if due else ""))
        return None

    def _check_held_models(self, run_dir: Path, files: dict[str, str], missing_ok: bool = False) -> str | None:
        """A deployed task's models: checked where the nodes' folders are at hand, else only named
        (``missing_ok``: ``model get``, which reports a missing one itself)."""
        if not (run_dir / "nodes").is_dir():
            insts = sorted({PurePosixPath(rel).parts[1] for rel in files})
            self.notes.append(f"the models ({len(files)} files) are held by the institutions ({', '.join(insts)}), "
                              "each in its node's state folder: their sha256 are archived, the files are not here")
            return None
        for rel, h in files.items():
            local = held_model_file(run_dir, self.task, rel)
            if not local.is_file() and missing_ok and not local.exists():
                continue
            if not local.is_file():
                return f"model file {rel} is missing from its institution's node folder ({local})"
            if sha256_hex(local.read_bytes()) != h:
                return f"model file {rel} in its institution's node folder differs from the archived hash"
        self.notes.append(f"the institutions' models ({len(files)} files) in nodes/ match the archived hashes")
        return None


def _labels(layout: list[tuple[str, int]]) -> list[str]:
    return [f"{n}[{i}]" if int(s) > 1 else n for n, s in layout for i in range(int(s))]


def _dict_difference(a: Any, b: Any) -> str:
    """``": lr 0.05 (task.json) vs 0.2 (on chain)"`` for the first differing key of two dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str):
                return f": {k} {a.get(k)!r} here vs {b.get(k)!r} committed"
    return ""


def verify(path: str | Path, algorithm: Algorithm | None = None, rpc_url: str | None = None,
           partial: bool = False) -> VerifyReport:
    """Replay and check a recorded task; see the module docstring.

    ``algorithm``: the run's algorithm (default: rebuilt from its config.toml). ``rpc_url``: the node
    to read an RPC run's receipts from (default: the recorded one; for a ``fedmdh deploy local``
    trial whose chain is not running, the chain brought back from ``RUN/deploy/chain-state.json``).
    ``partial``: accept a run that did not finish (its finalized rounds verified) instead of
    reporting it incomplete. A report whose ``status`` is ``unchecked`` could not be checked (no
    verdict: ``fedmdh ledger verify`` exits with :data:`EXIT_CANNOT_CHECK`).
    """
    return _check(locate(path), algorithm, rpc_url, partial)[0]


def _check(ledger_dir: Path, algorithm: Algorithm | None, rpc_url: str | None, partial: bool,
           retrieving: bool = False) -> tuple[VerifyReport, "_Audit | None"]:
    """What ``verify`` checks, for ``verify`` and ``get_model`` alike; returns the report and the audit
    (``None`` when the ledger's files could not be read). ``retrieving`` (``get_model``): archived model
    files missing from the run folder are noted, not failed (they are what it retrieves)."""
    try:
        audit = _Audit(ledger_dir, rpc_url)
    except LedgerDamage as exc:
        return VerifyReport(False, str(exc), 0, 0, [], complete=False, partial=partial), None
    try:
        return _run_checks(audit, ledger_dir, algorithm, partial, retrieving), audit
    finally:
        audit.close()


def _run_checks(audit: "_Audit", ledger_dir: Path, algorithm: Algorithm | None, partial: bool,
                retrieving: bool) -> VerifyReport:
    notes = audit.notes

    def fail(msg: str, done: int = 0) -> VerifyReport:
        total = int(audit.st.created.get("num_rounds", 0)) if audit.st.created else 0
        return VerifyReport(False, msg, done, total, notes, complete=False, partial=partial,
                            cannot_check=audit.unchecked)

    problem = audit.replay() or audit.check_task()
    if problem:
        return fail(problem)
    notes[:0] = _signer_notes(audit.task, ledger_dir, audit.manifest)
    algorithm, problem = audit.algorithm(algorithm)
    if problem:
        return fail(problem)
    with training_thread_count():  # the thread count the run's peers used: the same float sums
        done, problem = audit.check_rounds(algorithm)
    if problem:
        return fail(problem, done)
    st = audit.st
    total = int(st.created["num_rounds"])
    manifest, problem = audit.archive()
    if problem:
        return fail(problem, done)
    if manifest is not None:
        problem = audit.check_run_folder(manifest, missing_models_ok=retrieving)
        if problem:
            return fail(problem, done)
    expects_archive = audit.manifest.get("archive", True) if audit.manifest else True
    complete = done == total and (manifest is not None or not expects_archive)
    archived = str(st.archived["model_hash"])[2:] if st.archived else None
    if manifest is None and not expects_archive and done == total:
        notes.append("the task was created without an archive (a benchmark's run): no model or run file is covered")
    if complete:
        return VerifyReport(True, None, done, total, notes, complete=True, archived=archived, partial=partial)
    line = f"incomplete: {len(st.finalized)} of {total} rounds finalized, {'archived' if archived else 'no archive'}"
    run_dir = ledger_dir.parent
    written = [n for n in ("models/", "final_metrics.json") if (run_dir / n.rstrip("/")).exists()]
    if written and manifest is None:
        notes.append(f"yet the run folder holds {' and '.join(written)}, which a run writes after its last round: the "
                     "log lost its end (a cut log) or the run failed while archiving; they are not covered")
    if audit.task["chain"] == "embedded":
        notes.append("an embedded chain lives in its log alone: a log cut at a line boundary reads as an interrupted "
                     "run, so an incomplete run is all that can be said")
    if not partial:
        line += f" (rounds 1-{done} verified; pass --partial to accept a partial run)" if done else \
            " (pass --partial to accept a partial run)"
        return VerifyReport(False, line, done, total, notes, complete=False, archived=archived, partial=False)
    notes.append(line)
    return VerifyReport(True, None, done, total, notes, complete=False, archived=archived, partial=True)


class _BlobProblem(Exception):
    pass


class _SecureCheck:
    """What ``verify`` checks of a secure task (fedmdh.runtime.secure_task), round by round: the
    committed blobs are ciphertexts; their homomorphic sum in name order is the released sum's; one
    partial decryption per participant; their fusion here is within the tolerance of the released
    values; the aggregate follows from those values and the committed counts. The setup's two
    releases are checked the same way against the setup the task recorded."""

    def __init__(self, audit: "_Audit", algorithm: Algorithm, seed: int) -> None:
        from fedmdh.algorithms.base import FederationSpec
        from fedmdh.runtime.messages import setup_from_record, setup_hash
        from fedmdh.runtime.secure_task import Release, secure_record, template_update
        from fedmdh.secure.threshold import ThresholdCKKS

        doc = audit.task["secure"]
        blobs = audit.blobs
        self.context = _checked_blob(blobs, doc["context"])
        public_key = _checked_blob(blobs, doc["public_key"])
        if audit.manifest is not None and audit.manifest.get("secure") != secure_record(self.context, public_key):
            raise ValueError("its context or joint public key is not the one the task manifest names")
        self.names = sorted(audit.task["participants"])
        self.scheme = ThresholdCKKS(self.context)
        self.releases: dict[str, Any] = {}
        name = doc.get("releases", "releases.jsonl")
        if _safe_rel(name, None) is None:
            raise ValueError(f"its releases file {name!r} is not a plain file name in the ledger folder")
        path = audit.ledger_dir / str(name)
        try:
            with jsonsafe.open_regular(path, "r", encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            lines = []
        except (OSError, ValueError):
            raise ValueError(f"{path} is not a readable regular file") from None
        for i, line in enumerate(lines, 1):
            try:
                d = jsonsafe.loads(line)
                self.releases[str(d["purpose"])] = Release.from_blob(_checked_blob(blobs, d["release"]))
            except (ValueError, KeyError, TypeError) as exc:
                what = str(exc) if isinstance(exc, jsonsafe.JSONTooDeep) else "not a release record"
                raise ValueError(f"{path.name} line {i}: {what}") from None
        setup = setup_from_record(jsonsafe.loads(_checked_blob(blobs, audit.task["setup"])))
        self._check_setup(audit, setup, setup_hash(setup))
        self.template = template_update(algorithm, FederationSpec.from_setup(setup), seed)
        self.algorithm = algorithm

    def _check_setup(self, audit: "_Audit", setup, digest: str) -> None:
        from fedmdh.data.federation import secure_moments_from, setup_from_moments, union_features
        from fedmdh.runtime.flower.wire import unpack
        from fedmdh.runtime.messages import public_summaries_from, setup_hash

        meta, _ = unpack(_checked_blob(audit.blobs, audit.task["summaries"]))
        summaries = public_summaries_from(meta)
        features = union_features([s.columns for s in sorted(summaries, key=lambda s: s.institution)])
        first = self._released("setup-1", None)
        second = self._released("setup-2", None)
        k = len(features) + 1
        again = setup_from_moments(summaries, *secure_moments_from(first, second[:k], features))
        if setup_hash(again) != digest:
            raise ValueError("the setup recomputed from its released sums is not the recorded setup")

    def _released(self, purpose: str, ciphertexts) -> np.ndarray:
        from fedmdh.secure.threshold import verify_tolerance

        rel = self.releases.get(purpose)
        if rel is None:
            raise ValueError(f"no released sum recorded for {purpose}")
        if ciphertexts is not None and self.scheme.add([ciphertexts[n] for n in sorted(ciphertexts)]).digest() \
                != rel.sum_digest:
            raise ValueError(f"{purpose}: the homomorphic sum of the committed ciphertexts is not the released one")
        if sorted(p.party for p in rel.partials) != self.names:
            raise ValueError(f"{purpose}: partial decryptions from {sorted(p.party for p in rel.partials)}, "
                             f"not from every participant")
        fused = self.scheme.fuse(rel.partials)
        tol = verify_tolerance(rel.released)
        off = float(np.max(np.abs(fused - rel.released))) if fused.size else 0.0
        if fused.shape != rel.released.shape or not off <= tol:
            raise ValueError(f"{purpose}: the fused partial decryptions are off by {off:.3g} from the released sum "
                             f"(allowed {tol:.3g})")
        return rel.released

    def aggregate(self, rnd: int, state, updates, count: int):
        from fedmdh.runtime.secure_task import update_vector

        try:
            cts = {u.institution: update_vector(u) for u in updates}
        except InputError as exc:
            raise ValueError(str(exc)) from None
        released = self._released(f"round-{rnd}", cts)
        return Aggregation(secure=True).combine(self.algorithm, state, rnd, 0, total=released, template=self.template,
                                                count=count)


def _checked_blob(blobs: DirBlobStore, digest: str) -> bytes:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _BlobProblem(f"{digest!r} is not a sha256 digest") from None
    path = blobs.path(digest)
    try:
        with jsonsafe.open_regular(path, "rb") as fh:  # a FIFO in its place is refused, never read
            data = fh.read()
    except FileNotFoundError:
        raise _BlobProblem(f"blob {digest[:16]} is missing from {blobs.root}") from None
    except ValueError:
        raise _BlobProblem(f"blob {digest[:16]} in {blobs.root} is not a regular file") from None
    except OSError as exc:
        raise _BlobProblem(f"blob {digest[:16]} in {blobs.root} cannot be read ({exc.strerror or exc})") from None
    if sha256_hex(data) != digest:
        raise _BlobProblem(f"blob {digest[:16]} was altered: its sha256 is not the on-chain commitment") from None
    return data


def _safe_rel(rel: Any, prefix: str | None) -> PurePosixPath | None:
    """``rel`` as a relative path of plain names (under ``prefix``), or ``None`` when it is anything else."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or Path(rel).is_absolute() or Path(rel).drive:
        return None
    if prefix is not None and (parts[0] != prefix or len(parts) < 2):
        return None
    if prefix is None and len(parts) != 1:
        return None
    return PurePosixPath(rel)




def held_model_file(run_dir: Path, task: dict[str, Any], rel: str) -> Path:
    """Where a deployed task's model file ``models/<institution>/<file>`` lies when the nodes' state
    folders sit beside the run record (``fedmdh deploy local``: ``RUN/nodes/<institution>/``)."""
    inst = PurePosixPath(rel).parts[1]
    return run_dir / "nodes" / inst / "tasks" / str(task.get("task_id", "")) / rel


def load_archive(blobs: DirBlobStore, digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """The archive manifest under ``digest``, with every archived blob checked, or a problem.

    Every entry must be a relative path under ``models/`` made of plain names (no ``..``, not
    absolute); a run file a plain name.
    """
    try:
        manifest = jsonsafe.loads(_checked_blob(blobs, digest))
    except _BlobProblem as exc:
        return None, f"manifest {exc}"
    except jsonsafe.JSONTooDeep as exc:
        return None, f"its manifest is nested more than {exc.max_depth} levels deep; refused"
    except ValueError:
        return None, "its manifest is not JSON"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("run_files", {}), dict):
        return None, "its manifest is not a model archive"
    held = manifest.get("held_by") == HELD_BY_INSTITUTIONS  # a deployed task: models stay at the nodes
    for key, prefix in (("files", "models"), ("run_files", None)):
        for rel, h in manifest.get(key, {}).items():
            if _safe_rel(rel, prefix) is None:
                return None, (f"its manifest holds an entry {rel!r} that is not a plain relative path under "
                              f"{prefix + '/' if prefix else 'the run folder'}; refused")
            if held and key == "files":
                continue
            try:
                _checked_blob(blobs, h)
            except _BlobProblem as exc:
                return None, f"archived file {rel}: {exc}"
    return manifest, None


# ------------------------------------------------------------------ model get


def _out_folder(out: str | Path) -> Path:
    """``out`` if it is a folder or can become one; one line otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder; give a folder to write the model files to.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {out}: lies under {parent}, which is a file; give a folder.")
            break
    return out


def _write_under(root: Path, rel: PurePosixPath, data: bytes) -> None:
    """Write ``data`` to ``root / rel``, creating folders, never through a symbolic link below ``root``.

    Folders are opened one by one with ``O_NOFOLLOW`` relative to their parent; the file goes to a
    temporary file created there (``O_EXCL``) and is renamed over the name, which replaces a link or
    a hard-linked file instead of writing into what it points to.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        where = root
        for part in rel.parts[:-1]:
            where = where / part
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                raise InputError(f"{where}: is a symbolic link or not a folder; model get writes only into plain "
                                 "folders under --out (remove it, or give another --out).") from None
            os.close(fd)
            fd = sub
        name = rel.parts[-1]
        tmp = f".{name}.{os.getpid()}.tmp"
        ffd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        try:
            with os.fdopen(ffd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            try:
                os.unlink(tmp, dir_fd=fd)
            except OSError:
                pass
            raise InputError(f"{where / name}: cannot be written (a folder is in the way?); give another "
                             "--out.") from None
    finally:
        os.close(fd)


def get_model(out: str | Path, run_dir: str | Path | None = None, rpc_url: str | None = None,
              task: str | None = None, blobs_dir: str | Path | None = None) -> dict[str, Any]:
    """Retrieve the archived model of a task into ``out`` and verify every hash on the way.

    From a run folder: only after the checks of ``verify`` pass (the same function), so only a model
    that a verified run archived is delivered; the one difference is that archived model files
    missing from the run folder are what it retrieves, not a failure. Or from a node (``rpc_url``
    and the task's contract address ``task``), reading blobs from ``blobs_dir`` or the archive's
    locator. Writes only inside ``out``. Returns ``model_hash``, ``locator``, ``files`` and
    ``notes``. Raises :class:`CannotCheck` when the run could not be checked (its chain
    unreachable), :class:`InputError` when it does not verify.
    """
    out = _out_folder(out)
    notes: list[str] = []
    if run_dir is not None:
        ledger_dir = locate(run_dir)
        report, audit = _check(ledger_dir, None, rpc_url, partial=False, retrieving=True)
        if report.status == "unchecked":
            raise CannotCheck(f"{run_dir}: {str(report.problem).rstrip('.')}; no model is delivered before the run is "
                              "checked.")
        if audit is not None and report.status in ("ok", "incomplete") and audit.st.archived is None:
            raise InputError(f"{run_dir}: no model was archived for this task (interrupted run?).")
        if not report.ok or audit is None or audit.st.archived is None:
            raise InputError(f"{run_dir}: the ledger does not verify, so its archive is not trusted: "
                             f"{str(report.problem).rstrip('.')}.")
        digest, locator = str(audit.st.archived["model_hash"])[2:], audit.st.archived["locator"]
        blobs = DirBlobStore(blobs_dir or audit.blobs.root)
        notes = list(report.notes)
    else:
        if not (rpc_url and task):
            raise InputError("give RUN_DIR, or --chain-rpc URL with --task ADDRESS.")
        from fedmdh.ledger.chain import Chain

        chain = Chain.rpc(rpc_url)
        if not chain.w3.is_address(task) or not chain.w3.eth.get_code(chain.w3.to_checksum_address(task)):
            raise InputError(f"--task {task}: no contract at that address on the node at {rpc_url}.")
        c = chain.contract(task)
        try:
            digest = bytes(c.functions.archived_hash().call()).hex()
            locator = c.functions.archived_locator().call()
        except Exception:  # noqa: BLE001 - not a FedLedger contract
            raise InputError(f"--task {task}: the contract at that address is not a fedmdh task.") from None
        if digest == "00" * 32:
            raise InputError(f"task {task} has no archived model yet.")
        if blobs_dir is None:
            if not locator.startswith("file://"):
                raise InputError(f"the archive's locator {locator} is not a local file; pass --blobs DIR.")
            from urllib.parse import unquote, urlparse

            blobs_dir = Path(unquote(urlparse(locator).path)).parent
        blobs = DirBlobStore(blobs_dir)
    manifest, problem = load_archive(blobs, digest)
    if problem:
        raise InputError(f"archived model {digest[:16]}: {problem}.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder ({exc.strerror}).") from None
    held = manifest.get("held_by") == HELD_BY_INSTITUTIONS
    for rel, h in manifest["files"].items():
        if held:
            local = held_model_file(ledger_dir.parent, audit.task, rel) if run_dir is not None else None
            if local is None or not local.is_file():
                raise InputError(f"archived model {digest[:16]}: the models of this deployed task are held by the "
                                 "institutions, each in its node's state folder (`fedmdh node` keeps them there); "
                                 "only their sha256 are archived.")
            data = local.read_bytes()
            if sha256_hex(data) != h:
                raise InputError(f"archived model {digest[:16]}: {rel} in its node's folder differs from the archive.")
        else:
            try:
                data = _checked_blob(blobs, h)
            except _BlobProblem as exc:
                raise InputError(f"archived model {digest[:16]}: archived file {rel}: {exc}.") from None
        _write_under(out, PurePosixPath(*PurePosixPath(rel).parts[1:]), data)
    return {"model_hash": digest, "locator": locator, "files": sorted(manifest["files"]), "notes": notes}
