"""Benchmark reports: results.csv, the paper-style summary table and the loss curves."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmdh.algorithms import ALGORITHMS
from fedmdh.runtime.protocol import ROUND_SE

if TYPE_CHECKING:
    from fedmdh.config import ExperimentConfig
    from fedmdh.runtime.simulator import RunResult

METRICS = ("rmse", "mae", "r2")


def summarize(results: Sequence["RunResult"]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sample std (ddof=1; 0 for one seed) of rmse/mae/r2 per algorithm, in run order.

    Also summarises each institution's metrics under keys ``"<metric>[<institution>]"``.
    """
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r.algorithm for r in results):
        rs = [r for r in results if r.algorithm == name]
        keys = {k: [r.final[k] for r in rs] for k in METRICS}
        for inst in rs[0].final_per_institution:
            for k in METRICS:
                keys[f"{k}[{inst}]"] = [r.final_per_institution[inst][k] for r in rs]
        out[name] = {}
        for k, vals in keys.items():
            v = np.asarray(vals, dtype=np.float64)
            out[name][k] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)
    return out


def results_rows(results: Sequence["RunResult"]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "algorithm": r.algorithm,
            "seed": r.seed,
            **{k: r.final[k] for k in METRICS},
            "best_round": r.best_round,
            "rounds": len(r.history),
            "seconds": round(r.seconds, 3),
            "bytes_up_per_round": r.history[-1].bytes_up if r.history else 0,
        }
        for inst, m in r.final_per_institution.items():
            for k in METRICS:
                row[f"{k}[{inst}]"] = m[k]
        rows.append(row)
    return rows


def write_results_csv(results: Sequence["RunResult"], path: str | Path) -> None:
    """One row per (algorithm, seed): mean metrics over institutions and each institution's."""
    rows = results_rows(results)
    if not rows:
        return
    fields = list(rows[0])
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _pm(m: tuple[float, float], digits: int = 4) -> str:
    return f"{m[0]:.{digits}f} ± {m[1]:.{digits}f}"


def summary_table(
    results: Sequence["RunResult"], institutions: Sequence[str], target: str
) -> str:
    """The paper-style markdown table: mean ± std over seeds per algorithm."""
    summ = summarize(results)
    n_seeds = {a: sum(1 for r in results if r.algorithm == a) for a in summ}
    head = ["algorithm", "kind", "seeds", f"RMSE [{target}]", f"MAE [{target}]", "R2"]
    head += [f"R2 {i}" for i in institutions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, s in summ.items():
        cls = ALGORITHMS.get(a)
        kind = (
            "reference (non-federated)" if cls is not None and cls.centralized
            else "reference (no communication)" if cls is not None and not cls.federated
            else "federated"
        )
        cells = [a, kind, str(n_seeds[a]), _pm(s["rmse"]), _pm(s["mae"]), _pm(s["r2"])]
        cells += [_pm(s[f"r2[{i}]"], 3) for i in institutions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(
    results: Sequence["RunResult"],
    path: str | Path,
    cfg: "ExperimentConfig",
    federation: Mapping[str, Any],
    institutions: Sequence[str],
    command: str | None = None,
) -> None:
    """summary.md: the command, the federation's degree and the table."""
    lines = [
        f"# Benchmark: {cfg.target}",
        "",
        f"Command: `{command}`" if command else "Produced by the library API (see config.toml).",
        "",
        f"Federation: {len(institutions)} institutions, H = {federation['H']:.4f}, "
        f"alpha = {federation['alpha']:.4f}, KL_avg = {federation['KL_avg']:.4f}; "
        f"test rows: {federation['test']['rows']}.",
        f"Budget: {cfg.rounds} rounds x {cfg.local_steps} local steps of batch {cfg.batch_size}; "
        f"network MLP {list(cfg.hidden)}; seeds {cfg.seed_list}.",
        "Metrics on the shared test set, each institution predicting through its own columns, "
        "mean over institutions; mean ± std over seeds. Each institution keeps, on its own validation rows, the latest "
        f"round within {ROUND_SE:g} SE of its lowest validation loss" + (f"; local guard: {cfg.guard}." if cfg.guard != "off" else "."),
        ("Inputs a model did not train on: not clipped." if cfg.clip_inputs is None else
         f"Inputs a model did not train on: each column clipped to the institution's training range "
         f"widened by {cfg.clip_inputs:g} x the range on each side."),
        "",
        summary_table(results, institutions, cfg.target),
    ]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def curves_figure(results: Sequence["RunResult"], target: str):
    """The figure of :func:`write_curves`: test RMSE per round on a linear axis with ticks enough to read it.

    The axis spans the curves after their first rounds (the first twentieth, where RMSE falls
    steeply, may run off the top), so that curves a few hundredths apart can be told apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import AutoMinorLocator, MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    lo, hi = np.inf, -np.inf
    for name in dict.fromkeys(r.algorithm for r in results):
        curves = [np.array([h.rmse for h in r.history]) for r in results if r.algorithm == name]
        n = min(len(c) for c in curves)
        arr = np.stack([c[:n] for c in curves])
        mean, std = arr.mean(axis=0), arr.std(axis=0)
        x = np.arange(1, n + 1)
        (line,) = ax.plot(x, mean, label=name, lw=1.4)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        settled = mean[n // 20:]
        settled = settled[np.isfinite(settled)]
        if settled.size:
            lo, hi = min(lo, float(settled.min())), max(hi, float(settled.max()))
    if np.isfinite(lo) and np.isfinite(hi):
        pad = 0.05 * max(hi - lo, 1e-3)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test RMSE [{target}]")
    ax.set_yscale("linear")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
    ax.yaxis.set_minor_locator(AutoMinorLocator())
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.legend(frameon=False)
    ax.set_title("Test RMSE per round (mean over seeds, band ±1 std)")
    fig.tight_layout()
    return fig


def write_curves(results: Sequence["RunResult"], path: str | Path, target: str) -> None:
    """curves.png: test RMSE per round, one line per algorithm (mean over seeds, ±1 std band), linear axis."""
    import matplotlib.pyplot as plt

    fig = curves_figure(results, target)
    fig.savefig(path)
    plt.close(fig)
