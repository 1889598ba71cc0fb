"""A deployed task under ``--secure``: threshold CKKS between the nodes, the coordinator relaying.

The pieces both sides of :mod:`fedmdh.runtime.node` and :mod:`fedmdh.runtime.coordinator` share
(docs/security.md, "The deployed protocol"):

- encrypted vectors and partial decryptions as message arrays and blobs (:func:`vector_arrays`,
  :func:`encrypted_update`, :class:`Release`);
- :class:`NodeSecure`: one institution's key share (created on its node by its link of the key
  chain and kept in its own state folder, mode 0600), its encryptions, its partial decryptions
  (of sums it computes itself, in name order, from ciphertexts it has checked) and its check of
  every released sum against its own fusion of the relayed partial decryptions;
- the key escrow that lets a secure round go on without one institution (:meth:`NodeSecure.escrow`,
  :meth:`NodeSecure.reseal`, :meth:`NodeSecure.recover_partial`): each institution's share is
  encrypted under a fresh key, that key is split with Shamir's scheme (pycryptodome) among the
  other institutions, each piece sealed to its holder (libsodium's sealed boxes, PyNaCl), so the
  coordinator relays and stores only ciphertexts; when one institution does not answer a
  decryption, the other institutions reseal their pieces to the first of them by name, which
  rebuilds the missing share, computes its partial decryption of that one sum and drops it;
- :class:`Aggregator`: the coordinator's public side (the context, the homomorphic sums and the
  fusion of the partial decryptions into the released sum, which the coordinator learns, as every
  institution does).

Nothing here is cryptography of its own: every operation is OpenFHE's (:mod:`fedmdh.secure.threshold`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Update
from fedmdh.errors import InputError
from fedmdh.files import atomic_write_bytes, atomic_write_json
from fedmdh.secure.threshold import (
    EncryptedVector,
    Party,
    PartialDecryption,
    ThresholdCKKS,
    verify_tolerance,
)

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]

#: what the task manifest records as the scheme of a secure task
SCHEME = "threshold-ckks/openfhe (n-of-n)"


# ---------------------------------------------------------------- bytes <-> arrays

def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=np.uint8).copy()


def chunks_arrays(prefix: str, chunks: Sequence[bytes]) -> Arrays:
    return {f"{prefix}bytes": _u8(b"".join(chunks)),
            f"{prefix}sizes": np.asarray([len(c) for c in chunks], dtype=np.int64)}


def chunks_from(prefix: str, arrays: Mapping[str, np.ndarray]) -> tuple[bytes, ...]:
    raw = np.asarray(arrays[f"{prefix}bytes"], dtype=np.uint8).tobytes()
    sizes = [int(s) for s in np.asarray(arrays[f"{prefix}sizes"], dtype=np.int64)]
    if sum(sizes) != len(raw) or any(s <= 0 for s in sizes):
        raise InputError(f"{prefix}: chunk sizes {sizes[:4]}... do not fit {len(raw)} bytes")
    out, at = [], 0
    for s in sizes:
        out.append(raw[at:at + s])
        at += s
    return tuple(out)


def vector_arrays(prefix: str, ev: EncryptedVector) -> Arrays:
    return {**chunks_arrays(prefix, ev.chunks), f"{prefix}length": np.asarray([ev.length], dtype=np.int64)}


def vector_from(prefix: str, arrays: Mapping[str, np.ndarray]) -> EncryptedVector:
    return EncryptedVector(chunks_from(prefix, arrays), int(np.asarray(arrays[f"{prefix}length"]).ravel()[0]))


def encrypted_update(update: Update, ev: EncryptedVector) -> Update:
    """What an institution commits and sends in a secure round: its ciphertexts, its public sample
    count and its training metrics (the clear update stays on its node)."""
    return Update(update.institution, vector_arrays("ct.", ev), update.num_examples, dict(update.metrics))


def update_vector(update: Update) -> EncryptedVector:
    try:
        return vector_from("ct.", update.payload)
    except KeyError as exc:
        raise InputError(f"the update of {update.institution} is not encrypted (no {exc.args[0]}); "
                         "a secure task takes ciphertexts only") from None


# ---------------------------------------------------------------- a released sum

@dataclass(frozen=True)
class Release:
    """One secure sum as released: what it sums (``purpose``), the sha256 of the homomorphic sum
    of the ciphertexts, every party's partial decryption and the fused values.

    The fused values are what everyone continues from (OpenFHE's decoding is randomised, so a peer's
    own fusion differs in the last bits); a peer checks them with :meth:`NodeSecure.check`."""

    purpose: str
    sum_digest: str
    partials: tuple[PartialDecryption, ...]
    released: np.ndarray

    def message(self, prefix: str = "rel/") -> tuple[Meta, Arrays]:
        """``(meta, arrays)``: the meta goes under a key of the caller's message, the arrays' names
        start with ``prefix`` (so that one message can carry several releases)."""
        meta = {"purpose": self.purpose, "sum_digest": self.sum_digest,
                "parties": [p.party for p in self.partials], "lead": [p.party for p in self.partials if p.lead],
                "length": int(self.released.size)}
        arrays: Arrays = {f"{prefix}released": np.asarray(self.released, dtype=np.float64)}
        for p in self.partials:
            arrays.update(chunks_arrays(f"{prefix}p/{p.party}/", p.chunks))
        return meta, arrays

    @classmethod
    def from_message(cls, m: Mapping[str, Any], arrays: Mapping[str, np.ndarray], prefix: str = "rel/") -> "Release":
        length = int(m["length"])
        leads = set(m["lead"])
        partials = tuple(PartialDecryption(str(n), n in leads, chunks_from(f"{prefix}p/{n}/", arrays), length)
                         for n in m["parties"])
        released = np.asarray(arrays[f"{prefix}released"], dtype=np.float64)
        if released.shape != (length,):
            raise InputError(f"release {m['purpose']}: {released.size} values, announced {length}")
        return cls(str(m["purpose"]), str(m["sum_digest"]), partials, released)

    def blob(self) -> bytes:
        from fedmdh.runtime.flower.wire import pack

        meta, arrays = self.message()
        return pack({"release": meta}, arrays)

    @classmethod
    def from_blob(cls, blob: bytes) -> "Release":
        from fedmdh.runtime.flower.wire import unpack

        meta, arrays = unpack(blob)
        return cls.from_message(meta["release"], arrays)


def partial_message(p: PartialDecryption) -> tuple[Meta, Arrays]:
    return {"partial": {"party": p.party, "lead": p.lead, "length": p.length}}, chunks_arrays("pd/", p.chunks)


def partial_from(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> PartialDecryption:
    m = meta["partial"]
    return PartialDecryption(str(m["party"]), bool(m["lead"]), chunks_from("pd/", arrays), int(m["length"]))


def secure_record(context: bytes, public_key: bytes) -> dict[str, str]:
    """The scheme and the sha256 of the task's context and joint public key (in the task manifest)."""
    import hashlib

    return {"scheme": SCHEME, "context_sha256": hashlib.sha256(bytes(context)).hexdigest(),
            "public_key_sha256": hashlib.sha256(bytes(public_key)).hexdigest()}


