"""An institution's node service: its rows, its ledger key, its client state and its models.

``fedmdh node start`` runs one of these on the institution's machine beside a Flower SuperNode;
the SuperNode's ClientApp (:mod:`fedmdh.runtime.flower.client_app`) hands it every message over a
local socket. The service answers four commands of a task (see docs/deployment.md):

``setup``
    Load and validate the institution's table for the task's target, carve its validation split,
    and reply with its setup summary (column names, row counts, sufficient statistics: no row)
    and its ledger address.
``round`` (round ``r``)
    Round 1 brings every institution's setup summary: the node pools them itself (so it does not
    have to trust the coordinator's arithmetic), checks that its own summary is unchanged and that
    the task contract on chain is the shipped one with the task's settings, the setup's initial
    state and itself on the allowlist, and registers. Later rounds bring the committed updates of
    round ``r - 1``: the node checks each against its on-chain commitment, recomputes the aggregate
    with the algorithm's own ``aggregate``, attests its hash, evaluates its model on its own
    validation rows (selection) and on the test set if it has one (reporting), trains round ``r``,
    waits until the chain has finalized exactly the aggregate it computed, commits its update and
    returns it.
``finish``
    The last round's aggregate as above, then the model the institution keeps (its best round on
    its own validation rows) is written to its state folder; the reply carries the files' sha256.
``archive``
    Check the task's archive manifest against its own files and attest the manifest's hash.

Every transaction is signed here, with the institution's own key. Client state, the current
aggregate and the kept model are written to the state folder atomically after each round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmdh.errors import FedmdhError, InputError
from fedmdh.runtime.files import atomic_write_bytes, atomic_write_json, replace_dir

log = logging.getLogger("fedmdh.node")

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]

#: how long a node waits for the others (registration, attestations) before it gives up on a round
DEFAULT_WAIT_S = 600.0
POLL_S = 0.02


def check_name(name: str, what: str = "institution name") -> str:
    """Institution names are names: letters, digits, ``-``, ``_`` and ``.``; no path, no ``..``."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or "") or ".." in name:
        raise InputError(f"{what} {name!r} is not a name: use letters, digits, '-', '_' and '.' "
                         "(at most 64, no path separators, no '..').")
    return name


@dataclass
class NodeTask:
    """One task as this node sees it."""

    task_id: str
    spec_json: dict[str, Any]
    folder: Path
    table: Any
    split: Any
    test: Any
    summary: Any
    # from round 1 on
    setup: Any = None
    config: Any = None
    algorithm: Any = None
    data: Any = None
    spec: Any = None
    server: dict[str, np.ndarray] | None = None
    slot: Any = None
    selection: Any = None
    chain: Any = None
    contract: Any = None
    addresses: dict[str, str] = field(default_factory=dict)
    round: int = 0  # the last round this node committed
    pending_hash: str = ""  # the aggregate this node computed for the round it last attested
    new_records: list[dict[str, Any]] = field(default_factory=list)


