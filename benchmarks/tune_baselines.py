"""Choose each baseline's local optimiser and learning rate on validation data (never the test set).

Run:  .venv/bin/python benchmarks/tune_baselines.py [--data-dir DIR] [--rounds 400] [--seeds 2] [--out docs/tuning.md]

For each algorithm and each candidate setting, the federation is trained with the benchmark's
budget (rounds x 5 local steps of batch 64, MLP 64x64) and scored by the lowest federation
validation MSE over the rounds (the same quantity early stopping uses: the sample-weighted mean of
each institution's validation MSE on rows carved from its own training data), averaged over
seeds. The test split is not read for scoring. The script prints a markdown table per algorithm
and the winners, and writes them to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fedmdh.config import ExperimentConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"

GRID: list[dict] = (
    [{"optimizer": "sgd", "lr": lr} for lr in (0.01, 0.02, 0.05, 0.1, 0.2)]
    + [{"optimizer": "sgd", "lr": lr, "momentum": 0.9} for lr in (0.005, 0.01, 0.02)]
    + [{"optimizer": "adam", "lr": lr} for lr in (0.001, 0.003)]
)
EXTRA = {"fedprox": [{"proximal_mu": mu} for mu in (0.001, 0.01, 0.1)]}


def score(cfg: ExperimentConfig, name: str, settings: dict, tables, seeds: list[int]) -> float:
    from fedmdh.experiment.runner import prepare
    from fedmdh.runtime.simulator import simulate

    c = cfg.with_overrides(algorithm_settings={name: settings})
    vals = []
    for seed in seeds:
        res = simulate(prepare(c, tables, seed), c.build_algorithm(name), c.rounds, seed=seed)
        vals.append(min(h.val_mse for h in res.history))
    return float(np.mean(vals))


def main() -> None:
    from fedmdh.experiment.runner import load_tables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--algorithms", default="local,pooled,fedavg,fedprox")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    insts = tuple(str(args.data_dir / f"train_part{i}.csv") for i in range(3))
    cfg = ExperimentConfig(insts, str(args.data_dir / "test_data1.csv"), "e_form", rounds=args.rounds)
    tables = load_tables(cfg)
    seeds = list(range(args.seeds))
    lines = [
        "# Baseline tuning on validation data",
        "",
        f"Command: `python benchmarks/tune_baselines.py --rounds {args.rounds} --seeds {args.seeds}` "
        "(perovskite split; score = lowest federation validation MSE in standardised units, mean over seeds).",
        "",
    ]
    winners = {}
    t0 = time.perf_counter()
    for name in args.algorithms.split(","):
        rows = []
        for settings in GRID:
            s = score(cfg, name, dict(settings, **({"proximal_mu": 0.01} if name == "fedprox" else {})), tables, seeds)
            rows.append((settings, s))
            print(f"{name:8s} {settings} val_mse {s:.5f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        best = dict(min(rows, key=lambda r: r[1])[0])
        for extra in EXTRA.get(name, []):
            settings = dict(best, **extra)
            s = score(cfg, name, settings, tables, seeds)
            rows.append((settings, s))
            print(f"{name:8s} {settings} val_mse {s:.5f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        best_settings, best_score = min(rows, key=lambda r: r[1])
        winners[name] = best_settings
        lines += [f"## {name}", "", "| setting | validation MSE |", "|---|---|"]
        lines += [f"| {s} | {v:.5f}{' (chosen)' if s == best_settings else ''} |" for s, v in rows]
        lines.append("")
    lines += ["## Chosen", ""] + [f"- {k}: {v}" for k, v in winners.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