def lead_of(parties: Sequence[str]) -> str:
    """The party whose partial decryption is the lead one: the first by name."""
    return sorted(parties)[0]


# ---------------------------------------------------------------- an institution's side

class NodeSecure:
    """One institution's side of a secure task, kept under ``folder`` (its own task folder).

    ``secure/share.bin`` (mode 0600) holds its key share, ``secure/context.bin`` and
    ``secure/public_key.bin`` the task's public context and joint key, ``secure/sums.json`` the
    sha256 of every homomorphic sum it partially decrypted and of every ciphertext it sent.
    """

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.dir = Path(folder) / "secure"
        self.party: Party | None = None
        self.scheme: ThresholdCKKS | None = None
        self.public_key: bytes | None = None
        self.sums: dict[str, str] = {}
        self.sent: dict[str, str] = {}
        self._box = None

    # -- keys ------------------------------------------------------------------------------------
    def keygen(self, context: bytes, previous: bytes | None) -> bytes:
        """This institution's link of the key chain (a message sent again gets the same link back)."""
        if (self.dir / "link.bin").is_file():
            return (self.dir / "link.bin").read_bytes()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.party = Party(self.name, context)
        link = self.party.keygen(previous)
        atomic_write_bytes(self.dir / "context.bin", bytes(context))
        atomic_write_bytes(self.dir / "share.bin", self.party.export_share(), mode=0o600)
        atomic_write_bytes(self.dir / "link.bin", link)
        return link

    # -- the escrow of the share ----------------------------------------------------------------
    def box_public(self) -> bytes:
        """The public half of this node's sealing key (X25519, PyNaCl), created once per task."""
        from nacl.public import PrivateKey

        if self._box is None:
            path = self.dir / "box.key"
            if path.is_file():
                self._box = PrivateKey(path.read_bytes())
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._box = PrivateKey.generate()
                atomic_write_bytes(path, bytes(self._box), mode=0o600)
        return bytes(self._box.public_key)

    def escrow(self, boxes: Mapping[str, bytes], threshold: int) -> tuple[bytes, dict[str, bytes]]:
        """``(backup, {holder: sealed piece})``: this node's key share encrypted under a fresh
        random key (``SecretBox``), and that key split among the other institutions with Shamir's
        scheme (``threshold`` pieces rebuild it), each piece sealed to its holder's box key."""
        from Crypto.Protocol.SecretSharing import Shamir
        from nacl.public import PublicKey, SealedBox
        from nacl.secret import SecretBox
        from nacl.utils import random

        holders = sorted(n for n in boxes if n != self.name)
        if not 1 <= threshold <= len(holders):
            raise InputError(f"an escrow among {len(holders)} holders cannot need {threshold} of them")
        key = random(SecretBox.KEY_SIZE)
        backup = bytes(SecretBox(key).encrypt((self.dir / "share.bin").read_bytes()))
        # pycryptodome's Shamir takes 16-byte secrets: the 32-byte key in two halves
        halves = [Shamir.split(threshold, len(holders), key[i:i + 16]) for i in (0, 16)]
        sealed = {}
        for j, holder in enumerate(holders):
            piece = {"of": self.name, "holder": holder, "threshold": threshold,
                     "halves": [[int(h[j][0]), h[j][1].hex()] for h in halves]}
            sealed[holder] = bytes(SealedBox(PublicKey(bytes(boxes[holder]))).encrypt(json.dumps(piece).encode()))
        return backup, sealed

    def _open(self, sealed: bytes) -> dict[str, Any]:
        from nacl.public import SealedBox

        self.box_public()
        return json.loads(SealedBox(self._box).decrypt(bytes(sealed)))

    def reseal(self, of: str, sealed: bytes, to_box: bytes) -> bytes:
        """This node's piece of ``of``'s escrowed key, sealed again to the recovering institution."""
        from nacl.public import PublicKey, SealedBox

        piece = self._open(sealed)
        if piece.get("of") != of or piece.get("holder") != self.name:
            raise InputError(f"the escrow piece relayed is not this institution's piece of {of}'s share")
        return bytes(SealedBox(PublicKey(bytes(to_box))).encrypt(json.dumps(piece).encode()))

    def recover_partial(self, of: str, backup: bytes, pieces: Sequence[bytes], purpose: str,
                        ciphertexts: Mapping[str, EncryptedVector], parties: Sequence[str]) -> PartialDecryption:
        """``of``'s partial decryption of the sum of ``ciphertexts``, from its escrowed share rebuilt
        here out of ``pieces`` (sealed to this node); the share is dropped afterwards."""
        from Crypto.Protocol.SecretSharing import Shamir
        from nacl.secret import SecretBox

        opened = [self._open(p) for p in pieces]
        if any(p.get("of") != of for p in opened):
            raise InputError(f"an escrow piece relayed is not a piece of {of}'s share")
        need = int(opened[0]["threshold"]) if opened else 1
        if len({p["holder"] for p in opened}) < need:
            raise InputError(f"{len(opened)} pieces of {of}'s escrowed share, {need} needed")
        key = b"".join(Shamir.combine([(int(i), bytes.fromhex(h)) for i, h in (p["halves"][k] for p in opened)])
                       for k in (0, 1))
        share = SecretBox(key).decrypt(bytes(backup))
        total = self._scheme().add([ciphertexts[n] for n in sorted(ciphertexts)])
        if self.sums.get(purpose, total.digest()) != total.digest():
            raise InputError(f"{purpose}: asked to decrypt for {of} another sum than the one this node decrypted")
        party = Party.restore(of, (self.dir / "context.bin").read_bytes(), share)
        try:
            return party.partial_decrypt(total, lead=of == lead_of(parties))
        finally:
            party.close()  # the rebuilt share lived in that engine only

    def set_public_key(self, key: bytes) -> None:
        if self.public_key is not None and self.public_key != key:
            raise InputError("the coordinator sent another joint public key than the one this node holds")
        if self.public_key is None:
            atomic_write_bytes(self.dir / "public_key.bin", bytes(key))
            self.public_key = bytes(key)

    def load(self) -> "NodeSecure":
        """Read back what an earlier process of this node kept (after a restart)."""
        if (self.dir / "share.bin").is_file() and self.party is None:
            self.party = Party.restore(self.name, (self.dir / "context.bin").read_bytes(),
                                       (self.dir / "share.bin").read_bytes())
        if (self.dir / "public_key.bin").is_file():
            self.public_key = (self.dir / "public_key.bin").read_bytes()
        if (self.dir / "sums.json").is_file():
            d = json.loads((self.dir / "sums.json").read_text(encoding="utf-8"))
            self.sums, self.sent = dict(d["sums"]), dict(d["sent"])
        return self

    def record(self) -> dict[str, str]:
        """What the task manifest records of the secure set-up, as this node holds it."""
        return secure_record((self.dir / "context.bin").read_bytes(), self.public_key or b"")

    def _scheme(self) -> ThresholdCKKS:
        if self.scheme is None:
            self.scheme = ThresholdCKKS((self.dir / "context.bin").read_bytes())
        return self.scheme

    def _save(self) -> None:
        atomic_write_json(self.dir / "sums.json", {"sums": self.sums, "sent": self.sent})

    # -- encrypt, decrypt, check -----------------------------------------------------------------
    def encrypt(self, purpose: str, values: np.ndarray) -> EncryptedVector:
        if self.party is None or self.public_key is None:
            raise InputError("this node holds no key share or no joint key for the task (the key chain did not "
                             "reach it)")
        ev = self.party.encrypt(self.public_key, values)
        self.sent[purpose] = ev.digest()
        self._save()
        return ev

    def decrypt(self, purpose: str, ciphertexts: Mapping[str, EncryptedVector], parties: Sequence[str]) -> PartialDecryption:
        """This institution's partial decryption of the sum of ``ciphertexts`` (in name order),
        which it computes itself; its own ciphertext, if it sent one for ``purpose``, must be
        among them unchanged."""
        if self.party is None:
            raise InputError("this node holds no key share for the task")
        mine = self.sent.get(purpose)
        if mine is not None and (self.name not in ciphertexts or ciphertexts[self.name].digest() != mine):
            raise InputError(f"{purpose}: the ciphertexts to decrypt do not hold this institution's own one as it "
                             "sent it; refusing to decrypt")
        total = self._scheme().add([ciphertexts[n] for n in sorted(ciphertexts)])
        digest = total.digest()
        if self.sums.get(purpose, digest) != digest:
            raise InputError(f"{purpose}: asked to decrypt another sum than the one this node decrypted before")
        self.sums[purpose] = digest
        self._save()
        return self.party.partial_decrypt(total, lead=self.name == lead_of(parties))

    def check(self, release: Release, parties: Sequence[str], purpose: str) -> np.ndarray:
        """The released values, after checking them: the release is of ``purpose``, its sum is the
        one this node decrypted (when it did), it has one partial decryption per party, and their
        fusion here is within :func:`~fedmdh.secure.threshold.verify_tolerance` of the released values."""
        if release.purpose != purpose:
            raise InputError(f"the coordinator released {release.purpose}, this step needs {purpose}")
        mine = self.sums.get(purpose)
        if mine is not None and mine != release.sum_digest:
            raise InputError(f"{purpose}: the released sum is not of the ciphertexts this node decrypted")
        if sorted(p.party for p in release.partials) != sorted(parties):
            raise InputError(f"{purpose}: partial decryptions from {sorted(p.party for p in release.partials)}, "
                             f"the task's key is shared by {sorted(parties)}")
        fused = self._scheme().fuse(release.partials)
        if fused.shape != release.released.shape:
            raise InputError(f"{purpose}: {fused.size} values decrypted here, {release.released.size} released")
        off = float(np.max(np.abs(fused - release.released))) if fused.size else 0.0
        tol = verify_tolerance(release.released)
        if not off <= tol:
            raise InputError(f"{purpose}: the released sum is off by {off:.3g} from this node's own fusion of the "
                             f"partial decryptions (allowed {tol:.3g})")
        return release.released

    def close(self) -> None:
        for x in (self.party, self.scheme):
            if x is not None:
                x.close()
        self.party = self.scheme = None


# ---------------------------------------------------------------- the coordinator's side

class Aggregator:
    """The coordinator's public side: the context, homomorphic sums and fusion (no key share)."""

    def __init__(self, context: bytes | None = None) -> None:
        self.scheme = ThresholdCKKS(context) if context is not None else ThresholdCKKS.create()
        self.context = self.scheme.context

    def release(self, purpose: str, ciphertexts: Mapping[str, EncryptedVector],
                partials: Sequence[PartialDecryption]) -> Release:
        total = self.scheme.add([ciphertexts[n] for n in sorted(ciphertexts)])
        parts = tuple(sorted(partials, key=lambda p: p.party))
        return Release(purpose, total.digest(), parts, self.scheme.fuse(parts))

    def close(self) -> None:
        self.scheme.close()


def template_update(algorithm, spec, seed: int) -> Update:
    """An update of the task's layout (keys, shapes, dtypes), from one update on synthetic rows:
    what turns a decrypted sum back into an aggregate (:func:`~fedmdh.secure.aggregation.secure_from_sum`)
    at every peer, whether or not it sent an update itself."""
    from fedmdh.data.federation import InstitutionData
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
    return Update(name, upd.payload, n, upd.metrics)
