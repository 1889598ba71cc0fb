"""Training runs and benchmarks: the library API behind ``fedmdh run`` and ``fedmdh benchmark``."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from fedmdh import __version__
from fedmdh.config import ExperimentConfig
from fedmdh.data.federation import PreparedFederation, prepare_federation
from fedmdh.data.io import (
    InstitutionTable, check_distinct_files, check_exclude, read_csv_checked, unique_names, validate_table,
)
from fedmdh.errors import TrainingDiverged
from fedmdh.models import save_model
from fedmdh.experiment.report import write_curves, write_results_csv, write_summary
from fedmdh.ledger.keys import check_key_names
from fedmdh.ledger.options import LedgerOptions
from fedmdh.experiment.run_ledger import finish_run_ledger, start_run_ledger
from fedmdh.outputs import BENCHMARK_NAMES, RUN_NAMES, OutputDir, claim_output_dir, replace_dir_atomically
from fedmdh.runtime.simulator import RoundRecord, RunResult, simulate

#: progress callback: (algorithm, seed, round, rounds, record or None)
Progress = Callable[[str, int, int, int, RoundRecord | None], None]


@dataclass(frozen=True)
class Tables:
    institutions: tuple[InstitutionTable, ...]
    test: InstitutionTable


def load_tables(cfg: ExperimentConfig) -> Tables:
    """Read and validate every institution file and the test file of ``cfg``.

    Refused besides each file's own problems: a name that is not an institution name, the same
    institution file twice, a test file that is an institution's, an excluded column that is the
    target or that no file has.
    """
    names = unique_names(cfg.institutions)
    check_distinct_files(cfg.institutions, test=cfg.test)
    check_key_names(names)  # names that would share one signing key on the ledger
    frames = [read_csv_checked(p) for p in cfg.institutions]
    # the test set is read through the columns the institutions have; others (a formula, an id) are ignored
    frame = read_csv_checked(cfg.test)
    if cfg.exclude:
        check_exclude(cfg.exclude, cfg.target, {str(p): list(f.columns) for p, f in
                                                zip((*cfg.institutions, cfg.test), (*frames, frame))})
    tables = tuple(validate_table(f, cfg.target, str(p), name=n, exclude=cfg.exclude)
                   for f, p, n in zip(frames, cfg.institutions, names))
    used = {cfg.target, *(f for t in tables for f in t.features)}
    ignored = tuple(c for c in frame.columns if c not in used)
    test = validate_table(frame, cfg.target, str(cfg.test), name="test", exclude=(*cfg.exclude, *ignored),
                          kind="test set")
    return Tables(tables, test)


def input_files(cfg: ExperimentConfig, config: "str | Path | None" = None) -> tuple[str, ...]:
    """The files a run of ``cfg`` reads (institutions, test set, and the config file when given):
    ``--overwrite`` refuses to empty a folder that holds one of them."""
    return (*cfg.institutions, cfg.test, *((str(config),) if config is not None else ()))


def prepare(cfg: ExperimentConfig, tables: Tables, seed: int, secure_sum=None) -> PreparedFederation:
    return prepare_federation(tables.institutions, tables.test, cfg.target, seed=seed, val_fraction=cfg.val_fraction,
                              clip_margin=cfg.clip_inputs, secure_sum=secure_sum)


def check_secure(algorithm: str, ledger: "LedgerOptions | None") -> None:
    """Refuse ``--secure`` (with :class:`~fedmdh.errors.InputError`, one line) where it is not covered yet."""
    from fedmdh.errors import InputError
    from fedmdh.secure.aggregation import check_covered
    from fedmdh.secure.backend import unavailable_reason

    check_covered(algorithm)
    if ledger is None or ledger.mode != "off":
        raise InputError("--secure with a ledger is not wired yet (the ledger stores every institution's update in "
                         "the clear); give --ledger off with --secure.")
    reason = unavailable_reason()
    if reason is not None:
        raise InputError(f"--secure needs OpenFHE: {reason}")


def check_dp(cfg: ExperimentConfig, ledger: "LedgerOptions | None") -> None:
    """Refuse differential privacy with a run ledger (it would commit, and aggregate on chain, each
    institution's clear update, without the noise)."""
    from fedmdh.errors import InputError

    if cfg.dp is not None and ledger is not None and ledger.mode != "off":
        raise InputError("--dp-noise with a run ledger is not wired (the ledger aggregates each institution's clear "
                         "update on chain, without the noise); give --ledger off, or deploy the task with --secure.")


def check_inputs(cfg: ExperimentConfig, tables: Tables | None = None) -> Tables:
    """Everything that can be checked before training: files, federation layout, algorithms.

    Raises :class:`~fedmdh.errors.InputError` for the first problem; the CLI calls it before it
    shows any progress. Returns the tables (read here when not given).
    """
    tables = tables or load_tables(cfg)
    prepare(cfg, tables, cfg.first_seed)
    for name in cfg.algorithms:
        cfg.build_algorithm(name)
    return tables


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


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        return json_safe(obj.item())
    return obj


def json_line(obj: Any) -> str:
    """One strict-JSON line (NaN and infinities written as null)."""
    return json.dumps(json_safe(obj), allow_nan=False)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False), encoding="utf-8")


