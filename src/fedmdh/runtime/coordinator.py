"""The coordinator of a deployed task: relays messages, holds no key of an institution and no row.

It drives the protocol of :mod:`fedmdh.runtime.node` over any :class:`Transport` (Flower's Grid in
:mod:`fedmdh.runtime.flower.server_app`, or direct calls in tests):

1. ``setup`` to every node; their summaries are pooled (the union feature space, the scaler);
2. the task contract is created on chain with the institutions' addresses as its allowlist, the
   task manifest's hash and the task's settings (by the coordinator's own account, which can
   only relay: every commitment and attestation needs an institution's signature);
3. ``round 1`` carries every summary (each node pools them itself and checks the contract);
   ``round r`` carries the updates committed in round ``r - 1`` (and, to a node that missed
   rounds, the last finalized aggregate); the replies carry round ``r``'s updates and each
   institution's metrics of round ``r - 1``;
4. ``finish`` closes the last round; ``archive`` has the institutions attest the manifest of their
   model files' hashes, which the coordinator then archives.

Failures: a node that does not answer within the task's ``round_timeout`` is left out of the
round (the contract closes the round without it once a quorum has committed and the timeout has
passed; a :class:`Janitor` thread sends those closing transactions, which anyone may send) and
catches up when it is back. A round short of its quorum asks the institutions that have not
committed again until the task's patience (``wait_s``) runs out, then stops the task with
:class:`TaskStopped`, naming them; :meth:`Coordinator.run` with ``DeployTask(resume=True)`` goes on
from what the chain, the run record and the nodes hold: any institution can start a new
coordinator. A task whose last round some institutions did not answer finishes with the quorum: the
archive names them missing (in its manifest and on chain), and a resume of the archived task has
each of them, when its node is back, add its model's hash (``attest_late``).

It writes what ``fedmdh run`` writes (``config.toml``, ``federation.json``, ``metrics.jsonl``,
``final_metrics.json``, ``run.log`` and ``ledger/`` with the task, every transaction the
institutions signed, and the blobs: initial state, setup, updates, aggregates, manifest), so that
``fedmdh ledger verify`` works on a deployed run. Models stay with the institutions.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmdh import __version__
from fedmdh.errors import FedmdhError, InputError, TrainingDiverged
from fedmdh.ledger.keys import default_keystore
from fedmdh.ledger.recorder import SUBMITTER
from fedmdh.runtime.round import Aggregation, check_round

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]
Message = tuple[Meta, Arrays]
EMPTY = bytes(32)
#: the deployed task as submitted, in the run record (read by ``fedmdh deploy resume``)
TASK_FILE = "deploy_task.json"


class TaskError(FedmdhError):
    """The task stopped: the message names the step and the institutions concerned."""


class TaskStopped(TaskError):
    """The task stopped short of a quorum; it can be resumed (the message says how)."""


class Transport(Protocol):
    """How the coordinator reaches the nodes."""

    def wait_nodes(self, count: int, timeout: float) -> list[Any]:
        """Handles of at least ``count`` connected nodes (raise :class:`TaskError` after ``timeout``)."""
        ...

    def exchange(self, requests: Mapping[Any, Message], timeout: float,
                 optional: frozenset[Any] = frozenset()) -> dict[Any, Message]:
        """Send one message to each node and return each one's reply (an ``{"error": ...}`` reply for
        a node that did not answer in time). Nodes in ``optional`` (they missed the last round) are
        waited for only a few seconds beyond the others."""
        ...


@dataclass(frozen=True)
class DeployTask:
    """A task to deploy: the experiment's settings and where the coordinator records it.

    ``experiment`` holds :class:`~fedmdh.config.ExperimentConfig`'s fields except the institution
    files and the test file, which the nodes hold (one algorithm, one seed). ``round_timeout``
    (seconds, recorded in the contract): how long a round waits for a silent institution before it
    goes on with a quorum; 0 waits for every institution. ``resume``: continue the task recorded in
    ``out_dir`` (its contract, blobs, metrics) instead of starting one. ``pause_before``: for
    rehearsals (``fedmdh deploy local --fault``), seconds to wait before sending a round's messages.
    """

    task_id: str
    experiment: Mapping[str, Any]
    min_nodes: int
    chain_rpc: str
    out_dir: str
    keystore: str | None = None
    wait_s: float = 600.0
    quorum: int | None = None
    round_timeout: float = 0.0
    resume: bool = False
    pause_before: Mapping[int, float] = field(default_factory=dict)
    secure: bool = False
    record_messages: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "experiment": dict(self.experiment), "min_nodes": self.min_nodes,
                "chain_rpc": self.chain_rpc, "out_dir": self.out_dir, "keystore": self.keystore,
                "wait_s": self.wait_s, "quorum": self.quorum, "round_timeout": self.round_timeout,
                "resume": self.resume, "pause_before": {str(k): v for k, v in self.pause_before.items()},
                "secure": self.secure, "record_messages": self.record_messages}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DeployTask":
        return cls(task_id=str(d["task_id"]), experiment=dict(d["experiment"]), min_nodes=int(d["min_nodes"]),
                   chain_rpc=str(d["chain_rpc"]), out_dir=str(d["out_dir"]), keystore=d.get("keystore"),
                   wait_s=float(d.get("wait_s", 600.0)), quorum=d.get("quorum"),
                   round_timeout=float(d.get("round_timeout", 0.0)), resume=bool(d.get("resume", False)),
                   pause_before={int(k): float(v) for k, v in dict(d.get("pause_before") or {}).items()},
                   secure=bool(d.get("secure", False)), record_messages=d.get("record_messages"))

    def config(self, names: tuple[str, ...] = ("institution-a", "institution-b")):
        """The experiment as an :class:`~fedmdh.config.ExperimentConfig` over the given institution names."""
        from fedmdh.algorithms import ALGORITHMS
        from fedmdh.config import ExperimentConfig

        kw = {k: v for k, v in self.experiment.items() if k not in ("institutions", "test")}
        cfg = ExperimentConfig(institutions=tuple(names), test="", **kw)
        cls = ALGORITHMS[cfg.algorithms[0]]
        if not cls.federated or cls.centralized:
            raise InputError(f"{cls.name} is a reference that does not communicate (or needs every row in one "
                             "place); deploy a federated algorithm, and run references with `fedmdh run`.")
        if cfg.selection != "own":
            raise InputError("a deployed task selects each institution's model on its own validation rows; "
                             "selection 'federated' needs every model at every institution (simulator only).")
        if self.round_timeout < 0:
            raise InputError(f"the round timeout must be >= 0 seconds, got {self.round_timeout}.")
        if self.secure:
            from fedmdh.secure.aggregation import check_covered

            check_covered(cls.name)
        if cfg.dp is not None and not self.secure:
            raise InputError("differential privacy in a deployed task needs --secure (without it the coordinator "
                             "sees, and the chain commits, each institution's update before any noise is summed).")
        return cfg

    @property
    def algorithm(self) -> str:
        return str(self.experiment["algorithms"][0])

    def node_task(self) -> dict[str, Any]:
        """What the nodes are told at setup: the experiment's settings, the chain, the patience."""
        return {**dict(self.experiment), "chain_rpc": self.chain_rpc, "wait_s": self.wait_s,
                "round_timeout": int(round(self.round_timeout)), **({"secure": True} if self.secure else {})}


def experiment_settings(cfg) -> dict[str, Any]:
    """An ExperimentConfig's fields as JSON for :class:`DeployTask` (institutions and test left out)."""
    from dataclasses import asdict

    d = asdict(cfg)
    for k in ("institutions", "test"):
        d.pop(k)
    d["algorithm_settings"] = {k: dict(v) for k, v in d["algorithm_settings"].items()}
    return json.loads(json.dumps(d))


