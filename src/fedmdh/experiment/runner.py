"""Training runs and benchmarks: the library API behind ``fedmdh run`` and ``fedmdh benchmark``."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from fedmdh import __version__
from fedmdh.config import ExperimentConfig
from fedmdh.data.federation import PreparedFederation, prepare_federation
from fedmdh.data.io import InstitutionTable, load_institution, unique_names
from fedmdh.experiment.models import save_model
from fedmdh.experiment.report import write_curves, write_results_csv, write_summary
from fedmdh.ledger.keys import check_key_names
from fedmdh.ledger.options import LedgerOptions
from fedmdh.ledger.runs import finish_run_ledger, start_run_ledger
from fedmdh.runtime.simulator import RoundRecord, RunResult, simulate

#: progress callback: (algorithm, seed, round, rounds, record or None)
Progress = Callable[[str, int, int, int, RoundRecord | None], None]


@dataclass(frozen=True)
class Tables:
    institutions: tuple[InstitutionTable, ...]
    test: InstitutionTable


def load_tables(cfg: ExperimentConfig) -> Tables:
    """Read and validate every institution file and the test file of ``cfg``."""
    names = unique_names(cfg.institutions)
    check_key_names(names)  # names that would share one signing key on the ledger
    tables = tuple(
        load_institution(p, cfg.target, name=n, exclude=cfg.exclude) for p, n in zip(cfg.institutions, names)
    )
    test = load_institution(cfg.test, cfg.target, name="test", exclude=cfg.exclude)
    return Tables(tables, test)


def prepare(cfg: ExperimentConfig, tables: Tables, seed: int) -> PreparedFederation:
    return prepare_federation(tables.institutions, tables.test, cfg.target, seed=seed, val_fraction=cfg.val_fraction,
                              clip_margin=cfg.clip_inputs)


def federation_info(fed: PreparedFederation, tables: Tables) -> dict[str, Any]:
    """The federation's degree and layout (for federation.json)."""
    d = fed.heterogeneity.to_dict()
    d["target"] = fed.target
    d["union_features"] = len(fed.features)
    d["files"] = {t.name: t.source for t in tables.institutions}
    d["test"] = {"file": tables.test.source, "rows": tables.test.n_rows}
    return d


def data_log_lines(fed: PreparedFederation) -> list[str]:
    """What the run log says about the data: sizes, splits and imputed values per institution."""
    lines = []
    for d in fed.institutions:
        lines.append(
            f"{d.name}: {d.n_train} training rows, {d.y_val.size} validation rows, {len(d.features)} columns; "
            f"imputed {d.n_imputed} missing training values and {d.n_imputed_test} missing test values "
            "from the institution's own training means"
        )
    return lines


def kept_rounds_text(best_rounds: dict[str, int]) -> str:
    """``from round 12`` when every institution kept the same round, else ``from rounds A 12, B 30``."""
    if len(set(best_rounds.values())) == 1:
        return f"from round {next(iter(best_rounds.values()))}"
    return "from rounds " + ", ".join(f"{n} {r}" for n, r in best_rounds.items())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float), encoding="utf-8")


