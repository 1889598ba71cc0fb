"""Off-chain content-addressed storage: a blob's name is the sha256 of its bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

from fedmdh.ledger.errors import LedgerError


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    """What the ledger needs from a blob store (a directory, an object store, IPFS, ...)."""

    def put(self, data: bytes) -> str:
        """Store ``data``; return its sha256 (hex)."""
        ...

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest`` (as stored: the caller checks the hash)."""
        ...

    def has(self, digest: str) -> bool: ...

    def locator(self, digest: str) -> str:
        """Where someone else finds the blob (recorded on chain with archived models)."""
        ...


class DirBlobStore:
    """Blobs as files ``<root>/<sha256>``; writes are atomic (temporary file then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise LedgerError(f"{digest!r} is not a sha256 hex digest.")
        return self.root / digest

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        path = self.path(digest)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        if not path.exists():
            raise LedgerError(f"blob {digest} not found in {self.root}.")
        return path.read_bytes()

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def locator(self, digest: str) -> str:
        return self.path(digest).resolve().as_uri()
