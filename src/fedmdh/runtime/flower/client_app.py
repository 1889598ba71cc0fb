"""fedmdh's ClientApp: hands each Flower message to the institution's node service and returns its reply.

A SuperNode starts this module in a fresh process for every message, so it holds nothing: the
institution's rows, ledger key, client state and models stay with the long-running node service
(:mod:`fedmdh.runtime.node`, started by ``fedmdh node start`` on the same machine). The two talk
over a Unix socket in the node's state folder, authenticated with a key only the node's user can
read (``multiprocessing.connection``'s HMAC challenge). The SuperNode's ``--node-config`` names
that folder: ``fedmdh-state="/path/to/state"``.

Imports stay light (flwr, numpy, the standard library): each message pays for them.
"""

from __future__ import annotations

from multiprocessing.connection import Client
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmdh.runtime.flower.wire import from_records, pack, to_records, unpack

STATE_KEY = "fedmdh-state"
SOCKET = "node.sock"
AUTHKEY = "node.authkey"
#: the longest a node may take for one message (a round of training and its chain work)
TIMEOUT_S = 3600.0

app = ClientApp()


def relay(msg: Message, context: Context) -> Message:
    """Forward ``msg`` to the node service named by the SuperNode's node config; reply with its answer."""
    meta, arrays = from_records(msg.content)
    meta = {**meta, "message_type": msg.metadata.message_type, "run_id": int(msg.metadata.run_id)}
    try:
        state = Path(str(context.node_config[STATE_KEY]))
        with Client(str(state / SOCKET), family="AF_UNIX", authkey=(state / AUTHKEY).read_bytes()) as conn:
            conn.send_bytes(pack(meta, arrays))
            if not conn.poll(TIMEOUT_S):
                raise TimeoutError(f"the node service did not answer within {TIMEOUT_S:.0f} s")
            reply_meta, reply_arrays = unpack(conn.recv_bytes())
    except KeyError:
        reply_meta, reply_arrays = {"error": f"the SuperNode's --node-config lacks {STATE_KEY}=\"STATE_DIR\"; "
                                             "start nodes with `fedmdh node start`."}, {}
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
        reply_meta, reply_arrays = {"error": f"the node service is not answering ({type(exc).__name__}: {exc}); "
                                             "is `fedmdh node start` running?"}, {}
    return Message(to_records(reply_meta, reply_arrays), reply_to=msg)


app.train()(relay)
app.query()(relay)
