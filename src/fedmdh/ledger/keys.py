"""One Ethereum account per institution, kept in an eth-account keystore file (generated on first use).

The passphrase comes from ``$FEDMDH_KEY_PASSPHRASE`` or, on a terminal, a prompt. The key
derivation is the keystore standard's (scrypt by default); ``$FEDMDH_KEY_KDF`` and
``$FEDMDH_KEY_KDF_ITERATIONS`` choose a cheaper one (tests, throwaway embedded chains).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from fedmdh.errors import InputError

PASSPHRASE_ENV = "FEDMDH_KEY_PASSPHRASE"


@dataclass(frozen=True)
class KeystoreSettings:
    """Where keystore files live and how new ones are encrypted."""

    directory: Path
    kdf: str = "scrypt"
    iterations: int | None = None  # None: eth-account's default for the kdf
    passphrase: str | None = None  # None: $FEDMDH_KEY_PASSPHRASE, else a prompt

    @classmethod
    def from_env(cls, directory: str | Path, passphrase: str | None = None) -> "KeystoreSettings":
        iters = os.environ.get("FEDMDH_KEY_KDF_ITERATIONS")
        return cls(
            Path(directory),
            kdf=os.environ.get("FEDMDH_KEY_KDF", "scrypt"),
            iterations=int(iters) if iters else None,
            passphrase=passphrase,
        )

    def resolve_passphrase(self, purpose: str) -> str:
        if self.passphrase is not None:
            return self.passphrase
        env = os.environ.get(PASSPHRASE_ENV)
        if env is not None:
            return env
        if sys.stdin is not None and sys.stdin.isatty():
            return getpass.getpass(f"passphrase for the keystore in {self.directory} ({purpose}): ")
        raise InputError(
            f"no passphrase for the keystore in {self.directory}; set ${PASSPHRASE_ENV} or run on a terminal."
        )


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json"


def load_or_create(name: str, settings: KeystoreSettings) -> LocalAccount:
    """The account of ``name`` from ``<directory>/<name>.json``; created (and saved) on first use."""
    path = settings.directory / _file_name(name)
    passphrase = settings.resolve_passphrase(name)
    if path.exists():
        try:
            key = Account.decrypt(json.loads(path.read_text(encoding="utf-8")), passphrase)
        except ValueError:
            raise InputError(f"{path}: wrong passphrase for {name}'s keystore; check ${PASSPHRASE_ENV}.") from None
        return Account.from_key(key)
    account = Account.create()
    kw = {"kdf": settings.kdf}
    if settings.iterations is not None:
        kw["iterations"] = settings.iterations
    blob = Account.encrypt(account.key, passphrase, **kw)
    settings.directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(blob), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return account
