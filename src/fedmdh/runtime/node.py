"""An institution's node service: its rows, its ledger key, its client state and its models.

``fedmdh node start`` runs one of these on the institution's machine beside a Flower SuperNode;
the SuperNode's ClientApp (:mod:`fedmdh.runtime.flower.client_app`) hands it every message over a
local socket. The service answers these commands of a task (see docs/deployment.md):

``setup``
    Load and validate the institution's table for the task's target, carve its validation split,
    and reply with its setup summary (column names, row counts, sufficient statistics: no row)
    and its ledger address.
``round`` (round ``r``)
    Round 1 brings every institution's setup summary: the node pools them itself (so it does not
    have to trust the coordinator's arithmetic), checks that its own summary is unchanged and that
    the task contract on chain is the shipped one with the task's settings, the task manifest and
    itself on the allowlist, and registers. Later rounds bring the updates committed in round
    ``r - 1`` (and, for a node that missed rounds, the last finalized aggregate): the node checks
    each against its on-chain commitment, recomputes the aggregate with the algorithm's own
    ``aggregate``, attests its hash (if it committed in that round), evaluates its model on its own
    validation rows (selection) and on the test set if it has one (reporting), trains round
    ``r``, commits its update and returns it. The commitment of round ``r`` does not wait for
    round ``r - 1`` to be finalized (the contract takes it once round ``r - 1``'s commitments
    closed); the next message checks that the chain finalized exactly the aggregate computed here,
    and the node stops otherwise.
``finish``
    The last round's aggregate as above; once the chain finalized it, the model the institution
    keeps (its best round on its own validation rows) is written to its state folder; the reply
    carries the files' sha256.
``archive``
    Check the task's archive manifest against its own files and attest the manifest's hash.
``late``
    The task was archived without this institution (its node was down at the end; the contract
    names it missing): catch up from the last finalized aggregate, write the model it keeps and
    add the sha256 of a manifest of its files on chain (``attest_late``, once).
``status``
    What this node holds of a task (its last committed round, the round of the aggregate it holds)
    and, on request, its own committed updates: a new coordinator resumes from these.

Every transaction is signed here, with the institution's own key, after checking on chain that it
is still due (so a message sent again, after a restart of the node or of the coordinator, is
answered from what was done, never done twice). The node's state (client state, current
aggregate, progress, kept model) is written to its state folder atomically before each commitment;
a restarted node reloads it and goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmdh.errors import FedmdhError, InputError, TrainingDiverged
from fedmdh.files import atomic_write_bytes, atomic_write_json, replace_dir
from fedmdh.runtime.round import Aggregation, check_update, train
from fedmdh.secure.dp import private_rng

log = logging.getLogger("fedmdh.node")

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]

#: how long a node waits for the others (registration, a finalization) before it gives up on a step
DEFAULT_WAIT_S = 600.0
POLL_S = 0.02
EMPTY = bytes(32)
#: the ``kind`` of the manifest of a model added after the archive (``attest_late``)
LATE_MODEL_KIND = "model-late"


def check_name(name: str, what: str = "institution name") -> str:
    """Institution names are names: letters, digits, ``-``, ``_`` and ``.``; no path, no ``..``."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or "") or ".." in name:
        raise InputError(f"{what} {name!r} is not a name: use letters, digits, '-', '_' and '.' "
                         "(at most 64, no path separators, no '..').")
    return name


@dataclass
class Progress:
    """What a node has done in a task, saved with its state (one atomic file)."""

    committed: int = 0  # the last round whose update this node committed
    state_round: int = 0  # the round of the aggregate it holds (0: the initial state)
    unconfirmed: dict[int, str] = field(default_factory=dict)  # round -> aggregate hash computed, not yet seen final
    updates: dict[int, str] = field(default_factory=dict)  # round -> sha256 of this node's update blob
    kept: dict[str, Any] = field(default_factory=dict)  # the kept model's round, validation loss, metrics
    last_eval: dict[str, Any] = field(default_factory=dict)  # the latest evaluation (round, metrics)

    def to_json(self) -> dict[str, Any]:
        return {"committed": self.committed, "state_round": self.state_round,
                "unconfirmed": {str(k): v for k, v in self.unconfirmed.items()},
                "updates": {str(k): v for k, v in self.updates.items()}, "kept": self.kept,
                "last_eval": self.last_eval}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Progress":
        return cls(int(d["committed"]), int(d["state_round"]), {int(k): v for k, v in d["unconfirmed"].items()},
                   {int(k): v for k, v in d["updates"].items()}, dict(d["kept"]), dict(d.get("last_eval", {})))


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
    progress: Progress = field(default_factory=Progress)
    new_records: list[dict[str, Any]] = field(default_factory=list)
    secure: Any = None  # a NodeSecure under --secure (fedmdh.runtime.secure_task)
    template: Any = None  # under --secure: an update of the task's layout (turns a released sum into an aggregate)

    @property
    def wait_s(self) -> float:
        return float(self.spec_json.get("wait_s", DEFAULT_WAIT_S))


