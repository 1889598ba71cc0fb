"""The FedLedger contract: its Vyper source, the shipped compiled artifact and the compiler.

The artifact (``contracts/FedLedger.json``: ABI, bytecode, compiler version, source sha256) is
package data, so running fedmdh needs no compiler; ``python -m fedmdh.ledger.artifacts`` rebuilds
it, and a test checks that recompiling the source reproduces it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

CONTRACT = "FedLedger"


def _contracts_dir() -> Path:
    return Path(str(resources.files("fedmdh.ledger") / "contracts"))


def source_path() -> Path:
    return _contracts_dir() / f"{CONTRACT}.vy"


def artifact_path() -> Path:
    return _contracts_dir() / f"{CONTRACT}.json"


def compile_source(source: str | None = None) -> dict[str, Any]:
    """Compile the contract with the installed vyper; returns the artifact dict."""
    import vyper

    src = source if source is not None else source_path().read_text(encoding="utf-8")
    out = vyper.compile_code(src, output_formats=["abi", "bytecode", "bytecode_runtime"])
    return {
        "contract": CONTRACT,
        "compiler": f"vyper {vyper.__version__}",
        "source_sha256": hashlib.sha256(src.encode("utf-8")).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        "bytecode_runtime": out["bytecode_runtime"],
    }


@lru_cache(maxsize=1)
def load_artifact() -> dict[str, Any]:
    """The shipped artifact (ABI and bytecode)."""
    return json.loads(artifact_path().read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _function(name: str) -> tuple[bytes, tuple[str, ...]]:
    from eth_utils import keccak

    for item in load_artifact()["abi"]:
        if item.get("type") == "function" and item["name"] == name:
            types = tuple(i["type"] for i in item["inputs"])
            return keccak(text=f"{name}({','.join(types)})")[:4], types
    raise KeyError(f"the contract has no function {name!r}")


def call_data(name: str, *args: Any) -> bytes:
    """The transaction data calling the contract's function ``name`` with ``args`` (ABI-encoded).

    Straight from the ABI with eth-abi: several times faster than a web3 contract object's
    ``encode_abi``, which matters when a round sends a dozen transactions.
    """
    from eth_abi import encode

    selector, types = _function(name)
    return selector + encode(list(types), list(args))


def write_artifact() -> Path:
    path = artifact_path()
    path.write_text(json.dumps(compile_source(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # pragma: no cover
    print(f"wrote {write_artifact()}")


def function_name(tx: dict[str, Any]) -> str:
    """The contract function a transaction calls (``deploy`` for the creation, ``transfer`` without data)."""
    if tx["to"] is None:
        return "deploy"
    if not tx["data"]:
        return "transfer"
    for item in load_artifact()["abi"]:
        if item.get("type") == "function" and _function(item["name"])[0] == tx["data"][:4]:
            return item["name"]
    return "0x" + tx["data"][:4].hex()


#: an archive manifest's ``held_by`` when each institution's node keeps its own model (a deployed task)
HELD_BY_INSTITUTIONS = "institutions"
