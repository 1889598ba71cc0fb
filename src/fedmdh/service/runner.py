"""The task runner: one worker thread that runs queued tasks, one at a time, through a runtime.

Each round the runtime reports is stored first (so a reader, a restarted service or a late
subscriber sees it) and then published to the task's live subscribers (:class:`EventHub`, read by
the server-sent-events endpoint). Stopping the runner sets the runtime's ``stop`` event: the task
in flight ends at its next round boundary and is stored as ``interrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from pathlib import Path
from typing import Any

from fedmdh.errors import FedmdhError
from fedmdh.service.runtime import TaskRuntime, TaskSpec, TaskStopped
from fedmdh.service.store import TaskStore, now

log = logging.getLogger("fedmdh.service")


class EventHub:
    """Fan-out of a task's events from the runner's thread to asyncio subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]] = {}

    def subscribe(self, task_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subs.setdefault(task_id, []).append((asyncio.get_running_loop(), q))
        return q

    def unsubscribe(self, task_id: str, q: asyncio.Queue) -> None:
        with self._lock:
            subs = [s for s in self._subs.get(task_id, []) if s[1] is not q]
            if subs:
                self._subs[task_id] = subs
            else:
                self._subs.pop(task_id, None)

    def publish(self, task_id: str, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            subs = list(self._subs.get(task_id, []))
        for loop, q in subs:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (event, data))
            except RuntimeError:  # that subscriber's loop is closed
                pass

    def close_all(self) -> None:
        """Tell every subscriber the service is stopping."""
        with self._lock:
            ids = list(self._subs)
        for task_id in ids:
            self.publish(task_id, "shutdown", {})


def task_dir(folder: Path, task_id: str) -> Path:
    return folder / "tasks" / task_id


def run_dir(folder: Path, task_id: str) -> Path:
    """The task's run folder, in the layout of ``fedmdh run``."""
    return task_dir(folder, task_id) / "run"


class TaskRunner:
    """Runs the store's queued tasks in submission order on one worker thread."""

    def __init__(self, store: TaskStore, runtime: TaskRuntime, folder: Path, hub: EventHub) -> None:
        self.store, self.runtime, self.folder, self.hub = store, runtime, Path(folder), hub
        self.stop_event = threading.Event()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fedmdh-task-runner", daemon=True)
        self.current: str | None = None

    def start(self) -> None:
        """Mark tasks left running by a stopped service as interrupted, queue the queued ones, start."""
        for task_id in self.store.interrupt_running():
            log.warning("task %s was running when the service stopped: interrupted", task_id)
        for task_id in self.store.queued():
            self._queue.put(task_id)
        self._thread.start()

    def submit(self, task_id: str) -> None:
        """Queue a stored ``queued`` task; one that has rounds already (requeued to resume) is resumed."""
        self._queue.put(task_id)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop after the current round; True when the worker ended within ``timeout``."""
        self.stop_event.set()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while not self.stop_event.is_set():
            item = self._queue.get()
            if item is None or self.stop_event.is_set():
                break
            try:
                self._run_one(item)
            except Exception:  # noqa: BLE001 - the worker must outlive any one task
                log.exception("task runner: unexpected error")

    def _status(self, task_id: str) -> None:
        row = self.store.get(task_id, with_metrics=False)
        if row is not None:
            self.hub.publish(task_id, "status", {"status": row.status, "round": row.round,
                                                 "rounds": row.spec["rounds"], "error": row.error})

    def _run_one(self, task_id: str) -> None:
        row = self.store.get(task_id, with_metrics=False)
        if row is None or row.status != "queued":
            return
        resume = row.round > 0  # only a runtime that can resume gets such a task back (see the resume endpoint)
        spec = TaskSpec.from_dict(row.spec)
        self.current = task_id
        self.store.set_running(task_id)
        self._status(task_id)
        print(f"{now()} task {task_id}: {'resuming' if resume else 'running'} {spec.algorithm}, {spec.rounds} rounds "
              f"({self.runtime.name})", flush=True)

        def progress(rnd: int, rounds: int, record: dict[str, Any]) -> None:
            self.store.add_round(task_id, rnd, record)
            self.hub.publish(task_id, "round", {**record, "rounds": rounds})

        out = run_dir(self.folder, task_id)
        try:
            if resume:
                final = self.runtime.resume(spec, out, progress, self.stop_event)
            else:
                final = self.runtime.run(spec, out, progress, self.stop_event)
        except TaskStopped as exc:
            self.store.end(task_id, "interrupted", f"the service was stopped after round {exc.after_round} of "
                                                   f"{spec.rounds}; submit the task again to rerun it")
        except FedmdhError as exc:
            self.store.end(task_id, "failed", spec.public(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a fault of the run, kept with its traceback
            (task_dir(self.folder, task_id) / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            self.store.end(task_id, "failed", spec.public(f"{type(exc).__name__}: {exc}"))
        else:
            self.store.finish(task_id, final)
        finally:
            self.current = None
        row = self.store.get(task_id, with_metrics=False)
        print(f"{now()} task {task_id}: {row.status}" + (f" ({row.error})" if row.error else ""), flush=True)
        self._status(task_id)
