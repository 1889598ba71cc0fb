"""The ``fedmdh`` command line: a thin layer over the library API.

User errors (:class:`fedmdh.errors.InputError`) print one line on stderr and exit with status 2,
never a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedmdh.errors import FedmdhError

app = typer.Typer(
    name="fedmdh",
    help="Federated regression for materials science across heterogeneous institutions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated regression for materials science across heterogeneous institutions."""


@app.command()
def heterogeneity(
    files: Annotated[list[Path], typer.Argument(help="One CSV file per institution.")],
    target: Annotated[str, typer.Option("--target", help="Target column.")],
    exclude: Annotated[
        Optional[list[str]], typer.Option("--exclude", help="Column that is not a feature (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Print the federation's H, alpha and KL_avg and per-institution rows, columns and label moments."""
    from fedmdh.data.heterogeneity import measure
    from fedmdh.data.io import load_institution, unique_names

    names = unique_names(files)
    tables = [load_institution(f, target, name=n, exclude=exclude or ()) for f, n in zip(files, names)]
    h = measure(names, [t.features for t in tables], [t.y for t in tables])
    if as_json:
        print(json.dumps(h.to_dict(), indent=2))
        return
    console.print(f"H = {h.H:.4f}   alpha = {h.alpha:.4f}   KL_avg = {h.KL_avg:.4f}")
    table = Table("institution", "rows", "columns", f"{target} mean", f"{target} std", "KL(P_i||P)")
    for s, kl in zip(h.institutions, h.kl):
        table.add_row(s.name, str(s.rows), str(s.columns), f"{s.label_mean:.4f}", f"{s.label_std:.4f}", f"{kl:.4f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2."""
    warnings.filterwarnings("ignore", module=r"matminer\..*")
    warnings.filterwarnings("ignore", module=r"pymatgen\..*")
    try:
        app(args=argv, prog_name="fedmdh")
    except FedmdhError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