def _save_models(
    models_dir: Path, fed: PreparedFederation, algorithm: str, cfg: ExperimentConfig, hyperparameters: dict,
    models: dict, best_rounds: dict[str, int], seed: int,
) -> None:
    """Every institution's kept model (of its round in ``best_rounds``) into ``models_dir``, swapped in
    atomically as one set."""

    def build(tmp: Path) -> None:
        for d in fed.institutions:
            save_model(tmp / d.name, d, algorithm, cfg.hidden, fed.scaler, models[d.name],
                       info={"best_round": best_rounds[d.name], "seed": seed, "target": cfg.target,
                             "hyperparameters": hyperparameters})

    replace_dir_atomically(build, models_dir)


def run_experiment(
    cfg: ExperimentConfig,
    algorithm: str,
    out_dir: "str | Path | OutputDir",
    seed: int | None = None,
    progress: Progress | None = None,
    tables: Tables | None = None,
    ledger: "LedgerOptions | None" = None,
    overwrite: bool = False,
    secure: bool = False,
) -> RunResult:
    """Train one federation with ``algorithm`` (the main job) and save everything to ``out_dir``.

    ``secure=True`` (fedavg, fedprox and fedgan, with the ledger off) pools the setup statistics and every
    round's weighted parameter sums through threshold CKKS (:mod:`fedmdh.secure`); see
    docs/security.md for what that protects in this in-process runtime.

    ``out_dir`` must be absent or empty (``overwrite=True`` replaces what an earlier fedmdh run
    wrote there, listed in its ``.fedmdh-manifest.json``, and refuses a folder holding anything else or
    one of this run's inputs) and is locked for the run (:func:`fedmdh.outputs.claim_output_dir`); an
    :class:`~fedmdh.outputs.OutputDir` the caller claimed already is used as it is. Inputs are
    validated before anything is written.

    ``ledger`` (default: the embedded chain) records the task, every round and the archived final
    models under ``ledger/`` (see :mod:`fedmdh.ledger`); ``LedgerOptions(mode="off")`` skips it.

    Writes ``models/<institution>/`` (each institution's model of the round of lowest validation
    loss, rewritten atomically at every improvement so that an interrupted run keeps the best so
    far), ``metrics.jsonl`` (one JSON object per round), ``final_metrics.json``,
    ``federation.json``, ``config.toml`` and ``run.log``.

    Raises
    ------
    TrainingDiverged
        Training blew up; ``metrics.jsonl`` holds the rounds before it and ``models/`` the best
        models of those rounds.
    """
    seed = cfg.first_seed if seed is None else seed
    cfg = cfg.with_overrides(algorithms=(algorithm,), seeds=1, first_seed=seed)
    check_dp(cfg, LedgerOptions() if ledger is None else ledger)
    tables = tables or load_tables(cfg)
    algo = cfg.build_algorithm(algorithm)
    if not secure:
        fed = prepare(cfg, tables, seed)
        with claim_output_dir(out_dir, overwrite=overwrite, inputs=input_files(cfg), declared=RUN_NAMES) as claim:
            return _run_in(claim.path, cfg, algorithm, seed, tables, fed, algo, progress, ledger)
    check_secure(algorithm, ledger)
    from fedmdh.secure.threshold import ThresholdGroup

    with ThresholdGroup([t.name for t in tables.institutions]) as group:
        fed = prepare(cfg, tables, seed, secure_sum=group)
        with claim_output_dir(out_dir, overwrite=overwrite, inputs=input_files(cfg), declared=RUN_NAMES) as claim:
            return _run_in(claim.path, cfg, algorithm, seed, tables, fed, algo, progress, ledger, group)


