"""The data-preparation commands ``fedmdh featurize`` and ``fedmdh partition`` (registered in cli.py).

Thin layers over :mod:`fedmdh.data.featurize` and :mod:`fedmdh.data.partition`; user errors raise
:class:`fedmdh.errors.InputError`, which ``fedmdh.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

_BAR_MIN = 200  # show a progress bar from this many distinct formulas on


@contextlib.contextmanager
def _progress(label: str) -> Iterator:
    """A ``progress(done, total)`` callback drawing a rich bar on stderr for long inputs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=True)
    state: dict = {}

    def update(done: int, total: int) -> None:
        if total < _BAR_MIN:
            return
        key = state.get("key")
        if key is None or state.get("total") != total or done < state.get("done", 0):
            if not state.get("started"):
                bar.start()
                state["started"] = True
            state["key"] = bar.add_task(label, total=total)
            state["total"] = total
        state["done"] = done
        bar.update(state["key"], completed=done)

    try:
        yield update
    finally:
        if state.get("started"):
            bar.stop()


def featurize(
    input_csv: Annotated[Path, typer.Argument(metavar="IN.csv", help="Table with a formula column.")],
    output_csv: Annotated[Path, typer.Argument(metavar="OUT.csv", help="Where to write the featurized table.")],
    formula_column: Annotated[str, typer.Option("--formula-column", help="Column of chemical formulas.")] = "formula",
    preset: Annotated[
        str, typer.Option("--preset", help="matminer ElementProperty preset: magpie, deml, matminer, "
                                           "matscholar_el or megnet_el.")
    ] = "magpie",
    strict: Annotated[bool, typer.Option("--strict", help="Stop on unparseable formulas instead of dropping them.")] = False,
) -> None:
    """Append matminer composition features (ElementProperty preset) to a table with a formula column."""
    from fedmdh.data.featurize import featurize_frame
    from fedmdh.data.io import read_csv_checked

    frame = read_csv_checked(input_csv)
    with _progress(f"featurizing ({preset})") as cb:
        out, report = featurize_frame(frame, formula_column, preset, source=str(input_csv), strict=strict,
                                      progress=cb)
    if report.n_bad:
        err_console.print(f"[yellow]warning:[/] {report.warning_line()}", highlight=False, soft_wrap=True)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(output_csv, index=False, lineterminator="\n")
    console.print(
        f"wrote {output_csv}: {report.rows_out} rows, {len(report.features)} {preset} features "
        f"({report.unique_formulas} distinct formulas, {report.seconds:.1f} s)",
        highlight=False,
    )


def partition(
    data: Annotated[Path, typer.Option("--data", help="The whole table (CSV).")],
    target: Annotated[str, typer.Option("--target", help="Target column.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    institutions: Annotated[int, typer.Option("--institutions", help="Number of institutions.")] = 3,
    degree: Annotated[
        Optional[str], typer.Option("--degree", help="Preset degree: iid, low, medium or high.")
    ] = None,
    H: Annotated[Optional[float], typer.Option("--H", help="Target feature overlap H (overrides the preset).")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Target size imbalance alpha.")] = None,
    kl: Annotated[Optional[float], typer.Option("--kl", help="Target label divergence KL_avg.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Shared held-out test fraction.")] = 0.2,
    formula_column: Annotated[
        Optional[str], typer.Option("--formula-column", help="Column of chemical formulas (not a feature).")
    ] = None,
    featurizers: Annotated[
        Optional[str], typer.Option("--featurizers", help="Comma-separated presets, one per institution (cycled).")
    ] = None,
    shared_featurizer: Annotated[
        Optional[str], typer.Option("--shared-featurizer", help="Preset whose features everyone may share.")
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option("--exclude", help="Column to drop (repeatable).")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop on unparseable formulas.")] = False,
) -> None:
    """Cut a federation of a given heterogeneity degree (H, alpha, KL_avg) from one table."""
    from fedmdh.data.io import read_csv_checked
    from fedmdh.data.partition import degree_targets
    from fedmdh.data.partition import partition as make_partition
    from fedmdh.data.partition import write_partition

    targets = degree_targets(degree, H=H, alpha=alpha, kl=kl)
    presets = [p.strip() for p in featurizers.split(",") if p.strip()] if featurizers else []
    params = {
        "data": str(data), "target": target, "out": str(out), "institutions": institutions, "degree": degree,
        "H": H, "alpha": alpha, "kl": kl, "seed": seed, "test_fraction": test_fraction,
        "formula_column": formula_column, "featurizers": presets, "shared_featurizer": shared_featurizer,
        "exclude": list(exclude or []), "strict": strict,
    }
    frame = read_csv_checked(data)
    with _progress("featurizing") as cb:
        part = make_partition(
            frame, target, institutions, targets, seed,
            test_fraction=test_fraction, formula_column=formula_column, featurizers=presets,
            shared_featurizer=shared_featurizer, exclude=exclude or (), strict=strict, source=str(data),
            progress=cb, params=params,
        )
    if part.dropped_rows:
        from fedmdh.data.io import line_numbers

        err_console.print(
            f"[yellow]warning:[/] {data}: dropped {len(part.dropped_rows)} rows whose formula could not be parsed "
            f"({line_numbers(part.dropped_rows)}); pass --strict to stop on them.",
            highlight=False, soft_wrap=True,
        )
    write_partition(part, out)
    a, t = part.achieved, part.targets
    summary = Table("", "requested", "achieved", title=f"degree {t.name}, seed {seed}")
    summary.add_row("H", f"{t.H:.4f}", f"{a.H:.4f}")
    summary.add_row("alpha", f"{t.alpha:.4f}", f"{a.alpha:.4f}")
    summary.add_row("KL_avg", f"{t.kl:.4f}", f"{a.KL_avg:.4f}")
    console.print(summary)
    inst = Table("institution", "rows", "features", "featurizer", "KL(P_i||P)")
    for i, s in enumerate(a.institutions):
        inst.add_row(s.name, str(s.rows), str(s.columns), part.featurizers[i] if part.featurizers else "-",
                     f"{a.kl[i]:.4f}")
    inst.add_row("test", str(part.test_rows.size), str(len(part.union_features)), "", "")
    console.print(inst)
    if part.unused_rows.size:
        console.print(f"{part.unused_rows.size} training rows left unused by the sizes.", highlight=False)
