"""The coordinator of a deployed task: relays messages, holds no key of an institution and no row.

It drives the protocol of :mod:`fedmdh.runtime.node` over any :class:`Transport` (Flower's Grid in
:mod:`fedmdh.runtime.flower.server_app`, or direct calls in tests):

1. ``setup`` to every node; their summaries are pooled (the union feature space, the scaler);
2. the task contract is created on chain with the institutions' addresses as its allowlist, the
   initial state's hash and the task's settings (by the coordinator's own account, which can
   only relay: every commitment and attestation needs an institution's signature);
3. ``round 1`` carries every summary (each node pools them itself and checks the contract);
   ``round r`` carries the updates committed in round ``r - 1``; the replies carry round ``r``'s
   updates and each institution's metrics of round ``r - 1``;
4. ``finish`` closes the last round; ``archive`` has the institutions attest the manifest of their
   model files' hashes, which the coordinator then archives.

It writes what ``fedmdh run`` writes (``config.toml``, ``federation.json``, ``metrics.jsonl``,
``final_metrics.json``, ``run.log`` and ``ledger/`` with the task, every transaction the
institutions signed, and the blobs: initial state, updates, aggregates, manifest), so that
``fedmdh ledger verify`` works on a deployed run. Models stay with the institutions.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmdh import __version__
from fedmdh.errors import FedmdhError, InputError
from fedmdh.ledger.recorder import SUBMITTER

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]
Message = tuple[Meta, Arrays]


class TaskError(FedmdhError):
    """The task stopped: the message names the step and the institutions concerned."""


class Transport(Protocol):
    """How the coordinator reaches the nodes."""

    def wait_nodes(self, count: int, timeout: float) -> list[Any]:
        """Handles of at least ``count`` connected nodes (raise :class:`TaskError` after ``timeout``)."""
        ...

    def exchange(self, requests: Mapping[Any, Message], timeout: float) -> dict[Any, Message]:
        """Send one message to each node and return each one's reply (an ``{"error": ...}`` reply
        for a node that did not answer in time)."""
        ...


#: settings of a deployed task besides the experiment's own (see :class:`DeployTask`)
DEPLOY_KEYS = ("task_id", "min_nodes", "chain_rpc", "out_dir", "keystore", "wait_s", "quorum")


@dataclass(frozen=True)
class DeployTask:
    """A task to deploy: the experiment's settings and where the coordinator records it.

    ``experiment`` holds :class:`~fedmdh.config.ExperimentConfig`'s fields except the institution
    files and the test file, which the nodes hold (one algorithm, one seed).
    """

    task_id: str
    experiment: Mapping[str, Any]
    min_nodes: int
    chain_rpc: str
    out_dir: str
    keystore: str | None = None
    wait_s: float = 600.0
    quorum: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "experiment": dict(self.experiment), "min_nodes": self.min_nodes,
                "chain_rpc": self.chain_rpc, "out_dir": self.out_dir, "keystore": self.keystore,
                "wait_s": self.wait_s, "quorum": self.quorum}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DeployTask":
        return cls(task_id=str(d["task_id"]), experiment=dict(d["experiment"]), min_nodes=int(d["min_nodes"]),
                   chain_rpc=str(d["chain_rpc"]), out_dir=str(d["out_dir"]), keystore=d.get("keystore"),
                   wait_s=float(d.get("wait_s", 600.0)), quorum=d.get("quorum"))

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
        return cfg

    @property
    def algorithm(self) -> str:
        return str(self.experiment["algorithms"][0])

    def node_task(self) -> dict[str, Any]:
        """What the nodes are told at setup: the experiment's settings, the chain, the patience."""
        return {**dict(self.experiment), "chain_rpc": self.chain_rpc, "wait_s": self.wait_s}


def experiment_settings(cfg) -> dict[str, Any]:
    """An ExperimentConfig's fields as JSON for :class:`DeployTask` (institutions and test left out)."""
    from dataclasses import asdict

    d = asdict(cfg)
    for k in ("institutions", "test"):
        d.pop(k)
    d["algorithm_settings"] = {k: dict(v) for k, v in d["algorithm_settings"].items()}
    return json.loads(json.dumps(d))


@dataclass
class _Round:
    updates: list[Any] = field(default_factory=list)
    t0: float = 0.0


