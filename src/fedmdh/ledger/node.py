"""The embedded chain in a process of its own, served over JSON-RPC on 127.0.0.1.

py-evm is pure Python: executing a round's transactions in the training process would hold the
interpreter lock the training needs, so nothing would overlap. ``fedmdh run`` therefore starts this
small node (``python -m fedmdh.ledger.node``), talks to it like to any JSON-RPC node, and overlaps
each round's chain work with the next round's training. Besides the standard ``eth_*`` methods of
eth-tester it answers ``fedmdh_mineBatch``: execute signed transactions in order in one new block
and return each one's hash, revert reason and receipt (one state-trie update per batch, not per
transaction). The process lives as long as the run: :meth:`EmbeddedNode.stop` ends it by PID, and
it exits by itself when the process that started it goes away (its stdin closes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedmdh.ledger.errors import LedgerError

READY = "fedmdh embedded node listening on "


def _jsonable(x: Any) -> Any:
    if isinstance(x, (bytes, bytearray)):
        return "0x" + bytes(x).hex()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def serve(port: int = 0) -> None:
    """Run the node until killed; prints ``READY + url`` once it accepts requests."""
    from fedmdh.ledger.chain import Chain

    chain = Chain.embedded()
    provider = chain.w3.provider
    lock = threading.Lock()

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        method, params = request.get("method"), request.get("params") or []
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": request.get("id")}
        try:
            if method == "fedmdh_mineBatch":
                done = chain.mine_batch([bytes.fromhex(r[2:]) for r in params[0]])
                out["result"] = None if done is None else [
                    {"hash": h, "reason": reason, "receipt": chain.receipt(h)} for h, reason in done]
                return out
            if method in ("eth_call", "eth_estimateGas") and params and "from" not in params[0]:
                params = [{**params[0], "from": chain.funder.address}, *params[1:]]  # nodes default it; eth-tester not
            response = provider.make_request(method, params)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as a JSON-RPC error
            out["error"] = {"code": -32000, "message": str(exc)}
            return out
        return {**out, **_jsonable({k: v for k, v in dict(response).items() if k in ("result", "error")})}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection for the whole run
        disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stalls

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            with lock:  # one connection per client thread (keep-alive); the chain itself serves one at a time
                reply = [answer(r) for r in body] if isinstance(body, list) else answer(body)
            data = json.dumps(reply).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    def orphaned() -> None:  # the parent holds our stdin; when it exits, however it exits, so do we
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"{READY}http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


class EmbeddedNode:
    """A :func:`serve` process on 127.0.0.1, started now and stopped by PID."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child never blocks
        # our end of its stdin stays open while we live: the node exits when it reads EOF (see serve)
        self.proc = subprocess.Popen([sys.executable, "-m", "fedmdh.ledger.node"], stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith(READY):
            self.stop()
            self._stderr.seek(0)
            raise LedgerError(f"the embedded chain process did not start: {(line + self._stderr.read()).strip()[-500:]}")
        self.url = line[len(READY):].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fh in (self.proc.stdin, self.proc.stdout):
            if fh is not None:
                fh.close()
        self._stderr.close()


if __name__ == "__main__":  # pragma: no cover - exercised through EmbeddedNode
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