class Janitor(threading.Thread):
    """Closes, on chain, what a task's timeout allows to close: a round's commitments once its timeout
    has passed with a quorum committed, and a round once its timeout has passed with a quorum of
    attestations on one hash. Anyone may send these; the contract checks the conditions."""

    def __init__(self, chain, account, contract, timeout: float, lock: threading.Lock) -> None:
        super().__init__(name="fedmdh-janitor", daemon=True)
        self.chain, self.account, self.contract, self.timeout = chain, account, contract, timeout
        self.lock = lock
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        from fedmdh.ledger.errors import LedgerError

        while not self.stop.wait(0.5):
            try:
                self.sweep()
            except LedgerError as exc:  # a race with a participant's own transaction: look again later
                self.errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - a node hiccup must not end the task; say it in the log
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def sweep(self) -> None:
        from fedmdh.ledger.chain import GAS

        c = self.contract.functions
        if c.ended().call():
            return
        now = time.time()
        cur = int(c.current_round().call())
        quorum = int(c.quorum().call())
        for r in (cur, cur + 1):
            if r > int(c.num_rounds().call()) or c.commits_closed(r).call():
                continue
            opened = int(c.opened(r).call())
            if opened and now >= opened + self.timeout + 1 and int(c.commit_count(r).call()) >= quorum:
                self._send("close_commits", r, GAS["attest"] + 12_000 * 32)
        if (c.commits_closed(cur).call() and bytes(c.finalized_hash(cur).call()) == EMPTY
                and now >= int(c.closed_at(cur).call()) + self.timeout + 1
                and int(c.attest_count(cur).call()) >= quorum):
            try:
                self._send("close_round", cur, GAS["attest"] + 12_000 * 32)
            except Exception as exc:  # noqa: BLE001 - "no aggregate has a quorum yet": try again later
                if "quorum" not in str(exc):
                    raise

    def _send(self, fn: str, rnd: int, gas: int) -> None:
        from fedmdh.ledger.artifacts import call_data

        with self.lock:
            self.chain.transact(self.account, fn, self.contract.address, call_data(fn, rnd), gas=gas,
                                actor=SUBMITTER, round=rnd)