def _run_in(out, cfg, algorithm, seed, tables, fed, algo, progress, ledger, secure=None) -> RunResult:
    cfg.write_toml(out / "config.toml")
    _write_json(out / "federation.json", federation_info(fed, tables))
    log = [f"fedmdh {__version__} on Python {platform.python_version()}",
           f"algorithm {algorithm}, seed {seed}{', secure (threshold CKKS)' if secure is not None else ''}",
           f"hyperparameters {algo.hyperparameters()}", *data_log_lines(fed)]
    (out / "run.log").write_text("\n".join(log) + "\n", encoding="utf-8")
    models_dir = out / "models"
    hyperparameters = algo.hyperparameters()
    saved: dict[str, Any] = {"round": 0, "rounds": {}}

    def on_best(rnd: int, models: dict, rounds: dict[str, int]) -> None:
        _save_models(models_dir, fed, algorithm, cfg, hyperparameters, models, rounds, seed)
        saved["round"], saved["rounds"] = rnd, dict(rounds)

    with (out / "metrics.jsonl").open("w", encoding="utf-8") as fh:

        def on_round(rec: RoundRecord) -> None:
            fh.write(json_line(rec.to_dict()) + "\n")
            fh.flush()
            if progress is not None:
                progress(algorithm, seed, rec.round, cfg.rounds, rec)

        recorder = start_run_ledger(ledger, out / "ledger", algo, fed, cfg.target, cfg.rounds, seed, out / "config.toml")
        try:
            result = simulate(fed, algo, cfg.rounds, seed=seed, on_round=on_round,
                              round_hook=recorder.round_hook if recorder else None, selection=cfg.selection,
                              on_best=on_best, secure=secure, dp=cfg.dp)
            if recorder is not None:
                recorder.flush()  # the last round finalized the aggregate this run used
        except TrainingDiverged as exc:
            finish_run_ledger(recorder, None, after_error=True)
            done = "round 1 is" if exc.round == 2 else f"rounds 1-{exc.round - 1} are"
            kept = (f"{done} in {out / 'metrics.jsonl'} and the models kept {kept_rounds_text(saved['rounds'])} "
                    f"(on own validation rows) in {models_dir}" if exc.round > 1 and saved["rounds"]
                    else "no round finished, nothing was kept")
            with (out / "run.log").open("a", encoding="utf-8") as log_fh:
                log_fh.write(f"stopped: {exc.with_kept(kept)}\n")
            raise exc.with_kept(kept) from None
        except BaseException:
            finish_run_ledger(recorder, None, after_error=True)
            raise

    if saved["rounds"] != result.best_rounds:  # pragma: no cover - on_best saw every improvement
        _save_models(models_dir, fed, algorithm, cfg, hyperparameters, result.models, result.best_rounds, seed)
    final = {
        "algorithm": algorithm,
        "seed": seed,
        "rounds": cfg.rounds,
        "best_round": result.best_round,
        "best_rounds": result.best_rounds,
        "seconds": result.seconds,
        **result.final,
        "per_institution": result.final_per_institution,
        **({"privacy": result.privacy} if result.privacy is not None else {}),
    }
    _write_json(out / "final_metrics.json", final)
    ledger_line = finish_run_ledger(recorder, models_dir)
    with (out / "run.log").open("a", encoding="utf-8") as fh:
        if ledger_line:
            fh.write(ledger_line + "\n")
        if result.privacy is not None:
            from fedmdh.secure.dp import report_line

            fh.write(report_line(result.privacy) + "\n")
        fh.write(
            f"finished {cfg.rounds} rounds in {result.seconds:.1f} s; models kept {kept_rounds_text(result.best_rounds)} "
            f"(on own validation rows); test rmse {result.final['rmse']:.4f} r2 {result.final['r2']:.4f}\n"
        )
    return result


@dataclass
class BenchmarkResult:
    results: list[RunResult]
    federation: dict[str, Any]
    out_dir: Path


def run_benchmark(
    cfg: ExperimentConfig,
    out_dir: "str | Path | OutputDir",
    progress: Progress | None = None,
    command: str | None = None,
    tables: Tables | None = None,
    ledger: "LedgerOptions | None" = None,
    overwrite: bool = False,
) -> BenchmarkResult:
    """Run every algorithm with every seed and write the benchmark's files to ``out_dir``.

    Files: ``results.csv``, ``summary.md``, ``curves.png``, ``federation.json``, ``config.toml``,
    ``history/<algorithm>_seed<S>.jsonl`` and ``run.log``; with a ``ledger`` (off by default here),
    ``ledger/<algorithm>_seed<S>/`` per run. ``out_dir`` is claimed as :func:`run_experiment` does
    (absent or empty unless ``overwrite``; locked while the benchmark runs).
    """
    ledger = ledger or LedgerOptions(mode="off")
    check_dp(cfg, ledger)
    tables = check_inputs(cfg, tables)
    with claim_output_dir(out_dir, overwrite=overwrite, inputs=input_files(cfg), declared=BENCHMARK_NAMES) as claim:
        return _benchmark_in(claim.path, cfg, progress, command, tables, ledger)


def _benchmark_in(out: Path, cfg, progress, command, tables, ledger) -> BenchmarkResult:
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
                               round_hook=recorder.round_hook if recorder else None, selection=cfg.selection,
                               dp=cfg.dp)
            except TrainingDiverged as exc:
                finish_run_ledger(recorder, None, after_error=True)
                kept = (f"{name} seed {seed}; the {len(results)} runs finished before it are in "
                        f"{out / 'results.csv'}" if results else f"{name} seed {seed}")
                log_lines.append(f"stopped: {exc.with_kept(kept)}")
                (out / "run.log").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
                raise exc.with_kept(kept) from None
            except BaseException:
                finish_run_ledger(recorder, None, after_error=True)
                raise
            ledger_line = finish_run_ledger(recorder, None)
            if ledger_line:
                log_lines.append(f"{name} seed {seed}: {ledger_line}")
            results.append(res)
            with (out / "history" / f"{name}_seed{seed}.jsonl").open("w", encoding="utf-8") as fh:
                for rec in res.history:
                    fh.write(json_line(rec.to_dict()) + "\n")
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
