"""``fedmdh serve``: the Regression Task service (the page and its REST API) under uvicorn."""

from __future__ import annotations

import errno
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedmdh.errors import InputError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use; choose another with --port (0: any free port).") from None
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; keep 127.0.0.1 unless you must.")] = (
        "127.0.0.1"),
    folder: Annotated[Path, typer.Option("--folder", help="The service's folder: task store, uploads, runs.")] = Path(
        "runs/service"),
    token_file: Annotated[
        Optional[Path], typer.Option("--token-file", help="File holding the token for writes and task reads "
                                                          "[default: FOLDER/token, made on first start].")
    ] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in a browser, signed in.")] = False,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest uploaded CSV file, in MB.")] = 100.0,
) -> None:
    """Run the Regression Task service: a page and a REST API to submit tasks, follow them, verify, predict.

    Prints the page's address; the token in --token-file (or FOLDER/token) signs in.
    """
    import uvicorn

    from fedmdh.service.app import create_app
    from fedmdh.service.auth import token_for
    from fedmdh.service.lock import lock_folder

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {port}.")
    if not max_upload_mb > 0:
        raise InputError(f"--max-upload-mb must be > 0, got {max_upload_mb}.")
    folder = folder.expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create the service's folder ({exc.strerror}); choose another --folder.") \
            from None
    lock = lock_folder(folder)  # one service per folder, taken before the task store is opened
    try:
        token, token_path = token_for(folder, token_file)
        sock = _bind(host, port)
    except BaseException:
        lock.release()
        raise
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    lock.describe(url)
    app = create_app(folder, token, max_upload_bytes=int(max_upload_mb * 1e6), token_hint=str(token_path))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="on")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl+C / SIGTERM: end event streams now, not after the grace period
            app.state.begin_shutdown()
            super().handle_exit(sig, frame)

    server = Server(config)
    print(f"fedmdh service on {url} (folder {folder}; token in {token_path})", flush=True)
    print(f"sign in with the token, or open {url}login?token=<the token>; Ctrl+C stops it", flush=True)
    if host not in _LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach it may try the token, and traffic is not "
              "encrypted; put it behind TLS or keep 127.0.0.1.", file=sys.stderr, flush=True)
    if open_page:
        threading.Timer(0.5, webbrowser.open, [f"{url}login?token={token}"]).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        lock.release()
