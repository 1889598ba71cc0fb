"""Messages as ``(meta, arrays)``: JSON metadata plus named numpy arrays, and their two encodings.

- :func:`pack` / :func:`unpack`: bytes for the node's local socket (the ClientApp process hands
  each Flower message to the long-running node service through it);
- :func:`to_records` / :func:`from_records`: Flower's ``RecordDict`` (a ``ConfigRecord`` holding
  the metadata as JSON and an ``ArrayRecord`` holding the arrays packed into one ``uint8``
  Array; dtype and shape survive).

numpy and the standard library only (plus flwr for the record functions): the ClientApp imports it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"fedmdh-wire/1\n"
META_RECORD = "fedmdh.meta"
ARRAY_RECORD = "fedmdh.arrays"
PACKED = "packed"

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]


def pack(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """``MAGIC``, a length-prefixed JSON header (meta and the arrays' names, dtypes, shapes), the bytes."""
    arrays = arrays or {}
    layout, chunks = [], []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.require(a, dtype=a.dtype.newbyteorder("<"), requirements="C")  # keeps 0-d arrays 0-d
        layout.append([name, a.dtype.str, list(a.shape)])
        chunks.append(a.tobytes(order="C"))
    head = json.dumps({"meta": dict(meta), "arrays": layout}, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + b"".join(chunks)


def unpack(data: bytes) -> tuple[Meta, Arrays]:
    """The inverse of :func:`pack`; raises ``ValueError`` on anything else."""
    if not data.startswith(MAGIC):
        raise ValueError("not a fedmdh wire message")
    pos = len(MAGIC)
    (n,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    head = json.loads(data[pos:pos + n])
    pos += n
    arrays: Arrays = {}
    for name, dtype, shape in head["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=pos).reshape(shape).astype(
            dt.newbyteorder("="))
        pos += count * dt.itemsize
    if pos != len(data):
        raise ValueError("trailing bytes after a fedmdh wire message")
    return head["meta"], arrays


def to_records(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None):
    """A Flower ``RecordDict`` carrying ``meta`` (JSON in a ConfigRecord) and ``arrays`` (one ``uint8``
    Array in an ArrayRecord: the arrays as :func:`pack` writes them).

    One Array, not one per array: Flower moves each Array of a message as an object of its own, and a
    message of fedmdh's (every institution's update, tens of arrays each) then costs seconds more per
    round than the same bytes in one.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    records: dict[str, Any] = {META_RECORD: ConfigRecord({"json": json.dumps(dict(meta), sort_keys=True)})}
    if arrays:
        records[ARRAY_RECORD] = ArrayRecord({PACKED: Array(np.frombuffer(pack({}, arrays), dtype=np.uint8))})
    return RecordDict(records)


def from_records(content) -> tuple[Meta, Arrays]:
    """The ``(meta, arrays)`` of a ``RecordDict`` made by :func:`to_records`."""
    meta = json.loads(str(content[META_RECORD]["json"])) if META_RECORD in content else {}
    arrays: Arrays = {}
    if ARRAY_RECORD in content:
        record = content[ARRAY_RECORD]
        if list(record.keys()) != [PACKED]:
            raise ValueError("not a fedmdh message: its array record is not one packed array")
        _, arrays = unpack(record[PACKED].numpy().tobytes())
    return meta, arrays
