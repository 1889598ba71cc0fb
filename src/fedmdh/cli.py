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
from rich.markup import escape
from rich.text import Text

from fedmdh import defaults
from fedmdh.cli_output import (DpClipOpt, DpDeltaOpt, DpNoiseOpt, TrainingProgress, add_row, dp_overrides,
                                print_line, print_table, table)
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
    from fedmdh.data.io import check_exclude, read_csv_checked, unique_names, validate_table

    names = unique_names(files)
    frames = [read_csv_checked(f) for f in files]
    if exclude:
        check_exclude(exclude, target, {str(f): list(fr.columns) for f, fr in zip(files, frames)})
    tables = [validate_table(fr, target, str(f), name=n, exclude=exclude or ()) for fr, f, n in zip(frames, files, names)]
    h = measure(names, [t.features for t in tables], [t.y for t in tables])
    if as_json:
        print(json.dumps(h.to_dict(), indent=2))
        return
    print_line(console, f"H = {h.H:.4f}   alpha = {h.alpha:.4f}   KL_avg = {h.KL_avg:.4f}")
    t = table("institution", "rows", "columns", f"{target} mean", f"{target} std", "KL(P_i||P)")
    for s, kl in zip(h.institutions, h.kl):
        add_row(t, s.name, s.rows, s.columns, f"{s.label_mean:.4f}", f"{s.label_std:.4f}", f"{kl:.4f}")
    print_table(console, t)


def _with_default(text: str, default: object) -> str:
    """Help text ending in ``[default: X]`` for an option whose ``None`` means "the config's, else X".

    The help is rich markup: the brackets are escaped, else rich takes them for a style tag and
    drops them (leaving "Communication rounds .").
    """
    return f"{text} {escape(f'[default: {default}]')}"