class Coordinator:
    """Runs one deployed task over ``transport``; see the module docstring."""

    def __init__(self, task: DeployTask, transport: Transport, on_round: Callable[[Any], None] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.task = task
        self.transport = transport
        self.on_round = on_round
        self.say = say or (lambda line: None)
        self.out = Path(task.out_dir)
        self.names: dict[Any, str] = {}
        self.log_lines: list[str] = []

    # ------------------------------------------------------------------ helpers

    def _exchange(self, step: str, requests: Mapping[Any, Message]) -> dict[str, Message]:
        return self._check(self.transport.exchange(requests, timeout=self.task.wait_s + 60.0), step)

    def _record_transactions(self, replies: Mapping[str, Message], own: list[dict[str, Any]] | None = None) -> None:
        recs = [r for _, (meta, _) in sorted(replies.items()) for r in meta.get("transactions", [])]
        recs += own or []
        recs.sort(key=lambda r: (r.get("block") is None, r.get("block") or 0))
        with (self.ledger_dir / "transactions.jsonl").open("a", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ the task

    def run(self) -> dict[str, Any]:
        """Run the task to the end; returns the final metrics (also written to ``final_metrics.json``)."""
        from fedmdh.runtime.messages import summary_from

        from fedmdh.runtime.protocol import use_training_threads

        use_training_threads()  # it recomputes aggregates: the nodes' bits (torch and BLAS)
        task = self.task
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger_dir = self.out / "ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        task.config()  # validate the settings before anyone works
        nodes = self.transport.wait_nodes(task.min_nodes, timeout=task.wait_s)
        self.say(f"{len(nodes)} nodes connected; setup")
        setup_req = {n: ({"cmd": "setup", "task_id": task.task_id, "task": task.node_task()}, {}) for n in nodes}
        replies = self.transport.exchange(setup_req, timeout=task.wait_s + 60.0)
        for node, (meta, _) in replies.items():
            if "institution" in meta:
                self.names[node] = str(meta["institution"])
        by_name = self._check(replies, "setup")
        summaries = [summary_from(m, a) for m, a in by_name.values()]
        addresses = {name: str(m["address"]) for name, (m, _) in by_name.items()}
        if len(set(self.names.values())) != len(self.names):
            raise TaskError(f"setup failed: two nodes call themselves the same institution: {sorted(self.names.values())}")
        return self._run_rounds(nodes, summaries, addresses, t_start)

    def _check(self, replies: Mapping[Any, Message], step: str) -> dict[str, Message]:
        """The replies by institution; any error reply stops the task, naming every failing institution."""
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

    def _run_rounds(self, nodes: list[Any], summaries: list[Any], addresses: dict[str, str],
                    t_start: float) -> dict[str, Any]:
        from fedmdh.algorithms.base import FederationSpec
        from fedmdh.data.federation import federation_heterogeneity, pool_setup
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore
        from fedmdh.runtime.messages import setup_hash, setup_record, summaries_message, updates_message
        from fedmdh.runtime.protocol import aggregate_rng, initial_state
        from fedmdh.runtime.simulator import RoundRecord

        task = self.task
        setup = pool_setup(summaries)
        names = setup.names
        cfg = task.config(names)
        algorithm = cfg.build_algorithm(task.algorithm)
        spec = FederationSpec.from_setup(setup)
        seed = cfg.first_seed
        server = initial_state(algorithm, spec, seed)
        blobs = DirBlobStore(self.ledger_dir / "blobs")
        init_hash = blobs.put(codec.encode_payload(server))
        setup_blob = blobs.put(json.dumps(setup_record(setup), sort_keys=True, separators=(",", ":")).encode())
        config_bytes, manifest, _ = deployed_task_manifest(cfg, algorithm, spec, setup_hash(setup))
        (self.out / "config.toml").write_bytes(config_bytes)
        manifest_hash = blobs.put(manifest)
        self.log_lines += [f"fedmdh {__version__} on Python {platform.python_version()} (coordinator)",
                           f"task {task.task_id}: algorithm {algorithm.name}, seed {seed}, {cfg.rounds} rounds",
                           f"hyperparameters {algorithm.hyperparameters()}",
                           *(f"{s.institution}: {s.n_train} training rows, {s.n_val} validation rows, "
                             f"{len(s.columns)} columns" for s in sorted(summaries, key=lambda s: s.institution))]
        layout = [tuple(x) for x in json.loads(manifest)["vector_layout"]]
        chain, account, contract = self._create_contract(algorithm, layout, names, addresses, manifest_hash)
        self._write_task_json(chain, account, contract, algorithm, cfg, names, addresses, layout, init_hash,
                              setup_blob, manifest_hash)
        node_of = {name: node for node, name in self.names.items()}
        self.say(f"task contract {contract.address}; round 1 of {cfg.rounds}")

        # round 1: the setup relayed so every node pools it itself
        smeta, sarrays = summaries_message(summaries)
        first = {"cmd": "round", "task_id": task.task_id, "round": 1, "contract": contract.address,
                 "participants": addresses, "setup_sha256": setup_hash(setup), **smeta}
        t0 = time.perf_counter()
        replies = self._exchange("round 1", {node_of[n]: (first, sarrays) for n in names})
        self._record_transactions(replies)
        counts = {n: np.asarray(replies[n][0]["histogram"], dtype=np.int64) for n in names}
        het = federation_heterogeneity(summaries, setup, counts)
        info = het.to_dict()
        info.update(target=cfg.target, union_features=len(setup.features), runtime="flower",
                    nodes={n: addresses[n] for n in names}, setup_sha256=setup_hash(setup))
        (self.out / "federation.json").write_text(json.dumps(info, indent=2, default=float), encoding="utf-8")
        updates = self._updates(replies, blobs)
        history: list[RoundRecord] = []
        metrics_fh = (self.out / "metrics.jsonl").open("w", encoding="utf-8")
        try:
            for r in range(2, cfg.rounds + 2):
                last = r == cfg.rounds + 1
                umeta, uarrays = updates_message(updates)
                server = algorithm.aggregate(server, updates, aggregate_rng(seed, r - 1), r - 1)
                blobs.put(codec.encode_payload(server))
                msg = {"cmd": "finish" if last else "round", "task_id": task.task_id,
                       "round": r - 1 if last else r, **umeta}
                step = "the last round" if last else f"round {r}"
                t_prev, t0 = t0, time.perf_counter()
                replies = self._exchange(step, {node_of[n]: (msg, uarrays) for n in names})
                self._record_transactions(replies)
                record = self._round_record(r - 1, updates, replies, t0 - t_prev, RoundRecord)
                history.append(record)
                metrics_fh.write(json.dumps(_finite(record.to_dict())) + "\n")
                metrics_fh.flush()
                if self.on_round is not None:
                    self.on_round(record)
                if not last:
                    updates = self._updates(replies, blobs)
        finally:
            metrics_fh.close()
        final_replies = replies
        per = {n: dict(final_replies[n][0]["kept_metrics"]) for n in names}
        kept = {n: int(final_replies[n][0]["kept_round"]) for n in names}
        final = {"algorithm": algorithm.name, "seed": seed, "rounds": cfg.rounds, "best_round": max(kept.values()),
                 "best_rounds": kept, "seconds": time.perf_counter() - t_start,
                 **{k: _mean([m.get(k) for m in per.values()]) for k in ("rmse", "mae", "r2")},
                 "per_institution": per, "runtime": "flower", "task_id": task.task_id, "contract": contract.address}
        # written before the archive, which commits their sha256
        (self.out / "final_metrics.json").write_text(json.dumps(_finite(final), indent=2), encoding="utf-8")
        digest = self._archive(chain, account, contract, blobs, final_replies, node_of, names)
        self.log_lines.append(f"ledger (rpc {task.chain_rpc}, contract {contract.address}): {cfg.rounds} rounds "
                              f"finalized; the institutions' models archived as {digest} (held by the institutions)")
        self.log_lines.append(f"finished {cfg.rounds} rounds in {final['seconds']:.1f} s; models kept from rounds "
                              + ", ".join(f"{n} {kept[n]}" for n in names))
        (self.out / "run.log").write_text("\n".join(self.log_lines) + "\n", encoding="utf-8")
        chain.close()
        return final

    # ------------------------------------------------------------------ steps

    def _updates(self, replies: Mapping[str, Message], blobs) -> list[Any]:
        from fedmdh.ledger import codec
        from fedmdh.runtime.messages import updates_from

        ups = []
        for name, (meta, arrays) in sorted(replies.items()):
            (u,) = updates_from({"updates": [meta]}, arrays)
            if u.institution != name:
                raise TaskError(f"the node of {name} returned an update of {u.institution}")
            blobs.put(codec.encode_update(u))
            ups.append(u)
        return ups

    def _round_record(self, rnd: int, updates: list[Any], replies: Mapping[str, Message], seconds: float, cls):
        per = {n: dict(m["eval"]) for n, (m, _) in sorted(replies.items())}
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

    def _create_contract(self, algorithm, layout, names: tuple[str, ...], addresses: Mapping[str, str],
                         manifest_hash: str):
        from fedmdh.ledger.chain import GAS, Chain
        from fedmdh.ledger.keys import KeystoreSettings, load_or_create

        vector_len = sum(n for _, n in layout)
        keystore = Path(self.task.keystore) if self.task.keystore else Path.home() / ".fedmdh" / "keystore"
        account = load_or_create("coordinator", KeystoreSettings.from_env(keystore))
        chain = Chain.rpc(self.task.chain_rpc)
        chain.open_log(self.ledger_dir / ".coordinator-transactions.jsonl")
        own: list[dict[str, Any]] = []
        chain.on_record = own.append
        chain.fund([account.address] + [addresses[n] for n in names])
        quorum = self.task.quorum or len(names) // 2 + 1
        data = chain.deploy_data(self.task.experiment["target"][:64], algorithm.name[:64],
                                 int(self.task.experiment["rounds"]), quorum, vector_len,
                                 bytes.fromhex(manifest_hash), [addresses[n] for n in names])
        sent = chain.transact(account, "deploy", None, data, gas=GAS["deploy"], actor=SUBMITTER)
        contract = chain.contract(sent.receipt["contractAddress"])
        self._record_transactions({}, [r for r in own if r.get("fn") != "transfer"])
        own.clear()
        self._own_records = own
        self._quorum = quorum
        return chain, account, contract

    def _write_task_json(self, chain, account, contract, algorithm, cfg, names, addresses, layout, init_hash,
                         setup_blob, manifest_hash) -> None:
        from fedmdh.ledger import codec
        from fedmdh.ledger.artifacts import load_artifact

        doc = {
            "format": "fedmdh-ledger/1",
            "runtime": "flower",
            "task_id": self.task.task_id,
            "chain": "rpc",
            "rpc_url": self.task.chain_rpc,
            "chain_id": chain.chain_id,
            "contract": contract.address,
            "contract_artifact_sha256": load_artifact()["source_sha256"],
            "submitter": account.address,
            "participants": {n: addresses[n] for n in names},
            "algorithm": algorithm.name,
            "hyperparameters": algorithm.hyperparameters(),
            "target": cfg.target,
            "rounds": cfg.rounds,
            "seed": cfg.first_seed,
            "quorum": self._quorum,
            "vector_layout": [[n, int(k)] for n, k in layout],
            "fixed_point_scale": codec.SCALE,
            "initial_state": init_hash,
            "task_manifest": manifest_hash,
            "setup": setup_blob,
            "config": "../config.toml",
            "blobs": "blobs",
            "transactions": "transactions.jsonl",
            "signing": "each institution signs with its own key on its own node; the coordinator's key created "
                       "the task contract and archives the model manifest the institutions attested",
        }
        (self.ledger_dir / "task.json").write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")

    def _archive(self, chain, account, contract, blobs, replies: Mapping[str, Message], node_of, names) -> str:
        import hashlib

        from fedmdh.ledger.artifacts import call_data
        from fedmdh.ledger.chain import GAS

        files: dict[str, str] = {}
        for n in names:
            files.update(replies[n][0]["model_files"])
        from fedmdh.ledger.audit import HELD_BY_INSTITUTIONS

        run_files = {name: blobs.put((self.out / name).read_bytes())
                     for name in ("final_metrics.json", "metrics.jsonl", "federation.json")}
        manifest = {"kind": "model-archive", "files": dict(sorted(files.items())), "run_files": run_files,
                    "held_by": HELD_BY_INSTITUTIONS}
        body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        digest = blobs.put(body)
        assert digest == hashlib.sha256(body).hexdigest()
        msg = {"cmd": "archive", "task_id": self.task.task_id, "manifest": manifest, "manifest_sha256": digest}
        replies = self._exchange("archive", {node_of[n]: (msg, {}) for n in names})
        self._record_transactions(replies)
        locator = f"held by the institutions; manifest {blobs.locator(digest)}"[:256]
        chain.transact(account, "archive", contract.address, call_data("archive", bytes.fromhex(digest), locator),
                       gas=GAS["archive"], actor=SUBMITTER)
        self._record_transactions({}, list(self._own_records))
        self._own_records.clear()
        return digest


def deployed_task_manifest(cfg, algorithm, spec, setup_sha256: str) -> tuple[bytes, bytes, str]:
    """``(config.toml bytes, task manifest bytes, initial state hash)`` of a deployed task.

    The coordinator records the manifest's sha256 as the contract's ``initial_state_hash``; every
    node recomputes all three from what setup fixed and refuses a contract that differs.
    """
    import tomli_w

    from fedmdh.ledger import codec
    from fedmdh.ledger.blobs import sha256_hex
    from fedmdh.ledger.recorder import OWN_NODE_SIGNERS, task_manifest
    from fedmdh.runtime.protocol import initial_state

    config = tomli_w.dumps(cfg.to_toml_dict()).encode("utf-8")
    init_hash = sha256_hex(codec.encode_payload(initial_state(algorithm, spec, cfg.first_seed)))
    layout = probe_layout(algorithm, spec, cfg.first_seed)
    manifest = task_manifest(algorithm, init_hash, layout, sha256_hex(config), archive=True,
                             signers=OWN_NODE_SIGNERS, extra={"setup_sha256": setup_sha256, "runtime": "flower"})
    return config, manifest, init_hash


def probe_layout(algorithm, spec, seed: int) -> list[tuple[str, int]]:
    """The on-chain vector layout of the algorithm's updates, from one update on synthetic rows.

    The layout (names and sizes of the small vectors the contract averages) depends on the
    algorithm and the federation's shape, not on data, so 16 rows of zeros give it.
    """
    from fedmdh.algorithms.base import Update
    from fedmdh.data.federation import InstitutionData
    from fedmdh.ledger import codec
    from fedmdh.seeding import rng_for

    name = spec.names[0]
    n, d = 16, spec.n_features
    data = InstitutionData(
        name=name, features=tuple(f"f{j}" for j in range(len(spec.feature_idx[name]))),
        feature_idx=np.asarray(spec.feature_idx[name]), X=np.zeros((n, d), np.float32),
        y=np.linspace(-1, 1, n).astype(np.float32), X_val=np.zeros((2, d), np.float32),
        y_val=np.zeros(2, np.float32), X_test=np.zeros((0, d), np.float32), impute_values=np.zeros(d),
    )
    server = algorithm.init(spec, seed)
    upd, _ = algorithm.client_update(server, algorithm.init_client(spec, data, seed), data, rng_for(seed, "probe"), 1)
    layout, _ = codec.flatten(codec.onchain_vectors(algorithm, Update(name, upd.payload, n, upd.metrics)))
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


class DirectTransport:
    """Node services called in this process, one thread each per exchange (tests, benchmarks).

    Each node handles its message concurrently, as real nodes do (a node waits on chain for the
    others' attestations within a message).
    """

    def __init__(self, services: Mapping[str, Any]) -> None:
        self.services = dict(services)

    def wait_nodes(self, count: int, timeout: float) -> list[Any]:
        if len(self.services) < count:
            raise TaskError(f"{len(self.services)} nodes, the task needs {count}")
        return sorted(self.services)

    def exchange(self, requests: Mapping[Any, Message], timeout: float) -> dict[Any, Message]:
        from concurrent.futures import ThreadPoolExecutor

        from fedmdh.runtime.flower.wire import pack, unpack

        def one(node: Any) -> Message:
            meta, arrays = unpack(pack(*requests[node]))  # what crosses the wire, exactly
            return unpack(pack(*self.services[node].handle(meta, arrays)))

        with ThreadPoolExecutor(max_workers=max(1, len(requests))) as pool:
            futures = {node: pool.submit(one, node) for node in requests}
            return {node: f.result() for node, f in futures.items()}