class Coordinator:
    """Runs one deployed task over ``transport``; see the module docstring."""

    def __init__(self, task: DeployTask, transport: Transport, on_round: Callable[[Any], None] | None = None,
                 say: Callable[[str], None] | None = None, before_round: Callable[[int], None] | None = None) -> None:
        self.task = task
        self.before_round = before_round  # called before each round's messages go out (round R + 1: finish)
        self.transport = transport
        self.on_round = on_round
        if task.record_messages:
            self.transport = RecordingTransport(transport, Path(task.record_messages))
        self.say = say or (lambda line: None)
        self.out = Path(task.out_dir)
        self.ledger_dir = self.out / "ledger"
        self.names: dict[Any, str] = {}  # node handle -> institution
        self.behind: set[str] = set()  # institutions that missed a round: they get the last finalized aggregate
        self.log_lines: list[str] = []
        self._own: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.secure = None  # the public side of a secure task (fedmdh.runtime.secure_task.Aggregator)
        self.releases: dict[int, Any] = {}  # round -> its released sum (secure tasks)

    # ------------------------------------------------------------------ helpers

    def _stop_if_diverged(self, replies: Mapping[Any, Message]) -> None:
        """An institution whose training diverged (round.check_update on its node) stops the task with the
        simulator's line, the rounds before it kept."""
        diverged = sorted((m["diverged"] for m, _ in replies.values() if isinstance(m.get("diverged"), dict)),
                          key=lambda d: int(d["round"]))
        if diverged:
            d = diverged[0]
            self._diverged(TrainingDiverged(int(d["round"]), float(d["loss"]), str(d.get("detail") or "")))

    def _diverged(self, exc: TrainingDiverged) -> None:
        # the transactions the nodes made before (registrations, commitments) into the record, read back from
        # the chain where a failing node's reply could not carry them
        self._recover_transactions()
        done = exc.round - 1
        kept = (f"rounds 1-{done} are finalized on chain and in {self.out} (fedmdh ledger verify --partial "
                f"{self.out} checks them)" if done >= 1 else "no round was finalized")
        self._log(f"stopped: {exc.with_kept(kept)}")
        raise exc.with_kept(kept) from None

    def _check(self, replies: Mapping[Any, Message], step: str) -> dict[str, Message]:
        """The replies by institution; any error reply stops the task, naming every failing institution."""
        self._stop_if_diverged(replies)
        errors, by_name = [], {}
        for node, (meta, arrays) in replies.items():
            name = self.names.get(node, str(meta.get("institution", node)))
            if "error" in meta:
                errors.append((name, str(meta["error"])))
            else:
                by_name[name] = (meta, arrays)
        if errors:
            names = ", ".join(sorted(n for n, _ in errors))
            detail = "; ".join(e for _, e in sorted(errors))
            raise TaskError(f"{step} failed at {names}: {detail}")
        return by_name

    def _exchange(self, step: str, requests: Mapping[str, Message], tolerant: bool = False) -> dict[str, Message]:
        """Send to institutions (by name); with ``tolerant``, an institution that does not answer (or
        answers with an error) is left out and marked behind instead of stopping the task."""
        node_of = {name: node for node, name in self.names.items()}
        budget = self.task.wait_s + 60.0
        if tolerant and self.task.round_timeout > 0:
            budget = 2 * self.task.round_timeout + 30.0
        optional = frozenset(node_of[n] for n in requests if n in self.behind)
        replies = self.transport.exchange({node_of[n]: m for n, m in requests.items()}, timeout=budget,
                                          optional=optional)
        if not tolerant:
            return self._check(replies, step)
        self._stop_if_diverged(replies)
        ok: dict[str, Message] = {}
        for node, (meta, arrays) in replies.items():
            name = self.names[node]
            if "error" in meta:
                self.behind.add(name)
                self.log_lines.append(f"{step}: {name} left out ({meta['error']})")
                self.say(f"{step}: {name} left out ({meta['error']})")
            else:
                ok[name] = (meta, arrays)
        return ok

    def _record_transactions(self, replies: Mapping[str, Message]) -> None:
        recs = [r for _, (meta, _) in sorted(replies.items()) for r in meta.get("transactions", [])]
        with self._lock:
            recs += [r for r in self._own if r.get("fn") != "transfer"]
            self._own.clear()
        recs.sort(key=lambda r: (r.get("block") is None, r.get("block") or 0))
        known = self._known_transactions()
        with (self.ledger_dir / "transactions.jsonl").open("a", encoding="utf-8") as fh:
            for r in recs:
                h = str(r.get("tx_hash") or "").lower()
                if h and h in known:  # read back from the chain already (its node had not reported it)
                    continue
                known.add(h)
                fh.write(json.dumps(r, sort_keys=True) + "\n")

    def _known_transactions(self) -> set[str]:
        """The hashes of the transactions in the run record (read once, then kept up to date)."""
        if getattr(self, "_known", None) is None:
            self._known = set()
            path = self.ledger_dir / "transactions.jsonl"
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        h = json.loads(line).get("tx_hash")
                    except (ValueError, AttributeError):
                        continue
                    if h:
                        self._known.add(str(h).lower())
        return self._known

    def _recover_transactions(self) -> int:
        """Append to the run record every transaction of the task's contract that the chain holds and the
        record lacks (a node that died after a transaction, before its reply carried the record: an
        attestation that finalized a round, say), read back from the chain node: its signed bytes and
        its receipt, so that ``fedmdh ledger verify`` checks them like any other. Returns how many."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.artifacts import function_name
        from fedmdh.ledger.chain import _hex, receipt_logs

        path = self.ledger_dir / "transactions.jsonl"
        known = self._known_transactions()
        deploy_block = 0
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("fn") == "deploy" and rec.get("block") is not None:
                    deploy_block = int(rec["block"])
                    break
        w3 = self.chain.w3
        try:
            found = w3.eth.get_logs({"address": self.contract.address, "fromBlock": deploy_block, "toBlock": "latest"})
        except Exception as exc:  # noqa: BLE001 - a node without logs: the record stays as the replies made it
            self._log(f"could not read the contract's events back from the chain node ({type(exc).__name__})")
            return 0
        hashes = []
        for log in found:
            h = _hex(log["transactionHash"]).lower()
            if h not in known and h not in hashes:
                hashes.append(h)
        actors = {a.lower(): n for n, a in self.addresses.items()}
        recs = []
        for h in hashes:
            reply = w3.provider.make_request("eth_getRawTransactionByHash", [h])
            raw = reply.get("result") if isinstance(reply, dict) else None
            if not raw:
                self._log(f"transaction {h} of the task is on chain but not in the record, and the chain node does "
                          "not give its signed bytes")
                continue
            tx = codec.decode_transaction(raw)
            receipt = w3.eth.get_transaction_receipt(h)
            sender = str(receipt["from"])
            fn = function_name(tx)
            rec = {"fn": fn, "from": w3.to_checksum_address(sender), "to": tx["to"], "raw": raw,
                   "gas_limit": int(tx["gas"]), "tx_hash": h, "status": int(receipt["status"]),
                   "gas_used": int(receipt["gasUsed"]), "block": int(receipt["blockNumber"]),
                   "contract_address": receipt.get("contractAddress"), "logs": receipt_logs(receipt),
                   "actor": actors.get(sender.lower(), SUBMITTER), "recovered_from_chain": True}
            if fn in ("commit", "attest", "close_commits", "close_round") and len(tx["data"]) >= 36:
                rec["round"] = int.from_bytes(tx["data"][4:36], "big")
            recs.append(rec)
        if recs:
            recs.sort(key=lambda r: r["block"])
            with path.open("a", encoding="utf-8") as fh:
                for r in recs:
                    known.add(r["tx_hash"])
                    fh.write(json.dumps(r, sort_keys=True) + "\n")
            self._log(f"{len(recs)} transactions of the task that no reply carried (a node lost before it "
                      "answered) read back from the chain into the record")
        return len(recs)

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        with (self.out / "run.log").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    # ------------------------------------------------------------------ the task

    def run(self) -> dict[str, Any]:
        """Run (or, with ``resume``, continue) the task to the end; returns the final metrics."""
        from fedmdh.runtime.protocol import use_training_threads

        use_training_threads()  # it recomputes aggregates: the nodes' bits (torch and BLAS)
        self.t_start = time.perf_counter()
        self.task.config()  # validate the settings before anyone works
        if self.task.resume:
            return self._resume()
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        # what `fedmdh deploy resume` needs to go on from this record
        record = {k: v for k, v in self.task.to_json().items() if k not in ("resume", "pause_before")}
        (self.out / TASK_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        return self._fresh()

    def _identify(self, cmd: dict[str, Any]) -> dict[str, Message]:
        task = self.task
        nodes = self.transport.wait_nodes(task.min_nodes, timeout=task.wait_s)
        replies = self.transport.exchange({n: (cmd, {}) for n in nodes}, timeout=task.wait_s + 60.0)
        for node, (meta, _) in replies.items():
            if "institution" in meta:
                self.names[node] = str(meta["institution"])
        if len(set(self.names.values())) != len(self.names):
            raise TaskError(f"two nodes call themselves the same institution: {sorted(self.names.values())}")
        return replies

    def _fresh(self) -> dict[str, Any]:
        from fedmdh.algorithms.base import FederationSpec
        from fedmdh.data.federation import pool_setup
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore
        from fedmdh.runtime.flower.wire import pack
        from fedmdh.runtime.messages import setup_hash, setup_record, summaries_message, summary_from
        from fedmdh.runtime.protocol import initial_state

        task = self.task
        replies = self._identify({"cmd": "setup", "task_id": task.task_id, "task": task.node_task()})
        self.say(f"{len(replies)} nodes connected; setup")
        by_name = self._check(replies, "setup")
        if task.secure:  # the statistics never come in the clear: public fields only
            from fedmdh.runtime.messages import public_summaries_from

            summaries = public_summaries_from({"summaries": [m for m, _ in by_name.values()]})
        else:
            summaries = [summary_from(m, a) for m, a in by_name.values()]
        addresses = {name: str(m["address"]) for name, (m, _) in by_name.items()}
        blobs = DirBlobStore(self.ledger_dir / "blobs")
        self.blobs = blobs
        secure_doc = None
        if task.secure:
            self.say("secure setup: key chain and two encrypted passes over the statistics")
            setup, setup_message, secure_doc = self._secure_setup(by_name)
        else:
            setup = pool_setup(summaries)
            setup_message = summaries_message(summaries)
        names = setup.names
        cfg = task.config(names)
        algorithm = cfg.build_algorithm(task.algorithm)
        spec = FederationSpec.from_setup(setup)
        server = initial_state(algorithm, spec, cfg.first_seed)
        init_hash = blobs.put(codec.encode_payload(server))
        setup_blob = blobs.put(json.dumps(setup_record(setup), sort_keys=True, separators=(",", ":")).encode())
        summaries_blob = blobs.put(pack(*setup_message))
        config_bytes, manifest, _ = deployed_task_manifest(cfg, algorithm, spec, setup_hash(setup),
                                                           secure_doc and secure_doc["record"])
        (self.out / "config.toml").write_bytes(config_bytes)
        manifest_hash = blobs.put(manifest)
        self._log(f"fedmdh {__version__} on Python {platform.python_version()} (coordinator)")
        self._log(f"task {task.task_id}: algorithm {algorithm.name}, seed {cfg.first_seed}, {cfg.rounds} rounds, "
                  f"round timeout {task.round_timeout:g} s")
        self._log(f"hyperparameters {algorithm.hyperparameters()}")
        for s in sorted(summaries, key=lambda s: s.institution):
            self._log(f"{s.institution}: {s.n_train} training rows, {s.n_val} validation rows, {len(s.columns)} columns")
        layout = [tuple(x) for x in json.loads(manifest)["vector_layout"]]
        self._create_contract(algorithm, layout, names, addresses, manifest_hash)
        self._write_task_json(algorithm, cfg, names, addresses, layout, init_hash, setup_blob, manifest_hash,
                              summaries_blob, secure_doc)
        self.say(f"task contract {self.contract.address}; round 1 of {cfg.rounds}")
        self._setup_state(cfg, algorithm, names, addresses, blobs, server, setup)
        self.summaries = summaries
        return self._drive(1, [])

    def _setup_state(self, cfg, algorithm, names, addresses, blobs, server, setup) -> None:
        self.cfg, self.algorithm, self.all_names, self.addresses = cfg, algorithm, tuple(names), dict(addresses)
        self.blobs, self.server, self.setup = blobs, server, setup
        self.server_round = 0  # the round of the aggregate in self.server
        if self.task.secure:
            from fedmdh.algorithms.base import FederationSpec
            from fedmdh.runtime.secure_task import template_update

            self.template = template_update(algorithm, FederationSpec.from_setup(setup), cfg.first_seed)

    # ------------------------------------------------------------------ secure tasks

    def _secure_setup(self, by_name: Mapping[str, Message]):
        """Key chain and the two encrypted setup passes (fedmdh.runtime.secure_task); returns the
        setup, the round-1 message that carries it (public summaries and both releases) and what
        task.json records of the secure set-up."""
        from fedmdh.data.federation import secure_moments_from, setup_from_moments, union_features
        from fedmdh.runtime.messages import public_summaries_from, public_summaries_message
        from fedmdh.runtime.secure_task import Aggregator, _u8, secure_record

        self.secure = Aggregator()
        names = sorted(by_name)
        link: bytes | None = None
        boxes: dict[str, str] = {}
        for i, n in enumerate(names):
            arrays = {"context": _u8(self.secure.context), **({"previous": _u8(link)} if link is not None else {})}
            rep = self._exchange("key chain", {n: ({"cmd": "keygen", "task_id": self.task.task_id, "link": i + 1},
                                                   arrays)})
            link = bytes(np.asarray(rep[n][1]["link"], np.uint8))
            boxes[n] = bytes(np.asarray(rep[n][1]["box"], np.uint8)).hex()
        assert link is not None
        self.public_key = link
        escrow = self._secure_escrow(names, boxes)
        public = public_summaries_message(public_summaries_from({"summaries": [m for m, _ in by_name.values()]}))
        summaries = public_summaries_from(public)
        features = union_features([s.columns for s in sorted(summaries, key=lambda s: s.institution)])
        rel1 = self._secure_setup_pass("setup-1", public, {}, names)
        m1, a1 = rel1.message("rel1/")
        rel2 = self._secure_setup_pass("setup-2", {**public, "release_1": m1}, a1, names)
        m2, a2 = rel2.message("rel2/")
        k = len(features) + 1
        setup = setup_from_moments(summaries, *secure_moments_from(rel1.released, rel2.released[:k], features))
        self.secure_doc = {"record": secure_record(self.secure.context, link),
                           "context": self.blobs.put(self.secure.context), "public_key": self.blobs.put(link),
                           "setup_releases": [self.blobs.put(rel1.blob()), self.blobs.put(rel2.blob())],
                           "releases": "releases.jsonl", "boxes": boxes, "escrow": escrow}
        return setup, ({**public, "release_1": m1, "release_2": m2}, {**a1, **a2}), self.secure_doc

    def _secure_escrow(self, names: list[str], boxes: Mapping[str, str]) -> dict[str, Any]:
        """Every institution escrows its key share with the others (secure_task.NodeSecure.escrow):
        one institution may then be missing from a decryption. The coordinator stores ciphertexts only."""
        threshold = len(names) - 1
        msg = ({"cmd": "secure_escrow", "task_id": self.task.task_id, "boxes": dict(boxes), "threshold": threshold},
               {})
        replies = self._exchange("key escrow", {n: msg for n in names})
        doc: dict[str, Any] = {"threshold": threshold, "shares": {}}
        for n, (_, a) in sorted(replies.items()):
            doc["shares"][n] = {"backup": self.blobs.put(bytes(np.asarray(a["backup"], np.uint8))),
                                "sealed": {k[len("sealed/"):]: self.blobs.put(bytes(np.asarray(v, np.uint8)))
                                           for k, v in sorted(a.items()) if k.startswith("sealed/")}}
        return doc

    def _secure_setup_pass(self, purpose: str, meta: Meta, arrays: Arrays, names: list[str]):
        from fedmdh.runtime.secure_task import _u8, vector_from

        msg = ({"cmd": "secure_encrypt", "task_id": self.task.task_id, "purpose": purpose, **meta},
               {"public_key": _u8(self.public_key), **arrays})
        replies = self._exchange(f"secure setup ({purpose})", {n: msg for n in names})
        cts = {n: vector_from("ct.", replies[n][1]) for n in names}
        dec_arrays: Arrays = {}
        for n, (_, a) in replies.items():
            dec_arrays.update({f"c/{n}/{k[len('ct.'):]}": v for k, v in a.items() if k.startswith("ct.")})
        dmeta = {"cmd": "secure_decrypt", "task_id": self.task.task_id, "purpose": purpose, "parties": names,
                 "from": names}
        return self._collect_partials(purpose, cts, {n: (dmeta, dec_arrays) for n in names})

    def _collect_partials(self, purpose: str, cts, requests: Mapping[str, Message]):
        """Every key holder's partial decryption of the sum of ``cts``, fused and recorded."""
        from fedmdh.runtime.secure_task import partial_from

        parties = self.secure_parties()
        connected = set(self.names.values())
        asked = {n: requests[n] for n in parties if n in connected and n in requests}
        replies = self._exchange(f"decrypting {purpose}", asked, tolerant=purpose.startswith("round-"))
        partials = [partial_from(m, a) for m, a in replies.values()]
        missing = [n for n in parties if n not in replies]
        escrow = (getattr(self, "secure_doc", None) or {}).get("escrow")
        if missing and (len(missing) > 1 or not escrow or not replies):
            raise TaskStopped(f"{purpose}: the sum needs every institution's key share, or all but one of them; "
                              f"{', '.join(missing)} did not answer; start their nodes again and resume the task")
        if missing:
            partials.append(self._recover(purpose, missing[0], sorted(replies), requests[sorted(replies)[0]]))
        release = self.secure.release(purpose, cts, partials)
        digest = self.blobs.put(release.blob())
        with (self.ledger_dir / "releases.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"purpose": purpose, "release": digest}) + "\n")
        return release

    def _recover(self, purpose: str, of: str, alive: list[str], request: Message):
        """``of``'s partial decryption by the first institution that answered, from ``of``'s escrowed
        share: the others reseal their pieces of it to that institution (two more exchanges)."""
        from fedmdh.runtime.secure_task import _u8, partial_from

        doc = self.secure_doc
        esc = doc["escrow"]["shares"][of]
        recoverer = alive[0]
        holders = [n for n in sorted(esc["sealed"]) if n in alive and n != recoverer]
        if len(holders) + 1 < int(doc["escrow"]["threshold"]):
            raise TaskStopped(f"{purpose}: {of} did not answer and too few institutions hold pieces of its escrowed "
                              "key share; start its node again and resume the task")
        self._log(f"{purpose}: {of} did not answer; {recoverer} decrypts for it from its escrowed share")
        self.say(f"{purpose}: {of} did not answer; {recoverer} decrypts for it from its escrowed share")
        to_box = doc["boxes"][recoverer]
        asks = {n: ({"cmd": "secure_reseal", "task_id": self.task.task_id, "of": of, "to": recoverer, "to_box": to_box,
                     "purpose": purpose}, {"sealed": _u8(self.blobs.get(esc["sealed"][n]))}) for n in holders}
        resealed = self._exchange(f"{purpose}: resealing pieces of {of}'s share", asks) if asks else {}
        meta, arrays = request
        pieces = {f"piece/{n}": a["resealed"] for n, (_, a) in resealed.items()}
        pieces[f"piece/{recoverer}"] = _u8(self.blobs.get(esc["sealed"][recoverer]))
        msg = ({**meta, "cmd": "secure_recover", "of": of},
               {**arrays, "backup": _u8(self.blobs.get(esc["backup"])), **pieces})
        rep = self._exchange(f"{purpose}: decrypting for {of}", {recoverer: msg})
        return partial_from(*rep[recoverer])

    def secure_parties(self) -> tuple[str, ...]:
        return tuple(sorted(self.addresses)) if getattr(self, "addresses", None) else tuple(sorted(self.names.values()))

    def _secure_round(self, rnd: int, updates: list[Any]):
        """Round ``rnd``'s released sum: every institution decrypts the sum of the committed
        ciphertexts; the aggregate follows from the fused sum and the public counts."""
        release = self._release(rnd, updates)
        count = int(self.contract.functions.total_examples(rnd).call())
        return Aggregation(secure=True).combine(self.algorithm, self.server, rnd, self.cfg.first_seed,
                                                total=release.released, template=self.template, count=count)

    def _release(self, rnd: int, updates: list[Any]):
        """Round ``rnd``'s released sum: recorded already, or decrypted now by every institution."""
        from fedmdh.runtime.messages import updates_message
        from fedmdh.runtime.secure_task import update_vector

        purpose = f"round-{rnd}"
        release = self.releases.get(rnd) or self._stored_release(purpose)
        if release is None:
            umeta, uarrays = updates_message(updates)
            msg = ({"cmd": "secure_decrypt", "task_id": self.task.task_id, "purpose": purpose, **umeta}, uarrays)
            cts = {u.institution: update_vector(u) for u in updates}
            release = self._collect_partials(purpose, cts, {n: msg for n in self.secure_parties()})
        self.releases[rnd] = release
        return release

    def _stored_release(self, purpose: str):
        from fedmdh.runtime.secure_task import Release

        path = self.ledger_dir / "releases.jsonl"
        if not path.is_file():
            return None
        for line in path.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            if d["purpose"] == purpose and self.blobs.has(d["release"]):
                return Release.from_blob(self.blobs.get(d["release"]))
        return None

    def _check_round(self, rnd: int, updates: list[Any]) -> None:
        """Round ``rnd``'s divergence check (round.check_round, as the simulator's): before any node is sent
        the round's aggregate to attest, so the rounds before it stay finalized on chain and in the record."""
        try:
            check_round(rnd, updates, self.server)
        except TrainingDiverged as exc:
            self._diverged(exc)

    def _aggregate(self, rnd: int, updates: list[Any]):
        """Round ``rnd``'s aggregate from its committed updates (a secure task: from their released sum)."""
        if self.task.secure:
            return self._secure_round(rnd, updates)
        return Aggregation().combine(self.algorithm, self.server, rnd, self.cfg.first_seed, updates=updates)

    def _resume(self) -> dict[str, Any]:
        """Continue the task of ``out_dir`` from where the chain, its blobs and the nodes stand."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore
        from fedmdh.ledger.chain import Chain
        from fedmdh.ledger.keys import KeystoreSettings, load_or_create
        from fedmdh.runtime.messages import setup_from_record

        task = self.task
        doc_path = self.ledger_dir / "task.json"
        if not doc_path.is_file():
            raise TaskError(f"{self.out}: no task record to resume (ledger/task.json is missing)")
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        if doc.get("task_id") != task.task_id:
            raise TaskError(f"{self.out} records task {doc.get('task_id')}, not {task.task_id}")
        blobs = DirBlobStore(self.ledger_dir / doc.get("blobs", "blobs"))
        setup = setup_from_record(json.loads(blobs.get(doc["setup"])))
        names = setup.names
        cfg = task.config(names)
        algorithm = cfg.build_algorithm(task.algorithm)
        keystore = Path(task.keystore) if task.keystore else default_keystore()
        self.account = load_or_create("coordinator", KeystoreSettings.from_env(keystore))
        self.chain = Chain.rpc(task.chain_rpc)
        self.chain.open_log(self.ledger_dir / ".coordinator-transactions.jsonl")
        self.chain.on_record = self._own.append
        self.contract = self.chain.contract(doc["contract"])
        self._quorum = int(doc["quorum"])
        c = self.contract.functions
        if c.ended().call() and bytes(c.archived_hash().call()) != EMPTY:
            self._setup_state(cfg, algorithm, names, dict(doc["participants"]), blobs,
                              codec.decode_payload(blobs.get(doc["initial_state"])), setup)
            return self._add_late()
        if c.ended().call():
            raise TaskError(f"task {task.task_id} has ended on chain; nothing to resume")
        if task.secure != bool(doc.get("secure")):
            raise TaskError(f"task {task.task_id} was {'' if doc.get('secure') else 'not '}started with --secure; "
                            "resume it the same way")
        if task.secure:
            from fedmdh.runtime.secure_task import Aggregator

            self.secure = Aggregator(blobs.get(doc["secure"]["context"]))
            self.public_key = blobs.get(doc["secure"]["public_key"])
            self.secure_doc = dict(doc["secure"])
        self._setup_state(cfg, algorithm, names, dict(doc["participants"]), blobs,
                          codec.decode_payload(blobs.get(doc["initial_state"])), setup)
        replies = self._identify({"cmd": "status", "task_id": task.task_id})
        status = self._check(replies, "resume (status)")
        self.say(f"resuming task {task.task_id} with {sorted(status)}")
        cur = int(c.current_round().call())
        # the last finalized aggregate: the coordinator's own copy, else recomputed from the updates
        last_final = cur - 1
        self._catch_up_server(last_final)
        nxt = cur + 1 if c.commits_closed(cur).call() else cur
        if nxt > cfg.rounds:
            nxt = cfg.rounds + 1
        prev = self._committed_updates(nxt - 1) if nxt >= 2 else []
        if nxt - 1 >= 1 and self.server_round < nxt - 1:
            self.server = self._aggregate(nxt - 1, prev)
            self.server_round = nxt - 1
            blobs.put(codec.encode_payload(self.server))
        for name, (meta, _) in status.items():
            if int(meta.get("progress", {}).get("state_round", 0)) < nxt - 2:
                self.behind.add(name)
        self._log(f"resumed by a new coordinator at round {nxt} (chain: current round {cur})")
        return self._drive(nxt, prev)

    def _add_late(self) -> dict[str, Any]:
        """A task archived without some institutions: each one whose node is back catches up from the last
        finalized aggregate and adds its model's hash on chain (``attest_late``); the run record gets the
        transactions and the manifests of their model files."""
        from fedmdh.runtime.node import LATE_MODEL_KIND

        c = self.contract.functions
        digest = bytes(c.archived_hash().call()).hex()
        due = [n for n in self.all_names if c.archive_missing(self.addresses[n]).call()
               and bytes(c.late_model(self.addresses[n]).call()) == EMPTY]
        if not due:
            raise TaskError(f"task {self.task.task_id} has ended and every institution's model is archived; "
                            "nothing to resume")
        replies = self._identify({"cmd": "status", "task_id": self.task.task_id})
        self._check(replies, "resume (status)")
        here = set(self.names.values())
        R = self.cfg.rounds
        self._catch_up_server(R)
        base = {f"b/{k}": np.asarray(v) for k, v in self.server.items()}
        msg = ({"cmd": "late", "task_id": self.task.task_id, "archive_sha256": digest, "base_round": R}, base)
        asked = {n: msg for n in due if n in here}
        replies = self._exchange("adding the missing models", asked, tolerant=True) if asked else {}
        self._record_transactions(replies)
        self._recover_transactions()
        added = []
        for name, (meta, _) in sorted(replies.items()):
            manifest = meta.get("late_manifest")
            body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
            on_chain = bytes(c.late_model(self.addresses[name]).call()).hex()
            if (not isinstance(manifest, dict) or manifest.get("kind") != LATE_MODEL_KIND
                    or manifest.get("institution") != name or on_chain != meta.get("late_sha256")):
                raise TaskError(f"{name} answered the late archive without the manifest it added on chain")
            if self.blobs.put(body) != on_chain:
                raise TaskError(f"{name}'s model manifest does not hash to the one it added on chain")
            added.append(name)
            self._log(f"{name} added its model (kept round {meta.get('kept_round')}) to the archive {digest[:16]} "
                      f"as {on_chain} (late)")
            self.say(f"{name} added its model to the archive (late)")
        still = [n for n in due if n not in added]
        if still:
            self._log(f"still missing from the archive: {', '.join(still)}")
            self.say(f"still missing from the archive: {', '.join(still)} (start their nodes and resume again)")
        final = json.loads((self.out / "final_metrics.json").read_text(encoding="utf-8"))
        self.chain.close()
        return {**final, "late": added, "missing": still}

    def _catch_up_server(self, upto: int) -> None:
        """``self.server`` at the finalized aggregate of round ``upto`` (from blobs, or recomputed)."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import sha256_hex

        c = self.contract.functions
        for r in range(upto, 0, -1):
            h = bytes(c.finalized_hash(r).call()).hex()
            if self.blobs.has(h):
                self.server, self.server_round = codec.decode_payload(self.blobs.get(h)), r
                break
        while self.server_round < upto:
            r = self.server_round + 1
            ups = self._committed_updates(r)
            self.server = self._aggregate(r, ups)
            self.server_round = r
            if sha256_hex(codec.encode_payload(self.server)) != bytes(c.finalized_hash(r).call()).hex():
                raise TaskError(f"resume: round {r}'s aggregate recomputed from its updates is not the finalized one")
            self.blobs.put(codec.encode_payload(self.server))

    def _committed_updates(self, rnd: int) -> list[Any]:
        """Round ``rnd``'s committed updates: from the blob store, else asked of their institutions."""
        from fedmdh.ledger import codec
        from fedmdh.runtime.messages import updates_from

        c = self.contract.functions
        out, missing = [], []
        for name in self.all_names:
            h = bytes(c.update_hash(rnd, self.addresses[name]).call()).hex()
            if h == EMPTY.hex():
                continue
            if self.blobs.has(h):
                out.append(codec.decode_update(self.blobs.get(h)))
            else:
                missing.append((name, h))
        # A node lost after its commitment, before its reply: the round cannot go on without its update
        # (the aggregate is over every committed one), so it is asked again until its node is back
        # (within the task's patience: wait_s), then the task stops naming it.
        t_end = time.monotonic() + self.task.wait_s
        while missing:
            asked = {n: ({"cmd": "status", "task_id": self.task.task_id, "updates_of": [rnd]}, {})
                     for n, _ in missing if n in set(self.names.values())}
            replies = self._exchange(f"fetching round {rnd}'s updates", asked, tolerant=True) if asked else {}
            still = []
            for name, h in missing:
                meta, arrays = replies.get(name, ({}, {}))
                found = [u for u in updates_from({"updates": [m for m in meta.get("updates", []) if m["round"] == rnd]},
                                                 {k.replace(f"u{rnd}/", "u/", 1): v for k, v in arrays.items()})
                         if u.institution == name]
                if not found or self.blobs.put(codec.encode_update(found[0])) != h:
                    still.append((name, h))
                else:
                    out.append(found[0])
            missing = still
            if missing and (not asked or time.monotonic() > t_end):
                names = ", ".join(n for n, _ in missing)
                raise TaskStopped(f"round {rnd}: {names} committed an update that no one can relay now (its node is "
                                  f"not answering); start {names}'s node again and resume the task")
            if missing:
                self.say(f"round {rnd}: waiting for {', '.join(n for n, _ in missing)}, whose committed update only "
                         "its node holds")
                time.sleep(2.0)
        return sorted(out, key=lambda u: u.institution)

    # ------------------------------------------------------------------ rounds

    def _drive(self, start: int, prev_updates: list[Any]) -> dict[str, Any]:
        """Rounds ``start`` .. R, then finish and archive; ``prev_updates``: round ``start - 1``'s."""
        from fedmdh.data.federation import federation_heterogeneity
        from fedmdh.ledger import codec
        from fedmdh.runtime.simulator import RoundRecord

        task, cfg, R = self.task, self.cfg, self.cfg.rounds
        janitor = None
        if task.round_timeout > 0:
            janitor = Janitor(self.chain, self.account, self.contract, task.round_timeout, self._lock)
            janitor.start()
        updates = prev_updates
        t0 = time.perf_counter()
        try:
            for r in range(start, R + 2):
                last = r == R + 1
                if self.before_round is not None:
                    self.before_round(r)
                if r >= 2 and self.server_round < r - 1:
                    self.server = self._aggregate(r - 1, updates)
                    self._check_round(r - 1, updates)
                    self.server_round = r - 1
                    self.blobs.put(codec.encode_payload(self.server))

                def build(names, r=r, last=last, updates=updates) -> dict[str, Message]:
                    requests = {}
                    for name in names:
                        meta, arrays = self._round_message(name, r, last, updates)
                        requests[name] = (meta, arrays)
                    return requests

                requests = build([n for n in self.all_names if n in set(self.names.values())])
                step = "the last round" if last else f"round {r}"
                replies = self._exchange(step, requests, tolerant=r > 1)
                self._record_transactions(replies)
                self._note_behind(replies)
                t_prev, t0 = t0, time.perf_counter()
                if r == 1:
                    if task.secure:
                        het = _secure_heterogeneity(self.summaries, self.setup,
                                                    {n: float(replies[n][0]["kl"]) for n in self.all_names})
                    else:
                        counts = {n: np.asarray(replies[n][0]["histogram"], dtype=np.int64) for n in self.all_names}
                        het = federation_heterogeneity(self.summaries, self.setup, counts)
                    info = het.to_dict()
                    info.update(target=cfg.target, union_features=len(self.setup.features), runtime="flower",
                                nodes=dict(self.addresses), setup_sha256=self._setup_sha256())
                    (self.out / "federation.json").write_text(json.dumps(_finite(info), indent=2, default=float),
                                                              encoding="utf-8")
                else:
                    self._write_round(self._round_record(r - 1, updates, replies, t0 - t_prev, RoundRecord))
                if last:
                    final_replies = replies
                    break
                updates = self._close_commits_patiently(r, step, replies, build)
                if task.secure:  # decrypted now: round r + 1's messages carry the released sum
                    self.server = self._secure_round(r, updates)
                    self.server_round = r
                    self.blobs.put(codec.encode_payload(self.server))
        finally:
            if janitor is not None:
                janitor.stop.set()
                janitor.join(timeout=10)
                for e in janitor.errors[-3:]:
                    self._log(f"janitor: {e}")
        missing = [n for n in self.all_names if n not in final_replies]
        if len(final_replies) < self._quorum:
            raise TaskStopped(f"the last round: {', '.join(missing)} did not answer, and {len(final_replies)} "
                              f"institutions are fewer than the quorum of {self._quorum} that archives the models; "
                              f"start their nodes again and resume task {task.task_id}")
        return self._finish_task(final_replies)

    def _round_message(self, name: str, r: int, last: bool, updates: list[Any]) -> Message:
        """Round ``r``'s message (the last round's ``finish``) to one institution."""
        from fedmdh.runtime.flower.wire import unpack
        from fedmdh.runtime.messages import updates_message

        task, R = self.task, self.cfg.rounds
        meta: Meta = {"cmd": "finish" if last else "round", "task_id": task.task_id, "round": R if last else r}
        arrays: Arrays = {}
        if r == 1:
            smeta, sarrays = unpack(self.blobs.get(self._summaries_blob()))
            meta.update(contract=self.contract.address, participants=self.addresses,
                        setup_sha256=self._setup_sha256(), **smeta)
            arrays.update(sarrays)
        else:
            if task.secure:
                rmeta, rarrays = self._release(r - 1, updates).message()
                meta["release"] = rmeta
                arrays.update(rarrays)
            else:
                umeta, uarrays = updates_message(updates)
                meta.update(umeta)
                arrays.update(uarrays)
            if name in self.behind and r - 2 >= 1:
                self._catch_up_message(name, r, meta, arrays)
        return meta, arrays

    def _note_behind(self, replies: Mapping[str, Message]) -> None:
        for name, (meta, _) in replies.items():
            if "missed" not in meta and "error" not in meta:
                self.behind.discard(name)
            else:
                self.behind.add(name)

    def _close_commits_patiently(self, r: int, step: str, replies: dict[str, Message], build) -> list[Any]:
        """Round ``r``'s committed updates; short of the quorum, the institutions that have not committed are
        asked again (a node back after a loss; nodes that waited on chain for it) until the task's patience
        (``wait_s``) runs out, then the task stops naming them."""
        c = self.contract.functions
        t_end = time.monotonic() + self.task.wait_s
        replies = dict(replies)
        while True:
            try:
                return self._close_commits(r, replies)
            except TaskStopped:
                here = set(self.names.values())
                waiting = [n for n in self.all_names
                           if n in here and bytes(c.update_hash(r, self.addresses[n]).call()) == EMPTY]
                if r == 1 or self.task.round_timeout <= 0 or not waiting or time.monotonic() > t_end:
                    raise
                line = f"{step}: short of its quorum; asking {', '.join(waiting)} again"
                self._log(line)
                self.say(line)
                time.sleep(2.0)
                more = self._exchange(step, build(waiting), tolerant=True)
                self._record_transactions(more)
                self._note_behind(more)
                replies.update(more)

    def _catch_up_message(self, name: str, r: int, meta: Meta, arrays: Arrays) -> None:
        """What a node that missed rounds needs with round ``r``'s message: the finalized aggregate of round
        ``r - 2``; or, while round ``r - 2`` is not finalized (it may wait for this very node's attestation:
        its committers were just the quorum and it was lost after its commitment), the finalized aggregate
        of round ``r - 3`` and round ``r - 2``'s updates, so that it aggregates and attests that round
        itself before round ``r - 1``."""
        from fedmdh.runtime.messages import updates_message

        c = self.contract.functions
        if bytes(c.finalized_hash(r - 2).call()) != EMPTY or self.task.secure or r - 3 < 0:
            base = self._finalized_state(r - 2)
            meta["base_round"] = r - 2
            arrays.update({f"b/{k}": v for k, v in base.items()})
            return
        if r - 3 >= 1:
            base = self._finalized_state(r - 3)
            meta["base_round"] = r - 3
            arrays.update({f"b/{k}": v for k, v in base.items()})
        cmeta, carrays = updates_message(self._committed_updates(r - 2))
        meta["catch_up"] = {"round": r - 2, **cmeta}
        arrays.update({f"c/{k}": v for k, v in carrays.items()})
        self.say(f"round {r}: {name} catches up through round {r - 2}, which is not finalized yet")

    def _summaries_blob(self) -> str:
        doc = json.loads((self.ledger_dir / "task.json").read_text(encoding="utf-8"))
        return doc["summaries"]

    def _setup_sha256(self) -> str:
        from fedmdh.runtime.messages import setup_hash

        return setup_hash(self.setup)

    def _finalized_state(self, rnd: int) -> dict[str, np.ndarray]:
        from fedmdh.ledger import codec

        h = bytes(self.contract.functions.finalized_hash(rnd).call()).hex()
        if h == EMPTY.hex():
            self._wait_chain(lambda: bytes(self.contract.functions.finalized_hash(rnd).call()) != EMPTY,
                             f"round {rnd} to be finalized")
            h = bytes(self.contract.functions.finalized_hash(rnd).call()).hex()
        return codec.decode_payload(self.blobs.get(h))

    def _wait_chain(self, done, what: str, limit: float | None = None) -> None:
        limit = limit if limit is not None else self.task.wait_s
        t_end = time.monotonic() + limit
        while not done():
            if time.monotonic() > t_end:
                raise TaskError(f"gave up after {limit:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _close_commits(self, r: int, replies: Mapping[str, Message]) -> list[Any]:
        """Round ``r``'s committed updates once its commitments have closed (or stop short of a quorum)."""
        from fedmdh.ledger import codec
        from fedmdh.runtime.messages import updates_from

        c = self.contract.functions
        for name, (meta, arrays) in replies.items():
            if "num_examples" in meta:
                (u,) = updates_from({"updates": [meta]}, arrays)
                if u.institution != name:
                    raise TaskError(f"the node of {name} returned an update of {u.institution}")
                self.blobs.put(codec.encode_update(u))
        if not c.commits_closed(r).call():
            # The deadline counts from when the replies are in, not only from when the round opened: a
            # previous step that waited long for a lost node (Flower notices one after two missed
            # heartbeats) leaves the round's opening far behind, and the quorum's commitments that just
            # arrived must still get their close_commits (the janitor's, or ours) before anyone gives up.
            timeout = self.task.round_timeout
            opened = int(c.opened(r).call()) or time.time()
            deadline = max(opened + timeout, time.time()) + 10 if timeout > 0 else None
            patience = max(opened + timeout, time.time()) + self.task.wait_s
            while not c.commits_closed(r).call():
                quorate = timeout > 0 and int(c.commit_count(r).call()) >= self._quorum
                if quorate and time.time() >= opened + timeout + 5:  # the janitor is late: close it ourselves
                    self._close_on_chain("close_commits", r)
                if quorate and time.time() > patience:
                    raise TaskError(f"round {r}: a quorum committed, yet its commitments did not close on chain "
                                    f"within {self.task.wait_s:.0f} s (the chain node is not taking transactions?)")
                if not quorate and (deadline is None or time.time() > deadline):
                    committed = [n for n in self.all_names
                                 if bytes(c.update_hash(r, self.addresses[n]).call()) != EMPTY]
                    missing = [n for n in self.all_names if n not in committed]
                    raise TaskStopped(
                        f"round {r}: {len(committed)} of {len(self.all_names)} institutions committed "
                        f"({', '.join(committed) or 'none'}), the quorum is {self._quorum}; missing: "
                        f"{', '.join(missing)}. The task stops here: when they are back, resume it with "
                        f"`fedmdh deploy resume --task {self.task.task_id} --out {self.out} ...`")
                time.sleep(0.2)
        return self._committed_updates(r)

    def _close_on_chain(self, fn: str, rnd: int) -> None:
        """Send ``close_commits`` / ``close_round`` for round ``rnd`` (anyone may); a revert (closed by someone
        else meanwhile, or not due yet) is ignored: the caller looks at the chain again."""
        from fedmdh.ledger.artifacts import call_data
        from fedmdh.ledger.chain import GAS
        from fedmdh.ledger.errors import LedgerError

        try:
            with self._lock:
                self.chain.transact(self.account, fn, self.contract.address, call_data(fn, rnd),
                                    gas=GAS["attest"] + 12_000 * 32, actor=SUBMITTER, round=rnd)
        except LedgerError as exc:
            self.log_lines.append(f"{fn} {rnd}: {exc}")
        time.sleep(0.5)

    def _write_round(self, record) -> None:
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite(record.to_dict())) + "\n")
        if self.on_round is not None:
            self.on_round(record)

    def _round_record(self, rnd: int, updates: list[Any], replies: Mapping[str, Message], seconds: float, cls):
        per = {n: dict(m["eval"]) for n, (m, _) in sorted(replies.items()) if m.get("eval_round") == rnd and "eval" in m}
        n_up = sum(u.num_examples for u in updates)
        return cls(
            round=rnd,
            train_loss=float(sum(u.metrics.get("loss", 0.0) * u.num_examples for u in updates) / max(n_up, 1)),
            val_mse=_mean([m.get("val_mse") for m in per.values()]),
            rmse=_mean([m.get("rmse") for m in per.values()]),
            mae=_mean([m.get("mae") for m in per.values()]),
            r2=_mean([m.get("r2") for m in per.values()]),
            per_institution=per,
            bytes_up=sum(u.nbytes() for u in updates),
            seconds=seconds,
        )

    def _finish_task(self, replies: Mapping[str, Message]) -> dict[str, Any]:
        """Final metrics and the archive of the models of the institutions that answered the last round
        (a quorum at least); the others are named missing, on chain too, and add their model later."""
        cfg, names = self.cfg, tuple(n for n in self.all_names if n in replies)
        missing = [n for n in self.all_names if n not in replies]
        per = {n: dict(replies[n][0]["kept_metrics"]) for n in names}
        kept = {n: int(replies[n][0]["kept_round"]) for n in names}
        final = {"algorithm": self.algorithm.name, "seed": cfg.first_seed, "rounds": cfg.rounds,
                 "best_round": max(kept.values()), "best_rounds": kept,
                 "seconds": time.perf_counter() - self.t_start,
                 **{k: _mean([m.get(k) for m in per.values()]) for k in ("rmse", "mae", "r2")},
                 "per_institution": per, "runtime": "flower", "task_id": self.task.task_id,
                 "contract": self.contract.address, **({"missing": missing} if missing else {})}
        if cfg.dp is not None:  # the budget spent: every released round sum, with its contributors (chain)
            from fedmdh.secure.dp import report, report_line

            c = self.contract.functions
            counts = [sum(bytes(c.update_hash(r, self.addresses[n]).call()) != EMPTY for n in self.all_names)
                      for r in range(1, cfg.rounds + 1)]
            final["privacy"] = report(cfg.dp, cfg.rounds, len(self.all_names), counts)
            self._log(report_line(final["privacy"]))
        # written before the archive, which commits their sha256
        (self.out / "final_metrics.json").write_text(json.dumps(_finite(final), indent=2), encoding="utf-8")
        digest, absent = self._archive(replies, names, missing)
        self._recover_transactions()
        self._log(f"ledger (rpc {self.task.chain_rpc}, contract {self.contract.address}): {cfg.rounds} rounds "
                  f"finalized; the institutions' models archived as {digest} (held by the institutions)")
        if absent:
            line = (f"missing from the archive (named on chain): {', '.join(absent)}; each adds its model's hash when its "
                    f"node is back: `fedmdh deploy resume --task {self.task.task_id} --out {self.out} ...`")
            self._log(line)
            self.say(line)
        self._log(f"finished {cfg.rounds} rounds in {final['seconds']:.1f} s; models kept from rounds "
                  + ", ".join(f"{n} {kept[n]}" for n in names))
        self.chain.close()
        return final

    # ------------------------------------------------------------------ chain

    def _create_contract(self, algorithm, layout, names: tuple[str, ...], addresses: Mapping[str, str],
                         manifest_hash: str) -> None:
        from fedmdh.ledger.chain import GAS, Chain
        from fedmdh.ledger.keys import KeystoreSettings, load_or_create

        vector_len = sum(n for _, n in layout)
        keystore = Path(self.task.keystore) if self.task.keystore else default_keystore()
        self.account = load_or_create("coordinator", KeystoreSettings.from_env(keystore))
        self.chain = Chain.rpc(self.task.chain_rpc)
        self.chain.open_log(self.ledger_dir / ".coordinator-transactions.jsonl")
        self.chain.on_record = self._own.append
        self.chain.fund([self.account.address] + [addresses[n] for n in names])
        self._quorum = self.task.quorum or len(names) // 2 + 1
        data = self.chain.deploy_data(self.task.experiment["target"][:64], algorithm.name[:64],
                                      int(self.task.experiment["rounds"]), self._quorum, vector_len,
                                      bytes.fromhex(manifest_hash), [addresses[n] for n in names],
                                      int(round(self.task.round_timeout)))
        sent = self.chain.transact(self.account, "deploy", None, data, gas=GAS["deploy"], actor=SUBMITTER)
        self.contract = self.chain.contract(sent.receipt["contractAddress"])
        self._record_transactions({})

    def _write_task_json(self, algorithm, cfg, names, addresses, layout, init_hash, setup_blob, manifest_hash,
                         summaries_blob, secure_doc: Mapping[str, Any] | None = None) -> None:
        from fedmdh.ledger import codec
        from fedmdh.ledger.artifacts import load_artifact

        doc = {
            "format": "fedmdh-ledger/1",
            "runtime": "flower",
            "task_id": self.task.task_id,
            "chain": "rpc",
            "rpc_url": self.task.chain_rpc,
            "chain_id": self.chain.chain_id,
            "contract": self.contract.address,
            "contract_artifact_sha256": load_artifact()["source_sha256"],
            "submitter": self.account.address,
            "participants": {n: addresses[n] for n in names},
            "algorithm": algorithm.name,
            "hyperparameters": algorithm.hyperparameters(),
            "target": cfg.target,
            "rounds": cfg.rounds,
            "seed": cfg.first_seed,
            "quorum": self._quorum,
            "round_timeout": self.task.round_timeout,
            "vector_layout": [[n, int(k)] for n, k in layout],
            "fixed_point_scale": codec.SCALE,
            "initial_state": init_hash,
            "task_manifest": manifest_hash,
            "setup": setup_blob,
            "summaries": summaries_blob,
            "config": "../config.toml",
            "blobs": "blobs",
            "transactions": "transactions.jsonl",
            "signing": "each institution signs with its own key on its own node; the coordinator's key created "
                       "the task contract, closes rounds whose timeout passed, and archives the model manifest the "
                       "institutions attested",
        }
        if secure_doc is not None:
            doc["secure"] = dict(secure_doc)
        (self.ledger_dir / "task.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")

    def _archive(self, replies: Mapping[str, Message], names: tuple[str, ...] | None = None,
                 missing: list[str] | None = None) -> tuple[str, list[str]]:
        """Archive the manifest of ``names``' model files (every institution by default; ``missing``: the
        institutions whose models it lacks, named in it). Returns its sha256 and the institutions the
        contract names missing (those that did not attest it)."""
        import hashlib

        from fedmdh.ledger.artifacts import call_data
        from fedmdh.ledger.artifacts import HELD_BY_INSTITUTIONS
        from fedmdh.ledger.chain import GAS, GAS_PER_PARTICIPANT

        names = self.all_names if names is None else names
        files: dict[str, str] = {}
        for n in names:
            files.update(replies[n][0]["model_files"])
        run_files = {name: self.blobs.put((self.out / name).read_bytes())
                     for name in ("final_metrics.json", "metrics.jsonl", "federation.json")}
        manifest = {"kind": "model-archive", "files": dict(sorted(files.items())), "run_files": run_files,
                    "held_by": HELD_BY_INSTITUTIONS, **({"missing": sorted(missing)} if missing else {})}
        body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        digest = self.blobs.put(body)
        assert digest == hashlib.sha256(body).hexdigest()
        msg = {"cmd": "archive", "task_id": self.task.task_id, "manifest": manifest, "manifest_sha256": digest}
        # a node lost now is named missing on chain (the quorum archives); below the quorum the task stops
        replies = self._exchange("archive", {n: (msg, {}) for n in names}, tolerant=True)
        self._record_transactions(replies)
        c = self.contract.functions
        attested = [n for n in self.all_names if bytes(c.model_vote(self.addresses[n]).call()).hex() == digest]
        if len(attested) < self._quorum:
            absent = [n for n in self.all_names if n not in attested]
            raise TaskStopped(f"the archive: {len(attested)} institutions attested the model manifest, the quorum is "
                              f"{self._quorum}; missing: {', '.join(absent)}. Start their nodes again and resume task "
                              f"{self.task.task_id}")
        locator = f"held by the institutions; manifest {self.blobs.locator(digest)}"[:256]
        self.chain.transact(self.account, "archive", self.contract.address,
                            call_data("archive", bytes.fromhex(digest), locator),
                            gas=GAS["archive"] + 2 * GAS_PER_PARTICIPANT * len(self.all_names), actor=SUBMITTER)
        self._record_transactions({})
        return digest, [n for n in self.all_names if n not in attested]


