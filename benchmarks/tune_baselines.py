"""Choose each algorithm's optimiser, learning rate and own settings on validation data (never the test set).

Run:  .venv/bin/python benchmarks/tune_baselines.py [--data-dir DIR] [--rounds 400] [--seeds 1] [--out docs/tuning.md]

For each algorithm and each candidate setting, the federation is trained with the benchmark's
budget (rounds x 5 local steps of batch 64, MLP 64x64) and scored by the lowest federation
validation MSE over the rounds (the quantity early stopping uses: every institution's model
predicts all institutions' validation rows, carved from their training data, through its own
columns; mean over institutions), averaged over seeds. The test split is not read for scoring. The script prints a markdown table per algorithm
and the winners, and writes them to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fedmdh.config import ExperimentConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fedmdh_perovskite_split"

GRIDS: dict[str, list[dict]] = {
    "local": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.2},
              {"optimizer": "adam", "lr": 0.001}, {"optimizer": "adam", "lr": 0.003}],
    "pooled": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.2},
               {"optimizer": "adam", "lr": 0.001}, {"optimizer": "adam", "lr": 0.003}],
    "fedavg": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.1}, {"optimizer": "sgd", "lr": 0.2},
               {"optimizer": "adam", "lr": 0.001}],
    "fedprox": [{"optimizer": "sgd", "lr": lr, "proximal_mu": mu} for lr in (0.05, 0.2) for mu in (0.001, 0.01, 0.1)],
    "fedmdh": [{"optimizer": "sgd", "lr": lr, "mask_prob": m} for lr in (0.05, 0.2) for m in (0.0, 0.3, 0.5)]
    + [{"optimizer": "sgd", "lr": 0.2, "mask_prob": 0.3, "cgan": False},
       {"optimizer": "sgd", "lr": 0.2, "mask_prob": 0.3, "soft_weight": 0.5},
       {"optimizer": "sgd", "lr": 0.2, "mask_prob": 0.3, "align_weight": 0.01}],
    "fedgan": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.2}],
    "flic": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.2}],
    "fedgen": [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "sgd", "lr": 0.2}],
    "fedkd": [{"optimizer": "sgd", "lr": lr, "distill_weight": dw, "max_distill_weight": cap}
              for lr in (0.05, 0.2) for dw, cap in ((0.05, 0.2), (0.2, 1.0))],
}


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
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--algorithms", default="local,pooled,fedavg,fedprox,fedmdh")
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
        for settings in GRIDS[name]:
            s = score(cfg, name, dict(settings), tables, seeds)
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
