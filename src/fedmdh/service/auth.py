"""The service's token: who may submit tasks and read them.

Every ``/api/tasks`` request (reads included) carries the token, as ``Authorization: Bearer TOKEN``
(scripts) or as the session cookie the page's sign-in sets (``/login``). The cookie holds an HMAC
of the token, not the token; it is HttpOnly and SameSite=Strict, and a cookie-authenticated write
whose ``Origin`` is not the service's own is refused, so another site open in the same browser
cannot submit or read tasks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fedmdh.errors import InputError

COOKIE = "fedmdh_session"
MIN_TOKEN_CHARS = 16


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (its first line, stripped); one-line errors for a missing or weak one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: token file not found; give a file holding the token (e.g. `openssl rand -hex 32 "
                         f"> {path}`), or leave --token-file out to have one made.")
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise InputError(f"{path}: the token is {len(token)} characters long; use at least {MIN_TOKEN_CHARS} "
                         "(e.g. `openssl rand -hex 32`).")
    return token


def token_for(folder: Path, token_file: str | Path | None) -> tuple[str, Path]:
    """The token and the file it is in: ``token_file``, or ``folder/token`` (made once, mode 600)."""
    if token_file is not None:
        return read_token_file(token_file), Path(token_file)
    path = folder / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return read_token_file(path), path


class TokenAuth:
    """Checks a request's bearer token or session cookie against the service's token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")
        self.session = hmac.new(self._token, b"fedmdh-service-session", hashlib.sha256).hexdigest()

    def bearer_ok(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode("utf-8"), self._token)

    def token_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.strip().encode("utf-8"), self._token)

    def cookie_ok(self, cookie: str | None) -> bool:
        return bool(cookie) and hmac.compare_digest(cookie.encode("utf-8"), self.session.encode("utf-8"))