def _secure_heterogeneity(summaries, setup, kl: Mapping[str, float]):
    """H / alpha / KL_avg of a secure task: column names and row counts are public, each
    institution computed its KL against the released pooled histogram itself; per-institution label
    moments are not released (NaN)."""
    from fedmdh.data.heterogeneity import InstitutionSummary, from_summaries

    by_name = {s.institution: s for s in summaries}
    order = setup.names
    stats = [InstitutionSummary(n, by_name[n].n_rows, len(by_name[n].columns), float("nan"), float("nan"))
             for n in order]
    return from_summaries(stats, [by_name[n].columns for n in order], [kl[n] for n in order])


def deployed_task_manifest(cfg, algorithm, spec, setup_sha256: str,
                           secure: Mapping[str, str] | None = None) -> tuple[bytes, bytes, str]:
    """``(config.toml bytes, task manifest bytes, initial state hash)`` of a deployed task.

    The coordinator records the manifest's sha256 as the contract's ``initial_state_hash``; every
    node recomputes all three from what setup fixed and refuses a contract that differs. A secure
    task's manifest also names its scheme and the sha256 of its context and joint public key
    (``secure``); its updates have no on-chain vector (each would be an institution's in the clear).
    """
    import tomli_w

    from fedmdh.ledger import codec
    from fedmdh.ledger.blobs import sha256_hex
    from fedmdh.ledger.recorder import OWN_NODE_SIGNERS, task_manifest
    from fedmdh.runtime.protocol import initial_state

    config = tomli_w.dumps(cfg.to_toml_dict()).encode("utf-8")
    init_hash = sha256_hex(codec.encode_payload(initial_state(algorithm, spec, cfg.first_seed)))
    layout = [] if secure else probe_layout(algorithm, spec, cfg.first_seed)
    extra: dict[str, Any] = {"setup_sha256": setup_sha256, "runtime": "flower"}
    if secure:
        extra["secure"] = dict(secure)
    manifest = task_manifest(algorithm, init_hash, layout, sha256_hex(config), archive=True,
                             signers=OWN_NODE_SIGNERS, extra=extra)
    return config, manifest, init_hash