class NodeService:
    """The node's side of the protocol; :meth:`handle` answers one ``(meta, arrays)`` message.

    Parameters
    ----------
    name:
        The institution's name (as the federation will know it).
    data:
        Its CSV file (rows never leave this process).
    target:
        The target column this node trains for (a task asking for another is refused).
    state_dir:
        The node's own folder: keystore, per-task state, models, transaction log.
    test:
        Optional shared test CSV: the node reports test metrics for it each round.
    exclude:
        Columns that are neither features nor target.
    chain_rpc:
        The chain node this institution trusts; ``None``: the one the task names.
    passphrase:
        Of the node's keystore (default ``$FEDMDH_KEY_PASSPHRASE`` or a prompt at start).
    """

    def __init__(self, name: str, data: str | Path, target: str, state_dir: str | Path,
                 test: str | Path | None = None, exclude: tuple[str, ...] = (), chain_rpc: str | None = None,
                 passphrase: str | None = None) -> None:
        from fedmdh.ledger.keys import KeystoreSettings, load_or_create

        self.name = check_name(name)
        self.data = Path(data)
        self.target = target
        self.test = Path(test) if test else None
        self.exclude = tuple(exclude)
        self.chain_rpc = chain_rpc
        for p, what in ((self.data, "--data"), (self.test, "--test")):
            if p is not None and not p.is_file():
                raise InputError(f"{what} {p}: file not found; give the institution's CSV file.")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        settings = KeystoreSettings.from_env(self.state_dir / "keystore", passphrase=passphrase)
        self.account = load_or_create(self.name, settings)
        self.tasks: dict[str, NodeTask] = {}
        from fedmdh.runtime.protocol import use_training_threads

        use_training_threads()  # the simulator's count: the same bits (torch and BLAS)

    @property
    def address(self) -> str:
        return self.account.address

    # ------------------------------------------------------------------ dispatch

    def handle(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        """Answer one message; a failure becomes ``{"error": one line naming this institution}``."""
        cmd = meta.get("cmd")
        t0 = time.perf_counter()
        try:
            if cmd == "setup":
                out = self._setup(meta)
            elif cmd == "round":
                out = self._round(meta, arrays)
            elif cmd == "finish":
                out = self._finish(meta, arrays)
            elif cmd == "archive":
                out = self._archive(meta)
            elif cmd == "ping":
                out = ({"institution": self.name, "address": self.address}, {})
            else:
                raise InputError(f"unknown command {cmd!r}")
        except FedmdhError as exc:
            log.error("%s %s failed: %s", cmd, meta.get("round", ""), exc)
            return {"error": f"institution {self.name}: {exc}", "institution": self.name}, {}
        except Exception as exc:  # noqa: BLE001 - the coordinator must hear of it, in one line
            log.error("%s failed:\n%s", cmd, traceback.format_exc())
            return {"error": f"institution {self.name}: {type(exc).__name__}: {exc}", "institution": self.name}, {}
        reply, reply_arrays = out
        reply.setdefault("institution", self.name)
        reply["seconds"] = time.perf_counter() - t0
        task = self.tasks.get(str(meta.get("task_id")))
        if task is not None and task.new_records:
            reply["transactions"] = list(task.new_records)
            task.new_records.clear()  # the chain's log callback appends to this very list
        return reply, reply_arrays

    def _task(self, meta: Meta) -> NodeTask:
        task = self.tasks.get(str(meta.get("task_id")))
        if task is None:
            raise InputError(f"task {meta.get('task_id')!r} is unknown here (this node did not take part in its "
                             "setup, or restarted since)")
        return task

    # ------------------------------------------------------------------ setup

    def _setup(self, meta: Meta) -> tuple[Meta, Arrays]:
        from fedmdh.data.federation import local_split, setup_summary
        from fedmdh.data.io import load_institution
        from fedmdh.runtime.messages import summary_message

        spec = dict(meta["task"])
        task_id = check_name(str(meta["task_id"]), "task id")
        target = str(spec["target"])
        if target != self.target:
            raise InputError(f"this node serves target {self.target!r}, the task asks for {target!r}")
        exclude = tuple(spec.get("exclude", ())) + self.exclude
        table = load_institution(self.data, target, name=self.name, exclude=exclude)
        test = load_institution(self.test, target, name="test", exclude=exclude) if self.test else None
        if test is not None:
            missing = [c for c in table.features if c not in test.features]
            if missing:
                raise InputError(f"{self.test}: the test set lacks column {missing[0]!r} of {self.data}")
        split = local_split(table, int(spec["first_seed"]), float(spec["val_fraction"]))
        summary = setup_summary(split)
        folder = self.state_dir / "tasks" / task_id
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "task.json", {"task_id": task_id, "task": spec, "institution": self.name,
                                                 "address": self.address})
        self.tasks[task_id] = NodeTask(task_id, spec, folder, table, split, test, summary)
        m, a = summary_message(summary)
        log.info("task %s: setup, %d rows, %d columns", task_id, table.n_rows, len(table.features))
        return {**m, "address": self.address, "has_test": test is not None}, a

    # ------------------------------------------------------------------ rounds

    def _start(self, task: NodeTask, meta: Meta, arrays: Arrays) -> Meta:
        """Round 1's preamble: pool the setup, build the data and the algorithm, check the contract, register."""
        from fedmdh.algorithms.base import FederationSpec
        from fedmdh.config import ExperimentConfig
        from fedmdh.data.federation import institution_data, label_histogram, pool_setup
        from fedmdh.ledger.blobs import sha256_hex
        from fedmdh.runtime.coordinator import deployed_task_manifest
        from fedmdh.runtime.messages import setup_hash, setup_record, summaries_from, summary_message
        from fedmdh.runtime.protocol import ClientSlot, Selection, initial_state

        summaries = summaries_from(meta, arrays)
        mine = [s for s in summaries if s.institution == self.name]
        if len(mine) != 1:
            raise InputError("the setup relayed by the coordinator does not contain this institution")
        if not _same_message(summary_message(mine[0]), summary_message(task.summary)):
            raise InputError("the setup relayed by the coordinator alters this institution's summary")
        setup = pool_setup(summaries)
        if meta.get("setup_sha256") and meta["setup_sha256"] != setup_hash(setup):
            raise InputError("the coordinator's setup hash differs from the one pooled here")
        spec = task.spec_json
        fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"institutions", "test"}
        config = ExperimentConfig(institutions=setup.names, test="", **{k: v for k, v in spec.items() if k in fields})
        algorithm = config.build_algorithm(spec["algorithms"][0])
        data = institution_data(task.split, setup, task.test, config.clip_inputs)
        fspec = FederationSpec.from_setup(setup)
        seed = config.first_seed
        server = initial_state(algorithm, fspec, seed)
        task.setup, task.config, task.algorithm, task.data, task.spec = setup, config, algorithm, data, fspec
        task.server = server
        task.slot = ClientSlot(algorithm, fspec, data, seed)
        task.selection = Selection()
        atomic_write_json(task.folder / "setup.json", setup_record(setup))
        self._connect(task, str(meta["contract"]), meta.get("chain_rpc") or spec.get("chain_rpc"))
        participants = {str(k): str(v) for k, v in dict(meta["participants"]).items()}
        if sorted(participants) != list(setup.names) or participants.get(self.name) != self.address:
            raise InputError("the participants the coordinator names differ from the setup's institutions "
                             "or give this institution another address")
        task.addresses = participants
        c = task.contract.functions
        _, manifest, _ = deployed_task_manifest(config, algorithm, fspec, setup_hash(setup))
        expected = {"target": config.target[:64], "algorithm": algorithm.name[:64], "num_rounds": config.rounds,
                    "initial_state_hash": bytes.fromhex(sha256_hex(manifest))}
        for key, want in expected.items():
            got = getattr(c, key)().call()
            if (bytes(got) != want) if isinstance(want, bytes) else (got != want):
                shown = (lambda v: "0x" + bytes(v).hex()[:16]) if isinstance(want, bytes) else repr
                raise InputError(f"the task contract's {key} is {shown(got)}, this node computes {shown(want)} from "
                                 "the task and its setup; refusing to take part")
        for name, addr in participants.items():
            if not c.allowed(addr).call():
                raise InputError(f"{name}'s address {addr} is not on the task contract's allowlist")
        if int(c.quorum().call()) * 2 <= len(participants):
            raise InputError(f"the task contract's quorum {c.quorum().call()} is not a majority of the "
                             f"{len(participants)} participants; refusing to take part")
        if not c.registered(self.address).call():
            task.chain.transact(self.account, "register", task.contract.address,
                                _call("register", self.name[:64]), gas=_gas("register"), actor=self.name)
        self._wait(task, lambda: c.participant_count().call() >= len(setup.names),
                   "every institution to register")
        for name, addr in participants.items():
            if c.participant_name(addr).call() != name[:64]:
                raise InputError(f"the address given for {name} registered as {c.participant_name(addr).call()!r}")
        lo, hi = setup.label_range
        return {"histogram": [int(v) for v in label_histogram(task.table.y, lo, hi)]}

    def _round(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.messages import update_meta

        task = self._task(meta)
        rnd = int(meta["round"])
        reply: Meta = {}
        if rnd == 1:
            reply.update(self._start(task, meta, arrays))
        else:
            reply.update(self._close_round(task, rnd - 1, meta, arrays))
        if rnd != task.round + 1:
            raise InputError(f"asked for round {rnd}; this node's last committed round is {task.round}")
        update = self._train(task, rnd)
        finalized_prev = rnd - 1
        if finalized_prev >= 1:
            self._wait_finalized(task, finalized_prev)
        self._commit(task, rnd, update)
        self._persist(task)
        reply.update(update_meta(update))
        return reply, {f"u/{self.name}/{k}": np.asarray(v) for k, v in update.payload.items()}

    def _finish(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        task = self._task(meta)
        last = int(meta["round"])
        if last != task.round:
            raise InputError(f"asked to finish round {last}; this node's last committed round is {task.round}")
        reply = self._close_round(task, last, meta, arrays)
        self._wait_finalized(task, last)
        files = self._save_final_model(task)
        self._persist(task)
        kept = task.selection.kept[self.name]
        reply.update({"kept_round": kept.round, "kept_metrics": kept.metrics, "model_files": files})
        return reply, {}

    def _archive(self, meta: Meta) -> tuple[Meta, Arrays]:
        task = self._task(meta)
        manifest = meta["manifest"]
        mine = {rel: h for rel, h in manifest["files"].items() if rel.startswith(f"models/{self.name}/")}
        own = self._model_hashes(task)
        if mine != own:
            raise InputError("the archive manifest's entries for this institution differ from its model files")
        body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        digest = hashlib.sha256(body).hexdigest()
        if digest != meta.get("manifest_sha256"):
            raise InputError("the archive manifest's sha256 is not the one the coordinator announced")
        task.chain.transact(self.account, "attest_model", task.contract.address,
                            _call("attest_model", bytes.fromhex(digest)), gas=_gas("attest_model"), actor=self.name)
        atomic_write_bytes(task.folder / "archive-manifest.json", body)
        return {"attested": digest}, {}

    # ------------------------------------------------------------------ the round's steps

    def _close_round(self, task: NodeTask, rnd: int, meta: Meta, arrays: Arrays) -> Meta:
        """Check round ``rnd``'s updates against the chain, aggregate, attest, evaluate, select."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import sha256_hex
        from fedmdh.runtime.messages import updates_from
        from fedmdh.runtime.protocol import aggregate_rng, evaluate_round

        if task.server is None:
            raise InputError("round 1 never reached this node for this task")
        updates = updates_from(meta, arrays)
        c = task.contract.functions
        committed = int(c.commit_count(rnd).call())
        if len(updates) != committed:
            raise InputError(f"round {rnd}: {len(updates)} updates relayed, {committed} committed on chain")
        names = {u.institution for u in updates}
        if self.name not in names:
            raise InputError(f"round {rnd}: the relayed updates lack this institution's own")
        for u in updates:
            addr = task.addresses.get(u.institution)
            if addr is None:
                raise InputError(f"round {rnd}: an update from {u.institution!r}, who is not a participant")
            on_chain = bytes(c.update_hash(rnd, addr).call()).hex()
            if sha256_hex(codec.encode_update(u)) != on_chain:
                raise InputError(f"round {rnd}: the update relayed for {u.institution} is not the one it committed "
                                 f"(sha256 {sha256_hex(codec.encode_update(u))[:16]}, on chain {on_chain[:16]})")
        seed = task.config.first_seed
        task.server = task.algorithm.aggregate(task.server, updates, aggregate_rng(seed, rnd), rnd)
        agg_hash = sha256_hex(codec.encode_payload(task.server))
        task.pending_hash = agg_hash
        task.chain.transact(self.account, "attest", task.contract.address,
                            _call("attest", rnd, bytes.fromhex(agg_hash)),
                            gas=_gas("attest") + 12_000 * len(task.setup.names), actor=self.name, round=rnd)
        client = task.slot.get()
        params = task.algorithm.personal_params(task.server, client)
        metrics, changed = evaluate_round(task.algorithm, task.selection, self.name, rnd,
                                          {k: np.array(v) for k, v in params.items()}, task.data, task.setup.scaler,
                                          task.test.y if task.test is not None else np.zeros(0))
        if changed:
            self._save_model(task, task.folder / "best", task.selection.kept[self.name])
        return {"eval_round": rnd, "eval": metrics, "aggregate_sha256": agg_hash}

    def _train(self, task: NodeTask, rnd: int):
        from fedmdh.runtime.protocol import client_rng

        update, client = task.algorithm.client_update(task.server, task.slot.get(), task.data,
                                                      client_rng(task.config.first_seed, rnd, self.name), rnd)
        task.slot.put(client)
        return update

    def _commit(self, task: NodeTask, rnd: int, update) -> None:
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore

        blob = codec.encode_update(update)
        digest = DirBlobStore(task.folder / "blobs").put(blob)
        _, flat = codec.flatten(codec.onchain_vectors(task.algorithm, update))
        data = _call("commit", rnd, bytes.fromhex(digest), int(update.num_examples), codec.pack(codec.to_fixed(flat)))
        task.chain.transact(self.account, "commit", task.contract.address, data,
                            gas=_gas("commit") + 30_000 * flat.size, actor=self.name, round=rnd)
        task.round = rnd

    def _wait_finalized(self, task: NodeTask, rnd: int) -> None:
        c = task.contract.functions
        empty = bytes(32)
        self._wait(task, lambda: bytes(c.finalized_hash(rnd).call()) != empty or c.failed().call(),
                   f"round {rnd} to be finalized")
        if c.failed().call():
            raise InputError(f"round {rnd} failed on chain: no quorum attested one aggregate")
        final = bytes(c.finalized_hash(rnd).call()).hex()
        if final != task.pending_hash:
            raise InputError(f"round {rnd}: the chain finalized aggregate {final[:16]}, not the {task.pending_hash[:16]} "
                             "computed here; this node stops (it would continue from an aggregate no quorum agreed on)")

    def _wait(self, task: NodeTask, done, what: str) -> None:
        limit = float(task.spec_json.get("wait_s", DEFAULT_WAIT_S))
        t_end = time.monotonic() + limit
        while not done():
            if time.monotonic() > t_end:
                raise InputError(f"gave up after {limit:.0f} s waiting for {what}")
            time.sleep(POLL_S)

    def _connect(self, task: NodeTask, address: str, rpc_url: str | None) -> None:
        from fedmdh.ledger.artifacts import load_artifact
        from fedmdh.ledger.chain import Chain

        url = self.chain_rpc or rpc_url
        if not url:
            raise InputError("no chain node: the task names none and this node was started without --chain-rpc")
        chain = Chain.rpc(url)
        chain.open_log(task.folder / "transactions.jsonl")
        chain.on_record = task.new_records.append
        code = bytes(chain.w3.eth.get_code(chain.w3.to_checksum_address(address))).hex()
        if code != load_artifact()["bytecode_runtime"].removeprefix("0x"):
            raise InputError(f"the contract at {address} is not fedmdh's task contract (its code differs)")
        task.chain, task.contract = chain, chain.contract(address)

    # ------------------------------------------------------------------ models and state

    def _save_model(self, task: NodeTask, folder: Path, kept) -> None:
        from fedmdh.experiment.models import save_model

        def build(tmp: Path) -> None:
            save_model(tmp, task.data, task.algorithm.name, task.config.hidden, task.setup.scaler, kept.params,
                       info={"best_round": kept.round, "seed": task.config.first_seed, "target": task.config.target,
                             "hyperparameters": task.algorithm.hyperparameters(), "task": task.task_id})

        replace_dir(folder, build)

    def _save_final_model(self, task: NodeTask) -> dict[str, str]:
        self._save_model(task, task.folder / "models" / self.name, task.selection.kept[self.name])
        return self._model_hashes(task)

    def _model_hashes(self, task: NodeTask) -> dict[str, str]:
        root = task.folder / "models" / self.name
        return {f"models/{self.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.iterdir()) if p.is_file()}

    def _persist(self, task: NodeTask) -> None:
        """Client state and the current aggregate as one file, written atomically."""
        import io

        buf = io.BytesIO()
        np.savez(buf, **{f"client/{k}": v for k, v in task.slot.arrays.items()},
                 **{f"server/{k}": np.asarray(v) for k, v in task.server.items()})
        atomic_write_bytes(task.folder / "state.npz", buf.getvalue(), mode=0o600)
        atomic_write_json(task.folder / "progress.json", {"round": task.round})


def _same_message(a: tuple[Meta, Arrays], b: tuple[Meta, Arrays]) -> bool:
    (ma, aa), (mb, ab) = a, b
    return (json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True) and sorted(aa) == sorted(ab)
            and all(np.asarray(aa[k]).tobytes() == np.asarray(ab[k]).tobytes() for k in aa))


def _call(fn: str, *args: Any) -> bytes:
    from fedmdh.ledger.artifacts import call_data

    return call_data(fn, *args)


def _gas(fn: str) -> int:
    from fedmdh.ledger.chain import GAS

    return GAS[fn]
