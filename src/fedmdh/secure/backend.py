"""Where OpenFHE runs: in this process when it imports here, else in an interpreter that has it.

``openfhe`` on PyPI ships one extension module built for one CPython version inside a wheel tagged
``py3-none-any`` (1.6.1.0.22.4, the Ubuntu 22.04 build, holds ``openfhe.cpython-310-x86_64-linux-gnu.so``),
so on this project's Python 3.11 ``pip install openfhe`` succeeds and ``import openfhe`` fails with
``No module named 'openfhe.openfhe'``. The engine (:mod:`fedmdh.secure._openfhe_engine`) needs only
``openfhe`` and ``numpy``, so it can run in another interpreter: set ``FEDMDH_OPENFHE_PYTHON`` to a
Python that imports ``openfhe`` (``make test`` builds ``.venv-fhe`` with CPython 3.10 for this) and
every :class:`EngineClient` is a child process of that interpreter, spoken to over a pipe.
"""

from __future__ import annotations

import functools
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV_PYTHON = "FEDMDH_OPENFHE_PYTHON"
_ENGINE_FILE = Path(__file__).with_name("_openfhe_engine.py")


class SecureUnavailable(RuntimeError):
    """OpenFHE cannot be used here; the message says why and what to install."""


@functools.lru_cache(maxsize=1)
def _in_process() -> str | None:
    """``None`` when ``import openfhe`` works in this interpreter, else the import error."""
    try:
        import openfhe  # noqa: F401
    except Exception as exc:  # ImportError, or a broken extension module
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=4)
def _external_ok(python: str) -> str | None:
    try:
        r = subprocess.run([python, "-c", "import openfhe, numpy"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {exc}"
    if r.returncode != 0:
        return f"{python} cannot import openfhe: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return None


def engine_python() -> str | None:
    """The interpreter for the engine: ``$FEDMDH_OPENFHE_PYTHON``, else a ``.venv-fhe`` beside this
    environment's folder (``make test`` makes ``.venv-fhe`` beside ``.venv``), else ``None``."""
    python = os.environ.get(ENV_PYTHON)
    if python:
        return python
    sibling = Path(sys.prefix).parent / ".venv-fhe" / "bin" / "python"
    return str(sibling) if sibling.exists() else None


def unavailable_reason() -> str | None:
    """``None`` when threshold CKKS can run here; else one line saying why not and what to do."""
    if _in_process() is None:
        return None
    python = engine_python()
    if python:
        err = _external_ok(python)
        return None if err is None else f"the OpenFHE interpreter {python} is not usable ({err})."
    return (f"openfhe does not import in this Python {sys.version_info.major}.{sys.version_info.minor} "
            f"({_in_process()}); its PyPI wheels hold an extension for one CPython version (1.6.1.0.22.4: "
            f"3.10). Set {ENV_PYTHON} to a Python that imports openfhe (make test builds .venv-fhe with "
            "python3.10 -m venv .venv-fhe && .venv-fhe/bin/pip install 'openfhe==1.6.1.0.22.4' numpy).")


def runs_in_process() -> bool:
    """Whether OpenFHE runs inside this interpreter (else each engine is a child process)."""
    return _in_process() is None


def require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise SecureUnavailable(reason)


class EngineClient:
    """One OpenFHE engine (one party's key share at most), in this process or in a child process.

    Method calls are forwarded by name: ``client.encrypt(pk, data)`` runs
    :meth:`fedmdh.secure._openfhe_engine.Engine.encrypt` wherever the engine lives.
    """

    def __init__(self) -> None:
        require()
        self._proc: subprocess.Popen | None = None
        self._local: Any = None
        if _in_process() is None:
            from fedmdh.secure._openfhe_engine import Engine

            self._local = Engine()
        else:
            self._proc = subprocess.Popen([str(engine_python()), str(_ENGINE_FILE), "--serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, method: str, *args: Any) -> Any:
        if self._local is not None:
            return getattr(self._local, method)(*args)
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise SecureUnavailable("the OpenFHE engine process has exited")
        data = pickle.dumps((method, args), protocol=4)
        proc.stdin.write(struct.pack("<Q", len(data)) + data)
        proc.stdin.flush()
        head = proc.stdout.read(8)
        if len(head) < 8:
            raise SecureUnavailable(f"the OpenFHE engine process died during {method}")
        (size,) = struct.unpack("<Q", head)
        status, value = pickle.loads(proc.stdout.read(size))
        if status != "ok":
            raise RuntimeError(f"OpenFHE {method}: {value}")
        return value

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return functools.partial(self.call, method)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def __del__(self) -> None:  # best effort; close() is the way
        try:
            self.close()
        except Exception:
            pass
