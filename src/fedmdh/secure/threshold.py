"""Threshold (n-out-of-n) CKKS with OpenFHE: joint key, encryption, deterministic sums, joint decryption.

No cryptography is written here: every operation is OpenFHE's (``KeyGen`` / ``MultipartyKeyGen``,
``Encrypt``, ``EvalAdd``, ``MultipartyDecryptLead`` / ``MultipartyDecryptMain``,
``MultipartyDecryptFusion``); this module only chunks float64 vectors into slots, moves OpenFHE's
binary serialisations around as bytes and fixes the order of every sum.

The flow for ``n`` institutions, in name order:

1. one party creates the context (:meth:`ThresholdCKKS.create`); its bytes are public;
2. :func:`joint_keygen`: party 1 runs ``KeyGen``, each next party ``MultipartyKeyGen`` on the
   previous public key; the last public key encrypts for the sum of all ``n`` secret shares;
3. each institution encrypts its vector under that key (:meth:`ThresholdCKKS.encrypt`);
4. anyone adds the ciphertexts in name order (:meth:`ThresholdCKKS.add`): exact modular
   arithmetic, so the serialised sum is the same bytes at every peer (a ledger can commit it);
5. every party partially decrypts the sum with its share (:meth:`Party.partial_decrypt`, the
   first party "lead"); :meth:`ThresholdCKKS.fuse` combines all ``n`` partial decryptions. Fewer
   than ``n`` give noise, not the sum (tested). Fusion is *not* bit-reproducible: OpenFHE's CKKS
   decoding adds fresh noise of the size of its error estimate (about 1e-9 here), so the released
   sum is what must be committed, and a peer checks it against its own fusion within
   :data:`VERIFY_ATOL` (:func:`verify_sum`).

CKKS is approximate: the decrypted sum differs from the float64 sum by about 1e-9 in absolute
terms (1e-9 with the default 59-bit scaling modulus, 1e-6 with 50 bits) (measured in ``tests/test_secure.py`` and
``benchmarks/secure_overhead.py``). OpenFHE supports threshold CKKS in the IND-CPA model only
(its ``Threshold_FHE.md``): partial decryptions carry OpenFHE's fixed extra noise, not a provable
noise flooding; see ``docs/security.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmdh.secure.backend import EngineClient


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters. Only additions are needed, so one level; 128-bit classical security.

    ``scaling_mod_bits`` sets the precision (about ``2**-scaling_mod_bits`` times OpenFHE's noise),
    ``first_mod_bits`` with it the largest magnitude a slot can hold (about ``2**(first_mod_bits +
    scaling_mod_bits - scaling_mod_bits - 1)``, i.e. far beyond any sum here).
    """

    multiplicative_depth: int = 1
    scaling_mod_bits: int = 59
    first_mod_bits: int = 60
    security: str = "HEStd_128_classic"


@dataclass(frozen=True)
class EncryptedVector:
    """A float64 vector of ``length`` values encrypted in ``len(chunks)`` ciphertexts (OpenFHE bytes)."""

    chunks: tuple[bytes, ...]
    length: int

    @property
    def nbytes(self) -> int:
        return int(sum(len(c) for c in self.chunks))

    def digest(self) -> str:
        """sha256 of the length and the ciphertexts' bytes: what a ledger commits."""
        h = hashlib.sha256(str(self.length).encode() + b"\0")
        for c in self.chunks:
            h.update(len(c).to_bytes(8, "little"))
            h.update(c)
        return h.hexdigest()


@dataclass(frozen=True)
class PartialDecryption:
    """One party's partial decryption of an :class:`EncryptedVector` (``lead``: the first party's)."""

    party: str
    lead: bool
    chunks: tuple[bytes, ...]
    length: int

    @property
    def nbytes(self) -> int:
        return int(sum(len(c) for c in self.chunks))


def _encrypt(engine: EngineClient, public_key: bytes, values: np.ndarray) -> EncryptedVector:
    x = np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel())
    if not np.isfinite(x).all():
        raise ValueError("only finite values can be encrypted.")
    return EncryptedVector(tuple(engine.encrypt(public_key, x.tobytes())), int(x.size))