def _expand_multi(argv: list[str], option: str) -> list[str]:
    """Let ``--institutions A.csv B.csv C.csv`` (and ``A.csv,B.csv``) mean the option repeated."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == option:
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                out += [option, argv[i]]
                i += 1
            continue
        out.append(tok)
        i += 1
    return out


def _experiment_config(
    config: Optional[Path],
    institutions: Optional[list[str]],
    test: Optional[Path],
    target: Optional[str],
    switches: Optional[dict] = None,
    **overrides,
):
    from fedmdh.config import ExperimentConfig, read_toml
    from fedmdh.errors import InputError

    kw = read_toml(config) if config is not None else {}
    files: list[str] = []
    for item in institutions or []:
        files += [p for p in item.split(",") if p]
    if files:
        kw["institutions"] = tuple(files)
    if test is not None:
        kw["test"] = str(test)
    if target is not None:
        kw["target"] = target
    clip = overrides.pop("clip", None) or {}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw.update(clip)  # may set None (off)
    if switches:  # --no-gfam / --no-cgan / --no-rkd apply to fedmdh
        settings = {k: dict(v) for k, v in dict(kw.get("algorithm_settings", {})).items()}
        settings.setdefault("fedmdh", {}).update(switches)
        kw["algorithm_settings"] = settings
    for need, flag in (("institutions", "--institutions"), ("test", "--test"), ("target", "--target")):
        if need not in kw:
            raise InputError(f"missing {flag}; give it on the command line or in --config FILE.toml.")
    return ExperimentConfig(**kw)


def _algorithms_option(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    return tuple(a.strip() for a in value.split(",") if a.strip())


InstitutionsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--institutions", help="Institution CSV files: --institutions A.csv B.csv C.csv"),
]
TestOpt = Annotated[Optional[Path], typer.Option("--test", help="Shared test CSV (carries every column).")]
TargetOpt = Annotated[Optional[str], typer.Option("--target", help="Target column.")]
RoundsOpt = Annotated[
    Optional[int], typer.Option("--rounds", help=_with_default("Communication rounds.", defaults.ROUNDS))
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace what an earlier fedmdh run wrote in --out (else a non-empty "
                                           "--out is refused).")
]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML file with the same settings.")]
NoGfamOpt = Annotated[bool, typer.Option("--no-gfam", help="fedmdh without GFAM (ablation).")]
NoCganOpt = Annotated[bool, typer.Option("--no-cgan", help="fedmdh without GPD-CGAN (ablation).")]
NoRkdOpt = Annotated[bool, typer.Option("--no-rkd", help="fedmdh without RKD (ablation).")]


GfamOpt = Annotated[
    Optional[str],
    typer.Option("--gfam", metavar="MAPPING",
                 help="fedmdh's GFAM mapping: union (one encoder over the union of the columns, the default) "
                      "or per-institution (a private encoder per institution over its own columns)."),
]
LocalGuardOpt = Annotated[
    Optional[str],
    typer.Option("--local-guard", metavar="MODE",
                 help="off (the default), choose or blend: every institution also trains its own local model "
                      "and keeps, on its own validation rows, the better of it and the federated one (choose) "
                      "or a mixture of the two (blend)."),
]


def _switches(no_gfam: bool, no_cgan: bool, no_rkd: bool, gfam: Optional[str] = None) -> dict:
    out: dict = {k: False for k, off in (("gfam", no_gfam), ("cgan", no_cgan), ("rkd", no_rkd)) if off}
    if gfam is not None:
        out["mapping"] = gfam
    return out
LedgerOpt = Annotated[
    Optional[str],
    typer.Option("--ledger", help="Record to a blockchain ledger: embedded, rpc (needs --chain-rpc) or off."),
]
ChainRpcOpt = Annotated[
    Optional[str], typer.Option("--chain-rpc", help="JSON-RPC URL of an Ethereum node (implies --ledger rpc).")
]
ClipOpt = Annotated[
    Optional[str],
    typer.Option("--clip-inputs", metavar="MARGIN|off",
                 help=_with_default("Clip each institution's inputs to its training range widened by MARGIN x the "
                                    "range (0: the range itself) where its model meets rows it did not train on; "
                                    "off: never.", 1)),
]


def _clip_option(value: Optional[str]) -> dict:
    """``--clip-inputs`` as an ExperimentConfig override (empty: keep the config's or the default)."""
    from fedmdh.errors import InputError

    if value is None:
        return {}
    if value.strip().lower() == "off":
        return {"clip_inputs": None}
    try:
        return {"clip_inputs": float(value)}
    except ValueError:
        raise InputError(f"--clip-inputs takes a margin >= 0 or off, got {value!r}.") from None
SelectionOpt = Annotated[
    Optional[str],
    typer.Option("--selection", metavar="own|federated",
                 help=_with_default("Model selection: each institution on its own validation rows (own, what a "
                                    "deployment does), or on every institution's validation rows through its "
                                    "columns (federated, simulator only).", "own")),
]
ExcludeOpt = Annotated[
    Optional[list[str]], typer.Option("--exclude", help="Column that is neither feature nor target (repeatable).")
]


def _print_final(result, title: str) -> None:
    t = table("institution", "RMSE", "MAE", "R2", title=title)
    for name, m in result.final_per_institution.items():
        add_row(t, name, f"{m['rmse']:.4f}", f"{m['mae']:.4f}", f"{m['r2']:.4f}")
    f = result.final
    add_row(t, "mean", f"{f['rmse']:.4f}", f"{f['mae']:.4f}", f"{f['r2']:.4f}", bold=True)
    print_table(console, t)


def _print_summary(results, institutions: list[str], target: str) -> None:
    from fedmdh.experiment.report import summarize

    t = table("algorithm", "seeds", f"RMSE [{target}]", "MAE", "R2", *[f"R2 {i}" for i in institutions],
              title="mean ± std over seeds (test set, each institution through its own columns)")
    for name, s in summarize(results).items():
        n = sum(1 for r in results if r.algorithm == name)
        cells = [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in ("rmse", "mae", "r2")]
        cells += [f"{s[f'r2[{i}]'][0]:.3f} ± {s[f'r2[{i}]'][1]:.3f}" for i in institutions]
        add_row(t, name, n, *cells)
    print_table(console, t)


@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", help="Run folder (created).")],
    institutions: InstitutionsOpt = None,
    test: TestOpt = None,
    target: TargetOpt = None,
    algorithm: Annotated[
        Optional[str], typer.Option("--algorithm", help=_with_default(
            f"Algorithm to train: {', '.join(defaults.ALGORITHM_NAMES)}.",
            f"the one the --config file names, else {defaults.RUN_ALGORITHM}"))
    ] = None,
    rounds: RoundsOpt = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help=_with_default("Seed.", defaults.FIRST_SEED))
    ] = None,
    exclude: ExcludeOpt = None,
    clip_inputs: ClipOpt = None,
    selection: SelectionOpt = None,
    config: ConfigOpt = None,
    ledger: LedgerOpt = None,
    chain_rpc: ChainRpcOpt = None,
    no_gfam: NoGfamOpt = False,
    no_cgan: NoCganOpt = False,
    no_rkd: NoRkdOpt = False,
    gfam: GfamOpt = None,
    local_guard: LocalGuardOpt = None,
    overwrite: OverwriteOpt = False,
    secure: Annotated[bool, typer.Option("--secure", help="Pool setup statistics and weighted parameter sums "
                                         "under threshold CKKS (fedavg, fedprox, fedgan, fedmdh; needs --ledger "
                                         "off).")] = False,
    dp_noise: DpNoiseOpt = None,
    dp_clip: DpClipOpt = None,
    dp_delta: DpDeltaOpt = None,
) -> None:
    """Train one federation (the main job); save each institution's model and the metrics.

    Records the task and every round to a blockchain ledger (default: an embedded chain). --out must
    be new or empty (or give --overwrite); the best models so far are saved as the run goes.
    """
    algorithm = _run_algorithm(config, algorithm)
    cfg = _experiment_config(
        config, institutions, test, target, rounds=rounds, first_seed=seed,
        exclude=tuple(exclude) if exclude else None, algorithms=(algorithm,), seeds=1, clip=_clip_option(clip_inputs),
        selection=selection, local_guard=local_guard,
        switches=_switches(no_gfam, no_cgan, no_rkd, gfam), **dp_overrides(dp_noise, dp_clip, dp_delta),
    )
    _run_and_report(cfg, algorithm, out, _ledger_options(ledger, chain_rpc, "embedded"), overwrite, secure,
                    config=config)


