"""How the ``fedmdh`` commands print: tables that stay whole in logs, progress on a terminal or not.

- :func:`print_table`: on a terminal, a rich table as wide as the terminal; elsewhere (a file, a
  pipe) the title on a line of its own and the table at the width its content needs, so no cell
  is cut or wrapped.
- :class:`TrainingProgress`: a rich bar on a terminal; elsewhere a plain line every tenth of a run's
  rounds (so a benchmark writing to a log says where it is).
- :class:`CountProgress`: the same for counted work (formulas featurized).

User text (names of files, columns, institutions) must never be read as rich markup: cells and
messages go through :func:`cell` / ``markup=False``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text


def cell(value: Any) -> Text:
    """A table cell or header showing ``value`` verbatim (no markup, e.g. ``RMSE [e_form]``)."""
    return value if isinstance(value, Text) else Text(str(value))


def table(*headers: Any, title: str | None = None) -> Table:
    """A rich table whose headers are shown verbatim."""
    return Table(*[Column(header=cell(h)) for h in headers], title=Text(title) if title else None)


def add_row(t: Table, *cells: Any, bold: bool = False) -> None:
    """Add a row shown verbatim (optionally bold)."""
    t.add_row(*[Text(str(c), style="bold" if bold else "") for c in cells])


def print_line(console: Console, text: str) -> None:
    """Print ``text`` as it is: no markup, no highlighting, no wrapping."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_table(console: Console, t: Table) -> None:
    """Print ``t``; off a terminal, at the width of its content, its title on a line of its own."""
    if console.is_terminal:
        console.print(t)
        return
    title, t.title = t.title, None
    if title:
        print_line(console, title.plain if isinstance(title, Text) else str(title))
    wide = Console(width=100_000, file=console.file, no_color=True, force_terminal=False)
    width = Measurement.get(wide, wide.options, t).maximum
    Console(width=width, file=console.file, no_color=True, force_terminal=False, highlight=False).print(t)


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class TrainingProgress:
    """Progress of ``runs`` training runs of ``rounds`` rounds each, as a ``progress`` callback.

    Use as a context manager; call it as ``progress(algorithm, seed, round, rounds, record)``.
    """

    def __init__(self, console: Console, label: str, runs: int, rounds: int) -> None:
        self.console = console
        self.label = label
        self.runs = runs
        self.rounds = rounds
        self.total = runs * rounds
        self.every = max(1, rounds // 10)
        self.finished = 0
        self.live = console.is_terminal
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TrainingProgress":
        self._t0 = time.perf_counter()
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(escape(self.label), total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, algorithm: str, seed: int, rnd: int, rounds: int, rec: Any) -> None:
        done = self.finished * rounds + rnd
        rmse = f" rmse {rec.rmse:.4f}" if rec is not None else ""
        if self._bar is not None:
            self._bar.update(self._task, completed=done,
                             description=escape(f"{algorithm} seed {seed} round {rnd}/{rounds}{rmse}"))
        elif rnd % self.every == 0 or rnd == rounds:
            runs = f", run {self.finished + 1} of {self.runs}" if self.runs > 1 else ""
            print_line(self.console, f"{algorithm} seed {seed}: round {rnd}/{rounds}{rmse}{runs} "
                                     f"({_elapsed(time.perf_counter() - self._t0)} elapsed)")
        if rnd == rounds:
            self.finished += 1


class CountProgress:
    """A ``progress(done, total)`` callback for counted work (e.g. formulas), from ``minimum`` items on.

    The total may restart (another pass, e.g. one featurizer preset after another): each pass is
    shown as its own bar on a terminal, and off a terminal as plain lines every tenth of it.
    """

    def __init__(self, console: Console, label: str, minimum: int = 200) -> None:
        self.console = console
        self.label = label
        self.minimum = minimum
        self.live = console.is_terminal
        self._bar = None
        self._task = None
        self._total = None
        self._done = 0
        self._passes = 0
        self._next = 0
        self._t0 = time.perf_counter()

    def __enter__(self) -> "CountProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _label(self) -> str:
        return self.label if self._passes <= 1 else f"{self.label} (pass {self._passes})"

    def __call__(self, done: int, total: int) -> None:
        if total < self.minimum:
            return
        if self._total != total or done < self._done:  # a new pass
            self._passes += 1
            self._total = total
            self._next = 0
            if self.live:
                if self._bar is None:
                    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                    self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), console=self.console, transient=True)
                    self._bar.start()
                self._task = self._bar.add_task(escape(self._label()), total=total)
        self._done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        elif done >= self._next or done == total:
            print_line(self.console, f"{self._label()}: {done}/{total} "
                                     f"({_elapsed(time.perf_counter() - self._t0)} elapsed)")
            self._next = done + max(1, total // 10)


# ---------------------------------------------------------------- options shared by run, benchmark and deploy

DpNoiseOpt = Annotated[Optional[float], typer.Option(
    "--dp-noise", metavar="SIGMA",
    help="Differential privacy on every round's released sum (fedavg, fedprox): the Gaussian noise multiplier, "
         "per institution; the budget spent is reported (docs/security.md) " + escape("[default: off]") + ".")]
DpClipOpt = Annotated[Optional[float], typer.Option(
    "--dp-clip", metavar="S", help="With --dp-noise: the L2 bound on one institution's change of the parameters "
                                   "in a round " + escape("[default: 0.01]") + ".")]
DpDeltaOpt = Annotated[Optional[float], typer.Option(
    "--dp-delta", help="With --dp-noise: the budget's delta " + escape("[default: 1e-5]") + ".")]


def dp_overrides(noise: Optional[float], clip: Optional[float], delta: Optional[float]) -> dict[str, float]:
    """The ExperimentConfig fields the --dp-* options set (none given: none)."""
    from fedmdh.errors import InputError

    if noise is None and (clip is not None or delta is not None):
        raise InputError("--dp-clip and --dp-delta go with --dp-noise SIGMA (the noise multiplier).")
    return {k: float(v) for k, v in (("dp_noise", noise), ("dp_clip", clip), ("dp_delta", delta)) if v is not None}
