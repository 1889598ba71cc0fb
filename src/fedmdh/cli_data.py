"""The data-preparation commands ``fedmdh featurize`` and ``fedmdh partition`` (registered in cli.py).

Thin layers over :mod:`fedmdh.data.featurize` and :mod:`fedmdh.data.partition`; user errors raise
:class:`fedmdh.errors.InputError`, which ``fedmdh.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from fedmdh.cli_output import CountProgress, add_row, print_line, print_table, table

console = Console()
err_console = Console(stderr=True)

_BAR_MIN = 200  # show progress from this many distinct formulas on


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

    from fedmdh.outputs import check_output_file

    check_output_file(output_csv, "OUT.csv")
    frame = read_csv_checked(input_csv)
    with CountProgress(err_console, f"featurizing {input_csv.name} ({preset}), formulas", _BAR_MIN) as cb:
        out, report = featurize_frame(frame, formula_column, preset, source=str(input_csv), strict=strict,
                                      progress=cb)
    if report.n_bad:
        print_line(err_console, f"warning: {report.warning_line()}")
    out.to_csv(output_csv, index=False, lineterminator="\n")
    print_line(
        console,
        f"wrote {output_csv}: {report.rows_out} rows, {len(report.features)} {preset} features "
        f"({report.unique_formulas} distinct formulas, {report.seconds:.1f} s)",
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
    from fedmdh.outputs import check_output_dir

    check_output_dir(out, "--out")
    frame = read_csv_checked(data)
    label = f"featurizing with {', '.join(dict.fromkeys([*presets, *([shared_featurizer] if shared_featurizer else [])]))}, formulas" \
        if presets or shared_featurizer else "featurizing, formulas"
    with CountProgress(err_console, label, _BAR_MIN) as cb:
        part = make_partition(
            frame, target, institutions, targets, seed,
            test_fraction=test_fraction, formula_column=formula_column, featurizers=presets,
            shared_featurizer=shared_featurizer, exclude=exclude or (), strict=strict, source=str(data),
            progress=cb, params=params,
        )
    if part.dropped_rows:
        from fedmdh.data.io import line_numbers

        print_line(
            err_console,
            f"warning: {data}: dropped {len(part.dropped_rows)} rows whose formula could not be parsed "
            f"({line_numbers(part.dropped_rows)}); pass --strict to stop on them.",
        )
    write_partition(part, out)
    a, t = part.achieved, part.targets
    summary = table("", "requested", "achieved", title=f"degree {t.name}, seed {seed}")
    add_row(summary, "H", f"{t.H:.4f}", f"{a.H:.4f}")
    add_row(summary, "alpha", f"{t.alpha:.4f}", f"{a.alpha:.4f}")
    add_row(summary, "KL_avg", f"{t.kl:.4f}", f"{a.KL_avg:.4f}")
    print_table(console, summary)
    inst = table("institution", "rows", "features", "featurizer", "KL(P_i||P)")
    for i, s in enumerate(a.institutions):
        add_row(inst, s.name, s.rows, s.columns, part.featurizers[i] if part.featurizers else "-", f"{a.kl[i]:.4f}")
    add_row(inst, "test", part.test_rows.size, len(part.union_features), "", "")
    print_table(console, inst)
    if part.unused_rows.size:
        print_line(console, f"{part.unused_rows.size} training rows left unused by the sizes.")