def _run_algorithm(config: Optional[Path], algorithm: Optional[str]) -> str:
    """The one algorithm ``fedmdh run`` trains: --algorithm, else the one the config's ``algorithms``
    names, else the default. Refused: an unknown name, a config naming several without --algorithm,
    an --algorithm the config's list does not hold."""
    from fedmdh.config import check_algorithm_names, read_toml
    from fedmdh.errors import InputError

    if algorithm is not None:
        check_algorithm_names((algorithm,), "--algorithm: ")
    listed = tuple(read_toml(config).get("algorithms", ())) if config is not None else ()
    if not listed:
        return algorithm or defaults.RUN_ALGORITHM
    check_algorithm_names(listed, f"{config}: algorithms: ")
    if algorithm is not None:  # one of a benchmark config's algorithms may be picked out
        if algorithm not in listed:
            raise InputError(f"--algorithm {algorithm}: {config} names algorithms = {list(listed)}, which does not "
                             "hold it; give one of them, or drop algorithms from the config.")
        return algorithm
    if len(listed) > 1:
        raise InputError(f"{config}: algorithms = {list(listed)} names {len(listed)} algorithms; `fedmdh run` trains "
                         "one: give --algorithm NAME, or run them all with `fedmdh benchmark --config "
                         f"{config}`.")
    return listed[0]


@app.command()
def predict(
    model: Annotated[Path, typer.Option("--model", help="Run folder of `fedmdh run` (or its models/ folder).")],
    institution: Annotated[str, typer.Option("--institution", help="Whose model predicts (an institution name).")],
    input_csv: Annotated[Path, typer.Argument(metavar="IN.csv", help="New materials, in that institution's columns.")],
    output_csv: Annotated[Path, typer.Argument(metavar="OUT.csv", help="IN.csv with a prediction column added.")],
) -> None:
    """Predict new materials with an institution's saved model (its own columns are enough)."""
    from fedmdh.data.io import read_csv_checked
    from fedmdh.models import load_model
    from fedmdh.outputs import check_output_file

    folder = _model_folder(model, institution)
    check_output_file(output_csv, "OUT.csv")
    _check_predict_output(output_csv, input_csv, model, folder)
    m = load_model(folder)
    frame = read_csv_checked(input_csv)
    target = m.info.get("target", "y")
    X, n_imputed = m.design_matrix(frame, str(input_csv))
    out = frame.copy()
    out[f"predicted_{target}"] = m.scaler.y_from_std(m.predict_std(X))
    out.to_csv(output_csv, index=False)
    print_line(
        console,
        f"predicted {target} for {len(frame)} rows with {institution}'s {m.algorithm} model "
        f"({n_imputed} missing values imputed from its training means) -> {output_csv}",
    )


def _check_predict_output(output_csv: Path, input_csv: Path, model: Path, folder: Path) -> None:
    """Refuse an OUT.csv that would overwrite IN.csv, a file of the model (the given --model folder when it is a
    model's or a models/ folder, the run's models/), or a file the run wrote (symbolic links followed)."""
    from fedmdh.errors import InputError

    out = output_csv.resolve()
    if input_csv.exists() and out == input_csv.resolve():
        raise InputError(f"{output_csv}: OUT.csv is IN.csv; writing the predictions would replace the input; give "
                         "another OUT.csv.")
    run = model if (model / "models").is_dir() else folder.parent.parent if folder.parent.name == "models" else None
    protected = [folder, *([folder.parent] if folder.parent.name == "models" else []), *([model] if run != model else [])]
    for p in dict.fromkeys(q.resolve() for q in protected):
        if out == p or out.is_relative_to(p):
            raise InputError(f"{output_csv}: OUT.csv lies in the model folder {p}; writing there would replace or "
                             "mix with the saved models; give a path outside it.")
    if run is not None and out.exists() and out.is_relative_to(run.resolve()):
        raise InputError(f"{output_csv}: OUT.csv is a file of the run folder {run}; give a new file name.")


