"""The deployment's message encodings keep every array's dtype, shape (0-d included) and bytes."""

from __future__ import annotations

import numpy as np
import pytest

from fedmdh.runtime.flower.wire import from_records, pack, to_records, unpack

ARRAYS = {
    "zero_d": np.array(7, dtype=np.int64),
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f64.big": np.array([1e300, -0.0, np.pi]),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    "u/inst/net.0.weight": np.ones((0, 4), dtype=np.float32),
}
META = {"cmd": "round", "round": 3, "metrics": {"loss": 0.1 + 0.2}, "names": ["a", "b"]}


@pytest.mark.parametrize("codec", ["socket", "flower"])
def test_round_trip_keeps_dtype_shape_and_bytes(codec):
    if codec == "socket":
        meta, arrays = unpack(pack(META, ARRAYS))
    else:
        meta, arrays = from_records(to_records(META, ARRAYS))
    assert meta == META
    assert sorted(arrays) == sorted(ARRAYS)
    for k, v in ARRAYS.items():
        assert arrays[k].dtype == v.dtype and arrays[k].shape == v.shape, k
        assert arrays[k].tobytes() == np.ascontiguousarray(v).tobytes(), k


def test_unpack_refuses_what_is_not_a_message():
    with pytest.raises(ValueError):
        unpack(b"not a message")
    with pytest.raises(ValueError):
        unpack(pack(META, ARRAYS) + b"x")
