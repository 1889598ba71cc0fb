"""fedmdh's ServerApp: the coordinator's loop (:class:`~fedmdh.runtime.coordinator.Coordinator`)
over Flower's ``Grid``.

The task arrives in the run config (``task``: base64 of the :class:`DeployTask` JSON, set by
``fedmdh deploy run``). Progress goes to the ServerApp's log as lines ``fedmdh-event {json}``,
which ``flwr run --stream`` shows to the submitter and ``fedmdh deploy run`` turns into a
progress display. One message per node per step; replies are matched to their node by the
message they answer (a reply's source id need not be the node's).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmdh.runtime.flower.wire import from_records, to_records

EVENT = "fedmdh-event "
PULL_S = 0.1
#: how much longer than the others a node that missed the last round is waited for
OPTIONAL_GRACE_S = 10.0

app = ServerApp()


class TaskFailed(RuntimeError):
    """The coordinator stopped the task (its ``failed`` event says why)."""


def emit(kind: str, **fields: Any) -> None:
    """One progress line in the ServerApp's log."""
    print(EVENT + json.dumps({"event": kind, **fields}, default=float), flush=True)


class GridTransport:
    """The coordinator's :class:`~fedmdh.runtime.coordinator.Transport` over a Flower ``Grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.step = 0

    def wait_nodes(self, count: int, timeout: float) -> list[int]:
        from fedmdh.runtime.coordinator import TaskError

        t_end = time.monotonic() + timeout
        while True:
            ids = sorted(int(i) for i in self.grid.get_node_ids())
            if len(ids) >= count:
                return ids
            if time.monotonic() > t_end:
                raise TaskError(f"{len(ids)} of the {count} nodes the task needs connected within {timeout:.0f} s")
            time.sleep(0.5)

    def exchange(self, requests: Mapping[int, tuple[dict, dict]], timeout: float,
                 optional: frozenset[int] = frozenset()) -> dict[int, tuple[dict, dict]]:
        self.step += 1
        messages, node_of = [], {}
        for node, (meta, arrays) in requests.items():
            kind = "train" if meta.get("cmd") == "round" else "query"
            # a message outlives its step by little: a node that comes back does not work through stale ones
            messages.append(Message(to_records(meta, arrays), dst_node_id=int(node), message_type=kind,
                                    group_id=str(self.step), ttl=timeout + 30.0))
        ids = list(self.grid.push_messages(messages))
        for mid, node in zip(ids, requests):
            node_of[mid] = node
        replies: dict[int, tuple[dict, dict]] = {}
        pending = set(ids)
        t_end = time.monotonic() + timeout
        required = {mid for mid in ids if node_of[mid] not in optional}
        while pending and time.monotonic() < t_end:
            if not (pending & required):  # only nodes that missed the last round are left: a short grace
                t_end = min(t_end, time.monotonic() + OPTIONAL_GRACE_S)
                required = pending
            for msg in self.grid.pull_messages(list(pending)):
                mid = msg.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                node = node_of[mid]
                if msg.has_error():
                    replies[node] = ({"error": f"node {node}: {msg.error.reason}"}, {})
                else:
                    replies[node] = from_records(msg.content)
            if pending:
                time.sleep(PULL_S)
        for mid in pending:
            replies[node_of[mid]] = ({"error": f"node {node_of[mid]}: no reply within {timeout:.0f} s"}, {})
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmdh.errors import FedmdhError
    from fedmdh.runtime.coordinator import Coordinator, DeployTask

    raw = str(context.run_config.get("task", ""))
    if not raw:
        emit("failed", message="the run config has no task; submit tasks with `fedmdh deploy run`")
        raise TaskFailed("no task in the run config")
    task = DeployTask.from_json(json.loads(base64.b64decode(raw)))
    emit("started", task_id=task.task_id, rounds=task.experiment.get("rounds"), out_dir=task.out_dir)

    def on_round(rec) -> None:
        emit("round", round=rec.round, rmse=rec.rmse, r2=rec.r2, val_mse=rec.val_mse, seconds=rec.seconds)

    def before_round(rnd: int) -> None:
        emit("round_start", round=rnd)
        pause = task.pause_before.get(rnd)
        if pause:  # a rehearsal (`fedmdh deploy local --fault`) acts during the pause
            emit("pause", round=rnd, seconds=pause)
            time.sleep(pause)

    try:
        final = Coordinator(task, GridTransport(grid), on_round=on_round,
                            say=lambda line: emit("note", message=line), before_round=before_round).run()
    except FedmdhError as exc:
        emit("failed", message=str(exc))
        raise TaskFailed(str(exc)) from None  # Flower marks the run failed and flushes its log
    emit("finished", rmse=final.get("rmse"), r2=final.get("r2"), out_dir=task.out_dir)
