"""Where a task runs: the :class:`TaskRuntime` seam and the simulator behind it.

The service never trains anything itself. It validates a request into a :class:`TaskSpec`, and its
runner hands the spec to a runtime, one task at a time::

    final = runtime.run(spec, run_dir, progress, stop)

A runtime

- trains the task described by ``spec`` and writes ``run_dir`` in the layout of ``fedmdh run``
  (``models/<institution>/``, ``metrics.jsonl``, ``final_metrics.json``, ``federation.json``,
  ``config.toml`` and, unless the ledger is off, ``ledger/``): the ledger, verify, model and
  predict endpoints read only that folder, through the same library calls as ``fedmdh ledger``,
  ``fedmdh model get`` and ``fedmdh predict``;
- calls ``progress(round, rounds, record)`` after every round, ``record`` being
  :meth:`fedmdh.runtime.simulator.RoundRecord.to_dict` (JSON values only);
- checks ``stop`` (a :class:`threading.Event`) at least once a round and, once it is set, ends
  the task at the next round boundary by raising :class:`TaskStopped` (a deployment may leave its
  nodes running; it only has to stop waiting for them);
- raises :class:`fedmdh.errors.InputError` for a problem of the user's input (shown as it is) and
  anything else for a fault (shown with its type);
- returns the content of ``final_metrics.json``.

``can_resume`` says whether :meth:`TaskRuntime.resume` may continue an interrupted task from the
state it left in ``run_dir`` (a deployment resumes from the last round finalized on chain). The
simulator keeps no checkpoint, so it cannot: an interrupted simulator task is submitted again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fedmdh.config import ExperimentConfig
from fedmdh.jsonsafe import read_file
from fedmdh.ledger.options import LedgerOptions

#: progress callback of a runtime: (round, rounds, record of that round)
RoundCallback = Callable[[int, int, dict[str, Any]], None]


class TaskStopped(Exception):
    """The service asked the runtime to stop; raised at a round boundary."""

    def __init__(self, after_round: int) -> None:
        super().__init__(f"stopped after round {after_round}")
        self.after_round = after_round


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: everything a runtime needs, JSON-serialisable.

    ``institutions`` and ``test`` are paths readable by the runtime (the service's stored uploads, or
    paths given in the request); ``display`` maps each such path to the name the user gave it (an
    uploaded file's name), for messages.
    """

    id: str
    institutions: tuple[str, ...]
    test: str
    target: str
    algorithm: str
    rounds: int
    seed: int
    ledger: str = "embedded"
    chain_rpc: str | None = None
    exclude: tuple[str, ...] = ()
    display: dict[str, str] = field(default_factory=dict)

    def config(self) -> ExperimentConfig:
        """The ExperimentConfig of ``fedmdh run`` with the same options."""
        return ExperimentConfig(
            institutions=self.institutions, test=self.test, target=self.target, algorithms=(self.algorithm,),
            seeds=1, first_seed=self.seed, rounds=self.rounds, exclude=self.exclude,
        )

    def ledger_options(self) -> LedgerOptions:
        return LedgerOptions.parse(self.ledger, self.chain_rpc, "embedded")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["institutions"] = list(self.institutions)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        d = dict(d)
        d["institutions"] = tuple(d["institutions"])
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)

    def public(self, text: str) -> str:
        """``text`` with every stored path replaced by the name the user knows it by."""
        for path, name in sorted(self.display.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(path, name)
        return text


@runtime_checkable
class TaskRuntime(Protocol):
    """Runs one task; see the module docstring for the contract."""

    name: str
    can_resume: bool

    def run(self, spec: TaskSpec, run_dir: Path, progress: RoundCallback, stop: threading.Event) -> dict[str, Any]:
        """Train ``spec`` from its first round, writing ``run_dir``; return the final metrics."""
        ...

    def resume(self, spec: TaskSpec, run_dir: Path, progress: RoundCallback,
               stop: threading.Event) -> dict[str, Any]:
        """Continue an interrupted task from what ``run_dir`` holds (only where ``can_resume``)."""
        ...


class SimulatorRuntime:
    """The in-process simulator: :func:`fedmdh.experiment.runner.run_experiment`, as ``fedmdh run`` calls it."""

    name = "simulator"
    can_resume = False

    def run(self, spec: TaskSpec, run_dir: Path, progress: RoundCallback, stop: threading.Event) -> dict[str, Any]:
        from fedmdh.experiment.runner import load_tables, run_experiment

        cfg = spec.config()
        tables = load_tables(cfg)

        def on_round(algorithm: str, seed: int, rnd: int, rounds: int, rec: Any) -> None:
            progress(rnd, rounds, rec.to_dict())
            if stop.is_set():
                raise TaskStopped(rnd)

        run_experiment(cfg, spec.algorithm, run_dir, progress=on_round, tables=tables,
                       ledger=spec.ledger_options())
        return read_file(Path(run_dir) / "final_metrics.json")

    def resume(self, spec: TaskSpec, run_dir: Path, progress: RoundCallback,
               stop: threading.Event) -> dict[str, Any]:
        raise NotImplementedError("the simulator keeps no checkpoint; submit the task again")
