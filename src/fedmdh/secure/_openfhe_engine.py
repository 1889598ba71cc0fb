"""The only module that calls OpenFHE: one party's threshold-CKKS engine over bytes.

It imports nothing from fedmdh (only ``openfhe`` and ``numpy``) so that it also runs as a script in
another interpreter: the PyPI wheels of OpenFHE carry an extension built for one CPython version
(``openfhe==1.6.1.0.22.4`` is tagged ``py3-none-any`` but holds a ``cpython-310`` module), so where
the project's own interpreter cannot import it, :mod:`fedmdh.secure.backend` starts this file in an
interpreter that can and speaks to it over a pipe (``python _openfhe_engine.py --serve``).

Everything that enters or leaves an :class:`Engine` is bytes, ints or float64 arrays: ciphertexts,
public keys and the crypto context in OpenFHE's own binary serialisation. A secret key share is
created inside the engine by :meth:`Engine.keygen` and leaves it only through
:meth:`Engine.export_share`, which a deployed node calls to keep its own share in its own state folder.
"""

from __future__ import annotations

import pickle
import struct
import sys

import numpy as np
import openfhe as fhe

_BIN = fhe.BINARY


def _ser(obj) -> bytes:
    return bytes(fhe.Serialize(obj, _BIN))


class Engine:
    """One party's view of a threshold-CKKS task: the shared context and, after keygen, its share."""

    def __init__(self) -> None:
        self.cc = None
        self._secret = None

    # -- the public parameters -------------------------------------------------------------------
    def create_context(self, multiplicative_depth: int, scaling_mod_bits: int, first_mod_bits: int,
                       security: str) -> bytes:
        """A fresh CKKS context (what every party then loads); returns it serialised."""
        p = fhe.CCParamsCKKSRNS()
        p.SetMultiplicativeDepth(int(multiplicative_depth))
        p.SetScalingModSize(int(scaling_mod_bits))
        p.SetFirstModSize(int(first_mod_bits))
        p.SetScalingTechnique(fhe.FIXEDMANUAL)
        p.SetSecurityLevel(getattr(fhe, security))
        cc = fhe.GenCryptoContext(p)
        for feature in (fhe.PKE, fhe.KEYSWITCH, fhe.LEVELEDSHE, fhe.MULTIPARTY):
            cc.Enable(feature)
        self.cc = cc
        return _ser(cc)

    def load_context(self, context: bytes) -> int:
        cc, ok = _deserialize(fhe.DeserializeCryptoContextString, context)
        self.cc = cc
        return self.slots()

    def slots(self) -> int:
        return int(self.cc.GetRingDimension() // 2)

    def ring_dimension(self) -> int:
        return int(self.cc.GetRingDimension())

    # -- this party's share ----------------------------------------------------------------------
    def keygen(self, previous_public: bytes | None) -> bytes:
        """This party's share of the joint key: the first party starts the chain with ``None``,
        each next one extends the previous joint public key; the last one's is the task's key."""
        if self._secret is not None:
            raise RuntimeError("this engine already holds a key share")
        if previous_public is None:
            kp = self.cc.KeyGen()
        else:
            pk, _ = _deserialize(fhe.DeserializePublicKeyString, previous_public)
            kp = self.cc.MultipartyKeyGen(pk)
        self._secret = kp.secretKey
        return _ser(kp.publicKey)

    def export_share(self) -> bytes:
        """This party's key share, serialised, for its own state folder only (a restarted node
        reloads it with :meth:`import_share`); the caller must keep it where only the party reads."""
        if self._secret is None:
            raise RuntimeError("this engine holds no key share")
        return _ser(self._secret)

    def import_share(self, share: bytes) -> None:
        if self._secret is not None:
            raise RuntimeError("this engine already holds a key share")
        self._secret, _ = _deserialize(fhe.DeserializePrivateKeyString, share)

    def partial_decrypt(self, ciphertexts: list[bytes], lead: bool) -> list[bytes]:
        """This party's partial decryption of each ciphertext (``lead`` for exactly one party)."""
        if self._secret is None:
            raise RuntimeError("this engine holds no key share")
        cts = [_ct(b) for b in ciphertexts]
        fn = self.cc.MultipartyDecryptLead if lead else self.cc.MultipartyDecryptMain
        return [_ser(fn([ct], self._secret)[0]) for ct in cts]

    # -- public operations -----------------------------------------------------------------------
    def encrypt(self, public_key: bytes, values: bytes) -> list[bytes]:
        """``values`` (float64 bytes) in chunks of :meth:`slots`, each encrypted under the key."""
        pk, _ = _deserialize(fhe.DeserializePublicKeyString, public_key)
        x = np.frombuffer(values, dtype=np.float64)
        n = self.slots()
        out = []
        for start in range(0, max(x.size, 1), n):
            pt = self.cc.MakeCKKSPackedPlaintext(x[start:start + n].tolist())
            out.append(_ser(self.cc.Encrypt(pk, pt)))
        return out

    def add(self, ciphertexts: list[list[bytes]]) -> list[bytes]:
        """Slot-wise sum of several encrypted vectors, in the order given (exact modular arithmetic)."""
        if not ciphertexts:
            raise ValueError("nothing to add")
        width = len(ciphertexts[0])
        if any(len(c) != width for c in ciphertexts):
            raise ValueError("encrypted vectors of different lengths")
        out = []
        for j in range(width):
            acc = _ct(ciphertexts[0][j])
            for c in ciphertexts[1:]:
                acc = self.cc.EvalAdd(acc, _ct(c[j]))
            out.append(_ser(acc))
        return out

    def fuse(self, partials: list[list[bytes]], length: int) -> bytes:
        """The plaintext from every party's partial decryptions (one list per party, lead first)."""
        width = len(partials[0])
        n = self.slots()
        values: list[float] = []
        for j in range(width):
            parts = [_ct(p[j]) for p in partials]
            pt = self.cc.MultipartyDecryptFusion(parts)
            pt.SetLength(n)
            values.extend(pt.GetRealPackedValue())
        return np.asarray(values[:length], dtype=np.float64).tobytes()


def _deserialize(fn, data: bytes):
    result = fn(data, _BIN)
    if isinstance(result, tuple):
        obj, ok = result
        if not ok:
            raise ValueError(f"OpenFHE could not deserialise ({fn.__name__})")
        return obj, ok
    return result, True


def _ct(data: bytes):
    return _deserialize(fhe.DeserializeCiphertextString, data)[0]


# -- the pipe protocol: length-prefixed pickles of (method, args) / ("ok"|"error", value) -------------
def _read(stream) -> object | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(size))


def _write(stream, obj: object) -> None:
    data = pickle.dumps(obj, protocol=4)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def serve() -> None:
    """Answer requests on stdin/stdout until stdin closes (one engine per process)."""
    engine = Engine()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the protocol stream
    while True:
        req = _read(stdin)
        if req is None:
            return
        method, args = req
        try:
            _write(stdout, ("ok", getattr(engine, method)(*args)))
        except Exception as exc:  # reported to the caller, which raises it
            _write(stdout, ("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__" and "--serve" in sys.argv:
    serve()
