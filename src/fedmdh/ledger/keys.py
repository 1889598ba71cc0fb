"""One Ethereum account per institution, kept in an eth-account keystore file (generated on first use).

Keystores live outside run folders: ``$FEDMDH_KEYSTORE``, else ``$FEDMDH_HOME/keystore``, else
``~/.fedmdh/keystore`` (the embedded chain's throwaway accounts in its ``embedded/`` subfolder), so
that handing a run folder to someone does not hand over the keys that signed it. Files are created
with mode 0600 from the start (folders 0700). The passphrase comes from ``$FEDMDH_KEY_PASSPHRASE``
or, on a terminal, a prompt; it may be empty only for the embedded chain's default keystore. The key
derivation is the keystore standard's (scrypt by default); ``$FEDMDH_KEY_KDF`` and
``$FEDMDH_KEY_KDF_ITERATIONS`` choose a cheaper one (tests, throwaway embedded chains).

This module imports eth-account only when a key is loaded, so the name check is cheap to import.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedmdh.errors import InputError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

PASSPHRASE_ENV = "FEDMDH_KEY_PASSPHRASE"
KEYSTORE_ENV = "FEDMDH_KEYSTORE"
HOME_ENV = "FEDMDH_HOME"


def fedmdh_home() -> Path:
    """``$FEDMDH_HOME``, else ``~/.fedmdh``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".fedmdh"


def default_keystore() -> Path:
    """The keystore folder of runs on a node: ``$FEDMDH_KEYSTORE``, else ``fedmdh_home() / "keystore"``."""
    env = os.environ.get(KEYSTORE_ENV)
    return Path(env).expanduser() if env else fedmdh_home() / "keystore"


def embedded_keystore() -> Path:
    """The keystore folder of the embedded chain's throwaway accounts (empty passphrase by default)."""
    return default_keystore() / "embedded"


@dataclass(frozen=True)
class KeystoreSettings:
    """Where keystore files live and how new ones are encrypted."""

    directory: Path
    kdf: str = "scrypt"
    iterations: int | None = None  # None: eth-account's default for the kdf
    passphrase: str | None = None  # None: $FEDMDH_KEY_PASSPHRASE, else a prompt
    allow_empty_passphrase: bool = False  # only the embedded chain's throwaway accounts

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
            value = self.passphrase
        elif os.environ.get(PASSPHRASE_ENV) is not None:
            value = os.environ[PASSPHRASE_ENV]
        elif sys.stdin is not None and sys.stdin.isatty():
            value = getpass.getpass(f"passphrase for the keystore in {self.directory} ({purpose}): ")
        else:
            raise InputError(
                f"no passphrase for the keystore in {self.directory}; set ${PASSPHRASE_ENV} or run on a terminal."
            )
        if not value and not self.allow_empty_passphrase:
            raise InputError(
                f"the passphrase for the keystore in {self.directory} is empty: anyone who reads its files holds "
                f"the keys; set ${PASSPHRASE_ENV} to a passphrase (empty is allowed only for the embedded chain)."
            )
        return value


def key_file_name(name: str) -> str:
    """The keystore file of ``name``: characters a file name cannot safely hold become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json"


def check_key_names(names: Sequence[str]) -> None:
    """Refuse names that would share one keystore file (``x y`` and ``x_y``), naming both."""
    seen: dict[str, str] = {}
    for name in names:
        file = key_file_name(name)
        if file in seen and seen[file] != name:
            raise InputError(
                f"institutions {seen[file]!r} and {name!r} would share one signing key (keystore file {file}): "
                "their names differ only in characters a file name cannot hold; rename one of the files."
            )
        seen.setdefault(file, name)


def _private_folder(folder: Path) -> None:
    """Create ``folder`` and any missing parent with mode 0700."""
    missing = [d for d in (folder, *folder.parents) if not d.exists()]
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)


def _write_new(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if it does not exist yet, mode 0600 from creation on.

    The bytes go to a temporary file created 0600 (``O_EXCL``), which is then linked to ``path``:
    atomic, and a concurrent creator wins without either file being half written. Returns
    ``False`` when ``path`` existed already.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create(name: str, settings: KeystoreSettings) -> "LocalAccount":
    """The account of ``name`` from ``<directory>/<name>.json``; created (and saved) on first use."""
    from eth_account import Account

    path = settings.directory / key_file_name(name)
    passphrase = settings.resolve_passphrase(name)
    if not path.exists():
        account = Account.create()
        kw = {"kdf": settings.kdf}
        if settings.iterations is not None:
            kw["iterations"] = settings.iterations
        blob = Account.encrypt(account.key, passphrase, **kw)
        _private_folder(settings.directory)
        if _write_new(path, json.dumps(blob)):
            return account
        # another process created it meanwhile: use theirs
    try:
        keystore = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: {name}'s keystore file cannot be read as a keystore; restore it from a "
                         "backup.") from None
    try:
        key = Account.decrypt(keystore, passphrase)
    except ValueError:
        raise InputError(f"{path}: wrong passphrase for {name}'s keystore; check ${PASSPHRASE_ENV}.") from None
    return Account.from_key(key)