def _model_folder(model: Path, institution: str) -> Path:
    """The saved model of ``institution`` in the run folder ``model`` (or its models/ folder, or the model's own)."""
    from fedmdh.data.io import check_institution_name
    from fedmdh.errors import InputError

    check_institution_name(institution, "--institution ", "give a name such as the file stem of its CSV")
    if not model.is_dir():
        raise InputError(f"{model}: --model folder not found; give the folder written by `fedmdh run`.")
    own = model / "model.json"
    if own.is_file():  # --model RUN/models/NAME: the model's own folder
        try:
            found = json.loads(own.read_text(encoding="utf-8")).get("institution")
        except (OSError, ValueError):
            found = None
        if found != institution:
            raise InputError(f"{model}: holds the model of institution {found!r}, not {institution!r}; give "
                             "--model RUN (the run folder) or that institution's own folder.")
        return model
    root = model.resolve()
    for candidate in (model / "models" / institution, model / institution):
        if (candidate / "model.json").is_file():
            if not candidate.resolve().is_relative_to(root):
                raise InputError(f"{candidate}: resolves outside {model}; refusing to load a model from elsewhere.")
            return candidate
    models = model / "models" if (model / "models").is_dir() else model
    names = sorted(p.name for p in models.glob("*") if (p / "model.json").is_file())
    raise InputError(
        f"{model}: no saved model for institution {institution!r}"
        f"{f' (found: {names})' if names else ''}; give the folder written by `fedmdh run`."
    )


def _ledger_options(mode: Optional[str], chain_rpc: Optional[str], default: str):
    from fedmdh.ledger.options import LedgerOptions

    return LedgerOptions.parse(mode, chain_rpc, default)


def _run_and_report(cfg, algorithm: str, out: Path, ledger=None, overwrite: bool = False, secure: bool = False,
                    config: Optional[Path] = None) -> None:
    from fedmdh.experiment.runner import check_dp, check_inputs, check_secure, input_files, run_experiment
    from fedmdh.outputs import RUN_NAMES, claim_output_dir

    if secure:
        check_secure(algorithm, ledger)
    check_dp(cfg, ledger)
    tables = check_inputs(cfg)  # every file and the federation's layout, before any progress display
    with claim_output_dir(out, overwrite=overwrite, inputs=input_files(cfg, config), declared=RUN_NAMES) as claim, \
            TrainingProgress(err_console, f"{algorithm} seed {cfg.first_seed}", 1, cfg.rounds) as progress:
        result = run_experiment(cfg, algorithm, claim, progress=progress, tables=tables, ledger=ledger, secure=secure)
    from fedmdh.experiment.runner import kept_rounds_text

    _print_final(result, f"{algorithm}: test metrics (models {kept_rounds_text(result.best_rounds)}, chosen on validation)")
    if result.privacy is not None:
        from fedmdh.secure.dp import report_line

        print_line(console, report_line(result.privacy))
    print_line(console, f"saved models, metrics.jsonl and final_metrics.json to {out}")


