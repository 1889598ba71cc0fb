"""The service's task store: one SQLite file (``tasks.sqlite3``) in the service's folder.

A task row holds the validated request (``spec``), its status, the round it reached, the
federation's figures, the final metrics and the error of a failed task; every round's metrics are a
row of ``rounds``. Nothing lives only in memory: a restarted service reads every task back, and
:meth:`TaskStore.interrupt_running` turns the tasks that were running when it stopped into
``interrupted``.

One connection, guarded by a lock, serves the request handlers and the runner's thread; the file
is in WAL mode so a reader never waits for a round being written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedmdh import jsonsafe

DB_NAME = "tasks.sqlite3"
SCHEMA_VERSION = 1

#: every status a task can have; the last three are final
STATUSES = ("queued", "running", "finished", "failed", "interrupted")
FINAL = ("finished", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    created    TEXT NOT NULL,
    started    TEXT,
    finished   TEXT,
    status     TEXT NOT NULL,
    spec       TEXT NOT NULL,
    federation TEXT,
    round      INTEGER NOT NULL DEFAULT 0,
    final      TEXT,
    error      TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    task_id TEXT NOT NULL,
    round   INTEGER NOT NULL,
    record  TEXT NOT NULL,
    PRIMARY KEY (task_id, round)
);
"""


class StoreDamaged(RuntimeError):
    """A stored value that is not the JSON the service wrote (the store was altered or damaged)."""


def _load(text: str, what: str) -> Any:
    """A stored JSON value, its depth bounded (:mod:`fedmdh.jsonsafe`); :class:`StoreDamaged` when unreadable."""
    try:
        return jsonsafe.loads(text)
    except (ValueError, TypeError) as exc:
        raise StoreDamaged(f"the task store holds an unreadable {what} ({str(exc)[:200]}); restore "
                           f"{DB_NAME} from a backup or start the service on a new --folder.") from None


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class TaskRow:
    """One task as stored."""

    id: str
    created: str
    status: str
    spec: dict[str, Any]
    round: int = 0
    started: str | None = None
    finished: str | None = None
    federation: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    error: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)


class TaskStore:
    """Tasks and their rounds in ``folder/tasks.sqlite3``."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self.path}: task store of schema {version}; this fedmdh reads {SCHEMA_VERSION}.")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes

    def add(self, task_id: str, spec: dict[str, Any], federation: dict[str, Any] | None) -> None:
        """A new queued task."""
        with self._lock:
            self._db.execute(
                "INSERT INTO tasks (id, created, status, spec, federation) VALUES (?, ?, 'queued', ?, ?)",
                (task_id, now(), json.dumps(spec), json.dumps(federation) if federation is not None else None),
            )

    def set_running(self, task_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET status='running', started=?, error=NULL WHERE id=?", (now(), task_id))

    def add_round(self, task_id: str, rnd: int, record: dict[str, Any]) -> None:
        """Store one round's metrics and advance the task's round."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO rounds (task_id, round, record) VALUES (?, ?, ?)",
                             (task_id, rnd, json.dumps(record, default=float)))
            self._db.execute("UPDATE tasks SET round=MAX(round, ?) WHERE id=?", (rnd, task_id))

    def finish(self, task_id: str, final: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET status='finished', finished=?, final=? WHERE id=?",
                             (now(), json.dumps(final, default=float), task_id))

    def end(self, task_id: str, status: str, error: str) -> None:
        """End a task as ``failed`` or ``interrupted``, saying why."""
        assert status in ("failed", "interrupted")
        with self._lock:
            self._db.execute("UPDATE tasks SET status=?, finished=?, error=? WHERE id=?",
                             (status, now(), error, task_id))

    def requeue(self, task_id: str) -> None:
        """Queue an interrupted task again (for a runtime that resumes)."""
        with self._lock:
            self._db.execute("UPDATE tasks SET status='queued', finished=NULL, error=NULL WHERE id=?", (task_id,))

    def interrupt_running(self) -> list[str]:
        """Mark every task still ``running`` as ``interrupted`` (the service stopped under it); their ids."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            rows = self._db.execute("SELECT id, round, spec FROM tasks WHERE status='running'").fetchall()
            for r in rows:
                try:
                    rounds = _load(r["spec"], f"task {r['id']}").get("rounds")
                except (StoreDamaged, AttributeError):
                    rounds = "?"
                self._db.execute(
                    "UPDATE tasks SET status='interrupted', finished=?, error=? WHERE id=?",
                    (now(), f"the service stopped while this task was running (after round {r['round']} of "
                            f"{rounds}); submit it again to rerun it", r["id"]),
                )
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ reads

    def _row(self, r: sqlite3.Row) -> TaskRow:
        return TaskRow(
            id=r["id"], created=r["created"], status=r["status"], spec=_load(r["spec"], f"task {r['id']}"),
            round=r["round"], started=r["started"], finished=r["finished"],
            federation=_load(r["federation"], f"federation of task {r['id']}") if r["federation"] else None,
            final=_load(r["final"], f"result of task {r['id']}") if r["final"] else None, error=r["error"],
        )

    def get(self, task_id: str, with_metrics: bool = True) -> TaskRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
            if r is None:
                return None
            row = self._row(r)
            if with_metrics:
                row.metrics = [_load(x["record"], f"round of task {task_id}") for x in self._db.execute(
                    "SELECT record FROM rounds WHERE task_id=? ORDER BY round", (task_id,))]
        return row

    def rounds_after(self, task_id: str, after: int) -> list[dict[str, Any]]:
        """The stored rounds of a task after round ``after``, in order."""
        with self._lock:
            return [_load(x["record"], f"round of task {task_id}") for x in self._db.execute(
                "SELECT record FROM rounds WHERE task_id=? AND round>? ORDER BY round", (task_id, after))]

    def list(self) -> list[TaskRow]:
        """Every task, newest first, without per-round metrics."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM tasks ORDER BY seq DESC").fetchall()
            return [self._row(r) for r in rows]

    def latest_rounds(self) -> dict[str, dict[str, Any]]:
        """The last stored round of every task (for the task list)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT r.task_id, r.record FROM rounds r JOIN (SELECT task_id, MAX(round) AS m FROM rounds "
                "GROUP BY task_id) x ON r.task_id = x.task_id AND r.round = x.m").fetchall()
        return {r["task_id"]: _load(r["record"], f"round of task {r['task_id']}") for r in rows}

    def queued(self) -> list[str]:
        """Ids of the queued tasks in submission order."""
        with self._lock:
            return [r["id"] for r in self._db.execute("SELECT id FROM tasks WHERE status='queued' ORDER BY seq")]