class ThresholdCKKS:
    """The public side of a task: its context, encryption under the joint key, sums and fusion.

    Holds no secret; any peer (a verifier too) can build one from the context's bytes.
    """

    def __init__(self, context: bytes, engine: EngineClient | None = None) -> None:
        self.context = bytes(context)
        self._engine = engine if engine is not None else EngineClient()
        if engine is None:
            self._engine.load_context(self.context)
        self.slots = int(self._engine.slots())

    @classmethod
    def create(cls, params: CKKSParams | None = None) -> "ThresholdCKKS":
        p = params or CKKSParams()
        engine = EngineClient()
        context = engine.create_context(p.multiplicative_depth, p.scaling_mod_bits, p.first_mod_bits, p.security)
        return cls(context, engine)

    @property
    def ring_dimension(self) -> int:
        return int(self._engine.ring_dimension())

    def encrypt(self, public_key: bytes, values: np.ndarray) -> EncryptedVector:
        return _encrypt(self._engine, public_key, values)

    def add(self, vectors: Sequence[EncryptedVector]) -> EncryptedVector:
        """The slot-wise sum, in the order given (callers pass institution-name order)."""
        if not vectors:
            raise ValueError("add needs at least one encrypted vector.")
        length = vectors[0].length
        if any(v.length != length for v in vectors):
            raise ValueError(f"encrypted vectors of different lengths: {[v.length for v in vectors]}.")
        return EncryptedVector(tuple(self._engine.add([list(v.chunks) for v in vectors])), length)

    def fuse(self, partials: Sequence[PartialDecryption]) -> np.ndarray:
        """The plaintext from the partial decryptions of every party (exactly one of them lead)."""
        if not partials:
            raise ValueError("fuse needs the partial decryptions.")
        leads = [p for p in partials if p.lead]
        if len(leads) != 1:
            raise ValueError(f"exactly one partial decryption must be the lead's, got {len(leads)}.")
        ordered = leads + [p for p in partials if not p.lead]
        raw = self._engine.fuse([list(p.chunks) for p in ordered], ordered[0].length)
        return np.frombuffer(raw, dtype=np.float64).copy()

    def close(self) -> None:
        self._engine.close()


class Party:
    """One institution's share of the secret key, living in its own engine (a child process when
    OpenFHE runs outside this interpreter): the share never crosses this object's interface."""

    def __init__(self, name: str, context: bytes) -> None:
        self.name = name
        self._engine = EngineClient()
        self._engine.load_context(bytes(context))
        self.public_key: bytes | None = None

    def keygen(self, previous_public: bytes | None) -> bytes:
        """This party's link of the key chain: ``None`` for the first party, else the previous key."""
        self.public_key = self._engine.keygen(previous_public)
        return self.public_key

    def encrypt(self, public_key: bytes, values: np.ndarray) -> EncryptedVector:
        """This party's own vector encrypted under the joint key (a public operation, run here so
        that the clear values never leave the party's side)."""
        return _encrypt(self._engine, public_key, values)

    def export_share(self) -> bytes:
        """The key share's bytes, for the party's own state folder (a deployed node that restarts
        reloads it with :meth:`restore`); nothing else may receive them."""
        return bytes(self._engine.export_share())

    @classmethod
    def restore(cls, name: str, context: bytes, share: bytes, public_key: bytes | None = None) -> "Party":
        party = cls(name, context)
        party._engine.import_share(bytes(share))
        party.public_key = public_key
        return party

    def partial_decrypt(self, vector: EncryptedVector, lead: bool) -> PartialDecryption:
        return PartialDecryption(self.name, lead, tuple(self._engine.partial_decrypt(list(vector.chunks), lead)),
                                 vector.length)

    def close(self) -> None:
        self._engine.close()


def joint_keygen(parties: Sequence[Party]) -> bytes:
    """Run the key chain through ``parties`` in the order given; returns the joint public key."""
    if len(parties) < 2:
        raise ValueError("threshold encryption needs at least two parties.")
    key: bytes | None = None
    for p in parties:
        key = p.keygen(key)
    assert key is not None
    return key


#: How far a released sum may lie from a peer's own fusion of the same partial decryptions.
#: OpenFHE's CKKS decoding adds fresh Gaussian noise of about its error estimate (measured: two
#: fusions of the same partial decryptions differ by about 1.6e-9), so fusion is not bit-reproducible.
VERIFY_ATOL = 1e-7
#: ... plus this times the largest released magnitude: decoding runs a float64 FFT, whose rounding
#: grows with the largest slot (measured: two fusions differ by 1.3e-9 at |values| <= 1e3 and
#: 2e-15 times the largest value beyond about 1e6, e.g. 1.9e-6 at 1e9).
VERIFY_RTOL = 1e-13


def verify_tolerance(released: np.ndarray, atol: float = VERIFY_ATOL) -> float:
    """How far a peer's own fusion may lie from the released values (see :data:`VERIFY_ATOL`)."""
    r = np.asarray(released, dtype=np.float64)
    return float(atol + VERIFY_RTOL * (float(np.max(np.abs(r))) if r.size else 0.0))