def run_experiment(
    cfg: ExperimentConfig,
    algorithm: str,
    out_dir: str | Path,
    seed: int | None = None,
    progress: Progress | None = None,
    tables: Tables | None = None,
    ledger: "LedgerOptions | None" = None,
) -> RunResult:
    """Train one federation with ``algorithm`` (the main job) and save everything to ``out_dir``.

    ``ledger`` (default: the embedded chain) records the task, every round and the archived final
    models under ``ledger/`` (see :mod:`fedmdh.ledger`); ``LedgerOptions(mode="off")`` skips it.

    Writes ``models/<institution>/`` (each institution's final model), ``metrics.jsonl`` (one
    JSON object per round), ``final_metrics.json``, ``federation.json``, ``config.toml`` and
    ``run.log``.
    """
    seed = cfg.first_seed if seed is None else seed
    cfg = cfg.with_overrides(algorithms=(algorithm,), seeds=1, first_seed=seed)
    tables = tables or load_tables(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fed = prepare(cfg, tables, seed)
    algo = cfg.build_algorithm(algorithm)
    cfg.write_toml(out / "config.toml")
    _write_json(out / "federation.json", federation_info(fed, tables))
    log = [f"fedmdh {__version__} on Python {platform.python_version()}", f"algorithm {algorithm}, seed {seed}",
           f"hyperparameters {algo.hyperparameters()}", *data_log_lines(fed)]
    (out / "run.log").write_text("\n".join(log) + "\n", encoding="utf-8")

    with (out / "metrics.jsonl").open("w", encoding="utf-8") as fh:

        def on_round(rec: RoundRecord) -> None:
            fh.write(json.dumps(rec.to_dict()) + "\n")
            fh.flush()
            if progress is not None:
                progress(algorithm, seed, rec.round, cfg.rounds, rec)

        recorder = start_run_ledger(ledger, out / "ledger", algo, fed, cfg.target, cfg.rounds, seed, out / "config.toml")
        try:
            result = simulate(fed, algo, cfg.rounds, seed=seed, on_round=on_round,
                              round_hook=recorder.round_hook if recorder else None, selection=cfg.selection)
            if recorder is not None:
                recorder.flush()  # the last round finalized the aggregate this run used
        except BaseException:
            finish_run_ledger(recorder, None, after_error=True)
            raise

    models_dir = out / "models"
    for d in fed.institutions:
        save_model(
            models_dir / d.name, d, algorithm, cfg.hidden, fed.scaler, result.models[d.name],
            info={"best_round": result.best_rounds[d.name], "seed": seed, "target": cfg.target,
                  "hyperparameters": algo.hyperparameters()},
        )
    final = {
        "algorithm": algorithm,
        "seed": seed,
        "rounds": cfg.rounds,
        "best_round": result.best_round,
        "best_rounds": result.best_rounds,
        "seconds": result.seconds,
        **result.final,
        "per_institution": result.final_per_institution,
    }
    _write_json(out / "final_metrics.json", final)
    ledger_line = finish_run_ledger(recorder, models_dir)
    with (out / "run.log").open("a", encoding="utf-8") as fh:
        if ledger_line:
            fh.write(ledger_line + "\n")
        fh.write(
            f"finished {cfg.rounds} rounds in {result.seconds:.1f} s; models kept {kept_rounds_text(result.best_rounds)} "
            f"(lowest validation loss); test rmse {result.final['rmse']:.4f} r2 {result.final['r2']:.4f}\n"
        )
    return result


@dataclass
class BenchmarkResult:
    results: list[RunResult]
    federation: dict[str, Any]
    out_dir: Path


def run_benchmark(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    progress: Progress | None = None,
    command: str | None = None,
    tables: Tables | None = None,
    ledger: "LedgerOptions | None" = None,
) -> BenchmarkResult:
    """Run every algorithm with every seed and write the benchmark's files to ``out_dir``.

    Files: ``results.csv``, ``summary.md``, ``curves.png``, ``federation.json``, ``config.toml``,
    ``history/<algorithm>_seed<S>.jsonl`` and ``run.log``; with a ``ledger`` (off by default here),
    ``ledger/<algorithm>_seed<S>/`` per run.
    """
    ledger = ledger or LedgerOptions(mode="off")
    out = Path(out_dir)
    tables = tables or load_tables(cfg)
    (out / "history").mkdir(parents=True, exist_ok=True)
    cfg.write_toml(out / "config.toml")
    results: list[RunResult] = []
    fed_info: dict[str, Any] = {}
    log_lines: list[str] = [f"fedmdh {__version__}; command: {command or '(library call)'}"]
    t0 = time.perf_counter()
    for seed in cfg.seed_list:
        fed = prepare(cfg, tables, seed)
        if not fed_info:
            fed_info = federation_info(fed, tables)
            _write_json(out / "federation.json", fed_info)
            log_lines += data_log_lines(fed)
        for name in cfg.algorithms:
            algo = cfg.build_algorithm(name)

            def on_round(rec: RoundRecord, name: str = name, seed: int = seed) -> None:
                if progress is not None:
                    progress(name, seed, rec.round, cfg.rounds, rec)

            recorder = start_run_ledger(ledger, out / "ledger" / f"{name}_seed{seed}", algo, fed, cfg.target,
                                        cfg.rounds, seed, out / "config.toml", archive=False)
            try:
                res = simulate(fed, algo, cfg.rounds, seed=seed, on_round=on_round,
                               round_hook=recorder.round_hook if recorder else None, selection=cfg.selection)
            except BaseException:
                finish_run_ledger(recorder, None, after_error=True)
                raise
            ledger_line = finish_run_ledger(recorder, None)
            if ledger_line:
                log_lines.append(f"{name} seed {seed}: {ledger_line}")
            results.append(res)
            with (out / "history" / f"{name}_seed{seed}.jsonl").open("w", encoding="utf-8") as fh:
                for rec in res.history:
                    fh.write(json.dumps(rec.to_dict()) + "\n")
            log_lines.append(
                f"{name} seed {seed}: {res.seconds:.1f} s, models kept {kept_rounds_text(res.best_rounds)}, "
                f"rmse {res.final['rmse']:.4f} r2 {res.final['r2']:.4f}"
            )
            # write as we go so an interrupted sweep keeps what finished
            write_results_csv(results, out / "results.csv")
    names = [d["name"] for d in fed_info["institutions"]]
    write_summary(results, out / "summary.md", cfg, fed_info, names, command)
    write_curves(results, out / "curves.png", cfg.target)
    log_lines.append(f"total {time.perf_counter() - t0:.1f} s")
    (out / "run.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    return BenchmarkResult(results, fed_info, out)