def probe_layout(algorithm, spec, seed: int) -> list[tuple[str, int]]:
    """The on-chain vector layout of the algorithm's updates, from one update on synthetic rows.

    The layout (names and sizes of the small vectors the contract averages) depends on the
    algorithm and the federation's shape, not on data, so 16 rows of zeros give it.
    """
    from fedmdh.ledger import codec
    from fedmdh.runtime.secure_task import template_update

    layout, _ = codec.flatten(codec.onchain_vectors(algorithm, template_update(algorithm, spec, seed)))
    return layout


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float as ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class RecordingTransport:
    """A transport that writes every message the coordinator sends and receives, as the wire's
    bytes, into ``folder`` (``NNNNNN-<to|from>-<node>.bin``, in order): an audit of what the
    coordinator sees (``--record-messages``)."""

    def __init__(self, inner: Transport, folder: Path) -> None:
        self.inner = inner
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = len(list(self.folder.glob("*.bin")))

    def _write(self, way: str, node: Any, message: Message) -> None:
        from fedmdh.files import atomic_write_bytes
        from fedmdh.runtime.flower.wire import pack

        self.count += 1
        atomic_write_bytes(self.folder / f"{self.count:06d}-{way}-{node}.bin", pack(*message))

    def wait_nodes(self, count: int, timeout: float) -> list[Any]:
        return self.inner.wait_nodes(count, timeout)

    def exchange(self, requests: Mapping[Any, Message], timeout: float,
                 optional: frozenset[Any] = frozenset()) -> dict[Any, Message]:
        for node, msg in requests.items():
            self._write("to", node, msg)
        replies = self.inner.exchange(requests, timeout, optional=optional)
        for node, msg in replies.items():
            self._write("from", node, msg)
        return replies