def _n_max(task: NodeTask) -> int:
    """The largest institution's training-row count, public since the setup (the noise's scale)."""
    return max(int(v) for v in task.setup.n_train.values())


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
        from fedmdh.runtime.protocol import use_training_threads

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
        use_training_threads()  # the simulator's count: the same bits (torch and BLAS)

    @property
    def address(self) -> str:
        return self.account.address

    # ------------------------------------------------------------------ dispatch

    def handle(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        """Answer one message; a failure becomes ``{"error": one line naming this institution}``."""
        cmd = meta.get("cmd")
        t0 = time.perf_counter()
        handlers = {"setup": lambda: self._setup(meta), "round": lambda: self._round(meta, arrays),
                    "finish": lambda: self._finish(meta, arrays), "archive": lambda: self._archive(meta),
                    "late": lambda: self._late(meta, arrays),
                    "status": lambda: self._status(meta),
                    "keygen": lambda: self._keygen(meta, arrays),
                    "secure_encrypt": lambda: self._secure_encrypt(meta, arrays),
                    "secure_decrypt": lambda: self._secure_decrypt(meta, arrays),
                    "secure_escrow": lambda: self._secure_escrow(meta),
                    "secure_reseal": lambda: self._secure_reseal(meta, arrays),
                    "secure_recover": lambda: self._secure_recover(meta, arrays),
                    "ping": lambda: ({"institution": self.name, "address": self.address}, {})}
        try:
            if cmd not in handlers:
                raise InputError(f"unknown command {cmd!r}")
            reply, reply_arrays = handlers[cmd]()
        except TrainingDiverged as exc:  # the coordinator stops the task with the simulator's line
            log.error("%s %s failed: %s", cmd, meta.get("round", ""), exc)
            reply, reply_arrays = {"error": f"institution {self.name}: {exc}",
                                   "diverged": {"round": exc.round, "loss": exc.loss, "detail": exc.detail}}, {}
        except FedmdhError as exc:
            log.error("%s %s failed: %s", cmd, meta.get("round", ""), exc)
            reply, reply_arrays = {"error": f"institution {self.name}: {exc}"}, {}
        except Exception as exc:  # noqa: BLE001 - the coordinator must hear of it, in one line
            log.error("%s failed:\n%s", cmd, traceback.format_exc())
            reply, reply_arrays = {"error": f"institution {self.name}: {type(exc).__name__}: {exc}"}, {}
        reply.setdefault("institution", self.name)
        reply["seconds"] = time.perf_counter() - t0
        if cmd in ("round", "finish", "archive", "late", "status", "secure_encrypt", "secure_decrypt"):
            log.info("task %s: %s %s answered in %.2f s", meta.get("task_id"), cmd, meta.get("round", ""),
                     reply["seconds"])
        task = self.tasks.get(str(meta.get("task_id")))
        if task is not None:
            reply["progress"] = {"committed": task.progress.committed, "state_round": task.progress.state_round}
            if task.new_records:
                reply["transactions"] = list(task.new_records)
                task.new_records.clear()  # the chain's log callback appends to this very list
        return reply, reply_arrays

    def _task(self, meta: Meta) -> NodeTask:
        task_id = str(meta.get("task_id"))
        task = self.tasks.get(task_id) or self._restore(task_id)
        if task is None:
            raise InputError(f"task {task_id!r} is unknown here (this node did not take part in its setup)")
        return task

    # ------------------------------------------------------------------ setup

    def _load_task(self, task_id: str, spec: dict[str, Any], folder: Path) -> NodeTask:
        from fedmdh.data.federation import local_split, setup_summary
        from fedmdh.data.io import load_institution

        target = str(spec["target"])
        if target != self.target:
            raise InputError(f"this node serves target {self.target!r}, the task asks for {target!r}")
        exclude = tuple(spec.get("exclude", ())) + self.exclude
        table = load_institution(self.data, target, name=self.name, exclude=exclude)
        test = load_institution(self.test, target, name="test", exclude=exclude, kind="test set") if self.test else None
        if test is not None:
            missing = [c for c in table.features if c not in test.features]
            if missing:
                raise InputError(f"{self.test}: the test set lacks column {missing[0]!r} of {self.data}")
        split = local_split(table, int(spec["first_seed"]), float(spec["val_fraction"]))
        task = NodeTask(task_id, spec, folder, table, split, test, setup_summary(split))
        if spec.get("secure"):
            from fedmdh.runtime.secure_task import NodeSecure

            task.secure = NodeSecure(self.name, folder).load()
        return task

    def _setup(self, meta: Meta) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.messages import summary_message

        spec = dict(meta["task"])
        task_id = check_name(str(meta["task_id"]), "task id")
        folder = self.state_dir / "tasks" / task_id
        if (folder / "setup.json").exists():
            raise InputError(f"task {task_id} started here already; a coordinator resumes it (`fedmdh deploy "
                             "resume`), it is not set up again")
        task = self._load_task(task_id, spec, folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "task.json", {"task_id": task_id, "task": spec, "institution": self.name,
                                                 "address": self.address})
        self.tasks[task_id] = task
        m, a = summary_message(task.summary)
        log.info("task %s: setup, %d rows, %d columns", task_id, task.table.n_rows, len(task.table.features))
        if task.secure is not None:  # the statistics go only encrypted (secure_encrypt), never in the clear
            a = {}
        return {**m, "address": self.address, "has_test": task.test is not None}, a

    def _build(self, task: NodeTask, setup) -> None:
        """The task's data, algorithm and starting state from what setup fixed (round 1, or a restart)."""
        from fedmdh.algorithms.base import FederationSpec
        from fedmdh.config import ExperimentConfig
        from fedmdh.data.federation import institution_data
        from fedmdh.runtime.protocol import ClientSlot, Selection, initial_state

        spec = task.spec_json
        fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"institutions", "test"}
        config = ExperimentConfig(institutions=setup.names, test="", **{k: v for k, v in spec.items() if k in fields})
        task.setup, task.config = setup, config
        task.algorithm = config.build_algorithm(spec["algorithms"][0])
        task.data = institution_data(task.split, setup, task.test, config.clip_inputs)
        task.spec = FederationSpec.from_setup(setup)
        task.server = initial_state(task.algorithm, task.spec, config.first_seed)
        task.slot = ClientSlot(task.algorithm, task.spec, task.data, config.first_seed)
        task.selection = Selection()
        if task.secure is not None:
            from fedmdh.runtime.secure_task import template_update

            task.template = template_update(task.algorithm, task.spec, config.first_seed)

    def _restore(self, task_id: str) -> NodeTask | None:
        """A task this node took part in before it restarted, from its state folder."""
        from fedmdh.runtime.messages import setup_from_record
        from fedmdh.runtime.protocol import ClientSlot, Kept

        folder = self.state_dir / "tasks" / check_name(task_id, "task id")
        if not (folder / "task.json").is_file():
            return None
        saved = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        task = self._load_task(task_id, dict(saved["task"]), folder)
        if (folder / "setup.json").is_file():
            self._build(task, setup_from_record(json.loads((folder / "setup.json").read_text(encoding="utf-8"))))
            chain = json.loads((folder / "chain.json").read_text(encoding="utf-8"))
            self._connect(task, chain["contract"], chain.get("rpc_url"))
            task.addresses = dict(chain["participants"])
            if (folder / "state.npz").is_file():
                with np.load(folder / "state.npz") as z:
                    arrays = {k: z[k] for k in z.files}
                task.progress = Progress.from_json(json.loads(bytes(arrays.pop("progress")).decode("utf-8")))
                task.server = {k[len("server/"):]: v for k, v in arrays.items() if k.startswith("server/")}
                task.slot = ClientSlot(task.algorithm, task.spec, task.data, task.config.first_seed,
                                       arrays={k[len("client/"):]: v for k, v in arrays.items()
                                               if k.startswith("client/")})
                kept = task.progress.kept
                if "selection" in arrays:
                    sel_meta = json.loads(bytes(arrays.pop("selection")).decode("utf-8"))
                    task.selection.restore(self.name, sel_meta, {k[len("selection/"):]: v for k, v in arrays.items()
                                                                 if k.startswith("selection/")})
                elif kept:  # a state file from before the selection was saved with it
                    best = folder / "best" / "params.npz"
                    with np.load(best) as z:
                        params = {k: z[k] for k in z.files}
                    task.selection.kept[self.name] = Kept(int(kept["round"]), float(kept["val_mse"]), params,
                                                          dict(kept["metrics"]))
        self.tasks[task_id] = task
        log.info("task %s: restored from %s (committed round %d)", task_id, folder, task.progress.committed)
        return task

    def _status(self, meta: Meta) -> tuple[Meta, Arrays]:
        """What this node holds of a task, and its committed updates of the rounds asked for."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore

        task = self._task(meta)
        arrays: Arrays = {}
        updates = []
        for r in meta.get("updates_of", []):
            digest = task.progress.updates.get(int(r))
            if digest is None:
                continue
            upd = codec.decode_update(DirBlobStore(task.folder / "blobs").get(digest))
            updates.append({"round": int(r), **_update_meta(upd)})
            arrays.update({f"u{r}/{self.name}/{k}": np.asarray(v) for k, v in upd.payload.items()})
        return {"address": self.address, "updates": updates}, arrays

    # ------------------------------------------------------------------ rounds

    def _start(self, task: NodeTask, meta: Meta, arrays: Arrays) -> Meta:
        """Round 1's preamble: pool the setup, build the data and the algorithm, check the contract, register."""
        from fedmdh.data.federation import label_histogram, pool_setup
        from fedmdh.ledger.blobs import sha256_hex
        from fedmdh.runtime.coordinator import deployed_task_manifest
        from fedmdh.runtime.messages import setup_hash, setup_record, summaries_from, summary_message

        lo_hi = None
        if task.setup is None:
            if task.secure is not None:
                setup, pooled_hist = self._secure_setup(task, meta, arrays)
            else:
                summaries = summaries_from(meta, arrays)
                mine = [s for s in summaries if s.institution == self.name]
                if len(mine) != 1:
                    raise InputError("the setup relayed by the coordinator does not contain this institution")
                if not _same_message(summary_message(mine[0]), summary_message(task.summary)):
                    raise InputError("the setup relayed by the coordinator alters this institution's summary")
                setup = pool_setup(summaries)
            if meta.get("setup_sha256") and meta["setup_sha256"] != setup_hash(setup):
                raise InputError("the coordinator's setup hash differs from the one pooled here")
            self._build(task, setup)
            participants = {str(k): str(v) for k, v in dict(meta["participants"]).items()}
            if sorted(participants) != list(setup.names) or participants.get(self.name) != self.address:
                raise InputError("the participants the coordinator names differ from the setup's institutions "
                                 "or give this institution another address")
            self._connect(task, str(meta["contract"]), meta.get("chain_rpc") or task.spec_json.get("chain_rpc"))
            task.addresses = participants
            c = task.contract.functions
            _, manifest, _ = deployed_task_manifest(task.config, task.algorithm, task.spec, setup_hash(setup),
                                                    task.secure.record() if task.secure is not None else None)
            expected = {"target": task.config.target[:64], "algorithm": task.algorithm.name[:64],
                        "num_rounds": task.config.rounds, "initial_state_hash": bytes.fromhex(sha256_hex(manifest)),
                        "round_timeout": int(task.spec_json.get("round_timeout", 0))}
            for key, want in expected.items():
                got = getattr(c, key)().call()
                if (bytes(got) != want) if isinstance(want, bytes) else (got != want):
                    shown = (lambda v: "0x" + bytes(v).hex()[:16]) if isinstance(want, bytes) else repr
                    raise InputError(f"the task contract's {key} is {shown(got)}, this node computes {shown(want)} "
                                     "from the task and its setup; refusing to take part")
            for name, addr in participants.items():
                if not c.allowed(addr).call():
                    raise InputError(f"{name}'s address {addr} is not on the task contract's allowlist")
            if int(c.quorum().call()) * 2 <= len(participants):
                raise InputError(f"the task contract's quorum {c.quorum().call()} is not a majority of the "
                                 f"{len(participants)} participants; refusing to take part")
            atomic_write_json(task.folder / "setup.json", setup_record(setup))
            atomic_write_json(task.folder / "chain.json", {"contract": task.contract.address,
                                                           "rpc_url": task.chain.url, "participants": participants})
        c = task.contract.functions
        if not c.registered(self.address).call():
            self._transact(task, "register", self.name[:64], gas="register")
        self._wait(task, lambda: c.participant_count().call() >= len(task.setup.names),
                   "every institution to register")
        for name, addr in task.addresses.items():
            if c.participant_name(addr).call() != name[:64]:
                raise InputError(f"the address given for {name} registered as {c.participant_name(addr).call()!r}")
        lo_hi = task.setup.label_range
        if task.secure is not None:  # its KL against the pooled histogram, computed here
            from fedmdh.data.heterogeneity import kl_from_counts

            pooled = np.asarray(json.loads((task.folder / "secure" / "histogram.json").read_text())["pooled"])
            own = label_histogram(task.table.y, *lo_hi)
            return {"kl": float(kl_from_counts([own], pooled=pooled)[0])}
        return {"histogram": [int(v) for v in label_histogram(task.table.y, *lo_hi)]}

    # ------------------------------------------------------------------ secure tasks (fedmdh.runtime.secure_task)

    def _secure_task(self, meta: Meta) -> NodeTask:
        task = self._task(meta)
        if task.secure is None:
            raise InputError(f"task {task.task_id} is not a secure task here")
        return task

    def _keygen(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.secure_task import _u8

        task = self._secure_task(meta)
        prev = bytes(np.asarray(arrays["previous"], np.uint8)) if "previous" in arrays else None
        link = task.secure.keygen(bytes(np.asarray(arrays["context"], np.uint8)), prev)
        log.info("task %s: key share created (link %d of the key chain)", task.task_id, int(meta.get("link", 0)))
        return {}, {"link": _u8(link), "box": _u8(task.secure.box_public())}

    def _secure_escrow(self, meta: Meta) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.secure_task import _u8

        task = self._secure_task(meta)
        boxes = {str(n): bytes.fromhex(h) for n, h in dict(meta["boxes"]).items()}
        if boxes.get(self.name) != task.secure.box_public():
            raise InputError("the escrow's box keys name another key for this institution")
        backup, sealed = task.secure.escrow(boxes, int(meta["threshold"]))
        return {"holders": sorted(sealed)}, {"backup": _u8(backup), **{f"sealed/{n}": _u8(b) for n, b in sealed.items()}}

    def _secure_reseal(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.secure_task import _u8

        task = self._secure_task(meta)
        of = str(meta["of"])
        if of == self.name:
            raise InputError("asked to reseal a piece of this institution's own share")
        out = task.secure.reseal(of, bytes(np.asarray(arrays["sealed"], np.uint8)), bytes.fromhex(str(meta["to_box"])))
        log.warning("task %s: resealed this institution's piece of %s's escrowed share to %s (%s)", task.task_id, of,
                    meta.get("to"), meta.get("purpose"))
        return {}, {"resealed": _u8(out)}

    def _secure_recover(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        from fedmdh.runtime.secure_task import partial_message

        task = self._secure_task(meta)
        purpose, cts, parties = self._decrypt_inputs(task, meta, arrays)
        of = str(meta["of"])
        pieces = [bytes(np.asarray(v, np.uint8)) for k, v in sorted(arrays.items()) if k.startswith("piece/")]
        partial = task.secure.recover_partial(of, bytes(np.asarray(arrays["backup"], np.uint8)), pieces, purpose,
                                              cts, parties)
        log.warning("task %s: decrypted %s for %s, who did not answer, from its escrowed share", task.task_id,
                    purpose, of)
        return partial_message(partial)

    def _public_summaries(self, task: NodeTask, meta: Meta) -> list[Any]:
        """The institutions' public summary fields (no statistics), this institution's unchanged."""
        from fedmdh.runtime.messages import public_summaries_from, summary_message

        summaries = public_summaries_from(meta)
        mine = [s for s in summaries if s.institution == self.name]
        if len(mine) != 1 or summary_message(mine[0])[0] != summary_message(task.summary)[0]:
            raise InputError("the setup relayed by the coordinator lacks or alters this institution's summary")
        return summaries

    def _secure_encrypt(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        """A secure setup's pass: this institution's statistics encrypted under the joint key."""
        from fedmdh.data.federation import (
            label_histogram,
            secure_setup_first,
            secure_setup_second,
            secure_setup_unit,
            union_features,
        )
        from fedmdh.runtime.secure_task import Release, vector_arrays

        task = self._secure_task(meta)
        task.secure.set_public_key(bytes(np.asarray(arrays["public_key"], np.uint8)))
        summaries = self._public_summaries(task, meta)
        names = sorted(s.institution for s in summaries)
        features = union_features([s.columns for s in sorted(summaries, key=lambda s: s.institution)])
        purpose = str(meta["purpose"])
        if purpose == "setup-1":
            values = secure_setup_first(task.summary, features)
        elif purpose == "setup-2":
            first = task.secure.check(Release.from_message(meta["release_1"], arrays, "rel1/"), names, "setup-1")
            _, mean, unit = secure_setup_unit(first, features)
            lo = min(s.label_min for s in summaries)
            hi = max(s.label_max for s in summaries)
            hist = label_histogram(task.table.y, lo, hi) if hi > lo else np.zeros(0)
            values = np.concatenate([secure_setup_second(task.summary, features, mean, unit),
                                     np.asarray(hist, dtype=np.float64)])
        else:
            raise InputError(f"unknown secure pass {purpose!r}")
        return {"purpose": purpose}, vector_arrays("ct.", task.secure.encrypt(purpose, values))

    def _secure_decrypt(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        """This institution's partial decryption of a sum it computes itself from checked ciphertexts."""
        from fedmdh.runtime.secure_task import partial_message

        task = self._secure_task(meta)
        purpose, cts, parties = self._decrypt_inputs(task, meta, arrays)
        return partial_message(task.secure.decrypt(purpose, cts, parties))

    def _decrypt_inputs(self, task: NodeTask, meta: Meta, arrays: Arrays):
        """``(purpose, ciphertexts, key holders)`` of a decryption request: a round's ciphertexts only
        once its commitments closed and each as committed on chain."""
        from fedmdh.runtime.messages import updates_from
        from fedmdh.runtime.secure_task import update_vector, vector_from

        purpose = str(meta["purpose"])
        if purpose.startswith("round-"):
            rnd = int(purpose[len("round-"):])
            if task.setup is None:
                raise InputError("round 1 never reached this node for this task")
            if not task.contract.functions.commits_closed(rnd).call():
                raise InputError(f"round {rnd}'s commitments are still open on chain; refusing to decrypt its sum")
            updates = updates_from(meta, arrays)
            self._check_committed(task, rnd, updates)
            big = [u.institution for u in updates if u.num_examples > _n_max(task)]
            if task.config.dp is not None and big:  # the noise was sized for the setup's largest count
                raise InputError(f"round {rnd}: {big[0]} committed more rows than the setup's largest count; the "
                                 "noise added here would not cover it, refusing to decrypt")
            cts = {u.institution: update_vector(u) for u in updates}
            parties = list(task.setup.names)
        else:
            parties = sorted(str(n) for n in meta["parties"])
            cts = {n: vector_from(f"c/{n}/", arrays) for n in meta["from"]}
        return purpose, cts, parties

    def _secure_setup(self, task: NodeTask, meta: Meta, arrays: Arrays):
        """Round 1 of a secure task: the setup from the two released sums, each checked here."""
        from fedmdh.data.federation import secure_moments_from, setup_from_moments, union_features
        from fedmdh.runtime.secure_task import Release

        summaries = self._public_summaries(task, meta)
        names = sorted(s.institution for s in summaries)
        features = union_features([s.columns for s in sorted(summaries, key=lambda s: s.institution)])
        first = task.secure.check(Release.from_message(meta["release_1"], arrays, "rel1/"), names, "setup-1")
        second = task.secure.check(Release.from_message(meta["release_2"], arrays, "rel2/"), names, "setup-2")
        k = len(features) + 1
        setup = setup_from_moments(summaries, *secure_moments_from(first, second[:k], features))
        pooled = np.round(second[k:])
        atomic_write_json(task.folder / "secure" / "histogram.json", {"pooled": [float(v) for v in pooled]})
        return setup, pooled

    def _round(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        task = self._task(meta)
        rnd = int(meta["round"])
        reply: Meta = {}
        if rnd == 1:
            reply.update(self._start(task, meta, arrays))
        if task.setup is None:
            raise InputError("round 1 never reached this node for this task")
        c = task.contract.functions
        digest = bytes(c.update_hash(rnd, self.address).call()).hex()
        if digest != EMPTY.hex():  # committed already (a message sent again): answer from what was done
            return {**reply, **self._resend(task, rnd, digest)}, self._update_arrays(task, digest)
        if rnd >= 2 and "catch_up" in meta:  # a round before the last, not finalized yet: closed here first
            if "base_round" in meta:
                self._adopt_base(task, int(meta["base_round"]), arrays)
            earlier = dict(meta["catch_up"])
            if task.progress.state_round == int(earlier["round"]) - 1:
                self._close_round(task, int(earlier["round"]), earlier,
                                  {k[len("c/"):]: v for k, v in arrays.items() if k.startswith("c/")})
        if rnd >= 2:
            reply.update(self._close_round(task, rnd - 1, meta, arrays))
        if c.commits_closed(rnd).call():
            self._persist(task)
            return {**reply, "missed": rnd}, {}  # too late for this round: the next one takes this node again
        update = self._train_and_commit(task, rnd)
        reply.update(_update_meta(update))
        return reply, {f"u/{self.name}/{k}": np.asarray(v) for k, v in update.payload.items()}

    def _resend(self, task: NodeTask, rnd: int, digest: str) -> Meta:
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore

        upd = codec.decode_update(DirBlobStore(task.folder / "blobs").get(digest))
        if task.progress.committed < rnd:  # committed, then stopped before saving it
            task.progress.committed = rnd
            task.progress.updates[rnd] = digest
            self._persist(task)
        last = task.progress.last_eval
        out: Meta = {**_update_meta(upd), "resent": True}
        if last.get("round") == rnd - 1:
            out.update(eval_round=last["round"], eval=last["metrics"], aggregate_sha256=last.get("aggregate_sha256"))
        return out

    def _update_arrays(self, task: NodeTask, digest: str) -> Arrays:
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore

        upd = codec.decode_update(DirBlobStore(task.folder / "blobs").get(digest))
        return {f"u/{self.name}/{k}": np.asarray(v) for k, v in upd.payload.items()}

    def _finish(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        task = self._task(meta)
        last = int(meta["round"])
        reply = self._close_round(task, last, meta, arrays)
        self._confirm(task, last, wait=True)
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
        if bytes(task.contract.functions.model_vote(self.address).call()) == EMPTY:
            self._transact(task, "attest_model", bytes.fromhex(digest), gas="attest_model")
        atomic_write_bytes(task.folder / "archive-manifest.json", body)
        return {"attested": digest}, {}

    def _late(self, meta: Meta, arrays: Arrays) -> tuple[Meta, Arrays]:
        """Add this institution's model to a task archived without it (see the module docstring)."""
        task = self._task(meta)
        if task.setup is None:
            raise InputError("round 1 never reached this node for this task")
        c = task.contract.functions
        digest = str(meta.get("archive_sha256", ""))
        archived = bytes(c.archived_hash().call()).hex()
        if archived == EMPTY.hex() or archived != digest:
            raise InputError(f"the task's archive on chain ({archived[:16]}) is not the one the coordinator names "
                             f"({digest[:16]})")
        if not c.archive_missing(self.address).call():
            raise InputError("the task's archive does not name this institution missing (its model is archived)")
        last = int(task.config.rounds)
        if "base_round" in meta:
            self._adopt_base(task, int(meta["base_round"]), arrays)
        if task.progress.state_round != last:
            raise InputError(f"this node holds the aggregate of round {task.progress.state_round}, not of the last "
                             f"round {last}; the coordinator must send the last finalized aggregate")
        self._confirm(task, last, wait=False)
        if task.progress.last_eval.get("round") != last:  # the final aggregate, caught up from: evaluated here
            self._evaluate(task, last, bytes(c.finalized_hash(last).call()).hex())
        files = self._save_final_model(task)
        self._persist(task)
        manifest = {"kind": LATE_MODEL_KIND, "institution": self.name, "archive": digest, "files": files}
        body = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        late = hashlib.sha256(body).hexdigest()
        added = bytes(c.late_model(self.address).call()).hex()
        if added == EMPTY.hex():
            self._transact(task, "attest_late", bytes.fromhex(late), gas="attest_model")
        elif added != late:
            raise InputError(f"this institution added model {added[:16]} already; its files now hash to {late[:16]}")
        atomic_write_bytes(task.folder / "late-manifest.json", body)
        kept = task.selection.kept[self.name]
        log.info("task %s: added this institution's model (kept round %d) to the archive as %s", task.task_id,
                 kept.round, late[:16])
        return {"late_sha256": late, "late_manifest": manifest, "kept_round": kept.round,
                "kept_metrics": kept.metrics}, {}

    # ------------------------------------------------------------------ the round's steps

    def _close_round(self, task: NodeTask, rnd: int, meta: Meta, arrays: Arrays) -> Meta:
        """Round ``rnd``'s updates: check them against the chain, aggregate, attest, evaluate, select."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import sha256_hex
        from fedmdh.runtime.messages import updates_from

        c = task.contract.functions
        if "base_round" in meta:
            self._adopt_base(task, int(meta["base_round"]), arrays)
        if task.progress.state_round == rnd:  # done already (a message sent again after a restart)
            return {"eval_round": rnd, **({"eval": task.progress.last_eval["metrics"]}
                                          if task.progress.last_eval.get("round") == rnd else {})}
        if task.progress.state_round != rnd - 1:
            raise InputError(f"round {rnd + 1}: this node holds the aggregate of round {task.progress.state_round}, "
                             f"not of round {rnd - 1}; the coordinator must send the last finalized aggregate")
        self._confirm(task, rnd - 1, wait=True)
        if not c.commits_closed(rnd).call():
            raise InputError(f"round {rnd}'s commitments are still open on chain; nothing to aggregate yet")
        if task.secure is not None:  # the released sum of the round's ciphertexts, checked here
            from fedmdh.runtime.secure_task import Release

            released = task.secure.check(Release.from_message(meta["release"], arrays), task.setup.names,
                                         f"round-{rnd}")
            task.server = _aggregation(task).combine(task.algorithm, task.server, rnd, task.config.first_seed,
                                                     total=released, template=task.template,
                                                     count=int(c.total_examples(rnd).call()))
        else:
            updates = updates_from(meta, arrays)
            self._check_committed(task, rnd, updates)
            task.server = _aggregation(task).combine(task.algorithm, task.server, rnd, task.config.first_seed,
                                                     updates=updates)
        agg_hash = sha256_hex(codec.encode_payload(task.server))
        task.progress.state_round = rnd
        task.progress.unconfirmed[rnd] = agg_hash
        if task.progress.committed >= rnd and bytes(c.update_hash(rnd, self.address).call()) != EMPTY \
                and bytes(c.attested_hash(rnd, self.address).call()) == EMPTY:
            self._attest(task, rnd, agg_hash)
        metrics = self._evaluate(task, rnd, agg_hash)
        return {"eval_round": rnd, "eval": metrics, "aggregate_sha256": agg_hash}

    def _evaluate(self, task: NodeTask, rnd: int, agg_hash: str) -> dict[str, Any]:
        """Evaluate the model of round ``rnd``'s aggregate (selection on the own validation rows)."""
        from fedmdh.runtime.protocol import evaluate_round

        client = task.slot.get()
        params = task.algorithm.personal_params(task.server, client)
        metrics, changed = evaluate_round(task.algorithm, task.selection, self.name, rnd,
                                          {k: np.array(v) for k, v in params.items()}, task.data, task.setup.scaler,
                                          task.test.y if task.test is not None else np.zeros(0))
        if changed:
            kept = task.selection.kept[self.name]
            self._save_model(task, task.folder / "best", kept)
            task.progress.kept = {"round": kept.round, "val_mse": kept.val_mse, "metrics": kept.metrics}
        task.progress.last_eval = {"round": rnd, "metrics": metrics, "aggregate_sha256": agg_hash}
        return metrics

    def _check_committed(self, task: NodeTask, rnd: int, updates) -> None:
        """The relayed updates of round ``rnd`` are exactly the ones committed on chain."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import sha256_hex

        c = task.contract.functions
        committed = int(c.commit_count(rnd).call())
        if len(updates) != committed:
            raise InputError(f"round {rnd}: {len(updates)} updates relayed, {committed} committed on chain")
        for u in updates:
            addr = task.addresses.get(u.institution)
            if addr is None:
                raise InputError(f"round {rnd}: an update from {u.institution!r}, who is not a participant")
            on_chain = bytes(c.update_hash(rnd, addr).call()).hex()
            mine = sha256_hex(codec.encode_update(u))
            if mine != on_chain:
                raise InputError(f"round {rnd}: the update relayed for {u.institution} is not the one it committed "
                                 f"(sha256 {mine[:16]}, on chain {on_chain[:16] if on_chain != EMPTY.hex() else 'none'})")

    def _attest(self, task: NodeTask, rnd: int, agg_hash: str) -> None:
        """Attest round ``rnd``'s aggregate, unless the round was finalized without this node already
        (its timeout passed): then the next step checks the finalized hash against its own."""
        from fedmdh.ledger.errors import LedgerRevert

        c = task.contract.functions
        if int(c.current_round().call()) != rnd or c.ended().call():  # the last round closed by the quorum
            return
        try:
            self._transact(task, "attest", rnd, bytes.fromhex(agg_hash), gas="attest", round=rnd)
        except LedgerRevert as exc:
            # finalized between the check and the transaction (the last round: the task ended): fine
            if "wrong round" not in exc.reason and "has ended" not in exc.reason:
                raise

    def _adopt_base(self, task: NodeTask, base_round: int, arrays: Arrays) -> None:
        """Continue from the finalized aggregate of ``base_round`` (a node that missed rounds catches up)."""
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import sha256_hex

        if task.progress.state_round >= base_round:
            return
        base = {k[len("b/"):]: v for k, v in arrays.items() if k.startswith("b/")}
        digest = sha256_hex(codec.encode_payload(base))
        final = bytes(task.contract.functions.finalized_hash(base_round).call()).hex()
        if digest != final:
            raise InputError(f"the aggregate of round {base_round} sent to catch up is not the one the chain finalized "
                             f"(sha256 {digest[:16]}, finalized {final[:16]})")
        task.server = base
        task.progress.state_round = base_round
        task.progress.unconfirmed = {k: v for k, v in task.progress.unconfirmed.items() if k > base_round}
        log.info("task %s: caught up from the finalized aggregate of round %d", task.task_id, base_round)

    def _confirm(self, task: NodeTask, upto: int, wait: bool) -> None:
        """Check that the chain finalized exactly the aggregates this node computed, up to round ``upto``."""
        c = task.contract.functions
        for rnd in sorted(k for k in task.progress.unconfirmed if k <= upto):
            if wait:
                self._wait(task, lambda rnd=rnd: bytes(c.finalized_hash(rnd).call()) != EMPTY or c.failed().call(),
                           f"round {rnd} to be finalized")
            if c.failed().call():
                raise InputError(f"round {rnd} failed on chain: no quorum attested one aggregate")
            final = bytes(c.finalized_hash(rnd).call()).hex()
            if final == EMPTY.hex():
                continue
            mine = task.progress.unconfirmed.pop(rnd)
            if final != mine:
                raise InputError(f"round {rnd}: the chain finalized aggregate {final[:16]}, not the {mine[:16]} "
                                 "computed here; this node stops (it would continue from an aggregate no quorum "
                                 "agreed on)")

    def _train_and_commit(self, task: NodeTask, rnd: int):
        from fedmdh.ledger import codec
        from fedmdh.ledger.blobs import DirBlobStore
        from fedmdh.ledger.chain import GAS_PER_VALUE

        update, _ = train(task.algorithm, task.server, task.slot, task.data, task.config.first_seed, rnd, self.name)
        check_update(rnd, update)  # a diverged update is never committed
        blobs = DirBlobStore(task.folder / "blobs")
        if task.secure is not None:  # the clear update stays here; the ciphertexts are what count
            from fedmdh.runtime.secure_task import encrypted_update

            blobs.put(codec.encode_update(update))
            # with DP, its share of the noise comes from the OS: nobody can subtract it
            vector = _aggregation(task).contribution(
                task.algorithm, task.server, update, n_max=_n_max(task), n_parties=len(task.setup.names),
                noise=private_rng() if task.config.dp is not None else None)
            update = encrypted_update(update, task.secure.encrypt(f"round-{rnd}", vector))
        digest = blobs.put(codec.encode_update(update))
        task.progress.updates[rnd] = digest
        self._persist(task)  # the state after training, before the commitment that makes it count
        flat = np.zeros(0) if task.secure is not None else codec.flatten(codec.onchain_vectors(task.algorithm, update))[1]
        self._transact(task, "commit", rnd, bytes.fromhex(digest), int(update.num_examples),
                       codec.pack(codec.to_fixed(flat)), gas="commit", extra_gas=GAS_PER_VALUE * flat.size, round=rnd)
        task.progress.committed = rnd
        self._persist(task)
        return update

    def _transact(self, task: NodeTask, fn: str, *args: Any, gas: str, extra_gas: int = 0, **meta: Any) -> None:
        from fedmdh.ledger.artifacts import call_data
        from fedmdh.ledger.chain import GAS, GAS_PER_PARTICIPANT

        if fn == "attest":
            extra_gas += GAS_PER_PARTICIPANT * len(task.addresses)
        task.chain.transact(self.account, fn, task.contract.address, call_data(fn, *args),
                            gas=GAS[gas] + extra_gas, actor=self.name, **meta)

    def _wait(self, task: NodeTask, done, what: str) -> None:
        t_end = time.monotonic() + task.wait_s
        while not done():
            if time.monotonic() > t_end:
                raise InputError(f"gave up after {task.wait_s:.0f} s waiting for {what}")
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
        from fedmdh.models import save_model

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
        """Client state, the current aggregate and the progress as one file, written atomically."""
        buf = io.BytesIO()
        progress = np.frombuffer(json.dumps(task.progress.to_json(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        sel_meta, sel_arrays = task.selection.state(self.name)  # every part's best round, not only the kept model
        selection = np.frombuffer(json.dumps(sel_meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        np.savez(buf, progress=progress, selection=selection, **{f"client/{k}": v for k, v in task.slot.arrays.items()},
                 **{f"server/{k}": np.asarray(v) for k, v in task.server.items()},
                 **{f"selection/{k}": v for k, v in sel_arrays.items()})
        atomic_write_bytes(task.folder / "state.npz", buf.getvalue(), mode=0o600)


def _aggregation(task: NodeTask) -> Aggregation:
    """The task's aggregation step (runtime/round.py): from sums in a secure task, DP on top when set."""
    return Aggregation(secure=task.secure is not None, dp=task.config.dp)


def _update_meta(u) -> Meta:
    from fedmdh.runtime.messages import update_meta

    return update_meta(u)


def _same_message(a: tuple[Meta, Arrays], b: tuple[Meta, Arrays]) -> bool:
    (ma, aa), (mb, ab) = a, b
    return (json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True) and sorted(aa) == sorted(ab)
            and all(np.asarray(aa[k]).tobytes() == np.asarray(ab[k]).tobytes() for k in aa))