def verify_sum(scheme: ThresholdCKKS, ciphertexts: Mapping[str, EncryptedVector], total: EncryptedVector,
               partials: Sequence[PartialDecryption], released: np.ndarray, atol: float = VERIFY_ATOL) -> None:
    """Check a secure sum from what a ledger would hold, as any peer can: the committed ciphertexts
    (by institution), their claimed sum, every party's partial decryption and the released values.

    The sum of the ciphertexts in name order must be ``total`` byte for byte (OpenFHE's addition is
    exact modular arithmetic; tested across processes); the partial decryptions must be one per
    party; their fusion must be within ``atol`` of ``released`` (decoding is randomised, see
    :data:`VERIFY_ATOL`, so the released bits themselves are what a ledger must commit). Raises
    ``ValueError`` naming what differs. It cannot tell a wrong partial decryption from a right one
    (no proofs; see docs/security.md).
    """
    recomputed = scheme.add([ciphertexts[n] for n in sorted(ciphertexts)])
    if recomputed.digest() != total.digest():
        raise ValueError("the sum of the committed ciphertexts is not the claimed sum.")
    names = sorted(p.party for p in partials)
    if names != sorted(ciphertexts):
        raise ValueError(f"partial decryptions from {names}, ciphertexts from {sorted(ciphertexts)}.")
    fused = scheme.fuse(partials)
    released = np.asarray(released, dtype=np.float64)
    tol = verify_tolerance(released, atol)
    if fused.shape != released.shape or not np.all(np.abs(fused - released) <= tol):
        worst = float(np.max(np.abs(fused - released))) if fused.shape == released.shape else float("nan")
        raise ValueError(f"the fusion of the partial decryptions is not the released sum (off by {worst:.3g}, "
                         f"allowed {tol:.3g}).")


def joint_decrypt(scheme: ThresholdCKKS, parties: Sequence[Party], vector: EncryptedVector) -> np.ndarray:
    """Every party's partial decryption (the first one lead), fused."""
    return scheme.fuse([p.partial_decrypt(vector, i == 0) for i, p in enumerate(parties)])


@dataclass
class SumTranscript:
    """What crossed the wire for one secure sum (for byte counts and for tests that inspect it)."""

    ciphertexts: dict[str, EncryptedVector]
    total: EncryptedVector
    partials: list[PartialDecryption]
    released: np.ndarray

    @property
    def bytes_up(self) -> int:
        """Ciphertexts plus partial decryptions sent by the institutions."""
        return sum(v.nbytes for v in self.ciphertexts.values()) + sum(p.nbytes for p in self.partials)


class ThresholdGroup:
    """A task's threshold-CKKS set-up in one process: the public scheme and every party's engine.

    The in-process simulator uses it; each :class:`Party` is still a separate engine, so nothing
    here reads a share. ``secure_sum`` is steps 3-5 of the module's flow.
    """

    def __init__(self, names: Sequence[str], params: CKKSParams | None = None) -> None:
        self.names = tuple(sorted(names))
        self.scheme = ThresholdCKKS.create(params)
        self.parties = [Party(n, self.scheme.context) for n in self.names]
        self.public_key = joint_keygen(self.parties)
        self.last: SumTranscript | None = None
        self._executor = None

    def secure_sum(self, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The sum of the institutions' vectors, computed under encryption (in name order)."""
        names = sorted(vectors)
        if set(names) != set(self.names):
            raise ValueError(f"secure_sum needs one vector from each of {self.names}, got {names}.")
        pool = self._pool()
        enc = [pool.submit(p.encrypt, self.public_key, vectors[p.name]) for p in self.parties]
        cts = {p.name: f.result() for p, f in zip(self.parties, enc)}
        total = self.scheme.add([cts[n] for n in names])
        dec = [pool.submit(p.partial_decrypt, total, i == 0) for i, p in enumerate(self.parties)]
        partials = [f.result() for f in dec]
        released = self.scheme.fuse(partials)
        self.last = SumTranscript(cts, total, partials, released)
        return released

    __call__ = secure_sum  # a ThresholdGroup is a SecureSum

    def bytes_up(self) -> int:
        """What the institutions sent for the last secure sum (ciphertexts and partial decryptions)."""
        return self.last.bytes_up if self.last is not None else 0

    def _pool(self):
        """The parties work side by side, as on their own machines, when each engine is a process of
        its own (an in-process OpenFHE runs them one after the other)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            from fedmdh.secure.backend import runs_in_process

            self._executor = ThreadPoolExecutor(max_workers=1 if runs_in_process() else len(self.parties))
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        for p in self.parties:
            p.close()
        self.scheme.close()

    def __enter__(self) -> "ThresholdGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
