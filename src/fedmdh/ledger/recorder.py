"""Recording a run on the ledger: the simulator's round hook, and the archive of the final models.

Per round, every institution (with its own key) commits the sha256 of its canonical update, its
sample count and its small on-chain vector; the contract computes the vectors' weighted mean. Every
institution then attests the sha256 of the aggregate; the round finalizes when a quorum agrees, and
the aggregate returned to the simulator is the finalized one. Blobs (updates, aggregates, the initial
state, model files) go to the content-addressed store; the signed transactions and receipts go to
``ledger/transactions.jsonl``; ``ledger/task.json`` says where the task lives.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from eth_account.signers.local import LocalAccount

from fedmdh.algorithms.base import Algorithm, Payload, Update
from fedmdh.errors import InputError
from fedmdh.ledger import codec
from fedmdh.ledger.artifacts import call_data, load_artifact
from fedmdh.ledger.blobs import BlobStore, DirBlobStore, sha256_hex
from fedmdh.ledger.chain import GAS, GAS_PER_PARTICIPANT, GAS_PER_VALUE, Chain
from fedmdh.ledger.errors import LedgerError
from fedmdh.ledger.events import decode_logs
from fedmdh.ledger.keys import (PASSPHRASE_ENV, KeystoreSettings, check_key_names, default_keystore,
                                embedded_keystore, key_file_name, load_or_create)
from fedmdh.ledger.options import LedgerOptions

SUBMITTER = "submitter"
TASK_FILE = "task.json"
TX_FILE = "transactions.jsonl"
TASK_MANIFEST_KIND = "fedmdh-task/1"
#: files of a run folder archived with its models (hashed into the archive's manifest) when present
RUN_FILES = ("final_metrics.json", "metrics.jsonl", "federation.json")

#: (institution, round, honest aggregate hash) -> the hash it attests; tests use it to play a dishonest peer
AttestHook = Callable[[str, int, bytes], bytes]


def keystore_settings(options: LedgerOptions, ledger_dir: Path | None = None) -> KeystoreSettings:
    """Where the keys of a run live: outside the run folder (see :mod:`fedmdh.ledger.keys`)."""
    if options.mode == "embedded" and options.keystore is None:
        # throwaway accounts of an in-process chain: cheap KDF, passphrase optional
        env_iter = os.environ.get("FEDMDH_KEY_KDF_ITERATIONS")
        return KeystoreSettings(
            embedded_keystore(),
            kdf=os.environ.get("FEDMDH_KEY_KDF", "pbkdf2"),
            iterations=int(env_iter) if env_iter else 1000,
            passphrase=os.environ.get(PASSPHRASE_ENV, ""),
            allow_empty_passphrase=True,
        )
    return KeystoreSettings.from_env(options.keystore or default_keystore())


#: ``signers`` of a task manifest: one process held every key (the simulator's ledger), or each
#: institution signed on its own node (a deployed task)
ONE_PARTY_SIGNERS = "one party"
OWN_NODE_SIGNERS = "each institution on its own node"


def task_manifest(algorithm: Algorithm, initial_state_hash: str, layout: Sequence[tuple[str, int]],
                  config_sha256: str | None, archive: bool, signers: str = ONE_PARTY_SIGNERS,
                  extra: Mapping[str, Any] | None = None) -> bytes:
    """The blob whose sha256 the contract records as the task's ``initial_state_hash``.

    It names the initial state (by its sha256) and commits what the contract cannot hold: the
    algorithm's hyperparameters, the sha256 of the run's config.toml, the on-chain vector layout,
    whether the task ends with an archived model, and who held the signing keys (``extra``: more
    of what the task fixed, e.g. a deployed task's setup hash).
    """
    return json.dumps({
        **dict(extra or {}),
        "kind": TASK_MANIFEST_KIND,
        "initial_state": initial_state_hash,
        "algorithm": algorithm.name,
        "hyperparameters": json.loads(json.dumps(algorithm.hyperparameters(), default=str)),
        "config_sha256": config_sha256,
        "vector_layout": [[n, int(s)] for n, s in layout],
        "archive": bool(archive),
        "signers": signers,
    }, sort_keys=True, indent=1).encode("utf-8")


@dataclass
class RoundCost:
    round: int
    seconds: float
    gas: int
    transactions: int


@dataclass
class LedgerRecorder:
    """Records one task; use :meth:`round_hook` as the simulator's ``round_hook``."""

    chain: Chain
    ledger_dir: Path
    blobs: BlobStore
    algorithm: Algorithm
    accounts: Mapping[str, LocalAccount]
    submitter: LocalAccount
    target: str
    rounds: int
    initial_state: Payload
    quorum: int | None = None
    seed: int = 0
    attest_hook: AttestHook | None = None
    config_path: str | None = None
    address: str | None = None
    costs: list[RoundCost] = field(default_factory=list)
    setup_seconds: float = 0.0
    setup_gas: int = 0
    pipeline: bool = True
    archive: bool = True
    _layout: list[tuple[str, int]] | None = None
    _worker: ThreadPoolExecutor | None = None
    _inflight: tuple[int, bytes, Future] | None = None

    # ------------------------------------------------------------ task creation

    def _deploy(self, updates: Sequence[Update]) -> None:
        t0 = time.perf_counter()
        names = [u.institution for u in updates]
        missing = [n for n in names if n not in self.accounts]
        if missing:
            raise LedgerError(f"no account for institution(s) {missing}.")
        layout, _ = codec.flatten(codec.onchain_vectors(self.algorithm, updates[0]))
        self._layout = layout
        vector_len = sum(s for _, s in layout)
        quorum = self.quorum or len(names) // 2 + 1
        init_hash = self.blobs.put(codec.encode_payload(self.initial_state))
        config_sha = (sha256_hex((self.ledger_dir / self.config_path).read_bytes())
                      if self.config_path and (self.ledger_dir / self.config_path).is_file() else None)
        manifest_hash = self.blobs.put(task_manifest(self.algorithm, init_hash, layout, config_sha, self.archive))
        self.chain.fund([self.submitter.address] + [self.accounts[n].address for n in names])
        data = self.chain.deploy_data(
            self.target[:64], self.algorithm.name[:64], self.rounds, quorum, vector_len,
            bytes.fromhex(manifest_hash), [self.accounts[n].address for n in names], 0,
        )
        sent = self.chain.transact(self.submitter, "deploy", None, data, gas=GAS["deploy"], actor=SUBMITTER)
        self.address = sent.receipt["contractAddress"]
        contract = self.chain.contract(self.address)
        task = {
            "format": "fedmdh-ledger/1",
            "chain": self.chain.kind,
            "rpc_url": self.chain.url,
            "chain_id": self.chain.chain_id,
            "contract": self.address,
            "contract_artifact_sha256": load_artifact()["source_sha256"],
            "submitter": self.submitter.address,
            "participants": {n: self.accounts[n].address for n in names},
            "algorithm": self.algorithm.name,
            "hyperparameters": self.algorithm.hyperparameters(),
            "target": self.target,
            "rounds": self.rounds,
            "seed": self.seed,
            "quorum": quorum,
            "vector_layout": layout,
            "fixed_point_scale": codec.SCALE,
            "initial_state": init_hash,
            "task_manifest": manifest_hash,
            "config": self.config_path,
            "blobs": "blobs",
            "transactions": TX_FILE,
        }
        (self.ledger_dir / TASK_FILE).write_text(json.dumps(task, indent=2, default=str), encoding="utf-8")
        regs = self.chain.submit([
            (self.accounts[n], "register", self.address, call_data("register", n[:64]),
             {"gas": GAS["register"], "actor": n})
            for n in names
        ])
        self._contract = contract
        self.setup_gas = sent.record["gas_used"] + sum(s.record["gas_used"] for s in regs)
        self.setup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------ rounds

    def round_hook(self, rnd: int, updates: Sequence[Update], aggregate: Payload) -> Payload:
        """Commit, aggregate on chain, attest, finalize; return the aggregate the round finalized.

        Pipelined (the default), the round's chain work runs on a worker thread while the next
        round trains from the aggregate computed here; the next call (or :meth:`flush`) checks that
        the chain finalized exactly that aggregate and stops the run with :class:`LedgerError` if
        not. Unpipelined, each round waits for its finalization and returns the finalized aggregate.
        """
        t0 = time.perf_counter()
        updates = sorted(updates, key=lambda u: u.institution)
        if self.address is None:
            self._deploy(updates)
        self.flush()
        commits = []
        for u in updates:
            digest = self.blobs.put(codec.encode_update(u))
            layout, flat = codec.flatten(codec.onchain_vectors(self.algorithm, u))
            if layout != self._layout:
                raise LedgerError(
                    f"round {rnd}, institution {u.institution}: on-chain vector layout {layout} differs from the "
                    f"task's {self._layout}."
                )
            data = call_data("commit", rnd, bytes.fromhex(digest), int(u.num_examples), codec.pack(codec.to_fixed(flat)))
            gas = GAS["commit"] + GAS_PER_VALUE * flat.size
            commits.append((self.accounts[u.institution], "commit", self.address, data,
                            {"gas": gas, "actor": u.institution, "round": rnd}))
        agg_hash = bytes.fromhex(self.blobs.put(codec.encode_payload(aggregate)))
        names = [u.institution for u in updates]
        prep = time.perf_counter() - t0
        if not self.pipeline:
            finalized = self._chain_round(rnd, commits, names, agg_hash, prep)
            if finalized == agg_hash:
                return aggregate
            return codec.decode_payload(self.blobs.get(finalized.hex()))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmdh-ledger")
        self._inflight = (rnd, agg_hash, self._worker.submit(self._chain_round, rnd, commits, names, agg_hash, prep))
        return aggregate

    def _chain_round(self, rnd: int, commits: list, names: list[str], agg_hash: bytes, prep: float) -> bytes:
        """Send a round's commitments, then its attestations; return the finalized aggregate hash."""
        t0 = time.perf_counter()
        sent = self.chain.submit(commits)
        attests = []
        for name in names:
            h = self.attest_hook(name, rnd, agg_hash) if self.attest_hook else agg_hash
            attests.append((self.accounts[name], "attest", self.address, call_data("attest", rnd, h),
                            {"gas": GAS["attest"] + GAS_PER_PARTICIPANT * len(names), "actor": name, "round": rnd}))
        sent += self.chain.submit(attests)
        finalized = None
        for event, args in decode_logs(sent[-1].record["logs"]):
            if event == "RoundFailed":
                raise LedgerError(
                    f"round {rnd} did not finalize: at most {args['best_votes']} of {len(names)} participants "
                    f"attested the same aggregate, the quorum is {contract_quorum(self)}."
                )
            if event == "RoundFinalized":
                finalized = bytes.fromhex(args["aggregate_hash"][2:])
        if finalized is None:
            raise LedgerError(f"round {rnd}: the last attestation did not close the round.")
        self.costs.append(RoundCost(rnd, prep + time.perf_counter() - t0, sum(s.record["gas_used"] for s in sent),
                                    len(sent)))
        return finalized

    def flush(self) -> None:
        """Wait for the round in flight; raise if it failed or finalized another aggregate than ours."""
        if self._inflight is None:
            return
        rnd, agg_hash, future = self._inflight
        self._inflight = None
        finalized = future.result()
        if finalized != agg_hash:
            raise LedgerError(
                f"round {rnd} finalized the aggregate {finalized.hex()}, which a quorum attested, not the "
                f"{agg_hash.hex()} computed here; the run stops (the next round had started from this process's "
                "aggregate). Run with LedgerOptions(pipeline=False) to continue from the finalized aggregate."
            )

    # ------------------------------------------------------------ archive

    def archive_models(self, models_dir: str | Path, model_hash_hook: Callable[[str, str], str] | None = None,
                       run_files: Sequence[str | Path] = ()) -> str:
        """Store every file under ``models_dir`` as a blob, have the participants attest the manifest's
        hash, and archive it (hash + locator). Returns the manifest's sha256.

        ``run_files`` (files beside ``models_dir``: the run's metrics) are stored and hashed into the
        manifest too, under ``run_files``, so that ``verify`` covers them; ``model get`` leaves them.
        """
        if self.address is None:
            raise LedgerError("nothing recorded: the task was never created.")
        self.flush()
        root = Path(models_dir)
        files = {p.relative_to(root.parent).as_posix(): self.blobs.put(p.read_bytes())
                 for p in sorted(root.rglob("*")) if p.is_file()}
        extra = {Path(p).name: self.blobs.put(Path(p).read_bytes()) for p in run_files}
        manifest = json.dumps({"kind": "model-archive", "files": files, "run_files": extra}, sort_keys=True,
                              indent=1).encode("utf-8")
        digest = self.blobs.put(manifest)
        items = []
        for name, acct in sorted(self.accounts.items()):
            h = model_hash_hook(name, digest) if model_hash_hook else digest
            items.append((acct, "attest_model", self.address, call_data("attest_model", bytes.fromhex(h)),
                          {"gas": GAS["attest_model"], "actor": name}))
        self.chain.submit(items)
        locator = self.blobs.locator(digest)[:256]
        self.chain.transact(self.submitter, "archive", self.address,
                            call_data("archive", bytes.fromhex(digest), locator),
                            gas=GAS["archive"], actor=SUBMITTER)
        return digest

    def close(self) -> None:
        """Let the round in flight finish (its transactions are logged), then close the log; raises nothing."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._inflight = None
        self.chain.close()

    def summary(self) -> dict[str, Any]:
        n = max(len(self.accounts), 1)
        secs = [c.seconds for c in self.costs]
        gas = [c.gas for c in self.costs]
        return {
            "rounds": len(self.costs),
            "participants": n,
            "ms_per_participant_round": 1000 * float(np.mean(secs)) / n if secs else float("nan"),
            "gas_per_round": float(np.mean(gas)) if gas else float("nan"),
            "gas_per_participant_round": float(np.mean(gas)) / n if gas else float("nan"),
            "setup_seconds": self.setup_seconds,
            "setup_gas": self.setup_gas,
        }


def contract_quorum(rec: LedgerRecorder) -> int:
    return int(rec._contract.functions.quorum().call())


def open_ledger(
    options: LedgerOptions,
    ledger_dir: str | Path,
    algorithm: Algorithm,
    participants: Sequence[str],
    target: str,
    rounds: int,
    initial_state: Payload,
    config_path: str | None = None,
    attest_hook: AttestHook | None = None,
    chain: Chain | None = None,
    seed: int = 0,
    archive: bool = True,
) -> LedgerRecorder | None:
    """A recorder for one task (``None`` when ``options.mode == "off"``).

    Keys are loaded (or created) now, so a passphrase prompt comes before training starts; the
    contract is deployed with the first round, when the on-chain vector's size is known.
    ``archive``: the task ends with :meth:`LedgerRecorder.archive_models` (committed at creation,
    so that ``verify`` calls a task without its archive incomplete).
    """
    if options.mode == "off":
        return None
    ledger_dir = Path(ledger_dir)
    if (ledger_dir / TX_FILE).exists():
        raise InputError(f"{ledger_dir} already holds a ledger; choose a new --out folder.")
    names = sorted(participants)
    check_key_names(names)
    if key_file_name(SUBMITTER) in {key_file_name(n) for n in names}:
        raise InputError(f"an institution named like {SUBMITTER!r} would share the task submitter's signing key "
                         f"(keystore file {key_file_name(SUBMITTER)}); rename its file.")
    ledger_dir.mkdir(parents=True, exist_ok=True)
    settings = keystore_settings(options, ledger_dir)
    accounts = {n: load_or_create(n, settings) for n in names}
    submitter = load_or_create(SUBMITTER, settings)
    if chain is None:
        if options.mode == "rpc":
            chain = Chain.rpc(options.rpc_url)
        else:  # pipelined, the embedded chain runs in a process of its own so that its work overlaps training
            chain = Chain.embedded_process() if options.pipeline else Chain.embedded()
    chain.open_log(ledger_dir / TX_FILE)
    return LedgerRecorder(
        chain=chain, ledger_dir=ledger_dir, blobs=DirBlobStore(ledger_dir / "blobs"), algorithm=algorithm,
        accounts=accounts, submitter=submitter, target=target, rounds=rounds, initial_state=initial_state,
        quorum=options.quorum, seed=seed, attest_hook=attest_hook, config_path=config_path, pipeline=options.pipeline,
        archive=archive,
    )