class DirectTransport:
    """Node services called in this process, one thread each per exchange (tests, benchmarks).

    Each node handles its message concurrently, as real nodes do (a node waits on chain for the
    others' attestations within a message).
    """

    def __init__(self, services: Mapping[str, Any]) -> None:
        self.services = dict(services)
        self.down: set[str] = set()  # nodes that do not answer (a test takes one down)

    def wait_nodes(self, count: int, timeout: float) -> list[Any]:
        up = sorted(n for n in self.services if n not in self.down)
        if len(up) < count:
            raise TaskError(f"{len(up)} nodes, the task needs {count}")
        return up

    def exchange(self, requests: Mapping[Any, Message], timeout: float,
                 optional: frozenset[Any] = frozenset()) -> dict[Any, Message]:
        from concurrent.futures import ThreadPoolExecutor

        from fedmdh.runtime.flower.wire import pack, unpack

        def one(node: Any) -> Message:
            if node in self.down:
                return {"error": f"node {node}: no reply within {timeout:.0f} s"}, {}
            meta, arrays = unpack(pack(*requests[node]))  # what crosses the wire, exactly
            return unpack(pack(*self.services[node].handle(meta, arrays)))

        with ThreadPoolExecutor(max_workers=max(1, len(requests))) as pool:
            futures = {node: pool.submit(one, node) for node in requests}
            return {node: f.result() for node, f in futures.items()}