def benchmark(
    out: Annotated[Path, typer.Option("--out", help="Output folder (created).")],
    institutions: InstitutionsOpt = None,
    test: TestOpt = None,
    target: TargetOpt = None,
    algorithms: Annotated[
        Optional[str], typer.Option("--algorithms", help=_with_default(
            f"Comma-separated, from: {', '.join(defaults.ALGORITHM_NAMES)}.", ",".join(defaults.BENCHMARK_ALGORITHMS)))
    ] = None,
    seeds: Annotated[
        Optional[int], typer.Option("--seeds", help=_with_default("Number of seeds.", defaults.SEEDS))
    ] = None,
    rounds: RoundsOpt = None,
    exclude: ExcludeOpt = None,
    clip_inputs: ClipOpt = None,
    selection: SelectionOpt = None,
    config: ConfigOpt = None,
    ledger: LedgerOpt = None,
    chain_rpc: ChainRpcOpt = None,
    no_gfam: NoGfamOpt = False,
    no_cgan: NoCganOpt = False,
    no_rkd: NoRkdOpt = False,
    gfam: GfamOpt = None,
    local_guard: LocalGuardOpt = None,
    overwrite: OverwriteOpt = False,
    dp_noise: DpNoiseOpt = None,
    dp_clip: DpClipOpt = None,
    dp_delta: DpDeltaOpt = None,
) -> None:
    from fedmdh.experiment.runner import check_inputs, input_files, run_benchmark
    from fedmdh.outputs import BENCHMARK_NAMES, claim_output_dir

    cfg = _experiment_config(
        config, institutions, test, target, algorithms=_algorithms_option(algorithms), seeds=seeds,
        rounds=rounds, exclude=tuple(exclude) if exclude else None, switches=_switches(no_gfam, no_cgan, no_rkd, gfam),
        clip=_clip_option(clip_inputs), selection=selection, local_guard=local_guard,
        **dp_overrides(dp_noise, dp_clip, dp_delta),
    )
    ledger_options = _ledger_options(ledger, chain_rpc, "off")
    tables = check_inputs(cfg)  # every file and the federation's layout, before any progress display
    with claim_output_dir(out, overwrite=overwrite, inputs=input_files(cfg, config), declared=BENCHMARK_NAMES) \
            as claim, TrainingProgress(err_console, "benchmark", len(cfg.algorithms) * cfg.seeds, cfg.rounds) as progress:
        res = run_benchmark(cfg, claim, progress=progress, command="fedmdh " + " ".join(_ARGV), tables=tables,
                            ledger=ledger_options)
    names = [d["name"] for d in res.federation["institutions"]]
    _print_summary(res.results, names, cfg.target)
    print_line(console, f"wrote results.csv, summary.md, curves.png, federation.json, config.toml to {out}")


benchmark.__doc__ = (
    "Run every algorithm and seed; write results.csv, summary.md, curves.png, federation.json, config.toml.\n\n"
    f"Algorithms: {', '.join(defaults.ALGORITHM_NAMES)} (fedmdh-no-gfam, -no-cgan and -no-rkd are FedMDH's "
    "ablations; --no-gfam/--no-cgan/--no-rkd switch fedmdh itself). --out must be new or empty (or give "
    "--overwrite)."
)
app.command()(benchmark)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder (created).")] = Path("runs/demo"),
    data_dir: Annotated[
        Optional[Path], typer.Option("--data-dir", help="Local copy of the perovskite split (verified by sha256).")
    ] = None,
    rounds: RoundsOpt = None,
    ledger: LedgerOpt = None,
    chain_rpc: ChainRpcOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """The main job on the built-in default: FedAvg on the FedMDH paper's perovskite split.

    The split comes from --data-dir, $FEDMDH_DATA_DIR, the cache or a sha256-pinned download; without
    any of them it falls back, saying so, to a small synthetic federation with known ground truth.
    """
    from fedmdh.config import ExperimentConfig
    from fedmdh.data.datasets import default_federation

    fed = default_federation(data_dir=data_dir, notify=lambda msg: print_line(err_console, msg),
                             local_copy_hint="--data-dir DIR")
    print_line(console, f"data: {fed.description} ({fed.source})")
    cfg = ExperimentConfig(
        institutions=tuple(str(p) for p in fed.institutions), test=str(fed.test), target=fed.target,
        algorithms=("fedavg",), seeds=1, **({"rounds": rounds} if rounds else {}),
    )
    _run_and_report(cfg, "fedavg", out, _ledger_options(ledger, chain_rpc, "embedded"), overwrite)


_ARGV: list[str] = []


from fedmdh.cli_data import featurize as _featurize, partition as _partition  # noqa: E402

app.command(name="featurize")(_featurize)
app.command(name="partition")(_partition)


from fedmdh.cli_ledger import ledger_app as _ledger_app, model_app as _model_app  # noqa: E402

app.add_typer(_ledger_app, name="ledger")
app.add_typer(_model_app, name="model")


from fedmdh.cli_deploy import deploy_app as _deploy_app, node_app as _node_app  # noqa: E402

app.add_typer(_node_app, name="node")
app.add_typer(_deploy_app, name="deploy")


from fedmdh.cli_serve import serve as _serve  # noqa: E402

app.command(name="serve")(_serve)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2."""
    warnings.filterwarnings("ignore", module=r"matminer\..*")
    warnings.filterwarnings("ignore", module=r"pymatgen\..*")
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv  # as typed, for the command recorded in reports
    argv = _expand_multi(argv, "--institutions")
    try:
        app(args=argv, prog_name="fedmdh")
    except SystemExit as exc:  # click exits even on success; return normally then
        if exc.code not in (0, None):
            raise
    except FedmdhError as exc:  # the message is user text: printed verbatim, never read as markup
        err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
