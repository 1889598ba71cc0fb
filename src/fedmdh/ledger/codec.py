"""Canonical bytes of updates and aggregates, and the fixed point of on-chain vectors.

An update or a payload is serialized as one header line of JSON (sorted keys: kind, institution,
sample count, metrics, and each array's name, dtype and shape, arrays sorted by name) followed by
the arrays' bytes, little-endian and C-ordered. The same update always gives the same bytes, so
its sha256 is what an institution commits on chain and what a verifier recomputes from the blob.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from fedmdh import jsonsafe
from fedmdh.algorithms.base import Update
from fedmdh.ledger.errors import LedgerError

MAGIC = b"fedmdh-blob/1\n"
#: on-chain vectors are integers: value * SCALE rounded to nearest; resolution 1 / SCALE
SCALE = 10**12
#: the contract packs two values per word (see pack); each must satisfy |value| < LIMIT
BIAS = LIMIT = 2**87
HALF = 2**128 - 1
MAX_VECTOR = 128


def _arrays_bytes(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
    layout, chunks = [], []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.require(a, dtype=a.dtype.newbyteorder("<"), requirements="C")  # keeps 0-d arrays 0-d
        layout.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        chunks.append(a.tobytes(order="C"))
    return layout, chunks


def _encode(header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    layout, chunks = _arrays_bytes(arrays)
    header = {**header, "arrays": layout}
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + line + b"\n" + b"".join(chunks)


def _decode(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not blob.startswith(MAGIC):
        raise LedgerError("blob is not a fedmdh blob (bad magic).")
    end = blob.index(b"\n", len(MAGIC))
    try:
        header = jsonsafe.loads(blob[len(MAGIC):end])  # bounded depth, whatever the recursion limit
    except ValueError as exc:  # JSONTooDeep, JSONDecodeError, UnicodeDecodeError
        raise LedgerError(f"the blob's header is not readable JSON ({str(exc)[:120]}).") from None
    pos = end + 1
    arrays: dict[str, np.ndarray] = {}
    for item in header["arrays"]:
        dt = np.dtype(item["dtype"])
        count = int(np.prod(item["shape"], dtype=np.int64))
        arr = np.frombuffer(blob, dtype=dt, count=count, offset=pos).reshape(item["shape"])
        arrays[item["name"]] = arr.astype(dt.newbyteorder("="))
        pos += count * dt.itemsize
    if pos != len(blob):
        raise LedgerError("blob has trailing bytes.")
    return header, arrays


def encode_update(update: Update) -> bytes:
    """The canonical bytes of one update (what its sha256 commitment covers)."""
    header = {
        "kind": "update",
        "institution": update.institution,
        "num_examples": int(update.num_examples),
        "metrics": {k: float(v) for k, v in sorted(update.metrics.items())},
    }
    return _encode(header, update.payload)


def decode_update(blob: bytes) -> Update:
    header, arrays = _decode(blob)
    if header.get("kind") != "update":
        raise LedgerError("blob is not an update.")
    return Update(header["institution"], arrays, int(header["num_examples"]), dict(header["metrics"]))


def encode_payload(payload: Mapping[str, np.ndarray]) -> bytes:
    """The canonical bytes of a server state / aggregate."""
    return _encode({"kind": "payload"}, payload)


def decode_payload(blob: bytes) -> dict[str, np.ndarray]:
    header, arrays = _decode(blob)
    if header.get("kind") != "payload":
        raise LedgerError("blob is not a payload.")
    return arrays


# ---------------------------------------------------------------- on-chain vectors


def default_onchain_vectors(update: Update) -> dict[str, np.ndarray]:
    """The summary every update has: its scalar metrics, then the mean of each payload array.

    Weighted by sample counts, the mean of these is what an averaging algorithm's aggregate has
    (the per-array mean is linear), and it is small enough for the chain whatever the payload.
    """
    out: dict[str, np.ndarray] = {}
    for k in sorted(update.metrics):
        out[f"metric:{k}"] = np.array([float(update.metrics[k])])
    for k in sorted(update.payload):
        if len(out) >= MAX_VECTOR:
            break
        a = np.asarray(update.payload[k], dtype=np.float64)
        out[f"mean:{k}"] = np.array([a.mean() if a.size else 0.0])
    return out


def onchain_vectors(algorithm: Any, update: Update) -> dict[str, np.ndarray]:
    """``algorithm.onchain_vectors(update)`` when the algorithm defines it, else the default summary."""
    hook = getattr(algorithm, "onchain_vectors", None)
    vectors = hook(update) if callable(hook) else default_onchain_vectors(update)
    return {k: np.asarray(v, dtype=np.float64).ravel() for k, v in vectors.items()}


def flatten(vectors: Mapping[str, np.ndarray]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """Layout ``[(name, size), ...]`` (sorted names) and the concatenated float64 values."""
    names = sorted(vectors)
    layout = [(n, int(np.asarray(vectors[n]).size)) for n in names]
    flat = np.concatenate([np.asarray(vectors[n], dtype=np.float64).ravel() for n in names]) if names else np.zeros(0)
    if flat.size > MAX_VECTOR:
        raise LedgerError(f"on-chain vectors have {flat.size} values; the contract takes at most {MAX_VECTOR}.")
    return layout, flat


def to_fixed(values: np.ndarray) -> list[int]:
    """``round(x * SCALE)`` computed exactly from each float64 (nearest integer, ties to even)."""
    out = []
    for x in np.asarray(values, dtype=np.float64).ravel():
        if not np.isfinite(x):
            raise LedgerError(f"on-chain vector value {x} is not finite.")
        v = round(Fraction(float(x)) * SCALE)
        if not -LIMIT < v < LIMIT:
            raise LedgerError(f"on-chain vector value {x} is too large for the contract's fixed point "
                              f"(|value| must stay below {LIMIT / SCALE:.3g}).")
        out.append(v)
    return out


def pack(values: Sequence[int]) -> list[int]:
    """Two fixed-point values per 256-bit word, as the contract takes them: value + BIAS in each
    128-bit half, the even-indexed value in the low half (an odd count pads a zero)."""
    vals = [int(v) for v in values]
    if any(not -LIMIT < v < LIMIT for v in vals):
        raise LedgerError(f"fixed-point values must lie strictly between -{LIMIT} and {LIMIT}.")
    if len(vals) % 2:
        vals.append(0)
    return [(vals[i] + BIAS) | ((vals[i + 1] + BIAS) << 128) for i in range(0, len(vals), 2)]


def unpack(words: Sequence[int], count: int) -> list[int]:
    """The inverse of :func:`pack` for ``count`` values."""
    out = []
    for w in words:
        out += [(int(w) & HALF) - BIAS, (int(w) >> 128) - BIAS]
    return out[:count]


def decode_transaction(raw_tx: str | bytes) -> dict[str, Any]:
    """The fields of a signed transaction (legacy or typed): ``to`` (checksummed, ``None`` for a
    deployment), ``gas``, ``value``, ``nonce``, ``chain_id`` and ``data``; :class:`LedgerError` when
    the bytes are not a transaction."""
    import rlp
    from eth_account.typed_transactions import TypedTransaction
    from eth_utils import to_checksum_address
    from hexbytes import HexBytes

    try:
        raw = bytes.fromhex(raw_tx[2:]) if isinstance(raw_tx, str) else bytes(raw_tx)
        if raw and raw[0] < 0x7F:
            d = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
            to, gas, value, nonce, chain_id, data = (bytes(d["to"]), d["gas"], d["value"], d["nonce"], d["chainId"],
                                                     bytes(d["data"]))
        else:
            nonce, _, gas, to, value, data, v, _, _ = rlp.decode(raw)
            nonce, gas, value, v = (int.from_bytes(x, "big") for x in (nonce, gas, value, v))
            chain_id = (v - 35) // 2 if v >= 35 else None
    except Exception:  # noqa: BLE001 - any decoding failure means the same: not a transaction
        raise LedgerError("its signed bytes do not decode as a transaction") from None
    return {"to": to_checksum_address(to) if to else None, "gas": int(gas), "value": int(value), "nonce": int(nonce),
            "chain_id": chain_id, "data": bytes(data)}


def committed_vector(raw_tx: str | bytes) -> list[int]:
    """The packed vector a recorded ``commit`` transaction carries (its calldata, signed with it)."""
    from eth_abi import decode

    data = decode_transaction(raw_tx)["data"]
    try:
        return [int(w) for w in decode(["uint256", "bytes32", "uint256", "uint256[]"], data[4:])[3]]
    except Exception:  # noqa: BLE001
        raise LedgerError("its calldata does not decode as a commitment") from None


def from_fixed(values: list[int]) -> np.ndarray:
    return np.array([v / SCALE for v in values], dtype=np.float64)
