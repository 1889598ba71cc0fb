"""Decoding the contract's events from raw logs (topics + data), with eth-abi only."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from eth_abi import decode
from eth_utils import keccak

from fedmdh.ledger.artifacts import load_artifact


@lru_cache(maxsize=1)
def _events() -> dict[str, dict[str, Any]]:
    out = {}
    for item in load_artifact()["abi"]:
        if item["type"] != "event":
            continue
        sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
        out["0x" + keccak(text=sig).hex()] = item
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def decode_log(log: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(event name, arguments)`` of one log of the contract, or ``None`` for another log."""
    topics = log["topics"]
    if not topics:
        return None
    item = _events().get(topics[0].lower() if isinstance(topics[0], str) else "0x" + bytes(topics[0]).hex())
    if item is None:
        return None
    indexed = [i for i in item["inputs"] if i["indexed"]]
    plain = [i for i in item["inputs"] if not i["indexed"]]
    args: dict[str, Any] = {}
    for inp, topic in zip(indexed, topics[1:]):
        raw = bytes.fromhex(topic[2:]) if isinstance(topic, str) else bytes(topic)
        args[inp["name"]] = _norm(decode([inp["type"]], raw)[0])
    data = log["data"]
    raw = bytes.fromhex(data[2:]) if isinstance(data, str) else bytes(data)
    for inp, value in zip(plain, decode([i["type"] for i in plain], raw)):
        args[inp["name"]] = _norm(value)
    for k, v in list(args.items()):
        if isinstance(v, str) and k in ("participant", "submitter") and v.startswith("0x"):
            from web3 import Web3

            args[k] = Web3.to_checksum_address(v)
    return item["name"], args


def decode_logs(logs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [d for d in (decode_log(log) for log in logs) if d is not None]
